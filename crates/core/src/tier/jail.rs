//! The jail tier: namespaces, cgroups, seccomp and Landlock around the agent, on the host
//! kernel (`ringfence_jail`). Owns what every jail sandbox of this server shares: the jail
//! settings, the cgroup slot pool, the compiled seccomp profile and the built templates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ringfence_image::{Artifact, TemplateForm};
use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::keeper::Keeper;
use ringfence_jail::launch::{Sandbox, SandboxSpec, Seccomp};
use ringfence_jail::monitor::{DenialSink, Supervisor};
use ringfence_jail::seccomp::Compiled;
use ringfence_jail::template::Template;
use ringfence_jail::{JailConfig, preflight, seccomp, template};

use super::{
    Adopted, Capabilities, Instance, NetAttach, Saved, StartSpec, Tier, TierError, TierKind, Usage,
};

/// Host settings the jail tier is built from.
#[derive(Debug, Clone)]
pub struct JailSettings {
    pub agent_path: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub disk: ringfence_jail::disk::DiskChoice,
    /// Bound into code-interpreter templates.
    pub interp_env: PathBuf,
    /// The cgroup slot prefix (see `manager::pool_prefix`).
    pub pool_prefix: String,
    /// The `ringfence` binary, run as `ringfence keeper` to hold sandboxes' seccomp listeners
    /// across restarts (`ringfence_jail::keeper`); `None`: none.
    pub keeper_exe: Option<PathBuf>,
}

/// What an image template brings to a start.
struct ImageStart {
    template: Template,
    layers: Vec<PathBuf>,
    env: std::collections::BTreeMap<String, String>,
    allow_setuid: bool,
    in_use: ringfence_image::store::InUse,
}

/// The jail tier of one server.
#[derive(Debug)]
pub struct JailTier {
    cfg: JailConfig,
    pool: Pool,
    seccomp: Compiled,
    interp_env: PathBuf,
    /// Built templates by key ("host", the interpreter's), built on first use.
    templates: Mutex<HashMap<String, Template>>,
    /// Holds each sandbox's seccomp listener through a server restart.
    keeper: Option<Keeper>,
    /// A thread is making disks ahead (at most one at a time).
    replenishing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The latest round of making cgroup slots ready (one at a time), joined before the slots
    /// are removed at shutdown.
    preparing: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Disks kept made ahead for the size in use: a create takes one instead of copying an image,
/// attaching a loop device and mounting it (see `ringfence_jail::disk::DiskPool::with_spares`).
/// Eight, so that a burst of eight concurrent creates (`bench/api.py --concurrency 8`) finds
/// one each: a disk made inside a create queues behind the others' loop-device setups (each
/// waits for an RCU grace period on a host as it comes) and took 200–250 ms of such a create
/// (debug build, loaded host) when only two were kept. An idle spare holds a loop device, a
/// mounted ext4 and ~100 KiB of sparse image.
const DISKS_AHEAD: usize = 8;

/// Cgroup slots made ready (directories, limits, a parked spawner) at the first start, for
/// the same burst: a slot's first claim otherwise pays `mkdir` in each v1 hierarchy, the
/// spawner's start and its move into the slot (30–90 ms of each of the first eight concurrent
/// creates, measured as for [`DISKS_AHEAD`]). An idle spawner exits after ten minutes
/// (`ringfence_jail::spawner::IDLE_EXIT`); the slot's next claim starts another.
const SLOTS_AHEAD: usize = 8;

fn setup(step: &str) -> impl FnOnce(&dyn std::fmt::Display) -> TierError + '_ {
    move |e| TierError::Setup(format!("{step}: {e}"))
}

