//! Raw system calls for Ringfence.
//!
//! This is the only crate in the workspace that may use `unsafe`. Each block states the invariant
//! it relies on in a `// SAFETY:` comment. Everything else calls these wrappers, or `nix` where
//! `nix` already offers a safe binding.
//!
//! Three functions here run code in a freshly forked child of a possibly multi-threaded parent
//! ([`spawn_in_namespaces`], the child of [`spawn_hardened`] and the `pre_exec` hook of
//! [`detach_command`]); host programs that need a descriptor placed are started by [`pspawn`]
//! (`posix_spawn`'s file actions), not a hook.
//! Between fork and exec such a child may only make async-signal-safe calls: no allocation, no
//! locks. All keep to raw syscalls on values prepared before the fork.

mod handoff;
mod kernel;
mod netdev;
pub mod pspawn;
mod seccomp;
mod vspawn;
#[cfg(feature = "wasm")]
pub mod wasm;

pub use handoff::{Leftover, exit_leaving, thread_count};
pub use kernel::{random_bytes, read_text};
pub use netdev::{iface_up_ipv4, route_default_gateway, route_default_via, tun_create};
pub use seccomp::{
    NotifWait, Notification, SockFilter, install_seccomp, seccomp_notif_deny, seccomp_notif_recv,
};
pub use vspawn::{Stdio as SpawnStdio, spawn_hardened};

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A failed system call, named so the message alone identifies it.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SysError {
    fn last(call: &'static str) -> Self {
        SysError { call, source: io::Error::last_os_error() }
    }
    /// The raw errno, when there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T> = std::result::Result<T, SysError>;

fn check(call: &'static str, ret: libc::c_long) -> Result<libc::c_long> {
    if ret < 0 { Err(SysError::last(call)) } else { Ok(ret) }
}

/// Namespace flags for a sandbox: every namespace Linux offers except time.
pub const SANDBOX_NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC;

/// How to start the first process of a sandbox.
#[derive(Debug)]
pub struct NsSpawn<'a> {
    /// `CLONE_NEW*` flags.
    pub flags: libc::c_int,
    /// Program to exec once the parent says go.
    pub exe: &'a CStr,
    /// argv for the program (the terminating null is added here).
    pub argv: &'a [CString],
    /// Becomes fd 3 in the child: the control channel. The child first blocks reading one byte
    /// from it, so the parent can write uid/gid maps and join cgroups before anything runs.
    pub control: RawFd,
    /// The parent's end of the control channel, closed in the child so that the parent's death
    /// is seen as end-of-file.
    pub parent_end: RawFd,
    /// Become fds 0, 1 and 2 in the child.
    pub stdio: [RawFd; 3],
    /// Deliver SIGKILL to the child if the parent thread dies.
    pub die_with_parent: bool,
    /// Host uid that owns the new user namespace, or `None` for the caller's euid.
    ///
    /// The kernel charges every per-user count of the namespace's processes (inotify instances
    /// and watches, namespaces, message-queue bytes, pending signals, ...) to its owner as well,
    /// at the level of the parent namespace. A distinct owner per sandbox therefore gives each
    /// sandbox its own host-level budget instead of one shared with host root. The calling
    /// thread's euid is switched to this uid around the `clone` only; see [`spawn_in_namespaces`].
    pub owner: Option<u32>,
    /// `(source, target)`: `source` also stays open in the child, at descriptor `target` (above
    /// 3), across the exec. The first process holds it for the sandbox's lifetime.
    pub keep: Option<(RawFd, RawFd)>,
}

/// The credentials of the calling thread that [`spawn_in_namespaces`] changes around `clone`
/// and puts back.
struct ThreadCreds {
    euid: libc::uid_t,
    caps: [CapData; 2],
    /// `PR_GET_DUMPABLE`: the kernel resets the process's dumpable flag on an euid change.
    dumpable: libc::c_int,
    /// `PR_GET_PDEATHSIG`: the kernel clears the thread's parent-death signal on an euid change.
    pdeathsig: libc::c_int,
}

/// Makes `owner` the calling thread's effective uid, keeping its effective capabilities.
///
/// Only this thread changes: raw syscalls, because glibc's wrappers broadcast credential
/// changes to every thread of the process. The real and saved uids stay as they were (root),
/// so the switch back is always permitted. The effective capabilities the kernel clears on the
/// switch are raised again, so the namespace is created by a privileged caller exactly as
/// before (LSMs that restrict unprivileged user namespaces, such as AppArmor's
/// `restrict_unprivileged_userns`, look at them) and only its owner differs.
fn become_owner(owner: libc::uid_t) -> Result<ThreadCreds> {
    let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
    let mut caps = [CapData::default(); 2];
    // SAFETY: header and a two-element data array are what capget expects for version 3.
    check("capget", unsafe { libc::syscall(libc::SYS_capget, &mut hdr, caps.as_mut_ptr()) })?;
    // SAFETY: these prctl options take no pointers and only read thread or process state.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    let mut pdeathsig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which is valid.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut pdeathsig as *mut libc::c_int) };
    let saved = ThreadCreds { euid: euid(), caps, dumpable, pdeathsig };
    // SAFETY: setresuid takes integers; -1 leaves the real and saved uids unchanged.
    let ret = unsafe { libc::syscall(libc::SYS_setresuid, u32::MAX, owner, u32::MAX) };
    check("setresuid(owner)", ret)?;
    let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
    // SAFETY: as for capget; the sets are the thread's own, so capset accepts them.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, saved.caps.as_ptr()) };
    if ret < 0 {
        let err = SysError::last("capset(owner)");
        restore_creds(&saved);
        return Err(err);
    }
    Ok(saved)
}

