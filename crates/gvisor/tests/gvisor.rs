//! The gvisor tier end to end: the real agent as the init of a runsc container, driven over its
//! control channel with the agent protocol, and the jail's hostile cases tried against it.
//!
//! Needs root, runsc with a working platform (scripts/install-runsc.sh) and the debug
//! `ringfence-agent` (`cargo build --workspace`); without them each test prints SKIPPED.

// Helpers outside #[test] functions panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ringfence_gvisor::{Container, GvisorConfig, Network, Probe, StartSpec};
use ringfence_jail::limits::Limits;
use ringfence_jail::template::{self, Template};
use ringfence_proto::{
    Envelope, Event, ExitStatus, ProtoError, Reply, Request, SandboxUser, SpawnSpec, StdioMode,
    encode, read_frame,
};

const UID_BASE: u32 = 100_000_000;
const WAIT: Duration = Duration::from_secs(20);

/// What every test shares: the probed runsc, a template and a state directory.
struct Env {
    cfg: GvisorConfig,
    template: Template,
    _data: tempfile::TempDir,
}

fn agent_path() -> Option<PathBuf> {
    // target/<triple>/debug/deps/<test> -> target/<triple>/debug/ringfence-agent
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("ringfence-agent");
    p.is_file().then_some(p)
}

fn env() -> Result<&'static Env, String> {
    static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("needs root (runsc, mounts, cgroups)".into());
        }
        let agent = agent_path()
            .ok_or("the debug ringfence-agent is not built: run cargo build --workspace")?;
        let state = PathBuf::from("/run/ringfence-test/gvisor");
        std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        let runsc = match ringfence_gvisor::probe(&state) {
            Probe::Available(r) => r,
            Probe::Unavailable { reason } => return Err(reason),
        };
        // Searchable by the sandbox's ids: not a 0700 temporary directory.
        let data = tempfile::Builder::new().prefix("rf-gvisor-").tempdir_in("/var/tmp").unwrap();
        std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let template = template::ensure_host(data.path(), UID_BASE).map_err(|e| e.to_string())?;
        let mut cfg = GvisorConfig::new(runsc, agent);
        cfg.state_dir = state;
        cfg.cgroup_parent = "/ringfence-gvisor-test".into();
        Ok(Env { cfg, template, _data: data })
    })
    .as_ref()
    .map_err(Clone::clone)
}

macro_rules! setup {
    () => {
        match env() {
            Ok(e) => e,
            Err(reason) => {
                eprintln!("SKIPPED {}: {reason}", module_path!());
                return;
            }
        }
    };
}

fn unique_id(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn start_with(env: &Env, tag: &str, f: impl FnOnce(&mut StartSpec)) -> Container {
    let mut spec = StartSpec::new(unique_id(tag), env.template.clone(), UID_BASE);
    f(&mut spec);
    Container::start(&env.cfg, spec).expect("start a gvisor sandbox")
}

fn start(env: &Env, tag: &str) -> Container {
    start_with(env, tag, |_| {})
}

/// A blocking client of the agent protocol (as in the CLI's agent tests).
struct Client {
    stream: UnixStream,
    next_id: u64,
    queue: VecDeque<Event>,
}

#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    status: Option<ExitStatus>,
}

impl Client {
    fn new(c: &Container) -> Client {
        Client { stream: c.control_clone().unwrap(), next_id: 1, queue: VecDeque::new() }
    }

    fn send(&mut self, request: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode(&Envelope { id, request }).unwrap();
        std::io::Write::write_all(&mut (&self.stream), &bytes).unwrap();
        id
    }

    fn read_event(&mut self, deadline: Instant) -> Option<Event> {
        if let Some(ev) = self.queue.pop_front() {
            return Some(ev);
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(left)).unwrap();
        match read_frame::<_, Event>(&mut (&self.stream)) {
            Ok(Some(Event::Log { message, .. })) => {
                eprintln!("agent log: {message}");
                self.read_event(deadline)
            }
            Ok(ev) => ev,
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("no event from the agent within {WAIT:?}")
            }
            Err(e) => panic!("agent channel: {e}"),
        }
    }

    fn response(&mut self, id: u64) -> Result<Reply, String> {
        let deadline = Instant::now() + WAIT;
        let mut other = VecDeque::new();
        loop {
            match self.read_event(deadline).expect("agent closed its channel") {
                Event::Response { id: got, result } if got == id => {
                    other.extend(self.queue.drain(..));
                    self.queue = other;
                    return result.map_err(|e| e.message);
                }
                ev => other.push_back(ev),
            }
        }
    }

    /// Runs `sh -c script` as `user` and gathers its output and exit.
    fn sh_as(&mut self, user: SandboxUser, script: &str) -> Output {
        let id = self.send(Request::Spawn(SpawnSpec {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Default::default(),
            cwd: None,
            user,
            stdio: StdioMode::Pipe { stdin: false },
            tag: None,
        }));
        let deadline = Instant::now() + WAIT;
        let mut out = Output::default();
        loop {
            match self.read_event(deadline).expect("agent closed its channel") {
                Event::Response { id: got, result } if got == id => {
                    if let Err(e) = result {
                        panic!("spawn failed: {}", e.message);
                    }
                }
                Event::Stdout { id: got, data } if got == id => {
                    out.stdout.push_str(&String::from_utf8_lossy(&data));
                    self.send(Request::Credit { id, bytes: data.len() as u64 });
                }
                Event::Stderr { id: got, data } if got == id => {
                    out.stderr.push_str(&String::from_utf8_lossy(&data));
                    self.send(Request::Credit { id, bytes: data.len() as u64 });
                }
                Event::Exited { id: got, status, .. } if got == id => {
                    out.status = Some(status);
                    return out;
                }
                _ => {}
            }
        }
    }

    fn sh(&mut self, script: &str) -> Output {
        self.sh_as(SandboxUser::User, script)
    }
}

fn ok(out: &Output) -> &str {
    assert_eq!(
        out.status,
        Some(ExitStatus::Code(0)),
        "stdout {:?} stderr {:?}",
        out.stdout,
        out.stderr
    );
    &out.stdout
}

/// Lines of the host's mount table that mention `needle`.
fn host_mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Host processes whose command line mentions `needle`.
fn host_processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{}: {cmd}", name.to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn the_agent_serves_commands_under_gvisors_kernel() {
    let env = setup!();
    let c = start(env, "hello");
    let mut client = Client::new(&c);
    let id = client.send(Request::Ping);
    assert_eq!(client.response(id), Ok(Reply::Pong));
    let out = client.sh("echo hello from $(id -un); cat /proc/version; hostname");
    let text = ok(&out);
    assert!(text.starts_with("hello from user\n"), "{text}");
    let host_version = std::fs::read_to_string("/proc/version").unwrap();
    assert!(!text.contains(host_version.trim()), "the host's kernel shows inside: {text}");
    // gVisor reports its own fixed kernel release.
    assert!(text.contains("Linux version 4.4.0"), "{text}");
    assert!(text.trim_end().ends_with(&c.id), "hostname is the sandbox id: {text}");
    // Files through the agent work as in the jail.
    let id = client.send(Request::WriteFile {
        path: "/home/user/note.txt".into(),
        user: SandboxUser::User,
        offset: 0,
        data: b"kept".to_vec(),
    });
    client.response(id).unwrap();
    assert_eq!(
        ok(&client.sh("cat /home/user/note.txt; stat -c %U /home/user/note.txt")),
        "keptuser\n"
    );
}
