//! Observability: what happens in every sandbox becomes metrics, alerts and audit records.
//!
//! Sources, each feeding [`Observer`]:
//! - the seccomp supervisors (one per sandbox, one per interpreter kernel) call a
//!   [`DenialSink`] for every denied syscall, on their own thread, before the caller gets its
//!   EPERM;
//! - a sampler reads every live sandbox's cgroup (memory, CPU, OOM kills, forks refused at the
//!   pids limit) and its writable layer each [`ObserveConfig::sample_every`];
//! - the manager, the API, envd and the interpreter report actions and executions.
//!
//! Records of API actions and executions are written to the database (fsynced) *before* the
//! action is acknowledged; security events and alerts, which acknowledge nothing, go through
//! a queue that a background task drains in batches (coalescing a flood of identical denials
//! into one record with a count). Every stored record is then appended to
//! `<data-dir>/audit.jsonl`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use ringfence_jail::monitor::{Denial, DenialSink};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::store::{AuditRecord, ResourceUsage, SecurityEvent, Store};
use crate::time::now_ms;

/// Who may read `/metrics`. Per-sandbox series name every tenant's sandboxes and their usage,
/// so only an operator's key (`ringfence keys create --operator`) reads them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Anyone who can reach the listener, every series: only for a listener tenants cannot
    /// reach (or a server with one tenant).
    None,
    /// An API key, in `X-API-Key` or `Authorization: Bearer`: an operator key reads every
    /// series, a tenant's key only those that name no sandbox (server-wide counts and
    /// latencies). Tenants see their own sandboxes through `/sandboxes/{id}/metrics`.
    Key,
    /// An operator key only; a tenant's key is refused.
    Operator,
}

/// When an alert fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// A sandbox took longer than this to start.
    pub startup: Duration,
    /// An execution (command or cell) ran longer than this.
    pub execution: Duration,
    /// Memory above this percentage of the sandbox's limit.
    pub memory_pct: f64,
    /// CPU above this percentage of the sandbox's quota.
    pub cpu_pct: f64,
    /// This many blocked actions of one kind (syscall) in one sandbox.
    pub escape_attempts: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            startup: Duration::from_millis(500),
            execution: Duration::from_secs(30),
            memory_pct: 90.0,
            cpu_pct: 95.0,
            escape_attempts: 1,
        }
    }
}

/// Observability settings of `ringfence serve`.
#[derive(Debug, Clone)]
pub struct ObserveConfig {
    pub metrics_auth: MetricsAuth,
    pub thresholds: Thresholds,
    /// How often every live sandbox's cgroup is sampled.
    pub sample_every: Duration,
    /// How long an ended sandbox's escape-attempt counters stay in `/metrics`.
    pub escape_retention: Duration,
    /// Layer 4's operator deny rules (`ringfence serve --risk-deny`): commands and cells with
    /// a matching signal are refused before they run. Empty: the signal is only recorded.
    pub risk_deny: ringfence_risk::DenyRules,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            metrics_auth: MetricsAuth::Key,
            thresholds: Thresholds::default(),
            sample_every: Duration::from_secs(1),
            escape_retention: Duration::from_secs(300),
            risk_deny: ringfence_risk::DenyRules::default(),
        }
    }
}

/// The audit trail's JSON-lines copy, beside the database.
pub fn jsonl_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("audit.jsonl")
}

/// Longest command line or cell kept verbatim in a record (the hash covers all of it).
const MAX_CODE_IN_RECORD: usize = 4096;
/// Security events a sandbox remembers for attributing them to executions.
const RECENT_EVENTS: usize = 1024;
/// Repeats of one denial closer together than this share one remembered entry.
const MERGE_WINDOW_MS: i64 = 1000;
/// Samples kept for `GET /sandboxes/{id}/metrics` (one per [`HISTORY_EVERY`] samples).
const HISTORY: usize = 720;
const HISTORY_EVERY: u64 = 5;

/// The server-wide observer.
#[derive(Debug)]
pub struct Observer {
    cfg: ObserveConfig,
    pub metrics: Metrics,
    store: Arc<Store>,
    jsonl: Mutex<Option<File>>,
    queue: Mutex<Vec<Queued>>,
    queued: Notify,
}

/// A record waiting for the background writer.
#[derive(Debug)]
struct Queued {
    rec: AuditRecord,
    /// For security events: what identifies "the same event again", so a flood coalesces.
    key: Option<(String, String, String, Option<u32>)>,
}

