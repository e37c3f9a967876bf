//! One authenticated connection over any ordered, reliable frame pipe.
//!
//! A back-end hands over a [`FrameReader`] and a [`FrameWriter`]; everything
//! above frames lives here, one job per module:
//! - `establish`: the handshake over the pipe, and refusals;
//! - `outbox`: senders encode each message once, in wire form, into the
//!   connection's byte outbox (budgets in messages and bytes);
//! - `broadcast`: signed broadcasts gathered into batches sealed once, by
//!   the first writer to reach them, and shared by every recipient;
//! - `writer`: the single writer (so frames never interleave) takes a
//!   write's worth, seals signed batches in place, writes vectored;
//! - `reader`: reads, verifies, answers pings, dispatches to the handler;
//! - `core`: pings, idle eviction and acknowledgement waits as a sans-IO
//!   state machine driven with `now`;
//! - `connection`, `handler`, `acks`: the shared handle, the handler API,
//!   delivery acknowledgements.

mod acks;
pub(crate) mod broadcast;
mod connection;
mod control;
mod core;
#[cfg(test)]
mod direct_tests;
mod establish;
mod handler;
mod messages;
mod outbox;
mod reader;
mod requests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timer_tests;
mod writer;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, atomic::AtomicI64},
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::{
    codec::{self},
    config::InboundLimit,
    crypto::{CryptoBackend, PublicKey, SecretKey},
    error::DisconnectReason,
    metrics::Metrics,
    pool::BufferPool,
    proto::{Message, MessageKind, Payload},
    signed::{FrameOpener, SequenceCounter},
};

pub use crate::pipe::{FrameReader, FrameWriter, WRITE_COALESCE_BYTES};
pub use crate::stream::{ReadBudget, StreamFrameReader, StreamFrameWriter, stream_pipe};
use acks::Acks;
use connection::Counters;
pub use connection::{Connection, ConnectionInfo};
pub(crate) use establish::*;
pub(crate) use handler::HandlerSlot;
use handler::{Dispatch, HandlerCache, ReplyTo};
pub use handler::{
    Handled, Handler, HandlerError, HandlerFuture, Inbound, InboundBatch, SyncHandler,
    channel_handler,
};
pub use messages::{Messages, message_stream};
use outbox::{Outbox, OutboxConfig};
use reader::read_loop;
pub use writer::SIGNED_BATCH_MAX_MESSAGES;
pub(crate) use writer::SIGNED_FRAME_OVERHEAD;
use writer::write_loop;

/// Per-connection settings shared by server and client.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Nothing received for this long evicts the peer with `READ_TIMEOUT`.
    pub read_timeout: Duration,
    /// Bound on one write, and on how long `send` waits for queue space.
    pub write_timeout: Duration,
    /// Ping after this long without receiving anything; `None` never pings.
    pub ping_interval: Option<Duration>,
    /// Messages queued per connection before senders wait (and broadcasts
    /// drop the peer).
    pub send_queue_capacity: usize,
    /// Bytes queued per connection before senders wait (and broadcasts drop
    /// the peer); a message larger than this still goes when nothing waits.
    pub send_queue_bytes: usize,
    /// What a read asks for at first and at least; see
    /// [`FrameReader::set_read_buffer_size`].
    pub read_buffer_size: usize,
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
            send_queue_bytes: DEFAULT_SEND_QUEUE_BYTES,
            read_buffer_size: 8192,
            max_frame_size: codec::DEFAULT_MAX_FRAME_SIZE,
            disconnect_timeout: Duration::from_secs(1),
            inbound_limit: None,
        }
    }
}

/// Default byte budget of a connection's send queue: it bounds what a
/// queue of large messages holds (the message budget alone would let 4,096
/// messages of 10 MiB wait), while small messages meet the message budget
/// first.
pub const DEFAULT_SEND_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Default byte budget of a client's send queue: one write's worth. A
/// client sends to one server, and the kernel's socket buffer holds what it
/// has written; a larger queue only holds more memory, and delays `send`'s
/// push-back (100 clients streaming in one process: 42 MB at 64 KiB,
/// 94 MB at 64 MiB, and no fewer messages per second). A server keeps the
/// larger [`DEFAULT_SEND_QUEUE_BYTES`]: there a full queue drops a broadcast
/// recipient.
pub const DEFAULT_CLIENT_SEND_QUEUE_BYTES: usize = WRITE_COALESCE_BYTES;

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
    /// Whether messages may carry request and reply ids.
    pub(crate) requests: bool,
    /// Whether the peer authenticated with the Go package's handshake.
    pub(crate) go_mode: bool,
    /// The chain id the session starts with.
    pub(crate) chain_id: Option<String>,
    /// Application metadata the peer sent with its pipe.
    pub(crate) metadata: Vec<(String, String)>,
    /// A frame written before anything else (the server's handshake
    /// response), queued before the session's tasks start.
    pub(crate) first_frame: Option<bytes::Bytes>,
}

