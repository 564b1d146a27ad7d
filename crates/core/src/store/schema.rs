//! The store's schema, version by version, and the migration that brings a database up to
//! the current one.

use rusqlite::{Connection, TransactionBehavior};

use super::{SCHEMA_VERSION, StoreError};

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
-- No foreign key to api_keys: revoking a key must not be blocked by, or silently delete,
-- sandboxes that are still running under it.
CREATE TABLE sandboxes (
    id           TEXT PRIMARY KEY NOT NULL,
    key_id       TEXT NOT NULL,
    template     TEXT NOT NULL,
    alias        TEXT,
    access_token TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    end_at       INTEGER NOT NULL,
    cpu_count    INTEGER NOT NULL,
    memory_mb    INTEGER NOT NULL,
    disk_mb      INTEGER NOT NULL,
    metadata     TEXT NOT NULL,
    env          TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('running', 'paused', 'killed')),
    agent_pid    INTEGER,
    cgroup_slot  INTEGER
);
-- Serves list_sandboxes: equality on key_id, then the (created_at, id) cursor order.
CREATE INDEX sandboxes_by_key ON sandboxes (key_id, created_at, id);
CREATE INDEX sandboxes_by_state ON sandboxes (state);
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    ts         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX events_by_sandbox ON events (sandbox_id, seq);
";

/// The audit trail. Records outlive their sandboxes (no foreign key): they are what remains
/// to answer "who ran what" after a sandbox is gone. The full record is JSON; the columns
/// filtered on are duplicated out of it, each index ending in `seq`, the cursor order.
pub(super) const SCHEMA_V2: &str = "
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         INTEGER NOT NULL,
    sandbox_id TEXT,
    key_id     TEXT,
    action     TEXT NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX audit_by_key ON audit (key_id, seq);
CREATE INDEX audit_by_sandbox ON audit (sandbox_id, seq);
CREATE INDEX audit_by_action ON audit (action, seq);
CREATE INDEX audit_by_ts ON audit (ts, seq);
";

pub(super) const SCHEMA_V3: &str = "
ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT NOT NULL DEFAULT '{}';
CREATE TABLE snapshots (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    template   TEXT NOT NULL,
    layers     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (key_id, name)
);
";

