//! Image templates end to end: build an image here (Debian's static busybox in a layer),
//! import it with `ringfence template import`, run commands in it with `ringfence run
//! --template`, check whiteouts and opaque directories from inside, list, inspect, remove;
//! and pull one from a local registry (Debian's `docker-registry`, pushed with `skopeo`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../image/tests/common/mod.rs"]
mod img;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use img::{E, Tar, docker_archive, oci_layout};
use ringfence_test_support::start_registry;

const BUSYBOX: &str = "/bin/busybox";

/// Skips (saying why) without root or Debian's busybox-static.
fn ready(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let ok = std::fs::read(BUSYBOX).is_ok_and(|b| b.len() > 4 && &b[..4] == b"\x7fELF")
        && Command::new(BUSYBOX).arg("--list").output().is_ok_and(|o| o.status.success());
    if !ok {
        println!(
            "SKIPPED {test}: {BUSYBOX} missing (apt-get install busybox-static; scripts/setup.sh does)"
        );
    }
    ok
}

/// A layer with busybox and the links the tests use, a passwd with `user` (1000) unless
/// `no_user`, files to delete above, and a directory an upper layer makes opaque.
fn busybox_layer(no_user: bool) -> Vec<u8> {
    let bb = std::fs::read(BUSYBOX).unwrap();
    let mut t = Tar::default();
    t.dir("bin").entry(E { path: b"bin/busybox", data: &bb, mode: 0o755, ..E::default() });
    for tool in ["sh", "ls", "cat", "echo", "id", "pwd", "env", "touch", "rm", "sleep"] {
        t.symlink(&format!("bin/{tool}"), "busybox");
    }
    let passwd: &[u8] = if no_user {
        b"root:x:0:0:root:/root:/bin/sh\n"
    } else {
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
    };
    t.dir("etc")
        .file("etc/passwd", passwd, 0o644)
        .file("etc/deleted-above", b"you should not see me", 0o644)
        .dir("data")
        .file("data/old", b"old", 0o644)
        .dir("app")
        .file("app/hello.txt", b"hello from the image\n", 0o644);
    t.finish()
}

fn upper_layer() -> Vec<u8> {
    Tar::default()
        .file("etc/.wh.deleted-above", b"", 0o644)
        .file("data/.wh..wh..opq", b"", 0o644)
        .file("data/new", b"new", 0o644)
        .finish()
}

struct Data {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Data {
    fn new() -> Data {
        // Under /var/tmp-like disk storage (the default data dir's filesystem): layers need a
        // filesystem that can do idmapped mounts.
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = tmp.path().join("data");
        Data { _tmp: tmp, dir }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        ringfence().args(args).arg("--data-dir").arg(&self.dir).output().unwrap()
    }

