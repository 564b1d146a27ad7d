//! envd's `/files`: downloads (streamed, gzip when asked) and uploads (through
//! `crate::upload`, whole or not at all).

use super::*;

/// Whether to gzip a download, by envd's reading of `Accept-Encoding` (quality values
/// honoured; identity acceptable unless refused). `Err` when nothing acceptable is left.
pub(super) fn accept_gzip(headers: &HeaderMap) -> Result<bool, String> {
    let Some(header) = header_str(headers, "accept-encoding").filter(|h| !h.trim().is_empty())
    else {
        return Ok(false);
    };
    let mut encodings: Vec<(String, f64)> = header
        .split(',')
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    let v = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))?;
                    v.trim().parse::<f64>().ok()
                })
                .next_back()
                .unwrap_or(1.0);
            (name, q)
        })
        .collect();
    encodings.sort_by(|a, b| b.1.total_cmp(&a.1));
    let identity_refused = encodings.iter().any(|(n, q)| n == "identity" && *q <= 0.0);
    for (name, q) in &encodings {
        if *q <= 0.0 {
            continue;
        }
        match name.as_str() {
            "identity" => return Ok(false),
            "*" => return Ok(identity_refused),
            "gzip" => return Ok(true),
            _ => {}
        }
    }
    if identity_refused {
        Err(format!("no acceptable encoding in {header:?}, supported: [gzip]"))
    } else {
        Ok(false)
    }
}

pub(super) fn basename(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or(path)
}

/// A content type from the extension, as Go's `mime.TypeByExtension` would give for common
/// files.
pub(super) fn mime_for(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "text/xml; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "wasm" => "application/wasm",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        _ => "application/octet-stream",
    }
}

/// `inline; filename="..."`, or the RFC 5987 form for names a quoted string cannot carry.
pub(super) fn content_disposition(name: &str) -> String {
    let plain = name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        return format!("inline; filename=\"{name}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("inline; filename*=UTF-8''{encoded}")
}

pub(super) fn gzip_all(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

/// `GET /files`: streams the file in agent-sized chunks.
pub(super) async fn download(client: Arc<AgentClient>, req: Request) -> Response {
    let q = match query(&req) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let user = match files_user(&q) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let Some(path) = q.path.filter(|p| !p.is_empty()) else {
        return E2bError::invalid("path query parameter is required").into_response();
    };
    let headers = req.headers();
    let mut gzip = match accept_gzip(headers) {
        Ok(g) => g,
        Err(m) => return E2bError::invalid(m).into_response(),
    };
    // As envd: range and conditional requests are served as identity.
    if ["range", "if-modified-since", "if-none-match", "if-range"]
        .iter()
        .any(|h| headers.contains_key(*h))
    {
        gzip = false;
    }
    let (data, eof) =
        match client.call(AgentRequest::ReadFile { path: path.clone(), user, offset: 0 }).await {
            Ok(Reply::Data { data, eof }) => (data, eof),
            Ok(other) => {
                return E2bError::internal(format!("unexpected agent reply: {other:?}"))
                    .into_response();
            }
            Err(e) => return files_error(e).into_response(),
        };
    let name = basename(&path).to_owned();
    let body = if eof {
        if gzip {
            match gzip_all(&data) {
                Ok(z) => Body::from(z),
                Err(e) => {
                    return E2bError::internal(e).into_response();
                }
            }
        } else {
            Body::from(data)
        }
    } else {
        let (tx, rx) = mpsc::channel(2);
        let s = FileSender { client, path, user, first: data, gzip, tx };
        tokio::spawn(send_file(s).in_current_span());
        Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime_for(&name)));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

/// The rest of a download after its first chunk.
#[derive(Debug)]
struct FileSender {
    client: Arc<AgentClient>,
    path: String,
    user: SandboxUser,
    first: Vec<u8>,
    gzip: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

async fn send_file(s: FileSender) {
    let FileSender { client, path, user, first, gzip, tx } = s;
    let mut enc = gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), Compression::fast()));
    let mut data = first;
    let mut eof = false;
    let mut offset = 0u64;
    loop {
        offset += data.len() as u64;
        let out = match enc.as_mut() {
            Some(e) => {
                if let Err(err) = e.write_all(&data).and_then(|()| e.flush()) {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                std::mem::take(e.get_mut())
            }
            None => data,
        };
        if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
            return; // The client went away.
        }
        if eof {
            break;
        }
        match client.call(AgentRequest::ReadFile { path: path.clone(), user, offset }).await {
            Ok(Reply::Data { data: d, eof: e }) => {
                // An empty chunk is the end whatever it says, so this cannot spin.
                eof = e || d.is_empty();
                data = d;
            }
            Ok(other) => {
                let _ = tx.send(Err(std::io::Error::other(format!("{other:?}")))).await;
                return;
            }
            Err(e) => {
                // Failing the body tells the client the download is incomplete.
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                return;
            }
        }
    }
    if let Some(e) = enc {
        let item = e.finish().map(Bytes::from);
        let _ = tx.send(item).await;
    }
}

pub(super) fn upload_ok(entries: &[EntryInfo]) -> Response {
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({"name": e.name, "type": "file", "path": e.path});
            if !e.metadata.is_empty() {
                v["metadata"] = json!(e.metadata);
            }
            v
        })
        .collect();
    json_response(StatusCode::OK, &Value::Array(list))
}

/// `POST /files`: a raw (`application/octet-stream`, optionally gzip) or multipart upload.
/// Each file replaces its target only once complete (see [`crate::upload`]); the upload is
/// audited before it is answered, and in the background when the client leaves mid-way.
pub(super) async fn upload(
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    req: Request,
) -> Response {
    let q = match query(&req) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let user = match files_user(&q) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let path = q.path.filter(|p| !p.is_empty());
    let (parts, body) = req.into_parts();
    let mut sink = AgentSink::new(client.clone(), state.clone(), user);
    let result = receive_upload(&mut sink, &parts.headers, path, body).await;
    settle(&client, &state).await;
    sink.finish(&result).await;
    match result {
        Ok(entries) => upload_ok(&entries),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
