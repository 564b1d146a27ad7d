//! The gvisor tier: the same agent as the container's init under gVisor's `runsc` (systrap),
//! so every system call of the sandbox is served by gVisor's user-space kernel, not the host's
//! (`ringfence_gvisor`). What this module adds is the seam's side: the tier's capabilities,
//! the runsc probe (once, on the first start: it boots a throwaway sandbox, which a server that
//! never runs a gvisor sandbox should not pay for), and the mapping of its figures.
//!
//! Network: runsc here cannot join a namespace we make (`--network=none`); the agent makes a TUN
//! inside gVisor and relays its packets to our stack ([`NetAttach::Relay`]), which also dials
//! inbound requests in through it, to the sandbox's address (gVisor's stack drops loopback
//! destinations arriving on a device, so a service bound to `127.0.0.1` only is not reached).
//!
//! Re-attach after a server restart (`kill -9` included): the agent listens on host sockets
//! runsc makes through its gofer (`--host-uds=create`) for a new control channel and a new
//! packet relay, and the next server finds the container by runsc's state
//! (`ringfence_gvisor::Container::adopt`).
//!
//! What it does not do, and says so in its capabilities: seccomp denial reports (gVisor has no
//! user notification), kernel injection for the code interpreter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ringfence_gvisor::{Container, GvisorConfig, Probe};
use ringfence_image::{Artifact, TemplateForm};
use ringfence_jail::template::{self, Template};

use super::{
    Adopted, Capabilities, Instance, NetAttach, Saved, StartSpec, Tier, TierError, TierKind, Usage,
};

/// Host settings the gvisor tier is built from.
#[derive(Debug, Clone)]
pub struct GvisorSettings {
    pub agent_path: PathBuf,
    pub data_dir: PathBuf,
    /// runsc's state and each sandbox's bundle go under `<run_dir>/gvisor`.
    pub run_dir: PathBuf,
    /// Bound into code-interpreter templates (as in the jail).
    pub interp_env: PathBuf,
}

/// The gvisor tier of one server.
#[derive(Debug)]
pub struct GvisorTier {
    settings: GvisorSettings,
    /// The probe's outcome, taken on the first start.
    cfg: OnceLock<Result<GvisorConfig, String>>,
    templates: Mutex<HashMap<String, Template>>,
}

impl GvisorTier {
    /// The tier, if a runsc binary is installed (a file check; the probe that runs it comes
    /// with the first start). `None`: the registry reports why it is unavailable.
    pub fn new(settings: GvisorSettings) -> Option<GvisorTier> {
        ringfence_gvisor::probe::find_runsc()?;
        Some(GvisorTier { settings, cfg: OnceLock::new(), templates: Mutex::new(HashMap::new()) })
    }

    fn config(&self) -> Result<&GvisorConfig, TierError> {
        let probed = self.cfg.get_or_init(|| {
            let scratch = self.settings.run_dir.join("gvisor-probe");
            match ringfence_gvisor::probe(&scratch) {
                Probe::Available(runsc) => {
                    tracing::info!(platform = runsc.platform.as_str(), version = %runsc.version, "gvisor tier ready");
                    let mut cfg = GvisorConfig::new(runsc, self.settings.agent_path.clone());
                    cfg.state_dir = self.settings.run_dir.join("gvisor");
                    Ok(cfg)
                }
                Probe::Unavailable { reason } => Err(reason),
            }
        });
        probed.as_ref().map_err(|reason| TierError::Unavailable {
            tier: TierKind::Gvisor,
            reason: reason.clone(),
        })
    }

    /// The built template behind a built-in name: `base`/`host`, or the code interpreter's
    /// (the host skeleton plus the interpreter environment bound read-only, as in the jail).
    fn template(&self, name: &str) -> Result<Template, TierError> {
        let key = match name {
            "base" | "host" => "host",
            template::INTERP_TEMPLATE => template::INTERP_TEMPLATE,
            _ => {
                return Err(TierError::TemplateUnavailable(format!("{name} (on the gvisor tier)")));
            }
        };
        let mut cached =
            self.templates.lock().map_err(|_| TierError::Setup("template lock poisoned".into()))?;
        if let Some(t) = cached.get(key) {
            return Ok(t.clone());
        }
        let t = if key == "host" {
            template::ensure_host(&self.settings.data_dir)
        } else {
            template::ensure_layered(
                &self.settings.data_dir,
                key,
                &[self.settings.interp_env.to_string_lossy().into_owned()],
            )
        }
        .map_err(|e| {
            // The detail names host paths: the operator reads it in the log, the client
            // learns only what is missing.
            tracing::warn!(template = key, error = %e, "template unavailable");
            TierError::TemplateUnavailable(name.to_string())
        })?;
        cached.insert(key.to_string(), t.clone());
        Ok(t)
    }
}

