//! `ringfence run`: one command in a fresh sandbox, streamed, with its exit code.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::disk::{Disk, DiskBackend, DiskChoice, DiskPool};
use ringfence_jail::launch::{Ending, Sandbox, SandboxSpec, Seccomp};
use ringfence_jail::limits::{self, Limits};
use ringfence_jail::monitor::{SecurityEvent, Watcher};
use ringfence_jail::{JailConfig, preflight};
use ringfence_proto::{ErrorKind, Event, ExitStatus, SandboxUser, SpawnSpec, StdioMode, Usage};
use serde::Serialize;

use crate::Common;
use ringfence_server::tier::TierKind;

/// Cgroup slots used by one-shot runs (the server keeps its own).
pub const POOL_PREFIX: &str = "run";

/// Exit codes with a meaning of their own; everything else is the command's.
pub mod code {
    pub const OOM: u8 = 121;
    pub const OUTPUT_LIMIT: u8 = 122;
    pub const TIMEOUT: u8 = 124;
    pub const SETUP: u8 = 125;
    pub const NOT_EXECUTABLE: u8 = 126;
    pub const NOT_FOUND: u8 = 127;
}

const AFTER_HELP: &str = "\
Exit status:
  the command's own exit status, or 128+N if it was killed by signal N, except:
  121  out of memory: the sandbox hit --memory and a process was OOM-killed
  122  output limit: stdout or stderr exceeded --max-output; output was cut and the sandbox killed
  124  timeout: the command ran past --timeout; the whole sandbox was killed
  125  sandbox setup failure (missing root or kernel feature, bad template, ...)
  126  the command was found but could not be executed
  127  the command was not found
Each of 121-127 comes with one line on stderr starting with \"ringfence:\".

Environment: the command sees only PATH, HOME and LANG plus an image template's Env and what
--env passes (--env wins).
Denied system calls fail with EPERM and are listed in one line on stderr at exit (see --quiet).";

