//! An upstream egress proxy (E2B's `network.egressProxy`): a sandbox's allowed connections
//! leave through the operator's or user's SOCKS5 (RFC 1928, password auth RFC 1929) or HTTP
//! `CONNECT` proxy instead of straight from this host.
//!
//! Policy runs first and judges the final destination exactly as without a proxy (name,
//! pinned address, ceiling, allowOut/denyOut); only an allowed connection is dialed, so a
//! denied destination never reaches the proxy. The proxy is then asked for the **address**
//! the policy judged, never the name, so the proxy's own resolver cannot send the
//! connection somewhere else. The proxy's own address is held to the operator's ceiling
//! (checked when it is set and again at each dial, after resolving its name with the
//! server's upstream resolver): a sandbox cannot name loopback, the metadata address or a
//! private range "as its proxy" to reach them. Its credentials are never logged: the
//! [`fmt::Debug`] and [`fmt::Display`] forms leave the password out.
//!
//! Egress fails closed, as E2B documents: an unreachable proxy, or one that refuses,
//! fails the sandbox's connection; nothing falls back to a direct connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most bytes of a username or password (RFC 1929 carries each in one length byte).
pub const MAX_CREDENTIAL: usize = 255;
/// Most bytes of a CA bundle given for the proxy's TLS (E2B's limit).
pub const MAX_CA_PEM: usize = 8192;
/// Most bytes of an HTTP proxy's answer to `CONNECT`.
const MAX_CONNECT_REPLY: usize = 8192;

/// Errors in a proxy's settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network.egressProxy: {0}")]
pub struct ProxyError(pub String);

fn err(s: impl Into<String>) -> ProxyError {
    ProxyError(s.into())
}

/// How the proxy is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// SOCKS5, E2B's only kind (an address without a scheme, or `socks5://`).
    Socks5,
    /// HTTP `CONNECT` (our extension: `http://host:port`).
    HttpConnect,
}

impl ProxyKind {
    fn scheme(self) -> &'static str {
        match self {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::HttpConnect => "http",
        }
    }
}

/// TLS on the hop to the proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyTls {
    /// Name to verify the certificate against and to send as SNI; `None`: the address's host.
    pub server_name: Option<String>,
    /// PEM CA certificates that replace the system's for this proxy.
    pub ca_pem: Option<String>,
}

impl fmt::Debug for ProxyTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyTls")
            .field("server_name", &self.server_name)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<given>"))
            .finish()
    }
}

/// A proxy as a sandbox asked for it, validated (not yet resolved).
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy {
    pub kind: ProxyKind,
    /// A DNS name (normalised) or an IP literal.
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<ProxyTls>,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("address", &self.to_string())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// `scheme://host:port`: no credentials, ever (this is what audit records show).
impl fmt::Display for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => {
                write!(f, "{}://[{}]:{}", self.kind.scheme(), self.host, self.port)
            }
            _ => write!(f, "{}://{}:{}", self.kind.scheme(), self.host, self.port),
        }
    }
}

