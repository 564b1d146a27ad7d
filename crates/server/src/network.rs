//! Inbound HTTP to a sandbox's own ports (`https://<port>-<id>.<domain>`), and the sandbox
//! network's state re-exported from the core (`ringfence_core::network`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use ringfence_core::network::*;

/// `<port>-<sandbox id>.<anything>` → (port, id): the host the SDK's `get_host(port)` builds.
pub fn parse_host(host: &str) -> Option<(u16, String)> {
    let first = host.split('.').next()?;
    let (port, id) = first.split_once('-')?;
    let port = port.parse::<u16>().ok()?;
    let ok = !id.is_empty() && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (ok && host.contains('.')).then(|| (port, id.to_string()))
}

/// Headers that address us, not the sandbox's service.
const OURS: &[&str] =
    &["e2b-sandbox-id", "e2b-sandbox-port", "x-access-token", "e2b-traffic-access-token"];

fn port_closed(id: &str, port: u16, why: &str) -> Response {
    crate::e2b_error::E2bError::port_not_open(id, port, why).into_response()
}

/// A TLS client for a sandbox's own HTTPS service: any certificate is taken (E2B's
/// documented behaviour for `httpsPorts`, so self-signed ones work). What this gives up is
/// only the check of who answers, and the answer comes from the sandbox's own loopback, in its
/// own network namespace, which nothing else can listen on; the handshake's signatures are
/// still checked, so the session is at least bound to the certificate that was offered.
fn sandbox_tls() -> Option<tokio_rustls::TlsConnector> {
    static CONNECTOR: std::sync::OnceLock<Option<tokio_rustls::TlsConnector>> =
        std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .ok()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

/// See [`sandbox_tls`].
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Relays one HTTP request (and, on `101 Switching Protocols`, the upgraded connection) to
/// `127.0.0.1:port` inside sandbox `id`, whose network its tier attached at `at` (a VM's
/// through `dialer`), with the Host header `mask` if the sandbox set one.
pub async fn inbound(
    (id, at, mask, tls): (&str, Option<crate::tier::NetAttach>, Option<String>, bool),
    dialer: Option<ringfence_net::GuestDialer>,
    port: u16,
    req: Request,
) -> Response {
    let within = Duration::from_secs(5);
    match at {
        Some(crate::tier::NetAttach::Netns(ns)) => {
            match ringfence_net::netns::connect_inside(&ns, port, within).await {
                Ok(s) => inbound_on((id, mask, tls), port, s, req).await,
                Err(e) => port_closed(id, port, &e.to_string()),
            }
        }
        Some(crate::tier::NetAttach::Nic(_)) => {
            let Some(dialer) = dialer else { return port_closed(id, port, "no network") };
            match dialer.connect(port, within).await {
                Ok(s) => inbound_on((id, mask, tls), port, s, req).await,
                Err(e) => port_closed(id, port, &e.to_string()),
            }
        }
        Some(crate::tier::NetAttach::Relay(_)) => {
            // The same stack dials in through the relayed device, to the sandbox's address:
            // gVisor's stack refuses loopback destinations arriving on a device (see
            // `GuestDialer::connect_to`), so a service must listen on that address or on all.
            let Some(dialer) = dialer else { return port_closed(id, port, "no network") };
            match dialer.connect_to(ringfence_net::tun::SANDBOX_IP, port, within).await {
                Ok(s) => inbound_on((id, mask, tls), port, s, req).await,
                Err(e) => port_closed(id, port, &e.to_string()),
            }
        }
        _ => port_closed(id, port, "no agent"),
    }
}

/// [`inbound`] on a connection to the sandbox's port: plain, or TLS when the sandbox said the
/// port speaks it.
async fn inbound_on<S>(
    (id, mask, tls): (&str, Option<String>, bool),
    port: u16,
    stream: S,
    req: Request,
) -> Response
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if !tls {
        return relay_inbound((id, port, mask), stream, req).await;
    }
    let Some(connector) = sandbox_tls() else {
        return port_closed(id, port, "no TLS client could be made");
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from("localhost") else {
        return port_closed(id, port, "no TLS server name");
    };
    match connector.connect(name.to_owned(), stream).await {
        Ok(s) => relay_inbound((id, port, mask), s, req).await,
        Err(e) => port_closed(id, port, &format!("TLS handshake (httpsPorts): {e}")),
    }
}

/// The HTTP half of [`inbound`], over a plain or a TLS stream to the sandbox's port.
async fn relay_inbound<S>(
    (id, port, mask): (&str, u16, Option<String>),
    stream: S,
    mut req: Request,
) -> Response
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return port_closed(id, port, &e.to_string()),
        };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    for h in OURS {
        req.headers_mut().remove(*h);
    }
    if let Some(m) = mask
        && let Ok(v) = HeaderValue::from_str(&m.replace("${PORT}", &port.to_string()))
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let client_upgrade =
        req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return port_closed(id, port, &e.to_string()),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let server = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (client.await, server.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut s = hyper_util::rt::TokioIo::new(s);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
            }
        });
    }
    resp.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_route() {
        assert_eq!(parse_host("8000-abc123.localhost:3000"), Some((8000, "abc123".into())));
        assert_eq!(parse_host("localhost:3000"), None);
        assert_eq!(parse_host("8000-ABC.x"), None);
        assert_eq!(parse_host("99999-a.x"), None);
    }
}
