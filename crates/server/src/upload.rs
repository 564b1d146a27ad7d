//! `POST /files`: receiving an upload (a raw body or a multipart form, either possibly gzip) and
//! writing its files through the agent, each one atomically.
//!
//! [`receive_upload`] is the whole request-side pipeline, pure over an [`UploadSink`]: a fuzz
//! harness drives it with arbitrary headers and bodies and a sink that keeps bytes in memory.
//! [`AgentSink`] is the real sink: each file goes to a hidden temporary file in the sandbox
//! (`UploadBegin`/`UploadWrite`) and replaces its target only when complete (`UploadCommit`),
//! so an upload cut short leaves the target as it was. Every upload that touched a file is
//! audited, one that was cut short included, with what happened to each file.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::header::HeaderMap;
use futures_util::{Stream, StreamExt};
use ringfence_proto::{CHUNK, EntryInfo, Reply, Request as AgentRequest, SandboxUser};
use serde_json::{Value, json};

use crate::agent_client::AgentClient;
use crate::codec::{InflateError, InflateLimits, gunzip_stream};
use crate::e2b_error::E2bError;
use crate::envd::{EnvdState, files_error};

/// Output a gzip upload may produce per byte of input, past [`GZIP_RATIO_GRACE`]. Text and code
/// compress 3-20:1; only runs of nearly identical bytes approach deflate's ~1032:1 ceiling.
pub const GZIP_MAX_RATIO: u64 = 256;
/// Inflated bytes a gzip upload may produce whatever its ratio (a file of zeros this size goes
/// through).
pub const GZIP_RATIO_GRACE: u64 = 64 << 20;

/// A body stream as the pipeline consumes it: each failure already carries its answer.
pub type UploadStream = Pin<Box<dyn Stream<Item = Result<Bytes, E2bError>> + Send>>;

