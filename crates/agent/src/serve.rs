//! The agent's request loop: many processes, PTYs and watches at once over one channel.
//!
//! A single-threaded tokio runtime keeps the idle agent small. Output of every process is
//! forwarded as it is produced, tagged with the id of each request subscribed to it (the
//! `Spawn` that started it and any later `Attach`). A process's `Exited` event follows all of
//! its output, unless a surviving descendant keeps the output pipes open: then it follows the
//! exit after a short grace period.
//!
//! Flow control: each subscription may have [`STREAM_WINDOW`] bytes of output in flight; the
//! host acknowledges what its client consumed with `Credit`. A process's pipes are read only
//! while every subscriber has credit, so output nobody consumes stays in the pipe and the
//! process blocks writing it (envd's fan-out blocks on its slowest subscriber the same way). A
//! subscriber whose client went away is detached and holds nothing back; with no subscriber
//! left, output is read and dropped. Watches are credited the same way: an unread watch stops
//! reading its inotify queue, where the kernel drops what overflows.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::rc::Rc;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use ringfence_proto::{
    AgentError, Envelope, ErrorKind, Event, ExitStatus, FsEventKind, OUTPUT_READ, ProcessInfo,
    Reply, Request, STREAM_WINDOW, SpawnSpec, StdioMode, Usage, encode, flow_cost, frame_len,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::task::{JoinHandle, spawn_local};

use crate::{fs, spawn};

/// How long an exited process's output may stay open (held by a descendant) before its exit is
/// reported anyway.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

enum Input {
    Pipe(pipe::Sender),
    Pty(Rc<AsyncFd<OwnedFd>>),
}

/// A process's input, owned by its writer task (see [`stdin_writer`]). Writes are queued with
/// the id of their request and carried out in order; each is answered once it is written.
///
/// Fix: writes used to be awaited inside the request loop, so a process that does not read its
/// stdin (or a PTY whose program is busy) stalled every other request, `Signal` included, until
/// it read or died. Now only the writer task waits.
struct Stdin {
    queue: UnboundedSender<(u64, Vec<u8>)>,
    /// `CloseStdin` closes pipes only; a terminal stays open as long as its process.
    pipe: bool,
}

/// A request subscribed to a process's output.
struct Sub {
    id: u64,
    /// Bytes it may still be sent before the host acknowledges more (may dip below zero by the
    /// last read).
    credit: i64,
    /// Its client went away: no more output, only the exit.
    detached: bool,
}

impl Sub {
    fn new(id: u64) -> Sub {
        Sub { id, credit: window(), detached: false }
    }
}

fn window() -> i64 {
    i64::try_from(STREAM_WINDOW).unwrap_or(i64::MAX)
}

struct Proc {
    spec: SpawnSpec,
    subscribers: Vec<Sub>,
    input: Option<Stdin>,
    pty: Option<Rc<AsyncFd<OwnedFd>>>,
    exit: Option<(ExitStatus, Usage)>,
    open_outputs: usize,
    /// Woken when a subscriber gets credit or detaches.
    flow: Rc<Notify>,
    /// Output readers waiting for credit: output is pending, so the exit must wait for it.
    stalled: usize,
}

impl Proc {
    fn new(spec: SpawnSpec, id: u64) -> Proc {
        Proc {
            spec,
            subscribers: vec![Sub::new(id)],
            input: None,
            pty: None,
            exit: None,
            open_outputs: 0,
            flow: Rc::default(),
            stalled: 0,
        }
    }

    /// Whether output may be read: every subscriber still reading has credit.
    fn may_read(&self) -> bool {
        self.subscribers.iter().all(|s| s.detached || s.credit > 0)
    }
}

/// An active watch: the task that forwards its events, the watcher itself, shared so that
/// requests can flush what is pending first (see [`flush_watches`]), and its flow control.
struct Watch {
    task: JoinHandle<()>,
    watcher: Rc<RefCell<fs::Watcher>>,
    flow: WatchFlow,
}

