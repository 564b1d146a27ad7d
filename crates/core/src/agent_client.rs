//! Async, multiplexed client for one sandbox's agent.
//!
//! Many requests share the control channel. Each gets an id; a reader task routes the agent's
//! `Response` to the waiting caller and, for streaming requests (spawn, attach, watch), forwards
//! the events tagged with that id until the process exits or the caller goes away.
//! The agent is untrusted: frames are size-checked before decoding, and a malformed frame
//! closes the channel rather than panicking.
//!
//! Streams are flow-controlled (see [`ringfence_proto::STREAM_WINDOW`]): an [`EventStream`]
//! acknowledges what its consumer took, so the agent sends a stream no more than a window ahead
//! of its consumer. The reader task never waits for a consumer (one slow stream must not stall
//! the sandbox's others); it counts what each stream has queued instead, and drops what an agent
//! sends past the window, which only a misbehaving one does.

use std::collections::HashMap;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_proto::{
    AgentError, Envelope, Event, ProtoError, Reply, Request, STREAM_SLACK, STREAM_WINDOW, encode,
    flow_cost, frame_len,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

/// Failures talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("the sandbox agent is gone")]
    Closed,
    #[error("agent channel: {0}")]
    Proto(#[from] ProtoError),
    #[error("agent channel: {0}")]
    Io(#[from] std::io::Error),
}

type ReplySender = oneshot::Sender<Result<Reply, AgentError>>;

/// Where a stream's events go, and how many bytes of them (by [`flow_cost`]) wait there.
struct Route {
    tx: mpsc::UnboundedSender<Event>,
    queued: Arc<AtomicU64>,
    /// Set once an over-window event was dropped, so that it is logged once.
    overrun: bool,
}

impl Route {
    /// Queues `event` unless the agent overran the window; false once the consumer is gone.
    fn deliver(&mut self, event: Event) -> bool {
        let cost = flow_cost(&event);
        let queued = self.queued.load(Ordering::Acquire);
        if cost > 0 && queued.saturating_add(cost) > STREAM_WINDOW + STREAM_SLACK {
            if !self.overrun {
                self.overrun = true;
                tracing::warn!(queued, cost, "agent sent past its flow-control window; dropped");
            }
            return !self.tx.is_closed();
        }
        self.queued.fetch_add(cost, Ordering::AcqRel);
        self.tx.send(event).is_ok()
    }
}

struct Pending {
    reply: Option<ReplySender>,
    events: Option<Route>,
    /// A watch: once the reply names the watch id, its events are routed by that id.
    watch: bool,
}

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, Pending>,
    watches: HashMap<u64, Route>,
    closed: bool,
}

/// A connection to one agent. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentClient {
    /// Frames for the writer task. Writing there, not in the caller, means a caller that is
    /// dropped (its client went away mid-upload) can never leave half a frame on the channel,
    /// which would desynchronise it for every other request of the sandbox.
    ///
    /// Unbounded but bounded by construction: each request frame has a caller waiting for its
    /// reply, and one-way frames are acknowledgements of at least a quarter window consumed,
    /// of which a stream can owe no more than four before the agent stops sending to it.
    frames: mpsc::UnboundedSender<Vec<u8>>,
    routes: Arc<Mutex<RoutesHandle>>,
    next_id: AtomicU64,
}

/// Wrapper so `AgentClient` can derive `Debug` without exposing the routing table.
struct RoutesHandle(Routes);

impl std::fmt::Debug for RoutesHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("pending", &self.0.pending.len())
            .field("watches", &self.0.watches.len())
            .finish()
    }
}

impl AgentClient {
    /// Takes over a (blocking) control channel and starts the reader task on the current
    /// tokio runtime. Id 0 is reserved for the agent's initial process.
    pub fn new(stream: StdUnixStream) -> Result<Arc<AgentClient>, ClientError> {
        stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(stream)?;
        let (rd, wr) = stream.into_split();
        let routes = Arc::new(Mutex::new(RoutesHandle(Routes::default())));
        let (frames, queue) = mpsc::unbounded_channel();
        let client =
            Arc::new(AgentClient { frames, routes: routes.clone(), next_id: AtomicU64::new(1) });
        tokio::spawn(write_loop(wr, queue));
        // The reader logs for the sandbox (the agent's own messages): it carries the span the
        // client was made in, which names the sandbox.
        tokio::spawn(tracing::Instrument::in_current_span(read_loop(rd, routes)));
        Ok(client)
    }

