//! The keeper: holds each sandbox's seccomp listener for as long as the sandbox lives, across
//! restarts of the host process that supervises it.
//!
//! A sandbox's syscall filter reports denials through a user-notification listener that only
//! the host may hold: with it, anything inside could answer its own denied calls and let them
//! through, so the agent hands it over and keeps no copy (see [`crate::launch::MARK_PULL`]).
//! When the server holding it dies (`kill -9`, a crash, an upgrade), the kernel closes its
//! copy, and with no listener left a filtered call fails with ENOSYS, neither counted nor
//! audited; no new listener can be made for an installed filter. So the server also parks a
//! copy here, in a small host process of its own (root, the host's namespaces, no sandbox
//! code) that outlives it, and a restarted server takes it back for each sandbox it
//! re-attaches.
//!
//! One request per connection on a unix socket in the run directory (mode 0600, peers must
//! be host root): `P <id> <pid>\n` with the listener attached (SCM_RIGHTS) parks it, `G <id>\n`
//! answers `1` with a copy attached, or `0`. The keeper holds a pidfd for each sandbox's agent
//! and drops a listener once its agent has exited; with nothing left to hold and no request
//! for a while it exits by itself.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors talking to the keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("keeper {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("keeper at {0} did not start")]
    NotStarted(PathBuf),
    #[error("keeper: {0}")]
    Protocol(String),
}

/// How long an idle keeper with nothing to hold stays up.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// A request longer than this is not one of ours.
const MAX_REQUEST: usize = 256;

/// The keeper's socket for a run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("keeper.sock")
}

/// A client of the keeper serving `run_dir`.
#[derive(Debug, Clone)]
pub struct Keeper {
    path: PathBuf,
    /// What to run when no keeper answers (one that had nothing to hold has exited).
    exe: Option<PathBuf>,
}

impl Keeper {
    /// A client for the keeper at `run_dir`, starting one (`exe keeper --socket PATH`,
    /// detached in a session of its own, so it outlives this process) if none answers.
    pub fn connect_or_spawn(run_dir: &Path, exe: &Path) -> Result<Keeper, KeeperError> {
        std::fs::create_dir_all(run_dir).map_err(|source| KeeperError::Io {
            op: "mkdir",
            path: run_dir.to_path_buf(),
            source,
        })?;
        let k = Keeper { path: socket_path(run_dir), exe: Some(exe.to_path_buf()) };
        k.connect().map(|_| k)
    }

    /// A connection to the keeper, starting one if none answers.
    fn connect(&self) -> Result<UnixStream, KeeperError> {
        if let Ok(s) = UnixStream::connect(&self.path) {
            return Ok(s);
        }
        let (path, exe) = match &self.exe {
            Some(exe) => (self.path.clone(), exe.clone()),
            None => return Err(KeeperError::NotStarted(self.path.clone())),
        };
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("keeper")
            .arg("--socket")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        ringfence_sys::detach_command(&mut cmd);
        let mut child =
            cmd.spawn().map_err(|source| KeeperError::Io { op: "start", path: exe, source })?;
        // Reap it if it exits at once (another keeper won the socket); otherwise it is
        // reparented when we go, and lives on.
        std::thread::spawn(move || child.wait());
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(s) = UnixStream::connect(&path) {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(KeeperError::NotStarted(path))
    }

    fn request(&self, line: &str, fd: Option<&OwnedFd>) -> Result<UnixStream, KeeperError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| KeeperError::Io { op, path, source }
        };
        let s = self.connect()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(io("timeout"))?;
        let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        ringfence_sys::send_with_fds(s.as_raw_fd(), line.as_bytes(), &fds)
            .map_err(|e| io("send")(e.source))?;
        Ok(s)
    }

    /// Parks a copy of sandbox `id`'s listener, held until its agent `pid` exits.
    pub fn put(&self, id: &str, pid: i32, listener: &OwnedFd) -> Result<(), KeeperError> {
        check_id(id)?;
        let mut s = self.request(&format!("P {id} {pid}\n"), Some(listener))?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).map_err(|source| KeeperError::Io {
            op: "read",
            path: self.path.clone(),
            source,
        })?;
        match ack[0] {
            b'1' => Ok(()),
            _ => Err(KeeperError::Protocol(format!("refused to keep {id}'s listener"))),
        }
    }

    /// A copy of sandbox `id`'s listener, if the keeper holds one.
    pub fn get(&self, id: &str) -> Result<Option<OwnedFd>, KeeperError> {
        check_id(id)?;
        let s = self.request(&format!("G {id}\n"), None)?;
        let mut buf = [0u8; 1];
        let (n, mut fds) = ringfence_sys::recv_with_fds(s.as_raw_fd(), &mut buf).map_err(|e| {
            KeeperError::Io { op: "read", path: self.path.clone(), source: e.source }
        })?;
        match (n, buf[0], fds.pop()) {
            (1, b'1', Some(fd)) => Ok(Some(fd)),
            (1, b'0', None) => Ok(None),
            _ => Err(KeeperError::Protocol(format!("unexpected answer for {id}"))),
        }
    }
}

