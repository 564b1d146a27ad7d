//! Cgroup limits for sandboxes, on cgroup v2 or v1, detected at run time.
//!
//! Creating and removing cgroup directories costs milliseconds with a long tail on v1 hosts, so
//! sandboxes do not get fresh directories. They lease *slots*: directories created once, reused
//! forever, each guarded by an exclusive `flock` on a lock file under the run directory. A lock
//! dies with its holder, so a slot whose owner was SIGKILLed becomes claimable again; the next
//! claimant first kills whatever the dead owner left inside (the orphan sweep).
//!
//! Except where the dead owner was a server: its sandboxes outlive it, waiting for the server
//! to come back and re-attach them. A server's leases write its data directory into the
//! slot's lock file while they hold the slot ([`Pool::kept_for`]), and the lock file is
//! emptied when a lease lets go in an orderly way, so after a `kill -9` the slot says whose
//! sandbox waits there. Claims pass over such a slot while that data directory exists; only
//! the server of that directory re-attaches (`adopt`) or sweeps it ([`Pool::collect_garbage`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::limits::Limits;

/// Errors from cgroup management; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no usable cgroup hierarchy: neither cgroup v2 with controllers at /sys/fs/cgroup nor \
         cgroup v1 memory, pids and cpu controllers under /sys/fs/cgroup were found; mount them \
         (e.g. boot with systemd or mount -t cgroup2 none /sys/fs/cgroup)"
    )]
    NotFound,
    #[error(
        "cgroup v2 controller {0:?} is not available at /sys/fs/cgroup: enable it in cgroup.subtree_control"
    )]
    MissingController(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("all {0} cgroup slots are in use")]
    Exhausted(u32),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// Where the controllers live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy with memory, pids and cpu enabled.
    V2 { root: PathBuf },
    /// Separate v1 hierarchies. CPU time is read from `cpuacct.usage` where cpuacct is
    /// co-mounted with cpu (the usual `cpu,cpuacct`), else summed from procfs (see
    /// [`Lease::usage`]). `freezer` (pause/resume) is optional: without it sandboxes cannot be paused with their
    /// memory kept.
    V1 { memory: PathBuf, pids: PathBuf, cpu: PathBuf, freezer: Option<PathBuf> },
}

impl Layout {
    /// Detects the cgroup layout of this host under `/sys/fs/cgroup`.
    pub fn detect() -> Result<Layout, CgroupError> {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    fn detect_at(base: &Path) -> Result<Layout, CgroupError> {
        let controllers = base.join("cgroup.controllers");
        if let Ok(list) = ringfence_sys::read_text(&controllers) {
            for want in ["memory", "pids", "cpu"] {
                if !list.split_whitespace().any(|c| c == want) {
                    return Err(CgroupError::MissingController(want.into()));
                }
            }
            return Ok(Layout::V2 { root: base.to_path_buf() });
        }
        let memory = base.join("memory");
        let pids = base.join("pids");
        // Debian and most distributions co-mount cpu with cpuacct; either name works.
        let cpu = [base.join("cpu"), base.join("cpu,cpuacct")]
            .into_iter()
            .find(|p| p.join("cpu.cfs_quota_us").exists());
        match cpu {
            Some(cpu)
                if memory.join("memory.limit_in_bytes").exists()
                    && pids.join("cgroup.procs").exists() =>
            {
                let freezer =
                    Some(base.join("freezer")).filter(|p| p.join("cgroup.procs").exists());
                Ok(Layout::V1 { memory, pids, cpu, freezer })
            }
            _ => Err(CgroupError::NotFound),
        }
    }

    /// "v1" or "v2", for logs and reports.
    pub fn version(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }
}

/// A family of reusable cgroup slots (`<name>/<prefix>-<n>` in every hierarchy).
#[derive(Debug, Clone)]
pub struct Pool {
    layout: Layout,
    name: String,
    prefix: String,
    lock_dir: PathBuf,
    /// The agent's executable, to park a spawner in each slot (see [`crate::spawner`]).
    spawner_exe: Option<PathBuf>,
    /// Spawners exec a fresh agent per sandbox instead of forking one (benchmarking of what
    /// forking saves only).
    exec_agents: bool,
    /// Claims try the slots where a spawner of this build is parked before the others (see
    /// [`Pool::prefer_own_spawners`]).
    prefer_own: bool,
    /// Where this process's next claim looks first (shared by clones and by its leases).
    hint: Arc<Mutex<SlotHint>>,
    /// The data directory of the server whose sandboxes this pool's leases hold (see
    /// [`Pool::kept_for`]).
    owner: Option<Arc<str>>,
}

/// Which slots this process should try first: a hint only (every claim still takes the slot's
/// `flock`, which is what makes it ours), so that a claim with hundreds of slots held does not
/// try each of their locks in turn (a server at 500 live sandboxes paid ~500 opens and failed
/// `flock`s per create).
#[derive(Debug, Default)]
struct SlotHint {
    /// Slots this process's leases let go of, lowest first: their spawners are already parked.
    released: std::collections::BTreeSet<u32>,
    /// One past the highest slot this process has claimed: where the walk for a new slot starts.
    next: u32,
}

/// Slots are numbered below this bound.
pub const MAX_SLOTS: u32 = 16384;

impl Pool {
    /// A pool named `prefix` under the `name` subtree of every hierarchy; slot locks live in
    /// `lock_dir`.
    pub fn new(layout: Layout, name: &str, prefix: &str, lock_dir: PathBuf) -> Self {
        Pool {
            layout,
            name: name.into(),
            prefix: prefix.into(),
            lock_dir,
            spawner_exe: None,
            exec_agents: false,
            prefer_own: false,
            hint: Arc::default(),
            owner: None,
        }
    }

    /// Marks this pool's slots, while a lease holds them, as kept for the server whose data
    /// directory is `data_dir`: its sandboxes outlive a `kill -9` of the server and wait in
    /// their slots to be re-attached, and no other claimant (another server sharing the run
    /// directory and so the slots) may take such a slot and sweep them while that directory
    /// exists. This pool's own sweep ([`Pool::collect_garbage`]) takes them: it runs once the
    /// restarted server has re-attached what it recorded.
    pub fn kept_for(mut self, data_dir: &Path) -> Self {
        let dir = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        self.owner = Some(Arc::from(dir.to_string_lossy().as_ref()));
        self
    }

    /// Parks a spawner (`exe --spawner`) in each slot this pool leases, so sandboxes are born
    /// in their cgroups instead of being moved there (see [`crate::spawner`]).
    pub fn with_spawners(mut self, exe: PathBuf) -> Self {
        self.spawner_exe = Some(exe);
        self
    }

    /// The agent build's tag ([`crate::spawner::binary_tag`]), looked up at each use: a
    /// long-running server must see an agent binary replaced under it as another build.
    fn tag(&self) -> Option<String> {
        crate::spawner::binary_tag(self.spawner_exe.as_ref()?).ok()
    }

    /// Has claims try the slots where a spawner of this agent build is parked first, before
    /// the lowest free one: for one-shot runs, each a process of its own, which share the
    /// host's slots with other builds' runs (an upgrade, a test beside a benchmark) that would
    /// otherwise replace each other's spawners on every run, each replacement a cgroup move
    /// (~13 ms on a host as it comes). Not for a server: it holds most of its slots itself, and
    /// trying their locks first is what its claim hints avoid. Such a pool also leaves the
    /// spawners it starts to be reaped after its process has exited (no reaper thread).
    pub fn prefer_own_spawners(mut self, prefer: bool) -> Self {
        self.prefer_own = prefer;
        self
    }

