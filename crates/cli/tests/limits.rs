//! Kernel resources that every sandbox on a host draws from. Each test lets one sandbox take
//! all it can of one resource and hold it, then checks that another sandbox and the host
//! (root, this test process) still get theirs. Before each sandbox's user namespace had an
//! owner uid of its own, the kernel charged all of them to host root, and the first sandbox to
//! reach a limit took it from everyone.
//!
//! The tests need root; without it each prints SKIPPED and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

macro_rules! root_only {
    () => {
        if !require_root(module_path!()) {
            return;
        }
    };
}

const WAIT: Duration = Duration::from_secs(60);
const EAGAIN: i64 = 11;
const EMFILE: i64 = 24;
const ENOSPC: i64 = 28;
const ENOSYS: i64 = 38;
const EPERM: i64 = 1;
const ETOOMANYREFS: i64 = 109;

/// A sandbox (`ringfence run`) whose program took what it could and now holds it until its
/// stdin closes, which dropping this does.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The program's one-line report of what it took.
    report: String,
    /// A comment unique to this holder's program, to find it among the host's processes.
    marker: String,
}

impl Holder {
    /// Host pid of the holding program, inside the sandbox (found by its marker: the sandbox's
    /// agent is not the `ringfence run` process's child when a spawner started it).
    fn sandbox_pid(&self) -> i32 {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                // The program itself, not the `ringfence run` whose arguments carry it too.
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    c.starts_with(b"/usr/bin/python3\0")
                        && String::from_utf8_lossy(&c).contains(&self.marker)
                })
            })
            .expect("the holding program")
    }

    /// The numbers of the report: "held N ERRNO" gives [N, ERRNO].
    fn numbers(&self) -> Vec<i64> {
        self.report.split_whitespace().skip(1).map(|w| w.parse().unwrap()).collect()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a sandbox running `code` (after [`PY_SYSCALL`]); it must print one line and then
/// read stdin to its end.
fn hold(opts: &[&str], code: &str) -> Holder {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let marker = format!(
        "# holder {} {}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let full = format!("{PY_SYSCALL}\n{code}\n{marker}\n");
    let mut child = ringfence()
        .arg("run")
        .args(opts)
        .args(["--", "/usr/bin/python3", "-c", &full])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let report = rx.recv_timeout(WAIT).expect("the holding sandbox reported").trim().to_string();
    assert!(report.starts_with("held "), "unexpected report {report:?}");
    Holder { child, stdin, report, marker }
}

/// Runs `code` (after [`PY_SYSCALL`]) in host python as this test's user (root), in the host's
/// namespaces.
fn on_host(code: &str) -> String {
    let full = format!("{PY_SYSCALL}\n{code}");
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &full])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "host python failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs `code` in a fresh sandbox and returns its stdout.
fn in_other_sandbox(opts: &[&str], code: &str) -> String {
    let o = py(opts, code);
    assert_eq!(o.code, 0, "{o:?}");
    o.stdout
}

// ---------------------------------------------------------------------------------------------
// inotify.

const INOTIFY_FILL: &str = r#"
n, err = 0, 0
fds = []
while n < 5000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        err = ctypes.get_errno()
        break
    fds.append(fd)
    n += 1
print("held", n, err, flush=True)
sys.stdin.read()
"#;

/// Eight instances, each watching a directory.
const INOTIFY_USE: &str = r#"
for i in range(8):
    fd = libc.inotify_init1(0)
    assert fd >= 0, f"inotify_init1: errno {ctypes.get_errno()}"
    wd = libc.inotify_add_watch(fd, b"/tmp", 0x100)
    assert wd >= 0, f"inotify_add_watch: errno {ctypes.get_errno()}"
print("ok")
"#;

fn inotify_exhaustion_stays_in_its_sandbox(user: &str) {
    let a = hold(&["--user", user], INOTIFY_FILL);
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, EMFILE, "the sandbox must hit its inotify limit: {}", a.report);
    assert!(n <= 128, "a sandbox gets at most 128 inotify instances, got {n}");
    assert_eq!(in_other_sandbox(&[], INOTIFY_USE), "ok\n", "another sandbox lost inotify");
    assert_eq!(on_host(INOTIFY_USE), "ok\n", "host root lost inotify");
    // A process entering the sandbox from the host (as the interpreter fork server's kernels
    // do) is charged to that sandbox's owner, not to host root: it finds the budget used up.
    let entered = on_host(&format!(
        r#"
fd = os.open("/proc/{}/ns/user", os.O_RDONLY)
assert libc.setns(fd, 0x10000000) == 0, f"setns: errno {{ctypes.get_errno()}}"
r = libc.inotify_init1(0)
print(r, ctypes.get_errno())
"#,
        a.sandbox_pid()
    ));
    assert_eq!(entered.trim(), format!("-1 {EMFILE}"), "entering process charged elsewhere");
}

