//! Sandbox records (and their listing), snapshots and lifecycle events.

use super::*;

impl Store {
    /// What still needs a template's files: (kind, id, template as recorded) of every sandbox
    /// not killed (running or paused: a paused one resumes on them) and every snapshot (its
    /// layers sit on the template's). Template names are as their creators wrote them; the
    /// caller compares them in canonical form.
    pub fn template_users(&self) -> Result<Vec<(&'static str, String, String)>, StoreError> {
        let conn = self.conn();
        let mut out = Vec::new();
        let mut q = conn.prepare("SELECT id, template FROM sandboxes WHERE state != 'killed'")?;
        for r in q.query_map([], |r| Ok(("sandbox", r.get(0)?, r.get(1)?)))? {
            out.push(r?);
        }
        let mut q = conn.prepare("SELECT id, template FROM snapshots")?;
        for r in q.query_map([], |r| Ok(("snapshot", r.get(0)?, r.get(1)?)))? {
            out.push(r?);
        }
        Ok(out)
    }

    // ---- Sandboxes ---------------------------------------------------------------------

    pub fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        insert_sandbox_on(&self.conn(), rec)
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let rec = self
            .conn()
            .one(
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
        self.restarted_because(rec, "api")
    }

    /// [`Store::restarted`], recording why it resumed (`api` or `traffic`) in the event.
    pub fn restarted_because(&self, rec: &SandboxRecord, cause: &str) -> Result<(), StoreError> {
        let n = self.conn().run(
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
        self.record_event(&rec.id, "resumed", &serde_json::json!({"memory": false, "cause": cause}))
    }

    pub fn set_lifecycle(&self, id: &str, lifecycle: &Lifecycle) -> Result<(), StoreError> {
        self.update_sandbox(id, "lifecycle = ?2", &serde_json::to_string(lifecycle)?)
    }

    /// Records (or, with `None`, clears) the agent process and cgroup slot backing a sandbox,
    /// so a restarted server can re-attach to it.
    pub fn set_agent(
        &self,
        id: &str,
        pid: Option<i32>,
        slot: Option<u32>,
    ) -> Result<(), StoreError> {
        let n = self.conn().run(
            "UPDATE sandboxes SET agent_pid = ?2, cgroup_slot = ?3 WHERE id = ?1",
            params![id, pid, slot],
        )?;
        not_found_if_zero(n, id)
    }

    /// Removes the sandbox and, via ON DELETE CASCADE, its events.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let n = self.conn().run("DELETE FROM sandboxes WHERE id = ?1", [id])?;
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
        // Inclusive: a client that passes back a sandbox's own `startedAt` (millisecond
        // precision, as we print it) expects that sandbox in the list.
        if let Some(after) = query.started_after_ms {
            sql.push_str(" AND created_at >= ?");
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
            .run(&format!("UPDATE sandboxes SET {set} WHERE id = ?1"), params![id, value])?;
        not_found_if_zero(n, id)
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
        Ok(self.conn().run("DELETE FROM snapshots WHERE id = ?1", [id])? > 0)
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
}