/// Where an upload's files go, one at a time: `begin`, `write`s in order, then `commit` or
/// `abort`.
pub trait UploadSink: Send {
    /// Starts the file at `path`; returns the most bytes it may take (the space free).
    fn begin(&mut self, path: &str) -> impl Future<Output = Result<u64, E2bError>> + Send;
    /// Writes the next piece, which starts at `offset`.
    fn write(
        &mut self,
        offset: u64,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), E2bError>> + Send;
    /// Puts the file in place with `metadata`.
    fn commit(
        &mut self,
        metadata: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<EntryInfo, E2bError>> + Send;
    /// Drops the file begun; its target stays as it was.
    fn abort(&mut self) -> impl Future<Output = ()> + Send;
}

fn bad_request(message: impl Into<String>) -> E2bError {
    E2bError::invalid(message)
}

/// `Content-Encoding` of an upload: gzip or nothing.
pub fn upload_gzip(headers: &HeaderMap) -> Result<bool, String> {
    let value = headers.get("content-encoding").and_then(|v| v.to_str().ok());
    match value.map(|e| e.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(e) if e.is_empty() || e == "identity" => Ok(false),
        Some(e) if e == "gzip" => Ok(true),
        Some(e) => Err(format!("unsupported Content-Encoding: {e}, supported: [gzip]")),
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn media_type(headers: &HeaderMap) -> String {
    content_type(headers).split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// File metadata sent as `X-Metadata-<key>: <value>` headers (envd 0.6.2).
pub fn upload_metadata(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            let key = name.as_str().strip_prefix("x-metadata-")?;
            Some((key.to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// The limits of a gzip upload that may inflate to `max_output` bytes at most.
pub fn upload_inflate_limits(max_output: u64) -> InflateLimits {
    InflateLimits { max_output, max_ratio: Some(GZIP_MAX_RATIO), ratio_grace: GZIP_RATIO_GRACE }
}

/// The answer to a gzip body that could not be inflated.
pub fn inflate_error(e: &InflateError) -> E2bError {
    match e {
        InflateError::Malformed(m) => bad_request(format!("error decompressing request body: {m}")),
        InflateError::Ratio { .. } => E2bError::too_large(e.to_string()),
        InflateError::TooLarge { limit } => E2bError::no_space(format!(
            "the gzip body inflates past {limit} bytes, more than the sandbox has free; \
                 refused without inflating the rest"
        )),
        InflateError::Input(m) => E2bError::client_gone(format!("error reading the upload: {m}")),
    }
}

/// A raw upload body, inflated when `gzip` gives its limits.
pub fn upload_body(body: Body, gzip: Option<InflateLimits>) -> UploadStream {
    let stream = body.into_data_stream().map(|r| r.map_err(|e| e.to_string()));
    match gzip {
        Some(limits) => {
            Box::pin(gunzip_stream(stream, limits).map(|r| r.map_err(|e| inflate_error(&e))))
        }
        None => Box::pin(stream.map(|r| {
            r.map_err(|e| E2bError::client_gone(format!("error reading the upload: {e}")))
        })),
    }
}

/// The answer to a multipart parsing failure: the inflation's own when that is the cause.
fn form_error(context: &str, e: &multer::Error) -> E2bError {
    if let multer::Error::StreamReadFailed(inner) = e
        && let Some(inflate) = inner.downcast_ref::<InflateError>()
    {
        return inflate_error(inflate);
    }
    bad_request(format!("{context}: {e}"))
}

/// Streams one file into `sink` (begun, with `free` bytes of room) in [`CHUNK`]-sized writes,
/// then commits it; on any failure the file is aborted and its target left as it was.
pub async fn write_file<S: UploadSink>(
    sink: &mut S,
    stream: impl Stream<Item = Result<Bytes, E2bError>>,
    free: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<EntryInfo, E2bError> {
    match write_pieces(sink, stream, free).await {
        Ok(()) => match sink.commit(metadata).await {
            Ok(entry) => Ok(entry),
            Err(e) => {
                sink.abort().await;
                Err(e)
            }
        },
        Err(e) => {
            sink.abort().await;
            Err(e)
        }
    }
}

/// Most of a refused upload's remaining body read (and dropped) before the refusal is sent.
const DRAIN_BYTES: u64 = 64 << 20;
/// How long reading a refused upload's remaining body may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what the client is still sending of a refused upload, within
/// [`DRAIN_BYTES`] and [`DRAIN_TIME`]: a client whose request is answered and closed while it
/// is still writing gets a reset connection (EPIPE) instead of the answer, and cannot tell a
/// full disk from a broken network.
async fn drain(stream: &mut (impl Stream<Item = Result<Bytes, E2bError>> + Unpin)) {
    let mut read = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while read < DRAIN_BYTES {
            match stream.next().await {
                Some(Ok(chunk)) => read += chunk.len() as u64,
                _ => break,
            }
        }
    })
    .await;
}

/// Incoming chunks are cut into batches without copying what follows each cut: one pass over
/// the bytes, whatever the chunk sizes.
async fn write_pieces<S: UploadSink>(
    sink: &mut S,
    stream: impl Stream<Item = Result<Bytes, E2bError>>,
    free: u64,
) -> Result<(), E2bError> {
    let mut stream = std::pin::pin!(stream);
    let mut batch: Vec<u8> = Vec::new();
    let mut offset = 0u64;
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk?;
        if offset + (batch.len() + chunk.len()) as u64 > free {
            drain(&mut stream).await;
            return Err(E2bError::no_space(format!(
                "not enough disk space: the upload exceeds the {free} bytes free"
            )));
        }
        while !chunk.is_empty() {
            let take = (CHUNK - batch.len()).min(chunk.len());
            batch.extend_from_slice(&chunk.split_to(take));
            if batch.len() == CHUNK {
                let piece = std::mem::take(&mut batch);
                sink.write(offset, piece).await?;
                offset += CHUNK as u64;
            }
        }
    }
    if !batch.is_empty() {
        sink.write(offset, batch).await?;
    }
    Ok(())
}

/// Receives an upload: a raw body to `path`, or a multipart form whose `file` parts go to
/// `path` when given, else to each part's file name (the SDK sends the full target path
/// there). Files are written in order; when one fails, those before it stay written.
pub async fn receive_upload<S: UploadSink>(
    sink: &mut S,
    headers: &HeaderMap,
    path: Option<String>,
    body: Body,
) -> Result<Vec<EntryInfo>, E2bError> {
    let gzip = upload_gzip(headers).map_err(bad_request)?;
    let media = media_type(headers);
    let metadata = upload_metadata(headers);
    if media == "application/octet-stream" {
        let path = path
            .ok_or_else(|| bad_request("path query parameter is required for raw body upload"))?;
        let free = sink.begin(&path).await?;
        let limits = gzip.then(|| upload_inflate_limits(free));
        let entry = write_file(sink, upload_body(body, limits), free, &metadata).await?;
        return Ok(vec![entry]);
    }
    if !media.starts_with("multipart/") {
        return Err(bad_request(format!(
            "unsupported content type: {:?}, expected multipart/form-data or application/octet-stream",
            content_type(headers)
        )));
    }
    let boundary = multer::parse_boundary(content_type(headers))
        .map_err(|e| bad_request(format!("error parsing multipart form: {e}")))?;
    // The whole form is what is compressed; files are capped by the space free as they go.
    let stream: Pin<Box<dyn Stream<Item = Result<Bytes, InflateError>> + Send>> = if gzip {
        let body = body.into_data_stream().map(|r| r.map_err(|e| e.to_string()));
        Box::pin(gunzip_stream(body, upload_inflate_limits(u64::MAX)))
    } else {
        Box::pin(body.into_data_stream().map(|r| r.map_err(|e| InflateError::Input(e.to_string()))))
    };
    let mut form = multer::Multipart::new(Paced { inner: stream, yielded: false }, boundary);
    let mut written = Vec::new();
    let mut targets = HashSet::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(form_error("error reading form", &e)),
        };
        if field.name() != Some("file") {
            continue;
        }
        let target =
            path.clone().or_else(|| field.file_name().map(str::to_owned)).filter(|t| !t.is_empty());
        let Some(target) = target else {
            return Err(bad_request("a file part needs a file name, or the path query parameter"));
        };
        if !targets.insert(target.clone()) {
            return Err(bad_request(format!(
                "you cannot upload multiple files to the same path '{target}' in one upload request"
            )));
        }
        let free = sink.begin(&target).await?;
        let chunks = futures_util::stream::unfold(field, |mut f| async move {
            match f.chunk().await {
                Ok(Some(b)) => Some((Ok(b), f)),
                Ok(None) => None,
                Err(e) => Some((Err(form_error("error reading the upload", &e)), f)),
            }
        });
        written.push(write_file(sink, chunks, free, &metadata).await?);
    }
    Ok(written)
}

/// Hands the form parser one chunk per poll. The parser reads its input until it would block,
/// buffering all of it: with a body that is always ready (a fast client, or the inflation of a
/// gzip form, which never waits) it read ahead of the writes without bound. Yielding after each
/// chunk (and waking at once) keeps its buffer to about one chunk.
struct Paced<S> {
    inner: S,
    yielded: bool,
}

impl<S: Stream + Unpin> Stream for Paced<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if std::mem::take(&mut self.yielded) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if matches!(item, Poll::Ready(Some(_))) {
            self.yielded = true;
        }
        item
    }
}

// ---------------------------------------------------------------------------------------------
// The agent-backed sink.

/// The file being written.
#[derive(Debug)]
struct Current {
    upload: u64,
    path: String,
    bytes: u64,
}

/// Writes an upload's files through the agent and records what happened to them.
///
/// Dropped before [`AgentSink::finish`] (the client went away mid-upload, so its request
/// handler was dropped), it aborts the file in progress and records the upload as aborted, in
/// the background.
#[derive(Debug)]
pub struct AgentSink {
    client: Arc<AgentClient>,
    user: SandboxUser,
    state: Arc<EnvdState>,
    current: Option<Current>,
    /// What happened to each file: `{path, bytes, outcome}`.
    files: Vec<Value>,
    finished: bool,
}

impl AgentSink {
    pub fn new(client: Arc<AgentClient>, state: Arc<EnvdState>, user: SandboxUser) -> AgentSink {
        AgentSink { client, user, state, current: None, files: Vec::new(), finished: false }
    }

