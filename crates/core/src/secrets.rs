//! Secrets' sealing and lookup: the vault that seals values at rest, and the lookup the egress
//! proxy uses to put a value into a request for a host whose rule names it
//! (`ringfence_net::intercept`). The `/secrets` API is the server's (`ringfence_server::secrets`).
//!
//! A value is kept sealed with ChaCha20-Poly1305 under a 256-bit key that lives in a file
//! outside the database (`--secrets-key-file`, default `<data-dir>/secrets.key`, made 0600 on
//! first start); the sealed bytes are bound to the secret's id, version and API key, so a row
//! copied to another key or rolled back to another version does not open. No response, log or
//! audit record carries a value.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::store::{SecretRecord, Store};

/// Errors opening the vault's key.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("secrets key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets key file {0} must hold 64 hex digits (a 256-bit key)")]
    Format(String),
    #[error("secrets key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Mode { path: String, mode: u32 },
    #[error("a sealed secret did not open (wrong key, or the row was altered)")]
    Open,
}

/// The key secrets are sealed with.
pub struct Vault {
    key: LessSafeKey,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").finish_non_exhaustive()
    }
}

impl Vault {
    /// Reads the key at `path`, or makes one there (0600, never overwriting) if none exists.
    pub fn open_or_create(path: &FsPath) -> Result<Vault, VaultError> {
        let io = |source| VaultError::Io { path: path.display().to_string(), source };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(VaultError::Mode { path: path.display().to_string(), mode });
                }
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let text = hex::encode(key);
                let made = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
                match made {
                    Ok(()) => text,
                    // Another server on the same directory made it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::read_to_string(path).map_err(io)?
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            Err(e) => return Err(io(e)),
        };
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| VaultError::Format(path.display().to_string()))?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| VaultError::Format(path.display().to_string()))?;
        Ok(Vault { key: LessSafeKey::new(key) })
    }

    fn aad(s: &SecretRecord) -> Vec<u8> {
        format!("ringfence-secret\n{}\n{}\n{}", s.id, s.version, s.key_id).into_bytes()
    }

    /// Seals `value` for `s` (its id, version and key): a fresh random nonce, then the
    /// ciphertext and tag.
    pub fn seal(&self, s: &SecretRecord, value: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.seal_for(Self::aad(s), value)
    }

    pub fn open(&self, s: &SecretRecord) -> Result<Vec<u8>, VaultError> {
        self.open_for(Self::aad(s), &s.sealed)
    }

    /// Seals `value` bound to `context` (what it is for: opening it under another context
    /// fails). For credentials kept beside a sandbox's settings (its egress proxy password).
    pub fn seal_for(&self, context: Vec<u8>, value: &[u8]) -> Result<Vec<u8>, VaultError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut buf = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buf,
            )
            .map_err(|_| VaultError::Open)?;
        Ok([nonce.as_slice(), &buf].concat())
    }

    pub fn open_for(&self, context: Vec<u8>, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < NONCE_LEN {
            return Err(VaultError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| VaultError::Open)?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut buf)
            .map_err(|_| VaultError::Open)?;
        Ok(plain.to_vec())
    }
}

/// The vault's default place: the data directory, beside (not inside) the database.
pub fn default_key_path(data_dir: &FsPath) -> PathBuf {
    data_dir.join("secrets.key")
}

/// The egress proxy's view of one API key's secrets: name → value.
pub fn lookup(
    store: Arc<Store>,
    vault: Arc<Vault>,
    key_id: String,
) -> ringfence_net::intercept::SecretLookup {
    Arc::new(move |name: &str| {
        // One short indexed read under the store's mutex (see crate::store).
        let rec = store.get_secret(&key_id, name).ok().flatten()?;
        if rec.name != name {
            // Looked up by name only: an id in a placeholder names nothing.
            return None;
        }
        match vault.open(&rec) {
            Ok(v) => String::from_utf8(v).ok(),
            Err(e) => {
                tracing::warn!(secret = %rec.id, error = %e, "a secret did not open");
                None
            }
        }
    })
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    fn rec() -> SecretRecord {
        SecretRecord {
            id: "sec_1".into(),
            key_id: "k1".into(),
            name: "n".into(),
            version: 1,
            metadata: BTreeMap::new(),
            sealed: Vec::new(),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn sealed_values_open_only_for_their_row_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let v = Vault::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut r = rec();
        r.sealed = v.seal(&r, b"hunter2-value").unwrap();
        assert!(!r.sealed.windows(13).any(|w| w == b"hunter2-value"), "stored in the clear");
        assert_eq!(v.open(&r).unwrap(), b"hunter2-value");
        // The same key file opens it again after a restart.
        assert_eq!(Vault::open_or_create(&path).unwrap().open(&r).unwrap(), b"hunter2-value");
        // Moved to another API key, or another version: it does not open.
        let mut other = r.clone();
        other.key_id = "k2".into();
        assert!(v.open(&other).is_err());
        let mut older = r.clone();
        older.version = 2;
        assert!(v.open(&older).is_err());
        // Another key file: it does not open.
        let v2 = Vault::open_or_create(&dir.path().join("other.key")).unwrap();
        assert!(v2.open(&r).is_err());
        // A key file others can read is refused, with the reason.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Vault::open_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
