//! One authenticated connection over any ordered, reliable frame pipe.
//!
//! A back-end hands over a [`FrameReader`] and a [`FrameWriter`]; everything
//! above frames lives here: driving the handshake, the writer task (one per
//! connection, so frames never interleave; queued frames coalesced into few
//! writes; unicast batches signed once), the reader loop (verify, answer
//! pings, dispatch to the handler), idle eviction and orderly disconnects.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::sync::{
    mpsc::{self, error::TrySendError as QueueError},
    oneshot,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::{
    codec::{self, HANDSHAKE_MAX_FRAME_SIZE},
    config::InboundLimit,
    crypto::{CryptoBackend, PublicKey, SecretKey},
    decode_bound::{DecodeAllowance, DecodeBoundError},
    error::{
        CodecError, DisconnectReason, HandshakeError, SignedFrameError, TransportError,
        TrySendError,
    },
    handshake::{
        AcceptedClient, ClientHandshake, SequenceFloors, ServerHandshake, ServerSession,
        ServerVerdict, SignedFrameSession, disconnect_body, unix_nanos,
    },
    metrics::{
        ACK_KIND, Direction, MESSAGE_KINDS, MessageTally, Metrics, SIGNED_FRAME_KIND, kind_index,
    },
    pool::BufferPool,
    proto::{
        Message, Payload,
        rollup::v1::{DisconnectMessage, Ping, Pong},
        transport::v1::{Ack, MessageExt},
    },
    signed::{self, Audience, FrameOpener, SequenceCounter},
};

/// Bytes of queued frames gathered into one write before it is issued.
pub const WRITE_COALESCE_BYTES: usize = 64 * 1024;

/// Reads frame bodies from a pipe.
pub trait FrameReader: Send + 'static {
    /// The next frame body; `None` at a clean end of stream.
    fn read_frame(&mut self) -> impl Future<Output = Option<Result<Bytes, CodecError>>> + Send;
    /// Changes the largest body accepted from now on.
    fn set_max_frame_size(&mut self, max: usize);
    /// Shares a budget for buffering large frames (see [`ReadBudget`]).
    /// Readers that receive whole frames from their transport ignore it.
    fn set_read_budget(&mut self, _budget: Arc<ReadBudget>) {}
    /// Whether a complete frame is already buffered, so the next
    /// `read_frame` returns without waiting. Delivery acknowledgements are
    /// sent when this turns false; the default (false) acknowledges after
    /// every frame.
    fn has_buffered_frame(&self) -> bool {
        false
    }
}

/// Writes frames to a pipe.
pub trait FrameWriter: Send + 'static {
    /// Writes `frames`: one or more complete frames, length prefixes included.
    fn write_frames(&mut self, frames: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the sending side; `reason` says why, for transports that can
    /// carry it out of band (gRPC trailers).
    fn shutdown(
        &mut self,
        reason: Option<(DisconnectReason, &str)>,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

pub use crate::stream::{ReadBudget, StreamFrameReader, StreamFrameWriter, stream_pipe};

/// Per-connection settings shared by server and client.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Nothing received for this long evicts the peer with `READ_TIMEOUT`.
    pub read_timeout: Duration,
    /// Bound on one write, and on how long `send` waits for queue space.
    pub write_timeout: Duration,
    /// Ping after this long without receiving anything; `None` never pings.
    pub ping_interval: Option<Duration>,
    /// Frames queued per connection before senders wait (and broadcasts drop the peer).
    pub send_queue_capacity: usize,
    /// Largest frame body accepted after authentication.
    pub max_frame_size: usize,
    /// Bound on writing the final `Disconnect` frame.
    pub disconnect_timeout: Duration,
    /// What a peer may send per second; `None` for no limit.
    pub inbound_limit: Option<InboundLimit>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            ping_interval: Some(Duration::from_secs(15)),
            send_queue_capacity: 4096,
            max_frame_size: codec::DEFAULT_MAX_FRAME_SIZE,
            disconnect_timeout: Duration::from_secs(1),
            inbound_limit: None,
        }
    }
}

/// A verified message handed to the application.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Who sent it: the verified identity when authenticated, else the connection id.
    pub from: Arc<str>,
    /// The connection it arrived on.
    pub connection_id: u64,
    /// The message.
    pub message: Message,
}

/// Error a handler returns; logged and counted, the connection goes on.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Future returned by a [`Handler`].
pub type HandlerFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// What a [`Handler`] did with a message.
#[non_exhaustive]
pub enum Handled {
    /// Finished on the spot: nothing allocated, nothing awaited.
    Done(Result<(), HandlerError>),
    /// Finishes when this completes; the connection reads nothing meanwhile.
    Pending(HandlerFuture),
}

/// Receives verified application messages, on the connection's reader task
/// and in order: a slow handler slows only that connection's reading.
///
/// Any `Fn(Inbound) -> impl Future<Output = Result<(), HandlerError>>` is a
/// handler. [`SyncHandler`] and [`channel_handler`] finish most messages
/// without boxing a future.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, inbound: Inbound) -> Handled;
}

impl<F, Fut> Handler for F
where
    F: Fn(Inbound) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, inbound: Inbound) -> Handled {
        Handled::Pending(Box::pin(self(inbound)))
    }
}

/// A handler that never waits: `SyncHandler(|inbound| { …; Ok(()) })`.
pub struct SyncHandler<F>(pub F);

impl<F> Handler for SyncHandler<F>
where
    F: Fn(Inbound) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, inbound: Inbound) -> Handled {
        Handled::Done((self.0)(inbound))
    }
}

/// Forwards messages into a bounded channel; see [`channel_handler`].
struct ChannelHandler(mpsc::Sender<Inbound>);

impl Handler for ChannelHandler {
    fn handle(&self, inbound: Inbound) -> Handled {
        match self.0.try_send(inbound) {
            Ok(()) => Handled::Done(Ok(())),
            Err(QueueError::Full(inbound)) => {
                let tx = self.0.clone();
                Handled::Pending(Box::pin(async move {
                    tx.send(inbound)
                        .await
                        .map_err(|_| HandlerError::from("inbound receiver dropped"))
                }))
            }
            Err(QueueError::Closed(_)) => Handled::Done(Err("inbound receiver dropped".into())),
        }
    }
}

/// A handler that forwards every message into a bounded channel. When the
/// channel is full the connection waits for room (backpressure): nothing is
/// dropped.
pub fn channel_handler(capacity: usize) -> (Arc<dyn Handler>, mpsc::Receiver<Inbound>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Arc::new(ChannelHandler(tx)), rx)
}

/// The slot a server or client keeps its handler in, changeable at any time.
#[derive(Default)]
pub(crate) struct HandlerSlot {
    handler: std::sync::RwLock<Option<Arc<dyn Handler>>>,
    /// Bumped by every `set`, so readers re-read the handler only then.
    generation: AtomicU64,
}

