//! The code interpreter's runtime: the fork server, each sandbox's contexts and their kernels
//! running inside the sandbox. E2B's port 49999 (`/execute`, `/contexts`) is the server's
//! (`ringfence_server::interp`), which drives these kernels.
//!
//! A context is one kernel process: Python (IPython) and bash kernels are forked into the
//! sandbox by the fork server ([`ringfence_jail::zygote`]), which has already imported the data
//! libraries, so a new sandbox's first cell pays no import; JavaScript kernels are Node processes
//! the agent starts. Every kernel speaks JSON lines (`interp/PROTOCOL.md`); this module turns
//! them into E2B's NDJSON stream. Kernels run user code, so each line they send is parsed as
//! hostile input: size-capped, checked against the running execution, and reduced to the
//! message types and fields E2B defines.
//!
//! Cancellation: an execution whose client goes away (the SDK's `timeout` closes its dedicated
//! connection) is interrupted; a kernel that does not stop within [`INTERRUPT_GRACE`] is killed
//! and its context starts afresh on next use.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfence_jail::limits::Limits;
use ringfence_jail::monitor::Supervisor;
use ringfence_jail::seccomp::Compiled;
use ringfence_jail::zygote::{EntryPlan, Injected, Zygote, ZygoteConfig, ZygoteError};
use ringfence_proto::{Event, Reply, Request as AgentRequest, SandboxUser, SpawnSpec, StdioMode};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::agent_client::AgentClient;
use crate::bounded;
use crate::observe::SandboxObs;
use crate::tier::TierKind;

/// Kernel sources, written for the fork server at start-up and passed inline to Node.
pub const KERNEL_PY: &str = include_str!("../../../interp/python/ringfence_kernel.py");

pub const CHARTS_PY: &str = include_str!("../../../interp/python/ringfence_charts.py");

pub const JSHELL_JAVA: &str = include_str!("../../../interp/java/RingfenceJShell.java");

pub const KERNEL_R: &str = include_str!("../../../interp/r/ringfence_kernel.R");

pub const ZYGOTE_PY: &str = include_str!("../../../interp/python/ringfence_zygote.py");

pub const KERNEL_JS: &str = include_str!("../../../interp/js/ringfence_kernel.js");

/// Where scripts/interp-ts.sh installs the TypeScript compiler, inside the interpreter
/// environment: sandboxes see it at the same path through that environment's template layer
/// (a layer of its own cost ≈ 40 ms per create, measured).
pub const TS_SUBDIR: &str = "share/ringfence/typescript";

/// Longest line a kernel may send (a large PNG is a few MiB of base64).
pub const MAX_LINE: usize = 64 << 20;

/// How long a new kernel may take to report ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the fork server may take to import everything on start.
pub const ZYGOTE_READY: Duration = Duration::from_secs(120);

/// Bytes of parsed kernel lines held for a kernel before its reader stops reading (and the
/// kernel blocks writing): lines are up to [`MAX_LINE`] each, so a count bound was not one.
pub const KERNEL_BACKLOG: u32 = 8 << 20;

/// Messages to a kernel not yet written to it. A kernel that leaves this many unread is stuck:
/// sending then fails, and the context starts afresh on next use.
pub const KERNEL_INPUT: usize = 16;

/// Languages with kernels here, after E2B's normalisation.
pub fn normalize(lang: &str) -> Option<&'static str> {
    match lang.to_ascii_lowercase().as_str() {
        "python" | "python3" | "py" => Some("python"),
        "javascript" | "js" | "node" => Some("javascript"),
        // Compiled per cell into a JavaScript kernel (interp/js/ringfence_kernel.js).
        "typescript" | "ts" => Some("typescript"),
        // Driven by the Python kernel (interp/python/ringfence_kernel.py, _DriverKernel).
        "java" => Some("java"),
        "r" => Some("r"),
        // Compiled per cell by rustc, driven by the Python kernel (_RustKernel).
        "rust" | "rs" => Some("rust"),
        "bash" | "sh" => Some("bash"),
        _ => None,
    }
}

