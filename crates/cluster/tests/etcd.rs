//! Ownership, loss and placement against a real etcd (Debian's `etcd-server`), started here on
//! free loopback ports. SKIPPED (printed) where `etcd` is not installed.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_cluster::{Capacity, Cluster, ClusterConfig, ClusterError, SandboxRecord};
use ringfence_test_support::{ChildGuard, free_port, wait_for_tcp};

struct Etcd {
    _child: ChildGuard,
    url: String,
    _dir: tempfile::TempDir,
}

fn etcd() -> anyhow::Result<Option<Etcd>> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("SKIPPED: etcd not installed (scripts/setup.sh installs etcd-server)");
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .args(["--data-dir", &dir.path().join("data").to_string_lossy()])
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let e = Etcd { _child: ChildGuard(child), url, _dir: dir };
    if wait_for_tcp(e.url.trim_start_matches("http://"), Duration::from_secs(20)) {
        return Ok(Some(e));
    }
    anyhow::bail!("etcd did not start")
}

fn cfg(e: &Etcd, id: &str, prefix: &str) -> ClusterConfig {
    ClusterConfig {
        endpoints: vec![e.url.clone()],
        node_id: id.into(),
        advertise: format!("{id}.invalid:1"),
        ttl: Duration::from_secs(2),
        prefix: prefix.into(),
        slots: 10,
        shared_snapshots: None,
    }
}

fn cap(running: u64) -> Capacity {
    Capacity {
        mem_available: 1 << 30,
        cpus: 2,
        running,
        templates: vec!["base".into()],
        tiers: vec!["jail".into()],
    }
}

fn rec(id: &str) -> SandboxRecord {
    SandboxRecord {
        id: id.into(),
        owner: String::new(),
        tenant: "k".into(),
        state: "running".into(),
        template: "base".into(),
        tier: "jail".into(),
        end_at: 0,
        lost_reason: None,
        counted: false,
        snapshot: None,
    }
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if f() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what}: not within {secs} s")
}

/// Two nodes race to claim the same 40 sandboxes: each has exactly one owner, the loser is
/// told who owns it, and the loser's reconcile hands its copies back to be killed.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_never_own_one_sandbox() -> anyhow::Result<()> {
    let Some(e) = etcd()? else { return Ok(()) };
    let a = Cluster::join(cfg(&e, "a", "/t1"), cap(0)).await?;
    let b = Cluster::join(cfg(&e, "b", "/t1"), cap(0)).await?;
    let ids: Vec<String> = (0..40).map(|i| format!("sb{i}")).collect();
    let mut tasks = Vec::new();
    for id in &ids {
        for node in [a.clone(), b.clone()] {
            let r = rec(id);
            tasks.push(tokio::spawn(
                async move { (node.node_id().to_string(), node.claim(&r).await) },
            ));
        }
    }
    let mut won = std::collections::HashMap::<String, Vec<String>>::new();
    for (t, id) in tasks.into_iter().zip(ids.iter().flat_map(|i| [i.clone(), i.clone()])) {
        let (node, res) = t.await?;
        match res {
            Ok(_) => won.entry(id).or_default().push(node),
            Err(ClusterError::OwnedElsewhere { owner, .. }) => assert_ne!(owner, node),
            Err(other) => return Err(other.into()),
        }
    }
    for id in &ids {
        assert_eq!(won.get(id).map(Vec::len), Some(1), "{id}: {:?}", won.get(id));
    }
    // b holds local copies of everything; reconcile names a's as foreign.
    let local: Vec<SandboxRecord> = ids.iter().map(|i| rec(i)).collect();
    let out = b.reconcile(&local, &b.owned_ids()).await?;
    let foreign: HashSet<&String> = out.foreign.iter().collect();
    for id in &ids {
        let owner = &won[id][0];
        assert_eq!(foreign.contains(id), owner == "a", "{id} owned by {owner}");
    }
    Ok(())
}

