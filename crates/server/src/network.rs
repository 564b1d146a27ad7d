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
use ringfence_net::intercept::{HostRule, Interception, RequestRules};
use ringfence_net::policy::{Ceiling, Rule, SandboxPolicy, parse_rules};
use ringfence_net::proxy::{EgressProxy, ProxyTls};
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
    /// The file with the key secrets are sealed with (`crate::secrets::Vault`); `None`:
    /// `<data-dir>/secrets.key`, made on first start.
    pub secrets_key: Option<std::path::PathBuf>,
    /// What template builds' RUN steps may reach (`--build-egress`).
    pub build_egress: BuildEgress,
}

/// The operator's egress policy for template builds' RUN steps (`ringfence serve
/// --build-egress`). Whatever it says, a build never reaches loopback, link-local (cloud
/// metadata), private or CGNAT ranges or this host's own addresses: builds get the built-in
/// blocked ranges with no `--egress-exempt` (that flag is for sandboxes), under the server's
/// `--egress-allow` / `--egress-deny` ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEgress {
    /// No network: RUN steps see loopback only.
    None,
    /// Only these destinations (domain rules are checked against the name the client
    /// presented and our resolver's answer, as for sandboxes' `allowOut`).
    Allow(Vec<Rule>),
    /// Any destination outside the blocked ranges.
    Internet,
}

/// The package archives RUN steps may reach by default: what `apt-get`, `pip`, `npm` (and
/// the Template SDK's `apt_install`, `pip_install`, `npm_install`) fetch from, over HTTP and
/// HTTPS. Ubuntu's and Alpine's archives too, for images built on them.
pub const DEFAULT_BUILD_EGRESS: &[&str] = &[
    "deb.debian.org",
    "security.debian.org",
    "*.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "*.archive.ubuntu.com",
    "dl-cdn.alpinelinux.org",
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "registry.yarnpkg.com",
];

impl Default for BuildEgress {
    fn default() -> Self {
        BuildEgress::parse(&[] as &[String]).unwrap_or(BuildEgress::None)
    }
}

impl BuildEgress {
    /// `--build-egress` values: none given → [`DEFAULT_BUILD_EGRESS`]; `none`; `internet`;
    /// otherwise allow rules (a domain, `*.domain`, an IP or CIDR block, each optionally
    /// `:PORT`), and `default` adds the default list to them.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<BuildEgress, String> {
        let items: Vec<&str> = items.iter().map(|s| s.as_ref().trim()).collect();
        match items.as_slice() {
            [] => {
                return parse_rules(DEFAULT_BUILD_EGRESS)
                    .map(BuildEgress::Allow)
                    .map_err(|e| e.to_string());
            }
            ["none"] => return Ok(BuildEgress::None),
            ["internet"] => return Ok(BuildEgress::Internet),
            _ => {}
        }
        if let Some(m) = items.iter().find(|i| matches!(**i, "none" | "internet")) {
            return Err(format!("--build-egress {m} cannot be combined with other values"));
        }
        let mut rules: Vec<String> = Vec::new();
        for i in items {
            if i == "default" {
                rules.extend(DEFAULT_BUILD_EGRESS.iter().map(|d| d.to_string()));
            } else {
                rules.push(i.to_string());
            }
        }
        parse_rules(&rules).map(BuildEgress::Allow).map_err(|e| format!("--build-egress: {e}"))
    }

    /// The policy a build sandbox gets, `None` for no network at all.
    pub(crate) fn policy(&self) -> Option<SandboxPolicy> {
        match self {
            BuildEgress::None => None,
            BuildEgress::Allow(rules) => Some(SandboxPolicy {
                allow_internet_access: false,
                allow_out: rules.clone(),
                deny_out: Vec::new(),
            }),
            BuildEgress::Internet => Some(SandboxPolicy::default()),
        }
    }

    /// One line for logs: what builds may reach.
    pub fn describe(&self) -> String {
        match self {
            BuildEgress::None => "none".into(),
            BuildEgress::Internet => "internet (outside the blocked ranges)".into(),
            BuildEgress::Allow(r) => r.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        }
    }
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
    /// E2B's `rules`: per-host header transforms, applied on the TLS-terminating path.
    pub rules: RequestRules,
    /// E2B's `httpsPorts`: sandbox ports whose service speaks TLS itself; inbound requests
    /// reach them over TLS (their certificate not checked: it is the sandbox's own service,
    /// reached on the sandbox's loopback, and self-signed ones must work).
    pub https_ports: Vec<u16>,
    /// E2B's `egressProxy`: the upstream proxy allowed connections leave through.
    pub proxy: Option<ProxyParams>,
}