/// A watch's events read from the kernel but not yet sent, and the credit to send them.
#[derive(Clone)]
struct WatchFlow {
    id: u64,
    pending: Rc<RefCell<VecDeque<(String, FsEventKind)>>>,
    credit: Rc<Cell<i64>>,
    notify: Rc<Notify>,
}

impl WatchFlow {
    /// Sends pending events while credit lasts; true when none are left.
    fn send(&self, out: &UnboundedSender<Event>) -> bool {
        let mut pending = self.pending.borrow_mut();
        while self.credit.get() > 0 {
            let Some((name, kind)) = pending.pop_front() else { break };
            let ev = Event::Fs { watch: self.id, name, kind };
            let cost = i64::try_from(flow_cost(&ev)).unwrap_or(i64::MAX);
            self.credit.set(self.credit.get().saturating_sub(cost));
            let _ = out.send(ev);
        }
        pending.is_empty()
    }
}

#[derive(Clone)]
struct State {
    procs: Rc<RefCell<HashMap<u32, Proc>>>,
    watches: Rc<RefCell<HashMap<u64, Watch>>>,
    next_watch: Rc<RefCell<u64>>,
    /// Uploads in progress, by handle. They belong to the connection that began them.
    uploads: Rc<RefCell<HashMap<u64, fs::Upload>>>,
    next_upload: Rc<Cell<u64>>,
    out: UnboundedSender<Event>,
}

fn agent_err(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError { kind, message: message.into() }
}

fn no_process(pid: u32) -> AgentError {
    agent_err(ErrorKind::NotFound, format!("process {pid} not found"))
}

/// Serves requests until the host closes the channel. With `reconnect`, a closed channel is not
/// the end: processes keep running, output produced while nobody is connected is dropped (as
/// envd does), and the next host connection picks up where the last one left off.
pub fn serve(
    control: StdUnixStream,
    initial_pid: Option<u32>,
    reconnect: Option<StdUnixListener>,
) -> Result<(), ()> {
    control.set_nonblocking(true).map_err(drop)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(drop)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stream = UnixStream::from_std(control).map_err(drop)?;
        let listener = match reconnect {
            Some(l) => {
                l.set_nonblocking(true).map_err(drop)?;
                Some(UnixListener::from_std(l).map_err(drop)?)
            }
            None => None,
        };
        run(stream, initial_pid, listener).await
    })
}

async fn run(
    stream: UnixStream,
    initial_pid: Option<u32>,
    listener: Option<UnixListener>,
) -> Result<(), ()> {
    // One event queue for the agent's whole life; each connection drains it while it lasts.
    let (tx, mut rx) = unbounded_channel::<Event>();
    let state = State {
        procs: Rc::default(),
        watches: Rc::default(),
        next_watch: Rc::new(RefCell::new(1)),
        uploads: Rc::default(),
        next_upload: Rc::new(Cell::new(1)),
        out: tx,
    };
    if let Some(pid) = initial_pid {
        // Its output goes to the agent's own stdio; only its exit is reported.
        let spec = SpawnSpec {
            cmd: String::new(),
            args: vec![],
            env: Default::default(),
            cwd: None,
            user: Default::default(),
            stdio: StdioMode::Inherit,
            tag: None,
        };
        state.procs.borrow_mut().insert(pid, Proc::new(spec, 0));
    }
    spawn_local(reaper(state.clone()));
    let mut stream = stream;
    loop {
        let (rd, wr) = stream.into_split();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let writer = spawn_local(write_events(rx, wr, stop_rx));
        serve_connection(&state, rd).await;
        end_connection(&state);
        let _ = stop_tx.send(());
        let Ok(back) = writer.await else { return Err(()) };
        rx = back;
        let Some(l) = &listener else { break };
        // Disconnected: wait for the host to come back, discarding output meanwhile so that a
        // chatty process cannot grow the queue without bound.
        stream = loop {
            tokio::select! {
                conn = l.accept() => match conn {
                    Ok((s, _)) => break s,
                    Err(_) => return Err(()),
                },
                ev = rx.recv() => if ev.is_none() { return Err(()) },
            }
        };
    }
    Ok(())
}

