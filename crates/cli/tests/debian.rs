//! The Debian base (`ringfence template bootstrap`) end to end: `sudo` reaches the sandbox's
//! own root, which stays unprivileged on the host (the escape attempts of the jail's own tests,
//! run as that root, fail the same way); without the template's flag a setuid binary raises
//! nothing.
//!
//! The base is bootstrapped once per machine (about two minutes, docs/PERFORMANCE.md) into a
//! cached data directory, `RINGFENCE_TEST_DEBIAN_DIR` or /var/cache/ringfence-test/debian, and
//! reused while present. Without debootstrap or the network to the Debian archive, the tests
//! say SKIPPED and why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const TEMPLATE: &str = "debian";

fn cache_dir() -> PathBuf {
    std::env::var_os("RINGFENCE_TEST_DEBIAN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ringfence-test/debian"))
}

fn record_path(data: &Path, name: &str) -> PathBuf {
    data.join("images/templates").join(format!("{name}:latest.json"))
}

/// The data directory holding the bootstrapped base, or why there is none (printed as the
/// SKIPPED reason). Bootstraps at most once per test process.
fn base(test: &str) -> Option<PathBuf> {
    static BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static GATE: Mutex<()> = Mutex::new(());
    if !require_root(test) {
        return None;
    }
    let _g = GATE.lock().unwrap_or_else(|e| e.into_inner());
    let got = BASE.get_or_init(|| {
        let data = cache_dir();
        if record_path(&data, TEMPLATE).is_file() {
            return Ok(data);
        }
        if !Path::new("/usr/sbin/debootstrap").exists() {
            return Err("debootstrap is not installed (scripts/setup.sh installs it)".into());
        }
        let reachable = ("deb.debian.org", 80)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
        if !reachable {
            return Err("the Debian archive (deb.debian.org:80) is not reachable".into());
        }
        let t = Instant::now();
        let out =
            ringfence().args(["template", "bootstrap", "--data-dir"]).arg(&data).output().unwrap();
        assert!(
            out.status.success(),
            "bootstrap failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("bootstrapped the Debian base in {:.1}s", t.elapsed().as_secs_f64());
        Ok(data)
    });
    match got {
        Ok(d) => Some(d.clone()),
        Err(why) => {
            println!("SKIPPED {test}: {why}");
            None
        }
    }
}

fn run_in(data: &Path, template: &str, cmd: &[&str]) -> Out {
    let d = data.to_str().unwrap();
    run(&["--data-dir", d, "--disk-backend", "tmpfs", "--template", template], cmd)
}

#[test]
fn debian_base_has_sudo_to_its_own_root_and_the_tools() {
    let Some(data) = base("debian_base_has_sudo_to_its_own_root_and_the_tools") else { return };
    let o = run_in(
        &data,
        TEMPLATE,
        &[
            "/bin/bash",
            "-c",
            "echo id=$(id -u); echo sudo=$(sudo -n id -u); \
             sudo -n apt-get --version | head -1; \
             python --version; python3 -c 'print(\"py\", 6*7)'; node -e 'console.log(\"node\", 6*7)'; \
             git --version; curl --version | head -1; \
             echo home=$(stat -c %U:%G:%a /home/user); \
             echo sudoers=$(sudo -n stat -c %U:%a /etc/sudoers.d/user); \
             sudo -n sh -c 'echo probe > /usr/local/bin/probe' && cat /usr/local/bin/probe",
        ],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let s = &o.stdout;
    for want in [
        "id=1000\n",
        "sudo=0\n",
        "apt 2.",
        "Python 3.",
        "py 42\n",
        "node 42\n",
        "git version",
        "curl 7.",
        "home=user:user:",
        "sudoers=root:440\n",
        "probe\n",
    ] {
        assert!(s.contains(want), "{want:?} missing: {o:?}");
    }
}

/// Python run as the sandbox's root through sudo, with `sc(nr, *args) -> (ret, errno)`.
fn py_as_root(data: &Path, template: &str, code: &str) -> Out {
    let full = format!("{PY_SYSCALL}\n{code}");
    run_in(data, template, &["sudo", "-n", "/usr/bin/python3", "-c", &full])
}

#[test]
fn escapes_attempted_as_the_sudo_root_fail() {
    let Some(data) = base("escapes_attempted_as_the_sudo_root_fail") else { return };
    // The same calls the jail's own seccomp test makes as `user` (tests/run.rs), now from a
    // root holding every capability it can have here.
    let probes: &[(&str, i64, &str)] = &[
        ("mount", 165, "0, 0, 0, 0, 0"),
        ("unshare", 272, "0x10000000"),
        ("unshare_mnt", 272, "0x00020000"),
        ("setns", 308, "0, 0"),
        ("init_module", 175, "0, 0, 0"),
        ("finit_module", 313, "0, 0, 0"),
        ("delete_module", 176, "0, 0"),
        ("open_by_handle_at", 304, "0, 0, 0"),
        ("ptrace", 101, "16, 1, 0, 0"),
        ("pivot_root", 155, "0, 0"),
        ("chroot", 161, "0"),
        ("kexec_load", 246, "0, 0, 0, 0"),
        ("bpf", 321, "0, 0, 0"),
    ];
    let mut code = String::from(
        "import struct\n\
         print('uid', os.getuid(), os.geteuid())\n\
         st = open('/proc/self/status').read()\n\
         caps = {l.split(':')[0]: int(l.split()[1], 16) for l in st.splitlines() if l.startswith('Cap')}\n\
         print('capeff', hex(caps['CapEff']), 'capbnd', hex(caps['CapBnd']))\n\
         print('seccomp', [l.split()[1] for l in st.splitlines() if l.startswith('Seccomp:')][0])\n\
         print('uid_map', open('/proc/self/uid_map').read().split())\n",
    );
    for (name, nr, args) in probes {
        code.push_str(&format!("r, e = sc({nr}, {args}); print('{name}', r, e)\n"));
    }
    code.push_str(
        "def attempt(name, f):\n\
         \x20   try:\n\
         \x20       f(); print(name, 'OK')\n\
         \x20   except OSError as x:\n\
         \x20       print(name, 'denied', x.errno)\n\
         attempt('proc1_mem', lambda: open('/proc/1/mem', 'rb').read(1))\n\
         attempt('proc1_environ', lambda: open('/proc/1/environ', 'rb').read())\n\
         # Listing PID 1's descriptors shows numbers at most (a forked agent's /proc entries\n\
         # are the host root's: not even that); following one needs ptrace rights.\n\
         try:\n\
         \x20   fd = os.listdir('/proc/1/fd')[-1]\n\
         except OSError:\n\
         \x20   fd = '0'\n\
         attempt('proc1_fd', lambda: open('/proc/1/fd/' + fd, 'rb'))\n\
         attempt('proc1_fd_link', lambda: os.readlink('/proc/1/fd/' + fd))\n\
         attempt('proc1_root', lambda: os.listdir('/proc/1/root/'))\n\
         attempt('proc_sys', lambda: open('/proc/sys/kernel/hostname', 'w').write('x'))\n\
         attempt('mkdir_root', lambda: os.mkdir('/escape-probe'))\n\
         attempt('mknod', lambda: os.mknod('/tmp/sda', 0o600 | 0o060000, os.makedev(8, 0)))\n\
         # capset: raise CAP_SYS_ADMIN (21) into permitted and effective: outside the bounding set.\n\
         hdr = struct.pack('Ii', 0x20080522, 0)\n\
         data = struct.pack('IIIIII', 0x1ff | (1 << 21), 0x1ff | (1 << 21), 0, 0, 0, 0)\n\
         hb = ctypes.create_string_buffer(hdr); db = ctypes.create_string_buffer(data)\n\
         r, e = sc(126, ctypes.addressof(hb), ctypes.addressof(db)); print('capset_raise', r, e)\n\
         # PR_CAP_AMBIENT(47) RAISE(2) CAP_SYS_ADMIN; PR_CAPBSET_READ(23).\n\
         r, e = sc(157, 47, 2, 21, 0, 0); print('ambient_raise', r, e)\n\
         r, e = sc(157, 23, 21, 0, 0, 0); print('bnd_sys_admin', r, e)\n\
         os.kill(1, 9)\n\
         print('alive')\n",
    );
    let o = py_as_root(&data, TEMPLATE, &code);
    let s = &o.stdout;
    assert!(s.contains("alive"), "the sandbox and the process live on: {o:?}");
    assert!(s.contains("uid 0 0"), "sudo gave root: {o:?}");
    // Capabilities: at most the agent's own nine (CHOWN..SETPCAP), and no more reachable.
    assert!(s.contains("capeff 0x1ff capbnd 0x1ff"), "{o:?}");
    assert!(s.contains("seccomp 2"), "seccomp filter still on: {o:?}");
    // The sandbox's root is an unprivileged host uid of the sandbox's own range.
    let map_line = s.lines().find(|l| l.starts_with("uid_map")).unwrap();
    let nums: Vec<u64> = map_line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(nums.len() % 3, 0, "{map_line}");
    for m in nums.chunks(3) {
        assert!(m[1] >= 65536, "no range may map onto host ids below 65536: {map_line}");
        assert!(m[2] <= 65536, "one sandbox's range at most: {map_line}");
    }
    assert_eq!(nums[0], 0, "{map_line}");
    for (name, _, _) in probes {
        let line = s.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        assert_eq!(line, format!("{name} -1 1"), "{name} must fail with EPERM as root: {o:?}");
    }
    for (name, errnos) in [
        ("proc1_mem", &[1, 13][..]),
        ("proc1_environ", &[1, 13]),
        ("proc1_fd", &[1, 13]),
        ("proc1_fd_link", &[1, 13]),
        ("proc1_root", &[1, 13]),
        ("proc_sys", &[13, 30]),
        ("mkdir_root", &[1, 13]),
        ("mknod", &[1]),
    ] {
        let line = s.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        let ok = errnos.iter().any(|e| line == format!("{name} denied {e}"));
        assert!(ok, "{name} must be denied ({errnos:?}), got {line:?}: {o:?}");
    }
    assert!(s.contains("capset_raise -1 1"), "{o:?}");
    assert!(s.contains("ambient_raise -1 1"), "{o:?}");
    assert!(s.contains("bnd_sys_admin 0 0"), "CAP_SYS_ADMIN is outside the bounding set: {o:?}");
    // The host's shadow file is not what the sandbox's root reads at /etc/shadow.
    let inside = run_in(&data, TEMPLATE, &["sudo", "-n", "cat", "/etc/shadow"]);
    assert_eq!(inside.code, 0, "{inside:?}");
    let host = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let host_root = host.lines().find(|l| l.starts_with("root:")).unwrap_or("");
    assert!(
        host_root.is_empty() || !inside.stdout.lines().any(|l| l == host_root),
        "the host's root entry must not be readable inside"
    );
}

#[test]
fn setuid_stays_inert_without_the_templates_flag() {
    let Some(data) = base("setuid_stays_inert_without_the_templates_flag") else { return };
    // The same layer under a second record without `allow_setuid`: the sudo binary (setuid
    // root) is there, the flag is not.
    let name = format!("debian-nosuid-{}", std::process::id());
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record_path(&data, TEMPLATE)).unwrap()).unwrap();
    assert_eq!(rec["allow_setuid"], serde_json::Value::Bool(true), "the base asks for setuid");
    rec["name"] = format!("{name}:latest").into();
    rec.as_object_mut().unwrap().remove("allow_setuid");
    let path = record_path(&data, &name);
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _gone = Gone(path);
    let o = run_in(
        &data,
        &name,
        &[
            "/bin/bash",
            "-c",
            "ls -l /usr/bin/sudo; sudo -n id -u; echo sudo_rc=$?; \
             grep -E 'NoNewPrivs|CapBnd' /proc/self/status; \
             awk '$5 == \"/\" {print \"rootopts\", $6}' /proc/self/mountinfo",
        ],
    );
    let s = &o.stdout;
    assert!(s.contains("-rwsr-xr-x"), "sudo is setuid root in the layer: {o:?}");
    assert!(!s.lines().any(|l| l == "0"), "sudo must not reach root: {o:?}");
    assert!(!s.contains("sudo_rc=0"), "{o:?}");
    assert!(s.contains("NoNewPrivs:\t1"), "{o:?}");
    assert!(s.contains("CapBnd:\t0000000000000000"), "{o:?}");
    let opts = s.lines().find(|l| l.starts_with("rootopts")).unwrap();
    assert!(opts.contains("nosuid"), "{opts}");
}

