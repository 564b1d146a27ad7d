//! Checks on values a client sends that the rest of the server would otherwise carry into
//! the sandbox or into arithmetic: environment variables and time values.
//!
//! Both fail late and confusingly when let through: an env name with `=` or NUL (or an empty
//! one) is accepted, stored, and then breaks every command the sandbox runs; a duration near
//! 2^61 seconds wraps when turned into milliseconds and fires at once. So each is refused at
//! the edge with a 400 that names the field.

/// Longest env name or value accepted (Linux's own limit on one string is 128 KiB).
const MAX_ENV_LEN: usize = 128 * 1024;

/// Checks environment variables from field `field` (`envVars`, `process.envs`, ...): names
/// must be non-empty and free of `=` and NUL, values free of NUL.
pub fn check_env<'a>(
    field: &str,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), String> {
    for (name, value) in env {
        let shown: String =
            name.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect();
        if name.is_empty() {
            return Err(format!("{field}: an environment variable has an empty name"));
        }
        if name.contains('=') {
            return Err(format!("{field}: environment variable name {shown:?} contains '='"));
        }
        if name.contains('\0') {
            return Err(format!(
                "{field}: environment variable name {shown:?} contains a NUL byte"
            ));
        }
        if value.contains('\0') {
            return Err(format!("{field}: the value of {shown:?} contains a NUL byte"));
        }
        if name.len() > MAX_ENV_LEN || value.len() > MAX_ENV_LEN {
            return Err(format!("{field}: {shown:?} is longer than {MAX_ENV_LEN} bytes"));
        }
    }
    Ok(())
}

/// The latest instant any time value may name: 9999-12-31T23:59:59Z, in Unix seconds. Far
/// beyond any real use, far below where seconds overflow as milliseconds or nanoseconds.
pub const MAX_UNIX_SECS: i64 = 253_402_300_799;

/// A Unix-seconds bound from field `field`: 0 to [`MAX_UNIX_SECS`], returned in milliseconds.
pub fn unix_secs_ms(field: &str, secs: i64) -> Result<i64, String> {
    if !(0..=MAX_UNIX_SECS).contains(&secs) {
        return Err(format!(
            "{field} must be Unix seconds between 0 and {MAX_UNIX_SECS}, got {secs}"
        ));
    }
    Ok(secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_and_values_are_checked() {
        let ok = [("PATH", "/bin"), ("A_1", ""), ("lower", "x=y"), ("UNICODE_É", "é")];
        check_env("envVars", ok).unwrap();
        for (name, value, want) in [
            ("", "x", "empty name"),
            ("A=B", "x", "contains '='"),
            ("=", "x", "contains '='"),
            ("A\0B", "x", "NUL"),
            ("A", "x\0y", "NUL"),
        ] {
            let e = check_env("envVars", [(name, value)]).unwrap_err();
            assert!(e.starts_with("envVars: ") && e.contains(want), "{name:?}: {e}");
        }
        let long = "x".repeat(MAX_ENV_LEN + 1);
        assert!(check_env("envs", [("A", long.as_str())]).is_err());
    }

    #[test]
    fn unix_bounds_refuse_negative_and_overflowing_values() {
        assert_eq!(unix_secs_ms("start", 1_700_000_000), Ok(1_700_000_000_000));
        assert_eq!(unix_secs_ms("start", 0), Ok(0));
        for bad in [-1, i64::MIN, i64::MAX, i64::MAX / 1000 + 1, MAX_UNIX_SECS + 1] {
            let e = unix_secs_ms("end", bad).unwrap_err();
            assert!(e.starts_with("end must be"), "{e}");
        }
    }
}
