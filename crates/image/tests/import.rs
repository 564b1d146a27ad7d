//! Importing images built here, well-formed and hostile. Needs root (owners, whiteouts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{E, Tar, docker_archive, gzip, oci_layout, sha, tar_dir};
use ringfence_image::{ImageError, Limits, Quiet, Store, import};

fn root() -> bool {
    if nix_is_root() {
        return true;
    }
    println!("SKIPPED: needs root (owners and whiteout device nodes)");
    false
}

fn nix_is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Everything under the store's layers directory: no `.partial` and nothing else may be left
/// by a refused import.
fn layer_dirs(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.root().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn base_layer() -> Vec<u8> {
    Tar::default()
        .dir("./")
        .dir("bin")
        .file("bin/hello", b"#!/bin/sh\necho hello\n", 0o4755)
        .hardlink("bin/hello2", "bin/hello")
        .symlink("bin/sh", "/bin/busybox")
        .dir("etc")
        .file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
        )
        .file("etc/gone", b"deleted above", 0o644)
        .dir("opq")
        .file("opq/a", b"a", 0o644)
        .entry(E { path: b"owned", data: b"x", uid: 1000, gid: 1000, ..E::default() })
        .entry(E { path: b"far", data: b"x", uid: 200_000, gid: 70_000, ..E::default() })
        .entry(E { path: b"pipe", kind: tar::EntryType::Fifo, mode: 0o600, ..E::default() })
        .finish()
}

fn upper_layer() -> Vec<u8> {
    Tar::default()
        .file("etc/.wh.gone", b"", 0o644)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("opq/b", b"b", 0o644)
        .finish()
}