impl JailTier {
    /// Checks the host and prepares everything jail sandboxes share.
    pub fn new(s: JailSettings) -> Result<JailTier, TierError> {
        preflight::check(&s.agent_path, true).map_err(|e| setup("host check")(&e))?;
        let mut cfg = JailConfig::with_agent(s.agent_path.clone());
        cfg.data_dir = s.data_dir;
        cfg.run_dir = s.run_dir;
        let (disk, why_tmpfs) =
            s.disk.resolve(&cfg.data_dir, true).map_err(|e| setup("sandbox disks")(&e))?;
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
        cfg.disk = match disk {
            ringfence_jail::disk::DiskBackend::Image(p) => {
                ringfence_jail::disk::DiskBackend::Image(p.with_spares(DISKS_AHEAD))
            }
            other => other,
        };
        let host = template::ensure_host(&cfg.data_dir).map_err(|e| setup("host template")(&e))?;
        let seccomp = seccomp::default_profile(true).map_err(|e| setup("seccomp profile")(&e))?;
        let layout = Layout::detect()?;
        // Kept for this server's data directory: its sandboxes outlive a `kill -9` of it, and
        // no one-shot run or other server may sweep them before it is back.
        let pool = Pool::new(layout, &cfg.cgroup_name, &s.pool_prefix, cfg.run_dir.join("cgroups"))
            .with_spawners(cfg.agent_path.clone())
            .kept_for(&cfg.data_dir);
        let keeper = s.keeper_exe.as_ref().and_then(|exe| {
            Keeper::connect_or_spawn(&cfg.run_dir, exe)
                .map_err(|e| {
                    tracing::warn!(error = %e, "no listener keeper: sandboxes re-attached after a restart will go unsupervised")
                })
                .ok()
        });
        Ok(JailTier {
            cfg,
            pool,
            seccomp,
            interp_env: s.interp_env,
            templates: Mutex::new(HashMap::from([("host".to_string(), host)])),
            keeper,
            replenishing: Default::default(),
            preparing: Mutex::default(),
        })
    }

    /// Stops making disks ahead and removes the ready ones (an orderly shutdown): each is a
    /// mounted filesystem and a loop device that would outlive the server for nothing.
    pub fn discard_spare_disks(&self) {
        use std::sync::atomic::Ordering;
        let ringfence_jail::disk::DiskBackend::Image(disks) = &self.cfg.disk else { return };
        // Take the flag for good, after a thread making one has finished (it takes ~2 ms).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.replenishing.swap(true, Ordering::AcqRel) {
            if std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let n = disks.discard_spares();
        tracing::debug!(disks = n, "removed the disks made ahead");
    }