impl HandlerSlot {
    pub(crate) fn set(&self, handler: Arc<dyn Handler>) {
        *self.handler.write().unwrap_or_else(PoisonError::into_inner) = Some(handler);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn get(&self) -> Option<Arc<dyn Handler>> {
        self.handler
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A reader's copy of the handler: one atomic load per message instead of
/// a lock, refreshed when the slot changes.
struct HandlerCache {
    generation: u64,
    handler: Option<Arc<dyn Handler>>,
}

impl HandlerCache {
    fn new(slot: &HandlerSlot) -> Self {
        Self {
            generation: slot.generation.load(Ordering::Acquire),
            handler: slot.get(),
        }
    }

    fn current(&mut self, slot: &HandlerSlot) -> Option<&Arc<dyn Handler>> {
        let generation = slot.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.handler = slot.get();
        }
        self.handler.as_ref()
    }
}

/// What the reader carries from message to message.
struct Dispatch {
    tally: MessageTally,
    handler: HandlerCache,
}

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
    /// Chain id, if the application set one.
    pub chain_id: Option<String>,
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

/// Items of a connection's send queue.
// Messages are queued by value: boxing them would cost an allocation per
// message on the send path, more than the larger queue slots cost in memory.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A message the writer encodes (and, in signed mode, seals with others),
    /// with its `encoded_len` as measured when it was queued.
    Message(Message, usize),
    /// A message whose delivery the peer acknowledges; `done` fires when it has.
    Confirmed(Message, usize, oneshot::Sender<()>),
    /// Acknowledge the messages handed to the handler so far.
    Ack,
    /// A complete frame encoded (and sealed) once for many recipients,
    /// with the payload kind of its message for the metrics.
    Frame(Bytes, usize),
    /// Write a `Disconnect` and close.
    Close(DisconnectReason, String),
}

impl Outbound {
    /// A control message of the transport itself.
    fn control(payload: Payload) -> Self {
        let message = control(payload);
        let len = message.encoded_len();
        Self::Message(message, len)
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// Why.
    pub reason: DisconnectReason,
    /// Details for logs.
    pub details: String,
    /// Whether the peer ended it (its `Disconnect`, or end of stream).
    pub by_peer: bool,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    last_seen_nanos: AtomicI64,
}

/// Delivery acknowledgements of a session that negotiated them
/// (docs/PROTOCOL.md §5.1). Positions count application messages from 1, in
/// the order the writer puts them on the wire; the peer counts the same
/// messages as it hands them to its handler.
#[derive(Debug, Default)]
struct Acks {
    /// Application messages the writer has encoded for the wire.
    written: AtomicU64,
    /// Highest count the peer has acknowledged.
    acked: AtomicU64,
    /// Confirmed sends by position (and since when), waiting for an ack
    /// that covers them.
    waiting: Mutex<VecDeque<(u64, Instant, oneshot::Sender<()>)>>,
    /// An `Outbound::Ack` is queued: later requests fold into it.
    ack_queued: AtomicBool,
    /// The peer asked for an ack not yet queued (reader only).
    ack_wanted: AtomicBool,
    /// Application messages from the peer whose dispatch has finished: the
    /// count an ack reports (updated by the reader once the handler returns,
    /// so an ack never runs ahead of the handler).
    dispatched: AtomicU64,
}

impl Acks {
    /// Applies the peer's ack of `delivered` messages.
    fn acknowledge(&self, delivered: u64) -> Result<(), String> {
        let written = self.written.load(Ordering::Acquire);
        let previous = self.acked.load(Ordering::Relaxed);
        if delivered > written || delivered < previous {
            return Err(format!(
                "ack of {delivered} messages; {written} sent, {previous} acknowledged before"
            ));
        }
        self.acked.store(delivered, Ordering::Relaxed);
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        while waiting
            .front()
            .is_some_and(|(position, _, _)| *position <= delivered)
        {
            if let Some((_, _, done)) = waiting.pop_front() {
                // The sender may have stopped waiting; nothing to tell then.
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// How long the oldest unconfirmed send has waited.
    fn oldest_wait(&self) -> Option<Duration> {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.front().map(|(_, since, _)| since.elapsed())
    }

    /// Fails every waiting confirmation (their senders see `Unconfirmed`);
    /// returns how many there were.
    fn fail_waiting(&self) -> usize {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let failed = waiting.len();
        waiting.clear();
        failed
    }
}

/// Signing state of the sending side of a signed session.
#[derive(Debug)]
pub(crate) struct FrameSigner {
    pub(crate) key: Arc<SecretKey>,
    pub(crate) backend: CryptoBackend,
    pub(crate) unicast: SequenceCounter,
    pub(crate) recipient: PublicKey,
    pub(crate) session_tag: [u8; 32],
}

/// Everything the handshake settled for a session.
#[derive(Debug)]
pub(crate) struct SessionSetup {
    pub(crate) identity: Arc<str>,
    pub(crate) client_id: Option<String>,
    pub(crate) session_id: Option<String>,
    pub(crate) remote_addr: Option<SocketAddr>,
    pub(crate) signer: Option<FrameSigner>,
    pub(crate) opener: Option<FrameOpener>,
    /// The key the peer authenticated with, if any.
    pub(crate) peer_key: Option<PublicKey>,
    /// `sender_id` stamped on messages we send.
    pub(crate) sender_id: Option<String>,
    /// Whether both sides acknowledge delivered messages.
    pub(crate) delivery_acks: bool,
    /// Whether the peer authenticated with the Go package's handshake.
    pub(crate) go_mode: bool,
}

/// A live connection, shared by its tasks, the manager and the application.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    identity: Arc<str>,
    client_id: Option<String>,
    session_id: Option<String>,
    remote_addr: Option<SocketAddr>,
    connected_at: SystemTime,
    /// Monotonic twin of `connected_at`; `last_seen` is kept relative to it.
    started: Instant,
    chain_id: Mutex<Option<String>>,
    peer_key: Option<PublicKey>,
    signed: bool,
    go_mode: bool,
    counters: Counters,
    /// Present when the session negotiated delivery acknowledgements.
    acks: Option<Acks>,
    queue: mpsc::Sender<Outbound>,
    closed: CancellationToken,
    end: OnceLock<SessionEnd>,
    write_timeout: Duration,
    max_frame_size: usize,
    /// Bytes of the `sender_id` field the writer stamps on application messages.
    stamp_len: usize,
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

    /// Sets the chain id reported in [`ConnectionInfo`].
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
            signed_frames: self.signed,
            bytes_in: self.counters.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.counters.bytes_out.load(Ordering::Relaxed),
            messages_in: self.counters.messages_in.load(Ordering::Relaxed),
            messages_out: self.counters.messages_out.load(Ordering::Relaxed),
        }
    }

    /// Queues a `Ping` (answered with a `Pong`, never seen by handlers).
    pub fn ping(&self) {
        let ping = Payload::Ping(Ping {
            timestamp: unix_nanos(SystemTime::now()),
        });
        let _ = self.queue.try_send(Outbound::control(ping));
    }

    /// Queues a complete frame that must precede everything else (the
    /// handshake response); called before anyone else can reach the queue.
    pub(crate) fn queue_first(&self, frame: Bytes, kind: usize) {
        let _ = self.queue.try_send(Outbound::Frame(frame, kind));
    }

    /// Frames waiting in the send queue.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
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
        let len = self.check_size(&message)?;
        self.enqueue(Outbound::Message(message, len)).await
    }

    /// Queues `message` if the send queue has room, without waiting. On a
    /// full queue the message comes back in [`TrySendError::Full`] and the
    /// peer keeps its connection (unlike a `send` that times out).
    pub fn try_send(&self, message: Message) -> Result<(), TrySendError> {
        if self.is_closed() {
            return Err(self.closed_error().into());
        }
        let len = self.check_size(&message)?;
        match self.queue.try_send(Outbound::Message(message, len)) {
            Ok(()) => Ok(()),
            Err(QueueError::Full(Outbound::Message(message, _))) => {
                Err(TrySendError::Full(Box::new(message)))
            }
            Err(_) => Err(self.closed_error().into()),
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
    /// the wait; wrap the call in a timeout to wait less. Dropping the future
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
        let len = self.check_size(&message)?;
        let (done, confirmed) = oneshot::channel();
        self.enqueue(Outbound::Confirmed(message, len, done))
            .await?;
        confirmed.await.map_err(|_| TransportError::Unconfirmed {
            peer: self.identity.to_string(),
            reason: self
                .end
                .get()
                .map_or(DisconnectReason::Requested, |end| end.reason),
        })
    }

    /// Queues `item`, waiting up to the write timeout for room.
    async fn enqueue(&self, item: Outbound) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        match self.queue.try_send(item) {
            Ok(()) => Ok(()),
            Err(QueueError::Closed(_)) => Err(self.closed_error()),
            Err(QueueError::Full(item)) => {
                match tokio::time::timeout(self.write_timeout, self.queue.send(item)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(self.closed_error()),
                    Err(_) => {
                        self.abort(DisconnectReason::WriteTimeout, "send queue stayed full");
                        Err(TransportError::SendTimeout {
                            peer: self.identity.to_string(),
                            after: self.write_timeout,
                        })
                    }
                }
            }
        }
    }

