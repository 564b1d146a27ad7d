//! Sandbox networking in the server: E2B's network fields, the live policy API, egress
//! decisions into the audit trail, and inbound HTTP to a sandbox's own ports.
//!
//! The plumbing (TUN device, userspace TCP/IP, policy, resolver, proxy) is `ringfence-net`;
//! this module maps E2B's JSON onto it and keeps one [`NetState`] per live sandbox.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ringfence_net::policy::{Ceiling, Rule, SandboxPolicy, parse_rules};
use ringfence_net::{Egress, EgressEvent, NetConfig, SandboxNet};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::manager::Live;
use crate::observe::Observer;
use crate::store::{AuditRecord, Store};

/// The operator's network settings.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    pub egress: NetConfig,
    /// The `domain` create returns: the SDK's `get_host(port)` is `<port>-<id>.<domain>`, and
    /// requests for such a host are routed here by their `Host` header.
    pub domain: Option<String>,
    /// Whether a sandbox's ports answer without its access token when its creator did not say
    /// (`network.allowPublicTraffic`).
    pub public_default: bool,
}

/// What a create (or update) asks for, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NetParams {
    pub policy: SandboxPolicy,
    /// Egress bytes per second (our extension, `network.egressBytesPerSecond`); `None`: the
    /// server's default.
    pub rate: Option<u64>,
    pub public: Option<bool>,
    pub mask_request_host: Option<String>,
    /// E2B's `dnsServers`: accepted and reported; the sandbox's resolver (ours) answers every
    /// DNS query whatever server it names.
    pub dns_servers: Option<Vec<String>>,
}

impl NetParams {
    /// A sandbox whose saved settings cannot be read back gets no egress at all.
    pub fn recovered_default() -> NetParams {
        NetParams {
            policy: SandboxPolicy { allow_internet_access: false, ..SandboxPolicy::default() },
            rate: None,
            public: None,
            mask_request_host: None,
            dns_servers: None,
        }
    }
}

fn bad(msg: impl Into<String>) -> crate::manager::ManagerError {
    crate::manager::ManagerError::BadRequest(msg.into())
}

fn strings(
    v: Option<&Value>,
    field: &str,
) -> Result<Option<Vec<String>>, crate::manager::ManagerError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("network.{field} must list strings")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad(format!("network.{field} must be a list of strings"))),
    }
}

fn rules(v: Option<&Value>, field: &str) -> Result<Vec<Rule>, crate::manager::ManagerError> {
    let items = strings(v, field)?.unwrap_or_default();
    parse_rules(&items).map_err(|e| bad(format!("network.{field}: {e}")))
}

/// Parses E2B's `allow_internet_access` and `network` object (create), or an update body
/// (`PUT /sandboxes/{id}/network`, whose fields sit at the top level).
pub fn parse(
    internet: Option<bool>,
    network: Option<&Value>,
) -> Result<NetParams, crate::manager::ManagerError> {
    let empty = json!({});
    let n = match network {
        None | Some(Value::Null) => &empty,
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(bad("network must be an object")),
    };
    let get = |camel: &str, snake: &str| n.get(camel).or_else(|| n.get(snake));
    for (camel, snake, what) in [
        ("egressProxy", "egress_proxy", "tunnelling egress through a SOCKS5 proxy"),
        ("rules", "rules", "per-host request transforms"),
        ("httpsPorts", "https_ports", "HTTPS to sandbox ports"),
    ] {
        let set = match get(camel, snake) {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(format!("network.{camel} ({what}) is not supported by this server")));
        }
    }
    let internet = internet
        .or_else(|| get("allowInternetAccess", "allow_internet_access").and_then(Value::as_bool))
        .unwrap_or(true);
    let rate = match get("egressBytesPerSecond", "egress_bytes_per_second") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64().ok_or_else(|| bad("network.egressBytesPerSecond must be a whole number"))?,
        ),
    };
    let public = match get("allowPublicTraffic", "allow_public_traffic") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_bool().ok_or_else(|| bad("network.allowPublicTraffic must be true or false"))?,
        ),
    };
    let mask = match get("maskRequestHost", "mask_request_host") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str().ok_or_else(|| bad("network.maskRequestHost must be a string"))?.to_string(),
        ),
    };
    let dns_servers = strings(get("dnsServers", "dns_servers"), "dnsServers")?;
    Ok(NetParams {
        policy: SandboxPolicy {
            allow_internet_access: internet,
            allow_out: rules(get("allowOut", "allow_out"), "allowOut")?,
            deny_out: rules(get("denyOut", "deny_out"), "denyOut")?,
        },
        rate,
        public,
        mask_request_host: mask,
        dns_servers,
    })
}

