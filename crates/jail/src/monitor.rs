//! Observes denied syscalls. The sandbox's filter sends every call outside the allowlist to
//! user space; a supervisor thread on the host records which process tried what and answers
//! EPERM, so the process lives on and the host has an attributed security event. An optional
//! [`DenialSink`] hears of each denial as it happens (the server turns them into metrics and
//! audit records), not only in the tally at the end.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ringfence_sys::NotifWait;
use serde::Serialize;

/// One kind of denied call in one sandbox, with how often it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    pub kind: &'static str,
    pub syscall: String,
    pub nr: i32,
    pub count: u64,
    /// Host pid of the first process that tried it.
    pub first_pid: u32,
}

/// One denied call, as the supervisor saw it.
#[derive(Debug, Clone, Copy)]
pub struct Denial<'a> {
    pub sandbox_id: &'a str,
    /// Host pid of the caller.
    pub pid: u32,
    pub syscall: &'a str,
    pub nr: i32,
    /// Denials of this syscall by this supervisor so far, this one included.
    pub count: u64,
}

/// Called on the supervisor thread for every denial, while the caller still waits for its
/// EPERM: it must only record and hand off, never block.
pub type DenialSink = Arc<dyn Fn(&Denial<'_>) + Send + Sync>;

#[derive(Debug, Default)]
struct Tally {
    by_nr: BTreeMap<i32, SecurityEvent>,
}

/// A running supervisor. Dropping it stops the thread.
#[derive(Debug)]
pub struct Supervisor {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    /// Written to stop the thread at once: its poll waits on this beside the listener. The
    /// listener alone reports its end only once every process under the filter has been
    /// reaped, which for a sandbox a spawner started is whenever the spawner next reaps (up to
    /// its poll interval), so stopping waited for the thread's poll timeout instead (50 ms).
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts supervising `listener` (a seccomp user-notification descriptor).
    pub fn start(listener: OwnedFd, sandbox_id: String) -> std::io::Result<Supervisor> {
        Supervisor::start_with(listener, sandbox_id, None)
    }

    /// Like [`Supervisor::start`], and tells `sink` of each denial as it happens.
    pub fn start_with(
        listener: OwnedFd,
        sandbox_id: String,
        sink: Option<DenialSink>,
    ) -> std::io::Result<Supervisor> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        let (woken, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let thread = std::thread::Builder::new()
            .name("seccomp-supervisor".into())
            .spawn(move || run(listener, &woken, &sandbox_id, &t, &s, sink.as_ref()))?;
        Ok(Supervisor { tally, stop, wake: Some(wake), thread: Some(thread) })
    }

    /// Denied calls so far, ordered by syscall number.
    pub fn events(&self) -> Vec<SecurityEvent> {
        self.tally.lock().map(|t| t.by_nr.values().cloned().collect()).unwrap_or_default()
    }

    /// Stops the thread and returns the final tally.
    pub fn finish(mut self) -> Vec<SecurityEvent> {
        self.stop_thread();
        self.events()
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Closing the write end makes the read end readable (end of file) in the thread's poll.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// A supervisor without a thread, for a caller that runs its own poll loop (a one-shot
/// run, whose main thread waits on the sandbox anyway): the caller polls [`Watcher::fd`] and
/// calls [`Watcher::answer_queued`] when it is readable. A thread of its own cost a one-shot
/// run its start and, at the end, a wake-up and a join on the run's path.
#[derive(Debug)]
pub struct Watcher {
    listener: OwnedFd,
    sandbox_id: String,
    tally: Mutex<Tally>,
    closed: bool,
}

impl Watcher {
    /// Supervises `listener` (a seccomp user-notification descriptor) from the caller's loop.
    pub fn new(listener: OwnedFd, sandbox_id: String) -> Watcher {
        Watcher { listener, sandbox_id, tally: Mutex::new(Tally::default()), closed: false }
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Answers (EPERM) and counts every notification queued now, without waiting. False once
    /// every process under the filter is gone (nothing more can arrive).
    pub fn answer_queued(&mut self) -> bool {
        while !self.closed {
            match answer_one(&self.listener, &self.sandbox_id, &self.tally, None, 0) {
                Some(true) => {}
                Some(false) => break,
                None => self.closed = true,
            }
        }
        !self.closed
    }

    /// Answers what is still queued and returns the final tally, ordered by syscall number.
    pub fn finish(mut self) -> Vec<SecurityEvent> {
        self.answer_queued();
        self.tally.lock().map(|t| t.by_nr.values().cloned().collect()).unwrap_or_default()
    }
}

/// Waits up to `timeout_ms` for one notification and answers it (EPERM), counting it and
/// telling `sink`. `Some(true)`: one was answered; `Some(false)`: none arrived; `None`: the
/// listener is closed or failed.
fn answer_one(
    listener: &OwnedFd,
    sandbox_id: &str,
    tally: &Mutex<Tally>,
    sink: Option<&DenialSink>,
    timeout_ms: i32,
) -> Option<bool> {
    match ringfence_sys::seccomp_notif_recv(listener, timeout_ms) {
        Ok(NotifWait::Notification(n)) => {
            let name = crate::seccomp::syscall_name(n.nr);
            tracing::debug!(sandbox_id, pid = n.pid, syscall = %name, "denied syscall");
            let count = match tally.lock() {
                Ok(mut t) => {
                    let e = t.by_nr.entry(n.nr).or_insert_with(|| SecurityEvent {
                        kind: "denied_syscall",
                        syscall: name.clone(),
                        nr: n.nr,
                        count: 0,
                        first_pid: n.pid,
                    });
                    e.count += 1;
                    e.count
                }
                Err(_) => 0,
            };
            // Recorded before the answer (the caller is blocked until then, for the few
            // microseconds this takes): the event exists before the process can see its
            // EPERM, exit, and have its exit reported without it.
            if let Some(sink) = sink {
                sink(&Denial { sandbox_id, pid: n.pid, syscall: &name, nr: n.nr, count });
            }
            let _ = ringfence_sys::seccomp_notif_deny(listener, n.id, libc::EPERM);
            Some(true)
        }
        Ok(NotifWait::Timeout) => Some(false),
        Ok(NotifWait::Closed) | Err(_) => None,
    }
}

fn run(
    listener: OwnedFd,
    woken: &OwnedFd,
    sandbox_id: &str,
    tally: &Mutex<Tally>,
    stop: &AtomicBool,
    sink: Option<&DenialSink>,
) {
    loop {
        // Notifications are answered as soon as they arrive; a stop request wakes the poll.
        // Before stopping, whatever is already queued is still answered and counted.
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return,
        }
        let queued = fds[0].revents().is_some_and(|r| !r.is_empty());
        if !queued && stop.load(Ordering::SeqCst) {
            return;
        }
        match answer_one(&listener, sandbox_id, tally, sink, 0) {
            Some(true) => {}
            Some(false) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            None => return,
        }
    }
}
