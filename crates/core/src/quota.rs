//! Per-key quotas: how many sandboxes and snapshots one API key may hold, and how fast it may
//! start sandboxes.
//!
//! - **Sandboxes** counts every sandbox of the key that exists: running, paused in memory
//!   (its memory stays charged) and paused with only its files kept (its layer stays on disk,
//!   and a resume may bring it back at any moment). A create or fork is refused when it would
//!   go above the limit; a resume is refused when the key is already above it (the limit was
//!   lowered since). Creates in flight count, so a burst of parallel creates cannot overshoot.
//! - **Snapshots** counts the key's saved snapshots.
//! - **Create rate** is a token bucket per key: `burst` starts at once, then `rate` per second.
//!   Each create and each fork child takes a token, whether or not the start succeeds (it
//!   limits attempts, which cost the host work either way).
//!
//! A limit of 0 means none. Refusals are `ManagerError::Quota`, which the API answers with
//! 429 and a message naming the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::store::KeyLimits;

/// The server's default quotas (`ringfence serve --max-sandboxes-per-key` …); a key's own
/// [`KeyLimits`] override them field by field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaConfig {
    pub max_sandboxes: u32,
    pub max_snapshots: u32,
    /// Sandboxes per second; 0 or less: no rate limit.
    pub create_rate: f64,
    pub create_burst: u32,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig { max_sandboxes: 100, max_snapshots: 100, create_rate: 5.0, create_burst: 20 }
    }
}

impl QuotaConfig {
    /// The limits in force for a key with `own` settings.
    pub fn for_key(&self, own: &KeyLimits) -> QuotaConfig {
        QuotaConfig {
            max_sandboxes: own.max_sandboxes.unwrap_or(self.max_sandboxes),
            max_snapshots: own.max_snapshots.unwrap_or(self.max_snapshots),
            create_rate: own.create_rate.unwrap_or(self.create_rate),
            create_burst: own.create_burst.unwrap_or(self.create_burst),
        }
    }
}

/// A refused request: the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QuotaError(pub String);

#[derive(Debug)]
struct KeyState {
    /// Sandboxes admitted but not yet recorded in the store.
    in_flight: u64,
    tokens: f64,
    refilled: Instant,
}

/// The live quota state of every key (in memory: a restart refills the buckets).
#[derive(Debug, Default)]
pub struct Quotas {
    keys: Arc<Mutex<HashMap<String, KeyState>>>,
}

/// Sandboxes admitted and not yet in the store; dropping it (after the record is written, or
/// after the start failed) stops counting them here.
#[derive(Debug)]
pub struct Admission {
    keys: Arc<Mutex<HashMap<String, KeyState>>>,
    key: String,
    n: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut m = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = m.get_mut(&self.key) {
            s.in_flight = s.in_flight.saturating_sub(self.n);
        }
    }
}

impl Quotas {
    /// Admits `n` new sandboxes for `key` (0 for a resume: the sandbox is already counted),
    /// given `existing`, which reads how many the key has now (its error is passed through
    /// as the outer one). `take_tokens` charges the create rate. The count is read under the
    /// quota lock, so two admissions for the same key cannot both see room for one.
    pub fn admit<E>(
        &self,
        key: &str,
        limits: &QuotaConfig,
        n: u64,
        take_tokens: bool,
        existing: impl FnOnce() -> Result<u64, E>,
    ) -> Result<Result<Admission, QuotaError>, E> {
        // A panic elsewhere while holding this lock leaves only counters behind: keep going.
        let mut m = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let burst = f64::from(limits.create_burst);
        let s = m.entry(key.to_string()).or_insert(KeyState {
            in_flight: 0,
            tokens: burst,
            refilled: now,
        });
        if limits.max_sandboxes > 0 {
            let have = existing()?.saturating_add(s.in_flight);
            let max = u64::from(limits.max_sandboxes);
            if have.saturating_add(n) > max {
                return Ok(Err(QuotaError(format!(
                    "sandbox quota reached: this API key may hold at most {max} sandboxes \
                     (running or paused) and holds {have}; kill some first"
                ))));
            }
        }
        let rate_limited = take_tokens && limits.create_rate > 0.0 && n > 0;
        if rate_limited {
            let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
            s.tokens = (s.tokens + elapsed * limits.create_rate).min(burst);
            s.refilled = now;
            let want = n as f64;
            if want > burst {
                return Ok(Err(QuotaError(format!(
                    "create rate limit: this API key may start at most {} sandboxes at once",
                    limits.create_burst
                ))));
            }
            if s.tokens < want {
                let wait = (want - s.tokens) / limits.create_rate;
                return Ok(Err(QuotaError(format!(
                    "create rate limit: this API key may start {} sandboxes per second \
                     (bursts of {}); retry in {wait:.1} s",
                    limits.create_rate, limits.create_burst
                ))));
            }
            s.tokens -= want;
        }
        s.in_flight += n;
        Ok(Ok(Admission { keys: self.keys.clone(), key: key.to_string(), n }))
    }