/// Errors opening the observer.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("open {path}: {source}")]
    Jsonl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Observer {
    pub fn new(
        cfg: ObserveConfig,
        store: Arc<Store>,
        data_dir: &Path,
    ) -> Result<Arc<Observer>, ObserveError> {
        let path = jsonl_path(data_dir);
        let file =
            File::options().create(true).append(true).open(&path).map_err(|source| {
                ObserveError::Jsonl { path: path.display().to_string(), source }
            })?;
        let metrics = Metrics::new()?;
        for t in crate::catalog::TEMPLATES {
            // No pool yet: every start is a miss and every pool is empty.
            metrics.pool_size.with_label_values(&[t]).set(0);
        }
        Ok(Arc::new(Observer {
            cfg,
            metrics,
            store,
            jsonl: Mutex::new(Some(file)),
            queue: Mutex::default(),
            queued: Notify::new(),
        }))
    }

    pub fn config(&self) -> &ObserveConfig {
        &self.cfg
    }

    /// Per-sandbox state for a new (or reattached) sandbox.
    pub fn sandbox(self: &Arc<Self>, id: &str, key_id: &str, cpu_millis: u64) -> Arc<SandboxObs> {
        Arc::new(SandboxObs {
            id: id.to_string(),
            key_id: key_id.to_string(),
            observer: self.clone(),
            cpus: (cpu_millis as f64 / 1000.0).max(0.001),
            source: OnceLock::new(),
            state: Mutex::default(),
            next_exec: AtomicU64::new(1),
        })
    }

    /// Appends stored records to the JSON-lines file. A failure is logged, not returned: the
    /// database copy is the one that counts, and it is already committed.
    fn append_jsonl(&self, recs: &[AuditRecord]) {
        let Ok(mut guard) = self.jsonl.lock() else { return };
        let Some(file) = guard.as_mut() else { return };
        let mut buf = Vec::new();
        for r in recs {
            if serde_json::to_writer(&mut buf, r).is_ok() {
                buf.push(b'\n');
            }
        }
        // One write of whole lines on an O_APPEND file: a concurrent reader never sees half
        // a record, and a `kill -9` after it cannot lose it (the page cache outlives us).
        if let Err(e) = file.write_all(&buf) {
            tracing::warn!(error = %e, "could not append to audit.jsonl");
        }
    }

    /// Records the manager committed itself (with a sandbox row): appends them to the file.
    pub fn committed(&self, recs: &[AuditRecord]) {
        self.append_jsonl(recs);
    }

    /// Stores `rec` now (blocking: call from a blocking context), then appends it to the file.
    fn store_now(&self, rec: &mut AuditRecord) {
        match self.store.insert_audit(rec) {
            Ok(()) => self.append_jsonl(std::slice::from_ref(rec)),
            Err(e) => tracing::error!(action = %rec.action, error = %e, "audit record lost"),
        }
    }

    /// Stores `rec` before returning: for actions about to be acknowledged.
    pub async fn record(self: &Arc<Self>, mut rec: AuditRecord) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.store_now(&mut rec)).await;
    }

    /// Writes a record the caller need not wait for (security events, alerts).
    fn enqueue(&self, rec: AuditRecord, key: Option<(String, String, String, Option<u32>)>) {
        if let Ok(mut q) = self.queue.lock() {
            // The same event again before the writer ran: count it on the pending record.
            if let Some(k) = &key
                && let Some(prev) = q.iter_mut().rev().find(|e| e.key.as_ref() == Some(k))
                && let Some(ev) = prev.rec.security_events.first_mut()
            {
                ev.count += rec.security_events.first().map_or(1, |e| e.count);
                return;
            }
            q.push(Queued { rec, key });
        }
        self.queued.notify_one();
    }

    /// Drains the queue into the database, in batches. Runs forever.
    pub async fn write_loop(self: Arc<Self>) {
        loop {
            self.queued.notified().await;
            self.flush().await;
        }
    }

    /// Writes whatever is queued now.
    pub async fn flush(self: &Arc<Self>) {
        let batch: Vec<Queued> =
            self.queue.lock().map(|mut q| std::mem::take(&mut *q)).unwrap_or_default();
        if batch.is_empty() {
            return;
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut recs: Vec<AuditRecord> = batch.into_iter().map(|q| q.rec).collect();
            match me.store.insert_audits(&mut recs) {
                Ok(()) => me.append_jsonl(&recs),
                Err(e) => tracing::error!(records = recs.len(), error = %e, "audit records lost"),
            }
        })
        .await;
    }

    /// Raises an alert: a warning in the log, a counter, and an `alert.<name>` record.
    fn alert(
        &self,
        sb: Option<&SandboxObs>,
        name: &str,
        value: f64,
        threshold: f64,
        extra: Map<String, Value>,
    ) {
        self.metrics.alerts.with_label_values(&[name]).inc();
        let sandbox_id = sb.map(|s| s.id.as_str()).unwrap_or("");
        tracing::warn!(alert = name, sandbox_id, value, threshold, "alert: {name} over threshold");
        let mut rec = AuditRecord::new(format!("alert.{name}"), now_ms());
        if let Some(s) = sb {
            rec.sandbox_id = Some(s.id.clone());
            rec.user_id = Some(s.key_id.clone());
        }
        rec.detail.insert("value".into(), json!(value));
        rec.detail.insert("threshold".into(), json!(threshold));
        rec.detail.extend(extra);
        self.enqueue(rec, None);
    }

    /// A sandbox finished starting.
    /// Records how many pre-started sandboxes wait in `template`'s pool.
    pub fn pool_size(&self, template: &str, n: usize) {
        self.metrics.pool_size.with_label_values(&[template]).set(n as i64);
    }

    pub fn started(&self, sb: &SandboxObs, tier: &str, template: &str, took: Duration, pool: &str) {
        self.metrics.startup.with_label_values(&[tier, template, pool]).observe(took.as_secs_f64());
        let limit = self.cfg.thresholds.startup;
        if took > limit {
            let mut extra = Map::new();
            extra.insert("template".into(), json!(template));
            self.alert(Some(sb), "startup", ms_f(took), ms_f(limit), extra);
        }
    }
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// sha256, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn truncated(s: &str) -> (String, bool) {
    if s.len() <= MAX_CODE_IN_RECORD {
        return (s.to_string(), false);
    }
    let mut end = MAX_CODE_IN_RECORD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_string(), true)
}

