//! Received messages as a [`Stream`](futures::Stream), on servers and
//! clients: the pull-style alternative to [`set_handler`](TransportServer::set_handler).

use std::sync::Arc;

use crate::{
    backend::Backend,
    client::TransportClient,
    proto::MessageKind,
    server::TransportServer,
    session::{Handler, Messages, message_stream},
};

/// Makes a stream, hands its handler to `set_handler`, returns the stream.
fn install(
    set_handler: impl FnOnce(Arc<dyn Handler>),
    capacity: usize,
    kinds: Option<&[MessageKind]>,
) -> Messages {
    let (handler, messages) = message_stream(capacity, kinds);
    set_handler(handler);
    messages
}

impl<B: Backend> TransportServer<B> {
    /// Verified messages from every connection as a stream holding at most
    /// `capacity` (connections stop reading while it is full); replaces
    /// the handler. See [`Messages`].
    pub fn messages(&self, capacity: usize) -> Messages {
        install(|handler| self.set_handler(handler), capacity, None)
    }

    /// As [`messages`](Self::messages), taking only messages of `kinds`;
    /// others are counted ([`Messages::skipped`]).
    pub fn messages_of(&self, capacity: usize, kinds: &[MessageKind]) -> Messages {
        install(|handler| self.set_handler(handler), capacity, Some(kinds))
    }
}

impl<B: Backend> TransportClient<B> {
    /// Messages from the server, across reconnects, as a stream holding at
    /// most `capacity` (reading stops while it is full); replaces the
    /// handler. See [`Messages`].
    pub fn messages(&self, capacity: usize) -> Messages {
        install(|handler| self.set_handler(handler), capacity, None)
    }

    /// As [`messages`](Self::messages), taking only messages of `kinds`;
    /// others are counted ([`Messages::skipped`]).
    pub fn messages_of(&self, capacity: usize, kinds: &[MessageKind]) -> Messages {
        install(|handler| self.set_handler(handler), capacity, Some(kinds))
    }
}