    /// The audit record's detail: the files written (`paths`, as before), what happened to each
    /// one, and how the upload as a whole ended.
    fn detail(&self, outcome: &str, error: Option<&str>) -> Value {
        let paths: Vec<Value> = self
            .files
            .iter()
            .filter(|f| f["outcome"] == "written")
            .map(|f| f["path"].clone())
            .collect();
        let mut detail = json!({"paths": paths, "outcome": outcome, "files": self.files});
        if let Some(e) = error {
            detail["error"] = json!(e);
        }
        detail
    }

    /// Records the upload's outcome (before the client hears it). An upload that touched no
    /// file (refused before any) changed nothing and is not recorded.
    pub async fn finish(mut self, result: &Result<Vec<EntryInfo>, E2bError>) {
        self.finished = true;
        if self.files.is_empty() {
            return;
        }
        let detail = match result {
            Ok(_) => self.detail("written", None),
            Err(e) if e.is_client_gone() => self.detail("aborted", Some(e.message())),
            Err(e) => self.detail("failed", Some(e.message())),
        };
        self.state.audit("file.write", detail).await;
    }
}

impl UploadSink for AgentSink {
    async fn begin(&mut self, path: &str) -> Result<u64, E2bError> {
        let request = AgentRequest::UploadBegin { path: path.to_owned(), user: self.user };
        match self.client.call(request).await {
            Ok(Reply::Upload { upload, free, path }) => {
                self.current = Some(Current { upload, path, bytes: 0 });
                Ok(free)
            }
            Ok(other) => Err(E2bError::internal(format!("unexpected agent reply: {other:?}"))),
            Err(e) => Err(files_error(e)),
        }
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), E2bError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(E2bError::internal_plain("no file begun"));
        };
        let len = data.len() as u64;
        let request = AgentRequest::UploadWrite { upload: cur.upload, offset, data };
        match self.client.call(request).await {
            Ok(Reply::Done) => {
                cur.bytes += len;
                Ok(())
            }
            Ok(other) => Err(E2bError::internal(format!("unexpected agent reply: {other:?}"))),
            Err(e) => Err(files_error(e)),
        }
    }

    async fn commit(&mut self, metadata: &BTreeMap<String, String>) -> Result<EntryInfo, E2bError> {
        let Some(cur) = self.current.as_ref() else {
            return Err(E2bError::internal_plain("no file begun"));
        };
        let request = AgentRequest::UploadCommit { upload: cur.upload, metadata: metadata.clone() };
        let result = self.client.call(request).await;
        // Committed or not, the agent is done with this upload (a failed commit drops it).
        let Some(cur) = self.current.take() else {
            return Err(E2bError::internal_plain("no file begun"));
        };
        let outcome = if matches!(result, Ok(Reply::Entry(_))) { "written" } else { "aborted" };
        self.files.push(json!({"path": cur.path, "bytes": cur.bytes, "outcome": outcome}));
        match result {
            Ok(Reply::Entry(e)) => Ok(e),
            Ok(other) => Err(E2bError::internal(format!("unexpected agent reply: {other:?}"))),
            Err(e) => Err(files_error(e)),
        }
    }

    async fn abort(&mut self) {
        let Some(cur) = self.current.take() else { return };
        self.files.push(json!({"path": cur.path, "bytes": cur.bytes, "outcome": "aborted"}));
        // Nothing more to do when it fails: the agent drops what the connection left.
        let _ = self.client.call(AgentRequest::UploadAbort { upload: cur.upload }).await;
    }
}