#[test]
fn inotify_instances_exhausted_by_a_user_leave_other_sandboxes_and_the_host_theirs() {
    root_only!();
    inotify_exhaustion_stays_in_its_sandbox("user");
}

#[test]
fn inotify_instances_exhausted_by_root_leave_other_sandboxes_and_the_host_theirs() {
    root_only!();
    inotify_exhaustion_stays_in_its_sandbox("root");
}

#[test]
fn inotify_watches_are_bounded_per_sandbox() {
    root_only!();
    // One watch per inode: 70000 empty files, more than a sandbox user may watch.
    let a = hold(
        &[],
        r#"
os.mkdir("/tmp/w")
fd = libc.inotify_init1(0)
n, err = 0, 0
while n < 70000:
    p = f"/tmp/w/{n}"
    open(p, "w").close()
    if libc.inotify_add_watch(fd, p.encode(), 0x4) < 0:
        err = ctypes.get_errno()
        break
    n += 1
print("held", n, err, flush=True)
sys.stdin.read()
"#,
    );
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, ENOSPC, "the sandbox must hit its watch limit: {}", a.report);
    assert!(n <= 65536, "at most 65536 watches per sandbox user, got {n}");
    assert_eq!(in_other_sandbox(&[], INOTIFY_USE), "ok\n");
    assert_eq!(on_host(INOTIFY_USE), "ok\n");
}

// ---------------------------------------------------------------------------------------------
// POSIX message queues (RLIMIT_MSGQUEUE, charged per user up the namespace chain).

/// `mq_open(name, O_CREAT|O_RDWR, 0600, {maxmsg 10, msgsize 8192})` through the raw syscall
/// (the kernel takes the name without glibc's leading slash).
const MQ_OPEN: &str = r#"
class MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
ATTR = MqAttr(0, 10, 8192, 0)
def mq_open(name):
    buf = ctypes.create_string_buffer(name.encode())
    return sc(240, ctypes.addressof(buf), 0o100 | 2, 0o600, ctypes.addressof(ATTR))
def mq_unlink(name):
    buf = ctypes.create_string_buffer(name.encode())
    return sc(241, ctypes.addressof(buf))
"#;