#[cfg(test)]
impl SessionSetup {
    /// A session without authentication, signed frames or requests.
    pub(super) fn plain(identity: &str, delivery_acks: bool) -> Self {
        Self {
            identity: identity.into(),
            client_id: None,
            session_id: None,
            remote_addr: None,
            signer: None,
            opener: None,
            peer_key: None,
            sender_id: None,
            delivery_acks,
            requests: false,
            go_mode: false,
            chain_id: None,
            metadata: Vec::new(),
            first_frame: None,
        }
    }
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

/// One handler call in this many has its time measured (per message: a
/// call that takes several divides it among them).
const PROCESSING_SAMPLE: u64 = 16;

/// Size of a pooled write buffer: an outbox chunk rolls over once it holds
/// [`WRITE_COALESCE_BYTES`], so one buffer takes a whole chunk without
/// growing (each growth would copy what it holds).
const WRITE_BUFFER_CAPACITY: usize = WRITE_COALESCE_BYTES + 4 * 1024;
/// Idle write buffers kept for reuse (about 1 MiB of them).
const WRITE_BUFFERS_KEPT: usize = 16;

/// Starts the reader and writer of an authenticated session; `first` (the
/// handshake response) goes out before anything else, pings included.
/// Returns the shared connection and a future that completes, with how it
/// ended, when both halves are done.
pub(crate) fn start_session<R: FrameReader, W: FrameWriter>(
    id: u64,
    mut reader: R,
    mut writer: W,
    setup: SessionSetup,
    context: Arc<SessionContext>,
) -> (Arc<Connection>, tokio::task::JoinHandle<SessionEnd>) {
    let config = &context.config;
    reader.set_max_frame_size(config.max_frame_size);
    reader.set_read_buffer_size(config.read_buffer_size);
    if let Some(budget) = &context.read_budget {
        reader.set_read_budget(budget.clone());
    }
    let now = SystemTime::now();
    let connection = Arc::new(Connection {
        id,
        identity: setup.identity,
        client_id: setup.client_id,
        session_id: setup.session_id,
        remote_addr: setup.remote_addr,
        connected_at: now,
        started: Instant::now(),
        chain_id: Mutex::new(setup.chain_id),
        metadata: setup.metadata.into(),
        peer_key: setup.peer_key,
        signed: setup.signer.is_some(),
        go_mode: setup.go_mode,
        counters: Counters {
            last_seen_nanos: AtomicI64::new(0),
            ..Counters::default()
        },
        acks: setup.delivery_acks.then(Acks::default),
        requests: setup
            .requests
            .then(|| requests::Requests::new(config.send_queue_capacity)),
        outbox: Outbox::new(OutboxConfig {
            max_messages: config.send_queue_capacity,
            max_bytes: config.send_queue_bytes,
            signed: setup.signer.is_some(),
            max_frame_size: config.max_frame_size,
            sender_id: setup.sender_id,
            pool: context.write_buffers.clone(),
            metrics: context.metrics.clone(),
            direct: (setup.signer.is_none() && !setup.delivery_acks)
                .then(|| writer.direct())
                .flatten(),
        }),
        closed: CancellationToken::new(),
        end: OnceLock::new(),
        write_timeout: config.write_timeout,
        max_frame_size: config.max_frame_size,
    });
    if let Some(frame) = setup.first_frame {
        connection
            .outbox
            .push_first(frame, MessageKind::HandshakeResponse);
    }
    let span = tracing::info_span!(
        "connection",
        id,
        identity = %connection.identity,
        remote = ?connection.remote_addr,
    );
    // Each task owns its state in its async block and lends it to its loop:
    // an async fn holds two copies of what it takes by value. The opener
    // (replay windows, keys: over a kilobyte) lives on the heap, so that an
    // unsigned session does not carry the room for one.
    let (writer_connection, writer_context) = (connection.clone(), context.clone());
    let writer_task = tokio::spawn(
        async move {
            write_loop(
                &mut writer,
                &writer_connection,
                setup.signer.as_ref(),
                &writer_context,
            )
            .await;
        }
        .instrument(span.clone()),
    );
    let reader_connection = connection.clone();
    let mut opener = setup.opener.map(Box::new);
    context.metrics.connection("opened");
    context.metrics.connections_active.inc();
    let started = Instant::now();
    let task = tokio::spawn(
        async move {
            read_loop(
                &mut reader,
                &reader_connection,
                opener.as_deref_mut(),
                &context,
            )
            .await;
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
            if let Some(requests) = &reader_connection.requests {
                requests.fail_all();
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

/// A control message of the transport itself.
fn control(payload: Payload) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(payload),
    }
}
