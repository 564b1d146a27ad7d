//! Saved layers (filesystem pauses, snapshots, forks) end to end: a real `ringfence serve`
//! driven over HTTP, with the layers directory and the state database checked after every step.
//!
//! - A layer goes exactly when its last user does: a sandbox resumed from a filesystem pause
//!   and then killed (by the API or by its timeout), a snapshot deleted, a fork's last child
//!   killed; and it stays while a snapshot or another sandbox still uses it.
//! - A server SIGKILLed in the middle of a snapshot (while the layer is being copied, the
//!   sandbox frozen) comes back with the sandbox running and thawed, no `.partial` left, no
//!   orphan layer, and the referenced layers untouched.
//!
//! Needs root and the binaries (`cargo build -p ringfence`): `RINGFENCE_BIN`, or
//! `target/<profile>/ringfence` beside this test. Without either, each test prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringfence_server::store::{SandboxState, Store};
use serde_json::{Value, json};
use support::serve::{Sandbox, Server, b64_text, frames};

/// The tests of this file, one at a time. Every test server shares the host's run directory,
/// and with it the cgroup slots: while one test's server is down between a `kill -9` and its
/// restart, the other's next create may claim (and sweep) the slot of a sandbox the restarted
/// server is about to re-attach, which then fails as "slot is held by another process".
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Server {
    fn start(test: &str) -> Option<Server> {
        if !support::root_or_skip(test) {
            return None;
        }
        let bin = support::serve::binary_or_skip(test, "cargo build -p ringfence")?;
        let mut s = Server::new(bin);
        s.key = s.new_key("layers", &[]);
        s.up_within = Duration::from_secs(30);
        s.spawn(&[]);
        Some(s)
    }

    fn layers_dir(&self) -> PathBuf {
        self.data.path().join("layers")
    }

    /// Every entry of the layers directory (layers and `.partial` copies alike).
    fn layer_dirs(&self) -> BTreeSet<String> {
        let Ok(rd) = std::fs::read_dir(self.layers_dir()) else { return BTreeSet::new() };
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }

    fn store(&self) -> Store {
        Store::open(&self.data.path().join("ringfence.db")).unwrap()
    }

    /// The layers the store records, each with how many users hold it.
    fn recorded(&self) -> BTreeMap<String, i64> {
        self.store().layers().unwrap()
    }

    /// The directories on disk are exactly the layers recorded, each held by someone, and
    /// exactly those the sandboxes not killed and the snapshots name: nothing leaked, nothing
    /// removed under a user. Returns them.
    fn consistent(&self, step: &str) -> BTreeSet<String> {
        let store = self.store();
        let recorded = store.layers().unwrap();
        let mut named = BTreeSet::new();
        for r in store.live_sandboxes().unwrap() {
            named.extend(r.lifecycle.layers);
        }
        for s in store.all_snapshots().unwrap() {
            named.extend(s.layers);
        }
        let dirs = self.layer_dirs();
        let keys: BTreeSet<String> = recorded.keys().cloned().collect();
        assert_eq!(dirs, keys, "{step}: layer directories vs the store's layers");
        assert_eq!(keys, named, "{step}: the store's layers vs what records name");
        assert!(recorded.values().all(|n| *n > 0), "{step}: a layer with no user: {recorded:?}");
        dirs
    }

    fn create(&self, template: &str) -> Sandbox {
        let r = self.api("POST", "/v2/sandboxes", json!({"templateID": template}));
        assert_eq!(r.status, 201, "create: {}", r.text());
        Sandbox::from(&r.json())
    }

    /// Runs `bash -c script` through envd's `process.Process/Start`; returns stdout and
    /// whether the process ended with exit code 0.
    fn run(&self, sb: &Sandbox, script: &str) -> (String, bool) {
        let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false});
        let r = self.process_start(&sb.id, &sb.token, &msg, &[]);
        if r.status != 200 {
            return (r.text(), false);
        }
        let (mut stdout, mut ok) = (String::new(), false);
        for (_, v) in frames(&r.body) {
            if let Some(d) = v["event"]["data"]["stdout"].as_str() {
                stdout.push_str(&b64_text(d));
            }
            let end = &v["event"]["end"];
            if !end.is_null() {
                ok = end["exited"].as_bool() == Some(true)
                    && end["exitCode"].as_i64().unwrap_or(0) == 0;
            }
        }
        (stdout, ok)
    }

    fn kill(&self, sb: &Sandbox) {
        let r = self.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(r.status, 204, "kill {}: {}", sb.id, r.text());
    }

    fn pause_files(&self, sb: &Sandbox) {
        let r = self.api("POST", &format!("/sandboxes/{}/pause", sb.id), json!({"memory": false}));
        assert_eq!(r.status, 204, "pause: {}", r.text());
    }

    fn resume(&self, sb: &Sandbox, timeout: Option<u64>) {
        let body = timeout.map_or(json!({}), |t| json!({"timeout": t}));
        let r = self.api("POST", &format!("/sandboxes/{}/resume", sb.id), body);
        assert_eq!(r.status, 201, "resume: {}", r.text());
    }

    fn snapshot(&self, sb: &Sandbox) -> String {
        let r = self.api("POST", &format!("/sandboxes/{}/snapshots", sb.id), json!({}));
        assert_eq!(r.status, 201, "snapshot: {}", r.text());
        r.json()["snapshotID"].as_str().unwrap().to_string()
    }

    fn state(&self, sb: &Sandbox) -> Option<SandboxState> {
        self.store().get_sandbox(&sb.id).unwrap().map(|r| r.state)
    }
}

