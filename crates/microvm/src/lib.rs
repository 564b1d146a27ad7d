//! The `microvm` isolation tier: each sandbox is a guest with its own kernel (Debian's cloud
//! kernel) under QEMU's `microvm` machine, and the sandbox agent (`ringfence-agent`) is the
//! guest's PID 1, speaking the same agent protocol over a virtio-serial port. A kernel bug
//! reached from inside is the guest's, not the host's.
//!
//! - [`vmm`]: the VMM seam ([`vmm::Vmm`], [`vmm::VmHandle`]) and QEMU behind it, driven over
//!   QMP ([`qmp`]). Its doc says how Firecracker or Cloud Hypervisor would implement it.
//! - [`probe`]: finds QEMU and the kernel, and boots a throwaway guest with a deadline under KVM,
//!   then TCG, to learn which acceleration actually runs a guest here.
//! - [`guest`]: the initramfs (the agent as `/init` plus the few kernel modules the cloud kernel
//!   does not build in), the template's read-only ext4 image (built once per template, cached
//!   host-wide), the sandbox's writable disk.
//! - [`MicroVm`]: one sandbox: starts the VM, hands the agent its setup, and cleans up (QEMU,
//!   sockets, disks) on [`MicroVm::delete`] or drop. Its NIC's frames come out of
//!   [`MicroVm::nic`], a socket the server's userspace stack serves ([`vmm::Nic`]).
//!
//! - [`snapshot`]: a memory snapshot per template and guest shape, booted once and saved with
//!   the agent parked before it touches the writable disk; sandboxes start by restoring it.
//!
//! - [`jail`]: each QEMU in its own uid, namespaces and seccomp filter.
//!
//! No `unsafe` here: the one raw call (passing a descriptor to QEMU) is `ringfence-sys`'s.

#![forbid(unsafe_code)]

pub mod fork;
pub mod guest;
pub mod jail;
pub mod probe;
pub mod qmp;
mod relay;
mod sandbox;
pub mod snapshot;
pub mod vmm;

use std::path::PathBuf;

pub use probe::{Probe, probe};
pub use sandbox::{MicroVm, StartSpec, Usage, guest_shape, sweep};
pub use vmm::{Accel, Qemu};

/// Everything that can go wrong starting or running a microVM.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("VMM: {0}")]
    Vmm(String),
    #[error("invalid sandbox spec: {0}")]
    Invalid(String),
    #[error("building {what}: {message}")]
    Build { what: String, message: String },
    #[error("agent channel: {0}")]
    Proto(#[from] ringfence_proto::ProtoError),
    #[error("{step}: {message}")]
    Setup { step: String, message: String },
    #[error("the guest did not come up: {0}")]
    Boot(String),
    #[error("the sandbox agent sent an unexpected message during setup: {0}")]
    Protocol(String),
}

/// Where the kernel and its modules are installed (`scripts/install-microvm.sh`).
pub const DEFAULT_KERNEL_DIR: &str = "/usr/local/lib/ringfence/microvm";
/// Overrides [`DEFAULT_KERNEL_DIR`].
pub const KERNEL_DIR_ENV: &str = "RINGFENCE_MICROVM_DIR";
/// Forces an acceleration (`kvm` or `tcg`) instead of probing both.
pub const ACCEL_ENV: &str = "RINGFENCE_MICROVM_ACCEL";
/// `off`: start every sandbox by booting its guest, never from a memory snapshot.
pub const SNAPSHOT_ENV: &str = "RINGFENCE_MICROVM_SNAPSHOTS";
/// `file`: pausing a sandbox saves its guest to a file and ends its QEMU (resume starts one
/// from the file); otherwise pause stops the vCPUs in memory.
pub const PAUSE_ENV: &str = "RINGFENCE_MICROVM_PAUSE";
/// Host-wide cache of template images (default `/var/cache/ringfence/microvm`).
pub const CACHE_ENV: &str = "RINGFENCE_MICROVM_CACHE";

/// Host-wide settings of the microvm tier.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    pub qemu: Qemu,
    pub accel: Accel,
    /// `vmlinux` (uncompressed, PVH) and `modules/` (`order` plus the `.ko` files).
    pub kernel_dir: PathBuf,
    /// The guest's initramfs (built by [`guest::build_initramfs`]).
    pub initramfs: PathBuf,
    /// Volatile state: each sandbox's directory (`sandboxes/<id>/`: QMP and agent sockets,
    /// writable disk, console log).
    pub state_dir: PathBuf,
    /// Template images, shared by every server on the host.
    pub cache_dir: PathBuf,
    /// The host's TSC frequency in kHz, given to the guest: microvm has no HPET or PM timer
    /// to calibrate against, and a third of boots hang without it.
    pub tsc_khz: Option<u64>,
    /// Cgroup slots for the QEMU processes (`None`: no usable hierarchy, or not root: QEMU
    /// then runs in the server's cgroup).
    pub cgroups: Option<ringfence_jail::cgroup::Pool>,
}

impl MicrovmConfig {
    pub fn kernel(&self) -> PathBuf {
        self.kernel_dir.join("vmlinux")
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    /// The guest kernel's command line: quiet, no reboot (QEMU exits when the guest does),
    /// and the agent's arguments after `--`.
    pub fn cmdline(&self) -> String {
        let mut c = String::from("console=ttyS0 quiet reboot=t panic=-1 pci=off");
        if let Some(khz) = self.tsc_khz {
            // `tsc=reliable`: no watchdog on the TSC. Its only reference here is jiffies, which
            // lose ticks whenever a TCG vCPU thread waits for a host CPU; the watchdog then
            // marks the TSC unstable, the guest keeps time by jiffies, and its clock falls
            // behind the host's by seconds a minute on a loaded host (seen: 1.35 s behind
            // within a minute of being stepped). TCG's TSC is the host's, at the rate given.
            c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        c.push_str(" -- --init --tier microvm");
        c
    }
}

/// The kernel directory: `$RINGFENCE_MICROVM_DIR`, else [`DEFAULT_KERNEL_DIR`].
pub fn kernel_dir() -> PathBuf {
    std::env::var_os(KERNEL_DIR_ENV)
        .map_or_else(|| PathBuf::from(DEFAULT_KERNEL_DIR), PathBuf::from)
}

/// The template image cache: `$RINGFENCE_MICROVM_CACHE`, else `/var/cache/ringfence/microvm`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .map_or_else(|| PathBuf::from("/var/cache/ringfence/microvm"), PathBuf::from)
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`'s `cpu MHz` (what the kernel
/// measured at boot; on a guest host it is the hypervisor's stated rate).
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}
