//! Which acceleration runs a guest on this host. `/dev/kvm` existing is not enough: on a PVM
//! host (nested, `CONFIG_KVM_PVM`) KVM accepts a VM and then emulates a stock kernel at a
//! crawl until it dies on an instruction it cannot emulate. So the probe boots the real guest
//! kernel with no root, under a deadline, and calls the acceleration good when the kernel
//! gets as far as looking for its root filesystem (the last step before userspace).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::vmm::{Accel, Qemu, VmHandle, VmSpec, Vmm};

/// What the probe found.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A guest booted with this acceleration, in this long.
    Available { qemu: Qemu, accel: Accel, boot: Duration, notes: Vec<String> },
    /// No guest boots here; why, naming each thing tried.
    Unavailable { reason: String },
}

/// The console line of a kernel that booted as far as mounting its root.
const ROOT_MARKER: &str = "VFS: Unable to mount root fs";

/// A KVM guest boots in well under a second; more means it is emulated (PVM) or stuck.
const KVM_DEADLINE: Duration = Duration::from_secs(5);
/// TCG boots in ~2 s on an idle core; a contended CI host gets more.
const TCG_DEADLINE: Duration = Duration::from_secs(40);

/// Probes with a scratch directory `scratch` (created and removed).
pub fn probe(scratch: &Path, tsc_khz: Option<u64>) -> Probe {
    let Some(qemu) = Qemu::find() else {
        return Probe::Unavailable {
            reason: "no qemu-system-x86_64 (install it with scripts/install-microvm.sh, or set \
                     RINGFENCE_QEMU)"
                .into(),
        };
    };
    let kernel = crate::kernel_dir().join("vmlinux");
    if !kernel.is_file() {
        return Probe::Unavailable {
            reason: format!(
                "no guest kernel at {} (install it with scripts/install-microvm.sh, or set {})",
                kernel.display(),
                crate::KERNEL_DIR_ENV
            ),
        };
    }
    let forced = std::env::var(crate::ACCEL_ENV).ok();
    let order: Vec<Accel> = match forced.as_deref() {
        Some("kvm") => vec![Accel::Kvm],
        Some("tcg") => vec![Accel::Tcg],
        Some(other) => {
            return Probe::Unavailable {
                reason: format!("{}={other:?}: expected kvm or tcg", crate::ACCEL_ENV),
            };
        }
        None => vec![Accel::Kvm, Accel::Tcg],
    };
    let mut notes = Vec::new();
    for accel in order {
        if accel == Accel::Kvm && std::fs::File::open("/dev/kvm").is_err() {
            notes.push("kvm: /dev/kvm cannot be opened".to_string());
            continue;
        }
        let deadline = if accel == Accel::Kvm { KVM_DEADLINE } else { TCG_DEADLINE };
        match boot_once(&qemu, &kernel, accel, deadline, scratch, tsc_khz) {
            Ok(boot) => return Probe::Available { qemu, accel, boot, notes },
            Err(why) => notes.push(format!("{}: {why}", accel.as_str())),
        }
    }
    Probe::Unavailable { reason: format!("no guest boots here ({})", notes.join("; ")) }
}

fn boot_once(
    qemu: &Qemu,
    kernel: &Path,
    accel: Accel,
    deadline: Duration,
    scratch: &Path,
    tsc_khz: Option<u64>,
) -> Result<Duration, String> {
    let dir = scratch.join(accel.as_str());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let mut cmdline = String::from("console=ttyS0 reboot=t panic=-1 pci=off");
    if let Some(khz) = tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let spec = VmSpec {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline,
        memory_mib: 128,
        vcpus: 1,
        disks: Vec::new(),
        agent_socket: None,
        nic: None,
        dir: dir.clone(),
        accel,
        // The probe runs as a sandbox will (same uid drop, namespaces and filter): a host where
        // the jail cannot start has no tier to offer.
        jail: crate::jail::running_as_root()
            .then(|| crate::jail::VmJail::with_uid(crate::jail::PROBE_UID)),
        incoming: false,
    };
    let started = Instant::now();
    let result = (|| {
        let mut vm = qemu.launch(&spec).map_err(|e| e.to_string())?;
        loop {
            let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
            if console.contains(ROOT_MARKER) {
                let took = started.elapsed();
                let _ = vm.quit();
                return Ok(took);
            }
            if vm.exited() {
                let qemu_log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                return Err(format!(
                    "the guest ended before booting: {}",
                    last_line(&qemu_log).unwrap_or_else(|| last_line(&console).unwrap_or_default())
                ));
            }
            if started.elapsed() > deadline {
                let _ = vm.quit();
                return Err(format!("no boot within {deadline:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn last_line(s: &str) -> Option<String> {
    s.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_string())
}
