//! Embedded state store: API keys, sandbox records and their lifecycle events, and the audit
//! trail, in one SQLite file.
//!
//! The server promises that a key or sandbox survives a `kill -9` once it has been
//! acknowledged to the client, so the database runs in WAL mode with `synchronous=FULL`: every
//! commit is fsynced before the call returns. Two exceptions commit with `synchronous=NORMAL`
//! (in the WAL through the kernel: a server `kill -9` cannot lose them, a power loss can until
//! the next fsync): standalone audit records ([`Store::insert_audits`]) and a sandbox's create
//! ([`Store::insert_sandbox_audited`]: a power loss ends the sandbox with the host). Each method is one short statement or
//! transaction under the connection mutex, so callers may run it from `spawn_blocking` or
//! briefly inline without starving other requests.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, ToSql, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The schema this build writes and understands.
const SCHEMA_VERSION: i64 = 9;

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

mod audit;
mod events;
mod keys;
mod layers;
mod sandboxes;
mod schema;
mod secrets;
#[cfg(test)]
mod tests;
mod volumes;

pub use events::{Attempt, Delivery, DueDelivery, LifecycleEvent, Webhook};
pub use keys::StoredKey;
use schema::migrate;
pub use secrets::SecretRecord;
pub use volumes::VolumeRecord;

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
    /// Volumes attached to it (`crate::volumes`): carried across pauses, restarts and forks.
    pub volumes: Vec<VolumeMount>,
}

/// A volume attached to a sandbox: the volume's id and where it shows inside.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub id: String,
    pub path: String,
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

/// How many prepared statements a connection keeps (rusqlite's default is 16; the create,
/// command and kill paths alone run about 20 distinct ones).
const STATEMENT_CACHE: usize = 96;

/// One statement run through the connection's prepared-statement cache. Parsing a statement
/// and compiling it, with the triggers it fires, took more CPU than running it: `perf` over
/// `bench/api.py`'s create → command → kill cycle put `sqlite3Prepare` at about 0.6 ms per
/// cycle, all of it under the connection's mutex, which every request of the server waits on.
trait Cached {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn one<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn one<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
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
        // Room for every statement a sandbox's create, commands and kill run (see [`Cached`]).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write: every multi-step
        // write runs in a rusqlite Transaction, which rolls back on drop. So the connection is
        // still consistent and refusing all further use would only turn one bug into an outage.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn insert_snapshot_on(conn: &Connection, s: &SnapshotRecord) -> Result<(), StoreError> {
    conn.run(
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
    conn.run("INSERT INTO layers (id, created_at) VALUES (?1, ?2)", params![layer, unix_millis()])?;
    Ok(())
}

fn insert_sandbox_on(conn: &Connection, rec: &SandboxRecord) -> Result<(), StoreError> {
    let metadata = serde_json::to_string(&rec.metadata)?;
    let env = serde_json::to_string(&rec.env)?;
    let res = conn.run(
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
    let res = conn.run(
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

pub fn encode_token(created_at: i64, id: &str) -> String {
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
        // Inclusive: a sandbox's own start time lists it.
        let q = ListQuery { started_after_ms: Some(1002), ..ListQuery::default() };
        let ids: Vec<String> =
            store.list_sandboxes("k", &q).unwrap().0.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["sb2", "sb3", "sb4"]);
    }
}
