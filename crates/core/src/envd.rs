//! Per-sandbox state of envd's API (the server's `ringfence_server::envd` speaks the
//! protocol): the polling watchers of `CreateWatcher`/`GetWatcherEvents` and the count of open
//! `WatchDir` streams, kept on each live sandbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_proto::SandboxUser;
use serde_json::Value;

use crate::agent_client::EventStream;
use crate::observe::SandboxObs;

/// The envd version we advertise: the SDK gates features on it (see docs/e2b-compat.md §4.5).
pub const ENVD_VERSION: &str = "0.6.4";

/// envd's port in a sandbox (E2B's): the API's own, never a sandbox service's.
pub const ENVD_PORT: u16 = 49983;

/// Agent events waiting for a `GetWatcherEvents`.
pub type PendingEvents = Arc<tokio::sync::Mutex<EventStream>>;

/// A `CreateWatcher` watch: its events wait in the agent client's stream until
/// `GetWatcherEvents` drains them. The stream's flow-control window bounds that backlog: past
/// it the watch stops reading the kernel's queue, which drops what overflows.
#[derive(Debug)]
pub struct PollWatcher {
    pub watch: u64,
    /// The watched directory, resolved; set when entries are to be included.
    pub root: Option<String>,
    pub user: SandboxUser,
    pub events: PendingEvents,
}

/// Per-sandbox envd state: the polling watchers of `CreateWatcher`/`GetWatcherEvents`, and
/// how many `WatchDir` streams are open.
#[derive(Debug, Default)]
pub struct EnvdState {
    pub watchers: Mutex<HashMap<String, PollWatcher>>,
    pub streams: AtomicUsize,
    /// Where executions and file changes are reported (none in tests of envd alone).
    pub obs: Option<Arc<SandboxObs>>,
}

impl EnvdState {
    pub fn new() -> Self {
        Self::default()
    }

    /// State whose executions and file changes are audited.
    pub fn observed(obs: Arc<SandboxObs>) -> Self {
        EnvdState { watchers: Mutex::default(), streams: AtomicUsize::new(0), obs: Some(obs) }
    }

    /// Records a file change through the API before it is acknowledged.
    pub async fn audit(&self, action: &str, detail: Value) {
        if let Some(obs) = &self.obs {
            obs.record_action(action, detail).await;
        }
    }

    /// Whether any watch is open in this sandbox.
    pub fn watching(&self) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
            || self.watchers.lock().map(|w| !w.is_empty()).unwrap_or(false)
    }
}

/// Counts an open `WatchDir` stream for as long as it lives.
#[derive(Debug)]
pub struct OpenStream(Arc<EnvdState>);

impl OpenStream {
    pub fn new(state: Arc<EnvdState>) -> Self {
        state.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(state)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}
