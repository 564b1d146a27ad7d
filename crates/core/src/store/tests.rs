//! The store's tests: each opens its own database (in memory or in a temporary directory).

use super::schema::*;
use super::*;
use serde_json::json;
use std::collections::HashSet;

pub(super) fn sandbox(id: &str, key_id: &str, created_at: i64) -> SandboxRecord {
    SandboxRecord {
        id: id.to_owned(),
        key_id: key_id.to_owned(),
        template: "base".to_owned(),
        alias: None,
        access_token: format!("tok-{id}"),
        created_at,
        end_at: created_at + 300_000,
        cpu_count: 2,
        memory_mb: 512,
        disk_mb: 1024,
        metadata: BTreeMap::new(),
        env: BTreeMap::new(),
        state: SandboxState::Running,
        agent_pid: None,
        cgroup_slot: None,
        tier: "jail".into(),
        lifecycle: Lifecycle::default(),
    }
}

#[test]
fn key_format_and_only_hash_stored() {
    let store = Store::open_in_memory().unwrap();
    let (id, key) = store.create_key("ci-runner.1").unwrap();
    assert_eq!(key.len(), 44);
    assert!(key.starts_with("e2b_"));
    assert!(key[4..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));

    let conn = store.conn();
    let (stored_hash, name): (String, String) = conn
        .query_row("SELECT key_hash, name FROM api_keys WHERE id = ?1", [&id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(stored_hash, hash_key(&key));
    assert_eq!(name, "ci-runner.1");
    // The plaintext (or its random part) must appear in no column of any row.
    let leaked: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM api_keys WHERE id LIKE ?1 OR name LIKE ?1 \
             OR key_hash LIKE ?1",
            [format!("%{}%", &key[4..])],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leaked, 0);
}

#[test]
fn verify_good_and_bad_keys_and_revoke() {
    let store = Store::open_in_memory().unwrap();
    let (id, key) = store.create_key("alice").unwrap();
    let (_, other) = store.create_key("bob").unwrap();
    assert_ne!(key, other);

    let info = store.verify_key(&key).unwrap().unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.name, "alice");
    assert!(store.verify_key("e2b_0000000000000000000000000000000000000000").unwrap().is_none());
    assert!(store.verify_key("").unwrap().is_none());

    let names: Vec<String> = store.list_keys().unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"alice".to_owned()) && names.contains(&"bob".to_owned()));

    store.revoke_key(&id).unwrap();
    assert!(store.verify_key(&key).unwrap().is_none());
    assert!(store.verify_key(&other).unwrap().is_some());
    assert!(matches!(store.revoke_key(&id), Err(StoreError::NotFound(_))));
}

#[test]
fn operator_flag_and_limits_are_stored_with_the_key() {
    let store = Store::open_in_memory().unwrap();
    let (plain_id, plain) = store.create_key("tenant").unwrap();
    let own = KeyLimits { max_sandboxes: Some(3), create_rate: Some(0.5), ..Default::default() };
    let (_, ops) = store.create_key_with("ops", true, &own).unwrap();
    let t = store.verify_key(&plain).unwrap().unwrap();
    assert!(!t.operator);
    assert_eq!(t.limits, KeyLimits::default());
    let o = store.verify_key(&ops).unwrap().unwrap();
    assert!(o.operator);
    assert_eq!(o.limits, own);
    let lowered = KeyLimits { max_sandboxes: Some(1), ..Default::default() };
    store.set_key_limits(&plain_id, &lowered).unwrap();
    assert_eq!(store.get_key(&plain_id).unwrap().unwrap().limits, lowered);
    assert!(matches!(store.set_key_limits("nope", &lowered), Err(StoreError::NotFound(_))));
    assert!(store.get_key("nope").unwrap().is_none());
}

#[test]
fn counts_a_keys_sandboxes_and_snapshots() {
    let store = Store::open_in_memory().unwrap();
    for (id, state) in
        [("a", SandboxState::Running), ("b", SandboxState::Paused), ("c", SandboxState::Killed)]
    {
        let mut r = sandbox(id, "k1", 1);
        r.state = state;
        store.insert_sandbox(&r).unwrap();
    }
    store.insert_sandbox(&sandbox("d", "k2", 1)).unwrap();
    assert_eq!(store.count_sandboxes_of("k1").unwrap(), 2);
    assert_eq!(store.count_sandboxes_of("k2").unwrap(), 1);
    assert_eq!(store.count_snapshots_of("k1").unwrap(), 0);
}

