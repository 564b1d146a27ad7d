//! TLS termination and request rewriting for hosts that have request rules (E2B's
//! `network.rules`, whose header values may name secrets as `${e2b.secrets.NAME}`).
//!
//! Only a connection whose TLS server name (SNI) matches a rule, and whose address our own
//! resolver returned for that name ("pinned", see [`crate::policy`]), is terminated here;
//! every other connection is relayed byte for byte as before. For a terminated connection:
//!
//! - the sandbox gets a certificate for the SNI name, issued by that sandbox's own CA
//!   ([`SandboxCa`], made in this process; its key never leaves it, and only that sandbox's
//!   trust store lists it);
//! - one request is read; its `Host` (and an absolute-form target's authority) must be the
//!   SNI name, else it is answered 421 and nothing goes upstream;
//! - the rule's headers replace any of the same name, and every `${e2b.secrets.NAME}` in a
//!   header value is replaced by the secret's value **only if the rule for this host names
//!   that secret** (its scope); other placeholders go out as written;
//! - the request goes to the pinned address over TLS verified against the system's CAs (plus
//!   an operator-given extra bundle, for tests), with `Connection: close`: one request per
//!   connection, so no later request on it can skip the rewrite;
//! - the response comes back with every substituted value masked (same length, `*`), after
//!   asking for an uncompressed response so the mask can see it (best effort: a server that
//!   encodes the value, e.g. in base64, defeats it; scoping is the guarantee, see
//!   docs/SECURITY.md).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::policy::normalize_name;

/// What opens a secret placeholder.
pub const PLACEHOLDER_OPEN: &str = "${e2b.secrets.";

/// Most bytes of a request head we read before giving up.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Errors of rules and of the TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("network.rules: invalid host {host:?}: {why}")]
    BadHost { host: String, why: &'static str },
    #[error("network.rules: invalid header {name:?} for {host:?}: {why}")]
    BadHeader { host: String, name: String, why: &'static str },
    #[error("the sandbox's certificate authority: {0}")]
    Ca(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// One host's rule: headers set on each of its requests (values may hold placeholders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// The key, lower-cased: `api.example.com`, or `*.example.com` (any depth below, not the
    /// apex).
    pub host: String,
    /// Header names as given, values as given (placeholders unresolved), in order.
    pub headers: Vec<(String, String)>,
}

/// A sandbox's request rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRules {
    rules: Vec<HostRule>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RequestRules {
    /// Validates hosts (an exact name or `*.name`; a bare `*` is refused) and headers (a
    /// token name; a value with no control characters). Header names that would change the
    /// framing or the destination (`host`, `content-length`, `transfer-encoding`,
    /// `connection`) are refused: a rule rewrites what is said, not where it goes.
    pub fn new(rules: Vec<HostRule>) -> Result<RequestRules, InterceptError> {
        let mut out: Vec<HostRule> = Vec::with_capacity(rules.len());
        for r in rules {
            let bad = |why| InterceptError::BadHost { host: r.host.clone(), why };
            let (star, rest) = match r.host.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, r.host.as_str()),
            };
            let name = normalize_name(rest).ok_or_else(|| bad("not a DNS name or *.name"))?;
            if name.parse::<std::net::IpAddr>().is_ok() {
                return Err(bad("an address; rules match TLS server names"));
            }
            let host = if star { format!("*.{name}") } else { name };
            if out.iter().any(|o| o.host == host) {
                return Err(bad("listed twice"));
            }
            for (k, v) in &r.headers {
                let badh =
                    |why| InterceptError::BadHeader { host: host.clone(), name: k.clone(), why };
                if !is_token(k) {
                    return Err(badh("not a header name"));
                }
                let lower = k.to_ascii_lowercase();
                if ["host", "content-length", "transfer-encoding", "connection"]
                    .contains(&lower.as_str())
                {
                    return Err(badh("rules may not set this header"));
                }
                if v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                    return Err(badh("the value has control characters"));
                }
            }
            out.push(HostRule { host, headers: r.headers });
        }
        Ok(RequestRules { rules: out })
    }

    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule for `host` (normalised): an exact key first, then the longest `*.` suffix.
    pub fn matching(&self, host: &str) -> Option<&HostRule> {
        if let Some(r) = self.rules.iter().find(|r| r.host == host) {
            return Some(r);
        }
        self.rules
            .iter()
            .filter(|r| {
                r.host.strip_prefix("*.").is_some_and(|suffix| {
                    host.len() > suffix.len() + 1
                        && host.ends_with(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                })
            })
            .max_by_key(|r| r.host.len())
    }
}