    fn run(&self, opts: &[&str], cmd: &[&str]) -> Out {
        let mut all: Vec<&str> =
            vec!["--data-dir", self.dir.to_str().unwrap(), "--disk-backend", "tmpfs"];
        all.extend_from_slice(opts);
        run(&all, cmd)
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "code {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn imported_busybox_image_runs_with_its_own_files_env_and_whiteouts() {
    if !ready("imported_busybox_image_runs_with_its_own_files_env_and_whiteouts") {
        return;
    }
    let data = Data::new();
    let archive = data._tmp.path().join("bb.tar");
    docker_archive(
        &archive,
        &[busybox_layer(false), upper_layer()],
        &["PATH=/bin", "GREETING=hi"],
        "/app",
    );
    let t = Instant::now();
    let o = data.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "bb:1"]);
    let import_ms = t.elapsed().as_millis();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("imported bb:1 (2 layers"), "{out}");
    // Not a terminal: one plain line per layer event.
    assert!(String::from_utf8_lossy(&o.stderr).contains("layer 1/2"), "{}", text(&o));

    let t = Instant::now();
    let r = data.run(&["--template", "bb:1"], &["cat", "hello.txt"]);
    let run_ms = t.elapsed().as_millis();
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello from the image\n"), "{r:?}");
    println!("import {import_ms} ms; ringfence run from the image {run_ms} ms");

    // The image's Env and WorkingDir, `user` (1000, in its passwd); --env and --workdir win.
    let r = data.run(&["--template", "bb:1"], &["sh", "-c", "echo $GREETING; pwd; id -u"]);
    assert_eq!(r.stdout, "hi\n/app\n1000\n", "{r:?}");
    let r = data.run(
        &["--template", "bb:1", "-e", "GREETING=yo", "-w", "/tmp"],
        &["sh", "-c", "echo $GREETING; pwd"],
    );
    assert_eq!(r.stdout, "yo\n/tmp\n", "{r:?}");

    // Whiteout: deleted in the upper layer, gone. Opaque: only the upper layer's entries.
    let r = data.run(&["--template", "bb:1"], &["ls", "/etc", "/data"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("deleted-above"), "{r:?}");
    assert!(r.stdout.contains("passwd"), "{r:?}");
    assert!(r.stdout.contains("new") && !r.stdout.contains("old"), "{r:?}");

    // Only the image's files: no host /usr, no python.
    let r = data.run(
        &["--template", "bb:1"],
        &["sh", "-c", "ls /usr 2>&1; ls /; test -e /usr/bin/python3 && echo HOST"],
    );
    assert!(!r.stdout.contains("HOST"), "{r:?}");
    // The writable layer works for `user`: its home and /tmp.
    let r = data.run(&["--template", "bb:1"], &["sh", "-c", "touch ~/f /tmp/g && ls ~ /tmp"]);
    assert_eq!(r.code, 0, "{r:?}");

    // ls and inspect.
    let o = data.cmd(&["template", "ls"]);
    let ls = String::from_utf8_lossy(&o.stdout);
    assert!(ls.contains("bb:1") && ls.contains(" 2 "), "{ls}");
    assert!(ls.contains("OWN") && ls.contains(" layers, "), "{ls}");
    let o = data.cmd(&["template", "inspect", "bb:1"]);
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rec["config"]["WorkingDir"], "/app");
    assert_eq!(rec["layers"].as_array().unwrap().len(), 2);

    // A host template still works beside it, unchanged.
    let r = data.run(&[], &["sh", "-c", "test -x /usr/bin/python3 && echo host"]);
    assert_eq!(r.stdout, "host\n", "{r:?}");

    // rm removes it and its layers; running it afterwards names the problem.
    let o = data.cmd(&["template", "rm", "bb:1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 layer(s) deleted"), "{}", text(&o));
    let layers = std::fs::read_dir(data.dir.join("images/layers")).unwrap().count();
    assert_eq!(layers, 0);
    let r = data.run(&["--template", "bb:1"], &["true"]);
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("bb:1"), "{r:?}");
}

