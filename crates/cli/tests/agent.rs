//! The agent's serve mode end to end: a real sandbox started without an initial process, driven
//! over its control channel the way the server will drive it (processes, pipes, PTYs, attach,
//! files, watches), plus its idle footprint and its teardown.
//!
//! Every test starts its own sandbox (cgroup slots under the `test` prefix, apart from the
//! CLI's `run` slots) and needs root; without it each test prints SKIPPED and returns.

// Helpers outside #[test] functions panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::launch::{Sandbox, SandboxSpec, Seccomp};
use ringfence_jail::monitor::Supervisor;
use ringfence_jail::{JailConfig, preflight, seccomp, template};
use ringfence_proto::{
    AgentError, CHUNK, Envelope, ErrorKind, Event, ExitStatus, FileType, FsEventKind, ProtoError,
    Reply, Request, STREAM_SLACK, STREAM_WINDOW, SandboxUser, SpawnSpec, StdioMode, Usage, encode,
    flow_cost, read_frame,
};

macro_rules! root_only {
    () => {
        if !require_root(module_path!()) {
            return;
        }
    };
}

/// Longest any single wait on the agent may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

/// Cgroup slots of these tests, apart from the CLI's `run` prefix.
const POOL_PREFIX: &str = "test";

const USER: SandboxUser = SandboxUser::User;

// ---------------------------------------------------------------------------------------------
// Harness: a serve-mode sandbox and a small blocking client for its control channel.

/// A blocking client of the agent's protocol. Events that are not what a call waits for are
/// kept, in arrival order, for later calls.
#[derive(Debug)]
struct Client {
    stream: UnixStream,
    next_id: u64,
    queue: VecDeque<Event>,
}

/// Everything one process produced, gathered until its `Exited` event.
#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    exit: Option<(u32, ExitStatus, Usage)>,
}

impl Output {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn status(&self) -> ExitStatus {
        self.exit.expect("process has not exited").1
    }
}

/// The request id an event belongs to, for events tied to one request.
fn event_id(ev: &Event) -> Option<u64> {
    match ev {
        Event::Response { id, .. }
        | Event::Stdout { id, .. }
        | Event::Stderr { id, .. }
        | Event::Pty { id, .. }
        | Event::Exited { id, .. } => Some(*id),
        _ => None,
    }
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        stream.set_read_timeout(Some(WAIT)).expect("set read timeout on the control channel");
        // Id 0 is what the agent uses for the initial process; start above it.
        Client { stream, next_id: 1, queue: VecDeque::new() }
    }

    /// Sends `request` and returns its id, without waiting for anything.
    fn send(&mut self, request: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode(&Envelope { id, request }).expect("encode request");
        std::io::Write::write_all(&mut (&self.stream), &bytes).expect("write to the agent");
        id
    }

    /// Reads one event from the channel; `None` when the agent closed it, a panic on timeout.
    fn read_event(&mut self, deadline: Instant) -> Option<Event> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(left)).expect("set read timeout");
        match read_frame::<_, Event>(&mut (&self.stream)) {
            Ok(Some(Event::Log { level, message })) => {
                eprintln!("agent log ({level:?}): {message}");
                self.read_event(deadline)
            }
            Ok(ev) => ev,
            Err(ProtoError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("timed out waiting for the agent; events buffered so far: {:?}", self.queue)
            }
            Err(e) => panic!("reading from the agent failed: {e}"),
        }
    }

    /// Removes and returns the first event (buffered or new) for which `pred` holds, within
    /// `timeout`; `None` if the time passes first. Everything else stays buffered.
    fn try_take(&mut self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        if let Some(i) = self.queue.iter().position(&pred) {
            return self.queue.remove(i);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
            match read_frame::<_, Event>(&mut (&self.stream)) {
                Ok(Some(Event::Log { level, message })) => {
                    eprintln!("agent log ({level:?}): {message}");
                }
                Ok(Some(ev)) if pred(&ev) => return Some(ev),
                Ok(Some(ev)) => self.queue.push_back(ev),
                Ok(None) => panic!("the agent closed the channel; buffered: {:?}", self.queue),
                Err(ProtoError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => panic!("reading from the agent failed: {e}"),
            }
        }
        None
    }

    /// Like [`Client::try_take`], failing the test (with `what`) when nothing matches in time.
    fn take(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        match self.try_take(WAIT, pred) {
            Some(ev) => ev,
            None => panic!("no {what} within {WAIT:?}; buffered events: {:?}", self.queue),
        }
    }

    /// Waits for the response to request `id`.
    fn response(&mut self, id: u64) -> Result<Reply, AgentError> {
        match self.take(
            &format!("response to request {id}"),
            |e| matches!(e, Event::Response { id: i, .. } if *i == id),
        ) {
            Event::Response { result, .. } => result,
            _ => unreachable!(),
        }
    }

    /// Sends `request` and waits for its response.
    fn call(&mut self, request: Request) -> Result<Reply, AgentError> {
        let id = self.send(request);
        self.response(id)
    }

    /// [`Client::call`] for a request that must succeed.
    fn ok(&mut self, request: Request) -> Reply {
        let what = format!("{request:?}");
        self.call(request).unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }

    /// [`Client::call`] for a request that must fail; returns the error kind.
    fn err(&mut self, request: Request) -> AgentError {
        let what = format!("{request:?}");
        match self.call(request) {
            Ok(r) => panic!("{what} should have failed, but got {r:?}"),
            Err(e) => e,
        }
    }

    /// Acknowledges `ev` of subscription `id` as consumed, as the server does.
    fn credit(&mut self, id: u64, ev: &Event) {
        let bytes = flow_cost(ev);
        if bytes > 0 {
            self.send(Request::Credit { id, bytes });
        }
    }

    /// Spawns `spec`, returning (request id, pid).
    fn spawn(&mut self, spec: SpawnSpec) -> (u64, u32) {
        let what = format!("{spec:?}");
        let id = self.send(Request::Spawn(spec));
        match self.response(id) {
            Ok(Reply::Spawned { pid }) => (id, pid),
            other => panic!("spawn {what}: expected Spawned, got {other:?}"),
        }
    }

    /// Collects the output of request `id` until its `Exited` event.
    fn wait_for_exit(&mut self, id: u64) -> Output {
        let mut out = Output::default();
        loop {
            let ev = self.take(&format!("output or exit of request {id}"), |e| {
                matches!(
                    e,
                    Event::Stdout { id: i, .. }
                        | Event::Stderr { id: i, .. }
                        | Event::Pty { id: i, .. }
                        | Event::Exited { id: i, .. }
                        if *i == id
                )
            });
            // Consumed: the agent may send that much more (flow control).
            self.credit(id, &ev);
            match ev {
                Event::Stdout { data, .. } => out.stdout.extend(data),
                Event::Stderr { data, .. } => out.stderr.extend(data),
                Event::Pty { data, .. } => out.pty.extend(data),
                Event::Exited { pid, status, usage, .. } => {
                    out.exit = Some((pid, status, usage));
                    return out;
                }
                _ => unreachable!(),
            }
        }
    }

    /// Gathers the terminal output of request `id` until it contains every one of `needles`.
    fn pty_until(&mut self, id: u64, needles: &[&str]) -> String {
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if needles.iter().all(|n| text.contains(n)) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_take(
                left,
                |e| matches!(e, Event::Pty { id: i, .. } | Event::Exited { id: i, .. } if *i == id),
            ) {
                Some(ev @ Event::Pty { .. }) => {
                    self.credit(id, &ev);
                    if let Event::Pty { data, .. } = ev {
                        got.extend(data);
                    }
                }
                Some(ev) => {
                    panic!("process exited before printing {needles:?}: {ev:?}; saw {text:?}")
                }
                None => panic!("terminal never showed {needles:?} within {WAIT:?}; saw {text:?}"),
            }
        }
    }

    /// Gathers stdout of request `id` until it contains `needle`.
    fn stdout_until(&mut self, id: u64, needle: &str) -> String {
        let mut got = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if text.contains(needle) {
                return text;
            }
            match self.take(&format!("stdout {needle:?} of request {id}"), |e| {
                matches!(e, Event::Stdout { id: i, .. } | Event::Exited { id: i, .. } if *i == id)
            }) {
                ev @ Event::Stdout { .. } => {
                    self.credit(id, &ev);
                    if let Event::Stdout { data, .. } = ev {
                        got.extend(data);
                    }
                }
                ev => panic!("process exited before printing {needle:?}: {ev:?}; saw {text:?}"),
            }
        }
    }

    /// Round-trips a ping, so that every event the agent queued before it has been read.
    fn sync(&mut self) {
        assert_eq!(self.ok(Request::Ping), Reply::Pong);
    }

    /// Buffered events tied to request `id`.
    fn buffered_for(&self, id: u64) -> Vec<&Event> {
        self.queue.iter().filter(|e| event_id(e) == Some(id)).collect()
    }
}

