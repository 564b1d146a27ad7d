//! Published lifecycle events, webhook registrations and the webhook outbox (see `SCHEMA_V7`
//! in `schema.rs`).

use super::*;

/// One published lifecycle event (E2B's `sandbox.lifecycle.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// Position in the feed (cursor order).
    pub seq: i64,
    /// A UUID, stable across deliveries: receivers deduplicate on it.
    pub id: String,
    pub key_id: String,
    pub sandbox_id: String,
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub ts_ms: i64,
    /// `sandbox.lifecycle.created`, `...killed`, ...
    pub kind: String,
    /// What the server recorded with the state change (its cause among it).
    pub detail: serde_json::Value,
}

/// A webhook registration. The secret is kept in plain text because every delivery is
/// signed with it; it is never returned by the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub key_id: String,
    pub name: String,
    pub url: String,
    pub enabled: bool,
    pub events: Vec<String>,
    pub secret: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// One event queued for one webhook, with what its attempts so far gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    /// The event's id (UUID).
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (gave up).
    pub state: String,
    pub attempts: u32,
    /// Unix milliseconds of the next attempt (pending only).
    pub next_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub settled_at: Option<i64>,
}

/// A delivery due now, with what sending it needs.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub delivery: Delivery,
    pub webhook: Webhook,
    pub event: LifecycleEvent,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The receiver answered 2xx.
    Delivered(u16),
    /// Try again at `next_at` (Unix ms), or give up when `None`.
    Failed { status: Option<u16>, error: String, next_at: Option<i64> },
}

const EVENT_COLUMNS: &str = "seq, id, key_id, sandbox_id, template, metadata, ts, type, detail";
const WEBHOOK_COLUMNS: &str = "id, key_id, name, url, enabled, events, secret, created_at";
const DELIVERY_COLUMNS: &str = "d.id, d.webhook_id, e.id, e.type, d.state, d.attempts, \
     d.next_at, d.last_status, d.last_error, d.created_at, d.settled_at";

fn event_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<LifecycleEvent> {
    let detail: String = row.get(at + 8)?;
    Ok(LifecycleEvent {
        seq: row.get(at)?,
        id: row.get(at + 1)?,
        key_id: row.get(at + 2)?,
        sandbox_id: row.get(at + 3)?,
        template: row.get(at + 4)?,
        metadata: json_column(row, at + 5)?,
        ts_ms: row.get(at + 6)?,
        kind: row.get(at + 7)?,
        // An unreadable detail loses the cause, not the event.
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
    })
}

fn webhook_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<Webhook> {
    let events: String = row.get(at + 5)?;
    Ok(Webhook {
        id: row.get(at)?,
        key_id: row.get(at + 1)?,
        name: row.get(at + 2)?,
        url: row.get(at + 3)?,
        enabled: row.get(at + 4)?,
        events: serde_json::from_str(&events).unwrap_or_default(),
        secret: row.get(at + 6)?,
        created_at: row.get(at + 7)?,
    })
}

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: row.get(0)?,
        webhook_id: row.get(1)?,
        event_id: row.get(2)?,
        event_type: row.get(3)?,
        state: row.get(4)?,
        attempts: row.get(5)?,
        next_at: row.get(6)?,
        last_status: row.get(7)?,
        last_error: row.get(8)?,
        created_at: row.get(9)?,
        settled_at: row.get(10)?,
    })
}

impl Store {
    // ---- Lifecycle events ----------------------------------------------------------------

