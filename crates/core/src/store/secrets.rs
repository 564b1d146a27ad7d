//! Secrets (see `SCHEMA_V9` in `schema.rs`): per-key rows whose value is stored sealed only;
//! sealing and opening is `crate::secrets::Vault`'s, never this module's.

use super::*;

/// A secret as stored: its metadata and its sealed value.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretRecord {
    pub id: String,
    pub key_id: String,
    /// Lower-cased.
    pub name: String,
    /// 1 on create, one more on each update.
    pub version: i64,
    pub metadata: BTreeMap<String, String>,
    /// Nonce and ciphertext with its tag (`crate::secrets::Vault::seal`).
    pub sealed: Vec<u8>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

const SECRET_COLUMNS: &str = "id, key_id, name, version, metadata, sealed, created_at, updated_at";

fn secret_from_row(row: &Row<'_>) -> rusqlite::Result<SecretRecord> {
    let meta: String = row.get(4)?;
    Ok(SecretRecord {
        id: row.get(0)?,
        key_id: row.get(1)?,
        name: row.get(2)?,
        version: row.get(3)?,
        metadata: serde_json::from_str(&meta).unwrap_or_default(),
        sealed: row.get(5)?,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
    })
}

fn meta_text(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

impl Store {
    /// Stores a new secret. A name the key already uses is `InvalidName`.
    pub fn insert_secret(&self, s: &SecretRecord) -> Result<(), StoreError> {
        let res = self.conn().run(
            &format!(
                "INSERT INTO secrets ({SECRET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ),
            params![
                s.id,
                s.key_id,
                s.name,
                s.version,
                meta_text(&s.metadata),
                s.sealed,
                s.created_at,
                s.updated_at
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                Err(StoreError::InvalidName(format!("a secret named {:?} already exists", s.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The key's secrets, oldest first, from `after` (an id, exclusive) on, at most `limit`.
    pub fn list_secrets(
        &self,
        key_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE key_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(params![key_id, after.unwrap_or(""), limit as i64], secret_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The key's secret by id or (lower-cased) name.
    pub fn get_secret(
        &self,
        key_id: &str,
        which: &str,
    ) -> Result<Option<SecretRecord>, StoreError> {
        Ok(self
            .conn()
            .one(
                &format!(
                    "SELECT {SECRET_COLUMNS} FROM secrets WHERE key_id = ?1 AND (id = ?2 OR name = lower(?2))"
                ),
                params![key_id, which],
                secret_from_row,
            )
            .optional()?)
    }

    /// Replaces a secret's value (sealed for `version`) and, when given, its metadata, if its
    /// version is still `version - 1` (a concurrent update loses instead of being lost).
    pub fn update_secret(&self, s: &SecretRecord) -> Result<bool, StoreError> {
        let n = self.conn().run(
            "UPDATE secrets SET version = ?3, metadata = ?4, sealed = ?5, updated_at = ?6 \
             WHERE id = ?1 AND key_id = ?2 AND version = ?3 - 1",
            params![s.id, s.key_id, s.version, meta_text(&s.metadata), s.sealed, s.updated_at],
        )?;
        Ok(n == 1)
    }

    /// Deletes the key's secret by id or name; false if there was none.
    pub fn delete_secret(&self, key_id: &str, which: &str) -> Result<bool, StoreError> {
        let n = self.conn().run(
            "DELETE FROM secrets WHERE key_id = ?1 AND (id = ?2 OR name = lower(?2))",
            params![key_id, which],
        )?;
        Ok(n > 0)
    }
}
