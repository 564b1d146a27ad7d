//! Handing a short-lived process's remaining work to a process of its own as it exits
//! ([`exit_leaving`]).

use std::convert::Infallible;
use std::io;
use std::os::fd::AsRawFd;

use crate::{SysError, read_text};

/// How many threads this process has (from `/proc/self/status`).
pub fn thread_count() -> Option<usize> {
    let status = read_text("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

/// Work handed to [`exit_leaving`]; given back when it could not be handed on.
pub type Leftover = Box<dyn FnOnce() + Send + 'static>;

/// Size of the stack [`exit_leaving`] gives the process that takes its work on (the size
/// Rust gives a spawned thread).
const LEAVE_STACK: usize = 2 << 20;

/// Ends this process with exit status `code` and runs `work` in a new process: work a
/// short-lived command hands off so that it can exit before the work is done. Returns only
/// when that could not be done, with the reason and `work` (to run here instead).
///
/// Refused (`EBUSY`) unless this process has exactly one thread: the new process goes on in
/// this one's memory, and a thread that exists only here could hold a lock there (the
/// allocator's, stdio's) forever, or be running when the new process starts.
///
/// The new process shares this one's memory (`CLONE_VM`) on a stack of its own, not a copy of
/// it: a fork copied a static CLI's page tables (0.2-0.4 ms measured on a 2-CPU VM, on the
/// caller's path) and its exit then tore them down. Sharing is sound because this process
/// runs nothing after the clone but `_exit`: no Rust or C library code, no allocation, no
/// thread-local, so the new process is in effect this process's one thread carried on (glibc's
/// single-thread shortcuts stay true: at no moment do two tasks run code on shared state). The
/// one write this process's end makes to that memory is the kernel's: it zeroes the thread-id
/// word glibc registered (`set_tid_address`), which nothing the work uses reads (glibc's
/// allocator and stdio locks do not record owners by thread id; Rust's locks are its own). It
/// starts a session of its own, so whoever waits for the caller's terminal does not wait for
/// it.
///
/// Both processes have `/dev/null` for their standard streams (replaced before the clone,
/// also when it then fails): the caller has written all it will. Were the new process to hold
/// the caller's stdout or stderr for a moment after the clone, whoever reads them to their
/// end could be woken by its letting go of them: a synchronous wake-up, which places the
/// reader on that process's CPU, where it goes on working, while the caller's exit leaves the
/// other CPU idle (seen on a 2-CPU host: the reader waited 0.5 ms for the CPU). Let go of
/// first, they end with the caller.
pub fn exit_leaving(
    code: u8,
    work: Leftover,
) -> std::result::Result<Infallible, (SysError, Leftover)> {
    if thread_count() != Some(1) {
        let source = io::Error::from_raw_os_error(libc::EBUSY);
        return Err((SysError { call: "clone (more than one thread)", source }, work));
    }
    let null = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        Ok(f) => f,
        Err(source) => return Err((SysError { call: "open /dev/null", source }, work)),
    };
    for target in 0..3 {
        // SAFETY: dup2 acts on this process's descriptor table only, with a descriptor that
        // is open; the standard streams it replaces are not owned by any Rust object.
        if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
            return Err((SysError::last("dup2 /dev/null"), work));
        }
    }
    drop(null);
    let page = 4096;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it aliases
    // nothing. One guard page at the bottom stays inaccessible, so an overflow faults.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEAVE_STACK + page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err((SysError::last("mmap (stack)"), work));
    }
    // SAFETY: the range lies inside the mapping just made.
    let usable = unsafe { base.cast::<u8>().add(page) };
    // SAFETY: as above; makes the stack (all but the guard page) readable and writable.
    if unsafe { libc::mprotect(usable.cast(), LEAVE_STACK, libc::PROT_READ | libc::PROT_WRITE) } < 0
    {
        let err = SysError::last("mprotect (stack)");
        // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
        unsafe { libc::munmap(base, LEAVE_STACK + page) };
        return Err((err, work));
    }
    // The work travels as a thin pointer; the new process takes ownership of it.
    let arg = Box::into_raw(Box::new(work));
    // SAFETY: the stack top is the end of the writable range (x86-64 stacks grow down; mmap
    // returns page-aligned memory, so it is 16-byte aligned). CLONE_VM without CLONE_THREAD
    // makes a process of its own sharing this memory; SIGCHLD lets its parent reap it. `arg`
    // is a valid pointer whose ownership `carry_on` takes; see the function's comment for why
    // sharing this memory is sound (this process only calls `_exit` below).
    let pid = unsafe {
        libc::clone(
            carry_on,
            usable.add(LEAVE_STACK).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            arg.cast(),
        )
    };
    if pid < 0 {
        let err = SysError::last("clone");
        // SAFETY: the clone failed, so no other task has the pointer or the stack: the box is
        // ours again and the mapping unused.
        let work = unsafe { *Box::from_raw(arg) };
        // SAFETY: see above.
        unsafe { libc::munmap(base, LEAVE_STACK + page) };
        return Err((err, work));
    }
    // SAFETY: _exit ends this process without running anything of the program (no atexit
    // handlers, no destructors, no stdio flush): nothing of the memory the new process now
    // runs in is touched.
    unsafe { libc::_exit(i32::from(code)) }
}

/// Where [`exit_leaving`]'s new process starts: on its own stack, in its creator's memory.
extern "C" fn carry_on(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the pointer `exit_leaving` made with Box::into_raw and handed to this
    // process alone.
    let work = unsafe { *Box::from_raw(arg.cast::<Leftover>()) };
    // SAFETY: setsid acts on this process only (never a process group leader: it is new).
    unsafe { libc::setsid() };
    // A panic must not unwind out of this extern "C" frame.
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_ok();
    // SAFETY: ends this process (its creator has exited, or is exiting, without touching the
    // memory); nothing is left to flush (its streams are /dev/null).
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}