    /// Refuses a message the writer could not put in one frame; returns its
    /// `encoded_len`, which the writer then need not compute again.
    fn check_size(&self, message: &Message) -> Result<usize, TransportError> {
        let overhead = if self.signed {
            SIGNED_FRAME_OVERHEAD
        } else {
            0
        };
        let len = message.encoded_len();
        // At most this once the writer stamps its `sender_id`.
        let stamped = len + self.stamp_len;
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

    /// Queues a pre-encoded frame without waiting. On a full queue the peer is
    /// too slow: it is disconnected with `WRITE_TIMEOUT` and the error says so.
    pub(crate) fn try_send_frame(&self, frame: Bytes, kind: usize) -> Result<(), TransportError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        match self.queue.try_send(Outbound::Frame(frame, kind)) {
            Ok(()) => Ok(()),
            Err(QueueError::Closed(_)) => Err(self.closed_error()),
            Err(QueueError::Full(_)) => {
                self.abort(DisconnectReason::WriteTimeout, "send queue full");
                Err(TransportError::QueueFull {
                    peer: self.identity.to_string(),
                })
            }
        }
    }

    /// Sends `Disconnect{reason, details}` after what is already queued, then
    /// closes. If the queue is full the connection closes at once.
    pub fn close(&self, reason: DisconnectReason, details: impl Into<String>) {
        let details = details.into();
        match self
            .queue
            .try_send(Outbound::Close(reason, details.clone()))
        {
            // Record our reason now, not once the Disconnect is written: the
            // peer may close on reading it before the writer gets to `abort`,
            // and its EOF would otherwise be reported as the end
            // (NetworkError, by_peer) of a session we ended.
            Ok(()) => {
                let _ = self.end.set(SessionEnd {
                    reason,
                    details,
                    by_peer: false,
                });
            }
            Err(_) => self.abort(reason, details),
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

    fn finish(&self, end: SessionEnd) {
        let _ = self.end.set(end);
        self.closed.cancel();
    }

    /// Counts an application message from the peer as dispatched.
    fn dispatched(&self) {
        if let Some(acks) = &self.acks {
            // Only the reader writes it: no read-modify-write needed.
            let dispatched = acks.dispatched.load(Ordering::Relaxed);
            acks.dispatched.store(dispatched + 1, Ordering::Relaxed);
        }
    }

    /// Queues the ack the peer asked for, unless one is already queued (it
    /// will carry the newest count). On a full queue the request stays
    /// pending and the next frame or health check retries it.
    fn send_wanted_ack(&self) {
        let Some(acks) = &self.acks else { return };
        if !acks.ack_wanted.load(Ordering::Relaxed) {
            return;
        }
        if !acks.ack_queued.swap(true, Ordering::AcqRel)
            && self.queue.try_send(Outbound::Ack).is_err()
        {
            acks.ack_queued.store(false, Ordering::Release);
            return;
        }
        acks.ack_wanted.store(false, Ordering::Relaxed);
    }

    fn closed_error(&self) -> TransportError {
        let end = self.end.get();
        TransportError::ConnectionClosed {
            peer: self.identity.to_string(),
            reason: end.map_or(DisconnectReason::Requested, |e| e.reason),
        }
    }

    /// Counts received bytes.
    fn received(&self, bytes: usize) {
        self.counters
            .bytes_in
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Records the reader's clock reading of its latest frames (the wall
    /// clock is derived only when someone asks).
    fn seen(&self, now: Instant) {
        let since_start = now.saturating_duration_since(self.started).as_nanos();
        self.counters.last_seen_nanos.store(
            i64::try_from(since_start).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Runs the client side of the handshake over a fresh pipe.
pub(crate) async fn client_handshake<R: FrameReader, W: FrameWriter>(
    reader: &mut R,
    writer: &mut W,
    handshake: ClientHandshake,
    timeout: Duration,
) -> Result<ServerSession, TransportError> {
    let exchange = async {
        let frame = codec::frame_body(handshake.request(), HANDSHAKE_MAX_FRAME_SIZE)?;
        reader.set_max_frame_size(HANDSHAKE_MAX_FRAME_SIZE);
        if let Err(err) = writer.write_frames(&frame).await {
            // A server refusing at once (throttled, full) may have closed
            // before our request was taken: its reason is worth more than
            // ours. Its `Disconnect` may follow a refusing response.
            for _ in 0..2 {
                let next = tokio::time::timeout(Duration::from_secs(1), reader.read_frame()).await;
                let Ok(Some(Ok(frame))) = next else { break };
                if let Some(disconnect) = as_disconnect(&frame) {
                    return Err(TransportError::Refused {
                        reason: DisconnectReason::from_proto(disconnect.reason),
                        details: disconnect.details,
                    });
                }
            }
            return Err(TransportError::Codec(CodecError::Io(err)));
        }
        let response = match reader.read_frame().await {
            Some(frame) => frame?,
            None => {
                return Err(TransportError::Codec(CodecError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed during the handshake",
                ))));
            }
        };
        // A server refusing before the handshake (throttled, full) answers
        // with a bare `Message{Disconnect}` where the response would be.
        if let Some(disconnect) = as_disconnect(&response) {
            return Err(TransportError::Refused {
                reason: DisconnectReason::from_proto(disconnect.reason),
                details: disconnect.details,
            });
        }
        match handshake.finish(&response) {
            Err(HandshakeError::Rejected { reason: text }) => {
                // A refusal is followed by a `Disconnect` saying why; a full
                // server is worth reporting as such, not as an auth failure.
                let next = tokio::time::timeout(Duration::from_secs(1), reader.read_frame()).await;
                if let Ok(Some(Ok(frame))) = next
                    && let Some(disconnect) = as_disconnect(&frame)
                {
                    let reason = DisconnectReason::from_proto(disconnect.reason);
                    if !matches!(
                        reason,
                        DisconnectReason::AuthFailure | DisconnectReason::ProtocolError
                    ) {
                        return Err(TransportError::Refused {
                            reason,
                            details: disconnect.details,
                        });
                    }
                }
                Err(TransportError::Handshake(HandshakeError::Rejected {
                    reason: text,
                }))
            }
            result => result.map_err(TransportError::Handshake),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Handshake(HandshakeError::Timeout(timeout))),
    }
}

/// Decodes `body` as a `Message` carrying a `Disconnect`, if it is one.
pub(crate) fn as_disconnect(body: &[u8]) -> Option<DisconnectMessage> {
    match Message::decode(body) {
        Ok(Message {
            payload: Some(Payload::Disconnect(disconnect)),
            ..
        }) => Some(disconnect),
        _ => None,
    }
}

/// Runs the server side of the handshake over a fresh pipe. On refusal the
/// response and a `Disconnect` are written before the error is returned.
pub(crate) async fn server_handshake<R: FrameReader, W: FrameWriter>(
    reader: &mut R,
    writer: &mut W,
    handshake: &ServerHandshake,
    local_floors: SequenceFloors,
    timeout: Duration,
    disconnect_timeout: Duration,
) -> Result<(AcceptedClient, Bytes), TransportError> {
    let deadline = crate::deadline::deadline_after(timeout);
    reader.set_max_frame_size(HANDSHAKE_MAX_FRAME_SIZE);
    let request = match tokio::time::timeout_at(deadline, reader.read_frame()).await {
        Err(_) => return Err(TransportError::Handshake(HandshakeError::Timeout(timeout))),
        Ok(None) => {
            return Err(TransportError::Codec(CodecError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before its handshake",
            ))));
        }
        Ok(Some(Err(err))) => {
            let details = err.to_string();
            send_disconnect(
                writer,
                err.disconnect_reason(),
                &details,
                disconnect_timeout,
            )
            .await;
            return Err(TransportError::Codec(err));
        }
        Ok(Some(Ok(request))) => request,
    };
    // Requests that fail before the signature (strangers' keys, stale
    // clocks, bad encodings) are refused here, at the cost of a decode and
    // a look-up. The rest (recovery, verification, the proof: 0.1–0.3 ms of
    // ECDSA) run on the blocking pool, a bounded number at a time, so that
    // a burst of handshakes never stalls the runtime's workers.
    let screened = handshake.screen(&request, SystemTime::now());
    let verdict = tokio::time::timeout_at(deadline, async {
        if screened.is_some() {
            return screened;
        }
        let slot = handshake_crypto_slots()
            .clone()
            .acquire_owned()
            .await
            .ok()?;
        let handshake = handshake.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            handshake.respond(&request, SystemTime::now(), local_floors)
        })
        .await
        .ok()
    })
    .await;
    let verdict = match verdict {
        Ok(Some(verdict)) => verdict,
        Ok(None) => {
            return Err(TransportError::Io {
                op: "handshake",
                addr: String::new(),
                source: io::Error::other("handshake verification task failed"),
            });
        }
        Err(_) => return Err(TransportError::Handshake(HandshakeError::Timeout(timeout))),
    };
    match verdict {
        // The response goes out as the session's first frame, once the
        // connection is registered: a client that learns it was accepted can
        // be sent to at once.
        ServerVerdict::Accept { response, client } => Ok((
            *client,
            codec::frame_body(&response, HANDSHAKE_MAX_FRAME_SIZE)?,
        )),
        ServerVerdict::Reject {
            response,
            disconnect,
            error,
        } => {
            let mut frames = BytesMut::new();
            for body in [&response, &disconnect] {
                frames.extend_from_slice(&codec::frame_body(body, HANDSHAKE_MAX_FRAME_SIZE)?);
            }
            let reason = error.disconnect_reason();
            let details = error.to_string();
            let _ = tokio::time::timeout(disconnect_timeout, async {
                writer.write_frames(&frames).await?;
                writer.shutdown(Some((reason, &details))).await
            })
            .await;
            Err(TransportError::Handshake(error))
        }
    }
}

/// Handshakes whose signatures are being checked at once, process-wide:
/// twice the cores, so verification keeps every core busy and no more.
fn handshake_crypto_slots() -> &'static Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Arc::new(tokio::sync::Semaphore::new(2 * cores))
    })
}

