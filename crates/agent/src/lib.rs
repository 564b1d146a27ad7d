//! The sandbox agent, PID 1 of every sandbox. The `ringfence-agent` executable (a binary of the
//! `ringfence` package, so the CLI's tests can locate it) only calls [`main`].
//!
//! Started by the host in fresh namespaces with the control channel on fd 3, it
//! 1. reads its [`SetupSpec`], builds the sandbox (`ringfence_jail::inside`), and hands the
//!    seccomp listener to the host;
//! 2. then either runs one command and exits with it (`ringfence run`), or serves requests
//!    (processes, PTYs, files, watches) until the host closes the channel.
//!
//! As PID 1 it reaps every orphan in the sandbox. It never writes to fds 0–2 (they belong to
//! the command in one-shot mode); diagnostics go to the host as `Event::Log`.

#![forbid(unsafe_code)]

mod fs;
mod gvisor_net;
mod microvm;
mod serve;
mod spawn;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use ringfence_jail::launch::{
    ACK_SEND, ACK_TAKEN, MARK_ERROR, MARK_LISTENER, MARK_NO_LISTENER, MARK_PULL,
};
use ringfence_proto::{Event, ExitStatus, Ready, SetupSpec, Usage, encode, read_frame};

/// Entry point of the `ringfence-agent` executable.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // A host process parked in a cgroup slot, which starts that slot's sandboxes
    // (`ringfence_jail::spawner`); it runs no sandbox code itself.
    if let [_, flag, socket_flag, socket] = &args[..]
        && flag == "--spawner"
        && socket_flag == "--socket"
    {
        return match ringfence_jail::spawner::serve(std::path::Path::new(socket), jail_init) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    let tier = match args.iter().skip(1).map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["--init"] => Tier::Jail,
        ["--init", "--tier", "jail"] => Tier::Jail,
        ["--init", "--tier", "gvisor"] => Tier::Gvisor,
        // PID 1 of a guest kernel: no fd 3, the channel is a virtio-serial port it finds.
        ["--init", "--tier", "microvm"] => return microvm_main(),
        _ => {
            eprintln!(
                "ringfence-agent is started by ringfence inside a new sandbox; it is not run by \
                 hand (usage: ringfence-agent --init [--tier jail|gvisor|microvm])"
            );
            return ExitCode::from(2);
        }
    };
    let Some(control) = control_channel() else {
        eprintln!("ringfence-agent: no control channel on fd 3");
        return ExitCode::from(2);
    };
    // The claim on this sandbox's owner uid: held open until this process exits, and kept out
    // of every process it starts.
    ringfence_sys::keep_inherited_fd(ringfence_proto::OWNER_LOCK_FD);
    if matches!(tier, Tier::Jail) {
        // As in `jail_init`: the spawner's OOM shield is not the sandbox's.
        let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    }
    match run(control, tier) {
        Ok(code) => code,
        Err(()) => ExitCode::from(1),
    }
}

/// The agent's start in a sandbox a spawner forked (see `ringfence_jail::spawner::serve`): what
/// `ringfence-agent --init` does after reading its arguments.
fn jail_init() -> i32 {
    let Some(control) = control_channel() else {
        return 2;
    };
    ringfence_sys::keep_inherited_fd(ringfence_proto::OWNER_LOCK_FD);
    // The slot's spawner shields itself from the OOM killer (-1000) and its children inherit
    // that, fork or exec: put the sandbox back among the candidates (raising it needs no
    // privilege), so a sandbox at its memory limit loses one of its own processes.
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    match run(control, Tier::Jail) {
        // Every way `run` ends well in the jail tier.
        Ok(code) if code == ExitCode::SUCCESS => 0,
        Ok(_) | Err(()) => 1,
    }
}

/// Which isolation tier started this agent, and so how much of the sandbox it builds itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Fresh namespaces: the agent builds the sandbox (`ringfence_jail::inside`).
    Jail,
    /// The init of a gVisor container: runsc already built the root, mounts, hostname, limits,
    /// capabilities and `no_new_privs` from the OCI bundle, and its user-space kernel is the
    /// boundary. Seccomp user notification and Landlock do not exist there, so the agent only
    /// hardens itself and serves (see [`gvisor_run`]).
    Gvisor,
}

