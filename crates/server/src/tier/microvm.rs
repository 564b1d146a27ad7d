//! The microvm tier: each sandbox a guest with its own kernel under QEMU's `microvm` machine,
//! the agent as the guest's PID 1 on a virtio-serial port (`ringfence_microvm`). This module
//! is the seam's side: capabilities (with the acceleration the probe found), the probe (on the
//! first start: it boots a guest, seconds under TCG, which a server that never runs a
//! microvm sandbox should not pay for), templates
//! as cached read-only disk images, and the mapping of figures.
//!
//! Each QEMU runs jailed (`ringfence_microvm::jail`: a uid of its own, an empty root, its own
//! namespaces, QEMU's seccomp filter, a cgroup slot). A warm pool (`serve --pool base@microvm=N`) goes
//! through the generic pool.
//!
//! Sandboxes start from the template's memory snapshot (`ringfence_microvm::snapshot`, made by
//! the first start of a template and guest shape); `RINGFENCE_MICROVM_SNAPSHOTS=off` boots each.
//!
//! Pause is the in-memory stop; `RINGFENCE_MICROVM_PAUSE=file` makes it a save to a file that
//! ends QEMU (`MicroVm::suspend_to_file`), and resume a restore from it.
//!
//! A server killed with -9 leaves its QEMUs running; the next one re-attaches to each recorded
//! sandbox (`MicroVm::adopt`: QMP and the agent's socket, which QEMU keeps listening on) and
//! its sweep ends the rest.
//!
//! Not built yet, and said so in the capabilities: network (the guest has no NIC), snapshots
//! and forks of the writable disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ringfence_jail::template::{self, Template};
use ringfence_microvm::{MicroVm, MicrovmConfig, Probe};

use super::{
    Adopted, Capabilities, Instance, NetAttach, Saved, StartSpec, Tier, TierError, TierKind, Usage,
};

/// Host settings the microvm tier is built from.
#[derive(Debug, Clone)]
pub struct MicrovmSettings {
    pub agent_path: PathBuf,
    pub data_dir: PathBuf,
    /// Each sandbox's directory and the initramfs go under `<run_dir>/microvm`.
    pub run_dir: PathBuf,
    pub interp_env: PathBuf,
    /// The server's cgroup slot prefix (`manager::pool_prefix`); QEMU's slots add `vm`.
    pub pool_prefix: String,
}

/// The microvm tier of one server.
#[derive(Debug)]
pub struct MicrovmTier {
    settings: MicrovmSettings,
    /// The probe's outcome, taken on the first start.
    cfg: OnceLock<Result<MicrovmConfig, String>>,
    templates: Mutex<HashMap<String, PathBuf>>,
}

/// Why this host cannot run the tier before any probe: QEMU or the kernel missing.
pub fn missing() -> Option<String> {
    if ringfence_microvm::Qemu::find().is_none() {
        return Some(
            "no qemu-system-x86_64 (install it with scripts/install-microvm.sh, or set \
             RINGFENCE_QEMU)"
                .into(),
        );
    }
    let kernel = ringfence_microvm::kernel_dir().join("vmlinux");
    if !kernel.is_file() {
        return Some(format!(
            "no guest kernel at {} (install it with scripts/install-microvm.sh, or set {})",
            kernel.display(),
            ringfence_microvm::KERNEL_DIR_ENV
        ));
    }
    None
}

impl MicrovmTier {
    /// The tier, if QEMU and the guest kernel are installed (file checks; the probe that boots
    /// a guest comes with the first start). `None`: the registry reports why ([`missing`]).
    pub fn new(settings: MicrovmSettings) -> Option<MicrovmTier> {
        if missing().is_some() {
            return None;
        }
        // The probe boots a guest (seconds of CPU under TCG, plus the KVM try's deadline): a
        // server that never starts a microvm sandbox, like most test servers, never pays it.
        Some(MicrovmTier { settings, cfg: OnceLock::new(), templates: Mutex::new(HashMap::new()) })
    }

    fn config(&self) -> Result<&MicrovmConfig, TierError> {
        let probed = self.cfg.get_or_init(|| probe(&self.settings));
        probed.as_ref().map_err(|reason| TierError::Unavailable {
            tier: TierKind::Microvm,
            reason: reason.clone(),
        })
    }

    /// The template's root image, built on first use (host-wide cache, see
    /// `ringfence_microvm::guest::template_image`).
    fn template_image(&self, name: &str) -> Result<PathBuf, TierError> {
        let key = match name {
            "base" | "host" => "host",
            template::INTERP_TEMPLATE => template::INTERP_TEMPLATE,
            _ => {
                return Err(TierError::TemplateUnavailable(format!(
                    "{name} (on the microvm tier)"
                )));
            }
        };
        let mut cached =
            self.templates.lock().map_err(|_| TierError::Setup("template lock poisoned".into()))?;
        if let Some(p) = cached.get(key).filter(|p| p.is_file()) {
            return Ok(p.clone());
        }
        let t: Template = if key == "host" {
            template::ensure_host(&self.settings.data_dir)
        } else {
            template::ensure_layered(
                &self.settings.data_dir,
                key,
                &[self.settings.interp_env.to_string_lossy().into_owned()],
            )
        }
        .map_err(|e| {
            tracing::warn!(template = key, error = %e, "template unavailable");
            TierError::TemplateUnavailable(name.to_string())
        })?;
        let image = ringfence_microvm::guest::template_image(
            &ringfence_microvm::cache_dir(),
            key,
            &t.rootfs,
            &t.meta.host_layers,
        )
        .map_err(|e| {
            tracing::warn!(template = key, error = %e, "template image unavailable");
            TierError::Setup(format!("microvm: the image of template {name}: {e}"))
        })?;
        cached.insert(key.to_string(), image.clone());
        Ok(image)
    }

