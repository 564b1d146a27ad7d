//! The microvm tier: each sandbox a guest with its own kernel under QEMU's `microvm` machine,
//! the agent as the guest's PID 1 on a virtio-serial port (`ringfence_microvm`). This module
//! is the seam's side: capabilities (with the acceleration the probe found), the probe (on the
//! first start: it boots a guest, seconds under TCG, which a server that never runs a
//! microvm sandbox should not pay for), templates as cached read-only disk images (image
//! templates through the image store's export interface, the built-ins through the same
//! builder), and the mapping of figures.
//!
//! Each QEMU runs jailed (`ringfence_microvm::jail`: a uid of its own, an empty root, its own
//! namespaces, QEMU's seccomp filter, a cgroup slot). A warm pool (`serve --pool base@microvm=N`) goes
//! through the generic pool.
//!
//! The guest's NIC (virtio-net over a socket pair QEMU inherits) feeds the jail's userspace
//! stack, policy, resolver and audit (`NetAttach::Nic`); inbound ports go through the same
//! stack to the guest's loopback.
//!
//! Sandboxes start from the template's memory snapshot (`ringfence_microvm::snapshot`, made by
//! the first start of a template and guest shape, NIC included); `RINGFENCE_MICROVM_SNAPSHOTS=off`
//! boots each.
//!
//! Pause is the in-memory stop; `RINGFENCE_MICROVM_PAUSE=file` makes it a save to a file that
//! ends QEMU (`MicroVm::suspend_to_file`), and resume a restore from it (the NIC's socket kept
//! across, so the network stack is unchanged).
//!
//! A server killed with -9 leaves its QEMUs running; the next one re-attaches to each recorded
//! sandbox (`MicroVm::adopt`: QMP and the agent's socket, which QEMU keeps listening on) and
//! its sweep ends the rest. A re-attached guest has no network: its NIC's socket ended with
//! the old server's stack.
//!
//! Snapshots and forks are of the whole running guest (`ringfence_microvm::fork`): the
//! layer the manager saves (`save_fs`) is a directory with the guest's memory and devices, a
//! sparse copy of its writable disk made while it was stopped, and a record of its devices; a
//! sandbox started on such a layer is a restore of it with its own disk copy, its own NIC
//! socket and stack, and then its own hostname, machine id, clock and entropy (the agent's
//! re-identify). Processes running in the saved guest run on in every sandbox made from it.
//! Only the newest layer counts: it holds the whole disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ringfence_image::{Artifact, DiskFs, TemplateForm};
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

    /// The root disk image of a built-in template, made on first use through the same
    /// builder as image templates' (host-wide cache, see
    /// `ringfence_image::export::tree_disk_image`).
    fn builtin_image(&self, name: &str) -> Result<PathBuf, TierError> {
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
        let image = ringfence_image::export::tree_disk_image(
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
    // Every guest gets a NIC: a kernel directory installed before the guest had one lacks its
    // driver, and the guest would wait for an interface that never comes. Checked before
    // the probe's boot, which it would make pointless.
    let kernel_dir = ringfence_microvm::kernel_dir();
    let order =
        std::fs::read_to_string(kernel_dir.join("modules").join("order")).unwrap_or_default();
    if !order.lines().any(|m| m.trim() == "virtio_net") {
        return Err(format!(
            "the guest kernel's modules at {} lack virtio_net (the guest's NIC): rerun \
             scripts/install-microvm.sh",
            kernel_dir.join("modules").display()
        ));
    }
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
            Some(
                ringfence_jail::cgroup::Pool::new(
                    layout,
                    "ringfence",
                    &format!("{}vm", settings.pool_prefix),
                    settings.run_dir.join("cgroups"),
                )
                // QEMU outlives a `kill -9` of the server too, waiting to be re-attached.
                .kept_for(&settings.data_dir),
            )
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup for QEMU: it runs in the server's");
            None
        }
    };
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
    nic: Option<&ringfence_proto::GuestNic>,
) -> Option<PathBuf> {
    if std::env::var(ringfence_microvm::SNAPSHOT_ENV).is_ok_and(|v| v == "off") {
        return None;
    }
    match ringfence_microvm::snapshot::template_snapshot(cfg, image, limits, nic) {
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
            memory_snapshot: true,
            // A snapshot is the whole guest, memory included (see `save_fs`), not a layer of
            // files; a pause that keeps only files goes the same way (not tested).
            fs_snapshot: false,
            fork: true,
            reattach: true,
            kernel_injection: false,
            network: "nic",
            network_policy: true,
            agent_channel: "virtio-serial",
            accel: Some(self.accel().unwrap_or("unprobed")),
        }
    }

    fn start(&self, spec: StartSpec) -> Result<MicrovmInstance, TierError> {
        if !spec.volumes.is_empty() {
            return Err(TierError::Unsupported { tier: TierKind::Microvm, what: "volume mounts" });
        }
        // A snapshot of a microvm sandbox is its newest layer, and holds the whole guest.
        let fork_from = match spec.layers.first() {
            Some(l) if ringfence_microvm::fork::is_snapshot(l) => Some(l.clone()),
            Some(_) => {
                return Err(TierError::Unsupported {
                    tier: TierKind::Microvm,
                    what: "start from another tier's snapshot (its layers are files, not a guest)",
                });
            }
            None => None,
        };
        let cfg = self.config()?;
        if let Some(from) = fork_from {
            let mut s = ringfence_microvm::StartSpec::new(spec.id, PathBuf::new());
            s.limits = spec.limits;
            s.env = spec.env;
            s.fork_from = Some(from);
            let memory_limit = s.limits.memory;
            let vm = MicroVm::start(cfg, s).map_err(vm_err)?;
            tracing::debug!(start_ms = vm.boot.as_millis() as u64, "microvm forked");
            let nic = vm.nic();
            return Ok(MicrovmInstance { vm, memory_limit, nic, _image: None });
        }
        let mut env = spec.env;
        // An image template (imported, pulled, built or bootstrapped) is asked for as a disk
        // image of its merged layers, made once per content by the image store. Only its files
        // reach the guest: the guest's init is our agent from the initramfs, never a program of
        // the image, and the host only copies the image's (already checked) files into the
        // disk. The claim is held for the sandbox's life.
        let mut image_in_use = None;
        let image = if ringfence_image::store::RESERVED.contains(&spec.template.as_str()) {
            self.builtin_image(&spec.template)?
        } else {
            let exported = super::export_image(
                &self.settings.data_dir,
                &spec.template,
                TemplateForm::DiskImage { fs: DiskFs::Ext4 },
            )?;
            for (k, v) in exported.env() {
                env.entry(k).or_insert(v);
            }
            let Artifact::DiskImage(path) = exported.artifact else {
                return Err(TierError::Setup("the image store answered another form".into()));
            };
            image_in_use = Some(exported.in_use);
            path
        };
        let mut s = ringfence_microvm::StartSpec::new(spec.id, image.clone());
        s.limits = spec.limits;
        s.env = env;
        s.nic = Some(guest_nic());
        let memory_limit = spec.limits.memory;
        s.snapshot = snapshot_for(cfg, &image, &spec.limits, s.nic.as_ref());
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
        let nic = vm.nic();
        Ok(MicrovmInstance { vm, memory_limit, nic, _image: image_in_use })
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
        Ok(Adopted {
            instance: MicrovmInstance { vm, memory_limit, nic: None, _image: None },
            thawed: false,
        })
    }

    fn end_leftover(&self, _id: &str, _saved: &Saved) {
        // `sweep` ends every leftover at once.
    }

    fn sweep(&self) -> usize {
        // Only the state directory is needed (the probe's `state_dir` is this one): a server
        // starting beside another's guests must not boot a probe guest before it listens.
        ringfence_microvm::sweep(&self.settings.run_dir.join("microvm")).len()
    }
}