/// Refuses a peer as a failed handshake is refused, so that any client can
/// say why: a `HandshakeResponse{accepted: false, error}`, then
/// `Disconnect{reason, details}`.
pub(crate) async fn refuse_after_handshake<W: FrameWriter>(
    writer: &mut W,
    reason: DisconnectReason,
    error: &str,
    details: &str,
    timeout: Duration,
) {
    let response = crate::proto::rollup::v1::HandshakeResponse {
        accepted: false,
        error: error.to_owned(),
        session_id: String::new(),
    }
    .encode_to_vec();
    let mut frames = BytesMut::new();
    for body in [&response[..], &disconnect_body(reason, details)[..]] {
        match codec::frame_body(body, HANDSHAKE_MAX_FRAME_SIZE) {
            Ok(frame) => frames.extend_from_slice(&frame),
            Err(_) => return,
        }
    }
    let _ = tokio::time::timeout(timeout, async {
        writer.write_frames(&frames).await?;
        writer.shutdown(Some((reason, details))).await
    })
    .await;
}

/// Writes a bare `Message{Disconnect}` and ends the stream, bounded in time.
pub(crate) async fn send_disconnect<W: FrameWriter>(
    writer: &mut W,
    reason: DisconnectReason,
    details: &str,
    timeout: Duration,
) {
    let Ok(frame) = codec::frame_body(&disconnect_body(reason, details), HANDSHAKE_MAX_FRAME_SIZE)
    else {
        return;
    };
    let _ = tokio::time::timeout(timeout, async {
        writer.write_frames(&frame).await?;
        writer.shutdown(Some((reason, details))).await
    })
    .await;
}

/// Builds the per-session signing state from what the handshake agreed.
pub(crate) fn signing_state(
    session: Option<&SignedFrameSession>,
    local_key: Option<&Arc<SecretKey>>,
    local_identity: Option<String>,
    unicast: Option<SequenceCounter>,
    backend: CryptoBackend,
) -> (Option<FrameSigner>, Option<FrameOpener>) {
    let (Some(session), Some(key), Some(unicast)) = (session, local_key, unicast) else {
        return (None, None);
    };
    let opener = FrameOpener::new(session, key.public_key().clone(), local_identity, backend);
    let signer = FrameSigner {
        key: key.clone(),
        backend,
        unicast,
        recipient: session.peer_key.clone(),
        session_tag: session.session_tag,
    };
    (Some(signer), Some(opener))
}

/// What a server or client shares with each of its sessions.
pub(crate) struct SessionContext {
    pub(crate) config: SessionConfig,
    pub(crate) handler: Arc<HandlerSlot>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) write_buffers: Arc<BufferPool>,
    /// Shared by every connection of a server; `None` on a client.
    pub(crate) read_budget: Option<Arc<ReadBudget>>,
}

impl SessionContext {
    pub(crate) fn new(
        config: SessionConfig,
        handler: Arc<HandlerSlot>,
        metrics: Arc<Metrics>,
        write_buffers: Arc<BufferPool>,
        read_budget: Option<Arc<ReadBudget>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            handler,
            metrics,
            write_buffers,
            read_budget,
        })
    }
}

/// A write-buffer pool whose utilisation `metrics` reports.
pub(crate) fn write_buffer_pool(metrics: &Metrics) -> Arc<BufferPool> {
    let pool = Arc::new(BufferPool::new(WRITE_BUFFER_CAPACITY, WRITE_BUFFERS_KEPT));
    let weak = Arc::downgrade(&pool);
    let gauge = metrics.buffer_utilization.with_label_values(&["write"]);
    metrics.add_probe(move || {
        if let Some(pool) = weak.upgrade() {
            gauge.set(pool.utilization());
        }
    });
    pool
}

/// One message in this many has its handler time measured.
const PROCESSING_SAMPLE: u64 = 16;

/// Initial size of a pooled write buffer.
const WRITE_BUFFER_CAPACITY: usize = 16 * 1024;
/// Idle write buffers kept for reuse.
const WRITE_BUFFERS_KEPT: usize = 64;

/// Starts the reader and writer of an authenticated session. Returns the
/// shared connection and a future that completes, with how it ended, when
/// both halves are done.
pub(crate) fn start_session<R: FrameReader, W: FrameWriter>(
    id: u64,
    mut reader: R,
    writer: W,
    setup: SessionSetup,
    context: Arc<SessionContext>,
) -> (Arc<Connection>, tokio::task::JoinHandle<SessionEnd>) {
    let config = &context.config;
    reader.set_max_frame_size(config.max_frame_size);
    if let Some(budget) = &context.read_budget {
        reader.set_read_budget(budget.clone());
    }
    let (queue, queue_rx) = mpsc::channel(config.send_queue_capacity.max(1));
    let now = SystemTime::now();
    let connection = Arc::new(Connection {
        id,
        identity: setup.identity,
        client_id: setup.client_id,
        session_id: setup.session_id,
        remote_addr: setup.remote_addr,
        connected_at: now,
        started: Instant::now(),
        chain_id: Mutex::new(None),
        peer_key: setup.peer_key,
        signed: setup.signer.is_some(),
        go_mode: setup.go_mode,
        counters: Counters {
            last_seen_nanos: AtomicI64::new(0),
            ..Counters::default()
        },
        acks: setup.delivery_acks.then(Acks::default),
        queue,
        closed: CancellationToken::new(),
        end: OnceLock::new(),
        write_timeout: config.write_timeout,
        max_frame_size: config.max_frame_size,
        stamp_len: setup
            .sender_id
            .as_ref()
            .map_or(0, |id| prost::encoding::string::encoded_len(1, id)),
    });
    let span = tracing::info_span!(
        "connection",
        id,
        identity = %connection.identity,
        remote = ?connection.remote_addr,
    );
    let writer_task = tokio::spawn(
        write_loop(
            writer,
            queue_rx,
            connection.clone(),
            setup.signer,
            setup.sender_id,
            context.clone(),
        )
        .instrument(span.clone()),
    );
    let reader_connection = connection.clone();
    context.metrics.connection("opened");
    context.metrics.connections_active.inc();
    let started = Instant::now();
    let task = tokio::spawn(
        async move {
            read_loop(reader, &reader_connection, setup.opener, &context).await;
            let mut writer_task = writer_task;
            let mut writer_done = false;
            if !reader_connection.closed.is_cancelled() {
                // A `Disconnect` is queued (`close`): let the writer send it.
                let grace = context.config.disconnect_timeout.saturating_mul(2);
                writer_done = tokio::time::timeout(grace, &mut writer_task).await.is_ok();
            }
            reader_connection.closed.cancel();
            if !writer_done {
                let _ = writer_task.await;
            }
            if let Some(acks) = &reader_connection.acks {
                let unconfirmed = acks.fail_waiting();
                if unconfirmed > 0 {
                    context.metrics.errors("unconfirmed", "write", unconfirmed as u64);
                    warn!(unconfirmed, "connection closed before the peer confirmed delivery");
                }
            }
            let end = reader_connection.end.get().cloned().unwrap_or(SessionEnd {
                reason: DisconnectReason::Requested,
                details: "closed".into(),
                by_peer: false,
            });
            let metrics = &context.metrics;
            metrics.connection("closed");
            metrics.connections_active.dec();
            metrics.connection_duration.observe(started.elapsed().as_secs_f64());
            info!(reason = %end.reason, details = %crate::log_safe(&end.details), by_peer = end.by_peer, "disconnected");
            end
        }
        .instrument(span),
    );
    (connection, task)
}

