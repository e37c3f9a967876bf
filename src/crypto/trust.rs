//! The set of trusted peers: identity ↔ public key.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use super::{COMPRESSED_KEY_LEN, PublicKey};
use crate::error::KeyError;

/// Trusted public keys by identity, safe to share and change while serving.
///
/// Keys are stored compressed, so either form of the same key matches.
#[derive(Debug)]
pub struct TrustStore {
    inner: RwLock<Inner>,
    /// Identities whose key changed (added, rotated or removed).
    changes: tokio::sync::broadcast::Sender<String>,
}

impl Default for TrustStore {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changes: tokio::sync::broadcast::channel(256).0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, PublicKey>,
    by_key: HashMap<[u8; COMPRESSED_KEY_LEN], String>,
}

impl TrustStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` as `id`. An id that already has a key moves to the new one
    /// (key rotation) and the old key stops being trusted. Returns the old key.
    pub fn add(
        &self,
        id: impl Into<String>,
        key: PublicKey,
    ) -> Result<Option<PublicKey>, KeyError> {
        let id = id.into();
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = inner.by_key.get(key.as_compressed())
            && *existing != id
        {
            return Err(KeyError::KeyAlreadyTrusted {
                existing: existing.clone(),
            });
        }
        inner.by_key.insert(key.to_compressed(), id.clone());
        let previous = inner.by_id.insert(id.clone(), key.clone());
        if let Some(old) = &previous
            && old != &key
        {
            inner.by_key.remove(old.as_compressed());
        }
        drop(inner);
        if previous.as_ref() != Some(&key) {
            let _ = self.changes.send(id);
        }
        Ok(previous)
    }

    /// Trusts a key given as 33 or 65 bytes.
    pub fn add_bytes(
        &self,
        id: impl Into<String>,
        key: &[u8],
    ) -> Result<Option<PublicKey>, KeyError> {
        self.add(id, PublicKey::from_slice(key)?)
    }

    /// Stops trusting `id`; returns its key if it had one.
    pub fn remove(&self, id: &str) -> Option<PublicKey> {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let key = inner.by_id.remove(id)?;
        inner.by_key.remove(key.as_compressed());
        drop(inner);
        let _ = self.changes.send(id.to_owned());
        Some(key)
    }

    /// Identities whose key changes from now on (added, rotated, removed). A
    /// lagging receiver should re-check every identity it cares about.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Whether `key` is trusted under any identity.
    pub fn is_trusted(&self, key: &PublicKey) -> bool {
        self.read().by_key.contains_key(key.as_compressed())
    }

    /// The identity `key` is trusted as.
    pub fn identity_of(&self, key: &PublicKey) -> Option<String> {
        self.read().by_key.get(key.as_compressed()).cloned()
    }

    /// The key trusted as `id`.
    pub fn key_of(&self, id: &str) -> Option<PublicKey> {
        self.read().by_id.get(id).cloned()
    }

    /// Every trusted identity, sorted.
    pub fn identities(&self) -> Vec<String> {
        let mut ids: Vec<_> = self.read().by_id.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }
}
