//! Fuzz targets: one per parser that takes input from a client (HTTP API, envd) or from
//! inside a sandbox (the agent's frames, the interpreter kernels' lines, the sandbox's DNS
//! queries and first bytes of its connections). See `src/lib.rs` for how inputs are made and
//! `docs/SECURITY.md` for the recorded runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// Percent-encoding as the SDKs do it (the round trip below re-encodes with it), shared with
// the server tests.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use proptest::prelude::*;
use ringfence_fuzz::{bytes, fuzz, text};
use ringfence_proto::{Event, ExitStatus, FsEventKind, Reply, Usage};
use ringfence_test_support::percent_encode as urlencode;
use serde_json::{Value, json};

/// Frames as the agent writes them: every kind of event, one after another.
fn agent_frames() -> Vec<Vec<u8>> {
    let events = [
        Event::Stdout { id: 7, data: b"hello\n".to_vec() },
        Event::Stderr { id: 7, data: vec![0xff; 40] },
        Event::Exited { id: 7, pid: 9, status: ExitStatus::Code(3), usage: Usage::default() },
        Event::Response { id: 8, result: Ok(Reply::Data { data: vec![1, 2, 3], eof: true }) },
        Event::Fs { watch: 1, name: "a/b.txt".into(), kind: FsEventKind::Write },
    ];
    let mut all = Vec::new();
    let mut seeds = Vec::new();
    for e in &events {
        let mut one = Vec::new();
        ringfence_proto::write_frame(&mut one, e).unwrap();
        all.extend_from_slice(&one);
        seeds.push(one);
    }
    seeds.push(all);
    seeds
}

#[test]
fn agent_event_frames() {
    // The host side of the agent's channel: whatever a compromised agent writes is decoded
    // frame by frame, each bounded by MAX_FRAME before anything is allocated for it.
    fuzz("agent_event_frames", bytes(agent_frames(), 512), |input| {
        let mut rd = Cursor::new(input);
        while let Ok(Some(_)) = ringfence_proto::read_frame::<_, Event>(&mut rd) {}
        let _ = ringfence_proto::decode::<Event>(rd.get_ref());
    });
}

#[test]
fn agent_frame_length_prefix() {
    fuzz("agent_frame_length_prefix", any::<[u8; 4]>(), |prefix| {
        if let Ok(n) = ringfence_proto::frame_len(prefix) {
            assert!(n <= ringfence_proto::MAX_FRAME);
        }
    });
}

#[test]
fn kernel_output_lines() {
    // An interpreter kernel runs inside the sandbox: its output stream is split into JSON
    // lines and each message reduced to the fields the client may see.
    let seeds = [
        "{\"type\":\"stdout\",\"text\":\"hi\"}\n{\"type\":\"result\",\"text\":\"2\",\"png\":\"x\"}\n",
        "{\"type\":\"error\",\"name\":\"E\",\"traceback\":7}\n{\"type\":\"end_of_execution\"}\n",
        "{\"type\":\"number_of_executions\",\"execution_count\":3}\nnot json\n[1]\n",
    ];
    let strategy = (text(&seeds, 2048), 1usize..64);
    fuzz("kernel_output_lines", strategy, |(input, chunk)| {
        let mut split = ringfence_server::interp::LineSplitter::default();
        for part in input.as_bytes().chunks(chunk) {
            let Ok(values) = split.push(part) else { break };
            for v in values {
                let Value::Object(map) = v else { panic!("splitter passed a non-object") };
                if let Some(out) = ringfence_server::interp::sanitize(map) {
                    assert!(out.get("type").is_some_and(Value::is_string));
                }
            }
        }
    });
}

#[test]
fn kernel_line_many_short_lines_is_linear() {
    // A chunk of tens of thousands of empty lines once cost a shift of the whole buffer per
    // line; now it is one pass. Checked by how the time grows, not by a wall-clock bound a
    // loaded machine could break: 8x the bytes costs about 8x when linear, 64x when quadratic.
    let time = |n: usize| {
        (0..3)
            .map(|_| {
                let mut split = ringfence_server::interp::LineSplitter::default();
                let chunk = vec![b'\n'; n];
                let started = std::time::Instant::now();
                assert!(split.push(&chunk).unwrap().is_empty());
                started.elapsed()
            })
            .min()
            .unwrap()
    };
    let small = time(1 << 17);
    let big = time(1 << 20);
    assert!(big < small * 24, "8x the input took {big:?} against {small:?}");
}