/// E2B's `egressProxy`, validated (its address not yet held to the ceiling: that needs a
/// lookup, [`Network::check_proxy`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyParams {
    pub proxy: EgressProxy,
    /// The password as saved with the sandbox (sealed with the secrets key, hex), when these
    /// settings were read back from the store: opened when the network is attached.
    pub sealed_password: Option<String>,
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
            rules: RequestRules::default(),
            https_ports: Vec::new(),
            proxy: None,
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

/// E2B's `rules`: `{host: [{"transform": {"headers": {name: value}}}, ...]}`. The rules of one
/// host apply in order (a later one's header replaces an earlier one's of the same name).
fn request_rules(v: Option<&Value>) -> Result<RequestRules, crate::manager::ManagerError> {
    let map = match v {
        None | Some(Value::Null) => return Ok(RequestRules::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("network.rules must be an object of host -> list of rules")),
    };
    let mut out = Vec::with_capacity(map.len());
    for (host, list) in map {
        let list = list
            .as_array()
            .ok_or_else(|| bad(format!("network.rules[{host:?}] must be a list of rules")))?;
        let mut headers: Vec<(String, String)> = Vec::new();
        for rule in list {
            let t = match rule.get("transform") {
                None | Some(Value::Null) => continue,
                Some(t @ Value::Object(_)) => t,
                Some(_) => {
                    return Err(bad(format!(
                        "network.rules[{host:?}]: transform must be an object"
                    )));
                }
            };
            if let Some(extra) = t.as_object().and_then(|o| o.keys().find(|k| *k != "headers")) {
                return Err(bad(format!(
                    "network.rules[{host:?}]: transform.{extra} is not supported (headers only)"
                )));
            }
            let Some(h) = t.get("headers").filter(|h| !h.is_null()) else { continue };
            let h = h.as_object().ok_or_else(|| {
                bad(format!("network.rules[{host:?}]: transform.headers must be an object"))
            })?;
            for (k, v) in h {
                let v = v.as_str().ok_or_else(|| {
                    bad(format!("network.rules[{host:?}]: header {k:?} must be a string"))
                })?;
                headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
                headers.push((k.clone(), v.to_string()));
            }
        }
        // JSON objects have no order here (serde_json sorts keys): sorted, so a rule set reads
        // back from its saved form as it was.
        headers.sort_by_key(|(k, _)| k.to_ascii_lowercase());
        out.push(HostRule { host: host.to_ascii_lowercase(), headers });
    }
    RequestRules::new(out).map_err(|e| bad(e.to_string()))
}

/// E2B's shape of `rules`, for info and persistence.
fn rules_json(r: &RequestRules) -> Value {
    let mut m = serde_json::Map::new();
    for rule in r.rules() {
        let headers: serde_json::Map<String, Value> =
            rule.headers.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
        m.insert(rule.host.clone(), json!([{"transform": {"headers": headers}}]));
    }
    Value::Object(m)
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
    let proxy = egress_proxy(get("egressProxy", "egress_proxy"))?;
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
        rules: request_rules(get("rules", "rules"))?,
        https_ports: https_ports(get("httpsPorts", "https_ports"))?,
        proxy,
    })
}