/// A running serve-mode sandbox with its client. Fields drop in order: the client, then the
/// sandbox (killing everything in it), then the seccomp supervisor.
#[derive(Debug)]
struct Harness {
    client: Client,
    sandbox: Sandbox,
    _supervisor: Option<Supervisor>,
}

fn start() -> Harness {
    start_with_layers(Vec::new())
}

fn start_with_layers(layers: Vec<PathBuf>) -> Harness {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_ringfence-agent"));
    preflight::check(&agent, true).expect("preflight");
    let mut cfg = JailConfig::with_agent(agent);
    cfg.data_dir = PathBuf::from("/var/lib/ringfence");
    cfg.run_dir = PathBuf::from("/run/ringfence");
    let tmpl = template::resolve("host", &cfg.data_dir).expect("host template");
    let layout = Layout::detect().expect("cgroup layout");
    let pool = Pool::new(layout, &cfg.cgroup_name, POOL_PREFIX, cfg.run_dir.join("cgroups"));
    let null_in = File::open("/dev/null").expect("open /dev/null");
    let null_out = OpenOptions::new().write(true).open("/dev/null").expect("open /dev/null");
    let id = ringfence_jail::new_sandbox_id();
    let spec = SandboxSpec {
        die_with_parent: true,
        layers,
        ..SandboxSpec::new(
            id.clone(),
            tmpl,
            Seccomp::Compiled(seccomp::default_profile(true).expect("seccomp profile")),
            [null_in.as_raw_fd(), null_out.as_raw_fd(), null_out.as_raw_fd()],
        )
    };
    let mut sandbox = Sandbox::start(&cfg, Some(&pool), spec).expect("start sandbox");
    assert_eq!(sandbox.ready.initial_pid, None, "serve mode starts no initial process");
    let supervisor = sandbox
        .take_listener()
        .map(|l| Supervisor::start(l, id).expect("start seccomp supervisor"));
    let client = Client::new(sandbox.control_clone().expect("clone control channel"));
    Harness { client, sandbox, _supervisor: supervisor }
}

fn spec(cmd: &str, args: &[&str], stdio: StdioMode) -> SpawnSpec {
    SpawnSpec {
        cmd: cmd.into(),
        args: args.iter().map(|a| (*a).to_string()).collect(),
        env: Default::default(),
        cwd: None,
        user: USER,
        stdio,
        tag: None,
    }
}

fn sh(script: &str) -> SpawnSpec {
    sh_with(script, StdioMode::Pipe { stdin: false })
}

fn sh_with(script: &str, stdio: StdioMode) -> SpawnSpec {
    spec("/bin/sh", &["-c", script], stdio)
}

/// Waits (bounded) until the agent has exited, then reaps it through the sandbox.
fn wait_agent_exit(sandbox: &mut Sandbox) -> ringfence_sys::Reaped {
    let deadline = Instant::now() + WAIT;
    loop {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", sandbox.pid)).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("Z") || stat.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "agent {} still running: {stat}", sandbox.pid);
        std::thread::sleep(Duration::from_millis(10));
    }
    sandbox.wait().expect("wait for the agent").expect("the agent was not reaped yet")
}

