//! Wire types spoken between the host (CLI or server) and `ringfence-agent`, the PID 1 of every
//! sandbox.
//!
//! The agent is inside the trust boundary's hostile side: everything it sends is parsed as
//! untrusted input. Frames are therefore length-prefixed and size-capped before they are decoded,
//! so a compromised agent cannot make the host allocate without bound.
//!
//! Encoding: `[u32 big-endian length][postcard body]`. Postcard is compact and cheap to decode;
//! the server translates to E2B's Connect JSON at its edge, so nothing here is exposed to SDKs.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

mod setup;
pub use setup::*;

/// Largest frame either side accepts. File contents travel in chunks well below this.
pub const MAX_FRAME: usize = 4 << 20;

/// Size of one chunk of file or process output carried in a single frame.
pub const CHUNK: usize = 1 << 20;

/// Flow control of streamed events (a process's output, a watch's changes): what the agent may
/// send on one subscription beyond what the host has acknowledged with [`Request::Credit`] or
/// [`Request::WatchCredit`], counted with [`flow_cost`]. Without it, output nobody reads piled
/// up in the host without bound; with it, the agent stops reading the process's pipe and the
/// process blocks on a full pipe, as it would writing to a slow terminal.
pub const STREAM_WINDOW: u64 = 256 << 10;

/// Most bytes of process output the agent reads (and so sends in one event) at a time.
pub const OUTPUT_READ: usize = 64 << 10;

/// How far past [`STREAM_WINDOW`] an agent may go: it checks the credit before each read, and a
/// process's stdout and stderr are read separately, so the last reads may overshoot. A host
/// drops events beyond window + slack: only a misbehaving agent sends them.
pub const STREAM_SLACK: u64 = 4 * OUTPUT_READ as u64;

/// What a watch event costs against the window besides the bytes of its name.
pub const FS_EVENT_COST: u64 = 64;

/// What `event` costs against its subscription's window (0: not flow-controlled).
pub fn flow_cost(event: &Event) -> u64 {
    match event {
        Event::Stdout { data, .. } | Event::Stderr { data, .. } | Event::Pty { data, .. } => {
            data.len() as u64
        }
        Event::Fs { name, .. } => name.len() as u64 + FS_EVENT_COST,
        _ => 0,
    }
}

/// Errors from framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("agent channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes `msg` into a length-prefixed frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    // Serialized after a placeholder prefix, into one buffer: a megabyte of file data is not
    // copied a second time to put its length in front.
    let mut buf = postcard::to_extend(msg, vec![0u8; 4])?;
    let body = buf.len() - 4;
    if body > MAX_FRAME {
        return Err(ProtoError::TooLarge(body));
    }
    let len = u32::try_from(body).map_err(|_| ProtoError::TooLarge(body))?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// Decodes one frame body (without the length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProtoError> {
    Ok(postcard::from_bytes(body)?)
}

/// Parses a length prefix, refusing oversized frames before any allocation happens.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(len)
}

/// Blocking write of one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Blocking read of one frame. Returns `Ok(None)` on a clean end of stream.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<T>, ProtoError> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(decode(&body)?))
}

/// Who a process or file operation runs as inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SandboxUser {
    /// uid/gid 1000, home `/home/user` (E2B's default user).
    #[default]
    User,
    /// uid 0 inside the sandbox's user namespace only: maps to an unprivileged host id and holds
    /// no capabilities.
    Root,
}

impl SandboxUser {
    pub fn uid(self) -> u32 {
        match self {
            SandboxUser::User => 1000,
            SandboxUser::Root => 0,
        }
    }
    pub fn home(self) -> &'static str {
        match self {
            SandboxUser::User => "/home/user",
            SandboxUser::Root => "/root",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SandboxUser::User => "user",
            SandboxUser::Root => "root",
        }
    }
    /// Parses the names E2B uses (`user`, `root`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "user" => Some(SandboxUser::User),
            "root" => Some(SandboxUser::Root),
            _ => None,
        }
    }
}