    /// Has this pool's spawners exec `ringfence-agent --init` for each sandbox, as before they
    /// forked it (benchmarking of what forking saves only).
    pub fn exec_agents(mut self, exec: bool) -> Self {
        self.exec_agents = exec;
        self
    }

    /// Where the spawner of `slot` for the current agent executable listens.
    fn spawner_socket(&self, slot: u32) -> Option<(PathBuf, &PathBuf)> {
        let exe = self.spawner_exe.as_ref()?;
        let tag = self.tag()?;
        Some((self.lock_dir.join(format!("{}-{slot}.{tag}.spawner", self.prefix)), exe))
    }

    /// Slots with a spawner of this pool's agent build parked (its socket in the lock
    /// directory), lowest first; none without spawners.
    fn own_spawner_slots(&self) -> Vec<u32> {
        let Some(tag) = self.tag() else {
            return Vec::new();
        };
        let (head, tail) = (format!("{}-", self.prefix), format!(".{tag}.spawner"));
        let Ok(entries) = fs::read_dir(&self.lock_dir) else { return Vec::new() };
        let mut slots: Vec<u32> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&head)?.strip_suffix(&tail)?.parse().ok()
            })
            .collect();
        slots.sort_unstable();
        slots
    }

    /// The spawner of `slot`: the one already parked there, or a new one. Any other spawner in
    /// the slot (another build's) goes: each would hold one of the slot's pids. Found among the
    /// slot's own processes (host root in the host's user namespace: `is_spawner`) and named
    /// by their command lines, neither by listing the lock directory (which holds every
    /// server's slot files too: 330 entries on a development host, listed at every claim) nor
    /// by connecting to the socket to learn its listener (which woke the spawner for nothing).
    fn spawner(&self, lease: &Lease, spawners: Vec<i32>) -> Option<crate::spawner::Spawner> {
        use crate::spawner::Spawner;
        let (socket, exe) = self.spawner_socket(lease.slot)?;
        let mut parked = None;
        for pid in spawners {
            // Only what runs as a spawner (a `--socket` on its command line) is stopped, and
            // only a socket of this lock directory removed: a path read from a process is not
            // taken as one to delete anywhere else.
            let Some(theirs) = crate::spawner::socket_of(pid) else { continue };
            if theirs == socket && parked.is_none() {
                parked = Some(pid);
            } else {
                let ours_to_remove = theirs.parent() == Some(self.lock_dir.as_path())
                    && theirs.extension().is_some_and(|e| e == "spawner");
                crate::spawner::stop_pid(pid, ours_to_remove.then_some(theirs.as_path()));
            }
        }
        match parked {
            Some(_) if socket.exists() => {
                return Some(Spawner::at(&socket).exec_agents(self.exec_agents));
            }
            // Ours, its socket removed (stopped by someone, on its way out): not left beside
            // the one started below, where it would hold one of the slot's pids meanwhile.
            Some(pid) => crate::spawner::stop_pid(pid, None),
            None => {}
        }
        // Our socket without our spawner in the slot: a dead one's, or one found outside its
        // slot, whose sandboxes would run with none of the slot's limits (a child is born in
        // its parent's cgroups; seen once under the tests' load: a spawner in the root
        // cgroups, its socket in place). Replaced, not reused.
        if socket.exists() {
            if Spawner::existing_with_pid(&socket).is_some() {
                tracing::warn!(slot = lease.slot, "a spawner outside its slot is replaced");
            }
            crate::spawner::stop(&socket);
        }
        let park =
            |pid| lease.add(pid).map_err(|e| crate::spawner::SpawnerError::Refused(e.to_string()));
        // A one-shot run's process stays single-threaded (see `Spawner::start`).
        match Spawner::start(&socket, exe, park, !self.prefer_own) {
            Ok(s) => Some(s.exec_agents(self.exec_agents)),
            Err(e) => {
                // Not a failure of the sandbox: it is moved into the slot instead (slower).
                tracing::info!(slot = lease.slot, error = %e, "no spawner: this slot's sandboxes are moved into it");
                None
            }
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn slot_dirs(&self, slot: u32) -> Vec<PathBuf> {
        let leaf = format!("{}/{}-{slot}", self.name, self.prefix);
        match &self.layout {
            Layout::V2 { root } => vec![root.join(leaf)],
            Layout::V1 { memory, pids, cpu, freezer } => {
                let mut dirs = vec![memory.join(&leaf), pids.join(&leaf), cpu.join(&leaf)];
                // Last, so the positions of the others do not depend on it.
                dirs.extend(freezer.iter().map(|f| f.join(&leaf)));
                dirs
            }
        }
    }

    fn ensure_parent(&self) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { root } => {
                let parent = root.join(&self.name);
                if !parent.exists() {
                    fs::create_dir_all(&parent).map_err(io_err("mkdir", &parent))?;
                }
                // Children can only use controllers their parent delegates.
                for dir in [root.as_path(), parent.as_path()] {
                    let ctl = dir.join("cgroup.subtree_control");
                    let current = ringfence_sys::read_text(&ctl).unwrap_or_default();
                    if !["memory", "pids", "cpu"]
                        .iter()
                        .all(|c| current.split_whitespace().any(|x| x == *c))
                    {
                        write_file(&ctl, "+memory +pids +cpu")?;
                    }
                }
                Ok(())
            }
            Layout::V1 { .. } => Ok(()),
        }
    }

    fn lock_path(&self, slot: u32) -> PathBuf {
        self.lock_dir.join(format!("{}-{slot}.lock", self.prefix))
    }

    /// Takes a slot's lock without waiting; `None` if another process holds it.
    fn try_lock(&self, slot: u32) -> Result<Option<Flock<File>>, CgroupError> {
        let path = self.lock_path(slot);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
    }

    /// Whether a slot whose lock this process has just taken holds a sandbox kept for a
    /// server (see [`Pool::kept_for`]) that this claim or sweep must leave alone: its data
    /// directory still exists (the server may come back for it) and something of the sandbox
    /// still runs there. A sweep (`sweeping`) takes what was kept for this pool's own server.
    /// A directory that is gone can re-attach nothing, and an empty slot holds nothing to lose.
    fn kept_elsewhere(&self, lock: &Flock<File>, slot: u32, sweeping: bool) -> bool {
        let Some(kept) = kept_by(lock) else { return false };
        if sweeping && self.owner.as_deref() == Some(kept.as_str()) {
            return false;
        }
        if !Path::new(&kept).is_dir() {
            return false;
        }
        pids_in(&self.slot_dirs(slot)[0]).into_iter().any(|p| !crate::spawner::is_spawner(p))
    }

    /// Leases a free slot, sweeps anything a dead owner left in it, and applies `limits`.
    pub fn claim(&self, limits: &Limits) -> Result<Lease, CgroupError> {
        self.claim_from(limits, true)
    }

    /// [`Pool::claim`]; without `reuse_released`, the slots this process let go of are left
    /// for the others' claims (see [`Pool::prepare_more`]).
    fn claim_from(&self, limits: &Limits, reuse_released: bool) -> Result<Lease, CgroupError> {
        fs::create_dir_all(&self.lock_dir).map_err(io_err("mkdir", &self.lock_dir))?;
        // Slots this process let go of first (lowest first), then upwards from the highest it
        // has held, then the rest: the first whose lock is free.
        let (released, next) = match self.hint.lock() {
            Ok(mut h) if reuse_released => (std::mem::take(&mut h.released), h.next),
            Ok(h) => (Default::default(), h.next),
            Err(_) => (Default::default(), 0),
        };
        // Then, where asked, the slots where a spawner of this build is parked (see
        // `prefer_own_spawners`). Where the first slot to try has one, it is tried alone first:
        // the listing that finds the others reads every slot file of the lock directory.
        let first_is_own = self.prefer_own
            && released.is_empty()
            && self.spawner_socket(next).is_some_and(|(s, _)| s.exists());
        let quick = match first_is_own {
            true => self.try_lock(next)?.filter(|lock| !self.kept_elsewhere(lock, next, false)),
            false => None,
        };
        let own = match (&quick, self.prefer_own) {
            (None, true) => self.own_spawner_slots(),
            _ => Vec::new(),
        };
        let mut candidates = released
            .iter()
            .copied()
            .chain(own.iter().copied().filter(|s| !released.contains(s)))
            .chain(next..MAX_SLOTS)
            .chain(0..next);
        let mut tried_released = 0;
        let found = if let Some(lock) = quick {
            Some((next, lock))
        } else {
            loop {
                let Some(slot) = candidates.next() else { break None };
                if tried_released < released.len() {
                    tried_released += 1;
                }
                if let Some(lock) = self.try_lock(slot)? {
                    // Even this pool's own: a restarted server re-attaches before it claims, and
                    // what it did not re-attach its sweep ends, not a claim.
                    if self.kept_elsewhere(&lock, slot, false) {
                        continue;
                    }
                    break Some((slot, lock));
                }
            }
        };
        // Released slots not tried this time stay hints for the next claim.
        if let Ok(mut h) = self.hint.lock() {
            h.released.extend(released.iter().copied().skip(tried_released));
            if let Some((slot, _)) = &found {
                h.released.remove(slot);
                h.next = h.next.max(slot + 1);
            }
        }
        if let Some((slot, lock)) = found {
            let dirs = self.slot_dirs(slot);
            // Every hierarchy, not just the first: a slot made by an older build may lack one
            // added since (the freezer's).
            if dirs.iter().any(|d| !d.exists()) {
                self.ensure_parent()?;
                for d in &dirs {
                    fs::create_dir_all(d).map_err(io_err("mkdir", d))?;
                }
            }
            let mut lease = Lease::new(slot, dirs, self.layout.clone(), lock);
            lease.hint = Some(self.hint.clone());
            lease.keep(self.owner.as_deref(), &self.lock_path(slot))?;
            // Whatever is still inside belongs to an owner that died without cleaning up.
            // What is left is the slot's spawners: nothing can join the slot while we hold it.
            let spawners = lease.kill_all_but_spawners()?;
            lease.apply(limits)?;
            lease.spawner = self.spawner(&lease, spawners);
            lease.set_baselines();
            return Ok(lease);
        }
        Err(CgroupError::Exhausted(MAX_SLOTS))
    }

    /// Makes `n` slots ready for this process's next claims and lets them go again: each
    /// slot's directories exist, `limits` are written and, with spawners, one is parked there
    /// (the slot's first claim pays its start and its move into the slot, an RCU grace period
    /// on cgroup v1). Released, they are the first ones the next claims try. Returns how many
    /// were made ready (fewer where the pool ran out).
    pub fn prepare(&self, n: usize, limits: &Limits) -> Result<usize, CgroupError> {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(self.claim(limits)?);
        }
        Ok(held.len())
    }

    /// Makes `n` more slots ready as [`Pool::prepare`] does, leaving the ready ones to the
    /// claims that come meanwhile: only slots this process has never held are claimed.
    /// Returns how many were made ready.
    pub fn prepare_more(&self, n: usize, limits: &Limits) -> Result<usize, CgroupError> {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(self.claim_from(limits, false)?);
        }
        Ok(held.len())
    }

    /// How many slots this process has let go of and not claimed again: those [`Pool::prepare`]
    /// made ready and those its sandboxes left, each with its directories, limits and, with
    /// spawners, a parked spawner. The next claims take them first.
    pub fn ready(&self) -> usize {
        self.hint.lock().map(|h| h.released.len()).unwrap_or(0)
    }

    /// Takes the lock of a specific slot without touching its processes or limits, to
    /// reattach to a sandbox an earlier process started there. Fails if someone holds it.
    pub fn adopt(&self, slot: u32) -> Result<Lease, CgroupError> {
        let lock = self.try_lock(slot)?.ok_or_else(|| CgroupError::Io {
            op: "flock",
            path: self.lock_path(slot),
            source: std::io::Error::other("slot is held by another process"),
        })?;
        let mut lease = Lease::new(slot, self.slot_dirs(slot), self.layout.clone(), lock);
        lease.keep(self.owner.as_deref(), &self.lock_path(slot))?;
        // Perhaps paused by the process that held it before.
        lease.may_be_frozen.store(true, std::sync::atomic::Ordering::Relaxed);
        // As at a claim, only a spawner parked in the slot (see `Pool::spawner`).
        lease.spawner = self
            .spawner_socket(slot)
            .and_then(|(socket, _)| crate::spawner::Spawner::existing_with_pid(&socket))
            .filter(|(_, pid)| lease.all_procs().contains(pid))
            .map(|(s, _)| s.exec_agents(self.exec_agents));
        lease.set_baselines();
        Ok(lease)
    }

    /// Kills the contents of every slot nobody holds, and removes those slots' directories.
    /// Slots kept for another server's re-attach ([`Pool::kept_for`]) are left alone.
    /// Returns how many processes were killed.
    pub fn collect_garbage(&self) -> Result<usize, CgroupError> {
        let mut killed = 0;
        let Ok(entries) = fs::read_dir(&self.lock_dir) else { return Ok(0) };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(slot) = name
                .strip_prefix(&format!("{}-", self.prefix))
                .and_then(|s| s.strip_suffix(".lock"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(file) = File::options().read(true).write(true).open(entry.path()) else {
                continue;
            };
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else { continue };
            if self.kept_elsewhere(&lock, slot, true) {
                continue;
            }
            let was_kept = kept_by(&lock).is_some();
            let mut lease = Lease::new(slot, self.slot_dirs(slot), self.layout.clone(), lock);
            // Swept, it is no longer anyone's: the lease's drop empties the lock file.
            lease.kept = was_kept;
            killed += lease.procs().len();
            lease.kill_all()?;
            // And its spawner: nothing holds the slot, whose directories go now.
            for pid in lease.all_procs() {
                let _ = ringfence_sys::kill(pid, libc::SIGKILL);
            }
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while !lease.all_procs().is_empty() && std::time::Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            for d in &lease.dirs {
                if d.exists() {
                    fs::remove_dir(d).map_err(io_err("rmdir", d))?;
                }
            }
        }
        Ok(killed)
    }
}

