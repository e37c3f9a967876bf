//! The set of trusted peers: identity ↔ public key, and how each may
//! authenticate.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use super::{COMPRESSED_KEY_LEN, PublicKey, UNCOMPRESSED_KEY_LEN};
use crate::error::KeyError;

/// Which handshakes a trusted key may authenticate with.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrustMode {
    /// Only the extended handshake. A Go-mode request for this key is
    /// refused: it may be an extended request whose extension fields were
    /// stripped on the path, to open an unsigned session as this peer.
    #[default]
    ExtendedOnly,
    /// Also the Go package's plain handshake (no mutual authentication, no
    /// signed frames): for peers running the Go package.
    GoCompatible,
}

impl TrustMode {
    /// Whether a Go-mode handshake is accepted for the key.
    pub fn allows_go_mode(self) -> bool {
        self == Self::GoCompatible
    }
}

/// A trusted key, as [`TrustStore::lookup`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedPeer {
    /// The identity the key is trusted as.
    pub identity: String,
    /// The key.
    pub key: PublicKey,
    /// Which handshakes it may use.
    pub mode: TrustMode,
    /// The chain the peer sequences, if it was trusted with one: a session
    /// it authenticates reports it in `ConnectionInfo::chain_id`.
    pub chain_id: Option<String>,
}

/// Trusted public keys by identity, safe to share and change while serving.
///
/// Keys are stored compressed, so either form of the same key matches. A key
/// is trusted for the extended handshake only unless it is added as
/// [`TrustMode::GoCompatible`].
#[derive(Debug)]
pub struct TrustStore {
    inner: RwLock<Inner>,
    /// Identities whose key or mode changed (added, rotated, removed).
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
    by_id: HashMap<String, Entry>,
    by_key: HashMap<[u8; COMPRESSED_KEY_LEN], String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: PublicKey,
    mode: TrustMode,
    chain_id: Option<String>,
}

impl TrustStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` as `id` for the extended handshake only. An id that
    /// already has a key moves to the new one (key rotation) and the old key
    /// stops being trusted. Returns the old key.
    pub fn add(
        &self,
        id: impl Into<String>,
        key: PublicKey,
    ) -> Result<Option<PublicKey>, KeyError> {
        self.add_with_mode(id, key, TrustMode::ExtendedOnly)
    }

    /// Trusts `key` as `id` for Go-mode handshakes too: an unsigned session
    /// with a peer running the Go package. See [`TrustMode::GoCompatible`].
    pub fn add_go_compatible(
        &self,
        id: impl Into<String>,
        key: PublicKey,
    ) -> Result<Option<PublicKey>, KeyError> {
        self.add_with_mode(id, key, TrustMode::GoCompatible)
    }

    /// Trusts `key` as `id` with `mode`, as [`add`](Self::add) does. An
    /// empty identity is refused: it could not be told from "no identity".
    pub fn add_with_mode(
        &self,
        id: impl Into<String>,
        key: PublicKey,
        mode: TrustMode,
    ) -> Result<Option<PublicKey>, KeyError> {
        self.add_with_chain(id, key, mode, None)
    }

    /// Trusts `key` as `id` with `mode`, as [`add_with_mode`](Self::add_with_mode)
    /// does, recording the chain the peer sequences: sessions it
    /// authenticates from then on start with that chain id. `None` records
    /// none (and forgets an earlier one); an empty chain id is refused.
    pub fn add_with_chain(
        &self,
        id: impl Into<String>,
        key: PublicKey,
        mode: TrustMode,
        chain_id: Option<String>,
    ) -> Result<Option<PublicKey>, KeyError> {
        let id = id.into();
        if id.is_empty() {
            return Err(KeyError::EmptyIdentity);
        }
        if chain_id.as_deref() == Some("") {
            return Err(KeyError::EmptyChainId);
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = inner.by_key.get(key.as_compressed())
            && *existing != id
        {
            return Err(KeyError::KeyAlreadyTrusted {
                existing: existing.clone(),
            });
        }
        inner.by_key.insert(key.to_compressed(), id.clone());
        let entry = Entry {
            key: key.clone(),
            mode,
            chain_id,
        };
        let previous = inner.by_id.insert(id.clone(), entry.clone());
        if let Some(old) = &previous
            && old.key != key
        {
            inner.by_key.remove(old.key.as_compressed());
        }
        drop(inner);
        if previous.as_ref() != Some(&entry) {
            let _ = self.changes.send(id);
        }
        Ok(previous.map(|old| old.key))
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
        let entry = inner.by_id.remove(id)?;
        inner.by_key.remove(entry.key.as_compressed());
        drop(inner);
        let _ = self.changes.send(id.to_owned());
        Some(entry.key)
    }

    /// Identities whose key, mode or chain id changes from now on (added,
    /// rotated, removed, made Go-compatible or extended-only). A
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
        self.read().by_id.get(id).map(|entry| entry.key.clone())
    }

    /// How the key trusted as `id` may authenticate.
    pub fn mode_of(&self, id: &str) -> Option<TrustMode> {
        self.read().by_id.get(id).map(|entry| entry.mode)
    }

    /// The chain id `id` is trusted with, if any.
    pub fn chain_of(&self, id: &str) -> Option<String> {
        self.read().by_id.get(id)?.chain_id.clone()
    }

    /// Finds the trusted key encoded in `bytes` (33 bytes compressed or 65
    /// uncompressed) without any curve arithmetic, so that a stranger's key
    /// costs a hash-map look-up and no more. An uncompressed key matches
    /// only if it is byte for byte the trusted key's encoding.
    pub fn lookup(&self, bytes: &[u8]) -> Option<TrustedPeer> {
        let compressed: [u8; COMPRESSED_KEY_LEN] = match bytes.len() {
            COMPRESSED_KEY_LEN => bytes.try_into().ok()?,
            UNCOMPRESSED_KEY_LEN if bytes[0] == 0x04 => {
                let mut compressed = [0; COMPRESSED_KEY_LEN];
                compressed[0] = 0x02 | (bytes[UNCOMPRESSED_KEY_LEN - 1] & 1);
                compressed[1..].copy_from_slice(&bytes[1..COMPRESSED_KEY_LEN]);
                compressed
            }
            _ => return None,
        };
        let inner = self.read();
        let identity = inner.by_key.get(&compressed)?;
        let entry = inner.by_id.get(identity)?;
        if bytes.len() == UNCOMPRESSED_KEY_LEN && entry.key.to_uncompressed()[..] != bytes[..] {
            return None;
        }
        Some(TrustedPeer {
            identity: identity.clone(),
            key: entry.key.clone(),
            mode: entry.mode,
            chain_id: entry.chain_id.clone(),
        })
    }

    /// Identities trusted for Go-mode (unsigned) handshakes, sorted.
    pub fn go_compatible_identities(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .read()
            .by_id
            .iter()
            .filter(|(_, entry)| entry.mode.allows_go_mode())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
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
