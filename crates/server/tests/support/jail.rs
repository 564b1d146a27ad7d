//! A serve-mode sandbox started in process, its agent client, and hand-built requests for
//! `envd::handle` with their streamed answers read frame by frame.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use futures_util::StreamExt;
use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::launch::{Sandbox, SandboxSpec, Seccomp};
use ringfence_jail::limits::Limits;
use ringfence_jail::monitor::Supervisor;
use ringfence_jail::{JailConfig, preflight, seccomp, template};
use ringfence_server::agent_client::AgentClient;
use serde_json::Value;

pub use ringfence_test_support::agent_binary;

/// Root and the agent (preflighted), as a config on the host's data and run directories; or a
/// SKIPPED line.
pub fn config_or_skip(test: &str) -> Option<JailConfig> {
    if !super::root_or_skip(test) {
        return None;
    }
    let Some(agent) = agent_binary() else {
        eprintln!("SKIPPED {test}: no agent binary (set RINGFENCE_AGENT)");
        return None;
    };
    preflight::check(&agent, true).expect("preflight");
    let mut cfg = JailConfig::with_agent(agent);
    cfg.data_dir = PathBuf::from("/var/lib/ringfence");
    cfg.run_dir = PathBuf::from("/run/ringfence");
    Some(cfg)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A sandbox of the host template in a cgroup slot of `pool_prefix` (apart from the CLI's and
/// other tests'), dying with this process, under the default seccomp profile (its supervisor
/// too, where it has one).
pub fn launch(
    cfg: &JailConfig,
    pool_prefix: &str,
    limits: Limits,
) -> (Sandbox, Option<Supervisor>) {
    let tmpl = template::resolve("host", &cfg.data_dir).expect("host template");
    let layout = Layout::detect().expect("cgroup layout");
    let pool = Pool::new(layout, &cfg.cgroup_name, pool_prefix, cfg.run_dir.join("cgroups"));
    let null_in = File::open("/dev/null").unwrap();
    let null_out = OpenOptions::new().write(true).open("/dev/null").unwrap();
    let id = ringfence_jail::new_sandbox_id();
    let spec = SandboxSpec {
        die_with_parent: true,
        limits,
        ..SandboxSpec::new(
            id.clone(),
            tmpl,
            Seccomp::Compiled(seccomp::default_profile(true).expect("seccomp profile")),
            [null_in.as_raw_fd(), null_out.as_raw_fd(), null_out.as_raw_fd()],
        )
    };
    let mut sandbox = Sandbox::start(cfg, Some(&pool), spec).expect("start sandbox");
    let supervisor =
        sandbox.take_listener().map(|l| Supervisor::start(l, id).expect("seccomp supervisor"));
    (sandbox, supervisor)
}

/// The agent client on `sandbox`'s control channel.
pub fn client(rt: &tokio::runtime::Runtime, sandbox: &Sandbox) -> Arc<AgentClient> {
    let control = sandbox.control_clone().expect("control channel");
    rt.block_on(async { AgentClient::new(control) }).expect("agent client")
}

/// `msg` as one Connect envelope with `flags`.
pub fn envelope(flags: u8, msg: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(msg).unwrap();
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn request(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Request {
    let mut b = axum::http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body.into()).unwrap()
}

/// Reads a streaming body frame by frame, keeping nothing but the partial frame.
pub struct FrameStream {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    /// Longest wait for the next chunk before the test fails instead of hanging.
    wait: Duration,
    /// Whether a body that ends inside a frame fails the test (else it just ends).
    whole: bool,
}

impl FrameStream {
    /// A stream whose body must end on a frame boundary.
    pub fn new(resp: Response, wait: Duration) -> Self {
        FrameStream {
            body: resp.into_body().into_data_stream(),
            buf: Vec::new(),
            wait,
            whole: true,
        }
    }

    /// A stream whose last partial frame, if any, is dropped.
    pub fn cut_ok(resp: Response, wait: Duration) -> Self {
        FrameStream { whole: false, ..FrameStream::new(resp, wait) }
    }

    pub async fn next(&mut self) -> Option<(u8, Value)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    let json = serde_json::from_slice(&self.buf[5..5 + len]).unwrap();
                    self.buf.drain(..5 + len);
                    return Some((flags, json));
                }
            }
            let chunk =
                tokio::time::timeout(self.wait, self.body.next()).await.expect("stream stalled");
            match chunk {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => {
                    if self.whole {
                        assert!(self.buf.is_empty(), "stream ended inside a frame");
                    }
                    return None;
                }
            }
        }
    }

    /// Everything until the end-of-stream frame, which is returned last.
    pub async fn rest(&mut self) -> Vec<(u8, Value)> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await {
            let end = f.0 & 2 != 0;
            out.push(f);
            if end {
                break;
            }
        }
        assert!(self.next().await.is_none(), "frames after the end of stream");
        out
    }
}
