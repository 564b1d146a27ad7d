//! Observes denied syscalls. The sandbox's filter sends every call outside the allowlist to
//! user space; a supervisor thread on the host records which process tried what and answers
//! EPERM, so the process lives on and the host has an attributed security event.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

#[derive(Debug, Default)]
struct Tally {
    by_nr: BTreeMap<i32, SecurityEvent>,
}

/// A running supervisor. Dropping it stops the thread.
#[derive(Debug)]
pub struct Supervisor {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts supervising `listener` (a seccomp user-notification descriptor).
    pub fn start(listener: OwnedFd, sandbox_id: String) -> std::io::Result<Supervisor> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("seccomp-supervisor".into())
            .spawn(move || run(listener, &sandbox_id, &t, &s))?;
        Ok(Supervisor { tally, stop, thread: Some(thread) })
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

fn run(listener: OwnedFd, sandbox_id: &str, tally: &Mutex<Tally>, stop: &AtomicBool) {
    loop {
        // A short poll so a stop request is noticed even while the sandbox stays quiet; while
        // the sandbox lives, notifications are answered as soon as they arrive.
        match ringfence_sys::seccomp_notif_recv(&listener, 50) {
            Ok(NotifWait::Notification(n)) => {
                // Answer first: the caller is blocked until we do.
                let _ = ringfence_sys::seccomp_notif_deny(&listener, n.id, libc::EPERM);
                let name = crate::seccomp::syscall_name(n.nr);
                tracing::debug!(sandbox_id, pid = n.pid, syscall = %name, "denied syscall");
                if let Ok(mut t) = tally.lock() {
                    t.by_nr
                        .entry(n.nr)
                        .or_insert_with(|| SecurityEvent {
                            kind: "denied_syscall",
                            syscall: name,
                            nr: n.nr,
                            count: 0,
                            first_pid: n.pid,
                        })
                        .count += 1;
                }
            }
            Ok(NotifWait::Timeout) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Ok(NotifWait::Closed) | Err(_) => return,
        }
    }
}