#[test]
fn message_queue_bytes_exhausted_in_one_sandbox_leave_others_and_the_host_theirs() {
    root_only!();
    let use_one = |name: &str| {
        format!(
            r#"{MQ_OPEN}
r, e = mq_open("{name}")
mq_unlink("{name}")
print("ok" if r >= 0 else f"errno {{e}}")
"#
        )
    };
    // Landlock already refuses to create queues (they are files of the internal mqueue mount,
    // outside every writable path). Hosts without Landlock lack that layer, so the rest of
    // the test runs without it.
    assert_eq!(in_other_sandbox(&[], &use_one("rf-ll")), "errno 13\n", "Landlock lets mq_open by");
    let no_landlock = ["--no-landlock"];
    let a = hold(&no_landlock, &until_refused(MQ_OPEN, r#"mq_open(f"rf-fill-{n}")"#, 256));
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, EMFILE, "the sandbox must hit RLIMIT_MSGQUEUE: {}", a.report);
    assert!(n >= 1, "{}", a.report);
    assert_eq!(
        in_other_sandbox(&no_landlock, &use_one("rf-b")),
        "ok\n",
        "another sandbox lost message queues"
    );
    let name = format!("ringfence-limits-test-{}", std::process::id());
    assert_eq!(on_host(&use_one(&name)), "ok\n", "host root lost message queues");
}

/// A script that, after `setup`, calls `call` (a `(result, errno)` pair) until it fails or
/// `max` times, prints `held N ERRNO` and holds what it got until its stdin closes.
fn until_refused(setup: &str, call: &str, max: u32) -> String {
    format!(
        r#"{setup}
n, err = 0, 0
while n < {max}:
    r, e = {call}
    if r < 0:
        err = e
        break
    n += 1
print("held", n, err, flush=True)
sys.stdin.read()
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Pending signals (RLIMIT_SIGPENDING, charged to the receiver up the namespace chain).

const SIGQUEUE: &str = r#"
import signal
SIG = signal.SIGRTMIN
signal.pthread_sigmask(signal.SIG_BLOCK, [SIG])
libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
def queue():
    ctypes.set_errno(0)
    return libc.sigqueue(os.getpid(), SIG, None), ctypes.get_errno()
"#;

#[test]
fn pending_signals_exhausted_in_one_sandbox_leave_others_and_the_host_theirs() {
    root_only!();
    let a = hold(&[], &until_refused(SIGQUEUE, "queue()", 4000000));
    let [_, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, EAGAIN, "the sandbox must hit RLIMIT_SIGPENDING: {}", a.report);
    let use_some = format!(
        r#"{SIGQUEUE}
bad = [e for r, e in (queue() for _ in range(16)) if r < 0]
print("ok" if not bad else f"errno {{bad[0]}}")
"#
    );
    assert_eq!(in_other_sandbox(&[], &use_some), "ok\n", "another sandbox lost signal queueing");
    assert_eq!(on_host(&use_some), "ok\n", "host root lost signal queueing");
}

// ---------------------------------------------------------------------------------------------
// Pseudo-terminals (one pool for every devpts instance but the host's first).

const PTY_FILL: &str = r#"
n, err = 0, 0
fds = []
while n < 4000:
    try:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    except OSError as e:
        err = e.errno
        break
    n += 1
print("held", n, err, flush=True)
sys.stdin.read()
"#;

#[test]
fn ptys_are_capped_per_sandbox() {
    root_only!();
    let a = hold(&[], PTY_FILL);
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, ENOSPC, "the sandbox must hit its pty cap: {}", a.report);
    assert!(n <= i64::from(ringfence_jail::inside::PTY_MAX), "{}", a.report);
    let use_one = r#"
fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
print("ok")
"#;
    assert_eq!(in_other_sandbox(&[], use_one), "ok\n", "another sandbox lost its ptys");
    assert_eq!(on_host(use_one), "ok\n");
}

// ---------------------------------------------------------------------------------------------
// Descriptors in flight over unix sockets (`unix_inflight`, counted per host uid: every
// sandbox's root is the same one).

#[test]
fn descriptors_in_flight_held_by_one_sandbox_do_not_stop_sandboxes_from_starting() {
    root_only!();
    let a = hold(&["--user", "root"], IN_FLIGHT_FILL);
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, ETOOMANYREFS, "the sandbox must hit the in-flight limit: {}", a.report);
    assert!(n >= 4096, "{}", a.report);
    // Every new sandbox's agent hands its seccomp listener to the host as that same uid.
    // It must still start, and its listener must work: a denied call is reported.
    let o = py(&[], "r, e = sc(165, 0, 0, 0, 0, 0)\nprint(r, e)");
    assert_eq!(o.code, 0, "a sandbox could not start: {o:?}");
    assert_eq!(o.stdout, format!("-1 {EPERM}\n"), "{o:?}");
    assert_eq!(denied(&o), ["mount"], "the seccomp listener did not reach the host: {o:?}");
}

/// Passes one descriptor over a fresh socket pair and prints the errno (0: it went through).
const PASS_ONE_FD: &str = r#"
import socket, array
s, peer = socket.socketpair()
try:
    s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))])
    print(0)
except OSError as e:
    print(e.errno)
"#;

/// Fills the in-flight limit of its user (as many descriptors as the kernel lets it send
/// without anyone receiving them) and holds them.
const IN_FLIGHT_FILL: &str = r#"
import socket, array
s, peer = socket.socketpair()
s.setblocking(False)
fds = array.array("i", [os.open("/dev/null", os.O_RDONLY) for _ in range(200)])
n, err = 0, 0
while n < 100000:
    try:
        s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    except OSError as e:
        err = e.errno
        break
    n += len(fds)
print("held", n, err, flush=True)
sys.stdin.read()
"#;

