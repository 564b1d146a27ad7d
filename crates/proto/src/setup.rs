//! The boot message: everything the agent needs to turn a fresh set of namespaces into a sandbox.
//!
//! The host computes all of it ahead (paths, limits, the compiled seccomp program) so the agent
//! does no policy work of its own: it only applies what it is given, in a fixed order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::SpawnSpec;

/// One classic-BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A host directory exposed read-only at the same path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLayer {
    pub path: String,
}

/// Soft and hard resource limits applied to PID 1 and inherited by everything in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub nofile: u64,
    pub nproc: u64,
    pub core: u64,
}

/// The descriptor number at which the agent starts with the claim on its sandbox's owner uid
/// (a locked file, see `ringfence_jail::owner`) and keeps it, close-on-exec, until it exits:
/// the claim lives exactly as long as the sandbox.
pub const OWNER_LOCK_FD: i32 = 1001;

/// The byte that carries each lower layer's descriptor after the [`SetupSpec`] frame.
pub const LOWER_MARK: u8 = b'L';

/// The full sandbox setup the host sends as the first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupSpec {
    /// Sandbox id; also the hostname.
    pub sandbox_id: String,
    /// Host directory on which the private staging tmpfs is mounted (inside the sandbox's own
    /// mount namespace, so one directory serves every sandbox).
    pub stage_dir: String,
    /// How many read-only lower layers of `/` the host sends right after this frame, one
    /// descriptor per message (`SCM_RIGHTS` on a one-byte [`LOWER_MARK`]): detached mount trees
    /// whose owners are already shifted into this sandbox's id range (idmapped mounts), topmost
    /// first, the template's root last; then the disk, with `own_disk`. Host paths never reach
    /// the sandbox.
    pub lowers: u32,
    /// Host directories bound read-only at the same path (e.g. `/usr`).
    pub host_layers: Vec<HostLayer>,
    /// Volumes: where each is attached inside the sandbox. Their mounts (writable, through the
    /// sandbox's id mapping) follow the lower layers and the disk, in this order.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Whether the sandbox has a disk of its own (`upper/` and `work/` on a filesystem of the
    /// quota's size, see `ringfence_jail::disk`), sent as one more detached mount after the
    /// lower layers. Without, the writable layer is a tmpfs of `disk_bytes` on the stage,
    /// charged to the sandbox's memory.
    pub own_disk: bool,
    /// Size of the writable layer (the disk quota) in bytes (the tmpfs's, without `own_disk`).
    pub disk_bytes: u64,
    /// Inode cap of the writable layer (the tmpfs's, without `own_disk`).
    pub disk_inodes: u64,
    /// Size of `/dev/shm`, a tmpfs: memory, charged to the sandbox's memory limit.
    pub shm_bytes: u64,
    /// Paths (inside the sandbox) where Landlock allows writes.
    pub writable: Vec<String>,
    /// Fail if Landlock exists on this kernel but cannot be enforced.
    pub require_landlock: bool,
    pub rlimits: Rlimits,
    /// The default-profile filter, whose denials are sent to the host as user notifications.
    pub seccomp_notify: Vec<BpfInsn>,
    /// A second filter answering `clone3` with ENOSYS so libc falls back to `clone`, whose
    /// flags the first filter can inspect.
    pub seccomp_errno: Vec<BpfInsn>,
    /// Install the agent's own copy of the built-in default profile (both filters, denials
    /// notified) in place of `seccomp_notify` and `seccomp_errno`, which are then empty: an
    /// agent forked by its spawner has it compiled already, so neither the host's compile nor
    /// the program's transfer is on a start's path.
    pub seccomp_builtin: bool,
    /// Environment every process in the sandbox starts with, on top of `PATH`, `HOME` and
    /// `LANG`; a process's own variables override it (E2B's sandbox-level `envVars`).
    pub env: BTreeMap<String, String>,
    /// Host path where the agent listens for the host to reconnect after its channel closed
    /// (a server restart). Bound before `pivot_root`, so it lives in the host's mount
    /// namespace, out of reach of anything inside the sandbox. `None`: the agent exits when
    /// its channel closes.
    pub listen: Option<String>,
    /// A process to start as soon as setup completes (the `ringfence run` fast path).
    pub initial: Option<SpawnSpec>,
    /// Exit once the initial process has exited (one-shot sandboxes).
    pub exit_with_initial: bool,
    /// Let setuid binaries raise a process to the sandbox's own root (templates that ship
    /// `sudo`): the root and the lower layers are mounted without `nosuid`, and neither the
    /// agent nor the processes it starts set `no_new_privs`. The root so reached holds only
    /// the agent's capabilities, inside the sandbox's user namespace; seccomp and Landlock
    /// stay on. Off unless the template asks (see docs/SECURITY.md).
    #[serde(default)]
    pub allow_setuid: bool,
    /// gVisor only: the agent makes the sandbox's network device itself (a TUN inside gVisor's
    /// own network stack) and relays its packets over this inherited descriptor to the host's
    /// userspace stack, where the egress policy decides (see docs/ARCHITECTURE.md).
    #[serde(default)]
    pub packet_relay: Option<PacketRelay>,
    /// microvm only: the guest's NIC, which the agent (the guest's PID 1) configures before
    /// it serves. Its frames go to the host's userspace stack, as the jail's TUN packets do.
    #[serde(default)]
    pub guest_nic: Option<GuestNic>,
}

impl SetupSpec {
    /// Whether a jail agent that offers its descriptors sends `Ready` right after the offer,
    /// before the host's answer (one round trip fewer per start): a server's sandbox with no
    /// initial process and no stage to hand over (a disk of its own). Host and agent both
    /// read it from this spec, so they agree on the order of the channel's bytes.
    pub fn ready_before_answer(&self) -> bool {
        self.initial.is_none() && self.own_disk
    }
}

/// A microVM guest's network interface, as its agent sets it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    /// The NIC's MAC (the VMM's `mac=`): how the agent finds the interface.
    pub mac: [u8; 6],
    /// The guest's address and prefix length, its default gateway, and the MTU.
    pub address: [u8; 4],
    pub prefix: u8,
    pub gateway: [u8; 4],
    pub mtu: u32,
    /// The resolver `/etc/resolv.conf` names (the host's stack answers DNS there).
    pub dns: [u8; 4],
}

/// The network device the agent makes inside gVisor and where its packets go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketRelay {
    /// The inherited `SOCK_SEQPACKET` descriptor: one IPv4 packet per message.
    pub fd: i32,
    /// The device's name, address (on a `/0` prefix: every destination is on it) and MTU.
    pub iface: String,
    pub address: [u8; 4],
    pub mtu: u32,
    /// Where the agent accepts a replacement for the relay (a `SOCK_SEQPACKET` connection)
    /// once the host's end has closed: a restarted server re-attaching the sandbox's network.
    /// `None`: the device's relay ends with its first descriptor.
    pub listen: Option<String>,
}