/// What the interpreter needs of a sandbox: its id and environment, its agent, its contexts,
/// where its denials are reported, its tier and, where the tier allows, a kernel injected
/// into its namespaces. A narrow view (`manager::Live` implements it), so this module needs
/// nothing else of a sandbox.
pub trait KernelHost: Send + Sync + 'static {
    fn sandbox_id(&self) -> String;
    /// The sandbox's own environment variables (a kernel's start from these).
    fn env(&self) -> BTreeMap<String, String>;
    fn client(&self) -> &Arc<AgentClient>;
    fn contexts(&self) -> &Contexts;
    fn obs(&self) -> &Arc<SandboxObs>;
    /// The tier it runs in; `None` once it has ended.
    fn tier(&self) -> Option<TierKind>;
    /// Whether a kernel can be forked into its namespaces by the fork server (the jail).
    fn can_inject(&self) -> bool;
    /// Forks a kernel into its namespaces through `zygote` (see [`Zygote::inject`]).
    fn inject(
        &self,
        zygote: &Zygote,
        plan: &EntryPlan,
        within: Duration,
    ) -> Result<Injected, ZygoteError>;
}

/// The fork server and what every kernel entry needs, shared by all sandboxes.
#[derive(Debug)]
pub struct Runtime {
    cfg: Option<ZygoteConfig>,
    zygote: Mutex<Option<Zygote>>,
    limits: Limits,
    seccomp: Compiled,
    /// The TypeScript compiler's directory (see [`TS_SUBDIR`]).
    ts_dir: String,
}

impl Runtime {
    /// Prepares the fork server for the interpreter environment `env_dir` (absent: no Python
    /// or bash kernels; the code-interpreter template then cannot be created either).
    pub fn new(
        run_dir: &std::path::Path,
        env_dir: &std::path::Path,
        limits: Limits,
        seccomp: Compiled,
    ) -> std::io::Result<Runtime> {
        let python = env_dir.join("bin/python3");
        let cfg = if python.exists() {
            use std::os::unix::fs::PermissionsExt;
            let dir = ringfence_jail::zygote::script_dir(run_dir);
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            std::fs::write(dir.join("ringfence_kernel.py"), KERNEL_PY)?;
            std::fs::write(dir.join("ringfence_zygote.py"), ZYGOTE_PY)?;
            std::fs::write(dir.join("ringfence_charts.py"), CHARTS_PY)?;
            std::fs::write(dir.join("RingfenceJShell.java"), JSHELL_JAVA)?;
            std::fs::write(dir.join("ringfence_kernel.R"), KERNEL_R)?;
            Some(ZygoteConfig { python, socket_path: dir.join("zygote.sock"), script_dir: dir })
        } else {
            None
        };
        let ts_dir = env_dir.join(TS_SUBDIR).to_string_lossy().into_owned();
        Ok(Runtime { cfg, zygote: Mutex::new(None), limits, seccomp, ts_dir })
    }

    /// Starts the fork server now (blocking: it imports everything) so the first kernel does
    /// not wait for it.
    pub fn warm(&self) -> Result<(), String> {
        self.with_zygote(|_| Ok(())).map_err(|e| e.to_string())
    }

    fn with_zygote<R>(
        &self,
        f: impl FnOnce(&Zygote) -> Result<R, ZygoteError>,
    ) -> Result<R, ZygoteError> {
        let Some(cfg) = &self.cfg else {
            return Err(ZygoteError::Entry {
                step: "interpreter".into(),
                message: "no interpreter environment on this host (run scripts/setup.sh)".into(),
            });
        };
        let mut guard = self.zygote.lock().map_err(|_| ZygoteError::Gone)?;
        if !guard.as_mut().is_some_and(Zygote::alive) {
            *guard = None;
            let z = Zygote::start(cfg, ZYGOTE_READY)?;
            tracing::info!("interpreter fork server ready");
            *guard = Some(z);
        }
        let z = guard.as_ref().ok_or(ZygoteError::Gone)?;
        f(z)
    }
}

/// Kernel → server, parsed.
pub type Lines = bounded::Receiver<Value>;