/// Drops what belonged to the connection that ended: its subscriptions (which would otherwise
/// hold their processes back, waiting for credit nobody will send), watches and uploads (whose
/// temporary files go with them). Request ids start over on the next connection, so nothing of
/// this one may outlive it. The initial process's own subscription (id 0) stays.
fn end_connection(state: &State) {
    for p in state.procs.borrow_mut().values_mut() {
        p.subscribers.retain(|s| s.id == 0);
        p.flow.notify_waiters();
    }
    for (_, w) in state.watches.borrow_mut().drain() {
        w.task.abort();
    }
    state.uploads.borrow_mut().clear();
}

/// Writes queued events to the current connection until told to stop or the write fails;
/// hands the queue back for the next connection.
async fn write_events(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    loop {
        tokio::select! {
            _ = &mut stop => return rx,
            ev = rx.recv() => {
                let Some(ev) = ev else { return rx };
                let Ok(bytes) = encode(&ev) else { continue };
                if wr.write_all(&bytes).await.is_err() {
                    // Wait for the reader to notice the broken connection and stop us.
                    let _ = (&mut stop).await;
                    return rx;
                }
            }
        }
    }
}

/// Sends the events every watch has pending right now. Called before each request is handled,
/// so a change that happened before a request is always reported before that request's reply
/// (the watch tasks alone would report it whenever the scheduler gets to them).
///
/// A watch without credit is left alone: its client is not reading, and what it has not read
/// stays in the kernel's queue.
fn flush_watches(state: &State) {
    for w in state.watches.borrow().values() {
        if !w.flow.send(&state.out) || w.flow.credit.get() <= 0 {
            continue;
        }
        let Ok(events) = w.watcher.borrow_mut().read_events() else { continue };
        w.flow.pending.borrow_mut().extend(events);
        w.flow.send(&state.out);
    }
}

/// Handles requests from one connection until it closes or sends a malformed frame.
async fn serve_connection(state: &State, mut rd: tokio::net::unix::OwnedReadHalf) {
    loop {
        let mut prefix = [0u8; 4];
        if rd.read_exact(&mut prefix).await.is_err() {
            break;
        }
        let Ok(len) = frame_len(prefix) else { break };
        let mut body = vec![0u8; len];
        if rd.read_exact(&mut body).await.is_err() {
            break;
        }
        let Ok(env) = ringfence_proto::decode::<Envelope>(&body) else { break };
        let id = env.id;
        if env.request.is_one_way() {
            flow_control(state, env.request);
            continue;
        }
        flush_watches(state);
        let result = match env.request {
            // Answered by the process's writer task once the data is written.
            Request::WriteStdin { pid, data } => match queue_input(state, id, pid, data) {
                Ok(()) => continue,
                Err(e) => Err(e),
            },
            request => handle(state, id, request).await,
        };
        let _ = state.out.send(Event::Response { id, result });
    }
}

/// Applies a one-way flow-control request. Unknown ids are ignored: the process or watch may
/// have ended while the request was on its way.
fn flow_control(state: &State, request: Request) {
    match request {
        Request::Credit { id, bytes } => {
            let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
            for p in state.procs.borrow_mut().values_mut() {
                if let Some(s) = p.subscribers.iter_mut().find(|s| s.id == id) {
                    // Never more than a window: a host cannot make output pile up here either.
                    s.credit = s.credit.saturating_add(bytes).min(window());
                    p.flow.notify_waiters();
                }
            }
        }
        Request::Detach { id } => {
            for p in state.procs.borrow_mut().values_mut() {
                if let Some(s) = p.subscribers.iter_mut().find(|s| s.id == id) {
                    s.detached = true;
                    p.flow.notify_waiters();
                }
            }
        }
        Request::WatchCredit { watch, bytes } => {
            if let Some(w) = state.watches.borrow().get(&watch) {
                let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
                w.flow.credit.set(w.flow.credit.get().saturating_add(bytes).min(window()));
                w.flow.notify.notify_waiters();
            }
        }
        _ => {}
    }
}