    /// Removes this server's free cgroup slots and stops their spawners (an orderly shutdown,
    /// once every sandbox has ended). Left behind, each is a directory per controller and an
    /// idle process; servers with run directories of their own (benchmarks, several servers on
    /// a host) would pile them up for good (their slot names are per run directory), and every
    /// CPU-bandwidth write walks every CPU cgroup of the host. The next server makes its slots
    /// ready again, off the create path.
    pub fn release_slots(&self) {
        // A slot being made ready is held: wait for those to be released first.
        if let Some(handle) = self.preparing.lock().ok().and_then(|mut p| p.take()) {
            let _ = handle.join();
        }
        match self.pool.collect_garbage() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(processes = n, "killed processes left in free cgroup slots"),
            Err(e) => tracing::warn!(error = %e, "removing the cgroup slots at shutdown"),
        }
    }

    /// Makes disks of `bytes` ahead for the next creates, on a thread of its own (off the
    /// create's path), unless one is at it already.
    fn replenish_disks(&self, bytes: u64) {
        use std::sync::atomic::Ordering;
        let ringfence_jail::disk::DiskBackend::Image(disks) = &self.cfg.disk else { return };
        if self.replenishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (disks, busy) = (disks.clone(), self.replenishing.clone());
        let spawned = std::thread::Builder::new().name("disks-ahead".into()).spawn(move || {
            if let Err(e) = disks.replenish(bytes) {
                tracing::warn!(error = %e, "making sandbox disks ahead");
            }
            busy.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.replenishing.store(false, Ordering::Release);
        }
    }

    /// Keeps about [`SLOTS_AHEAD`] cgroup slots ready, on a thread of its own: from the first
    /// start rather than at construction, so that a starting server's sweep of slots nobody
    /// holds (`Tier::sweep`) has run by then, and again whenever starts have taken more than
    /// half of them. Made once only, they ran out in a server whose sandboxes stay alive: every
    /// later create claimed a fresh slot and paid its spawner's start and move into the slot
    /// (an RCU grace period on cgroup v1) itself, 8 ms of a create at 50 live sandboxes and
    /// 24 ms at 250 (`bench/lifecycle.py --only density`, docs/PERFORMANCE.md).
    fn prepare_slots(&self, limits: &ringfence_jail::limits::Limits) {
        let ready = self.pool.ready();
        if ready > SLOTS_AHEAD / 2 {
            return;
        }
        let Ok(mut preparing) = self.preparing.lock() else { return };
        // One round at a time; a finished one is reaped here.
        if preparing.as_ref().is_some_and(|round| !round.is_finished()) {
            return;
        }
        if let Some(done) = preparing.take() {
            let _ = done.join();
        }
        let (pool, limits) = (self.pool.clone(), *limits);
        let spawned = std::thread::Builder::new().name("slots-ahead".into()).spawn(move || {
            // New slots only: the ready ones stay free for the creates that come meanwhile.
            if let Err(e) = pool.prepare_more(SLOTS_AHEAD - ready, &limits) {
                tracing::warn!(error = %e, "making cgroup slots ready ahead");
            }
        });
        *preparing = spawned.ok();
    }

    /// The seccomp profile every jail process gets (the interpreter's kernels too).
    pub fn seccomp(&self) -> &Compiled {
        &self.seccomp
    }

    /// Where sandboxes' writable layers live: "image" or "tmpfs".
    pub fn disk_backend(&self) -> &'static str {
        self.cfg.disk.name()
    }

    /// The one host id range every sandbox shared before per-sandbox ranges: layers saved
    /// then carry it and are shifted to canonical ids once (`layer::canonicalize`).
    pub fn legacy_uid_base(&self) -> u32 {
        self.cfg.uid_base
    }

    /// The configuration, cgroup pool and seccomp profile a template build's RUN sandboxes
    /// share with every jail sandbox.
    pub fn build_parts(&self) -> (JailConfig, Pool, Compiled) {
        (self.cfg.clone(), self.pool.clone(), self.seccomp.clone())
    }

    /// Whether `name` is an image template in this server's image store.
    pub fn has_image(&self, name: &str) -> bool {
        ringfence_image::store::Store::open(&self.cfg.data_dir).is_ok_and(|s| s.contains(name))
    }

    /// An image template from the store, ready to start: asked for in the jail's form (the
    /// store's skeleton as the root, the image's layers above it; no host `/usr`).
    fn image(&self, name: &str) -> Result<ImageStart, TierError> {
        let exported = super::export_image(&self.cfg.data_dir, name, TemplateForm::Tree)?;
        let env = exported.env();
        let Artifact::Tree { skeleton, layers } = exported.artifact else {
            return Err(TierError::Setup(format!("image {name}: the store answered another form")));
        };
        let template = Template {
            name: exported.record.name.clone(),
            rootfs: skeleton,
            meta: ringfence_jail::template::Meta { format: 0, host_layers: Vec::new() },
        };
        Ok(ImageStart {
            template,
            layers,
            env,
            allow_setuid: exported.record.allow_setuid,
            in_use: exported.in_use,
        })
    }

    /// The built template behind a built-in template name, building it on first use.
    fn template(&self, name: &str) -> Result<Template, TierError> {
        let key = if name == template::INTERP_TEMPLATE { name } else { "host" };
        let poisoned = || TierError::Setup("template cache lock poisoned".into());
        if let Some(t) = self.templates.lock().map_err(|_| poisoned())?.get(key) {
            return Ok(t.clone());
        }
        let t = template::ensure_layered(
            &self.cfg.data_dir,
            key,
            &[self.interp_env.to_string_lossy().into_owned()],
        )
        .map_err(|e| {
            // The detail names host paths (the data directory, the interpreter environment):
            // the operator reads it in the log, the client learns only what is missing.
            tracing::warn!(template = key, error = %e, "template unavailable");
            TierError::TemplateUnavailable(name.to_string())
        })?;
        self.templates.lock().map_err(|_| poisoned())?.insert(key.to_string(), t.clone());
        Ok(t)
    }
}

impl Tier for JailTier {
    type Instance = JailInstance;