/// Run a command in a fresh sandbox and remove the sandbox afterwards.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct RunArgs {
    /// Memory limit for everything in the sandbox (e.g. 256M, 2G).
    #[arg(long, default_value = "512M", value_parser = at_least("--memory", 16 << 20))]
    memory: u64,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=1_000_000))]
    pids: u64,
    /// CPU quota in cores (e.g. 0.5, 2).
    #[arg(long, default_value = "1", value_parser = limits::parse_cpus)]
    cpus: u64,
    /// Size of the sandbox's writable disk; writes beyond it fail with ENOSPC.
    #[arg(long, default_value = "1G", value_parser = at_least("--disk", 1 << 20))]
    disk: u64,
    /// Where the writable layer lives: `image` (a filesystem image of the --disk size, on
    /// disk: ENOSPC at the quota, apart from --memory), `tmpfs` (memory: counts against
    /// --memory), or `auto` (image where the host can, else tmpfs with a warning).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DiskChoice))]
    disk_backend: DiskChoice,
    /// Wall-clock limit (e.g. 5s, 500ms, 2m); the whole sandbox is killed when it passes.
    #[arg(long, default_value = "300s", value_parser = limits::parse_duration)]
    timeout: Duration,
    /// Cap on each of stdout and stderr; past it output is cut and the sandbox killed.
    #[arg(long, default_value = "64M", value_parser = limits::parse_size)]
    max_output: u64,
    /// Open-file limit per process.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=20000))]
    nofile: u64,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default: the user's home).
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Who runs the command: `user` (uid 1000) or `root` (root of the sandbox's user namespace
    /// only, with no capabilities). Default: `user`, or `root` for an image template whose
    /// /etc/passwd has no uid 1000.
    #[arg(long, value_parser = parse_user)]
    user: Option<SandboxUser>,
    /// Template for the root filesystem: `host` (the host's /usr, read-only), or an image
    /// template (`ringfence template import|pull`), whose Env and WorkingDir are defaults.
    #[arg(long, default_value = "host")]
    template: String,
    /// Isolation tier: jail (namespaces, cgroups, seccomp, Landlock on the host kernel),
    /// gvisor, microvm or wasm. A tier this host cannot run is refused, naming why.
    #[arg(long, default_value = "jail", value_parser = parse_tier)]
    tier: TierKind,
    /// Don't print the denied-syscall summary.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Write a JSON report (exit, limits hit, security events, resource use) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Disable the seccomp filter (benchmarking of layer costs only).
    #[arg(long, hide = true)]
    no_seccomp: bool,
    /// Disable Landlock (benchmarking of layer costs only).
    #[arg(long, hide = true)]
    no_landlock: bool,
    /// Disable cgroup limits (benchmarking of layer costs only).
    #[arg(long, hide = true)]
    no_cgroup: bool,
    /// Move the sandbox into its cgroup slot instead of having the slot's spawner start it
    /// there (benchmarking of what spawners save only).
    #[arg(long, hide = true)]
    no_spawner: bool,
    /// Have the slot's spawner exec a fresh agent instead of forking itself into one
    /// (benchmarking of what forking saves only).
    #[arg(long, hide = true)]
    exec_agent: bool,
    /// Have the sandbox's `clone` make its network namespace instead of taking the one the
    /// slot's spawner made ahead (benchmarking of what that saves only).
    #[arg(long, hide = true)]
    no_net_ahead: bool,
    /// Make this run's disk on the start path instead of taking one made ahead (benchmarking
    /// of what disks made ahead save only).
    #[arg(long, hide = true)]
    no_disk_ahead: bool,
    /// Make the next disk beside the sandbox and remove this run's disk before exiting, as
    /// runs did before `finish_disks` (benchmarking of what finishing after exit saves only).
    #[arg(long, hide = true)]
    finish_in_place: bool,
    /// Wait for the sandbox's end (its namespaces' teardown) before answering, as runs did
    /// before `Sandbox::let_go` (benchmarking of what answering first saves only).
    #[arg(long, hide = true)]
    wait_teardown: bool,
    #[command(flatten)]
    common: Common,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// A size parser with a floor: below it the sandbox could not even be set up.
fn at_least(flag: &'static str, min: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |s| {
        let v = limits::parse_size(s).map_err(|e| e.to_string())?;
        if v < min {
            return Err(format!("{flag} {s:?} is below the minimum of {} MiB", min >> 20));
        }
        Ok(v)
    }
}

impl RunArgs {
    /// The tier asked for (`--tier`).
    pub fn tier(&self) -> TierKind {
        self.tier
    }
}