async fn reaper(state: State) {
    let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) else {
        return;
    };
    loop {
        while let Ok(Some(r)) = ringfence_sys::wait4(-1, true) {
            let Ok(pid) = u32::try_from(r.pid) else { continue };
            let status = match r.outcome() {
                Ok(c) => ExitStatus::Code(c),
                Err(s) => ExitStatus::Signal(s),
            };
            let usage =
                Usage { user_cpu_us: r.user_us, sys_cpu_us: r.sys_us, max_rss_kib: r.max_rss_kib };
            let known = {
                let mut procs = state.procs.borrow_mut();
                match procs.get_mut(&pid) {
                    Some(p) => {
                        p.exit = Some((status, usage));
                        true
                    }
                    None => false,
                }
            };
            if known {
                finish_if_done(&state, pid);
                let st = state.clone();
                spawn_local(async move {
                    // Output still open after the grace is held by a descendant, unless its
                    // reader is waiting for credit: then the output is pending, not held, and
                    // the exit must come after it.
                    loop {
                        tokio::time::sleep(OUTPUT_GRACE).await;
                        match st.procs.borrow().get(&pid).map(|p| p.stalled > 0) {
                            Some(true) => continue,
                            Some(false) => {}
                            None => return,
                        }
                        break;
                    }
                    finish(&st, pid);
                });
            }
        }
        if sig.recv().await.is_none() {
            return;
        }
    }
}

fn finish_if_done(state: &State, pid: u32) {
    let done =
        state.procs.borrow().get(&pid).is_some_and(|p| p.exit.is_some() && p.open_outputs == 0);
    if done {
        finish(state, pid);
    }
}

fn finish(state: &State, pid: u32) {
    let Some(p) = state.procs.borrow_mut().remove(&pid) else { return };
    if let Some((status, usage)) = p.exit {
        for s in p.subscribers {
            let _ = state.out.send(Event::Exited { id: s.id, pid, status, usage });
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
}

fn forward(state: &State, pid: u32, stream: Stream, data: &[u8]) {
    let mut procs = state.procs.borrow_mut();
    let Some(p) = procs.get_mut(&pid) else { return };
    let cost = i64::try_from(data.len()).unwrap_or(i64::MAX);
    for s in p.subscribers.iter_mut().filter(|s| !s.detached) {
        s.credit = s.credit.saturating_sub(cost);
        let (id, data) = (s.id, data.to_vec());
        let ev = match stream {
            Stream::Stdout => Event::Stdout { id, data },
            Stream::Stderr => Event::Stderr { id, data },
            Stream::Pty => Event::Pty { id, data },
        };
        let _ = state.out.send(ev);
    }
}

/// Waits until the process's output may be read (see [`Proc::may_read`]); at once when the
/// process is no longer tracked (its output is then read and dropped).
async fn wait_for_credit(state: &State, pid: u32) {
    let Some(flow) = state.procs.borrow().get(&pid).map(|p| p.flow.clone()) else { return };
    let mut stalled = false;
    loop {
        let notified = flow.notified();
        tokio::pin!(notified);
        // Registered before the check, so a credit arriving in between is not missed.
        notified.as_mut().enable();
        {
            let mut procs = state.procs.borrow_mut();
            let Some(p) = procs.get_mut(&pid) else { return };
            if p.may_read() {
                if stalled {
                    p.stalled = p.stalled.saturating_sub(1);
                }
                return;
            }
            if !stalled {
                p.stalled += 1;
                stalled = true;
            }
        }
        notified.await;
    }
}

fn output_closed(state: &State, pid: u32) {
    if let Some(p) = state.procs.borrow_mut().get_mut(&pid) {
        p.open_outputs = p.open_outputs.saturating_sub(1);
    }
    finish_if_done(state, pid);
}

async fn pump_pipe(state: State, pid: u32, stream: Stream, mut rx: pipe::Receiver) {
    let mut buf = vec![0u8; OUTPUT_READ];
    loop {
        wait_for_credit(&state, pid).await;
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => forward(&state, pid, stream, &buf[..n]),
        }
    }
    output_closed(&state, pid);
}

async fn pump_pty(state: State, pid: u32, master: Rc<AsyncFd<OwnedFd>>) {
    let mut buf = vec![0u8; OUTPUT_READ];
    loop {
        wait_for_credit(&state, pid).await;
        let Ok(mut guard) = master.readable().await else { break };
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => forward(&state, pid, Stream::Pty, &buf[..n]),
            // EIO: every slave end is closed, the terminal session is over.
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        }
    }
    output_closed(&state, pid);
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), AgentError> {
    let flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| agent_err(ErrorKind::Internal, e.to_string()))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))
        .map_err(|e| agent_err(ErrorKind::Internal, e.to_string()))?;
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> AgentError {
    agent_err(ErrorKind::Internal, e.to_string())
}

