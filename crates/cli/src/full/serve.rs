//! `ringfence serve` and `ringfence keys`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ringfence_jail::limits::{self, Limits};
use ringfence_server::manager::ManagerConfig;
use ringfence_server::observe::{MetricsAuth, ObserveConfig, Thresholds};
use ringfence_server::quota::QuotaConfig;
use ringfence_server::store::{AuditQuery, KeyLimits, Store};

const AFTER_HELP: &str = "\
Clients: point the unmodified E2B SDKs at this server with
  E2B_API_URL=http://ADDR E2B_SANDBOX_URL=http://ADDR E2B_API_KEY=$(ringfence keys create --name me)
  NO_PROXY=127.0.0.1,localhost
One address serves the control plane and all sandbox traffic (routed by the E2b-Sandbox-Id header).

Logging: RINGFENCE_LOG=info|debug|... (tracing env-filter syntax); --log-format json for JSON lines.

Observability: GET /metrics (Prometheus text format; --metrics-auth key wants an API key in
X-API-Key or Authorization: Bearer, and only an operator key from `ringfence keys create
--operator` sees the per-sandbox series), GET /audit and `ringfence audit` (the audit trail,
also appended to DATA_DIR/audit.jsonl). Alerts are warnings in the log and alert.* audit
records.

Quotas: each API key may hold --max-sandboxes-per-key sandboxes (running or paused) and
--max-snapshots-per-key snapshots, and start sandboxes at --create-rate-per-key per second
(bursts of --create-burst-per-key); `ringfence keys create --max-sandboxes N ...` sets a key's
own. Refusals are 429 with a message naming the limit. 0 means no limit.";