#[test]
fn invalid_key_names_rejected() {
    let store = Store::open_in_memory().unwrap();
    let long = "a".repeat(65);
    for bad in ["", "has space", "slash/", "ünïcode", "semi;colon", long.as_str()] {
        match store.create_key(bad) {
            Err(StoreError::InvalidName(msg)) => assert!(msg.contains("1 to 64")),
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    store.create_key(&"a".repeat(64)).unwrap();
    store.create_key("A-z_0.9").unwrap();
    assert_eq!(store.list_keys().unwrap().len(), 2);
}

#[test]
fn sandbox_round_trip_and_updates() {
    let store = Store::open_in_memory().unwrap();
    let mut rec = sandbox("sbx1", "k1", 1_000);
    rec.alias = Some("my-template".to_owned());
    rec.metadata.insert("team".to_owned(), "infra".to_owned());
    rec.metadata.insert("weird \"key\"".to_owned(), "ü\n".to_owned());
    rec.env.insert("PATH".to_owned(), "/usr/bin".to_owned());
    rec.agent_pid = Some(4242);
    rec.cgroup_slot = Some(7);
    store.insert_sandbox(&rec).unwrap();
    assert_eq!(store.get_sandbox("sbx1").unwrap(), Some(rec.clone()));
    assert_eq!(store.get_sandbox("nope").unwrap(), None);
    assert!(store.insert_sandbox(&rec).is_err(), "duplicate id must fail");

    store.set_end_at("sbx1", 99_999).unwrap();
    store.set_agent("sbx1", None, Some(3)).unwrap();
    let got = store.get_sandbox("sbx1").unwrap().unwrap();
    assert_eq!(got.end_at, 99_999);
    assert_eq!(got.agent_pid, None);
    assert_eq!(got.cgroup_slot, Some(3));

    assert!(matches!(store.set_end_at("nope", 1), Err(StoreError::NotFound(_))));
    assert!(matches!(store.set_state("nope", SandboxState::Paused), Err(StoreError::NotFound(_))));
    assert!(matches!(store.set_agent("nope", None, None), Err(StoreError::NotFound(_))));

    store.delete_sandbox("sbx1").unwrap();
    assert_eq!(store.get_sandbox("sbx1").unwrap(), None);
    assert!(matches!(store.delete_sandbox("sbx1"), Err(StoreError::NotFound(_))));
}

#[test]
fn list_is_isolated_per_key() {
    let store = Store::open_in_memory().unwrap();
    store.insert_sandbox(&sandbox("a1", "ka", 1)).unwrap();
    store.insert_sandbox(&sandbox("a2", "ka", 2)).unwrap();
    store.insert_sandbox(&sandbox("b1", "kb", 3)).unwrap();

    let (a, tok) = store.list_sandboxes("ka", &ListQuery::default()).unwrap();
    assert_eq!(a.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a1", "a2"]);
    assert!(tok.is_none());
    let (b, _) = store.list_sandboxes("kb", &ListQuery::default()).unwrap();
    assert_eq!(b.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b1"]);
    let (none, _) = store.list_sandboxes("kc", &ListQuery::default()).unwrap();
    assert!(none.is_empty());

    // A cursor pointing into another key's range still only yields the caller's rows.
    let q = ListQuery { next_token: Some(encode_token(0, "a")), ..ListQuery::default() };
    let (b, _) = store.list_sandboxes("kb", &q).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].key_id, "kb");
}

#[test]
fn metadata_and_state_filters() {
    let store = Store::open_in_memory().unwrap();
    for (i, team) in ["infra", "web", "infra", "infra"].iter().enumerate() {
        let mut rec = sandbox(&format!("s{i}"), "k", i as i64);
        rec.metadata.insert("team".to_owned(), (*team).to_owned());
        rec.metadata.insert("n".to_owned(), i.to_string());
        store.insert_sandbox(&rec).unwrap();
    }
    store.set_state("s3", SandboxState::Paused).unwrap();

    let ids = |q: &ListQuery| -> Vec<String> {
        store.list_sandboxes("k", q).unwrap().0.into_iter().map(|r| r.id).collect()
    };
    let mut q = ListQuery::default();
    q.metadata.insert("team".to_owned(), "infra".to_owned());
    assert_eq!(ids(&q), ["s0", "s2", "s3"]);
    q.metadata.insert("n".to_owned(), "2".to_owned());
    assert_eq!(ids(&q), ["s2"]);
    q.metadata.insert("missing".to_owned(), "x".to_owned());
    assert!(ids(&q).is_empty());

    let mut q = ListQuery { state: Some(vec![SandboxState::Paused]), ..Default::default() };
    assert_eq!(ids(&q), ["s3"]);
    q.state = Some(vec![SandboxState::Running, SandboxState::Paused]);
    assert_eq!(ids(&q).len(), 4);
    q.state = Some(vec![]);
    assert_eq!(ids(&q).len(), 4);

    // Filtered pagination: pages stay full and the last one carries no token.
    let mut q = ListQuery { limit: 2, ..Default::default() };
    q.metadata.insert("team".to_owned(), "infra".to_owned());
    let (p1, t1) = store.list_sandboxes("k", &q).unwrap();
    assert_eq!(p1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s0", "s2"]);
    q.next_token = t1;
    let (p2, t2) = store.list_sandboxes("k", &q).unwrap();
    assert_eq!(p2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["s3"]);
    assert!(t2.is_none());
}

#[test]
fn pagination_three_pages() {
    let store = Store::open_in_memory().unwrap();
    // Two rows share created_at so the id tiebreak is exercised.
    for (id, ts) in [("e", 30), ("a", 10), ("c", 20), ("b", 20), ("d", 25)] {
        store.insert_sandbox(&sandbox(id, "k", ts)).unwrap();
    }
    store.insert_sandbox(&sandbox("other", "k2", 15)).unwrap();

    let mut q = ListQuery { limit: 2, ..Default::default() };
    let mut pages = Vec::new();
    loop {
        let (page, token) = store.list_sandboxes("k", &q).unwrap();
        pages.push(page.into_iter().map(|r| r.id).collect::<Vec<_>>());
        match token {
            Some(t) => q.next_token = Some(t),
            None => break,
        }
        assert!(pages.len() <= 3, "too many pages");
    }
    assert_eq!(pages, vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
    let all: Vec<&String> = pages.iter().flatten().collect();
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 5, "duplicates across pages");

    // 5 rows, limit 4: the token is issued only because a fifth row exists.
    let q = ListQuery { limit: 4, ..Default::default() };
    let (p, t) = store.list_sandboxes("k", &q).unwrap();
    assert_eq!(p.len(), 4);
    let (p, t) = store.list_sandboxes("k", &ListQuery { next_token: t, ..q }).unwrap();
    assert_eq!(p.len(), 1);
    assert!(t.is_none());
}

#[test]
fn bad_tokens_and_limits_rejected() {
    let store = Store::open_in_memory().unwrap();
    store.insert_sandbox(&sandbox("a", "k", 1)).unwrap();
    let bad = [
        "zz".to_owned(),
        "abc".to_owned(),
        hex::encode("no-colon"),
        hex::encode("notanumber:id"),
        hex::encode("12:"),
        hex::encode([0xff, 0xfe, b':', b'a']),
    ];
    for token in bad {
        let q = ListQuery { next_token: Some(token.clone()), ..Default::default() };
        assert!(
            matches!(store.list_sandboxes("k", &q), Err(StoreError::InvalidToken)),
            "{token:?} accepted"
        );
    }
    for limit in [0, 1001] {
        let q = ListQuery { limit, ..Default::default() };
        assert!(matches!(store.list_sandboxes("k", &q), Err(StoreError::InvalidLimit(_))));
    }
    let q = ListQuery { limit: 1000, ..Default::default() };
    assert_eq!(store.list_sandboxes("k", &q).unwrap().0.len(), 1);
}

#[test]
fn set_state_and_live_sandboxes() {
    let store = Store::open_in_memory().unwrap();
    store.insert_sandbox(&sandbox("a", "k1", 1)).unwrap();
    store.insert_sandbox(&sandbox("b", "k2", 2)).unwrap();
    store.insert_sandbox(&sandbox("c", "k1", 3)).unwrap();
    store.set_state("b", SandboxState::Paused).unwrap();
    store.set_state("c", SandboxState::Killed).unwrap();
    assert_eq!(store.get_sandbox("c").unwrap().unwrap().state, SandboxState::Killed);

    let live = store.live_sandboxes().unwrap();
    let ids: Vec<(&str, SandboxState)> = live.iter().map(|r| (r.id.as_str(), r.state)).collect();
    assert_eq!(ids, [("a", SandboxState::Running), ("b", SandboxState::Paused)]);

    // State is stored as readable text, not an integer.
    let raw: String = store
        .conn()
        .query_row("SELECT state FROM sandboxes WHERE id = 'b'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(raw, "paused");
    assert_eq!(serde_json::to_value(SandboxState::Paused).unwrap(), json!("paused"));
}

#[test]
fn events_append_in_order_and_cascade() {
    let store = Store::open_in_memory().unwrap();
    store.insert_sandbox(&sandbox("a", "k", 1)).unwrap();
    store.insert_sandbox(&sandbox("b", "k", 2)).unwrap();
    store.record_event("a", "created", &json!({"template": "base"})).unwrap();
    store.record_event("b", "created", &json!(null)).unwrap();
    store.record_event("a", "paused", &json!({"reason": "timeout", "n": [1, 2]})).unwrap();

    let ev = store.events_for("a").unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].1, "created");
    assert_eq!(ev[0].2, json!({"template": "base"}));
    assert_eq!(ev[1].1, "paused");
    assert_eq!(ev[1].2, json!({"reason": "timeout", "n": [1, 2]}));
    assert!(ev[0].0 <= ev[1].0 && ev[0].0 > 1_600_000_000_000, "timestamps are unix ms");
    assert!(store.events_for("nope").unwrap().is_empty());

    assert!(matches!(store.record_event("nope", "x", &json!({})), Err(StoreError::NotFound(_))));
    store.delete_sandbox("a").unwrap();
    assert!(store.events_for("a").unwrap().is_empty());
    assert_eq!(store.events_for("b").unwrap().len(), 1);
}

#[test]
fn on_disk_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // A parent directory that does not exist yet: open must create it.
    let path = dir.path().join("state").join("ringfence.db");
    let mut rec = sandbox("persist", "k", 5);
    rec.metadata.insert("x".to_owned(), "y".to_owned());
    let (id, key) = {
        let store = Store::open(&path).unwrap();
        let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let created = store.create_key("disk").unwrap();
        store.insert_sandbox(&rec).unwrap();
        store.record_event("persist", "created", &json!({"ok": true})).unwrap();
        created
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(store.verify_key(&key).unwrap().map(|k| k.id), Some(id));
    assert_eq!(store.get_sandbox("persist").unwrap(), Some(rec));
    assert_eq!(store.events_for("persist").unwrap().len(), 1);
    let version: i64 =
        store.conn().query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let rows: i64 =
        store.conn().query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 1);
}

fn audit(action: &str, sandbox: &str, key: &str, ts: i64) -> AuditRecord {
    let mut r = AuditRecord::new(action, ts);
    r.sandbox_id = Some(sandbox.into());
    r.user_id = Some(key.into());
    r
}

#[test]
fn audit_records_filter_and_page() {
    let store = Store::open_in_memory().unwrap();
    let mut recs = vec![
        audit("sandbox.create", "a", "k1", 1000),
        audit("exec.command", "a", "k1", 2000),
        audit("alert.memory", "a", "k1", 3000),
        audit("sandbox.create", "b", "k2", 4000),
        audit("alert.cpu", "a", "k1", 5000),
    ];
    recs[1].code_hash = Some("ab".into());
    recs[1].security_events.push(SecurityEvent {
        kind: "seccomp".into(),
        syscall: "mount".into(),
        pid: Some(2),
        host_pid: Some(99),
        comm: Some("python3".into()),
        count: 1,
        timestamp: "t".into(),
    });
    store.insert_audits(&mut recs[..2]).unwrap();
    for r in &mut recs[2..] {
        store.insert_audit(r).unwrap();
    }
    assert_eq!(recs.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery::default();
        f(&mut q);
        store.query_audit(&q).unwrap()
    };
    let (all, next) = q(&|_| {});
    assert_eq!(all, recs, "records round-trip whole");
    assert_eq!(next, None);
    assert_eq!(q(&|q| q.key_id = Some("k1".into())).0.len(), 4);
    assert_eq!(q(&|q| q.sandbox_id = Some("b".into())).0.len(), 1);
    assert_eq!(q(&|q| q.action = Some("alert.*".into())).0.len(), 2);
    assert_eq!(q(&|q| q.action = Some("alert.".into())).0.len(), 0, "exact unless *");
    assert_eq!(q(&|q| q.action = Some("sandbox.create".into())).0.len(), 2);
    let (w, _) = q(&|q| {
        q.since_ms = Some(2000);
        q.until_ms = Some(4000);
    });
    assert_eq!(w.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3], "since inclusive, until not");
    // Pages of two: 1-2, 3-4, 5.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = q(&|q| {
            q.limit = 2;
            q.after = after.clone();
        });
        seen.extend(page.iter().map(|r| r.id));
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    let bad = AuditQuery { after: Some("x".into()), ..AuditQuery::default() };
    assert!(matches!(store.query_audit(&bad), Err(StoreError::InvalidToken)));
    let bad = AuditQuery { limit: 0, ..AuditQuery::default() };
    assert!(matches!(store.query_audit(&bad), Err(StoreError::InvalidLimit(0))));
}