async fn read_loop<R: FrameReader>(
    mut reader: R,
    connection: &Connection,
    mut opener: Option<FrameOpener>,
    context: &SessionContext,
) {
    let config = &context.config;
    let check_every = config
        .ping_interval
        .unwrap_or(config.read_timeout)
        .min(config.read_timeout)
        .div_f32(2.0)
        .max(Duration::from_millis(10));
    let mut health = tokio::time::interval(check_every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_received = Instant::now();
    let mut last_ping: Option<Instant> = None;
    let mut evicting = false;
    let mut inbound = config.inbound_limit.map(InboundMeter::new);
    let mut dispatch = Dispatch {
        tally: context.metrics.tally(Direction::In),
        handler: HandlerCache::new(&context.handler),
    };
    // Made once, and polled only when no frame is ready: polling it takes
    // the token's lock.
    let closed = connection.closed.cancelled();
    tokio::pin!(closed);
    loop {
        // `end` is set before the token is cancelled, and is one atomic load:
        // a stream of ready frames cannot keep an aborted reader going.
        if connection.is_closed() && connection.closed.is_cancelled() {
            return;
        }
        let frame = tokio::select! {
            biased;
            frame = reader.read_frame() => frame,
            _ = &mut closed => return,
            _ = health.tick() => {
                let idle = last_received.elapsed();
                if idle >= config.read_timeout && !evicting {
                    evicting = true;
                    warn!(idle_ms = idle.as_millis() as u64, "evicting idle peer");
                    connection.close(DisconnectReason::ReadTimeout, format!("nothing received for {idle:?}"));
                    // Let the writer send the Disconnect; it cancels when done.
                    continue;
                }
                // An ack that found the queue full is retried here.
                connection.send_wanted_ack();
                // A peer that answers pings but no longer acknowledges (its
                // handler stuck) would keep confirmed sends waiting forever.
                if let Some(acks) = &connection.acks
                    && let Some(waited) = acks.oldest_wait()
                    && waited >= config.read_timeout
                    && !evicting
                {
                    evicting = true;
                    warn!(waited_ms = waited.as_millis() as u64, "peer stopped acknowledging");
                    connection.close(
                        DisconnectReason::ReadTimeout,
                        format!("no delivery acknowledgement for {waited:?}"),
                    );
                    continue;
                }
                if let Some(interval) = config.ping_interval
                    && idle >= interval
                    && last_ping.is_none_or(|at| at.elapsed() >= interval)
                {
                    last_ping = Some(Instant::now());
                    let ping = Payload::Ping(Ping { timestamp: unix_nanos(SystemTime::now()) });
                    let _ = connection.queue.try_send(Outbound::control(ping));
                }
                continue;
            }
        };
        let body = match frame {
            None => {
                connection.finish(SessionEnd {
                    reason: DisconnectReason::NetworkError,
                    details: "peer closed the connection".into(),
                    by_peer: true,
                });
                return;
            }
            Some(Err(err)) => {
                let reason = err.disconnect_reason();
                warn!(error = %err, "read failed");
                context.metrics.error(reason.as_str(), "read");
                if matches!(err, CodecError::Io(_)) {
                    connection.abort(reason, err.to_string());
                } else {
                    connection.close(reason, err.to_string());
                }
                return;
            }
            Some(Ok(body)) => body,
        };
        last_ping = None;
        connection.received(body.len() + codec::LENGTH_PREFIX_LEN);
        if let Some(meter) = &mut inbound
            && !meter.admit(body.len() + codec::LENGTH_PREFIX_LEN)
        {
            warn!("peer over its inbound rate limit");
            context.metrics.error("throttled", "read");
            connection.close(DisconnectReason::Throttled, "inbound rate limit exceeded");
            return;
        }
        context
            .metrics
            .bytes(Direction::In, body.len() + codec::LENGTH_PREFIX_LEN);

        let acks = connection.acks.is_some();
        // One allowance for everything decoding the frame allocates.
        let mut allowance = DecodeAllowance::for_frame(body.len());
        let flow = match opener.as_mut() {
            None => match decode_inbound(&body, acks, &mut allowance) {
                Ok(inbound) => deliver(connection, inbound, &body, context, &mut dispatch).await,
                Err(err) => Flow::Close(
                    DisconnectReason::ProtocolError,
                    format!("malformed Message: {err}"),
                ),
            },
            Some(opener) => match opener.open_within(body.clone(), &mut allowance) {
                Ok(encoded) => {
                    dispatch.tally.add(SIGNED_FRAME_KIND, body.len());
                    // Every message is decoded before the first is handled:
                    // a frame with one undecodable message delivers nothing,
                    // control messages included (docs/PROTOCOL.md §4.1).
                    match decode_all(body.len(), &encoded, acks, &mut allowance) {
                        Ok(decoded) => {
                            let mut flow = Flow::Continue;
                            for (inbound, bytes) in decoded.into_iter().zip(&encoded) {
                                flow = deliver(connection, inbound, bytes, context, &mut dispatch)
                                    .await;
                                if !matches!(flow, Flow::Continue) {
                                    break;
                                }
                            }
                            flow
                        }
                        Err(err) => {
                            let err = SignedFrameError::Malformed(match err {
                                DecodeBoundError::TooLarge { .. } => err.to_string(),
                                err => format!("message does not decode: {err}"),
                            });
                            context
                                .metrics
                                .signature_failures_total
                                .with_label_values(&[err.kind()])
                                .inc();
                            Flow::Close(err.disconnect_reason(), err.to_string())
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %err, kind = err.kind(), "signed frame refused");
                    let metrics = &context.metrics;
                    metrics
                        .signature_failures_total
                        .with_label_values(&[err.kind()])
                        .inc();
                    if matches!(
                        err,
                        SignedFrameError::Replayed { .. } | SignedFrameError::TooOld { .. }
                    ) {
                        metrics.replay_refusals_total.inc();
                    }
                    Flow::Close(err.disconnect_reason(), err.to_string())
                }
            },
        };
        match flow {
            Flow::Continue => {
                // Before waiting for more: one clock reading, one ack and one
                // metrics update for everything that was buffered. (The
                // health check cannot run while frames are buffered: the
                // biased select takes the frame first.)
                if !reader.has_buffered_frame() {
                    last_received = Instant::now();
                    connection.seen(last_received);
                    dispatch.tally.flush();
                    connection.send_wanted_ack();
                }
            }
            Flow::PeerLeft => return,
            Flow::Close(reason, details) => {
                warn!(%reason, %details, "closing connection");
                context.metrics.error(reason.as_str(), "read");
                connection.close(reason, details);
                return;
            }
        }
    }
}

/// Token buckets of a connection's inbound frames and bytes.
struct InboundMeter {
    limit: InboundLimit,
    frames: f64,
    bytes: f64,
    at: Instant,
}

impl InboundMeter {
    fn new(limit: InboundLimit) -> Self {
        Self {
            limit,
            frames: limit.frames_per_second,
            bytes: limit.bytes_per_second,
            at: Instant::now(),
        }
    }

    /// Charges one frame of `size` bytes; false when over the limit.
    fn admit(&mut self, size: usize) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let limit = self.limit;
        self.frames =
            (self.frames + elapsed * limit.frames_per_second).min(limit.frames_per_second) - 1.0;
        self.bytes = (self.bytes + elapsed * limit.bytes_per_second).min(limit.bytes_per_second)
            - size as f64;
        self.frames >= 0.0 && self.bytes >= 0.0
    }
}

/// What the reader does after a message.
enum Flow {
    Continue,
    /// The peer sent `Disconnect`; its reason is recorded.
    PeerLeft,
    /// Send `Disconnect{reason}` and close.
    Close(DisconnectReason, String),
}

fn control(payload: Payload) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(payload),
    }
}