/// Waits for `cond`, failing the test with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one layer in `after` that is not in `before`.
fn new_layer(before: &BTreeSet<String>, after: &BTreeSet<String>) -> String {
    let new: Vec<&String> = after.difference(before).collect();
    assert_eq!(new.len(), 1, "expected one new layer: before {before:?}, after {after:?}");
    new[0].clone()
}

/// The freezer state file of a server sandbox's cgroup slot (default run directory), and the
/// value it reads when frozen.
fn freezer_file(slot: u32) -> (PathBuf, &'static str) {
    let prefix = ringfence_server::manager::pool_prefix(Path::new(ringfence_jail::DEFAULT_RUN_DIR));
    let cfg = ringfence_jail::JailConfig::with_agent(PathBuf::new());
    let leaf = format!("{}/{prefix}-{slot}", cfg.cgroup_name);
    match ringfence_jail::cgroup::Layout::detect().unwrap() {
        ringfence_jail::cgroup::Layout::V2 { root } => (root.join(leaf).join("cgroup.freeze"), "1"),
        ringfence_jail::cgroup::Layout::V1 { freezer, .. } => {
            let f = freezer.expect("a freezer hierarchy (pause needs one)");
            (f.join(leaf).join("freezer.state"), "FROZEN")
        }
    }
}

fn is_frozen(slot: u32) -> bool {
    let (file, frozen) = freezer_file(slot);
    std::fs::read_to_string(&file).unwrap_or_default().trim() == frozen
}

