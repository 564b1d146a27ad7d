//! Embedded state store: API keys, sandbox records and their lifecycle events, and the audit
//! trail, in one SQLite file.
//!
//! The server promises that a key or sandbox survives a `kill -9` once it has been
//! acknowledged to the client, so the database runs in WAL mode with `synchronous=FULL`: every
//! commit is fsynced before the call returns (standalone audit records are the one exception,
//! see [`Store::insert_audits`]). Each method is one short statement or
//! transaction under the connection mutex, so callers may run it from `spawn_blocking` or
//! briefly inline without starving other requests.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, ToSql, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The schema this build writes and understands.
const SCHEMA_VERSION: i64 = 6;

/// Prefix E2B SDKs expect on API keys; kept so existing client configs work unchanged.
const KEY_PREFIX: &str = "e2b_";
/// 20 random bytes = 160 bits of entropy, rendered as 40 hex characters.
const KEY_RANDOM_BYTES: usize = 20;
const MAX_NAME_LEN: usize = 64;

pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

/// How long a writer waits on a lock held by another connection (e.g. an operator poking at
/// the file with the sqlite3 CLI) before the call fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
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
const SCHEMA_V2: &str = "
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

const SCHEMA_V3: &str = "
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
const SCHEMA_V4: &str = "
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
const SCHEMA_V5: &str = "
ALTER TABLE api_keys ADD COLUMN operator INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
";

/// Isolation tiers (`crate::tier`): the tier each sandbox runs in (every sandbox before this
/// version ran in the jail), and the tiers each key may use (JSON list; NULL: every tier the
/// server runs). `agent_pid` and `cgroup_slot` stay: what they mean is the tier's business
/// (`tier::Saved`).
const SCHEMA_V6: &str = "
ALTER TABLE sandboxes ADD COLUMN tier TEXT NOT NULL DEFAULT 'jail';
ALTER TABLE api_keys ADD COLUMN tiers TEXT;
";

const KEY_COLUMNS: &str = "id, name, created_at, operator, limits, tiers";

const SANDBOX_COLUMNS: &str = "id, key_id, template, alias, access_token, created_at, end_at, \
     cpu_count, memory_mb, disk_mb, metadata, env, state, agent_pid, cgroup_slot, lifecycle, tier";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o error preparing database directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid pagination token")]
    InvalidToken,
    #[error("invalid limit {0}: must be between 1 and {MAX_LIST_LIMIT}")]
    InvalidLimit(u32),
    #[error("not found: {0}")]
    NotFound(String),
    /// A layer the new row refers to is gone (its snapshot was deleted while it started).
    #[error("a layer of the sandbox's template was deleted")]
    LayerGone,
    #[error("database schema version {0} is newer than this build supports ({SCHEMA_VERSION})")]
    UnsupportedSchema(i64),
}

/// API key id (16 lowercase hex chars). An alias rather than a newtype because it is stored
/// in `SandboxRecord::key_id` and flows through JSON as a plain string.
pub type KeyId = String;

/// Everything about an API key except the secret, which is never stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: KeyId,
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// An operator's key: it may read every series of `/metrics`, other tenants' included.
    #[serde(default)]
    pub operator: bool,
    /// This key's own quotas, where they differ from the server's defaults.
    #[serde(default)]
    pub limits: KeyLimits,
    /// The isolation tiers this key may use (`None`: every tier the server runs).
    #[serde(default)]
    pub tiers: Option<Vec<String>>,
}

/// Per-key quotas stored with the key; `None` takes the server's default, 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// Sandboxes that exist at once (running or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sandboxes: Option<u32>,
    /// Snapshots kept at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u32>,
    /// Sandboxes started per second, sustained (creates and fork children).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_rate: Option<f64>,
    /// Sandboxes that may be started at once before the rate applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_burst: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Paused,
    Killed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Killed => "killed",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        match s {
            "running" => Some(SandboxState::Running),
            "paused" => Some(SandboxState::Paused),
            "killed" => Some(SandboxState::Killed),
            _ => None,
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for SandboxState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for SandboxState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        SandboxState::parse(s)
            .ok_or_else(|| FromSqlError::Other(format!("unknown sandbox state {s:?}").into()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub key_id: String,
    pub template: String,
    pub alias: Option<String>,
    pub access_token: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub end_at: i64,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_mb: u32,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub state: SandboxState,
    pub agent_pid: Option<i32>,
    pub cgroup_slot: Option<u32>,
    /// Pause/resume state and the layers the sandbox's filesystem is built from.
    pub lifecycle: Lifecycle,
    /// The isolation tier it runs in (`crate::tier::TierKind::as_str`).
    pub tier: String,
}

/// What a sandbox carries across pauses, restarts and forks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lifecycle {
    /// Saved layer ids (under `<data-dir>/layers`), topmost first, stacked above the template.
    pub layers: Vec<String>,
    /// While paused: whether its processes are frozen in memory (`true`) or only its files
    /// were kept (`false`).
    pub paused_with_memory: Option<bool>,
    /// Pause instead of kill when the timeout passes (E2B `autoPause` / `onTimeout: pause`).
    pub pause_on_timeout: bool,
    /// That pause keeps only the files (E2B `autoPauseMemory: false`).
    pub timeout_pause_files_only: bool,
    /// Resume a paused sandbox when traffic arrives for it (E2B `autoResume`).
    pub auto_resume: bool,
    /// Pause or kill after this long without activity (our extension; 0 = never).
    pub idle_timeout_ms: u64,
    pub idle_action_pause: bool,
}

/// A named snapshot: a sandbox's filesystem as layers, usable as a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub key_id: String,
    pub sandbox_id: String,
    /// The template the layers sit on.
    pub template: String,
    pub layers: Vec<String>,
    pub created_at: i64,
}