/// A slot held by one sandbox. Dropping it kills anything still inside and frees the slot.
#[derive(Debug)]
pub struct Lease {
    slot: u32,
    /// One directory per hierarchy; the first is the memory controller's.
    dirs: Vec<PathBuf>,
    layout: Layout,
    /// The slot's lock; `None` once let go of (while the lease is being dropped, or after
    /// [`Lease::release_unwaited`]).
    lock: Option<Flock<File>>,
    /// Told of the slot when this lease lets go of it (see [`SlotHint`]).
    hint: Option<Arc<Mutex<SlotHint>>>,
    /// The lock file names a server's data directory (see [`Pool::kept_for`]), emptied when
    /// this lease lets go.
    kept: bool,
    /// The slot's spawner, if one is parked there (see [`crate::spawner`]).
    spawner: Option<crate::spawner::Spawner>,
    /// Counters as they stood when this lease began: slots are reused, and their counters
    /// keep counting across owners.
    oom_base: u64,
    pids_base: u64,
    cpu_base: u64,
    /// v1 without co-mounted cpuacct: the CPU total summed from procfs, kept monotonic (an
    /// exited process's time is invisible until its parent reaps it).
    cpu_procfs: std::sync::atomic::AtomicU64,
    /// The slot may be frozen: this lease froze it ([`Lease::freeze`]), or it was adopted as
    /// another process left it. A claim thaws what it finds frozen, so a lease that never froze
    /// its slot skips the freezer at its end ([`Lease::thaw_if_frozen`]).
    may_be_frozen: std::sync::atomic::AtomicBool,
}

