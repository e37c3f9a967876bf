//! Application metadata: ASCII request metadata a client sends when it
//! opens its stream, and what a server keeps of it per connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, KeyAndValueRef, MetadataMap};
use tracing::warn;

use super::{CLIENT_ID_METADATA, DISCONNECT_DETAILS_TRAILER, DISCONNECT_REASON_TRAILER};
use crate::error::TransportError;

/// Keys the back-end or HTTP/2 itself uses; an application entry may not
/// set them (`grpc-` is reserved as a prefix).
const RESERVED: &[&str] = &[
    CLIENT_ID_METADATA,
    "authorization",
    DISCONNECT_REASON_TRAILER,
    DISCONNECT_DETAILS_TRAILER,
    "content-type",
    "te",
    "user-agent",
    "host",
    "connection",
];

fn is_reserved(key: &str) -> bool {
    RESERVED.contains(&key) || key.starts_with("grpc-") || key.starts_with(':')
}

/// Checks the client's entries and turns them into metadata: lowercase
/// ASCII keys that neither the back-end nor gRPC reserves, with visible
/// ASCII values.
pub(super) fn client_entries(
    entries: &[(String, String)],
) -> Result<Vec<(AsciiMetadataKey, AsciiMetadataValue)>, TransportError> {
    let invalid = |what: String| TransportError::Config(format!("gRPC metadata: {what}"));
    entries
        .iter()
        .map(|(key, value)| {
            if key.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(invalid(format!("key {key:?} must be lowercase")));
            }
            if is_reserved(key) {
                return Err(invalid(format!("key {key:?} is reserved")));
            }
            // Binary (`-bin`) entries are not application text.
            let parsed = AsciiMetadataKey::from_bytes(key.as_bytes())
                .ok()
                .filter(|_| !key.ends_with("-bin"))
                .ok_or_else(|| invalid(format!("key {key:?} is not a valid ASCII key")))?;
            // Header values may carry bytes above ASCII; gRPC text may not.
            let value = Some(value.as_str())
                .filter(|v| v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
                .and_then(|v| AsciiMetadataValue::try_from(v).ok())
                .ok_or_else(|| invalid(format!("value of {key:?} is not visible ASCII")))?;
            Ok((parsed, value))
        })
        .collect()
}

/// The application metadata a client sent when opening its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientMetadata {
    /// Entries in the order received, keys lowercase.
    pub entries: Vec<(String, String)>,
    /// Entries beyond the server's bounds, not kept.
    pub dropped: usize,
}

impl ClientMetadata {
    /// The first value for `key` (lowercase).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// What a server keeps of `map`: ASCII entries with unreserved keys, at
    /// most `max_entries` of them and `max_bytes` of keys and values.
    pub(super) fn keep(map: &MetadataMap, max_entries: usize, max_bytes: usize) -> Self {
        let mut kept = Self::default();
        let mut bytes = 0;
        for entry in map.iter() {
            let KeyAndValueRef::Ascii(key, value) = entry else {
                continue;
            };
            if is_reserved(key.as_str()) {
                continue;
            }
            let Ok(value) = value.to_str() else {
                kept.dropped += 1;
                continue;
            };
            let size = key.as_str().len() + value.len();
            if kept.entries.len() == max_entries || bytes + size > max_bytes {
                kept.dropped += 1;
                continue;
            }
            bytes += size;
            kept.entries
                .push((key.as_str().to_owned(), value.to_owned()));
        }
        kept
    }
}

/// Per connection, the metadata its client sent; an entry lives as long
/// as the connection's stream.
#[derive(Debug, Default, Clone)]
pub(super) struct MetadataTable {
    by_peer: Arc<Mutex<HashMap<SocketAddr, Arc<ClientMetadata>>>>,
}

impl MetadataTable {
    pub(super) fn get(&self, peer: SocketAddr) -> Option<Arc<ClientMetadata>> {
        self.lock().get(&peer).cloned()
    }

    /// Records `metadata` for `peer` until the returned guard drops.
    pub(super) fn insert(&self, peer: SocketAddr, metadata: ClientMetadata) -> MetadataEntry {
        if metadata.dropped > 0 {
            warn!(
                remote = %peer,
                dropped = metadata.dropped,
                kept = metadata.entries.len(),
                "gRPC metadata beyond the server's bounds not kept"
            );
        }
        let metadata = Arc::new(metadata);
        self.lock().insert(peer, metadata.clone());
        MetadataEntry {
            table: self.clone(),
            peer,
            metadata,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ClientMetadata>>> {
        // A panic elsewhere leaves the map consistent: every change is one call.
        self.by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a connection's metadata when its stream ends.
#[derive(Debug)]
pub(super) struct MetadataEntry {
    table: MetadataTable,
    peer: SocketAddr,
    metadata: Arc<ClientMetadata>,
}

impl Drop for MetadataEntry {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        // A newer connection from the same address may have replaced it.
        if map
            .get(&self.peer)
            .is_some_and(|current| Arc::ptr_eq(current, &self.metadata))
        {
            map.remove(&self.peer);
        }
    }
}