fn dns_seeds() -> Vec<Vec<u8>> {
    let mut q = Message::query();
    q.metadata.id = 0x1234;
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        "pypi.org.".parse().unwrap(),
        hickory_proto::rr::RecordType::A,
    ));
    let query = q.to_vec().unwrap();
    let mut answer = ringfence_net::dns::reply(&q, ResponseCode::NoError);
    answer.add_answer(hickory_proto::rr::Record::from_rdata(
        "pypi.org.".parse().unwrap(),
        60,
        hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(10, 1, 2, 3))),
    ));
    vec![query, answer.to_vec().unwrap()]
}

#[test]
fn dns_messages() {
    // The sandbox's resolver takes queries from code inside and answers from upstream: parse,
    // name normalisation, the answer filter and re-encoding.
    fuzz("dns_messages", bytes(dns_seeds(), 512), |input| {
        let Ok(mut m) = Message::from_vec(&input) else { return };
        if m.metadata.message_type == MessageType::Query
            && let Some(q) = m.queries.first()
        {
            let _ = ringfence_net::policy::normalize_name(&q.name().to_ascii());
            let _ = ringfence_net::dns::reply(&m, ResponseCode::Refused).to_vec();
        }
        let blocked = |ip: IpAddr| ip.is_loopback().then(|| "loopback".to_string());
        let _ = ringfence_net::dns::filter_answer(&mut m, blocked);
        let _ = m.to_vec();
    });
}

#[test]
fn first_bytes_of_a_connection() {
    // Egress is judged on the first bytes a sandbox sends (TLS SNI, HTTP Host).
    let hello = b"GET / HTTP/1.1\r\nHost: pypi.org:443\r\nUser-Agent: x\r\n\r\n".to_vec();
    let mut tls = vec![0x16, 0x03, 0x01, 0x00, 0x31, 0x01, 0x00, 0x00, 0x2d, 0x03, 0x03];
    tls.extend_from_slice(&[0u8; 32]);
    tls.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    tls.extend_from_slice(&[0x00, 0x0f, 0x00, 0x00, 0x00, 0x0b, 0x00, 0x09, 0x00, 0x00, 0x06]);
    tls.extend_from_slice(b"pypi.o");
    fuzz("first_bytes_of_a_connection", bytes(vec![hello, tls], 1024), |input| {
        let _ = ringfence_net::sniff::sniff(&input);
    });
}

#[test]
fn host_header_routing() {
    let seeds = ["49983-abcdef0123.sandbox.local", "8080-x.e2b.app:3000", "-.", "1-"];
    fuzz("host_header_routing", text(&seeds, 256), |host| {
        if let Some((_, id)) = ringfence_server::network::parse_host(&host) {
            assert!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    });
}

#[test]
fn network_policy_json() {
    // The `network` object of a create body and the body of `PUT /sandboxes/{id}/network`.
    let seeds = [
        json!({"allowOut": ["pypi.org", "*.github.com", "10.0.0.0/8:443"], "denyOut": ["0.0.0.0/0"]}),
        json!({"allowPublicTraffic": false, "maskRequestHost": "${PORT}.x", "allowOut": []}),
    ];
    let seeds: Vec<String> = seeds.iter().map(Value::to_string).collect();
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
    fuzz("network_policy_json", (text(&seeds, 1024), any::<Option<bool>>()), |(body, internet)| {
        if let Ok(v) = serde_json::from_str::<Value>(&body) {
            let _ = ringfence_server::network::parse(internet, Some(&v));
        }
    });
}

#[test]
fn files_query() {
    // The query of envd's `/files`, over which signed URLs are checked: one reading only.
    // Whatever it accepts it reads canonically: the fields, re-encoded and parsed again, give
    // the same fields, so no spelling can mean two things.
    let seeds = [
        "path=%2Fhome%2Fuser%2Fa+b.txt&username=user&signature=v1_abc&signature_expiration=17",
        "path=/a&pa%74h=/root/secret&user%6eame=root",
        "path=/a;username=root&signature=v1_%2B%2F",
        "=x&&path&Path=%zz%00",
    ];
    fuzz("files_query", text(&seeds, 512), |raw| {
        let Ok(q) = ringfence_server::files_query::parse_file_query(&raw) else { return };
        let mut parts = Vec::new();
        for (name, value) in [
            ("path", q.path.clone()),
            ("username", q.username.clone()),
            ("signature", q.signature.clone()),
            ("signature_expiration", q.signature_expiration.map(|e| e.to_string())),
        ] {
            if let Some(v) = value {
                assert!(!v.contains('\0'), "NUL let through in {name}: {raw:?}");
                parts.push(format!("{name}={}", urlencode(&v)));
            }
        }
        let again = ringfence_server::files_query::parse_file_query(&parts.join("&"));
        assert_eq!(again.as_ref(), Ok(&q), "{raw:?} is not read canonically");
    });
}

#[test]
fn time_bounds_and_env_names() {
    // `/audit?since=` and friends, and environment maps from create, envd and the interpreter.
    let seeds = ["1700000000.5", "2023-11-14T22:13:20Z", "1e300", "-0", "A=B", "PATH"];
    fuzz("time_bounds_and_env_names", (text(&seeds, 64), text(&seeds, 64)), |(t, name)| {
        if let Some(ms) = ringfence_server::api::parse_time_bound(&t) {
            assert!((0..=ringfence_server::validate::MAX_UNIX_SECS * 1000).contains(&ms), "{t}");
        }
        if ringfence_server::validate::check_env("envs", [(name.as_str(), "v")]).is_ok() {
            assert!(!name.is_empty() && !name.contains('=') && !name.contains('\0'), "{name:?}");
        }
    });
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Connect envelopes (`[flags][u32 length][message]`) as the SDKs send them, one plain and
/// one compressed, back to back.
fn envelope_seeds() -> Vec<Vec<u8>> {
    let frame = |flags: u8, body: &[u8]| {
        let mut f = vec![flags];
        f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    let msg = br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"b"}}}"#;
    let plain = frame(0, msg);
    let packed = frame(1, &gzip(msg));
    let end = frame(2, b"{}");
    vec![[plain.clone(), packed.clone(), end].concat(), plain, packed]
}