#[test]
fn image_without_uid_1000_runs_as_root_and_says_so() {
    if !ready("image_without_uid_1000_runs_as_root_and_says_so") {
        return;
    }
    let data = Data::new();
    let layout = data._tmp.path().join("layout");
    oci_layout(&layout, &[busybox_layer(true)], None);
    let o = data.cmd(&["template", "import", layout.to_str().unwrap(), "--name", "rootonly"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = data.run(&["--template", "rootonly"], &["id", "-u"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "0\n"), "{r:?}");
    assert!(r.stderr.contains("no user with uid 1000"), "{r:?}");
    // --user still chooses.
    let r = data.run(&["--template", "rootonly", "--user", "user", "-w", "/tmp"], &["id", "-u"]);
    assert_eq!(r.stdout, "1000\n", "{r:?}");
}

#[test]
fn import_errors_are_clear_and_leave_nothing() {
    if !require_root("import_errors_are_clear_and_leave_nothing") {
        return;
    }
    let data = Data::new();
    let o = data.cmd(&["template", "import", "/nonexistent.tar", "--name", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.tar"), "{}", text(&o));
    let archive = data._tmp.path().join("evil.tar");
    let layer = Tar::default().symlink("etc", "/etc").file("etc/evil", b"x", 0o644).finish();
    docker_archive(&archive, &[layer], &[], "/");
    let o = data.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "evil"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        err.contains("etc/evil") && err.contains("symlink") && err.contains("sha256:"),
        "{err}"
    );
    assert!(!Path::new("/etc/evil").exists());
    let o = data.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "host"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("built-in"), "{}", text(&o));
    let o = data.cmd(&["template", "ls"]);
    let ls = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(ls.lines().count(), 2, "the header and the totals only: {}", text(&o));
    assert!(ls.contains("0 layers"), "{ls}");
}

#[test]
fn rm_is_refused_while_a_sandbox_runs_from_an_image() {
    if !ready("rm_is_refused_while_a_sandbox_runs_from_an_image") {
        return;
    }
    let data = Data::new();
    let archive = data._tmp.path().join("bb.tar");
    docker_archive(&archive, &[busybox_layer(false)], &["PATH=/bin"], "/");
    assert!(
        data.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "bb"])
            .status
            .success()
    );
    // A second template of the same image (the same layer): not in use.
    assert!(
        data.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "bb2"])
            .status
            .success()
    );
    let mut child = ringfence()
        .args(["run", "--disk-backend", "tmpfs", "--template", "bb", "--data-dir"])
        .arg(&data.dir)
        .args(["--", "sh", "-c", "echo up; sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "up\n");
    let o = data.cmd(&["template", "rm", "bb"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is in use"), "{}", text(&o));
    // The claim is on bb alone: another template goes, its shared layer stays for bb.
    let o = data.cmd(&["template", "rm", "bb2"]);
    assert!(o.status.success(), "another template while bb is in use: {}", text(&o));
    let o = ringfence()
        .args(["run", "--disk-backend", "tmpfs", "--template", "bb", "--data-dir"])
        .arg(&data.dir)
        .args(["--", "sh", "-c", "echo still"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still\n", "{}", text(&o));
    let _ = child.kill();
    let _ = child.wait();
    let o = data.cmd(&["template", "rm", "bb"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn pull_from_a_local_registry_then_run() {
    if !ready("pull_from_a_local_registry_then_run") {
        return;
    }
    let Some(skopeo) = ["/usr/bin/skopeo"].into_iter().find(|p| Path::new(p).exists()) else {
        println!(
            "SKIPPED pull_from_a_local_registry_then_run: skopeo missing (apt-get install skopeo; scripts/setup.sh does)"
        );
        return;
    };
    let reg = match start_registry() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIPPED pull_from_a_local_registry_then_run: {why}");
            return;
        }
    };
    let data = Data::new();
    let layout = data._tmp.path().join("layout");
    oci_layout(&layout, &[busybox_layer(false), upper_layer()], None);
    let o = Command::new(skopeo)
        .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}/test/bb:v1", reg.addr))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo push: {}", text(&o));
    let reference = format!("{}/test/bb:v1", reg.addr);
    // Plain HTTP only when asked: without the flag the TLS handshake fails, named.
    let o = data.cmd(&["template", "pull", &reference]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&reg.addr), "{}", text(&o));
    let t = Instant::now();
    let o = data.cmd(&["template", "pull", &reference, "--insecure-registry", &reg.addr]);
    assert!(o.status.success(), "{}", text(&o));
    println!("pull {} ms", t.elapsed().as_millis());
    assert!(String::from_utf8_lossy(&o.stdout).contains("pulled bb:v1 (2 layers"), "{}", text(&o));
    let r = data.run(&["--template", "bb:v1"], &["sh", "-c", "cat /app/hello.txt; ls /data"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello from the image\nnew\n"), "{r:?}");
    // A missing tag is a clear error.
    let o = data.cmd(&[
        "template",
        "pull",
        &format!("{}/test/bb:nope", reg.addr),
        "--insecure-registry",
        &reg.addr,
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"), "{}", text(&o));
}
