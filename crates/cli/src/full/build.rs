//! `ringfence template build`: a Dockerfile to an image template. The steps, their cache and
//! the layers are `ringfence_image::build`'s, RUN steps run in the jail sandboxes of the one
//! builder the server shares ([`ringfence_server::builder::JailRunner`]); this file reads the
//! command line and shows the progress ([`Display`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ringfence_image::Store;
use ringfence_image::build::{BuildOptions, BuildProgress, StepResult};
use ringfence_jail::JailConfig;
use ringfence_jail::cgroup::{Layout, Pool};
use ringfence_jail::disk::DiskChoice;
use ringfence_jail::limits::{self, Limits};
use ringfence_server::builder::JailRunner;

use crate::template::Caps;
use ringfence::Common;

/// Build an image template from a Dockerfile.
///
/// RUN steps run in jail sandboxes as the sandbox's root (or `user`, uid 1000, after USER),
/// with the build egress (`--build-egress`; default: the package archives). Each step that changes files is a layer cached by
/// a content hash: an unchanged Dockerfile rebuilds from the cache.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The Dockerfile (default: DIR/Dockerfile of --context).
    #[arg(long = "file", short = 'f')]
    file: Option<PathBuf>,
    /// The build context: the directory COPY and ADD read from (default: the Dockerfile's
    /// directory).
    #[arg(long)]
    context: Option<PathBuf>,
    /// Template name (NAME or NAME:TAG; the tag defaults to `latest`).
    #[arg(long, short = 't')]
    name: String,
    /// A value for an ARG (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE", value_parser = parse_arg)]
    build_args: Vec<(String, String)>,
    /// Run every step, ignoring cached layers.
    #[arg(long)]
    no_cache: bool,
    /// Wall-clock limit of one RUN step.
    #[arg(long, default_value = "10m", value_parser = limits::parse_duration)]
    step_timeout: Duration,
    /// Writable disk of a RUN step's sandbox (what one step may add).
    #[arg(long, default_value = "8G", value_parser = limits::parse_size)]
    disk: u64,
    /// Where RUN's writable layer lives: `image`, `tmpfs` or `auto` (see `ringfence run`).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DiskChoice))]
    disk_backend: DiskChoice,
    /// Memory limit of a RUN step's sandbox.
    #[arg(long, default_value = "2G", value_parser = limits::parse_size)]
    memory: u64,
    /// CPU quota of a RUN step's sandbox, in cores.
    #[arg(long, default_value = "2", value_parser = limits::parse_cpus)]
    cpus: u64,
    /// What RUN steps may reach (repeatable), as `ringfence serve --build-egress`: `none`,
    /// `internet`, or destinations (`default` adds the default list). Default: the package
    /// archives (Debian, Ubuntu, Alpine, PyPI, npm). Never loopback, private or link-local
    /// (metadata) ranges, nor this host; every connection is an audit record
    /// (`ringfence audit`).
    #[arg(long = "build-egress")]
    build_egress: Vec<String>,
    /// The build network's DNS upstream (IP or IP:PORT; repeatable). Default: the nameservers
    /// of the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_parser = ringfence_net::dns::parse_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Talk plain HTTP to this registry when FROM pulls (HOST:PORT; repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure: Vec<String>,
    #[command(flatten)]
    caps: Caps,
    #[command(flatten)]
    common: Common,
}

fn parse_arg(s: &str) -> Result<(String, String), String> {
    let (k, v) =
        s.split_once('=').ok_or_else(|| format!("--build-arg {s:?}: expected KEY=VALUE"))?;
    if k.is_empty() || s.contains('\0') {
        return Err(format!("--build-arg {s:?}: empty name or NUL byte"));
    }
    Ok((k.to_string(), v.to_string()))
}

pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (file, context) = match (&args.file, &args.context) {
        (Some(f), Some(c)) => (f.clone(), c.clone()),
        (Some(f), None) => {
            let dir = f.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (f.clone(), dir.to_path_buf())
        }
        (None, Some(c)) => (c.join("Dockerfile"), c.clone()),
        (None, None) => (PathBuf::from("Dockerfile"), PathBuf::from(".")),
    };
    let mut dockerfile = Vec::new();
    File::open(&file)
        .and_then(|f| {
            f.take(ringfence_image::dockerfile::MAX_BYTES as u64 + 1).read_to_end(&mut dockerfile)
        })
        .with_context(|| format!("read the Dockerfile {}", file.display()))?;
    if !context.is_dir() {
        anyhow::bail!("the build context {} is not a directory", context.display());
    }
    let store = Store::open(&args.common.data_dir)?;
    let egress = ringfence_server::network::BuildEgress::parse(&args.build_egress)
        .map_err(|e| anyhow::anyhow!(e))?;
    // Declared before the runner, so the runner (and its hook) is dropped first.
    let net = ringfence_server::builder::CliNetwork::new(
        &egress,
        Default::default(),
        args.dns_upstream.clone(),
        &ringfence_server::db_path(&args.common.data_dir),
    )
    .map_err(|e| anyhow::anyhow!("the build network: {e}"))?;
    let mut runner = jail_runner(&args)?;
    if let Some(hook) = net.as_ref().and_then(|n| n.hook(&args.name)) {
        runner = runner.with_network(hook);
    }
    let opts = BuildOptions {
        name: args.name.clone(),
        dockerfile,
        dockerfile_path: file,
        context,
        build_args: args.build_args.iter().cloned().collect(),
        no_cache: args.no_cache,
        no_cache_from_line: None,
        pull: ringfence_image::registry::PullOptions { insecure: args.insecure.clone() },
        limits: args.caps.limits(),
        source: None,
        start: None,
        owner: None,
    };
    let mut display = Display::new();
    match ringfence_image::build::build(&store, &opts, &mut runner, &mut display) {
        Ok(b) => {
            display.finish();
            println!(
                "built {} ({} layers, {}): {} cached, {} built, in {:.2}s",
                b.record.name,
                b.record.layers.len(),
                crate::template::human(b.record.size),
                b.cached,
                b.built,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            display.failed();
            Err(e.into())
        }
    }
}

/// The shared builder's runner, with this command's limits.
fn jail_runner(args: &BuildArgs) -> anyhow::Result<JailRunner> {
    let agent = ringfence::run::agent_path();
    ringfence_jail::preflight::check(&agent, false)?;
    let mut cfg = JailConfig::with_agent(agent);
    cfg.data_dir = args.common.data_dir.clone();
    cfg.run_dir = args.common.run_dir.clone();
    let (disk, why_tmpfs) = args.disk_backend.resolve(&cfg.data_dir, false)?;
    if let (Some(why), DiskChoice::Auto) = (&why_tmpfs, args.disk_backend) {
        tracing::warn!("{}: {why}", ringfence_jail::disk::TMPFS_WARNING);
    }
    cfg.disk = disk;
    let layout = Layout::detect()?;
    let pool = Pool::new(
        layout,
        &cfg.cgroup_name,
        ringfence::run::POOL_PREFIX,
        cfg.run_dir.join("cgroups"),
    )
    .with_spawners(cfg.agent_path.clone());
    let seccomp = ringfence_jail::seccomp::default_profile(true)?;
    let limits = Limits {
        memory: Some(args.memory),
        pids: Some(4096),
        cpu_millis: Some(args.cpus),
        disk: args.disk,
        nofile: 4096,
    };
    Ok(JailRunner::new(cfg, Some(pool), seccomp, limits, args.step_timeout))
}

/// Progress on stderr. On a terminal: the running step's line with its elapsed time and the
/// last lines of its output, redrawn in place; finished steps stay as one line each. Otherwise
/// plain lines: each step, each output line (`  | ...`), each result.
pub(crate) struct Display {
    tty: bool,
    current: Option<(usize, usize, String, Instant)>,
    tail: VecDeque<String>,
    partial: Vec<u8>,
    drawn: usize,
    last_draw: Option<Instant>,
}

