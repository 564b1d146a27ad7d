//! Sandbox-side setup, run by `ringfence-agent` as PID 1 of fresh namespaces before it serves
//! anything. The order matters and is fixed:
//!
//! 1. cgroup namespace (the host already moved us into our cgroup, so its root is that cgroup);
//! 2. mounts: private propagation, a size-capped tmpfs holding every writable layer, the
//!    overlay root and host layers, `/proc` with sensitive files masked, a minimal `/dev`;
//! 3. `pivot_root` into the overlay and detach the host's root;
//! 4. hostname, loopback, rlimits;
//! 5. capabilities reduced to what the agent needs, `no_new_privs` (unless the template allows
//!    setuid: then CAP_SYS_ADMIN until step 6 instead), Landlock;
//! 6. seccomp last, so every earlier step could still use the calls it denies.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use landlock::{
    ABI, AccessFs, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use ringfence_proto::{BpfInsn, Phase, SetupSpec};

use crate::phase;

/// A setup step that failed, with the step's name for the host's one-line report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {message}")]
pub struct InsideError {
    pub step: String,
    pub message: String,
}

fn fail<E: std::fmt::Display>(step: impl Into<String>) -> impl FnOnce(E) -> InsideError {
    let step = step.into();
    move |e| InsideError { step, message: e.to_string() }
}

/// Capabilities PID 1 keeps (inside its user namespace only): enough to run file operations
/// for any sandbox user and to start processes as them. Processes it starts keep none.
pub const AGENT_CAPS: u64 = (1 << 0) // CAP_CHOWN
    | (1 << 1) // CAP_DAC_OVERRIDE
    | (1 << 2) // CAP_DAC_READ_SEARCH
    | (1 << 3) // CAP_FOWNER
    | (1 << 4) // CAP_FSETID
    | (1 << 5) // CAP_KILL
    | (1 << 6) // CAP_SETGID
    | (1 << 7) // CAP_SETUID
    | (1 << 8); // CAP_SETPCAP

/// Files under `/proc` that reveal or control the host kernel, hidden behind `/dev/null`.
const MASKED_FILES: &[&str] = &[
    "kcore",
    "kallsyms",
    "kmsg",
    "sysrq-trigger",
    "timer_list",
    "sched_debug",
    "keys",
    "key-users",
    "latency_stats",
    "config.gz",
    "vmallocinfo",
    "pagetypeinfo",
    "modules",
];
/// Directories under `/proc` hidden behind an empty read-only tmpfs.
const MASKED_DIRS: &[&str] = &["acpi", "scsi", "driver", "fs/nfsd", "tty/driver"];
/// Directories under `/proc` made read-only.
const READONLY_DIRS: &[&str] = &["sys", "irq", "bus", "sysvipc"];
/// Per-user limits of the sandbox's own user namespace, written to `/proc/sys/user/*` while
/// PID 1 still holds CAP_SYS_RESOURCE there. They bound each user *inside* the sandbox; the
/// kernel also charges every count to the namespace's owner against the host's limits, which
/// bounds the sandbox as a whole (see `owner.rs`). Creating namespaces is left to the host
/// alone (seccomp denies it too), and fanotify (also denied by seccomp) gets no groups.
const USER_NS_LIMITS: &[(&str, u64)] = &[
    ("max_user_namespaces", 0),
    ("max_mnt_namespaces", 0),
    ("max_pid_namespaces", 0),
    ("max_net_namespaces", 0),
    ("max_uts_namespaces", 0),
    ("max_ipc_namespaces", 0),
    ("max_cgroup_namespaces", 0),
    ("max_time_namespaces", 0),
    // The kernel's own default per user, so programs meet the limits they would on any host.
    ("max_inotify_instances", 128),
    // Each watch pins an inode (memory charged to the sandbox's cgroup); 64Ki is enough to
    // watch a large source tree recursively.
    ("max_inotify_watches", 65536),
    ("max_fanotify_groups", 0),
    ("max_fanotify_marks", 0),
];

