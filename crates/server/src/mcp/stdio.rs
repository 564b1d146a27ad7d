//! `ringfence mcp`: MCP over stdio for a local agent, bridged to a `ringfence serve`'s `/mcp`.
//!
//! A bridge rather than a second server in the agent's process: sandboxes need root, a data
//! directory and a long-lived owner (timeouts, pools), which the server already is; the stdio
//! process then needs no privilege, and every call is authenticated, isolated and audited by
//! the one server exactly as over HTTP.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use std::io::{BufRead, Write};

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("--url must be http://HOST:PORT[/PREFIX], got {0:?}")]
    Url(String),
    #[error("stdin/stdout: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the server is: `host:port` and a path prefix.
#[derive(Debug, Clone)]
pub struct Target {
    authority: String,
    prefix: String,
}

impl Target {
    /// Parses `http://HOST:PORT[/PREFIX]` (no TLS: the bridge is meant for a server on the
    /// same host or network; front a remote one with a TLS proxy and point MCP clients that
    /// speak HTTP at it directly).
    pub fn parse(url: &str) -> Result<Target, BridgeError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| BridgeError::Url(url.into()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(BridgeError::Url(url.into()));
        }
        Ok(Target { authority: authority.to_string(), prefix: path.trim_end_matches('/').into() })
    }
}

/// POSTs one message to `/mcp`; `Ok(None)` when the server accepted it without an answer.
async fn post(target: &Target, key: &str, line: &str) -> Result<Option<Value>, String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("cannot reach ringfence serve at {}: {e}", target.authority))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", target.authority))?;
    tokio::spawn(conn);
    let req = Request::post(format!("{}/mcp", target.prefix))
        .header("host", &target.authority)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from(line.to_string()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("POST /mcp: {e}"))?;
    let status = resp.status();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 64 << 20)
        .await
        .map_err(|e| format!("reading /mcp's answer: {e}"))?;
    if status == StatusCode::ACCEPTED {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| format!("/mcp answered HTTP {status}: {}", String::from_utf8_lossy(&body)))?;
    if !status.is_success() {
        // The server's JSON-RPC error (401: the key); sent on with the request's id below.
        let msg = v["error"]["message"].as_str().unwrap_or("failed").to_string();
        return Err(format!("ringfence serve refused the request (HTTP {status}): {msg}"));
    }
    Ok(Some(v))
}

/// Relays newline-delimited JSON-RPC from stdin to the server and its answers to stdout until
/// stdin closes. A message the server cannot be asked about gets a JSON-RPC error naming why.
pub async fn run(target: Target, key: String) -> Result<(), BridgeError> {
    // std's blocking stdin on its own thread (tokio's needs a feature that would rebuild
    // tokio for the whole workspace); lines come over a channel, one message each.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let stop = line.is_err();
            if tx.blocking_send(line).is_err() || stop {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let id = serde_json::from_str::<Value>(&line).ok().and_then(|v| v.get("id").cloned());
        let answer = match post(&target, &key, &line).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("{e}");
                // Only a request (it has an id) is owed an answer.
                id.map(|id| {
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32000, "message": e}})
                })
            }
        };
        if let Some(a) = answer {
            let mut out = std::io::stdout().lock();
            out.write_all(format!("{a}\n").as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_are_refused_by_name() {
        let t = Target::parse("http://127.0.0.1:3000").unwrap();
        assert_eq!((t.authority.as_str(), t.prefix.as_str()), ("127.0.0.1:3000", ""));
        let t = Target::parse("http://box:80/rf/").unwrap();
        assert_eq!((t.authority.as_str(), t.prefix.as_str()), ("box:80", "/rf"));
        for bad in ["https://x:1", "x:1", "http://", "http://u:p@x:1"] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
