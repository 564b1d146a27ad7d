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
//! - each request is read; its `Host` (and an absolute-form target's authority) must be the
//!   SNI name, else it is answered 421 and it does not go upstream;
//! - the rule's headers replace any of the same name, and every `${e2b.secrets.NAME}` in a
//!   header value is replaced by the secret's value **only if the rule for this host names
//!   that secret** (its scope); other placeholders go out as written;
//! - the request goes to the pinned address over TLS verified against the system's CAs (plus
//!   an operator-given extra bundle, for tests); the connection is kept alive (HTTP/1.1), and
//!   every later request on it is read, checked and rewritten the same way: bodies are
//!   forwarded by their framing (`Content-Length` or chunked; anything ambiguous refused), so
//!   the next head is always found where the upstream will find it;
//! - the response comes back with every substituted value masked (same length, `*`), after
//!   asking for an uncompressed response so the mask can see it (best effort: a server that
//!   encodes the value, e.g. in base64, defeats it; scoping is the guarantee, see
//!   docs/SECURITY.md).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Requests forwarded on the connection (kept alive).
    pub requests: u64,
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

/// How a request's body is delimited (RFC 9112 section 6): what the proxy must forward
/// before the next request head begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    None,
    Length(u64),
    Chunked,
}

/// The sandbox's side of a terminated connection, with the bytes read but not yet used.
pub(crate) struct Input<'a, R> {
    pub pending: Vec<u8>,
    r: &'a mut R,
}

impl<'a, R: AsyncRead + Unpin> Input<'a, R> {
    pub(crate) fn new(r: &'a mut R) -> Input<'a, R> {
        Input { pending: Vec::new(), r }
    }

    /// Reads more; false at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        let n = self.r.read(&mut chunk).await?;
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Waits for the next request's first byte; false if the client closed instead.
    pub(crate) async fn more(&mut self) -> io::Result<bool> {
        if !self.pending.is_empty() {
            return Ok(true);
        }
        self.fill().await
    }

    /// One line, CRLF included (at most `max` bytes).
    async fn line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        loop {
            if let Some(p) = self.pending.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.pending.drain(..p + 2).collect());
            }
            if self.pending.len() > max {
                return Err(io::Error::other("a chunked body's line is too long"));
            }
            if !self.fill().await? {
                return Err(io::Error::other("the request body ended early"));
            }
        }
    }

    /// Up to `n` bytes (at least one).
    async fn some(&mut self, n: u64) -> io::Result<Vec<u8>> {
        if self.pending.is_empty() && !self.fill().await? {
            return Err(io::Error::other("the request body ended early"));
        }
        let k = usize::try_from(n).unwrap_or(usize::MAX).min(self.pending.len());
        Ok(self.pending.drain(..k).collect())
    }

    /// Passes one body, as framed, to `w` (each piece as it arrives, at the sandbox's rate).
    pub(crate) async fn body<W: AsyncWrite + Unpin>(
        &mut self,
        body: Body,
        w: &mut W,
        limiter: &crate::Limiter,
        count: &AtomicU64,
    ) -> io::Result<()> {
        match body {
            Body::None => Ok(()),
            Body::Length(mut left) => {
                while left > 0 {
                    let b = self.some(left).await?;
                    left -= b.len() as u64;
                    put(w, &b, limiter, count).await?;
                }
                Ok(())
            }
            Body::Chunked => loop {
                let line = self.line(4096).await?;
                let text = String::from_utf8_lossy(&line);
                let hex = text.trim_end().split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(hex, 16)
                    .map_err(|_| io::Error::other("a chunk size is not hexadecimal"))?;
                put(w, &line, limiter, count).await?;
                if size == 0 {
                    // Trailers, then the blank line that ends the body.
                    loop {
                        let t = self.line(MAX_HEAD).await?;
                        put(w, &t, limiter, count).await?;
                        if t == b"\r\n" {
                            return Ok(());
                        }
                    }
                }
                let mut left = size;
                while left > 0 {
                    let b = self.some(left).await?;
                    left -= b.len() as u64;
                    put(w, &b, limiter, count).await?;
                }
                let crlf = self.line(2).await?;
                if crlf != b"\r\n" {
                    return Err(io::Error::other("a chunk does not end with CRLF"));
                }
                put(w, &crlf, limiter, count).await?;
            },
        }
    }
}