/// Finding 10: a layer goes with its last user, and only then.
#[test]
fn layers_go_with_their_last_user_and_not_before() {
    let _serial = one_at_a_time();
    let Some(s) = Server::start("layers_go_with_their_last_user_and_not_before") else { return };

    // A sandbox paused with its files only, resumed, then killed: its layer goes at the kill.
    let a = s.create("base");
    assert!(s.run(&a, "echo kept > /home/user/a.txt").1);
    s.pause_files(&a);
    let after_pause = s.consistent("filesystem pause");
    assert_eq!(after_pause.len(), 1, "the pause saved one layer");
    s.resume(&a, None);
    assert_eq!(s.run(&a, "cat /home/user/a.txt").0, "kept\n");
    s.consistent("resumed");
    s.kill(&a);
    assert!(s.layer_dirs().is_empty(), "the resumed sandbox's layer outlived it");
    assert!(s.recorded().is_empty());

    // The same, ended by its timeout instead of the API.
    let b = s.create("base");
    assert!(s.run(&b, "echo b > /home/user/b.txt").1);
    s.pause_files(&b);
    assert_eq!(s.consistent("second pause").len(), 1);
    s.resume(&b, Some(1));
    wait_for("the timeout to kill the resumed sandbox", Duration::from_secs(20), || {
        s.state(&b) == Some(SandboxState::Killed)
    });
    // The directory goes right after the kill's commit (the state may be read in between).
    wait_for("the timed-out sandbox's layer to go", Duration::from_secs(5), || {
        s.layer_dirs().is_empty()
    });
    assert!(s.recorded().is_empty());

    // A paused sandbox killed while paused (nothing runs: the record alone ends).
    let p = s.create("base");
    s.pause_files(&p);
    assert_eq!(s.consistent("pause to kill paused").len(), 1);
    s.kill(&p);
    assert!(s.layer_dirs().is_empty(), "a paused sandbox's layer outlived its kill");

    // Resumed, then snapshotted: the snapshot holds the pause's layer after the sandbox ends.
    let c = s.create("base");
    assert!(s.run(&c, "echo c > /home/user/c.txt").1);
    s.pause_files(&c);
    let pause_layer = s.consistent("pause before snapshot");
    s.resume(&c, None);
    let snap = s.snapshot(&c);
    let with_snap = s.consistent("snapshot");
    let snap_layer = new_layer(&pause_layer, &with_snap);
    s.kill(&c);
    assert_eq!(s.consistent("source killed, snapshot kept"), with_snap);
    // A sandbox made from the snapshot; the snapshot cannot go while it runs.
    let d = s.create(&snap);
    assert_eq!(s.run(&d, "cat /home/user/c.txt").0, "c\n");
    let r = s.api("DELETE", &format!("/templates/{snap}"), Value::Null);
    assert_eq!(r.status, 409, "delete in use: {}", r.text());
    s.kill(&d);
    assert_eq!(s.consistent("snapshot's sandbox killed"), with_snap);
    let r = s.api("DELETE", &format!("/templates/{snap}"), Value::Null);
    assert_eq!(r.status, 204, "delete: {}", r.text());
    assert!(s.layer_dirs().is_empty(), "a deleted snapshot's layers ({snap_layer} …) stayed");

    // A fork of a resumed sandbox: its layers (the fork's and the parent's pause's below it)
    // live as long as the last child, whatever the parent does.
    let e = s.create("base");
    assert!(s.run(&e, "echo e > /home/user/e.txt").1);
    s.pause_files(&e);
    s.resume(&e, None);
    assert!(s.run(&e, "echo f > /home/user/f.txt").1);
    let r = s.api("POST", &format!("/sandboxes/{}/fork", e.id), json!({"count": 2}));
    assert_eq!(r.status, 201, "fork: {}", r.text());
    let kids: Vec<Sandbox> =
        r.json().as_array().unwrap().iter().map(|k| Sandbox::from(&k["sandbox"])).collect();
    assert_eq!(kids.len(), 2);
    let forked = s.consistent("fork");
    assert_eq!(forked.len(), 2);
    assert_eq!(s.run(&kids[0], "cat /home/user/e.txt /home/user/f.txt").0, "e\nf\n");
    s.kill(&e);
    assert_eq!(s.consistent("fork's resumed parent killed"), forked);
    s.kill(&kids[0]);
    assert_eq!(s.consistent("first child killed"), forked);
    // The last child paused with its files: the pause's layer sits on the fork's.
    s.pause_files(&kids[1]);
    assert_eq!(s.consistent("last child paused").len(), 3);
    s.resume(&kids[1], None);
    assert_eq!(s.run(&kids[1], "cat /home/user/e.txt").0, "e\n");
    s.kill(&kids[1]);
    assert!(s.layer_dirs().is_empty(), "the fork's layers outlived its last child");
    assert!(s.recorded().is_empty());
}

/// Sends `POST path` with `body` and ignores the outcome: the server dies under it.
fn fire_and_forget(
    port: u16,
    key: String,
    path: String,
    body: Value,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else { return };
        let body = body.to_string();
        let _ = c.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let _ = c.read_to_end(&mut Vec::new());
    })
}