/// A message as received: decoded, with its extension fields when it may
/// carry an acknowledgement.
struct Decoded {
    message: Message,
    /// Present for payload-less messages in sessions with acknowledgements.
    ext: Option<MessageExt>,
}

/// Decodes one received message. Extensions ride on payload-less messages
/// (docs/PROTOCOL.md §5.1), and are decoded, and must decode, only then.
fn decode_inbound(
    encoded: &Bytes,
    acks: bool,
    allowance: &mut DecodeAllowance,
) -> Result<Decoded, DecodeBoundError> {
    let message = allowance.decode::<Message>(encoded.clone())?;
    let ext = if acks && message.payload.is_none() {
        // Allocates nothing: an inline `Ack` and a flag.
        let ext =
            MessageExt::decode(encoded.clone()).map_err(|source| DecodeBoundError::Decode {
                what: "transport.v1.MessageExt",
                source,
            })?;
        Some(ext)
    } else {
        None
    };
    Ok(Decoded { message, ext })
}

/// Decodes every message of an opened signed frame within the frame's
/// allowance. The results' vector is charged up front, so that a frame of
/// many tiny messages is refused before anything is built.
fn decode_all(
    frame_len: usize,
    encoded: &[Bytes],
    acks: bool,
    allowance: &mut DecodeAllowance,
) -> Result<Vec<Decoded>, DecodeBoundError> {
    let slots = (encoded.len() as u64).saturating_mul(std::mem::size_of::<Decoded>() as u64);
    allowance.reserve("the messages of a signed frame", frame_len, slots)?;
    let mut decoded = Vec::with_capacity(encoded.len());
    for bytes in encoded {
        decoded.push(decode_inbound(bytes, acks, allowance)?);
    }
    Ok(decoded)
}

/// Handles control messages; hands the rest to the application handler.
async fn deliver(
    connection: &Connection,
    Decoded { message, ext }: Decoded,
    encoded: &Bytes,
    context: &SessionContext,
    dispatch: &mut Dispatch,
) -> Flow {
    let tally = &mut dispatch.tally;
    let size = encoded.len();
    if let Some(acks) = &connection.acks
        && let Some(ext) = ext
        && (ext.ack.is_some() || ext.ack_request)
    {
        tally.add(ACK_KIND, size);
        if let Some(ack) = ext.ack
            && let Err(details) = acks.acknowledge(ack.delivered)
        {
            return Flow::Close(DisconnectReason::ProtocolError, details);
        }
        if ext.ack_request {
            acks.ack_wanted.store(true, Ordering::Relaxed);
        }
        return Flow::Continue;
    }
    let kind = kind_index(&message);
    tally.add(kind, size);
    match &message.payload {
        Some(Payload::Ping(ping)) => {
            let pong = Outbound::control(Payload::Pong(Pong {
                timestamp: ping.timestamp,
            }));
            // A peer too slow to take its pongs is caught by the write path.
            let _ = connection.queue.try_send(pong);
            Flow::Continue
        }
        Some(Payload::Pong(_)) => Flow::Continue,
        Some(Payload::Disconnect(disconnect)) => {
            let reason = DisconnectReason::from_proto(disconnect.reason);
            info!(%reason, details = %crate::log_safe(&disconnect.details), "peer disconnected");
            connection.finish(SessionEnd {
                reason,
                details: disconnect.details.clone(),
                by_peer: true,
            });
            Flow::PeerLeft
        }
        Some(Payload::HandshakeRequest(_) | Payload::HandshakeResponse(_)) => Flow::Close(
            DisconnectReason::ProtocolError,
            "handshake message after the handshake".into(),
        ),
        _ => {
            let received = connection
                .counters
                .messages_in
                .fetch_add(1, Ordering::Relaxed);
            let Some(handler) = dispatch.handler.current(&context.handler) else {
                context.metrics.error("no_handler", "handle");
                warn!(
                    kind = MESSAGE_KINDS[kind],
                    "no handler set; message dropped"
                );
                connection.dispatched();
                return Flow::Continue;
            };
            let inbound = Inbound {
                from: connection.identity.clone(),
                connection_id: connection.id,
                message,
            };
            // Handler time is sampled: two clock reads per message cost more
            // than the figure is worth on a busy connection.
            let started = received
                .is_multiple_of(PROCESSING_SAMPLE)
                .then(Instant::now);
            let result = match handler.handle(inbound) {
                Handled::Done(result) => result,
                Handled::Pending(future) => future.await,
            };
            connection.dispatched();
            if let Some(started) = started {
                context.metrics.processing(kind, started.elapsed());
            }
            if let Err(err) = result {
                context.metrics.error("handler", "handle");
                warn!(error = %err, "handler failed");
            }
            Flow::Continue
        }
    }
}

/// Accumulates queued items into one write buffer. In signed mode unicast
/// messages wait in `pending` and are sealed together as one frame.
struct WriteBatch {
    buffer: BytesMut,
    /// Encoded messages awaiting a seal, split off as they are added.
    scratch: BytesMut,
    pending: Vec<Bytes>,
    pending_bytes: usize,
    messages: u64,
    max_frame_size: usize,
    metrics: Arc<Metrics>,
    tally: MessageTally,
    /// A sealed batch could not be encoded.
    failed: bool,
}

impl WriteBatch {
    fn len(&self) -> usize {
        self.buffer.len() + self.pending_bytes
    }

    /// Queues `message`, whose `encoded_len` is `len`, preceded by the
    /// pre-encoded `prefix` fields. Returns whether it was taken (the encoder
    /// refuses only what size checks at queueing time let through by mistake).
    fn push_message(
        &mut self,
        message: &Message,
        prefix: &[u8],
        len: usize,
        signer: Option<&FrameSigner>,
    ) -> bool {
        debug_assert_eq!(len, message.encoded_len());
        let size = prefix.len() + len;
        self.push_encoded(kind_index(message), size, signer, |buffer| {
            buffer.put_slice(prefix);
            message.encode(buffer).expect("capacity reserved");
        })
    }

    /// Queues an acknowledgement of `delivered` messages, or (`None`) a
    /// request for one.
    fn push_ack(&mut self, delivered: Option<u64>, signer: Option<&FrameSigner>) {
        let ext = MessageExt {
            ack: delivered.map(|delivered| Ack { delivered }),
            ack_request: delivered.is_none(),
        };
        self.push_encoded(ACK_KIND, ext.encoded_len(), signer, |buffer| {
            ext.encode(buffer).expect("capacity reserved");
        });
    }