/// E2B's `egressProxy`: `{address, username?, password?, tls?: true | {enabled, serverName?,
/// caCert?}}` (snake_case accepted too). `passwordSealed` is ours, only in saved settings.
fn egress_proxy(v: Option<&Value>) -> Result<Option<ProxyParams>, crate::manager::ManagerError> {
    let m = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("network.egressProxy must be an object with an address")),
    };
    let get = |camel: &str, snake: &str| m.get(camel).or_else(|| m.get(snake));
    let text = |camel: &str, snake: &str| -> Result<Option<String>, crate::manager::ManagerError> {
        match get(camel, snake) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("network.egressProxy.{camel} must be a string"))),
        }
    };
    let address = text("address", "address")?
        .ok_or_else(|| bad("network.egressProxy needs an address (host:port)"))?;
    let sealed_password = text("passwordSealed", "password_sealed")?;
    let tls = match get("tls", "tls") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(ProxyTls { server_name: None, ca_pem: None }),
        Some(Value::Object(t)) => {
            let tget = |camel: &str, snake: &str| t.get(camel).or_else(|| t.get(snake));
            let tstr = |camel: &str, snake: &str| match tget(camel, snake) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("network.egressProxy.tls.{camel} must be a string"))),
            };
            let enabled = match tget("enabled", "enabled") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad("network.egressProxy.tls.enabled must be true or false"));
                }
            };
            let (server_name, ca_pem) =
                (tstr("serverName", "server_name")?, tstr("caCert", "ca_cert")?);
            enabled.then_some(ProxyTls { server_name, ca_pem })
        }
        Some(_) => return Err(bad("network.egressProxy.tls must be true, false or an object")),
    };
    let proxy = EgressProxy::new(
        &address,
        text("username", "username")?,
        text("password", "password")?,
        tls,
    )
    .map_err(|e| bad(e.to_string()))?;
    if sealed_password.is_some() && proxy.username.is_none() {
        return Err(bad("network.egressProxy: a password is only valid together with a username"));
    }
    Ok(Some(ProxyParams { proxy, sealed_password }))
}

/// What the API shows of a proxy: never its password or CA bundle.
fn proxy_info(p: &EgressProxy) -> Value {
    let mut v = json!({"address": p.address()});
    if let Some(u) = &p.username {
        v["username"] = json!(u);
    }
    if let Some(t) = &p.tls {
        v["tls"] = json!({"enabled": true});
        if let Some(n) = &t.server_name {
            v["tls"]["serverName"] = json!(n);
        }
    }
    v
}