impl Drop for AgentSink {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let abort = self.current.take().map(|cur| {
            self.files.push(json!({"path": cur.path, "bytes": cur.bytes, "outcome": "aborted"}));
            cur.upload
        });
        if self.files.is_empty() {
            return;
        }
        let detail = self.detail("aborted", Some("the client went away before the upload ended"));
        let (client, state) = (self.client.clone(), self.state.clone());
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Some(upload) = abort {
                    let _ = client.call(AgentRequest::UploadAbort { upload }).await;
                }
                state.audit("file.write", detail).await;
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An in-memory sink.

/// A sink that keeps files in memory, for tests and fuzzing of [`receive_upload`].
#[derive(Debug, Default)]
pub struct MemorySink {
    /// Space each file may take, as `begin` reports it.
    pub free: u64,
    /// Committed files, in order.
    pub files: Vec<(String, Vec<u8>, BTreeMap<String, String>)>,
    /// Files begun and then aborted, with the bytes they had.
    pub aborted: Vec<(String, usize)>,
    current: Option<(String, Vec<u8>)>,
}

impl MemorySink {
    pub fn new(free: u64) -> MemorySink {
        MemorySink { free, ..MemorySink::default() }
    }

    fn entry(path: &str, size: usize) -> EntryInfo {
        EntryInfo {
            name: path.rsplit('/').next().unwrap_or(path).to_owned(),
            path: path.to_owned(),
            kind: ringfence_proto::FileType::File,
            size: size as u64,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: (0, 0),
            symlink_target: None,
            metadata: BTreeMap::new(),
        }
    }
}

impl UploadSink for MemorySink {
    async fn begin(&mut self, path: &str) -> Result<u64, E2bError> {
        if self.current.is_some() {
            return Err(E2bError::internal_plain("begun twice"));
        }
        self.current = Some((path.to_owned(), Vec::new()));
        Ok(self.free)
    }

