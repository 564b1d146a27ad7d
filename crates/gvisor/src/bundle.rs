//! The OCI bundle (`config.json`) runsc starts a sandbox from.
//!
//! What runsc does from it is what the jail's agent does itself (`ringfence_jail::inside`): the
//! root, read-only host layers, `/proc`, `/dev`, hostname, id mapping, capabilities,
//! `no_new_privs`, rlimits and cgroup limits. The agent is the container's init.

use std::collections::BTreeMap;
use std::path::Path;

use ringfence_jail::limits::Limits;
use serde_json::{Value, json};

/// Where the agent executable appears inside the sandbox: bound read-only into the sandbox's
/// `/dev`, a file system gVisor keeps in its own memory, so the mount point is never created
/// in the writable layer (it would show up in every snapshot).
pub const AGENT_IN_SANDBOX: &str = "/dev/.ringfence-agent";

/// Where the sandbox's host directory for the agent's reconnect sockets appears inside (see
/// [`BundleSpec::chan_dir`]): in `/dev` too, for the same reason.
pub const CHAN_IN_SANDBOX: &str = "/dev/.ringfence-chan";

/// Capability names for `ringfence_jail::inside::AGENT_CAPS`, bit by bit: what the agent keeps
/// (inside the sandbox only) to run file operations for any sandbox user and start processes
/// as them. Processes it starts keep none.
const AGENT_CAP_NAMES: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (2, "CAP_DAC_READ_SEARCH"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
];

/// How the sandbox is networked. Either way runsc runs with `--network=none`: gVisor's own
/// network stack, with loopback, and no host interface.
///
/// Why not runsc's `--network=sandbox` in a pre-made namespace holding our TUN (the jail's
/// way): runsc 0.0~20240729 takes any namespace in which `/proc/sys/net/core/rmem_default`
/// exists for the root one and refuses to start, and kernels 6.x show that file in every
/// namespace (measured on 6.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Loopback only.
    None,
    /// The agent makes a TUN inside gVisor's stack (it gets `CAP_NET_ADMIN` for that and
    /// drops it before serving) and relays its packets over an inherited `SOCK_SEQPACKET`
    /// descriptor to the host's userspace stack, which applies the egress policy.
    Relay(RelaySpec),
}

/// The device the agent makes for [`Network::Relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySpec {
    pub iface: String,
    pub address: std::net::Ipv4Addr,
    pub mtu: u32,
}

/// `CAP_NET_ADMIN`: only the agent holds it, only while it makes the relayed device.
const CAP_NET_ADMIN: &str = "CAP_NET_ADMIN";

/// Everything `config.json` is made from.
#[derive(Debug, Clone)]
pub struct BundleSpec<'a> {
    pub hostname: &'a str,
    /// The merged root (see [`crate::rootfs`]).
    pub rootfs: &'a Path,
    /// Host directories bound read-only at the same path (the template's, e.g. `/usr`).
    pub host_layers: &'a [String],
    pub agent_path: &'a Path,
    /// Host uid/gid of the sandbox's root; `ringfence_jail::ID_RANGE` ids are mapped from it.
    pub uid_base: u32,
    pub limits: &'a Limits,
    /// Absolute cgroup path (the same under every v1 hierarchy, or in the v2 tree).
    pub cgroup_path: &'a str,
    pub network: &'a Network,
    pub shm_bytes: u64,
    /// A host directory (root's, mode 0700) bound writable at [`CHAN_IN_SANDBOX`], where the
    /// agent binds the sockets a restarted server reconnects to (runsc makes them host sockets:
    /// `--host-uds=create`).
    pub chan_dir: Option<&'a Path>,
}

fn capability_names() -> Vec<&'static str> {
    let caps = ringfence_jail::inside::AGENT_CAPS;
    AGENT_CAP_NAMES.iter().filter(|(bit, _)| caps & (1 << bit) != 0).map(|(_, n)| *n).collect()
}

/// The host cgroup's task limit for a sandbox allowed `pids` tasks inside. The sandbox's own
/// processes are bounded inside gVisor, by `RLIMIT_NPROC` per sandbox user (gVisor enforces it;
/// its cgroups are its own). On the host, every sandbox task costs gVisor a stub thread or
/// more, plus the sentry's and gofer's own threads: a host limit of `pids` itself would make
/// the sentry fail to create a thread, which ends the whole sandbox, not the one fork. So the
/// host limit is a backstop above what `pids` tasks need.
pub fn host_tasks(pids: u64) -> u64 {
    pids.saturating_mul(4).saturating_add(256)
}