/// E2B's `httpsPorts`: a list of sandbox ports (1-65535), not envd's.
fn https_ports(v: Option<&Value>) -> Result<Vec<u16>, crate::manager::ManagerError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("network.httpsPorts must be a list of port numbers")),
    };
    let mut ports = Vec::with_capacity(list.len());
    for p in list {
        let port =
            p.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0).ok_or_else(|| {
                bad(format!("network.httpsPorts: {p} is not a port number (1-65535)"))
            })?;
        if port == crate::api::ENVD_PORT {
            return Err(bad(format!(
                "network.httpsPorts: {port} is envd's port, which speaks plain HTTP"
            )));
        }
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports.sort_unstable();
    Ok(ports)
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
    /// The egress of template builds' RUN steps: the server's ceiling without its
    /// exemptions from the blocked ranges; `None` when builds get no network.
    build: Option<(Arc<Egress>, SandboxPolicy)>,
    audit: mpsc::Sender<AuditRecord>,
    store: Arc<Store>,
    vault: Arc<crate::secrets::Vault>,
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
        default_key: &std::path::Path,
    ) -> Result<Network, String> {
        let egress = Egress::new(cfg.egress.clone()).map_err(|e| e.to_string())?;
        let key = cfg.secrets_key.clone().unwrap_or_else(|| default_key.to_path_buf());
        let vault =
            Arc::new(crate::secrets::Vault::open_or_create(&key).map_err(|e| e.to_string())?);
        let build = match cfg.build_egress.policy() {
            None => None,
            Some(policy) => {
                let mut c = cfg.egress.clone();
                c.ceiling.exempt.clear();
                Some((Egress::new(c).map_err(|e| e.to_string())?, policy))
            }
        };
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(write_loop(rx, store.clone(), observer));
        Ok(Network { cfg, egress, build, audit: tx, store, vault })
    }

    /// Gives a template build's RUN sandbox (network namespace `netns`, sandbox `sandbox`)
    /// the operator's build egress; every decision is an audit record (`network.egress`, with
    /// the build's id and template) under `key`, who asked for the build (`None`: the
    /// operator, on the command line). `Ok(None)`: builds get no network. Runs on the
    /// server's runtime (`rt`), from whatever thread the build runs on.
    pub fn attach_build(
        &self,
        rt: &tokio::runtime::Handle,
        netns: &std::path::Path,
        sandbox: &str,
        key: Option<&str>,
        build: (&str, &str),
    ) -> Result<Option<SandboxNet>, String> {
        let Some((egress, policy)) = &self.build else { return Ok(None) };
        let audit = EgressAudit::new(
            self.audit.clone(),
            sandbox.to_string(),
            key.unwrap_or("operator").to_string(),
        );
        let (build_id, template) = (build.0.to_string(), build.1.to_string());
        let sink = Arc::new(move |e: EgressEvent| {
            let mut rec = egress_record(&e);
            rec.detail.insert("build_id".into(), json!(build_id));
            rec.detail.insert("template".into(), json!(template));
            audit.offer(rec);
        });
        let _entered = rt.enter();
        egress.attach(netns, policy.clone(), None, sink).map(Some).map_err(|e| e.to_string())
    }

    pub fn vault(&self) -> &Arc<crate::secrets::Vault> {
        &self.vault
    }

    fn interception(&self, key: &str, rules: &RequestRules) -> Option<Interception> {
        (!rules.is_empty()).then(|| Interception {
            rules: rules.clone(),
            lookup: crate::secrets::lookup(self.store.clone(), self.vault.clone(), key.to_string()),
        })
    }

    /// The sandbox's egress CA (PEM), for its trust store; `None` if it has no network.
    pub fn ca_pem(&self, live: &Live) -> Result<Option<String>, crate::manager::ManagerError> {
        let id = live.record.lock().map(|r| r.id.clone()).unwrap_or_default();
        let slot = live.net.lock().map_err(|_| bad("network lock"))?;
        let Some(state) = slot.as_ref() else { return Ok(None) };
        state
            .net
            .ca_pem(&format!("sandbox {id}"))
            .map(Some)
            .map_err(|e| crate::manager::ManagerError::Internal(e.to_string()))
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

    /// Holds an asked-for proxy to the ceiling (its name resolved by the sandboxes'
    /// resolver): 400 naming the proxy and why when it is outside, or does not resolve.
    pub async fn check_proxy(
        &self,
        params: &NetParams,
    ) -> Result<(), crate::manager::ManagerError> {
        match &params.proxy {
            None => Ok(()),
            Some(p) => {
                self.egress.resolve_proxy(&p.proxy).await.map(drop).map_err(|e| bad(e.to_string()))
            }
        }
    }

    fn proxy_context() -> Vec<u8> {
        b"ringfence-egress-proxy-password".to_vec()
    }

    /// The proxy to dial through, its saved password opened. A password that does not open
    /// (the key changed) leaves the proxy without one: its connections then fail at the
    /// proxy's authentication (closed), never go out directly.
    fn live_proxy(&self, p: &Option<ProxyParams>) -> Option<EgressProxy> {
        let p = p.as_ref()?;
        let mut proxy = p.proxy.clone();
        if let Some(sealed) = &p.sealed_password {
            let opened = hex::decode(sealed)
                .ok()
                .and_then(|b| self.vault.open_for(Self::proxy_context(), &b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            if opened.is_none() {
                tracing::warn!(
                    "the egress proxy's saved password did not open; dialing without it"
                );
            }
            proxy.password = opened;
        }
        Some(proxy)
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
            audit.offer(egress_record(&e));
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
            crate::tier::NetAttach::Nic(fd) => {
                let fd = fd.try_clone().map_err(|e| {
                    crate::manager::ManagerError::Internal(format!("the guest's NIC: {e}"))
                })?;
                self.egress.attach_nic(fd, params.policy.clone(), rate, sink)?
            }
            crate::tier::NetAttach::None => return Ok(()),
        };
        net.set_interception(self.interception(key, &params.rules));
        net.set_proxy(self.live_proxy(&params.proxy));
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
        let key = live.record.lock().map(|r| r.key_id.clone()).unwrap_or_default();
        let mut slot = live.net.lock().map_err(|_| bad("network lock"))?;
        let state = slot.as_mut().ok_or_else(|| bad("this sandbox has no network"))?;
        state.net.set_rate(rate);
        let cut = state.net.set_policy(params.policy.clone());
        state.net.set_interception(self.interception(&key, &params.rules));
        state.net.set_proxy(self.live_proxy(&params.proxy));
        // Inbound settings are not part of the update body: they stay.
        params.public = state.params.public;
        params.mask_request_host = state.params.mask_request_host.clone();
        params.https_ports = state.params.https_ports.clone();
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
            "rules": rules_json(&s.params.rules),
            "httpsPorts": s.params.https_ports,
            "egressProxy": s.net.proxy().as_ref().map(proxy_info),
            "connections": s.net.connections(),
        });
        // The SDK reads present fields as lists and strings: absent, never null.
        if let Value::Object(m) = &mut v {
            m.retain(|_, x| !x.is_null());
        }
        v
    }

    /// The settings to persist with the sandbox (restored after a server restart). A proxy
    /// password is kept sealed with the secrets key, never in the clear.
    pub fn persisted(&self, params: &NetParams) -> Value {
        let mut v = Self::persisted_public(params);
        if let Some(p) = &params.proxy {
            let sealed = match (&p.proxy.password, &p.sealed_password) {
                (Some(pw), _) => {
                    self.vault.seal_for(Self::proxy_context(), pw.as_bytes()).ok().map(hex::encode)
                }
                (None, s) => s.clone(),
            };
            if let Some(s) = sealed {
                v["egressProxy"]["passwordSealed"] = json!(s);
            }
            if let Some(ca) = p.proxy.tls.as_ref().and_then(|t| t.ca_pem.as_ref()) {
                v["egressProxy"]["tls"]["caCert"] = json!(ca);
            }
        }
        v
    }

    /// The settings without any credential: what audit records show.
    pub fn persisted_public(params: &NetParams) -> Value {
        json!({
            "allowInternetAccess": params.policy.allow_internet_access,
            "allowOut": params.policy.allow_out,
            "denyOut": params.policy.deny_out,
            "egressBytesPerSecond": params.rate,
            "allowPublicTraffic": params.public,
            "maskRequestHost": params.mask_request_host,
            "dnsServers": params.dns_servers,
            "rules": rules_json(&params.rules),
            "httpsPorts": params.https_ports,
            "egressProxy": params.proxy.as_ref().map(|p| proxy_info(&p.proxy)),
        })
    }
}

