//! The application's side of a session: handlers and what they receive.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        Arc, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc::{self, error::TrySendError as QueueError};

use prost::Message as _;

use super::Connection;
use crate::{
    error::{DisconnectReason, TransportError},
    metrics::MessageTally,
    proto::{Message, MessageKind},
};

/// A verified message handed to the application.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Who sent it: the verified identity when authenticated, else the connection id.
    pub from: Arc<str>,
    /// The connection it arrived on.
    pub connection_id: u64,
    /// The message.
    pub message: Message,
    /// Where a reply goes, when the message is a request.
    pub(super) reply_to: Option<ReplyTo>,
}

/// The connection and id a reply answers.
#[derive(Debug, Clone)]
pub(super) struct ReplyTo {
    pub(super) connection: Weak<Connection>,
    pub(super) id: u64,
}

impl Inbound {
    /// Whether the sender waits for a reply ([`reply`](Self::reply)).
    pub fn is_request(&self) -> bool {
        self.reply_to.is_some()
    }

    /// Answers this request: `message` goes back on the connection the
    /// request came on, and the peer's `request` returns it
    /// (docs/PROTOCOL.md §5.2). Waits, as `send` does, for room in the send
    /// queue. The peer takes the first reply; it ignores (and counts) any
    /// further one, and one that arrives after it stopped waiting.
    ///
    /// [`TransportError::NotARequest`] for a message that is not a request;
    /// [`TransportError::ConnectionClosed`] when that connection has ended
    /// (a reply never goes to a later session of the same peer).
    pub async fn reply(&self, message: Message) -> Result<(), TransportError> {
        let Some(to) = &self.reply_to else {
            return Err(TransportError::NotARequest {
                peer: self.from.to_string(),
            });
        };
        let Some(connection) = to.connection.upgrade() else {
            return Err(TransportError::ConnectionClosed {
                peer: self.from.to_string(),
                reason: DisconnectReason::Requested,
            });
        };
        connection.reply(message, to.id).await
    }
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

    /// Handles messages received together (the application messages of one
    /// read), taking one or more of them from the front of `batch`; the
    /// reader calls it until the batch is empty. The default takes one and
    /// hands it to [`handle`](Self::handle). A handler that takes many at
    /// once, and gives each `Message` back with [`InboundBatch::recycle`],
    /// receives without allocating: the next messages are decoded into the
    /// recycled ones.
    fn handle_batch(&self, batch: &mut InboundBatch) -> Handled {
        match batch.pop() {
            Some(inbound) => self.handle(inbound),
            None => Handled::Done(Ok(())),
        }
    }
}

/// Messages received together, in order; see [`Handler::handle_batch`].
#[derive(Debug, Default)]
pub struct InboundBatch {
    messages: VecDeque<Inbound>,
    /// Messages given back, decoded into again.
    spare: Vec<Message>,
}

/// Recycled messages kept per connection: as many as can wait for the
/// handler at once (fewer than [`BATCH_MESSAGES`](super::reader::BATCH_MESSAGES)
/// from earlier frames, plus the largest signed frame, whose messages are
/// all decoded before the first is handled), so a recycling handler's
/// messages are always decoded into a recycled one once they are warm.
pub(super) const SPARE_MESSAGES: usize =
    super::reader::BATCH_MESSAGES + super::SIGNED_BATCH_MAX_MESSAGES;

impl InboundBatch {
    /// Messages not yet taken.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether every message has been taken.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Takes the first message.
    pub fn pop(&mut self) -> Option<Inbound> {
        self.messages.pop_front()
    }

    /// Takes the first message if `take` says so.
    pub fn pop_if(&mut self, take: impl FnOnce(&Inbound) -> bool) -> Option<Inbound> {
        if take(self.messages.front()?) {
            self.messages.pop_front()
        } else {
            None
        }
    }

    /// The first message, left in place.
    pub fn front(&self) -> Option<&Inbound> {
        self.messages.front()
    }

