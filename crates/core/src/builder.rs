//! The one template builder's sandbox side: RUN steps of a build (`ringfence template build`
//! on the command line, the Template SDK's builds through `ringfence serve`) in one-shot jail
//! sandboxes ([`JailRunner`], a [`ringfence_image::build::Runner`]). The steps, their cache
//! and the layers are `ringfence_image::build`'s.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringfence_image::build::{BuildProgress, RunAs, RunOutcome, RunRequest, Runner};
use ringfence_jail::JailConfig;
use ringfence_jail::cgroup::Pool;
use ringfence_jail::launch::{Sandbox, SandboxSpec, Seccomp};
use ringfence_jail::limits::Limits;
use ringfence_jail::seccomp::Compiled;
use ringfence_jail::template::{Meta, Template};
use ringfence_proto::{Envelope, Event, ExitStatus, Request, SandboxUser, SpawnSpec, StdioMode};

/// Gives a RUN step's sandbox its network before the step's command starts: called with the
/// sandbox's network namespace (`/proc/<agent>/ns/net`) and its id. The network lives as long
/// as the returned value (held until the step ends); `Ok(None)`: no network.
pub type NetHook =
    Box<dyn Fn(&Path, &str) -> Result<Option<ringfence_net::SandboxNet>, String> + Send + Sync>;

/// Runs RUN steps in one-shot jail sandboxes: the namespaces, seccomp (with its supervisor),
/// cgroup limits and disk quota of any sandbox; with no network (loopback only) unless a
/// [`NetHook`] gives the operator's build egress ([`JailRunner::with_network`]).
pub struct JailRunner {
    cfg: JailConfig,
    pool: Option<Pool>,
    seccomp: Compiled,
    limits: Limits,
    timeout: Duration,
    net: Option<NetHook>,
}

impl std::fmt::Debug for JailRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailRunner")
            .field("limits", &self.limits)
            .field("timeout", &self.timeout)
            .field("network", &self.net.is_some())
            .finish_non_exhaustive()
    }
}

impl JailRunner {
    /// A runner whose sandboxes get `limits` and are killed after `timeout` each.
    pub fn new(
        cfg: JailConfig,
        pool: Option<Pool>,
        seccomp: Compiled,
        limits: Limits,
        timeout: Duration,
    ) -> JailRunner {
        JailRunner { cfg, pool, seccomp, limits, timeout, net: None }
    }

    /// RUN steps get the network `hook` attaches (the operator's build egress).
    pub fn with_network(mut self, hook: NetHook) -> JailRunner {
        self.net = Some(hook);
        self
    }
}

enum Msg {
    Out(Vec<u8>),
    Exited(ExitStatus),
    SpawnFailed(String),
    Gone,
}

impl Runner for JailRunner {
    fn run(
        &mut self,
        req: &RunRequest<'_>,
        save_to: &Path,
        progress: &mut dyn BuildProgress,
    ) -> Result<RunOutcome, String> {
        self.run_inner(req, save_to, progress)
    }
}