fn gvisor_err(e: ringfence_gvisor::GvisorError) -> TierError {
    TierError::Setup(format!("gvisor: {e}"))
}

impl Tier for GvisorTier {
    type Instance = GvisorInstance;

    fn kind(&self) -> TierKind {
        TierKind::Gvisor
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            isolation: TierKind::Gvisor.isolation(),
            syscall_filter: "gVisor's sentry serves every system call; runsc's own seccomp \
                             filter confines the sentry on the host (denials are not reported)",
            kernel: "gvisor",
            pause_in_memory: true,
            memory_snapshot: false,
            fs_snapshot: true,
            fork: true,
            reattach: true,
            kernel_injection: false,
            network: "relayed-tun",
            network_policy: true,
            agent_channel: "unix-socket",
            accel: None,
        }
    }

    fn start(&self, spec: StartSpec) -> Result<GvisorInstance, TierError> {
        super::refuse_guest_snapshots(TierKind::Gvisor, &spec.layers)?;
        if !spec.volumes.is_empty() {
            return Err(TierError::Unsupported { tier: TierKind::Gvisor, what: "volume mounts" });
        }
        let cfg = self.config()?;
        let mut spec = spec;
        // An image template (imported, pulled, built or bootstrapped) is asked for as a tree:
        // the store's skeleton is the root of the overlay ringfence_gvisor mounts for the
        // bundle, the image's layers above it and under any snapshot's; its Env under the
        // create's. The claim is held for the sandbox's life.
        let mut image_in_use = None;
        let template = if ringfence_image::store::RESERVED.contains(&spec.template.as_str()) {
            self.template(&spec.template)?
        } else {
            let exported =
                super::export_image(&self.settings.data_dir, &spec.template, TemplateForm::Tree)?;
            for (k, v) in exported.env() {
                spec.env.entry(k).or_insert(v);
            }
            let Artifact::Tree { skeleton, layers } = exported.artifact else {
                return Err(TierError::Setup("the image store answered another form".into()));
            };
            spec.layers.extend(layers);
            image_in_use = Some(exported.in_use);
            Template {
                name: exported.record.name.clone(),
                rootfs: skeleton,
                meta: template::Meta { format: 0, host_layers: Vec::new() },
            }
        };
        // Canonical ids: the container's ids are the files' own (see ringfence_gvisor's docs).
        let mut g = ringfence_gvisor::StartSpec::new(spec.id, template, 0);
        // The device the agent makes inside gVisor, as the jail's TUN is made (same name,
        // address and MTU, so the stack and the resolver config serve both alike).
        g.network = ringfence_gvisor::Network::Relay(ringfence_gvisor::RelaySpec {
            iface: ringfence_net::tun::IFACE.to_string(),
            address: ringfence_net::tun::SANDBOX_IP,
            mtu: ringfence_net::tun::MTU,
        });
        g.layers = spec.layers;
        g.limits = spec.limits;
        g.env = spec.env;
        let memory_limit = spec.limits.memory;
        let container = Container::start(cfg, g).map_err(gvisor_err)?;
        if crate::phases::enabled() {
            // Two lines, not one as for `jail_start`: the agent's steps are stamped with the
            // sandbox's monotonic clock, which gVisor starts near zero, not the host's.
            for (what, phases) in [
                ("gvisor_start", container.phases()),
                ("gvisor_agent", container.ready.phases.as_slice()),
            ] {
                let steps: Vec<(&str, u64)> =
                    phases.iter().map(|p| (p.name.as_str(), p.at_ns)).collect();
                crate::phases::steps(what, &steps);
            }
        }
        let relay = container.relay().transpose().map_err(gvisor_err)?.map(std::sync::Arc::new);
        Ok(GvisorInstance { container, memory_limit, relay, _image: image_in_use })
    }

    fn adopt(
        &self,
        id: &str,
        _saved: &Saved,
        paused: bool,
    ) -> Result<Adopted<GvisorInstance>, TierError> {
        // runsc's state and the sandbox's directory are all it takes (`Container::adopt`):
        // nothing of the dead server's is needed, so the store keeps nothing for it.
        let cfg = self.config()?;
        let container = Container::adopt(cfg, id).map_err(gvisor_err)?;
        // From here a failure drops `container`, which ends the sandbox: the manager records
        // it lost rather than serving it half attached.
        // As the record says: frozen if paused in memory, running otherwise (a server that
        // died during a snapshot or fork left it paused).
        let frozen = container.status().map_err(gvisor_err)? == "paused";
        let thawed = match (paused, frozen) {
            (true, false) => {
                container.pause().map_err(gvisor_err)?;
                false
            }
            (false, true) => {
                container.resume().map_err(gvisor_err)?;
                true
            }
            _ => false,
        };
        let relay = container.relay().transpose().map_err(gvisor_err)?.map(std::sync::Arc::new);
        let memory_limit = container.memory_limit();
        Ok(Adopted {
            instance: GvisorInstance { container, memory_limit, relay, _image: None },
            thawed,
        })
    }

    fn end_leftover(&self, _id: &str, _saved: &Saved) {
        // `sweep` removes every leftover no re-attached sandbox holds, at once.
    }

    fn sweep(&self) -> usize {
        // Only a server that left sandboxes behind pays for the probe here.
        let dir = self.settings.run_dir.join("gvisor").join("sandboxes");
        if std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()) {
            return 0;
        }
        let Ok(cfg) = self.config() else { return 0 };
        match ringfence_gvisor::sweep(cfg, &[]) {
            Ok(gone) => gone.len(),
            Err(e) => {
                tracing::warn!(error = %e, "sweeping gvisor sandboxes an earlier server left");
                0
            }
        }
    }
}