    /// Queues one message of `size` bytes that `encode` writes.
    fn push_encoded(
        &mut self,
        kind: usize,
        size: usize,
        signer: Option<&FrameSigner>,
        encode: impl FnOnce(&mut BytesMut),
    ) -> bool {
        let Some(signer) = signer else {
            if let Err(err) = codec::check_frame_len(size, self.max_frame_size) {
                self.metrics.error("encode", "write");
                warn!(error = %err, "message refused by the encoder");
                return false;
            }
            self.buffer.reserve(codec::LENGTH_PREFIX_LEN + size);
            self.buffer.put_u32(size as u32);
            encode(&mut self.buffer);
            self.counted(kind, size);
            return true;
        };
        if self.pending_bytes + size + SIGNED_FRAME_OVERHEAD > self.max_frame_size
            || self.pending.len() >= SIGNED_BATCH_MAX_MESSAGES
        {
            self.seal(Some(signer));
        }
        // Messages of a batch are encoded side by side in one buffer; once
        // sealed, their bytes are copied out and the buffer is reclaimed.
        if self.scratch.capacity() == 0 {
            self.scratch = BytesMut::with_capacity(WRITE_BUFFER_CAPACITY.max(size));
        }
        self.scratch.reserve(size);
        encode(&mut self.scratch);
        self.counted(kind, size);
        self.pending_bytes += size + 8;
        self.pending.push(self.scratch.split().freeze());
        true
    }

    fn counted(&mut self, kind: usize, size: usize) {
        self.messages += u64::from(is_application_kind(kind));
        self.tally.add(kind, size);
    }

    fn push_frame(&mut self, frame: &[u8], kind: usize, signer: Option<&FrameSigner>) {
        // Keep order: what was queued before this frame goes out before it.
        self.seal(signer);
        self.counted(kind, frame.len() - codec::LENGTH_PREFIX_LEN);
        self.buffer.extend_from_slice(frame);
    }

    fn seal(&mut self, signer: Option<&FrameSigner>) {
        let Some(signer) = signer else { return };
        if self.pending.is_empty() {
            return;
        }
        let frame = signed::seal(
            &signer.key,
            signer.backend,
            signer.unicast.next(),
            &Audience::Unicast {
                recipient: signer.recipient.clone(),
                session: signer.session_tag,
            },
            std::mem::take(&mut self.pending),
        );
        self.pending_bytes = 0;
        let before = self.buffer.len();
        match codec::encode_message(&frame, self.max_frame_size, &mut self.buffer) {
            Ok(()) => {
                let size = self.buffer.len() - before - codec::LENGTH_PREFIX_LEN;
                self.tally.add(SIGNED_FRAME_KIND, size);
            }
            Err(err) => {
                // Its messages were counted for acknowledgements: the session
                // cannot go on (the writer aborts it).
                self.metrics.error("encode", "write");
                warn!(error = %err, "signed batch refused by the encoder");
                self.failed = true;
            }
        }
    }
}

/// Room a signed frame needs beyond its messages: sequence, audience,
/// signature and field tags, with margin.
pub(crate) const SIGNED_FRAME_OVERHEAD: usize = 512;

/// Most messages sealed into one signed frame. A receiver charges each
/// message's result to the frame's decode allowance (docs/PROTOCOL.md §6),
/// so a batch of many tiny messages must not outgrow it.
pub const SIGNED_BATCH_MAX_MESSAGES: usize = 1024;