/// Undoes [`become_owner`]. A thread left with another euid would run the rest of the host
/// process's work with the wrong identity, so failing here aborts the process.
fn restore_creds(saved: &ThreadCreds) {
    let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
    // SAFETY: integers only for setresuid; capset reads the two-element array saved by capget.
    let ok = unsafe {
        libc::syscall(libc::SYS_setresuid, u32::MAX, saved.euid, u32::MAX) == 0
            && libc::syscall(libc::SYS_capset, &mut hdr, saved.caps.as_ptr()) == 0
    };
    if !ok {
        std::process::abort();
    }
    // SAFETY: these prctl options take integers. Dumpability is per process: a concurrent
    // spawn may have read it while cleared, in which case the process stays non-dumpable,
    // which only costs it core dumps.
    unsafe {
        if saved.dumpable >= 0 {
            libc::prctl(libc::PR_SET_DUMPABLE, saved.dumpable as libc::c_ulong, 0, 0, 0);
        }
        if saved.pdeathsig != 0 {
            libc::prctl(libc::PR_SET_PDEATHSIG, saved.pdeathsig as libc::c_ulong, 0, 0, 0);
        }
    }
}

/// Forks a child into new namespaces; the child waits for one byte on `control`, becomes root
/// of its user namespace (uid/gid 0, no supplementary groups), then execs `exe` with an empty
/// environment and only fds 0–3 (and `keep`'s target) open. Returns the child's host pid.
///
/// With `owner`, the calling thread (only it) runs the `clone` with that euid, so the new user
/// namespace belongs to `owner`; the thread's credentials are put back before this returns.
pub fn spawn_in_namespaces(spec: &NsSpawn<'_>) -> Result<i32> {
    clone_into_namespaces(spec, true)
}

/// Replaces what `/proc/self/cmdline` shows with `args` (each followed by a NUL, the rest of
/// the original argument area zeroed), as `setproctitle` does: by writing over the argument
/// strings at the top of the stack, whose bounds the kernel reports in `/proc/self/stat`.
///
/// A sandbox forked from a spawner ([`fork_into_namespaces`]) would otherwise show every
/// process in it the spawner's command line, with host paths. Changing the bounds instead
/// (`PR_SET_MM_ARG_START`) needs `CAP_SYS_RESOURCE`, which hosts may withhold.
pub fn set_cmdline(args: &[&CStr]) -> Result<()> {
    let stat = read_text("/proc/self/stat")
        .map_err(|source| SysError { call: "read /proc/self/stat", source })?;
    let bad = || SysError {
        call: "parse /proc/self/stat",
        source: io::Error::new(io::ErrorKind::InvalidData, "no argument bounds"),
    };
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // arg_start and arg_end are fields 48 and 49.
    let rest = stat.rsplit_once(") ").ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok()).ok_or_else(bad);
    let (start, end) = (field(48)?, field(49)?);
    let wanted: usize = args.iter().map(|a| a.to_bytes_with_nul().len()).sum();
    if end <= start || wanted > end - start {
        return Err(SysError {
            call: "set_cmdline",
            source: io::Error::new(io::ErrorKind::InvalidInput, "longer than the argument area"),
        });
    }
    let area = std::ptr::with_exposed_provenance_mut::<u8>(start);
    // SAFETY: [start, end) is this process's argument area as the kernel reports it: mapped
    // and writable (the top of the initial stack), and owned by no Rust object. The argv
    // pointers into it stay valid; what they point at stays NUL-terminated, since everything
    // past the new arguments is zeroed.
    unsafe {
        std::ptr::write_bytes(area, 0, end - start);
        let mut at = area;
        for a in args {
            let b = a.to_bytes_with_nul();
            std::ptr::copy_nonoverlapping(b.as_ptr(), at, b.len());
            at = at.add(b.len());
        }
    }
    Ok(())
}

