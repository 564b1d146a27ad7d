//! `ringfence mcp`: an MCP server on stdio for a local agent (Claude Desktop, an IDE), bridged
//! to a running `ringfence serve` (see `ringfence_server::mcp::stdio` for why a bridge).

use std::process::ExitCode;

/// Serve MCP on stdin/stdout, carrying every call to a `ringfence serve` with an API key.
#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// The server: http://HOST:PORT.
    #[arg(long, env = "RINGFENCE_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// The API key (`ringfence keys create`); its sandboxes are the only ones the agent sees.
    #[arg(long, env = "RINGFENCE_API_KEY", hide_env_values = true)]
    api_key: String,
}

pub fn main(args: McpArgs) -> ExitCode {
    let target = match ringfence_server::mcp::stdio::Target::parse(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ringfence mcp: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringfence mcp: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ringfence_server::mcp::stdio::run(target, args.api_key)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence mcp: {e}");
            ExitCode::FAILURE
        }
    }
}
