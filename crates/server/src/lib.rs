//! `ringfence serve`: E2B's REST control plane and envd sandbox API, one listener: the HTTP
//! edge over the sandbox core (`ringfence-core`).
//!
//! Request flow: `api` authenticates (API key for the control plane, per-sandbox access token
//! for sandbox traffic) and routes; the core's `manager` owns sandbox lifecycles through the
//! isolation tiers; `envd` translates E2B's Connect JSON and `/files` calls into the agent
//! protocol, which the core's `agent_client` multiplexes over each sandbox's control channel;
//! `interp` serves port 49999 over the core's kernels; `e2b_error` is every error body.

#![forbid(unsafe_code)]

pub mod api;
// The sandbox core, under the paths the edge (and its tests) have always used.
pub use ringfence_core::{
    agent_client, bounded, builder, manager, metrics, observe, phases, quota, store, tier, time,
};
pub mod cluster;
pub mod codec;
pub mod e2b_error;
pub mod envd;
pub mod events;
pub mod extras;
pub mod fault;
pub mod files_query;
pub mod interp;
pub mod mcp;
pub mod network;
pub mod secrets;
pub mod templates;
pub mod ui;
pub mod upload;
pub mod validate;
pub mod volumes;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::manager::{Manager, ManagerConfig};
use crate::store::Store;

/// Everything `ringfence serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub manager: ManagerConfig,
    pub observe: observe::ObserveConfig,
    /// Cluster mode (`--cluster`): None serves on its own, with no etcd.
    pub cluster: Option<ringfence_cluster::ClusterConfig>,
}

/// Fatal server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("state database: {0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Manager(#[from] manager::ManagerError),
    #[error("{0}")]
    Observe(#[from] observe::ObserveError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster: {0}")]
    Cluster(#[from] ringfence_cluster::ClusterError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Path of the state database inside the data directory.
pub fn db_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("ringfence.db")
}

/// Runs the server until SIGINT or SIGTERM; then kills every sandbox it runs. After a crash
/// instead (or `kill -9`), the next start reattaches to the sandboxes still alive.
pub async fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    let store = Arc::new(Store::open(&db_path(&cfg.manager.data_dir))?);
    let observer =
        observe::Observer::new(cfg.observe.clone(), store.clone(), &cfg.manager.data_dir)?;
    tokio::spawn(observer.clone().write_loop());
    let manager = Arc::new(Manager::new(cfg.manager.clone(), store, observer.clone())?);
    // Sandboxes outlive a crashed or killed server: take them back before serving.
    let (back, lost) = manager.recover().await?;
    if back + lost > 0 {
        tracing::info!(reattached = back, lost, "recovered sandboxes of the previous server");
    }
    tokio::spawn(manager.clone().reap_loop());
    tokio::spawn(manager.clone().pool_loop());
    tokio::spawn(manager.clone().sample_loop());
    tokio::spawn(events::delivery_loop(manager.store().clone()));
    volumes::sweep(&cfg.manager.data_dir, manager.store());
    templates::sweep(&cfg.manager.data_dir);
    {
        // Template uploads no build used within their time to live: at start, then hourly.
        let (data, ttl) = (cfg.manager.data_dir.clone(), cfg.manager.builds.upload_ttl);
        tokio::spawn(async move {
            loop {
                let (d, t) = (data.clone(), ttl);
                let n = tokio::task::spawn_blocking(move || templates::expire_uploads(&d, t))
                    .await
                    .unwrap_or(0);
                if n > 0 {
                    tracing::info!(removed = n, "expired template uploads");
                }
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
        });
    }
    let builds = Arc::new(templates::Builds::default());
    let interrupted = builds.recover(&cfg.manager.data_dir);
    if interrupted > 0 {
        tracing::warn!(
            builds = interrupted,
            "template builds the previous server was running ended in error"
        );
    }
    // The fork server imports the data libraries once (seconds): start it beside the listener.
    let rt = manager.interp().clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = rt.warm() {
            tracing::warn!("code interpreter unavailable until its environment is built: {e}");
        }
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Listen { addr: cfg.listen, source })?;
    tracing::info!(listen = %cfg.listen, "ringfence serve: ready");
    let app = api::App { manager: manager.clone(), builds };
    let cluster = match cfg.cluster.clone() {
        Some(cc) => Some(cluster::join(cc, &app).await?),
        None => None,
    };
    let app = match &cluster {
        Some(c) => cluster::router(app.clone(), c.clone(), api::router(app)),
        None => api::router(app),
    };
    // Streams send many small frames (a start event, then output): without TCP_NODELAY,
    // Nagle's algorithm meets the client's delayed ACK and holds the second frame ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    manager.shutdown().await;
    if let Some(c) = &cluster {
        // Its sandboxes are gone: so are their records, and the node's registration.
        if let Err(e) = c.reconcile(&[], &c.owned_ids()).await {
            tracing::warn!(error = %e, "removing this node's sandbox records from the cluster");
        }
        c.leave().await;
    }
    volumes::unmount_all(&cfg.manager.data_dir, manager.store());
    observer.flush().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