/// Filters and cursor for [`Store::list_sandboxes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Every pair must be present in the sandbox's metadata with exactly this value.
    pub metadata: BTreeMap<String, String>,
    /// `None` or an empty list means any state: an API client sending `?state=` with nothing
    /// after it meant "unfiltered", not "match nothing".
    pub state: Option<Vec<SandboxState>>,
    /// 1..=1000.
    pub limit: u32,
    /// Opaque token from a previous page's response.
    pub next_token: Option<String>,
    /// Newest first (E2B's default order) instead of oldest first.
    pub newest_first: bool,
    /// Only sandboxes of this template.
    pub template: Option<String>,
    /// Only sandboxes created after this instant (Unix milliseconds).
    pub started_after_ms: Option<i64>,
}

/// Resource use attributed to an audited action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub memory_mb: u64,
    pub cpu_ms: u64,
}

/// A blocked action inside a sandbox (a denied syscall, an OOM kill, a refused fork).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityEvent {
    /// `seccomp`, `oom` or `pids`.
    pub kind: String,
    /// The syscall's name (`none` for an OOM kill; `fork` for the pids limit).
    pub syscall: String,
    /// Pid inside the sandbox, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Pid on the host, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_pid: Option<u32>,
    /// The process's command name, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// How many times, in this record.
    pub count: u64,
    /// When (RFC 3339); the first occurrence when `count` > 1.
    pub timestamp: String,
}

/// One entry of the audit trail: an API action, an execution inside a sandbox, a security
/// event or an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the trail, assigned when stored; cursors count in it. Not part of the
    /// stored JSON (the row's `seq` is), so it is left out while still 0.
    #[serde(default, skip_serializing_if = "unassigned")]
    pub id: i64,
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: String,
    /// The same instant as Unix milliseconds (what filters compare).
    #[serde(skip)]
    pub ts_ms: i64,
    pub sandbox_id: Option<String>,
    /// The API key the sandbox belongs to (its tenant).
    pub user_id: Option<String>,
    /// `sandbox.create`, `exec.command`, `security.seccomp`, `alert.memory`, ...
    pub action: String,
    /// sha256 (hex) of the command line or code cell, for executions.
    pub code_hash: Option<String>,
    pub duration_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub resource_usage: Option<ResourceUsage>,
    pub security_events: Vec<SecurityEvent>,
    /// Whatever else describes the action (a command line, a reason, a threshold).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl AuditRecord {
    /// A record of `action` at `ts_ms` (Unix milliseconds), every other field empty.
    pub fn new(action: impl Into<String>, ts_ms: i64) -> AuditRecord {
        AuditRecord {
            id: 0,
            timestamp: crate::time::rfc3339_ms(ts_ms),
            ts_ms,
            sandbox_id: None,
            user_id: None,
            action: action.into(),
            code_hash: None,
            duration_ms: None,
            exit_code: None,
            resource_usage: None,
            security_events: Vec::new(),
            detail: serde_json::Map::new(),
        }
    }
}

pub const DEFAULT_AUDIT_LIMIT: u32 = 100;

