//! The core's errors, as the API layer turns them into statuses
//! (`ringfence_server::e2b_error::E2bError`'s `From`).

use crate::tier::TierError;

/// What a request named that is not there (404), each with its own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error("sandbox {0:?} not found")]
    Sandbox(String),
    #[error("template {0:?} not found")]
    Template(String),
}

/// Errors the API turns into HTTP statuses (see `e2b_error::E2bError`'s `From`).
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(#[from] Missing),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// A per-key quota or the create rate refused it (429).
    #[error("{0}")]
    Quota(String),
    /// The tier refused (unknown or unavailable here: 400; not allowed for the key: 403;
    /// unsupported for this sandbox: 409) or failed (500).
    #[error("{0}")]
    Tier(#[from] TierError),
    /// The state database failed (500).
    #[error("state database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The sandbox's agent did not answer as it should (500).
    #[error("agent: {0}")]
    Agent(#[from] crate::agent_client::ClientError),
    /// The sandbox's network could not be attached (500).
    #[error("network: {0}")]
    Network(#[from] ringfence_net::NetError),
    /// Work handed to the blocking pool panicked or was cancelled (500).
    #[error("blocking task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Anything else inside the server (500): a poisoned lock, a host setup step.
    #[error("{0}")]
    Internal(String),
}

impl ManagerError {
    /// Sandbox `id` is not (or no longer) there.
    pub fn no_sandbox(id: &str) -> ManagerError {
        ManagerError::NotFound(Missing::Sandbox(id.to_string()))
    }
}

impl From<crate::quota::QuotaError> for ManagerError {
    fn from(e: crate::quota::QuotaError) -> Self {
        ManagerError::Quota(e.0)
    }
}
