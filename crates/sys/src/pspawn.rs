//! Starting a host program from a large process without copying it: `posix_spawn`.
//!
//! `std::process::Command` forks whenever it has a `pre_exec` hook (which placing a descriptor
//! at a fixed number in the child takes), and a fork copies the caller's page tables: for the
//! server, with the wasm tier's compiled modules and its caches mapped, that is 4–13 ms per
//! `runsc run` on the 2-core dev VM, measured as the gvisor tier's `runsc_spawned` step.
//! glibc's `posix_spawn` starts the child with `CLONE_VM | CLONE_VFORK` (it shares the
//! caller's memory until its exec), and its file actions do the descriptor placement.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// Descriptors placed in the child must be below this; the caller's are first copied to this
/// number or above, so that no placement overwrites a source another one still needs.
const HIGH: RawFd = 100;

/// A child started by [`spawn`]. As with `std::process::Child`, dropping it neither kills
/// nor reaps it.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    status: Option<ExitStatus>,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Starts `program` (a bare name is looked up in PATH) with `args` and this process's
/// environment; `fds` are (source, target)
/// pairs: the caller's descriptor `source` becomes the child's `target` (0, 1 and 2 included;
/// every target below 100), inherited across the exec, while the caller's own copy keeps its
/// flags. Nothing else is inherited but descriptors without close-on-exec, as with `Command`.
/// The child's signal mask is empty and SIGPIPE is at its default, as `Command` leaves them.
pub fn spawn(program: &Path, args: &[&OsStr], fds: &[(RawFd, RawFd)]) -> io::Result<Child> {
    spawn_with(program, args, fds, Options::default())
}

/// What else [`spawn_with`] sets up in the child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A process group of its own (`Command::process_group(0)`): a signal to the caller's
    /// group (a terminal's ^C) does not reach it.
    pub own_process_group: bool,
}

/// [`spawn`], with [`Options`].
pub fn spawn_with(
    program: &Path,
    args: &[&OsStr],
    fds: &[(RawFd, RawFd)],
    opts: Options,
) -> io::Result<Child> {
    if let Some((_, t)) = fds.iter().find(|(_, t)| !(0..HIGH).contains(t)) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("target fd {t}")));
    }
    let path = cstring(program.as_os_str())?;
    let mut argv = vec![path.clone()];
    for a in args {
        argv.push(cstring(a)?);
    }
    let envp: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        })
        .collect::<io::Result<_>>()?;
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_p.push(std::ptr::null_mut());
    let mut high = Vec::with_capacity(fds.len());
    for (src, _) in fds {
        // SAFETY: F_DUPFD_CLOEXEC takes an integer; the result, if any, is a new descriptor
        // that this function owns (closed when `high` drops, after the spawn).
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, HIGH) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fcntl and is owned by nothing else.
        high.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: the file actions and attributes are initialised before use and destroyed on
    // every path below; every pointer handed to posix_spawn (path, argv, envp and the
    // arrays' null terminators) lives until it returns. glibc's child only runs the file
    // actions and the exec on memory prepared here.
    unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        let rc = libc::posix_spawn_file_actions_init(&mut fa);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let rc = libc::posix_spawnattr_init(&mut attr);
        if rc != 0 {
            libc::posix_spawn_file_actions_destroy(&mut fa);
            return Err(io::Error::from_raw_os_error(rc));
        }
        let mut rc = 0;
        for ((_, target), h) in fds.iter().zip(&high) {
            if rc == 0 {
                // dup2 onto another number: the target is without close-on-exec.
                rc = libc::posix_spawn_file_actions_adddup2(
                    &mut fa,
                    std::os::fd::AsRawFd::as_raw_fd(h),
                    *target,
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        if rc == 0 {
            rc = libc::posix_spawnattr_setsigmask(&mut attr, &empty);
        }
        if rc == 0 {
            rc = libc::posix_spawnattr_setsigdefault(&mut attr, &pipe);
        }
        let mut flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        if opts.own_process_group {
            flags |= libc::POSIX_SPAWN_SETPGROUP;
            if rc == 0 {
                // Group 0: the child's own pid.
                rc = libc::posix_spawnattr_setpgroup(&mut attr, 0);
            }
        }
        if rc == 0 {
            rc = libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short);
        }
        let mut pid: libc::pid_t = 0;
        if rc == 0 {
            // A bare name is looked up in PATH, as `Command` does.
            let spawn = if path.as_bytes().contains(&b'/') {
                libc::posix_spawn
            } else {
                libc::posix_spawnp
            };
            rc = spawn(&mut pid, path.as_ptr(), &fa, &attr, argv_p.as_ptr(), envp_p.as_ptr());
        }
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut attr);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Child { pid, status: None })
    }
}