#[test]
fn docker_archive_unpacks_with_whiteouts_opaque_dirs_and_canonical_owners() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let archive = tmp.path().join("img.tar");
    let (base, upper) = (base_layer(), upper_layer());
    docker_archive(&archive, &[base.clone(), upper.clone()], &["PATH=/bin", "A=1"], "/srv");
    let rec = import(&store, &archive, Some("demo"), &Limits::default(), &mut Quiet).unwrap();
    assert_eq!(rec.name, "demo:latest");
    assert_eq!(rec.layers.len(), 2);
    // Topmost first.
    assert_eq!(rec.layers[0].diff_id, sha(&upper));
    assert_eq!(rec.layers[1].diff_id, sha(&base));
    assert_eq!(rec.config.env.as_deref(), Some(&["PATH=/bin".to_string(), "A=1".into()][..]));
    assert_eq!(rec.config.working_dir.as_deref(), Some("/srv"));
    let run = store.runnable("demo").unwrap();
    assert!(run.has_user_1000);
    let (top, bottom) = (&run.layers[0], &run.layers[1]);
    // Setuid kept, owners canonical, hard link is the same inode, symlink kept as text.
    let hello = fs::metadata(bottom.join("bin/hello")).unwrap();
    assert_eq!(hello.mode() & 0o7777, 0o4755);
    assert_eq!(fs::metadata(bottom.join("bin/hello2")).unwrap().ino(), hello.ino());
    assert_eq!(fs::read_link(bottom.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
    let owned = fs::metadata(bottom.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    let far = fs::metadata(bottom.join("far")).unwrap();
    assert_eq!((far.uid(), far.gid()), (65534, 65534), "ids past the range become nobody");
    assert!(fs::symlink_metadata(bottom.join("pipe")).unwrap().file_type().is_fifo());
    // The whiteout is a 0:0 character device; the marker file itself is not there.
    let wh = fs::symlink_metadata(top.join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!top.join("etc/.wh.gone").exists());
    let mut v = [0u8; 4];
    let n = rustix::fs::getxattr(top.join("opq"), "user.overlay.opaque", &mut v).unwrap();
    assert_eq!(&v[..n], b"y");
    assert!(!top.join("opq/.wh..wh..opq").exists());
    // Closed to everyone but the host's root.
    for d in ["", "layers", "templates"] {
        assert_eq!(fs::metadata(store.root().join(d)).unwrap().mode() & 0o777, 0o700, "{d}");
    }
    // A second image sharing the base layer reuses it (same inode: not unpacked again).
    let archive2 = tmp.path().join("img2.tar");
    let third = Tar::default().file("three", b"3", 0o644).finish();
    docker_archive(&archive2, &[base, third], &[], "/");
    let before = fs::metadata(bottom.join("bin/hello")).unwrap().ino();
    import(&store, &archive2, Some("other:v2"), &Limits::default(), &mut Quiet).unwrap();
    assert_eq!(fs::metadata(bottom.join("bin/hello")).unwrap().ino(), before);
    assert_eq!(store.list().unwrap().len(), 2);
    // Removing the first keeps the shared layer and drops its own.
    let removed = store.remove("demo").unwrap();
    assert_eq!((removed.layers_removed, removed.layers_kept), (1, 1));
    assert!(bottom.is_dir());
    assert!(!top.exists());
    assert!(matches!(store.get("demo"), Err(ImageError::NotFound(_))));
    store.remove("other:v2").unwrap();
    let left: Vec<String> = layer_dirs(&store);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn oci_layout_directory_and_tar_import_with_verified_digests() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let layout = tmp.path().join("layout");
    let md = oci_layout(&layout, &[base_layer(), upper_layer()], None);
    let rec = import(&store, &layout, Some("oci"), &Limits::default(), &mut Quiet).unwrap();
    assert_eq!(rec.manifest_digest.as_deref(), Some(md.as_str()));
    assert_eq!(rec.config.env.as_ref().unwrap()[1], "GREETING=hi");
    let tarred = tmp.path().join("layout.tar");
    tar_dir(&layout, &tarred);
    // Same layers: reused; the tar form reads the same.
    let rec2 = import(&store, &tarred, Some("oci:tar"), &Limits::default(), &mut Quiet).unwrap();
    assert_eq!(rec2.layers, rec.layers);
    assert_eq!(layer_dirs(&store).len(), 4, "two layers and their two records");
}

/// Imports a single-layer docker-archive of `layer` and returns the error.
fn refused(layer: Vec<u8>, limits: Limits) -> (String, tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let archive = tmp.path().join("bad.tar");
    let digest = sha(&layer);
    docker_archive(&archive, &[layer], &[], "/");
    let err = import(&store, &archive, Some("bad"), &limits, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains(&digest), "the error names the layer: {err}");
    assert!(layer_dirs(&store).is_empty(), "nothing left: {:?}", layer_dirs(&store));
    assert!(!store.contains("bad"));
    (err, tmp, store)
}

#[test]
fn dotdot_path_is_refused_and_nothing_is_written_outside() {
    if !root() {
        return;
    }
    let layer =
        Tar::default().file("a/../../../../../tmp/ringfence-escape-dotdot", b"x", 0o644).finish();
    let (err, _t, _s) = refused(layer, Limits::default());
    assert!(err.contains("'..'") && err.contains("ringfence-escape-dotdot"), "{err}");
    assert!(!Path::new("/tmp/ringfence-escape-dotdot").exists());
}

#[test]
fn absolute_path_is_refused() {
    if !root() {
        return;
    }
    let layer = Tar::default().file("/tmp/ringfence-escape-abs", b"x", 0o644).finish();
    let (err, _t, _s) = refused(layer, Limits::default());
    assert!(err.contains("absolute") && err.contains("/tmp/ringfence-escape-abs"), "{err}");
    assert!(!Path::new("/tmp/ringfence-escape-abs").exists());
}

#[test]
fn symlink_escape_is_never_followed() {
    if !root() {
        return;
    }
    // `etc -> /etc` (and a relative variant pointing at a host directory), then a file
    // through each: the write would land in the host's directory if the link were followed.
    let host = tempfile::tempdir().unwrap();
    let victim = host.path().join("passwd");
    fs::write(&victim, "host file").unwrap();
    let layer = Tar::default()
        .symlink("etc", host.path().to_str().unwrap())
        .file("etc/passwd", b"owned", 0o644)
        .finish();
    let (err, _t, _s) = refused(layer, Limits::default());
    assert!(err.contains("etc/passwd") && err.contains("symlink"), "{err}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "host file");
    // A relative one climbing out, then a directory entry through it.
    let layer = Tar::default()
        .symlink("up", "../../../../../..")
        .dir("up/tmp/ringfence-escape-rel")
        .finish();
    let (err, _t, _s) = refused(layer, Limits::default());
    assert!(err.contains("up/tmp/ringfence-escape-rel"), "{err}");
    assert!(!Path::new("/tmp/ringfence-escape-rel").exists());
}

#[test]
fn hard_link_to_a_host_file_is_refused() {
    if !root() {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("secret");
    fs::write(&secret, "host secret").unwrap();
    let nlink = fs::metadata(&secret).unwrap().nlink();
    // Absolute, climbing, and through a symlink in the layer: each must not link the host file.
    let abs = secret.to_str().unwrap().to_string();
    let climb = format!("../../../../../../..{abs}");
    for target in [abs.as_str(), climb.as_str()] {
        let layer = Tar::default().hardlink("stolen", target).finish();
        let (err, _t, _s) = refused(layer, Limits::default());
        assert!(err.contains("stolen") && err.contains("hard link target"), "{err}");
    }
    let layer = Tar::default()
        .symlink("h", host.path().to_str().unwrap())
        .hardlink("stolen", "h/secret")
        .finish();
    let (err, _t, _s) = refused(layer, Limits::default());
    assert!(err.contains("stolen") && err.contains("not a file unpacked earlier"), "{err}");
    assert_eq!(fs::metadata(&secret).unwrap().nlink(), nlink, "no new link to the host file");
}

#[test]
fn device_nodes_are_skipped_with_a_note() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("l");
    fs::create_dir(&dest).unwrap();
    let layer = Tar::default()
        .entry(E { path: b"dev/sda", kind: tar::EntryType::Block, dev: (8, 0), ..E::default() })
        .entry(E { path: b"dev/mem", kind: tar::EntryType::Char, dev: (1, 1), ..E::default() })
        .entry(E { path: b"zero", kind: tar::EntryType::Char, dev: (0, 0), ..E::default() })
        .file("ok", b"fine", 0o644)
        .finish();
    let mut budget = u64::MAX;
    let stats = ringfence_image::unpack::unpack(
        &layer[..],
        &dest,
        "sha256:test",
        &Limits::default(),
        &mut budget,
    )
    .unwrap();
    for n in ["dev/sda", "dev/mem", "zero"] {
        assert!(fs::symlink_metadata(dest.join(n)).is_err(), "{n} must not exist");
        assert!(stats.notes.iter().any(|x| x.contains(n)), "{n} noted: {:?}", stats.notes);
    }
    assert_eq!(fs::read(dest.join("ok")).unwrap(), b"fine");
}

#[test]
fn ten_gb_sparse_file_is_refused_before_writing() {
    if !root() {
        return;
    }
    let layer = Tar::default().file("small", b"x", 0o644).sparse("huge", 10_000_000_000).finish();
    assert!(layer.len() < 8192, "the archive itself is tiny");
    let (err, tmp, _s) = refused(layer, Limits::default());
    assert!(
        err.contains("huge") && err.contains("10000000000") && err.contains("per-file"),
        "{err}"
    );
    // Nothing of it reached the disk.
    let used: u64 = walk_blocks(tmp.path());
    assert!(used < 1 << 20, "{used} bytes allocated");
}

fn walk_blocks(p: &Path) -> u64 {
    let m = fs::symlink_metadata(p).unwrap();
    let mut t = m.blocks() * 512;
    if m.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            t += walk_blocks(&e.unwrap().path());
        }
    }
    t
}

#[test]
fn free_space_is_kept_whatever_the_caps() {
    if !root() {
        return;
    }
    // Caps wide open; the reserve is larger than any disk: the file is refused on free space.
    let limits = Limits { min_free: u64::MAX / 2, ..Limits::default() };
    let layer = Tar::default().file("f", &[1u8; 4096], 0o644).finish();
    let (err, _t, _s) = refused(layer, limits);
    assert!(err.contains("free") && err.contains("\"f\""), "{err}");
}

#[test]
fn digest_mismatch_is_refused_naming_the_layer() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let layout = tmp.path().join("layout");
    oci_layout(&layout, &[base_layer(), upper_layer()], Some(1));
    // A corrupt one (the gzip breaks mid-stream) is refused as a digest mismatch too.
    let corrupt = tmp.path().join("corrupt");
    oci_layout(&corrupt, &[base_layer()], None);
    for e in fs::read_dir(corrupt.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let mut b = fs::read(&p).unwrap();
        if b.starts_with(&[0x1f, 0x8b]) {
            let n = b.len() - 9;
            b[n] ^= 0xff;
            fs::write(&p, b).unwrap();
        }
    }
    let err = import(&store, &corrupt, Some("bad"), &Limits::default(), &mut Quiet).unwrap_err();
    assert!(matches!(err, ImageError::Digest { .. }), "corrupt blob: {err}");
    assert!(layer_dirs(&store).is_empty());
    let err = import(&store, &layout, Some("bad"), &Limits::default(), &mut Quiet).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ImageError::Digest { .. }), "tampered blob refused: {text}");
    assert!(text.contains("sha256:"), "{text}");
    assert!(!store.contains("bad"));
    // The untampered base layer may stay (verified, reusable); the tampered one must not.
    let left = layer_dirs(&store);
    assert!(left.iter().all(|n| !n.contains("partial")), "{left:?}");
    assert!(!left.iter().any(|n| n.contains(&sha(&upper_layer())[7..])), "{left:?}");
    // A docker-archive whose layer does not match the config's diff_id (a fresh store: the
    // verified base layer above would be reused, its content never read again).
    let store = Store::open(&tmp.path().join("data2")).unwrap();
    let archive = tmp.path().join("d.tar");
    docker_archive(&archive, &[base_layer()], &[], "/");
    let mut bytes = fs::read(&archive).unwrap();
    let at = bytes.windows(10).position(|w| w == b"echo hello").unwrap();
    bytes[at] = b'E';
    fs::write(&archive, bytes).unwrap();
    let err = import(&store, &archive, Some("bad2"), &Limits::default(), &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("diff_id"), "{err}");
}

