//! Starting a hardened process without copying the caller's address space: a vfork-style
//! `clone(CLONE_VM | CLONE_VFORK)` whose child drops to the process's identity
//! ([`crate::Hardening`]: a new session, no capabilities, `no_new_privs`, the identity) and execs.
//!
//! Why not `std::process::Command`: with a `pre_exec` hook (which the hardening needs) std
//! forks, and a fork copies the whole address space. Under gVisor every new address space is
//! a new host stub process of the sentry's, and the fork's copy is thrown away at the exec
//! that follows: the first start of `/bin/echo` in a fresh gVisor sandbox took a median
//! 20.8 ms by fork + exec against 12.3 ms by this clone + exec (and 18.0 ms by glibc's
//! `posix_spawn`), `bench/gvisor_spawn.py` in `docs/PERFORMANCE.md`. std uses `posix_spawn`
//! only without hooks.
//!
//! The child shares the caller's memory until it execs or exits, and the caller is suspended
//! meanwhile (`CLONE_VFORK`). So the child makes raw syscalls only, on values the caller
//! prepared (C strings, pointer arrays, integers), on a stack of its own, with every signal
//! blocked until its handlers are back to the defaults (a handler of the caller's must never
//! run on the shared memory); it reports a failure by writing an errno into the caller's
//! memory before `_exit`.

use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::RawFd;

use crate::Hardening;

/// What a child's standard descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// The caller's own, inherited as is.
    Keep,
    /// This descriptor of the caller's, duplicated onto the standard one.
    Fd(RawFd),
}

/// What the child reads, and where it writes its error: in the caller's memory, which the
/// child shares.
struct Job<'a> {
    candidates: &'a [CString],
    argv: *const *const c_char,
    envp: *const *const c_char,
    stdio: [RawFd; 3],
    hardening: &'a Hardening,
    /// The spawning thread's bounding set: what the child has to drop.
    bounding: u64,
    /// 0, or the errno of the step that failed.
    error: c_int,
}

/// The child's stack: it runs a few raw syscalls (no recursion, no allocation).
const STACK: usize = 64 * 1024;