/// Filters and cursor for [`Store::query_audit`]. Every filter is optional here; the API
/// always sets `key_id` (a tenant sees only its own records), the operator's CLI may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub key_id: Option<String>,
    pub sandbox_id: Option<String>,
    /// An exact action, or a prefix when it ends in `*` (`alert.*`).
    pub action: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<i64>,
    /// Only records after this cursor (a previous page's `next_cursor`).
    pub after: Option<String>,
    /// 1..=1000.
    pub limit: u32,
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            key_id: None,
            sandbox_id: None,
            action: None,
            since_ms: None,
            until_ms: None,
            after: None,
            limit: DEFAULT_AUDIT_LIMIT,
        }
    }
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            metadata: BTreeMap::new(),
            state: None,
            limit: DEFAULT_LIST_LIMIT,
            next_token: None,
            newest_first: false,
            template: None,
            started_after_ms: None,
        }
    }
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        Store::init(Connection::open(path)?)
    }

    /// A private, non-persistent database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store, StoreError> {
        // journal_mode reports the mode actually in effect; a filesystem without shared-memory
        // support keeps the old one. That still works (rollback journal), just slower, so warn
        // rather than refuse to start. In-memory databases always answer "memory".
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
            tracing::warn!(journal_mode = %mode, "sqlite refused WAL journal mode");
        }
        // FULL: in WAL mode NORMAL may lose the last commits on power loss or kill -9 of the
        // host, which would break "acknowledged means durable" for keys and sandboxes.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        migrate(&mut conn)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write: every multi-step
        // write runs in a rusqlite Transaction, which rolls back on drop. So the connection is
        // still consistent and refusing all further use would only turn one bug into an outage.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ---- API keys ----------------------------------------------------------------------

    /// Creates a key and returns its id and the plaintext, which is shown to the caller once
    /// and never stored (only its SHA-256 is).
    pub fn create_key(&self, name: &str) -> Result<(KeyId, String), StoreError> {
        self.create_key_with(name, false, &KeyLimits::default())
    }

    /// [`Store::create_key`] for an operator's key, or with quotas of its own.
    pub fn create_key_with(
        &self,
        name: &str,
        operator: bool,
        limits: &KeyLimits,
    ) -> Result<(KeyId, String), StoreError> {
        self.create_key_for(name, operator, limits, None)
    }

    /// [`Store::create_key_with`], limited to the isolation tiers `tiers` (`None`: every
    /// tier). The names are the caller's to check (`crate::tier::parse_list`).
    pub fn create_key_for(
        &self,
        name: &str,
        operator: bool,
        limits: &KeyLimits,
        tiers: Option<&[String]>,
    ) -> Result<(KeyId, String), StoreError> {
        validate_name(name)?;
        let mut rng = rand::rng();
        let mut secret = [0u8; KEY_RANDOM_BYTES];
        rng.fill(&mut secret);
        let mut id_bytes = [0u8; 8];
        rng.fill(&mut id_bytes);
        let plaintext = format!("{KEY_PREFIX}{}", hex::encode(secret));
        let id = hex::encode(id_bytes);
        self.conn().execute(
            "INSERT INTO api_keys (id, name, key_hash, created_at, operator, limits, tiers) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                name,
                hash_key(&plaintext),
                unix_secs(),
                operator,
                serde_json::to_string(limits)?,
                tiers.map(serde_json::to_string).transpose()?
            ],
        )?;
        Ok((id, plaintext))
    }

    /// Replaces a key's own quotas (in force from its next request).
    pub fn set_key_limits(&self, id: &str, limits: &KeyLimits) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE api_keys SET limits = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(limits)?],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("api key {id}")));
        }
        Ok(())
    }

    /// A key by its id (for its quotas), or None if it was revoked.
    pub fn get_key(&self, id: &str) -> Result<Option<KeyInfo>, StoreError> {
        let info = self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_from_row,
            )
            .optional()?;
        Ok(info)
    }

    /// Looks the key up by its hash. A timing side channel would only reveal hash prefixes of
    /// stored keys, which does not help forge a plaintext, so no constant-time compare.
    pub fn verify_key(&self, plaintext: &str) -> Result<Option<KeyInfo>, StoreError> {
        let info = self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?1"),
                [hash_key(plaintext)],
                key_from_row,
            )
            .optional()?;
        Ok(info)
    }

    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"))?;
        let keys = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// Deletes the key so it no longer verifies. Sandboxes created with it are left alone:
    /// whether to kill them is the caller's policy, not the store's.
    pub fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        let n = self.conn().execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("api key {id}")));
        }
        Ok(())
    }

    // ---- Sandboxes ---------------------------------------------------------------------

    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        insert_sandbox_on(&self.conn(), rec)
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let rec = self
            .conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                sandbox_from_row,
            )
            .optional()?;
        Ok(rec)
    }

    pub fn set_end_at(&self, id: &str, end_at_ms: i64) -> Result<(), StoreError> {
        self.update_sandbox(id, "end_at = ?2", &end_at_ms)
    }

    pub fn set_state(&self, id: &str, state: SandboxState) -> Result<(), StoreError> {
        self.update_sandbox(id, "state = ?2", &state)
    }

    /// Records a sandbox started again under its old id (resume after a filesystem-only pause).
    pub fn restarted(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET agent_pid = ?2, cgroup_slot = ?3, state = ?4, end_at = ?5, \
             lifecycle = ?6 WHERE id = ?1",
            params![
                rec.id,
                rec.agent_pid,
                rec.cgroup_slot,
                SandboxState::Running,
                rec.end_at,
                serde_json::to_string(&rec.lifecycle)?
            ],
        )?;
        not_found_if_zero(n, &rec.id)?;
        self.record_event(&rec.id, "resumed", &serde_json::json!({"memory": false}))
    }

    pub fn set_lifecycle(&self, id: &str, lifecycle: &Lifecycle) -> Result<(), StoreError> {
        self.update_sandbox(id, "lifecycle = ?2", &serde_json::to_string(lifecycle)?)
    }

    // ---- Snapshots ---------------------------------------------------------------------

    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        insert_snapshot_on(&self.conn(), s)
    }

    /// A tenant's snapshot by id or name.
    pub fn get_snapshot(
        &self,
        key_id: &str,
        id_or_name: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let rows = self
            .snapshots_where("key_id = ?1 AND (id = ?2 OR name = ?2)", &[&key_id, &id_or_name])?;
        Ok(rows.into_iter().next())
    }

    /// A tenant's snapshots, newest first, optionally only those taken from `sandbox_id`.
    pub fn list_snapshots(
        &self,
        key_id: &str,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        match sandbox_id {
            Some(sid) => self.snapshots_where("key_id = ?1 AND sandbox_id = ?2", &[&key_id, &sid]),
            None => self.snapshots_where("key_id = ?1", &[&key_id]),
        }
    }

    /// Every snapshot (all tenants), for layer reference counting.
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.snapshots_where("1 = 1", &[])
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM snapshots WHERE id = ?1", [id])? > 0)
    }

    fn snapshots_where(
        &self,
        cond: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, name, key_id, sandbox_id, template, layers, created_at FROM snapshots \
             WHERE {cond} ORDER BY created_at DESC, id"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, key_id, sandbox_id, template, layers, created_at) = row?;
            out.push(SnapshotRecord {
                id,
                name,
                key_id,
                sandbox_id,
                template,
                layers: serde_json::from_str(&layers)?,
                created_at,
            });
        }
        Ok(out)
    }

    // ---- Layers (see SCHEMA_V4) ----------------------------------------------------------

    /// Records a sandbox as paused: its lifecycle (with `layer` on top when only its files
    /// were kept: that layer's row is created here), its state and the event, in one
    /// transaction. A crash before the commit leaves the sandbox as it was and the layer's
    /// directory without a row (removed at the next start).
    pub fn pause_sandbox(
        &self,
        id: &str,
        layer: Option<&str>,
        lifecycle: &Lifecycle,
        memory: bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(layer) = layer {
            insert_layer_on(&tx, layer)?;
        }
        let n = tx.execute(
            "UPDATE sandboxes SET lifecycle = ?2, state = ?3 WHERE id = ?1",
            params![id, serde_json::to_string(lifecycle)?, SandboxState::Paused],
        )?;
        not_found_if_zero(n, id)?;
        insert_event_on(&tx, id, "paused", &serde_json::json!({ "memory": memory }))?;
        tx.commit()?;
        Ok(())
    }

    /// Stores a snapshot together with the row of `layer`, the layer it just saved.
    pub fn insert_snapshot_with_layer(
        &self,
        s: &SnapshotRecord,
        layer: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_layer_on(&tx, layer)?;
        insert_snapshot_on(&tx, s)?;
        tx.commit()?;
        Ok(())
    }

    /// Commits `layer` held by an operation in flight named `owner` (a fork, until its
    /// children hold it), until [`Store::release_pending`].
    pub fn insert_pending_layer(&self, layer: &str, owner: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_layer_on(&tx, layer)?;
        tx.execute(
            "INSERT INTO layer_refs (layer, kind, owner) VALUES (?1, 'pending', ?2)",
            params![layer, owner],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Drops the references of the operation `owner`; layers nothing else holds are dropped.
    pub fn release_pending(&self, owner: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM layer_refs WHERE kind = 'pending' AND owner = ?1", [owner])?;
        Ok(())
    }

    /// At start: the operations of an earlier server process died with it, so their
    /// references go (and with them layers nothing else holds).
    pub fn reset_pending_layers(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM layer_refs WHERE kind = 'pending'", [])?;
        // None should exist (a row is only ever written with its first reference); a hand-edited
        // database is not worth keeping a layer for.
        tx.execute("DELETE FROM layers WHERE id NOT IN (SELECT layer FROM layer_refs)", [])?;
        tx.commit()?;
        Ok(())
    }

    /// Layers whose last reference went and whose directories may still be on disk.
    pub fn dropped_layers(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM layer_trash ORDER BY id")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Forgets dropped layers once their directories are gone.
    pub fn forget_dropped(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for id in ids {
            tx.execute("DELETE FROM layer_trash WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every committed layer and how many references hold it.
    pub fn layers(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT l.id, (SELECT COUNT(*) FROM layer_refs r WHERE r.layer = l.id) FROM layers l",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// What holds `layer`: (`sandbox` | `snapshot` | `pending`, id), sorted.
    pub fn layer_users(&self, layer: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT kind, owner FROM layer_refs WHERE layer = ?1 ORDER BY kind, owner")?;
        let rows = stmt
            .query_map([layer], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records (or, with `None`, clears) the agent process and cgroup slot backing a sandbox,
    /// so a restarted server can re-attach to it.
    pub fn set_agent(
        &self,
        id: &str,
        pid: Option<i32>,
        slot: Option<u32>,
    ) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET agent_pid = ?2, cgroup_slot = ?3 WHERE id = ?1",
            params![id, pid, slot],
        )?;
        not_found_if_zero(n, id)
    }

    /// Removes the sandbox and, via ON DELETE CASCADE, its events.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let n = self.conn().execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        not_found_if_zero(n, id)
    }

    /// Every sandbox not yet killed, across all keys, oldest first: what the server must
    /// re-attach to (or clean up) at start.
    pub fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state != ?1 ORDER BY created_at, id"
        ))?;
        let recs = stmt
            .query_map([SandboxState::Killed], sandbox_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(recs)
    }

    /// One page of `key_id`'s sandboxes, ordered by (created_at, id). Returns the page and,
    /// when at least one more matching sandbox exists, the token for the next page.
    ///
    /// Metadata is stored as JSON, so its filter runs here rather than in SQL. Rows are
    /// streamed in cursor order and counted only after filtering, so pages stay full and the
    /// "is there more" answer stays exact even when most rows are filtered out.
    pub fn list_sandboxes(
        &self,
        key_id: &str,
        query: &ListQuery,
    ) -> Result<(Vec<SandboxRecord>, Option<String>), StoreError> {
        if !(1..=MAX_LIST_LIMIT).contains(&query.limit) {
            return Err(StoreError::InvalidLimit(query.limit));
        }
        let limit = query.limit as usize;
        let cursor = query.next_token.as_deref().map(decode_token).transpose()?;

        // key_id is always bound: it is the tenant boundary, never optional.
        let mut sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE key_id = ?");
        let mut args: Vec<Value> = vec![Value::Text(key_id.to_owned())];
        if let Some((created_at, id)) = cursor {
            sql.push_str(if query.newest_first {
                " AND (created_at, id) < (?, ?)"
            } else {
                " AND (created_at, id) > (?, ?)"
            });
            args.push(Value::Integer(created_at));
            args.push(Value::Text(id));
        }
        if let Some(states) = query.state.as_ref().filter(|s| !s.is_empty()) {
            let marks = vec!["?"; states.len()].join(", ");
            sql.push_str(&format!(" AND state IN ({marks})"));
            args.extend(states.iter().map(|s| Value::Text(s.as_str().to_owned())));
        }
        if let Some(t) = &query.template {
            sql.push_str(" AND template = ?");
            args.push(Value::Text(t.clone()));
        }
        if let Some(after) = query.started_after_ms {
            sql.push_str(" AND created_at > ?");
            args.push(Value::Integer(after));
        }
        sql.push_str(if query.newest_first {
            " ORDER BY created_at DESC, id DESC"
        } else {
            " ORDER BY created_at, id"
        });

        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut page = Vec::new();
        let mut more = false;
        while let Some(row) = rows.next()? {
            let rec = sandbox_from_row(row)?;
            if !query.metadata.iter().all(|(k, v)| rec.metadata.get(k) == Some(v)) {
                continue;
            }
            if page.len() == limit {
                // One match beyond the page proves a next page exists; stop reading.
                more = true;
                break;
            }
            page.push(rec);
        }
        let token = match page.last() {
            Some(last) if more => Some(encode_token(last.created_at, &last.id)),
            _ => None,
        };
        Ok((page, token))
    }

    fn update_sandbox(&self, id: &str, set: &str, value: &dyn ToSql) -> Result<(), StoreError> {
        let n = self
            .conn()
            .execute(&format!("UPDATE sandboxes SET {set} WHERE id = ?1"), params![id, value])?;
        not_found_if_zero(n, id)
    }

    // ---- Events ------------------------------------------------------------------------

    /// Appends a lifecycle event. Fails with `NotFound` if the sandbox row does not exist,
    /// since an event that can never be listed or cleaned up is only a leak.
    pub fn record_event(
        &self,
        sandbox_id: &str,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        insert_event_on(&self.conn(), sandbox_id, kind, detail)
    }

    // ---- Audit trail --------------------------------------------------------------------

    /// Stores an audit record (fsynced before this returns) and sets its `id`.
    pub fn insert_audit(&self, rec: &mut AuditRecord) -> Result<(), StoreError> {
        self.insert_audits(std::slice::from_mut(rec))
    }

    /// Stores several records in one transaction.
    ///
    /// Committed with `synchronous=NORMAL`: when this returns, the records are in the WAL
    /// through the kernel, so a crash or `kill -9` of the server cannot lose them (that is the
    /// promise made for the audit trail); a power loss can, until the next fsync (the next
    /// sandbox create or kill, or a checkpoint). An fsync per command would be most of the
    /// audit trail's cost on the create → exec → kill path. The records written with a sandbox
    /// row ([`Store::insert_sandbox_audited`], [`Store::kill_sandbox_audited`]) get that
    /// row's full durability.
    pub fn insert_audits(&self, recs: &mut [AuditRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let written = (|| {
            let tx = conn.transaction()?;
            for rec in recs.iter_mut() {
                insert_audit_on(&tx, rec)?;
            }
            tx.commit()?;
            Ok::<_, StoreError>(())
        })();
        // Back to FULL whatever happened: every other write relies on it.
        conn.pragma_update(None, "synchronous", "FULL")?;
        written
    }

    /// Stores a new sandbox, its `created` event and, when given, the audit record of its
    /// creation in one transaction: one fsync, and never one without the others.
    pub fn insert_sandbox_audited(
        &self,
        sb: &SandboxRecord,
        detail: &serde_json::Value,
        audit: Option<&mut AuditRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_sandbox_on(&tx, sb)?;
        insert_event_on(&tx, &sb.id, "created", detail)?;
        if let Some(rec) = audit {
            insert_audit_on(&tx, rec)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a sandbox killed, records why, and stores the audit record of it, in one
    /// transaction.
    pub fn kill_sandbox_audited(
        &self,
        id: &str,
        detail: &serde_json::Value,
        audit: Option<&mut AuditRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
            params![id, SandboxState::Killed],
        )?;
        if n > 0 {
            insert_event_on(&tx, id, "killed", detail)?;
        }
        if let Some(rec) = audit {
            insert_audit_on(&tx, rec)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How many sandboxes of `key_id` exist (running or paused): what its sandbox quota counts.
    pub fn count_sandboxes_of(&self, key_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .prepare_cached(
                "SELECT COUNT(*) FROM sandboxes WHERE key_id = ?1 AND state != 'killed'",
            )?
            .query_row([key_id], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// How many snapshots `key_id` keeps.
    pub fn count_snapshots_of(&self, key_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn()
            .prepare_cached("SELECT COUNT(*) FROM snapshots WHERE key_id = ?1")?
            .query_row([key_id], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// How many sandboxes are in each state other than killed (for the `ringfence_sandboxes`
    /// gauge: paused sandboxes whose files alone are kept exist only here).
    pub fn count_by_state(
        &self,
    ) -> Result<std::collections::HashMap<SandboxState, i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT state, COUNT(*) FROM sandboxes WHERE state != 'killed' GROUP BY state",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, SandboxState>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
        Ok(rows)
    }

    /// One page of audit records in trail order (oldest first), and the cursor of the next
    /// page when more match.
    pub fn query_audit(
        &self,
        q: &AuditQuery,
    ) -> Result<(Vec<AuditRecord>, Option<String>), StoreError> {
        if !(1..=MAX_LIST_LIMIT).contains(&q.limit) {
            return Err(StoreError::InvalidLimit(q.limit));
        }
        let mut sql = String::from("SELECT seq, ts, record FROM audit WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(after) = &q.after {
            let seq: i64 = after.parse().map_err(|_| StoreError::InvalidToken)?;
            sql.push_str(" AND seq > ?");
            args.push(Value::Integer(seq));
        }
        if let Some(k) = &q.key_id {
            sql.push_str(" AND key_id = ?");
            args.push(Value::Text(k.clone()));
        }
        if let Some(sb) = &q.sandbox_id {
            sql.push_str(" AND sandbox_id = ?");
            args.push(Value::Text(sb.clone()));
        }
        match q.action.as_deref().map(|a| (a, a.strip_suffix('*'))) {
            Some((_, Some(prefix))) => {
                // A range instead of LIKE: no wildcard characters to escape, and the index
                // on action serves it.
                sql.push_str(" AND action >= ? AND action < ?");
                args.push(Value::Text(prefix.to_owned()));
                args.push(Value::Text(format!("{prefix}\u{10FFFF}")));
            }
            Some((exact, None)) => {
                sql.push_str(" AND action = ?");
                args.push(Value::Text(exact.to_owned()));
            }
            None => {}
        }
        if let Some(t) = q.since_ms {
            sql.push_str(" AND ts >= ?");
            args.push(Value::Integer(t));
        }
        if let Some(t) = q.until_ms {
            sql.push_str(" AND ts < ?");
            args.push(Value::Integer(t));
        }
        sql.push_str(" ORDER BY seq LIMIT ?");
        args.push(Value::Integer(i64::from(q.limit) + 1));
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() > q.limit as usize;
        let mut page = Vec::with_capacity(rows.len().min(q.limit as usize));
        for (seq, ts, text) in rows.into_iter().take(q.limit as usize) {
            let mut rec: AuditRecord = serde_json::from_str(&text)?;
            rec.id = seq;
            rec.ts_ms = ts;
            page.push(rec);
        }
        let next = if more { page.last().map(|r| r.id.to_string()) } else { None };
        Ok((page, next))
    }

    /// The sandbox's events as (unix ms, kind, detail), oldest first; empty if none or if the
    /// sandbox is unknown.
    pub fn events_for(
        &self,
        sandbox_id: &str,
    ) -> Result<Vec<(i64, String, serde_json::Value)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT ts, kind, detail FROM events WHERE sandbox_id = ?1 ORDER BY seq")?;
        let raw = stmt
            .query_map([sandbox_id], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter()
            .map(|(ts, kind, detail)| Ok((ts, kind, serde_json::from_str(&detail)?)))
            .collect()
    }
}

/// Brings the schema up to `SCHEMA_VERSION` in one immediate transaction, so two servers
/// started on the same file cannot both run the same migration.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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
    if current < SCHEMA_VERSION {
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])?;
    }
    tx.commit()?;
    Ok(())
}

fn insert_snapshot_on(conn: &Connection, s: &SnapshotRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO snapshots (id, name, key_id, sandbox_id, template, layers, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            s.id,
            s.name,
            s.key_id,
            s.sandbox_id,
            s.template,
            serde_json::to_string(&s.layers)?,
            s.created_at
        ],
    )?;
    Ok(())
}

/// The row of a layer just saved (its directory renamed into place, synced).
fn insert_layer_on(conn: &Connection, layer: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO layers (id, created_at) VALUES (?1, ?2)",
        params![layer, unix_millis()],
    )?;
    Ok(())
}

fn insert_sandbox_on(conn: &Connection, rec: &SandboxRecord) -> Result<(), StoreError> {
    let metadata = serde_json::to_string(&rec.metadata)?;
    let env = serde_json::to_string(&rec.env)?;
    let res = conn.execute(
        &format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
        ),
        params![
            rec.id,
            rec.key_id,
            rec.template,
            rec.alias,
            rec.access_token,
            rec.created_at,
            rec.end_at,
            rec.cpu_count,
            rec.memory_mb,
            rec.disk_mb,
            metadata,
            env,
            rec.state,
            rec.agent_pid,
            rec.cgroup_slot,
            serde_json::to_string(&rec.lifecycle)?,
            rec.tier,
        ],
    );
    match res {
        Ok(_) => Ok(()),
        // The layer references (a trigger) name a layer with no row: a snapshot the sandbox
        // starts from was deleted meanwhile.
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            Err(StoreError::LayerGone)
        }
        Err(e) => Err(e.into()),
    }
}

fn insert_event_on(
    conn: &Connection,
    sandbox_id: &str,
    kind: &str,
    detail: &serde_json::Value,
) -> Result<(), StoreError> {
    let detail = serde_json::to_string(detail)?;
    let res = conn.execute(
        "INSERT INTO events (sandbox_id, ts, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![sandbox_id, unix_millis(), kind, detail],
    );
    match res {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            Err(StoreError::NotFound(format!("sandbox {sandbox_id}")))
        }
        Err(e) => Err(e.into()),
    }
}

fn insert_audit_on(conn: &Connection, rec: &mut AuditRecord) -> Result<(), StoreError> {
    let text = serde_json::to_string(rec)?;
    // Cached: one insert per command is the hottest statement here.
    conn.prepare_cached(
        "INSERT INTO audit (ts, sandbox_id, key_id, action, record) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![rec.ts_ms, rec.sandbox_id, rec.user_id, rec.action, text])?;
    rec.id = conn.last_insert_rowid();
    Ok(())
}

fn unassigned(id: &i64) -> bool {
    *id == 0
}

fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok_len = (1..=MAX_NAME_LEN).contains(&name.len());
    let ok_chars =
        name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(StoreError::InvalidName(format!(
            "{name:?}: must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        )))
    }
}

fn hash_key(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

fn encode_token(created_at: i64, id: &str) -> String {
    hex::encode(format!("{created_at}:{id}"))
}

fn decode_token(token: &str) -> Result<(i64, String), StoreError> {
    let bytes = hex::decode(token).map_err(|_| StoreError::InvalidToken)?;
    let text = String::from_utf8(bytes).map_err(|_| StoreError::InvalidToken)?;
    // split_once on the first ':' because created_at never contains one, while ids might.
    let (created_at, id) = text.split_once(':').ok_or(StoreError::InvalidToken)?;
    let created_at = created_at.parse::<i64>().map_err(|_| StoreError::InvalidToken)?;
    if id.is_empty() {
        return Err(StoreError::InvalidToken);
    }
    Ok((created_at, id.to_owned()))
}

fn not_found_if_zero(changed: usize, id: &str) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::NotFound(format!("sandbox {id}")));
    }
    Ok(())
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    let limits: String = row.get(4)?;
    Ok(KeyInfo {
        id: row.get(0)?,
        name: row.get(1)?,
        created_at: row.get(2)?,
        operator: row.get(3)?,
        // A limits column this build cannot read leaves the server's defaults in force.
        limits: serde_json::from_str(&limits).unwrap_or_default(),
        // A tiers column that cannot be read allows nothing rather than everything: it was
        // written to restrict.
        tiers: {
            let text: Option<String> = row.get(5)?;
            text.map(|t| serde_json::from_str(&t).unwrap_or_default())
        },
    })
}

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    Ok(SandboxRecord {
        id: row.get(0)?,
        key_id: row.get(1)?,
        template: row.get(2)?,
        alias: row.get(3)?,
        access_token: row.get(4)?,
        created_at: row.get(5)?,
        end_at: row.get(6)?,
        cpu_count: row.get(7)?,
        memory_mb: row.get(8)?,
        disk_mb: row.get(9)?,
        metadata: json_column(row, 10)?,
        env: json_column(row, 11)?,
        state: row.get(12)?,
        agent_pid: row.get(13)?,
        cgroup_slot: row.get(14)?,
        lifecycle: {
            let text: String = row.get(15)?;
            serde_json::from_str(&text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(15, rusqlite::types::Type::Text, e.into())
            })?
        },
        tier: row.get(16)?,
    })
}

