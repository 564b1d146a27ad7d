//! Streaming responses: process output and filesystem watches as Connect server streams.

use super::*;

pub(super) fn stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONNECT_JSON));
    resp
}

/// A streaming call that failed before its first message.
pub(super) fn stream_error(err: RpcError) -> Response {
    stream_response(Body::from(end_stream(Some(&err))))
}

pub(super) fn channel_body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    }))
}

/// A far-away instant for a disabled `select!` branch.
pub(super) fn never() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(100 * 365 * 86_400)).unwrap_or(now)
}

/// Relays a process's events as `StartResponse`/`ConnectResponse` envelopes.
#[derive(Debug)]
pub(super) struct ProcessStream {
    client: Arc<AgentClient>,
    pid: u32,
    events: EventStream,
    out: mpsc::Sender<Bytes>,
    opts: StreamOpts,
    /// `Start`: the request's deadline ends the process too (envd runs it under that context).
    kill_at_deadline: bool,
    /// `Start`, audited: recorded when the process ends, before the client hears of it.
    exec: Option<Execution>,
}

/// The audit trail's view of how a process ended: the shell's exit code convention (128+N
/// for signal N) and the process's own resource use.
pub(super) fn exec_outcome(status: ExitStatus, usage: &ringfence_proto::Usage) -> Outcome {
    let mut out = Outcome::default();
    match status {
        ExitStatus::Code(c) => out.exit_code = Some(c),
        ExitStatus::Signal(sig) => {
            out.exit_code = Some(128 + sig);
            out.detail.insert("signal".into(), json!(signal_name(sig)));
        }
    }
    out.usage = Some(crate::store::ResourceUsage {
        memory_mb: usage.max_rss_kib / 1024,
        cpu_ms: (usage.user_cpu_us + usage.sys_cpu_us) / 1000,
    });
    out
}

/// The data event of an output chunk; `None` for other events.
pub(super) fn output_frame(ev: &Event) -> Option<Bytes> {
    let (stream, data) = match ev {
        Event::Stdout { data, .. } => ("stdout", data),
        Event::Stderr { data, .. } => ("stderr", data),
        Event::Pty { data, .. } => ("pty", data),
        _ => return None,
    };
    Some(envelope(0, &data_event(stream, data)))
}