    /// The acceleration the probe found, once it has finished.
    pub fn accel(&self) -> Option<&'static str> {
        match self.cfg.get() {
            Some(Ok(c)) => Some(c.accel.as_str()),
            _ => None,
        }
    }
}

/// Probes QEMU and builds the initramfs (both once per server).
fn probe(settings: &MicrovmSettings) -> Result<MicrovmConfig, String> {
    let dir = settings.run_dir.join("microvm");
    let tsc_khz = ringfence_microvm::host_tsc_khz();
    sweep_probes(&dir);
    let scratch = dir.join(format!("probe-{}", std::process::id()));
    let found = ringfence_microvm::probe(&scratch, tsc_khz);
    let _ = std::fs::remove_dir_all(&scratch);
    let (qemu, accel, boot, notes) = match found {
        Probe::Available { qemu, accel, boot, notes } => (qemu, accel, boot, notes),
        Probe::Unavailable { reason } => {
            tracing::warn!(%reason, "microvm tier unavailable");
            return Err(reason);
        }
    };
    // QEMU's cgroups: slots of their own beside the jail's (`<prefix>vm-<n>`), locked in the
    // same run directory.
    let cgroups = match ringfence_jail::cgroup::Layout::detect() {
        Ok(layout) if ringfence_microvm::jail::running_as_root() => {
            Some(ringfence_jail::cgroup::Pool::new(
                layout,
                "ringfence",
                &format!("{}vm", settings.pool_prefix),
                settings.run_dir.join("cgroups"),
            ))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup for QEMU: it runs in the server's");
            None
        }
    };
    let kernel_dir = ringfence_microvm::kernel_dir();
    let initramfs = ringfence_microvm::guest::initramfs(
        &ringfence_microvm::cache_dir(),
        &settings.agent_path,
        &kernel_dir.join("modules"),
    )
    .map_err(|e| format!("building the guest's initramfs: {e}"))?;
    tracing::info!(
        accel = accel.as_str(),
        probe_boot_ms = boot.as_millis() as u64,
        ?notes,
        "microvm tier ready"
    );
    Ok(MicrovmConfig {
        qemu,
        accel,
        kernel_dir,
        initramfs,
        state_dir: dir,
        cache_dir: ringfence_microvm::cache_dir(),
        tsc_khz,
        cgroups,
    })
}

/// Ends what the probes of servers that died mid-probe left (a probe QEMU has no parent-death
/// signal: one set at fork would fire when the launching thread, a pool thread, exits):
/// `probe-<pid>` directories whose server is gone, and the QEMU processes whose QMP socket
/// is in one.
fn sweep_probes(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let dead: Vec<PathBuf> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name.strip_prefix("probe-")?.parse().ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| e.path())
        })
        .collect();
    if dead.is_empty() {
        return;
    }
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if dead.iter().any(|d| cmd.contains(&format!("unix:{}/", d.display()))) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for d in dead {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The memory snapshot to start a sandbox of `image` with `limits` from, built on first use;
/// `None` (the guest boots) where snapshots are turned off (`RINGFENCE_MICROVM_SNAPSHOTS=off`)
/// or the snapshot cannot be made (logged).
fn snapshot_for(
    cfg: &MicrovmConfig,
    image: &Path,
    limits: &ringfence_jail::limits::Limits,
) -> Option<PathBuf> {
    if std::env::var(ringfence_microvm::SNAPSHOT_ENV).is_ok_and(|v| v == "off") {
        return None;
    }
    match ringfence_microvm::snapshot::template_snapshot(cfg, image, limits) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "no memory snapshot for the microvm tier; booting");
            None
        }
    }
}

fn vm_err(e: ringfence_microvm::MicrovmError) -> TierError {
    TierError::Setup(format!("microvm: {e}"))
}

impl Tier for MicrovmTier {
    type Instance = MicrovmInstance;

