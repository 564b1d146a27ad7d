//! Sandbox lifecycle for the server: create through the jail tier, look up, time out, kill.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::launch::{Sandbox, SandboxSpec};
use ringfence_jail::limits::Limits;
use ringfence_jail::monitor::Supervisor;
use ringfence_jail::seccomp::Compiled;
use ringfence_jail::template::Template;
use ringfence_jail::{JailConfig, preflight, seccomp, template};

use crate::agent_client::AgentClient;
use crate::envd::EnvdState;
use crate::observe::{Observer, SandboxObs};
use crate::store::{Lifecycle, SandboxRecord, SandboxState, Store};

#[path = "lifecycle.rs"]
mod lifecycle;

/// Cgroup slots used by server sandboxes (the CLI's one-shot runs use their own).
pub const POOL_PREFIX: &str = "srv";

/// The envd version we advertise: the SDK gates features on it (see docs/e2b-compat.md §4.5).
pub const ENVD_VERSION: &str = "0.6.4";

/// Templates a client may ask for. `base` and `host` are the host template; the code
/// interpreter's adds the interpreter environment and starts a Python kernel with each sandbox.
pub const TEMPLATES: &[&str] = &["base", template::INTERP_TEMPLATE, "host"];

/// Server settings that shape sandboxes.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub agent_path: PathBuf,
    pub limits: Limits,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// The interpreter environment (`scripts/interp-env.sh`), bound into code-interpreter
    /// sandboxes and used by the fork server.
    pub interp_env: PathBuf,
    /// Egress policy ceiling, DNS upstream, inbound routing (`crate::network`).
    pub network: crate::network::NetworkConfig,
    /// Warm pool: pre-started sandboxes per template, and the memory they may hold in all.
    pub pool_sizes: BTreeMap<String, usize>,
    pub pool_memory: u64,
    /// Below this much available host memory, sandboxes paused in memory are demoted to
    /// filesystem-only pauses, oldest first (0: never).
    pub pressure_floor: u64,
    /// Per-key quotas by default (a key's own settings override them).
    pub quotas: crate::quota::QuotaConfig,
    /// Where sandboxes' writable layers live (settled once, at start).
    pub disk: ringfence_jail::disk::DiskChoice,
    /// The `ringfence` binary, run as `ringfence keeper` to hold sandboxes' seccomp listeners
    /// across restarts (see `ringfence_jail::keeper`). `None`: no keeper; a re-attached
    /// sandbox then goes unsupervised (its denied calls fail with ENOSYS, unrecorded).
    pub keeper_exe: Option<PathBuf>,
}

/// Errors the API turns into HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("sandbox {0:?} not found")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// A per-key quota or the create rate refused it (429).
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Internal(String),
}

/// A sandbox the server is running.
#[derive(Debug)]
pub struct Live {
    pub record: Mutex<SandboxRecord>,
    pub client: Arc<AgentClient>,
    pub envd: Arc<EnvdState>,
    /// Code-interpreter contexts (port 49999).
    pub interp: crate::interp::Contexts,
    /// Metrics, security events and audit records of this sandbox.
    pub obs: Arc<SandboxObs>,
    /// The sandbox's network (egress policy, connections); empty once torn down.
    pub net: crate::network::NetSlot,
    /// When the sandbox was last used, for idle timeouts.
    pub activity: Activity,
    jail: Mutex<Option<Sandbox>>,
    supervisor: Mutex<Option<Supervisor>>,
}

/// Signs of use the idle timeout looks at.
#[derive(Debug, Default)]
pub struct Activity {
    /// Unix ms of the last API request for the sandbox (or of its start).
    pub last_ms: std::sync::atomic::AtomicI64,
    /// cgroup CPU time at the last idle check, and when that was.
    pub cpu_ns: std::sync::atomic::AtomicU64,
    pub cpu_checked_ms: std::sync::atomic::AtomicI64,
}

impl Live {
    /// Wraps a started (or re-attached) jail, counted as used now and linked to its observer.
    fn new(
        record: SandboxRecord,
        client: Arc<AgentClient>,
        obs: Arc<SandboxObs>,
        sb: Sandbox,
        supervisor: Option<Supervisor>,
    ) -> Arc<Live> {
        let live = Arc::new(Live {
            record: Mutex::new(record),
            client,
            envd: Arc::new(EnvdState::observed(obs.clone())),
            interp: Default::default(),
            obs: obs.clone(),
            net: Mutex::default(),
            activity: Activity::default(),
            jail: Mutex::new(Some(sb)),
            supervisor: Mutex::new(supervisor),
        });
        live.touch();
        obs.attach(&live);
        live
    }