/// fd 3, set up by the host before exec.
fn control_channel() -> Option<UnixStream> {
    ringfence_sys::take_control_fd().map(UnixStream::from)
}

fn send(control: &mut UnixStream, event: &Event) -> Result<(), ()> {
    let bytes = encode(event).map_err(drop)?;
    control.write_all(&bytes).map_err(drop)
}

/// Gives the host the seccomp listener and, with a tmpfs disk, the stage directory. The host
/// takes them with `pidfd_getfd`, so that no descriptor is sent from this sandbox's uid (see
/// [`MARK_PULL`]); only where that is refused do they come over the channel.
///
/// In two halves, so that the initial process can start in between, while the host takes them
/// (this, then [`complete_hand_over`]): a round trip to the host less before it starts. This
/// half tells the host what there is to take, and returns whether an answer is due.
fn offer(
    control: &mut UnixStream,
    listener: Option<&OwnedFd>,
    stage: Option<&OwnedFd>,
) -> Result<bool, ()> {
    if listener.is_none() && stage.is_none() {
        ringfence_sys::send_with_fd(control.as_raw_fd(), &[MARK_NO_LISTENER], None)
            .map_err(drop)?;
        return Ok(false);
    }
    let mut msg = vec![MARK_PULL];
    for fd in [listener, stage] {
        msg.extend_from_slice(&fd.map_or(-1, AsRawFd::as_raw_fd).to_le_bytes());
    }
    control.write_all(&msg).map_err(drop)?;
    Ok(true)
}

/// The second half of [`offer`]: waits for the host to have taken the descriptors, or
/// sends them where it could not take them.
fn complete_hand_over(
    control: &mut UnixStream,
    listener: Option<&OwnedFd>,
    stage: Option<&OwnedFd>,
) -> Result<(), ()> {
    let mut ack = [0u8; 1];
    std::io::Read::read_exact(control, &mut ack).map_err(drop)?;
    match ack[0] {
        ACK_TAKEN => Ok(()),
        ACK_SEND => {
            let mark = if listener.is_some() { MARK_LISTENER } else { MARK_NO_LISTENER };
            let fds: Vec<_> = listener.iter().chain(stage.iter()).map(|f| f.as_raw_fd()).collect();
            ringfence_sys::send_with_fds(control.as_raw_fd(), &[mark], &fds).map_err(drop)
        }
        _ => Err(()),
    }
}

/// Receives the `count` lower-layer mounts the host sends after the setup frame, one per
/// one-byte message.
fn receive_lowers(control: &UnixStream, count: u32) -> Result<Vec<OwnedFd>, String> {
    // A template and its snapshot chain; far more is a confused host, not a real sandbox.
    const MAX_LOWERS: u32 = 500;
    if count > MAX_LOWERS {
        return Err(format!("{count} lower layers is more than {MAX_LOWERS}"));
    }
    let mut lowers = Vec::with_capacity(count as usize);
    while lowers.len() < count as usize {
        let mut mark = [0u8; 1];
        let (n, mut fds) = ringfence_sys::recv_with_fds(control.as_raw_fd(), &mut mark)
            .map_err(|e| e.to_string())?;
        if n != 1 || mark[0] != ringfence_proto::LOWER_MARK || fds.len() != 1 {
            return Err(format!(
                "expected a lower layer ({} of {count}), got {n} bytes and {} descriptors",
                lowers.len() + 1,
                fds.len()
            ));
        }
        lowers.extend(fds.pop());
    }
    Ok(lowers)
}