#[test]
fn audit_writes_leave_the_connection_fully_synchronous() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    store.insert_audit(&mut audit("exec.command", "s", "k", 1)).unwrap();
    let sync: i64 = store.conn().query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!(sync, 2, "synchronous=FULL again");
}

#[test]
fn counts_sandboxes_by_state() {
    let store = Store::open_in_memory().unwrap();
    for (id, state) in
        [("a", SandboxState::Running), ("b", SandboxState::Paused), ("c", SandboxState::Killed)]
    {
        let mut r = sandbox(id, "k", 1);
        r.state = state;
        store.insert_sandbox(&r).unwrap();
    }
    let n = store.count_by_state().unwrap();
    assert_eq!(n.get(&SandboxState::Running), Some(&1));
    assert_eq!(n.get(&SandboxState::Paused), Some(&1));
    assert_eq!(n.get(&SandboxState::Killed), None);
}

#[test]
fn create_and_kill_commit_with_their_audit_records() {
    let store = Store::open_in_memory().unwrap();
    let mut rec = audit("sandbox.create", "s", "k", 10);
    store.insert_sandbox_audited(&sandbox("s", "k", 1), &json!({}), Some(&mut rec)).unwrap();
    let mut kill = audit("sandbox.kill", "s", "k", 20);
    store.kill_sandbox_audited("s", &json!({"reason": "x"}), Some(&mut kill)).unwrap();
    assert_eq!(store.get_sandbox("s").unwrap().unwrap().state, SandboxState::Killed);
    let kinds: Vec<String> = store.events_for("s").unwrap().into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, ["created", "killed"]);
    assert_eq!(store.query_audit(&AuditQuery::default()).unwrap().0, vec![rec, kill]);
    // A duplicate sandbox fails as a whole: no second audit record.
    let mut again = audit("sandbox.create", "s", "k", 30);
    assert!(
        store.insert_sandbox_audited(&sandbox("s", "k", 1), &json!({}), Some(&mut again)).is_err()
    );
    assert_eq!(store.query_audit(&AuditQuery::default()).unwrap().0.len(), 2);
}

