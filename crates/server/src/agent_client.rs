//! Async, multiplexed client for one sandbox's agent.
//!
//! Many requests share the control channel. Each gets an id; a reader task routes the agent's
//! `Response` to the waiting caller and, for streaming requests (spawn, attach, watch), forwards
//! the events tagged with that id until the process exits or the caller goes away.
//! The agent is untrusted: frames are size-checked before decoding, and a malformed frame
//! closes the channel rather than panicking.

use std::collections::HashMap;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_proto::{AgentError, Envelope, Event, ProtoError, Reply, Request, encode, frame_len};
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

struct Pending {
    reply: Option<ReplySender>,
    events: Option<mpsc::UnboundedSender<Event>>,
    /// A watch: once the reply names the watch id, its events are routed by that id.
    watch: bool,
}

#[derive(Default)]
struct Routes {
    pending: HashMap<u64, Pending>,
    watches: HashMap<u64, mpsc::UnboundedSender<Event>>,
    closed: bool,
}

/// A connection to one agent. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
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
        let client = Arc::new(AgentClient {
            writer: tokio::sync::Mutex::new(wr),
            routes: routes.clone(),
            next_id: AtomicU64::new(1),
        });
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

    async fn send(&self, id: u64, request: Request) -> Result<(), ClientError> {
        let bytes = encode(&Envelope { id, request })?;
        let mut w = self.writer.lock().await;
        if let Err(e) = w.write_all(&bytes).await {
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
        self.send(id, request).await?;
        Ok(rx.await.map_err(|_| ClientError::Closed)??)
    }

    /// Sends a streaming request (spawn, attach, watch) and returns its reply together with
    /// the events that follow it.
    pub async fn stream(
        &self,
        request: Request,
    ) -> Result<(Reply, mpsc::UnboundedReceiver<Event>), ClientError> {
        let (tx, rx) = oneshot::channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let watch = matches!(request, Request::Watch { .. });
        let id = self.register(Pending { reply: Some(tx), events: Some(etx), watch })?;
        self.send(id, request).await?;
        let reply = rx.await.map_err(|_| ClientError::Closed)??;
        Ok((reply, erx))
    }

    /// Whether the channel has closed (the agent exited or misbehaved).
    pub fn is_closed(&self) -> bool {
        self.routes.lock().map(|r| r.0.closed).unwrap_or(true)
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
                let gone = match r.pending.get(&id).and_then(|p| p.events.as_ref()) {
                    Some(tx) => tx.send(event).is_err(),
                    None => false,
                };
                if gone {
                    r.pending.remove(&id);
                }
            }
            Event::Exited { id, .. } => {
                if let Some(p) = r.pending.remove(&id)
                    && let Some(tx) = p.events
                {
                    let _ = tx.send(event);
                }
            }
            Event::Fs { watch, .. } => {
                let gone = match r.watches.get(&watch) {
                    Some(tx) => tx.send(event).is_err(),
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