#[test]
fn decompression_bomb_is_bounded() {
    if !root() {
        return;
    }
    // A gigabyte of zeros as 1024 concatenated gzip members of 1 MiB each (gzip allows
    // members back to back), about a megabyte on disk: reading stops at the per-layer cap,
    // long before the gigabyte. The diff_id is never reached, so any will do.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let member = gzip(&vec![0u8; 1 << 20]);
    let gz = member.repeat(1024);
    assert!(gz.len() < 8 << 20);
    let layout = tmp.path().join("layout");
    oci_layout_raw(&layout, &gz, &sha(b"never reached"));
    let limits = Limits { layer_bytes: 16 << 20, ..Limits::default() };
    let t = std::time::Instant::now();
    let err = import(&store, &layout, Some("bomb"), &limits, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("exceeds") && err.contains(&(16u64 << 20).to_string()), "{err}");
    assert!(t.elapsed().as_secs() < 20);
    assert!(layer_dirs(&store).is_empty());
}

/// An OCI layout with one layer blob given as is.
fn oci_layout_raw(dir: &Path, blob: &[u8], diff_id: &str) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        fs::write(blobs.join(&d[7..]), b).unwrap();
        d
    };
    let ld = put(blob);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    }))
    .unwrap();
    let cd = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": blob.len()}]
    }))
    .unwrap();
    let md = put(&manifest);
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len()
        }]}))
        .unwrap(),
    )
    .unwrap();
}