/// Serve E2B's API: create sandboxes, run commands, move files.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on (control plane and sandbox traffic).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Talk plain HTTP to this registry when a template build's base (`from_image`) is
    /// pulled (HOST:PORT; repeatable; for registries on loopback in tests).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    /// Most bytes of template build uploads (the Template SDK's COPY files) one API key keeps
    /// on this server; an upload past it is refused (507).
    #[arg(long, default_value = "4G", value_parser = limits::parse_size)]
    template_upload_quota: u64,
    /// Uploads no build has used for this long are removed (checked at start and hourly).
    #[arg(long, default_value = "24h", value_parser = limits::parse_duration)]
    template_upload_ttl: std::time::Duration,
    #[command(flatten)]
    common: ringfence::Common,
    /// Default memory limit per sandbox.
    #[arg(long, default_value = "512M", value_parser = limits::parse_size)]
    memory: u64,
    /// Default CPU quota per sandbox, in cores.
    #[arg(long, default_value = "1", value_parser = limits::parse_cpus)]
    cpus: u64,
    /// Default disk (writable layer) per sandbox.
    #[arg(long, default_value = "1G", value_parser = limits::parse_size)]
    disk: u64,
    /// Where sandboxes' writable layers live: `image` (one filesystem image per sandbox, of
    /// the --disk size, on disk: ENOSPC at the quota, apart from --memory), `tmpfs` (memory:
    /// counts against --memory), or `auto` (image if a probe at start succeeds, else tmpfs
    /// with a warning).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(ringfence_jail::disk::DiskChoice))]
    disk_backend: ringfence_jail::disk::DiskChoice,
    /// Default process/thread limit per sandbox.
    #[arg(long, default_value_t = 512)]
    pids: u64,
    /// Lifetime of a sandbox whose creator gives no timeout.
    #[arg(long, default_value = "300s", value_parser = limits::parse_duration)]
    default_timeout: Duration,
    /// Longest lifetime a client may ask for.
    #[arg(long, default_value = "24h", value_parser = limits::parse_duration)]
    max_timeout: Duration,
    /// The code interpreter's Python environment (built by scripts/interp-env.sh). Without it
    /// the server runs, but the code-interpreter-v1 template is unavailable.
    #[arg(long, default_value = ringfence_jail::template::DEFAULT_INTERP_ENV)]
    interp_env: std::path::PathBuf,
    /// Keep this many sandboxes of a template started ahead of demand, e.g.
    /// `--pool base=4 --pool code-interpreter-v1=2` (repeatable); `base@gvisor=2` pools
    /// another tier's. A create that finds one only assigns it.
    #[arg(long = "pool", value_name = "TEMPLATE[@TIER]=N", value_parser = parse_pool)]
    pools: Vec<(String, usize)>,
    /// Memory the pooled sandboxes may hold in all; the pool stops filling beyond it.
    #[arg(long, default_value = "2G", value_parser = limits::parse_size)]
    pool_memory: u64,
    /// When the host's available memory falls below this, sandboxes paused with their memory
    /// are turned into filesystem-only pauses (oldest first) to free it. 0 turns it off.
    #[arg(long, default_value = "512M", value_parser = limits::parse_size)]
    pause_pressure_floor: u64,
    #[command(flatten)]
    net: NetArgs,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Who may read GET /metrics: anyone reaching the listener (every series: only where
    /// tenants cannot reach it); API-key holders (tenants get the series that name no
    /// sandbox, operator keys all of them); or operator keys only.
    #[arg(long, value_enum, default_value = "key")]
    metrics_auth: MetricsAuthArg,
    /// Sandboxes one API key may hold at once, running or paused (0: no limit).
    #[arg(long, default_value_t = QuotaConfig::default().max_sandboxes)]
    max_sandboxes_per_key: u32,
    /// Snapshots one API key may keep (0: no limit).
    #[arg(long, default_value_t = QuotaConfig::default().max_snapshots)]
    max_snapshots_per_key: u32,
    /// Sandboxes one API key may start per second, sustained (0: no limit).
    #[arg(long, default_value_t = QuotaConfig::default().create_rate, value_parser = parse_rate)]
    create_rate_per_key: f64,
    /// Sandboxes one API key may start at once before the rate applies.
    #[arg(long, default_value_t = QuotaConfig::default().create_burst)]
    create_burst_per_key: u32,
    /// Alert when a sandbox takes longer than this to start.
    #[arg(long, default_value = "500ms", value_parser = parse_duration_ms)]
    alert_startup: Duration,
    /// Alert when an execution (command or code cell) runs longer than this.
    #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
    alert_execution: Duration,
    /// Alert when a sandbox's memory goes above this percentage of its limit.
    #[arg(long, default_value_t = 90.0)]
    alert_memory_pct: f64,
    /// Alert when a sandbox's CPU use goes above this percentage of its quota.
    #[arg(long, default_value_t = 95.0)]
    alert_cpu_pct: f64,
    /// Alert when blocked actions of one kind in one sandbox reach this count.
    #[arg(long, default_value_t = 1)]
    alert_escape_attempts: u64,
    /// Refuse commands and code cells whose layer-4 risk analysis matches: a comma-separated
    /// list of rule ids (e.g. `sh.pipe-to-shell,py.native-code`) and severities (`high`:
    /// every signal at or above it). Refusals are audited as `exec.refused`. A policy check
    /// on top of the sandbox, not a boundary: code that hides from it still runs contained.
    #[arg(long, value_parser = ringfence_risk::DenyRules::parse)]
    risk_deny: Option<ringfence_risk::DenyRules>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Cluster mode: several nodes behind one API, coordinated by etcd. Without `--cluster` the
/// server runs on its own and needs no etcd.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// etcd client URLs, comma-separated (`http://10.0.0.1:2379,http://10.0.0.2:2379`).
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',')]
    cluster: Vec<String>,
    /// This node's id in the cluster (letters, digits, '-', '_'); keep it across restarts so
    /// the node adopts its surviving sandboxes.
    #[arg(long, requires = "cluster")]
    node_id: Option<String>,
    /// HOST:PORT the other nodes reach this node's API at. Default: --listen, unless that is
    /// an unspecified address (0.0.0.0), which peers cannot dial.
    #[arg(long, requires = "cluster")]
    advertise: Option<String>,
    /// The node lease's time to live: a node silent this long is dead and its sandboxes read
    /// `lost`.
    #[arg(long, default_value = "5s", value_parser = limits::parse_duration)]
    cluster_ttl: Duration,
    /// Key prefix in etcd (clusters sharing an etcd use different ones).
    #[arg(long, default_value = "/ringfence")]
    cluster_prefix: String,
    /// Sandboxes this node offers the cluster at most (placement's capacity).
    #[arg(long, default_value_t = 500)]
    cluster_slots: u64,
    /// A directory every node reads and writes (a shared mount): sandboxes paused to their
    /// files are copied there, and a node whose owner is lost resumes them through any node.
    #[arg(long, value_name = "DIR", requires = "cluster")]
    shared_snapshots: Option<std::path::PathBuf>,
}