fn parse_tier(s: &str) -> Result<TierKind, String> {
    TierKind::parse(s).map_err(|e| e.to_string())
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) =
        s.split_once('=').ok_or_else(|| format!("invalid --env {s:?}: expected KEY=VALUE"))?;
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        return Err(format!("invalid --env {s:?}: empty name or NUL byte"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_user(s: &str) -> Result<SandboxUser, String> {
    SandboxUser::parse(s).ok_or_else(|| format!("invalid --user {s:?}: expected user or root"))
}

#[derive(Debug, Serialize)]
struct Report {
    sandbox_id: String,
    exit_code: u8,
    exit_status: Option<ExitStatus>,
    timed_out: bool,
    oom_killed: bool,
    output_truncated: BTreeMap<&'static str, bool>,
    security_events: Vec<SecurityEvent>,
    usage: Option<Usage>,
    memory_peak_bytes: Option<u64>,
    landlock_abi: Option<u32>,
    cgroup: Option<&'static str>,
    /// Where the writable layer lived: "image" (its own filesystem) or "tmpfs" (memory).
    disk_backend: &'static str,
    /// The disk was made ahead, by the run before this one (see `DiskPool::with_spares`).
    disk_made_ahead: bool,
    /// The network namespace was made ahead, by the slot's spawner while it was idle (see
    /// `SpawnRequest::net_ahead`).
    net_made_ahead: bool,
    setup_ms: f64,
    total_ms: f64,
    /// Milliseconds from the CLI's `main` to the end of each step.
    phases_ms: Vec<(String, f64)>,
    error: Option<String>,
}

/// The agent executable: `$RINGFENCE_AGENT`, else `ringfence-agent` beside this binary.
pub fn agent_path() -> PathBuf {
    crate::executable("RINGFENCE_AGENT", "ringfence-agent")
}

/// One output stream of the sandbox relayed to ours: where it comes from, where it goes, and
/// the flag set when it passed the cap.
struct Relayed {
    from: File,
    to: Box<dyn Write + Send>,
    over: Arc<AtomicBool>,
    total: u64,
    sink_ok: bool,
}

/// Copies the sandbox's output streams to ours, each cut at `cap` bytes (the sandbox is killed
/// when one passes it), until both end. One thread for both (it polls them): a thread each
/// cost a one-shot run a second thread start and, at the end, a second wake-up.
fn relay_outputs(
    streams: Vec<(OwnedFd, Box<dyn Write + Send>, Arc<AtomicBool>)>,
    cap: u64,
    agent: Arc<AtomicI32>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("relay".into()).spawn(move || {
        let mut open: Vec<Relayed> = streams
            .into_iter()
            .map(|(from, to, over)| Relayed {
                from: File::from(from),
                to,
                over,
                total: 0,
                sink_ok: true,
            })
            .collect();
        let mut buf = vec![0u8; 64 * 1024];
        while !open.is_empty() {
            let ready: Vec<bool> = {
                let mut fds: Vec<PollFd> =
                    open.iter().map(|r| PollFd::new(r.from.as_fd(), PollFlags::POLLIN)).collect();
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(_) => return,
                }
                fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
            };
            let mut i = 0;
            open.retain_mut(|r| {
                let go_on = !ready[i] || relay_once(r, &mut buf, cap, &agent);
                i += 1;
                go_on
            });
        }
    })
}

/// Reads what one stream has and passes it on, cut at `cap`. False once the stream is done
/// with: ended, failed, or past the cap (the sandbox is then killed).
fn relay_once(r: &mut Relayed, buf: &mut [u8], cap: u64, agent: &AtomicI32) -> bool {
    let n = match r.from.read(buf) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
        Err(_) => return false,
    };
    let allowed = cap.saturating_sub(r.total).min(n as u64) as usize;
    r.total += n as u64;
    if r.sink_ok && allowed > 0 {
        r.sink_ok = r.to.write_all(&buf[..allowed]).and_then(|()| r.to.flush()).is_ok();
    }
    if r.total > cap {
        r.over.store(true, Ordering::SeqCst);
        let pid = agent.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = ringfence_sys::kill(pid, libc::SIGKILL);
        }
        return false;
    }
    true
}

/// Decides how the command's stdin reaches it. Pipes, `/dev/null` and read-only regular files
/// are passed straight in; anything else (a terminal, a socket) is relayed through a pipe, so
/// no host terminal is ever reachable from inside.
fn stdin_source() -> io::Result<(OwnedFd, Option<JoinHandle<()>>)> {
    let stdin = io::stdin();
    let fd = stdin.as_fd();
    let meta = File::from(fd.try_clone_to_owned()?).metadata();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap_or(-1);
    let read_only = flags >= 0 && (flags & libc::O_ACCMODE) == libc::O_RDONLY;
    let direct = match &meta {
        Ok(m) => {
            let ft = m.file_type();
            ft.is_fifo() || (ft.is_file() && read_only) || is_dev_null(m)
        }
        // No stdin at all (closed fd 0): give the command /dev/null.
        Err(_) => return Ok((File::open("/dev/null")?.into(), None)),
    };
    if direct {
        return Ok((fd.try_clone_to_owned()?, None));
    }
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let mut src = File::from(fd.try_clone_to_owned()?);
    let handle = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut dst = File::from(tx);
        let _ = io::copy(&mut src, &mut dst);
    })?;
    Ok((rx, Some(handle)))
}