/// [`spawn_in_namespaces`] without the `execve`: the child returns [`Forked::Child`] and goes
/// on running the caller's program (`exe` and `argv` are not used), set up as
/// [`spawn_in_namespaces`]'s child is just before its exec (new namespaces, root of its user
/// namespace, fds 0–3 and `keep`'s target open); the parent gets [`Forked::Parent`].
///
/// Saves the exec of a new image, about half a millisecond per sandbox start at rest and
/// several under load. Only a single-threaded caller may do this: the child of a
/// multi-threaded process may find locks (the allocator's, stdio's) held by threads that do
/// not exist in it, so this refuses unless the caller is the process's only thread. Without
/// an exec the child's memory stays the caller's, of the caller's user namespace: its `/proc`
/// files belong to the host's root, and no one inside its new namespaces can read or trace it.
pub fn fork_into_namespaces(spec: &NsSpawn<'_>) -> Result<Forked> {
    if thread_count() != Some(1) {
        return Err(SysError {
            call: "clone without exec (more than one thread)",
            source: io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    match clone_into_namespaces(spec, false)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// The clone behind [`spawn_in_namespaces`] (`exec`) and [`fork_into_namespaces`]; returns 0
/// in the child when not `exec`.
fn clone_into_namespaces(spec: &NsSpawn<'_>, exec: bool) -> Result<i32> {
    // Everything the child touches is prepared here, before the fork.
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let (keep_src, keep_target) = match spec.keep {
        Some((src, target)) if target > 3 && src >= 0 => (src, target),
        Some(_) => {
            return Err(SysError {
                call: "clone",
                source: io::Error::new(io::ErrorKind::InvalidInput, "kept fd must be above 3"),
            });
        }
        None => (-1, -1),
    };
    let sources = [spec.stdio[0], spec.stdio[1], spec.stdio[2], spec.control, keep_src];
    let n_sources = if keep_src >= 0 { 5 } else { 4 };
    let saved = spec.owner.map(become_owner).transpose()?;

    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork: the child gets a
    // copy of the address space and resumes here with return value 0. The child path below
    // only makes raw syscalls on data prepared above, then execs or exits, so it never touches
    // locks or allocator state that another parent thread may have held at the fork.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (spec.flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid != 0 {
        // The parent (or a failed clone): errno first, before the restore can change it.
        let failed = (pid < 0).then(|| SysError::last("clone"));
        if let Some(saved) = &saved {
            restore_creds(saved);
        }
        if let Some(err) = failed {
            return Err(err);
        }
        return i32::try_from(pid)
            .map_err(|_| SysError { call: "clone", source: io::Error::other("pid out of range") });
    }
    // Child.
    // SAFETY: async-signal-safe syscalls only, on fds and pointers prepared before the fork;
    // every failure ends in _exit. Only without `exec` does the child return into Rust code,
    // and `fork_into_namespaces` allows that only to a single-threaded caller, whose locks
    // no vanished thread can be holding.
    unsafe {
        libc::close(spec.parent_end);
        // Move the sources out of the 0..=3 range first so the dup2s below cannot clobber each
        // other whatever numbers the parent happened to use.
        let mut high = [0; 5];
        for (i, fd) in sources.iter().take(n_sources).enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
            if high[i] < 0 {
                libc::_exit(121);
            }
        }
        for (target, fd) in high.iter().take(4).enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                libc::_exit(122);
            }
        }
        // Last, so that a high copy that happened to sit at `keep_target` has already been
        // moved; and its close-on-exec flag cleared explicitly, since dup2 onto itself keeps it.
        if keep_src >= 0
            && (libc::dup2(high[4], keep_target) < 0
                || libc::fcntl(keep_target, libc::F_SETFD, 0) < 0)
        {
            libc::_exit(122);
        }
        let mut go = 0u8;
        loop {
            let n = libc::read(3, (&raw mut go).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // The parent went away or gave up before releasing us.
            libc::_exit(123);
        }
        // Our credentials are still the host's (now unmapped) ids. Switch to the namespace's
        // root, which the parent has mapped to an unprivileged host id, so exec keeps our
        // capabilities inside the namespace; and drop every host supplementary group.
        // Raw syscalls, not libc's wrappers: glibc would try to broadcast the change to the
        // parent's other threads, which do not exist in this child.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32) != 0
            || libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32) != 0
        {
            libc::_exit(125);
        }
        // Only now: the kernel clears the parent-death signal whenever the euid changes, so
        // set before the switch above it would be gone. The parent may have died before this
        // point; its end of the control channel then reads as hung up.
        if spec.die_with_parent {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                libc::_exit(120);
            }
            let mut pfd = libc::pollfd { fd: 3, events: libc::POLLRDHUP, revents: 0 };
            if libc::poll(&mut pfd, 1, 0) != 0 {
                libc::_exit(126);
            }
        }
        if keep_src >= 0 {
            libc::syscall(libc::SYS_close_range, 4u32, (keep_target - 1) as u32, 0u32);
            libc::syscall(libc::SYS_close_range, (keep_target + 1) as u32, u32::MAX, 0u32);
        } else {
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        }
        if !exec {
            return Ok(0);
        }
        libc::execve(spec.exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(124);
    }
}

/// What `wait4` reports.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: i32,
    /// Raw wait status.
    pub status: i32,
    pub user_us: u64,
    pub sys_us: u64,
    pub max_rss_kib: u64,
}

impl Reaped {
    /// `Ok(code)` for a normal exit, `Err(signal)` when killed by a signal.
    pub fn outcome(&self) -> std::result::Result<i32, i32> {
        if libc::WIFSIGNALED(self.status) {
            Err(libc::WTERMSIG(self.status))
        } else {
            Ok(libc::WEXITSTATUS(self.status))
        }
    }
}

/// `wait4(pid, WNOHANG?)` with resource usage. `Ok(None)` when nothing is ready (or no child
/// exists, with `nohang`).
pub fn wait4(pid: i32, nohang: bool) -> Result<Option<Reaped>> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value for it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if nohang { libc::WNOHANG } else { 0 } | libc::__WALL;
    loop {
        // SAFETY: status and ru are valid, writable and live for the call.
        let ret = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if ret > 0 {
            let us = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
            return Ok(Some(Reaped {
                pid: ret,
                status,
                user_us: us(ru.ru_utime),
                sys_us: us(ru.ru_stime),
                max_rss_kib: ru.ru_maxrss as u64,
            }));
        }
        if ret == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) if nohang => return Ok(None),
            _ => return Err(SysError { call: "wait4", source: err }),
        }
    }
}

/// Closes every descriptor from `first` upwards.
pub fn close_fds_from(first: u32) -> Result<()> {
    // SAFETY: close_range takes plain integers and only closes descriptors.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    check("close_range", ret).map(drop)
}

