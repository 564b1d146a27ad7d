//! Percent-encoding as the SDKs' URL builders do it. Standalone (no crate but `std`), so the
//! fuzz tests include it too (`#[path]`).

/// Percent-encodes every byte but the unreserved characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
