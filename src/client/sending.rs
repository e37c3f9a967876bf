//! Messages and requests to the server, on the current session.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use super::TransportClient;
use crate::{
    backend::Backend,
    error::{TransportError, TrySendError},
    proto::Message,
    session::{Connection, Inbound},
};

impl<B: Backend> TransportClient<B> {
    /// Sends `message` (its `sender_id` becomes the client id), waiting up to
    /// the write timeout for queue room.
    pub async fn send(&self, message: Message) -> Result<(), TransportError> {
        self.live()?.send(message).await
    }

    /// Queues `message` without waiting; see [`Connection::try_send`].
    pub fn try_send(&self, message: Message) -> Result<(), TrySendError> {
        // Nothing here waits: the session is used under the read lock, which
        // saves a reference count per message.
        let current = self
            .inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match current.as_deref().filter(|c| !c.is_closed()) {
            Some(connection) => connection.try_send(message),
            None => Err(TransportError::NotConnected.into()),
        }
    }

    /// Sends `message` and waits until the publisher confirms delivery to its
    /// handler; see [`Connection::send_confirmed`]. A message sent while the
    /// link is down, or in flight when it breaks, is an error here — never a
    /// silent loss. Not retried on another session: resending is the caller's
    /// choice, as the message may have arrived.
    pub async fn send_confirmed(&self, message: Message) -> Result<(), TransportError> {
        self.live()?.send_confirmed(message).await
    }

    /// Sends `message` as a request and returns the publisher's reply; see
    /// [`Connection::request`]. Not retried on another session.
    pub async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError> {
        self.live()?.request(message, timeout).await
    }

    /// The current connection, unless it is closed.
    fn live(&self) -> Result<Arc<Connection>, TransportError> {
        self.current()
            .filter(|c| !c.is_closed())
            .ok_or(TransportError::NotConnected)
    }
}