/// One sample of a sandbox's resource use, in E2B's `SandboxMetric` terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub ts_ms: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

impl Sample {
    /// E2B's JSON shape.
    pub fn json(&self) -> Value {
        json!({
            "timestamp": crate::time::rfc3339_ms(self.ts_ms),
            "timestampUnix": self.ts_ms / 1000,
            "cpuCount": self.cpu_count,
            "cpuUsedPct": (self.cpu_used_pct * 100.0).round() / 100.0,
            "memUsed": self.mem_used,
            "memTotal": self.mem_total,
            "memCache": self.mem_cache,
            "diskUsed": self.disk_used,
            "diskTotal": self.disk_total,
        })
    }
}

#[derive(Debug, Default)]
struct ObsState {
    /// Security events with the time (Unix ms) of their latest occurrence, newest last.
    recent: VecDeque<(i64, SecurityEvent)>,
    /// Blocked actions so far by (kind, syscall).
    escapes: BTreeMap<(String, String), u64>,
    /// Cgroup counters already turned into events.
    seen_oom: u64,
    seen_pids: u64,
    /// The previous CPU reading, for the rate.
    last_cpu: Option<(u64, Instant)>,
    /// Whether memory / CPU are above their threshold (alerts fire on the rising edge).
    mem_high: bool,
    cpu_high: bool,
    samples: u64,
    history: VecDeque<Sample>,
    /// Executions running now: id → (started, kind, alerted).
    running: HashMap<u64, (Instant, &'static str, bool)>,
}

/// What observation reads of a live sandbox: its tier instance's figures and the sizes it
/// was given. A narrow view, so this module needs nothing else of `manager::Live`.
pub trait UsageSource: Send + Sync + std::fmt::Debug {
    fn usage(&self) -> Option<crate::tier::Usage>;
    /// (OOM kills, refused forks) so far.
    fn limit_events(&self) -> Option<(u64, u64)>;
    fn memory_cpu(&self) -> Option<(u64, Option<u64>)>;
    /// (used, total) bytes of the writable layer.
    fn disk_usage(&self) -> Option<(u64, u64)>;
    /// (CPU count, disk MiB) the sandbox was given.
    fn sizes(&self) -> Option<(u32, u32)>;
}

/// Observation state of one sandbox.
#[derive(Debug)]
pub struct SandboxObs {
    pub id: String,
    pub key_id: String,
    observer: Arc<Observer>,
    /// The CPU quota in cores, what 100 % means.
    cpus: f64,
    /// Where the sandbox's resource figures come from (its tier's instance, through `Live`).
    source: OnceLock<Weak<dyn UsageSource>>,
    state: Mutex<ObsState>,
    next_exec: AtomicU64,
}

impl SandboxObs {
    /// Links the sandbox whose figures this reads.
    pub fn attach(&self, source: Weak<dyn UsageSource>) {
        let _ = self.source.set(source);
    }

    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    fn source(&self) -> Option<Arc<dyn UsageSource>> {
        self.source.get()?.upgrade()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ObsState> {
        // The state is counters and caches; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The sink for this sandbox's seccomp supervisors.
    pub fn denial_sink(self: &Arc<Self>) -> DenialSink {
        let me = self.clone();
        Arc::new(move |d: &Denial<'_>| me.denied(d))
    }

    fn denied(&self, d: &Denial<'_>) {
        let (comm, ns_pid) = proc_status(d.pid);
        self.security(SecurityEvent {
            kind: "seccomp".into(),
            syscall: d.syscall.to_string(),
            pid: ns_pid,
            host_pid: Some(d.pid),
            comm,
            count: 1,
            timestamp: String::new(),
        });
    }

    /// Counts, remembers, queues for the audit trail and, at the threshold, alerts on one
    /// blocked action.
    fn security(&self, mut ev: SecurityEvent) {
        let now = now_ms();
        ev.timestamp = crate::time::rfc3339_ms(now);
        let obs = &self.observer;
        obs.metrics
            .escape_attempts
            .with_label_values(&[&self.id, &ev.syscall, &ev.kind])
            .inc_by(ev.count);
        let (before, after) = {
            let mut st = self.state();
            // The same denial again from the same process within a moment (a loop of denied
            // calls) adds to the last entry, so a flood neither evicts older events nor lists
            // thousands of copies. Cgroup events arrive already counted per sample.
            match st.recent.back_mut() {
                Some((last_at, last))
                    if ev.kind == "seccomp"
                        && last.kind == ev.kind
                        && last.syscall == ev.syscall
                        && last.host_pid == ev.host_pid
                        && now - *last_at < MERGE_WINDOW_MS =>
                {
                    last.count += ev.count;
                    *last_at = now;
                }
                _ => {
                    if st.recent.len() == RECENT_EVENTS {
                        st.recent.pop_front();
                    }
                    st.recent.push_back((now, ev.clone()));
                }
            }
            let n = st.escapes.entry((ev.kind.clone(), ev.syscall.clone())).or_insert(0);
            let before = *n;
            *n += ev.count;
            (before, *n)
        };
        let mut rec = AuditRecord::new(format!("security.{}", ev.kind), now);
        rec.sandbox_id = Some(self.id.clone());
        rec.user_id = Some(self.key_id.clone());
        let key = (self.id.clone(), ev.kind.clone(), ev.syscall.clone(), ev.host_pid);
        let (kind, syscall) = (ev.kind.clone(), ev.syscall.clone());
        rec.security_events.push(ev);
        obs.enqueue(rec, Some(key));
        let limit = obs.cfg.thresholds.escape_attempts.max(1);
        if before < limit && after >= limit {
            let mut extra = Map::new();
            extra.insert("kind".into(), json!(kind));
            extra.insert("syscall".into(), json!(syscall));
            obs.alert(Some(self), "escape_attempt", after as f64, limit as f64, extra);
        }
    }

    /// Turns OOM kills and refused forks counted since the claim into security events for
    /// those not seen yet.
    fn note_limit_events(&self, oom_total: u64, pids_total: u64) {
        let (oom, pids) = {
            let mut st = self.state();
            let oom = oom_total.saturating_sub(st.seen_oom);
            let pids = pids_total.saturating_sub(st.seen_pids);
            st.seen_oom = st.seen_oom.max(oom_total);
            st.seen_pids = st.seen_pids.max(pids_total);
            (oom, pids)
        };
        let event = |kind: &str, syscall: &str, count: u64| SecurityEvent {
            kind: kind.into(),
            syscall: syscall.into(),
            pid: None,
            host_pid: None,
            comm: None,
            count,
            timestamp: String::new(),
        };
        if oom > 0 {
            self.security(event("oom", "none", oom));
        }
        if pids > 0 {
            self.security(event("pids", "fork", pids));
        }
    }

    /// Reads just the cgroup's limit-event counters (two files) and notes new events.
    fn poll_limit_events(&self) {
        if let Some((oom, pids)) = self.source().and_then(|s| s.limit_events()) {
            self.note_limit_events(oom, pids);
        }
    }

    /// Memory charged now and CPU time so far (two files).
    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        self.source()?.memory_cpu()
    }

    /// Samples the sandbox now: gauges, history, edge-triggered memory and CPU alerts,
    /// executions running past their threshold. Blocking (reads cgroup files).
    pub fn sample(&self) -> Option<Sample> {
        let source = self.source()?;
        let usage = source.usage()?;
        self.note_limit_events(usage.oom_kills, usage.pids_max_hits);
        let disk = source.disk_usage();
        let (cpu_count, disk_mb) = source.sizes()?;
        let now = Instant::now();
        let obs = &self.observer;
        let t = obs.cfg.thresholds;
        let mut alerts = Vec::new();
        let sample = {
            let mut st = self.state();
            let cpu_pct = match (usage.cpu_ns, st.last_cpu) {
                (Some(ns), Some((prev, at))) => {
                    let wall = now.duration_since(at).as_nanos() as f64;
                    if wall > 0.0 {
                        (ns.saturating_sub(prev) as f64 / (wall * self.cpus) * 100.0)
                            .clamp(0.0, 100.0)
                    } else {
                        0.0
                    }
                }
                _ => 0.0,
            };
            if let Some(ns) = usage.cpu_ns {
                // The first sample counts everything since the slot was claimed.
                let prev = st.last_cpu.map_or(0, |(p, _)| p);
                obs.metrics
                    .cpu_seconds
                    .with_label_values(&[&self.id])
                    .inc_by(ns.saturating_sub(prev) as f64 / 1e9);
                st.last_cpu = Some((ns, now));
            }
            let mem_total = usage.memory_limit.unwrap_or_else(host_memory);
            let mem_pct = if mem_total > 0 {
                usage.memory_bytes as f64 * 100.0 / mem_total as f64
            } else {
                0.0
            };
            // Without a limit there is nothing to be near.
            let mem_high = usage.memory_limit.is_some() && mem_pct > t.memory_pct;
            if mem_high && !st.mem_high {
                alerts.push(("memory", mem_pct, t.memory_pct));
            }
            st.mem_high = mem_high;
            let cpu_high = cpu_pct > t.cpu_pct;
            if cpu_high && !st.cpu_high {
                alerts.push(("cpu", cpu_pct, t.cpu_pct));
            }
            st.cpu_high = cpu_high;
            for (started, kind, alerted) in st.running.values_mut() {
                let ran = now.duration_since(*started);
                if !*alerted && ran > t.execution {
                    *alerted = true;
                    alerts.push((
                        if *kind == "cell" { "execution_cell" } else { "execution" },
                        ms_f(ran),
                        ms_f(t.execution),
                    ));
                }
            }
            let (disk_used, disk_total) = disk.unwrap_or((0, u64::from(disk_mb) << 20));
            let sample = Sample {
                ts_ms: now_ms(),
                cpu_count,
                cpu_used_pct: cpu_pct,
                mem_used: usage.memory_bytes,
                mem_total,
                mem_cache: usage.memory_cache_bytes,
                disk_used,
                disk_total,
            };
            if st.samples.is_multiple_of(HISTORY_EVERY) {
                if st.history.len() == HISTORY {
                    st.history.pop_front();
                }
                st.history.push_back(sample);
            }
            st.samples += 1;
            sample
        };
        let m = &obs.metrics;
        m.memory.with_label_values(&[&self.id]).set(sample.mem_used as f64);
        m.memory_limit.with_label_values(&[&self.id]).set(sample.mem_total as f64);
        m.cpu_percent.with_label_values(&[&self.id]).set(sample.cpu_used_pct);
        m.disk_used.with_label_values(&[&self.id]).set(sample.disk_used as f64);
        for (name, value, threshold) in alerts {
            // Cell executions alert under the same name; the kind tells them apart.
            let (name, kind) = match name {
                "execution_cell" => ("execution", Some("cell")),
                "execution" => ("execution", Some("command")),
                other => (other, None),
            };
            let mut extra = Map::new();
            if let Some(k) = kind {
                extra.insert("kind".into(), json!(k));
            }
            obs.alert(Some(self), name, value, threshold, extra);
        }
        Some(sample)
    }

    /// Samples kept between `start_ms` and `end_ms` (Unix ms, inclusive), plus one taken now
    /// when the range reaches the present.
    pub fn samples(&self, start_ms: Option<i64>, end_ms: Option<i64>) -> Vec<Sample> {
        let now = now_ms();
        let in_range = |t: i64| start_ms.is_none_or(|s| t >= s) && end_ms.is_none_or(|e| t <= e);
        let mut out: Vec<Sample> =
            self.state().history.iter().filter(|s| in_range(s.ts_ms)).copied().collect();
        if end_ms.is_none_or(|e| e >= now / 1000 * 1000)
            && let Some(s) = self.sample()
        {
            out.push(s);
        }
        out
    }

    /// Resource use of the sandbox as a whole now: memory charged and CPU time so far.
    fn usage_now(&self) -> Option<ResourceUsage> {
        let (mem, cpu_ns) = self.memory_cpu()?;
        Some(ResourceUsage { memory_mb: mem >> 20, cpu_ms: cpu_ns.unwrap_or(0) / 1_000_000 })
    }

    /// A record of an action on this sandbox, with its owner and current resource use.
    pub fn action(&self, action: &str) -> AuditRecord {
        let mut rec = AuditRecord::new(action, now_ms());
        rec.sandbox_id = Some(self.id.clone());
        rec.user_id = Some(self.key_id.clone());
        rec.resource_usage = self.usage_now();
        rec
    }

    /// Applies the operator's deny rules to `code` before it runs: `None` to go ahead, or the
    /// reason it is refused, once its `exec.refused` record (with the analysis and the rules
    /// that matched) is stored. Only with rules to apply does the analysis stand in the
    /// execution's way (about 0.2 ms for a typical cell, milliseconds for a long script:
    /// docs/PERFORMANCE.md, "Layer 4"); it runs on the blocking pool, not an async worker.
    pub async fn refusal(
        &self,
        kind: &'static str,
        code: &str,
        lang: Option<ringfence_risk::Language>,
    ) -> Option<String> {
        let rules = &self.observer.cfg.risk_deny;
        let lang = lang?;
        if rules.is_empty() {
            return None;
        }
        // An analysis that panicked lets the code through: the rules are policy, not the
        // boundary (the code is contained either way), and a refusal needs a finding to name.
        let owned = code.to_string();
        let report = tokio::task::spawn_blocking(move || ringfence_risk::analyze(lang, &owned))
            .await
            .ok()?;
        let matched: Vec<String> = rules
            .matches(&report)
            .iter()
            .map(|s| format!("{} (line {})", s.rule, s.line))
            .collect();
        if matched.is_empty() {
            return None;
        }
        let obs = &self.observer;
        for s in &report.signals {
            let severity = serde_json::to_value(s.severity)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            obs.metrics.risk_signals.with_label_values(&[s.rule, &severity]).inc();
        }
        let mut rec = self.action("exec.refused");
        rec.code_hash = Some(sha256_hex(code.as_bytes()));
        let (text, cut) = truncated(code);
        rec.detail.insert("kind".into(), json!(kind));
        rec.detail.insert(if kind == "cell" { "code" } else { "command" }.into(), json!(text));
        if cut {
            rec.detail.insert("truncated".into(), json!(true));
        }
        rec.detail.insert("risk".into(), json!(report));
        rec.detail.insert("denied_by".into(), json!(matched));
        obs.record(rec).await;
        Some(format!("refused by the operator's risk rules: {}", matched.join(", ")))
    }

    /// Records an API action on this sandbox before returning.
    pub async fn record_action(&self, action: &str, detail: Value) {
        let mut rec = self.action(action);
        if let Value::Object(m) = detail {
            rec.detail = m;
        }
        self.observer.record(rec).await;
    }

    /// The record of the sandbox's end (blocking: reads the cgroup one last time): its resource
    /// use and every security event of its life.
    pub fn final_record(&self, action: &str) -> AuditRecord {
        self.poll_limit_events();
        let mut rec = self.action(action);
        rec.security_events = self.security_summary();
        rec
    }

    /// Every security event of the sandbox's life, one per (kind, syscall), for its final
    /// record.
    pub fn security_summary(&self) -> Vec<SecurityEvent> {
        let st = self.state();
        let mut by: BTreeMap<(String, String), SecurityEvent> = BTreeMap::new();
        for (_, ev) in &st.recent {
            by.entry((ev.kind.clone(), ev.syscall.clone()))
                .and_modify(|e| e.count += ev.count)
                .or_insert_with(|| ev.clone());
        }
        by.into_values().collect()
    }

    /// The sandbox ended: drop its gauges now and its counters after the retention period.
    pub fn ended(&self) {
        let m = self.observer.metrics.clone();
        m.forget_gauges(&self.id);
        let series: Vec<(String, String)> = self
            .state()
            .escapes
            .keys()
            .map(|(kind, syscall)| (syscall.clone(), kind.clone()))
            .collect();
        if series.is_empty() {
            return;
        }
        let id = self.id.clone();
        let keep = self.observer.cfg.escape_retention;
        tokio::spawn(async move {
            tokio::time::sleep(keep).await;
            m.forget_escapes(&id, &series);
        });
    }

    /// Security events of this sandbox from `since_ms` on.
    fn events_since(&self, since_ms: i64) -> Vec<SecurityEvent> {
        self.state().recent.iter().filter(|(t, _)| *t >= since_ms).map(|(_, e)| e.clone()).collect()
    }

    /// Starts tracking an execution of `code`, written in `lang` where known (layer 4's
    /// static analysis runs beside the execution, on the blocking pool, so it adds nothing to
    /// the execution's own time; its signals join the execution's record).
    pub fn execution(
        self: &Arc<Self>,
        kind: &'static str,
        code: &str,
        lang: Option<ringfence_risk::Language>,
    ) -> Execution {
        let risk: Arc<std::sync::OnceLock<ringfence_risk::Report>> = Arc::default();
        if let (Some(lang), Ok(rt)) = (lang, tokio::runtime::Handle::try_current()) {
            let (slot, code) = (risk.clone(), code.to_string());
            rt.spawn_blocking(move || {
                let _ = slot.set(ringfence_risk::analyze(lang, &code));
            });
        }
        let id = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.state().running.insert(id, (started, kind, false));
        // A command reports its own CPU time when it ends; a cell runs in a long-lived kernel,
        // so its share is the sandbox's CPU time over the cell.
        let cpu_ns = if kind == "cell" { self.memory_cpu().and_then(|(_, c)| c) } else { None };
        Execution {
            sb: self.clone(),
            id,
            kind,
            code_hash: sha256_hex(code.as_bytes()),
            code: truncated(code),
            started,
            started_ms: now_ms(),
            cpu_ns,
            done: false,
            risk,
        }
    }
}

/// The command name and in-sandbox pid of a host pid, from `/proc/<pid>/status` (the process
/// is blocked in the denied call while this runs, so the pid is still its own).
fn proc_status(pid: u32) -> (Option<String>, Option<u32>) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (None, None);
    };
    let mut comm = None;
    let mut ns_pid = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Name:") {
            comm = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("NSpid:") {
            // The innermost namespace's pid comes last.
            ns_pid = v.split_whitespace().last().and_then(|p| p.parse().ok());
        }
    }
    (comm, ns_pid)
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// How an execution ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    /// Resource use the execution itself reported (a command's rusage); `None` measures the
    /// sandbox's cgroup over the execution instead.
    pub usage: Option<ResourceUsage>,
    pub detail: Map<String, Value>,
}