fn run(mut control: UnixStream, tier: Tier) -> Result<ExitCode, ()> {
    let mut phases = Vec::new();
    ringfence_jail::phase(&mut phases, "agent_exec");
    let spec: SetupSpec = match read_frame(&mut control) {
        Ok(Some(s)) => s,
        _ => return Err(()),
    };
    if tier == Tier::Gvisor {
        ringfence_jail::phase(&mut phases, "setup_read");
        return gvisor_run(control, &spec, phases);
    }
    let lowers = match receive_lowers(
        &control,
        spec.lowers + u32::from(spec.own_disk) + spec.volumes.len() as u32,
    ) {
        Ok(l) => l,
        Err(message) => {
            let _ = ringfence_sys::send_with_fd(control.as_raw_fd(), &[MARK_ERROR], None);
            let _ =
                send(&mut control, &Event::SetupFailed { step: "receive lowers".into(), message });
            return Err(());
        }
    };
    let outcome = match ringfence_jail::inside::setup(&spec, lowers, &mut phases) {
        Ok(o) => o,
        Err(e) => {
            let _ = ringfence_sys::send_with_fd(control.as_raw_fd(), &[MARK_ERROR], None);
            let _ = send(&mut control, &Event::SetupFailed { step: e.step, message: e.message });
            return Err(());
        }
    };
    spawn::set_allow_setuid(spec.allow_setuid);
    spawn::set_sandbox_env(spec.env.clone());
    let listener: Option<OwnedFd> = outcome.listener;
    let stage: Option<OwnedFd> = outcome.stage;
    let answer_due = offer(&mut control, listener.as_ref(), stage.as_ref())?;
    // The initial process starts while the host takes the descriptors (a round trip less
    // before it runs). It gets neither: both are close-on-exec, and it is exec'd before any
    // code of its own runs. Nothing else in the sandbox can reach them in the meantime: this
    // process is not dumpable (its /proc/1/fd is closed to every process in here, the
    // sandbox's capability-less root included) and `pidfd_getfd` is outside the seccomp
    // allowlist. A call of the initial process that the filter refers to the host waits
    // until the host supervises it.
    let (initial_pid, initial_error) = start_initial(&spec, &mut phases);
    // A server's sandbox on a disk of its own (no initial process, no stage to hand over)
    // sends `Ready` before waiting for the host's answer: the host reads it as soon as it has
    // answered, one round trip fewer per start (`SetupSpec::ready_before_answer`, which the
    // host's `Sandbox::start` reads too). Nothing runs in such a sandbox before this agent has
    // completed the hand-over and serves a request. A stage is always settled before `Ready`,
    // so that when the host's start returns the agent holds no directory.
    let early_ready = answer_due && spec.ready_before_answer();
    let deferred = if early_ready {
        Some(listener)
    } else {
        if answer_due {
            complete_hand_over(&mut control, listener.as_ref(), stage.as_ref())?;
        }
        // The host supervises the filter; nothing in here may keep the listener. The stage
        // (a tmpfs writable layer's parent) is the host's too: kept here, it would be a way
        // out of the sandbox's root through /proc/1/fd.
        drop(listener);
        None
    };
    drop(stage);
    if outcome.landlock_abi.is_none() && !spec.writable.is_empty() {
        let _ = send(
            &mut control,
            &Event::Log {
                level: ringfence_proto::LogLevel::Warn,
                message: "Landlock is not available on this kernel; running without it".into(),
            },
        );
    }

    report_and_serve(
        control,
        &spec,
        phases,
        (outcome.landlock_abi, deferred),
        outcome.reconnect,
        (initial_pid, initial_error),
    )
}

/// What every tier's agent does once its sandbox is built: start the initial process if there
/// is one, report ready, then either see the one-shot process through or serve requests.
fn start_and_serve(
    control: UnixStream,
    spec: &SetupSpec,
    mut phases: Vec<ringfence_proto::Phase>,
    landlock_abi: Option<u32>,
    reconnect: Option<std::os::unix::net::UnixListener>,
) -> Result<ExitCode, ()> {
    let initial = start_initial(spec, &mut phases);
    report_and_serve(control, spec, phases, (landlock_abi, None), reconnect, initial)
}

/// Starts the initial process, if the setup names one: its pid, or why it could not start.
fn start_initial(
    spec: &SetupSpec,
    phases: &mut Vec<ringfence_proto::Phase>,
) -> (Option<u32>, Option<ringfence_proto::AgentError>) {
    match &spec.initial {
        None => (None, None),
        Some(init) => match spawn::spawn_inherit(init) {
            Ok(pid) => {
                ringfence_jail::phase(phases, "spawned");
                (Some(pid), None)
            }
            Err(e) => (None, Some(e)),
        },
    }
}

