//! Where a hot request's time goes, piece by piece: off unless `RINGFENCE_PHASES=1` is set
//! when the server starts. Then each timed request (a create, a cell) logs one line at info
//! level, target `ringfence::phases`: its start in milliseconds since the server started (so
//! a create's line and its sandbox's first cell's line can be put on one time line) and the
//! time from one mark to the next. Off, a mark is one load of a cached flag.
//!
//! Marks go to the request's task (a task-local), so the create path needs no extra argument
//! through the manager and the tier; work on other tasks or threads is not counted in.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable that turns phase logging on.
pub const ENV: &str = "RINGFENCE_PHASES";

tokio::task_local! {
    static CURRENT: RefCell<Phases>;
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Whether phase logging is on (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        origin();
        std::env::var(ENV).is_ok_and(|v| v == "1")
    })
}

/// One request's marks.
#[derive(Debug)]
struct Phases {
    what: &'static str,
    begun: Instant,
    last: Instant,
    marks: Vec<(&'static str, Duration)>,
}

/// Runs `fut` as one timed request called `what` (logged when it ends); just runs it when
/// phase logging is off.
pub async fn timed<F: std::future::Future>(what: &'static str, fut: F) -> F::Output {
    if !enabled() {
        return fut.await;
    }
    let now = Instant::now();
    let p = Phases { what, begun: now, last: now, marks: Vec::with_capacity(16) };
    CURRENT
        .scope(RefCell::new(p), async {
            let out = fut.await;
            let _ = CURRENT.try_with(|p| p.borrow().log());
            out
        })
        .await
}

/// Marks the end of phase `name` of the current timed request (nothing outside one).
pub fn mark(name: &'static str) {
    if !enabled() {
        return;
    }
    let _ = CURRENT.try_with(|p| {
        let mut p = p.borrow_mut();
        let now = Instant::now();
        let took = now - p.last;
        p.last = now;
        p.marks.push((name, took));
    });
}

/// Logs a one-off span of work that ran outside a timed request (another task, a thread):
/// `begun` is when it started.
pub fn span(what: &'static str, begun: Instant) {
    if enabled() {
        tracing::info!(
            target: "ringfence::phases",
            "{what} at={:.3}ms took={:.3}ms",
            ms(begun.saturating_duration_since(origin())),
            ms(begun.elapsed())
        );
    }
}

/// Logs the steps of one piece of work timed elsewhere (a jail's start-up phases, host's and
/// agent's, on one CLOCK_MONOTONIC time line): `steps` are (name, time in nanoseconds) in
/// order, the first one the start; each step's figure is the time since the one before.
pub fn steps(what: &'static str, steps: &[(&str, u64)]) {
    use std::fmt::Write as _;
    if !enabled() || steps.len() < 2 {
        return;
    }
    let mut parts = String::new();
    for w in steps.windows(2) {
        let _ = write!(parts, " {}={:.3}", w[1].0, w[1].1.saturating_sub(w[0].1) as f64 / 1e6);
    }
    let took = Duration::from_nanos(steps[steps.len() - 1].1.saturating_sub(steps[0].1));
    let begun = Instant::now().checked_sub(took).unwrap_or_else(origin);
    tracing::info!(
        target: "ringfence::phases",
        "{what} at={:.3}ms took={:.3}ms:{parts}",
        ms(begun.saturating_duration_since(origin())),
        ms(took)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Phases {
    fn log(&self) {
        use std::fmt::Write as _;
        let mut parts = String::new();
        for (name, took) in &self.marks {
            let _ = write!(parts, " {name}={:.3}", ms(*took));
        }
        tracing::info!(
            target: "ringfence::phases",
            "{} at={:.3}ms total={:.3}ms:{parts}",
            self.what,
            ms(self.begun.saturating_duration_since(origin())),
            ms(self.begun.elapsed())
        );
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn off_by_default_and_marks_outside_a_request_are_ignored() {
        // The variable is not set in tests: timed() just runs the future.
        assert_eq!(super::timed("x", async { 2 }).await, 2);
        super::mark("nothing");
    }
}