/// Pseudo-terminals one sandbox may hold at once. All devpts instances but the host's first
/// share one pool (`kernel.pty.max` minus `kernel.pty.reserve`, 3072 by default): without a
/// per-instance cap one sandbox could take every pty on the host.
pub const PTY_MAX: u32 = 64;

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// What setup leaves for the agent.
#[derive(Debug)]
pub struct Outcome {
    /// Landlock ABI enforced, `None` where the kernel has no Landlock.
    pub landlock_abi: Option<u32>,
    /// User-notification descriptor of the seccomp filter, to hand to the host.
    pub listener: Option<OwnedFd>,
    /// Where the host can reconnect (see `SetupSpec::listen`).
    pub reconnect: Option<std::os::unix::net::UnixListener>,
    /// The tmpfs writable layer's parent, to hand to the host (no `SetupSpec::own_disk`).
    pub stage: Option<OwnedFd>,
}

/// Turns the current (fresh) namespaces into the sandbox described by `spec`.
/// `trees` are the detached mounts the host sent: the read-only lower layers, then the disk
/// (see [`SetupSpec::lowers`]).
pub fn setup(
    spec: &SetupSpec,
    trees: Vec<OwnedFd>,
    phases: &mut Vec<Phase>,
) -> Result<Outcome, InsideError> {
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(fail("unshare(CLONE_NEWCGROUP)"))?;
    let (merged, stage) = build_root(spec, trees)?;
    phase(phases, "mounts");
    // Bound while the host's filesystem is still visible: after pivot_root nothing in the
    // sandbox can reach this path, but the descriptor keeps listening.
    let reconnect = match &spec.listen {
        Some(path) => {
            let _ = fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(fail(format!("listen on {path}")))?;
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(fail(format!("chmod {path}")))?;
            Some(l)
        }
        None => None,
    };
    enter_root(&merged)?;
    phase(phases, "pivot_root");
    nix::unistd::sethostname(&spec.sandbox_id).map_err(fail("sethostname"))?;
    ringfence_sys::loopback_up().map_err(fail("bring up loopback"))?;
    set_rlimits(spec)?;
    phase(phases, "hostname_loopback_rlimits");
    let mut outcome = lock_down(spec, phases)?;
    outcome.reconnect = reconnect;
    outcome.stage = stage;
    Ok(outcome)
}

fn mount_err(what: &str, target: &Path) -> impl FnOnce(nix::Error) -> InsideError {
    let step = format!("mount {what} on {}", target.display());
    move |e| InsideError { step, message: e.to_string() }
}

fn mkdir_p(p: &Path, mode: u32) -> Result<(), InsideError> {
    fs::create_dir_all(p).map_err(fail(format!("mkdir {}", p.display())))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(fail(format!("chmod {}", p.display())))
}