const TAIL_LIVE: usize = 6;
const TAIL_KEPT: usize = 30;

impl Display {
    pub(crate) fn new() -> Display {
        Display {
            tty: std::io::stderr().is_terminal(),
            current: None,
            tail: VecDeque::new(),
            partial: Vec::new(),
            drawn: 0,
            last_draw: None,
        }
    }

    fn erase(&mut self) {
        if self.tty && self.drawn > 0 {
            eprint!("\x1b[{}A\r\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn draw(&mut self) {
        let Some((n, total, text, t)) = &self.current else { return };
        let width = terminal_width();
        let mut lines =
            vec![fit(&format!("[{n}/{total}] {text}  {:.1}s", t.elapsed().as_secs_f64()), width)];
        let skip = self.tail.len().saturating_sub(TAIL_LIVE);
        for l in self.tail.iter().skip(skip) {
            lines.push(format!("\x1b[2m  | {}\x1b[0m", fit(l, width.saturating_sub(4))));
        }
        self.erase();
        let mut err = std::io::stderr().lock();
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        let _ = err.flush();
        self.drawn = lines.len();
        self.last_draw = Some(Instant::now());
    }

    fn push_line(&mut self, line: String) {
        if !self.tty {
            eprintln!("  | {line}");
        }
        self.tail.push_back(line);
        while self.tail.len() > TAIL_KEPT {
            self.tail.pop_front();
        }
    }

    pub(crate) fn finish(&mut self) {
        self.erase();
    }

    /// After a failed build: the failing step's last output lines stay on the screen.
    pub(crate) fn failed(&mut self) {
        if !self.partial.is_empty() {
            let l = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.push_line(l);
        }
        if self.tty {
            self.erase();
            if let Some((n, total, text, t)) = &self.current {
                eprintln!("[{n}/{total}] {text}  FAILED after {:.1}s", t.elapsed().as_secs_f64());
            }
            for l in &self.tail {
                eprintln!("  | {l}");
            }
        } else if let Some((n, total, _, t)) = &self.current {
            eprintln!("[{n}/{total}] FAILED after {:.1}s", t.elapsed().as_secs_f64());
        }
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100).max(20)
}

fn fit(s: &str, width: usize) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.chars().count() > width {
        format!("{}…", clean.chars().take(width.saturating_sub(1)).collect::<String>())
    } else {
        clean
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl BuildProgress for Display {
    fn step(&mut self, n: usize, total: usize, text: &str) {
        let text = one_line(text);
        self.tail.clear();
        self.partial.clear();
        if !self.tty {
            eprintln!("[{n}/{total}] {text}");
        }
        self.current = Some((n, total, text, Instant::now()));
        if self.tty {
            self.draw();
        }
    }

    fn output(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if !text.trim().is_empty() {
                self.push_line(text);
            }
        }
        if self.partial.len() > 4096 {
            let l = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.push_line(l);
        }
        if self.tty && self.last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            self.draw();
        }
    }

    fn step_done(&mut self, n: usize, total: usize, how: StepResult, took: Duration) {
        if !self.partial.is_empty() {
            let l = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            self.push_line(l);
        }
        let text = self.current.as_ref().map(|c| c.2.clone()).unwrap_or_default();
        let result = match how {
            StepResult::Cached => "CACHED".to_string(),
            StepResult::Built => format!("DONE {:.2}s", took.as_secs_f64()),
            StepResult::Config => String::new(),
        };
        if self.tty {
            self.erase();
            let line = fit(&format!("[{n}/{total}] {text}"), terminal_width().saturating_sub(16));
            eprintln!("{line}  {result}");
        } else if how != StepResult::Config {
            eprintln!("[{n}/{total}] {result}");
        }
        self.current = None;
    }

    fn note(&mut self, note: &str) {
        self.erase();
        eprintln!("note: {note}");
    }
}