/// Writes `b` upstream at the sandbox's rate, counting it.
pub(crate) async fn put<W: AsyncWrite + Unpin>(
    w: &mut W,
    b: &[u8],
    limiter: &crate::Limiter,
    count: &AtomicU64,
) -> io::Result<()> {
    limiter.take(b.len()).await;
    w.write_all(b).await?;
    count.fetch_add(b.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// The rewritten request head, or why it is refused (status, reason).
pub(crate) struct Rewritten {
    pub head: Vec<u8>,
    /// How its body is delimited.
    pub body: Body,
    /// The client asked to close after this request (or spoke HTTP/1.0).
    pub last: bool,
    pub set: Vec<String>,
    pub secrets: Vec<String>,
}

/// Reads and rewrites one request head from `r` for a connection to `name` under `rule`.
pub(crate) async fn rewrite_request<R: AsyncRead + Unpin>(
    inp: &mut Input<'_, R>,
    name: &str,
    rule: &HostRule,
    lookup: &SecretLookup,
) -> Result<Rewritten, (&'static str, String)> {
    let end = loop {
        if let Some(p) = inp.pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if inp.pending.len() > MAX_HEAD {
            return Err(("431 Request Header Fields Too Large", "request head too large".into()));
        }
        let more = inp
            .fill()
            .await
            .map_err(|e| ("400 Bad Request", format!("reading the request: {e}")))?;
        if !more {
            return Err(("400 Bad Request", "the connection closed before a request".into()));
        }
    };
    let buf: Vec<u8> = inp.pending.drain(..end).collect();
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(("400 Bad Request", "not an HTTP/1 request".into())),
    }
    let method = req.method.unwrap_or("GET").to_string();
    let path = req.path.unwrap_or("/").to_string();
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(("405 Method Not Allowed", "CONNECT inside a terminated connection".into()));
    }
    // The body's framing decides where the next request starts: anything ambiguous is refused
    // (a request the upstream would split differently could smuggle one past the checks).
    let values_of = |n: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(n))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            .collect()
    };
    let te = values_of("transfer-encoding");
    let cl = values_of("content-length");
    let body =
        match (te.as_slice(), cl.as_slice()) {
            ([], []) => Body::None,
            ([], [one]) => Body::Length(one.parse().map_err(|_| {
                ("400 Bad Request", format!("Content-Length {one:?} is not a number"))
            })?),
            ([], _) => return Err(("400 Bad Request", "several Content-Length headers".into())),
            ([one], []) if one == "chunked" => Body::Chunked,
            (_, []) => {
                return Err((
                    "501 Not Implemented",
                    format!("Transfer-Encoding {:?}: only chunked is forwarded", te.join(", ")),
                ));
            }
            _ => {
                return Err((
                    "400 Bad Request",
                    "both Transfer-Encoding and Content-Length; not forwarded".into(),
                ));
            }
        };
    let last = req.version != Some(1)
        || values_of("connection").iter().any(|v| v.split(',').any(|t| t.trim() == "close"));
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
    // Uncompressed, so the response's mask can see a substituted value. Kept alive unless
    // the client closes: every request on the connection is read, checked and rewritten here.
    line(&mut out, "accept-encoding", "identity");
    if last {
        line(&mut out, "connection", "close");
    }
    out.extend_from_slice(b"\r\n");
    used.sort();
    used.dedup();
    Ok(Rewritten {
        head: out,
        body,
        last,
        set: rule.headers.iter().map(|(k, _)| k.to_ascii_lowercase()).collect(),
        secrets: used,
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
    fn chunked_bodies_end_where_their_framing_says() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET /next";
            let mut r: &[u8] = wire;
            let mut inp = Input::new(&mut r);
            let mut out = Vec::new();
            let n = AtomicU64::new(0);
            let limiter = crate::Limiter::new(None);
            inp.body(Body::Chunked, &mut out, &limiter, &n).await.unwrap();
            assert_eq!(out, wire[..wire.len() - 9].to_vec());
            assert_eq!(inp.pending, b"GET /next");
            for bad in [&b"zz\r\n"[..], b"3\r\nabcd\r\n", b"5\r\nab"] {
                let mut r: &[u8] = bad;
                let mut inp = Input::new(&mut r);
                let mut sink = Vec::new();
                assert!(inp.body(Body::Chunked, &mut sink, &limiter, &n).await.is_err());
            }
        });
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
