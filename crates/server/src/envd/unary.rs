//! Unary calls: one JSON request, one JSON answer, each turned into agent requests.

use super::*;

pub(super) async fn unary(
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    rpc: UnaryRpc,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let msg = match rpc_user(&parts.headers) {
        Ok(_) => read_unary_message(&parts.headers, body).await,
        Err(e) => Err(e),
    };
    let result = match &msg {
        Ok(m) => unary_call(&client, &state, rpc, &parts.headers, m).await,
        Err(e) => Err(e.clone()),
    };
    let change = match rpc {
        UnaryRpc::MakeDir => Some("file.mkdir"),
        UnaryRpc::Move => Some("file.move"),
        UnaryRpc::Remove => Some("file.remove"),
        _ => None,
    };
    if let Some(action) = change {
        settle(&client, &state).await;
        if let (Ok(_), Ok(m)) = (&result, &msg) {
            let mut detail = Map::new();
            for f in ["path", "source", "destination"] {
                if let Some(v) = field(m, f) {
                    detail.insert(f.into(), v.clone());
                }
            }
            state.audit(action, Value::Object(detail)).await;
        }
    }
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn unary_call(
    client: &Arc<AgentClient>,
    state: &EnvdState,
    rpc: UnaryRpc,
    headers: &HeaderMap,
    msg: &Value,
) -> Result<Value, RpcError> {
    let user = rpc_user(headers)?;
    let done = |reply: Reply| match reply {
        Reply::Done => Ok(json!({})),
        other => Err(unexpected(&other)),
    };
    match rpc {
        UnaryRpc::List => match client.call(AgentRequest::ListProcesses).await? {
            Reply::Processes(list) => {
                Ok(json!({"processes": list.iter().map(process_info_json).collect::<Vec<_>>()}))
            }
            other => Err(unexpected(&other)),
        },
        UnaryRpc::SendInput => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            write_input(client, pid, parse_input(msg)?).await?;
            Ok(json!({}))
        }
        UnaryRpc::CloseStdin => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            done(client.call(AgentRequest::CloseStdin { pid }).await?)
        }
        UnaryRpc::SendSignal => {
            let sel = parse_selector(msg)?;
            let signal = parse_signal(msg)?;
            let pid = resolve_pid(client, sel).await?;
            let reply = done(client.call(AgentRequest::Signal { pid, signal }).await?)?;
            if signal == libc::SIGKILL {
                await_reaped(client, pid).await;
            }
            Ok(reply)
        }
        UnaryRpc::Update => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            let Some(pty) = field(msg, "pty") else { return Ok(json!({})) };
            let size =
                field(pty, "size").ok_or_else(|| RpcError::invalid("pty.size is required"))?;
            let dim = |name: &str| -> Result<u16, RpcError> {
                let n = u32_field(size, name)?.unwrap_or(0);
                u16::try_from(n)
                    .map_err(|_| RpcError::invalid(format!("pty.size.{name} is too large")))
            };
            let (cols, rows) = (dim("cols")?, dim("rows")?);
            done(client.call(AgentRequest::ResizePty { pid, cols, rows }).await?)
        }
        UnaryRpc::Stat => {
            let path = fs_path(str_field(msg, "path")?);
            match client.call(AgentRequest::Stat { path, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(unexpected(&other)),
            }
        }
        UnaryRpc::ListDir => {
            let path = fs_path(str_field(msg, "path")?);
            let depth = u32_field(msg, "depth")?.filter(|d| *d > 0).unwrap_or(1);
            match client.call(AgentRequest::ListDir { path, user, depth }).await? {
                Reply::Entries(list) => {
                    Ok(json!({"entries": describe_all(client, user, &list).await}))
                }
                other => Err(unexpected(&other)),
            }
        }
        UnaryRpc::MakeDir => {
            let path = fs_path(str_field(msg, "path")?);
            match client.call(AgentRequest::MakeDir { path, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(unexpected(&other)),
            }
        }
        UnaryRpc::Move => {
            let from = required_path(msg, "source")?;
            let to = required_path(msg, "destination")?;
            match client.call(AgentRequest::Rename { from, to, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(unexpected(&other)),
            }
        }
        UnaryRpc::Remove => {
            // No empty-path-means-home here: that would remove the home directory.
            let path = required_path(msg, "path")?;
            // envd's `os.RemoveAll`: removing what is not there succeeds.
            match client.call(AgentRequest::Remove { path, user }).await {
                Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound => Ok(json!({})),
                result => done(result?),
            }
        }
        UnaryRpc::CreateWatcher => create_watcher(client, state, user, msg).await,
        UnaryRpc::GetWatcherEvents => {
            let id = str_field(msg, "watcherId")?.unwrap_or_default();
            let (root, user, events) = {
                let watchers = state
                    .watchers
                    .lock()
                    .map_err(|_| RpcError::new(Kind::Internal, "watcher table poisoned"))?;
                let w = watchers.get(&id).ok_or_else(|| watcher_not_found(&id))?;
                (w.root.clone(), w.user, w.events.clone())
            };
            // Events of writes the client saw complete must be in this answer, as with envd:
            // the agent flushes its watches before answering the ping, and its frames arrive
            // in order, so those events precede the pong.
            sync_agent(client).await?;
            let taken = events.lock().await.drain();
            let mut out = Vec::new();
            for ev in taken {
                if let Event::Fs { name, kind, .. } = ev {
                    out.push(fs_event(client, root.as_deref(), user, name, kind).await);
                }
            }
            Ok(json!({"events": out}))
        }
        UnaryRpc::RemoveWatcher => {
            let id = str_field(msg, "watcherId")?.unwrap_or_default();
            let removed = state
                .watchers
                .lock()
                .map_err(|_| RpcError::new(Kind::Internal, "watcher table poisoned"))?
                .remove(&id);
            let w = removed.ok_or_else(|| watcher_not_found(&id))?;
            if let Err(e) = client.call(AgentRequest::Unwatch { watch: w.watch }).await {
                tracing::debug!(watch = w.watch, error = %e, "removing a watcher");
            }
            Ok(json!({}))
        }
    }
}

/// After a change made through envd, lets the sandbox's watches catch up before answering, as
/// envd's own watcher does in the time a reply takes to cross the network: a recursive watch
/// must have added the directory just made before the client writes into it, and a poll right
/// after a write must see its events.
pub(super) async fn settle(client: &AgentClient, state: &EnvdState) {
    if state.watching()
        && let Err(e) = sync_agent(client).await
    {
        tracing::debug!(error = ?e, "letting watches settle");
    }
}

/// One round trip to the agent: it flushes every watch's pending events before answering any
/// request, so once the reply is in, the events of every earlier change are too.
pub(super) async fn sync_agent(client: &AgentClient) -> Result<(), RpcError> {
    match client.call(AgentRequest::Ping).await? {
        Reply::Pong => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// Waits (briefly) until a killed process has been reaped, so that what the caller does next
/// (the SDK's own tests run `kill -0 <pid>` right away) no longer finds it, not even as a
/// zombie. The agent reaps on SIGCHLD, so this is a few milliseconds.
pub(super) async fn await_reaped(client: &AgentClient, pid: u32) {
    let deadline = Instant::now() + REAP_WAIT;
    while Instant::now() < deadline {
        match client.call(AgentRequest::ListProcesses).await {
            Ok(Reply::Processes(list)) if list.iter().any(|p| p.pid == pid) => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn watcher_not_found(id: &str) -> RpcError {
    RpcError::new(Kind::NotFound, format!("watcher {id} not found"))
}

pub(super) async fn create_watcher(
    client: &Arc<AgentClient>,
    state: &EnvdState,
    user: SandboxUser,
    msg: &Value,
) -> Result<Value, RpcError> {
    let (watch, root, events) = start_watch(client, user, parse_watch(msg)?).await?;
    let events = Arc::new(tokio::sync::Mutex::new(events));
    let id = watch.to_string();
    let mut watchers = state
        .watchers
        .lock()
        .map_err(|_| RpcError::new(Kind::Internal, "watcher table poisoned"))?;
    watchers.insert(id.clone(), PollWatcher { watch, root, user, events });
    Ok(json!({"watcherId": id}))
}