/// Polls until no host process has exactly this command line.
fn assert_gone_soon(cmdline: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = host_pids_running(cmdline);
        if pids.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{cmdline:?} still running as host pids {pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn ping_pongs() {
    root_only!();
    let mut h = start();
    assert_eq!(h.client.call(Request::Ping), Ok(Reply::Pong));
    // Ids are echoed, not assumed sequential.
    let a = h.client.send(Request::Ping);
    let b = h.client.send(Request::Ping);
    assert_eq!(h.client.response(b), Ok(Reply::Pong));
    assert_eq!(h.client.response(a), Ok(Reply::Pong));
}

#[test]
fn two_processes_stream_separately_tagged_output() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (slow, slow_pid) = c.spawn(sh("sleep 0.2; echo a"));
    let (fast, fast_pid) = c.spawn(sh("echo b; echo err >&2; exit 5"));
    assert_ne!(slow_pid, fast_pid);

    // Both run at once: the fast one is done while the slow one still sleeps.
    let fast_out = c.wait_for_exit(fast);
    assert!(
        c.buffered_for(slow).iter().all(|e| !matches!(e, Event::Exited { .. })),
        "the slow process cannot have exited before the fast one: {:?}",
        c.buffered_for(slow)
    );
    let slow_out = c.wait_for_exit(slow);

    assert_eq!(fast_out.stdout(), "b\n", "{fast_out:?}");
    assert_eq!(fast_out.stderr(), "err\n", "stderr is relayed separately: {fast_out:?}");
    assert!(fast_out.pty.is_empty());
    assert_eq!(fast_out.status(), ExitStatus::Code(5));
    assert_eq!(slow_out.stdout(), "a\n", "{slow_out:?}");
    assert_eq!(slow_out.stderr(), "", "{slow_out:?}");
    assert_eq!(slow_out.status(), ExitStatus::Code(0));
    for (out, pid) in [(&fast_out, fast_pid), (&slow_out, slow_pid)] {
        let (exit_pid, _, usage) = out.exit.unwrap();
        assert_eq!(exit_pid, pid, "Exited names the spawned pid");
        assert!(usage.max_rss_kib > 0, "usage is reported: {usage:?}");
    }
    // Exited came after all output: nothing more arrives for either request.
    c.sync();
    assert!(c.buffered_for(slow).is_empty() && c.buffered_for(fast).is_empty(), "{:?}", c.queue);
}

/// A layer saved from one sandbox (ids in its own host range) and stacked under another (in
/// a different range) shows the same owners inside: layers are stored with canonical ids and
/// mounted through each sandbox's own mapping.
#[test]
fn a_saved_layer_keeps_its_owners_in_a_sandbox_of_another_id_range() {
    root_only!();
    let mut a = start();
    let mut as_root = sh("touch /tmp/by-root && mkdir /tmp/dir-by-root");
    as_root.user = SandboxUser::Root;
    let id = a.client.spawn(as_root).0;
    assert_eq!(a.client.wait_for_exit(id).status(), ExitStatus::Code(0));
    let id = a.client.spawn(sh("echo hi > /home/user/by-user && chmod 640 /home/user/by-user")).0;
    assert_eq!(a.client.wait_for_exit(id).status(), ExitStatus::Code(0));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");
    let upper = a.sandbox.upper_dir().expect("upper layer");
    ringfence_jail::layer::save(&upper, &dest, a.sandbox.id_base()).expect("save layer");
    // On the host: canonical ids, not sandbox a's.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dest.join("home/user/by-user")).unwrap().uid(), 1000);
    assert_eq!(std::fs::metadata(dest.join("tmp/by-root")).unwrap().uid(), 0);
    // `a` still lives, so `b` gets another identity slot.
    let mut b = start_with_layers(vec![dest]);
    assert_ne!(a.sandbox.id_base(), b.sandbox.id_base());
    let id = b
        .client
        .spawn(sh("stat -c '%u:%g %a %n' /home/user/by-user /tmp/by-root /tmp/dir-by-root; cat /home/user/by-user"))
        .0;
    let out = b.client.wait_for_exit(id);
    assert_eq!(
        out.stdout(),
        "1000:1000 640 /home/user/by-user\n0:0 644 /tmp/by-root\n0:0 755 /tmp/dir-by-root\nhi\n",
        "{out:?}"
    );
    // And the user of `b` may change its own file (copy-up through the mapping works).
    let id = b.client.spawn(sh("echo more >> /home/user/by-user && cat /home/user/by-user")).0;
    assert_eq!(b.client.wait_for_exit(id).stdout(), "hi\nmore\n");
}

#[test]
fn stdin_is_written_and_closed() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (id, pid) = c.spawn(spec("cat", &[], StdioMode::Pipe { stdin: true }));
    assert_eq!(c.ok(Request::WriteStdin { pid, data: b"hello\n".to_vec() }), Reply::Done);
    assert_eq!(c.stdout_until(id, "hello\n"), "hello\n");
    assert_eq!(c.ok(Request::WriteStdin { pid, data: b"again\n".to_vec() }), Reply::Done);
    assert_eq!(c.stdout_until(id, "again\n"), "again\n");
    assert_eq!(c.ok(Request::CloseStdin { pid }), Reply::Done);
    let out = c.wait_for_exit(id);
    assert_eq!(out.status(), ExitStatus::Code(0), "cat ends at EOF on stdin: {out:?}");
    assert_eq!(out.stdout(), "", "no output after the echoes: {out:?}");

    // A process spawned without a stdin pipe refuses input.
    let (id, pid) = c.spawn(spec("sleep", &["5"], StdioMode::Pipe { stdin: false }));
    let e = c.err(Request::WriteStdin { pid, data: b"x".to_vec() });
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    c.ok(Request::Signal { pid, signal: libc::SIGKILL });
    assert_eq!(c.wait_for_exit(id).status(), ExitStatus::Signal(libc::SIGKILL));
}