fn start(state: &State, id: u64, spec: SpawnSpec) -> Result<u32, AgentError> {
    use ringfence_sys::SpawnStdio;
    let pty_mode = matches!(spec.stdio, StdioMode::Pty { .. });
    let prepared = spawn::command(&spec, pty_mode)?;
    let mut master = None;
    // The child's ends (closed here once it has them) and ours.
    let mut child_ends: Vec<OwnedFd> = Vec::new();
    let (mut out_rx, mut err_rx, mut in_tx) = (None, None, None);
    let null = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(internal)
    };
    let stdio = match spec.stdio {
        StdioMode::Inherit => {
            let n = null()?;
            let fd = SpawnStdio::Fd(n.as_raw_fd());
            child_ends.push(n);
            [fd, SpawnStdio::Keep, SpawnStdio::Keep]
        }
        StdioMode::Pipe { stdin } => {
            let input = if stdin {
                let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(internal)?;
                in_tx = Some(w);
                r
            } else {
                null()?
            };
            let (or, ow) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(internal)?;
            let (er, ew) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(internal)?;
            out_rx = Some(or);
            err_rx = Some(er);
            let fds = [input.as_raw_fd(), ow.as_raw_fd(), ew.as_raw_fd()];
            child_ends.extend([input, ow, ew]);
            fds.map(SpawnStdio::Fd)
        }
        StdioMode::Pty { cols, rows } => {
            let (m, s) = ringfence_sys::open_pty(cols, rows).map_err(internal)?;
            let fd = SpawnStdio::Fd(s.as_raw_fd());
            child_ends.push(s);
            set_nonblocking(&m)?;
            master = Some(Rc::new(ringfence_sys::async_fd(m).map_err(internal)?));
            [fd, fd, fd]
        }
    };
    let pid = prepared.spawn(stdio).map_err(|e| spawn::spawn_error(&spec, &e))?;
    // Only the child holds the PTY slave and the pipes' far ends now, so the master sees EIO
    // and the readers end of file when it (and whatever inherited them) is done.
    drop(child_ends);
    let mut proc = Proc::new(spec, id);
    proc.pty = master.clone();
    let mut pumps: Vec<(Stream, pipe::Receiver)> = Vec::new();
    if let Some(out) = out_rx.take() {
        pumps.push((Stream::Stdout, pipe::Receiver::from_owned_fd(out).map_err(internal)?));
    }
    if let Some(err) = err_rx.take() {
        pumps.push((Stream::Stderr, pipe::Receiver::from_owned_fd(err).map_err(internal)?));
    }
    if let Some(inp) = in_tx.take() {
        let tx = pipe::Sender::from_owned_fd(inp).map_err(internal)?;
        proc.input = Some(stdin_writer(state, Input::Pipe(tx)));
    }
    if let Some(m) = &master {
        proc.input = Some(stdin_writer(state, Input::Pty(m.clone())));
        proc.open_outputs = 1;
    }
    proc.open_outputs += pumps.len();
    state.procs.borrow_mut().insert(pid, proc);
    for (stream, rx) in pumps {
        spawn_local(pump_pipe(state.clone(), pid, stream, rx));
    }
    if let Some(m) = master {
        spawn_local(pump_pty(state.clone(), pid, m));
    }
    Ok(pid)
}

