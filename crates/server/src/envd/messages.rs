//! Response messages: envd's JSON for process events, process and file entries, and the
//! Connect envelopes that carry them.

use super::*;

/// Encodes one envelope.
pub(super) fn envelope(flags: u8, msg: &Value) -> Bytes {
    let body = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// The end-of-stream envelope: `{}`, or `{"error": {...}}`.
pub(super) fn end_stream(err: Option<&RpcError>) -> Bytes {
    match err {
        None => envelope(FLAG_END_STREAM, &json!({})),
        Some(e) => envelope(FLAG_END_STREAM, &json!({"error": e.to_json()})),
    }
}

pub(super) fn start_event(pid: u32) -> Value {
    json!({"event": {"start": {"pid": pid}}})
}

pub(super) fn data_event(stream: &str, data: &[u8]) -> Value {
    json!({"event": {"data": {stream: STANDARD.encode(data)}}})
}

pub(super) fn keepalive_event() -> Value {
    json!({"event": {"keepalive": {}}})
}

/// What Go's `syscall.Signal.String()` says, as in envd's `signal: killed`.
pub(super) fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

/// The `end` event as envd builds it from Go's `ProcessState`: `exitCode` is -1 for a
/// signal (and omitted when 0, the proto3 default), `error` carries the status of any
/// unsuccessful end.
pub(super) fn end_event(status: ExitStatus) -> Value {
    let mut end = Map::new();
    match status {
        ExitStatus::Code(code) => {
            let text = format!("exit status {code}");
            if code != 0 {
                end.insert("exitCode".into(), json!(code));
                end.insert("error".into(), json!(text));
            }
            end.insert("exited".into(), json!(true));
            end.insert("status".into(), json!(text));
        }
        ExitStatus::Signal(sig) => {
            let text = format!("signal: {}", signal_name(sig));
            end.insert("exitCode".into(), json!(-1));
            end.insert("exited".into(), json!(false));
            end.insert("status".into(), json!(text));
            end.insert("error".into(), json!(text));
        }
    }
    json!({"event": {"end": Value::Object(end)}})
}

pub(super) fn process_info_json(p: &ProcessInfo) -> Value {
    let mut config = Map::new();
    config.insert("cmd".into(), json!(p.spec.cmd));
    config.insert("args".into(), json!(p.spec.args));
    config.insert("envs".into(), json!(p.spec.env));
    if let Some(cwd) = &p.spec.cwd {
        config.insert("cwd".into(), json!(cwd));
    }
    let mut info = Map::new();
    info.insert("config".into(), Value::Object(config));
    info.insert("pid".into(), json!(p.pid));
    if let Some(tag) = &p.spec.tag {
        info.insert("tag".into(), json!(tag));
    }
    Value::Object(info)
}

pub(super) fn event_type_name(kind: FsEventKind) -> &'static str {
    match kind {
        FsEventKind::Create => "EVENT_TYPE_CREATE",
        FsEventKind::Write => "EVENT_TYPE_WRITE",
        FsEventKind::Remove => "EVENT_TYPE_REMOVE",
        FsEventKind::Rename => "EVENT_TYPE_RENAME",
        FsEventKind::Chmod => "EVENT_TYPE_CHMOD",
    }
}

pub(super) fn file_type_name(kind: Option<FileType>) -> &'static str {
    match kind {
        Some(FileType::File) => "FILE_TYPE_FILE",
        Some(FileType::Directory) => "FILE_TYPE_DIRECTORY",
        Some(FileType::Symlink) => "FILE_TYPE_SYMLINK",
        Some(FileType::Other) | None => "FILE_TYPE_UNSPECIFIED",
    }
}

/// Go's `os.FileMode.String()`, which envd reports as `permissions`: type letters (`d`, `L`,
/// `u`, `g`, `t`, `?` in Go's order), `-` when there are none, then `rwxrwxrwx`.
pub(super) fn permissions_string(kind: FileType, mode: u32) -> String {
    let mut out = String::with_capacity(11);
    if kind == FileType::Directory {
        out.push('d');
    }
    if kind == FileType::Symlink {
        out.push('L');
    }
    if mode & 0o4000 != 0 {
        out.push('u');
    }
    if mode & 0o2000 != 0 {
        out.push('g');
    }
    if mode & 0o1000 != 0 {
        out.push('t');
    }
    if kind == FileType::Other {
        out.push('?');
    }
    if out.is_empty() {
        out.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        let bit = 1u32 << (8 - i);
        out.push(if mode & bit != 0 { c } else { '-' });
    }
    out
}

/// The name envd's user lookup gives an id inside the sandbox.
pub(super) fn id_name(id: u32) -> String {
    match id {
        0 => "root".to_owned(),
        1000 => "user".to_owned(),
        other => other.to_string(),
    }
}