/// Reports the sandbox ready (with its initial process's pid, or the error that kept it from
/// starting), then sees the one-shot process through or serves requests.
fn report_and_serve(
    mut control: UnixStream,
    spec: &SetupSpec,
    phases: Vec<ringfence_proto::Phase>,
    (landlock_abi, deferred): (Option<u32>, Option<Option<OwnedFd>>),
    reconnect: Option<std::os::unix::net::UnixListener>,
    (initial_pid, initial_error): (Option<u32>, Option<ringfence_proto::AgentError>),
) -> Result<ExitCode, ()> {
    send(&mut control, &Event::Ready(Ready { phases, landlock_abi, initial_pid }))?;
    // The hand-over `run` left until after `Ready` (see there): completed before any request
    // is served, and this process's copy of the listener closed.
    if let Some(listener) = deferred {
        complete_hand_over(&mut control, listener.as_ref(), None)?;
    }
    if let Some(err) = initial_error {
        send(&mut control, &Event::Response { id: 0, result: Err(err) })?;
        if spec.exit_with_initial {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if spec.exit_with_initial {
        if let Some(pid) = initial_pid {
            return one_shot(&mut control, pid);
        }
        return Ok(ExitCode::SUCCESS);
    }
    serve::serve(control, initial_pid, reconnect).map(|()| ExitCode::SUCCESS)
}

/// What the agent does in a gVisor container before it can say anything (see [`Tier::Gvisor`]).
fn gvisor_harden(
    phases: &mut Vec<ringfence_proto::Phase>,
) -> Result<(), ringfence_jail::inside::InsideError> {
    // As in the jail: nothing in the sandbox, not even its root, may ptrace PID 1 or read its
    // memory, fds or environment through /proc. gVisor implements PR_SET_DUMPABLE itself.
    let fail = |step: &str| {
        let step = step.to_string();
        move |e: nix::Error| ringfence_jail::inside::InsideError { step, message: e.to_string() }
    };
    nix::sys::prctl::set_dumpable(false).map_err(fail("prctl(PR_SET_DUMPABLE)"))?;
    // gVisor's /proc, unlike Linux's, lets any process in the sandbox open another's
    // descriptors that are host files: runsc's stdio (the host's /dev/null and the runsc log)
    // must not be ours to lend. The sentry's own /dev/null takes their place; what the agent
    // would have said on them goes over the control channel.
    let null =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| {
            ringfence_jail::inside::InsideError {
                step: "open /dev/null".into(),
                message: e.to_string(),
            }
        })?;
    nix::unistd::dup2_stdin(&null).map_err(fail("dup2 stdin"))?;
    nix::unistd::dup2_stdout(&null).map_err(fail("dup2 stdout"))?;
    nix::unistd::dup2_stderr(&null).map_err(fail("dup2 stderr"))?;
    ringfence_jail::phase(phases, "gvisor_stdio");
    Ok(())
}

/// The gVisor sandbox's network device and relay, and the listener a restarted server
/// re-attaches through. Returns that listener.
fn gvisor_attach(
    spec: &SetupSpec,
    phases: &mut Vec<ringfence_proto::Phase>,
) -> Result<Option<std::os::unix::net::UnixListener>, ringfence_jail::inside::InsideError> {
    if let Some(relay) = &spec.packet_relay {
        let inside = |step: &str, message: String| ringfence_jail::inside::InsideError {
            step: step.to_string(),
            message,
        };
        let fd = match ringfence_sys::take_relay_fd() {
            Some(fd) if relay.fd == ringfence_sys::RELAY_FD => fd,
            _ => return Err(inside("network", format!("no packet relay on fd {}", relay.fd))),
        };
        gvisor_net::start(relay, fd, phases)
            .map_err(|e| inside(&format!("network: {}", e.step), e.message))?;
        // CAP_NET_ADMIN was given for the device alone: gone from every set now, so nothing
        // started later (a root command, a setuid binary) can reach it.
        let caps = ringfence_jail::inside::AGENT_CAPS;
        ringfence_sys::drop_bounding_caps(caps)
            .map_err(|e| inside("drop bounding capabilities", e.to_string()))?;
        ringfence_sys::restrict_caps(caps)
            .map_err(|e| inside("restrict capabilities", e.to_string()))?;
        ringfence_jail::phase(phases, "gvisor_net");
    }
    // Where a restarted server reconnects: a host socket gVisor makes through its gofer
    // (`runsc --host-uds=create`) in a host directory bound into the sandbox's `/dev`, only
    // root's (as the microvm's guest socket: root inside is the sandbox's anyway).
    let reconnect = match &spec.listen {
        Some(path) => {
            let io = |step: String| {
                move |e: std::io::Error| ringfence_jail::inside::InsideError {
                    step,
                    message: e.to_string(),
                }
            };
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(io(format!("listen on {path}")))?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io(format!("chmod {path}")))?;
            Some(l)
        }
        None => None,
    };
    Ok(reconnect)
}

