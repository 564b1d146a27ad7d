//! Cluster mode: several `ringfence serve` nodes coordinated through etcd (v3 API).
//!
//! etcd holds, under one key prefix:
//! - `nodes/<id>`: each live node's address and capacity, attached to the node's lease (a
//!   node that stops renewing it disappears within the TTL);
//! - `sandboxes/<id>`: each sandbox's ownership record. It is created only if absent and
//!   changed only when its `mod_revision` is the one the writer read and its owner is the
//!   writer (or, for the leader's `lost` mark, the owner it read), so two nodes can never own
//!   one sandbox;
//! - `keys/<id>`: API keys (their hash, never a plaintext), read by every node;
//! - `idem/<tenant>/<key>`: which node a create under an `Idempotency-Key` went to;
//! - `election`: etcd's election API, whose leader does the leader-only work (marking the
//!   sandboxes of nodes whose lease expired `lost`).
//!
//! This crate does no HTTP: the server's routing layer asks it who owns what and where a new
//! sandbox should go, and reports what it runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// This node's id: stable across restarts (a restarted node adopts its sandboxes).
    pub node_id: String,
    /// The `host:port` other nodes reach this node's API at.
    pub advertise: String,
    /// Within this long of a node's last renewal it counts as dead and its sandboxes read
    /// `lost` (the etcd lease itself is granted a second shorter: see [`lease_request`]).
    pub ttl: Duration,
    /// Key prefix in etcd (several clusters may share one etcd).
    pub prefix: String,
    /// How many sandboxes this node offers at most (its capacity in slots).
    pub slots: u64,
    /// A directory every node can read and write (`--shared-snapshots`): sandboxes paused to
    /// their files are copied there, so another node can resume them if their owner is lost.
    pub shared_snapshots: Option<std::path::PathBuf>,
}

/// Errors of the coordination layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("record {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("sandbox {id} is owned by node {owner}")]
    OwnedElsewhere { id: String, owner: String },
    #[error("sandbox {0} changed while being updated; gave up after retries")]
    Contended(String),
    #[error(
        "node id {id:?} is registered by a live node at {addr} (a second node cannot take the \
         same id; wait for its lease to expire or pick another id)"
    )]
    DuplicateNode { id: String, addr: String },
    #[error("invalid cluster configuration: {0}")]
    Config(String),
}

/// What a node offers, as published under its lease.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub id: String,
    pub addr: String,
    /// Bytes of memory available on the host (MemAvailable).
    pub mem_available: u64,
    pub cpus: u64,
    /// Sandboxes this node may still start (slots less running ones).
    pub free_slots: u64,
    pub running: u64,
    pub templates: Vec<String>,
    pub tiers: Vec<String>,
}

/// What the server reports about itself each refresh.
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    pub mem_available: u64,
    pub cpus: u64,
    pub running: u64,
    pub templates: Vec<String>,
    pub tiers: Vec<String>,
}

/// A sandbox's ownership record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub owner: String,
    /// The API key id the sandbox belongs to.
    pub tenant: String,
    /// `running`, `paused` or `lost`.
    pub state: String,
    pub template: String,
    pub tier: String,
    /// Unix milliseconds.
    pub end_at: i64,
    /// Why the record reads `lost` (the owner that stopped renewing its lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_reason: Option<String>,
    /// Whether the sandbox holds one unit of its tenant's cluster-wide count (`count/<tenant>`,
    /// see [`Cluster::reserve`]): deleting the record gives it back in the same transaction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counted: bool,
    /// For a sandbox paused to its files: where its copy on shared storage is (a path under
    /// the nodes' `--shared-snapshots`), from which another node may resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A template's metadata as replicated: published by the node that built or imported it, read
/// by a node that must fetch the template's files from a peer. `content` is the trust anchor
/// of the fetch: each layer's canonical-tar digest, computed by the origin node from its own
/// copy; a peer's transfer that hashes to anything else is refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateMeta {
    /// `name:tag`.
    pub name: String,
    /// The node that published it.
    pub origin: String,
    /// The image store's record of the template, as that store writes it (this crate does not
    /// read it: the server and the image store do).
    pub record: serde_json::Value,
    /// Layer `diff_id` → the sha256 of its canonical tar.
    pub content: std::collections::BTreeMap<String, String>,
}

/// A record with the revision it was read at (the compare of the next write).
#[derive(Debug, Clone)]
pub struct Versioned {
    pub record: SandboxRecord,
    pub mod_revision: i64,
}

/// An API key as replicated: what the store keeps, never the plaintext.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub created_at: i64,
    pub operator: bool,
    pub limits: String,
    pub tiers: Option<String>,
    /// A revocation: the key's record stays as a tombstone (hash emptied) so no node imports
    /// it again, and every node that holds it revokes it.
    #[serde(default)]
    pub revoked: bool,
}

/// What a reconcile pass did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub claimed: usize,
    pub restored: usize,
    pub released: usize,
    /// Local sandboxes whose record names another owner: the caller must kill them.
    pub foreign: Vec<String>,
}

/// How long after its end a lost sandbox's record is kept (its node may be back within it and
/// finish the sandbox itself).
const SWEEP_GRACE_MS: i64 = 60_000;

