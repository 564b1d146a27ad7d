//! `ringfence run` end to end: the user-facing contract, then one test per isolation property
//! that attempts the violation and asserts it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

macro_rules! root_only {
    () => {
        if !require_root(module_path!()) {
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The contract from the README.

#[test]
fn python_prints_and_exit_code_propagates() {
    root_only!();
    let o = run(&[], &["python3", "-c", "print(6*7)"]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "42\n"), "{o:?}");
    let o =
        sh(&["--memory", "256M", "--pids", "64", "--timeout", "5s", "--disk", "512M"], "exit 3");
    assert_eq!(o.code, 3, "{o:?}");
}

#[test]
fn env_and_workdir() {
    root_only!();
    let o = sh(&["--env", "FOO=bar", "--workdir", "/tmp"], "echo $FOO; pwd");
    assert_eq!(o.stdout, "bar\n/tmp\n", "{o:?}");
}

#[test]
fn stdin_is_passed_through() {
    root_only!();
    let mut child = ringfence()
        .args(["run", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hi\nthere\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\nthere\n");
    assert!(out.status.success());
}

#[test]
fn commands_start_with_no_signal_ignored_whatever_the_host_ignores() {
    root_only!();
    // A host process started from a script's background job has SIGINT and SIGQUIT ignored,
    // and an ignored (or blocked) signal stays so across exec: neither the agent (cloned by
    // this CLI with `--no-spawner`, or by a slot's spawner) nor the command may pass that on.
    for opts in [&["--no-spawner"][..], &[][..]] {
        let out = std::process::Command::new("env")
            .args(["--ignore-signal=INT", "--ignore-signal=QUIT", "--ignore-signal=HUP"])
            .arg("--block-signal=USR1")
            .arg(env!("CARGO_BIN_EXE_ringfence"))
            .env("RINGFENCE_AGENT", agent_path())
            .stdin(std::process::Stdio::null())
            .arg("run")
            .args(opts)
            .args(["--", "grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{opts:?}: {out:?}");
        assert_eq!(
            stdout.trim_end(),
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000",
            "{opts:?}"
        );
    }
}

#[test]
fn signals_become_128_plus_n() {
    root_only!();
    assert_eq!(sh(&[], "kill -9 $$").code, 137);
    assert_eq!(sh(&[], "kill -TERM $$").code, 143);
}

#[test]
fn documented_failures_have_codes_and_one_line_messages() {
    root_only!();
    let o = run(&[], &["no-such-command"]);
    assert_eq!(o.code, 127, "{o:?}");
    assert!(o.stderr.contains("ringfence: command not found: no-such-command"), "{o:?}");
    let o = run(&[], &["/etc/passwd"]);
    assert_eq!(o.code, 126, "{o:?}");
    let o = sh(&["--workdir", "/nonexistent"], "true");
    assert_eq!(o.code, 125, "{o:?}");
    assert!(o.stderr.contains("working directory does not exist"), "{o:?}");
}

#[test]
fn bad_values_are_rejected_before_anything_is_created() {
    // No root needed: parsing happens first.
    for (flag, value) in [
        ("--memory", "lots"),
        ("--disk", "0"),
        ("--disk", "1K"),
        ("--memory", "1M"),
        ("--timeout", "soon"),
        ("--cpus", "many"),
        ("--pids", "-1"),
        ("--env", "NOEQUALS"),
        ("--user", "admin"),
        ("--disk-backend", "nvme"),
    ] {
        let out = ringfence().args(["run", flag, value, "--", "true"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(value), "{flag} {value}: the message names the bad value: {err}");
    }
}

#[test]
fn help_documents_every_option_and_exit_code() {
    let out = ringfence().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--memory",
        "--pids",
        "--cpus",
        "--disk",
        "--disk-backend",
        "--timeout",
        "--max-output",
        "--env",
        "--workdir",
        "--user",
        "--report",
        "121",
        "122",
        "124",
        "125",
        "126",
        "127",
    ] {
        assert!(help.contains(needle), "help lacks {needle}");
    }
}

#[test]
fn refuses_to_run_without_root() {
    if !is_root() {
        let o = run(&[], &["true"]);
        assert_eq!(o.code, 125);
        assert!(o.stderr.contains("must run as root"));
        return;
    }
    // As root, drop to nobody to check the message.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_ringfence"))
        .args(["run", "--", "true"])
        .env("RINGFENCE_AGENT", agent_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
}

// ---------------------------------------------------------------------------------------------
// 1. Namespaces.

#[test]
fn user_namespace_maps_root_to_an_unprivileged_range() {
    root_only!();
    let o = sh(&[], "id -u; cat /proc/self/uid_map /proc/self/gid_map; stat -c %u /usr/bin/env");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "1000", "{o:?}");
    for map in &lines[1..3] {
        let f: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(f[0], "0");
        assert_ne!(f[1], "0", "sandbox root must never be host root: {map}");
        assert!(f[1].parse::<u64>().unwrap() >= 65536);
    }
    // Host root's files belong to nobody in here: host uid 0 is not mapped.
    assert_eq!(lines[3], "65534", "{o:?}");
}

/// The template is stored once, with canonical owners, and shown to each sandbox through its
/// own id mapping: its root owns `/` as it would on a real system. Whatever that root does to
/// those files lands in its own writable layer; the host's copy, shared by every sandbox,
/// never changes, and no path inside leads to it.
#[test]
fn sandbox_root_owns_the_template_as_seen_inside_but_cannot_change_the_hosts_copy() {
    root_only!();
    let host = std::path::Path::new("/var/lib/ringfence/templates/host/rootfs");
    let o = sh(
        &["--user", "root"],
        "stat -c '%u %g' / /etc/passwd /home/user; chmod 700 /etc; stat -c %a /etc; \
         grep -o 'lowerdir=[^,]*' /proc/self/mountinfo",
    );
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[..3], ["0 0", "0 0", "1000 1000"], "{o:?}");
    assert_eq!(lines[3], "700", "root changed its own /etc, as owner: {o:?}");
    // Lower layers are mounted under neutral names: no host path inside.
    assert_eq!(lines[4], "lowerdir=template", "{o:?}");
    let o = sh(&[], "echo PWNED > /home/user/planted && cat /home/user/planted");
    assert_eq!(o.stdout, "PWNED\n", "{o:?}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(host.join("etc")).unwrap().mode() & 0o777, 0o755);
    assert!(!host.join("home/user/planted").exists(), "a sandbox wrote the host's template");
    assert_eq!(std::fs::metadata(host.join("home/user")).unwrap().uid(), 1000);
    // And no host user can walk into the templates to edit them.
    let dir = std::fs::metadata("/var/lib/ringfence/templates").unwrap();
    assert_eq!(dir.mode() & 0o077, 0, "templates are open to host users");
}

#[test]
fn root_in_the_sandbox_cannot_use_host_root_powers() {
    root_only!();
    // Owner bits on /proc/sys would let a host-root-mapped uid 0 write sysctls; here it fails.
    let o = sh(
        &["--user", "root"],
        "echo 1 > /proc/sys/kernel/sysrq && echo WROTE; cat /proc/self/status | grep -E '^Cap(Eff|Prm|Bnd)'",
    );
    assert!(!o.stdout.contains("WROTE"), "{o:?}");
    for line in o.stdout.lines() {
        assert!(line.ends_with("0000000000000000"), "capabilities must be empty: {line}");
    }
}

#[test]
fn pid_namespace_hides_the_host_and_agent_is_pid1() {
    root_only!();
    let me = std::process::id();
    let o = sh(
        &[],
        &format!(
            "cat /proc/1/comm; ls /proc | grep -c '^[0-9]'; kill -0 {me} 2>/dev/null && echo REACHED; \
             ls /proc/{me} >/dev/null 2>&1 && echo SEEN; echo $$"
        ),
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "ringfence-agent", "{o:?}");
    assert!(lines[1].parse::<u32>().unwrap() <= 4, "only the sandbox's own processes: {o:?}");
    assert!(!o.stdout.contains("REACHED") && !o.stdout.contains("SEEN"), "{o:?}");
}

#[test]
fn agent_is_not_inspectable_by_user_code() {
    root_only!();
    for user in ["user", "root"] {
        let o = sh(
            &["--user", user],
            "readlink /proc/1/exe >/dev/null 2>&1 && echo EXE; cat /proc/1/environ >/dev/null 2>&1 && echo ENV; \
             readlink /proc/1/fd/3 >/dev/null 2>&1 && echo FDS; cat /proc/1/mem >/dev/null 2>&1 && echo MEM; echo done",
        );
        assert_eq!(o.stdout, "done\n", "{user} could inspect PID 1: {o:?}");
    }
}

#[test]
fn mount_namespace_has_no_host_mounts_and_old_root_is_gone() {
    root_only!();
    let o = sh(&[], "cat /proc/self/mountinfo; ls /run; ls -d /work /old_root /run/ringfence 2>&1");
    let host_dir = env!("CARGO_MANIFEST_DIR");
    assert!(!o.stdout.contains(host_dir), "{o:?}");
    assert!(!o.stdout.contains("ringfence/stage"), "staging paths must not leak: {o:?}");
    assert!(!o.stdout.contains("/var/lib/ringfence"), "{o:?}");
    assert!(o.stdout.contains("No such file"), "{o:?}");
}

#[test]
fn network_is_loopback_only() {
    root_only!();
    // A server on the host's loopback must be unreachable from the sandbox's own loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let o = py(
        &[],
        &format!(
            "import socket\n\
             print(open('/proc/net/dev').read().count(':'))\n\
             print(len(open('/proc/net/route').read().strip().splitlines()))\n\
             s = socket.socket()\n\
             try:\n    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n\
             except OSError as e: print('refused', e.errno)\n"
        ),
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "1", "only lo: {o:?}");
    assert_eq!(lines[1], "1", "no routes beyond the header: {o:?}");
    assert_eq!(lines[2], "refused 111", "{o:?}");
    drop(listener);
}

/// A run's network namespace may be one its slot's spawner made ahead (owned by the host's
/// user namespace, `lo` up): each is still a fresh one, used by one sandbox only, with only
/// `lo`, working, and nothing inside may administer it.
#[test]
fn every_run_has_a_network_namespace_of_its_own_made_ahead_or_not() {
    root_only!();
    // Namespaces are told apart by their cookie (SO_NETNS_COOKIE), which the kernel never
    // reuses; their inode numbers are reused once a namespace is gone.
    const COOKIE: &str = "import socket; print(int.from_bytes(socket.socket().getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))";
    let host = Command::new("python3").args(["-c", COOKIE]).output().unwrap();
    let host = String::from_utf8(host.stdout).unwrap().trim().to_string();
    assert!(host.parse::<u64>().is_ok_and(|c| c > 0), "the host's cookie: {host:?}");
    let mut seen = std::collections::BTreeSet::new();
    let mut ahead = 0;
    // Other tests' runs take the namespaces made ahead too: enough rounds, each well after
    // the previous run ended (the spawner makes the next namespace then), that at least one
    // run gets one.
    for round in 0..24 {
        std::thread::sleep(Duration::from_millis(60));
        let o = py(
            &[],
            "import os, socket\n\
             print(int.from_bytes(socket.socket().getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))\n\
             print(open('/proc/net/dev').read().count(':'))\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
             c = socket.create_connection(s.getsockname()); a, _ = s.accept()\n\
             c.sendall(b'lo'); print(a.recv(2).decode())\n\
             import fcntl, struct\n\
             d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             try:\n    fcntl.ioctl(d, 0x8914, struct.pack('16sH14x', b'lo', 0)); print('lo down')\n\
             except OSError as e: print('down', e.errno)\n",
        );
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(o.code, 0, "{o:?}");
        assert_ne!(lines[0], host, "the host's namespace: {o:?}");
        assert!(seen.insert(lines[0].to_string()), "a namespace seen in an earlier run: {o:?}");
        // SIOCSIFFLAGS taking lo down: EPERM.
        assert_eq!(
            &lines[1..],
            ["1", "lo", "down 1"],
            "only lo, working, not administrable: {o:?}"
        );
        if o.report["net_made_ahead"] == true {
            ahead += 1;
            if ahead >= 2 && round >= 3 {
                break;
            }
        }
    }
    assert!(ahead > 0, "no run got a namespace made ahead in {} runs", seen.len());
}

#[test]
fn uts_ipc_and_cgroup_namespaces() {
    root_only!();
    // A SysV shared memory segment on the host must not be visible inside.
    let host_seg = host_shm_segment().expect("ipcmk creates a host segment");
    let o = py(
        &[],
        "import socket\nprint(socket.gethostname())\n\
         print(len(open('/proc/sysvipc/shm').read().splitlines()))\n\
         print(open('/proc/self/cgroup').read())",
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(lines[0].len(), 20, "hostname is the sandbox id: {o:?}");
    assert_ne!(lines[0], host.trim());
    assert_eq!(o.report["sandbox_id"], lines[0]);
    assert_eq!(lines[1], "1", "only the header line: {o:?}");
    for l in &lines[2..] {
        if let Some(path) = l.rsplit(':').next() {
            assert!(
                !path.contains("ringfence"),
                "cgroup paths must not reveal the host layout: {l}"
            );
        }
    }
    drop(host_seg);
}

/// Creates a SysV shm segment on the host through `ipcmk` and removes it on drop.
fn host_shm_segment() -> Option<ShmGuard> {
    let out = std::process::Command::new("ipcmk").args(["-M", "4096"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.split(':').nth(1)?.trim().to_string();
    Some(ShmGuard(id))
}

struct ShmGuard(String);
impl Drop for ShmGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ipcrm").args(["-m", &self.0]).status();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Filesystem.

#[test]
fn root_is_writable_per_sandbox_and_template_stays_pristine() {
    root_only!();
    let o = sh(&[], "echo data > /home/user/f && cat /home/user/f && echo x > /tmp/t && ls /tmp");
    assert_eq!(o.stdout, "data\nt\n", "{o:?}");
    let o = sh(&[], "ls -A /home/user /tmp");
    assert!(
        !o.stdout.contains(" f") && !o.stdout.contains("\nt\n"),
        "a new sandbox starts clean: {o:?}"
    );
    let tmpl = std::path::Path::new("/var/lib/ringfence/templates/host/rootfs");
    assert!(!tmpl.join("home/user/f").exists());
    assert!(!tmpl.join("tmp/t").exists());
}

#[test]
fn template_and_host_usr_cannot_be_modified() {
    root_only!();
    let o = sh(
        &["--user", "root"],
        "echo x > /usr/bin/env 2>/dev/null && echo W1; rm -f /usr/bin/env 2>/dev/null && echo W2; \
         echo x >> /etc/passwd 2>/dev/null && echo W3; mkdir /newtop 2>/dev/null && echo W4; \
         ls /usr/bin/env",
    );
    for w in ["W1", "W2", "W3", "W4"] {
        assert!(!o.stdout.contains(w), "{w} succeeded: {o:?}");
    }
    assert!(std::path::Path::new("/usr/bin/env").exists());
}

#[test]
fn disk_quota_gives_enospc() {
    root_only!();
    let o = sh(
        &["--disk", "16M"],
        "dd if=/dev/zero of=/home/user/big bs=1M count=64 2>&1 | grep -o 'No space left on device' | head -1",
    );
    assert_eq!(o.stdout.trim(), "No space left on device", "{o:?}");
}

/// Issue 12, finding 11: the disk is disk, apart from memory. With a quota four times the
/// memory limit, filling it ends in ENOSPC, not the OOM killer, and the sandbox goes on; `df`
/// shows the quota. (With a tmpfs disk the same run was OOM-killed: exit 121.)
#[test]
fn a_disk_bigger_than_memory_fills_with_enospc_not_an_oom_kill() {
    root_only!();
    let o = sh(
        &["--disk", "512M", "--memory", "128M"],
        "dd if=/dev/zero of=/home/user/big bs=1M count=700 2>&1 | grep -o 'No space left on device' | head -1; \
         df -k / | tail -1; echo alive",
    );
    if o.report["disk_backend"] != "image" {
        eprintln!("SKIPPED: this host cannot make disk images ({})", o.stderr.trim());
        return;
    }
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.report["oom_killed"], false, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!((lines[0], lines[2]), ("No space left on device", "alive"), "{o:?}");
    let total_kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((480 << 10..=512 << 10).contains(&total_kib), "{o:?}");
}

/// A run's disk is gone soon after the run is: no image, mount point or mount left. One whose CLI was
/// SIGKILLed leaves no mount either (the filesystem lived only in its sandbox's namespace), only
/// its image, which `ringfence gc` removes, and nothing that someone still holds.
#[test]
fn a_runs_disk_is_removed_with_it_and_gc_sweeps_a_killed_runs() {
    root_only!();
    let disks = std::path::Path::new("/var/lib/ringfence/disks");
    let gone = |id: &str| {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        !disks.join(id).exists()
            && !disks.join(format!("{id}.img")).exists()
            && !mounts.contains(&format!("/disks/{id} "))
    };
    let o = sh(&[], "echo x > /tmp/f; cat /tmp/f");
    if o.report["disk_backend"] != "image" {
        eprintln!("SKIPPED: this host cannot make disk images ({})", o.stderr.trim());
        return;
    }
    assert_eq!(o.stdout, "x\n");
    // Removed by a process the run forks as it exits (its caller does not wait for the
    // filesystem's teardown), so within moments rather than by the time the run returns.
    let id = o.report["sandbox_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(&id) {
        assert!(Instant::now() < deadline, "the run's disk is still there 10 s later: {o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A run killed with SIGKILL: its sandbox dies with it (its agent reads end-of-file on its
    // control channel), its disk stays behind. Its id is its hostname, read through the
    // sandbox's command.
    let mut child = ringfence().args(["run", "--", "sleep", "60.25"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let sleeper = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (cmd == b"sleep\x0060.25\x00").then_some(pid)
        });
        let name = sleeper
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/root/etc/hostname")).ok());
        if let Some(n) = name.map(|n| n.trim().to_string()).filter(|n| n.len() == 20) {
            break n;
        }
        assert!(Instant::now() < deadline, "the run's sandbox did not come up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(disks.join(format!("{id}.img")).exists(), "{id}");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    // Its sandbox went with it (the agent read end-of-file on its control channel).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host_pids_running("sleep 60.25").is_empty() {
        assert!(Instant::now() < deadline, "the killed run's sandbox is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("/disks/{id} ")), "the killed run left a mount");
    assert!(!gone(&id), "the killed run's image should still be there for gc to find");
    let out = ringfence().arg("gc").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(gone(&id), "gc left the killed run's disk: {out:?}");
}

#[test]
fn a_disk_made_ahead_never_carries_another_runs_files() {
    root_only!();
    // A data directory of its own, so the spares this test sees are the ones its own runs
    // made (each run makes the next run's disk): a run of another size in a shared one
    // discards spares not of its size, and the tests run side by side.
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().into_owned();
    let opts = ["--disk", "301M", "--data-dir", data_dir.as_str()];
    let spare_dir = data.path().join("disks/.spare");
    let spares = spare_dir.as_path();
    let ready = || {
        std::fs::read_dir(spares).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("315621376-"))
                .count()
        })
    };
    let mut took_spare = 0;
    for i in 0..4 {
        // Spares are made after a run has exited (by a process it forks): give the last run's
        // the moments it needs, so that each run after the first has one to take.
        let deadline = Instant::now() + Duration::from_secs(10);
        while i > 0 && ready() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = sh(
            &opts,
            &format!(
                "ls -A /tmp /root /home/user 2>/dev/null | grep -c marker; \
                 echo {i} > /tmp/marker-{i}; echo {i} > /root/marker-{i}; df -k / | tail -1"
            ),
        );
        if o.report["disk_backend"] != "image" {
            eprintln!("SKIPPED: this host cannot make disk images ({})", o.stderr.trim());
            return;
        }
        assert_eq!(o.stdout.lines().next(), Some("0"), "run {i} sees files of a run before: {o:?}");
        // Its quota is its own size, spare or not.
        let size_kb: u64 =
            o.stdout.lines().nth(1).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(size_kb <= 301 * 1024 && size_kb > 250 * 1024, "{o:?}");
        took_spare += usize::from(o.report["disk_made_ahead"] == true);
    }
    // The first may find none (nothing ran at this size before); the others take theirs.
    assert!(took_spare >= 3, "only {took_spare} of 4 runs took a disk made ahead");
    // The spares left made ahead go with gc, mounts and all, before the directory does.
    std::thread::sleep(Duration::from_millis(300));
    let out = ringfence().args(["gc", "--data-dir", &data_dir]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&data_dir), "gc left a mount under {data_dir}");
}

#[test]
fn dev_is_minimal_and_read_only() {
    root_only!();
    let o = sh(
        &["--user", "root"],
        "ls /dev; echo ok > /dev/null && echo NULL_OK; head -c4 /dev/urandom | wc -c; touch /dev/evil 2>/dev/null && echo CREATED; mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD",
    );
    let names: Vec<&str> = o.stdout.lines().take_while(|l| !l.contains("NULL_OK")).collect();
    let mut want = vec![
        "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
        "urandom", "zero",
    ];
    want.sort();
    assert_eq!(names, want, "{o:?}");
    assert!(o.stdout.contains("NULL_OK") && o.stdout.contains("\n4\n"), "{o:?}");
    assert!(!o.stdout.contains("CREATED") && !o.stdout.contains("MKNOD"), "{o:?}");
}

#[test]
fn proc_sensitive_files_are_masked_and_sys_is_empty() {
    root_only!();
    let o = sh(
        &["--user", "root"],
        "for f in kcore kallsyms keys timer_list; do cat /proc/$f 2>/dev/null | wc -c; done; \
         echo b > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ; \
         echo evil > /proc/sys/kernel/hostname 2>/dev/null && echo SYSCTL; \
         ls -A /sys | wc -l; touch /sys/x 2>/dev/null && echo SYSW",
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(&lines[..4], ["0", "0", "0", "0"], "masked files read empty: {o:?}");
    assert!(
        !o.stdout.contains("SYSRQ") && !o.stdout.contains("SYSCTL") && !o.stdout.contains("SYSW"),
        "{o:?}"
    );
    assert_eq!(lines[4], "0", "/sys is empty: {o:?}");
}

#[test]
fn etc_has_no_host_secrets() {
    root_only!();
    let o = sh(&["--user", "root"], "ls -A /etc; cat /etc/hostname");
    for secret in ["shadow", "gshadow", "sudoers", "ssh", "machine-id"] {
        assert!(!o.stdout.lines().any(|l| l == secret), "{secret} leaked: {o:?}");
    }
    assert_eq!(o.stdout.lines().last().unwrap().len(), 20);
}

// ---------------------------------------------------------------------------------------------
// 3. Cgroups.

/// The slot's spawner shields itself from the OOM killer (`oom_score_adj` -1000, where the
/// host lets it) and a forked or exec'd agent would inherit that: no process of the sandbox,
/// its PID 1 included, may carry a negative score (a sandbox at its limit must lose one of its
/// own). On a host that refuses the spawner's write everything reads 0 and this cannot fail.
#[test]
fn no_process_in_a_sandbox_is_shielded_from_the_oom_killer() {
    root_only!();
    let o = sh(&[], "cat /proc/1/oom_score_adj /proc/self/oom_score_adj");
    let scores: Vec<i32> = o.stdout.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(scores.len(), 2, "{o:?}");
    assert!(scores.iter().all(|s| *s >= 0), "negative oom_score_adj inside: {scores:?}");
}

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    root_only!();
    let o = py(&["--memory", "64M"], "x = bytearray(256 << 20)\nprint('survived')");
    assert_eq!(o.code, 121, "{o:?}");
    assert!(!o.stdout.contains("survived"));
    assert!(o.stderr.contains("out of memory"), "{o:?}");
    assert_eq!(o.report["oom_killed"], true);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    root_only!();
    let o = py(
        &["--pids", "32"],
        "import time\nn = 0\n\
         for i in range(200):\n    try:\n        pid = os.fork()\n    except OSError as e:\n        print('EAGAIN' if e.errno == 11 else e); break\n\
         \n    if pid == 0:\n        time.sleep(5); os._exit(0)\n    n += 1\n\
         print('forked', n)",
    );
    assert!(o.stdout.contains("EAGAIN"), "{o:?}");
    let n: u32 =
        o.stdout.lines().last().unwrap().split_whitespace().last().unwrap().parse().unwrap();
    assert!(n < 32, "{o:?}");
}

#[test]
fn cpu_quota_throttles() {
    root_only!();
    let o =
        py(&["--cpus", "0.2"], "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass");
    assert_eq!(o.code, 0, "{o:?}");
    let cpu_us = o.report["usage"]["user_cpu_us"].as_u64().unwrap()
        + o.report["usage"]["sys_cpu_us"].as_u64().unwrap();
    assert!(
        cpu_us < 500_000,
        "a 1 s busy loop at 0.2 CPU must use well under 1 s of CPU, used {cpu_us} us"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Seccomp.

#[test]
fn denied_syscalls_fail_with_eperm_and_are_reported() {
    root_only!();
    // name, syscall number, arguments
    let probes: &[(&str, i64, &str)] = &[
        ("mount", 165, "0, 0, 0, 0, 0"),
        ("unshare", 272, "0x10000000"),
        ("setns", 308, "0, 0"),
        ("bpf", 321, "0, 0, 0"),
        ("perf_event_open", 298, "0, 0, -1, -1, 0"),
        ("keyctl", 250, "0, 0"),
        ("add_key", 248, "0, 0, 0, 0, 0"),
        ("request_key", 249, "0, 0, 0, 0"),
        ("kexec_load", 246, "0, 0, 0, 0"),
        ("init_module", 175, "0, 0, 0"),
        ("finit_module", 313, "0, 0, 0"),
        ("delete_module", 176, "0, 0"),
        ("open_by_handle_at", 304, "0, 0, 0"),
        ("userfaultfd", 323, "0"),
        ("io_uring_setup", 425, "1, 0"),
        ("personality", 135, "0x0400000"),
        ("ptrace", 101, "16, 1, 0, 0"),
        ("pivot_root", 155, "0, 0"),
        ("chroot", 161, "0"),
    ];
    let mut code = String::new();
    for (name, nr, args) in probes {
        code.push_str(&format!("r, e = sc({nr}, {args}); print('{name}', r, e)\n"));
    }
    code.push_str("print('alive')\n");
    let o = py(&[], &code);
    assert!(o.stdout.contains("alive"), "the process lives on: {o:?}");
    for (name, _, _) in probes {
        let line = o.stdout.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        assert_eq!(line, format!("{name} -1 1"), "{name} must fail with EPERM");
    }
    let reported = denied(&o);
    for (name, _, _) in probes {
        assert!(
            reported.iter().any(|r| r == name),
            "{name} missing from security events: {reported:?}"
        );
    }
    assert!(o.stderr.contains("blocked"), "summary line: {o:?}");
}

#[test]
fn namespace_creation_through_clone_is_denied_and_clone3_falls_back() {
    root_only!();
    let o = py(
        &[],
        "r, e = sc(56, 0x10000000 | 17, 0, 0, 0, 0)\n\
         if r == 0: os._exit(0)\n\
         print('clone_newuser', r, e)\n\
         r, e = sc(435, 0, 0)\nprint('clone3', r, e)\n\
         import threading; t = threading.Thread(target=lambda: None); t.start(); t.join(); print('threads ok')\n\
         pid = os.fork()\n\
         if pid == 0: os._exit(7)\n\
         print('fork', os.waitpid(pid, 0)[1] >> 8)",
    );
    assert!(o.stdout.contains("clone_newuser -1 1"), "{o:?}");
    assert!(o.stdout.contains("clone3 -1 38"), "clone3 answers ENOSYS: {o:?}");
    assert!(o.stdout.contains("threads ok") && o.stdout.contains("fork 7"), "{o:?}");
    let d = denied(&o);
    assert!(d.contains(&"clone".to_string()), "{d:?}");
    assert!(!d.contains(&"clone3".to_string()), "clone3 is not an escape attempt: {d:?}");
}

#[test]
fn tiocsti_is_denied_even_with_high_bits_set() {
    root_only!();
    let o = py(
        &[],
        "import fcntl, termios\nm, s = os.openpty()\n\
         try:\n    fcntl.ioctl(s, termios.TIOCSTI, b'x'); print('INJECTED')\n\
         except OSError as e: print('tiocsti', e.errno)\n\
         libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]\n\
         ctypes.set_errno(0)\n\
         r = libc.ioctl(s, 0x100005412, b'y'); print('tiocsti_high', r, ctypes.get_errno())\n\
         print('winsize ok', len(fcntl.ioctl(s, termios.TIOCGWINSZ, b'\\0'*8)))",
    );
    assert!(o.stdout.contains("tiocsti 1"), "{o:?}");
    assert!(o.stdout.contains("tiocsti_high -1 1"), "{o:?}");
    assert!(o.stdout.contains("winsize ok 8"), "other ioctls still work: {o:?}");
    assert!(!o.stdout.contains("INJECTED"));
}

// ---------------------------------------------------------------------------------------------
// 5. Landlock.

#[test]
fn landlock_confines_writes_to_writable_paths() {
    root_only!();
    // As sandbox root, DAC alone would allow creating files at the top of the overlay root;
    // Landlock must refuse.
    let o = sh(
        &["--user", "root"],
        "touch /top 2>&1; touch /etc/new 2>&1; touch /tmp/ok /root/ok /var/tmp/ok && echo ALLOWED",
    );
    assert!(o.stdout.contains("touch: cannot touch '/top': Permission denied"), "{o:?}");
    assert!(o.stdout.contains("touch: cannot touch '/etc/new': Permission denied"), "{o:?}");
    assert!(o.stdout.contains("ALLOWED"), "{o:?}");
    let abi = o.report["landlock_abi"].as_u64();
    assert!(abi.is_some_and(|v| v >= 1), "landlock enforced: {:?}", o.report);
}

// ---------------------------------------------------------------------------------------------
// 6. Privileges, rlimits, environment, descriptors.

#[test]
fn no_new_privs_and_no_capabilities_for_user_processes() {
    root_only!();
    for user in ["user", "root"] {
        let o = sh(
            &["--user", user],
            "grep -E '^(NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb))' /proc/self/status",
        );
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines.len(), 6, "{o:?}");
        for l in lines {
            if l.starts_with("NoNewPrivs") {
                assert!(l.ends_with('1'), "{l}");
            } else {
                assert!(l.ends_with("0000000000000000"), "{user}: {l}");
            }
        }
    }
}

#[test]
fn setuid_binaries_do_not_elevate() {
    root_only!();
    let o = sh(&[], "/usr/bin/su -c id root </dev/null 2>&1; id -u");
    assert!(o.stdout.lines().last() == Some("1000"), "{o:?}");
    assert!(!o.stdout.contains("uid=0"), "{o:?}");
}

#[test]
fn rlimits_are_set() {
    root_only!();
    let o = sh(
        &["--nofile", "512", "--pids", "100"],
        "grep -E '^Max (core file size|open files|processes)' /proc/self/limits",
    );
    let limit = |name: &str| -> Vec<String> {
        let line = o.stdout.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].split_whitespace().take(2).map(str::to_string).collect()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"], "{o:?}");
    assert_eq!(limit("Max open files"), ["512", "512"], "{o:?}");
    assert_eq!(limit("Max processes"), ["100", "100"], "{o:?}");
}

#[test]
fn environment_is_clean() {
    root_only!();
    let out = ringfence()
        .args(["run", "--env", "A=1", "--", "/usr/bin/env"])
        .env("HOST_SECRET", "hunter2")
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('=').next().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["A", "HOME", "LANG", "PATH"]);
}

#[test]
fn only_stdio_is_inherited() {
    root_only!();
    let o = py(&[], "print(sorted(int(f) for f in os.listdir('/proc/self/fd')))");
    // 0-2 plus the descriptor listdir itself holds.
    assert_eq!(o.stdout.trim(), "[0, 1, 2, 3]", "{o:?}");
    let o = sh(&[], "ls /proc/self/fd | wc -l");
    assert_eq!(o.stdout.trim(), "4", "{o:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Limits.

#[test]
fn timeout_kills_the_whole_sandbox() {
    root_only!();
    let t = Instant::now();
    let o = sh(&["--timeout", "1s"], "sleep 4711 & sleep 4712");
    assert_eq!(o.code, 124, "{o:?}");
    assert!(o.stderr.contains("timed out"), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    assert!(host_pids_running("sleep 4711").is_empty(), "background processes must die too");
    assert!(host_pids_running("sleep 4712").is_empty());
}

#[test]
fn output_is_capped_and_truncation_reported() {
    root_only!();
    let o = sh(&["--max-output", "1K"], "head -c 100000 /dev/zero | tr '\\0' a");
    assert_eq!(o.code, 122, "{o:?}");
    assert_eq!(o.stdout.len(), 1024);
    assert!(o.stderr.contains("output limit"), "{o:?}");
    assert_eq!(o.report["output_truncated"]["stdout"], true);
    // Both streams go through one relay: stderr past the cap is cut and reported while
    // stdout, under it, goes on being relayed (what the shell writes after the flood may
    // arrive too: the relay lets go of stderr at the cap, which ends the flood with EPIPE,
    // and the kill lands a moment later).
    let o = sh(
        &["--max-output", "1K"],
        "echo out; head -c 100000 /dev/zero | tr '\\0' e >&2; echo after",
    );
    assert_eq!(o.code, 122, "{o:?}");
    assert!(o.stdout == "out\n" || o.stdout == "out\nafter\n", "{o:?}");
    assert!(o.stderr.starts_with(&"e".repeat(1024)), "{o:?}");
    assert!(o.stderr.contains("stderr exceeded the output limit"), "{o:?}");
    assert_eq!(o.report["output_truncated"]["stderr"], true);
    assert_eq!(o.report["output_truncated"]["stdout"], false);
}

// ---------------------------------------------------------------------------------------------
// Cleanup.

/// Mounts in the host's namespace, less sandbox disks: those of runs in other tests come and
/// go (each is in the host's namespace from its claim until the agent has bound it); what is
/// left of a run's disk is checked in `a_runs_disk_is_removed_with_it_and_gc_sweeps_a_killed_runs`.
/// Host mounts, less those other tests' sandboxes and servers make and remove at any moment
/// (scripts/test.sh runs other test binaries beside this one): sandbox disks (`/disks/`) and
/// the wasm tier's per-server pools (`<run-dir>/wasm/<pid>/pool-<n>`). A one-shot run makes
/// neither of the second kind, and the first is checked by the disk tests.
fn mount_count() -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| !m.contains("/disks/"))
        .filter(|m| {
            let mut parts = m.rsplitn(3, '/');
            let (pool, pid) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let wasm = parts.next().is_some_and(|p| p.ends_with("/wasm"));
            !(wasm && pool.starts_with("pool-") && pid.parse::<u32>().is_ok())
        })
        .count()
}

#[test]
fn nothing_is_left_behind_after_sigkill_of_the_cli() {
    root_only!();
    let mounts = mount_count();
    let running = || host_pids_running("sleep 4821").len() + host_pids_running("sleep 4822").len();
    let mut child = ringfence()
        .args(["run", "--", "/bin/sh", "-c", "sleep 4821 & sleep 4822"])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while running() < 2 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(running(), 2, "sandbox started");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let t = Instant::now();
    while running() > 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(running(), 0, "processes survived the CLI's death");
    assert_eq!(mount_count(), mounts, "no mount leaked into the host namespace");
    // The cgroup slot is free again: a new run claims and uses it.
    assert_eq!(sh(&[], "true").code, 0);
}

#[test]
fn a_failed_setup_leaves_nothing_behind() {
    root_only!();
    let mounts = mount_count();
    // An "agent" that exits at once: the sandbox dies half-created.
    let out = ringfence()
        .args(["run", "--", "true"])
        .env("RINGFENCE_AGENT", "/bin/false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ringfence: sandbox setup failed:"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(mount_count(), mounts);
    // The slot it used is clean and reusable.
    assert_eq!(sh(&[], "echo ok").stdout, "ok\n");
}

#[test]
fn sandboxes_run_concurrently() {
    root_only!();
    let handles: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || sh(&[], &format!("sleep 0.3; echo {i}"))))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let o = h.join().unwrap();
        assert_eq!(o.stdout.trim(), i.to_string(), "{o:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Spawners: sandboxes born in their cgroup slot.

fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn memory_cgroup(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find(|l| l.contains("memory"))
        .unwrap_or_default()
        .to_string()
}

/// A run's sandbox is started by the spawner parked in its cgroup slot (so it is born in the
/// slot and never moved), and nothing made inside a sandbox, root included, can pass for that
/// spawner: cleanup, which spares the spawner, spares nothing of the sandbox's.
#[test]
fn sandboxes_are_born_in_their_slot_by_a_spawner_no_sandbox_process_can_pass_for() {
    root_only!();
    let mut child = ringfence()
        .args(["run", "--user", "root", "--", "/bin/sh", "-c", "sleep 7431.5"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let sleeper = loop {
        if let Some(p) = host_pids_running("sleep 7431.5").first() {
            break *p;
        }
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let shell = ppid(sleeper);
    let agent = ppid(shell);
    let spawner = ppid(agent);
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{spawner}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("--spawner --socket"), "the agent's parent: {cmdline}");
    assert_eq!(memory_cgroup(spawner), memory_cgroup(agent), "born in the spawner's slot");
    assert!(memory_cgroup(agent).contains("ringfence/run-"), "{}", memory_cgroup(agent));
    use ringfence_jail::spawner::is_spawner;
    assert!(is_spawner(spawner));
    for (what, pid) in [("agent", agent), ("root's shell", shell), ("root's command", sleeper)] {
        assert!(!is_spawner(pid), "the sandbox's {what} passes for a spawner");
    }
    // Its socket is host root's alone.
    let socket = cmdline.split_whitespace().last().unwrap().to_string();
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&socket).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600), "{socket}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host_pids_running("sleep 7431.5").is_empty() {
        assert!(Instant::now() < deadline, "the killed run's sandbox is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The spawner stays parked for the slot's next sandbox.
    assert!(std::path::Path::new(&format!("/proc/{spawner}")).exists(), "the spawner went");
}

/// A run answers once its command has exited and the output is in, without waiting for the
/// sandbox's teardown (`Sandbox::let_go`; what that saves is measured in
/// docs/PERFORMANCE.md, not here), yet leaves nothing running: a background process
/// the command left dies with the sandbox within moments, whether or not it held the run's
/// output (output it would write later is not the run's), a denied call made before the exit
/// is still counted, and runs straight after it, on the slot let go of early, all start
/// (a try of this before failed 2 of 40 back-to-back runs with "the agent exited during
/// setup").
#[test]
fn a_run_answering_before_its_teardown_leaves_nothing_running() {
    root_only!();
    let t = Instant::now();
    let o = sh(&[], "sleep 7433.25 </dev/null >/dev/null 2>&1 & sleep 7433.5 & echo started");
    assert_eq!((o.code, o.stdout.as_str()), (0, "started\n"), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "the run waited for its background processes");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host_pids_running("sleep 7433.25").is_empty()
        || !host_pids_running("sleep 7433.5").is_empty()
    {
        assert!(Instant::now() < deadline, "a background process outlived its sandbox");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run(&[], &["/usr/bin/python3", "-c", &format!("{PY_SYSCALL}\nprint(sc(272, 0))")]);
    assert_eq!(o.stdout.trim(), "(-1, 1)", "{o:?}");
    assert!(o.stderr.contains("blocked 1 system call(s): unshare (1)"), "{o:?}");
    for i in 0..40 {
        let o = sh(&[], "echo ok");
        assert_eq!((o.code, o.stdout.as_str()), (0, "ok\n"), "run {i}: {o:?}");
    }
}

/// A slot's spawner forks each sandbox's agent rather than exec'ing it (`spawner::serve`).
/// What a fork would carry over is out of the sandbox's reach: the agent's command line is the
/// exec'd agent's (not the spawner's, with its host paths), and the sandbox's root, the uid the
/// agent runs as, can read none of its memory, maps, environment or descriptors. The old way
/// (`--exec-agent`) runs the same command for comparison: there the descriptor list is open to
/// the sandbox's root, and the assertion on it shows the probe can see what a fork closes.
#[test]
fn a_forked_agent_shows_no_host_path_and_its_memory_is_out_of_reach() {
    root_only!();
    let probe = "tr '\\0' ' ' < /proc/1/cmdline; echo; \
                 for f in mem maps environ auxv; do head -c1 /proc/1/$f >/dev/null 2>&1 && echo READ-$f; done; \
                 ls /proc/1/fd >/dev/null 2>&1 && echo READ-fd; true";
    for user in ["root", "user"] {
        let out = ringfence()
            .args(["run", "-q", "--user", user, "--", "/bin/sh", "-c", probe])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let cmdline = text.lines().next().unwrap_or_default();
        assert_eq!(cmdline.trim_end(), "ringfence-agent --init", "{user}: {text}");
        assert!(!text.contains("READ-"), "{user} reads the forked agent: {text}");
    }
    let out = ringfence()
        .args(["run", "-q", "--exec-agent", "--user", "root", "--", "/bin/sh", "-c", probe])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("READ-fd"), "the probe sees no exec'd agent either: {text}");
}

/// A spawner makes the next sandbox's network namespace only once the sandbox it started has
/// ended: while that lives, a spawner that gave it the namespace made ahead is still in it.
/// (One in `unshare` can wait on the kernel's network mutexes unfrozen, holding up a pause of the
/// slot's sandbox; it used to make the next namespace 10 ms after a request.)
#[test]
fn a_spawner_makes_the_next_network_namespace_only_after_its_sandbox_ended() {
    root_only!();
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    for round in 0..12 {
        // Time for the previous run's spawner to make the next namespace.
        std::thread::sleep(Duration::from_millis(100));
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report.json");
        let tag = format!("read x; exit 0 # 5210.{round}");
        let mut child = ringfence()
            .args(["run", "--report"])
            .arg(&report)
            .args(["--", "/bin/sh", "-c", &tag])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let sleeper = loop {
            if let Some(p) = host_pids_running(&format!("/bin/sh -c {tag}")).first() {
                break *p;
            }
            assert!(Instant::now() < deadline, "the run did not start");
            std::thread::sleep(Duration::from_millis(5));
        };
        let agent = ppid(sleeper);
        let spawner = ppid(agent);
        // Well past the 10 ms after which a spawner used to make the next one.
        std::thread::sleep(Duration::from_millis(60));
        let shared = ns(spawner) == ns(agent);
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let ahead = r["net_made_ahead"] == true;
        // Made in the sandbox's `clone`: the spawner is in its own, older namespace.
        assert_eq!(shared, ahead, "spawner in the sandbox's namespace: {shared}; report: {r}");
        // One run that took it is the case under test; the others (made their own, as under
        // a busy host's other runs) check the converse.
        if ahead {
            return;
        }
    }
    panic!("none of 12 runs took a namespace made ahead");
}

/// A slot's spawner holds nothing of the host's a sandbox could use (its standard streams are
/// `/dev/null`, its other descriptors its own socket and its live sandbox's pidfd), and one that dies is noticed and
/// replaced: the slot's next claimant finds its socket dead and parks a new spawner there.
#[test]
fn a_spawner_holds_no_host_descriptor_and_a_dead_one_is_replaced() {
    root_only!();
    // Commands that end when their stdin closes: the runs end in order, leaving no disk.
    let waiting = |tag: &str| {
        ringfence()
            .args(["run", "--", "/bin/sh", "-c", &format!("read x; exit 0 # {tag}")])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let end = |mut c: std::process::Child| {
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    };
    let child = waiting("7431.75");
    let deadline = Instant::now() + Duration::from_secs(10);
    let sleeper = loop {
        if let Some(p) = host_pids_running("/bin/sh -c read x; exit 0 # 7431.75").first() {
            break *p;
        }
        assert!(Instant::now() < deadline, "the run did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let spawner = ppid(ppid(sleeper));
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{spawner}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("--spawner --socket"), "the agent's parent: {cmdline}");
    let socket = cmdline.split_whitespace().last().unwrap().to_string();
    // Between requests: /dev/null three times, the listening socket and a pidfd of the
    // sandbox it started (it makes the next network namespace once that has ended), nothing
    // else. No sandbox it starts inherits either: each closes all but its own descriptors.
    let mut sockets = 0;
    let agent = ppid(sleeper);
    for e in std::fs::read_dir(format!("/proc/{spawner}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned();
        if target.starts_with("socket:") {
            sockets += 1;
        } else if target == "anon_inode:[pidfd]" {
            let info = std::fs::read_to_string(format!(
                "/proc/{spawner}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            assert!(
                info.lines().any(|l| l.split_whitespace().eq(["Pid:", &agent.to_string()])),
                "a pidfd of another process than its sandbox's agent ({agent}): {info}"
            );
        } else {
            assert_eq!(target, "/dev/null", "the spawner holds fd {:?}", e.file_name());
        }
    }
    assert_eq!(sockets, 1, "the spawner holds more than its own socket");
    // Its mount namespace, which every sandbox's starts as a copy of, is its own and holds
    // only what sandbox setup reaches: no cgroup hierarchy, no other sandbox's disk.
    let mounts = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(ns(&spawner.to_string()), ns("self"), "the spawner shares the host's mounts");
    let theirs = mounts(&spawner.to_string());
    assert!(!theirs.contains(" /sys"), "the spawner keeps /sys mounts: {theirs}");
    assert!(!theirs.contains("/disks/"), "the spawner keeps disk mounts: {theirs}");
    assert!(theirs.lines().count() < mounts("self").lines().count(), "{theirs}");
    // Its death takes no sandbox with it (an agent ends with its host's control channel).
    ringfence_sys::kill(spawner, libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        host_pids_running("/bin/sh -c read x; exit 0 # 7431.75"),
        [sleeper],
        "the sandbox went with its spawner"
    );
    end(child);
    // The slot is free again, and runs claim the lowest free slot: runs kept up one beside
    // the other fill the slots from the bottom until one claims this one (other tests hold
    // slots too), finds its socket dead and parks a new spawner there.
    let spawners =
        || host_pids_running(&format!("{} --spawner --socket {socket}", agent_path().display()));
    let mut held = Vec::new();
    while spawners().is_empty() && held.len() < 24 {
        held.push(waiting("7431.8"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while host_pids_running("/bin/sh -c read x; exit 0 # 7431.8").len() < held.len() {
            assert!(Instant::now() < deadline, "run {} did not start", held.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let new = spawners();
    for c in held {
        end(c);
    }
    assert!(!new.is_empty(), "no new spawner on {socket}");
    assert!(!new.contains(&spawner), "{new:?}");
    assert!(ringfence_jail::spawner::is_spawner(new[0]));
}

/// `ringfence` runs `run` itself and hands every other command, arguments unchanged, to
/// `ringfence-full` beside it (`src/lib.rs` says why): a run needs nothing of the other
/// executable, every other command reaches it, and where it is missing the error names it.
#[test]
fn the_front_runs_run_itself_and_hands_every_other_command_on() {
    root_only!();
    let missing = "/nonexistent/ringfence-full";
    let out = ringfence()
        .env("RINGFENCE_FULL", missing)
        .args(["run", "--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
    let out = ringfence().env("RINGFENCE_FULL", missing).args(["keys", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(missing), "{err}");

    // Handed on: the same answers as `ringfence-full`'s own, under the name `ringfence`
    // (clap names the program after argv[0], which the hand-over keeps).
    let full = env!("CARGO_BIN_EXE_ringfence-full");
    let renamed = |b: &[u8]| String::from_utf8_lossy(b).replace("ringfence-full", "ringfence");
    for args in [&["--version"][..], &["keys", "--help"], &["gc", "--help"], &[]] {
        let front = ringfence().args(args).output().unwrap();
        let direct = Command::new(full).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(front.status.code(), direct.status.code(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&front.stdout), renamed(&direct.stdout), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&front.stderr), renamed(&direct.stderr), "{args:?}");
    }
    let help = ringfence().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for command in ["run", "serve", "template", "keys", "gc"] {
        assert!(help.contains(&format!("  {command} ")), "{command}: {help}");
    }
    // A run in another tier goes through `ringfence-full`, which knows the tiers.
    let out = ringfence()
        .env("RINGFENCE_FULL", missing)
        .args(["run", "--tier", "gvisor", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    // Bad arguments to `run` are refused by the front as `ringfence-full` would.
    let front = ringfence().args(["run", "--memory", "1", "--", "true"]).output().unwrap();
    let direct = Command::new(full)
        .args(["run", "--memory", "1", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(front.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&front.stderr), renamed(&direct.stderr));
}