    fn kind(&self) -> TierKind {
        TierKind::Jail
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            isolation: TierKind::Jail.isolation(),
            syscall_filter: "seccomp-bpf allowlist (denials reported), Landlock",
            kernel: "host",
            pause_in_memory: self.pool.layout().version() != "none",
            // CRIU failed on this host (docs/SECURITY.md): files only.
            memory_snapshot: false,
            fs_snapshot: true,
            fork: true,
            reattach: true,
            kernel_injection: true,
            network: "netns-tun",
            network_policy: true,
            agent_channel: "unix-socket",
            accel: None,
        }
    }

    fn start(&self, spec: StartSpec) -> Result<JailInstance, TierError> {
        // An image template (imported, pulled, built or bootstrapped into the image store):
        // its layers under any snapshot's, its Env under the create's, setuid as it asks.
        super::refuse_guest_snapshots(TierKind::Jail, &spec.layers)?;
        let mut spec = spec;
        let mut allow_setuid = false;
        let mut image_in_use = None;
        let template = if ringfence_image::store::RESERVED.contains(&spec.template.as_str()) {
            self.template(&spec.template)?
        } else {
            let image = self.image(&spec.template)?;
            spec.layers.extend(image.layers);
            for (k, v) in image.env {
                spec.env.entry(k).or_insert(v);
            }
            allow_setuid = image.allow_setuid;
            image_in_use = Some(image.in_use);
            image.template
        };
        let devnull = std::fs::File::open("/dev/null")
            .map_err(|source| TierError::Io { step: "open /dev/null", source })?;
        use std::os::fd::AsRawFd;
        let fd = devnull.as_raw_fd();
        let spec = SandboxSpec {
            limits: spec.limits,
            env: spec.env,
            layers: spec.layers,
            volumes: spec.volumes,
            // The agent ends when the server's end of its channel closes, unless the server
            // died: then it waits for the next server to reconnect. A death signal tied to a
            // (pooled, short-lived) blocking thread would kill it at random, so none is set.
            reconnectable: true,
            allow_setuid,
            // Its network is administered from the host only (the TUN, made by a host thread
            // in the namespace; the interpreter's fork server joins it before the sandbox's
            // user namespace): the spawner's namespace made ahead will do.
            net_ahead: true,
            ..SandboxSpec::new(
                spec.id,
                template,
                Seccomp::Compiled(self.seccomp.clone()),
                [fd, fd, fd],
            )
        };
        let disk_bytes = spec.limits.disk;
        let limits = spec.limits;
        let mut sb = Sandbox::start(&self.cfg, Some(&self.pool), spec)?;
        if crate::phases::enabled() {
            let phases = sb.phases();
            let steps: Vec<(&str, u64)> =
                phases.iter().map(|p| (p.name.as_str(), p.at_ns)).collect();
            crate::phases::steps("jail_start", &steps);
        }
        self.replenish_disks(disk_bytes);
        self.prepare_slots(&limits);
        let listener = sb.take_listener();
        Ok(JailInstance {
            sb,
            listener,
            supervisor: None,
            keeper: self.keeper.clone(),
            _image: image_in_use,
        })
    }

    fn adopt(
        &self,
        id: &str,
        saved: &Saved,
        paused: bool,
    ) -> Result<Adopted<JailInstance>, TierError> {
        let (Some(pid), Some(slot)) = (saved.pid, saved.slot) else {
            return Err(TierError::Setup("no agent pid or cgroup slot was recorded".into()));
        };
        let lease = self.pool.adopt(slot)?;
        let thawed = if paused {
            if !lease.is_frozen()
                && let Err(e) = lease.freeze()
            {
                tracing::warn!(sandbox_id = %id, error = %e, "re-freezing a sandbox paused in memory");
            }
            false
        } else if lease.is_frozen() {
            match lease.thaw() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "thawing a sandbox left frozen");
                    false
                }
            }
        } else {
            false
        };
        let sb = Sandbox::adopt(&self.cfg, id, pid, lease)?;
        // Supervision resumes with the listener the keeper held through the restart.
        let listener = match &self.keeper {
            Some(k) => k.get(id).unwrap_or_else(|e| {
                tracing::warn!(sandbox_id = %id, error = %e, "keeper");
                None
            }),
            None => None,
        };
        if listener.is_none() {
            tracing::warn!(sandbox_id = %id, "re-attached without its seccomp listener: its denied calls go unrecorded");
        }
        // Already parked: the keeper has it.
        let instance = JailInstance { sb, listener, supervisor: None, keeper: None, _image: None };
        Ok(Adopted { instance, thawed })
    }

    fn end_leftover(&self, id: &str, saved: &Saved) {
        if let Some(slot) = saved.slot
            && let Ok(lease) = self.pool.adopt(slot)
        {
            // Dropping the lease kills the rest and thaws the slot.
            let _ = lease.kill_all();
        }
        let _ = std::fs::remove_dir_all(ringfence_jail::launch::agent_socket_dir(&self.cfg, id));
    }

    fn sweep(&self) -> usize {
        let mut n = 0;
        // Disks whose sandbox did not come back (lost, pooled by the earlier server, or a
        // one-shot run that was killed): the re-attached ones are locked by now.
        if let ringfence_jail::disk::DiskBackend::Image(disks) = &self.cfg.disk
            && let Ok(d) = disks.sweep()
            && d > 0
        {
            tracing::info!(disks = d, "removed disks of sandboxes that are gone");
            n += d;
        }
        // Whatever an earlier server left in slots nobody holds now (its pooled sandboxes,
        // which were never recorded) is swept.
        if let Ok(p) = self.pool.collect_garbage()
            && p > 0
        {
            tracing::info!(processes = p, "swept unrecorded sandboxes of an earlier server");
            n += p;
        }
        n
    }
}