/// Highest capability number the running kernel knows.
pub fn last_cap() -> u32 {
    read_text("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

thread_local! {
    /// This thread's bounding set as last read or narrowed here (see [`bounding_set`]).
    static BOUNDING: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The calling thread's capability bounding set: the capabilities a full drop still has to
/// remove. Read once per thread from `/proc/thread-self/status` and kept, since only the thread
/// itself can change it ([`drop_bounding_caps`] narrows the kept value); every capability the
/// kernel knows where that file cannot be read.
///
/// Why not drop all of them blindly: each `PR_CAPBSET_DROP` is a syscall, and a sandbox's
/// agent drops the set at every process it starts. Under gVisor on a nested host a syscall
/// costs 10–16 µs (measured with `prctl` from inside a sandbox), and 41 drops per process
/// start, 32 of them for capabilities the agent no longer holds, were 0.5 ms of each.
pub fn bounding_set() -> u64 {
    if let Some(set) = BOUNDING.get() {
        return set;
    }
    let set = read_bounding_set().unwrap_or_else(|| every_cap(last_cap()));
    BOUNDING.set(Some(set));
    set
}

/// Every capability from 0 to `last`.
fn every_cap(last: u32) -> u64 {
    if last >= 63 { u64::MAX } else { (1u64 << (last + 1)) - 1 }
}

/// `CapBnd` of `/proc/thread-self/status` (read without a size probe: the file is small).
fn read_bounding_set() -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open("/proc/thread-self/status").ok()?;
    let mut buf = [0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    let hex = text.lines().find_map(|l| l.strip_prefix("CapBnd:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Drops from the calling thread's bounding set every capability not in `keep` (a bit mask).
pub fn drop_bounding_caps(keep: u64) -> Result<()> {
    let held = bounding_set();
    for cap in 0..64u32 {
        if held & (1u64 << cap) == 0 || keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            // EINVAL: the kernel does not know this capability; nothing to drop.
            if err.raw_os_error() != Some(libc::EINVAL) {
                // What was dropped so far is unknown to the kept value: read it anew next time.
                BOUNDING.set(None);
                return Err(SysError { call: "prctl(PR_CAPBSET_DROP)", source: err });
            }
        }
    }
    BOUNDING.set(Some(held & keep));
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Reads the effective, permitted and inheritable sets of the calling thread as 64-bit masks.
pub fn current_caps() -> Result<(u64, u64, u64)> {
    let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array are what capget expects for version 3.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check("capget", ret)?;
    let join = |lo: u32, hi: u32| (u64::from(hi) << 32) | u64::from(lo);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// Limits the calling thread's permitted and effective sets to `keep` and clears inheritable
/// and ambient sets.
pub fn restrict_caps(keep: u64) -> Result<()> {
    let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        CapData { effective: lo, permitted: lo, inheritable: 0 },
        CapData { effective: hi, permitted: hi, inheritable: 0 },
    ];
    // SAFETY: header and a two-element data array are what capset expects for version 3.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check("capset", ret)?;
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let ret = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    match check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", ret.into()) {
        // A kernel without ambient capabilities (gVisor's sentry) has none to clear.
        Err(e) if e.source.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.map(drop),
    }
}

/// Brings the loopback interface of the current network namespace up, unless it is up.
pub fn loopback_up() -> Result<()> {
    // SAFETY: socket takes integers; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::last("socket"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq naming an interface; SIOCGIFFLAGS fills ifru_flags.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check("ioctl(SIOCGIFFLAGS)", ret.into())?;
    // SAFETY: the flags member was just written by the kernel.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // Up already (a namespace made ahead by its owner, which this process may not
    // administer): nothing to change.
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS reads ifru_flags.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check("ioctl(SIOCSIFFLAGS)", ret.into()).map(drop)
}

/// The identity and session a sandboxed process starts with.
#[derive(Debug, Clone)]
pub struct Hardening {
    pub uid: u32,
    pub gid: u32,
    /// Directory to enter after the identity switch, so it is checked with the user's rights.
    pub cwd: Option<CString>,
    /// Make fd 0 (a pty slave) the controlling terminal of the new session.
    pub controlling_tty: bool,
    /// Let the process gain privileges through setuid binaries (templates with `sudo`): keep
    /// the bounding set the caller has (the agent's own, already reduced) and do not set
    /// `no_new_privs`. The process itself still starts with no capabilities.
    pub allow_setuid: bool,
}

/// Drops the calling process to `h`: a new session, supplementary groups reset, gid and uid
/// switched, every capability gone (bounding, permitted, effective, inheritable, ambient),
/// `no_new_privs` set, and no descriptor beyond stdio left open; with
/// [`Hardening::allow_setuid`] the bounding set stays the caller's and `no_new_privs` unset.
/// What a child does between its vfork-style clone ([`spawn_hardened`]) and its exec.
///
/// # Safety
///
/// Only for a child that will exec or exit: it changes the caller's identity, session and
/// capabilities for good. Async-signal-safe: only raw syscalls on `h`'s plain integers and its
/// CString built before the fork, no allocation (an error is `last_os_error`, which does not
/// allocate).
unsafe fn drop_to(h: &Hardening, bounding: u64) -> io::Result<()> {
    let fail = |_: ()| io::Error::last_os_error();
    // SAFETY: raw syscalls on integers and pointers to locals or to `h`, live for each call.
    unsafe {
        if libc::setsid() < 0 {
            return Err(fail(()));
        }
        if h.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(fail(()));
        }
        // With setuid allowed, the bounding set is what a setuid-root exec grants: the
        // caller's (the agent's reduced set), never more, since it can only shrink.
        if !h.allow_setuid {
            // `bounding`: the spawning thread's set, which this child inherited; the
            // capabilities it lacks need no drop.
            for cap in 0..64u32 {
                if bounding & (1u64 << cap) != 0 {
                    // EINVAL for unknown caps is harmless.
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                }
            }
        }
        // Raw syscalls: glibc's wrappers would signal threads that only exist in the parent.
        let gid = h.gid;
        if libc::syscall(libc::SYS_setgroups, 1usize, &gid as *const libc::gid_t) < 0 {
            return Err(fail(()));
        }
        if libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
            || libc::syscall(libc::SYS_setresuid, h.uid, h.uid, h.uid) < 0
        {
            return Err(fail(()));
        }
        let mut hdr = CapHeader { version: CAP_V3, pid: 0 };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) < 0 {
            return Err(fail(()));
        }
        // EINVAL: a kernel without ambient capabilities (gVisor's), so none to clear.
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0
            && *libc::__errno_location() != libc::EINVAL
        {
            return Err(fail(()));
        }
        if !h.allow_setuid && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(fail(()));
        }
        if let Some(dir) = &h.cwd
            && libc::chdir(dir.as_ptr()) < 0
        {
            return Err(fail(()));
        }
        // Mark, don't close: std's own error-report pipe must survive until exec, and it is
        // already close-on-exec like everything this marks. gVisor refuses the flag
        // (EINVAL); there, as everywhere, every descriptor the agent opens is already
        // close-on-exec (std opens with O_CLOEXEC), so this is a second line only.
        const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
    }
    Ok(())
}

/// Arranges for `cmd`'s child to start a session of its own and inherit no descriptor beyond
/// stdio: for host helpers that outlive their starter (the keeper, spawners), which must not
/// keep its pipes and sockets open (a reader of those would never see end-of-file).
pub fn detach_command(cmd: &mut Command) {
    let hook = || -> io::Result<()> {
        // SAFETY: runs in the forked child before exec; raw syscalls on integers only.
        unsafe {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Mark, don't close: std's own error-report pipe must survive until exec.
            const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        }
        Ok(())
    };
    // SAFETY: the hook above is async-signal-safe (see its comment).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Opens a pseudo-terminal pair of the given size. Returns (master, slave).
pub fn open_pty(cols: u16, rows: u16) -> Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: master/slave are writable ints; name and termios may be null; ws is valid.
    let ret = unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws)
    };
    check("openpty", ret.into())?;
    // SAFETY: openpty returned two fresh descriptors that we now own.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &s] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// Sets the window size of a terminal.
pub fn set_winsize(fd: &OwnedFd, cols: u16, rows: u16) -> Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: ws is a valid winsize that outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    check("ioctl(TIOCSWINSZ)", ret.into()).map(drop)
}