#[test]
fn list_and_signal_processes() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (id, pid) = c.spawn(spec("sleep", &["30"], StdioMode::Pipe { stdin: false }));
    let Reply::Processes(list) = c.ok(Request::ListProcesses) else {
        panic!("ListProcesses did not answer Processes")
    };
    let me = list.iter().find(|p| p.pid == pid).unwrap_or_else(|| panic!("{pid} not in {list:?}"));
    assert_eq!((me.spec.cmd.as_str(), me.spec.args.as_slice()), ("sleep", &["30".to_string()][..]));
    assert_eq!(list.len(), 1, "only the spawned process is listed: {list:?}");

    assert_eq!(c.ok(Request::Signal { pid, signal: libc::SIGKILL }), Reply::Done);
    let out = c.wait_for_exit(id);
    assert_eq!(out.status(), ExitStatus::Signal(libc::SIGKILL), "{out:?}");
    assert_eq!(out.status().shell_code(), 137);

    let Reply::Processes(list) = c.ok(Request::ListProcesses) else { panic!() };
    assert!(list.is_empty(), "an exited process is no longer listed: {list:?}");
    for req in [
        Request::Signal { pid, signal: libc::SIGTERM },
        Request::Signal { pid: 999_999, signal: libc::SIGKILL },
        Request::CloseStdin { pid: 999_999 },
        Request::WriteStdin { pid: 999_999, data: b"x".to_vec() },
        Request::ResizePty { pid: 999_999, cols: 1, rows: 1 },
        Request::Attach { pid: 999_999 },
    ] {
        let what = format!("{req:?}");
        assert_eq!(c.err(req).kind, ErrorKind::NotFound, "{what}");
    }
}

#[test]
fn pty_session_sizes_and_exit_code() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (cmd, args): (&str, &[&str]) = if std::path::Path::new("/bin/bash").exists() {
        ("/bin/bash", &["--norc", "--noprofile", "-i"])
    } else {
        ("/bin/sh", &["-i"])
    };
    let (id, pid) = c.spawn(spec(cmd, args, StdioMode::Pty { cols: 80, rows: 24 }));
    c.ok(Request::WriteStdin { pid, data: b"tty; stty size\n".to_vec() });
    let text = c.pty_until(id, &["/dev/pts/", "24 80"]);
    assert!(!text.contains("not a tty"), "{text:?}");

    // A PTY's size is changed on the fly, and only for PTY processes.
    assert_eq!(c.ok(Request::ResizePty { pid, cols: 100, rows: 30 }), Reply::Done);
    c.ok(Request::WriteStdin { pid, data: b"stty size\n".to_vec() });
    c.pty_until(id, &["30 100"]);

    c.ok(Request::WriteStdin { pid, data: b"exit 3\n".to_vec() });
    let out = c.wait_for_exit(id);
    assert_eq!(out.status(), ExitStatus::Code(3), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "PTY output is Pty events only");

    let (id, pid) = c.spawn(spec("sleep", &["5"], StdioMode::Pipe { stdin: false }));
    let e = c.err(Request::ResizePty { pid, cols: 10, rows: 10 });
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    c.ok(Request::Signal { pid, signal: libc::SIGKILL });
    c.wait_for_exit(id);
}

#[test]
fn attach_gets_output_and_exit_too() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (first, pid) = c.spawn(sh("sleep 0.3; echo late"));
    let second = c.send(Request::Attach { pid });
    assert_eq!(c.response(second), Ok(Reply::Spawned { pid }));
    let a = c.wait_for_exit(first);
    let b = c.wait_for_exit(second);
    for (who, out) in [("spawner", &a), ("attacher", &b)] {
        assert_eq!(out.stdout(), "late\n", "{who}: {out:?}");
        assert_eq!(out.status(), ExitStatus::Code(0), "{who}: {out:?}");
        assert_eq!(out.exit.unwrap().0, pid, "{who}");
    }
}