/// A `google.protobuf.Timestamp` in its JSON form (RFC 3339, UTC, 0/3/6/9 fraction digits);
/// `None` outside the years 1 to 9999 that it can represent.
pub(super) fn rfc3339(secs: i64, nanos: u32) -> Option<String> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = crate::time::civil_from_days(days);
    if !(1..=9999).contains(&y) || nanos >= 1_000_000_000 {
        return None;
    }
    let frac = if nanos == 0 {
        String::new()
    } else if nanos.is_multiple_of(1_000_000) {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    ))
}

/// Lexical normalisation of an absolute path (`.` and `..` resolved, `..` stops at `/`).
pub(super) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where the link at `link` pointing to `target` leads.
pub(super) fn join_link(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        return normalize(target);
    }
    let parent = link.rsplit_once('/').map_or("", |(p, _)| p);
    normalize(&format!("{parent}/{target}"))
}

/// What following a symlink found (envd reports the target's type and mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LinkTarget {
    /// The resolved target; the link itself when it dangles (as Go's `EvalSymlinks` fallback).
    pub(super) path: String,
    /// `None` when the link dangles or loops.
    pub(super) kind: Option<FileType>,
    pub(super) mode: u32,
}

/// `EntryInfo` in protojson.
pub(super) fn entry_json(e: &EntryInfo, link: Option<&LinkTarget>) -> Value {
    let (kind, mode) = match link {
        Some(t) => (t.kind, t.mode),
        None => (Some(e.kind), e.mode),
    };
    let mut v = Map::new();
    v.insert("name".into(), json!(e.name));
    v.insert("type".into(), json!(file_type_name(kind)));
    v.insert("path".into(), json!(e.path));
    v.insert("size".into(), json!(e.size.to_string()));
    v.insert("mode".into(), json!(mode & 0o777));
    v.insert("permissions".into(), json!(permissions_string(e.kind, e.mode)));
    v.insert("owner".into(), json!(id_name(e.uid)));
    v.insert("group".into(), json!(id_name(e.gid)));
    if e.mtime != (0, 0)
        && let Some(t) = rfc3339(e.mtime.0, e.mtime.1)
    {
        v.insert("modifiedTime".into(), json!(t));
    }
    let target = match link {
        Some(t) => Some(t.path.clone()),
        None => e.symlink_target.clone(),
    };
    if let Some(t) = target {
        v.insert("symlinkTarget".into(), json!(t));
    }
    if !e.metadata.is_empty() {
        v.insert("metadata".into(), json!(e.metadata));
    }
    Value::Object(v)
}

pub(super) async fn follow_link(
    client: &AgentClient,
    user: SandboxUser,
    e: &EntryInfo,
) -> LinkTarget {
    let dangling = LinkTarget { path: e.path.clone(), kind: None, mode: 0 };
    let mut link = e.path.clone();
    let mut target = e.symlink_target.clone();
    for _ in 0..MAX_SYMLINK_HOPS {
        let Some(t) = target else { return dangling };
        let next = join_link(&link, &t);
        match client.call(AgentRequest::Stat { path: next.clone(), user }).await {
            Ok(Reply::Entry(found)) if found.kind == FileType::Symlink => {
                link = next;
                target = found.symlink_target;
            }
            Ok(Reply::Entry(found)) => {
                return LinkTarget { path: next, kind: Some(found.kind), mode: found.mode };
            }
            _ => return dangling,
        }
    }
    dangling
}

/// An entry as envd describes it (symlinks followed).
pub(super) async fn describe(client: &AgentClient, user: SandboxUser, e: &EntryInfo) -> Value {
    let link =
        if e.kind == FileType::Symlink { Some(follow_link(client, user, e).await) } else { None };
    entry_json(e, link.as_ref())
}

pub(super) async fn describe_all(
    client: &AgentClient,
    user: SandboxUser,
    entries: &[EntryInfo],
) -> Vec<Value> {
    futures_util::future::join_all(entries.iter().map(|e| describe(client, user, e))).await
}

/// A `FilesystemEvent`; with `root` (the watched directory, resolved) it includes the entry.
pub(super) async fn fs_event(
    client: &AgentClient,
    root: Option<&str>,
    user: SandboxUser,
    name: String,
    kind: FsEventKind,
) -> Value {
    let mut ev = Map::new();
    if let Some(root) = root
        && kind != FsEventKind::Remove
    {
        let path = if name == "." {
            root.to_owned()
        } else {
            format!("{}/{name}", root.trim_end_matches('/'))
        };
        if let Ok(Reply::Entry(e)) = client.call(AgentRequest::Stat { path, user }).await {
            ev.insert("entry".into(), describe(client, user, &e).await);
        }
    }
    ev.insert("name".into(), json!(name));
    ev.insert("type".into(), json!(event_type_name(kind)));
    Value::Object(ev)
}