impl JailRunner {
    fn run_inner(
        &mut self,
        req: &RunRequest<'_>,
        save_to: &Path,
        progress: &mut dyn BuildProgress,
    ) -> Result<RunOutcome, String> {
        let (cmd, rest) = req.argv.split_first().ok_or("an empty command")?;
        let template = Template {
            name: "build".into(),
            rootfs: req.skeleton.to_path_buf(),
            meta: Meta { format: 0, host_layers: Vec::new() },
        };
        // One pipe for stdout and stderr: the display shows them interleaved as written.
        let (out_rx, out_tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let devnull: OwnedFd =
            File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?.into();
        let id = ringfence_jail::new_sandbox_id();
        let spec = SandboxSpec {
            limits: self.limits,
            // The build writes the image's own directories (/usr, /etc, ...): everything in
            // the sandbox's root filesystem is writable, which changes only this sandbox's
            // upper layer. The namespaces, seccomp and cgroup limits are those of any sandbox.
            writable: vec!["/".into()],
            // The command is started over the control channel once the sandbox's network is
            // attached (a step must not start before its network exists).
            initial: None,
            exit_with_initial: false,
            die_with_parent: true,
            layers: req.lowers.to_vec(),
            env: BTreeMap::new(),
            ..SandboxSpec::new(
                id,
                template,
                Seccomp::Compiled(self.seccomp.clone()),
                [devnull.as_raw_fd(), out_tx.as_raw_fd(), out_tx.as_raw_fd()],
            )
        };
        let (tx, rx) = mpsc::channel::<Msg>();
        let out_thread = {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("build-output".into())
                .spawn(move || {
                    let mut src = File::from(out_rx);
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        match src.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send(Msg::Out(buf[..n].to_vec())).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| format!("start a thread: {e}"))?
        };
        let started = Instant::now();
        let result = Sandbox::start(&self.cfg, self.pool.as_ref(), spec);
        drop((out_tx, devnull));
        let mut sandbox = match result {
            Ok(s) => s,
            Err(e) => {
                drop(tx);
                let _ = out_thread.join();
                return Err(format!("start the build sandbox: {e}"));
            }
        };
        // Denied system calls get EPERM from the supervisor, as in `ringfence run`.
        let _supervisor = match sandbox.take_listener() {
            Some(l) => Some(
                ringfence_jail::monitor::Supervisor::start(l, sandbox.id.clone())
                    .map_err(|e| format!("start the seccomp supervisor: {e}"))?,
            ),
            None => None,
        };
        let _net = match &self.net {
            Some(hook) => {
                let netns = std::path::PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid));
                match hook(&netns, &sandbox.id) {
                    Ok(n) => n,
                    Err(e) => {
                        sandbox.kill();
                        let _ = sandbox.wait();
                        drop(tx);
                        let _ = out_thread.join();
                        return Err(format!("the build sandbox's network: {e}"));
                    }
                }
            }
            None => None,
        };
        let spawn = Envelope {
            id: 1,
            request: Request::Spawn(SpawnSpec {
                cmd: cmd.clone(),
                args: rest.to_vec(),
                env: req.env.clone(),
                cwd: Some(req.workdir.clone()),
                user: match req.user {
                    RunAs::Root => SandboxUser::Root,
                    RunAs::User => SandboxUser::User,
                },
                stdio: StdioMode::Inherit,
                tag: None,
            }),
        };
        if let Err(e) = ringfence_proto::write_frame(&mut sandbox.control(), &spawn) {
            sandbox.kill();
            let _ = sandbox.wait();
            drop(tx);
            let _ = out_thread.join();
            return Err(format!("start the step's command: {e}"));
        }
        let mut control =
            sandbox.control_clone().map_err(|e| format!("the control channel: {e}"))?;
        let ctl_thread = std::thread::Builder::new()
            .name("build-control".into())
            .spawn(move || {
                loop {
                    match ringfence_proto::read_frame::<_, Event>(&mut control) {
                        Ok(Some(Event::Exited { status, .. })) => {
                            let _ = tx.send(Msg::Exited(status));
                            break;
                        }
                        Ok(Some(Event::Response { result: Err(e), .. })) => {
                            let _ = tx.send(Msg::SpawnFailed(e.message));
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            let _ = tx.send(Msg::Gone);
                            break;
                        }
                    }
                }
            })
            .map_err(|e| format!("start a thread: {e}"))?;
        let deadline = started + self.timeout;
        let mut end: Option<Result<ExitStatus, String>> = None;
        let mut outputs_done = false;
        loop {
            let now = Instant::now();
            if end.is_none() && now >= deadline {
                end = Some(Err(format!(
                    "timed out after {:?} (--step-timeout); the sandbox was killed",
                    self.timeout
                )));
                sandbox.kill();
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Out(b)) => progress.output(&b),
                Ok(Msg::Exited(s)) => {
                    end.get_or_insert(Ok(s));
                }
                Ok(Msg::SpawnFailed(m)) => {
                    end.get_or_insert(Err(format!("cannot start the command: {m}")));
                }
                Ok(Msg::Gone) => {
                    end.get_or_insert(Err(
                        "the sandbox ended without the command's exit status".into()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => progress.output(&[]),
                Err(mpsc::RecvTimeoutError::Disconnected) => outputs_done = true,
            }
            if end.is_some() && outputs_done {
                break;
            }
            if end.is_some() {
                // Everything the command wrote is in the pipe once the sandbox is gone: end it
                // (its agent exits with the command anyway) and drain.
                sandbox.kill();
            }
        }
        let _ = sandbox.wait();
        let _ = out_thread.join();
        let _ = ctl_thread.join();
        let oom = sandbox.oom_kills() > 0;
        let outcome = match end {
            Some(Ok(ExitStatus::Code(0))) => {
                let upper =
                    sandbox.upper_dir().ok_or("the sandbox's writable layer is not reachable")?;
                let stats = ringfence_jail::layer::save(&upper, save_to, sandbox.id_base())
                    .map_err(|e| format!("save the step's layer: {e}"))?;
                let dropped = scrub_identity(save_to, &sandbox.id);
                RunOutcome::Saved {
                    entries: stats.files.saturating_sub(dropped),
                    bytes: stats.bytes,
                }
            }
            Some(Ok(ExitStatus::Code(c))) => RunOutcome::Failed(format!("exit code {c}")),
            Some(Ok(ExitStatus::Signal(s))) if oom => RunOutcome::Failed(format!(
                "killed by signal {s}: out of memory (--memory {})",
                self.limits.memory.unwrap_or(0)
            )),
            Some(Ok(ExitStatus::Signal(s))) => RunOutcome::Failed(format!("killed by signal {s}")),
            Some(Err(why)) => RunOutcome::Failed(why),
            None => RunOutcome::Failed("the sandbox ended unexpectedly".into()),
        };
        drop(sandbox);
        Ok(outcome)
    }
}

/// Removes from a saved RUN layer the identity files the agent writes into every sandbox's
/// upper layer (`/etc/hostname`, `/etc/hosts` naming the build sandbox), unless the step
/// changed them, and `/etc` itself if nothing else of it is left. Every sandbox started from
/// the template writes its own. Returns how many entries went.
fn scrub_identity(layer: &Path, sandbox_id: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let etc = layer.join("etc");
    let mut dropped = 0;
    let ours = [
        ("hostname", format!("{sandbox_id}\n")),
        ("hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{sandbox_id}\n")),
    ];
    for (name, text) in ours {
        let p = etc.join(name);
        let unchanged = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file())
            && std::fs::read(&p).is_ok_and(|b| b == text.as_bytes());
        if unchanged && std::fs::remove_file(&p).is_ok() {
            dropped += 1;
        }
    }
    let bare = std::fs::symlink_metadata(&etc)
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.gid() == 0 && m.mode() & 0o7777 == 0o755)
        && ringfence_sys::xattrs_with_prefix(&etc, "user.").unwrap_or_default().is_empty();
    if bare && std::fs::remove_dir(&etc).is_ok() {
        dropped += 1;
    }
    dropped
}

