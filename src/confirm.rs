//! Confirmed sends bounded by a per-call deadline, on servers and clients:
//! whatever the back-end, a confirmation that does not come in time fails
//! the call with [`TransportError::ConfirmDeadline`] instead of waiting for
//! the read timeout to end the connection.

use std::{future::Future, time::Duration};

use crate::{
    Message, backend::Backend, client::TransportClient, error::TransportError,
    server::TransportServer,
};

impl<B: Backend> TransportServer<B> {
    /// As [`send_confirmed`](Self::send_confirmed), failing with
    /// [`TransportError::ConfirmDeadline`] when `peer` has not confirmed
    /// delivery within `deadline`. The message is not withdrawn: it may
    /// still arrive.
    pub async fn send_confirmed_within(
        &self,
        peer: &str,
        message: Message,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        within(peer, deadline, self.send_confirmed(peer, message)).await
    }
}

impl<B: Backend> TransportClient<B> {
    /// As [`send_confirmed`](Self::send_confirmed), failing with
    /// [`TransportError::ConfirmDeadline`] when the server has not confirmed
    /// delivery within `deadline`. The message is not withdrawn: it may
    /// still arrive.
    pub async fn send_confirmed_within(
        &self,
        message: Message,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        let peer = self
            .connection()
            .map_or_else(String::new, |connection| connection.identity().to_owned());
        within(&peer, deadline, self.send_confirmed(message)).await
    }
}

async fn within(
    peer: &str,
    deadline: Duration,
    call: impl Future<Output = Result<(), TransportError>>,
) -> Result<(), TransportError> {
    tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| TransportError::ConfirmDeadline {
            peer: peer.to_owned(),
            deadline,
        })?
}