/// An execution in progress (a command or a code cell). [`Execution::finish`] records it;
/// dropped unfinished (the client went away), it is recorded in the background as abandoned.
#[derive(Debug)]
pub struct Execution {
    sb: Arc<SandboxObs>,
    id: u64,
    kind: &'static str,
    code_hash: String,
    code: (String, bool),
    started: Instant,
    started_ms: i64,
    cpu_ns: Option<u64>,
    done: bool,
    /// Layer 4's report, filled in beside the execution (empty until then).
    risk: Arc<std::sync::OnceLock<ringfence_risk::Report>>,
}

impl Execution {
    fn build(&mut self, out: Outcome) -> AuditRecord {
        self.done = true;
        let took = self.started.elapsed();
        let sb = &self.sb;
        let obs = &sb.observer;
        obs.metrics.execution.with_label_values(&[self.kind]).observe(took.as_secs_f64());
        // A last look at the cgroup, so an OOM kill or a refused fork that ended this
        // execution is among its events.
        sb.poll_limit_events();
        let alerted = sb.state().running.remove(&self.id).is_some_and(|r| r.2);
        let limit = obs.cfg.thresholds.execution;
        if !alerted && took > limit {
            let mut extra = Map::new();
            extra.insert("kind".into(), json!(self.kind));
            obs.alert(Some(sb), "execution", ms_f(took), ms_f(limit), extra);
        }
        let action = if self.kind == "cell" { "exec.cell" } else { "exec.command" };
        let mut rec = AuditRecord::new(action, now_ms());
        rec.sandbox_id = Some(sb.id.clone());
        rec.user_id = Some(sb.key_id.clone());
        rec.code_hash = Some(self.code_hash.clone());
        rec.duration_ms = Some(took.as_millis() as u64);
        rec.exit_code = out.exit_code;
        rec.resource_usage = out.usage.or_else(|| {
            sb.memory_cpu().map(|(mem, cpu)| ResourceUsage {
                memory_mb: mem >> 20,
                cpu_ms: match (cpu, self.cpu_ns) {
                    (Some(now), Some(then)) => now.saturating_sub(then) / 1_000_000,
                    _ => 0,
                },
            })
        });
        rec.security_events = sb.events_since(self.started_ms);
        let field = if self.kind == "cell" { "code" } else { "command" };
        rec.detail.insert(field.into(), json!(self.code.0));
        if self.code.1 {
            rec.detail.insert("truncated".into(), json!(true));
        }
        rec.detail.extend(out.detail);
        // An analysis still running when the execution ends (a long script that finished at
        // once) is not waited for: the record says it is missing rather than arrive late.
        match self.risk.get() {
            Some(report) if !report.signals.is_empty() => {
                for s in &report.signals {
                    let severity = serde_json::to_value(s.severity)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    obs.metrics.risk_signals.with_label_values(&[s.rule, &severity]).inc();
                }
                rec.detail.insert("risk".into(), json!(report));
            }
            Some(_) => {}
            None if Arc::strong_count(&self.risk) > 1 => {
                rec.detail.insert("risk".into(), json!({"pending": true}));
            }
            None => {}
        }
        rec
    }