fn build_root(
    spec: &SetupSpec,
    mut lowers: Vec<OwnedFd>,
) -> Result<(PathBuf, Option<OwnedFd>), InsideError> {
    let expected = spec.lowers as usize + usize::from(spec.own_disk) + spec.volumes.len();
    if spec.lowers == 0 || lowers.len() != expected {
        return Err(InsideError {
            step: "receive lower layers".into(),
            message: format!("expected {expected} mounts, got {}", lowers.len()),
        });
    }
    // Volumes came last: taken off first, attached once the root is built.
    let volumes = lowers.split_off(lowers.len() - spec.volumes.len());
    let disk = if spec.own_disk { lowers.pop() } else { None };
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(mount_err("private propagation", Path::new("/")))?;
    let stage = Path::new(&spec.stage_dir);
    // The stage is a tmpfs private to this namespace, so one host directory serves every
    // sandbox and nothing is left behind. With a disk of its own it holds only mount points;
    // without, it also holds the writable layer, and its size is the disk quota.
    let opts = match &disk {
        Some(_) => format!("size=64k,nr_inodes={},mode=0755", 64 + lowers.len()),
        None => format!("size={},nr_inodes={},mode=0755", spec.disk_bytes, spec.disk_inodes),
    };
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(mount_err("tmpfs", stage))?;
    let merged = stage.join("merged");
    mkdir_p(&merged, 0o755)?;
    let upper = stage.join("root/upper");
    let work = stage.join("root/work");
    match &disk {
        Some(disk) => {
            // The host made the disk (with upper/ and work/, owned by this sandbox's root) and
            // sent it as a detached mount: attached under a neutral name, so no host path
            // shows in the overlay's options and none needs to be reachable from here.
            let root = stage.join("root");
            mkdir_p(&root, 0o700)?;
            ringfence_sys::move_mount_fd(disk, &root).map_err(|e| InsideError {
                step: "attach the disk".into(),
                message: e.to_string(),
            })?;
        }
        None => {
            mkdir_p(&upper, 0o755)?;
            mkdir_p(&work, 0o755)?;
        }
    }
    // Per-sandbox identity files live in the upper layer, so the template stays shared.
    mkdir_p(&upper.join("etc"), 0o755)?;
    let write = |rel: &str, text: String| {
        let p = upper.join(rel);
        fs::write(&p, text).map_err(fail(format!("write {}", p.display())))
    };
    write("etc/hostname", format!("{}\n", spec.sandbox_id))?;
    write(
        "etc/hosts",
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n", spec.sandbox_id),
    )?;
    // Overlay options show up in the sandbox's mountinfo. Mounting with paths relative to the
    // stage, under neutral names, keeps host paths out of it. Each lower layer arrives as a
    // detached, read-only mount made by the host through this sandbox's own id mapping (files
    // stored with canonical ids 0..65535 read as this sandbox's ids): attaching it here needs
    // no path to the host's template or layer directories, which stay closed to sandbox ids.
    let count = lowers.len();
    let mut names = Vec::with_capacity(count);
    for (i, tree) in lowers.into_iter().enumerate() {
        let name = if i + 1 == count { "template".to_string() } else { format!("layer{i}") };
        let dir = stage.join(&name);
        mkdir_p(&dir, 0o755)?;
        ringfence_sys::move_mount_fd(&tree, &dir).map_err(|e| InsideError {
            step: format!("attach lower layer {name}"),
            message: e.to_string(),
        })?;
        names.push(name);
    }
    nix::unistd::chdir(stage).map_err(fail("chdir to stage"))?;
    overlay(
        &names.join(":"),
        Path::new("root/upper"),
        Path::new("root/work"),
        &merged,
        spec.allow_setuid,
    )?;
    // A tmpfs upper exists only in this namespace: the host reaches it (snapshots, pauses)
    // through this descriptor, which the agent hands over and closes, so that after
    // pivot_root nothing in the sandbox, the agent included, holds a way there. A disk of
    // its own the host reaches at its host path.
    let stage_fd = match &disk {
        Some(_) => None,
        None => {
            Some(OwnedFd::from(fs::File::open(stage.join("root")).map_err(fail("open stage"))?))
        }
    };
    // Host layers are bound read-only rather than overlaid: their files belong to host ids that
    // are unmapped here, so no sandbox user could modify them through an overlay anyway, and
    // a plain bind keeps path lookups (Python's imports do hundreds) at native speed.
    for layer in &spec.host_layers {
        let target = merged.join(layer.path.trim_start_matches('/'));
        bind(Path::new(&layer.path), &target, Bind::ReadOnly)?;
    }
    // Each volume at its path (made in the writable layer if the template lacks it). The path
    // was checked by the server: absolute, no `..`, not a system directory.
    for (tree, path) in volumes.iter().zip(&spec.volumes) {
        let target = merged.join(path.trim_start_matches('/'));
        mkdir_p(&target, 0o755)?;
        ringfence_sys::move_mount_fd(tree, &target).map_err(|e| InsideError {
            step: format!("attach the volume at {path}"),
            message: e.to_string(),
        })?;
    }
    mount_proc(&merged)?;
    mount_dev(&merged, spec)?;
    Ok((merged, stage_fd))
}