/// The gVisor tier's start: harden, report, serve. The marker byte is written plainly: the
/// channel is a host socket that runsc imports into the sandbox (`--pass-fd`), over which
/// gVisor does not carry descriptors, and there is no seccomp listener or stage to hand over.
///
/// A server's sandbox (no initial process) reports `Ready` before it makes its network device,
/// relay and re-attach listener: about 8 ms inside gVisor on a nested host (a TUN in gVisor's
/// netstack, two netlink requests, two binds through the gofer, two relay threads, each a new
/// host thread under systrap) that now overlap the host's record of the sandbox, its answer to
/// the client and the client's first request. No request is read before they are up, so the
/// first command sees the network exactly as before. A one-shot run's command starts before
/// `Ready`, so there the device comes first.
fn gvisor_run(
    mut control: UnixStream,
    spec: &SetupSpec,
    mut phases: Vec<ringfence_proto::Phase>,
) -> Result<ExitCode, ()> {
    let fail = |control: &mut UnixStream, e: ringfence_jail::inside::InsideError| {
        let _ = control.write_all(&[MARK_ERROR]);
        let _ = send(control, &Event::SetupFailed { step: e.step, message: e.message });
    };
    if let Err(e) = gvisor_harden(&mut phases) {
        fail(&mut control, e);
        return Err(());
    }
    if spec.initial.is_some() {
        let reconnect = match gvisor_attach(spec, &mut phases) {
            Ok(l) => l,
            Err(e) => {
                fail(&mut control, e);
                return Err(());
            }
        };
        ringfence_jail::phase(&mut phases, "gvisor_setup");
        spawn::set_sandbox_env(spec.env.clone());
        control.write_all(&[MARK_NO_LISTENER]).map_err(drop)?;
        return start_and_serve(control, spec, phases, None, reconnect);
    }
    spawn::set_sandbox_env(spec.env.clone());
    control.write_all(&[MARK_NO_LISTENER]).map_err(drop)?;
    send(&mut control, &Event::Ready(Ready { phases, landlock_abi: None, initial_pid: None }))?;
    let reconnect = match gvisor_attach(spec, &mut Vec::new()) {
        Ok(l) => l,
        Err(e) => {
            // Past `Ready` the host no longer reads a setup failure: it is told in a log line,
            // and the sandbox ends with this process (the host sees its channel close).
            let _ = send(
                &mut control,
                &Event::Log {
                    level: ringfence_proto::LogLevel::Error,
                    message: format!("sandbox network setup failed: {}: {}", e.step, e.message),
                },
            );
            return Err(());
        }
    };
    serve::serve(control, None, reconnect).map(|()| ExitCode::SUCCESS)
}

/// The microvm tier's start: build the guest's root ([`microvm::boot`]), then read the setup
/// and serve as in gVisor (no seccomp listener, no stage: the guest kernel is the boundary).
/// Never returns: the guest powers off when the agent is done.
fn microvm_main() -> ExitCode {
    let mut phases = Vec::new();
    ringfence_jail::phase(&mut phases, "agent_exec");
    let (mut control, reconnect) = match microvm::boot() {
        Ok(c) => c,
        Err(e) => {
            // Only the console exists yet: the host reads it back to say why the boot failed.
            eprintln!("ringfence-agent: guest boot failed: {}", e.0);
            microvm::power_off()
        }
    };
    ringfence_jail::phase(&mut phases, "guest_root");
    let spec: SetupSpec = match read_frame(&mut control) {
        Ok(Some(s)) => s,
        _ => microvm::power_off(),
    };
    if let Err(e) = microvm_setup(&spec) {
        let _ = control.write_all(&[MARK_ERROR]);
        let _ = send(&mut control, &Event::SetupFailed { step: e.step, message: e.message });
        microvm::power_off()
    }
    spawn::set_sandbox_env(spec.env.clone());
    if control.write_all(&[MARK_NO_LISTENER]).is_ok() {
        // With the bridge's listener: a host that goes is not the end (see `microvm::bridge`).
        let _ = start_and_serve(control, &spec, phases, None, Some(reconnect));
    }
    microvm::power_off()
}