/// What a sandbox's cgroup says about its resource use, since its slot was claimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory charged now (bytes), page cache included, as the limit counts it.
    pub memory_bytes: u64,
    /// Of that, page cache (bytes).
    pub memory_cache_bytes: u64,
    /// The memory limit (bytes); `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// CPU time used (nanoseconds); `None` where the host does not account it.
    pub cpu_ns: Option<u64>,
    /// Processes killed for going over the memory limit.
    pub oom_kills: u64,
    /// Forks refused because the pids limit was reached.
    pub pids_max_hits: u64,
    /// Processes and threads now.
    pub pids_current: u64,
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = OpenOptions::new().write(true).open(path).map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Writes a CPU bandwidth file (`cpu.max`, `cpu.cfs_period_us`, `cpu.cfs_quota_us`) unless it
/// already holds `value`, as a reused slot's usually does. Every write of one of these
/// takes the kernel's global bandwidth mutex and walks every CPU cgroup on the host to check
/// the new quota against its parents' (`tg_set_cfs_bandwidth`): ~0.2 ms a write with the
/// ~5,000 CPU cgroups of the development host, and concurrent creates queue on that mutex.
/// Reading one back is a lookup; the kernel prints these files in the form written here.
fn write_cpu_bandwidth(path: &Path, value: &str) -> Result<(), CgroupError> {
    if ringfence_sys::read_text(path).is_ok_and(|now| now.trim() == value) {
        return Ok(());
    }
    write_file(path, value)
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = ringfence_sys::read_text(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok()).flatten()
    })
}

/// utime + stime + cutime + cstime of a process, in nanoseconds.
fn proc_cpu_ns(pid: i32) -> Option<u64> {
    let stat = ringfence_sys::read_text(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) .. cstime (17) are at 11..=14 here.
    let ticks: u64 = fields
        .get(11..=14)?
        .iter()
        .filter_map(|f| f.parse::<i64>().ok())
        .map(|t| t.max(0) as u64)
        .sum();
    Some(ticks * (1_000_000_000 / clock_ticks()))
}

/// The kernel's USER_HZ, what procfs times count in.
fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100, |t| t as u64)
}

fn read_u64(path: &Path) -> Option<u64> {
    ringfence_sys::read_text(path).ok()?.trim().parse().ok()
}

/// v1 reports "no limit" as the largest page-aligned i64; v2 as the word "max".
const V1_UNLIMITED: u64 = 1 << 62;

impl Lease {
    fn new(slot: u32, dirs: Vec<PathBuf>, layout: Layout, lock: Flock<File>) -> Lease {
        Lease {
            slot,
            dirs,
            layout,
            lock: Some(lock),
            hint: None,
            kept: false,
            spawner: None,
            oom_base: 0,
            pids_base: 0,
            cpu_base: 0,
            cpu_procfs: Default::default(),
            may_be_frozen: Default::default(),
        }
    }

    fn set_baselines(&mut self) {
        self.oom_base = self.oom_kills_total();
        self.pids_base = self.pids_max_total();
        self.cpu_base = self.cpu_ns_total().unwrap_or(0);
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The slot's spawner, which starts sandboxes inside the slot.
    pub fn spawner(&self) -> Option<&crate::spawner::Spawner> {
        self.spawner.as_ref()
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { .. } => {
                let d = &self.dirs[0];
                let mem = l.memory.map_or("max".to_string(), |m| m.to_string());
                write_file(&d.join("memory.max"), &mem)?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                }
                // One more than the sandbox's own: room for the slot's spawner.
                write_file(
                    &d.join("pids.max"),
                    &l.pids.map_or("max".into(), |p| (p + 1).to_string()),
                )?;
                let cpu =
                    l.cpu_millis.map_or("max 100000".into(), |m| format!("{} 100000", m * 100));
                write_cpu_bandwidth(&d.join("cpu.max"), &cpu)?;
            }
            Layout::V1 { .. } => {
                let (mem, pids, cpu) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
                let limit = l.memory.map_or("-1".to_string(), |m| m.to_string());
                // memsw must stay >= the memory limit at every step: open it up first.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                let has_memsw = memsw.exists();
                if has_memsw {
                    write_file(&memsw, "-1")?;
                }
                write_file(&mem.join("memory.limit_in_bytes"), &limit)?;
                if has_memsw {
                    write_file(&memsw, &limit)?;
                }
                // Reset the high-water mark so each sandbox reports its own peak.
                let _ = write_file(&mem.join("memory.max_usage_in_bytes"), "0");
                // One more than the sandbox's own: room for the slot's spawner.
                write_file(
                    &pids.join("pids.max"),
                    &l.pids.map_or("max".into(), |p| (p + 1).to_string()),
                )?;
                write_cpu_bandwidth(&cpu.join("cpu.cfs_period_us"), "100000")?;
                let quota = l.cpu_millis.map_or("-1".to_string(), |m| (m * 100).to_string());
                write_cpu_bandwidth(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            }
        }
        Ok(())
    }

    /// Moves `pid` (a host pid) into the slot in every hierarchy.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Host pids of the sandbox's processes in the slot (its spawner is not one of them).
    pub fn procs(&self) -> Vec<i32> {
        self.all_procs().into_iter().filter(|p| !crate::spawner::is_spawner(*p)).collect()
    }

    /// Every host pid in the slot, its spawner's included.
    fn all_procs(&self) -> Vec<i32> {
        pids_in(&self.dirs[0])
    }

    /// The file that freezes and thaws the slot, and the words it takes.
    fn freezer(&self) -> Option<(PathBuf, &'static str, &'static str)> {
        match &self.layout {
            Layout::V2 { .. } => Some((self.dirs[0].join("cgroup.freeze"), "1", "0")),
            Layout::V1 { freezer: Some(_), .. } => {
                self.dirs.last().map(|d| (d.join("freezer.state"), "FROZEN", "THAWED"))
            }
            Layout::V1 { freezer: None, .. } => None,
        }
    }

