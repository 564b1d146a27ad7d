//! Pulling from a fake registry on loopback that demands a bearer token (the Docker Hub flow),
//! serves a multi-platform index, and can lie about digests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use common::{Tar, gzip, sha};
use ringfence_image::registry::{PullOptions, pull};
use ringfence_image::{ImageError, Limits, Quiet, Store};

/// Manifests by tag or digest: (media type, bytes).
type Manifests = HashMap<String, (String, Vec<u8>)>;

struct Fake {
    addr: String,
    /// Request paths seen, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

/// Serves `blobs` (by digest) and `manifests` (by tag or digest, with media types) to clients
/// holding the token `good-token`; everyone else gets a 401 challenge pointing at `/token`.
fn serve(manifests: Manifests, blobs: HashMap<String, Vec<u8>>, lie_about: Option<String>) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, s) = (addr.clone(), seen.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            handle(conn, &a, &manifests, &blobs, lie_about.as_deref(), &s);
        }
    });
    Fake { addr, seen }
}

fn handle(
    mut conn: TcpStream,
    addr: &str,
    manifests: &Manifests,
    blobs: &HashMap<String, Vec<u8>>,
    lie_about: Option<&str>,
    seen: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut authed = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
            break;
        }
        if h.to_ascii_lowercase().starts_with("authorization: bearer good-token") {
            authed = true;
        }
    }
    seen.lock().unwrap().push(path.clone());
    let mut reply = |status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut head =
            format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
    };
    if let Some(q) = path.strip_prefix("/token?") {
        assert!(
            q.contains("scope=repository%3Atest%2Fimg%3Apull")
                || q.contains("scope=repository:test/img:pull"),
            "{q}"
        );
        assert!(q.contains("service=fake"), "{q}");
        return reply("200 OK", &[], br#"{"token":"good-token"}"#);
    }
    if !authed {
        let challenge = format!(
            r#"Bearer realm="http://{addr}/token",service="fake",scope="repository:test/img:pull""#
        );
        return reply("401 Unauthorized", &[("WWW-Authenticate", challenge)], b"{}");
    }
    if let Some(r) = path.strip_prefix("/v2/test/img/manifests/") {
        let Some((mt, body)) = manifests.get(r) else { return reply("404 Not Found", &[], b"{}") };
        let digest = if lie_about == Some(r) { sha(b"something else") } else { sha(body) };
        return reply(
            "200 OK",
            &[("Content-Type", mt.clone()), ("Docker-Content-Digest", digest)],
            body,
        );
    }
    if let Some(d) = path.strip_prefix("/v2/test/img/blobs/") {
        return match blobs.get(d) {
            Some(b) => reply("200 OK", &[], b),
            None => reply("404 Not Found", &[], b"{}"),
        };
    }
    reply("404 Not Found", &[], b"{}")
}

/// An image: a multi-platform index (arm64 first, then amd64) → manifest → config + one layer.
fn image(tamper_layer: bool) -> (Manifests, HashMap<String, Vec<u8>>, Vec<u8>) {
    let layer = Tar::default().dir("etc").file("etc/hostname", b"pulled\n", 0o644).finish();
    let gz = gzip(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["A=b"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&layer)]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&gz), "size": gz.len()}]
    }))
    .unwrap();
    let arm = br#"{"schemaVersion":2,"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#.to_vec();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&arm), "size": arm.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    }))
    .unwrap();
    let oci = "application/vnd.oci.image.manifest.v1+json".to_string();
    let mut manifests = HashMap::new();
    manifests.insert("v1".into(), ("application/vnd.oci.image.index.v1+json".into(), index));
    manifests.insert(sha(&manifest), (oci.clone(), manifest));
    manifests.insert(sha(&arm), (oci, arm));
    let mut blobs = HashMap::new();
    let served =
        if tamper_layer { gzip(b"not the layer at all, but valid gzip") } else { gz.clone() };
    blobs.insert(sha(&gz), served);
    blobs.insert(sha(&config), config);
    (manifests, blobs, gz)
}

fn is_root() -> bool {
    let ok = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !ok {
        println!("SKIPPED: needs root (owners of unpacked files)");
    }
    ok
}

#[test]
fn pull_gets_a_token_picks_amd64_and_verifies() {
    if !is_root() {
        return;
    }
    let (manifests, blobs, gz) = image(false);
    let fake = serve(manifests, blobs, None);
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let opts = PullOptions { insecure: vec![fake.addr.clone()] };
    let reference = format!("{}/test/img:v1", fake.addr);
    let rec = pull(&store, &reference, None, &opts, &Limits::default(), &mut Quiet).unwrap();
    assert_eq!(rec.name, "img:v1");
    assert_eq!(rec.config.env.as_deref(), Some(&["A=b".to_string()][..]));
    let run = store.runnable("img:v1").unwrap();
    assert_eq!(std::fs::read(run.layers[0].join("etc/hostname")).unwrap(), b"pulled\n");
    let seen = fake.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|p| p.starts_with("/token?")), "{seen:?}");
    assert!(seen.iter().any(|p| p.ends_with(&sha(&gz))), "{seen:?}");
    // The arm64 manifest was never fetched.
    assert!(!seen.iter().any(|p| p.contains("0000000000")), "{seen:?}");
}

#[test]
fn pull_refuses_a_lying_manifest_digest_and_a_substituted_layer() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let (manifests, blobs, _) = image(false);
    let fake = serve(manifests, blobs, Some("v1".into()));
    let opts = PullOptions { insecure: vec![fake.addr.clone()] };
    let err = pull(
        &store,
        &format!("{}/test/img:v1", fake.addr),
        None,
        &opts,
        &Limits::default(),
        &mut Quiet,
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Digest { what: "manifest", .. }), "{err}");

    let (manifests, blobs, gz) = image(true);
    let fake = serve(manifests, blobs, None);
    let opts = PullOptions { insecure: vec![fake.addr.clone()] };
    let err = pull(
        &store,
        &format!("{}/test/img:v1", fake.addr),
        None,
        &opts,
        &Limits::default(),
        &mut Quiet,
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Digest { what: "layer", .. }), "{err}");
    assert!(err.to_string().contains(&sha(&gz)), "names the layer: {err}");
    assert!(store.list().unwrap().is_empty());
    let left = std::fs::read_dir(store.root().join("layers")).unwrap().count();
    assert_eq!(left, 0);
}
