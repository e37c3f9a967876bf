//! Received messages as a [`Stream`](futures::Stream), on servers and
//! clients: the pull-style alternative to [`set_handler`](TransportServer::set_handler).

use crate::{
    backend::Backend,
    client::TransportClient,
    proto::MessageKind,
    server::TransportServer,
    session::{Messages, message_stream},
};

impl<B: Backend> TransportServer<B> {
    /// Verified messages from every connection as a stream holding at most
    /// `capacity` (connections stop reading while it is full); replaces
    /// the handler. See [`Messages`].
    pub fn messages(&self, capacity: usize) -> Messages {
        let (handler, messages) = message_stream(capacity, None);
        self.set_handler(handler);
        messages
    }

    /// As [`messages`](Self::messages), taking only messages of `kinds`;
    /// others are counted ([`Messages::skipped`]).
    pub fn messages_of(&self, capacity: usize, kinds: &[MessageKind]) -> Messages {
        let (handler, messages) = message_stream(capacity, Some(kinds));
        self.set_handler(handler);
        messages
    }
}

impl<B: Backend> TransportClient<B> {
    /// Messages from the server, across reconnects, as a stream holding at
    /// most `capacity` (reading stops while it is full); replaces the
    /// handler. See [`Messages`].
    pub fn messages(&self, capacity: usize) -> Messages {
        let (handler, messages) = message_stream(capacity, None);
        self.set_handler(handler);
        messages
    }

    /// As [`messages`](Self::messages), taking only messages of `kinds`;
    /// others are counted ([`Messages::skipped`]).
    pub fn messages_of(&self, capacity: usize, kinds: &[MessageKind]) -> Messages {
        let (handler, messages) = message_stream(capacity, Some(kinds));
        self.set_handler(handler);
        messages
    }
}