/// How a kernel is stopped for good.
#[derive(Debug)]
pub enum Killer {
    Pidfd(OwnedFd),
    Agent { client: Arc<AgentClient>, pid: u32 },
}

impl Killer {
    pub async fn kill(&self) {
        match self {
            Killer::Pidfd(fd) => {
                let _ = ringfence_sys::pidfd_send_signal(fd, libc::SIGKILL);
            }
            Killer::Agent { client, pid } => {
                let _ =
                    client.call(AgentRequest::Signal { pid: *pid, signal: libc::SIGKILL }).await;
            }
        }
    }
}

/// A running kernel.
#[derive(Debug)]
pub struct Kernel {
    pub input: mpsc::Sender<Vec<u8>>,
    pub output: Lines,
    pub killer: Killer,
    pub _supervisor: Option<Supervisor>,
}

impl Kernel {
    pub fn send(&self, v: &Value) -> bool {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        self.input.try_send(line).is_ok()
    }
}

/// One interpreter context.
#[derive(Debug)]
pub struct Context {
    pub id: String,
    pub language: &'static str,
    pub cwd: String,
    /// Who the kernel runs as: see [`user_for`].
    pub user: SandboxUser,
    /// Held for the whole of an execution: one cell at a time per context.
    pub kernel: Arc<tokio::sync::Mutex<Option<Kernel>>>,
}

impl Context {
    pub fn json(&self) -> Value {
        json!({"id": self.id, "language": self.language, "cwd": self.cwd})
    }
}

/// A sandbox's contexts.
#[derive(Debug, Default)]
pub struct Contexts {
    pub by_id: Mutex<HashMap<String, Arc<Context>>>,
    /// The context used when a request names only a language.
    pub defaults: Mutex<HashMap<&'static str, Arc<Context>>>,
}

pub const DEFAULT_CWD: &str = "/home/user";

/// The languages whose default contexts a fresh sandbox lists, as E2B's server creates them
/// at boot. Their kernels still start on first use (Python's is prestarted).
pub const LISTED_DEFAULTS: &[&str] = &["python", "javascript"];

/// Who a context's kernel runs as. The sandbox's `user` (uid 1000) unless the context lives
/// under `/root`, which only the sandbox's root can enter: E2B's interpreter runs as root, and
/// a client that asks for `cwd="/root"` expects a working context there. The sandbox's root is
/// uid 0 of the sandbox's user namespace only (an unprivileged host uid), and its kernel is
/// entered exactly like `user`'s: no capabilities (bounding set empty, so an exec as root
/// gains none), no_new_privs, the same seccomp filter and Landlock domain. It is what
/// `commands.run(user="root")` already gives the same caller (docs/SECURITY.md).
pub fn user_for(cwd: &str) -> SandboxUser {
    if cwd == "/root" || cwd.starts_with("/root/") { SandboxUser::Root } else { SandboxUser::User }
}

/// The default context of `language`, made on first use.
pub fn default_context(live: &impl KernelHost, language: &'static str) -> Option<Arc<Context>> {
    let mut d = live.contexts().defaults.lock().ok()?;
    Some(
        d.entry(language)
            .or_insert_with(|| {
                Arc::new(Context {
                    id: format!("default-{language}"),
                    language,
                    cwd: DEFAULT_CWD.into(),
                    user: SandboxUser::User,
                    kernel: Arc::default(),
                })
            })
            .clone(),
    )
}

/// Starts the default Python kernel of a new sandbox in the background, so its first cell
/// finds it ready.
pub fn prestart<H: KernelHost>(rt: Arc<Runtime>, live: Arc<H>) {
    tokio::spawn(crate::phases::timed("prestart", async move {
        let Some(ctx) = default_context(live.as_ref(), "python") else { return };
        let mut guard = ctx.kernel.clone().lock_owned().await;
        crate::phases::mark("context_lock");
        if guard.is_none() {
            match start_kernel(&rt, &live, &ctx).await {
                Ok(k) => *guard = Some(k),
                Err(e) => tracing::warn!(sandbox_id = %live.sandbox_id(), "prestart kernel: {e}"),
            }
        }
    }));
}