#[test]
fn file_operations() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let file = "/home/user/dir/a.txt";
    let body = b"hello, sandbox\n".to_vec();

    // Write creates missing parents; read returns the bytes.
    let Reply::Entry(e) =
        c.ok(Request::WriteFile { path: file.into(), user: USER, offset: 0, data: body.clone() })
    else {
        panic!("WriteFile answers Entry")
    };
    assert_eq!((e.path.as_str(), e.size), (file, body.len() as u64));
    assert_eq!(
        c.ok(Request::ReadFile { path: file.into(), user: USER, offset: 0 }),
        Reply::Data { data: body.clone(), eof: true }
    );
    // Relative paths are the user's home.
    assert_eq!(
        c.ok(Request::ReadFile { path: "dir/a.txt".into(), user: USER, offset: 0 }),
        Reply::Data { data: body.clone(), eof: true }
    );

    let Reply::Entry(st) = c.ok(Request::Stat { path: file.into(), user: USER }) else { panic!() };
    assert_eq!((st.kind, st.size, st.uid, st.gid), (FileType::File, body.len() as u64, 1000, 1000));
    assert_eq!((st.name.as_str(), st.mode), ("a.txt", 0o644));
    let Reply::Entry(dir) = c.ok(Request::Stat { path: "/home/user/dir".into(), user: USER })
    else {
        panic!()
    };
    assert_eq!((dir.kind, dir.uid), (FileType::Directory, 1000), "created parents are the user's");

    let Reply::Entries(list) =
        c.ok(Request::ListDir { path: "/home/user".into(), user: USER, depth: 2 })
    else {
        panic!()
    };
    let paths: Vec<&str> = list.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"/home/user/dir"), "{paths:?}");
    assert!(paths.contains(&file), "{paths:?}");
    let Reply::Entries(shallow) =
        c.ok(Request::ListDir { path: "/home/user".into(), user: USER, depth: 1 })
    else {
        panic!()
    };
    assert!(!shallow.iter().any(|e| e.path == file), "depth 1 stays at the top: {shallow:?}");

    assert_eq!(
        c.err(Request::MakeDir { path: "/home/user/dir".into(), user: USER }).kind,
        ErrorKind::AlreadyExists
    );
    let Reply::Entry(made) = c.ok(Request::MakeDir { path: "/home/user/m/n".into(), user: USER })
    else {
        panic!()
    };
    assert_eq!((made.kind, made.uid), (FileType::Directory, 1000));

    // Rename: the new path exists with the same bytes, the old one is gone.
    let renamed = "/home/user/dir/b.txt";
    c.ok(Request::Rename { from: file.into(), to: renamed.into(), user: USER });
    assert_eq!(c.err(Request::Stat { path: file.into(), user: USER }).kind, ErrorKind::NotFound);
    assert_eq!(
        c.ok(Request::ReadFile { path: renamed.into(), user: USER, offset: 0 }),
        Reply::Data { data: body, eof: true }
    );
    assert_eq!(c.ok(Request::Remove { path: renamed.into(), user: USER }), Reply::Done);
    assert_eq!(c.err(Request::Stat { path: renamed.into(), user: USER }).kind, ErrorKind::NotFound);
    assert_eq!(
        c.err(Request::ReadFile { path: renamed.into(), user: USER, offset: 0 }).kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        c.err(Request::Remove { path: renamed.into(), user: USER }).kind,
        ErrorKind::NotFound
    );

    // 2.5 MiB in 1 MiB chunks, read back chunk by chunk until eof.
    let big = "/home/user/big.bin";
    let data: Vec<u8> = (0..(5 * CHUNK / 2)).map(|i| (i * 7 % 251) as u8).collect();
    for (n, chunk) in data.chunks(CHUNK).enumerate() {
        let offset = (n * CHUNK) as u64;
        let Reply::Entry(e) =
            c.ok(Request::WriteFile { path: big.into(), user: USER, offset, data: chunk.to_vec() })
        else {
            panic!()
        };
        assert_eq!(e.size, offset + chunk.len() as u64);
    }
    let mut back = Vec::new();
    let mut reads = 0;
    loop {
        let offset = back.len() as u64;
        let Reply::Data { data: part, eof } =
            c.ok(Request::ReadFile { path: big.into(), user: USER, offset })
        else {
            panic!()
        };
        assert!(part.len() <= CHUNK);
        back.extend(part);
        reads += 1;
        if eof {
            break;
        }
        assert!(reads < 10, "ReadFile never reported eof");
    }
    assert_eq!(reads, 3, "2.5 chunks take three reads");
    assert!(back == data, "read back {} bytes, wrote {}; contents differ", back.len(), data.len());

    // Outside the writable paths nothing is written, even as the sandbox's root.
    for path in ["/usr/bin/x", "/etc/ringfence-test"] {
        let e = c.err(Request::WriteFile {
            path: path.into(),
            user: SandboxUser::Root,
            offset: 0,
            data: b"x".to_vec(),
        });
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{path}: {e}");
        assert_eq!(
            c.err(Request::Stat { path: path.into(), user: SandboxUser::Root }).kind,
            ErrorKind::NotFound,
            "{path} must not have been created"
        );
    }
}

#[test]
fn spawn_errors_are_typed() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let e = c.err(Request::Spawn(spec("no-such-cmd", &[], StdioMode::Pipe { stdin: false })));
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("no-such-cmd"), "{e}");
    let mut bad_cwd = sh("true");
    bad_cwd.cwd = Some("/nonexistent".into());
    let e = c.err(Request::Spawn(bad_cwd));
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(e.message.contains("/nonexistent"), "{e}");
    let e = c.err(Request::Spawn(spec("", &[], StdioMode::Pipe { stdin: false })));
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    // A failed spawn leaves nothing behind and the agent keeps serving.
    let Reply::Processes(list) = c.ok(Request::ListProcesses) else { panic!() };
    assert!(list.is_empty(), "{list:?}");
    c.sync();
}

#[test]
fn watch_reports_changes_until_unwatched() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let Reply::Watching { watch } =
        c.ok(Request::Watch { path: "/home/user".into(), user: USER, recursive: true })
    else {
        panic!("Watch answers Watching")
    };
    let (id, _) = c.spawn(sh("mkdir -p /home/user/w && echo x > /home/user/w/f"));
    assert_eq!(c.wait_for_exit(id).status(), ExitStatus::Code(0));
    let got = c.try_take(Duration::from_secs(2), |e| {
        matches!(e, Event::Fs { watch: w, name, kind: FsEventKind::Create } if *w == watch && name == "w/f")
    });
    let seen: Vec<&Event> = c.queue.iter().filter(|e| matches!(e, Event::Fs { .. })).collect();
    assert!(got.is_some(), "no Create of w/f within 2 s; other fs events: {seen:?}");
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Fs { name, kind: FsEventKind::Create, .. } if name == "w")),
        "the new directory is reported too: {seen:?}"
    );

    assert_eq!(c.ok(Request::Unwatch { watch }), Reply::Done);
    c.queue.retain(|e| !matches!(e, Event::Fs { .. }));
    c.ok(Request::WriteFile {
        path: "/home/user/w/g".into(),
        user: USER,
        offset: 0,
        data: b"y".to_vec(),
    });
    let late = c.try_take(Duration::from_millis(300), |e| matches!(e, Event::Fs { .. }));
    assert!(late.is_none(), "events after Unwatch: {late:?}");
    assert_eq!(c.err(Request::Unwatch { watch }).kind, ErrorKind::NotFound);

    let e = c.err(Request::Watch { path: "/home/user/nope".into(), user: USER, recursive: false });
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
}