impl ClusterArgs {
    fn config(
        &self,
        listen: SocketAddr,
    ) -> Result<Option<ringfence_cluster::ClusterConfig>, String> {
        if self.cluster.is_empty() {
            return Ok(None);
        }
        let node_id = self.node_id.clone().ok_or("--cluster needs --node-id")?;
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if listen.ip().is_unspecified() => {
                return Err(format!(
                    "--listen {listen} is not an address peers can dial: give --advertise HOST:PORT"
                ));
            }
            None => listen.to_string(),
        };
        let endpoints: Vec<String> =
            self.cluster.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
        if let Some(bad) =
            endpoints.iter().find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return Err(format!("--cluster endpoint {bad:?} must be an http:// or https:// URL"));
        }
        Ok(Some(ringfence_cluster::ClusterConfig {
            endpoints,
            node_id,
            advertise,
            ttl: self.cluster_ttl,
            prefix: self.cluster_prefix.trim_end_matches('/').to_string(),
            slots: self.cluster_slots,
            shared_snapshots: self.shared_snapshots.clone(),
        }))
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MetricsAuthArg {
    None,
    Key,
    Operator,
}

/// A rate in sandboxes per second: a finite number, 0 or more.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?}: expected a number of sandboxes per second, 0 or more")),
    }
}

/// A duration with a unit (`500ms`, `30s`, `2m`), or plain seconds.
fn parse_duration_ms(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("{s:?}: {e}"));
    }
    limits::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create an API key; prints it as the last line of stdout (it is shown only once).
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// Directory holding the server's state.
        #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = "/var/lib/ringfence")]
        data_dir: PathBuf,
        /// An operator's key: it reads every series of GET /metrics, every tenant's sandboxes
        /// included. Give it to the metrics scraper, not to a tenant.
        #[arg(long)]
        operator: bool,
        /// Sandboxes this key may hold at once, running or paused (0: no limit). Default:
        /// the server's --max-sandboxes-per-key.
        #[arg(long)]
        max_sandboxes: Option<u32>,
        /// Snapshots this key may keep (0: no limit). Default: --max-snapshots-per-key.
        #[arg(long)]
        max_snapshots: Option<u32>,
        /// Sandboxes this key may start per second (0: no limit). Default:
        /// --create-rate-per-key.
        #[arg(long, value_parser = parse_rate)]
        create_rate: Option<f64>,
        /// Sandboxes this key may start at once. Default: --create-burst-per-key.
        #[arg(long)]
        create_burst: Option<u32>,
        /// The isolation tiers this key may use, comma-separated (jail,gvisor,microvm,wasm).
        /// Default: every tier the server runs.
        #[arg(long, value_parser = parse_tiers)]
        tiers: Option<TierList>,
    },
    /// List the API keys (id, name, created, operator, tiers; never a key itself).
    List {
        /// Directory holding the server's state.
        #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = "/var/lib/ringfence")]
        data_dir: PathBuf,
    },
    /// Revoke an API key by its id (from `keys list`): from the next request on, a running
    /// server refuses it (keys are checked against the database on every request). Its
    /// sandboxes keep running until they end or are killed. Audited as `key.revoke`.
    Revoke {
        /// The key's id (`keys list`'s first column), not the key itself.
        id: String,
        /// Directory holding the server's state.
        #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = "/var/lib/ringfence")]
        data_dir: PathBuf,
    },
}