/// Sends `sig` to `pid` (a host pid, or a pid in the caller's namespace).
pub fn kill(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill takes plain integers.
    let ret = unsafe { libc::kill(pid, sig) };
    check("kill", ret.into()).map(drop)
}

/// Moves `fd` to descriptor number `target` (close-on-exec) and keeps it open for the rest of
/// the process's life.
pub fn keep_fd_at(fd: OwnedFd, target: RawFd) -> Result<()> {
    // SAFETY: dup3 onto a number this process reserves for the purpose (callers use a fixed
    // constant no other code opens); the original is closed when `fd` drops.
    let ret = unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) };
    check("dup3", ret.into()).map(drop)
}

/// Accepts one connection on a listening socket; the new descriptor is close-on-exec.
pub fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    // SAFETY: accept4 on a descriptor we borrow, without an address buffer.
    let ret = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    let fd = check("accept4", ret.into())?;
    // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A descriptor for process `pid` that stays bound to that very process: signals sent through
/// it can never reach a later process that reuses the number.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = check("pidfd_open", ret)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A duplicate of descriptor `fd` of the process behind `pidfd` (close-on-exec), taken without
/// the process's help. Needs ptrace access to it (host root has it over every sandbox).
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: a valid descriptor we own, a descriptor number and no flags; the kernel returns a
    // new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    let new = check("pidfd_getfd", ret)?;
    // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new as RawFd) })
}

/// Sends `sig` to the process behind `pidfd`. ESRCH once it has exited.
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> Result<()> {
    // SAFETY: a valid descriptor we own, a signal number, no siginfo (null), no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check("pidfd_send_signal", ret).map(drop)
}

/// The Landlock ABI version the kernel offers, or `None` where Landlock is absent or disabled.
pub fn landlock_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with the VERSION flag the kernel reads no attribute (null, size 0) and returns the
    // ABI version or an error.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(ret).ok().filter(|v| *v > 0)
}

/// Receives up to `buf.len()` bytes from a unix stream socket together with any descriptors
/// passed alongside them (SCM_RIGHTS). Received descriptors are close-on-exec.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(|e| SysError { call: "recvmsg", source: e.into() })? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: SCM_RIGHTS installed `fd` in this process just now; no
                            // other owner exists.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                return Ok((msg.bytes, fds));
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(SysError { call: "recvmsg", source: e.into() }),
        }
    }
}