impl Child {
    /// The child's host pid.
    pub fn id(&self) -> i32 {
        self.pid
    }

    fn reap(&mut self, nohang: bool) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        match crate::wait4(self.pid, nohang) {
            Ok(Some(r)) => {
                let s = ExitStatus::from_raw(r.status);
                self.status = Some(s);
                Ok(Some(s))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.source),
        }
    }

    /// Waits for the child's end.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.reap(false)? {
                return Ok(s);
            }
        }
    }

    /// The child's status if it has ended, without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(true)
    }

    /// SIGKILLs the child unless it has been reaped (its pid may be another's by then).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        crate::kill(self.pid, libc::SIGKILL).map_err(|e| e.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_child_asked_for_its_own_process_group_leads_one() {
        let ids = |opts: Options| {
            let (mut r, w) = std::io::pipe().unwrap();
            let sh = "echo $$ $(ps -o pgid= -p $$) >&5";
            let mut c = spawn_with(
                Path::new("/bin/sh"),
                &[OsStr::new("-c"), OsStr::new(sh)],
                &[(std::os::fd::AsRawFd::as_raw_fd(&w), 5)],
                opts,
            )
            .unwrap();
            drop(w);
            assert!(c.wait().unwrap().success());
            let mut out = String::new();
            r.read_to_string(&mut out).unwrap();
            let v: Vec<i32> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
            (v[0], v[1])
        };
        let (pid, pgid) = ids(Options { own_process_group: true });
        // A bare name is found in PATH.
        let mut c = spawn(Path::new("true"), &[], &[]).unwrap();
        assert!(c.wait().unwrap().success());
        assert_eq!(pid, pgid, "its own group");
        let (pid, pgid) = ids(Options::default());
        assert_ne!(pid, pgid, "the caller's group");
        // SAFETY: getpgrp takes no arguments and cannot fail.
        assert_eq!(pgid, unsafe { libc::getpgrp() });
    }

    #[test]
    fn descriptors_land_at_their_targets_and_nothing_else_is_inherited() {
        let (mut r, w) = std::io::pipe().unwrap();
        let (r2, w2) = std::io::pipe().unwrap();
        // The child lists its descriptors on the one it was given.
        let sh = "echo out >&5; ls /proc/self/fd | sort -n | tr '\\n' ' ' >&5";
        let mut c = spawn(
            Path::new("/bin/sh"),
            &[OsStr::new("-c"), OsStr::new(sh)],
            &[(std::os::fd::AsRawFd::as_raw_fd(&w), 5)],
        )
        .unwrap();
        drop(w);
        let status = c.wait().unwrap();
        assert!(status.success(), "{status}");
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        // 0, 1, 2 as this process has them, 5, and ls's own directory descriptor (3): the
        // other pipe's ends (close-on-exec here) are not there.
        assert!(out.starts_with("out\n"), "{out:?}");
        let listed: Vec<i32> = out[4..].split_whitespace().map(|n| n.parse().unwrap()).collect();
        assert!(listed.contains(&5), "{listed:?}");
        for fd in [std::os::fd::AsRawFd::as_raw_fd(&r2), std::os::fd::AsRawFd::as_raw_fd(&w2)] {
            assert!(fd == 5 || fd == 3 || !listed.contains(&fd) || fd < 3, "{fd} in {listed:?}");
        }
        // Reaped once: a later wait answers the same, and kill does nothing.
        assert_eq!(c.wait().unwrap(), status);
        c.kill().unwrap();
    }

    #[test]
    fn a_program_that_is_not_there_fails_the_spawn() {
        let e = spawn(Path::new("/nonexistent/program"), &[], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = spawn(Path::new("/bin/true"), &[], &[(0, 100)]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_exit_status_and_a_kill_are_reported() {
        let mut c =
            spawn(Path::new("/bin/sh"), &[OsStr::new("-c"), OsStr::new("exit 3")], &[]).unwrap();
        assert_eq!(c.wait().unwrap().code(), Some(3));
        let mut c = spawn(Path::new("/bin/sleep"), &[OsStr::new("30")], &[]).unwrap();
        assert_eq!(c.try_wait().unwrap(), None);
        c.kill().unwrap();
        assert_eq!(c.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
