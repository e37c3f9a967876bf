//! Messages and requests to one peer, by its identity.

use std::{sync::Arc, time::Duration};

use super::TransportServer;
use crate::{
    backend::Backend,
    error::{TransportError, TrySendError},
    proto::Message,
    session::{self, Inbound},
};

impl<B: Backend> TransportServer<B> {
    /// Sends `message` to the peer with identity `peer`, waiting up to the
    /// write timeout for room in its queue.
    pub async fn send(&self, peer: &str, message: Message) -> Result<(), TransportError> {
        self.peer(peer)?.send(message).await
    }

    /// Queues `message` for `peer` without waiting; see [`Connection::try_send`](session::Connection::try_send).
    pub fn try_send(&self, peer: &str, message: Message) -> Result<(), TrySendError> {
        self.peer(peer)?.try_send(message)
    }

    /// Sends `message` to `peer` and waits until it confirms delivery to its
    /// handler; see [`Connection::send_confirmed`](session::Connection::send_confirmed).
    pub async fn send_confirmed(&self, peer: &str, message: Message) -> Result<(), TransportError> {
        self.peer(peer)?.send_confirmed(message).await
    }

    /// Sends `message` to `peer` as a request and returns its reply; see
    /// [`Connection::request`](session::Connection::request).
    pub async fn request(
        &self,
        peer: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError> {
        self.peer(peer)?.request(message, timeout).await
    }

    fn peer(&self, peer: &str) -> Result<Arc<session::Connection>, TransportError> {
        self.inner
            .manager
            .get(peer)
            .ok_or_else(|| TransportError::PeerNotFound {
                peer: peer.to_owned(),
            })
    }
}