/// The in-flight count is kept per host uid (the kernel's `user_struct`). With one id range
/// per sandbox, a sandbox's user holding all it may in flight leaves the same user of every
/// other sandbox (and the host) able to pass descriptors: Python's multiprocessing and
/// browsers do it all the time.
fn in_flight_exhaustion_stays_in_its_sandbox(user: &str) {
    let a = hold(&["--user", user], IN_FLIGHT_FILL);
    let [n, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!(err, ETOOMANYREFS, "the sandbox must hit the in-flight limit: {}", a.report);
    assert!(n >= 1024, "{}", a.report);
    assert_eq!(
        in_other_sandbox(&["--user", user], PASS_ONE_FD),
        "0\n",
        "{user} in another sandbox could not pass a descriptor"
    );
    assert_eq!(on_host(PASS_ONE_FD), "0\n");
}

#[test]
fn descriptors_in_flight_held_by_a_sandbox_user_leave_other_sandboxes_theirs() {
    root_only!();
    in_flight_exhaustion_stays_in_its_sandbox("user");
}

#[test]
fn descriptors_in_flight_held_by_a_sandbox_root_leave_other_sandboxes_theirs() {
    root_only!();
    in_flight_exhaustion_stays_in_its_sandbox("root");
}

// ---------------------------------------------------------------------------------------------
// Pipe buffers (`pipe-user-pages-soft`: past it, a user's new pipes get a single page).

#[test]
fn pipe_buffers_taken_by_one_sandbox_leave_other_sandboxes_full_pipes() {
    root_only!();
    let soft: i64 = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if soft == 0 {
        eprintln!("SKIPPED: fs.pipe-user-pages-soft is 0 (no per-user pipe limit on this host)");
        return;
    }
    let fill = format!(
        r#"
import resource, fcntl
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
pipes = []
# Each default pipe charges 16 pages; past the soft limit new pipes get one page.
for _ in range({soft} // 16 + 64):
    r, w = os.pipe()
    pipes.append((r, w))
print("held", len(pipes), fcntl.fcntl(pipes[-1][1], 1032), flush=True)
sys.stdin.read()
"#
    );
    let a = hold(&["--user", "user"], &fill);
    let [n, last] = a.numbers()[..] else { panic!("{}", a.report) };
    assert!(last < 65536, "the filling sandbox should be past its soft limit ({n} pipes): {last}");
    let size = "import fcntl\nr, w = os.pipe()\nprint(fcntl.fcntl(w, 1032))";
    assert_eq!(
        in_other_sandbox(&["--user", "user"], size),
        "65536\n",
        "another sandbox's new pipes shrank"
    );
}

// ---------------------------------------------------------------------------------------------
// Native AIO (fs.aio-max-nr: one host-wide pool with no per-user share).

#[test]
fn native_aio_cannot_drain_the_host_pool() {
    root_only!();
    let setup = r#"
ctx = ctypes.c_ulong(0)
r, e = sc(206, NR, ctypes.addressof(ctx))
"#;
    let a = hold(
        &[],
        &format!(
            "NR = 65536\n{setup}\nprint('held', 1 if r == 0 else 0, e, flush=True)\nsys.stdin.read()\n"
        ),
    );
    let [took, err] = a.numbers()[..] else { panic!("{}", a.report) };
    assert_eq!((took, err), (0, ENOSYS), "io_setup must be unavailable in a sandbox");
    let host = on_host(&format!(
        "NR = 1\n{setup}\nassert r == 0, f'io_setup: errno {{e}}'\nsc(207, ctx.value)\nprint('ok')\n"
    ));
    assert_eq!(host, "ok\n");
}

// ---------------------------------------------------------------------------------------------
// Namespaces.

const USERNS: &str = r#"
r, e = sc(272, 0x10000000)  # unshare(CLONE_NEWUSER)
limits = {n: open(f"/proc/sys/user/{n}").read().strip() for n in sorted(os.listdir("/proc/sys/user"))}
try:
    open("/proc/sys/user/max_user_namespaces", "w").write("10")
    wrote = "wrote"
except OSError as ex:
    wrote = f"refused {ex.errno}"
print(r, e, wrote)
print(limits)
"#;

#[test]
fn nested_user_namespaces_are_refused_by_seccomp_and_by_the_namespace_limit() {
    root_only!();
    for user in ["user", "root"] {
        let o = py(&["--user", user], USERNS);
        let first = o.stdout.lines().next().unwrap_or_default().to_string();
        assert!(first.starts_with(&format!("-1 {EPERM} refused")), "{user}: {o:?}");
        // Without seccomp the namespace's own limit (0) still refuses.
        let o = py(&["--user", user, "--no-seccomp"], USERNS);
        let mut lines = o.stdout.lines();
        let first = lines.next().unwrap_or_default();
        assert!(first.starts_with(&format!("-1 {ENOSPC} refused")), "{user}: {o:?}");
        let limits = lines.next().unwrap_or_default();
        for ns in ["user", "mnt", "pid", "net", "uts", "ipc", "cgroup"] {
            assert!(limits.contains(&format!("'max_{ns}_namespaces': '0'")), "{limits}");
        }
        assert!(limits.contains("'max_inotify_instances': '128'"), "{limits}");
        assert!(limits.contains("'max_inotify_watches': '65536'"), "{limits}");
        assert!(limits.contains("'max_fanotify_groups': '0'"), "{limits}");
    }
}

// ---------------------------------------------------------------------------------------------
// Owner uids, at the library level.

mod owners {
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use ringfence_jail::cgroup::{Layout, Pool};
    use ringfence_jail::launch::{Sandbox, SandboxSpec, Seccomp};
    use ringfence_jail::{ID_RANGE, JailConfig, owner, template};

    fn config() -> JailConfig {
        let mut cfg = JailConfig::with_agent(PathBuf::from(super::agent_path()));
        cfg.data_dir = PathBuf::from("/var/lib/ringfence");
        cfg.run_dir = PathBuf::from("/run/ringfence");
        cfg
    }

    fn start(cfg: &JailConfig, die_with_parent: bool) -> Sandbox {
        let tmpl = template::resolve("host", &cfg.data_dir).expect("template");
        let layout = Layout::detect().expect("cgroup layout");
        let pool = Pool::new(layout, &cfg.cgroup_name, "limitstest", cfg.run_dir.join("cgroups"));
        let null_in = File::open("/dev/null").unwrap();
        let null_out = OpenOptions::new().write(true).open("/dev/null").unwrap();
        let spec = SandboxSpec {
            die_with_parent,
            ..SandboxSpec::new(
                ringfence_jail::new_sandbox_id(),
                tmpl,
                Seccomp::Off,
                [null_in.as_raw_fd(), null_out.as_raw_fd(), null_out.as_raw_fd()],
            )
        };
        Sandbox::start(cfg, Some(&pool), spec).expect("start sandbox")
    }

    fn claim_is_held(cfg: &JailConfig, uid: u32) -> bool {
        let f = File::options()
            .write(true)
            .open(cfg.owner_dir.join(format!("{uid}.lock")))
            .expect("claim file");
        match f.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(e) => panic!("flock: {e}"),
        }
    }

    #[test]
    fn every_sandbox_has_its_own_owner_outside_every_mapped_range() {
        if !super::require_root(module_path!()) {
            return;
        }
        let cfg = config();
        let range = owner::owner_range(cfg.uid_base).unwrap();
        let sandboxes: Vec<Sandbox> = (0..3).map(|_| start(&cfg, false)).collect();
        let owners: Vec<u32> = sandboxes.iter().map(|s| s.owner_uid().expect("owner")).collect();
        // Each sandbox maps its ids onto a host range of its own, as the kernel sees it.
        let bases: Vec<u32> = sandboxes
            .iter()
            .map(|s| {
                let map = std::fs::read_to_string(format!("/proc/{}/uid_map", s.pid)).unwrap();
                let f: Vec<u32> = map.split_whitespace().map(|w| w.parse().unwrap()).collect();
                assert_eq!((f[0], f[2]), (0, ID_RANGE), "{map}");
                assert_eq!(f[1], s.id_base());
                let gid = std::fs::read_to_string(format!("/proc/{}/gid_map", s.pid)).unwrap();
                assert_eq!(gid, map);
                f[1]
            })
            .collect();
        for (i, base) in bases.iter().enumerate() {
            for other in &bases[..i] {
                assert!(base.abs_diff(*other) >= ID_RANGE, "ranges overlap: {bases:?}");
            }
        }
        for (i, uid) in owners.iter().enumerate() {
            assert!(range.contains(uid), "owner {uid} outside {range:?}");
            for base in &bases {
                assert!(!(*base..base + ID_RANGE).contains(uid), "owner {uid} is a sandbox id");
            }
            assert!(!owners[..i].contains(uid), "owners repeat: {owners:?}");
            // Held by the agent alone: this process dropped its copy after the start.
            assert!(claim_is_held(&cfg, *uid), "claim of {uid} not held");
        }
        let first = owners[0];
        drop(sandboxes);
        assert!(!claim_is_held(&cfg, first), "claim of {first} outlived its sandbox");
    }

    /// The kernel clears the parent-death signal on every euid change; the sandbox's first
    /// process must set it after its own, or `die_with_parent` does nothing.
    #[test]
    fn die_with_parent_kills_the_sandbox_when_the_starting_thread_ends() {
        if !super::require_root(module_path!()) {
            return;
        }
        let cfg = config();
        let pid = std::thread::spawn(move || {
            let sandbox = start(&cfg, true);
            let pid = sandbox.pid;
            // Neither killed nor reaped by a drop: only the thread's end may stop it.
            std::mem::forget(sandbox);
            pid
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
            if state == Some("Z") {
                break;
            }
            if Instant::now() > deadline {
                let _ = ringfence_sys::kill(pid, libc::SIGKILL);
                let _ = ringfence_sys::wait4(pid, false);
                panic!("the sandbox outlived the thread that started it (state {state:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let reaped = ringfence_sys::wait4(pid, false).unwrap().unwrap();
        assert_eq!(reaped.outcome(), Err(libc::SIGKILL));
    }
}