#[test]
fn idle_agent_is_small() {
    root_only!();
    let mut h = start();
    h.client.sync();
    std::thread::sleep(Duration::from_millis(200));
    let pid = h.sandbox.pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let pick = |text: &str, prefixes: &[&str]| -> Vec<String> {
        text.lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let status_lines = pick(&status, &["VmRSS:", "RssAnon:", "RssFile:", "VmHWM:", "Threads:"]);
    let rollup_lines = pick(&rollup, &["Rss:", "Pss", "Private_"]);
    eprintln!("agent idle memory: {}; {}", status_lines.join(", "), rollup_lines.join(", "));
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<agent>/status");
    assert!(rss_kib < 16 * 1024, "idle agent VmRSS is {rss_kib} KiB, over 16 MiB");
    // Still serving after the measurement.
    h.client.sync();
}

#[test]
fn dropping_the_sandbox_kills_everything() {
    root_only!();
    let mut h = start();
    let (_, _) = h.client.spawn(spec("sleep", &["4931"], StdioMode::Pipe { stdin: false }));
    let (_, _) = h.client.spawn(spec(
        "/bin/sh",
        &["-c", "sleep 4931; true"],
        StdioMode::Pty { cols: 80, rows: 24 },
    ));
    let deadline = Instant::now() + WAIT;
    while host_pids_running("sleep 4931").len() < 2 {
        assert!(Instant::now() < deadline, "the sleeps never showed up on the host");
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = h.sandbox.pid;
    drop(h);
    assert_gone_soon("sleep 4931");
    assert!(
        !std::path::Path::new(&format!("/proc/{agent}")).exists()
            || std::fs::read_to_string(format!("/proc/{agent}/cmdline")).unwrap_or_default()
                != "ringfence-agent\0--init\0",
        "the agent {agent} is gone"
    );
}

#[test]
fn host_closing_the_channel_ends_the_sandbox() {
    root_only!();
    let mut h = start();
    h.client.spawn(spec("sleep", &["4932"], StdioMode::Pipe { stdin: false }));
    // The agent serves until the host closes its end: shut the socket down (this affects every
    // handle to it, the sandbox's own included).
    h.sandbox.control().shutdown(Shutdown::Write).expect("shutdown control channel");
    let r = wait_agent_exit(&mut h.sandbox);
    assert_eq!(r.outcome(), Ok(0), "the agent exits cleanly when the host hangs up");
    assert!(h.client.read_event(Instant::now() + WAIT).is_none(), "the channel is closed");
    assert_gone_soon("sleep 4932");
}

#[test]
fn killing_the_agent_is_observed() {
    root_only!();
    let mut h = start();
    h.client.spawn(spec("sleep", &["4933"], StdioMode::Pipe { stdin: false }));
    h.sandbox.kill();
    let r = wait_agent_exit(&mut h.sandbox);
    assert_eq!(r.outcome(), Err(libc::SIGKILL), "wait status {:#x}", r.status);
    assert!(h.client.read_event(Instant::now() + WAIT).is_none(), "EOF after the agent died");
    assert_gone_soon("sleep 4933");
    // A second wait has nothing left to reap.
    assert!(h.sandbox.wait().expect("second wait").is_none());
}

#[test]
fn blocked_stdin_write_does_not_stall_the_agent() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    for stdio in [StdioMode::Pipe { stdin: true }, StdioMode::Pty { cols: 80, rows: 24 }] {
        // `sleep` never reads its input: a write larger than the pipe (or terminal) buffer
        // cannot complete while it lives. A terminal in canonical mode would drop what does
        // not fit, so it is put in raw mode first.
        let (id, pid) = c.spawn(sh_with("stty raw -echo 2>/dev/null; exec sleep 30", stdio));
        if matches!(stdio, StdioMode::Pty { .. }) {
            // Let `stty` take effect before writing.
            std::thread::sleep(Duration::from_millis(200));
        }
        let write = c.send(Request::WriteStdin { pid, data: vec![b'x'; 1 << 20] });
        let ping = c.send(Request::Ping);
        let pong = c.try_take(
            Duration::from_secs(2),
            |e| matches!(e, Event::Response { id, .. } if *id == ping),
        );
        assert!(pong.is_some(), "{stdio:?}: the agent stopped answering behind a blocked write");
        assert_eq!(c.ok(Request::Signal { pid, signal: libc::SIGKILL }), Reply::Done, "{stdio:?}");
        assert_eq!(c.wait_for_exit(id).status(), ExitStatus::Signal(libc::SIGKILL), "{stdio:?}");
        // The write is answered too, with an error: its reader is gone.
        let e = c.response(write).expect_err("a write to a dead process cannot succeed");
        eprintln!("{stdio:?}: blocked write ended with {e}");
    }
}

#[test]
fn queued_stdin_writes_keep_their_order_and_close_comes_last() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (id, pid) = c.spawn(spec("cat", &[], StdioMode::Pipe { stdin: true }));
    // Several writes, each beyond the pipe buffer, sent without waiting, then the close.
    let parts: Vec<Vec<u8>> = (0..4u8).map(|n| vec![b'a' + n; 300 * 1024]).collect();
    let writes: Vec<u64> =
        parts.iter().map(|p| c.send(Request::WriteStdin { pid, data: p.clone() })).collect();
    let close = c.send(Request::CloseStdin { pid });
    let out = c.wait_for_exit(id);
    assert_eq!(out.status(), ExitStatus::Code(0), "cat saw EOF after the data");
    assert!(
        out.stdout == parts.concat(),
        "cat echoed {} bytes, out of order or cut",
        out.stdout.len()
    );
    for w in writes {
        assert_eq!(c.response(w), Ok(Reply::Done));
    }
    assert_eq!(c.response(close), Ok(Reply::Done));
}

// ---------------------------------------------------------------------------------------------
// Flow control (issue 12, finding 3) and atomic uploads (finding 7).

/// Stdout bytes of subscription `id` that arrive within `window` without any credit.
fn stdout_without_credit(c: &mut Client, id: u64, window: Duration) -> usize {
    let mut got = 0;
    let deadline = Instant::now() + window;
    while let Some(ev) = c.try_take(
        deadline.saturating_duration_since(Instant::now()),
        |e| matches!(e, Event::Stdout { id: i, .. } | Event::Exited { id: i, .. } if *i == id),
    ) {
        match ev {
            Event::Stdout { data, .. } => got += data.len(),
            ev => panic!("the process finished although nobody read its output: {ev:?}"),
        }
    }
    got
}

fn running(c: &mut Client, pid: u32) -> bool {
    match c.ok(Request::ListProcesses) {
        Reply::Processes(list) => list.iter().any(|p| p.pid == pid),
        other => panic!("ListProcesses answered {other:?}"),
    }
}