/// Starts the task that owns `input` and performs the writes queued on the returned [`Stdin`].
/// It ends, dropping `input` (EOF on a pipe), once the queue's sender is gone (`CloseStdin`, or
/// the process finished) and every queued write has been answered.
fn stdin_writer(state: &State, input: Input) -> Stdin {
    let (queue, mut rx) = unbounded_channel::<(u64, Vec<u8>)>();
    let pipe = matches!(input, Input::Pipe(_));
    let out = state.out.clone();
    spawn_local(async move {
        while let Some((id, data)) = rx.recv().await {
            let result = write_input(&input, &data).await.map(|()| Reply::Done);
            let _ = out.send(Event::Response { id, result });
        }
    });
    Stdin { queue, pipe }
}

/// Queues a `WriteStdin`; its response is sent by the writer task.
fn queue_input(state: &State, id: u64, pid: u32, data: Vec<u8>) -> Result<(), AgentError> {
    let procs = state.procs.borrow();
    let p = procs.get(&pid).ok_or_else(|| no_process(pid))?;
    let closed =
        || agent_err(ErrorKind::InvalidArgument, format!("stdin of process {pid} is closed"));
    let stdin = p.input.as_ref().ok_or_else(closed)?;
    stdin.queue.send((id, data)).map_err(|_| closed())
}

async fn write_input(input: &Input, data: &[u8]) -> Result<(), AgentError> {
    match input {
        Input::Pipe(tx) => {
            let mut off = 0;
            let mut res = Ok(());
            while off < data.len() {
                if let Err(e) = tx.writable().await {
                    res = Err(internal(e));
                    break;
                }
                match tx.try_write(&data[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        res = Err(internal(e));
                        break;
                    }
                }
            }
            res
        }
        Input::Pty(m) => {
            let mut off = 0;
            let mut res = Ok(());
            while off < data.len() {
                let Ok(mut guard) = m.writable().await else {
                    res = Err(agent_err(ErrorKind::Internal, "terminal closed"));
                    break;
                };
                // Once every slave descriptor is closed the master reports HUP, which tokio
                // keeps as "write closed" readiness for good, while a full input queue still
                // answers EAGAIN: `writable()` then returned at once forever and this loop spun
                // without yielding, wedging the agent. Nobody can read the data any more.
                let hung_up = guard.ready().is_write_closed();
                match guard
                    .try_io(|fd| nix::unistd::write(fd.get_ref(), &data[off..]).map_err(Into::into))
                {
                    Ok(Ok(n)) => off += n,
                    Ok(Err(e)) => {
                        res = Err(internal(e));
                        break;
                    }
                    Err(_) if hung_up => {
                        res = Err(agent_err(ErrorKind::Internal, "terminal closed"));
                        break;
                    }
                    Err(_) => continue,
                }
            }
            res
        }
    }
}