#[test]
fn entry_count_and_image_caps_are_enforced() {
    if !root() {
        return;
    }
    let mut t = Tar::default();
    for i in 0..50 {
        t.file(&format!("f{i}"), b"", 0o644);
    }
    let (err, _t, _s) = refused(t.finish(), Limits { entries: 20, ..Limits::default() });
    assert!(err.contains("more than 20 entries"), "{err}");
    let layer = Tar::default().file("big", &[0u8; 64 << 10], 0o644).finish();
    let (err, _t, _s) = refused(layer, Limits { image_bytes: 32 << 10, ..Limits::default() });
    assert!(err.contains("image's limit"), "{err}");
}

#[test]
fn bad_names_and_builtin_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    for bad in ["host", "base:v1", "../x", "a/b", "UPPER", "", "x:", "x:-y"] {
        let e = store.get(bad).unwrap_err();
        assert!(matches!(e, ImageError::Name { .. }), "{bad}: {e}");
    }
}

#[test]
fn zstd_layers_with_several_frames_unpack() {
    if !root() {
        return;
    }
    // Two frames with a skippable frame between them (as zstd:chunked writes), one layer.
    let layer = base_layer();
    let (a, b) = layer.split_at(4096);
    let z = |part: &[u8]| {
        ruzstd::encoding::compress_to_vec(part, ruzstd::encoding::CompressionLevel::Fastest)
    };
    let mut blob = z(a);
    blob.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    blob.extend_from_slice(&5u32.to_le_bytes());
    blob.extend_from_slice(b"skip!");
    blob.extend_from_slice(&z(b));
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let layout = tmp.path().join("layout");
    oci_layout_raw(&layout, &blob, &sha(&layer));
    let rec = import(&store, &layout, Some("zstd"), &Limits::default(), &mut Quiet).unwrap();
    let run = store.runnable(&rec.name).unwrap();
    assert_eq!(fs::read(run.layers[0].join("opq/a")).unwrap(), b"a");
    assert!(run.layers[0].join("bin/hello").is_file());
}

