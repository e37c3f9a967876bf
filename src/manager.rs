//! The set of live connections of a server, keyed by verified identity.

use std::sync::{
    Arc, PoisonError, RwLock,
    atomic::{AtomicBool, Ordering},
};

use dashmap::DashMap;
use serde::Serialize;

use crate::{
    error::DisconnectReason,
    session::{Connection, ConnectionInfo},
};

/// Live connections by identity. A second connection of an identity replaces
/// the first, which is told `Disconnect{REQUESTED, "replaced"}`.
#[derive(Debug, Default)]
pub struct ConnectionManager {
    by_identity: DashMap<Arc<str>, Arc<Connection>>,
    /// Every live connection, for broadcasts: rebuilt on the first
    /// broadcast after a change rather than walked out of the map each time.
    everyone: RwLock<Arc<[Arc<Connection>]>>,
    /// The map changed since `everyone` was built.
    changed: AtomicBool,
}

/// Outcome of a broadcast.
#[derive(Debug, Default, Serialize)]
pub struct BroadcastReport {
    /// Identities the frame was queued for, in no particular order.
    pub delivered: Vec<Arc<str>>,
    /// Identities that were dropped, with why. Each was disconnected.
    pub dropped: Vec<DroppedPeer>,
}

/// A broadcast recipient that could not take the frame.
#[derive(Debug, Serialize)]
pub struct DroppedPeer {
    /// The peer.
    pub identity: String,
    /// Why.
    pub reason: String,
}

impl ConnectionManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `connection`; returns the connection it replaced, if any.
    pub fn insert(&self, connection: Arc<Connection>) -> Option<Arc<Connection>> {
        let replaced = self
            .by_identity
            .insert(connection.identity_arc().clone(), connection);
        self.changed.store(true, Ordering::Release);
        if let Some(old) = &replaced {
            old.close(DisconnectReason::Requested, "replaced");
        }
        replaced
    }

    /// Unregisters `connection`, unless it was already replaced by a newer one.
    pub fn remove(&self, connection: &Connection) {
        let removed = self
            .by_identity
            .remove_if(connection.identity(), |_, current| {
                current.id() == connection.id()
            });
        if removed.is_some() {
            // Let go of the connection now, not at the next broadcast; the
            // list stays a valid view for a broadcast reading it meanwhile.
            let mut everyone = self
                .everyone
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *everyone = everyone
                .iter()
                .filter(|other| other.id() != connection.id())
                .cloned()
                .collect();
            self.changed.store(true, Ordering::Release);
        }
    }

    /// The connection of `identity`.
    pub fn get(&self, identity: &str) -> Option<Arc<Connection>> {
        self.by_identity
            .get(identity)
            .map(|entry| entry.value().clone())
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.by_identity.len()
    }

    /// Whether there is no connection.
    pub fn is_empty(&self) -> bool {
        self.by_identity.is_empty()
    }

    /// Every live connection except the one of `exclude`.
    pub fn snapshot(&self, exclude: Option<&str>) -> Vec<Arc<Connection>> {
        self.by_identity
            .iter()
            .filter(|entry| Some(entry.key().as_ref()) != exclude)
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// Every live connection, shared: no allocation unless the set changed.
    pub(crate) fn everyone(&self) -> Arc<[Arc<Connection>]> {
        if self.changed.load(Ordering::Acquire) {
            // Rebuilt under the write lock, so a slower rebuild from an older
            // view never overwrites a newer one; a change made during the walk
            // sets the flag again for the next call.
            let mut everyone = self
                .everyone
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if self.changed.swap(false, Ordering::AcqRel) {
                *everyone = self
                    .by_identity
                    .iter()
                    .map(|entry| entry.value().clone())
                    .collect();
            }
            return everyone.clone();
        }
        self.everyone
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Metadata and counters of every connection.
    pub fn infos(&self) -> Vec<ConnectionInfo> {
        self.by_identity
            .iter()
            .map(|entry| entry.value().info())
            .collect()
    }
}