    fn register(&self, pending: Pending) -> Result<u64, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut r = self.routes.lock().map_err(|_| ClientError::Closed)?;
        if r.0.closed {
            return Err(ClientError::Closed);
        }
        r.0.pending.insert(id, pending);
        Ok(id)
    }

    fn send(&self, id: u64, request: Request) -> Result<(), ClientError> {
        let queued = encode(&Envelope { id, request })
            .and_then(|bytes| self.frames.send(bytes).map_err(|_| closed_channel()));
        if let Err(e) = queued {
            if let Ok(mut r) = self.routes.lock() {
                r.0.pending.remove(&id);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending { reply: Some(tx), events: None, watch: false })?;
        self.send(id, request)?;
        Ok(rx.await.map_err(|_| ClientError::Closed)??)
    }

    /// Sends a streaming request (spawn, attach, watch) and returns its reply together with
    /// the events that follow it.
    pub async fn stream(
        self: &Arc<Self>,
        request: Request,
    ) -> Result<(Reply, EventStream), ClientError> {
        let (tx, rx) = oneshot::channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let watch = matches!(request, Request::Watch { .. });
        let route = Route { tx: etx, queued: queued.clone(), overrun: false };
        let id = self.register(Pending { reply: Some(tx), events: Some(route), watch })?;
        self.send(id, request)?;
        let reply = rx.await.map_err(|_| ClientError::Closed)??;
        let flow = match reply {
            Reply::Watching { watch } => Flow::Watch(watch),
            _ => Flow::Output(id),
        };
        let events =
            EventStream { rx: erx, queued, flow, client: self.clone(), unacked: 0, done: false };
        Ok((reply, events))
    }

    /// Sends a request the agent does not answer (flow control). Never waits, so taking an
    /// event stays cancel-safe.
    fn send_one_way(&self, request: Request) -> Result<(), ClientError> {
        debug_assert!(request.is_one_way());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(&Envelope { id, request })?;
        self.frames.send(bytes).map_err(|_| ClientError::Closed)
    }

    /// Whether the channel has closed (the agent exited or misbehaved).
    pub fn is_closed(&self) -> bool {
        self.routes.lock().map(|r| r.0.closed).unwrap_or(true)
    }
}

/// Which flow a stream's acknowledgements credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// A process's output to the `Spawn` or `Attach` with this request id.
    Output(u64),
    Watch(u64),
}

/// The events of a streaming request. Taking events acknowledges them to the agent, which then
/// sends more; a stream nobody takes from stops its process's output at the pipe.
///
/// Dropping an output stream detaches it, so the process no longer waits for it.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
    queued: Arc<AtomicU64>,
    flow: Flow,
    client: Arc<AgentClient>,
    /// Bytes taken but not yet acknowledged: acknowledged in batches of a quarter window.
    unacked: u64,
    /// The process exited (or the stream was detached): nothing to detach on drop.
    done: bool,
}

impl EventStream {
    /// The next event; `None` once the stream ended (the process exited and its `Exited` was
    /// taken, or the agent is gone).
    ///
    /// Cancel-safe (for `select!`): once an event is taken it is returned, nothing after it waits.
    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        self.took(&ev);
        Some(ev)
    }

    /// Every event queued right now, without waiting.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(ev) = self.rx.try_recv() {
            self.took(&ev);
            out.push(ev);
        }
        out
    }

    /// Bytes queued for this stream, not yet taken.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    fn took(&mut self, ev: &Event) {
        if matches!(ev, Event::Exited { .. }) {
            self.done = true;
        }
        let cost = flow_cost(ev);
        if cost == 0 {
            return;
        }
        self.queued.fetch_sub(cost.min(self.queued()), Ordering::AcqRel);
        self.unacked += cost;
        if self.unacked < STREAM_WINDOW / 4 {
            return;
        }
        let bytes = std::mem::take(&mut self.unacked);
        let request = match self.flow {
            Flow::Output(id) => Request::Credit { id, bytes },
            Flow::Watch(watch) => Request::WatchCredit { watch, bytes },
        };
        if let Err(e) = self.client.send_one_way(request) {
            tracing::debug!(error = %e, "acknowledging stream events");
        }
    }

    /// Stops receiving a process's output: the process no longer waits for this stream, which
    /// still gets the `Exited`. What was queued is dropped.
    pub fn detach(&mut self) {
        let Flow::Output(id) = self.flow else { return };
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Err(e) = self.client.send_one_way(Request::Detach { id }) {
            tracing::debug!(error = %e, "detaching a stream");
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.detach();
    }
}