fn on_layers(id: &str, layers: &[&str]) -> SandboxRecord {
    let mut r = sandbox(id, "k", 1);
    r.lifecycle.layers = layers.iter().map(|l| l.to_string()).collect();
    r
}

fn snap(id: &str, layers: &[&str]) -> SnapshotRecord {
    SnapshotRecord {
        id: id.into(),
        name: id.into(),
        key_id: "k".into(),
        sandbox_id: "a".into(),
        template: "base".into(),
        layers: layers.iter().map(|l| l.to_string()).collect(),
        created_at: 1,
    }
}

fn counts(store: &Store) -> Vec<(String, i64)> {
    store.layers().unwrap().into_iter().collect()
}

fn n(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(l, c)| (l.to_string(), *c)).collect()
}

/// Drains the removal queue the way the manager does, returning what was in it.
fn drain(store: &Store) -> Vec<String> {
    let ids = store.dropped_layers().unwrap();
    store.forget_dropped(&ids).unwrap();
    ids
}

#[test]
fn layer_references_follow_pause_resume_snapshots_forks_and_kills() {
    let store = Store::open_in_memory().unwrap();
    store.insert_sandbox(&sandbox("a", "k", 1)).unwrap();
    // A filesystem pause commits its layer with the sandbox's reference.
    let mut lc = Lifecycle { layers: vec!["l1".into()], ..Default::default() };
    store.pause_sandbox("a", Some("l1"), &lc, false).unwrap();
    assert_eq!(counts(&store), n(&[("l1", 1)]));
    assert_eq!(store.layer_users("l1").unwrap(), [("sandbox".into(), "a".into())]);
    assert_eq!(store.events_for("a").unwrap().last().unwrap().1, "paused");
    // Resumed (the same layers), then paused again on top: the lower layer is not freed
    // halfway through the update.
    let mut rec = on_layers("a", &["l1"]);
    store.restarted(&rec).unwrap();
    assert_eq!(counts(&store), n(&[("l1", 1)]));
    lc.layers = vec!["l2".into(), "l1".into()];
    store.pause_sandbox("a", Some("l2"), &lc, false).unwrap();
    rec.lifecycle = lc;
    store.restarted(&rec).unwrap();
    assert_eq!(counts(&store), n(&[("l1", 1), ("l2", 1)]));
    assert!(drain(&store).is_empty());

    // A snapshot of it, and a sandbox made from the snapshot.
    store.insert_snapshot_with_layer(&snap("s1", &["l3", "l2", "l1"]), "l3").unwrap();
    store.insert_sandbox(&on_layers("b", &["l3", "l2", "l1"])).unwrap();
    assert_eq!(counts(&store), n(&[("l1", 3), ("l2", 3), ("l3", 2)]));

    // A fork: held by the operation until its children hold it.
    store.insert_pending_layer("l4", "fork-l4").unwrap();
    store.insert_sandbox(&on_layers("c1", &["l4", "l2", "l1"])).unwrap();
    store.insert_sandbox(&on_layers("c2", &["l4", "l2", "l1"])).unwrap();
    store.release_pending("fork-l4").unwrap();
    assert_eq!(counts(&store)[3], ("l4".into(), 2));
    assert!(drain(&store).is_empty());

    // The resumed sandbox killed (API kill or timeout): its layers stay, still used.
    store.kill_sandbox_audited("a", &json!({}), None).unwrap();
    assert!(drain(&store).is_empty());
    assert_eq!(counts(&store), n(&[("l1", 4), ("l2", 4), ("l3", 2), ("l4", 2)]));
    // The snapshot deleted: the sandbox made from it still holds its layer.
    assert!(store.delete_snapshot("s1").unwrap());
    assert!(drain(&store).is_empty());
    assert_eq!(store.layer_users("l3").unwrap(), [("sandbox".into(), "b".into())]);
    store.kill_sandbox_audited("b", &json!({}), None).unwrap();
    assert_eq!(drain(&store), ["l3"]);
    // The fork's children end one by one (a kill of a paused one sets the state alone).
    store.kill_sandbox_audited("c1", &json!({}), None).unwrap();
    assert!(drain(&store).is_empty());
    store.set_state("c2", SandboxState::Killed).unwrap();
    assert_eq!(drain(&store), ["l1", "l2", "l4"]);
    assert!(counts(&store).is_empty());
    // Killing again, or forgetting again, changes nothing.
    store.set_state("c2", SandboxState::Killed).unwrap();
    assert!(drain(&store).is_empty());
}