impl HostRule {
    /// The secrets this rule names: the only ones substituted in requests to its hosts.
    pub fn secrets(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.headers.iter().flat_map(|(_, v)| placeholders(v)).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// The secret names `${e2b.secrets.NAME}` placeholders in `s` refer to.
pub fn placeholders(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(PLACEHOLDER_OPEN) {
        let after = &rest[at + PLACEHOLDER_OPEN.len()..];
        match after.find('}') {
            Some(end) => {
                out.push(after[..end].to_ascii_lowercase());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// Replaces the placeholders of secrets in `values` (names lower-case); others stay as
/// written. Returns the new text and the names substituted.
pub fn substitute(s: &str, values: &HashMap<String, String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut used = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(PLACEHOLDER_OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + PLACEHOLDER_OPEN.len()..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[at..]);
            return (out, used);
        };
        let name = after[..end].to_ascii_lowercase();
        match values.get(&name) {
            Some(v) => {
                out.push_str(v);
                used.push(name);
            }
            None => out.push_str(&rest[at..at + PLACEHOLDER_OPEN.len() + end + 1]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    (out, used)
}

/// Resolves a secret's name (lower-case) to its value, for the sandbox it was made for.
pub type SecretLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a sandbox's terminated connections are rewritten with.
#[derive(Clone)]
pub struct Interception {
    pub rules: RequestRules,
    pub lookup: SecretLookup,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception").field("rules", &self.rules).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One sandbox's certificate authority, and the server configurations of the names it has
/// issued for.
pub struct SandboxCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
    configs: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

fn ca_err(e: impl std::fmt::Display) -> InterceptError {
    InterceptError::Ca(e.to_string())
}

impl SandboxCa {
    /// A fresh CA (P-256), named after `label`; may only issue end-entity certificates
    /// (path length 0).
    pub fn new(label: &str) -> Result<SandboxCa, InterceptError> {
        let key = rcgen::KeyPair::generate().map_err(ca_err)?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("Ringfence egress CA for {label}"));
        let cert = p.self_signed(&key).map_err(ca_err)?;
        Ok(SandboxCa {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(p, key),
            configs: Mutex::default(),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server configuration presenting a leaf for `name` (made once per name).
    pub fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, InterceptError> {
        if let Some(c) = self.configs.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(c);
        }
        let key = rcgen::KeyPair::generate().map_err(ca_err)?;
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(ca_err)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        let leaf = p.signed_by(&key, &self.issuer).map_err(ca_err)?;
        let pkey = PrivateKeyDer::try_from(key.serialize_der()).map_err(ca_err)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| InterceptError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.der.clone()], pkey)
            .map_err(|e| InterceptError::Tls(e.to_string()))?;
        // HTTP/1.1 only: the rewrite reads HTTP/1 request heads.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if let Ok(mut m) = self.configs.lock() {
            m.insert(name.to_string(), cfg.clone());
        }
        Ok(cfg)
    }
}

/// The upstream TLS client: the system's CAs, plus `extra_pem` (an operator's bundle; tests
/// use it for their own CA).
pub fn upstream_config(
    extra_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, InterceptError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_pem {
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| InterceptError::Tls(format!("extra CA bundle: {e}")))?;
            roots.add(c).map_err(|e| InterceptError::Tls(format!("extra CA bundle: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(InterceptError::Tls("no trusted CA certificates for upstream TLS".into()));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| InterceptError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A stream that first yields bytes already read from it (the sniffed ClientHello).
pub(crate) struct Rewind<S> {
    pre: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(pre: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind { pre, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.pre.len() {
            let n = (self.pre.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.pre[at..at + n]);
            self.at += n;
            if self.at == self.pre.len() {
                self.pre = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Masks every occurrence of any of `needles` in a byte stream with `*` of the same length
/// (so `Content-Length` and chunk sizes stay true), holding back just enough bytes to catch
/// an occurrence split across reads.
#[derive(Debug)]
pub struct Redactor {
    needles: Vec<Vec<u8>>,
    keep: usize,
    pending: Vec<u8>,
    /// Occurrences masked so far.
    pub masked: u64,
}

impl Redactor {
    pub fn new(needles: Vec<Vec<u8>>) -> Redactor {
        let needles: Vec<Vec<u8>> = needles.into_iter().filter(|n| !n.is_empty()).collect();
        let keep = needles.iter().map(Vec::len).max().unwrap_or(1) - 1;
        Redactor { needles, keep, pending: Vec::new(), masked: 0 }
    }

    /// Takes `data`; returns the bytes that may be passed on now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.needles.is_empty() {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        self.mask();
        let emit = self.pending.len().saturating_sub(self.keep);
        self.pending.drain(..emit).collect()
    }

    /// Whether bytes are held back.
    pub fn holding(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The bytes held back (masked), at the end of the stream or when it pauses.
    pub fn finish(&mut self) -> Vec<u8> {
        self.mask();
        std::mem::take(&mut self.pending)
    }

    fn mask(&mut self) {
        for n in &self.needles {
            let mut i = 0;
            while i + n.len() <= self.pending.len() {
                if self.pending[i..i + n.len()] == n[..] {
                    self.pending[i..i + n.len()].fill(b'*');
                    self.masked += 1;
                    i += n.len();
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// How a terminated connection went, for its audit record.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Refused before anything went upstream (the reason says why).
    pub refused: Option<String>,
    /// Header names the rule set.
    pub set: Vec<String>,
    /// Secrets substituted (names).
    pub secrets: Vec<String>,
    /// Occurrences of a substituted value masked in the response.
    pub masked: u64,
    /// The upstream proxy the request went through (`scheme://host:port`).
    pub proxy: Option<String>,
}

/// An HTTP/1.1 answer made here (a refusal), closing the connection.
pub(crate) async fn answer<W: AsyncWrite + Unpin>(w: &mut W, status: &str, why: &str) {
    let body = format!("{why}\n");
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-ringfence-egress: denied\r\n\r\n{body}",
        body.len()
    );
    let _ = w.write_all(resp.as_bytes()).await;
    let _ = w.shutdown().await;
}

/// `host[:port]` → normalised host.
fn host_of(authority: &str) -> Option<String> {
    let h = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    normalize_name(h)
}

/// The rewritten request head, or why it is refused (status, reason).
pub(crate) struct Rewritten {
    pub head: Vec<u8>,
    /// Bytes after the head already read (the start of the body).
    pub rest: Vec<u8>,
    pub set: Vec<String>,
    pub secrets: Vec<String>,
    /// Substituted values, for the response's mask.
    pub values: Vec<Vec<u8>>,
}

/// Reads and rewrites one request head from `r` for a connection to `name` under `rule`.
pub(crate) async fn rewrite_request<R: AsyncRead + Unpin>(
    r: &mut R,
    name: &str,
    rule: &HostRule,
    lookup: &SecretLookup,
) -> Result<Rewritten, (&'static str, String)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(("431 Request Header Fields Too Large", "request head too large".into()));
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| ("400 Bad Request", format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(("400 Bad Request", "the connection closed before a request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(("400 Bad Request", "not an HTTP/1 request".into())),
    }
    let method = req.method.unwrap_or("GET").to_string();
    let path = req.path.unwrap_or("/").to_string();
    // An absolute-form target names its host too: it must be this connection's.
    if let Some(rest) = path.strip_prefix("https://").or_else(|| path.strip_prefix("http://")) {
        let authority = rest.split('/').next().unwrap_or_default();
        if host_of(authority).as_deref() != Some(name) {
            return Err((
                "421 Misdirected Request",
                format!(
                    "the request names {authority:?} but the connection is to {name}; not forwarded"
                ),
            ));
        }
    }
    let host_hdr = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        .collect::<Vec<_>>();
    match host_hdr.as_slice() {
        [one] if host_of(one).as_deref() == Some(name) => {}
        [one] => {
            return Err((
                "421 Misdirected Request",
                format!("Host {one:?} differs from the TLS server name {name}; not forwarded"),
            ));
        }
        [] => return Err(("400 Bad Request", "the request has no Host header".into())),
        _ => return Err(("400 Bad Request", "the request has several Host headers".into())),
    }
    // Resolve the rule's secrets: the only ones this host may receive.
    let mut values = HashMap::new();
    for s in rule.secrets() {
        match lookup(&s) {
            Some(v) => {
                values.insert(s, v);
            }
            None => {
                return Err((
                    "502 Bad Gateway",
                    format!(
                        "the rule for {} names secret {s:?}, which does not exist; not forwarded",
                        rule.host
                    ),
                ));
            }
        }
    }
    let overridden: Vec<String> =
        rule.headers.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    let mut used = Vec::new();
    let push = |out: &mut Vec<u8>, k: &[u8], v: &[u8]| {
        out.extend_from_slice(k);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    };
    let mut line = |out: &mut Vec<u8>, k: &str, v: &str| {
        let (v, u) = substitute(v, &values);
        used.extend(u);
        push(out, k.as_bytes(), v.as_bytes());
    };
    for h in req.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        if overridden.contains(&lower)
            || ["connection", "proxy-connection", "keep-alive", "accept-encoding", "te", "upgrade"]
                .contains(&lower.as_str())
        {
            continue;
        }
        match std::str::from_utf8(h.value) {
            Ok(v) => line(&mut out, h.name, v),
            // A non-UTF-8 value cannot hold a placeholder: it goes as it came.
            Err(_) => push(&mut out, h.name.as_bytes(), h.value),
        }
    }
    for (k, v) in &rule.headers {
        line(&mut out, k, v);
    }
    // Uncompressed, so the response's mask can see a substituted value; one request per
    // connection, so every request on it is rewritten.
    line(&mut out, "accept-encoding", "identity");
    line(&mut out, "connection", "close");
    out.extend_from_slice(b"\r\n");
    used.sort();
    used.dedup();
    let values = used.iter().filter_map(|n| values.get(n)).map(|v| v.as_bytes().to_vec()).collect();
    Ok(Rewritten {
        head: out,
        rest: buf[end..].to_vec(),
        set: rule.headers.iter().map(|(k, _)| k.to_ascii_lowercase()).collect(),
        secrets: used,
        values,
    })
}

/// The TLS connector for `name` (an already-validated DNS name).
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| e.to_string())
}

pub(crate) use tokio_rustls::{TlsAcceptor, TlsConnector};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules() -> RequestRules {
        RequestRules::new(vec![
            HostRule {
                host: "API.example.com".into(),
                headers: vec![("Authorization".into(), "Bearer ${e2b.secrets.Key}".into())],
            },
            HostRule { host: "*.example.com".into(), headers: vec![("x-a".into(), "1".into())] },
            HostRule { host: "*.b.example.com".into(), headers: vec![] },
        ])
        .unwrap()
    }

    #[test]
    fn exact_beats_longest_wildcard_beats_shorter() {
        let r = rules();
        assert_eq!(r.matching("api.example.com").unwrap().host, "api.example.com");
        assert_eq!(r.matching("x.b.example.com").unwrap().host, "*.b.example.com");
        assert_eq!(r.matching("x.y.example.com").unwrap().host, "*.example.com");
        assert!(r.matching("example.com").is_none(), "a wildcard does not match its apex");
        assert!(r.matching("badexample.com").is_none());
        assert_eq!(r.matching("api.example.com").unwrap().secrets(), vec!["key".to_string()]);
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for (host, header) in [("*", "x"), ("1.2.3.4", "x"), ("a..b", "x"), ("ok.test", "bad name")]
        {
            let e = RequestRules::new(vec![HostRule {
                host: host.into(),
                headers: vec![(header.into(), "v".into())],
            }])
            .unwrap_err();
            assert!(e.to_string().contains("network.rules"), "{e}");
        }
        let e = RequestRules::new(vec![HostRule {
            host: "a.test".into(),
            headers: vec![("Host".into(), "evil.test".into())],
        }])
        .unwrap_err();
        assert!(e.to_string().contains("may not set"), "{e}");
        let e = RequestRules::new(vec![HostRule {
            host: "a.test".into(),
            headers: vec![("x".into(), "a\r\nInjected: 1".into())],
        }])
        .unwrap_err();
        assert!(e.to_string().contains("control"), "{e}");
    }

    #[test]
    fn only_named_secrets_are_substituted() {
        let mut v = HashMap::new();
        v.insert("a".to_string(), "AAA".to_string());
        let (s, used) = substitute("x ${e2b.secrets.A} ${e2b.secrets.b} ${e2b.secrets.a", &v);
        assert_eq!(s, "x AAA ${e2b.secrets.b} ${e2b.secrets.a");
        assert_eq!(used, vec!["a".to_string()]);
    }

    #[test]
    fn redaction_catches_values_split_across_reads() {
        let mut r = Redactor::new(vec![b"s3cr3t".to_vec()]);
        let mut out = r.feed(b"head s3c");
        out.extend(r.feed(b"r3t tail s3cr3"));
        out.extend(r.feed(b"t"));
        out.extend(r.finish());
        assert_eq!(out, b"head ****** tail ******");
        assert_eq!(r.masked, 2);
    }
}
