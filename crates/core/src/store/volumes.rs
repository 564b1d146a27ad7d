//! Volumes: named, per-key directories under `<data-dir>/volumes` that outlive sandboxes (see
//! `SCHEMA_V8` in `schema.rs`). The row is the volume; its directory is created before the row
//! is committed and removed after the row is deleted, so a crash leaves at most a directory no
//! row names, which the next start removes (`crate::volumes::sweep`).

use super::*;

/// A volume, with the bearer token its content API takes.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRecord {
    pub id: String,
    pub key_id: String,
    pub name: String,
    pub token: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

const VOLUME_COLUMNS: &str = "id, key_id, name, token, created_at";

fn volume_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: row.get(0)?,
        key_id: row.get(1)?,
        name: row.get(2)?,
        token: row.get(3)?,
        created_at: row.get(4)?,
    })
}

impl Store {
    /// Stores a new volume. A name the key already uses is `InvalidName`.
    pub fn insert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError> {
        validate_name(&v.name)?;
        let res = self.conn().run(
            &format!("INSERT INTO volumes ({VOLUME_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
            params![v.id, v.key_id, v.name, v.token, v.created_at],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                Err(StoreError::InvalidName(format!("a volume named {:?} already exists", v.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn list_volumes(&self, key_id: &str) -> Result<Vec<VolumeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE key_id = ?1 ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([key_id], volume_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The key's volume by id.
    pub fn get_volume(&self, key_id: &str, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        Ok(self
            .conn()
            .one(
                &format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1 AND key_id = ?2"),
                params![id, key_id],
                volume_from_row,
            )
            .optional()?)
    }

    /// A volume by id alone, for the content API (which authenticates by the volume's token).
    pub fn volume_by_id(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        Ok(self
            .conn()
            .one(
                &format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1"),
                [id],
                volume_from_row,
            )
            .optional()?)
    }

    /// Every volume id, for the start-up sweep of directories no row names.
    pub fn volume_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM volumes")?;
        let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// Whether a sandbox not yet killed (running or paused) has the volume mounted.
    pub fn volume_in_use(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().one(
            "SELECT EXISTS (SELECT 1 FROM sandboxes s, json_each(s.lifecycle, '$.volumes') j \
             WHERE s.state != 'killed' AND json_extract(j.value, '$.id') = ?1)",
            [id],
            |r| r.get(0),
        )?)
    }

    /// Deletes the key's volume row; false if there is none.
    pub fn delete_volume(&self, key_id: &str, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .run("DELETE FROM volumes WHERE id = ?1 AND key_id = ?2", params![id, key_id])?;
        Ok(n > 0)
    }

    /// The sandbox a create under `idem_key` made, if it was made after `since_ms`.
    pub fn idempotent_sandbox(
        &self,
        key_id: &str,
        idem_key: &str,
        since_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .one(
                "SELECT sandbox_id FROM idempotency \
                 WHERE key_id = ?1 AND idem_key = ?2 AND created_at > ?3",
                params![key_id, idem_key, since_ms],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records that a create under `idem_key` made `sandbox_id` (replacing an expired entry).
    pub fn record_idempotent(
        &self,
        key_id: &str,
        idem_key: &str,
        sandbox_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().run(
            "INSERT OR REPLACE INTO idempotency (key_id, idem_key, sandbox_id, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![key_id, idem_key, sandbox_id, now_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, key: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            key_id: key.into(),
            name: name.into(),
            token: format!("tok-{id}"),
            created_at: 1,
        }
    }

    #[test]
    fn names_are_unique_per_key_and_volumes_are_per_key() {
        let store = Store::open_in_memory().unwrap();
        store.insert_volume(&vol("v1", "k", "data")).unwrap();
        assert!(matches!(
            store.insert_volume(&vol("v2", "k", "data")),
            Err(StoreError::InvalidName(_))
        ));
        store.insert_volume(&vol("v3", "k2", "data")).unwrap();
        assert!(matches!(
            store.insert_volume(&vol("v4", "k", "no/slash")),
            Err(StoreError::InvalidName(_))
        ));
        assert_eq!(store.list_volumes("k").unwrap().len(), 1);
        assert!(store.get_volume("k2", "v1").unwrap().is_none());
        assert_eq!(store.volume_by_id("v1").unwrap().unwrap().token, "tok-v1");
        assert!(!store.delete_volume("k2", "v1").unwrap());
        assert!(store.delete_volume("k", "v1").unwrap());
        assert_eq!(store.volume_ids().unwrap(), ["v3"]);
    }
}
