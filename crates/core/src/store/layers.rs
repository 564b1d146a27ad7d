//! Saved layers and their references (see `SCHEMA_V4` in `schema.rs`), committed together
//! with the state changes that make or drop them.

use super::*;

impl Store {
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
        self.pause_sandbox_because(id, layer, lifecycle, memory, "api")
    }

    /// [`Store::pause_sandbox`], recording why (`api`, `timeout`, `idle`, `memory_pressure`)
    /// in the event.
    pub fn pause_sandbox_because(
        &self,
        id: &str,
        layer: Option<&str>,
        lifecycle: &Lifecycle,
        memory: bool,
        cause: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(layer) = layer {
            insert_layer_on(&tx, layer)?;
        }
        let n = tx.run(
            "UPDATE sandboxes SET lifecycle = ?2, state = ?3 WHERE id = ?1",
            params![id, serde_json::to_string(lifecycle)?, SandboxState::Paused],
        )?;
        not_found_if_zero(n, id)?;
        insert_event_on(
            &tx,
            id,
            "paused",
            &serde_json::json!({ "memory": memory, "cause": cause }),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds sandbox `rec`, paused on another node to its files (copied here already), with
    /// the rows of its layers, in one transaction (cluster mode's resume elsewhere).
    pub fn adopt_paused(&self, rec: &SandboxRecord, from: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for l in &rec.lifecycle.layers {
            tx.run(
                "INSERT OR IGNORE INTO layers (id, created_at) VALUES (?1, ?2)",
                params![l, unix_millis()],
            )?;
        }
        insert_sandbox_on(&tx, rec)?;
        insert_event_on(&tx, &rec.id, "adopted", &serde_json::json!({ "from_node": from }))?;
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
        tx.run(
            "INSERT INTO layer_refs (layer, kind, owner) VALUES (?1, 'pending', ?2)",
            params![layer, owner],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Drops the references of the operation `owner`; layers nothing else holds are dropped.
    pub fn release_pending(&self, owner: &str) -> Result<(), StoreError> {
        self.conn().run("DELETE FROM layer_refs WHERE kind = 'pending' AND owner = ?1", [owner])?;
        Ok(())
    }

    /// At start: the operations of an earlier server process died with it, so their
    /// references go (and with them layers nothing else holds).
    pub fn reset_pending_layers(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.run("DELETE FROM layer_refs WHERE kind = 'pending'", [])?;
        // None should exist (a row is only ever written with its first reference); a hand-edited
        // database is not worth keeping a layer for.
        tx.run("DELETE FROM layers WHERE id NOT IN (SELECT layer FROM layer_refs)", [])?;
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
            tx.run("DELETE FROM layer_trash WHERE id = ?1", [id])?;
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
}