/// A node that stops renewing: the leader marks its sandboxes lost within the TTL (plus the
/// sweep), and the node, back with the same id, takes them back.
#[tokio::test(flavor = "multi_thread")]
async fn lost_then_adopted() -> anyhow::Result<()> {
    let Some(e) = etcd()? else { return Ok(()) };
    let a = Cluster::join(cfg(&e, "a", "/t2"), cap(0)).await?;
    let b = Cluster::join(cfg(&e, "b", "/t2"), cap(0)).await?;
    b.claim(&rec("x")).await?;
    until("a sees b's record", 5, || a.records().iter().any(|r| r.id == "x")).await?;
    // b goes away: its tasks stop and its lease goes (as at expiry, only sooner); its
    // sandbox record stays, owned by b.
    b.leave().await;
    drop(b);
    let took = until("x lost", 8, || {
        a.records().iter().any(|r| r.id == "x" && r.state == "lost" && r.lost_reason.is_some())
    })
    .await?;
    eprintln!("lost after {took:?}");
    let b2 = Cluster::join(cfg(&e, "b", "/t2"), cap(1)).await?;
    let out = b2.reconcile(&[rec("x")], &b2.owned_ids()).await?;
    assert_eq!(out.restored + out.claimed, 1, "{out:?}");
    until("x running again", 5, || {
        a.records().iter().any(|r| r.id == "x" && r.state == "running" && r.owner == "b")
    })
    .await?;
    Ok(())
}

/// Placement: only nodes with the template and tier and a free slot; the emptier of two.
#[tokio::test(flavor = "multi_thread")]
async fn placement_by_free_capacity() -> anyhow::Result<()> {
    let Some(e) = etcd()? else { return Ok(()) };
    let a = Cluster::join(cfg(&e, "a", "/t3"), cap(9)).await?;
    let _b = Cluster::join(cfg(&e, "b", "/t3"), cap(0)).await?;
    let mut full = cfg(&e, "c", "/t3");
    full.slots = 10;
    let _c = Cluster::join(full, cap(10)).await?;
    until("three nodes", 5, || a.nodes().len() == 3).await?;
    assert!(a.place("other-template", "jail", false).is_none());
    assert!(a.place("base", "microvm", false).is_none());
    // A template any node can fetch (its metadata replicated) places on nodes without it too,
    // but still never on a full one.
    let fetch = a.place("other-template", "jail", true).ok_or_else(|| anyhow::anyhow!("none"))?;
    assert_ne!(fetch.id, "c");
    a.publish_template(&ringfence_cluster::TemplateMeta {
        name: "t:latest".into(),
        origin: String::new(),
        record: serde_json::json!({"name": "t:latest"}),
        content: Default::default(),
    })
    .await?;
    let got = _b.template("t:latest").await?.ok_or_else(|| anyhow::anyhow!("not replicated"))?;
    assert_eq!(got.origin, "a");
    // Another node cannot take the name over; every node shares one signing secret.
    assert!(!_b.publish_template(&got).await?);
    assert_eq!(a.secret(), _b.secret());
    assert_eq!(a.secret().len(), 64);
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for _ in 0..8 {
        let n = a.place("base", "jail", false).ok_or_else(|| anyhow::anyhow!("no node"))?;
        *counts.entry(n.id).or_default() += 1;
    }
    // c is full; a has one slot, b ten: b takes most, and never c.
    assert_eq!(counts.get("c"), None, "{counts:?}");
    assert!(counts.get("b").copied().unwrap_or(0) >= 6, "{counts:?}");
    Ok(())
}

/// Cluster-wide quota: reservations through two nodes at once never pass the limit; the
/// leader sweeps an expired record of a lost node and its unit goes back with it.
#[tokio::test(flavor = "multi_thread")]
async fn quota_holds_across_nodes_and_the_leader_sweeps_expired_records() -> anyhow::Result<()> {
    let Some(e) = etcd()? else { return Ok(()) };
    let a = Cluster::join(cfg(&e, "a", "/t4"), cap(0)).await?;
    let b = Cluster::join(cfg(&e, "b", "/t4"), cap(0)).await?;
    let mut tries = Vec::new();
    for i in 0..10 {
        let n = if i % 2 == 0 { a.clone() } else { b.clone() };
        tries.push(tokio::spawn(async move { n.reserve("k", 4).await }));
    }
    let mut won = 0;
    for t in tries {
        if t.await??.is_ok() {
            won += 1;
        }
    }
    assert_eq!(won, 4, "10 reservations through two nodes against a limit of 4");
    assert_eq!(a.reserve("k", 4).await?, Err(4));
    // One of the four becomes a record on b, expired two minutes ago.
    let mut y = rec("y");
    y.counted = true;
    y.end_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis()
        as i64
        - 120_000;
    b.claim(&y).await?;
    until("a sees y", 5, || a.records().iter().any(|r| r.id == "y")).await?;
    b.leave().await;
    drop(b);
    until("y swept", 10, || !a.records().iter().any(|r| r.id == "y")).await?;
    assert_eq!(a.reserve("k", 4).await?, Ok(()), "the swept record's unit came back");
    a.unreserve("k").await?;
    Ok(())
}