/// Where a sandbox finds its egress CA: alone (for Node's `NODE_EXTRA_CA_CERTS`, which adds to
/// Node's own list) and in a bundle with the system's CAs (for OpenSSL's `SSL_CERT_FILE`,
/// Python `requests`' `REQUESTS_CA_BUNDLE` and curl's `CURL_CA_BUNDLE`). Under `/var`, in the
/// sandbox's own layer: Landlock keeps even the sandbox's root out of `/etc` (unless its
/// template allows setuid), and the template's bundle is shared by every sandbox.
pub const EGRESS_CA_FILE: &str = "/var/lib/ringfence/egress-ca.pem";
pub const SANDBOX_CA_BUNDLE: &str = "/var/lib/ringfence/ca-bundle.pem";
/// The template's system bundle, which the sandbox's bundle starts from.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The environment a sandbox with request rules gets, so its TLS clients trust its CA.
pub fn egress_ca_env() -> [(&'static str, &'static str); 4] {
    [
        ("SSL_CERT_FILE", SANDBOX_CA_BUNDLE),
        ("REQUESTS_CA_BUNDLE", SANDBOX_CA_BUNDLE),
        ("CURL_CA_BUNDLE", SANDBOX_CA_BUNDLE),
        ("NODE_EXTRA_CA_CERTS", EGRESS_CA_FILE),
    ]
}