/// Decodes a JSON map column. A decode failure means the file was edited or corrupted, and is
/// reported as a column conversion error naming the column.
fn json_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<BTreeMap<String, String>> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn since_epoch() -> Duration {
    // A clock before 1970 is a broken host; 0 keeps the store usable rather than failing
    // every write.
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn unix_secs() -> i64 {
    i64::try_from(since_epoch().as_secs()).unwrap_or(i64::MAX)
}

fn unix_millis() -> i64 {
    i64::try_from(since_epoch().as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod order_tests {
    use super::*;

    #[test]
    fn newest_first_pages_and_template_filter() {
        let store = Store::open_in_memory().unwrap();
        for i in 0..5i64 {
            let mut r = tests::sandbox(&format!("sb{i}"), "k", 1000 + i);
            r.template = if i % 2 == 0 { "base".into() } else { "code-interpreter-v1".into() };
            store.insert_sandbox(&r).unwrap();
        }
        let mut q = ListQuery { limit: 2, newest_first: true, ..ListQuery::default() };
        let mut seen = Vec::new();
        loop {
            let (page, next) = store.list_sandboxes("k", &q).unwrap();
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(t) => q.next_token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, ["sb4", "sb3", "sb2", "sb1", "sb0"]);
        let q = ListQuery { template: Some("base".into()), ..ListQuery::default() };
        let ids: Vec<String> =
            store.list_sandboxes("k", &q).unwrap().0.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["sb0", "sb2", "sb4"]);
        let q = ListQuery { started_after_ms: Some(1002), ..ListQuery::default() };
        let ids: Vec<String> =
            store.list_sandboxes("k", &q).unwrap().0.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["sb3", "sb4"]);
    }
}

#[cfg(test)]
mod tests {
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
        assert!(
            store.verify_key("e2b_0000000000000000000000000000000000000000").unwrap().is_none()
        );
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
        let own =
            KeyLimits { max_sandboxes: Some(3), create_rate: Some(0.5), ..Default::default() };
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
        assert!(matches!(
            store.set_state("nope", SandboxState::Paused),
            Err(StoreError::NotFound(_))
        ));
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
        let ids: Vec<(&str, SandboxState)> =
            live.iter().map(|r| (r.id.as_str(), r.state)).collect();
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

        assert!(matches!(
            store.record_event("nope", "x", &json!({})),
            Err(StoreError::NotFound(_))
        ));
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
            let mode: String =
                store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
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
        let rows: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
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
        assert_eq!(
            w.iter().map(|r| r.id).collect::<Vec<_>>(),
            [2, 3],
            "since inclusive, until not"
        );
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
            store
                .insert_sandbox_audited(&sandbox("s", "k", 1), &json!({}), Some(&mut again))
                .is_err()
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
        assert!(matches!(
            store.insert_sandbox(&on_layers("a", &["nope"])),
            Err(StoreError::LayerGone)
        ));
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
}