/// Sends `data` on a unix stream socket, passing `fd` alongside when given.
pub fn send_with_fd(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> Result<()> {
    let fds: Vec<RawFd> = fd.into_iter().collect();
    send_with_fds(sock, data, &fds)
}

/// Sends `data` on a unix socket in one `sendmsg`, passing `fds` alongside (SCM_RIGHTS).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let cmsgs: Vec<ControlMessage<'_>> =
        if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(fds)] };
    let iov = [io::IoSlice::new(data)];
    loop {
        match sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::empty(), None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => {
                return Err(SysError { call: "sendmsg", source: io::Error::other("short send") });
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(SysError { call: "sendmsg", source: e.into() }),
        }
    }
}

/// The descriptor on which a sandbox agent finds its control channel.
pub const CONTROL_FD: RawFd = 3;

/// Takes ownership of the inherited control channel (fd 3). Returns `None` if fd 3 is not an
/// open socket, or if it was already taken: ownership can be claimed once per process.
pub fn take_control_fd() -> Option<OwnedFd> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    take_inherited_socket(CONTROL_FD, &TAKEN)
}

/// The descriptor a gVisor sandbox's agent is handed its packet relay on (after the control
/// channel).
pub const RELAY_FD: RawFd = CONTROL_FD + 1;

/// Takes ownership of the inherited packet relay (fd 4, a `SOCK_SEQPACKET` socket), marking
/// it close-on-exec. `None` if fd 4 is not an open socket, or if it was already taken.
pub fn take_relay_fd() -> Option<OwnedFd> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    take_inherited_socket(RELAY_FD, &TAKEN)
}

/// Takes ownership of inherited descriptor `fd` if it is an open socket not yet taken (`taken`
/// is that descriptor's own flag), marking it close-on-exec.
fn take_inherited_socket(fd: RawFd, taken: &std::sync::atomic::AtomicBool) -> Option<OwnedFd> {
    if taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    // SAFETY: stat is plain old data; zeroed is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: `fd` is open (checked above), was placed there by our parent for us, and its
    // flag guarantees no second OwnedFd is ever made from it in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on a descriptor we own; keeps it out of every process we start.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(owned)
}

/// Marks an inherited descriptor close-on-exec, so that it stays in this process only.
/// Returns false when `fd` is not open.
pub fn keep_inherited_fd(fd: RawFd) -> bool {
    // SAFETY: F_SETFD only changes the flags of a descriptor number; a closed number gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0 }
}