    /// Stops every process in the slot; returns once the kernel reports them all frozen.
    ///
    /// cgroup v1's freezer can stay FREEZING for good when a process forks as the freeze
    /// lands: measured here (kernel 6.18), a shell looping over `sleep` left its parent in
    /// `kernel_clone` (waiting for a child frozen first), itself never frozen, in 1-3 of 200
    /// freezes (the test below failed 6 runs of 6 that way with a loop that only polled, as
    /// CI's pause/resume contract once did). Writing FROZEN again walks the slot's tasks again
    /// and freezes the one missed (6 runs of 6 with none stuck); a brief thaw now and then
    /// lets a slot whose processes keep forking settle. v2 has no such race.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        let Some((file, frozen, thawed)) = self.freezer() else {
            return Err(CgroupError::Io {
                op: "freeze",
                path: self.dirs[0].clone(),
                source: io::Error::other("no freezer controller on this host"),
            });
        };
        // Set before the write: a write that fails half way may still have frozen some.
        self.may_be_frozen.store(true, std::sync::atomic::Ordering::Relaxed);
        write_file(&file, frozen)?;
        let v1 = matches!(self.layout, Layout::V1 { .. });
        let start = Instant::now();
        let mut polls = 0u32;
        // v1 reports FREEZING until every task has stopped; v2 sets `frozen 1` in cgroup.events.
        while start.elapsed() < FREEZE_WITHIN {
            let done = if v1 {
                ringfence_sys::read_text(&file).is_ok_and(|s| s.trim() == "FROZEN")
            } else {
                read_key(&self.dirs[0].join("cgroup.events"), "frozen") == Some(1)
            };
            if done {
                return Ok(());
            }
            polls += 1;
            if v1 {
                if polls.is_multiple_of(100) {
                    write_file(&file, thawed)?;
                    thread::sleep(Duration::from_millis(1));
                }
                write_file(&file, frozen)?;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let stuck = self.unfrozen_tasks();
        let _ = self.thaw();
        Err(CgroupError::Io {
            op: "freeze",
            path: file,
            source: io::Error::other(format!(
                "tasks did not freeze within {} s (not frozen: {stuck})",
                FREEZE_WITHIN.as_secs()
            )),
        })
    }

    /// The slot's tasks not in the freezer's wait, each as `pid comm state wchan`, for an
    /// error that says where the freeze stuck (all of them where none sits in the freezer).
    fn unfrozen_tasks(&self) -> String {
        let mut out = Vec::new();
        for pid in self.all_procs() {
            let tasks = fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default();
            for tid in tasks {
                let tid = tid.to_string_lossy();
                let base = format!("/proc/{pid}/task/{tid}");
                let wchan = ringfence_sys::read_text(format!("{base}/wchan")).unwrap_or_default();
                if wchan.contains("refrigerator") {
                    continue;
                }
                // Named by the sandbox's code (any bytes but NUL): printable only, for the log.
                let comm: String = ringfence_sys::read_text(format!("{base}/comm"))
                    .unwrap_or_default()
                    .trim()
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                let state = ringfence_sys::read_text(format!("{base}/stat"))
                    .ok()
                    .and_then(|s| {
                        Some(s.rsplit_once(')')?.1.split_whitespace().next()?.to_string())
                    })
                    .unwrap_or_default();
                out.push(format!("{tid} {comm} {state} {wchan}"));
            }
        }
        if out.is_empty() { "none found".to_string() } else { out.join(", ") }
    }

    /// Lets a frozen slot run again (a no-op if it is not frozen).
    pub fn thaw(&self) -> Result<(), CgroupError> {
        match self.freezer() {
            Some((file, _, thawed)) if file.exists() => write_file(&file, thawed),
            _ => Ok(()),
        }
    }

    /// [`Lease::thaw`], where the slot may be frozen (see `may_be_frozen`): a sandbox killed
    /// takes its SIGKILL only once thawed.
    pub fn thaw_if_frozen(&self) -> Result<(), CgroupError> {
        if self.may_be_frozen.load(std::sync::atomic::Ordering::Relaxed) {
            self.thaw()?;
        }
        Ok(())
    }

    /// Whether the slot is frozen (or freezing).
    pub fn is_frozen(&self) -> bool {
        match self.freezer() {
            Some((file, _, thawed)) => ringfence_sys::read_text(file)
                .is_ok_and(|s| !s.trim().is_empty() && s.trim() != thawed),
            None => false,
        }
    }

    /// SIGKILLs every process in the slot until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_but_spawners().map(drop)
    }

    /// [`Lease::kill_all`], returning the spawners (which it spares) as it last saw them.
    fn kill_all_but_spawners(&self) -> Result<Vec<i32>, CgroupError> {
        if let Layout::V2 { .. } = self.layout {
            let kill = self.dirs[0].join("cgroup.kill");
            if kill.exists() && !self.procs().is_empty() {
                write_file(&kill, "1")?;
            }
        }
        // Frozen tasks take their SIGKILL only once thawed (v1): send, then thaw.
        let thaw_after = self.is_frozen();
        // New processes may appear while we kill (a fork in flight); repeat until stable.
        for round in 0..200 {
            let (spawners, procs): (Vec<i32>, Vec<i32>) =
                self.all_procs().into_iter().partition(|p| crate::spawner::is_spawner(*p));
            if procs.is_empty() {
                // A slot left frozen would freeze its next sandbox at birth.
                if thaw_after {
                    self.thaw()?;
                }
                return Ok(spawners);
            }
            for pid in procs {
                let _ = ringfence_sys::kill(pid, libc::SIGKILL);
            }
            if thaw_after {
                let _ = self.thaw();
            }
            thread::sleep(Duration::from_millis(if round < 10 { 1 } else { 10 }));
        }
        let d = &self.dirs[0];
        Err(CgroupError::Io {
            op: "kill",
            path: d.clone(),
            source: io::Error::other("processes survived repeated SIGKILL"),
        })
    }

    fn oom_kills_total(&self) -> u64 {
        match &self.layout {
            Layout::V2 { .. } => read_key(&self.dirs[0].join("memory.events"), "oom_kill"),
            // memory.failcnt stays 0 on some v1 kernels even after an OOM kill; oom_control's
            // counter is reliable.
            Layout::V1 { .. } => read_key(&self.dirs[0].join("memory.oom_control"), "oom_kill"),
        }
        .unwrap_or(0)
    }

    /// OOM kills inside this sandbox since the slot was claimed.
    pub fn oom_kills(&self) -> u64 {
        self.oom_kills_total().saturating_sub(self.oom_base)
    }

    /// The pids controller's directory (the same as memory's on v2).
    fn pids_dir(&self) -> &Path {
        match &self.layout {
            Layout::V2 { .. } => &self.dirs[0],
            Layout::V1 { .. } => &self.dirs[1],
        }
    }

    fn pids_max_total(&self) -> u64 {
        read_key(&self.pids_dir().join("pids.events"), "max").unwrap_or(0)
    }

    /// Total CPU time of the slot in nanoseconds: v2's `cpu.stat usage_usec`, v1's
    /// `cpuacct.usage` where cpuacct is co-mounted with cpu. Elsewhere (v1 with cpuacct mounted
    /// apart, as on this project's CI hosts) attaching every sandbox to one more hierarchy
    /// would cost each start a migration and each context switch a charge, so the time is
    /// summed from procfs instead: every process in the slot, its own time and that of the
    /// children it reaped. That misses only processes reaped from outside the slot (entries
    /// of the interpreter's fork server, once they exit).
    fn cpu_ns_total(&self) -> Option<u64> {
        match &self.layout {
            Layout::V2 { .. } => {
                read_key(&self.dirs[0].join("cpu.stat"), "usage_usec").map(|us| us * 1000)
            }
            Layout::V1 { .. } => read_u64(&self.dirs[2].join("cpuacct.usage")).or_else(|| {
                let sum = self.procs().into_iter().filter_map(proc_cpu_ns).sum::<u64>();
                let seen = self.cpu_procfs.fetch_max(sum, std::sync::atomic::Ordering::Relaxed);
                Some(seen.max(sum))
            }),
        }
    }

    /// OOM kills and forks refused at the pids limit since the claim: two files, for callers
    /// that only need to notice new events.
    pub fn limit_events(&self) -> (u64, u64) {
        (self.oom_kills(), self.pids_max_total().saturating_sub(self.pids_base))
    }

    /// Memory charged now (bytes) and CPU time since the claim (ns, where accounted): two
    /// files, for per-action resource figures.
    pub fn memory_cpu(&self) -> (u64, Option<u64>) {
        let file = match &self.layout {
            Layout::V2 { .. } => "memory.current",
            Layout::V1 { .. } => "memory.usage_in_bytes",
        };
        let mem = read_u64(&self.dirs[0].join(file)).unwrap_or(0);
        (mem, self.cpu_ns_total().map(|t| t.saturating_sub(self.cpu_base)))
    }

    /// Memory, CPU and limit events of the slot since it was claimed (counters are relative
    /// to the claim; gauges are as they are now).
    pub fn usage(&self) -> Usage {
        let mem = &self.dirs[0];
        let (memory_bytes, memory_limit, cache) = match &self.layout {
            Layout::V2 { .. } => {
                let limit = ringfence_sys::read_text(mem.join("memory.max")).ok();
                (
                    read_u64(&mem.join("memory.current")),
                    limit.and_then(|l| l.trim().parse().ok()),
                    read_key(&mem.join("memory.stat"), "file"),
                )
            }
            Layout::V1 { .. } => (
                read_u64(&mem.join("memory.usage_in_bytes")),
                read_u64(&mem.join("memory.limit_in_bytes")).filter(|l| *l < V1_UNLIMITED),
                read_key(&mem.join("memory.stat"), "cache"),
            ),
        };
        Usage {
            memory_bytes: memory_bytes.unwrap_or(0),
            memory_cache_bytes: cache.unwrap_or(0),
            memory_limit,
            cpu_ns: self.cpu_ns_total().map(|t| t.saturating_sub(self.cpu_base)),
            oom_kills: self.oom_kills(),
            pids_max_hits: self.pids_max_total().saturating_sub(self.pids_base),
            pids_current: read_u64(&self.pids_dir().join("pids.current"))
                .unwrap_or(0)
                .saturating_sub(u64::from(self.spawner.is_some())),
        }
    }

    /// Peak memory use (bytes) since the slot was claimed, where the kernel reports it.
    pub fn memory_peak(&self) -> Option<u64> {
        let file = match &self.layout {
            Layout::V2 { .. } => "memory.peak",
            Layout::V1 { .. } => "memory.max_usage_in_bytes",
        };
        ringfence_sys::read_text(self.dirs[0].join(file)).ok()?.trim().parse().ok()
    }
}