/// The build egress of `ringfence template build` on the command line (no server): its own
/// runtime for the network stacks, the operator's `--build-egress`, and every decision
/// written to the audit trail of the data directory's database (`ringfence audit`), as a
/// server's builds are. Drop it after the build.
pub struct CliNetwork {
    /// `Some` until dropped (shut down first, which ends the stacks' tasks and their sinks).
    rt: Option<tokio::runtime::Runtime>,
    egress: std::sync::Arc<ringfence_net::Egress>,
    policy: ringfence_net::policy::SandboxPolicy,
    audit: mpsc::SyncSender<crate::store::AuditRecord>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for CliNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CliNetwork").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl CliNetwork {
    /// `Ok(None)` when `egress` gives builds no network. `dns`: the resolver's upstreams
    /// (empty: the host's /etc/resolv.conf). `ceiling`: the server's `--egress-allow` /
    /// `--egress-deny` (its `--egress-exempt` is ignored: builds never get the blocked
    /// ranges). `db`: the state database the audit records go to.
    pub fn new(
        egress: &crate::network::BuildEgress,
        ceiling: ringfence_net::policy::Ceiling,
        dns: Vec<std::net::SocketAddr>,
        db: &Path,
    ) -> Result<Option<CliNetwork>, String> {
        let Some(policy) = egress.policy() else { return Ok(None) };
        let dns = if dns.is_empty() {
            ringfence_net::dns::system_upstreams(Path::new("/etc/resolv.conf"))
        } else {
            dns
        };
        let cfg = ringfence_net::NetConfig {
            ceiling: ringfence_net::policy::Ceiling { exempt: Vec::new(), ..ceiling },
            dns_upstreams: dns,
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("start the build network's runtime: {e}"))?;
        let egress = {
            let _in = rt.enter();
            ringfence_net::Egress::new(cfg).map_err(|e| e.to_string())?
        };
        let store = crate::store::Store::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
        // Records are written by one thread, off the network stack's: the stack must not
        // wait on a database commit.
        let (tx, rx) = mpsc::sync_channel::<crate::store::AuditRecord>(4096);
        let writer = std::thread::Builder::new()
            .name("build-audit".into())
            .spawn(move || {
                while let Ok(mut rec) = rx.recv() {
                    if let Err(e) = store.insert_audit(&mut rec) {
                        tracing::error!(error = %e, "a build egress record was lost");
                    }
                }
            })
            .map_err(|e| format!("start a thread: {e}"))?;
        Ok(Some(CliNetwork { rt: Some(rt), egress, policy, audit: tx, writer: Some(writer) }))
    }

    /// The hook a [`JailRunner`] calls for each RUN step of build `template`.
    pub fn hook(&self, template: &str) -> Option<NetHook> {
        let handle = self.rt.as_ref()?.handle().clone();
        let (egress, policy, audit) =
            (self.egress.clone(), self.policy.clone(), self.audit.clone());
        let template = template.to_string();
        Some(Box::new(move |netns, sandbox| {
            let (audit, template, sandbox_id) =
                (audit.clone(), template.clone(), sandbox.to_string());
            let sink = std::sync::Arc::new(move |e: ringfence_net::EgressEvent| {
                let mut rec = crate::store::AuditRecord::new("network.egress", e.ts_ms);
                rec.duration_ms = e.duration_ms;
                if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&e) {
                    rec.detail = m;
                    rec.detail.remove("ts_ms");
                    rec.detail.remove("duration_ms");
                }
                rec.sandbox_id = Some(sandbox_id.clone());
                rec.user_id = Some("operator".into());
                rec.detail.insert("template".into(), serde_json::json!(template));
                rec.detail.insert("build".into(), serde_json::json!("cli"));
                // A full queue drops the record rather than stall the network stack.
                let _ = audit.try_send(rec);
            });
            let _in = handle.enter();
            egress.attach(netns, policy.clone(), None, sink).map(Some).map_err(|e| e.to_string())
        }))
    }
}

impl Drop for CliNetwork {
    fn drop(&mut self) {
        // The writer ends once every sender is gone: the network stacks' sinks (their tasks end
        // with the runtime), the hooks (dropped with the runner, before this) and ours.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let (dead, _) = mpsc::sync_channel(0);
        self.audit = dead;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
