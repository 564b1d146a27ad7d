//! envd's unit tests: the wire format, request decoding and error mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::files::{basename, content_disposition, gzip_all, mime_for};
use super::*;

#[tokio::test]
async fn request_bodies_share_a_bounded_buffer() {
    // 64 KiB of budget: a body that would take more is refused while it is held, and a
    // body over its own limit is refused whatever the budget.
    let budget = tokio::sync::Semaphore::new(64);
    let hog = budget.try_acquire_many(60).unwrap();
    let e = read_body_within(&budget, Body::from(vec![1u8; 8 << 10]), MAX_MESSAGE).await;
    assert_eq!(e.unwrap_err().kind(), Kind::ResourceExhausted);
    assert_eq!(budget.available_permits(), 4, "a refused read keeps nothing");
    drop(hog);
    let ok = read_body_within(&budget, Body::from(vec![1u8; 8 << 10]), MAX_MESSAGE).await;
    assert_eq!(ok.unwrap().len(), 8 << 10);
    assert_eq!(budget.available_permits(), 64, "the budget returns with the bytes");
    let e = read_body_within(&budget, Body::from(vec![1u8; 2048]), 1024).await;
    assert_eq!(e.unwrap_err().kind(), Kind::InvalidArgument);
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

fn frames(bytes: &[u8]) -> Vec<(u8, Value)> {
    let mut r = envelope_reader();
    r.push(bytes);
    let mut out = Vec::new();
    while let Some((flags, data)) = r.next_frame().unwrap() {
        out.push((flags, serde_json::from_slice(&data).unwrap()));
    }
    assert!(r.is_empty(), "trailing bytes");
    out
}

#[test]
fn envelopes_round_trip_and_match_the_capture() {
    let e = envelope(0, &start_event(3234));
    assert_eq!(&e[..5], &[0, 0, 0, 0, 0x20]);
    assert_eq!(&e[5..], br#"{"event":{"start":{"pid":3234}}}"#);
    assert_eq!(&end_stream(None)[..], &[2, 0, 0, 0, 2, b'{', b'}']);
    let err = RpcError::new(Kind::NotFound, "gone");
    let mut all = e.to_vec();
    all.extend_from_slice(&end_stream(Some(&err)));
    let f = frames(&all);
    assert_eq!(f[0], (0, json!({"event": {"start": {"pid": 3234}}})));
    assert_eq!(f[1], (2, json!({"error": {"code": "not_found", "message": "gone"}})));
}

#[test]
fn envelope_reader_is_incremental_and_bounded() {
    let e = envelope(0, &json!({"a": 1}));
    let mut r = envelope_reader();
    r.push(&e[..3]);
    assert_eq!(r.next_frame().unwrap(), None);
    r.push(&e[3..8]);
    assert_eq!(r.next_frame().unwrap(), None);
    r.push(&e[8..]);
    assert_eq!(r.next_frame().unwrap(), Some((0, br#"{"a":1}"#.to_vec())));
    assert!(r.is_empty());
    let mut big = envelope_reader();
    big.push(&[0, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(RpcError::from(big.next_frame().unwrap_err()).kind(), Kind::TooLarge);
}

#[test]
fn single_message_accepts_envelopes_bare_json_and_gzip() {
    let h = headers(&[("content-type", CONNECT_JSON)]);
    let e = envelope(0, &json!({"process": {"pid": 7}}));
    assert_eq!(single_message(&h, &e).unwrap(), json!({"process": {"pid": 7}}));
    let bare = headers(&[("content-type", "application/json")]);
    assert_eq!(single_message(&bare, br#"{"x":true}"#).unwrap(), json!({"x": true}));
    assert_eq!(single_message(&h, br#"{"x":1}"#).unwrap(), json!({"x": 1}));
    assert_eq!(single_message(&h, &e[..4]).unwrap_err().kind(), Kind::InvalidArgument);
    assert_eq!(single_message(&h, b"").unwrap_err().kind(), Kind::InvalidArgument);
    // A compressed envelope.
    let z = gzip_all(br#"{"z":2}"#).unwrap();
    let mut frame = vec![FLAG_COMPRESSED];
    frame.extend_from_slice(&u32::try_from(z.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&z);
    let hz = headers(&[("content-type", CONNECT_JSON), ("connect-content-encoding", "gzip")]);
    assert_eq!(single_message(&hz, &frame).unwrap(), json!({"z": 2}));
    assert_eq!(single_message(&h, &frame).unwrap_err().kind(), Kind::Internal);
}

#[test]
fn start_requests_map_to_spawns() {
    let msg = json!({
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}},
        "stdin": false
    });
    let spec = parse_start(&msg, SandboxUser::User).unwrap();
    assert_eq!(spec.cmd, "/bin/bash");
    assert_eq!(spec.args, ["-l", "-c", "echo hi"]);
    assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(spec.cwd, None);
    assert_eq!(spec.tag, None);
    assert_eq!(spec.stdio, StdioMode::Pipe { stdin: false });
    assert_eq!(spec.user, SandboxUser::User);

    // stdin is open unless refused (envd's backwards-compatible default).
    let msg = json!({"process": {"cmd": "cat", "cwd": "/tmp"}, "tag": "t1"});
    let spec = parse_start(&msg, SandboxUser::Root).unwrap();
    assert_eq!(spec.stdio, StdioMode::Pipe { stdin: true });
    assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
    assert_eq!(spec.tag.as_deref(), Some("t1"));
    assert_eq!(spec.user, SandboxUser::Root);

    let msg = json!({
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color"}},
        "pty": {"size": {"cols": 80, "rows": "24"}},
        "stdin": false
    });
    let spec = parse_start(&msg, SandboxUser::User).unwrap();
    assert_eq!(spec.stdio, StdioMode::Pty { cols: 80, rows: 24 });

    // snake_case names and nulls are accepted; an empty cwd means none.
    let msg = json!({"process": {"cmd": "ls", "cwd": ""}, "pty": null, "tag": null});
    let spec = parse_start(&msg, SandboxUser::User).unwrap();
    assert_eq!(spec.cwd, None);
    assert_eq!(spec.stdio, StdioMode::Pipe { stdin: true });

    for bad in [
        json!({}),
        json!({"process": {}}),
        json!({"process": {"cmd": "x", "args": "y"}}),
        json!({"process": {"cmd": "x", "args": [1]}}),
        json!({"process": {"cmd": "x", "envs": {"A": 1}}}),
        json!({"process": {"cmd": "x"}, "stdin": "no"}),
        json!({"process": {"cmd": "x"}, "pty": {"size": {"cols": 70000, "rows": 1}}}),
    ] {
        assert_eq!(
            parse_start(&bad, SandboxUser::User).unwrap_err().kind(),
            Kind::InvalidArgument,
            "{bad}"
        );
    }
}

#[test]
fn selectors_signals_and_input() {
    assert_eq!(parse_selector(&json!({"process": {"pid": 12}})).unwrap(), Selector::Pid(12));
    assert_eq!(parse_selector(&json!({"process": {"pid": "12"}})).unwrap(), Selector::Pid(12));
    assert_eq!(
        parse_selector(&json!({"process": {"tag": "web"}})).unwrap(),
        Selector::Tag("web".into())
    );
    assert!(parse_selector(&json!({"process": {}})).is_err());
    assert!(parse_selector(&json!({})).is_err());

    assert_eq!(parse_signal(&json!({"signal": "SIGNAL_SIGKILL"})).unwrap(), 9);
    assert_eq!(parse_signal(&json!({"signal": "SIGNAL_SIGTERM"})).unwrap(), 15);
    assert_eq!(parse_signal(&json!({"signal": 9})).unwrap(), 9);
    assert_eq!(parse_signal(&json!({"signal": 15})).unwrap(), 15);
    for bad in [json!({}), json!({"signal": "SIGNAL_UNSPECIFIED"}), json!({"signal": 2})] {
        assert_eq!(parse_signal(&bad).unwrap_err().kind(), Kind::Unimplemented);
    }

    assert_eq!(parse_input(&json!({"input": {"stdin": "aGkK"}})).unwrap(), b"hi\n");
    assert_eq!(parse_input(&json!({"input": {"pty": "AQ"}})).unwrap(), [1]);
    assert_eq!(parse_input(&json!({"input": {"stdin": ""}})).unwrap(), b"");
    assert_eq!(parse_input(&json!({"input": {}})).unwrap_err().kind(), Kind::Unimplemented);
    assert_eq!(
        parse_input(&json!({"input": {"stdin": "!!"}})).unwrap_err().kind(),
        Kind::InvalidArgument
    );
}

#[test]
fn process_events_have_envd_shapes() {
    assert_eq!(data_event("stdout", b"hi\n"), json!({"event": {"data": {"stdout": "aGkK"}}}));
    assert_eq!(
        end_event(ExitStatus::Code(0)),
        json!({"event": {"end": {"exited": true, "status": "exit status 0"}}})
    );
    assert_eq!(
        end_event(ExitStatus::Code(3)),
        json!({"event": {"end": {"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}}})
    );
    assert_eq!(
        end_event(ExitStatus::Signal(9)),
        json!({"event": {"end": {"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"}}})
    );
    assert_eq!(signal_name(15), "terminated");
    assert_eq!(signal_name(64), "signal 64");
    assert_eq!(keepalive_event(), json!({"event": {"keepalive": {}}}));
    // The captured `echo hi` end event, byte for byte.
    let e = envelope(0, &end_event(ExitStatus::Code(0)));
    assert_eq!(&e[5..], br#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#);
    assert_eq!(e[4], 0x3a);
}

#[test]
fn process_list_shape() {
    let p = ProcessInfo {
        pid: 5,
        spec: SpawnSpec {
            cmd: "sleep".into(),
            args: vec!["9".into()],
            env: BTreeMap::from([("A".into(), "b".into())]),
            cwd: None,
            user: SandboxUser::User,
            stdio: StdioMode::Pipe { stdin: false },
            tag: Some("t".into()),
        },
    };
    assert_eq!(
        process_info_json(&p),
        json!({"config": {"cmd": "sleep", "args": ["9"], "envs": {"A": "b"}}, "pid": 5, "tag": "t"})
    );
}

#[test]
fn timestamps_are_rfc3339() {
    assert_eq!(rfc3339(0, 1).as_deref(), Some("1970-01-01T00:00:00.000000001Z"));
    assert_eq!(rfc3339(951_782_400, 0).as_deref(), Some("2000-02-29T00:00:00Z"));
    assert_eq!(rfc3339(1_795_737_600, 123_000_000).as_deref(), Some("2026-11-27T00:00:00.123Z"));
    assert_eq!(rfc3339(1_700_000_000, 5_000).as_deref(), Some("2023-11-14T22:13:20.000005Z"));
    assert_eq!(rfc3339(-1, 0).as_deref(), Some("1969-12-31T23:59:59Z"));
    assert_eq!(rfc3339(253_402_300_800, 0), None); // year 10000
    assert_eq!(rfc3339(-62_135_596_801, 0), None); // year 0
}

#[test]
fn permissions_follow_go_file_mode() {
    assert_eq!(permissions_string(FileType::File, 0o644), "-rw-r--r--");
    assert_eq!(permissions_string(FileType::Directory, 0o755), "drwxr-xr-x");
    assert_eq!(permissions_string(FileType::Symlink, 0o777), "Lrwxrwxrwx");
    assert_eq!(permissions_string(FileType::Directory, 0o1777), "dtrwxrwxrwx");
    assert_eq!(permissions_string(FileType::File, 0o4755), "urwxr-xr-x");
    assert_eq!(permissions_string(FileType::Other, 0o600), "?rw-------");
}

fn entry(kind: FileType) -> EntryInfo {
    EntryInfo {
        name: "a.txt".into(),
        path: "/home/user/a.txt".into(),
        kind,
        size: 4,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime: (1_700_000_000, 0),
        symlink_target: None,
        metadata: Default::default(),
    }
}

#[test]
fn entry_info_shape() {
    assert_eq!(
        entry_json(&entry(FileType::File), None),
        json!({
            "name": "a.txt", "type": "FILE_TYPE_FILE", "path": "/home/user/a.txt",
            "size": "4", "mode": 0o644, "permissions": "-rw-r--r--",
            "owner": "user", "group": "user", "modifiedTime": "2023-11-14T22:13:20Z"
        })
    );
    let mut dir = entry(FileType::Directory);
    dir.mode = 0o1777;
    dir.uid = 0;
    dir.gid = 5;
    dir.mtime = (0, 0);
    let v = entry_json(&dir, None);
    assert_eq!(v["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(v["mode"], 0o777);
    assert_eq!(v["owner"], "root");
    assert_eq!(v["group"], "5");
    assert!(v.get("modifiedTime").is_none());
    assert_eq!(entry_json(&entry(FileType::Other), None)["type"], "FILE_TYPE_UNSPECIFIED");

    // A symlink: the target's type and mode, the link's permissions, the resolved target.
    let mut link = entry(FileType::Symlink);
    link.mode = 0o777;
    link.symlink_target = Some("b.txt".into());
    let target =
        LinkTarget { path: "/home/user/b.txt".into(), kind: Some(FileType::File), mode: 0o600 };
    let v = entry_json(&link, Some(&target));
    assert_eq!(v["type"], "FILE_TYPE_FILE");
    assert_eq!(v["mode"], 0o600);
    assert_eq!(v["permissions"], "Lrwxrwxrwx");
    assert_eq!(v["symlinkTarget"], "/home/user/b.txt");
    let dangling = LinkTarget { path: link.path.clone(), kind: None, mode: 0 };
    assert_eq!(entry_json(&link, Some(&dangling))["type"], "FILE_TYPE_UNSPECIFIED");
}

#[test]
fn link_targets_resolve_lexically() {
    assert_eq!(join_link("/home/user/d/l", "t.txt"), "/home/user/d/t.txt");
    assert_eq!(join_link("/home/user/d/l", "../t"), "/home/user/t");
    assert_eq!(join_link("/a/l", "/etc/./x/../passwd"), "/etc/passwd");
    assert_eq!(join_link("/l", "../../x"), "/x");
    assert_eq!(normalize("/"), "/");
}

#[test]
fn errors_map_to_connect_codes() {
    use ringfence_proto::AgentError;
    let agent = |kind| RpcError::from(ClientError::Agent(AgentError { kind, message: "m".into() }));
    assert_eq!(agent(ErrorKind::NotFound).kind(), Kind::NotFound);
    assert_eq!(agent(ErrorKind::AlreadyExists).kind(), Kind::Conflict);
    assert_eq!(agent(ErrorKind::PermissionDenied).kind(), Kind::PermissionDenied);
    assert_eq!(agent(ErrorKind::InvalidArgument).kind(), Kind::InvalidArgument);
    assert_eq!(agent(ErrorKind::NotADirectory).kind(), Kind::InvalidArgument);
    assert_eq!(agent(ErrorKind::IsADirectory).kind(), Kind::InvalidArgument);
    assert_eq!(agent(ErrorKind::NoSpace).kind(), Kind::NoSpace);
    assert_eq!(agent(ErrorKind::Internal).kind(), Kind::Internal);
    assert_eq!(agent(ErrorKind::LimitReached).kind(), Kind::ResourceExhausted);
    // A closed channel: the sandbox is gone, `unavailable` with Connect's 503.
    let closed = RpcError::from(ClientError::Closed);
    assert_eq!(closed.kind(), Kind::SandboxGone);
    assert_eq!(closed.to_json()["code"], "unavailable");
    assert_eq!(closed.kind().connect_status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Kind::NotFound.connect_status(), StatusCode::NOT_FOUND);
    assert_eq!(Kind::Conflict.connect_status(), StatusCode::CONFLICT);
    assert_eq!(Kind::Unavailable.connect_status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(Kind::ResourceExhausted.connect_status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(agent(ErrorKind::NoSpace).to_json()["code"], "resource_exhausted");
    let r = RpcError::new(Kind::NotFound, "x").into_response();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()[header::CONTENT_TYPE], APPLICATION_JSON);
    let files =
        |kind| files_error(ClientError::Agent(AgentError { kind, message: "m".into() })).status();
    assert_eq!(files(ErrorKind::NotFound), StatusCode::NOT_FOUND);
    assert_eq!(files(ErrorKind::IsADirectory), StatusCode::BAD_REQUEST);
    assert_eq!(files(ErrorKind::NoSpace), StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(files_error(ClientError::Closed).status(), StatusCode::BAD_GATEWAY);
}

#[test]
fn users_come_from_basic_auth_or_the_query() {
    assert_eq!(rpc_user(&HeaderMap::new()).unwrap(), SandboxUser::User);
    assert_eq!(
        rpc_user(&headers(&[("authorization", "Basic dXNlcjo=")])).unwrap(),
        SandboxUser::User
    );
    assert_eq!(
        rpc_user(&headers(&[("authorization", "basic cm9vdDo=")])).unwrap(),
        SandboxUser::Root
    );
    assert_eq!(
        rpc_user(&headers(&[("authorization", "Basic Ym9iOg==")])).unwrap_err().kind(),
        Kind::Unauthenticated
    );
    assert!(rpc_user(&headers(&[("authorization", "Bearer x")])).is_err());
    let q = |raw: &str| crate::files_query::parse_file_query(raw).unwrap();
    assert_eq!(files_user(&q("")).unwrap(), SandboxUser::User);
    assert_eq!(files_user(&q("username=root")).unwrap(), SandboxUser::Root);
    assert_eq!(files_user(&q("username=bob")).unwrap_err().status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn stream_options_come_from_headers() {
    let o = stream_opts(&HeaderMap::new()).unwrap();
    assert_eq!(o.keepalive, DEFAULT_KEEPALIVE);
    assert_eq!(o.deadline, None);
    let o =
        stream_opts(&headers(&[("keepalive-ping-interval", "7"), ("connect-timeout-ms", "60000")]))
            .unwrap();
    assert_eq!(o.keepalive, Duration::from_secs(7));
    assert!(o.deadline.is_some());
    let o = stream_opts(&headers(&[("keepalive-ping-interval", "0"), ("connect-timeout-ms", "0")]))
        .unwrap();
    assert_eq!(o.keepalive, DEFAULT_KEEPALIVE);
    assert_eq!(o.deadline, None);
    let o = stream_opts(&headers(&[("connect-timeout-ms", "9999999999")])).unwrap();
    assert!(o.deadline.is_some_and(|d| d > Instant::now() + Duration::from_secs(86_400)));
}

#[test]
fn absurd_stream_options_are_refused_naming_the_header() {
    for (name, value) in [
        ("connect-timeout-ms", "18446744073709551615"),
        ("connect-timeout-ms", "99999999999"),
        ("connect-timeout-ms", "-1"),
        ("connect-timeout-ms", "1.5"),
        ("connect-timeout-ms", "soon"),
        ("keepalive-ping-interval", "-5"),
        ("keepalive-ping-interval", "3601"),
        ("keepalive-ping-interval", "18446744073709551616"),
        ("keepalive-ping-interval", "x"),
    ] {
        let e = stream_opts(&headers(&[(name, value)])).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument, "{name}: {value}");
        assert!(e.message().to_ascii_lowercase().starts_with(name), "{e:?}");
    }
}

#[test]
fn routes() {
    let post = Method::POST;
    assert_eq!(route(&post, "/process.Process/Start"), Route::Start);
    assert_eq!(route(&post, "/prefix/process.Process/List"), Route::Unary(UnaryRpc::List));
    assert_eq!(
        route(&post, "/filesystem.Filesystem/GetWatcherEvents"),
        Route::Unary(UnaryRpc::GetWatcherEvents)
    );
    assert_eq!(route(&post, "/process.Process/Nope"), Route::UnknownRpc);
    assert_eq!(route(&Method::GET, "/process.Process/List"), Route::MethodNotAllowed);
    assert_eq!(route(&Method::GET, "/health"), Route::Health);
    assert_eq!(route(&Method::GET, "/files"), Route::FilesGet);
    assert_eq!(route(&post, "/files"), Route::FilesPost);
    assert_eq!(route(&Method::DELETE, "/files"), Route::MethodNotAllowed);
    assert_eq!(route(&Method::GET, "/envs"), Route::NotFound);
}

#[test]
fn accept_encoding_follows_envd() {
    let g = |v: &'static str| accept_gzip(&headers(&[("accept-encoding", v)]));
    assert_eq!(accept_gzip(&HeaderMap::new()), Ok(false));
    assert_eq!(g("gzip"), Ok(true));
    assert_eq!(g("gzip, deflate"), Ok(true));
    assert_eq!(g("identity"), Ok(false));
    assert_eq!(g("deflate, br"), Ok(false));
    assert_eq!(g("gzip;q=0, identity"), Ok(false));
    assert_eq!(g("identity;q=0.5, gzip;q=0.9"), Ok(true));
    assert_eq!(g("*"), Ok(false));
    assert_eq!(g("identity;q=0, *"), Ok(true));
    assert!(g("identity;q=0, br").is_err());
}

#[test]
fn download_headers() {
    assert_eq!(basename("/tmp/a.txt"), "a.txt");
    assert_eq!(basename("rel"), "rel");
    assert_eq!(mime_for("a.TXT"), "text/plain; charset=utf-8");
    assert_eq!(mime_for("a"), "application/octet-stream");
    assert_eq!(content_disposition("a b.txt"), "inline; filename=\"a b.txt\"");
    assert_eq!(content_disposition("é\"x"), "inline; filename*=UTF-8''%C3%A9%22x");
}

#[test]
fn compressed_envelopes_stop_inflating_at_the_message_limit() {
    // 17 members of 1 MiB of zeros each: 17 MiB inflated from a few kilobytes.
    let member = gzip_all(&vec![0u8; 1 << 20]).unwrap();
    let z = member.repeat((MAX_MESSAGE >> 20) + 1);
    let mut frame = vec![FLAG_COMPRESSED];
    frame.extend_from_slice(&u32::try_from(z.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&z);
    let hz = headers(&[("content-type", CONNECT_JSON), ("connect-content-encoding", "gzip")]);
    let err = single_message(&hz, &frame).unwrap_err();
    assert_eq!(err.kind(), Kind::TooLarge);
    assert!(err.message().contains("inflates past"), "{}", err.message());
    // A unary body with Content-Encoding: gzip takes the same path.
    assert_eq!(decode_encoding(Some("gzip"), z).unwrap_err().kind(), Kind::TooLarge);
}

#[test]
fn field_names_accept_both_casings() {
    let v = json!({"watcher_id": "3", "includeEntry": true, "n": "42"});
    assert_eq!(str_field(&v, "watcherId").unwrap().as_deref(), Some("3"));
    assert_eq!(bool_field(&v, "includeEntry").unwrap(), Some(true));
    assert_eq!(u32_field(&v, "n").unwrap(), Some(42));
    assert!(u32_field(&json!({"n": -1}), "n").is_err());
    assert_eq!(fs_path(None), "~");
    assert_eq!(fs_path(Some(String::new())), "~");
    assert_eq!(fs_path(Some("a".into())), "a");
}