/// The host uid that owns the user namespace of process `pid` (`NS_GET_OWNER_UID`).
pub fn userns_owner(pid: i32) -> Result<u32> {
    // _IO(0xb7, 0x4) from linux/nsfs.h, which the libc crate does not declare.
    const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))
        .map_err(|source| SysError { call: "open(/proc/<pid>/ns/user)", source })?;
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer, which is valid.
    let ret = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_OWNER_UID as _, &mut uid) };
    check("ioctl(NS_GET_OWNER_UID)", ret.into())?;
    Ok(uid)
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`, so the descriptor stays open exactly as long
    // as it is registered and is closed only after deregistration, on drop.
    unsafe { tokio::io::unix::AsyncFd::register(fd).map_err(|e| e.into()) }
}

/// Extended attributes of `path` (not following a final symlink) whose names start with
/// `prefix`, with the prefix stripped. Attributes that vanish or are unreadable are skipped.
pub fn xattrs_with_prefix(path: &std::path::Path, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError { call: "llistxattr", source: io::Error::other(e) })?;
    let mut names = vec![0u8; 4096];
    // SAFETY: c is a valid C string; names is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        // No xattr support on this filesystem means no metadata.
        if err.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(Vec::new());
        }
        return Err(SysError { call: "llistxattr", source: err });
    }
    let mut out = Vec::new();
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(short) = name.strip_prefix(prefix.as_bytes()) else { continue };
        let Ok(cname) = CString::new(name) else { continue };
        let mut value = vec![0u8; 4096];
        // SAFETY: both strings are valid; value is writable for its length.
        let len = unsafe {
            libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len())
        };
        if len < 0 {
            continue;
        }
        value.truncate(len as usize);
        out.push((String::from_utf8_lossy(short).into_owned(), value));
    }
    Ok(out)
}

/// Sets (`Some`) or removes (`None`) one extended attribute of `path`.
pub fn set_xattr(path: &std::path::Path, name: &str, value: Option<&[u8]>) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError { call: "lsetxattr", source: io::Error::other(e) })?;
    let cname = CString::new(name)
        .map_err(|e| SysError { call: "lsetxattr", source: io::Error::other(e) })?;
    let ret = match value {
        // SAFETY: valid C strings; value points at `len` readable bytes.
        Some(v) => unsafe {
            libc::lsetxattr(c.as_ptr(), cname.as_ptr(), v.as_ptr().cast(), v.len(), 0)
        },
        // SAFETY: valid C strings.
        None => unsafe { libc::lremovexattr(c.as_ptr(), cname.as_ptr()) },
    };
    check(if value.is_some() { "lsetxattr" } else { "lremovexattr" }, ret.into()).map(drop)
}

/// Lowers the calling thread's CPU priority to nice value `nice` (Linux keeps one per thread,
/// and threads it starts afterwards inherit it). For background work that should run on
/// what requests leave over, such as refilling a warm pool; lowering needs no privilege.
pub fn lower_thread_priority(nice: i32) -> Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes plain integers; PRIO_PROCESS with a thread id changes that one
    // thread's nice value and touches no memory of ours.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    check("setpriority", ret.into()).map(drop)
}

/// Which side of [`fork_into_namespaces`] the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The original process; the child's pid.
    Parent(i32),
    /// The new process.
    Child,
}

/// Host effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and takes no arguments.
    unsafe { libc::geteuid() }
}

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// Detach the device by itself once its last user (the mounted filesystem) lets go.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Read and write the backing file with O_DIRECT: no second copy of every page in the host's
/// page cache (the kernel silently falls back to buffered I/O where it cannot).
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// Attaches `backing` to a free loop device (auto-clearing, direct I/O, 4 KiB blocks) and
/// returns the device, open read-write, and its path. The device detaches itself once nothing
/// uses it any more: closing the returned descriptor before anything mounts it frees it.
pub fn loop_attach(backing: &std::fs::File) -> Result<(std::fs::File, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(|source| SysError { call: "open /dev/loop-control", source })?;
    // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY): ask
    // again, a bounded number of times.
    let mut last = None;
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        let n = check("ioctl(LOOP_CTL_GET_FREE)", n.into())?;
        let path = format!("/dev/loop{n}");
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| SysError { call: "open loop device", source })?;
        // SAFETY: LoopInfo64 is plain old data; all zeroes is its documented "unset" value.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
        let fd = u32::try_from(backing.as_raw_fd())
            .map_err(|_| SysError { call: "LOOP_CONFIGURE", source: io::Error::other("bad fd") })?;
        let cfg = LoopConfig { fd, block_size: 4096, info, reserved: [0; 8] };
        // SAFETY: cfg is a valid loop_config that outlives the call; the kernel only reads it
        // and takes its own reference to the backing file.
        let ret = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        match check("ioctl(LOOP_CONFIGURE)", ret.into()) {
            Ok(_) => return Ok((dev, path)),
            Err(e) if e.errno() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| SysError {
        call: "ioctl(LOOP_CONFIGURE)",
        source: io::Error::other("no free loop device"),
    }))
}

/// `FS_IOC_SHUTDOWN` (ext4 and XFS, `_IOR('X', 125, __u32)`).
const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down without flushing the log: pending writes are dropped.
const FS_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// Shuts the filesystem that `dir` belongs to down: every later operation on it fails and its
/// dirty pages are dropped instead of written. For a filesystem about to be thrown away this
/// turns an unmount that would first write out everything cached into an instant one.
pub fn fs_shutdown(dir: &std::fs::File) -> Result<()> {
    let flags = FS_GOING_FLAGS_NOLOGFLUSH;
    // SAFETY: the ioctl reads one u32 through the pointer, which is valid for the call.
    let ret = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SHUTDOWN, &flags) };
    check("ioctl(FS_IOC_SHUTDOWN)", ret.into()).map(drop)
}

/// `OPEN_TREE_CLONE` (linux/mount.h): a detached copy of the mount tree, not the original.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `MOVE_MOUNT_F_EMPTY_PATH` (linux/mount.h): the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
/// `MOUNT_ATTR_*` (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (linux/mount.h, first version: 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes a detached, read-only (nosuid, nodev) copy of the mount tree at `path` in which file
/// owners are shown through the id mapping of the user namespace `userns`: an id `n` stored on
/// disk reads as whatever `userns` maps `n` to, and is written back the other way. The copy
/// belongs to no mount namespace until [`move_mount_fd`] attaches it, which a process with
/// privilege over its own mount namespace may do (a sandbox's first process, before any user
/// code runs). The caller needs `CAP_SYS_ADMIN` over the filesystem (host root), and the
/// filesystem must support idmapped mounts (ext4, xfs, btrfs, tmpfs since 6.3, ...).
///
/// With `allow_suid` the copy honours setuid bits (`MOUNT_ATTR_NOSUID` cleared): for templates
/// whose setuid binaries (`sudo`) may raise a process to the sandbox's own root. The owners
/// those bits name are still shown through `userns`, so they can only ever name sandbox ids.
pub fn idmapped_tree(
    path: &std::path::Path,
    userns: &OwnedFd,
    allow_suid: bool,
) -> Result<OwnedFd> {
    let tree = detached_tree(path)?;
    let (suid_set, suid_clr) =
        if allow_suid { (0, MOUNT_ATTR_NOSUID) } else { (MOUNT_ATTR_NOSUID, 0) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | suid_set,
        attr_clr: suid_clr,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    set_tree_attr(&tree, &attr, "mount_setattr(MOUNT_ATTR_IDMAP)")?;
    Ok(tree)
}

/// [`idmapped_tree`] for a directory the sandbox may write (a volume): the same mapping
/// (canonical ids 0..N read and are written as the sandbox's own), never setuid or device
/// files, and writable.
pub fn idmapped_writable_tree(path: &std::path::Path, userns: &OwnedFd) -> Result<OwnedFd> {
    let tree = detached_tree(path)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID,
        attr_clr: MOUNT_ATTR_RDONLY,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    set_tree_attr(&tree, &attr, "mount_setattr(MOUNT_ATTR_IDMAP, writable)")?;
    Ok(tree)
}

/// Applies `attr` to every mount of the detached tree `tree`.
fn set_tree_attr(tree: &OwnedFd, attr: &MountAttr, call: &'static str) -> Result<()> {
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes of a valid, initialised
    // struct that outlives the call; the path is the empty C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(call, ret).map(drop)
}

/// Makes a detached copy of the mount tree at `path`, attached nowhere until
/// [`move_mount_fd`]; the caller needs privilege over the mount's namespace (host root).
pub fn detached_tree(path: &std::path::Path) -> Result<OwnedFd> {
    let cpath = cstring(path)?;
    // SAFETY: open_tree reads the NUL-terminated path; the flags ask for a new descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            cpath.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    let fd = check("open_tree(OPEN_TREE_CLONE)", ret)?;
    let fd = RawFd::try_from(fd)
        .map_err(|_| SysError { call: "open_tree", source: io::Error::other("bad fd") })?;
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches the detached mount tree `tree` (from [`idmapped_tree`]) at `target` in the
/// caller's mount namespace.
pub fn move_mount_fd(tree: &OwnedFd, target: &std::path::Path) -> Result<()> {
    let ctarget = cstring(target)?;
    // SAFETY: move_mount reads the two NUL-terminated paths (the first empty: the source is
    // the descriptor), both valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            ctarget.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check("move_mount", ret).map(drop)
}

fn cstring(path: &std::path::Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError { call: "path", source: io::Error::other(e) })
}

/// A global allocator that counts the bytes allocated now and at most, for tests that check a
/// bound on memory (`#[global_allocator] static A: CountingAlloc = CountingAlloc;`). It adds two
/// atomic operations per allocation to the system allocator.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