/// The data directory a server's lease wrote into a slot's lock file (see [`Pool::kept_for`]),
/// if any: the slot's sandbox outlived that server and waits for it.
fn kept_by(lock: &Flock<File>) -> Option<String> {
    use std::os::unix::fs::FileExt;
    // Empty, as nearly every lock file is: one `fstat`, no read.
    let len = lock.metadata().ok()?.len();
    if len == 0 {
        return None;
    }
    // A path, written whole by `Lease::keep`; read from the start whatever the file offset.
    let mut buf = vec![0u8; usize::try_from(len).ok()?.min(MAX_KEPT_PATH)];
    let n = lock.read_at(&mut buf, 0).ok()?;
    let dir = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    (!dir.is_empty()).then_some(dir)
}

/// Every host pid in the cgroup directory `dir` (none if it cannot be read).
fn pids_in(dir: &Path) -> Vec<i32> {
    ringfence_sys::read_text(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// How long [`Lease::freeze`] waits for the kernel to report a slot frozen.
const FREEZE_WITHIN: Duration = Duration::from_secs(2);

/// The longest path a lock file is read for.
const MAX_KEPT_PATH: usize = 4096;

impl Lease {
    /// Writes `owner`, a server's data directory, into the slot's lock file while this lease
    /// holds it (see [`Pool::kept_for`]); `None` leaves the file as it is.
    fn keep(&mut self, owner: Option<&str>, path: &Path) -> Result<(), CgroupError> {
        use std::os::unix::fs::FileExt;
        let (Some(owner), Some(lock)) = (owner, &self.lock) else { return Ok(()) };
        let len = owner.len() as u64;
        let now = lock.metadata().map(|m| m.len()).unwrap_or(0);
        lock.write_all_at(owner.as_bytes(), 0).map_err(io_err("write", path))?;
        if now != len {
            lock.set_len(len).map_err(io_err("truncate", path))?;
        }
        self.kept = true;
        Ok(())
    }

    /// Lets the slot go now, its processes sent SIGKILL but not waited for: for a sandbox
    /// whose agent has been killed and is watched elsewhere (through its pidfd), and whose
    /// end is mostly the kernel's teardown of its namespaces. A process that has begun to
    /// exit is no longer listed in the slot, and the slot's next claimant kills and waits for
    /// anything still listed ([`Pool::claim`]), so nothing of this sandbox runs beside the
    /// next one there.
    pub fn release_unwaited(mut self) {
        let frozen =
            self.may_be_frozen.load(std::sync::atomic::Ordering::Relaxed) && self.is_frozen();
        for pid in self.procs() {
            let _ = ringfence_sys::kill(pid, libc::SIGKILL);
        }
        if frozen {
            let _ = self.thaw();
        }
        self.unlock();
    }

    /// Unlocks the slot and offers it to this process's next claim; `Drop` then does nothing.
    fn unlock(&mut self) {
        // No longer kept for anyone: emptied while still locked, so no claimant reads a
        // half-way state.
        if self.kept
            && let Some(lock) = &self.lock
            && let Err(e) = lock.set_len(0)
        {
            tracing::warn!(slot = self.slot, error = %e, "emptying a cgroup slot's lock file");
        }
        // Unlocked before it is offered, so a claim that takes the hint finds the lock free.
        drop(self.lock.take());
        if let Some(h) = &self.hint
            && let Ok(mut h) = h.lock()
        {
            h.released.insert(self.slot);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.lock.is_none() {
            // Released already (`release_unwaited`).
            return;
        }
        if let Err(e) = self.kill_all() {
            tracing::warn!(slot = self.slot, error = %e, "could not empty cgroup slot");
        }
        self.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_claims_look_first_where_this_builds_spawner_is_parked() {
        let locks = tempfile::tempdir().unwrap();
        let exe = locks.path().join("agent");
        std::fs::write(&exe, b"one build").unwrap();
        let other = locks.path().join("other-agent");
        std::fs::write(&other, b"another build").unwrap();
        let tag = crate::spawner::binary_tag(&exe).unwrap();
        let their = crate::spawner::binary_tag(&other).unwrap();
        assert_ne!(tag, their);
        for name in [
            format!("run-7.{tag}.spawner"),
            format!("run-3.{tag}.spawner"),
            format!("run-1.{their}.spawner"),
            format!("other-2.{tag}.spawner"),
            "run-3.lock".to_string(),
            format!("run-x.{tag}.spawner"),
        ] {
            std::fs::write(locks.path().join(name), b"").unwrap();
        }
        let layout = Layout::V2 { root: locks.path().join("cgroup") };
        let pool =
            Pool::new(layout, "ringfence", "run", locks.path().to_path_buf()).with_spawners(exe);
        assert_eq!(pool.own_spawner_slots(), [3, 7], "this build's, of this prefix, in order");
        let without = Pool::new(Layout::V2 { root: locks.path().into() }, "r", "run", "/x".into());
        assert!(without.own_spawner_slots().is_empty(), "no spawners, no preference");
    }

    /// A pool on this host's real cgroups, its slots named `{tag}{pid}` and its locks in a
    /// directory of its own (kept alive by the caller); `None`, said as SKIPPED, where this
    /// process cannot make cgroups.
    fn real_pool(tag: &str) -> Option<(Pool, Layout, tempfile::TempDir)> {
        if ringfence_sys::euid() != 0 {
            eprintln!("SKIPPED: needs root (cgroups)");
            return None;
        }
        let Ok(layout) = Layout::detect() else {
            eprintln!("SKIPPED: no usable cgroup hierarchy");
            return None;
        };
        let locks = tempfile::tempdir().unwrap();
        let prefix = format!("{tag}{}", std::process::id());
        let pool = Pool::new(layout.clone(), "ringfence", &prefix, locks.path().to_path_buf());
        Some((pool, layout, locks))
    }

    #[test]
    fn a_reused_slot_gets_a_changed_cpu_quota_and_keeps_an_unchanged_one_unwritten() {
        let Some((pool, layout, _locks)) = real_pool("cpuq") else { return };
        let file = match &layout {
            Layout::V2 { .. } => "cpu.max",
            Layout::V1 { .. } => "cpu.cfs_quota_us",
        };
        let quota = |lease: &Lease| {
            let dir = match &layout {
                Layout::V2 { .. } => &lease.dirs[0],
                Layout::V1 { .. } => &lease.dirs[2],
            };
            (dir.join(file), fs::read_to_string(dir.join(file)).unwrap().trim().to_string())
        };
        let half = Limits { cpu_millis: Some(500), ..Limits::default() };
        let lease = pool.claim(&half).unwrap();
        let (path, q) = quota(&lease);
        assert!(q == "50000" || q == "50000 100000", "half a CPU: {q}");
        // A sysfs file's mtime moves with each write: the same limits leave it alone.
        let written = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(lease);
        let lease = pool.claim(&half).unwrap();
        assert_eq!(quota(&lease).0, path, "the released slot again");
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), written, "rewritten");
        drop(lease);
        // Other limits on the same slot are written.
        let lease = pool.claim(&Limits { cpu_millis: None, ..Limits::default() }).unwrap();
        let (_, q) = quota(&lease);
        assert!(q == "-1" || q == "max 100000", "no CPU limit: {q}");
        let slot = lease.slot();
        drop(lease);
        let dirs = pool.slot_dirs(slot);
        pool.collect_garbage().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "slot directories left: {dirs:?}");
    }

    #[test]
    fn a_claim_takes_a_released_slot_first_then_goes_on_from_the_highest() {
        let Some((pool, _, _locks)) = real_pool("hint") else { return };
        let limits = Limits::default();
        let a = pool.claim(&limits).unwrap();
        let b = pool.claim(&limits).unwrap();
        let c = pool.claim(&limits).unwrap();
        assert_eq!((a.slot(), b.slot(), c.slot()), (0, 1, 2));
        // Another process holds slot 3 (a lock taken outside this pool's hint).
        let other = pool.try_lock(3).unwrap().unwrap();
        drop(b);
        assert_eq!(pool.claim(&limits).unwrap().slot(), 1, "the released slot, first");
        // That lease is gone again at once: 1 is free, and is again the first choice.
        let again = pool.claim(&limits).unwrap();
        assert_eq!(again.slot(), 1);
        // No hint left: on from the highest claimed, past the one held elsewhere.
        assert_eq!(pool.claim(&limits).unwrap().slot(), 4);
        drop(other);
        drop((a, c, again));
        pool.collect_garbage().unwrap();
    }

    #[test]
    fn more_slots_are_made_ready_beside_the_ready_ones_not_from_them() {
        let Some((pool, _, _locks)) = real_pool("ahead") else { return };
        let limits = Limits::default();
        assert_eq!(pool.prepare(2, &limits).unwrap(), 2);
        assert_eq!(pool.ready(), 2);
        let a = pool.claim(&limits).unwrap();
        assert_eq!(a.slot(), 0, "a ready slot, the lowest, first");
        assert_eq!(pool.ready(), 1);
        // Slot 1 stays ready for the claims meanwhile: the new ones are 2 and 3.
        assert_eq!(pool.prepare_more(2, &limits).unwrap(), 2);
        assert_eq!(pool.ready(), 3);
        let held: Vec<Lease> = (0..3).map(|_| pool.claim(&limits).unwrap()).collect();
        let mut slots: Vec<u32> = held.iter().map(Lease::slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, [1, 2, 3]);
        assert_eq!(pool.ready(), 0);
        drop((a, held));
        pool.collect_garbage().unwrap();
    }

    /// Another build's spawner parked in a slot goes at this build's claim of it, found among
    /// the slot's processes (no lock-directory listing, no connection to it), and this build's
    /// is parked there instead; at the next claim this build's is reused, not replaced.
    #[test]
    fn a_claim_replaces_another_builds_spawner_and_reuses_its_own() {
        let Some((_pool, layout, locks)) = real_pool("spw") else { return };
        // The agent executable beside the test binary's directory (target/<profile>/).
        let agent = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.join("ringfence-agent")))
            .filter(|a| a.is_file());
        let Some(agent) = agent else {
            eprintln!("SKIPPED: no ringfence-agent built beside the tests");
            return;
        };
        // Two builds: copies of one executable are two files, so two tags.
        let builds = tempfile::tempdir().unwrap();
        let (a, b) = (builds.path().join("a"), builds.path().join("b"));
        fs::copy(&agent, &a).unwrap();
        fs::copy(&agent, &b).unwrap();
        let prefix = format!("spw{}", std::process::id());
        let pool = |exe: &Path| {
            Pool::new(layout.clone(), "ringfence", &prefix, locks.path().to_path_buf())
                .with_spawners(exe.to_path_buf())
        };
        let parked = |lease: &Lease| -> Vec<(i32, Option<PathBuf>)> {
            let pids = lease.all_procs().into_iter().filter(|p| crate::spawner::is_spawner(*p));
            pids.map(|p| (p, crate::spawner::socket_of(p))).collect()
        };
        let limits = Limits::default();
        let (pool_a, pool_b) = (pool(&a), pool(&b));
        let lease = pool_a.claim(&limits).unwrap();
        let slot = lease.slot();
        let first = parked(&lease);
        assert_eq!(first.len(), 1, "{first:?}");
        let (a_pid, a_socket) = (first[0].0, first[0].1.clone().unwrap());
        assert_eq!(Some(a_socket.clone()), pool_a.spawner_socket(slot).map(|(s, _)| s));
        drop(lease);

        let lease = pool_b.claim(&limits).unwrap();
        assert_eq!(lease.slot(), slot);
        let now = parked(&lease);
        assert_eq!(now.len(), 1, "one spawner in the slot: {now:?}");
        let b_socket = pool_b.spawner_socket(slot).map(|(s, _)| s);
        assert_eq!(now[0].1, b_socket, "this build's is the one parked");
        assert!(!a_socket.exists(), "the other build's socket is gone");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{a_pid}")).exists()
            && crate::spawner::socket_of(a_pid).is_some()
        {
            assert!(std::time::Instant::now() < deadline, "the other build's spawner lives on");
            thread::sleep(Duration::from_millis(10));
        }
        let b_pid = now[0].0;
        drop(lease);
        let lease = pool_b.claim(&limits).unwrap();
        assert_eq!(parked(&lease).first().map(|p| p.0), Some(b_pid), "reused, not replaced");
        drop(lease);
        // Its socket removed (as `stop` or another claim does), the spawner on its way out is
        // not left beside the new one.
        let b_socket = b_socket.unwrap();
        fs::remove_file(&b_socket).unwrap();
        let lease = pool_b.claim(&limits).unwrap();
        // SIGKILLed, the old one leaves the slot as it exits (a moment, at most).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let now = loop {
            let now = parked(&lease);
            if now.len() == 1 || std::time::Instant::now() > deadline {
                break now;
            }
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(now.len(), 1, "one spawner in the slot: {now:?}");
        assert_ne!(now[0].0, b_pid, "a new one");
        assert_eq!(now[0].1.as_deref(), Some(b_socket.as_path()));
        drop(lease);
        crate::spawner::stop(&b_socket);
        pool_b.collect_garbage().unwrap();
    }

    /// A slot whose shell forks all the time, frozen and thawed over and over: every freeze
    /// completes (cgroup v1 could leave the forking parent unfrozen,
    /// see [`Lease::freeze`]), and a frozen slot's work stands still.
    #[test]
    fn a_slot_that_keeps_forking_freezes_every_time() {
        let Some((pool, _, locks)) = real_pool("frz") else { return };
        let lease = pool.claim(&Limits::default()).unwrap();
        if lease.freezer().is_none() {
            eprintln!("SKIPPED: no freezer controller on this host");
            return;
        }
        let counter = locks.path().join("counter");
        let script = format!(
            "i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.00$((i%3)); done",
            counter.display()
        );
        let mut child = std::process::Command::new("sh").args(["-c", &script]).spawn().unwrap();
        lease.add(child.id() as i32).unwrap();
        thread::sleep(Duration::from_millis(50));
        let mut failed = Vec::new();
        for round in 0..200u64 {
            if let Err(e) = lease.freeze() {
                failed.push(format!("round {round}: {e}"));
                continue;
            }
            if round % 40 == 0 {
                let before = fs::read_to_string(&counter).unwrap_or_default();
                thread::sleep(Duration::from_millis(30));
                assert_eq!(fs::read_to_string(&counter).unwrap_or_default(), before, "frozen");
            }
            lease.thaw().unwrap();
            thread::sleep(Duration::from_micros(500 + round * 7919 % 8000));
        }
        // Host root in the host's user namespace, the shell counts as a spawner to
        // `kill_all`: it is ended here (its children die with their `sleep`s).
        child.kill().unwrap();
        child.wait().unwrap();
        drop(lease);
        pool.collect_garbage().unwrap();
        assert!(failed.is_empty(), "freezes that did not complete: {failed:?}");
    }

    #[test]
    fn detects_v2_and_missing_controllers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        assert_eq!(
            Layout::detect_at(dir.path()).unwrap(),
            Layout::V2 { root: dir.path().to_path_buf() }
        );
        fs::write(dir.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(matches!(Layout::detect_at(dir.path()), Err(CgroupError::MissingController(_))));
    }

    #[test]
    fn detects_v1() {
        let dir = tempfile::tempdir().unwrap();
        for (sub, file) in [
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
            ("cpu,cpuacct", "cpu.cfs_quota_us"),
        ] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
            fs::write(dir.path().join(sub).join(file), "").unwrap();
        }
        let l = Layout::detect_at(dir.path()).unwrap();
        assert_eq!(l.version(), "v1");
    }

    #[test]
    fn procfs_cpu_time_of_a_process() {
        // This test process has run for a while: its time is there and grows.
        let me = std::process::id() as i32;
        let before = proc_cpu_ns(me).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(proc_cpu_ns(me).unwrap() >= before);
        assert_eq!(proc_cpu_ns(i32::MAX), None);
    }

    #[test]
    fn nothing_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Layout::detect_at(dir.path()), Err(CgroupError::NotFound)));
    }

    #[test]
    fn read_key_parses_flat_keyed_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.oom_control");
        fs::write(&p, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(read_key(&p, "oom_kill"), Some(3));
        assert_eq!(read_key(&p, "missing"), None);
    }

    #[test]
    fn a_kept_slot_names_its_server_until_let_go_and_only_that_servers_sweep_takes_it() {
        let locks = tempfile::tempdir().unwrap();
        let owner = tempfile::tempdir().unwrap();
        let layout = Layout::V2 { root: locks.path().join("cgroup") };
        let pool = Pool::new(layout.clone(), "ringfence", "run", locks.path().to_path_buf())
            .kept_for(owner.path());
        let other = Pool::new(layout.clone(), "ringfence", "run", locks.path().to_path_buf())
            .kept_for(locks.path());
        let canonical = fs::canonicalize(owner.path()).unwrap();

        // Held: the lock file names the server; let go in an orderly way, it is empty again.
        let lock = pool.try_lock(5).unwrap().unwrap();
        let mut lease = Lease::new(5, pool.slot_dirs(5), layout, lock);
        lease.keep(pool.owner.as_deref(), &pool.lock_path(5)).unwrap();
        let named = fs::read_to_string(pool.lock_path(5)).unwrap();
        assert_eq!(Path::new(&named), canonical);
        assert!(pool.try_lock(5).unwrap().is_none(), "held while the lease lives");
        lease.release_unwaited();
        let lock = pool.try_lock(5).unwrap().unwrap();
        assert_eq!(kept_by(&lock), None, "emptied when let go");
        drop(lock);

        // A server killed with its lease held: the name stays. Something of the sandbox still
        // in the slot (a pid that is no spawner: no process has it).
        fs::write(pool.lock_path(6), canonical.to_string_lossy().as_bytes()).unwrap();
        let procs = locks.path().join("cgroup/ringfence/run-6");
        fs::create_dir_all(&procs).unwrap();
        fs::write(procs.join("cgroup.procs"), "999999999\n").unwrap();
        let lock = pool.try_lock(6).unwrap().unwrap();
        assert_eq!(kept_by(&lock).as_deref().map(Path::new), Some(canonical.as_path()));
        assert!(pool.kept_elsewhere(&lock, 6, false), "no claim takes it, not even its own");
        assert!(!pool.kept_elsewhere(&lock, 6, true), "its own server's sweep takes it");
        assert!(other.kept_elsewhere(&lock, 6, true), "another server's sweep leaves it");
        // Nothing left in it: nothing to lose, anyone may take it.
        fs::write(procs.join("cgroup.procs"), "").unwrap();
        assert!(!other.kept_elsewhere(&lock, 6, false));
        fs::write(procs.join("cgroup.procs"), "999999999\n").unwrap();
        // Its data directory gone: no server can come back for it.
        drop(owner);
        assert!(!other.kept_elsewhere(&lock, 6, false), "a gone directory keeps nothing");
    }
}