    fn kind(&self) -> TierKind {
        TierKind::Microvm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            isolation: TierKind::Microvm.isolation(),
            syscall_filter: "none inside: the guest kernel serves every system call, and the VM \
                             boundary (QEMU's virtual devices) is what separates it from the host",
            kernel: "guest",
            pause_in_memory: true,
            memory_snapshot: false,
            fs_snapshot: false,
            fork: false,
            reattach: true,
            kernel_injection: false,
            network: "none",
            network_policy: false,
            agent_channel: "virtio-serial",
            accel: Some(self.accel().unwrap_or("unprobed")),
        }
    }

    fn start(&self, spec: StartSpec) -> Result<MicrovmInstance, TierError> {
        if !spec.volumes.is_empty() {
            return Err(TierError::Unsupported { tier: TierKind::Microvm, what: "volume mounts" });
        }
        if !spec.layers.is_empty() {
            return Err(TierError::Unsupported {
                tier: TierKind::Microvm,
                what: "start from a snapshot's layers",
            });
        }
        let cfg = self.config()?;
        let image = self.template_image(&spec.template)?;
        let mut s = ringfence_microvm::StartSpec::new(spec.id, image.clone());
        s.limits = spec.limits;
        s.env = spec.env;
        let memory_limit = spec.limits.memory;
        s.snapshot = snapshot_for(cfg, &image, &spec.limits);
        let vm = match MicroVm::start(cfg, s.clone()) {
            Ok(vm) => vm,
            // A snapshot that does not restore (damaged, or from a QEMU that changed in place)
            // is removed, and this sandbox boots: the next start builds a new one.
            Err(e) if !matches!(e, ringfence_microvm::MicrovmError::Invalid(_)) => {
                let Some(bad) = s.snapshot.take() else { return Err(vm_err(e)) };
                tracing::warn!(error = %e, snapshot = %bad.display(), "restore failed; booting");
                let _ = std::fs::remove_file(&bad);
                MicroVm::start(cfg, s).map_err(vm_err)?
            }
            Err(e) => return Err(vm_err(e)),
        };
        tracing::debug!(
            start_ms = vm.boot.as_millis() as u64,
            restored = vm.restored,
            "microvm started"
        );
        Ok(MicrovmInstance { vm, memory_limit })
    }

    fn adopt(
        &self,
        id: &str,
        saved: &Saved,
        paused: bool,
    ) -> Result<Adopted<MicrovmInstance>, TierError> {
        let Some(pid) = saved.pid.and_then(|p| u32::try_from(p).ok()) else {
            return Err(TierError::Setup("no QEMU pid was recorded".into()));
        };
        let cfg = self.config()?;
        let vm = MicroVm::adopt(cfg, id, pid, saved.slot).map_err(vm_err)?;
        // As the record says: stopped if it was paused (in memory), running otherwise.
        if paused { vm.pause() } else { vm.resume() }.map_err(vm_err)?;
        let memory_limit = None;
        Ok(Adopted { instance: MicrovmInstance { vm, memory_limit }, thawed: false })
    }

    fn end_leftover(&self, _id: &str, _saved: &Saved) {
        // `sweep` ends every leftover at once.
    }

    fn sweep(&self) -> usize {
        let dir = self.settings.run_dir.join("microvm").join("sandboxes");
        if std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()) {
            return 0;
        }
        let Ok(cfg) = self.config() else { return 0 };
        ringfence_microvm::sweep(cfg).len()
    }
}

/// One microvm sandbox. Dropping it ends the guest and removes its disk and sockets.
#[derive(Debug)]
pub struct MicrovmInstance {
    vm: MicroVm,
    memory_limit: Option<u64>,
}

impl Instance for MicrovmInstance {
    fn saved(&self) -> Saved {
        Saved {
            pid: i32::try_from(self.vm.pid()).ok().filter(|p| *p > 0),
            slot: self.vm.cgroup_slot(),
        }
    }

    fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError> {
        self.vm.control_clone().map_err(vm_err)
    }

    fn supervise(&mut self, _id: &str, _sink: ringfence_jail::monitor::DenialSink) {
        // No seccomp inside the guest: nothing reports denials.
    }

    fn net(&self) -> NetAttach {
        NetAttach::None
    }

    fn usage(&self) -> Option<Usage> {
        let u = self.vm.usage();
        Some(Usage {
            memory_bytes: u.rss_bytes.unwrap_or(0),
            memory_cache_bytes: 0,
            memory_limit: self.memory_limit,
            cpu_ns: u.cpu_ns,
            oom_kills: 0,
            pids_max_hits: 0,
            pids_current: 1,
        })
    }

    fn limit_events(&self) -> (u64, u64) {
        (0, 0)
    }

    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        let u = self.vm.usage();
        Some((u.rss_bytes.unwrap_or(0), u.cpu_ns))
    }

    fn disk_usage(&self) -> Option<(u64, u64)> {
        self.vm.usage().disk
    }

    fn freeze(&self) -> Result<(), TierError> {
        if std::env::var(ringfence_microvm::PAUSE_ENV).is_ok_and(|v| v == "file") {
            self.vm.suspend_to_file().map_err(vm_err)
        } else {
            self.vm.pause().map_err(vm_err)
        }
    }

    fn thaw(&self) -> Result<(), TierError> {
        if self.vm.is_suspended() {
            self.vm.resume_from_file().map_err(vm_err)
        } else {
            self.vm.resume().map_err(vm_err)
        }
    }

    fn save_fs(&self, _dest: &Path, _paused: bool) -> Result<(), TierError> {
        Err(TierError::Unsupported {
            tier: TierKind::Microvm,
            what: "save its writable layer (it is a disk image inside the guest)",
        })
    }
}
