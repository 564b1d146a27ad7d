//! `ringfence serve` and `ringfence keys`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ringfence_jail::limits::{self, Limits};
use ringfence_server::manager::ManagerConfig;
use ringfence_server::store::Store;

const AFTER_HELP: &str = "\
Clients: point the unmodified E2B SDKs at this server with
  E2B_API_URL=http://ADDR E2B_SANDBOX_URL=http://ADDR E2B_API_KEY=$(ringfence keys create --name me)
  NO_PROXY=127.0.0.1,localhost
One address serves the control plane and all sandbox traffic (routed by the E2b-Sandbox-Id header).

Logging: RINGFENCE_LOG=info|debug|... (tracing env-filter syntax); --log-format json for JSON lines.";

/// Serve E2B's API: create sandboxes, run commands, move files.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct ServeArgs {
    /// Address to listen on (control plane and sandbox traffic).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    #[command(flatten)]
    common: crate::Common,
    /// Default memory limit per sandbox.
    #[arg(long, default_value = "512M", value_parser = limits::parse_size)]
    memory: u64,
    /// Default CPU quota per sandbox, in cores.
    #[arg(long, default_value = "1", value_parser = limits::parse_cpus)]
    cpus: u64,
    /// Default disk (writable layer) per sandbox.
    #[arg(long, default_value = "1G", value_parser = limits::parse_size)]
    disk: u64,
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
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
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
    },
}

impl ServeArgs {
    pub fn json_logs(&self) -> bool {
        matches!(self.log_format, LogFormat::Json)
    }
}

pub fn main(args: ServeArgs) -> ExitCode {
    let cfg = ringfence_server::ServeConfig {
        listen: args.listen,
        manager: ManagerConfig {
            data_dir: args.common.data_dir.clone(),
            run_dir: args.common.run_dir.clone(),
            agent_path: crate::run::agent_path(),
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

pub fn keys(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::Create { name, data_dir } => {
            let result = Store::open(&ringfence_server::db_path(&data_dir))
                .and_then(|s| s.create_key(&name));
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
    }
}
