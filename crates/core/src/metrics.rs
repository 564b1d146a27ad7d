//! The server's Prometheus metrics, in a registry of their own, rendered in the text exposition
//! format at `GET /metrics`.
//!
//! Label values come from small closed sets (tiers, templates, kinds, route templates, status
//! codes) except `sandbox`, which names live sandboxes: their gauges are removed when a
//! sandbox ends, their escape-attempt counters a retention period later (so a scrape after
//! the kill still sees what happened), which keeps the series count bounded by the sandboxes
//! alive in that window.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Everything `/metrics` exposes.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `tier`, `template`, `pool` (`hit`/`miss`).
    pub startup: HistogramVec,
    /// `kind`: `command` (envd process Start) or `cell` (interpreter /execute).
    pub execution: HistogramVec,
    /// `route` (the route template), `method`, `status`.
    pub api: HistogramVec,
    /// `sandbox`.
    pub memory: GaugeVec,
    pub memory_limit: GaugeVec,
    pub cpu_percent: GaugeVec,
    pub cpu_seconds: CounterVec,
    pub disk_used: GaugeVec,
    /// `sandbox`, `syscall`, `kind` (`seccomp`, `oom`, `pids`).
    pub escape_attempts: IntCounterVec,
    /// `state`.
    pub sandboxes: IntGaugeVec,
    /// `template`.
    pub pool_size: IntGaugeVec,
    /// `alert`.
    pub alerts: IntCounterVec,
    /// `rule`, `severity`: layer 4's static signals (`ringfence_risk`).
    pub risk_signals: IntCounterVec,
}

/// Errors building the registry (only a programming error: a bad name or a duplicate).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