    /// The sandbox's state, without copying its record.
    pub fn state(&self) -> Option<SandboxState> {
        self.record.lock().ok().map(|r| r.state)
    }

    /// Marks the sandbox as used now.
    pub fn touch(&self) {
        self.activity.last_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the jail handle out (dropping it kills the sandbox).
    pub fn take_jail(&self) -> Option<Sandbox> {
        self.jail.lock().ok().and_then(|mut j| j.take())
    }

    /// Runs `f` on the jail handle, if the sandbox still has one.
    pub fn with_jail<R>(&self, f: impl FnOnce(&Sandbox) -> R) -> Option<R> {
        let guard = self.jail.lock().ok()?;
        guard.as_ref().map(f)
    }

    pub fn snapshot(&self) -> Option<SandboxRecord> {
        self.record.lock().ok().map(|r| r.clone())
    }
}

/// What a create request asks for, validated by the API layer.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub template: String,
    pub timeout: Duration,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub network: crate::network::NetParams,
    /// Pause-on-timeout, auto-resume, idle timeout; `layers` is filled from the template when
    /// it names a snapshot.
    pub lifecycle: Lifecycle,
    /// Restarting a sandbox that already exists (resume after a filesystem-only pause).
    pub reuse: Option<Reuse>,
}

/// The identity a restarted sandbox keeps.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub id: String,
    pub access_token: String,
    pub created_at: i64,
}

/// Owns every live sandbox.
#[derive(Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    jail: JailConfig,
    pool: Pool,
    seccomp: Compiled,
    templates: Mutex<HashMap<String, Template>>,
    interp: Arc<crate::interp::Runtime>,
    store: Arc<Store>,
    observer: Arc<Observer>,
    net: crate::network::Network,
    live: RwLock<HashMap<String, Arc<Live>>>,
    /// Creates in flight.
    starting: std::sync::atomic::AtomicI64,
    /// Snapshot id → the template its layers sit on (filled as snapshots are used).
    snapshot_bases: Mutex<HashMap<String, String>>,
    /// Serialises pause/resume/snapshot/fork per server (each is short; correctness first).
    lifecycle_lock: tokio::sync::Mutex<()>,
    /// Pre-started sandboxes nobody owns yet, by template.
    warm: Mutex<HashMap<String, std::collections::VecDeque<Warm>>>,
    pub pool_hits: std::sync::atomic::AtomicU64,
    pub pool_misses: std::sync::atomic::AtomicU64,
    /// Per-key sandbox counts in flight and create-rate buckets.
    quotas: crate::quota::Quotas,
    keeper: Option<ringfence_jail::keeper::Keeper>,
}

/// A pooled sandbox: its jail is up and its agent ready; identity, owner, env, metadata and
/// timeout are applied when a create claims it.
#[derive(Debug)]
struct Warm {
    id: String,
    sb: Sandbox,
    control: std::os::unix::net::UnixStream,
    listener: Option<std::os::fd::OwnedFd>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `d` in milliseconds, saturating (a configured maximum may be absurdly large).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Unix ms `timeout` from now, saturating rather than wrapping into the past.
pub fn deadline_after(timeout: Duration) -> i64 {
    now_ms().saturating_add(millis(timeout))
}

fn internal(e: impl std::fmt::Display) -> ManagerError {
    ManagerError::Internal(e.to_string())
}

impl From<crate::quota::QuotaError> for ManagerError {
    fn from(e: crate::quota::QuotaError) -> Self {
        ManagerError::Quota(e.0)
    }
}

impl Manager {
    /// Checks the host and prepares everything sandboxes share.
    pub fn new(
        cfg: ManagerConfig,
        store: Arc<Store>,
        observer: Arc<Observer>,
    ) -> Result<Manager, ManagerError> {
        preflight::check(&cfg.agent_path, true).map_err(internal)?;
        let mut jail = JailConfig::with_agent(cfg.agent_path.clone());
        jail.data_dir = cfg.data_dir.clone();
        jail.run_dir = cfg.run_dir.clone();
        let (disk, why_tmpfs) = cfg.disk.resolve(&jail.data_dir, true).map_err(internal)?;
        match &why_tmpfs {
            Some(why) => tracing::warn!(
                disk_backend = disk.name(),
                reason = %why,
                "{}",
                ringfence_jail::disk::TMPFS_WARNING
            ),
            None => tracing::info!(
                disk_backend = disk.name(),
                "sandbox disks are filesystem images: ENOSPC at the quota, apart from memory"
            ),
        }
        jail.disk = disk;
        let host = template::ensure_host(&jail.data_dir).map_err(internal)?;
        let seccomp = seccomp::default_profile(true).map_err(internal)?;
        let layout = Layout::detect().map_err(internal)?;
        let pool = Pool::new(
            layout,
            &jail.cgroup_name,
            &pool_prefix(&jail.run_dir),
            jail.run_dir.join("cgroups"),
        )
        .with_spawners(jail.agent_path.clone());
        let interp = crate::interp::Runtime::new(
            &jail.run_dir,
            &cfg.interp_env,
            cfg.limits,
            seccomp.clone(),
        )
        .map_err(internal)?;
        let templates = Mutex::new(HashMap::from([("host".to_string(), host)]));
        let keeper = cfg.keeper_exe.as_ref().and_then(|exe| {
            ringfence_jail::keeper::Keeper::connect_or_spawn(&jail.run_dir, exe)
                .map_err(|e| {
                    tracing::warn!(error = %e, "no listener keeper: sandboxes re-attached after a restart will go unsupervised")
                })
                .ok()
        });
        let net =
            crate::network::Network::new(cfg.network.clone(), store.clone(), observer.clone())
                .map_err(internal)?;
        Ok(Manager {
            cfg,
            jail,
            pool,
            seccomp,
            templates,
            interp: Arc::new(interp),
            store,
            observer,
            net,
            live: RwLock::default(),
            starting: Default::default(),
            snapshot_bases: Mutex::default(),
            lifecycle_lock: tokio::sync::Mutex::new(()),
            warm: Mutex::default(),
            keeper,
            pool_hits: Default::default(),
            pool_misses: Default::default(),
            quotas: Default::default(),
        })
    }

    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    pub fn network(&self) -> &crate::network::Network {
        &self.net
    }