fn overlay(
    lower: &str,
    upper: &Path,
    work: &Path,
    target: &Path,
    allow_setuid: bool,
) -> Result<(), InsideError> {
    // userxattr: overlay metadata goes in user.* xattrs, the only kind a user namespace may set.
    // volatile: no syncs through to the upper layer (fsync, syncfs, and the sync at unmount,
    // which on a disk image cost a millisecond per sandbox end): a sandbox's writable layer
    // lives as long as the sandbox, and the host reads it from the page cache.
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},userxattr,volatile",
        upper.display(),
        work.display()
    );
    // Setuid bits count only where the template asks (`sudo`): the exec of a setuid binary
    // is judged by the mount it runs from, which is this one.
    let flags =
        if allow_setuid { MsFlags::MS_NODEV } else { MsFlags::MS_NOSUID | MsFlags::MS_NODEV };
    mount(Some("overlay"), target, Some("overlay"), flags, Some(opts.as_str()))
        .map_err(mount_err("overlay", target))
}

/// How a bind mount is restricted after it is made.
#[derive(Debug, Clone, Copy)]
enum Bind {
    /// As the source is (masks over /proc files, device nodes).
    AsIs,
    /// Read-only, no setuid, no device nodes (the template and host layers: programs run
    /// from them).
    ReadOnly,
    /// Read-only and not executable either (/proc subtrees).
    ReadOnlyNoExec,
}

fn bind(src: &Path, dst: &Path, how: Bind) -> Result<(), InsideError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(mount_err(&format!("bind {}", src.display()), dst))?;
    restrict_bind(dst, how)
}

/// [`bind`] where `src` and `dst` may be absent (a feature this kernel lacks) or not a
/// directory where `src` is one: false, nothing mounted. Tried rather than looked up first:
/// each lookup in a fresh `/proc` is a slow path walk, on every sandbox start.
fn bind_if_there(src: &Path, dst: &Path, how: Bind) -> Result<bool, InsideError> {
    match mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>) {
        Ok(()) => restrict_bind(dst, how).map(|()| true),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => Ok(false),
        Err(e) => Err(mount_err(&format!("bind {}", src.display()), dst)(e)),
    }
}

/// The second half of a bind: read-only (and no exec) as `how` says.
fn restrict_bind(dst: &Path, how: Bind) -> Result<(), InsideError> {
    let base = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    let flags = match how {
        Bind::AsIs => return Ok(()),
        Bind::ReadOnly => base,
        Bind::ReadOnlyNoExec => base | MsFlags::MS_NOEXEC,
    };
    mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
        .map_err(mount_err("read-only remount", dst))
}

fn mount_proc(root: &Path) -> Result<(), InsideError> {
    let proc_dir = root.join("proc");
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(mount_err("proc", &proc_dir))?;
    // Before /proc/sys turns read-only below. The files show the limits of the reader's user
    // namespace, whichever proc mount they are read through: these are the sandbox's.
    let user_sys = proc_dir.join("sys/user");
    for (name, value) in USER_NS_LIMITS {
        let p = user_sys.join(name);
        // Absent on kernels without the feature (time namespaces, fanotify): nothing to bound.
        // Opened without a lookup first (see `bind_if_there`).
        let written = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.to_string().as_bytes()));
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("write /proc/sys/user/{name}"))(e)),
        }
    }
    for f in MASKED_FILES {
        let p = proc_dir.join(f);
        // Absent on this kernel (no such feature built in): nothing to hide. Tried rather than
        // looked up first: a lookup each is a system call more per sandbox start.
        match mount(
            Some("/dev/null"),
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(mount_err("bind /dev/null", &p)(e)),
        }
    }
    // One empty read-only tmpfs, bound over every masked directory: a superblock each cost a
    // start four more. Sharing one is safe: read-only on the superblock, it stays empty.
    // Each mounted over where it is a directory; absent ones (or files) are left alone.
    let mut mask: Option<std::path::PathBuf> = None;
    for d in MASKED_DIRS {
        let p = proc_dir.join(d);
        match &mask {
            Some(first) => {
                bind_if_there(first, &p, Bind::AsIs)?;
            }
            None => {
                match mount(
                    Some("tmpfs"),
                    &p,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                    Some("size=0"),
                ) {
                    Ok(()) => mask = Some(p),
                    Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {}
                    Err(e) => return Err(mount_err("mask tmpfs", &p)(e)),
                }
            }
        }
    }
    for d in READONLY_DIRS {
        let p = proc_dir.join(d);
        bind_if_there(&p, &p, Bind::ReadOnlyNoExec)?;
    }
    Ok(())
}