    /// Checks that `key` may save one more snapshot, given how many it keeps.
    pub fn admit_snapshot(limits: &QuotaConfig, existing: u64) -> Result<(), QuotaError> {
        let max = u64::from(limits.max_snapshots);
        if max > 0 && existing >= max {
            return Err(QuotaError(format!(
                "snapshot quota reached: this API key may keep at most {max} snapshots; \
                 delete some first"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(
        q: &Quotas,
        key: &str,
        c: &QuotaConfig,
        n: u64,
        tokens: bool,
        existing: u64,
    ) -> Result<Admission, QuotaError> {
        q.admit(key, c, n, tokens, || Ok::<u64, ()>(existing)).unwrap()
    }

    fn cfg(max: u32, rate: f64, burst: u32) -> QuotaConfig {
        QuotaConfig { max_sandboxes: max, max_snapshots: 2, create_rate: rate, create_burst: burst }
    }

    #[test]
    fn count_includes_creates_in_flight() {
        let q = Quotas::default();
        let c = cfg(3, 0.0, 0);
        let a = admit(&q, "k", &c, 2, true, 1).unwrap();
        // 1 stored + 2 in flight: full.
        let e = admit(&q, "k", &c, 1, true, 1).unwrap_err();
        assert!(e.0.contains("at most 3 sandboxes"), "{e}");
        // Another key is not affected.
        admit(&q, "other", &c, 3, true, 0).unwrap();
        drop(a);
        // The two were recorded: the store now counts them.
        let e = admit(&q, "k", &c, 1, true, 3).unwrap_err();
        assert!(e.0.contains("holds 3"), "{e}");
        admit(&q, "k", &c, 1, true, 2).unwrap();
    }

    #[test]
    fn resume_is_refused_only_above_the_limit() {
        let q = Quotas::default();
        let c = cfg(2, 0.0, 0);
        admit(&q, "k", &c, 0, false, 2).unwrap();
        assert!(admit(&q, "k", &c, 0, false, 3).is_err());
    }

    #[test]
    fn token_bucket_limits_bursts_and_refills() {
        let q = Quotas::default();
        let c = cfg(0, 1000.0, 3);
        for _ in 0..3 {
            admit(&q, "k", &c, 1, true, 0).unwrap();
        }
        let e = admit(&q, "k", &c, 1, true, 0).unwrap_err();
        assert!(e.0.contains("create rate limit"), "{e}");
        // A fork larger than the burst can never pass.
        let e = admit(&q, "k2", &c, 4, true, 0).unwrap_err();
        assert!(e.0.contains("at most 3 sandboxes at once"), "{e}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        admit(&q, "k", &c, 1, true, 0).unwrap();
        // No tokens taken when not asked (resumes), and no limit at rate 0.
        let slow = cfg(0, 0.001, 1);
        admit(&q, "s", &slow, 1, true, 0).unwrap();
        assert!(admit(&q, "s", &slow, 1, true, 0).is_err());
        admit(&q, "s", &slow, 1, false, 0).unwrap();
        let none = cfg(0, 0.0, 0);
        for _ in 0..100 {
            admit(&q, "n", &none, 1, true, 0).unwrap();
        }
    }

    #[test]
    fn key_settings_override_defaults() {
        let d = QuotaConfig::default();
        let own =
            KeyLimits { max_sandboxes: Some(0), create_rate: Some(1.5), ..Default::default() };
        let k = d.for_key(&own);
        assert_eq!(k.max_sandboxes, 0);
        assert_eq!(k.create_rate, 1.5);
        assert_eq!(k.max_snapshots, d.max_snapshots);
        assert_eq!(k.create_burst, d.create_burst);
    }

    #[test]
    fn snapshots_are_capped() {
        let c = cfg(0, 0.0, 0);
        Quotas::admit_snapshot(&c, 1).unwrap();
        assert!(Quotas::admit_snapshot(&c, 2).unwrap_err().0.contains("at most 2 snapshots"));
        Quotas::admit_snapshot(&QuotaConfig { max_snapshots: 0, ..c }, 1000).unwrap();
    }
}