/// Puts the sandbox's egress CA into its own trust store (its copy of the bundle, in its
/// upper layer: the template and the host are untouched), as the sandbox's root user, the
/// way an image's own `update-ca-certificates` would. Idempotent: a bundle that lists it
/// already is left as it is.
pub async fn install_egress_ca(
    client: &Arc<crate::agent_client::AgentClient>,
    pem: &str,
) -> Result<(), crate::manager::ManagerError> {
    use ringfence_proto::{Event, ExitStatus, Reply, Request, SandboxUser, SpawnSpec, StdioMode};
    let fail = |e: &dyn std::fmt::Display| {
        crate::manager::ManagerError::Internal(format!("installing the egress CA: {e}"))
    };
    let script = format!(
        "umask 022; mkdir -p /var/lib/ringfence && printf '%s' \"$RF_CA\" > {EGRESS_CA_FILE}.new \
         && {{ cat {SYSTEM_CA_BUNDLE} 2>/dev/null; cat {EGRESS_CA_FILE}.new; }} > {SANDBOX_CA_BUNDLE}.new \
         && mv {EGRESS_CA_FILE}.new {EGRESS_CA_FILE} && mv {SANDBOX_CA_BUNDLE}.new {SANDBOX_CA_BUNDLE} \
         || {{ id; ls -ld /var/lib /var/lib/ringfence; exit 1; }}"
    );
    let spec = SpawnSpec {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script],
        env: [("RF_CA".to_string(), pem.to_string())].into_iter().collect(),
        cwd: Some("/".into()),
        user: SandboxUser::Root,
        stdio: StdioMode::Pipe { stdin: false },
        tag: Some("ringfence-egress-ca".into()),
    };
    let (reply, mut events) = client.stream(Request::Spawn(spec)).await.map_err(|e| fail(&e))?;
    if !matches!(reply, Reply::Spawned { .. }) {
        return Err(fail(&format!("{reply:?}")));
    }
    let mut said = Vec::new();
    let wait = async {
        while let Some(ev) = events.recv().await {
            match ev {
                Event::Stdout { data, .. } | Event::Stderr { data, .. } => {
                    said.extend_from_slice(&data[..data.len().min(4096)]);
                }
                Event::Exited { status, .. } => return Some(status),
                _ => {}
            }
        }
        None
    };
    match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(Some(ExitStatus::Code(0))) => Ok(()),
        Ok(other) => Err(fail(&format!("{other:?}: {}", String::from_utf8_lossy(&said).trim()))),
        Err(_) => Err(fail(&"timed out")),
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
    crate::e2b_error::E2bError::port_not_open(id, port, why).into_response()
}

/// The Host header a sandbox asked inbound requests to carry (`maskRequestHost`).
pub fn host_mask(slot: &NetSlot) -> Option<String> {
    slot.lock().ok().and_then(|s| s.as_ref().and_then(|s| s.params.mask_request_host.clone()))
}