#[test]
fn a_layer_left_without_its_record_by_a_crash_is_unpacked_again() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let archive = tmp.path().join("img.tar");
    let layer = base_layer();
    docker_archive(&archive, std::slice::from_ref(&layer), &[], "/");
    import(&store, &archive, Some("a"), &Limits::default(), &mut Quiet).unwrap();
    // What a crash after the layer's rename and before its record leaves: the directory alone,
    // here also missing a file (as unsynced data could be).
    let dir = store.runnable("a").unwrap().layers[0].clone();
    fs::remove_file(dir.with_extension("json")).unwrap();
    fs::remove_file(dir.join("etc/passwd")).unwrap();
    fs::remove_file(store.root().join("templates/a:latest.json")).unwrap();
    // A crash mid-unpack leaves a `.partial`, swept by the next import.
    fs::create_dir(store.root().join("layers/.sha256-dead.partial")).unwrap();
    import(&store, &archive, Some("a"), &Limits::default(), &mut Quiet).unwrap();
    assert!(dir.join("etc/passwd").is_file(), "unpacked afresh, not trusted as it was");
    assert!(!store.root().join("layers/.sha256-dead.partial").exists());
}

#[test]
fn huge_pax_header_and_long_name_are_refused_without_holding_them() {
    if !root() {
        return;
    }
    // The tar reader collects PAX records and GNU long names in memory: 8 MiB of either is
    // refused after the first MiB, before it is held.
    for kind in [tar::EntryType::XHeader, tar::EntryType::GNULongName] {
        let big = vec![b'a'; 8 << 20];
        let mut t = Tar::default();
        t.entry(E { path: b"././@x", kind, data: &big, ..E::default() });
        t.file("after", b"x", 0o644);
        let (err, _t, _s) = refused(t.finish(), Limits::default());
        assert!(err.contains("tar header") && err.contains("1048576"), "{kind:?}: {err}");
    }
}

#[test]
fn image_archive_with_huge_headers_is_refused() {
    // The archive itself (not a layer): 70 MiB of PAX records before its manifest. Indexing
    // reads headers only, at most 64 MiB of them.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let big = vec![b'a'; 70 << 20];
    let mut t = Tar::default();
    t.entry(E {
        path: b"././@PaxHeader",
        kind: tar::EntryType::XHeader,
        data: &big,
        ..E::default()
    });
    t.file("manifest.json", b"[]", 0o644);
    let archive = tmp.path().join("huge.tar");
    fs::write(&archive, t.finish()).unwrap();
    let err = import(&store, &archive, Some("x"), &Limits::default(), &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("tar headers"), "{err}");
}

#[test]
fn image_directory_symlinks_are_not_followed() {
    if !root() {
        return;
    }
    // An OCI layout directory whose blob is a symlink to a host file: refused, not read.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("data")).unwrap();
    let layout = tmp.path().join("layout");
    oci_layout(&layout, &[base_layer()], None);
    let blob = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let host = tmp.path().join("host-file");
    fs::rename(&blob, &host).unwrap();
    std::os::unix::fs::symlink(&host, &blob).unwrap();
    let err = import(&store, &layout, Some("x"), &Limits::default(), &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("no symlinks"), "{err}");
}