#[test]
fn connect_envelopes() {
    // Connect streaming request bodies: split into envelopes in arbitrary chunks, compressed
    // ones inflated under the message limit, each message parsed as JSON.
    const LIMIT: usize = 1 << 20;
    fuzz("connect_envelopes", (bytes(envelope_seeds(), 1024), 1usize..200), |(input, chunk)| {
        let mut rd = ringfence_server::codec::EnvelopeReader::new(LIMIT);
        'feed: for part in input.chunks(chunk) {
            rd.push(part);
            loop {
                match rd.next_frame() {
                    Ok(Some((flags, body))) => {
                        assert!(body.len() <= LIMIT);
                        let body = if flags & 1 != 0 {
                            match ringfence_server::codec::gunzip_bounded(body.into(), LIMIT) {
                                Ok(b) => b,
                                Err(_) => continue,
                            }
                        } else {
                            body
                        };
                        assert!(body.len() <= LIMIT);
                        let _ = serde_json::from_slice::<Value>(&body);
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    });
}

#[test]
fn gzip_inflation() {
    // Every gzip path (uploads, compressed envelopes) goes through the Inflater: whatever
    // the input, it never yields more than its cap nor more than a step at a time.
    use ringfence_server::codec::{INFLATE_CHUNK, InflateLimits, Inflated, Inflater};
    let zeros = gzip(&vec![0u8; 4 << 20]);
    let text = gzip(b"hello hello hello hello\n");
    let two = [text.clone(), gzip(b"second member")].concat();
    let seeds = vec![zeros, text, two];
    fuzz("gzip_inflation", (bytes(seeds, 4096), 1usize..512), |(input, chunk)| {
        let limits =
            InflateLimits { max_output: 1 << 20, max_ratio: Some(256), ratio_grace: 1 << 16 };
        let mut inf = Inflater::new(limits);
        let mut out = 0u64;
        let mut parts = input.chunks(chunk);
        loop {
            match inf.step() {
                Ok(Inflated::Data(d)) => {
                    assert!(d.len() <= INFLATE_CHUNK);
                    out += d.len() as u64;
                    assert!(out <= limits.max_output, "inflated past the cap");
                }
                Ok(Inflated::NeedInput) => match parts.next() {
                    Some(p) => inf.push(bytes::Bytes::copy_from_slice(p)),
                    None => inf.end_input(),
                },
                Ok(Inflated::Done) | Err(_) => break,
            }
        }
    });
}

#[test]
fn upload_bodies() {
    // `POST /files`: multipart forms (and raw bodies, gzip or not) into a sink that keeps the
    // files in memory, with the target's free space as the cap.
    use axum::http::{HeaderMap, HeaderValue};
    use ringfence_server::upload::{MemorySink, receive_upload};
    let form = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/home/user/a.txt\"\r\n\
Content-Type: application/octet-stream\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; \
name=\"file\"; filename=\"b\"\r\n\r\nworld\r\n--XyZ--\r\n"
        .to_vec();
    let seeds = vec![form.clone(), gzip(&form), gzip(&vec![0u8; 1 << 20])];
    let kinds = prop_oneof![
        Just(("multipart/form-data; boundary=XyZ", false)),
        Just(("multipart/form-data; boundary=XyZ", true)),
        Just(("application/octet-stream", false)),
        Just(("application/octet-stream", true)),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    fuzz("upload_bodies", (bytes(seeds, 2048), kinds), |(body, (ctype, gz))| {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static(ctype));
        if gz {
            headers.insert("content-encoding", HeaderValue::from_static("gzip"));
        }
        let mut sink = MemorySink::new(64 << 10);
        let path = Some("/home/user/up.bin".to_string());
        let _ = rt.block_on(receive_upload(&mut sink, &headers, path, body.into()));
        for (_, data, _) in &sink.files {
            assert!(data.len() as u64 <= 64 << 10, "a file outgrew the free space");
        }
    });
}

#[test]
fn upload_headers() {
    // `Content-Encoding` and `X-Metadata-*` of an upload, from arbitrary header bytes.
    use axum::http::{HeaderMap, HeaderName, HeaderValue};
    let seeds = ["gzip", " GZIP ", "identity", "br, gzip", "x-metadata-owner", "\u{0}"];
    fuzz("upload_headers", (text(&seeds, 64), text(&seeds, 64)), |(name, value)| {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
            headers.insert("content-encoding", v.clone());
            if let Ok(n) = HeaderName::from_bytes(format!("x-metadata-{name}").as_bytes()) {
                headers.insert(n, v);
            }
        }
        let _ = ringfence_server::upload::upload_gzip(&headers);
        let _ = ringfence_server::upload::upload_metadata(&headers);
    });
}

#[test]
fn envd_request_headers_and_start() {
    // What envd reads before anything reaches the agent: Basic auth, Connect-Timeout-Ms,
    // Keepalive-Ping-Interval, Accept-Encoding, and the process Start message.
    use axum::http::{HeaderMap, HeaderValue};
    let header_seeds = [
        "Basic dXNlcjo=",
        "Basic cm9vdDo=",
        "Basic !!!",
        "10000",
        "99999999999",
        "gzip;q=0, identity",
        "*;q=0",
    ];
    let start_seeds = [
        r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","ls"],"envs":{"A":"1"},"cwd":"/tmp"},"pty":{"size":{"rows":24,"cols":80}},"stdin":true}"#,
        r#"{"process":{"cmd":"x","envs":{"=":"\u0000"}},"tag":"t"}"#,
    ];
    let strategy = (
        text(&header_seeds, 64),
        text(&header_seeds, 32),
        text(&header_seeds, 32),
        text(&start_seeds, 512),
    );
    fuzz("envd_request_headers_and_start", strategy, |(auth, timeout, enc, start)| {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", &auth),
            ("connect-timeout-ms", &timeout),
            ("keepalive-ping-interval", &timeout),
            ("accept-encoding", &enc),
        ] {
            if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
                headers.insert(name, v);
            }
        }
        let start = serde_json::from_str::<Value>(&start).unwrap_or(Value::Null);
        let _ = ringfence_server::envd::check_request(&headers, &start);
    });
}