    /// The key's lifecycle events (of one sandbox when `sandbox_id` is given), skipping
    /// `offset`, at most `limit`, oldest first when `ascending`.
    pub fn lifecycle_events(
        &self,
        key_id: &str,
        sandbox_id: Option<&str>,
        offset: u32,
        limit: u32,
        ascending: bool,
    ) -> Result<Vec<LifecycleEvent>, StoreError> {
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(StoreError::InvalidLimit(limit));
        }
        let order = if ascending { "ASC" } else { "DESC" };
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM lifecycle_events \
             WHERE key_id = ?1 AND (?2 IS NULL OR sandbox_id = ?2) \
             ORDER BY seq {order} LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = stmt
            .query_map(params![key_id, sandbox_id, limit, offset], |r| event_from_row(r, 0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    // ---- Webhooks ------------------------------------------------------------------------

    pub fn insert_webhook(&self, w: &Webhook) -> Result<(), StoreError> {
        self.conn().run(
            &format!(
                "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                w.id,
                w.key_id,
                w.name,
                w.url,
                w.enabled,
                serde_json::to_string(&w.events)?,
                w.secret,
                w.created_at
            ],
        )?;
        Ok(())
    }

    /// Replaces a webhook's settings (never its owner or id).
    pub fn update_webhook(&self, w: &Webhook) -> Result<(), StoreError> {
        let n = self.conn().run(
            "UPDATE webhooks SET name = ?3, url = ?4, enabled = ?5, events = ?6, secret = ?7 \
             WHERE id = ?1 AND key_id = ?2",
            params![
                w.id,
                w.key_id,
                w.name,
                w.url,
                w.enabled,
                serde_json::to_string(&w.events)?,
                w.secret
            ],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("webhook {}", w.id)));
        }
        Ok(())
    }