/// Sandbox networking: the ceiling no create request can widen, DNS, inbound routing.
#[derive(Debug, clap::Args)]
struct NetArgs {
    /// The sandboxes' DNS upstream (IP or IP:PORT; repeatable). Default: the nameservers of
    /// the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_parser = ringfence_net::dns::parse_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Open sandboxes' upstream connections from this network namespace (a /run/netns/NAME
    /// or /proc/PID/ns/net path) instead of the server's.
    #[arg(long)]
    egress_netns: Option<PathBuf>,
    /// Only these destinations, at most, for every sandbox (repeatable): a domain,
    /// `*.domain`, an IP or CIDR block, each optionally `:PORT`. Default: the internet (every
    /// address outside the blocked ranges).
    #[arg(long = "egress-allow")]
    egress_allow: Vec<String>,
    /// Never these destinations (repeatable; same forms as --egress-allow).
    #[arg(long = "egress-deny")]
    egress_deny: Vec<String>,
    /// Exempt this CIDR block from the built-in blocked ranges (private, loopback, link-local,
    /// metadata, CGNAT, this host's addresses; repeatable).
    #[arg(long = "egress-exempt")]
    egress_exempt: Vec<String>,
    /// Egress bytes per second of one sandbox: the default and the most a sandbox may ask
    /// for (`network.egressBytesPerSecond`), like 10M. Default: unlimited.
    #[arg(long, value_parser = limits::parse_size)]
    egress_rate: Option<u64>,
    /// Host memory one sandbox's network connections may hold in this server (buffers of its
    /// userspace TCP stack and relay, which no cgroup of the sandbox pays for), like 32M: new
    /// connections get smaller windows as it fills and are refused past it.
    #[arg(long, value_parser = limits::parse_size, default_value = "64M")]
    net_buffers_per_sandbox: u64,
    /// The `domain` create returns: the SDK's get_host(port) is `<port>-<id>.<domain>`, which
    /// this server routes by its Host header. Default: `localhost:<listen port>` (browsers and
    /// curl resolve *.localhost to the loopback address).
    #[arg(long)]
    domain: Option<String>,
    /// Sandbox ports answer without the sandbox's access token unless the creator says
    /// otherwise (`network.allowPublicTraffic`). Default: the token is required.
    #[arg(long)]
    public_ports: bool,
    /// The key secrets are sealed with at rest: a file holding 64 hex digits, mode 0600.
    /// Default: <data-dir>/secrets.key, made on first start.
    #[arg(long, env = "RINGFENCE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Also trust this PEM bundle when the egress proxy terminates TLS (hosts with request
    /// rules) and verifies the real server, besides the system's CAs: a private CA, or a
    /// test's stand-in for the internet.
    #[arg(long, env = "RINGFENCE_EGRESS_EXTRA_CA")]
    egress_extra_ca: Option<PathBuf>,
    /// What template builds' RUN steps may reach (repeatable): `none`, `internet` (outside
    /// the blocked ranges), or destinations in --egress-allow's forms (`default` adds the
    /// default list). Default: the package archives (Debian, Ubuntu, Alpine, PyPI, npm).
    /// Builds never reach loopback, private, link-local (metadata) ranges or this host,
    /// whatever --egress-exempt says; every connection is an audit record.
    #[arg(long = "build-egress")]
    build_egress: Vec<String>,
}

impl NetArgs {
    fn config(
        &self,
        listen: SocketAddr,
    ) -> Result<ringfence_server::network::NetworkConfig, String> {
        let ceiling = ringfence_server::network::ceiling(
            &self.egress_allow,
            &self.egress_deny,
            &self.egress_exempt,
        )?;
        let dns = if self.dns_upstream.is_empty() {
            ringfence_net::dns::system_upstreams(std::path::Path::new("/etc/resolv.conf"))
        } else {
            self.dns_upstream.clone()
        };
        Ok(ringfence_server::network::NetworkConfig {
            egress: ringfence_net::NetConfig {
                ceiling,
                dns_upstreams: dns,
                egress_netns: self.egress_netns.clone(),
                egress_rate: self.egress_rate,
                upstream_extra_ca: self.egress_extra_ca.clone(),
                buffer_budget: Some(
                    usize::try_from(self.net_buffers_per_sandbox)
                        .map_err(|_| "--net-buffers-per-sandbox is too large".to_string())?,
                ),
            },
            domain: Some(
                self.domain.clone().unwrap_or_else(|| format!("localhost:{}", listen.port())),
            ),
            public_default: self.public_ports,
            secrets_key: self.secrets_key_file.clone(),
            build_egress: ringfence_server::network::BuildEgress::parse(&self.build_egress)?,
        })
    }
}

impl ServeArgs {
    pub fn json_logs(&self) -> bool {
        matches!(self.log_format, LogFormat::Json)
    }
}

