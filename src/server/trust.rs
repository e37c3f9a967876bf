//! The server's side of trust changes: what it logs about the trust store at
//! start-up, and closing live connections whose key stops being trusted.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Inner;
use crate::{backend::Backend, config::ServerAuth, error::DisconnectReason, session};

/// Says at start-up which identities may connect unsigned, in Go mode, and
/// which cannot connect at all for want of a server key, or that none can.
/// Said here, about the store the server runs with, rather than where a
/// file is read: keys may be added between the two.
pub(super) fn log_trust_modes(auth: &ServerAuth) {
    if auth.trust.is_empty() {
        warn!("no trusted keys: every sequencer is refused until a key is trusted");
    }
    let go = auth.trust.go_compatible_identities();
    if !go.is_empty() {
        warn!(
            identities = ?go,
            "Go-compatible identities: their Go-mode sessions are unsigned (no mutual authentication, no signed frames)"
        );
    }
    if auth.key.is_none() && go.len() < auth.trust.len() {
        warn!(
            "no server key: identities trusted for the extended handshake only are refused (give the server a key, or mark Go peers Go-compatible)"
        );
    }
}

/// Closes live connections whose key stops being trusted for their identity
/// (removed, or rotated to a new key) with `AUTH_FAILURE`.
pub(super) async fn watch_trust<B: Backend>(
    inner: Arc<Inner<B>>,
    mut changes: tokio::sync::broadcast::Receiver<String>,
    shutdown: CancellationToken,
) {
    let Some(auth) = &inner.auth else { return };
    loop {
        let changed = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.recv() => changed,
        };
        let identities = match changed {
            Ok(identity) => vec![identity],
            // Missed some: check everyone.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => inner
                .manager
                .snapshot(None)
                .iter()
                .map(|c| c.identity().to_owned())
                .collect(),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        for identity in identities {
            if let Some(connection) = inner.manager.get(&identity) {
                close_if_no_longer_trusted(auth, &connection);
            }
        }
    }
}

/// Closes `connection` with `AUTH_FAILURE` if its key is no longer the one
/// trusted for its identity (removed or rotated), or if it is a Go-mode
/// session and the key is no longer trusted Go-compatible.
pub(super) fn close_if_no_longer_trusted(auth: &ServerAuth, connection: &session::Connection) {
    let Some(key) = connection.peer_key() else {
        return;
    };
    let identity = connection.identity();
    let details = if auth.trust.key_of(identity).as_ref() != Some(key) {
        "key no longer trusted"
    } else if connection.is_go_mode()
        && !auth
            .trust
            .mode_of(identity)
            .is_some_and(|mode| mode.allows_go_mode())
    {
        "key no longer trusted for Go-mode sessions"
    } else {
        return;
    };
    warn!(%identity, details, "closing connection: its key is no longer trusted");
    connection.close(DisconnectReason::AuthFailure, details);
}