/// One sandbox's network as the server holds it.
#[derive(Debug)]
pub struct NetState {
    pub net: SandboxNet,
    pub params: NetParams,
}

/// The per-sandbox slot in [`Live`]; empty before attach and after teardown.
pub type NetSlot = Mutex<Option<NetState>>;

/// Server-wide networking.
#[derive(Debug)]
pub struct Network {
    cfg: NetworkConfig,
    egress: Arc<Egress>,
    audit: mpsc::Sender<AuditRecord>,
}

/// Most records one write stores (one transaction, one fsync).
const AUDIT_BATCH: usize = 512;

/// Egress records waiting for the store, all sandboxes together. A sandbox can make decisions
/// (a refused SYN each) faster than any store commits them; past this many, each sandbox counts
/// what it could not queue and records the count as soon as there is room, so memory stays
/// bounded and the trail still says how many decisions it does not list one by one.
const AUDIT_QUEUE: usize = 64 * AUDIT_BATCH;

/// One sandbox's way into the egress audit queue.
#[derive(Debug)]
pub struct EgressAudit {
    tx: mpsc::Sender<AuditRecord>,
    sandbox_id: String,
    key_id: String,
    dropped: std::sync::atomic::AtomicU64,
}

impl EgressAudit {
    pub fn new(tx: mpsc::Sender<AuditRecord>, sandbox_id: String, key_id: String) -> EgressAudit {
        EgressAudit { tx, sandbox_id, key_id, dropped: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Queues `rec` without waiting (the network stack calls this synchronously); when the
    /// queue is full the record is counted instead, and the count goes ahead of the next
    /// record that fits as one `network.egress.dropped` record.
    pub fn offer(&self, mut rec: AuditRecord) {
        use std::sync::atomic::Ordering;
        rec.sandbox_id = Some(self.sandbox_id.clone());
        rec.user_id = Some(self.key_id.clone());
        let dropped = self.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            let mut summary = AuditRecord::new("network.egress.dropped", rec.ts_ms);
            summary.sandbox_id = rec.sandbox_id.clone();
            summary.user_id = rec.user_id.clone();
            summary.detail.insert("records".into(), Value::from(dropped));
            if self.tx.try_send(summary).is_err() {
                self.dropped.fetch_add(dropped + 1, Ordering::AcqRel);
                return;
            }
        }
        if self.tx.try_send(rec).is_err() {
            self.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Records counted but not yet reported.
    pub fn pending_drops(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Network {
    pub fn new(
        cfg: NetworkConfig,
        store: Arc<Store>,
        observer: Arc<Observer>,
    ) -> Result<Network, ringfence_net::NetError> {
        let egress = Egress::new(cfg.egress.clone())?;
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(write_loop(rx, store, observer));
        Ok(Network { cfg, egress, audit: tx })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// The `domain` to return from create and connect.
    pub fn domain(&self) -> Option<&str> {
        self.cfg.domain.as_deref()
    }

    /// Checks what a create asks for against the ceiling, before anything is started.
    pub fn validate(&self, params: &NetParams) -> Result<(), crate::manager::ManagerError> {
        self.egress.rate_for(params.rate).map(drop).map_err(|e| bad(e.to_string()))
    }

    /// Gives started sandbox `id` of `key` its network where its tier attaches it (`at`),
    /// and keeps it in `slot`. Fails (and the caller kills the sandbox) if the device cannot
    /// be made or the rate is above the ceiling.
    pub fn attach(
        &self,
        slot: &NetSlot,
        (id, key): (&str, &str),
        at: crate::tier::NetAttach,
        params: NetParams,
    ) -> Result<(), crate::manager::ManagerError> {
        let rate = self.egress.rate_for(params.rate).map_err(|e| bad(e.to_string()))?;
        // A tier without a network to attach (gvisor here: `--network=none`) gives its
        // sandboxes none at all, which no egress policy could loosen: nothing to set up, and
        // a later policy change answers that the sandbox has no network.
        if matches!(at, crate::tier::NetAttach::None) {
            return Ok(());
        }
        let audit = EgressAudit::new(self.audit.clone(), id.to_string(), key.to_string());
        let sink = Arc::new(move |e: EgressEvent| {
            let mut rec = AuditRecord::new("network.egress", e.ts_ms);
            rec.duration_ms = e.duration_ms;
            if let Ok(Value::Object(m)) = serde_json::to_value(&e) {
                rec.detail = m;
                rec.detail.remove("ts_ms");
                rec.detail.remove("duration_ms");
            }
            audit.offer(rec);
        });
        let net = match at {
            crate::tier::NetAttach::Netns(ns) => {
                self.egress.attach(&ns, params.policy.clone(), rate, sink)?
            }
            crate::tier::NetAttach::Relay(fd) => {
                let fd = fd.try_clone().map_err(|e| {
                    crate::manager::ManagerError::Internal(format!("the packet relay: {e}"))
                })?;
                self.egress.attach_device(fd, params.policy.clone(), rate, sink)?
            }
            crate::tier::NetAttach::None => return Ok(()),
        };
        if let Ok(mut slot) = slot.lock() {
            *slot = Some(NetState { net, params });
        }
        Ok(())
    }

    /// Replaces a sandbox's egress settings (E2B's replace semantics: omitted fields reset).
    /// Returns how many open connections the new policy cut.
    pub fn update(
        &self,
        live: &Live,
        mut params: NetParams,
    ) -> Result<usize, crate::manager::ManagerError> {
        let rate = self.egress.rate_for(params.rate).map_err(|e| bad(e.to_string()))?;
        let mut slot = live.net.lock().map_err(|_| bad("network lock"))?;
        let state = slot.as_mut().ok_or_else(|| bad("this sandbox has no network"))?;
        state.net.set_rate(rate);
        let cut = state.net.set_policy(params.policy.clone());
        // Inbound settings are not part of the update body: they stay.
        params.public = state.params.public;
        params.mask_request_host = state.params.mask_request_host.clone();
        state.params = params;
        Ok(cut)
    }

    /// Whether a sandbox's ports answer without its token.
    pub fn is_public(&self, live: &Live) -> bool {
        live.net
            .lock()
            .ok()
            .and_then(|s| s.as_ref().and_then(|s| s.params.public))
            .unwrap_or(self.cfg.public_default)
    }

    /// The sandbox's network settings and open connections, as JSON (E2B's names).
    pub fn describe(&self, live: &Live) -> Value {
        let Ok(slot) = live.net.lock() else { return Value::Null };
        let Some(s) = slot.as_ref() else { return Value::Null };
        let p = &s.net.policy();
        let mut v = json!({
            "allowInternetAccess": p.allow_internet_access,
            "allowOut": p.allow_out,
            "denyOut": p.deny_out,
            "dnsServers": s.params.dns_servers.clone().unwrap_or_default(),
            "allowPublicTraffic": s.params.public.unwrap_or(self.cfg.public_default),
            "maskRequestHost": s.params.mask_request_host,
            "egressBytesPerSecond": s.net.rate(),
            "connections": s.net.connections(),
        });
        // The SDK reads present fields as lists and strings: absent, never null.
        if let Value::Object(m) = &mut v {
            m.retain(|_, x| !x.is_null());
        }
        v
    }

    /// The settings to persist with the sandbox (restored after a server restart).
    pub fn persisted(params: &NetParams) -> Value {
        json!({
            "allowInternetAccess": params.policy.allow_internet_access,
            "allowOut": params.policy.allow_out,
            "denyOut": params.policy.deny_out,
            "egressBytesPerSecond": params.rate,
            "allowPublicTraffic": params.public,
            "maskRequestHost": params.mask_request_host,
            "dnsServers": params.dns_servers,
        })
    }
}

/// Stores egress records in batches: a sandbox opening connections in a loop costs one
/// transaction per batch, not one fsync per connection.
async fn write_loop(
    mut rx: mpsc::Receiver<AuditRecord>,
    store: Arc<Store>,
    observer: Arc<Observer>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < AUDIT_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (store, observer) = (store.clone(), observer.clone());
        let _ = tokio::task::spawn_blocking(move || match store.insert_audits(&mut batch) {
            Ok(()) => observer.committed(&batch),
            Err(e) => tracing::error!(records = batch.len(), error = %e, "egress records lost"),
        })
        .await;
    }
}

/// Tears a sandbox's network down (its connections are reset, its device removed).
pub fn teardown(live: &Live) {
    if let Ok(mut slot) = live.net.lock() {
        slot.take();
    }
}

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
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({
            "sandboxId": id,
            "message": format!("The sandbox is running but port is not open ({port}: {why})"),
            "code": 502
        })),
    )
        .into_response()
}

/// The Host header a sandbox asked inbound requests to carry (`maskRequestHost`).
pub fn host_mask(slot: &NetSlot) -> Option<String> {
    slot.lock().ok().and_then(|s| s.as_ref().and_then(|s| s.params.mask_request_host.clone()))
}

/// Relays one HTTP request (and, on `101 Switching Protocols`, the upgraded connection) to
/// `127.0.0.1:port` inside sandbox `id`, whose network its tier attached at `at`, with the
/// Host header `mask` if the sandbox set one.
pub async fn inbound(
    (id, at, mask): (&str, Option<crate::tier::NetAttach>, Option<String>),
    port: u16,
    mut req: Request,
) -> Response {
    let ns = match at {
        Some(crate::tier::NetAttach::Netns(ns)) => ns,
        Some(crate::tier::NetAttach::Relay(_)) => {
            return port_closed(id, port, "the gvisor tier takes no inbound connections yet");
        }
        _ => return port_closed(id, port, "no agent"),
    };
    let stream = match ringfence_net::netns::connect_inside(&ns, port, Duration::from_secs(5)).await
    {
        Ok(s) => s,
        Err(e) => return port_closed(id, port, &e.to_string()),
    };
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

/// The ceiling from serve flags.
pub fn ceiling(allow: &[String], deny: &[String], exempt: &[String]) -> Result<Ceiling, String> {
    let allow =
        if allow.is_empty() { None } else { Some(parse_rules(allow).map_err(|e| e.to_string())?) };
    let deny = parse_rules(deny).map_err(|e| e.to_string())?;
    let exempt = exempt
        .iter()
        .map(|c| c.parse().map_err(|e| format!("--egress-exempt {c:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Ceiling { allow, deny, exempt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_records_past_the_queue_are_counted_not_buffered() {
        // A sandbox deciding faster than the store commits: the queue holds what it holds,
        // the rest is counted, and the count is recorded once there is room again.
        let (tx, mut rx) = mpsc::channel(2);
        let audit = EgressAudit::new(tx, "sb".into(), "key".into());
        for i in 0..1000 {
            audit.offer(AuditRecord::new("network.egress", i));
        }
        assert_eq!(audit.pending_drops(), 998);
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (first.action.as_str(), first.sandbox_id.as_deref()),
            ("network.egress", Some("sb"))
        );
        rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err(), "nothing beyond the queue's capacity was kept");
        audit.offer(AuditRecord::new("network.egress", 1000));
        let summary = rx.try_recv().unwrap();
        assert_eq!(summary.action, "network.egress.dropped");
        assert_eq!(summary.detail["records"], json!(998));
        assert_eq!(summary.user_id.as_deref(), Some("key"));
        assert_eq!(rx.try_recv().unwrap().ts_ms, 1000);
        assert_eq!(audit.pending_drops(), 0);
    }

    #[test]
    fn e2b_fields_parse() {
        let p = parse(
            None,
            Some(&json!({"allowOut": ["www.allowed.test", "*.x.test:443"], "denyOut": ["0.0.0.0/0"], "allowPublicTraffic": false, "maskRequestHost": "${PORT}-x.test"})),
        )
        .unwrap();
        assert!(p.policy.allow_internet_access);
        assert_eq!(p.policy.allow_out.len(), 2);
        assert_eq!(p.public, Some(false));
        let p = parse(Some(false), None).unwrap();
        assert!(p.policy.is_none());
        let p = parse(None, Some(&json!({"allow_internet_access": false}))).unwrap();
        assert!(!p.policy.allow_internet_access);
        assert!(parse(None, Some(&json!({"allowOut": ["*"]}))).is_err());
        assert!(parse(None, Some(&json!({"egressProxy": {"address": "p:1080"}}))).is_err());
        assert!(parse(None, Some(&json!({"rules": {}}))).is_ok());
        assert!(parse(None, Some(&json!({"egressBytesPerSecond": -1}))).is_err());
    }

    #[test]
    fn hosts_route() {
        assert_eq!(parse_host("8000-abc123.localhost:3000"), Some((8000, "abc123".into())));
        assert_eq!(parse_host("localhost:3000"), None);
        assert_eq!(parse_host("8000-ABC.x"), None);
        assert_eq!(parse_host("99999-a.x"), None);
    }
}
