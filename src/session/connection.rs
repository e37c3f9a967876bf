//! The handle of a live connection, shared by its tasks, the manager and
//! the application.

use super::{
    Acks, Inbound, SIGNED_FRAME_OVERHEAD, SessionEnd,
    outbox::{Outbox, Pushed, Refused},
    requests::{IdField, REPLY_TO_FIELD, REQUEST_ID_FIELD, Requests},
};
use crate::proto::rollup::v1::DisconnectMessage;
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use prost::Message as _;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{
    codec::{self},
    crypto::PublicKey,
    error::{CodecError, DisconnectReason, TransportError, TrySendError},
    handshake::unix_nanos,
    proto::{Message, Payload, rollup::v1::Ping},
};

/// What one connection is, as reported by `connections()` and `stats()`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionInfo {
    /// Connection id, unique per server or client.
    pub id: u64,
    /// Verified identity (the connection id as text when unauthenticated).
    pub identity: String,
    /// The id the peer announced in its handshake.
    pub client_id: Option<String>,
    /// Session id from the handshake.
    pub session_id: Option<String>,
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// When the connection was established.
    pub connected_at: SystemTime,
    /// When the last frame arrived.
    pub last_seen: SystemTime,
    /// Chain id: the one the peer's key is trusted with, or the one the
    /// application set ([`Connection::set_chain_id`]).
    pub chain_id: Option<String>,
    /// Application metadata the peer sent when it connected (a gRPC
    /// client's request metadata, within the server's bounds); empty for
    /// transports that carry none.
    pub metadata: Vec<(String, String)>,
    /// Whether frames are signed.
    pub signed_frames: bool,
    /// Bytes received, length prefixes included.
    pub bytes_in: u64,
    /// Bytes sent, length prefixes included.
    pub bytes_out: u64,
    /// Application messages received.
    pub messages_in: u64,
    /// Application messages sent.
    pub messages_out: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    pub(super) messages_in: AtomicU64,
    pub(super) messages_out: AtomicU64,
    pub(super) last_seen_nanos: AtomicI64,
}

/// A live connection, shared by its tasks, the manager and the application.
#[derive(Debug)]
pub struct Connection {
    pub(super) id: u64,
    pub(super) identity: Arc<str>,
    pub(super) client_id: Option<String>,
    pub(super) session_id: Option<String>,
    pub(super) remote_addr: Option<SocketAddr>,
    pub(super) connected_at: SystemTime,
    /// Monotonic twin of `connected_at`; `last_seen` is kept relative to it.
    pub(super) started: Instant,
    pub(super) chain_id: Mutex<Option<String>>,
    pub(super) metadata: Box<[(String, String)]>,
    pub(super) peer_key: Option<PublicKey>,
    pub(super) signed: bool,
    pub(super) go_mode: bool,
    pub(super) counters: Counters,
    /// Present when the session negotiated delivery acknowledgements.
    pub(super) acks: Option<Acks>,
    /// Present when the session negotiated requests.
    pub(super) requests: Option<Requests>,
    pub(super) outbox: Outbox,
    pub(super) closed: CancellationToken,
    pub(super) end: OnceLock<SessionEnd>,
    pub(super) write_timeout: Duration,
    pub(super) max_frame_size: usize,
}