/// One microvm sandbox. Dropping it ends the guest and removes its disk and sockets.
#[derive(Debug)]
pub struct MicrovmInstance {
    vm: MicroVm,
    memory_limit: Option<u64>,
    /// The host's end of the guest NIC's socket, for the network layer.
    nic: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Held while it runs from an image template: `template rm` is refused meanwhile.
    _image: Option<ringfence_image::store::InUse>,
}

/// The guest's NIC: the jail's addresses (the sandbox is `100.96.0.2`, its gateway and
/// resolver `100.96.0.1`, our stack), on a `/24` with a route through the gateway, at the
/// MACs the Ethernet adapter in front of the stack expects.
fn guest_nic() -> ringfence_proto::GuestNic {
    use ringfence_net::{ether, tun};
    ringfence_proto::GuestNic {
        mac: ether::GUEST_MAC,
        address: tun::SANDBOX_IP.octets(),
        prefix: 24,
        gateway: tun::GATEWAY_IP.octets(),
        mtu: ether::MTU,
        dns: tun::GATEWAY_IP.octets(),
    }
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
        match &self.nic {
            Some(fd) => NetAttach::Nic(fd.clone()),
            None => NetAttach::None,
        }
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

    /// The whole guest, memory and disk ([`MicroVm::snapshot_to`]); a paused one stays paused.
    fn save_fs(&self, dest: &Path, paused: bool) -> Result<(), TierError> {
        self.vm.snapshot_to(dest, paused).map_err(vm_err)
    }
}