impl EgressProxy {
    /// Parses E2B's `address` (`host:port`, SOCKS5) or our `socks5://host:port` and
    /// `http://host:port` forms, with optional credentials and TLS.
    pub fn new(
        address: &str,
        username: Option<String>,
        password: Option<String>,
        tls: Option<ProxyTls>,
    ) -> Result<EgressProxy, ProxyError> {
        let (kind, rest) = if let Some(r) = address.strip_prefix("socks5://") {
            (ProxyKind::Socks5, r)
        } else if let Some(r) = address.strip_prefix("http://") {
            (ProxyKind::HttpConnect, r)
        } else if address.contains("://") {
            return Err(err(format!(
                "address {address:?}: only socks5:// and http:// proxies are supported"
            )));
        } else {
            (ProxyKind::Socks5, address)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(err(format!(
                "address {address:?}: give credentials as username and password, not in the \
                 address"
            )));
        }
        let bad = |why: &str| err(format!("address {address:?}: {why} (expected host:port)"));
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 =
            port.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad("not a port number"))?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in brackets"))?
                .to_string(),
            None => match host.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) => crate::policy::normalize_name(host)
                    .ok_or_else(|| bad("the host is neither a DNS name nor an address"))?,
            },
        };
        for (what, v) in [("username", &username), ("password", &password)] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > MAX_CREDENTIAL)
            {
                return Err(err(format!("{what} must be 1 to {MAX_CREDENTIAL} bytes")));
            }
        }
        if password.is_some() && username.is_none() {
            return Err(err("a password is only valid together with a username"));
        }
        if let Some(t) = &tls {
            if let Some(n) = &t.server_name
                && (n.is_empty() || n.len() > 253 || ServerName::try_from(n.as_str()).is_err())
            {
                return Err(err(format!("tls.serverName {n:?} is not a valid server name")));
            }
            if let Some(pem) = &t.ca_pem {
                if pem.len() > MAX_CA_PEM {
                    return Err(err(format!("tls.caCert is over {MAX_CA_PEM} bytes")));
                }
                ca_roots(pem)?;
            }
        }
        Ok(EgressProxy { kind, host, port, username, password, tls })
    }

    /// `host:port` as given back to the API (E2B's `address`), a scheme only for our kinds.
    pub fn address(&self) -> String {
        let s = self.to_string();
        match self.kind {
            ProxyKind::Socks5 => s.trim_start_matches("socks5://").to_string(),
            ProxyKind::HttpConnect => s,
        }
    }

    /// The host as a literal address, when it is one.
    pub fn literal(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

fn ca_roots(pem: &str) -> Result<rustls::RootCertStore, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| err(format!("tls.caCert: {e}")))?;
        roots.add(c).map_err(|e| err(format!("tls.caCert: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("tls.caCert holds no PEM certificate"));
    }
    Ok(roots)
}

/// Anything a connection upstream may be: a socket, or TLS over one.
pub trait UpIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> UpIo for T {}

/// An upstream connection.
pub type Upstream = Box<dyn UpIo>;

/// Asks the proxy, already connected on `conn`, for a tunnel to `target`; returns the
/// tunnel. TLS to the proxy (if set) is set up first, verified against `system_roots` or the
/// proxy's own CA bundle.
pub(crate) async fn handshake(
    proxy: &EgressProxy,
    conn: tokio::net::TcpStream,
    target: SocketAddr,
    system_roots: impl FnOnce() -> Result<Arc<rustls::RootCertStore>, String>,
) -> io::Result<Upstream> {
    let io: Upstream = match &proxy.tls {
        None => Box::new(conn),
        Some(t) => {
            let roots = match &t.ca_pem {
                Some(pem) => Arc::new(ca_roots(pem).map_err(io::Error::other)?),
                None => system_roots().map_err(io::Error::other)?,
            };
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = t.server_name.clone().unwrap_or_else(|| proxy.host.clone());
            let sn = ServerName::try_from(name).map_err(io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(sn, conn)
                .await
                .map_err(|e| io::Error::other(format!("TLS to the proxy: {e}")))?;
            Box::new(tls)
        }
    };
    match proxy.kind {
        ProxyKind::Socks5 => socks5(proxy, io, target).await,
        ProxyKind::HttpConnect => http_connect(proxy, io, target).await,
    }
}

async fn socks5(proxy: &EgressProxy, io: Upstream, target: SocketAddr) -> io::Result<Upstream> {
    use tokio_socks::tcp::Socks5Stream;
    let s = match (&proxy.username, &proxy.password) {
        (Some(u), p) => {
            Socks5Stream::connect_with_password_and_socket(
                io,
                target,
                u,
                p.as_deref().unwrap_or(""),
            )
            .await
        }
        (None, _) => Socks5Stream::connect_with_socket(io, target).await,
    }
    .map_err(|e| io::Error::other(format!("SOCKS5 proxy {proxy}: {e}")))?;
    Ok(Box::new(s.into_inner()))
}

/// `CONNECT addr:port`. Hand-written (a few lines; the crates for it are thin and little
/// kept): the answer is read a byte at a time up to its blank line, so bytes the destination
/// sends right after (a server-first protocol's banner) stay in the stream.
async fn http_connect(
    proxy: &EgressProxy,
    mut io: Upstream,
    target: SocketAddr,
) -> io::Result<Upstream> {
    use base64::Engine;
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(u) = &proxy.username {
        let pair = format!("{u}:{}", proxy.password.as_deref().unwrap_or(""));
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
        req.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_REPLY {
            return Err(io::Error::other(format!("HTTP proxy {proxy}: answer too long")));
        }
        let b = io.read_u8().await.map_err(|e| {
            io::Error::other(format!("HTTP proxy {proxy} closed before answering CONNECT: {e}"))
        })?;
        head.push(b);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default().trim().to_string();
    let code = status.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) if (200..300).contains(&c) => Ok(io),
        _ => Err(io::Error::other(format!("HTTP proxy {proxy} refused CONNECT: {status}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_parse_and_credentials_stay_out_of_text() {
        let p =
            EgressProxy::new("Proxy.Example.com:1080", Some("u".into()), Some("pw".into()), None)
                .unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (ProxyKind::Socks5, "proxy.example.com", 1080)
        );
        assert_eq!(p.address(), "proxy.example.com:1080");
        let shown = format!("{p} {p:?}");
        assert!(!shown.contains("pw"), "{shown}");
        let h = EgressProxy::new("http://10.0.0.1:3128", None, None, None).unwrap();
        assert_eq!(
            (h.kind, h.address().as_str()),
            (ProxyKind::HttpConnect, "http://10.0.0.1:3128")
        );
        let v6 = EgressProxy::new("[::1]:1080", None, None, None).unwrap();
        assert_eq!(v6.address(), "[::1]:1080");
        for bad in ["p", "p:0", "p:x", "ftp://p:1", "u:pw@p:1080", "bad..name:1", ":1080"] {
            let e = EgressProxy::new(bad, None, None, None).unwrap_err();
            assert!(e.to_string().contains("network.egressProxy"), "{bad}: {e}");
        }
        assert!(EgressProxy::new("p:1", None, Some("pw".into()), None).is_err());
        assert!(EgressProxy::new("p:1", Some("x".repeat(256)), None, None).is_err());
        let tls = ProxyTls { server_name: None, ca_pem: Some("not pem".into()) };
        assert!(EgressProxy::new("p:1", None, None, Some(tls)).is_err());
    }
}