static ALLOC_CURRENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static ALLOC_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CountingAlloc {
    /// Bytes allocated and not yet freed, by the whole process.
    pub fn current() -> usize {
        ALLOC_CURRENT.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes allocated at once since the last [`CountingAlloc::reset_peak`].
    pub fn peak() -> usize {
        ALLOC_PEAK.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a new peak measurement from what is allocated now.
    pub fn reset_peak() {
        ALLOC_PEAK.store(Self::current(), std::sync::atomic::Ordering::Relaxed);
    }

    fn added(size: usize) {
        use std::sync::atomic::Ordering;
        let now = ALLOC_CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        ALLOC_PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn removed(size: usize) {
        ALLOC_CURRENT.fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged,
// so the system allocator's guarantees are the ones callers get; the counting only touches
// atomics and never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`, as the
        // caller guarantees.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        Self::removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`, and `new_size` is valid for it, as the
        // caller guarantees.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::removed(layout.size());
            Self::added(new_size);
        }
        p
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// `BLKFLSBUF`: `_IO(0x12, 97)`.
const BLKFLSBUF: libc::c_ulong = 0x1261;

/// Mixes `bytes` into the kernel's input pool, credited as full entropy (`RNDADDENTROPY` on a
/// random device; needs `CAP_SYS_ADMIN`), then makes the kernel reseed its generator from the
/// pool at once (`RNDRESEEDCRNG`) instead of at its next scheduled reseed. A guest restored
/// from a memory snapshot shares the generator's state with every other restore of it until
/// then: this is what makes their random numbers their own.
pub fn add_entropy_and_reseed(random: &std::fs::File, bytes: &[u8]) -> Result<()> {
    const HEADER: usize = 2 * std::mem::size_of::<libc::c_int>();
    let len = libc::c_int::try_from(bytes.len()).map_err(|_| SysError {
        call: "ioctl(RNDADDENTROPY)",
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built as bytes
    // (with room rounded up to whole u32s, as the kernel reads `buf_size` bytes).
    let mut info = vec![0u8; HEADER + bytes.len().div_ceil(4) * 4];
    info[..4].copy_from_slice(&(len.saturating_mul(8)).to_ne_bytes());
    info[4..8].copy_from_slice(&len.to_ne_bytes());
    info[HEADER..HEADER + bytes.len()].copy_from_slice(bytes);
    // SAFETY: `info` is a rand_pool_info laid out as the kernel expects (two ints, then
    // `buf_size` bytes), alive for the call; the kernel only reads it.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    check("ioctl(RNDADDENTROPY)", ret.into())?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    check("ioctl(RNDRESEEDCRNG)", ret.into()).map(drop)
}

/// Drops a block device's cached pages (`BLKFLSBUF`): what the kernel read from the disk
/// before (a guest restored from a snapshot read the disk that was attached then) is read
/// again from the disk that is attached now.
pub fn flush_block_cache(dev: &std::fs::File) -> Result<()> {
    // SAFETY: BLKFLSBUF takes no argument; `dev` is an open descriptor for the call.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF as _, 0) };
    check("ioctl(BLKFLSBUF)", ret.into()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_fds_from_high_number_is_harmless() {
        close_fds_from(100_000).unwrap();
    }

    #[test]
    fn wait4_without_children_is_none() {
        assert!(wait4(-1, true).unwrap().is_none());
    }

    #[test]
    fn reaped_outcome_decodes_status() {
        let r = Reaped { pid: 1, status: 3 << 8, user_us: 0, sys_us: 0, max_rss_kib: 0 };
        assert_eq!(r.outcome(), Ok(3));
        let r = Reaped { status: 9, ..r };
        assert_eq!(r.outcome(), Err(9));
    }

    #[test]
    fn current_caps_reads() {
        let (e, p, _) = current_caps().unwrap();
        assert_eq!(e & !p, 0, "effective must be a subset of permitted");
    }
}
