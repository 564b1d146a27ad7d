//! Resource limits of one sandbox, and the parsers for their human-written forms.

use std::time::Duration;

/// Limits applied to a sandbox. `None` leaves a resource unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (bytes) for everything in the sandbox, page cache and tmpfs included.
    pub memory: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPU quota in thousandths of a CPU (1000 = one full core).
    pub cpu_millis: Option<u64>,
    /// Size of the writable layer (bytes): writes beyond it fail with ENOSPC.
    pub disk: u64,
    /// Open files per process (RLIMIT_NOFILE).
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: Some(512 << 20),
            pids: Some(256),
            cpu_millis: Some(1000),
            disk: 1 << 30,
            nofile: 4096,
        }
    }
}

/// A value that could not be parsed; the message names the input and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// Parses a byte size: `1024`, `64K`, `256M`, `1G`, `2GiB`, `512MB` (all binary multiples).
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        ParseError(format!(
            "invalid size {s:?}: expected a number with an optional unit K, M, G or T (e.g. 256M)"
        ))
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(bad()),
    };
    let v = n.checked_mul(mult).ok_or_else(|| ParseError(format!("size {s:?} is too large")))?;
    if v == 0 {
        return Err(ParseError(format!("size {s:?} must be greater than zero")));
    }
    Ok(v)
}

/// Parses a duration: `5s`, `500ms`, `2m`, `1h`, or bare seconds (`30`, `1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let t = s.trim();
    let bad = || ParseError(format!("invalid duration {s:?}: expected e.g. 5s, 500ms, 2m or 1h"));
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n <= 0.0 {
        return Err(ParseError(format!("duration {s:?} must be greater than zero")));
    }
    Duration::try_from_secs_f64(n * scale).map_err(|_| bad())
}

/// Parses a CPU count (`1`, `0.5`, `2`) into thousandths of a CPU.
pub fn parse_cpus(s: &str) -> Result<u64, ParseError> {
    let bad = || ParseError(format!("invalid CPU count {s:?}: expected a number such as 1 or 0.5"));
    let n: f64 = s.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || !(0.01..=4096.0).contains(&n) {
        return Err(ParseError(format!("CPU count {s:?} must be between 0.01 and 4096")));
    }
    Ok((n * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert!(parse_size("lots").unwrap_err().to_string().contains("\"lots\""));
        assert!(parse_size("0").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("5X").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1").unwrap(), 1000);
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert!(parse_cpus("many").is_err());
        assert!(parse_cpus("0").is_err());
    }
}