/// Starts `argv` (run from the first of `candidates` that execs: the program's path, or each
/// `PATH` entry joined with it, in order, as `execvp` tries them) with environment `envp`,
/// standard descriptors `stdio`, dropped to `h`. Returns the child's pid; an exec that fails
/// (every candidate) or a hardening step that fails is the returned error, and its child has
/// been reaped.
pub fn spawn_hardened(
    candidates: &[CString],
    argv: &[CString],
    envp: &[CString],
    stdio: [Stdio; 3],
    h: &Hardening,
) -> io::Result<i32> {
    if candidates.is_empty() || argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "nothing to run"));
    }
    let mut argv_p: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let fd = |s: Stdio| match s {
        Stdio::Keep => -1,
        Stdio::Fd(fd) => fd,
    };
    let mut job = Job {
        candidates,
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        stdio: [fd(stdio[0]), fd(stdio[1]), fd(stdio[2])],
        hardening: h,
        bounding: crate::bounding_set(),
        error: 0,
    };
    let mut stack = vec![0u8; STACK];
    // The stack grows down from its end, 16-byte aligned as the ABI wants.
    let top = {
        let end = stack.as_mut_ptr().wrapping_add(STACK) as usize;
        (end & !15) as *mut c_void
    };
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask write only into it.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to the two sets above, live for the calls.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child` runs on `stack` (live until clone returns: CLONE_VFORK suspends this
    // thread until the child has exec'd or exited) with `job`, which it reads and writes only
    // through the pointer given here while this thread is suspended. All signals are blocked
    // across the call (the child starts with them blocked, see `child`).
    let pid = unsafe {
        libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut job as *mut Job<'_>).cast::<c_void>(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    // SAFETY: the child has exec'd or exited (CLONE_VFORK); nothing writes `job` any more.
    let error = unsafe { std::ptr::read_volatile(&job.error) };
    if error != 0 {
        let mut status = 0;
        // SAFETY: reaps the child that exited after its failure; status is a valid local.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
        }
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(pid)
}

/// The child: descriptors, hardening, signals back to their defaults, exec.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the caller's `Job`, live and not touched by the caller until this
    // child execs or exits (CLONE_VFORK).
    let job = unsafe { &mut *arg.cast::<Job<'_>>() };
    let error = run(job);
    // SAFETY: a plain write into the shared `Job` (volatile: read by the caller after the
    // child is gone), then the child ends without running any of the caller's exit code.
    unsafe {
        std::ptr::write_volatile(&mut job.error, error);
        libc::_exit(127)
    }
}

/// Everything up to a successful exec (which does not return); returns the errno otherwise.
fn run(job: &Job<'_>) -> c_int {
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
    let mut fds = job.stdio;
    // SAFETY: raw syscalls on integers; the child owns its copy of the descriptor table (no
    // CLONE_FILES), so none of this changes the caller's.
    unsafe {
        // A source among 0–2 that is not its own target could be overwritten by an earlier
        // dup2: move it above first.
        for fd in fds.iter_mut() {
            if (0..3).contains(fd) {
                let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                if moved < 0 {
                    return errno();
                }
                *fd = moved;
            }
        }
        for (target, fd) in fds.iter().enumerate() {
            if *fd >= 0 && libc::dup2(*fd, target as c_int) < 0 {
                return errno();
            }
        }
    }
    // SAFETY: this child execs or exits next: changing its identity for good is the point.
    if let Err(e) = unsafe { crate::drop_to(job.hardening, job.bounding) } {
        return e.raw_os_error().unwrap_or(libc::EINVAL);
    }
    // SAFETY: rt_sigaction and rt_sigprocmask on this child's own handler table (no
    // CLONE_SIGHAND) and mask, with local buffers of the kernel's sizes.
    unsafe {
        // Every signal back to its default action. A handler of the caller's would run on the
        // shared memory (exec resets handled signals anyway); an ignored one survives exec:
        // SIGPIPE, which Rust's runtime ignores, and whatever the host itself was started
        // ignoring (a server started from a script's background job ignores SIGINT and
        // SIGQUIT), none of which is the sandbox's to inherit. The system call itself, not
        // libc's wrapper, which refuses the two signals glibc keeps for itself (32 and 33):
        // an ancestor may have left those ignored too. The kernel's `struct sigaction` all
        // zero is SIG_DFL with no flags and an empty mask.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old = [0u64; 4];
            let got = libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u64>(),
                old.as_mut_ptr(),
                8usize,
            );
            if got == 0 && old[0] != 0 {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        // Nothing blocked (the same system call: glibc's wrapper keeps 32 and 33 as they were).
        let none = 0u64;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &none as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    // execvp's rules: a candidate that is missing is passed over; one that exists but may not
    // be run is remembered, and reported if nothing later runs.
    let mut last = libc::ENOENT;
    let mut denied = false;
    for path in job.candidates {
        // SAFETY: NUL-terminated strings and NULL-terminated pointer arrays built by the
        // caller, live while it is suspended.
        unsafe {
            libc::execve(path.as_ptr(), job.argv, job.envp);
        }
        last = errno();
        match last {
            libc::EACCES => denied = true,
            libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP => {}
            _ => return last,
        }
    }
    if denied { libc::EACCES } else { last }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn me() -> Hardening {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Hardening { uid, gid, cwd: None, controlling_tty: false, allow_setuid: true }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just opened and are owned here alone.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn runs_the_first_candidate_that_exists_with_its_arguments_environment_and_stdio() {
        let (r, w) = pipe();
        let pid = spawn_hardened(
            &[c("/nonexistent/sh"), c("/bin/sh")],
            &[c("sh"), c("-c"), c("echo \"$1 $GREETING\"; pwd"), c("sh"), c("one")],
            &[c("GREETING=hello")],
            [Stdio::Keep, Stdio::Fd(w.as_raw_fd()), Stdio::Keep],
            &Hardening { cwd: Some(c("/tmp")), ..me() },
        )
        .unwrap();
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(out, "one hello\n/tmp\n");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn a_missing_program_or_directory_is_an_error_with_its_errno() {
        let e = spawn_hardened(
            &[c("/nonexistent/a"), c("/nonexistent/b")],
            &[c("a")],
            &[],
            [Stdio::Keep; 3],
            &me(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = spawn_hardened(
            &[c("/bin/true")],
            &[c("true")],
            &[],
            [Stdio::Keep; 3],
            &Hardening { cwd: Some(c("/nonexistent")), ..me() },
        )
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        // A file without execute permission: EACCES, even for root (no x bit at all).
        let plain = std::env::temp_dir().join(format!("vspawn-plain-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let path = c(plain.to_str().unwrap());
        let e = spawn_hardened(&[path], &[c("x")], &[], [Stdio::Keep; 3], &me()).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }

    const CAP_CHOWN: u32 = 0;
    const CAP_KILL: u32 = 5;
    const CAP_SETPCAP: u32 = 8;

    /// The bounding set as the kernel reports it, one `PR_CAPBSET_READ` per capability.
    fn kernel_bounding_set() -> u64 {
        (0..64u32)
            // SAFETY: PR_CAPBSET_READ takes an integer; it returns 1, 0 or -1 (unknown cap).
            .filter(|&c| unsafe { libc::prctl(libc::PR_CAPBSET_READ, c as libc::c_ulong) } == 1)
            .fold(0, |set, c| set | (1u64 << c))
    }

    fn child_bounding_set(h: &Hardening) -> String {
        let (r, w) = pipe();
        let pid = spawn_hardened(
            &[c("/bin/grep")],
            &[c("grep"), c("^CapBnd"), c("/proc/self/status")],
            &[],
            [Stdio::Keep, Stdio::Fd(w.as_raw_fd()), Stdio::Keep],
            h,
        )
        .unwrap();
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        out
    }

    #[test]
    fn a_child_holds_no_bounding_capability_whatever_its_spawning_thread_dropped_before() {
        // Each case on a thread of its own: the bounding set is per thread.
        std::thread::spawn(|| {
            // What the kept value says is what the kernel says.
            assert_eq!(crate::bounding_set(), kernel_bounding_set());
            let before = kernel_bounding_set();
            if before & (1 << CAP_SETPCAP) == 0 {
                eprintln!(
                    "SKIPPED: this thread cannot drop bounding capabilities (no CAP_SETPCAP)"
                );
                return;
            }
            let keep = (1u64 << CAP_CHOWN) | (1u64 << CAP_KILL);
            crate::drop_bounding_caps(keep).unwrap();
            assert_eq!(kernel_bounding_set(), before & keep);
            assert_eq!(crate::bounding_set(), before & keep);
            // The child drops the two left, and nothing that was already gone survives.
            let no_setuid = Hardening { allow_setuid: false, ..me() };
            assert_eq!(child_bounding_set(&no_setuid), "CapBnd:\t0000000000000000\n");
            // This thread is untouched by its child's drop.
            assert_eq!(kernel_bounding_set(), before & keep);
        })
        .join()
        .unwrap();
        // A thread that never dropped anything: its child still ends with none.
        std::thread::spawn(|| {
            let no_setuid = Hardening { allow_setuid: false, ..me() };
            assert_eq!(child_bounding_set(&no_setuid), "CapBnd:\t0000000000000000\n");
        })
        .join()
        .unwrap();
    }
}
