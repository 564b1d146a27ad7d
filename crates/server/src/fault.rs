//! Internal failures, answered without their detail.
//!
//! An I/O, jail or database error names host paths (the data directory, layer and cgroup
//! directories), host pids or the database's state: nothing a client should read. Every
//! client-facing message built from one goes through [`internal_message`], which logs the
//! detail under a fresh error id and gives the client only that id to quote.

/// Logs `detail` under a new error id and returns the generic message to send instead.
pub fn internal_message(detail: &dyn std::fmt::Display) -> String {
    let id = error_id();
    tracing::error!(error_id = %id, error = %detail, "internal error");
    format!("internal error (id {id}); the server's log has the details")
}

/// 12 hex characters: enough to find one log line, too short to be mistaken for a token.
fn error_id() -> String {
    use rand::Rng;
    let bytes: [u8; 6] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_message_carries_an_id_and_no_detail() {
        let m = super::internal_message(&"open /var/lib/ringfence/layers/l1: No such file");
        assert!(m.starts_with("internal error (id "), "{m}");
        assert!(!m.contains("/var/lib"), "{m}");
        assert_ne!(m, super::internal_message(&"x"), "each failure gets its own id");
    }
}