pub fn sandbox_id(live: &impl KernelHost) -> String {
    live.sandbox_id()
}

pub async fn stop_kernel(ctx: &Context) {
    if let Some(k) = ctx.kernel.lock().await.take() {
        k.killer.kill().await;
    }
}

/// The environment a kernel starts from: the base every sandbox process gets plus the
/// sandbox's own variables.
pub fn kernel_env(live: &impl KernelHost, user: SandboxUser) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_string(), ringfence_agent_path().to_string()),
        ("HOME".to_string(), user.home().to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ]);
    env.extend(live.env());
    env
}

pub fn ringfence_agent_path() -> &'static str {
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

pub async fn start_kernel<H: KernelHost>(
    rt: &Arc<Runtime>,
    live: &Arc<H>,
    ctx: &Context,
) -> Result<Kernel, String> {
    let injectable = live.can_inject();
    // The wasm tier has no processes to inject into: its agent runs kernels of its own
    // (`ringfence_wasm::KERNEL_CMD`: CPython, or QuickJS for JavaScript), driven like a Node
    // kernel through the agent.
    let wasm = live.tier() == Some(TierKind::Wasm);
    let kernel = match ctx.language {
        "python" if wasm => {
            let mut env = kernel_env(live.as_ref(), ctx.user);
            // The guest has no PATH to search and no host locale to name.
            env.remove("PATH");
            env.remove("LANG");
            start_agent_kernel(live, ctx, ringfence_wasm::KERNEL_CMD.into(), Vec::new(), env)
                .await?
        }
        "javascript" if wasm => {
            let mut env = kernel_env(live.as_ref(), ctx.user);
            env.remove("PATH");
            env.remove("LANG");
            let args = vec![ringfence_wasm::JS_KERNEL_ARG.into()];
            start_agent_kernel(live, ctx, ringfence_wasm::KERNEL_CMD.into(), args, env).await?
        }
        lang if wasm => {
            return Err(format!(
                "{NOT_ON_TIER}the wasm tier runs Python and JavaScript cells, not {lang}"
            ));
        }
        "javascript" | "typescript" => {
            let mut args = vec!["-e".into(), KERNEL_JS.into()];
            if ctx.language == "typescript" {
                args.extend(["--".into(), "--typescript".into(), rt.ts_dir.clone()]);
            }
            let env = kernel_env(live.as_ref(), ctx.user);
            start_agent_kernel(live, ctx, "/usr/bin/node".into(), args, env).await?
        }
        lang if injectable => start_injected_kernel(rt, live, ctx, lang).await?,
        // A tier without namespaces the fork server can enter (gVisor): the kernel runs as an
        // ordinary process the agent starts, paying the imports the fork server would have
        // done once. The environment is bound at the same path inside, so its python is ours.
        // Not yet run under gVisor (rustc's memory inside the sentry, the host process's
        // forked copies): refused with the reason rather than served unchecked.
        "rust" => {
            return Err(format!(
                "{NOT_ON_TIER}the rust kernel runs on the jail tier only for now (python, \
                 bash, javascript and typescript run here)"
            ));
        }
        lang @ ("java" | "r") => {
            return Err(format!(
                "{NOT_ON_TIER}the {lang} kernel: its driver is started by the jail's fork \
                 server, which this sandbox's tier cannot take (python, bash, javascript and \
                 typescript run here)"
            ));
        }
        lang => {
            let python = rt
                .cfg
                .as_ref()
                .map(|c| c.python.to_string_lossy().into_owned())
                .ok_or("no interpreter environment on this host (run scripts/setup.sh)")?;
            let args = vec!["-c".into(), stdio_kernel_source(), "--lang".into(), lang.into()];
            start_agent_kernel(live, ctx, python, args, kernel_env(live.as_ref(), ctx.user)).await?
        }
    };
    Ok(kernel)
}