/// Whether the sandbox said its service on `port` speaks TLS (`httpsPorts`).
pub fn port_speaks_tls(slot: &NetSlot, port: u16) -> bool {
    slot.lock()
        .ok()
        .is_some_and(|s| s.as_ref().is_some_and(|s| s.params.https_ports.contains(&port)))
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

/// A VM sandbox's way in: its stack, which connects through the guest's NIC (`None` for
/// other tiers, and before the network is attached).
pub fn guest_dialer(slot: &NetSlot) -> Option<ringfence_net::GuestDialer> {
    slot.lock().ok()?.as_ref().map(|s| s.net.dialer())
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

/// The audit record of one egress decision: the event's fields as its detail, its time and
/// duration as the record's own.
fn egress_record(e: &EgressEvent) -> AuditRecord {
    let mut rec = AuditRecord::new("network.egress", e.ts_ms);
    rec.duration_ms = e.duration_ms;
    if let Ok(Value::Object(m)) = serde_json::to_value(e) {
        rec.detail = m;
        rec.detail.remove("ts_ms");
        rec.detail.remove("duration_ms");
    }
    rec
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
        let p = parse(
            None,
            Some(&json!({"egressProxy": {"address": "p.test:1080", "username": "u", "password": "pw", "tls": {"enabled": true, "serverName": "tls.p.test"}}})),
        )
        .unwrap();
        let proxy = &p.proxy.as_ref().unwrap().proxy;
        assert_eq!(
            (proxy.address(), proxy.password.as_deref()),
            ("p.test:1080".into(), Some("pw"))
        );
        // What audit records and the API show never holds the password.
        let public = Network::persisted_public(&p).to_string();
        assert!(public.contains("p.test:1080") && !public.contains("pw"), "{public}");
        assert_eq!(Network::persisted_public(&p)["egressProxy"]["tls"]["serverName"], "tls.p.test");
        assert!(parse(None, Some(&json!({"egressProxy": null}))).unwrap().proxy.is_none());
        assert!(
            parse(None, Some(&json!({"egressProxy": {"address": "p:1", "tls": false}})))
                .unwrap()
                .proxy
                .unwrap()
                .proxy
                .tls
                .is_none()
        );
        for bad in [
            json!({"egressProxy": {}}),
            json!({"egressProxy": "p:1080"}),
            json!({"egressProxy": {"address": "p"}}),
            json!({"egressProxy": {"address": "p:1", "password": "x"}}),
            json!({"egressProxy": {"address": "p:1", "tls": {"caCert": "junk"}}}),
        ] {
            let e = parse(None, Some(&bad)).unwrap_err().to_string();
            assert!(e.contains("network.egressProxy"), "{bad}: {e}");
        }
        assert!(parse(None, Some(&json!({"rules": {}}))).is_ok());
        let p = parse(
            None,
            Some(&json!({"rules": {"API.example.com": [
                {"transform": {"headers": {"Authorization": "a", "x-b": "1"}}},
                {"transform": {"headers": {"authorization": "Bearer ${e2b.secrets.k}"}}},
                {}
            ]}})),
        )
        .unwrap();
        let r = p.rules.matching("api.example.com").unwrap();
        assert_eq!(
            r.headers,
            vec![
                ("authorization".to_string(), "Bearer ${e2b.secrets.k}".to_string()),
                ("x-b".to_string(), "1".to_string())
            ]
        );
        assert_eq!(parse(None, Some(&Network::persisted_public(&p))).unwrap().rules, p.rules);
        for bad in [
            json!({"rules": {"*": [{"transform": {"headers": {"a": "b"}}}]}}),
            json!({"rules": {"a.test": [{"transform": {"body": "x"}}]}}),
            json!({"rules": {"a.test": [{"transform": {"headers": {"Host": "evil.test"}}}]}}),
            json!({"rules": {"a.test": {"transform": {}}}}),
        ] {
            let e = parse(None, Some(&bad)).unwrap_err().to_string();
            assert!(e.contains("network.rules"), "{e}");
        }
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