    /// Takes every message, in order.
    pub fn drain(&mut self) -> impl Iterator<Item = Inbound> + '_ {
        self.messages.drain(..)
    }

    /// Gives a handled message back; a later message is decoded into it,
    /// reusing its allocations. A connection keeps up to 1,152 (about
    /// 280 KiB): as many as can wait for the handler at once. It lets them
    /// go once it has been quiet for a ping interval.
    pub fn recycle(&mut self, mut message: Message) {
        if self.spare.len() < SPARE_MESSAGES {
            // Its payload's bytes share received buffers: let them go now,
            // not when the message is reused, which may be never.
            message.clear();
            self.spare.push(message);
        }
    }

    pub(super) fn push(&mut self, inbound: Inbound) {
        self.messages.push_back(inbound);
    }

    /// Appends a message from `from` to decode into (a recycled one, or a
    /// new one), and returns it where it lies.
    pub(super) fn push_slot(&mut self, from: Arc<str>, connection_id: u64) -> &mut Inbound {
        let message = self.spare.pop().unwrap_or_default();
        self.messages.push_back(Inbound {
            from,
            connection_id,
            message,
            reply_to: None,
        });
        let last = self.messages.len() - 1;
        &mut self.messages[last]
    }

    /// Lets go of the recycled messages and of the queue's room, once the
    /// connection has been quiet: a connection that was busy once does not
    /// keep what its bursts needed.
    pub(super) fn trim(&mut self) {
        self.spare = Vec::new();
        if self.messages.is_empty() {
            self.messages = VecDeque::new();
        }
    }

    /// Takes the last message back (it was not for the handler after all).
    pub(super) fn pop_back(&mut self) -> Option<Inbound> {
        self.messages.pop_back()
    }

    /// A message to decode into: a recycled one, or a new one.
    pub(super) fn spare(&mut self) -> Message {
        self.spare.pop().unwrap_or_default()
    }
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

    /// Takes the leading run of messages of the first one's kind in one
    /// call, until one fails: nothing here waits, so calling back per
    /// message would only add overhead.
    fn handle_batch(&self, batch: &mut InboundBatch) -> Handled {
        let Some(kind) = batch.front().map(|first| MessageKind::of(&first.message)) else {
            return Handled::Done(Ok(()));
        };
        while let Some(inbound) = batch.pop_if(|next| MessageKind::of(&next.message) == kind) {
            if let Err(err) = (self.0)(inbound) {
                return Handled::Done(Err(err));
            }
        }
        Handled::Done(Ok(()))
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
pub(super) struct HandlerCache {
    generation: u64,
    handler: Option<Arc<dyn Handler>>,
}

impl HandlerCache {
    pub(super) fn new(slot: &HandlerSlot) -> Self {
        Self {
            generation: slot.generation.load(Ordering::Acquire),
            handler: slot.get(),
        }
    }

    pub(super) fn current(&mut self, slot: &HandlerSlot) -> Option<&Arc<dyn Handler>> {
        let generation = slot.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.handler = slot.get();
        }
        self.handler.as_ref()
    }
}

/// What the reader carries from message to message.
pub(super) struct Dispatch {
    pub(super) tally: MessageTally,
    pub(super) handler: HandlerCache,
    /// Application messages waiting for the handler.
    pub(super) batch: InboundBatch,
    /// Memory the waiting messages hold, as charged when decoding them.
    pub(super) held: u64,
    /// Handler calls so far, for sampling their duration.
    pub(super) calls: u64,
    /// The connection, for the reply handles of requests.
    pub(super) this: Weak<Connection>,
    /// Application messages received and not yet added to the connection's
    /// counter (once per batch, with the batch).
    pub(super) messages_in: u64,
    /// The sender field the peer's messages start with.
    pub(super) sender: super::reader::KnownSender,
    /// Replies received behind messages still waiting for the handler, not
    /// yet counted as dispatched.
    pub(super) replies: u64,
    /// Reused by signed frames; boxed, and made on the first one, so that
    /// unsigned and idle connections do not carry it.
    pub(super) signed: Option<Box<super::reader::SignedScratch>>,
}

impl Dispatch {
    /// Adds the application messages received since the last call to the
    /// connection's counter.
    pub(super) fn count_received(&mut self, connection: &Connection) {
        connection
            .counters
            .messages_in
            .fetch_add(std::mem::take(&mut self.messages_in), Ordering::Relaxed);
    }
}