pub async fn start_injected_kernel<H: KernelHost>(
    rt: &Arc<Runtime>,
    live: &Arc<H>,
    ctx: &Context,
    lang: &str,
) -> Result<Kernel, String> {
    let mut plan = EntryPlan::new(
        lang,
        &ctx.cwd,
        kernel_env(live.as_ref(), ctx.user),
        &rt.limits,
        Some(&rt.seccomp),
    );
    plan.uid = ctx.user.uid();
    plan.gid = ctx.user.uid();
    let (rt2, live2) = (rt.clone(), live.clone());
    let injected = tokio::task::spawn_blocking(move || {
        rt2.with_zygote(|z| live2.inject(z, &plan, START_TIMEOUT))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let supervisor = match injected.listener {
        Some(l) => {
            Supervisor::start_with(l, live.sandbox_id(), Some(live.obs().denial_sink())).ok()
        }
        None => None,
    };
    injected.channel.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = tokio::net::UnixStream::from_std(injected.channel).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = stream.into_split();
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(KERNEL_INPUT);
    let (out_tx, out_rx) = bounded::channel(KERNEL_BACKLOG);
    tokio::spawn(async move {
        while let Some(line) = in_rx.recv().await {
            if wr.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut split = LineSplitter::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !split.feed(&buf[..n], &out_tx).await {
                break;
            }
        }
    });
    let mut kernel = Kernel {
        input: in_tx,
        output: out_rx,
        killer: Killer::Pidfd(injected.pidfd),
        _supervisor: supervisor,
    };
    wait_ready(&mut kernel, &ctx.cwd).await?;
    Ok(kernel)
}

/// Starts a kernel that speaks on its stdin and stdout as a process the agent spawns.
pub async fn start_agent_kernel<H: KernelHost>(
    live: &Arc<H>,
    ctx: &Context,
    cmd: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
) -> Result<Kernel, String> {
    let what = format!("start {cmd}");
    let spec = SpawnSpec {
        cmd,
        args,
        env,
        cwd: Some(ctx.cwd.clone()),
        user: ctx.user,
        stdio: StdioMode::Pipe { stdin: true },
        tag: Some(format!("ringfence-kernel-{}", ctx.id)),
    };
    let (reply, mut events) =
        live.client().stream(AgentRequest::Spawn(spec)).await.map_err(|e| {
            let e = e.to_string();
            // The agent checked the cwd before starting anything (crates/agent/src/spawn.rs).
            if e.contains("working directory does not exist") {
                format!("{BAD_CWD}{:?}: no such directory", ctx.cwd)
            } else if e.contains("wasm tier") && e.contains("JavaScript engine") {
                // The wasm tier's agent refused: this host has no QuickJS build (the client's
                // to know, as for any language the tier cannot run).
                format!("{NOT_ON_TIER}{e}")
            } else {
                format!("{what}: {e}")
            }
        })?;
    let pid = match reply {
        Reply::Spawned { pid } => pid,
        other => return Err(format!("{what}: {other:?}")),
    };
    crate::phases::mark("kernel_spawned");
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(KERNEL_INPUT);
    let (out_tx, out_rx) = bounded::channel(KERNEL_BACKLOG);
    let client = live.client().clone();
    tokio::spawn(async move {
        while let Some(data) = in_rx.recv().await {
            if client.call(AgentRequest::WriteStdin { pid, data }).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut split = LineSplitter::default();
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Stdout { data, .. } if !split.feed(&data, &out_tx).await => break,
                Event::Exited { .. } => break,
                _ => {}
            }
        }
    });
    let mut kernel = Kernel {
        input: in_tx,
        output: out_rx,
        killer: Killer::Agent { client: live.client().clone(), pid },
        _supervisor: None,
    };
    if let Err(e) = wait_ready(&mut kernel, &ctx.cwd).await {
        kernel.killer.kill().await;
        return Err(e);
    }
    crate::phases::mark("kernel_ready");
    Ok(kernel)
}

/// Starts the error of a kernel that could not enter its context's `cwd`: the client's
/// mistake (400), not the server's.
pub const BAD_CWD: &str = "cannot start a kernel in cwd ";

/// The start of a refusal of a language the sandbox's tier cannot run (400).
pub const NOT_ON_TIER: &str = "not on this sandbox's tier: ";

/// The Python kernel as one `python3 -c` program, for a kernel the agent starts (no fork
/// server, so no script directory inside the sandbox): its chart module is registered from
/// source before the kernel's own `import ringfence_charts`, and `__file__` names no file
/// (the java and r drivers it would look for beside itself are not served on such a tier).
pub fn stdio_kernel_source() -> String {
    use base64::Engine as _;
    let charts = base64::engine::general_purpose::STANDARD.encode(CHARTS_PY);
    format!(
        "import base64 as _b, sys as _s, types as _t\n\
         _m = _t.ModuleType('ringfence_charts')\n\
         exec(compile(_b.b64decode('{charts}').decode(), 'ringfence_charts.py', 'exec'), \
         _m.__dict__)\n\
         _s.modules['ringfence_charts'] = _m\n\
         del _b, _s, _t, _m\n\
         __file__ = '/nonexistent/ringfence_kernel.py'\n\
         {KERNEL_PY}"
    )
}

pub async fn wait_ready(k: &mut Kernel, cwd: &str) -> Result<(), String> {
    match tokio::time::timeout(START_TIMEOUT, k.output.recv()).await {
        Ok(Some(v)) if v.get("type").and_then(Value::as_str) == Some("ready") => Ok(()),
        Ok(Some(v))
            if v.get("type").and_then(Value::as_str) == Some("entry_failed")
                && v.get("step").and_then(Value::as_str) == Some("cwd") =>
        {
            k.killer.kill().await;
            let why: String =
                v.get("message").and_then(Value::as_str).unwrap_or("").chars().take(200).collect();
            Err(format!("{BAD_CWD}{cwd:?}: {why}"))
        }
        Ok(Some(v)) => {
            k.killer.kill().await;
            Err(format!("kernel did not start: {v}"))
        }
        Ok(None) => Err("kernel exited during start-up".into()),
        Err(_) => {
            k.killer.kill().await;
            Err("kernel did not become ready in time".into())
        }
    }
}

/// Splits a kernel's byte stream into JSON objects, dropping what is not one. The kernel runs
/// inside the sandbox, so its output is hostile input: the split is linear in the bytes fed
/// (one scan, one shift of the leftover per chunk) and a line may not outgrow `MAX_LINE`.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

/// A kernel sent more than `MAX_LINE` bytes without ending its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("kernel line longer than {MAX_LINE} bytes")]
pub struct LineTooLong;

impl LineSplitter {
    /// The JSON objects completed by `data`, in order; lines that are not one are dropped.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Value>, LineTooLong> {
        Ok(self.push_sized(data)?.into_iter().map(|(v, _)| v).collect())
    }

    /// As [`Self::push`], each object with the length of its line (what it weighs in the
    /// byte-bounded channel to the client).
    fn push_sized(&mut self, data: &[u8]) -> Result<Vec<(Value, usize)>, LineTooLong> {
        // Only the new bytes can hold the next newline: no rescans of a long partial line.
        let mut from = self.buf.len();
        self.buf.extend_from_slice(data);
        let mut start = 0;
        let mut out = Vec::new();
        while let Some(pos) = self.buf[from..].iter().position(|b| *b == b'\n') {
            let end = from + pos;
            match serde_json::from_slice::<Value>(&self.buf[start..end]) {
                Ok(v @ Value::Object(_)) => out.push((v, end + 1 - start)),
                _ => tracing::debug!("kernel sent a line that is not a JSON object"),
            }
            start = end + 1;
            from = start;
        }
        // One shift per chunk, however many lines it held (draining line by line was
        // quadratic in the number of short lines in a chunk).
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            self.buf = Vec::new();
            return Err(LineTooLong);
        }
        Ok(out)
    }

    /// False once the kernel broke the protocol (a line too long) or nobody listens.
    async fn feed(&mut self, data: &[u8], out: &bounded::Sender<Value>) -> bool {
        let Ok(values) = self.push_sized(data) else { return false };
        for (v, len) in values {
            if out.send(v, len).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Fields each message type may carry to the client; everything else a kernel adds is dropped.
pub fn sanitize(mut v: Map<String, Value>) -> Option<Value> {
    let kind = v.get("type")?.as_str()?.to_string();
    let keep: &[&str] = match kind.as_str() {
        "number_of_executions" => &["execution_count"],
        "stdout" | "stderr" => &["text", "timestamp"],
        "error" => &["name", "value", "traceback"],
        "result" => &[
            "text",
            "html",
            "markdown",
            "svg",
            "png",
            "jpeg",
            "pdf",
            "latex",
            "json",
            "javascript",
            "data",
            "chart",
            "extra",
            "is_main_result",
        ],
        "end_of_execution" => &[],
        _ => return None,
    };
    v.retain(|k, _| k == "type" || keep.contains(&k.as_str()));
    if kind == "error" {
        for f in ["name", "value", "traceback"] {
            if !v.get(f).is_some_and(Value::is_string) {
                v.insert(f.into(), Value::String(String::new()));
            }
        }
    }
    if matches!(kind.as_str(), "stdout" | "stderr") && !v.get("text").is_some_and(Value::is_string)
    {
        return None;
    }
    Some(Value::Object(v))
}

/// Where the interpreter environment lives unless `serve` is told otherwise.
pub fn default_env_dir() -> PathBuf {
    PathBuf::from(ringfence_jail::template::DEFAULT_INTERP_ENV)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_only_e2b_fields() {
        let m = |v: Value| v.as_object().cloned().unwrap();
        let out = sanitize(m(json!({"type": "stdout", "text": "hi", "timestamp": "t", "x": 1})));
        assert_eq!(out, Some(json!({"type": "stdout", "text": "hi", "timestamp": "t"})));
        // Unknown types (including the kernel's own `ready`) never reach the client.
        assert_eq!(sanitize(m(json!({"type": "ready", "pid": 3}))), None);
        assert_eq!(sanitize(m(json!({"type": 5}))), None);
        // An error always has its three fields, as the SDK requires.
        let e = sanitize(m(json!({"type": "error", "name": "E", "traceback": 7}))).unwrap();
        assert_eq!(e, json!({"type": "error", "name": "E", "value": "", "traceback": ""}));
        // Output without text is dropped rather than crashing the SDK's parser.
        assert_eq!(sanitize(m(json!({"type": "stderr"}))), None);
    }

    #[tokio::test]
    async fn splitter_parses_lines_across_chunks_and_drops_garbage() {
        let (tx, mut rx) = bounded::channel(1 << 20);
        let mut s = LineSplitter::default();
        assert!(s.feed(b"{\"type\":\"std", &tx).await);
        assert!(s.feed(b"out\"}\nnot json\n[1]\n{\"a\":1}\n", &tx).await);
        drop(tx);
        assert_eq!(rx.recv().await, Some(json!({"type": "stdout"})));
        assert_eq!(rx.recv().await, Some(json!({"a": 1})));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn splitter_refuses_an_endless_line() {
        let (tx, _rx) = bounded::channel(1 << 20);
        let mut s = LineSplitter::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut ok = true;
        for _ in 0..=(MAX_LINE >> 20) {
            ok = s.feed(&chunk, &tx).await;
        }
        assert!(!ok, "a kernel that never ends its line is cut off");
    }

    #[test]
    fn only_contexts_under_root_run_as_the_sandboxs_root() {
        assert_eq!(user_for("/root"), SandboxUser::Root);
        assert_eq!(user_for("/root/project"), SandboxUser::Root);
        assert_eq!(user_for("/home/user"), SandboxUser::User);
        assert_eq!(user_for("/rootfs"), SandboxUser::User);
        assert_eq!(user_for("/tmp/root"), SandboxUser::User);
    }

    #[test]
    fn languages_normalise_like_e2b() {
        assert_eq!(normalize("JS"), Some("javascript"));
        assert_eq!(normalize("python3"), Some("python"));
        assert_eq!(normalize("bash"), Some("bash"));
        assert_eq!(normalize("ts"), Some("typescript"));
        assert_eq!(normalize("R"), Some("r"));
        assert_eq!(normalize("Rust"), Some("rust"));
        assert_eq!(normalize("kotlin"), None);
    }
}