/// The connection's single writer: drains the queue in batches of up to
/// [`WRITE_COALESCE_BYTES`], encodes (and seals) them into one buffer, and
/// writes it with one call.
async fn write_loop<W: FrameWriter>(
    mut writer: W,
    mut queue: mpsc::Receiver<Outbound>,
    connection: Arc<Connection>,
    signer: Option<FrameSigner>,
    sender_id: Option<String>,
    context: Arc<SessionContext>,
) {
    let config = &context.config;
    let pool = &context.write_buffers;
    let signer = signer.as_ref();
    // `sender_id` is field 1, which prost writes first: writing it ahead of a
    // message whose own `sender_id` is empty gives the very same bytes as
    // setting it, without a `String` per message.
    let stamp = sender_id.map(|id| {
        let mut field = Vec::new();
        prost::encoding::string::encode(1, &id, &mut field);
        field
    });
    let mut batch = WriteBatch {
        buffer: BytesMut::new(),
        scratch: BytesMut::new(),
        pending: Vec::new(),
        pending_bytes: 0,
        messages: 0,
        max_frame_size: config.max_frame_size,
        metrics: context.metrics.clone(),
        tally: context.metrics.tally(Direction::Out),
        failed: false,
    };
    // Application messages encoded so far: the position of the next one, less 1.
    let mut written: u64 = 0;
    let mut last_ack: u64 = 0;
    // Application messages of batches that never fully left.
    let mut lost: u64 = 0;
    let closed = connection.closed.cancelled();
    tokio::pin!(closed);
    loop {
        let first = tokio::select! {
            biased;
            item = queue.recv() => item,
            _ = &mut closed => None,
        };
        let Some(first) = first else { break };
        // Borrow a buffer only while there is something to write.
        batch.buffer = pool.take();
        let mut next = Some(first);
        let mut close = None;
        let mut confirming = false;
        while let Some(item) = next {
            match item {
                Outbound::Message(mut message, len) => {
                    let (prefix, len) = stamped(stamp.as_deref(), &mut message, len);
                    batch.push_message(&message, prefix, len, signer);
                }
                Outbound::Confirmed(mut message, len, done) => {
                    let (prefix, len) = stamped(stamp.as_deref(), &mut message, len);
                    // A message the encoder refused drops `done`: its sender
                    // learns it was not delivered.
                    if batch.push_message(&message, prefix, len, signer)
                        && let Some(acks) = &connection.acks
                    {
                        let position = written + batch.messages;
                        confirming = true;
                        acks.waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back((position, Instant::now(), done));
                    }
                }
                Outbound::Ack => {
                    if let Some(acks) = &connection.acks {
                        // Cleared before reading the count: a request made
                        // after this read queues a new ack (see `send_wanted_ack`).
                        acks.ack_queued.swap(false, Ordering::AcqRel);
                        let delivered = acks.dispatched.load(Ordering::Relaxed);
                        if delivered != last_ack {
                            last_ack = delivered;
                            batch.push_ack(Some(delivered), signer);
                        }
                    }
                }
                Outbound::Frame(frame, kind) => batch.push_frame(&frame, kind, signer),
                Outbound::Close(reason, details) => {
                    let disconnect = control(Payload::Disconnect(DisconnectMessage {
                        reason: reason.to_proto() as i32,
                        details: details.clone(),
                    }));
                    batch.push_message(&disconnect, &[], disconnect.encoded_len(), signer);
                    close = Some((reason, details));
                    break;
                }
            }
            next = if batch.len() < WRITE_COALESCE_BYTES {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if confirming && close.is_none() {
            // After the messages it covers, in the same write (and frame).
            batch.push_ack(None, signer);
        }
        batch.seal(signer);
        if batch.failed {
            lost += batch.messages;
            batch.tally.discard();
            pool.give(std::mem::take(&mut batch.buffer));
            connection.abort(
                DisconnectReason::InternalError,
                "a signed batch could not be encoded",
            );
            break;
        }
        written += batch.messages;
        if let Some(acks) = &connection.acks {
            // Published before the bytes leave: an ack can cover no more.
            acks.written.store(written, Ordering::Release);
        }
        let limit = if close.is_some() {
            config.disconnect_timeout
        } else {
            config.write_timeout
        };
        let written = batch.buffer.len();
        let result = if written == 0 {
            Some(Ok(Ok(())))
        } else {
            // An aborted connection (too slow, replaced, stopped) stops even a
            // write that is blocked on a peer which does not read.
            tokio::select! {
                result = tokio::time::timeout(limit, writer.write_frames(&batch.buffer)) => Some(result),
                _ = &mut closed => None,
            }
        };
        pool.give(std::mem::take(&mut batch.buffer));
        if !matches!(result, Some(Ok(Ok(())))) {
            // Not (fully) written: lost, and not counted as sent.
            lost += batch.messages;
            batch.tally.discard();
        }
        let Some(result) = result else { break };
        if queue.is_empty() {
            // Going idle: hold no buffer while waiting.
            batch.scratch = BytesMut::new();
        }
        match result {
            Ok(Ok(())) => {
                let counters = &connection.counters;
                counters
                    .bytes_out
                    .fetch_add(written as u64, Ordering::Relaxed);
                counters
                    .messages_out
                    .fetch_add(batch.messages, Ordering::Relaxed);
                context.metrics.bytes(Direction::Out, written);
                batch.tally.flush();
                batch.messages = 0;
            }
            Ok(Err(err)) => {
                context.metrics.error("io", "write");
                connection.abort(
                    DisconnectReason::NetworkError,
                    format!("write failed: {err}"),
                );
                break;
            }
            Err(_) => {
                context.metrics.error("write_timeout", "write");
                connection.abort(
                    DisconnectReason::WriteTimeout,
                    format!("write blocked for {limit:?}"),
                );
                break;
            }
        }
        if let Some((reason, details)) = close {
            connection.abort(reason, details);
            break;
        }
    }
    let end = connection.end.get();
    let reason = end.map(|end| (end.reason, end.details.as_str()));
    let _ = tokio::time::timeout(config.disconnect_timeout, writer.shutdown(reason)).await;
    // Whatever is still queued will never be written: say so, counting
    // application messages one by one, those of the batch cut off included.
    queue.close();
    let mut undelivered = lost;
    while let Ok(item) = queue.try_recv() {
        undelivered += u64::from(match &item {
            Outbound::Message(message, _) | Outbound::Confirmed(message, ..) => {
                is_application(message)
            }
            Outbound::Frame(_, kind) => is_application_kind(*kind),
            Outbound::Ack | Outbound::Close(..) => false,
        });
    }
    if undelivered > 0 {
        context.metrics.errors("undelivered", "write", undelivered);
        warn!(undelivered, "connection closed with messages unsent");
    }
}

/// The `sender_id` field to write ahead of `message`, clearing its own, and
/// the message's `encoded_len` once cleared (`len` is the one before).
fn stamped<'a>(stamp: Option<&'a [u8]>, message: &mut Message, len: usize) -> (&'a [u8], usize) {
    match stamp {
        Some(stamp) if is_application(message) => {
            let own = if message.sender_id.is_empty() {
                0
            } else {
                prost::encoding::string::encoded_len(1, &message.sender_id)
            };
            message.sender_id.clear();
            (stamp, len - own)
        }
        _ => (&[], len),
    }
}

/// Whether a payload kind (an index of `MESSAGE_KINDS`) is an application
/// message rather than handshake or control traffic.
fn is_application_kind(kind: usize) -> bool {
    !matches!(
        MESSAGE_KINDS[kind],
        "handshake_request" | "handshake_response" | "ping" | "pong" | "disconnect" | "ack"
    )
}

fn is_application(message: &Message) -> bool {
    !matches!(
        message.payload,
        Some(Payload::Ping(_) | Payload::Pong(_) | Payload::Disconnect(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed frame body of `messages`, as the writer seals them (the
    /// signature's bytes do not matter to the allowance).
    fn frame_of(messages: Vec<Bytes>) -> Bytes {
        crate::proto::transport::v1::SignedFrame {
            sequence: 1,
            audience: Some(
                crate::proto::transport::v1::signed_frame::Audience::RecipientKey(
                    Bytes::from_static(&[2; 33]),
                ),
            ),
            messages,
            signature: Bytes::from_static(&[0; 64]),
        }
        .encode_to_vec()
        .into()
    }

    fn decode_frame(body: &Bytes) -> Result<Vec<Decoded>, DecodeBoundError> {
        let mut allowance = DecodeAllowance::for_frame(body.len());
        allowance.charge::<crate::proto::transport::v1::SignedFrame>(
            body,
            crate::decode_bound::Source::Shared,
        )?;
        let frame = crate::proto::transport::v1::SignedFrame::decode(body.clone()).unwrap();
        decode_all(body.len(), &frame.messages, true, &mut allowance)
    }

    #[test]
    fn the_largest_batch_of_the_smallest_messages_is_within_the_allowance() {
        // The smallest messages a writer seals: payload-less acks and pongs.
        let pong = Bytes::from(control(Payload::Pong(Pong { timestamp: 0 })).encode_to_vec());
        let empty = Bytes::new();
        for message in [pong, empty] {
            let body = frame_of(vec![message; SIGNED_BATCH_MAX_MESSAGES]);
            let decoded = decode_frame(&body).expect("an honest batch decodes");
            assert_eq!(decoded.len(), SIGNED_BATCH_MAX_MESSAGES);
        }
    }

    #[test]
    fn a_frame_of_many_tiny_messages_is_refused_before_decoding_them() {
        // Few enough for the frame's own list of messages to fit its bound.
        let body = frame_of(vec![Bytes::new(); 16 * SIGNED_BATCH_MAX_MESSAGES]);
        match decode_frame(&body) {
            Err(DecodeBoundError::TooLarge { what, .. }) => {
                assert_eq!(what, "the messages of a signed frame")
            }
            other => panic!("expected TooLarge, got {:?}", other.map(|d| d.len())),
        }
    }

    fn waiting(acks: &Acks, positions: &[u64]) -> Vec<oneshot::Receiver<()>> {
        positions
            .iter()
            .map(|&position| {
                let (done, confirmed) = oneshot::channel();
                acks.waiting
                    .lock()
                    .unwrap()
                    .push_back((position, Instant::now(), done));
                confirmed
            })
            .collect()
    }

    #[test]
    fn an_ack_confirms_exactly_the_positions_it_covers() {
        let acks = Acks::default();
        acks.written.store(10, Ordering::Release);
        let mut confirmations = waiting(&acks, &[2, 5, 6, 10]);
        acks.acknowledge(5).unwrap();
        assert_eq!(confirmations[0].try_recv(), Ok(()));
        assert_eq!(confirmations[1].try_recv(), Ok(()));
        assert!(
            confirmations[2].try_recv().is_err(),
            "position 6 is not covered"
        );
        // A repeated count is harmless; a later one confirms the rest.
        acks.acknowledge(5).unwrap();
        assert!(confirmations[2].try_recv().is_err());
        acks.acknowledge(10).unwrap();
        assert_eq!(confirmations[2].try_recv(), Ok(()));
        assert_eq!(confirmations[3].try_recv(), Ok(()));
    }

    #[test]
    fn impossible_acks_are_refused() {
        let acks = Acks::default();
        acks.written.store(3, Ordering::Release);
        let mut confirmations = waiting(&acks, &[3]);
        let err = acks.acknowledge(4).unwrap_err();
        assert!(err.contains("ack of 4 messages; 3 sent"), "{err}");
        assert!(confirmations[0].try_recv().is_err(), "nothing confirmed");
        acks.acknowledge(2).unwrap();
        let err = acks.acknowledge(1).unwrap_err();
        assert!(err.contains("2 acknowledged before"), "{err}");
    }

    /// The example of docs/PROTOCOL.md §5.1.
    #[test]
    fn ack_bytes_match_the_protocol_document() {
        let ack = MessageExt {
            ack: Some(Ack { delivered: 300 }),
            ack_request: false,
        };
        assert_eq!(ack.encode_to_vec(), [0xa2, 0x06, 0x03, 0x08, 0xac, 0x02]);
        let as_message = Message::decode(&ack.encode_to_vec()[..]).unwrap();
        assert_eq!(
            as_message.payload, None,
            "a Go peer would see an empty message"
        );
        let request = MessageExt {
            ack: None,
            ack_request: true,
        };
        assert_eq!(request.encode_to_vec(), [0xa8, 0x06, 0x01]);
    }

    #[test]
    fn failing_the_waiting_tells_every_sender() {
        let acks = Acks::default();
        acks.written.store(2, Ordering::Release);
        let mut confirmations = waiting(&acks, &[1, 2]);
        assert_eq!(acks.fail_waiting(), 2);
        for confirmation in &mut confirmations {
            assert_eq!(
                confirmation.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            );
        }
        assert_eq!(acks.fail_waiting(), 0);
    }
}