/// Where a spawned process's standard streams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StdioMode {
    /// Share the agent's own fds 0/1/2. Used by `ringfence run`, where the host hands the agent
    /// pipes whose other ends it reads directly: the output never crosses the control channel.
    Inherit,
    /// Separate pipes, relayed as [`Event::Stdout`]/[`Event::Stderr`].
    Pipe { stdin: bool },
    /// A pseudo-terminal of the given size; output arrives as [`Event::Pty`].
    Pty { cols: u16, rows: u16 },
}

/// A process to start inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// Added to the clean base environment (`PATH`, `HOME`, `LANG`); nothing else is inherited.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: SandboxUser,
    pub stdio: StdioMode,
    /// Caller's label (E2B's `tag`), used to find the process again.
    pub tag: Option<String>,
}

/// Requests from host to agent. Each carries an id that its [`Response`] repeats; streaming
/// requests (spawn, watch) also emit [`Event`]s tagged with that id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Ping,
    /// Replaces the sandbox-wide environment for processes started from now on (a pooled
    /// sandbox handed to its owner).
    SetEnv {
        env: BTreeMap<String, String>,
    },
    Spawn(SpawnSpec),
    /// Re-subscribe to a running process's output and exit (E2B's `Connect`).
    Attach {
        pid: u32,
    },
    WriteStdin {
        pid: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    CloseStdin {
        pid: u32,
    },
    Signal {
        pid: u32,
        signal: i32,
    },
    ResizePty {
        pid: u32,
        cols: u16,
        rows: u16,
    },
    ListProcesses,
    /// Reads up to [`CHUNK`] bytes at `offset`; the host loops for larger files.
    ReadFile {
        path: String,
        user: SandboxUser,
        offset: u64,
    },
    /// Writes `data` at `offset` (0 truncates first); parents are created, owned by `user`.
    WriteFile {
        path: String,
        user: SandboxUser,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Replaces a file's user metadata (an empty map clears it).
    SetMetadata {
        path: String,
        user: SandboxUser,
        metadata: BTreeMap<String, String>,
    },
    Stat {
        path: String,
        user: SandboxUser,
    },
    ListDir {
        path: String,
        user: SandboxUser,
        depth: u32,
    },
    MakeDir {
        path: String,
        user: SandboxUser,
    },
    Remove {
        path: String,
        user: SandboxUser,
    },
    Rename {
        from: String,
        to: String,
        user: SandboxUser,
    },
    Watch {
        path: String,
        user: SandboxUser,
        recursive: bool,
    },
    Unwatch {
        watch: u64,
    },
    /// Resource use of the whole sandbox as the agent sees it.
    Stats,
    /// One-way (no response): the host consumed `bytes` of the output of subscription `id` (the
    /// id of the `Spawn` or `Attach` that subscribed). See [`STREAM_WINDOW`].
    Credit {
        id: u64,
        bytes: u64,
    },
    /// One-way (no response): nobody reads the output of subscription `id` any more; it stops
    /// holding the process back and gets no more output, only the process's `Exited`.
    Detach {
        id: u64,
    },
    /// One-way (no response): the host consumed `bytes` of the events of `watch`.
    WatchCredit {
        watch: u64,
        bytes: u64,
    },
    /// Starts replacing the file at `path` (parents created, owned by `user`): the content goes
    /// to an unnamed temporary file in the target's directory, which only
    /// [`Request::UploadCommit`] puts in place. Until then the target is untouched, and an
    /// upload that is aborted, or whose host connection ends, leaves nothing behind.
    UploadBegin {
        path: String,
        user: SandboxUser,
    },
    /// Appends to an upload; `offset` is where the host believes the data goes (the bytes
    /// written so far), checked so that a lost or repeated piece is an error, not a corrupt file.
    UploadWrite {
        upload: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Gives the file its owner, mode and `metadata`, then atomically replaces the target.
    UploadCommit {
        upload: u64,
        metadata: BTreeMap<String, String>,
    },
    /// Drops an upload and its temporary file.
    UploadAbort {
        upload: u64,
    },
    /// A `microvm` guest restored from another running guest's memory (a snapshot or fork of
    /// it) takes an identity of its own: `hostname`, a fresh machine id, its clock stepped and
    /// its kernel's generator reseeded from `wake` (a [`Wake`] in its wire layout). Processes
    /// that were running when the memory was saved keep running: only these are renewed.
    Reidentify {
        hostname: String,
        #[serde(with = "serde_bytes")]
        wake: Vec<u8>,
    },
}

impl Request {
    /// Requests the agent does not answer: flow control, sent often and needing no reply.
    pub fn is_one_way(&self) -> bool {
        matches!(
            self,
            Request::Credit { .. } | Request::Detach { .. } | Request::WatchCredit { .. }
        )
    }
}

/// A request with its correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// Error kinds, stable so the server can map them to E2B/Connect codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    PermissionDenied,
    InvalidArgument,
    NotADirectory,
    IsADirectory,
    NoSpace,
    Internal,
    /// A per-sandbox kernel limit other than space (inotify instances or watches): the
    /// sandbox's own, reached by what runs in it. Last, so older peers still decode the rest.
    LimitReached,
}

/// An error the agent reports for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The kind of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    File,
    Directory,
    Symlink,
    Other,
}