pub fn main(args: ServeArgs) -> ExitCode {
    let network = match args.net.config(args.listen) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ringfence: {e}");
            return ExitCode::from(2);
        }
    };
    let cluster = match args.cluster.config(args.listen) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringfence: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = ringfence_server::ServeConfig {
        cluster,
        listen: args.listen,
        manager: ManagerConfig {
            data_dir: args.common.data_dir.clone(),
            run_dir: args.common.run_dir.clone(),
            agent_path: ringfence::run::agent_path(),
            limits: Limits {
                memory: Some(args.memory),
                pids: Some(args.pids),
                cpu_millis: Some(args.cpus),
                disk: args.disk,
                nofile: 4096,
            },
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            interp_env: args.interp_env,
            pool_sizes: args.pools.iter().cloned().collect(),
            pool_memory: args.pool_memory,
            pressure_floor: args.pause_pressure_floor,
            disk: args.disk_backend,
            keeper_exe: std::env::current_exe().ok(),
            network,
            builds: ringfence_server::templates::BuildConfig {
                insecure_registries: args.insecure_registry.clone(),
                upload_quota: args.template_upload_quota,
                upload_ttl: args.template_upload_ttl,
            },
            quotas: QuotaConfig {
                max_sandboxes: args.max_sandboxes_per_key,
                max_snapshots: args.max_snapshots_per_key,
                create_rate: args.create_rate_per_key,
                create_burst: args.create_burst_per_key,
            },
        },
        observe: ObserveConfig {
            metrics_auth: match args.metrics_auth {
                MetricsAuthArg::None => MetricsAuth::None,
                MetricsAuthArg::Key => MetricsAuth::Key,
                MetricsAuthArg::Operator => MetricsAuth::Operator,
            },
            thresholds: Thresholds {
                startup: args.alert_startup,
                execution: args.alert_execution,
                memory_pct: args.alert_memory_pct,
                cpu_pct: args.alert_cpu_pct,
                escape_attempts: args.alert_escape_attempts,
            },
            risk_deny: args.risk_deny.unwrap_or_default(),
            ..ObserveConfig::default()
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringfence: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(ringfence_server::serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence: serve failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--tiers jail,gvisor`: one value holding a list (clap would take a bare `Vec` for a
/// repeatable flag).
#[derive(Debug, Clone)]
pub struct TierList(Vec<String>);

/// Known tier names only (an unknown one is a typo, not a wish).
fn parse_tiers(s: &str) -> Result<TierList, String> {
    ringfence_server::tier::parse_list(s).map(TierList).map_err(|e| e.to_string())
}

pub fn keys(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::Create {
            name,
            data_dir,
            operator,
            max_sandboxes,
            max_snapshots,
            create_rate,
            create_burst,
            tiers,
        } => {
            let limits = KeyLimits { max_sandboxes, max_snapshots, create_rate, create_burst };
            let result = Store::open(&ringfence_server::db_path(&data_dir)).and_then(|s| {
                s.create_key_for(&name, operator, &limits, tiers.as_ref().map(|t| t.0.as_slice()))
            });
            match result {
                Ok((_, key)) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringfence: cannot create key: {e}");
                    ExitCode::from(1)
                }
            }
        }
        KeysCommand::List { data_dir } => {
            match Store::open(&ringfence_server::db_path(&data_dir)).and_then(|s| s.list_keys()) {
                Ok(keys) => {
                    println!(
                        "{:<24} {:<24} {:<20} {:<8} TIERS",
                        "ID", "NAME", "CREATED", "OPERATOR"
                    );
                    for k in keys {
                        let created = ringfence_server::time::rfc3339_ms(k.created_at * 1000);
                        let tiers = k.tiers.map_or_else(|| "all".to_string(), |t| t.join(","));
                        println!(
                            "{:<24} {:<24} {:<20} {:<8} {tiers}",
                            k.id,
                            k.name,
                            created.get(..19).unwrap_or(&created),
                            if k.operator { "yes" } else { "no" },
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringfence: cannot list keys: {e}");
                    ExitCode::from(1)
                }
            }
        }
        KeysCommand::Revoke { id, data_dir } => {
            let result = Store::open(&ringfence_server::db_path(&data_dir)).and_then(|s| {
                let name = s.get_key(&id)?.map(|k| k.name);
                s.revoke_key(&id)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let mut rec = ringfence_server::store::AuditRecord::new("key.revoke", now);
                rec.user_id = Some(id.clone());
                rec.detail.insert("name".into(), serde_json::json!(name));
                rec.detail.insert("by".into(), serde_json::json!("cli"));
                s.insert_audit(&mut rec)?;
                Ok(name)
            });
            match result {
                Ok(name) => {
                    println!("revoked {id} ({})", name.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringfence: cannot revoke key {id}: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Print the audit trail as JSON lines, oldest first.
///
/// Reads the database directly, so it works with the server stopped; an operator sees every
/// tenant's records (GET /audit shows a tenant only its own).
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Directory holding the server's state.
    #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = "/var/lib/ringfence")]
    data_dir: PathBuf,
    /// Only records of this sandbox.
    #[arg(long)]
    sandbox: Option<String>,
    /// Only records of this API key id (`user_id`).
    #[arg(long)]
    key: Option<String>,
    /// Only this action (`exec.command`), or a prefix ending in `*` (`alert.*`).
    #[arg(long)]
    action: Option<String>,
    /// From this time on (RFC 3339 or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Before this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    until: Option<String>,
    /// At most this many records (0: all).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    /// Only records after this cursor (a record's `id`).
    #[arg(long)]
    cursor: Option<String>,
}

pub fn audit(args: AuditArgs) -> ExitCode {
    let bound = |name: &str, v: &Option<String>| -> Result<Option<i64>, String> {
        match v {
            None => Ok(None),
            Some(v) => ringfence_server::api::parse_time_bound(v)
                .map(Some)
                .ok_or_else(|| format!("--{name} {v:?} is neither RFC 3339 nor Unix seconds")),
        }
    };
    let (since, until) = match (bound("since", &args.since), bound("until", &args.until)) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ringfence: {e}");
            return ExitCode::from(2);
        }
    };
    let path = ringfence_server::db_path(&args.data_dir);
    if !path.exists() {
        eprintln!("ringfence: no state database at {}", path.display());
        return ExitCode::from(1);
    }
    let store = match Store::open(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringfence: cannot open {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let mut q = AuditQuery {
        key_id: args.key,
        sandbox_id: args.sandbox,
        action: args.action,
        since_ms: since,
        until_ms: until,
        after: args.cursor,
        limit: 1000,
    };
    let mut left = if args.limit == 0 { u64::MAX } else { args.limit };
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    loop {
        q.limit = left.min(1000) as u32;
        let (page, next) = match store.query_audit(&q) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("ringfence: reading the audit trail: {e}");
                return ExitCode::from(1);
            }
        };
        for r in &page {
            let line = serde_json::to_string(r).unwrap_or_default();
            if writeln!(out, "{line}").is_err() {
                // A closed pipe (`| head`) is the reader's choice, not an error.
                return ExitCode::SUCCESS;
            }
        }
        left -= page.len() as u64;
        match next {
            Some(c) if left > 0 => q.after = Some(c),
            _ => return ExitCode::SUCCESS,
        }
    }
}

/// `TEMPLATE=N` for `--pool`.
fn parse_pool(s: &str) -> Result<(String, usize), String> {
    let (t, n) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected TEMPLATE=N"))?;
    let n: usize = n.parse().map_err(|_| format!("{s:?}: N must be a whole number"))?;
    // `NAME@TIER` pools another tier's sandboxes; the default tier's pool is the plain name
    // (the one a create without a tier draws from).
    let (t, tier) = match t.rsplit_once('@') {
        Some((name, tier)) => {
            let kind = ringfence_server::tier::TierKind::parse(tier).map_err(|e| e.to_string())?;
            (name, Some(kind).filter(|k| *k != ringfence_server::tier::TierKind::Jail))
        }
        None => (t, None),
    };
    if !ringfence_server::manager::TEMPLATES.contains(&t) {
        return Err(format!(
            "{t:?} is not a built-in template ({})",
            ringfence_server::manager::TEMPLATES.join(", ")
        ));
    }
    if n > 256 {
        return Err(format!("{s:?}: at most 256 pooled sandboxes per template"));
    }
    Ok((tier.map_or_else(|| t.to_string(), |k| format!("{t}@{k}")), n))
}