const STARTUP_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const EXECUTION_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const API_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let cpu_seconds = CounterVec::new(
            Opts::new(
                "ringfence_sandbox_cpu_seconds_total",
                "CPU time used by each live sandbox (its cgroup), in seconds.",
            ),
            &["sandbox"],
        )?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        let m = Metrics {
            startup: histogram(
                "ringfence_sandbox_startup_seconds",
                "Time from a create request to a ready sandbox.",
                STARTUP_BUCKETS,
                &["tier", "template", "pool"],
            )?,
            execution: histogram(
                "ringfence_execution_seconds",
                "Duration of executions inside sandboxes: commands (envd Start) and code cells.",
                EXECUTION_BUCKETS,
                &["kind"],
            )?,
            api: histogram(
                "ringfence_api_request_duration_seconds",
                "API request latency to response headers, by route template, method and status.",
                API_BUCKETS,
                &["route", "method", "status"],
            )?,
            memory: gauge(
                "ringfence_sandbox_memory_bytes",
                "Memory charged to each live sandbox's cgroup, page cache included.",
                &["sandbox"],
            )?,
            memory_limit: gauge(
                "ringfence_sandbox_memory_limit_bytes",
                "Memory limit of each live sandbox.",
                &["sandbox"],
            )?,
            cpu_percent: gauge(
                "ringfence_sandbox_cpu_percent",
                "CPU use of each live sandbox over the last sample, in percent of its CPU quota.",
                &["sandbox"],
            )?,
            cpu_seconds,
            disk_used: gauge(
                "ringfence_sandbox_disk_used_bytes",
                "Bytes used in each live sandbox's writable layer.",
                &["sandbox"],
            )?,
            escape_attempts: counter(
                "ringfence_escape_attempts_total",
                "Blocked actions inside sandboxes: denied syscalls (seccomp), memory-limit kills \
                 (oom), forks refused at the pids limit (pids).",
                &["sandbox", "syscall", "kind"],
            )?,
            sandboxes: int_gauge("ringfence_sandboxes", "Sandboxes by state.", &["state"])?,
            pool_size: int_gauge(
                "ringfence_pool_size",
                "Pre-started sandboxes waiting in the pool, by template.",
                &["template"],
            )?,
            alerts: counter(
                "ringfence_alerts_total",
                "Alerts raised (threshold crossings), by alert.",
                &["alert"],
            )?,
            risk_signals: counter(
                "ringfence_risk_signals_total",
                "Static risk signals in submitted commands and cells, by rule and severity \
                 (a signal for operators, never a security boundary).",
                &["rule", "severity"],
            )?,
            registry,
        };
        Ok(m)
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The exposition text without any series that names a sandbox: what a tenant's key may
    /// read (server-wide counts and latencies, no other tenant's sandbox ids or usage).
    pub fn render_shared(&self) -> Result<String, MetricsError> {
        let mut families = self.registry.gather();
        for f in &mut families {
            f.mut_metric().retain(|m| m.get_label().iter().all(|l| l.name() != "sandbox"));
        }
        // The text encoder refuses a family with no series left.
        families.retain(|f| !f.get_metric().is_empty());
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Forgets a sandbox's gauges (it has ended).
    pub fn forget_gauges(&self, sandbox: &str) {
        for g in [&self.memory, &self.memory_limit, &self.cpu_percent, &self.disk_used] {
            let _ = g.remove_label_values(&[sandbox]);
        }
        let _ = self.cpu_seconds.remove_label_values(&[sandbox]);
    }

    /// Forgets a sandbox's escape-attempt counters.
    pub fn forget_escapes(&self, sandbox: &str, series: &[(String, String)]) {
        for (syscall, kind) in series {
            let _ = self.escape_attempts.remove_label_values(&[sandbox, syscall, kind]);
        }
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `route` label of a request: the matched route template when the control plane matched
/// one, else one of a fixed set naming the sandbox API called, so raw paths (sandbox ids,
/// file names, context ids) never become label values.
pub fn route_label(matched: Option<&str>, path: &str, port: Option<u16>) -> String {
    if let Some(m) = matched {
        return m.to_string();
    }
    let path = path.trim_end_matches('/');
    let mut segs = path.rsplit('/');
    let last = segs.next().unwrap_or("");
    let service = segs.next().unwrap_or("");
    if port == Some(49999) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        return match parts.as_slice() {
            ["execute"] => "interp:/execute",
            ["contexts"] => "interp:/contexts",
            ["contexts", _] => "interp:/contexts/{id}",
            ["contexts", _, "restart"] => "interp:/contexts/{id}/restart",
            ["health"] => "interp:/health",
            _ => "interp:other",
        }
        .to_string();
    }
    const RPCS: &[&str] = &[
        "Start",
        "Connect",
        "StreamInput",
        "List",
        "SendInput",
        "CloseStdin",
        "SendSignal",
        "Update",
        "WatchDir",
        "Stat",
        "ListDir",
        "MakeDir",
        "Move",
        "Remove",
        "CreateWatcher",
        "GetWatcherEvents",
        "RemoveWatcher",
    ];
    match (service, last) {
        ("process.Process" | "filesystem.Filesystem", rpc) if RPCS.contains(&rpc) => {
            format!("envd:/{service}/{rpc}")
        }
        (_, "files") => "envd:/files".to_string(),
        (_, "health") => "envd:/health".to_string(),
        _ => "unmatched".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label(Some("/sandboxes/{id}"), "/sandboxes/abc", None), "/sandboxes/{id}");
        assert_eq!(
            route_label(None, "/process.Process/Start", Some(49983)),
            "envd:/process.Process/Start"
        );
        assert_eq!(route_label(None, "/process.Process/Evil123", None), "unmatched");
        assert_eq!(route_label(None, "/files", None), "envd:/files");
        assert_eq!(
            route_label(None, "/contexts/abc/restart", Some(49999)),
            "interp:/contexts/{id}/restart"
        );
        assert_eq!(route_label(None, "/x/y/z", None), "unmatched");
    }

    #[test]
    fn renders_and_forgets() {
        let m = Metrics::new().unwrap();
        m.memory.with_label_values(&["sb1"]).set(5.0);
        m.escape_attempts.with_label_values(&["sb1", "mount", "seccomp"]).inc();
        m.startup.with_label_values(&["jail", "base", "miss"]).observe(0.05);
        let text = m.render().unwrap();
        assert!(text.contains("ringfence_sandbox_memory_bytes{sandbox=\"sb1\"} 5"));
        assert!(text.contains(
            "ringfence_escape_attempts_total{kind=\"seccomp\",sandbox=\"sb1\",syscall=\"mount\"} 1"
        ));
        // A tenant's view names no sandbox but keeps the shared series.
        let shared = m.render_shared().unwrap();
        assert!(!shared.contains("sb1"), "{shared}");
        assert!(!shared.contains("sandbox="), "{shared}");
        assert!(shared.contains("ringfence_sandbox_startup_seconds_count"), "{shared}");
        m.forget_gauges("sb1");
        m.forget_escapes("sb1", &[("mount".into(), "seccomp".into())]);
        let text = m.render().unwrap();
        assert!(!text.contains("sb1"));
    }
}