/// What `stat`/`list` report about an entry (enough for E2B's `EntryInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub path: String,
    pub kind: FileType,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub symlink_target: Option<String>,
    /// User metadata (E2B's file metadata): the `user.e2b.*` extended attributes.
    pub metadata: BTreeMap<String, String>,
}

/// A process the agent is tracking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub spec: SpawnSpec,
}

/// CPU and memory use, as reported by `wait4` for one process or summed for the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub user_cpu_us: u64,
    pub sys_cpu_us: u64,
    pub max_rss_kib: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// Shell convention: the code itself, or 128+N for signal N.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Successful results, one variant per request kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Pong,
    Spawned {
        pid: u32,
    },
    Done,
    Processes(Vec<ProcessInfo>),
    /// File bytes from `offset`; `eof` when nothing follows.
    Data {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        eof: bool,
    },
    Entry(EntryInfo),
    Entries(Vec<EntryInfo>),
    Watching {
        watch: u64,
    },
    Stats {
        usage: Usage,
        processes: u32,
    },
    /// An upload begun: its handle, the target (resolved) and the bytes free on its
    /// filesystem.
    Upload {
        upload: u64,
        path: String,
        free: u64,
    },
}

/// Filesystem change kinds (E2B's event types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsEventKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

/// Messages from agent to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The agent finished setting up the sandbox and is serving requests.
    Ready(Ready),
    /// Setup failed; the agent exits after sending this.
    SetupFailed {
        step: String,
        message: String,
    },
    Response {
        id: u64,
        result: Result<Reply, AgentError>,
    },
    Stdout {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Stderr {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Pty {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Exited {
        id: u64,
        pid: u32,
        status: ExitStatus,
        usage: Usage,
    },
    Fs {
        watch: u64,
        name: String,
        kind: FsEventKind,
    },
    /// A diagnostic line from the agent (it owns no terminal to print to).
    Log {
        level: LogLevel,
        message: String,
    },
}

/// Severity of an agent log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// A named point in time (CLOCK_MONOTONIC, nanoseconds: comparable across processes), used to
/// attribute sandbox start-up cost to its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub at_ns: u64,
}

/// What the agent reports once the sandbox is set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// When each setup step inside the sandbox finished.
    pub phases: Vec<Phase>,
    /// Landlock ABI version enforced, or `None` where the kernel lacks Landlock.
    pub landlock_abi: Option<u32>,
    /// Pid (inside the sandbox) of the initial process, when one was requested.
    pub initial_pid: Option<u32>,
}

/// What a `microvm` guest's agent sends, alone, once its devices are up and before it mounts
/// the sandbox's writable disk: it is parked, waiting for a [`Wake`]. A guest saved to a memory
/// snapshot is saved here, so each restore mounts the disk it is given after the restore.
pub const GUEST_PARKED: u8 = b'W';

/// The host's first message to a parked `microvm` guest (see [`GUEST_PARKED`]), in a fixed
/// binary layout read straight off the virtio-serial port before the framed protocol starts:
/// the host's wall clock, for the guest to step its own to (a restored guest's clock stands
/// where the snapshot stopped it), and fresh random bytes for its kernel's generator (every
/// restore of one snapshot starts from the same generator state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub unix_secs: u64,
    pub nanos: u32,
    pub entropy: [u8; WAKE_ENTROPY],
}