fn check_id(id: &str) -> Result<(), KeeperError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(KeeperError::Protocol(format!("bad sandbox id {id:?}")));
    }
    Ok(())
}

/// What the keeper holds for one sandbox.
struct Held {
    agent: OwnedFd,
    listener: OwnedFd,
}

/// Runs the keeper on `socket` until it has had nothing to hold and no request for a while.
/// Returns at once, successfully, if another keeper already serves the socket.
pub fn serve(socket: &Path) -> Result<(), KeeperError> {
    let io = |op| {
        let path = socket.to_path_buf();
        move |source| KeeperError::Io { op, path, source }
    };
    if UnixStream::connect(socket).is_ok() {
        return Ok(());
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(io("bind"))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod"))?;
    listener.set_nonblocking(true).map_err(io("nonblocking"))?;
    let held: Arc<Mutex<HashMap<String, Held>>> = Arc::default();
    let mut last_activity = Instant::now();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                last_activity = Instant::now();
                // One request at a time: requests are a few bytes, answered at once.
                let _ = handle(conn, &held);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io("accept")(e)),
        }
        let empty = held.lock().map(|mut h| {
            // A listener whose agent is gone guards nothing: drop it.
            h.retain(|_, e| !exited(&e.agent));
            h.is_empty()
        });
        if empty.unwrap_or(true) && last_activity.elapsed() > IDLE_EXIT {
            let _ = std::fs::remove_file(socket);
            return Ok(());
        }
    }
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

fn handle(conn: UnixStream, held: &Mutex<HashMap<String, Held>>) -> Result<(), KeeperError> {
    let proto = |m: &str| KeeperError::Protocol(m.to_string());
    conn.set_nonblocking(false).map_err(|_| proto("blocking"))?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).map_err(|_| proto("timeout"))?;
    // Only host root may park or take listeners.
    let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|_| proto("peer credentials"))?;
    if cred.uid() != 0 {
        return Err(proto("peer is not root"));
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    let (n, mut fds) =
        ringfence_sys::recv_with_fds(conn.as_raw_fd(), &mut buf).map_err(|_| proto("recv"))?;
    let line = std::str::from_utf8(&buf[..n]).map_err(|_| proto("not text"))?;
    let line = line.strip_suffix('\n').ok_or_else(|| proto("unterminated request"))?;
    let mut words = line.split(' ');
    let mut conn = conn;
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("P"), Some(id), Some(pid), None) if check_id(id).is_ok() => {
            let pid: i32 = pid.parse().map_err(|_| proto("pid"))?;
            let listener = fds.pop().ok_or_else(|| proto("no listener attached"))?;
            let agent = ringfence_sys::pidfd_open(pid).map_err(|_| proto("agent gone"))?;
            held.lock()
                .map_err(|_| proto("lock"))?
                .insert(id.to_string(), Held { agent, listener });
            conn.write_all(b"1").map_err(|_| proto("reply"))
        }
        (Some("G"), Some(id), None, None) => {
            let copy = held
                .lock()
                .map_err(|_| proto("lock"))?
                .get(id)
                .filter(|e| !exited(&e.agent))
                .and_then(|e| e.listener.try_clone().ok());
            match copy {
                Some(fd) => {
                    ringfence_sys::send_with_fd(conn.as_raw_fd(), b"1", Some(fd.as_raw_fd()))
                        .map_err(|_| proto("reply"))
                }
                None => conn.write_all(b"0").map_err(|_| proto("reply")),
            }
        }
        _ => {
            let _ = conn.write_all(b"?");
            Err(proto("unknown request"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_kept_for_live_agents_only_and_ids_are_checked() {
        if ringfence_sys::euid() != 0 {
            eprintln!("SKIPPED: the keeper answers host root only");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_path(dir.path());
        let s = sock.clone();
        let server = std::thread::spawn(move || serve(&s));
        let until = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < until, "the keeper never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        let k = Keeper { path: sock.clone(), exe: None };
        // Any descriptor stands in for a listener; a child stands in for the agent.
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = OwnedFd::from(a);
        let mut agent = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        k.put("sbx1", agent.id() as i32, &fd).unwrap();
        let back = k.get("sbx1").unwrap().expect("held");
        let same = |x: &OwnedFd, y: &OwnedFd| {
            use std::os::unix::fs::MetadataExt;
            let m = |f: &OwnedFd| {
                std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap().ino()
            };
            m(x) == m(y)
        };
        assert!(same(&fd, &back), "the same open file comes back");
        assert!(k.get("other").unwrap().is_none());
        assert!(matches!(k.get("../x"), Err(KeeperError::Protocol(_))));
        // Once the agent is gone, its listener is not handed out again.
        agent.kill().unwrap();
        agent.wait().unwrap();
        assert!(k.get("sbx1").unwrap().is_none());
        drop(server);
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
