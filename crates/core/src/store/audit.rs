//! The audit trail.

use super::*;

impl Store {
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
    /// sandbox kill or other write, or a checkpoint). An fsync per command would be most of the
    /// audit trail's cost on the create → exec → kill path. The records written with a sandbox
    /// row ([`Store::insert_sandbox_audited`], [`Store::kill_sandbox_audited`]) get that
    /// row's durability (a create's is this one too).
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
    /// creation in one transaction: never one without the others.
    ///
    /// Committed with `synchronous=NORMAL`, like the audit trail: when this returns the
    /// transaction is in the WAL through the kernel, so a crash or `kill -9` of the server
    /// cannot lose an acknowledged create (tests/tiers.rs
    /// `an_acknowledged_create_survives_kill_9_of_the_server`); a power loss or kernel crash can
    /// lose the last ones until the next fsync (the next kill, key or other write, or a
    /// checkpoint), and it ends every sandbox of the host too, so what is lost is the record
    /// of sandboxes that no longer exist. An fsync per create cost a median 6.7 ms while
    /// other builds wrote to the same disk (docs/PERFORMANCE.md, "The `wasm` tier's pooled
    /// create, piece by piece").
    pub fn insert_sandbox_audited(
        &self,
        sb: &SandboxRecord,
        detail: &serde_json::Value,
        audit: Option<&mut AuditRecord>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let written = (|| {
            let tx = conn.transaction()?;
            insert_sandbox_on(&tx, sb)?;
            insert_event_on(&tx, &sb.id, "created", detail)?;
            if let Some(rec) = audit {
                insert_audit_on(&tx, rec)?;
            }
            tx.commit()?;
            Ok::<_, StoreError>(())
        })();
        // Back to FULL whatever happened: every other write relies on it.
        conn.pragma_update(None, "synchronous", "FULL")?;
        written
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
        let n = tx.run(
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