/// Per-operation deadline on etcd calls: a partitioned node must fail fast, not hang.
const OP_TIMEOUT: Duration = Duration::from_millis(1000);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout(OP_TIMEOUT)),
    }
}

/// A node's membership in the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    client: Client,
    lease: AtomicI64,
    /// The lease's TTL as etcd granted it, in ms: renewals and the partition guard count on it.
    lease_ms: AtomicU64,
    /// When the lease was last confirmed alive at etcd.
    last_ok: Mutex<Instant>,
    /// Why the last renewal failed (for the 503 a partitioned node answers).
    last_error: Mutex<String>,
    /// False from a lease loss until the server has re-checked every local sandbox.
    settled: AtomicBool,
    /// Set when a new lease was taken: the server must reconcile before serving again.
    rejoined: AtomicBool,
    leader: AtomicBool,
    /// Set by [`Cluster::leave`]: the background tasks stop (no renewal, no re-registration).
    stopped: AtomicBool,
    nodes: RwLock<HashMap<String, NodeInfo>>,
    sandboxes: RwLock<HashMap<String, Versioned>>,
    keys: RwLock<HashMap<String, KeyRecord>>,
    /// Creates this node placed on each node (itself included) since that node last
    /// published its capacity, so a burst of creates does not all pick the node that looked
    /// emptiest a second ago.
    placed: Mutex<HashMap<String, u64>>,
    capacity: Mutex<Capacity>,
    /// The secret the nodes sign their internal requests with (kept in etcd, made by the
    /// first node that joins): whoever can read the cluster's etcd is a node.
    secret: Mutex<String>,
    /// Sandboxes this node took over ([`Cluster::take_over`]) and is still copying in: the
    /// reconcile must not drop their records as "not held here".
    adopting: Mutex<std::collections::HashSet<String>>,
    /// Woken by the watch when a node's registration goes (its lease expired or was revoked):
    /// the leader marks its sandboxes `lost` at once rather than at its next poll.
    node_gone: tokio::sync::Notify,
}