    /// Records the execution's end; returns once the record is stored. One trip to the
    /// blocking pool for the cgroup reads and the commit together: inline, a commit waiting
    /// for the store's lock would stall an async worker and everything queued on it.
    pub async fn finish(mut self, out: Outcome) {
        let _ = tokio::task::spawn_blocking(move || {
            let mut rec = self.build(out);
            self.sb.observer.store_now(&mut rec);
        })
        .await;
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut detail = Map::new();
        detail.insert("abandoned".into(), json!("the client went away before the end"));
        let rec = self.build(Outcome { exit_code: None, usage: None, detail });
        let obs = self.sb.observer.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move { obs.record(rec).await });
        }
    }
}

/// The interpreter's hook: watches a cell's NDJSON response stream and records the cell when
/// its `end_of_execution` passes, before the client receives it.
/// `started_ms` is when the cell went to the kernel: a denied call it made at once may come
/// before this hook is set up, and still belongs to the cell's record.
pub fn cell<S>(
    obs: &Arc<SandboxObs>,
    code: &str,
    lang: Option<ringfence_risk::Language>,
    started_ms: i64,
    stream: S,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let mut execution = obs.execution("cell", code, lang);
    execution.started_ms = execution.started_ms.min(started_ms);
    let exec = Arc::new(Mutex::new(Some(execution)));
    let error: Arc<Mutex<Option<String>>> = Arc::default();
    stream.then(move |item| {
        let (exec, error) = (exec.clone(), error.clone());
        async move {
            let text: &[u8] = match &item {
                Ok(line) => line.as_ref(),
                Err(never) => match *never {},
            };
            // Error lines are small; a multi-megabyte result (an image) is not scanned.
            if text.len() < MAX_SCANNED_LINE
                && memmem(text, b"\"type\":\"error\"")
                && let Ok(v) = serde_json::from_slice::<Value>(text)
                && v.get("type").and_then(Value::as_str) == Some("error")
                && let Ok(mut e) = error.lock()
            {
                *e = Some(v.get("name").and_then(Value::as_str).unwrap_or("Error").to_string());
            }
            if text.trim_ascii() == b"{\"type\":\"end_of_execution\"}" {
                let taken = exec.lock().ok().and_then(|mut e| e.take());
                if let Some(x) = taken {
                    let err = error.lock().ok().and_then(|e| e.clone());
                    let mut detail = Map::new();
                    detail.insert("error".into(), json!(err));
                    x.finish(Outcome {
                        exit_code: Some(i32::from(err.is_some())),
                        usage: None,
                        detail,
                    })
                    .await;
                }
            }
            item
        }
    })
}

/// Longest response line the cell hook looks into for an error.
const MAX_SCANNED_LINE: usize = 1 << 20;

fn memmem(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