/// Random bytes in a [`Wake`]: 512 bits, the kernel generator's whole seed.
pub const WAKE_ENTROPY: usize = 64;
/// Bytes of a [`Wake`] on the wire: magic, seconds, nanoseconds, entropy.
pub const WAKE_LEN: usize = 4 + 8 + 4 + WAKE_ENTROPY;
const WAKE_MAGIC: &[u8; 4] = b"RFWK";

impl Wake {
    pub fn to_bytes(&self) -> [u8; WAKE_LEN] {
        let mut b = [0u8; WAKE_LEN];
        b[..4].copy_from_slice(WAKE_MAGIC);
        b[4..12].copy_from_slice(&self.unix_secs.to_be_bytes());
        b[12..16].copy_from_slice(&self.nanos.to_be_bytes());
        b[16..].copy_from_slice(&self.entropy);
        b
    }

    /// Parses a wake message; anything else (a host of another version) is refused.
    pub fn from_bytes(b: &[u8; WAKE_LEN]) -> Result<Wake, ProtoError> {
        let bad = |what: &str| ProtoError::Io(io::Error::new(io::ErrorKind::InvalidData, what));
        if &b[..4] != WAKE_MAGIC {
            return Err(bad("not a wake message"));
        }
        let mut secs = [0u8; 8];
        secs.copy_from_slice(&b[4..12]);
        let mut nanos = [0u8; 4];
        nanos.copy_from_slice(&b[12..16]);
        let nanos = u32::from_be_bytes(nanos);
        if nanos >= 1_000_000_000 {
            return Err(bad("wake message: nanoseconds out of range"));
        }
        let mut entropy = [0u8; WAKE_ENTROPY];
        entropy.copy_from_slice(&b[16..]);
        Ok(Wake { unix_secs: u64::from_be_bytes(secs), nanos, entropy })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let env = Envelope {
            id: 7,
            request: Request::WriteFile {
                path: "/home/user/a".into(),
                user: SandboxUser::User,
                offset: 0,
                data: b"hello".to_vec(),
            },
        };
        let bytes = encode(&env).unwrap();
        let back: Envelope = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, env);
    }

    /// Byte payloads go through `serde_bytes` (one copy, not one serializer call per byte:
    /// in a debug agent under TCG the per-byte path held uploads to ~0.5 MB/s), and postcard
    /// writes a byte string and a sequence of `u8` alike, so the bytes on the wire are the
    /// ones a peer built before the change reads.
    #[test]
    fn byte_payloads_keep_the_sequence_encoding() {
        #[derive(Serialize)]
        struct AsSeq {
            id: u64,
            data: Vec<u8>,
        }
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let new = postcard::to_stdvec(&Event::Stdout { id: 9, data: data.clone() }).unwrap();
        let mut old = postcard::to_stdvec(&AsSeq { id: 9, data }).unwrap();
        // The enum's variant index comes first.
        let variant = postcard::to_stdvec(&3u32).unwrap();
        old.splice(0..0, variant);
        assert_eq!(new, old);
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let prefix = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert!(matches!(frame_len(prefix), Err(ProtoError::TooLarge(_))));
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let r: Result<Option<Envelope>, _> = read_frame(&mut &bytes[..]);
        assert!(matches!(r, Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let r: Result<Option<Envelope>, _> = read_frame(&mut &bytes[..]);
        assert!(matches!(r, Err(ProtoError::Decode(_))));
    }

    #[test]
    fn clean_eof_is_none() {
        let r: Option<Envelope> = read_frame(&mut &[][..]).unwrap();
        assert!(r.is_none());
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }

    #[test]
    fn wake_messages_round_trip_and_garbage_is_refused() {
        let w = Wake { unix_secs: 1_800_000_000, nanos: 999_999_999, entropy: [7; WAKE_ENTROPY] };
        assert_eq!(Wake::from_bytes(&w.to_bytes()).unwrap(), w);
        let mut b = w.to_bytes();
        b[0] = b'X';
        assert!(Wake::from_bytes(&b).is_err());
        let mut b = w.to_bytes();
        b[12..16].copy_from_slice(&2_000_000_000u32.to_be_bytes());
        assert!(Wake::from_bytes(&b).is_err());
    }
}
