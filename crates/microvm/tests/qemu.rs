//! The QEMU backend against a real guest: launch, pause, continue, save to a file, quit.
//! The guest is the tier's kernel with no root: it boots to its panic and halts there
//! (`panic=0`), alive enough for the VMM's lifecycle.
//!
//! SLOW: one guest boot (~2-4 s under TCG here). Needs QEMU and the guest kernel
//! (`scripts/install-microvm.sh`); without them it prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ringfence_microvm::vmm::{Accel, Qemu, VmHandle, VmSpec, Vmm};

#[test]
fn a_guest_pauses_continues_saves_and_quits() {
    let Some(qemu) = Qemu::find() else {
        eprintln!("SKIPPED: no qemu-system-x86_64 (scripts/install-microvm.sh)");
        return;
    };
    let kernel = ringfence_microvm::kernel_dir().join("vmlinux");
    if !kernel.is_file() {
        eprintln!("SKIPPED: no guest kernel at {} (scripts/install-microvm.sh)", kernel.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmdline = String::from("console=ttyS0 panic=0 pci=off");
    if let Some(khz) = ringfence_microvm::host_tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let spec = VmSpec {
        kernel,
        initrd: None,
        cmdline,
        memory_mib: 128,
        vcpus: 1,
        disks: Vec::new(),
        agent_socket: None,
        dir: dir.path().to_path_buf(),
        accel: Accel::Tcg,
    };
    let mut vm = qemu.launch(&spec).unwrap();
    let pid = vm.pid();
    // Up to its panic: the kernel ran.
    let started = Instant::now();
    while !std::fs::read_to_string(spec.console_log()).unwrap_or_default().contains("Kernel panic")
    {
        assert!(started.elapsed() < Duration::from_secs(60), "the guest did not boot");
        assert!(
            !vm.exited(),
            "QEMU ended: {:?}",
            std::fs::read_to_string(dir.path().join("qemu.log"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.pause().unwrap();
    vm.resume().unwrap();
    let snap = dir.path().join("guest.state");
    vm.save(&snap).unwrap();
    let size = std::fs::metadata(&snap).unwrap().len();
    // QEMU's migration stream: its magic, then at least the guest's touched RAM.
    let head = std::fs::read(&snap).unwrap();
    assert_eq!(&head[..4], b"QEVM", "a migration stream");
    assert!(size > 1 << 20, "{size} bytes is no guest's memory");
    // Saved and left paused; it still continues.
    vm.resume().unwrap();
    vm.quit().unwrap();
    assert!(vm.exited());
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} is gone");
}