    async fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), E2bError> {
        let Some((_, buf)) = self.current.as_mut() else {
            return Err(E2bError::internal_plain("no file begun"));
        };
        if offset != buf.len() as u64 {
            return Err(E2bError::internal_plain("pieces out of order"));
        }
        buf.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(&mut self, metadata: &BTreeMap<String, String>) -> Result<EntryInfo, E2bError> {
        let Some((path, data)) = self.current.take() else {
            return Err(E2bError::internal_plain("no file begun"));
        };
        let entry = MemorySink::entry(&path, data.len());
        self.files.push((path, data, metadata.clone()));
        Ok(entry)
    }

    async fn abort(&mut self) {
        if let Some((path, data)) = self.current.take() {
            self.aborted.push((path, data.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write;

    use axum::http::{HeaderValue, StatusCode};

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn gzip(data: &[u8], level: flate2::Compression) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn form(boundary: &str, parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, filename, data) in parts {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                     filename=\"{filename}\"\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body
    }

    fn run(
        sink: &mut MemorySink,
        h: &[(&'static str, &str)],
        path: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Vec<EntryInfo>, E2bError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(receive_upload(sink, &headers(h), path.map(str::to_owned), Body::from(body)))
    }

    const RAW: (&str, &str) = ("content-type", "application/octet-stream");

    #[test]
    fn raw_uploads_arrive_whole_in_ordered_pieces_with_metadata() {
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
        let mut sink = MemorySink::new(u64::MAX);
        let h = [RAW, ("x-metadata-k", "v")];
        let out = run(&mut sink, &h, Some("/t"), data.clone()).unwrap();
        assert_eq!(out[0].path, "/t");
        assert_eq!(sink.files.len(), 1);
        assert_eq!(sink.files[0].1, data);
        assert_eq!(sink.files[0].2.get("k").map(String::as_str), Some("v"));
        // gzip-encoded, and empty.
        let mut sink = MemorySink::new(u64::MAX);
        let z = gzip(&data, flate2::Compression::default());
        run(&mut sink, &[RAW, ("content-encoding", "gzip")], Some("/z"), z).unwrap();
        assert_eq!(sink.files[0].1, data);
        let mut sink = MemorySink::new(u64::MAX);
        run(&mut sink, &[RAW], Some("/e"), Vec::new()).unwrap();
        assert_eq!(sink.files[0].1, b"");
    }

    #[test]
    fn failures_abort_the_file_and_say_why() {
        // Past the space free: 507, the file aborted, not committed.
        let mut sink = MemorySink::new(1000);
        let err = run(&mut sink, &[RAW], Some("/big"), vec![1; 5000]).unwrap_err();
        assert_eq!(err.status(), StatusCode::INSUFFICIENT_STORAGE, "{}", err.message());
        assert!(sink.files.is_empty());
        assert_eq!(sink.aborted.len(), 1);
        // A gzip body inflating past it: 507 too.
        let mut sink = MemorySink::new(1 << 20);
        let z = gzip(&vec![0; 4 << 20], flate2::Compression::best());
        let err = run(&mut sink, &[RAW, ("content-encoding", "gzip")], Some("/z"), z).unwrap_err();
        assert_eq!(err.status(), StatusCode::INSUFFICIENT_STORAGE, "{}", err.message());
        assert!(sink.files.is_empty() && sink.aborted.len() == 1);
        // Malformed gzip: 400.
        let mut sink = MemorySink::new(u64::MAX);
        let err =
            run(&mut sink, &[RAW, ("content-encoding", "gzip")], Some("/m"), b"nope".to_vec())
                .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(!err.is_client_gone(), "a malformed body is the client's error, not its absence");
        // Refused before any file is begun.
        for (h, path) in [
            (vec![RAW], None),
            (vec![("content-type", "text/plain")], Some("/x")),
            (vec![RAW, ("content-encoding", "br")], Some("/x")),
            (vec![("content-type", "multipart/form-data")], None),
        ] {
            let mut sink = MemorySink::new(u64::MAX);
            let err = run(&mut sink, &h, path, b"x".to_vec()).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{h:?}: {}", err.message());
            assert!(sink.files.is_empty() && sink.aborted.is_empty());
        }
    }

    #[test]
    fn forms_write_each_file_in_order_and_stop_at_the_first_failure() {
        let ct = ("content-type", "multipart/form-data; boundary=B");
        let body =
            form("B", &[("file", "/a", b"1"), ("other", "x", b"ignored"), ("file", "/b", b"22")]);
        let mut sink = MemorySink::new(u64::MAX);
        let out = run(&mut sink, &[ct], None, body).unwrap();
        assert_eq!(out.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["/a", "/b"]);
        assert_eq!(sink.files[1].1, b"22");
        // Two parts to one target: refused at the second, the first stays written.
        let body = form("B", &[("file", "/a", b"1"), ("file", "/a", b"2")]);
        let mut sink = MemorySink::new(u64::MAX);
        let err = run(&mut sink, &[ct], None, body).unwrap_err();
        assert!(err.message().contains("same path"), "{}", err.message());
        assert_eq!(sink.files.len(), 1);
        // A form cut off inside its second file: the first written, the second aborted.
        let mut body = form("B", &[("file", "/a", b"1"), ("file", "/b", &[7; 3000])]);
        body.truncate(body.len() - 1000);
        let mut sink = MemorySink::new(u64::MAX);
        let err = run(&mut sink, &[ct], None, body).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{}", err.message());
        assert_eq!(sink.files.len(), 1);
        assert_eq!(sink.aborted.len(), 1);
        // A gzip-encoded form whose content is a bomb: 413, naming it.
        let bomb_form = form("B", &[("file", "/z", &vec![0; 80 << 20])]);
        let z = gzip(&bomb_form, flate2::Compression::best());
        let mut sink = MemorySink::new(u64::MAX);
        let err = run(&mut sink, &[ct, ("content-encoding", "gzip")], None, z).unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE, "{}", err.message());
        assert!(err.message().contains("decompression bomb"));
        assert!(sink.files.is_empty());
    }

    #[test]
    fn a_body_that_breaks_off_is_the_client_gone() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from(vec![1u8; 3 << 20])),
            Err(std::io::Error::other("connection reset")),
        ];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut sink = MemorySink::new(u64::MAX);
        let h = headers(&[RAW]);
        let err = rt.block_on(receive_upload(&mut sink, &h, Some("/t".into()), body)).unwrap_err();
        assert!(err.is_client_gone(), "{}", err.message());
        assert!(sink.files.is_empty());
        // What had arrived was written to the temporary file, then dropped with it.
        assert_eq!(sink.aborted, [("/t".to_string(), 3 << 20)]);
    }
}