/// One gvisor sandbox. Dropping it deletes the container and everything it held.
#[derive(Debug)]
pub struct GvisorInstance {
    container: Container,
    memory_limit: Option<u64>,
    /// The host's end of the packet relay, for the network layer.
    relay: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Held while it runs from an image template: `template rm` is refused meanwhile.
    _image: Option<ringfence_image::store::InUse>,
}

impl Instance for GvisorInstance {
    fn saved(&self) -> Saved {
        Saved::default()
    }

    fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError> {
        self.container.control_clone().map_err(gvisor_err)
    }

    fn supervise(&mut self, _id: &str, _sink: ringfence_jail::monitor::DenialSink) {
        // gVisor has no seccomp user notification: nothing to report denials through.
    }

    fn net(&self) -> NetAttach {
        match &self.relay {
            Some(fd) => NetAttach::Relay(fd.clone()),
            None => NetAttach::None,
        }
    }

    fn usage(&self) -> Option<Usage> {
        let u = self.container.usage();
        Some(Usage {
            memory_bytes: u.memory_bytes.unwrap_or(0),
            memory_cache_bytes: 0,
            memory_limit: self.memory_limit,
            cpu_ns: u.cpu_usec.map(|us| us.saturating_mul(1000)),
            oom_kills: 0,
            pids_max_hits: 0,
            pids_current: u.host_tasks.unwrap_or(0),
        })
    }

    fn limit_events(&self) -> (u64, u64) {
        (0, 0)
    }

    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        let u = self.container.usage();
        Some((u.memory_bytes.unwrap_or(0), u.cpu_usec.map(|us| us.saturating_mul(1000))))
    }

    fn disk_usage(&self) -> Option<(u64, u64)> {
        self.container.usage().disk
    }

    fn freeze(&self) -> Result<(), TierError> {
        self.container.pause().map_err(gvisor_err)
    }

    fn thaw(&self) -> Result<(), TierError> {
        self.container.resume().map_err(gvisor_err)
    }

    fn save_fs(&self, dest: &Path, _paused: bool) -> Result<(), TierError> {
        // Pauses around the copy itself unless paused already.
        self.container.save_layer(dest).map(drop).map_err(gvisor_err)
    }
}