#[test]
fn a_layer_cannot_be_used_unless_committed_and_commits_are_whole() {
    let store = Store::open_in_memory().unwrap();
    // A sandbox on a layer that was never committed (or is gone) is refused, whole.
    assert!(matches!(store.insert_sandbox(&on_layers("a", &["nope"])), Err(StoreError::LayerGone)));
    assert_eq!(store.get_sandbox("a").unwrap(), None);
    assert!(store.insert_snapshot(&snap("s", &["nope"])).is_err());
    assert!(store.list_snapshots("k", None).unwrap().is_empty());
    // A pause of a sandbox that does not exist leaves no layer row behind.
    let lc = Lifecycle { layers: vec!["l1".into()], ..Default::default() };
    assert!(store.pause_sandbox("ghost", Some("l1"), &lc, false).is_err());
    assert!(counts(&store).is_empty());
    // A snapshot whose name is taken: neither the snapshot nor its layer.
    store.insert_sandbox(&sandbox("a", "k", 1)).unwrap();
    store.insert_snapshot_with_layer(&snap("s1", &["l1"]), "l1").unwrap();
    let mut dup = snap("s2", &["l2"]);
    dup.name = "s1".into();
    assert!(store.insert_snapshot_with_layer(&dup, "l2").is_err());
    assert_eq!(counts(&store), n(&[("l1", 1)]));
    // A fork's hold does not survive the process: at start it goes, and its layer with it.
    store.insert_pending_layer("l9", "fork-l9").unwrap();
    store.reset_pending_layers().unwrap();
    assert_eq!(counts(&store), n(&[("l1", 1)]));
    assert_eq!(drain(&store), ["l9"]);
    // A sandbox row deleted outright takes its references with it.
    store.insert_sandbox(&on_layers("b", &["l1"])).unwrap();
    store.delete_sandbox("b").unwrap();
    assert_eq!(counts(&store), n(&[("l1", 1)]));
}