#[test]
fn unread_output_stops_at_the_window_and_resumes_with_credit() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let total = 8_000_000usize;
    let (id, pid) = c.spawn(sh(&format!("head -c {total} /dev/zero; echo end >&2")));
    // Nobody acknowledges: the agent stops at the window, the process blocks on its pipe.
    let got = stdout_without_credit(c, id, Duration::from_millis(1500));
    let cap = (STREAM_WINDOW + STREAM_SLACK) as usize;
    assert!(got <= cap, "{got} bytes sent without credit (window {STREAM_WINDOW})");
    assert!(got > 0, "the window lets output through before any credit");
    assert!(running(c, pid), "the writer waits on its full pipe");
    // One stalled stream does not stall the sandbox's others.
    let (other, _) = c.spawn(sh("echo other"));
    assert_eq!(c.wait_for_exit(other).stdout(), "other\n");
    // Credit what was taken; from then on every byte arrives, then the exit.
    c.send(Request::Credit { id, bytes: got as u64 });
    let out = c.wait_for_exit(id);
    assert_eq!(out.stdout.len() + got, total);
    assert!(out.stdout.iter().all(|b| *b == 0));
    assert_eq!(out.stderr(), "end\n");
    assert_eq!(out.status(), ExitStatus::Code(0));
}

#[test]
fn a_slow_attach_holds_the_process_and_detaching_frees_it() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let (id, pid) = c.spawn(sh("head -c 4000000 /dev/zero; sleep 0.2; echo done"));
    // A second subscriber that never reads holds the output back for both, as envd's
    // blocking fan-out does.
    let attach = c.send(Request::Attach { pid });
    assert_eq!(c.response(attach), Ok(Reply::Spawned { pid }));
    let got = stdout_without_credit(c, attach, Duration::from_millis(1000));
    assert!(got <= (STREAM_WINDOW + STREAM_SLACK) as usize, "{got} bytes without credit");
    assert!(running(c, pid));
    // Once it detaches (its client went away), it holds nothing back; the process runs to
    // its end and the detached subscriber still hears of the exit.
    c.send(Request::Detach { id: attach });
    let out = c.wait_for_exit(id);
    assert!(out.stdout.ends_with(b"done\n"), "{} bytes", out.stdout.len());
    assert_eq!(out.status(), ExitStatus::Code(0));
    let exited = c.take(
        "exit of the detached subscriber",
        |e| matches!(e, Event::Exited { id: i, .. } if *i == attach),
    );
    assert!(matches!(exited, Event::Exited { status: ExitStatus::Code(0), .. }));
    // Nothing more arrived for it past what was in flight when it detached.
    let late: usize = c
        .buffered_for(attach)
        .iter()
        .map(|e| match e {
            Event::Stdout { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert!(got + late <= (STREAM_WINDOW + STREAM_SLACK) as usize, "{late} bytes after detach");
}

#[test]
fn unread_watch_events_stay_in_the_kernel() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    c.ok(Request::MakeDir { path: "/tmp/wf".into(), user: USER });
    let Reply::Watching { watch } =
        c.ok(Request::Watch { path: "/tmp/wf".into(), user: USER, recursive: false })
    else {
        panic!("Watch answers Watching")
    };
    let (id, _) = c.spawn(sh("cd /tmp/wf && for i in $(seq 20000); do : > f$i; done; echo made"));
    assert_eq!(c.wait_for_exit(id).stdout(), "made\n");
    c.sync();
    let mut cost = 0;
    while let Some(ev) = c.try_take(Duration::from_millis(300), |e| matches!(e, Event::Fs { .. })) {
        cost += flow_cost(&ev);
    }
    assert!(cost > 0, "events flow before any credit");
    assert!(cost <= STREAM_WINDOW + STREAM_SLACK, "{cost} bytes of events without credit");
    // Credit brings more.
    c.send(Request::WatchCredit { watch, bytes: STREAM_WINDOW });
    let more = c.try_take(Duration::from_secs(2), |e| matches!(e, Event::Fs { .. }));
    assert!(more.is_some(), "credit lets the watch go on");
    c.ok(Request::Unwatch { watch });
}

fn listing(c: &mut Client, dir: &str) -> Vec<String> {
    match c.ok(Request::ListDir { path: dir.into(), user: USER, depth: 1 }) {
        Reply::Entries(list) => list.into_iter().map(|e| e.name).collect(),
        other => panic!("ListDir answered {other:?}"),
    }
}

fn read_all(c: &mut Client, path: &str) -> Vec<u8> {
    match c.ok(Request::ReadFile { path: path.into(), user: USER, offset: 0 }) {
        Reply::Data { data, .. } => data,
        other => panic!("ReadFile answered {other:?}"),
    }
}

fn begin(c: &mut Client, path: &str, user: SandboxUser) -> u64 {
    match c.ok(Request::UploadBegin { path: path.into(), user }) {
        Reply::Upload { upload, free, path: p } => {
            assert!(free > 0, "free space is reported");
            assert!(p.starts_with('/'), "the target comes back resolved: {p}");
            upload
        }
        other => panic!("UploadBegin answered {other:?}"),
    }
}

#[test]
fn uploads_replace_their_target_whole_or_not_at_all() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    // An existing file, owned by root with its own mode.
    let mut as_root = sh("mkdir -p /tmp/up && printf old > /tmp/up/t && chmod 600 /tmp/up/t");
    as_root.user = SandboxUser::Root;
    let (id, _) = c.spawn(as_root);
    assert_eq!(c.wait_for_exit(id).status(), ExitStatus::Code(0));

    // Mid-upload the target is untouched and nothing else is visible in its directory.
    let up = begin(c, "/tmp/up/t", USER);
    c.ok(Request::UploadWrite { upload: up, offset: 0, data: b"new ".to_vec() });
    assert_eq!(read_all(c, "/tmp/up/t"), b"old");
    assert_eq!(listing(c, "/tmp/up"), ["t"]);
    // A piece out of order is refused, not written at the wrong place.
    let e = c.err(Request::UploadWrite { upload: up, offset: 99, data: b"x".to_vec() });
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    c.ok(Request::UploadWrite { upload: up, offset: 4, data: b"content".to_vec() });
    let meta = std::collections::BTreeMap::from([("k".to_string(), "v".to_string())]);
    let Reply::Entry(e) = c.ok(Request::UploadCommit { upload: up, metadata: meta.clone() }) else {
        panic!("UploadCommit answers Entry")
    };
    assert_eq!(read_all(c, "/tmp/up/t"), b"new content");
    // The replaced file's owner and mode are kept; the metadata is the upload's.
    assert_eq!((e.uid, e.mode, e.size, e.metadata), (0, 0o600, 11, meta));
    assert_eq!(listing(c, "/tmp/up"), ["t"]);
    // Committed once: the handle is gone.
    let e = c.err(Request::UploadCommit { upload: up, metadata: Default::default() });
    assert_eq!(e.kind, ErrorKind::NotFound);

    // An aborted upload leaves an existing target as it was and creates no new one.
    let up = begin(c, "/tmp/up/t", USER);
    c.ok(Request::UploadWrite { upload: up, offset: 0, data: vec![b'z'; 3 << 20] });
    c.ok(Request::UploadAbort { upload: up });
    assert_eq!(read_all(c, "/tmp/up/t"), b"new content");
    let up = begin(c, "/tmp/up/fresh/n", USER);
    c.ok(Request::UploadWrite { upload: up, offset: 0, data: b"partial".to_vec() });
    c.ok(Request::UploadAbort { upload: up });
    assert_eq!(listing(c, "/tmp/up/fresh"), Vec::<String>::new());
    assert_eq!(listing(c, "/tmp/up"), ["fresh", "t"]);

    // A new file belongs to the uploading user, 0644; an empty one is still created.
    let up = begin(c, "/tmp/up/fresh/n", USER);
    let Reply::Entry(e) = c.ok(Request::UploadCommit { upload: up, metadata: Default::default() })
    else {
        panic!()
    };
    assert_eq!((e.uid, e.gid, e.mode, e.size), (1000, 1000, 0o644, 0));

    // A symlink at the target is followed, as a write through it would be.
    let mut link = sh("ln -s /tmp/up/t /tmp/up/link");
    link.user = SandboxUser::Root;
    let (id, _) = c.spawn(link);
    assert_eq!(c.wait_for_exit(id).status(), ExitStatus::Code(0));
    let up = begin(c, "/tmp/up/link", USER);
    c.ok(Request::UploadWrite { upload: up, offset: 0, data: b"via link".to_vec() });
    c.ok(Request::UploadCommit { upload: up, metadata: Default::default() });
    assert_eq!(read_all(c, "/tmp/up/t"), b"via link");
    let Reply::Entry(l) = c.ok(Request::Stat { path: "/tmp/up/link".into(), user: USER }) else {
        panic!()
    };
    assert_eq!(l.kind, FileType::Symlink, "the link itself stays a link");

    // What cannot be replaced by a file is refused up front.
    let e = c.err(Request::UploadBegin { path: "/tmp/up".into(), user: USER });
    assert_eq!(e.kind, ErrorKind::IsADirectory);
    let e = c.err(Request::UploadBegin { path: "/dev/null".into(), user: USER });
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    let e = c.err(Request::UploadWrite { upload: 9999, offset: 0, data: vec![] });
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(listing(c, "/tmp/up"), ["fresh", "link", "t"]);
}

