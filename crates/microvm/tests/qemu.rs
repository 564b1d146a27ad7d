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
        nic: None,
        dir: dir.path().to_path_buf(),
        accel: Accel::Tcg,
        jail: ringfence_microvm::jail::running_as_root()
            .then(|| ringfence_microvm::jail::VmJail::with_uid(ringfence_microvm::jail::PROBE_UID)),
        incoming: false,
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
    if let Some(jail) = spec.jail {
        // QEMU runs jailed: its uid, no capabilities, a seccomp filter, its own network and root.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status.lines().find(|l| l.starts_with(name)).map(|l| l[name.len()..].trim().to_string())
        };
        let uid = jail.uid.to_string();
        let uids = field("Uid:").unwrap();
        assert!(uids.split_whitespace().all(|u| u == uid), "QEMU's uids: {uids}");
        assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"), "{status}");
        assert_eq!(field("NoNewPrivs:").as_deref(), Some("1"), "{status}");
        assert_eq!(field("Seccomp:").as_deref(), Some("2"), "a seccomp filter: {status}");
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
        assert_ne!(ns(&pid.to_string()), ns("self"), "QEMU in a network namespace of its own");
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
        assert_eq!(root, dir.path().join("root"), "QEMU's root is an empty directory");
        // The server (root) still reaches it over QMP (below).
    } else {
        eprintln!("SKIPPED the jail's checks: not root, QEMU runs as the caller");
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