impl std::fmt::Debug for Cluster {
    // etcd's client is not `Debug`; the configuration says which cluster this is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Cluster {
    /// One etcd call, tried up to three times: the client balances over the endpoints, and a
    /// call that lands on a member that just went down fails once before the balancer stops
    /// picking it; the next try goes to a live member. Each try has [`OP_TIMEOUT`].
    async fn op<T, Fut>(&self, f: impl Fn(Client) -> Fut) -> Result<T, ClusterError>
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = ClusterError::Timeout(OP_TIMEOUT);
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match tokio::time::timeout(OP_TIMEOUT, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = e.into(),
                Err(_) => last = ClusterError::Timeout(OP_TIMEOUT),
            }
        }
        Err(last)
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, ClusterError> {
        self.op(|mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}/{kind}/{id}", self.cfg.prefix)
    }

    fn prefix_of(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.cfg.prefix)
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Connects, registers this node under a fresh lease, loads the caches and starts the
    /// renewal, watch and election tasks. A node id held by a live lease is waited for (up to
    /// twice the TTL: a restart after `kill -9` finds its old registration still there) and
    /// then refused.
    pub async fn join(cfg: ClusterConfig, cap: Capacity) -> Result<Arc<Cluster>, ClusterError> {
        if cfg.endpoints.is_empty() {
            return Err(ClusterError::Config("no etcd endpoints".into()));
        }
        if cfg.node_id.is_empty()
            || !cfg.node_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClusterError::Config(format!(
                "node id {:?} must be letters, digits, '-' or '_'",
                cfg.node_id
            )));
        }
        if cfg.ttl < Duration::from_secs(2) {
            return Err(ClusterError::Config("the lease TTL must be at least 2 s".into()));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            Client::connect(&cfg.endpoints, Some(opts)),
        )
        .await
        .map_err(|_| ClusterError::Timeout(Duration::from_secs(10)))??;
        let cluster = Arc::new(Cluster {
            lease_ms: AtomicU64::new(lease_request(cfg.ttl).as_millis() as u64),
            cfg,
            client,
            lease: AtomicI64::new(0),
            last_ok: Mutex::new(Instant::now()),
            last_error: Mutex::new(String::new()),
            settled: AtomicBool::new(false),
            rejoined: AtomicBool::new(true),
            leader: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            nodes: Default::default(),
            sandboxes: Default::default(),
            keys: Default::default(),
            placed: Default::default(),
            capacity: Mutex::new(cap),
            secret: Mutex::new(String::new()),
            adopting: Default::default(),
            node_gone: tokio::sync::Notify::new(),
        });
        cluster.load_secret().await?;
        let give_up = Instant::now() + cluster.cfg.ttl * 2 + Duration::from_secs(1);
        loop {
            match cluster.register().await {
                Ok(()) => break,
                Err(ClusterError::DuplicateNode { .. }) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        cluster.load("nodes").await?;
        cluster.load("sandboxes").await?;
        cluster.load("keys").await?;
        for kind in ["nodes", "sandboxes", "keys"] {
            tokio::spawn(cluster.clone().watch_loop(kind));
        }
        tokio::spawn(cluster.clone().renew_loop());
        tokio::spawn(cluster.clone().leader_loop());
        Ok(cluster)
    }

    /// Reads the cluster's node secret, making it first if no node has (create-if-absent, so
    /// nodes joining at once agree on one).
    async fn load_secret(&self) -> Result<(), ClusterError> {
        let key = format!("{}/secret", self.cfg.prefix);
        let fresh: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), fresh.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(txn).await?;
        let secret = if resp.succeeded() {
            fresh
        } else {
            resp.op_responses()
                .into_iter()
                .find_map(|o| match o {
                    TxnOpResponse::Get(g) => {
                        g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    }
                    _ => None,
                })
                .ok_or_else(|| ClusterError::Config("the cluster secret vanished".into()))?
        };
        if let Ok(mut s) = self.secret.lock() {
            *s = secret;
        }
        Ok(())
    }

    /// The secret nodes sign their internal (node-to-node) requests with.
    pub fn secret(&self) -> String {
        self.secret.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Template `name`'s replicated metadata (one etcd read), if any node published it.
    pub async fn template(&self, name: &str) -> Result<Option<TemplateMeta>, ClusterError> {
        let key = self.key("templates", name);
        let resp = self
            .op(|mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .map_err(|source| ClusterError::Decode { key, source }),
        }
    }

    /// Publishes `meta` (origin: this node) unless another node published that name first.
    /// Returns whether it was written; a rebuild on the origin replaces its own record.
    pub async fn publish_template(&self, meta: &TemplateMeta) -> Result<bool, ClusterError> {
        let mut meta = meta.clone();
        meta.origin = self.cfg.node_id.clone();
        let key = self.key("templates", &meta.name);
        let value = serde_json::to_vec(&meta)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        let existing = resp.op_responses().into_iter().find_map(|o| match o {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                (serde_json::from_slice::<TemplateMeta>(kv.value()).ok(), kv.mod_revision())
            }),
            _ => None,
        });
        match existing {
            Some((Some(old), _)) if old == meta => Ok(false),
            Some((Some(old), rev)) if old.origin == meta.origin => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key, value, None)]);
                Ok(self.txn(txn).await?.succeeded())
            }
            _ => Ok(false),
        }
    }

    /// Takes a new lease and writes this node's record under it, only if no live node holds
    /// the id (the key is absent, or attached to a lease of ours).
    async fn register(&self) -> Result<(), ClusterError> {
        let ttl = i64::try_from(lease_request(self.cfg.ttl).as_secs()).unwrap_or(i64::MAX);
        let granted = self.op(|mut c| async move { c.lease_grant(ttl, None).await }).await?;
        // etcd may raise a short TTL to its minimum: count on what it granted.
        if granted.ttl() > 0 {
            self.lease_ms.store(granted.ttl() as u64 * 1000, Ordering::SeqCst);
        }
        let lease = granted.id();
        let key = self.key("nodes", &self.cfg.node_id);
        let info = serde_json::to_vec(&self.node_info())?;
        let put = TxnOp::put(key.clone(), info, Some(PutOptions::new().with_lease(lease)));
        let old = self.lease.load(Ordering::SeqCst);
        // Ours if absent, or still attached to our previous lease (a re-registration after a
        // partition where the old lease has not expired yet).
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::txn(
                Txn::new()
                    .when([Compare::lease(key.clone(), CompareOp::Equal, old)])
                    .and_then([put])
                    .or_else([TxnOp::get(key.clone(), None)]),
            )]);
        let resp = self.txn(txn).await?;
        let won = resp.succeeded()
            || resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()));
        if !won {
            let _ = self.op(|mut c| async move { c.lease_revoke(lease).await }).await;
            let addr = resp
                .op_responses()
                .iter()
                .find_map(|r| match r {
                    TxnOpResponse::Txn(t) => t.op_responses().into_iter().find_map(|o| match o {
                        TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| {
                            serde_json::from_slice::<NodeInfo>(kv.value()).ok().map(|n| n.addr)
                        }),
                        _ => None,
                    }),
                    _ => None,
                })
                .unwrap_or_default();
            return Err(ClusterError::DuplicateNode { id: self.cfg.node_id.clone(), addr });
        }
        self.lease.store(lease, Ordering::SeqCst);
        self.mark_ok();
        Ok(())
    }

    fn mark_ok(&self) {
        if let Ok(mut t) = self.last_ok.lock() {
            *t = Instant::now();
        }
    }

    fn node_info(&self) -> NodeInfo {
        let cap = self.capacity.lock().map(|c| c.clone()).unwrap_or_default();
        NodeInfo {
            id: self.cfg.node_id.clone(),
            addr: self.cfg.advertise.clone(),
            mem_available: cap.mem_available,
            cpus: cap.cpus,
            free_slots: self.cfg.slots.saturating_sub(cap.running),
            running: cap.running,
            templates: cap.templates,
            tiers: cap.tiers,
        }
    }

    /// Replaces what the next refresh publishes.
    pub fn set_capacity(&self, cap: Capacity) {
        if let Ok(mut c) = self.capacity.lock() {
            *c = cap;
        }
    }

    /// Renews the lease every TTL/5 and republishes the capacity. After a failed renewal the
    /// node counts as partitioned once its lease may have expired (see [`Cluster::serving`]);
    /// a lease etcd reports gone is replaced by a new one and the node re-registered.
    async fn renew_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.lease_period() / 5).await;
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let lease = self.lease.load(Ordering::SeqCst);
            let alive = self
                .op(|mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    match stream.message().await {
                        Ok(m) => Ok(m.is_some_and(|r| r.ttl() > 0)),
                        // etcd answers an expired lease with TTL 0, which the client turns
                        // into this error.
                        Err(etcd_client::Error::LeaseKeepAliveError(m))
                            if m.contains("lease not found") =>
                        {
                            Ok(false)
                        }
                        Err(e) => Err(e),
                    }
                })
                .await;
            // The client reports etcd's answer for an expired lease (TTL 0) as this error.
            let alive = match alive {
                Err(ClusterError::Etcd(etcd_client::Error::LeaseKeepAliveError(m)))
                    if m.contains("lease not found") =>
                {
                    Ok(false)
                }
                other => other,
            };
            let result = match alive {
                Ok(true) => {
                    let key = self.key("nodes", &self.cfg.node_id);
                    let info = serde_json::to_vec(&self.node_info()).unwrap_or_default();
                    self.op(|mut c| {
                        let (k, v) = (key.clone(), info.clone());
                        async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
                    })
                    .await
                    .map(|_| ())
                }
                // The lease is gone (expired during a partition): others may have marked this
                // node's sandboxes lost. Register anew; serving waits for a reconcile.
                Ok(false) => {
                    self.settled.store(false, Ordering::SeqCst);
                    let r = self.register().await;
                    if r.is_ok() {
                        self.rejoined.store(true, Ordering::SeqCst);
                        tracing::warn!("cluster lease had expired: registered again");
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => self.mark_ok(),
                Err(e) => {
                    if let Ok(mut m) = self.last_error.lock() {
                        *m = e.to_string();
                    }
                    tracing::warn!(error = %e, "cluster lease renewal failed");
                }
            }
        }
    }

    /// Whether the lease was renewed recently enough that it surely still holds.
    pub fn lease_fresh(&self) -> bool {
        let since = self.last_ok.lock().map(|t| t.elapsed()).unwrap_or_default();
        let lease = self.lease_period();
        since + Duration::from_millis(1500).min(lease / 2) < lease
    }

    /// The lease's TTL as granted.
    fn lease_period(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::SeqCst))
    }

    /// Why this node must not serve now, or None. A node serves while its lease is surely
    /// alive (renewed less than TTL − 1.5 s ago: others only take over after it expires) and
    /// after it has re-checked its sandboxes following any lease loss.
    pub fn unavailable(&self) -> Option<String> {
        let since = self.last_ok.lock().map(|t| t.elapsed()).unwrap_or_default();
        let lease = self.lease_period();
        let margin = Duration::from_millis(1500).min(lease / 2);
        if since + margin >= lease {
            let why = self.last_error.lock().map(|m| m.clone()).unwrap_or_default();
            return Some(format!(
                "node {} cannot reach the cluster's etcd (lease not renewed for {:.1} s: {why})",
                self.cfg.node_id,
                since.as_secs_f64()
            ));
        }
        if !self.settled.load(Ordering::SeqCst) {
            return Some(format!(
                "node {} is re-checking its sandboxes after rejoining the cluster",
                self.cfg.node_id
            ));
        }
        None
    }

    /// True once after each (re)registration: the server reconciles, then calls
    /// [`Cluster::settle`].
    pub fn take_rejoined(&self) -> bool {
        self.rejoined.swap(false, Ordering::SeqCst)
    }

    /// Gives up the node's registration (and leadership) now rather than at lease expiry.
    pub async fn leave(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let lease = self.lease.swap(0, Ordering::SeqCst);
        let _ = self.op(|mut c| async move { c.lease_revoke(lease).await }).await;
    }

    /// Asks for another reconcile before serving (the last one failed).
    pub fn mark_rejoined(&self) {
        self.rejoined.store(true, Ordering::SeqCst);
    }

    /// Lets the node serve again after a reconcile.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Replaces the cache of `kind` with etcd's, returning the revision read.
    async fn load(&self, kind: &str) -> Result<i64, ClusterError> {
        let resp = self
            .op(|mut c| {
                let p = self.prefix_of(kind);
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let prefix = self.prefix_of(kind);
        match kind {
            "nodes" => {
                let mut m = HashMap::new();
                for kv in resp.kvs() {
                    if let Ok(n) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                        m.insert(n.id.clone(), n);
                    }
                }
                if let Ok(mut w) = self.nodes.write() {
                    *w = m;
                }
            }
            "sandboxes" => {
                let mut m = HashMap::new();
                for kv in resp.kvs() {
                    if let Ok(r) = serde_json::from_slice::<SandboxRecord>(kv.value()) {
                        m.insert(
                            r.id.clone(),
                            Versioned { record: r, mod_revision: kv.mod_revision() },
                        );
                    }
                }
                if let Ok(mut w) = self.sandboxes.write() {
                    *w = m;
                }
            }
            _ => {
                let mut m = HashMap::new();
                for kv in resp.kvs() {
                    if let Ok(k) = serde_json::from_slice::<KeyRecord>(kv.value()) {
                        m.insert(k.id.clone(), k);
                    }
                }
                if let Ok(mut w) = self.keys.write() {
                    *w = m;
                }
            }
        }
        let _ = prefix;
        Ok(rev)
    }

    /// Keeps the cache of `kind` current: a full read, then a watch from the revision after
    /// it; on any break (partition, compaction) the same again.
    async fn watch_loop(self: Arc<Self>, kind: &'static str) {
        while !self.stopped.load(Ordering::SeqCst) {
            if let Err(e) = self.watch_once(kind).await {
                tracing::debug!(kind, error = %e, "cluster watch ended; reloading");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn watch_once(&self, kind: &'static str) -> Result<(), ClusterError> {
        let rev = self.load(kind).await?;
        let mut c = self.client.clone();
        let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
        let mut stream = timed(c.watch(self.prefix_of(kind), Some(opts))).await?;
        let prefix = self.prefix_of(kind);
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Ok(());
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let id = String::from_utf8_lossy(kv.key())
                    .strip_prefix(&prefix)
                    .unwrap_or_default()
                    .to_string();
                let put = ev.event_type() == EventType::Put;
                match kind {
                    "nodes" => {
                        if let Ok(mut m) = self.nodes.write() {
                            match serde_json::from_slice::<NodeInfo>(kv.value()) {
                                Ok(n) if put => {
                                    if let Ok(mut p) = self.placed.lock() {
                                        p.remove(&n.id);
                                    }
                                    m.insert(id, n);
                                }
                                _ => {
                                    m.remove(&id);
                                    self.node_gone.notify_one();
                                }
                            }
                        }
                    }
                    "sandboxes" => {
                        if let Ok(mut m) = self.sandboxes.write() {
                            match serde_json::from_slice::<SandboxRecord>(kv.value()) {
                                Ok(r) if put => {
                                    m.insert(
                                        id,
                                        Versioned { record: r, mod_revision: kv.mod_revision() },
                                    );
                                }
                                _ => {
                                    // A delete older than what a txn of ours already cached
                                    // cannot happen: watches deliver in revision order.
                                    m.remove(&id);
                                }
                            }
                        }
                    }
                    _ => {
                        if let Ok(mut m) = self.keys.write() {
                            match serde_json::from_slice::<KeyRecord>(kv.value()) {
                                Ok(k) if put => {
                                    m.insert(id, k);
                                }
                                _ => {
                                    m.remove(&id);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Live nodes (those whose lease holds), this one included.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> =
            self.nodes.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn node(&self, id: &str) -> Option<NodeInfo> {
        self.nodes.read().ok()?.get(id).cloned()
    }

    /// Every ownership record, from the watch-fed cache.
    pub fn records(&self) -> Vec<SandboxRecord> {
        self.sandboxes
            .read()
            .map(|m| m.values().map(|v| v.record.clone()).collect())
            .unwrap_or_default()
    }

    /// Replicated API keys, from the watch-fed cache.
    pub fn keys(&self) -> Vec<KeyRecord> {
        self.keys.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Publishes a key if no record of its id exists yet.
    pub async fn publish_key(&self, k: &KeyRecord) -> Result<(), ClusterError> {
        let key = self.key("keys", &k.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, serde_json::to_vec(k)?, None)]);
        self.txn(txn).await?;
        Ok(())
    }

    /// Replaces key `id`'s record with a tombstone (whatever was there, or nothing): every
    /// node revokes it and none imports it again.
    pub async fn revoke_key(&self, id: &str) -> Result<(), ClusterError> {
        let tomb = KeyRecord {
            id: id.to_string(),
            name: String::new(),
            key_hash: String::new(),
            created_at: 0,
            operator: false,
            limits: String::new(),
            tiers: None,
            revoked: true,
        };
        let mut c = self.client.clone();
        timed(c.put(self.key("keys", id), serde_json::to_vec(&tomb)?, None)).await?;
        Ok(())
    }

    /// The owner record of sandbox `id`: the cache, or one etcd read on a miss.
    pub async fn lookup(&self, id: &str) -> Result<Option<SandboxRecord>, ClusterError> {
        if let Some(v) = self.sandboxes.read().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(Some(v.record));
        }
        Ok(self.read(id).await?.map(|v| v.record))
    }

    async fn read(&self, id: &str) -> Result<Option<Versioned>, ClusterError> {
        let key = self.key("sandboxes", id);
        let resp = self
            .op(|mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                let record = serde_json::from_slice(kv.value())
                    .map_err(|source| ClusterError::Decode { key, source })?;
                Ok(Some(Versioned { record, mod_revision: kv.mod_revision() }))
            }
        }
    }

    fn cache(&self, v: Versioned) {
        if let Ok(mut m) = self.sandboxes.write() {
            // The watch may already have delivered a newer revision.
            let newer = m.get(&v.record.id).is_some_and(|o| o.mod_revision > v.mod_revision);
            if !newer {
                m.insert(v.record.id.clone(), v);
            }
        }
    }

    /// Records `rec` (owner: this node) if no record of its id exists. An existing record of
    /// ours is brought to `rec`'s state (a `lost` one is taken back); one of another node is
    /// [`ClusterError::OwnedElsewhere`]. Returns whether anything was written.
    pub async fn claim(&self, rec: &SandboxRecord) -> Result<bool, ClusterError> {
        let mut rec = rec.clone();
        rec.owner = self.cfg.node_id.clone();
        rec.lost_reason = None;
        let key = self.key("sandboxes", &rec.id);
        for _ in 0..5 {
            let value = serde_json::to_vec(&rec)?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.txn(txn).await?;
            if resp.succeeded() {
                let rev = resp.header().map_or(0, |h| h.revision());
                self.cache(Versioned { record: rec.clone(), mod_revision: rev });
                return Ok(true);
            }
            let existing = resp.op_responses().into_iter().find_map(|o| match o {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                    (serde_json::from_slice::<SandboxRecord>(kv.value()), kv.mod_revision())
                }),
                _ => None,
            });
            let Some((Ok(old), rev)) = existing else { continue };
            if old.owner != rec.owner {
                return Err(ClusterError::OwnedElsewhere { id: rec.id, owner: old.owner });
            }
            // The unit of the tenant's count stays with the record until it is deleted; a
            // paused sandbox's shared copy stays named until it runs again.
            rec.counted |= old.counted;
            if rec.state == "paused" && rec.snapshot.is_none() {
                rec.snapshot.clone_from(&old.snapshot);
            }
            if old == rec {
                self.cache(Versioned { record: old, mod_revision: rev });
                return Ok(false);
            }
            if self.swap(&key, rev, &rec).await? {
                return Ok(true);
            }
        }
        Err(ClusterError::Contended(rec.id))
    }

    /// Writes `rec` at `key` if the key is still at `rev`.
    async fn swap(&self, key: &str, rev: i64, rec: &SandboxRecord) -> Result<bool, ClusterError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key, serde_json::to_vec(rec)?, None)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            let rev = resp.header().map_or(0, |h| h.revision());
            self.cache(Versioned { record: rec.clone(), mod_revision: rev });
        }
        Ok(resp.succeeded())
    }

    /// Takes over paused sandbox `id` whose owner is lost (its record `lost`, or its owner
    /// without a live registration) and whose files are on shared storage: one transaction,
    /// compared on the record's revision, so of several nodes trying at once exactly one
    /// wins. Returns the new record (owner: this node, state `paused`), or None when the
    /// sandbox is not such a one or another node took it first.
    pub async fn take_over(&self, id: &str) -> Result<Option<SandboxRecord>, ClusterError> {
        let Some(v) = self.read(id).await? else { return Ok(None) };
        let alive = self.node(&v.record.owner).is_some();
        let orphan = v.record.state == "lost" || !alive;
        if v.record.snapshot.is_none() || !orphan || v.record.owner == self.cfg.node_id {
            return Ok(None);
        }
        let mut rec = v.record.clone();
        rec.owner = self.cfg.node_id.clone();
        rec.state = "paused".into();
        rec.lost_reason = None;
        if let Ok(mut a) = self.adopting.lock() {
            a.insert(id.to_string());
        }
        let won = self.swap(&self.key("sandboxes", id), v.mod_revision, &rec).await?;
        if !won {
            self.adopted(id);
        }
        Ok(won.then_some(rec))
    }

    /// Marks sandbox `id` as being copied in (see [`Cluster::take_over`]) or, with
    /// [`Cluster::adopted`], done.
    pub fn adopting(&self, id: &str) {
        if let Ok(mut a) = self.adopting.lock() {
            a.insert(id.to_string());
        }
    }

    /// The copy-in of sandbox `id` ended (it is in the local store now, or it failed).
    pub fn adopted(&self, id: &str) {
        if let Ok(mut a) = self.adopting.lock() {
            a.remove(id);
        }
    }

    /// Deletes sandbox `id`'s record if this node owns it (compared on its revision).
    pub async fn release(&self, id: &str) -> Result<(), ClusterError> {
        for _ in 0..5 {
            let Some(v) = self.read(id).await? else { return Ok(()) };
            if v.record.owner != self.cfg.node_id {
                return Ok(());
            }
            if self.delete_record(&v).await? {
                return Ok(());
            }
        }
        Err(ClusterError::Contended(id.to_string()))
    }

    /// Deletes the record `v` was read as (compared on its revision), giving back its unit of
    /// the tenant's count in the same transaction. False if either changed meanwhile.
    async fn delete_record(&self, v: &Versioned) -> Result<bool, ClusterError> {
        let key = self.key("sandboxes", &v.record.id);
        let mut when = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, v.mod_revision)];
        let mut ops = vec![TxnOp::delete(key, None)];
        if v.record.counted {
            let (n, rev) = self.count(&v.record.tenant).await?;
            let ck = self.key("count", &v.record.tenant);
            when.push(Compare::mod_revision(ck.clone(), CompareOp::Equal, rev));
            ops.push(TxnOp::put(ck, n.saturating_sub(1).to_string(), None));
        }
        let done = self.txn(Txn::new().when(when).and_then(ops)).await?.succeeded();
        if done && let Ok(mut m) = self.sandboxes.write() {
            m.remove(&v.record.id);
        }
        Ok(done)
    }

    /// Tenant `tenant`'s cluster-wide sandbox count and the counter's revision (0: absent).
    async fn count(&self, tenant: &str) -> Result<(u64, i64), ClusterError> {
        let key = self.key("count", tenant);
        let resp = self
            .op(|mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map_or((0, 0), |kv| {
            let n = std::str::from_utf8(kv.value()).ok().and_then(|s| s.parse().ok());
            (n.unwrap_or(0), kv.mod_revision())
        }))
    }

    /// Takes one unit of `tenant`'s cluster-wide sandbox count if it is below `max` (0: no
    /// limit, nothing taken): a compare-and-swap on `count/<tenant>`, so creates on every
    /// node at once never take more than `max` together. `Err(n)` inside: refused, the
    /// tenant holds `n`. A unit taken goes back with [`Cluster::unreserve`] (the create
    /// failed) or with its record's deletion (the record is written `counted`).
    pub async fn reserve(&self, tenant: &str, max: u64) -> Result<Result<(), u64>, ClusterError> {
        if max == 0 {
            return Ok(Ok(()));
        }
        let key = self.key("count", tenant);
        for _ in 0..50 {
            let (n, rev) = self.count(tenant).await?;
            if n >= max {
                return Ok(Err(n));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), (n + 1).to_string(), None)]);
            if self.txn(txn).await?.succeeded() {
                return Ok(Ok(()));
            }
        }
        Err(ClusterError::Contended(format!("the sandbox count of key {tenant}")))
    }

    /// Gives back a unit [`Cluster::reserve`] took for a create that did not happen.
    pub async fn unreserve(&self, tenant: &str) -> Result<(), ClusterError> {
        let key = self.key("count", tenant);
        for _ in 0..50 {
            let (n, rev) = self.count(tenant).await?;
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), n.saturating_sub(1).to_string(), None)]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(ClusterError::Contended(format!("the sandbox count of key {tenant}")))
    }

    /// The sandboxes this node's records name it the owner of (from the cache).
    pub fn owned_ids(&self) -> std::collections::HashSet<String> {
        self.sandboxes
            .read()
            .map(|m| {
                m.values()
                    .filter(|v| v.record.owner == self.cfg.node_id)
                    .map(|v| v.record.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Brings etcd in line with what this node runs: `local` is every sandbox it holds
    /// (running or paused), with its current record. Records of ours among `before` (taken
    /// with [`Cluster::owned_ids`] before `local` was read, so a sandbox created meanwhile is
    /// never among them) for sandboxes it no longer holds are deleted; sandboxes whose record
    /// names another node are returned in [`Reconciled::foreign`] for the caller to kill.
    /// Every check is a transaction, never the cache alone.
    pub async fn reconcile(
        &self,
        local: &[SandboxRecord],
        before: &std::collections::HashSet<String>,
    ) -> Result<Reconciled, ClusterError> {
        let mut out = Reconciled::default();
        for rec in local {
            let cached = self.sandboxes.read().ok().and_then(|m| m.get(&rec.id).cloned());
            let same = cached.as_ref().is_some_and(|v| {
                v.record.owner == self.cfg.node_id
                    && v.record.state == rec.state
                    && v.record.end_at == rec.end_at
            });
            if same {
                continue;
            }
            let was_lost = cached.as_ref().is_some_and(|v| v.record.state == "lost");
            match self.claim(rec).await {
                Ok(true) if was_lost => out.restored += 1,
                Ok(true) => out.claimed += 1,
                Ok(false) => {}
                Err(ClusterError::OwnedElsewhere { .. }) => out.foreign.push(rec.id.clone()),
                Err(e) => return Err(e),
            }
        }
        let held: std::collections::HashSet<&str> = local.iter().map(|r| r.id.as_str()).collect();
        let adopting = self.adopting.lock().map(|a| a.clone()).unwrap_or_default();
        let mine: Vec<&String> = before
            .iter()
            .filter(|id| !held.contains(id.as_str()) && !adopting.contains(id.as_str()))
            .collect();
        for id in mine {
            self.release(id).await?;
            out.released += 1;
        }
        Ok(out)
    }

    /// Picks the node for a new sandbox of `template` on `tier`: two random nodes among
    /// those that have both and a free slot, the one with more free capacity (this node on a
    /// tie). None when no node qualifies (the caller creates locally and lets that fail with
    /// the local reason).
    ///
    /// With `fetchable` (the template's metadata is in etcd, so a node without its files can
    /// fetch them from one that has them), every node with the tier qualifies.
    pub fn place(&self, template: &str, tier: &str, fetchable: bool) -> Option<NodeInfo> {
        use rand::seq::IndexedRandom;
        let placed = self.placed.lock().map(|p| p.clone()).unwrap_or_default();
        let fits: Vec<(NodeInfo, u64)> = self
            .nodes()
            .into_iter()
            .filter(|n| {
                (fetchable || n.templates.iter().any(|t| t == template))
                    && n.tiers.iter().any(|t| t == tier)
            })
            .map(|n| {
                let free = n.free_slots.saturating_sub(placed.get(&n.id).copied().unwrap_or(0));
                (n, free)
            })
            .filter(|(_, free)| *free > 0)
            .collect();
        let mut rng = rand::rng();
        let pick: Vec<&(NodeInfo, u64)> = fits.choose_multiple(&mut rng, 2).collect();
        let chosen = match pick.as_slice() {
            [] => return None,
            [one] => &one.0,
            [a, b, ..] => {
                if a.1 != b.1 {
                    if a.1 > b.1 { &a.0 } else { &b.0 }
                } else if b.0.id == self.cfg.node_id {
                    &b.0
                } else {
                    &a.0
                }
            }
        };
        // Counted for this node too: its own published count is as stale as its peers'.
        if let Ok(mut p) = self.placed.lock() {
            *p.entry(chosen.id.clone()).or_default() += 1;
        }
        Some(chosen.clone())
    }

    /// Pins a create under an `Idempotency-Key` to a node: the first create's node is
    /// recorded (for 24 h) and every retry, through whichever node, goes there.
    pub async fn idempotent_target(
        &self,
        tenant: &str,
        key: &str,
        node: &str,
    ) -> Result<String, ClusterError> {
        let k = format!("{}/idem/{tenant}/{key}", self.cfg.prefix);
        let lease =
            self.op(|mut c| async move { c.lease_grant(24 * 3600, None).await }).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), node, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(k.clone(), None)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(node.to_string());
        }
        let _ = self.op(|mut c| async move { c.lease_revoke(lease).await }).await;
        let owner = resp
            .op_responses()
            .into_iter()
            .find_map(|o| match o {
                TxnOpResponse::Get(g) => {
                    g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                }
                _ => None,
            })
            .unwrap_or_else(|| node.to_string());
        Ok(owner)
    }

    /// Campaigns for leadership with the node's lease; while leader, marks the sandboxes of
    /// nodes without a live lease `lost` every half second. Leadership ends with the lease.
    async fn leader_loop(self: Arc<Self>) {
        let name = format!("{}/election", self.cfg.prefix);
        while !self.stopped.load(Ordering::SeqCst) {
            let lease = self.lease.load(Ordering::SeqCst);
            let mut c = self.client.clone();
            // Campaign blocks until elected; it is abandoned if our lease changes meanwhile
            // (its key goes with the old lease).
            let won = tokio::select! {
                r = c.campaign(name.clone(), self.cfg.node_id.clone(), lease) => r.is_ok(),
                _ = async {
                    while self.lease.load(Ordering::SeqCst) == lease {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                } => false,
            };
            if !won {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            self.leader.store(true, Ordering::SeqCst);
            tracing::info!(node = %self.cfg.node_id, "cluster leader");
            while self.lease.load(Ordering::SeqCst) == lease {
                if self.lease_fresh()
                    && let Err(e) = self.mark_lost().await
                {
                    tracing::warn!(error = %e, "marking lost sandboxes");
                }
                if self.lease_fresh()
                    && let Err(e) = self.sweep_expired().await
                {
                    tracing::warn!(error = %e, "sweeping expired records");
                }
                // A node's registration going (the watch's delete) wakes this at once; the
                // poll stays for what a watch restart may have missed.
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = self.node_gone.notified() => {}
                }
            }
            self.leader.store(false, Ordering::SeqCst);
        }
    }

    /// Leader work: `lost` records whose sandbox's end passed over [`SWEEP_GRACE_MS`] ago are
    /// deleted (with their unit of the tenant's count): nobody can use them any more, and no
    /// owner is there to release them; a live owner expires and releases its own. Records of
    /// paused sandboxes copied to shared storage stay (they remain resumable elsewhere).
    async fn sweep_expired(&self) -> Result<usize, ClusterError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let alive: std::collections::HashSet<String> =
            self.nodes().into_iter().map(|n| n.id).collect();
        let expired: Vec<Versioned> = self
            .sandboxes
            .read()
            .map(|m| {
                m.values()
                    .filter(|v| {
                        v.record.state == "lost"
                            && !alive.contains(&v.record.owner)
                            && v.record.snapshot.is_none()
                            // 0: a record without an end (none is swept for that).
                            && v.record.end_at > 0
                            && v.record.end_at.saturating_add(SWEEP_GRACE_MS) < now
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut n = 0;
        for v in expired {
            if self.delete_record(&v).await? {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(count = n, "swept expired records of lost sandboxes");
        }
        Ok(n)
    }

    /// Leader work: every record whose owner has no live registration reads `lost`.
    async fn mark_lost(&self) -> Result<usize, ClusterError> {
        let alive: std::collections::HashSet<String> =
            self.nodes().into_iter().map(|n| n.id).collect();
        let stale: Vec<Versioned> = self
            .sandboxes
            .read()
            .map(|m| {
                m.values()
                    .filter(|v| v.record.state != "lost" && !alive.contains(&v.record.owner))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut n = 0;
        for v in stale {
            let mut rec = v.record.clone();
            rec.lost_reason =
                Some(format!("its node {} stopped renewing its cluster lease", rec.owner));
            rec.state = "lost".into();
            if self.swap(&self.key("sandboxes", &rec.id), v.mod_revision, &rec).await? {
                n += 1;
            }
        }
        if n > 0 {
            tracing::warn!(count = n, "marked sandboxes of dead nodes lost");
        }
        Ok(n)
    }
}

/// The lease TTL asked of etcd for a configured `ttl`: a second shorter, so that a dead node's
/// sandboxes read `lost` within `ttl` of its last renewal and not after it. etcd checks lease
/// expiry about every 0.5 s and the leader learns of it through a watch; the second covers
/// both. Whole seconds (etcd's unit), at least one.
pub fn lease_request(ttl: Duration) -> Duration {
    Duration::from_secs(ttl.as_secs().saturating_sub(1).max(1))
}