async fn handle(state: &State, id: u64, req: Request) -> Result<Reply, AgentError> {
    match req {
        Request::Ping => Ok(Reply::Pong),
        Request::SetEnv { env } => {
            crate::spawn::set_sandbox_env(env);
            Ok(Reply::Done)
        }
        Request::Spawn(spec) => start(state, id, spec).map(|pid| Reply::Spawned { pid }),
        Request::Attach { pid } => {
            let mut procs = state.procs.borrow_mut();
            let p = procs.get_mut(&pid).ok_or_else(|| no_process(pid))?;
            p.subscribers.push(Sub::new(id));
            Ok(Reply::Spawned { pid })
        }
        // Queued by the request loop (`queue_input`), never handled here.
        Request::WriteStdin { .. } => Err(internal("stdin writes are queued by the request loop")),
        Request::CloseStdin { pid } => {
            let mut procs = state.procs.borrow_mut();
            let p = procs.get_mut(&pid).ok_or_else(|| no_process(pid))?;
            if p.input.as_ref().is_some_and(|s| s.pipe) {
                p.input = None;
            }
            Ok(Reply::Done)
        }
        Request::Signal { pid, signal } => {
            if !state.procs.borrow().contains_key(&pid) {
                return Err(no_process(pid));
            }
            let pid_i = i32::try_from(pid).map_err(|_| no_process(pid))?;
            // Each process leads its own session and group: signal the whole group so a
            // shell's children go with it, then the process itself in case it left the group.
            let _ = ringfence_sys::kill(-pid_i, signal);
            ringfence_sys::kill(pid_i, signal)
                .or_else(|e| if e.errno() == Some(libc::ESRCH) { Ok(()) } else { Err(e) })
                .map_err(|e| agent_err(ErrorKind::InvalidArgument, e.to_string()))?;
            Ok(Reply::Done)
        }
        Request::ResizePty { pid, cols, rows } => {
            let procs = state.procs.borrow();
            let p = procs.get(&pid).ok_or_else(|| no_process(pid))?;
            let m = p.pty.as_ref().ok_or_else(|| {
                agent_err(ErrorKind::InvalidArgument, format!("process {pid} has no terminal"))
            })?;
            ringfence_sys::set_winsize(m.get_ref(), cols, rows).map_err(internal)?;
            Ok(Reply::Done)
        }
        Request::ListProcesses => {
            let procs = state.procs.borrow();
            let mut list: Vec<ProcessInfo> = procs
                .iter()
                .filter(|(_, p)| p.exit.is_none() && !p.spec.cmd.is_empty())
                .map(|(pid, p)| ProcessInfo { pid: *pid, spec: p.spec.clone() })
                .collect();
            list.sort_by_key(|p| p.pid);
            Ok(Reply::Processes(list))
        }
        Request::ReadFile { path, user, offset } => {
            let p = fs::resolve(&path, user)?;
            let (data, eof) = fs::read_chunk(&p, offset)?;
            Ok(Reply::Data { data, eof })
        }
        Request::WriteFile { path, user, offset, data } => {
            let p = fs::resolve(&path, user)?;
            fs::write_chunk(&p, offset, &data, user).map(Reply::Entry)
        }
        Request::SetMetadata { path, user, metadata } => {
            fs::set_metadata(&fs::resolve(&path, user)?, &metadata).map(Reply::Entry)
        }
        Request::Stat { path, user } => fs::stat(&fs::resolve(&path, user)?).map(Reply::Entry),
        Request::ListDir { path, user, depth } => {
            fs::list_dir(&fs::resolve(&path, user)?, depth).map(Reply::Entries)
        }
        Request::MakeDir { path, user } => {
            fs::make_dir(&fs::resolve(&path, user)?, user).map(Reply::Entry)
        }
        Request::Remove { path, user } => {
            fs::remove(&fs::resolve(&path, user)?).map(|()| Reply::Done)
        }
        Request::Rename { from, to, user } => {
            fs::rename(&fs::resolve(&from, user)?, &fs::resolve(&to, user)?, user).map(Reply::Entry)
        }
        Request::Watch { path, user, recursive } => {
            let p = fs::resolve(&path, user)?;
            let watcher = fs::Watcher::new(&p, recursive)?;
            // Readiness is polled on a duplicate of the inotify descriptor; the watcher keeps
            // the original and its bookkeeping.
            let dup = watcher.fd().try_clone_to_owned().map_err(internal)?;
            let afd = ringfence_sys::async_fd(dup).map_err(internal)?;
            let watch = {
                let mut n = state.next_watch.borrow_mut();
                let w = *n;
                *n += 1;
                w
            };
            let watcher = Rc::new(RefCell::new(watcher));
            let flow = WatchFlow {
                id: watch,
                pending: Rc::default(),
                credit: Rc::new(Cell::new(window())),
                notify: Rc::default(),
            };
            let task =
                spawn_local(watch_events(watcher.clone(), afd, flow.clone(), state.out.clone()));
            state.watches.borrow_mut().insert(watch, Watch { task, watcher, flow });
            Ok(Reply::Watching { watch })
        }
        Request::Unwatch { watch } => match state.watches.borrow_mut().remove(&watch) {
            Some(w) => {
                w.task.abort();
                Ok(Reply::Done)
            }
            None => Err(agent_err(ErrorKind::NotFound, format!("watch {watch} not found"))),
        },
        Request::Reidentify { hostname, wake } => crate::microvm::reidentify(&hostname, &wake)
            .map(|()| Reply::Done)
            .map_err(|e| agent_err(ErrorKind::InvalidArgument, e)),
        Request::Stats => {
            let n = u32::try_from(state.procs.borrow().len()).unwrap_or(u32::MAX);
            Ok(Reply::Stats { usage: Usage::default(), processes: n })
        }
        Request::UploadBegin { path, user } => {
            if state.uploads.borrow().len() >= fs::MAX_UPLOADS {
                return Err(agent_err(
                    ErrorKind::NoSpace,
                    format!("too many uploads in progress (at most {})", fs::MAX_UPLOADS),
                ));
            }
            let target = fs::resolve(&path, user)?;
            let (upload, free) = fs::Upload::begin(&target, user)?;
            let handle = state.next_upload.get();
            state.next_upload.set(handle + 1);
            state.uploads.borrow_mut().insert(handle, upload);
            let path = target.to_string_lossy().into_owned();
            Ok(Reply::Upload { upload: handle, path, free })
        }
        Request::UploadWrite { upload, offset, data } => {
            let mut uploads = state.uploads.borrow_mut();
            let u = uploads.get_mut(&upload).ok_or_else(|| no_upload(upload))?;
            u.write(offset, &data).map(|()| Reply::Done)
        }
        Request::UploadCommit { upload, metadata } => {
            let u = state.uploads.borrow_mut().remove(&upload).ok_or_else(|| no_upload(upload))?;
            u.commit(&metadata).map(Reply::Entry)
        }
        Request::UploadAbort { upload } => {
            state.uploads.borrow_mut().remove(&upload).ok_or_else(|| no_upload(upload))?;
            Ok(Reply::Done)
        }
        // Answered by `flow_control`, never here.
        Request::Credit { .. } | Request::Detach { .. } | Request::WatchCredit { .. } => {
            Err(internal("flow control is handled by the request loop"))
        }
    }
}

fn no_upload(upload: u64) -> AgentError {
    agent_err(ErrorKind::NotFound, format!("upload {upload} not found"))
}

/// Forwards a watch's events as credit allows: reads the kernel's queue only when everything
/// read before was sent, so an unread watch leaves its events in the kernel (which drops what
/// overflows its queue, as with envd's watcher).
async fn watch_events(
    watcher: Rc<RefCell<fs::Watcher>>,
    afd: AsyncFd<OwnedFd>,
    flow: WatchFlow,
    out: UnboundedSender<Event>,
) {
    loop {
        loop {
            let notified = flow.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if flow.send(&out) && flow.credit.get() > 0 {
                break;
            }
            notified.await;
        }
        let Ok(mut guard) = afd.readable().await else { break };
        let events = watcher.borrow_mut().read_events();
        guard.clear_ready();
        match events {
            Ok(evs) => flow.pending.borrow_mut().extend(evs),
            Err(_) => break,
        }
    }
}