#[test]
fn bootstrap_refuses_bad_input_and_leaves_nothing() {
    if !require_root("bootstrap_refuses_bad_input_and_leaves_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (args, says) in [
        (&["--packages", "x;rm -rf /"][..], "not a Debian package name"),
        (&["--name", "host"], "built-in template"),
        (&["--suite", "../etc"], "Debian suite name"),
        (&["--mirror", "file:///etc"], "http:// or https://"),
    ] {
        let out = ringfence()
            .args(["template", "bootstrap", "--data-dir", d])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    if !Path::new("/usr/sbin/debootstrap").exists() {
        println!("SKIPPED the failing-mirror half: debootstrap is not installed");
        return;
    }
    // A mirror that refuses connections: debootstrap fails in its first step; nothing is
    // registered, no scratch tree, no layer, no mount is left.
    let out = ringfence()
        .args(["template", "bootstrap", "--data-dir", d, "--mirror", "http://127.0.0.1:9/debian"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("debootstrap failed"), "{err}");
    let count = |sub: &str| std::fs::read_dir(dir.path().join(sub)).map_or(0, |r| r.count());
    assert_eq!(count("images/templates"), 0, "nothing registered");
    assert_eq!(count("images/layers"), 0, "no layer");
    let scratch: Vec<_> = std::fs::read_dir(dir.path().join("images/build"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "no scratch left: {scratch:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(d), "no mount left under the data dir");
}

#[test]
fn ctrl_c_during_bootstrap_leaves_nothing_registered_or_mounted() {
    let test = "ctrl_c_during_bootstrap_leaves_nothing_registered_or_mounted";
    // Needs the archive (debootstrap must be under way when the signal comes).
    if base(test).is_none() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    // A process group of its own, as a terminal's foreground job: ctrl-c reaches all of it.
    // A shell starts its foreground jobs with SIGINT's default action; a test run from a
    // background job (scripts/test.sh's second lane) inherits it ignored, which `env` resets.
    let mut child = std::process::Command::new("env")
        .arg("--default-signal=INT")
        .arg(env!("CARGO_BIN_EXE_ringfence"))
        .env("RINGFENCE_AGENT", env!("CARGO_BIN_EXE_ringfence-agent"))
        .stdin(std::process::Stdio::null())
        .args(["template", "bootstrap", "--data-dir", &d])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Wait until debootstrap has started writing the new root.
    let build = dir.path().join("images/build");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let started = std::fs::read_dir(&build)
            .map(|r| r.flatten().any(|e| e.path().join("rootfs/debootstrap").exists()))
            .unwrap_or(false);
        if started {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "interrupted: {status:?}");
    // Every process of the group is gone (debootstrap included).
    let t = Instant::now();
    while nix::sys::signal::killpg(pgid, None).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(10), "processes of the bootstrap linger");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&d), "no mount left under the data dir");
    let count = |sub: &str| std::fs::read_dir(dir.path().join(sub)).map_or(0, |r| r.count());
    assert_eq!(count("images/templates"), 0, "nothing registered");
    assert_eq!(count("images/layers"), 0, "no layer");
    // The partial tree goes with the next bootstrap (or build), whose scratch sweep finds its
    // lock free; here one that fails at once.
    let out = ringfence()
        .args(["template", "bootstrap", "--data-dir", &d, "--mirror", "http://127.0.0.1:9/debian"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let left: Vec<_> = std::fs::read_dir(&build)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the interrupted scratch tree was swept: {left:?}");
}

/// Whether `host:port` takes a TCP connection within 5 s.
fn reachable(host: &str, port: u16) -> bool {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok())
}

#[test]
fn run_steps_install_from_the_archives_through_the_build_egress_and_nothing_else() {
    let test = "run_steps_install_from_the_archives_through_the_build_egress_and_nothing_else";
    let Some(data) = base(test) else { return };
    for (host, port) in [("deb.debian.org", 80), ("pypi.org", 443), ("registry.npmjs.org", 443)] {
        if !reachable(host, port) {
            println!("SKIPPED {test}: {host}:{port} is not reachable from this host");
            return;
        }
    }
    let ctx = tempfile::tempdir().unwrap();
    // What the Template SDK's apt_install and pip_install run, and npm's registry (npm itself
    // is not in the base; Node's fetch stands in). TLS verification is off for pip and node:
    // some networks (this project's machines) intercept HTTPS with a CA the host trusts and
    // the image does not; the point here is the path out, which the audit trail shows.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM debian\nUSER root\n\
         RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip\n\
         RUN pip install --break-system-packages --no-cache-dir --trusted-host pypi.org \
             --trusted-host files.pythonhosted.org six==1.16.0 && python3 -c 'import six; print(\"six\", six.__version__)'\n\
         RUN NODE_TLS_REJECT_UNAUTHORIZED=0 node -e \"fetch('https://registry.npmjs.org/left-pad').then(r => console.log('npm', r.status))\" 2>/dev/null\n\
         RUN if curl -s -m 5 http://169.254.169.254/; then echo REACH''ED; else echo metadata-blocked; fi; \
             if curl -s -m 5 -o /dev/null http://example.com/; then echo REACH''ED; else echo example-blocked; fi\n",
    )
    .unwrap();
    let name = format!("egress-probe-{}", std::process::id());
    let t = Instant::now();
    let out = ringfence()
        .args(["template", "build", "--disk-backend", "tmpfs", "--name", &name, "-f"])
        .arg(ctx.path().join("Dockerfile"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let took = t.elapsed();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rm = ringfence().args(["template", "rm", &name, "--data-dir"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "{text}");
    assert!(rm.status.success(), "{rm:?}");
    eprintln!("built with apt, pip and the npm registry in {:.1}s", took.as_secs_f64());
    for want in ["six 1.16.0", "npm 200", "metadata-blocked", "example-blocked"] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!text.contains("REACHED"), "{text}");
    // Every connection in the data directory's audit trail, with the template's name.
    let audit = ringfence().args(["audit", "--data-dir"]).arg(&data).output().unwrap();
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["detail"]["template"] == name.as_str())
        .collect();
    let allowed = |host: &str| {
        recs.iter().any(|r| {
            r["detail"]["allowed"] == true
                && r["detail"]["protocol"] == "tcp"
                && r["detail"]["name"] == host
        })
    };
    for host in ["deb.debian.org", "pypi.org", "files.pythonhosted.org", "registry.npmjs.org"] {
        assert!(allowed(host), "{host} not audited as allowed: {recs:#?}");
    }
    assert!(
        recs.iter().any(|r| r["detail"]["allowed"] == false
            && r["detail"]["address"] == "169.254.169.254"),
        "{recs:#?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["detail"]["allowed"] == false && r["detail"]["name"] == "example.com"),
        "{recs:#?}"
    );
}