#[test]
fn version_three_database_gains_layer_references() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute_batch(SCHEMA_V2).unwrap();
        conn.execute_batch(SCHEMA_V3).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version (version) VALUES (3);",
        )
        .unwrap();
        // Rows are written with this build's insert, which names the tier column (v6):
        // it is there only while they are written.
        conn.execute_batch("ALTER TABLE sandboxes ADD COLUMN tier TEXT").unwrap();
        let store = Store { conn: Mutex::new(conn) };
        store.insert_sandbox(&on_layers("live", &["l1", "l0"])).unwrap();
        let mut dead = on_layers("dead", &["l7"]);
        dead.state = SandboxState::Killed;
        store.insert_sandbox(&dead).unwrap();
        store.insert_snapshot(&snap("s", &["l2", "l0"])).unwrap();
        store.conn().execute_batch("ALTER TABLE sandboxes DROP COLUMN tier").unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(counts(&store), n(&[("l0", 2), ("l1", 1), ("l2", 1)]));
    store.set_state("live", SandboxState::Killed).unwrap();
    assert_eq!(drain(&store), ["l1"]);
}

#[test]
fn version_one_database_gains_the_audit_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version (version) VALUES (1);",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let mut r = audit("sandbox.create", "s", "k", 1);
    store.insert_audit(&mut r).unwrap();
    assert_eq!(store.query_audit(&AuditQuery::default()).unwrap().0, vec![r]);
}