/// What the agent sets in a booted guest once it knows which sandbox it is.
fn microvm_setup(spec: &SetupSpec) -> Result<(), ringfence_jail::inside::InsideError> {
    let fail = |step: &str| {
        let step = step.to_string();
        move |e: nix::Error| ringfence_jail::inside::InsideError { step, message: e.to_string() }
    };
    nix::unistd::sethostname(&spec.sandbox_id).map_err(fail("sethostname"))?;
    if let Some(nic) = &spec.guest_nic {
        microvm::configure_nic(nic).map_err(|e| ringfence_jail::inside::InsideError {
            step: "network".into(),
            message: e.0,
        })?;
    }
    // The sandbox's process, file and core limits on the agent, inherited by all it starts.
    // The guest is the sandbox's alone, so RLIMIT_NPROC (counted per uid across the guest)
    // bounds a fork bomb of the sandbox's user below the guest's process table, and the agent
    // (root, which the limit does not hold back) can still start processes and answer.
    let r = &spec.rlimits;
    for (res, v) in [
        (nix::sys::resource::Resource::RLIMIT_NOFILE, r.nofile),
        (nix::sys::resource::Resource::RLIMIT_NPROC, r.nproc),
        (nix::sys::resource::Resource::RLIMIT_CORE, r.core),
    ] {
        nix::sys::resource::setrlimit(res, v, v).map_err(fail("setrlimit"))?;
    }
    // The console is the host's log of the guest: nothing the sandbox starts inherits it.
    let null =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| {
            ringfence_jail::inside::InsideError {
                step: "open /dev/null".into(),
                message: e.to_string(),
            }
        })?;
    nix::unistd::dup2_stdin(&null).map_err(fail("dup2 stdin"))?;
    nix::unistd::dup2_stdout(&null).map_err(fail("dup2 stdout"))?;
    nix::unistd::dup2_stderr(&null).map_err(fail("dup2 stderr"))?;
    Ok(())
}

/// Reaps everything until the initial process exits, reports it, and exits, which ends the
/// pid namespace and so every process left in it.
fn one_shot(control: &mut UnixStream, pid: u32) -> Result<ExitCode, ()> {
    // Our fds 0-2 are the command's stdio, which we never use: let go of them, so that the
    // host's readers see the command's output end when the command (and whatever it left
    // running) has closed it, not when this process has died. Our death is mostly the
    // kernel's teardown of the sandbox's namespaces, which the host need not wait for.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    // The host that ran us is gone (killed, say): so is the reason to run. A sandbox started
    // by a spawner has no parent-death signal to take it down; end-of-file on the channel
    // stands in for it. Watched without reading, so the host's messages stay in place, in the
    // same poll that waits for children (SIGCHLD through a signalfd): a watcher thread of its
    // own cost a thread's start beside the command's, on every run.
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    // Blocked only now, after the command started (it must not inherit the mask; std resets
    // it anyway): a SIGCHLD before this is not lost, the reaping below runs first.
    mask.thread_block().map_err(drop)?;
    let children = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(drop)?;
    // The host's end closing shuts both directions of a unix stream: POLLHUP, which poll
    // reports whatever was asked for.
    let gone = PollFlags::POLLHUP | PollFlags::POLLERR;
    loop {
        // Everything that has ended, orphans of the command included (we are PID 1).
        loop {
            match ringfence_sys::wait4(-1, true) {
                Ok(Some(r)) if u32::try_from(r.pid).ok() == Some(pid) => {
                    let status = match r.outcome() {
                        Ok(code) => ExitStatus::Code(code),
                        Err(sig) => ExitStatus::Signal(sig),
                    };
                    let usage = Usage {
                        user_cpu_us: r.user_us,
                        sys_cpu_us: r.sys_us,
                        max_rss_kib: r.max_rss_kib,
                    };
                    send(control, &Event::Exited { id: 0, pid, status, usage })?;
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return Err(()),
            }
        }
        let mut fds = [
            PollFd::new(control.as_fd(), PollFlags::empty()),
            PollFd::new(children.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[0].revents().is_some_and(|r| r.intersects(gone)) => std::process::exit(1),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return Err(()),
        }
        // Drained: one pending SIGCHLD stands for any number of children, all reaped above.
        while let Ok(Some(_)) = children.read_signal() {}
    }
}