#[test]
fn uploads_in_progress_are_bounded() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    let uploads: Vec<u64> = (0..64).map(|i| begin(c, &format!("/tmp/many/{i}"), USER)).collect();
    let e = c.err(Request::UploadBegin { path: "/tmp/many/x".into(), user: USER });
    assert_eq!(e.kind, ErrorKind::NoSpace, "{e}");
    assert!(e.message.contains("too many uploads"), "{e}");
    for u in uploads {
        c.ok(Request::UploadAbort { upload: u });
    }
    assert_eq!(listing(c, "/tmp/many"), Vec::<String>::new());
    // Room again.
    let u = begin(c, "/tmp/many/x", USER);
    c.ok(Request::UploadAbort { upload: u });
}

/// Every `Fs` event of `watch` until a ping answers (the agent flushes watches first).
fn fs_events(c: &mut Client, watch: u64) -> Vec<(String, FsEventKind)> {
    c.sync();
    let mut out = Vec::new();
    while let Some(Event::Fs { name, kind, .. }) = c.try_take(
        Duration::from_millis(200),
        |e| matches!(e, Event::Fs { watch: w, .. } if *w == watch),
    ) {
        out.push((name, kind));
    }
    out
}

#[test]
fn a_watch_sees_an_upload_as_a_write_and_never_its_temporary_name() {
    root_only!();
    let mut h = start();
    let c = &mut h.client;
    c.ok(Request::MakeDir { path: "/tmp/wu".into(), user: USER });
    let Reply::Watching { watch } =
        c.ok(Request::Watch { path: "/tmp/wu".into(), user: USER, recursive: false })
    else {
        panic!("Watch answers Watching")
    };
    let upload = |c: &mut Client, data: &[u8]| {
        let up = begin(c, "/tmp/wu/f", USER);
        if !data.is_empty() {
            c.ok(Request::UploadWrite { upload: up, offset: 0, data: data.to_vec() });
        }
        c.ok(Request::UploadCommit { upload: up, metadata: Default::default() });
    };
    // A new file: created, given its owner, written, as an in-place write reports it.
    upload(c, b"one");
    let f = |k: FsEventKind| ("f".to_string(), k);
    assert_eq!(
        fs_events(c, watch),
        [f(FsEventKind::Create), f(FsEventKind::Chmod), f(FsEventKind::Write)]
    );
    // Replacing it: a write.
    upload(c, b"two");
    assert_eq!(fs_events(c, watch), [f(FsEventKind::Write)]);
    // An aborted upload: nothing at all.
    let up = begin(c, "/tmp/wu/g", USER);
    c.ok(Request::UploadWrite { upload: up, offset: 0, data: b"x".to_vec() });
    c.ok(Request::UploadAbort { upload: up });
    assert_eq!(fs_events(c, watch), []);
    c.ok(Request::Unwatch { watch });
}