/// Builds `config.json`.
pub fn config(spec: &BundleSpec<'_>) -> Value {
    let mut caps = capability_names();
    if matches!(spec.network, Network::Relay(_)) {
        caps.push(CAP_NET_ADMIN);
    }
    let read_only = json!(["rbind", "ro", "nosuid", "nodev"]);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                           "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}", spec.shm_bytes)]}),
        json!({"destination": AGENT_IN_SANDBOX, "type": "bind",
               "source": spec.agent_path, "options": read_only}),
    ];
    if let Some(chan) = spec.chan_dir {
        mounts.push(json!({"destination": CHAN_IN_SANDBOX, "type": "bind", "source": chan,
                           "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]}));
    }
    for layer in spec.host_layers {
        mounts.push(json!({"destination": layer, "type": "bind", "source": layer,
                           "options": read_only}));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "user"}),
    ];
    namespaces.push(json!({"type": "network"}));
    let ids = json!([{"containerID": 0, "hostID": spec.uid_base,
                      "size": ringfence_jail::ID_RANGE}]);
    let mut resources = serde_json::Map::new();
    if let Some(m) = spec.limits.memory {
        // Swap equal to the limit: no swap beyond it, as in the jail.
        resources.insert("memory".into(), json!({"limit": m, "swap": m}));
    }
    if let Some(p) = spec.limits.pids {
        resources.insert("pids".into(), json!({"limit": host_tasks(p)}));
    }
    if let Some(c) = spec.limits.cpu_millis {
        resources.insert("cpu".into(), json!({"quota": c * 100, "period": 100_000}));
    }
    let nproc = ringfence_jail::launch::rlimits_for(spec.limits).nproc;
    let rlimits = json!([
        {"type": "RLIMIT_NOFILE", "hard": spec.limits.nofile, "soft": spec.limits.nofile},
        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
        {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc},
    ]);
    let mut annotations = BTreeMap::new();
    annotations.insert("dev.ringfence.tier", "gvisor");
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_IN_SANDBOX, "--init", "--tier", "gvisor"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": [],
            },
            "noNewPrivileges": true,
            "rlimits": rlimits,
        },
        "root": {"path": spec.rootfs, "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "annotations": annotations,
        "linux": {
            "namespaces": namespaces,
            "uidMappings": ids,
            "gidMappings": ids,
            "cgroupsPath": spec.cgroup_path,
            "resources": resources,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec<'a>(limits: &'a Limits, net: &'a Network, layers: &'a [String]) -> BundleSpec<'a> {
        BundleSpec {
            hostname: "sbx1",
            rootfs: Path::new("/run/x/rootfs"),
            host_layers: layers,
            agent_path: Path::new("/opt/agent"),
            uid_base: 100_000_000,
            limits,
            cgroup_path: "/ringfence-gvisor/sbx1",
            network: net,
            shm_bytes: 1 << 20,
            chan_dir: None,
        }
    }

    #[test]
    fn carries_limits_ids_and_only_the_agents_capabilities() {
        let limits = Limits {
            memory: Some(64 << 20),
            pids: Some(32),
            cpu_millis: Some(500),
            ..Limits::default()
        };
        let layers = vec!["/usr".to_string()];
        let c = config(&spec(&limits, &Network::None, &layers));
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], host_tasks(32));
        let nproc = c["process"]["rlimits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "RLIMIT_NPROC");
        assert_eq!(nproc.expect("RLIMIT_NPROC")["hard"], 64, "at least 64, as in the jail");
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(c["linux"]["uidMappings"][0]["hostID"], 100_000_000);
        assert_eq!(c["hostname"], "sbx1");
        let bounding: Vec<&str> = c["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(bounding.contains(&"CAP_SETUID"));
        for dangerous in ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_NET_RAW"] {
            assert!(!bounding.contains(&dangerous), "{dangerous} must not be granted");
        }
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let usr = c["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/usr");
        let opts = usr.expect("/usr is bound")["options"].as_array().unwrap().clone();
        assert!(opts.contains(&json!("ro")));
        let net = c["linux"]["namespaces"].as_array().unwrap();
        assert!(net.iter().any(|n| n["type"] == "network" && n.get("path").is_none()));
    }

    #[test]
    fn only_a_relayed_network_gives_the_agent_net_admin() {
        let limits = Limits::default();
        let caps = |net: &Network| {
            let c = config(&spec(&limits, net, &[]));
            c["process"]["capabilities"]["bounding"].as_array().unwrap().clone()
        };
        assert!(!caps(&Network::None).contains(&json!("CAP_NET_ADMIN")));
        let relay = Network::Relay(RelaySpec {
            iface: "eth0".into(),
            address: std::net::Ipv4Addr::new(100, 96, 0, 2),
            mtu: 65535,
        });
        assert!(caps(&relay).contains(&json!("CAP_NET_ADMIN")));
    }

    #[test]
    fn unlimited_resources_are_left_out() {
        let limits = Limits { memory: None, pids: None, cpu_millis: None, ..Limits::default() };
        let c = config(&spec(&limits, &Network::None, &[]));
        assert_eq!(c["linux"]["resources"], json!({}));
    }
}