    pub fn list_webhooks(&self, key_id: &str) -> Result<Vec<Webhook>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE key_id = ?1 ORDER BY created_at, id"
        ))?;
        let rows =
            stmt.query_map([key_id], |r| webhook_from_row(r, 0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    pub fn get_webhook(&self, key_id: &str, id: &str) -> Result<Option<Webhook>, StoreError> {
        Ok(self
            .conn()
            .one(
                &format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1 AND key_id = ?2"),
                params![id, key_id],
                |r| webhook_from_row(r, 0),
            )
            .optional()?)
    }

    /// Removes a webhook and its deliveries (pending ones are never sent). False if the key
    /// has no such webhook.
    pub fn delete_webhook(&self, key_id: &str, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n =
            tx.run("DELETE FROM webhooks WHERE id = ?1 AND key_id = ?2", params![id, key_id])?;
        if n > 0 {
            tx.run("DELETE FROM webhook_deliveries WHERE webhook_id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    // ---- The outbox ----------------------------------------------------------------------

    /// Pending deliveries due at `now_ms`, oldest event first, at most `limit`.
    pub fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<DueDelivery>, StoreError> {
        let conn = self.conn();
        let w_cols = WEBHOOK_COLUMNS.split(", ").map(|c| format!("w.{c}")).collect::<Vec<_>>();
        let e_cols = EVENT_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DELIVERY_COLUMNS}, {}, {} FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id \
             JOIN lifecycle_events e ON e.seq = d.event_seq \
             WHERE d.state = 'pending' AND d.next_at <= ?1 \
             ORDER BY d.event_seq, d.id LIMIT ?2",
            w_cols.join(", "),
            e_cols.join(", ")
        ))?;
        let rows = stmt
            .query_map(params![now_ms, limit], |r| {
                Ok(DueDelivery {
                    delivery: delivery_from_row(r)?,
                    webhook: webhook_from_row(r, 11)?,
                    event: event_from_row(r, 19)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records one attempt at delivery `id`.
    pub fn record_attempt(&self, id: &str, attempt: &Attempt) -> Result<(), StoreError> {
        let now = unix_millis();
        let conn = self.conn();
        match attempt {
            Attempt::Delivered(status) => conn.run(
                "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, \
                 last_status = ?2, last_error = NULL, settled_at = ?3 WHERE id = ?1",
                params![id, status, now],
            )?,
            Attempt::Failed { status, error, next_at } => conn.run(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = ?2, \
                 last_error = ?3, state = CASE WHEN ?4 IS NULL THEN 'failed' ELSE 'pending' END, \
                 next_at = COALESCE(?4, next_at), \
                 settled_at = CASE WHEN ?4 IS NULL THEN ?5 ELSE NULL END WHERE id = ?1",
                params![id, status, error, next_at, now],
            )?,
        };
        Ok(())
    }

    /// Makes every pending delivery due now: a restarted server retries at once what the
    /// previous one was still backing off on.
    pub fn retry_pending_now(&self, now_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn().run(
            "UPDATE webhook_deliveries SET next_at = ?1 WHERE state = 'pending' AND next_at > ?1",
            [now_ms],
        )?)
    }

    /// Forgets events older than `before_ms` and their deliveries (settled or not): the feed
    /// and the delivery log keep a bounded window. Returns how many events went.
    pub fn prune_events(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.run(
            "DELETE FROM webhook_deliveries WHERE event_seq IN \
             (SELECT seq FROM lifecycle_events WHERE ts < ?1)",
            [before_ms],
        )?;
        let n = tx.run("DELETE FROM lifecycle_events WHERE ts < ?1", [before_ms])?;
        tx.commit()?;
        Ok(n)
    }

    /// The delivery log of one of the key's webhooks, newest first.
    pub fn deliveries(
        &self,
        key_id: &str,
        webhook_id: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(StoreError::InvalidLimit(limit));
        }
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
             JOIN webhooks w ON w.id = d.webhook_id \
             JOIN lifecycle_events e ON e.seq = d.event_seq \
             WHERE d.webhook_id = ?1 AND w.key_id = ?2 \
             ORDER BY d.event_seq DESC, d.id LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(params![webhook_id, key_id, limit], delivery_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::sandbox;
    use super::*;

    fn hook(id: &str, key: &str, events: &[&str], enabled: bool) -> Webhook {
        Webhook {
            id: id.into(),
            key_id: key.into(),
            name: id.into(),
            url: "http://127.0.0.1:9/".into(),
            enabled,
            events: events.iter().map(|s| s.to_string()).collect(),
            secret: "s".into(),
            created_at: 1,
        }
    }

    #[test]
    fn state_changes_publish_events_and_queue_deliveries_for_subscribers_only() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_webhook(&hook(
                "all",
                "k",
                &["sandbox.lifecycle.created", "sandbox.lifecycle.killed"],
                true,
            ))
            .unwrap();
        store.insert_webhook(&hook("kills", "k", &["sandbox.lifecycle.killed"], true)).unwrap();
        store.insert_webhook(&hook("off", "k", &["sandbox.lifecycle.created"], false)).unwrap();
        store.insert_webhook(&hook("other", "k2", &["sandbox.lifecycle.created"], true)).unwrap();
        let mut rec = sandbox("sb", "k", 1000);
        rec.metadata.insert("m".into(), "v".into());
        store.insert_sandbox_audited(&rec, &serde_json::json!({}), None).unwrap();
        store.kill_sandbox_audited("sb", &serde_json::json!({"reason": "timeout"}), None).unwrap();
        // Kinds that are not lifecycle events publish nothing.
        store.record_event("sb", "reattached", &serde_json::json!({})).unwrap();

        let evs = store.lifecycle_events("k", Some("sb"), 0, 100, true).unwrap();
        let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["sandbox.lifecycle.created", "sandbox.lifecycle.killed"]);
        assert_eq!(evs[0].metadata.get("m").map(String::as_str), Some("v"));
        assert_eq!(evs[1].detail["reason"], "timeout");
        assert_ne!(evs[0].id, evs[1].id);
        assert!(store.lifecycle_events("k2", Some("sb"), 0, 100, true).unwrap().is_empty());
        // Newest first, paged.
        let page = store.lifecycle_events("k", None, 1, 1, false).unwrap();
        assert_eq!(page[0].kind, "sandbox.lifecycle.created");

        let due = store.due_deliveries(i64::MAX, 100).unwrap();
        let mut got: Vec<(String, String)> =
            due.iter().map(|d| (d.webhook.id.clone(), d.event.kind.clone())).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("all".to_string(), "sandbox.lifecycle.created".to_string()),
                ("all".to_string(), "sandbox.lifecycle.killed".to_string()),
                ("kills".to_string(), "sandbox.lifecycle.killed".to_string()),
            ]
        );
    }

    #[test]
    fn attempts_retry_then_settle_and_a_deleted_hook_takes_its_deliveries() {
        let store = Store::open_in_memory().unwrap();
        store.insert_webhook(&hook("h", "k", &["sandbox.lifecycle.created"], true)).unwrap();
        store
            .insert_sandbox_audited(&sandbox("sb", "k", 1000), &serde_json::json!({}), None)
            .unwrap();
        let d = store.due_deliveries(i64::MAX, 10).unwrap().remove(0);
        let later = unix_millis() + 60_000;
        let failed =
            Attempt::Failed { status: Some(500), error: "boom".into(), next_at: Some(later) };
        store.record_attempt(&d.delivery.id, &failed).unwrap();
        assert!(store.due_deliveries(unix_millis(), 10).unwrap().is_empty(), "backing off");
        // A restart makes it due at once.
        assert_eq!(store.retry_pending_now(unix_millis()).unwrap(), 1);
        assert_eq!(store.due_deliveries(unix_millis() + 1, 10).unwrap().len(), 1);
        store.record_attempt(&d.delivery.id, &Attempt::Delivered(204)).unwrap();
        assert!(store.due_deliveries(i64::MAX, 10).unwrap().is_empty());
        let log = store.deliveries("k", "h", 10).unwrap();
        assert_eq!(
            (log[0].state.as_str(), log[0].attempts, log[0].last_status),
            ("delivered", 2, Some(204))
        );
        assert!(store.deliveries("k2", "h", 10).unwrap().is_empty(), "another key's log is empty");
        assert!(!store.delete_webhook("k2", "h").unwrap());
        assert!(store.delete_webhook("k", "h").unwrap());
        assert!(store.deliveries("k", "h", 10).unwrap().is_empty());
    }

    #[test]
    fn old_events_and_their_deliveries_are_pruned() {
        let store = Store::open_in_memory().unwrap();
        store.insert_webhook(&hook("h", "k", &["sandbox.lifecycle.created"], true)).unwrap();
        store
            .insert_sandbox_audited(&sandbox("sb", "k", 1000), &serde_json::json!({}), None)
            .unwrap();
        assert_eq!(store.prune_events(0).unwrap(), 0, "nothing that old");
        assert_eq!(store.prune_events(i64::MAX).unwrap(), 1);
        assert!(store.lifecycle_events("k", None, 0, 10, true).unwrap().is_empty());
        assert!(store.due_deliveries(i64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn giving_up_marks_failed_and_idempotency_keys_expire() {
        let store = Store::open_in_memory().unwrap();
        store.insert_webhook(&hook("h", "k", &["sandbox.lifecycle.created"], true)).unwrap();
        store
            .insert_sandbox_audited(&sandbox("sb", "k", 1000), &serde_json::json!({}), None)
            .unwrap();
        let d = store.due_deliveries(i64::MAX, 10).unwrap().remove(0);
        let gave_up = Attempt::Failed { status: None, error: "refused".into(), next_at: None };
        store.record_attempt(&d.delivery.id, &gave_up).unwrap();
        assert!(store.due_deliveries(i64::MAX, 10).unwrap().is_empty());
        assert_eq!(store.deliveries("k", "h", 10).unwrap()[0].state, "failed");

        store.record_idempotent("k", "retry-1", "sb", 5_000).unwrap();
        assert_eq!(store.idempotent_sandbox("k", "retry-1", 4_000).unwrap().as_deref(), Some("sb"));
        assert_eq!(store.idempotent_sandbox("k", "retry-1", 6_000).unwrap(), None, "expired");
        assert_eq!(store.idempotent_sandbox("k2", "retry-1", 0).unwrap(), None, "per key");
    }
}