/// A tar entry with any path and link bytes (the `tar` crate's builder refuses hostile ones).
fn tar_entry(out: &mut Vec<u8>, path: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    let g = h.as_gnu_mut().unwrap();
    g.name[..path.len()].copy_from_slice(path);
    g.linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o4755);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Layers mixing everything the unpacker handles, escapes included.
fn layer_seeds() -> Vec<Vec<u8>> {
    use tar::EntryType as T;
    let mut well = Vec::new();
    tar_entry(&mut well, b"./", T::Directory, b"", b"");
    tar_entry(&mut well, b"etc/passwd", T::Regular, b"", b"root:x:0:0::/root:/bin/sh\n");
    tar_entry(&mut well, b"etc/pw2", T::Link, b"etc/passwd", b"");
    tar_entry(&mut well, b"bin/sh", T::Symlink, b"/bin/busybox", b"");
    tar_entry(&mut well, b"etc/.wh.gone", T::Regular, b"", b"");
    tar_entry(&mut well, b"opq/.wh..wh..opq", T::Regular, b"", b"");
    tar_entry(&mut well, b"fifo", T::Fifo, b"", b"");
    let mut evil = Vec::new();
    tar_entry(&mut evil, b"up", T::Symlink, b"../outside", b"");
    tar_entry(&mut evil, b"up/x", T::Regular, b"", b"escaped");
    tar_entry(&mut evil, b"../outside/y", T::Regular, b"", b"escaped");
    tar_entry(&mut evil, b"l", T::Link, b"../outside/z", b"");
    tar_entry(&mut evil, b"dev/mem", T::Char, b"", b"");
    let mut seeds = vec![well.clone(), evil.clone()];
    for s in [&mut well, &mut evil] {
        s.extend_from_slice(&[0u8; 1024]);
    }
    seeds.push(well);
    seeds.push(evil);
    seeds
}

