//! API keys: created with their plaintext shown once, stored as a hash with quotas and tiers.

use super::*;

impl Store {
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
        self.conn().run(
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
        let n = self.conn().run(
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
            .one(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"), [id], key_from_row)
            .optional()?;
        Ok(info)
    }

    /// Looks the key up by its hash. A timing side channel would only reveal hash prefixes of
    /// stored keys, which does not help forge a plaintext, so no constant-time compare.
    pub fn verify_key(&self, plaintext: &str) -> Result<Option<KeyInfo>, StoreError> {
        let info = self
            .conn()
            .one(
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
        let n = self.conn().run("DELETE FROM api_keys WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("api key {id}")));
        }
        Ok(())
    }

    /// Every key as stored (its hash, never a plaintext), for cluster replication.
    pub fn export_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, name, key_hash, created_at, operator, limits, tiers FROM api_keys \
             ORDER BY created_at, id",
        )?;
        let keys = stmt
            .query_map([], |r| {
                Ok(StoredKey {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    key_hash: r.get(2)?,
                    created_at: r.get(3)?,
                    operator: r.get(4)?,
                    limits: r.get(5)?,
                    tiers: r.get(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// Adds a key another cluster node published, unless its id or hash is already here.
    /// Returns whether it was added.
    pub fn import_key(&self, k: &StoredKey) -> Result<bool, StoreError> {
        let n = self.conn().run(
            "INSERT OR IGNORE INTO api_keys (id, name, key_hash, created_at, operator, limits, \
             tiers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![k.id, k.name, k.key_hash, k.created_at, k.operator, k.limits, k.tiers],
        )?;
        Ok(n > 0)
    }
}

/// An API key row as stored: what cluster nodes replicate to each other.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub id: String,
    pub name: String,
    /// SHA-256 of the plaintext, hex.
    pub key_hash: String,
    pub created_at: i64,
    pub operator: bool,
    pub limits: String,
    pub tiers: Option<String>,
}