impl Connection {
    /// Connection id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Verified identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub(crate) fn identity_arc(&self) -> &Arc<str> {
        &self.identity
    }

    /// The key the peer authenticated with (`None` without authentication).
    pub fn peer_key(&self) -> Option<&PublicKey> {
        self.peer_key.as_ref()
    }

    /// The peer's socket address as the back-end reports it (Go's
    /// `RemoteAddr`); `None` when the back-end cannot tell.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// Whether the peer proved a key in the handshake (Go's
    /// `IsAuthenticated`). On a server: the client authenticated with a
    /// trusted key. On a client: the server proved its key (mutual
    /// authentication), which a Go-mode server never does.
    pub fn is_authenticated(&self) -> bool {
        self.peer_key.is_some()
    }

    /// The identity the peer authenticated as (Go's `GetAuthenticatedID`,
    /// with `None` where Go returns `""`): on a server, the identity its key
    /// is trusted as; on a client, `publisher:<key>`.
    pub fn authenticated_id(&self) -> Option<&str> {
        self.is_authenticated().then_some(&*self.identity)
    }

    /// Whether the session was authenticated by the Go package's plain
    /// handshake: no mutual authentication, no signed frames. On a server,
    /// only peers whose key is trusted Go-compatible have such sessions.
    pub fn is_go_mode(&self) -> bool {
        self.go_mode
    }

    /// Whether frames are signed.
    pub fn is_signed(&self) -> bool {
        self.signed
    }

    /// Whether the connection is closed, or closing (sending its final
    /// `Disconnect`): nothing queued from now on would be written.
    pub fn is_closed(&self) -> bool {
        // `end` is set before the token is ever cancelled, and reading it is
        // one atomic load (the token's check takes a lock).
        self.end.get().is_some()
    }

    /// Sets the chain id reported in [`ConnectionInfo`], replacing the one
    /// the peer's key was trusted with, if any.
    pub fn set_chain_id(&self, chain_id: impl Into<String>) {
        *self.chain_id.lock().unwrap_or_else(PoisonError::into_inner) = Some(chain_id.into());
    }

    /// A snapshot of the connection's metadata and counters.
    pub fn info(&self) -> ConnectionInfo {
        let since_start = self.counters.last_seen_nanos.load(Ordering::Relaxed);
        ConnectionInfo {
            id: self.id,
            identity: self.identity.to_string(),
            client_id: self.client_id.clone(),
            session_id: self.session_id.clone(),
            remote_addr: self.remote_addr,
            connected_at: self.connected_at,
            last_seen: self.connected_at + Duration::from_nanos(since_start.max(0) as u64),
            chain_id: self
                .chain_id
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            metadata: self.metadata.to_vec(),
            signed_frames: self.signed,
            bytes_in: self.counters.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.counters.bytes_out.load(Ordering::Relaxed),
            messages_in: self.counters.messages_in.load(Ordering::Relaxed),
            messages_out: self.counters.messages_out.load(Ordering::Relaxed),
        }
    }

    /// Queues a `Ping` (answered with a `Pong`, never seen by handlers).
    pub fn ping(&self) {
        self.push_control(Payload::Ping(Ping {
            timestamp: unix_nanos(SystemTime::now()),
        }));
    }

    /// Queues a ping or pong ahead of queued messages, whatever the budget
    /// (they are few and small).
    pub(super) fn push_control(&self, payload: Payload) {
        self.outbox.push_urgent(&super::control(payload));
    }

    /// Messages waiting in the send queue (not yet taken by the writer).
    pub fn queued(&self) -> usize {
        self.outbox.queued()
    }

    /// How the session ended, once it has (from `close` on: why it is closing).
    pub fn end(&self) -> Option<&SessionEnd> {
        self.end.get()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Queues `message`, waiting up to the write timeout for room. A peer
    /// whose queue stays full is disconnected with `WRITE_TIMEOUT`.
    ///
    /// `Ok` means queued, not delivered: a message queued or in flight when
    /// the connection breaks is lost (counted and logged). Use
    /// [`send_confirmed`](Self::send_confirmed) to learn of delivery.
    pub async fn send(&self, message: Message) -> Result<(), TransportError> {
        self.enqueue(message, None, &[]).await
    }

    /// Queues `message` if the send queue has room, without waiting. On a
    /// full queue the message comes back in [`TrySendError::Full`] and the
    /// peer keeps its connection (unlike a `send` that times out).
    pub fn try_send(&self, mut message: Message) -> Result<(), TrySendError> {
        if self.is_closed() {
            return Err(self.closed_error().into());
        }
        let len = self.check_size(&message, 0)?;
        match self.outbox.push(&mut message, len, &[], None, false) {
            Ok(pushed) => {
                self.pushed(pushed);
                Ok(())
            }
            Err((Refused::Full, _)) => Err(TrySendError::Full(Box::new(message))),
            Err((Refused::Closed, _)) => Err(self.closed_error().into()),
        }
    }

    /// Whether the session negotiated delivery acknowledgements, which
    /// [`send_confirmed`](Self::send_confirmed) needs.
    pub fn confirms_delivery(&self) -> bool {
        self.acks.is_some()
    }

    /// Sends `message` and waits until the peer acknowledges that its
    /// transport dispatched it: its handler was called and returned (with
    /// success or an error of its own), or, with no handler set, the message
    /// was counted and logged as dropped there (docs/PROTOCOL.md §5.1).
    ///
    /// `Ok` means it arrived and was dispatched, in order after everything
    /// sent before it. [`TransportError::Unconfirmed`] means the connection
    /// ended first: the message may or may not have arrived, and resending it
    /// is the caller's choice. A peer that leaves a confirmation unanswered
    /// for the read timeout is disconnected with `READ_TIMEOUT`, which ends
    /// the wait; to wait less, the server's and client's
    /// `send_confirmed_within` take a deadline. Dropping the future
    /// does not withdraw the message. Do not await this from inside the
    /// handler of the same connection: the ack is read by the task running
    /// that handler. Needs a session that negotiated acknowledgements (both
    /// sides this crate, authenticated with the handshake extensions), else
    /// [`TransportError::ConfirmationUnavailable`].
    pub async fn send_confirmed(&self, message: Message) -> Result<(), TransportError> {
        if self.acks.is_none() {
            return Err(TransportError::ConfirmationUnavailable {
                peer: self.identity.to_string(),
            });
        }
        let (done, confirmed) = oneshot::channel();
        self.enqueue(message, Some(done), &[]).await?;
        confirmed.await.map_err(|_| TransportError::Unconfirmed {
            peer: self.identity.to_string(),
            reason: self
                .end
                .get()
                .map_or(DisconnectReason::Requested, |end| end.reason),
        })
    }

    /// Whether the session negotiated requests, which
    /// [`request`](Self::request) needs.
    pub fn takes_requests(&self) -> bool {
        self.requests.is_some()
    }

    /// Requests on this connection waiting for their reply.
    pub fn pending_requests(&self) -> usize {
        self.requests.as_ref().map_or(0, Requests::pending)
    }

    /// Sends `message` as a request and returns the peer's reply, which the
    /// peer's handler gives with [`Inbound::reply`] (docs/PROTOCOL.md
    /// §5.2). The reply is not passed to this side's handler.
    ///
    /// Fails at once, having sent nothing, when the session did not negotiate
    /// requests ([`TransportError::RequestsUnavailable`]: a Go peer, or
    /// authentication off) or when `send_queue_capacity` requests already
    /// wait on this connection ([`TransportError::TooManyRequests`]).
    /// [`TransportError::RequestTimeout`] when no reply came within
    /// `timeout` (queueing included; a later reply is ignored), and
    /// [`TransportError::ConnectionClosed`] as soon as the connection ends
    /// first. Dropping the future forgets the request as well.
    pub async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError> {
        let Some(requests) = &self.requests else {
            return Err(TransportError::RequestsUnavailable {
                peer: self.identity.to_string(),
            });
        };
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let (pending, reply) =
            requests
                .register()
                .ok_or_else(|| TransportError::TooManyRequests {
                    peer: self.identity.to_string(),
                    limit: requests.limit,
                })?;
        let exchange = async {
            let id = IdField::new(REQUEST_ID_FIELD, pending.id);
            self.enqueue(message, None, id.as_slice()).await?;
            tokio::select! {
                reply = reply => reply.map_err(|_| self.closed_error()),
                () = self.closed.cancelled() => Err(self.closed_error()),
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        drop(pending);
        outcome.unwrap_or_else(|_| {
            Err(TransportError::RequestTimeout {
                peer: self.identity.to_string(),
                after: timeout,
            })
        })
    }

    /// Sends `message` as the reply to the peer's request `id`.
    pub(super) async fn reply(&self, message: Message, id: u64) -> Result<(), TransportError> {
        let field = IdField::new(REPLY_TO_FIELD, id);
        self.enqueue(message, None, field.as_slice()).await
    }

    /// Queues `message` followed by `tail` (extension fields, or nothing),
    /// waiting up to the write timeout for room.
    async fn enqueue(
        &self,
        mut message: Message,
        mut confirm: Option<oneshot::Sender<()>>,
        tail: &[u8],
    ) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let len = self.check_size(&message, tail.len())?;
        let deadline = crate::deadline::deadline_after(self.write_timeout);
        loop {
            match self.outbox.push(&mut message, len, tail, confirm, false) {
                Ok(pushed) => {
                    self.pushed(pushed);
                    return Ok(());
                }
                Err((Refused::Closed, _)) => return Err(self.closed_error()),
                Err((Refused::Full, back)) => confirm = back,
            }
            if tokio::time::timeout_at(deadline, self.outbox.room())
                .await
                .is_err()
            {
                self.abort(DisconnectReason::WriteTimeout, "send queue stayed full");
                return Err(TransportError::SendTimeout {
                    peer: self.identity.to_string(),
                    after: self.write_timeout,
                });
            }
        }
    }

    /// Counts a message written directly, as the writer counts the others.
    fn pushed(&self, pushed: Pushed) {
        if let Pushed::Written { bytes } = pushed {
            let counters = &self.counters;
            counters
                .bytes_out
                .fetch_add(bytes as u64, Ordering::Relaxed);
            counters.messages_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refuses a message (followed by `extra` bytes of extension fields) the
    /// writer could not put in one frame; returns its `encoded_len`, which
    /// the outbox then need not compute again.
    pub(super) fn check_size(
        &self,
        message: &Message,
        extra: usize,
    ) -> Result<usize, TransportError> {
        let overhead = if self.signed {
            SIGNED_FRAME_OVERHEAD
        } else {
            0
        };
        let len = message.encoded_len();
        // At most this once stamped with our `sender_id`.
        let stamped = len + extra + self.outbox.stamp_len();
        codec::check_frame_len(stamped, self.max_frame_size)?;
        let size = stamped + overhead;
        if size > self.max_frame_size {
            return Err(CodecError::FrameTooLarge {
                size,
                max: self.max_frame_size,
            }
            .into());
        }
        Ok(len)
    }

    /// Sends `Disconnect{reason, details}` after what is already queued, then
    /// closes; nothing queued later is sent.
    pub fn close(&self, reason: DisconnectReason, details: impl Into<String>) {
        let details = details.into();
        let disconnect = super::control(Payload::Disconnect(DisconnectMessage {
            reason: reason.to_proto() as i32,
            details: details.clone(),
        }));
        // Record our reason now, not once the Disconnect is written: the
        // peer may close on reading it before the writer gets to `abort`,
        // and its EOF would otherwise be reported as the end (NetworkError,
        // by_peer) of a session we ended.
        let _ = self.end.set(SessionEnd {
            reason,
            details: details.clone(),
            by_peer: false,
        });
        if !self.outbox.push_close(&disconnect, reason, details.clone()) {
            self.abort(reason, details);
        }
    }

    /// Closes without waiting for queued frames.
    pub(crate) fn abort(&self, reason: DisconnectReason, details: impl Into<String>) {
        self.finish(SessionEnd {
            reason,
            details: details.into(),
            by_peer: false,
        });
    }

    pub(super) fn finish(&self, end: SessionEnd) {
        let _ = self.end.set(end);
        self.closed.cancel();
    }

    /// Counts an application message from the peer as dispatched.
    pub(super) fn dispatched(&self) {
        if let Some(acks) = &self.acks {
            // Only the reader writes it: no read-modify-write needed.
            let dispatched = acks.dispatched.load(Ordering::Relaxed);
            acks.dispatched.store(dispatched + 1, Ordering::Relaxed);
        }
    }

    /// Queues the ack the peer asked for (folded into one already queued).
    pub(super) fn send_wanted_ack(&self) {
        let Some(acks) = &self.acks else { return };
        if acks.ack_wanted.swap(false, Ordering::Relaxed) {
            self.outbox.push_ack();
        }
    }

    pub(super) fn closed_error(&self) -> TransportError {
        let end = self.end.get();
        TransportError::ConnectionClosed {
            peer: self.identity.to_string(),
            reason: end.map_or(DisconnectReason::Requested, |e| e.reason),
        }
    }

    /// Counts received bytes.
    pub(super) fn received(&self, bytes: usize) {
        self.counters
            .bytes_in
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records the reader's clock reading of its latest frames (the wall
    /// clock is derived only when someone asks).
    pub(super) fn seen(&self, now: Instant) {
        let since_start = now.saturating_duration_since(self.started).as_nanos();
        self.counters.last_seen_nanos.store(
            i64::try_from(since_start).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}