fn is_dev_null(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    m.file_type().is_char_device() && m.rdev() == nix::sys::stat::makedev(1, 3)
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ringfence: {msg}");
    ExitCode::from(code)
}

/// Refuses a run in a tier other than the jail: one-shot runs start the jail directly, and
/// any other tier is refused, naming `reason`, until this command runs through the tier seam
/// (`ringfence_server::tier`) as the server does.
pub fn refuse(tier: TierKind, reason: &str) -> ExitCode {
    fail(
        code::SETUP,
        format_args!("sandbox setup failed: tier {tier} is not available on this host: {reason}"),
    )
}

/// Runs `ringfence run` in the jail; `t0` is when the process entered `main` (CLOCK_MONOTONIC
/// ns).
pub fn main(args: RunArgs, t0: u64) -> ExitCode {
    match execute(args, t0) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(code::SETUP, format_args!("sandbox setup failed: {e:#}")),
    }
}

fn execute(args: RunArgs, t0: u64) -> anyhow::Result<u8> {
    let started = Instant::now();
    let mut cli_phases = Vec::new();
    ringfence_jail::phase(&mut cli_phases, "args_parsed");
    // One-shot runs start the jail directly; the caller refused any other tier (`refuse`).
    anyhow::ensure!(args.tier == TierKind::Jail, "tier {} is not the jail", args.tier);
    let agent = agent_path();
    let notify = !args.no_seccomp;
    preflight::check(&agent, notify)?;
    let mut cfg = JailConfig::with_agent(agent);
    cfg.data_dir = args.common.data_dir.clone();
    cfg.run_dir = args.common.run_dir.clone();
    let (disk, why_tmpfs) = args.disk_backend.resolve(&cfg.data_dir, false)?;
    if let (Some(why), DiskChoice::Auto) = (&why_tmpfs, args.disk_backend) {
        tracing::warn!("{}: {why}", ringfence_jail::disk::TMPFS_WARNING);
    }
    // Disks of this size are kept made ahead for the next runs (made after this one, by the
    // process `finish_disks` forks): the claim then skips the image copy, the loop device and
    // the mount. Two, so that a run that follows this one at once still finds one while the
    // next is being made.
    cfg.disk = match disk {
        DiskBackend::Image(p) if !args.no_disk_ahead => {
            DiskBackend::Image(p.with_spares(if args.finish_in_place {
                1
            } else {
                RUN_DISKS_AHEAD
            }))
        }
        other => other,
    };
    let resolved = crate::resolve::resolve(&args.template, &cfg.data_dir)?;
    let user = match (args.user, &resolved.user_note) {
        (Some(u), _) => u,
        (None, Some(note)) => {
            eprintln!("ringfence: {note}");
            resolved.user
        }
        (None, None) => resolved.user,
    };
    let pool = if args.no_cgroup {
        None
    } else {
        let layout = Layout::detect()?;
        let pool = Pool::new(layout, &cfg.cgroup_name, POOL_PREFIX, cfg.run_dir.join("cgroups"));
        Some(if args.no_spawner {
            pool
        } else {
            pool.with_spawners(cfg.agent_path.clone())
                .exec_agents(args.exec_agent)
                .prefer_own_spawners(true)
        })
    };
    let limits = Limits {
        memory: Some(args.memory),
        pids: Some(args.pids),
        cpu_millis: Some(args.cpus),
        disk: args.disk,
        nofile: args.nofile,
    };
    let (out_rx, out_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let (err_rx, err_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let (stdin_fd, _stdin_relay) = stdin_source().context("stdin")?;
    let (cmd, rest) = args.cmd.split_first().context("no command given")?;
    let id = ringfence_jail::new_sandbox_id();
    let spec = SandboxSpec {
        limits,
        landlock: !args.no_landlock,
        initial: Some(SpawnSpec {
            cmd: cmd.clone(),
            args: rest.to_vec(),
            env: args.env.iter().cloned().collect(),
            cwd: args.workdir.clone().or_else(|| resolved.workdir.clone()),
            user,
            stdio: StdioMode::Inherit,
            tag: None,
        }),
        exit_with_initial: true,
        die_with_parent: true,
        layers: resolved.layers,
        env: resolved.env,
        allow_setuid: resolved.allow_setuid,
        // Only `lo`, which nothing administers: the spawner's namespace made ahead will do.
        net_ahead: !args.no_net_ahead,
        ..SandboxSpec::new(
            id.clone(),
            resolved.template,
            // Not compiled here: the agent installs its own copy of the built-in profile,
            // compiled already where its spawner forked it (`SetupSpec::seccomp_builtin`).
            if notify { Seccomp::Builtin } else { Seccomp::Off },
            [stdin_fd.as_raw_fd(), out_tx.as_raw_fd(), err_tx.as_raw_fd()],
        )
    };
    let agent_pid = Arc::new(AtomicI32::new(0));
    let stdout_over = Arc::new(AtomicBool::new(false));
    let stderr_over = Arc::new(AtomicBool::new(false));
    let relay = relay_outputs(
        vec![
            (out_rx, Box::new(io::stdout()), stdout_over.clone()),
            (err_rx, Box::new(io::stderr()), stderr_over.clone()),
        ],
        args.max_output,
        agent_pid.clone(),
    )?;
    let deadline = started + args.timeout;
    let start_result = Sandbox::start(&cfg, pool.as_ref(), spec);
    // Only the sandbox may hold the write ends now, so the relay sees EOF when it is gone.
    drop((out_tx, err_tx, stdin_fd));
    let mut sandbox = match start_result {
        Ok(s) => s,
        Err(e) => {
            let _ = relay.join();
            return Err(e.into());
        }
    };
    // The next run's disk is made once this run is over, after this process has exited
    // (`finish_disks`): made here, beside the sandbox, it competed with it for the CPU and its
    // loop device and mount (each waiting on the kernel) held this process's exit back.
    let mut spare = match &cfg.disk {
        DiskBackend::Image(p) if !args.no_disk_ahead => Some((p.clone(), args.disk)),
        _ => None,
    };
    let beside = match spare.take() {
        Some(s) if args.finish_in_place => Some(std::thread::spawn(move || make_spare(Some(s)))),
        other => {
            spare = other;
            None
        }
    };
    // The agent has bound its disk by now: nothing of this sandbox needs to stay in the host's
    // mount namespace, so that nothing is left there if this process is SIGKILLed. Not at
    // once: the unmount waits for an RCU grace period (0.3-0.8 ms here, its expedited IPIs
    // interrupting the command), which held back a short command's answer; a command that
    // ends before `DETACH_AFTER` leaves its disk to `finish_disks`, which unmounts it anyway.
    // A run SIGKILLed before then leaves the mount to `ringfence gc`.
    let detach_at = Instant::now() + DETACH_AFTER;
    let mut detached = false;
    let setup_ms = started.elapsed().as_secs_f64() * 1e3;
    agent_pid.store(sandbox.pid, Ordering::SeqCst);
    // Denied calls are answered from this thread's loop below, not a thread of their own.
    let mut watcher = sandbox.take_listener().map(|l| Watcher::new(l, id.clone()));
    // Until every process under the filter is gone (a closed listener polls ready forever).
    let mut watching = watcher.is_some();

    let mut exit: Option<(ExitStatus, Usage)> = None;
    let mut spawn_error = None;
    let mut timed_out = false;
    let mut control = sandbox.control_clone()?;
    loop {
        let mut now = Instant::now();
        if !detached && now >= detach_at {
            sandbox.detach_disk()?;
            detached = true;
            now = Instant::now();
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        let left = deadline - now;
        // Woken for the detach too, while it is due.
        let wait = if detached { left } else { left.min(detach_at.saturating_duration_since(now)) };
        // The agent's next frame, or a denied call to answer, whichever comes first.
        let (frame, denial) = {
            let mut fds = vec![PollFd::new(control.as_fd(), PollFlags::POLLIN)];
            if let Some(w) = watcher.as_ref().filter(|_| watching) {
                fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
            }
            let ms = u16::try_from(wait.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)).context("poll the sandbox"),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if denial && let Some(w) = watcher.as_mut() {
            // False once every process under the filter is gone; what it counted stays.
            watching = w.answer_queued();
        }
        if !frame {
            continue;
        }
        control.set_read_timeout(Some(left))?;
        match ringfence_proto::read_frame::<_, Event>(&mut control) {
            Ok(Some(Event::Exited { status, usage, .. })) => {
                exit = Some((status, usage));
                break;
            }
            Ok(Some(Event::Response { result: Err(e), .. })) => {
                spawn_error = Some(e);
                break;
            }
            Ok(Some(Event::Log { message, .. })) => tracing::warn!(sandbox_id = %id, "{message}"),
            Ok(Some(_)) => {}
            // The agent is gone (killed by the output relay, or crashed).
            Ok(None) => break,
            Err(ringfence_proto::ProtoError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                timed_out = true;
                break;
            }
            Err(_) => break,
        }
    }
    sandbox.kill();
    // The agent's end, once killed, is mostly the kernel's teardown of the sandbox's
    // namespaces, which whoever waits for this run need not wait for: the output ends before
    // it (the agent let go of the command's stdio once it had started it), and the slot is
    // let go of without waiting (`Sandbox::let_go`); the disk is removed after it, by the
    // process `finish_disks` forks.
    let answer_first = !(args.wait_teardown || args.finish_in_place);
    if !answer_first {
        let _ = sandbox.wait();
    }
    let _ = relay.join();
    let mut phases = cli_phases;
    phases.extend(sandbox.phases());
    ringfence_jail::phase(&mut phases, "exited");
    let oom = sandbox.oom_kills() > 0;
    let memory_peak = sandbox.memory_peak();
    let events = watcher.map(Watcher::finish).unwrap_or_default();
    let landlock_abi = sandbox.ready.landlock_abi;
    let disk_backend = sandbox.disk_backend();
    let disk_made_ahead = sandbox.disk_made_ahead();
    let net_made_ahead = sandbox.net_made_ahead();
    // The slot is let go of now (the next run may want it); the disk goes after we exit.
    let ending = if answer_first {
        match sandbox.let_go() {
            Ok(ending) => Finish::Ending(ending),
            // Our own child (no spawner): reaped here, as before.
            Err(mut sandbox) => {
                let _ = sandbox.wait();
                Finish::Disk(sandbox.take_disk())
            }
        }
    } else {
        let disk = sandbox.take_disk();
        drop(sandbox);
        Finish::Disk(disk)
    };

    let over_out = stdout_over.load(Ordering::SeqCst);
    let over_err = stderr_over.load(Ordering::SeqCst);
    let killed_by_sigkill = matches!(exit, Some((ExitStatus::Signal(9), _)) | None);
    let (code, message): (u8, Option<String>) = if let Some(e) = &spawn_error {
        match e.kind {
            ErrorKind::NotFound => (code::NOT_FOUND, Some(e.message.clone())),
            ErrorKind::PermissionDenied => (code::NOT_EXECUTABLE, Some(e.message.clone())),
            _ => (code::SETUP, Some(format!("cannot start the command: {}", e.message))),
        }
    } else if timed_out {
        (code::TIMEOUT, Some(format!("timed out after {:?}; the sandbox was killed", args.timeout)))
    } else if over_out || over_err {
        let which = if over_out { "stdout" } else { "stderr" };
        (
            code::OUTPUT_LIMIT,
            Some(format!(
                "{which} exceeded the output limit of {} bytes; output was cut and the sandbox killed",
                args.max_output
            )),
        )
    } else if oom && killed_by_sigkill {
        (
            code::OOM,
            Some(format!("out of memory: the sandbox hit its {} byte memory limit", args.memory)),
        )
    } else if let Some((status, _)) = exit {
        (u8::try_from(status.shell_code().clamp(0, 255)).unwrap_or(255), None)
    } else {
        (code::SETUP, Some("the sandbox agent exited unexpectedly".into()))
    };
    if let Some(m) = &message {
        eprintln!("ringfence: {m}");
    }
    if !events.is_empty() && !args.quiet {
        let total: u64 = events.iter().map(|e| e.count).sum();
        let list: Vec<String> =
            events.iter().map(|e| format!("{} ({})", e.syscall, e.count)).collect();
        eprintln!("ringfence: blocked {total} system call(s): {}", list.join(", "));
    }
    if let Some(path) = &args.report {
        let report = Report {
            sandbox_id: id,
            exit_code: code,
            exit_status: exit.map(|(s, _)| s),
            timed_out,
            oom_killed: oom,
            output_truncated: BTreeMap::from([("stdout", over_out), ("stderr", over_err)]),
            security_events: events,
            usage: exit.map(|(_, u)| u),
            memory_peak_bytes: memory_peak,
            landlock_abi,
            cgroup: pool.as_ref().map(|p| p.layout().version()),
            disk_backend,
            disk_made_ahead,
            net_made_ahead,
            setup_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            phases_ms: phases
                .into_iter()
                .map(|p| (p.name, p.at_ns.saturating_sub(t0) as f64 / 1e6))
                .collect(),
            error: message,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write report {}", path.display()))?;
    }
    match beside {
        // The way before: the next disk was made beside the sandbox and waited for, the run's
        // own removed in this process.
        Some(t) => {
            drop(ending);
            let _ = t.join();
        }
        None => finish_disks(ending, spare, code),
    }
    Ok(code)
}

/// Removes this run's disk and makes the next run's in a process of its own, so that whoever
/// waits for this run does not wait for them: the filesystem's teardown, the image's deletion
/// and the next disk's loop device and mount (each of which waits on the kernel, for an RCU
/// grace period on a host as it comes) took longer than a short command's whole run. This
/// process then exits with `code` (`ringfence_sys::exit_leaving`) and the function does not
/// return; where it has more than one thread (a terminal's stdin relay), or the hand-over
/// fails, the work is done here, as before, and it returns.
fn finish_disks(ending: Finish, spare: Option<(DiskPool, u64)>, code: u8) {
    // Without a disk there is nothing to wait for: the sandbox ends on its own.
    let ending = match ending {
        Finish::Ending(e) if !e.has_disk() => Finish::Disk(None),
        other => other,
    };
    if matches!(ending, Finish::Disk(None)) && spare.is_none() {
        return;
    }
    // Whatever is buffered is written now: the hand-over leaves our streams on /dev/null.
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // The next run's disk first: the next run may be starting now. This run's once its
    // sandbox has ended (it is mounted there until then).
    let work = Box::new(move || {
        make_spare(spare);
        drop(ending.disk());
    });
    // Returns only where the work could not be handed on.
    let Err((e, work)) = ringfence_sys::exit_leaving(code, work);
    tracing::debug!(error = %e, "removing the disk in this process");
    work();
}

/// What is left of a run's sandbox once its command's outcome is known.
#[derive(Debug)]
enum Finish {
    /// Let go of before its end (`Sandbox::let_go`).
    Ending(Ending),
    /// Ended; its disk, if it had one.
    Disk(Option<Disk>),
}

impl Finish {
    /// The disk, once the sandbox has ended (waiting for that if need be).
    fn disk(self) -> Option<Disk> {
        match self {
            Finish::Ending(e) => e.wait(),
            Finish::Disk(d) => d,
        }
    }
}

/// How long a run's command runs before its disk leaves the host's mount namespace (see
/// `execute`).
const DETACH_AFTER: Duration = Duration::from_millis(20);

/// How many disks one-shot runs keep made ahead (see `execute`).
const RUN_DISKS_AHEAD: usize = 2;

fn make_spare(spare: Option<(DiskPool, u64)>) {
    if let Some((pool, bytes)) = spare
        && let Err(e) = pool.replenish(bytes)
    {
        tracing::debug!(error = %e, "making a disk ahead for the next run");
    }
}