fn closed_channel() -> ProtoError {
    ProtoError::Io(std::io::ErrorKind::BrokenPipe.into())
}

/// Writes queued frames whole, in order, until the channel fails or the client is dropped.
async fn write_loop(mut wr: OwnedWriteHalf, mut frames: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            tracing::debug!(error = %e, "agent channel write failed");
            break;
        }
    }
}

async fn read_frame(rd: &mut OwnedReadHalf) -> Result<Event, ClientError> {
    let mut prefix = [0u8; 4];
    rd.read_exact(&mut prefix).await?;
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(ringfence_proto::decode(&body)?)
}

async fn read_loop(mut rd: OwnedReadHalf, routes: Arc<Mutex<RoutesHandle>>) {
    loop {
        let event = match read_frame(&mut rd).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "agent channel closed");
                break;
            }
        };
        let Ok(mut guard) = routes.lock() else { break };
        let r = &mut guard.0;
        match event {
            Event::Response { id, result } => {
                let Some(p) = r.pending.get_mut(&id) else { continue };
                if p.watch
                    && let Ok(Reply::Watching { watch }) = &result
                    && let Some(events) = p.events.take()
                {
                    r.watches.insert(*watch, events);
                }
                let failed = result.is_err();
                if let Some(reply) = p.reply.take() {
                    let _ = reply.send(result);
                }
                // Unary requests, failed streams and watches (now routed by watch id) are done.
                if p.events.is_none() || failed {
                    r.pending.remove(&id);
                }
            }
            Event::Stdout { id, .. } | Event::Stderr { id, .. } | Event::Pty { id, .. } => {
                let gone = match r.pending.get_mut(&id).and_then(|p| p.events.as_mut()) {
                    Some(route) => !route.deliver(event),
                    None => false,
                };
                if gone {
                    r.pending.remove(&id);
                }
            }
            Event::Exited { id, .. } => {
                if let Some(p) = r.pending.remove(&id)
                    && let Some(mut route) = p.events
                {
                    route.deliver(event);
                }
            }
            Event::Fs { watch, .. } => {
                let gone = match r.watches.get_mut(&watch) {
                    Some(route) => !route.deliver(event),
                    None => false,
                };
                if gone {
                    r.watches.remove(&watch);
                }
            }
            Event::Log { level, message } => {
                tracing::info!(?level, "agent: {message}");
            }
            Event::Ready(_) | Event::SetupFailed { .. } => {}
        }
    }
    // Closed: every waiter learns it (their senders drop).
    if let Ok(mut guard) = routes.lock() {
        guard.0.closed = true;
        guard.0.pending.clear();
        guard.0.watches.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use ringfence_proto::{Envelope, Event, Reply, Request, SandboxUser, encode, read_frame};

    use super::*;

    /// A fake agent: the other end of the channel, read and written by hand.
    fn pair() -> (Arc<AgentClient>, StdUnixStream) {
        let (ours, theirs) = StdUnixStream::pair().unwrap();
        (AgentClient::new(ours).unwrap(), theirs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_dropped_mid_write_leaves_no_partial_frame() {
        let (client, agent) = pair();
        // A 4 MB request cannot fit the socket buffer: its write is in progress when the
        // caller goes away (a client aborting an upload drops its handler like this).
        let big = Request::UploadWrite { upload: 1, offset: 0, data: vec![7; 3 << 20] };
        let call = client.call(big);
        let _ = tokio::time::timeout(Duration::from_millis(100), call).await;
        let ping = tokio::spawn({
            let client = client.clone();
            async move { client.call(Request::Ping).await }
        });
        // The agent reads whole frames: the abandoned one, then the ping (a partial frame
        // would swallow the ping and leave the read waiting for bytes that never come).
        let mut rd = agent.try_clone().unwrap();
        rd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let frames = tokio::task::spawn_blocking(move || {
            let a: Envelope = read_frame(&mut rd).unwrap().unwrap();
            let b: Envelope = read_frame(&mut rd).unwrap().unwrap();
            (a, b)
        })
        .await
        .unwrap();
        assert!(matches!(frames.0.request, Request::UploadWrite { .. }));
        assert_eq!(frames.1.request, Request::Ping);
        let reply = Event::Response { id: frames.1.id, result: Ok(Reply::Pong) };
        std::io::Write::write_all(&mut (&agent), &encode(&reply).unwrap()).unwrap();
        assert_eq!(ping.await.unwrap().unwrap(), Reply::Pong);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_acknowledge_what_they_took_and_drop_what_overruns_the_window() {
        let (client, agent) = pair();
        let spawn = tokio::spawn({
            let client = client.clone();
            async move {
                let spec = ringfence_proto::SpawnSpec {
                    cmd: "x".into(),
                    args: vec![],
                    env: Default::default(),
                    cwd: None,
                    user: SandboxUser::User,
                    stdio: ringfence_proto::StdioMode::Pipe { stdin: false },
                    tag: None,
                };
                client.stream(Request::Spawn(spec)).await
            }
        });
        let mut rd = agent.try_clone().unwrap();
        let req: Envelope =
            tokio::task::spawn_blocking(move || read_frame(&mut rd).unwrap().unwrap())
                .await
                .unwrap();
        let id = req.id;
        let send =
            |ev: &Event| std::io::Write::write_all(&mut (&agent), &encode(ev).unwrap()).unwrap();
        send(&Event::Response { id, result: Ok(Reply::Spawned { pid: 5 }) });
        let (_, mut events) = spawn.await.unwrap().unwrap();
        // An agent that ignores the window: what passes window + slack is dropped here. Sent
        // before anything is taken, from another thread (the writes block on a full socket).
        let chunk = vec![1u8; 64 << 10];
        let n = ((STREAM_WINDOW + STREAM_SLACK) as usize / chunk.len()) + 8;
        let mut wr = agent.try_clone().unwrap();
        tokio::task::spawn_blocking(move || {
            for _ in 0..n {
                let ev = Event::Stdout { id, data: chunk.clone() };
                std::io::Write::write_all(&mut wr, &encode(&ev).unwrap()).unwrap();
            }
            let exited = Event::Exited {
                id,
                pid: 5,
                status: ringfence_proto::ExitStatus::Code(0),
                usage: Default::default(),
            };
            std::io::Write::write_all(&mut wr, &encode(&exited).unwrap()).unwrap();
        })
        .await
        .unwrap();
        // The writes can finish while the socket still holds the tail: let the reader take it
        // all before anything is consumed (taking frees room, which only credit should).
        let mut settled = u64::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = events.queued();
            if now == settled {
                break;
            }
            settled = now;
        }
        assert!(settled <= STREAM_WINDOW + STREAM_SLACK, "{settled} bytes queued past the window");
        let mut got = 0;
        while let Some(ev) = events.recv().await {
            if let Event::Stdout { data, .. } = ev {
                got += data.len();
            }
        }
        assert!(got as u64 <= STREAM_WINDOW + STREAM_SLACK, "{got} bytes queued past the window");
        assert_eq!(events.queued(), 0);
        // What was taken was acknowledged, in batches.
        let mut rd = agent.try_clone().unwrap();
        rd.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let credited = tokio::task::spawn_blocking(move || {
            let mut total = 0;
            while let Ok(Some(Envelope { request: Request::Credit { id: i, bytes }, .. })) =
                read_frame::<_, Envelope>(&mut rd)
            {
                assert_eq!(i, id);
                total += bytes;
                if total >= got as u64 - STREAM_WINDOW / 4 {
                    break;
                }
            }
            total
        })
        .await
        .unwrap();
        assert!(credited + STREAM_WINDOW / 4 >= got as u64, "credited {credited} of {got}");
    }
}