    /// (starting, running) sandboxes now.
    pub fn counts(&self) -> (i64, i64) {
        let running = self.live.read().map(|m| m.len() as i64).unwrap_or(0);
        (self.starting.load(std::sync::atomic::Ordering::Relaxed), running)
    }

    /// The fork server and kernels' shared settings.
    pub fn interp(&self) -> &Arc<crate::interp::Runtime> {
        &self.interp
    }

    /// The built template behind a template name, building it on first use.
    fn template(&self, name: &str) -> Result<Template, ManagerError> {
        let key = if name == template::INTERP_TEMPLATE { name } else { "host" };
        if let Some(t) = self.templates.lock().map_err(internal)?.get(key) {
            return Ok(t.clone());
        }
        let t = template::ensure_layered(
            &self.jail.data_dir,
            key,
            &[self.cfg.interp_env.to_string_lossy().into_owned()],
        )
        .map_err(|e| {
            // The detail names host paths (the data directory, the interpreter environment):
            // the operator reads it in the log, the client learns only what is missing.
            tracing::warn!(template = key, error = %e, "template unavailable");
            ManagerError::BadRequest(format!("template {name:?} is not available on this server"))
        })?;
        self.templates.lock().map_err(internal)?.insert(key.to_string(), t.clone());
        Ok(t)
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// The quotas in force for `key_id`: its own settings over the server's defaults.
    fn quota_for(&self, key_id: &str) -> Result<crate::quota::QuotaConfig, ManagerError> {
        let own = self.store.get_key(key_id).map_err(internal)?.map(|k| k.limits);
        Ok(self.cfg.quotas.for_key(&own.unwrap_or_default()))
    }

    /// Admits `n` more sandboxes of `key_id` (0: a resume), charging the create rate when
    /// `rate` (see `crate::quota`).
    pub(crate) fn admit(
        &self,
        key_id: &str,
        n: u64,
        rate: bool,
    ) -> Result<crate::quota::Admission, ManagerError> {
        let limits = self.quota_for(key_id)?;
        let admitted = self.quotas.admit(key_id, &limits, n, rate, || {
            self.store.count_sandboxes_of(key_id).map_err(internal)
        })?;
        Ok(admitted?)
    }

    /// Where sandboxes' writable layers live: "image" or "tmpfs".
    pub fn disk_backend(&self) -> &'static str {
        self.jail.disk.name()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Starts a sandbox for `key_id`. On any failure nothing is left: the jail handle kills
    /// what it started, and no record is written.
    pub async fn create(
        self: &Arc<Self>,
        key_id: &str,
        p: CreateParams,
    ) -> Result<Arc<Live>, ManagerError> {
        let mut p = p;
        if !TEMPLATES.contains(&p.template.as_str()) {
            // A snapshot of this tenant's, used as a template.
            let snap = self.store.get_snapshot(key_id, &p.template).map_err(internal)?;
            let Some(snap) = snap else {
                return Err(ManagerError::NotFound(format!("template {}", p.template)));
            };
            p.template = snap.id.clone();
            p.lifecycle.layers = snap.layers.clone();
            self.snapshot_bases.lock().map_err(internal)?.insert(snap.id, snap.template);
        }
        // Held until the record is written (or the start failed): until then this create
        // counts against the key's quota here rather than in the store.
        let _admitted = self.admit(key_id, 1, true)?;
        let begun = std::time::Instant::now();
        self.starting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = self.start(key_id, p, begun).await;
        self.starting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        result
    }

    async fn start(
        self: &Arc<Self>,
        key_id: &str,
        p: CreateParams,
        begun: std::time::Instant,
    ) -> Result<Arc<Live>, ManagerError> {
        let pooled = if p.reuse.is_none() && p.lifecycle.layers.is_empty() {
            self.take_warm(&p.template)
        } else {
            None
        };
        let pool_label = if pooled.is_some() { "hit" } else { "miss" };
        let (id, started) = match pooled {
            Some(w) => (w.id, (w.sb, w.control, w.listener)),
            None => {
                let id =
                    p.reuse.as_ref().map_or_else(ringfence_jail::new_sandbox_id, |r| r.id.clone());
                let layers = p.lifecycle.layers.clone();
                let started =
                    self.clone().spawn_jail(&p.template, id.clone(), p.env.clone(), layers).await?;
                (id, started)
            }
        };
        self.finish_start(key_id, p, begun, id, started, pool_label).await
    }

    /// Starts a jail for template `template` (blocking work on the blocking pool).
    async fn spawn_jail(
        self: Arc<Self>,
        template_name: &str,
        id: String,
        env: BTreeMap<String, String>,
        layers: Vec<String>,
    ) -> Result<(Sandbox, std::os::unix::net::UnixStream, Option<std::os::fd::OwnedFd>), ManagerError>
    {
        let me = self.clone();
        let name = self.base_template(template_name);
        let template =
            tokio::task::spawn_blocking(move || me.template(&name)).await.map_err(internal)??;
        let spec = SandboxSpec {
            limits: self.cfg.limits,
            env,
            layers: layers.iter().map(|l| self.layer_dir(l)).collect(),
            // The agent ends when the server's end of its channel closes, unless the server
            // died: then it waits for the next server to reconnect. A death signal tied to a
            // (pooled, short-lived) blocking thread would kill it at random, so none is set.
            reconnectable: true,
            ..SandboxSpec::new(id.clone(), template, Some(self.seccomp.clone()), [-1; 3])
        };
        let me = self.clone();
        let started = tokio::task::spawn_blocking(move || {
            let devnull = std::fs::File::open("/dev/null").map_err(internal)?;
            use std::os::fd::AsRawFd;
            let fd = devnull.as_raw_fd();
            let spec = SandboxSpec { stdio: [fd, fd, fd], ..spec };
            let mut sb = Sandbox::start(&me.jail, Some(&me.pool), spec).map_err(internal)?;
            let control = sb.control_clone().map_err(internal)?;
            let listener = sb.take_listener();
            Ok::<_, ManagerError>((sb, control, listener))
        })
        .await
        .map_err(internal)??;
        Ok(started)
    }

    /// Everything after the jail is up: identity, supervision, network, the record.
    async fn finish_start(
        self: &Arc<Self>,
        key_id: &str,
        p: CreateParams,
        begun: std::time::Instant,
        id: String,
        started: (Sandbox, std::os::unix::net::UnixStream, Option<std::os::fd::OwnedFd>),
        pool_label: &'static str,
    ) -> Result<Arc<Live>, ManagerError> {
        let (sb, control, listener) = started;
        let limits = self.cfg.limits;
        let obs = self.observer.sandbox(&id, key_id, limits.cpu_millis.unwrap_or(1000));
        let supervisor = match listener {
            Some(l) => {
                self.park_listener(&id, sb.pid, &l);
                Some(
                    Supervisor::start_with(l, id.clone(), Some(obs.denial_sink()))
                        .map_err(internal)?,
                )
            }
            None => None,
        };
        let client = {
            let _span = tracing::info_span!("sandbox", sandbox_id = %id).entered();
            AgentClient::new(control).map_err(internal)?
        };
        if pool_label == "hit" && !p.env.is_empty() {
            // A pooled sandbox started with no env: set it before the client hears of the
            // sandbox, so every process it starts sees it.
            client
                .call(ringfence_proto::Request::SetEnv { env: p.env.clone() })
                .await
                .map_err(internal)?;
        }
        let now = now_ms();
        let record = SandboxRecord {
            id: id.clone(),
            key_id: key_id.to_string(),
            template: p.template.clone(),
            alias: Some(p.template.clone()),
            access_token: p.reuse.as_ref().map_or_else(new_token, |r| r.access_token.clone()),
            created_at: p.reuse.as_ref().map_or(now, |r| r.created_at),
            end_at: now.saturating_add(millis(p.timeout)),
            cpu_count: limits.cpu_millis.map_or(1, |m| (m / 1000).max(1) as u32),
            memory_mb: limits.memory.map_or(0, |m| (m >> 20) as u32),
            disk_mb: (limits.disk >> 20) as u32,
            metadata: p.metadata,
            env: p.env,
            state: SandboxState::Running,
            agent_pid: Some(sb.pid),
            cgroup_slot: sb.slot(),
            lifecycle: p.lifecycle.clone(),
        };
        let took = begun.elapsed();
        let live = Live::new(record.clone(), client, obs.clone(), sb, supervisor);
        // Before anything is recorded: a sandbox whose network cannot be set up is dropped
        // (and with it killed) here.
        self.net.attach(&live, p.network.clone())?;
        let mut audit = obs.action("sandbox.create");
        audit.duration_ms = Some(took.as_millis() as u64);
        audit.detail.insert("template".into(), serde_json::json!(p.template));
        audit.detail.insert("timeout_s".into(), serde_json::json!(p.timeout.as_secs()));
        audit.detail.insert("tier".into(), serde_json::json!("jail"));
        audit.detail.insert("pool".into(), serde_json::json!(pool_label));
        // The sandbox row, its event and the audit record commit together (one fsync, inline
        // like the store's other short writes), before the client hears of the sandbox.
        let detail = serde_json::json!({
            "template": p.template,
            "network": crate::network::Network::persisted(&p.network),
        });
        if p.reuse.is_some() {
            self.store.restarted(&record).map_err(internal)?;
        } else {
            self.store.insert_sandbox_audited(&record, &detail, Some(&mut audit)).map_err(|e| {
                match e {
                    // Its snapshot was deleted while it started: nothing of it is recorded, and
                    // dropping `live` below ends the sandbox.
                    crate::store::StoreError::LayerGone => ManagerError::Conflict(format!(
                        "template {:?} was deleted while the sandbox started",
                        p.template
                    )),
                    other => internal(other),
                }
            })?;
        }
        self.observer.committed(std::slice::from_ref(&audit));
        self.observer.started(&obs, &p.template, took, pool_label);
        tracing::info!(
            sandbox_id = %id,
            template = %p.template,
            startup_ms = took.as_millis() as u64,
            "sandbox created"
        );
        self.live.write().map_err(internal)?.insert(id, live.clone());
        if self.base_template(&p.template) == template::INTERP_TEMPLATE {
            crate::interp::prestart(self.interp.clone(), live.clone());
        }
        Ok(live)
    }

    /// Reattaches to the sandboxes an earlier server process left running (after a restart,
    /// including `kill -9`), and records the ones that did not survive as killed, sweeping
    /// whatever is left of them. Then removes the layers nothing refers to (see
    /// [`Manager::sweep_layers`]). Returns (reattached, lost).
    ///
    /// A sandbox is put back in the state its record holds: the previous server may have died
    /// with it frozen for a snapshot, a fork or a pause it never committed, so a sandbox
    /// recorded as running is thawed (and one recorded as paused in memory stays frozen).
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), ManagerError> {
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.live_sandboxes())
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let (mut back, mut lost) = (0, 0);
        for rec in records {
            // Paused with only its files kept: nothing runs, nothing to reattach. A server that
            // died between committing such a pause and ending the sandbox left its agent: end it.
            if rec.state == SandboxState::Paused && rec.lifecycle.paused_with_memory != Some(true) {
                if rec.agent_pid.is_some() || rec.cgroup_slot.is_some() {
                    self.end_leftover(&rec).await;
                    let _ = self.store.set_agent(&rec.id, None, None);
                }
                continue;
            }
            let me = self.clone();
            let r = rec.clone();
            // Adopting takes locks and may kill leftovers: keep it off the async workers.
            let adopted = tokio::task::spawn_blocking(move || {
                let (pid, slot) = (r.agent_pid?, r.cgroup_slot?);
                let lease = me.pool.adopt(slot).ok()?;
                let thawed = match r.state {
                    SandboxState::Paused => {
                        if !lease.is_frozen()
                            && let Err(e) = lease.freeze()
                        {
                            tracing::warn!(sandbox_id = %r.id, error = %e, "re-freezing a sandbox paused in memory");
                        }
                        false
                    }
                    _ if lease.is_frozen() => match lease.thaw() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(sandbox_id = %r.id, error = %e, "thawing a sandbox left frozen");
                            false
                        }
                    },
                    _ => false,
                };
                Sandbox::adopt(&me.jail, &r.id, pid, lease).ok().map(|sb| (sb, thawed))
            })
            .await
            .map_err(internal)?;
            let (attached, thawed) = match adopted {
                Some((sb, thawed)) => (self.attach(rec.clone(), sb).await, thawed),
                None => (false, false),
            };
            if attached {
                back += 1;
                if thawed {
                    tracing::warn!(sandbox_id = %rec.id, "thawed a sandbox the previous server left frozen (an interrupted snapshot, fork or pause)");
                }
                let _ = self.store.record_event(
                    &rec.id,
                    "reattached",
                    &serde_json::json!({"thawed": thawed}),
                );
            } else {
                lost += 1;
                self.end_leftover(&rec).await;
                let _ = self.store.set_state(&rec.id, SandboxState::Killed);
                let _ = self.store.record_event(
                    &rec.id,
                    "lost",
                    &serde_json::json!({"reason": "agent gone after server restart"}),
                );
            }
        }
        // Disks whose sandbox did not come back (lost above, pooled by the earlier server, or
        // a one-shot run that was killed): the re-attached ones are locked by now.
        if let ringfence_jail::disk::DiskBackend::Image(disks) = &self.jail.disk {
            let disks = disks.clone();
            if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || disks.sweep()).await
                && n > 0
            {
                tracing::info!(disks = n, "removed disks of sandboxes that are gone");
            }
        }
        // Whatever an earlier server left in slots nobody holds now (its pooled sandboxes,
        // which were never recorded) is swept.
        let pool = self.pool.clone();
        if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || pool.collect_garbage()).await
            && n > 0
        {
            tracing::info!(processes = n, "swept unrecorded sandboxes of an earlier server");
        }
        let removed = self.sweep_layers().await?;
        if removed > 0 {
            tracing::info!(layers = removed, "removed layers an earlier server left behind");
        }
        Ok((back, lost))
    }

    /// Kills what is left of a recorded sandbox that will not be served (its cgroup slot's
    /// processes, its reconnect socket's directory).
    async fn end_leftover(&self, rec: &SandboxRecord) {
        let (pool, slot) = (self.pool.clone(), rec.cgroup_slot);
        let socket_dir = ringfence_jail::launch::agent_socket_dir(&self.jail, &rec.id);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(slot) = slot
                && let Ok(lease) = pool.adopt(slot)
            {
                // Dropping the lease kills the rest and thaws the slot.
                let _ = lease.kill_all();
            }
            let _ = std::fs::remove_dir_all(socket_dir);
        })
        .await;
    }

    /// Wraps an adopted jail handle; true once its agent answered.
    async fn attach(&self, rec: SandboxRecord, sb: Sandbox) -> bool {
        let Ok(control) = sb.control_clone() else { return false };
        let span = tracing::info_span!("sandbox", sandbox_id = %rec.id);
        let Ok(client) = span.in_scope(|| AgentClient::new(control)) else { return false };
        // A frozen (paused) agent cannot answer until resumed; its cgroup slot vouches for it.
        if rec.state != SandboxState::Paused {
            let ping = tokio::time::timeout(
                Duration::from_secs(2),
                client.call(ringfence_proto::Request::Ping),
            )
            .await;
            if !matches!(ping, Ok(Ok(ringfence_proto::Reply::Pong))) {
                return false;
            }
        }
        let id = rec.id.clone();
        let obs =
            self.observer.sandbox(&id, &rec.key_id, self.cfg.limits.cpu_millis.unwrap_or(1000));
        // Supervision resumes with the listener the keeper held through the restart.
        let listener = match &self.keeper {
            Some(k) => {
                let (k, sid) = (k.clone(), id.clone());
                tokio::task::spawn_blocking(move || k.get(&sid)).await.ok().and_then(|r| {
                    r.map_err(|e| tracing::warn!(sandbox_id = %id, error = %e, "keeper")).ok()
                })
            }
            None => None,
        }
        .flatten();
        let supervisor = match listener {
            Some(l) => Supervisor::start_with(l, id.clone(), Some(obs.denial_sink())).ok(),
            None => {
                tracing::warn!(sandbox_id = %id, "re-attached without its seccomp listener: its denied calls go unrecorded");
                None
            }
        };
        let live = Live::new(rec, client, obs, sb, supervisor);
        // The previous server's network device died with it: make a new one, same settings.
        let params = self.saved_network(&id);
        if let Err(e) = self.net.attach(&live, params) {
            tracing::warn!(sandbox_id = %id, error = %e, "could not restore the sandbox's network");
        }
        match self.live.write() {
            Ok(mut m) => {
                m.insert(id, live);
                true
            }
            Err(_) => false,
        }
    }

    /// Parks a copy of a new sandbox's seccomp listener with the keeper, off the request's
    /// path, so a restarted server can supervise the sandbox again.
    fn park_listener(&self, id: &str, pid: i32, listener: &std::os::fd::OwnedFd) {
        let Some(k) = self.keeper.clone() else { return };
        let Ok(copy) = listener.try_clone() else { return };
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = k.put(&id, pid, &copy) {
                tracing::warn!(sandbox_id = %id, error = %e, "parking the seccomp listener");
            }
        });
    }

    /// A live sandbox by id, whoever owns it (callers check the owner).
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.live.read().ok()?.get(id).cloned()
    }

    /// The first live sandbox whose record satisfies `pred`.
    pub fn find(&self, pred: impl Fn(&SandboxRecord) -> bool) -> Option<Arc<Live>> {
        let live = self.live.read().ok()?;
        live.values().find(|l| l.record.lock().is_ok_and(|r| pred(&r))).cloned()
    }

    /// Finds the sandbox whose envd access token is `token`.
    pub fn by_token(&self, token: &str) -> Option<Arc<Live>> {
        let live = self.live.read().ok()?;
        live.values()
            .find(|l| l.record.lock().is_ok_and(|r| ct_eq(&r.access_token, token)))
            .cloned()
    }

    /// Kills a sandbox and forgets it. Returns false if it was not live.
    pub async fn kill(&self, id: &str, reason: &str) -> bool {
        let Some(live) = self.live.write().ok().and_then(|mut m| m.remove(id)) else {
            return false;
        };
        let begun = std::time::Instant::now();
        // Killing, reaping and the record block briefly: one trip to the blocking pool for all
        // of them. The sandbox's last resource readings and events are taken before it goes.
        let (l, store, observer) = (live.clone(), self.store.clone(), self.observer.clone());
        let layers = self.layers_root();
        let (key, why) = (id.to_string(), reason.to_string());
        let stored = tokio::task::spawn_blocking(move || {
            let mut rec = l.obs.final_record("sandbox.kill");
            crate::network::teardown(&l);
            let jail = l.jail.lock().ok().and_then(|mut j| j.take());
            let sup = l.supervisor.lock().ok().and_then(|mut s| s.take());
            drop(jail);
            drop(sup);
            rec.duration_ms = Some(begun.elapsed().as_millis() as u64);
            rec.detail.insert("reason".into(), serde_json::json!(why));
            let detail = serde_json::json!({"reason": why});
            let res = store.kill_sandbox_audited(&key, &detail, Some(&mut rec));
            if res.is_ok() {
                observer.committed(std::slice::from_ref(&rec));
                // The kill dropped the sandbox's layer references in the same commit: the
                // layers it alone held (a resumed pause's, a fork's last child's) go now.
                lifecycle::remove_dropped_layers(&store, &layers);
            }
            res
        })
        .await;
        if let Ok(Err(e)) = stored {
            tracing::error!(sandbox_id = %id, error = %e, "recording a kill");
        }
        live.obs.ended();
        tracing::info!(sandbox_id = %id, reason, "sandbox killed");
        true
    }

    /// Sets a sandbox's time to live, counted from now.
    pub fn set_timeout(&self, id: &str, timeout: Duration) -> Result<(), ManagerError> {
        let live = self.get(id).ok_or_else(|| ManagerError::NotFound(id.into()))?;
        let end = deadline_after(timeout);
        if let Ok(mut r) = live.record.lock() {
            r.end_at = end;
        }
        self.store.set_end_at(id, end).map_err(internal)
    }

    /// Live sandboxes of one key.
    pub fn live_ids(&self) -> Vec<String> {
        self.live.read().map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// Kills sandboxes whose time is up or whose agent is gone. Runs forever.
    pub async fn reap_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = now_ms();
            let due: Vec<(String, &'static str)> =
                self.live
                    .read()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(id, l)| {
                                let (state, end_at, idle_ms) =
                                    l.record.lock().ok().map(|r| {
                                        (r.state, r.end_at, r.lifecycle.idle_timeout_ms)
                                    })?;
                                if state == SandboxState::Paused {
                                    None
                                } else if l.client.is_closed() {
                                    Some((id.clone(), "agent exited"))
                                } else if end_at <= now {
                                    Some((id.clone(), "timeout"))
                                } else if self.idle_expired(l, idle_ms, now) {
                                    Some((id.clone(), "idle"))
                                } else {
                                    None
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            self.relieve_pressure().await;
            for (id, why) in due {
                if self.pause_instead(&id, why).await {
                    continue;
                }
                tracing::info!(sandbox_id = %id, reason = why, "killing sandbox");
                self.kill(&id, why).await;
            }
        }
    }

    /// Samples every live sandbox's resource use (metrics, alerts, OOM and pids-limit events).
    /// Runs forever.
    pub async fn sample_loop(self: Arc<Self>) {
        let every = self.observer.config().sample_every;
        loop {
            tokio::time::sleep(every).await;
            let lives: Vec<Arc<Live>> =
                self.live.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
            // Reading cgroup files blocks, briefly, per sandbox.
            let _ = tokio::task::spawn_blocking(move || {
                for l in lives {
                    l.obs.sample();
                }
            })
            .await;
        }
    }

    /// A pooled sandbox of `template`, if one is waiting.
    fn take_warm(&self, template: &str) -> Option<Warm> {
        if !self.cfg.pool_sizes.contains_key(template) {
            return None;
        }
        let w = self.warm.lock().ok()?.get_mut(template)?.pop_front();
        let counter = if w.is_some() { &self.pool_hits } else { &self.pool_misses };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        w
    }

    /// Pooled sandboxes waiting, by template.
    pub fn pool_sizes(&self) -> BTreeMap<String, usize> {
        self.warm
            .lock()
            .map(|m| m.iter().map(|(t, q)| (t.clone(), q.len())).collect())
            .unwrap_or_default()
    }

    /// Keeps every configured pool full, within the memory budget. Runs forever.
    pub async fn pool_loop(self: Arc<Self>) {
        if self.cfg.pool_sizes.is_empty() {
            return;
        }
        loop {
            let mut started = false;
            for (template, &want) in &self.cfg.pool_sizes {
                let have = match self.warm.lock() {
                    Ok(m) => m.get(template).map_or(0, |q| q.len()),
                    Err(_) => return,
                };
                if have >= want || !self.pool_has_memory() {
                    continue;
                }
                let id = ringfence_jail::new_sandbox_id();
                match self
                    .clone()
                    .spawn_jail(template, id.clone(), BTreeMap::new(), Vec::new())
                    .await
                {
                    Ok((sb, control, listener)) => {
                        if let Ok(mut m) = self.warm.lock() {
                            m.entry(template.clone()).or_default().push_back(Warm {
                                id,
                                sb,
                                control,
                                listener,
                            });
                        }
                        started = true;
                    }
                    Err(e) => {
                        tracing::warn!(template, error = %e, "filling the warm pool");
                        // A failure that persists (a missing template) must not flood the log.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            for (t, n) in self.pool_sizes() {
                self.observer.pool_size(&t, n);
            }
            if !started {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Whether the pooled sandboxes together hold less memory than the budget.
    fn pool_has_memory(&self) -> bool {
        let Ok(m) = self.warm.lock() else { return false };
        let used: u64 = m
            .values()
            .flat_map(|q| q.iter())
            .map(|w| w.sb.usage().map_or(0, |u| u.memory_bytes))
            .sum();
        used < self.cfg.pool_memory
    }

    /// Kills every live sandbox (orderly server shutdown; a crash leaves them to `recover`).
    pub async fn shutdown(&self) {
        if let Ok(mut m) = self.warm.lock() {
            m.clear();
        }
        for id in self.live_ids() {
            self.kill(&id, "server shutdown").await;
        }
    }
}

/// The cgroup slot prefix of a server: slot directories are host-wide while their locks live
/// in the run directory, so two servers with different run directories must not share slot
/// names (each would sweep the other's sandboxes as a dead owner's leftovers).
pub fn pool_prefix(run_dir: &std::path::Path) -> String {
    if run_dir == std::path::Path::new(ringfence_jail::DEFAULT_RUN_DIR) {
        return POOL_PREFIX.to_string();
    }
    // FNV-1a: stable across builds, unlike the std hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in run_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{POOL_PREFIX}{h:08x}")
}

/// Compares secrets in time that does not depend on where they differ, so response timing
/// cannot be used to guess a token byte by byte.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A per-sandbox secret for envd traffic: 32 hex characters.
pub fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ct_eq_compares_whole_strings() {
        assert!(super::ct_eq("abc", "abc"));
        assert!(!super::ct_eq("abc", "abd"));
        assert!(!super::ct_eq("abc", "ab"));
        assert_eq!(super::new_token().len(), 32);
    }
}