/// A live jail sandbox: the jail handle and, once it has an owner, the supervisor of its
/// seccomp listener. Fields drop in order: the sandbox (killed and reaped) before the
/// supervisor, whose listener then has nothing left to report.
#[derive(Debug)]
pub struct JailInstance {
    sb: Sandbox,
    /// The seccomp user-notification descriptor, until [`Instance::supervise`] hands it over.
    listener: Option<std::os::fd::OwnedFd>,
    supervisor: Option<Supervisor>,
    /// Where [`Instance::supervise`] parks a copy of the listener (a fresh sandbox's only).
    keeper: Option<Keeper>,
    /// Held while the sandbox runs from an image template, so `template rm` cannot take its
    /// layers away underneath it.
    _image: Option<ringfence_image::store::InUse>,
}

impl JailInstance {
    /// The jail handle (the interpreter's fork server enters it).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sb
    }
}

impl Instance for JailInstance {
    fn saved(&self) -> Saved {
        Saved { pid: Some(self.sb.pid), slot: self.sb.slot() }
    }

    fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError> {
        Ok(self.sb.control_clone()?)
    }

    fn supervise(&mut self, id: &str, sink: DenialSink) {
        let Some(l) = self.listener.take() else { return };
        if let Some(k) = self.keeper.take() {
            park_listener(k, id, self.sb.pid, &l);
        }
        match Supervisor::start_with(l, id.to_string(), Some(sink)) {
            Ok(s) => self.supervisor = Some(s),
            // The filter still denies; only the reports are lost.
            Err(e) => tracing::warn!(sandbox_id = %id, error = %e, "seccomp supervisor"),
        }
    }

    fn net(&self) -> NetAttach {
        if !self.sb.agent_is_current() {
            return NetAttach::None;
        }
        NetAttach::Netns(PathBuf::from(format!("/proc/{}/ns/net", self.sb.pid)))
    }

    fn usage(&self) -> Option<Usage> {
        self.sb.usage()
    }

    fn limit_events(&self) -> (u64, u64) {
        self.sb.limit_events()
    }

    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        self.sb.memory_cpu()
    }

    fn disk_usage(&self) -> Option<(u64, u64)> {
        self.sb.disk_usage()
    }

    fn freeze(&self) -> Result<(), TierError> {
        Ok(self.sb.freeze()?)
    }

    fn thaw(&self) -> Result<(), TierError> {
        Ok(self.sb.thaw()?)
    }

    fn save_fs(&self, dest: &Path, paused: bool) -> Result<(), TierError> {
        // Frozen for the copy, so no file changes halfway; a host without a freezer copies a
        // running sandbox.
        let froze = !paused && self.sb.freeze().is_ok();
        let saved = match self.sb.upper_dir() {
            Some(upper) => ringfence_jail::layer::save(&upper, dest, self.sb.id_base())
                .map(drop)
                .map_err(TierError::from),
            None => Err(TierError::Unsupported {
                tier: TierKind::Jail,
                what: "save this sandbox's files: its writable layer is a tmpfs started by an \
                       earlier server process (run the server with disk images)",
            }),
        };
        if froze {
            let _ = self.sb.thaw();
        }
        saved
    }
}

/// Parks a copy of a new sandbox's seccomp listener with the keeper, off the request's path
/// (on the blocking pool when there is a runtime), so a restarted server can supervise the
/// sandbox again.
fn park_listener(k: Keeper, id: &str, pid: i32, listener: &std::os::fd::OwnedFd) {
    let Ok(copy) = listener.try_clone() else { return };
    let id = id.to_string();
    let park = move || {
        if let Err(e) = k.put(&id, pid, &copy) {
            tracing::warn!(sandbox_id = %id, error = %e, "parking the seccomp listener");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(park)),
        Err(_) => park(),
    }
}