pub(super) async fn pump_process(s: ProcessStream) {
    let ProcessStream { client, pid, mut events, out, opts, kill_at_deadline, mut exec } = s;
    // The one envelope waiting for room in the body. Events are taken only once it is sent, so
    // a client that does not read stops its process's output instead of filling memory.
    let mut next = Some(envelope(0, &start_event(pid)));
    let mut open = true;
    // Past its client, a stream lives on to enforce the deadline and to see the end of an
    // audited execution.
    let watch_deadline = kill_at_deadline && opts.deadline.is_some();
    let mut keepalive_at = Instant::now() + opts.keepalive;
    loop {
        if !open && !watch_deadline && exec.is_none() {
            return;
        }
        tokio::select! {
            permit = out.reserve(), if open && next.is_some() => match permit {
                Ok(permit) => {
                    if let Some(frame) = next.take() {
                        permit.send(frame);
                    }
                    keepalive_at = Instant::now() + opts.keepalive;
                }
                Err(_) => {
                    open = false;
                    next = None;
                    events.detach();
                }
            },
            ev = events.recv(), if next.is_none() => match ev {
                Some(Event::Exited { status, usage, .. }) => {
                    if let Some(x) = exec.take() {
                        x.finish(exec_outcome(status, &usage)).await;
                    }
                    if open && out.send(envelope(0, &end_event(status))).await.is_ok() {
                        let _ = out.send(end_stream(None)).await;
                    }
                    return;
                }
                Some(ev) => {
                    // Once the client is gone, output (what was in flight when it left) is
                    // dropped.
                    if open {
                        next = output_frame(&ev);
                    }
                }
                None => {
                    if let Some(x) = exec.take() {
                        let mut o = Outcome::default();
                        o.detail.insert("ended".into(), json!("the sandbox ended first"));
                        x.finish(o).await;
                    }
                    let err = RpcError::new(Kind::Unavailable, "the sandbox agent is gone");
                    let _ = out.send(end_stream(Some(&err))).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(keepalive_at), if open && next.is_none() => {
                next = Some(envelope(0, &keepalive_event()));
                keepalive_at = Instant::now() + opts.keepalive;
            }
            () = tokio::time::sleep_until(opts.deadline.unwrap_or_else(never)), if opts.deadline.is_some() => {
                let message = if kill_at_deadline {
                    let signal = AgentRequest::Signal { pid, signal: libc::SIGKILL };
                    if let Err(e) = client.call(signal).await {
                        tracing::debug!(pid, error = %e, "killing a process past its deadline");
                    }
                    if let Some(x) = exec.take() {
                        let mut o = Outcome::default();
                        o.detail.insert("killed".into(), json!("ran past its request timeout"));
                        x.finish(o).await;
                    }
                    "the command ran past its timeout and was killed"
                } else {
                    "the stream ran past its timeout"
                };
                let _ = out.send(end_stream(Some(&RpcError::new(Kind::DeadlineExceeded, message)))).await;
                return;
            }
            () = out.closed(), if open => {
                open = false;
                next = None;
                events.detach();
            }
        }
    }
}

pub(super) fn spawn_process_stream(
    client: Arc<AgentClient>,
    pid: u32,
    events: EventStream,
    opts: StreamOpts,
    kill_at_deadline: bool,
    exec: Option<Execution>,
) -> Response {
    let (out, rx) = mpsc::channel(BODY_FRAMES);
    let s = ProcessStream { client, pid, events, out, opts, kill_at_deadline, exec };
    // Spawned streams keep the request's span, so their log lines name the sandbox.
    tokio::spawn(pump_process(s).in_current_span());
    stream_response(channel_body(rx))
}

pub(super) async fn start_spec(headers: &HeaderMap, body: Body) -> Result<SpawnSpec, RpcError> {
    let user = rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    parse_start(&msg, user)
}

/// The command line of a spawn as the audit trail hashes it: the command and its arguments
/// joined by single spaces.
pub fn command_line(spec: &SpawnSpec) -> String {
    std::iter::once(spec.cmd.as_str())
        .chain(spec.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `process.Process/Start`.
pub(super) async fn start_process(
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let spec = match start_spec(&parts.headers, body).await {
        Ok(spec) => spec,
        Err(e) => return stream_error(e),
    };
    let line = command_line(&spec);
    if let Some(obs) = &state.obs
        && let Some(why) =
            obs.refusal("command", &line, Some(ringfence_risk::Language::Shell)).await
    {
        return stream_error(RpcError::new(Kind::PermissionDenied, why));
    }
    let exec = state
        .obs
        .as_ref()
        .map(|o| o.execution("command", &line, Some(ringfence_risk::Language::Shell)));
    match client.stream(AgentRequest::Spawn(spec)).await {
        Ok((Reply::Spawned { pid }, events)) => {
            spawn_process_stream(client, pid, events, opts, true, exec)
        }
        Ok((other, _)) => stream_error(unexpected(&other)),
        Err(e) => stream_error(e.into()),
    }
}

pub(super) async fn connect_pid(
    client: &AgentClient,
    headers: &HeaderMap,
    body: Body,
) -> Result<u32, RpcError> {
    rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    resolve_pid(client, parse_selector(&msg)?).await
}

/// `process.Process/Connect`.
pub(super) async fn connect_process(client: Arc<AgentClient>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let pid = match connect_pid(&client, &parts.headers, body).await {
        Ok(pid) => pid,
        Err(e) => return stream_error(e),
    };
    match client.stream(AgentRequest::Attach { pid }).await {
        Ok((Reply::Spawned { pid }, events)) => {
            spawn_process_stream(client, pid, events, opts, false, None)
        }
        Ok((other, _)) => stream_error(unexpected(&other)),
        Err(e) => stream_error(e.into()),
    }
}

/// Writes process input in frame-sized pieces, in order.
pub(super) async fn write_input(
    client: &AgentClient,
    pid: u32,
    data: Vec<u8>,
) -> Result<(), RpcError> {
    if data.is_empty() {
        client.call(AgentRequest::WriteStdin { pid, data }).await?;
        return Ok(());
    }
    for piece in data.chunks(CHUNK) {
        client.call(AgentRequest::WriteStdin { pid, data: piece.to_vec() }).await?;
    }
    Ok(())
}

pub(super) async fn stream_input_message(
    client: &AgentClient,
    msg: &Value,
    pid: &mut Option<u32>,
) -> Result<(), RpcError> {
    if let Some(start) = field(msg, "start") {
        *pid = Some(resolve_pid(client, parse_selector(start)?).await?);
    } else if let Some(data) = field(msg, "data") {
        let p = pid.ok_or_else(|| RpcError::invalid("input before the start message"))?;
        write_input(client, p, parse_input(data)?).await?;
    } else if field(msg, "keepalive").is_none() {
        return Err(RpcError::new(Kind::Unimplemented, "invalid event type"));
    }
    Ok(())
}

pub(super) async fn stream_input_messages(
    client: &AgentClient,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), RpcError> {
    let mut pid = None;
    if is_plain_json(headers) {
        let msg = read_unary_message(headers, body).await?;
        return stream_input_message(client, &msg, &mut pid).await;
    }
    let mut data = body.into_data_stream();
    let mut reader = envelope_reader();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| RpcError::invalid(format!("reading the request: {e}")))?;
        reader.push(&chunk);
        while let Some((flags, frame)) = reader.next_frame()? {
            if flags & FLAG_END_STREAM != 0 {
                continue;
            }
            let msg = frame_message(flags, frame, headers)?;
            stream_input_message(client, &msg, &mut pid).await?;
        }
    }
    if !reader.is_empty() {
        return Err(RpcError::invalid("truncated request envelope"));
    }
    Ok(())
}

/// `process.Process/StreamInput` (client streaming): one `{}` message, then end of stream.
pub(super) async fn stream_input(client: Arc<AgentClient>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let result = match rpc_user(&parts.headers) {
        Ok(_) => stream_input_messages(&client, &parts.headers, body).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            let mut bytes = envelope(0, &json!({})).to_vec();
            bytes.extend_from_slice(&end_stream(None));
            stream_response(Body::from(bytes))
        }
        Err(e) => stream_error(e),
    }
}

/// Relays a watch's events as `WatchDirResponse` envelopes.
#[derive(Debug)]
pub(super) struct WatchStream {
    client: Arc<AgentClient>,
    watch: u64,
    /// The watched directory, resolved; set when entries are to be included.
    root: Option<String>,
    user: SandboxUser,
    events: EventStream,
    out: mpsc::Sender<Bytes>,
    opts: StreamOpts,
    _open: OpenStream,
}

pub(super) async fn pump_watch(s: WatchStream) {
    let WatchStream { client, watch, root, user, mut events, out, opts, _open } = s;
    // As for processes: an event is taken only once the previous envelope is in the body.
    let mut next = Some(envelope(0, &json!({"start": {}})));
    let mut keepalive_at = Instant::now() + opts.keepalive;
    loop {
        tokio::select! {
            permit = out.reserve(), if next.is_some() => match permit {
                Ok(permit) => {
                    if let Some(frame) = next.take() {
                        permit.send(frame);
                    }
                    keepalive_at = Instant::now() + opts.keepalive;
                }
                Err(_) => break,
            },
            ev = events.recv(), if next.is_none() => match ev {
                Some(Event::Fs { name, kind, .. }) => {
                    let ev = fs_event(&client, root.as_deref(), user, name, kind).await;
                    next = Some(envelope(0, &json!({"filesystem": ev})));
                }
                Some(_) => {}
                None => {
                    let err = RpcError::new(Kind::Unavailable, "the sandbox agent is gone");
                    let _ = out.send(end_stream(Some(&err))).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(keepalive_at), if next.is_none() => {
                next = Some(envelope(0, &json!({"keepalive": {}})));
                keepalive_at = Instant::now() + opts.keepalive;
            }
            () = tokio::time::sleep_until(opts.deadline.unwrap_or_else(never)), if opts.deadline.is_some() => {
                let err = RpcError::new(Kind::DeadlineExceeded, "the watch ran past its timeout");
                let _ = out.send(end_stream(Some(&err))).await;
                break;
            }
            () = out.closed() => break,
        }
    }
    if let Err(e) = client.call(AgentRequest::Unwatch { watch }).await {
        tracing::debug!(watch, error = %e, "ending a watch");
    }
}

/// Parameters shared by `WatchDir` and `CreateWatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WatchParams {
    path: String,
    recursive: bool,
    include_entry: bool,
}

pub(super) fn parse_watch(msg: &Value) -> Result<WatchParams, RpcError> {
    Ok(WatchParams {
        path: fs_path(str_field(msg, "path")?),
        recursive: bool_field(msg, "recursive")?.unwrap_or(false),
        include_entry: bool_field(msg, "includeEntry")?.unwrap_or(false),
    })
}

/// Starts an agent watch; returns its id, the resolved root (when entries are wanted) and its
/// events.
pub(super) async fn start_watch(
    client: &Arc<AgentClient>,
    user: SandboxUser,
    p: WatchParams,
) -> Result<(u64, Option<String>, EventStream), RpcError> {
    let request = AgentRequest::Watch { path: p.path.clone(), user, recursive: p.recursive };
    let (watch, events) = match client.stream(request).await? {
        (Reply::Watching { watch }, events) => (watch, events),
        (other, _) => return Err(unexpected(&other)),
    };
    let root = if p.include_entry {
        match client.call(AgentRequest::Stat { path: p.path, user }).await {
            Ok(Reply::Entry(e)) => Some(e.path),
            _ => None,
        }
    } else {
        None
    };
    Ok((watch, root, events))
}

pub(super) async fn watch_request(
    client: &Arc<AgentClient>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(SandboxUser, u64, Option<String>, EventStream), RpcError> {
    let user = rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    let (watch, root, events) = start_watch(client, user, parse_watch(&msg)?).await?;
    Ok((user, watch, root, events))
}

/// `filesystem.Filesystem/WatchDir`.
pub(super) async fn watch_dir(
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let (user, watch, root, events) = match watch_request(&client, &parts.headers, body).await {
        Ok(w) => w,
        Err(e) => return stream_error(e),
    };
    let (out, rx) = mpsc::channel(BODY_FRAMES);
    let _open = OpenStream::new(state);
    let s = WatchStream { client, watch, root, user, events, out, opts, _open };
    tokio::spawn(pump_watch(s).in_current_span());
    stream_response(channel_body(rx))
}