fn mount_dev(root: &Path, spec: &SetupSpec) -> Result<(), InsideError> {
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )
    .map_err(mount_err("tmpfs", &dev))?;
    for name in DEVICES {
        let node = dev.join(name);
        fs::write(&node, b"").map_err(fail(format!("create {}", node.display())))?;
        bind(&Path::new("/dev").join(name), &node, Bind::AsIs)?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts, 0o755)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(format!("newinstance,ptmxmode=0666,mode=0620,gid=5,max={PTY_MAX}").as_str()),
    )
    .map_err(mount_err("devpts", &pts))?;
    let shm = dev.join("shm");
    mkdir_p(&shm, 0o1777)?;
    let shm_size = spec.shm_bytes;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode=1777,size={shm_size}").as_str()),
    )
    .map_err(mount_err("tmpfs", &shm))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(link);
        symlink(target, &p).map_err(fail(format!("symlink {}", p.display())))?;
    }
    // Read-only from here on: nothing inside may add device nodes or files to /dev.
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )
    .map_err(mount_err("read-only remount", &dev))
}

fn enter_root(merged: &Path) -> Result<(), InsideError> {
    nix::unistd::chdir(merged).map_err(fail("chdir to new root"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then
    // removes the old root (and with it every host mount) from this namespace.
    nix::unistd::pivot_root(".", ".").map_err(fail("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(fail("detach old root"))?;
    nix::unistd::chdir("/").map_err(fail("chdir /"))
}

fn set_rlimits(spec: &SetupSpec) -> Result<(), InsideError> {
    let r = &spec.rlimits;
    for (res, want, name) in [
        (Resource::RLIMIT_NOFILE, r.nofile, "RLIMIT_NOFILE"),
        (Resource::RLIMIT_NPROC, r.nproc, "RLIMIT_NPROC"),
        (Resource::RLIMIT_CORE, r.core, "RLIMIT_CORE"),
    ] {
        // Only lower: raising past the hard limit needs CAP_SYS_RESOURCE in the initial
        // namespace, which no sandbox has.
        let (_, hard) = getrlimit(res).map_err(fail(format!("getrlimit {name}")))?;
        let v = want.min(hard);
        setrlimit(res, v, v).map_err(fail(format!("setrlimit {name}")))?;
    }
    Ok(())
}

fn to_sock_filter(prog: &[BpfInsn]) -> Vec<ringfence_sys::SockFilter> {
    prog.iter()
        .map(|i| ringfence_sys::SockFilter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
        .collect()
}

/// CAP_SYS_ADMIN: held (in the sandbox's user namespace) until seccomp and Landlock are in
/// place when `no_new_privs` is not set (setuid templates): both need one or the other.
const CAP_SYS_ADMIN: u64 = 1 << 21;

fn lock_down(spec: &SetupSpec, phases: &mut Vec<Phase>) -> Result<Outcome, InsideError> {
    // The bounding set is what every later exec can reach, a setuid-root one included (for
    // setuid templates that is the whole of what `sudo` grants): the agent's own set, without
    // CAP_SYS_ADMIN even while the agent still holds it below.
    ringfence_sys::drop_bounding_caps(AGENT_CAPS).map_err(fail("drop bounding capabilities"))?;
    if spec.allow_setuid {
        // no_new_privs is inherited and cannot be cleared, so setting it here would make every
        // setuid binary inert. Landlock and seccomp accept CAP_SYS_ADMIN in place of it; the
        // filters they install are inherited across every exec, setuid ones included, and no
        // process can remove them.
        ringfence_sys::restrict_caps(AGENT_CAPS | CAP_SYS_ADMIN)
            .map_err(fail("restrict capabilities"))?;
    } else {
        ringfence_sys::restrict_caps(AGENT_CAPS).map_err(fail("restrict capabilities"))?;
        nix::sys::prctl::set_no_new_privs().map_err(fail("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    }
    // Not dumpable: nothing in the sandbox, not even its (capability-less) root, may ptrace
    // PID 1 or read its memory, fds or environment through /proc.
    nix::sys::prctl::set_dumpable(false).map_err(fail("prctl(PR_SET_DUMPABLE)"))?;
    phase(phases, "capabilities_nnp");
    let landlock_abi = apply_landlock(spec)?;
    phase(phases, "landlock");
    let mut listener = None;
    let builtin = if spec.seccomp_builtin {
        Some(
            crate::seccomp::builtin()
                .map_err(|e| InsideError { step: "seccomp".into(), message: e.to_string() })?,
        )
    } else {
        None
    };
    let (errno, notify) = match builtin {
        Some(c) => (&c.clone3, &c.sandbox),
        None => (&spec.seccomp_errno, &spec.seccomp_notify),
    };
    if !errno.is_empty() {
        ringfence_sys::install_seccomp(&to_sock_filter(errno), false)
            .map_err(fail("install seccomp (clone3)"))?;
    }
    if !notify.is_empty() {
        listener = ringfence_sys::install_seccomp(&to_sock_filter(notify), true)
            .map_err(fail("install seccomp"))?;
    }
    if spec.allow_setuid {
        // Installed; CAP_SYS_ADMIN goes before anything in the sandbox runs.
        ringfence_sys::restrict_caps(AGENT_CAPS).map_err(fail("drop CAP_SYS_ADMIN"))?;
    }
    phase(phases, "seccomp");
    Ok(Outcome { landlock_abi, listener, reconnect: None, stage: None })
}

/// Applies the Landlock ruleset. Returns the ABI enforced, or `None` where the kernel lacks
/// Landlock (the caller logs that once). Fails closed when Landlock exists but cannot be
/// enforced.
pub fn apply_landlock(spec: &SetupSpec) -> Result<Option<u32>, InsideError> {
    let Some(version) = ringfence_sys::landlock_abi() else {
        if spec.require_landlock {
            return Err(InsideError {
                step: "landlock".into(),
                message: "Landlock is required but this kernel does not offer it".into(),
            });
        }
        return Ok(None);
    };
    if spec.writable.is_empty() && !spec.require_landlock {
        return Ok(None);
    }
    let abi = ABI::from(i32::try_from(version.min(6)).unwrap_or(6));
    let step = "landlock";
    let write = AccessFs::from_write(abi);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(write)
        .map_err(fail(step))?;
    if version >= 6 {
        ruleset = ruleset.scope(Scope::Signal | Scope::AbstractUnixSocket).map_err(fail(step))?;
    }
    let mut created = ruleset.create().map_err(fail(step))?;
    for path in &spec.writable {
        // One path walk per rule: opened (O_PATH), then asked what it is through the
        // descriptor. A path that is not there has no rule.
        let Ok(fd) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
        else {
            continue;
        };
        let meta = fd.metadata().map_err(fail(format!("landlock: stat {path}")))?;
        let access = if meta.is_dir() { write } else { write & AccessFs::from_file(abi) };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(fail(format!("landlock: rule for {path}")))?;
    }
    // The crate sets no_new_privs by default; a setuid template must not have it (the agent
    // holds CAP_SYS_ADMIN instead, see `lock_down`).
    let status = created.no_new_privs(!spec.allow_setuid).restrict_self().map_err(fail(step))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(InsideError {
            step: step.into(),
            message: format!("ruleset only {:?} on ABI {version}", status.ruleset),
        });
    }
    Ok(Some(version))
}
