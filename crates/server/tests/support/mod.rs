//! Harness shared by this crate's integration tests, included by each with `mod support;`
//! (a directory module, so Cargo does not build it as a test of its own).
//!
//! - [`serve`]: a real `ringfence serve` on a loopback port, driven over raw HTTP (`layers`,
//!   `network`, `observability`, `security_api`).
//! - [`jail`]: a serve-mode sandbox driven in process through `envd::handle` (`envd`, `memory`).

// Every test binary compiles all of this but uses only its part of it.
#![allow(dead_code)]

pub mod jail;
pub mod serve;

pub use ringfence_test_support::root_or_skip;

/// One `multipart/form-data` file part (what the SDKs upload) named `name`, ending in CRLF;
/// the caller adds the closing `--BOUNDARY--` line.
pub fn form_part(boundary: &str, name: &str, data: &[u8]) -> Vec<u8> {
    let mut p = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    p.extend_from_slice(data);
    p.extend_from_slice(b"\r\n");
    p
}