#[test]
fn image_layer_tars() {
    // A hostile layer is unpacked beside a sentinel directory: whatever the bytes, nothing
    // lands outside the layer, no device node but a whiteout (0:0) exists, and no file passes
    // the per-file cap. Errors are fine; panics and escapes are not.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let limits = ringfence_image::Limits {
        file_bytes: 64 << 10,
        layer_bytes: 1 << 20,
        image_bytes: 1 << 20,
        entries: 200,
        min_free: 0,
    };
    fn walk(p: &std::path::Path, f: &mut dyn FnMut(&std::path::Path, &std::fs::Metadata)) {
        let Ok(m) = std::fs::symlink_metadata(p) else { return };
        f(p, &m);
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap().flatten() {
                walk(&e.path(), f);
            }
        }
    }
    fuzz("image_layer_tars", bytes(layer_seeds(), 4096), |input| {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, outside) = (tmp.path().join("layer"), tmp.path().join("outside"));
        std::fs::create_dir(&layer).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let mut budget = limits.image_bytes;
        let _ = ringfence_image::unpack::unpack(
            &input[..],
            &layer,
            "sha256:fuzz",
            &limits,
            &mut budget,
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "escaped into the sibling");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "escaped into the parent");
        walk(&layer, &mut |p, m| {
            let ft = m.file_type();
            assert!(!ft.is_block_device(), "{p:?}");
            assert!(!ft.is_char_device() || m.rdev() == 0, "{p:?}");
            assert!(!ft.is_file() || m.len() <= limits.file_bytes, "{p:?}");
        });
    });
}

#[test]
fn dockerfiles() {
    // `ringfence template build`'s parser and the substitution it applies when a step runs:
    // any bytes either parse or are refused with a line number inside the file; nothing
    // panics, and substitution of every raw string a step holds terminates.
    let seeds: &[&str] = &[
        "# syntax=docker/dockerfile:1\nARG B=bb\nFROM $B\nRUN echo a && \\\n  echo b\n",
        "FROM scratch\nCOPY --chown=user:staff --chmod=0640 [\"a b\", \"/dst/\"]\nENV A=1 B=\"x y\"\n",
        "FROM x\nENV K v w\nLABEL a=\"${K:-d}\" b=${K:+alt}\nWORKDIR ${A}/x\nUSER user:1000\n",
        "FROM x\nCMD [\"sh\", \"-c\", \"echo\"]\nENTRYPOINT echo\nSHELL [\"/bin/sh\", \"-c\"]\n",
        "FROM x\nRUN <<EOF\nhi\nEOF\n",
    ];
    fuzz("dockerfiles", text(seeds, 512), |input| {
        let lines = input.lines().count();
        match ringfence_image::dockerfile::parse(input.as_bytes()) {
            Ok(d) => {
                let vars = std::collections::BTreeMap::from([("A".to_string(), "1".to_string())]);
                for s in &d.steps {
                    assert!(s.line >= 1 && s.line <= lines.max(1), "{s:?}");
                    use ringfence_image::dockerfile::{Op, pairs, word, words};
                    match &s.op {
                        Op::Env(r) | Op::Label(r) => {
                            let _ = pairs(r, &vars, true);
                        }
                        Op::Workdir(r) | Op::User(r) | Op::From { image: r } => {
                            let _ = word(r, &vars);
                        }
                        Op::Copy(c) => {
                            for a in &c.args {
                                let _ = words(a, &vars);
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(ringfence_image::ImageError::Dockerfile { line, .. }) => {
                assert!(line <= lines.max(1), "line {line} of {lines}");
            }
            Err(e) => panic!("not a Dockerfile error: {e}"),
        }
    });
}