#[test]
fn version_five_database_gains_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let key = {
        let conn = Connection::open(&path).unwrap();
        for v in [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5] {
            conn.execute_batch(v).unwrap();
        }
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version (version) VALUES (5);
             INSERT INTO api_keys (id, name, key_hash, created_at) VALUES ('k', 'old', 'h', 1);
             INSERT INTO sandboxes (id, key_id, template, access_token, created_at, end_at, \
               cpu_count, memory_mb, disk_mb, metadata, env, state, lifecycle) \
               VALUES ('s', 'k', 'base', 't', 1, 2, 1, 0, 0, '{}', '{}', 'running', '{}');",
        )
        .unwrap();
        "k"
    };
    let store = Store::open(&path).unwrap();
    // Every sandbox before tiers ran in the jail; every old key may use every tier.
    assert_eq!(store.get_sandbox("s").unwrap().unwrap().tier, "jail");
    assert_eq!(store.get_key(key).unwrap().unwrap().tiers, None);
    // New rows keep what they are given.
    let mut rec = sandbox("g", "k", 3);
    rec.tier = "gvisor".into();
    store.insert_sandbox(&rec).unwrap();
    assert_eq!(store.get_sandbox("g").unwrap().unwrap().tier, "gvisor");
    let only = vec!["jail".to_string()];
    let (id, plain) =
        store.create_key_for("tiered", false, &KeyLimits::default(), Some(&only)).unwrap();
    assert_eq!(store.get_key(&id).unwrap().unwrap().tiers, Some(only.clone()));
    assert_eq!(store.verify_key(&plain).unwrap().unwrap().tiers, Some(only));
}

#[test]
fn newer_schema_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(Store::open(&path).unwrap());
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", []).unwrap();
    }
    assert!(matches!(Store::open(&path), Err(StoreError::UnsupportedSchema(99))));
}