/// Saved layers and who uses them. A layer directory under `<data-dir>/layers` is kept exactly
/// while its row in `layers` exists, and that row exists exactly while something references it
/// in `layer_refs`: a sandbox not yet killed (running, paused, a fork's child: its lifecycle's
/// layers), a snapshot (its layers), or an operation in flight (`pending`: a fork between saving
/// its layer and starting its children; such references do not outlive the server process).
///
/// The references follow the rows that imply them through triggers, so every write of a
/// sandbox's state or lifecycle, or of a snapshot, moves them in the same transaction: no code
/// path can forget one. When the last reference goes, the layer's row goes with it and its id
/// lands in `layer_trash`; the server removes the directory after the commit and then forgets
/// the id. A crash between the two leaves an id in the trash and a directory no row names: both
/// go at the next start (see `Manager::sweep_layers`).
///
/// A new layer is written as `.<id>.partial`, synced, renamed to `<id>` and only then given its
/// row, in the same transaction as its first reference: a directory without a row is either
/// being written right now or left by a crash.
pub(super) const SCHEMA_V4: &str = "
CREATE TABLE layers (
    id         TEXT PRIMARY KEY NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE layer_refs (
    layer TEXT NOT NULL REFERENCES layers (id),
    kind  TEXT NOT NULL CHECK (kind IN ('sandbox', 'snapshot', 'pending')),
    owner TEXT NOT NULL,
    PRIMARY KEY (layer, kind, owner)
);
CREATE INDEX layer_refs_by_owner ON layer_refs (kind, owner);
CREATE TABLE layer_trash (id TEXT PRIMARY KEY NOT NULL);

-- What earlier versions referenced (layers of sandboxes not killed, and of snapshots).
INSERT INTO layers (id, created_at)
    SELECT DISTINCT j.value, 0 FROM sandboxes s, json_each(s.lifecycle, '$.layers') j
    WHERE s.state != 'killed'
    UNION
    SELECT DISTINCT j.value, 0 FROM snapshots s, json_each(s.layers) j;
INSERT INTO layer_refs (layer, kind, owner)
    SELECT DISTINCT j.value, 'sandbox', s.id FROM sandboxes s, json_each(s.lifecycle, '$.layers') j
    WHERE s.state != 'killed';
INSERT INTO layer_refs (layer, kind, owner)
    SELECT DISTINCT j.value, 'snapshot', s.id FROM snapshots s, json_each(s.layers) j;

-- A sandbox references its lifecycle's layers until it is killed. Inserting a reference to a
-- layer without a row fails (foreign key): a sandbox cannot be recorded on a layer that is
-- gone or was never committed.
CREATE TRIGGER sandbox_layers_insert AFTER INSERT ON sandboxes WHEN NEW.state != 'killed'
BEGIN
    INSERT INTO layer_refs (layer, kind, owner)
        SELECT DISTINCT value, 'sandbox', NEW.id FROM json_each(NEW.lifecycle, '$.layers');
END;
-- Only the difference moves: dropping every reference and adding them back would free a
-- layer this sandbox alone holds halfway through the update.
CREATE TRIGGER sandbox_layers_update AFTER UPDATE OF state, lifecycle ON sandboxes
BEGIN
    DELETE FROM layer_refs WHERE kind = 'sandbox' AND owner = NEW.id
        AND (NEW.state = 'killed'
             OR layer NOT IN (SELECT value FROM json_each(NEW.lifecycle, '$.layers')));
    INSERT INTO layer_refs (layer, kind, owner)
        SELECT DISTINCT value, 'sandbox', NEW.id FROM json_each(NEW.lifecycle, '$.layers')
        WHERE NEW.state != 'killed' AND NOT EXISTS (
            SELECT 1 FROM layer_refs r WHERE r.layer = value AND r.kind = 'sandbox'
                AND r.owner = NEW.id);
END;
CREATE TRIGGER sandbox_layers_delete AFTER DELETE ON sandboxes
BEGIN
    DELETE FROM layer_refs WHERE kind = 'sandbox' AND owner = OLD.id;
END;
CREATE TRIGGER snapshot_layers_insert AFTER INSERT ON snapshots
BEGIN
    INSERT INTO layer_refs (layer, kind, owner)
        SELECT DISTINCT value, 'snapshot', NEW.id FROM json_each(NEW.layers);
END;
CREATE TRIGGER snapshot_layers_delete AFTER DELETE ON snapshots
BEGIN
    DELETE FROM layer_refs WHERE kind = 'snapshot' AND owner = OLD.id;
END;
-- The last reference gone: the layer goes, and its directory is queued for removal.
CREATE TRIGGER layer_unreferenced AFTER DELETE ON layer_refs
    WHEN NOT EXISTS (SELECT 1 FROM layer_refs WHERE layer = OLD.layer)
BEGIN
    DELETE FROM layers WHERE id = OLD.layer;
END;
CREATE TRIGGER layer_dropped AFTER DELETE ON layers
BEGIN
    INSERT INTO layer_trash (id) SELECT OLD.id
        WHERE NOT EXISTS (SELECT 1 FROM layer_trash WHERE id = OLD.id);
END;
";

/// Operator keys (they read every series of `/metrics`) and per-key quotas (JSON
/// [`KeyLimits`]; a field left out takes the server's default).
pub(super) const SCHEMA_V5: &str = "
ALTER TABLE api_keys ADD COLUMN operator INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
";

/// Isolation tiers (`crate::tier`): the tier each sandbox runs in (every sandbox before this
/// version ran in the jail), and the tiers each key may use (JSON list; NULL: every tier the
/// server runs). `agent_pid` and `cgroup_slot` stay: what they mean is the tier's business
/// (`tier::Saved`).
pub(super) const SCHEMA_V6: &str = "
ALTER TABLE sandboxes ADD COLUMN tier TEXT NOT NULL DEFAULT 'jail';
ALTER TABLE api_keys ADD COLUMN tiers TEXT;
";

/// A random version-4 UUID in SQL, for rows the triggers below create.
macro_rules! sql_uuid {
    () => {
        "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || \
         substr(lower(hex(randomblob(2))), 2) || '-' || \
         substr('89ab', 1 + (abs(random()) % 4), 1) || substr(lower(hex(randomblob(2))), 2) || \
         '-' || lower(hex(randomblob(6)))"
    };
}

/// Lifecycle events as E2B publishes them (`GET /events/sandboxes`), and the webhook outbox.
///
/// `lifecycle_events` is filled by a trigger on `events`, so every state change that already
/// commits its event (create, kill, pause, resume, snapshot, network or timeout update) yields
/// the published event in the same transaction, with no code path able to skip it. It has no
/// foreign key: it outlives the sandbox row, and copies the owner, template and metadata.
///
/// `webhook_deliveries` is the outbox: a trigger on `lifecycle_events` queues one row per
/// enabled webhook of the same key that subscribed to the event type, again in the same
/// transaction. The delivery loop (`crate::events`) sends due rows and records each attempt;
/// a row is settled only after the receiver answered 2xx, so a crash between sending and
/// recording sends it again (at least once).
pub(super) const SCHEMA_V7: &str = concat!(
    "
CREATE TABLE lifecycle_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    key_id     TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    template   TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    ts         INTEGER NOT NULL,
    type       TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX lifecycle_events_by_key ON lifecycle_events (key_id, seq);
CREATE INDEX lifecycle_events_by_sandbox ON lifecycle_events (sandbox_id, seq);
CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY NOT NULL,
    key_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    url        TEXT NOT NULL,
    enabled    INTEGER NOT NULL,
    events     TEXT NOT NULL,
    secret     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX webhooks_by_key ON webhooks (key_id);
CREATE TABLE webhook_deliveries (
    id          TEXT PRIMARY KEY NOT NULL,
    webhook_id  TEXT NOT NULL,
    event_seq   INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    settled_at  INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);
CREATE INDEX webhook_deliveries_by_hook ON webhook_deliveries (webhook_id, created_at);
CREATE TRIGGER events_publish AFTER INSERT ON events
    WHEN NEW.kind IN ('created', 'killed', 'lost', 'paused', 'resumed', 'snapshot', 'network',
                      'timeout')
BEGIN
    INSERT INTO lifecycle_events (id, key_id, sandbox_id, template, metadata, ts, type, detail)
        SELECT ",
    sql_uuid!(),
    ", s.key_id, s.id, s.template, s.metadata, NEW.ts,
            'sandbox.lifecycle.' || CASE NEW.kind
                WHEN 'lost' THEN 'killed'
                WHEN 'snapshot' THEN 'checkpointed'
                WHEN 'network' THEN 'updated'
                WHEN 'timeout' THEN 'updated'
                ELSE NEW.kind END,
            NEW.detail
        FROM sandboxes s WHERE s.id = NEW.sandbox_id;
END;
CREATE TRIGGER lifecycle_events_outbox AFTER INSERT ON lifecycle_events
BEGIN
    INSERT INTO webhook_deliveries (id, webhook_id, event_seq, state, next_at, created_at)
        SELECT ",
    sql_uuid!(),
    ", w.id, NEW.seq, 'pending', NEW.ts, NEW.ts
        FROM webhooks w
        WHERE w.key_id = NEW.key_id AND w.enabled != 0
            AND EXISTS (SELECT 1 FROM json_each(w.events) e WHERE e.value = NEW.type);
END;
"
);

/// Volumes (`crate::volumes`) and create's `Idempotency-Key`. A volume's name is unique per key, and the bearer token of the content API
/// (kept like a sandbox's access token: `GET /volumes/{id}` returns it again).
pub(super) const SCHEMA_V8: &str = "
CREATE TABLE volumes (
    id         TEXT PRIMARY KEY NOT NULL,
    key_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    token      TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    UNIQUE (key_id, name)
);
-- Creates under an Idempotency-Key: the sandbox the first one made (crate::extras).
CREATE TABLE idempotency (
    key_id     TEXT NOT NULL,
    idem_key   TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
";

/// Secrets (`crate::secrets`): a value is stored only sealed (AEAD, with a key kept outside
/// this database; see `crate::secrets::Vault`), bound to its id, version and key. A name is
/// unique per key.
pub(super) const SCHEMA_V9: &str = "
CREATE TABLE secrets (
    id         TEXT PRIMARY KEY NOT NULL,
    key_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    metadata   TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (key_id, name)
);
";

/// Brings the schema up to `SCHEMA_VERSION` in one immediate transaction, so two servers
/// started on the same file cannot both run the same migration.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 =
        tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        // Refuse rather than guess: an older build writing a newer schema could corrupt it.
        return Err(StoreError::UnsupportedSchema(current));
    }
    if current < 1 {
        tx.execute_batch(SCHEMA_V1)?;
    }
    if current < 2 {
        tx.execute_batch(SCHEMA_V2)?;
    }
    if current < 3 {
        tx.execute_batch(SCHEMA_V3)?;
    }
    if current < 4 {
        tx.execute_batch(SCHEMA_V4)?;
    }
    if current < 5 {
        tx.execute_batch(SCHEMA_V5)?;
    }
    if current < 6 {
        tx.execute_batch(SCHEMA_V6)?;
    }
    if current < 7 {
        tx.execute_batch(SCHEMA_V7)?;
    }
    if current < 8 {
        tx.execute_batch(SCHEMA_V8)?;
    }
    if current < 9 {
        tx.execute_batch(SCHEMA_V9)?;
    }
    if current < SCHEMA_VERSION {
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])?;
    }
    tx.commit()?;
    Ok(())
}