/// Finding 9: `kill -9` of the server while a snapshot (and, the same way, a fork or a
/// filesystem pause) copies the frozen sandbox's files.
#[test]
fn a_server_killed_during_a_snapshot_gives_the_sandbox_back_running() {
    let _serial = one_at_a_time();
    let Some(mut s) =
        Server::start("a_server_killed_during_a_snapshot_gives_the_sandbox_back_running")
    else {
        return;
    };
    // A layer that must survive every recovery: a snapshot's.
    let x = s.create("base");
    assert!(s.run(&x, "echo kept > /home/user/x.txt").1);
    let snap = s.snapshot(&x);
    s.kill(&x);
    let referenced = s.consistent("before the crash");
    assert_eq!(referenced.len(), 1);
    // A sandbox paused in memory on purpose: it must stay paused (frozen) across the restarts.
    let m = s.create("base");
    let r = s.api("POST", &format!("/sandboxes/{}/pause", m.id), json!({}));
    assert_eq!(r.status, 204, "pause in memory: {}", r.text());
    let m_slot = s.store().get_sandbox(&m.id).unwrap().unwrap().cgroup_slot.unwrap();
    assert!(is_frozen(m_slot));

    // A sandbox whose files take a while to copy: many small files and a large one.
    let v = s.create("base");
    let (_, ok) = s.run(
        &v,
        "mkdir -p /home/user/many && cd /home/user/many && seq -f f%g 1 20000 | xargs touch \
         && head -c 200M /dev/zero > /home/user/big && echo state > /home/user/state.txt",
    );
    assert!(ok, "filling the sandbox");

    let partial = |s: &Server| s.layer_dirs().into_iter().find(|n| n.ends_with(".partial"));
    for (op, path, body) in [
        ("snapshot", format!("/sandboxes/{}/snapshots", v.id), json!({})),
        ("fork", format!("/sandboxes/{}/fork", v.id), json!({"count": 1})),
        ("filesystem pause", format!("/sandboxes/{}/pause", v.id), json!({"memory": false})),
    ] {
        let slot = s.store().get_sandbox(&v.id).unwrap().unwrap().cgroup_slot.expect("a slot");
        assert!(!is_frozen(slot), "{op}: frozen before it began");
        let req = fire_and_forget(s.port, s.key.clone(), path, body);
        // SIGKILL while the copy is under way (its `.partial` directory exists).
        let deadline = Instant::now() + Duration::from_secs(60);
        while partial(&s).is_none() {
            assert!(Instant::now() < deadline, "{op}: the copy never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        s.kill9();
        let _ = req.join();
        // The crash hit where it should: mid-copy, the sandbox frozen.
        let left = partial(&s).expect("the .partial copy is still there after the crash");
        assert!(is_frozen(slot), "{op}: the sandbox was not frozen at the crash");
        // A complete layer nothing records (a save whose commit the crash prevented).
        let orphan = s.layers_dir().join("lorphan");
        std::fs::create_dir_all(orphan.join("home/user")).unwrap();
        std::fs::write(orphan.join("home/user/o.txt"), b"o").unwrap();

        s.spawn(&[]);
        // The sandbox is back, running, thawed, its files intact: the operation never
        // happened (its client got no answer).
        assert!(!is_frozen(slot), "{op}: the sandbox is still frozen after the restart");
        let (out, ok) = s.run(&v, "cat /home/user/state.txt; ls /home/user/many | wc -l");
        assert!(ok, "{op}: the sandbox does not answer after the restart: {out}\n{}", s.log());
        assert_eq!(out, "state\n20000\n", "{op}");
        assert_eq!(s.state(&v), Some(SandboxState::Running), "{op}");
        let events = s.store().events_for(&v.id).unwrap();
        let back = events.iter().rev().find(|e| e.1 == "reattached").expect("reattached");
        assert_eq!(back.2["thawed"], json!(true), "{op}: {events:?}");
        // The partial copy and the orphan are gone; the snapshot's layer is not.
        let dirs = s.consistent(op);
        assert!(!dirs.contains(&left), "{op}: {left} survived the restart");
        assert!(!orphan.exists(), "{op}: an unrecorded layer survived the restart");
        assert_eq!(dirs, referenced, "{op}: a referenced layer was touched");
        // The sandbox paused in memory is still paused, and still frozen.
        assert_eq!(s.state(&m), Some(SandboxState::Paused), "{op}");
        assert!(is_frozen(m_slot), "{op}: the restart thawed a sandbox paused in memory");
    }
    let y = s.create(&snap);
    assert_eq!(s.run(&y, "cat /home/user/x.txt").0, "kept\n");
    s.kill(&y);
    let r = s.api("POST", &format!("/sandboxes/{}/resume", m.id), json!({}));
    assert_eq!(r.status, 201, "resume after the restarts: {}", r.text());
    assert!(s.run(&m, "true").1, "the sandbox paused in memory does not run after resume");
    s.kill(&m);

    // And a snapshot of the recovered sandbox now works.
    let r = s.api("POST", &format!("/sandboxes/{}/snapshots", v.id), json!({}));
    assert_eq!(r.status, 201, "snapshot after recovery: {}", r.text());
    assert_eq!(s.consistent("snapshot after recovery").len(), 2);
    assert!(s.run(&v, "true").1, "the sandbox is frozen after its snapshot");
    s.kill(&v);
}

/// Where layer `id`'s link in the layers directory points (None: not a link).
fn link_of(s: &Server, id: &str) -> Option<PathBuf> {
    std::fs::read_link(s.layers_dir().join(id)).ok()
}

/// Saved layers are stored by content in the image store's layer directory: two snapshots of
/// the same files share one copy (each snapshot's id a link to it), the copy stays while one
/// of them does and goes with the last; a layer saved before this (a plain directory, as an
/// older server left it) is moved into the store when the server starts, and a restart keeps
/// every snapshot readable.
#[test]
fn identical_snapshots_share_one_stored_layer_across_restarts() {
    let _serial = one_at_a_time();
    let test = "identical_snapshots_share_one_stored_layer_across_restarts";
    let Some(mut s) = Server::start(test) else { return };
    let a = s.create("base");
    assert!(s.run(&a, "echo shared > /home/user/s.txt").1);
    let none = s.consistent("nothing saved");
    let one = s.snapshot(&a);
    let after_one = s.consistent("first snapshot");
    let first = new_layer(&none, &after_one);
    let two = s.snapshot(&a);
    let second = new_layer(&after_one, &s.consistent("second snapshot"));
    let (l1, l2) = (link_of(&s, &first), link_of(&s, &second));
    assert!(l1.is_some(), "{first} is a link into the image store");
    assert_eq!(l1, l2, "two snapshots of the same files: one stored copy");
    let stored = std::fs::canonicalize(s.layers_dir().join(&first)).unwrap();
    assert!(stored.starts_with(s.data.path().join("images/layers")), "{stored:?}");
    s.kill(&a);

    // A restart keeps both; each starts a sandbox with the file.
    s.kill9();
    s.spawn(&[]);
    for snap in [&one, &two] {
        let b = s.create(snap);
        assert_eq!(s.run(&b, "cat /home/user/s.txt").0, "shared\n", "{snap}");
        s.kill(&b);
    }
    // One deleted: the copy stays for the other.
    let r = s.api("DELETE", &format!("/templates/{one}"), Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(stored.is_dir(), "the copy went while snapshot {two} still uses it");

    // An older server's layout: the layer as a plain directory. Moved back into the store
    // (the same copy, by content) at the next start.
    s.kill9();
    let own = s.layers_dir().join(&second);
    std::fs::remove_file(&own).unwrap();
    let cp = std::process::Command::new("cp").args(["-a", "--"]).arg(&stored).arg(&own).status();
    assert!(cp.unwrap().success());
    s.spawn(&[]);
    assert_eq!(link_of(&s, &second), l1, "migrated to the same stored copy");
    let c = s.create(&two);
    assert_eq!(s.run(&c, "cat /home/user/s.txt").0, "shared\n");
    s.kill(&c);

    // The last one deleted: the copy goes.
    let r = s.api("DELETE", &format!("/templates/{two}"), Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!stored.exists(), "the stored copy outlived its last snapshot");
    assert!(s.layer_dirs().is_empty(), "{:?}", s.layer_dirs());
}
