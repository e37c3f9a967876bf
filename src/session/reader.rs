//! The reading half of a session.

use super::{
    Connection, Dispatch, FrameReader, Handled, HandlerCache, Inbound, InboundBatch,
    PROCESSING_SAMPLE, ReplyTo, SessionContext, SessionEnd,
    control::{self, Control},
    core::{Health, HealthAction},
};
use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::{
    config::InboundLimit,
    decode_bound::DecodeAllowance,
    error::{CodecError, DisconnectReason},
    metrics::Direction,
    proto::{MessageKind, Payload, rollup::v1::Pong},
    signed::FrameOpener,
};

mod decode;
#[cfg(test)]
pub(in crate::session) use decode::decode_all;
pub(in crate::session) use decode::{Decoded, KnownSender, SignedScratch};
use decode::{decode_ext, is_ack, open_signed};

/// Reads until the connection ends. The reader and opener are borrowed, not
/// owned: an async fn keeps a second copy of every argument it owns in its
/// state, and the opener's replay windows are over a kilobyte.
pub(super) async fn read_loop<R: FrameReader>(
    reader: &mut R,
    connection: &Arc<Connection>,
    mut opener: Option<&mut FrameOpener>,
    context: &SessionContext,
) {
    let config = &context.config;
    let mut health = Health::new(
        config.read_timeout,
        config.ping_interval,
        tokio::time::Instant::now(),
    );
    let unconfirmed = || {
        connection
            .acks
            .as_ref()
            .and_then(|acks| acks.oldest_since())
    };
    // One timer for every deadline, reset only when it fires: traffic moves
    // deadlines later, and the core says whether anything is due yet.
    let timer = tokio::time::sleep_until(
        health
            .poll_timeout(None)
            .unwrap_or_else(tokio::time::Instant::now),
    );
    tokio::pin!(timer);
    let mut timer_armed = true;
    let mut inbound = config.inbound_limit.map(InboundMeter::new);
    let mut dispatch = Dispatch {
        tally: context.metrics.tally(Direction::In),
        handler: HandlerCache::new(&context.handler),
        batch: InboundBatch::default(),
        held: 0,
        calls: 0,
        this: Arc::downgrade(connection),
        messages_in: 0,
        sender: KnownSender::default(),
        replies: 0,
        signed: None,
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
        // In a block, so that what the read returned takes no room while
        // the frames are handled.
        let mut batch = {
            let read = tokio::select! {
                biased;
                batch = reader.read_batch() => batch,
                _ = &mut closed => return,
                () = &mut timer, if timer_armed => {
                    let now = tokio::time::Instant::now();
                    match health.handle_timeout(now, unconfirmed()) {
                        Some(HealthAction::Ping) => {
                            // Quiet for a ping interval: spares go.
                            connection.outbox.trim();
                            dispatch.signed = None;
                            dispatch.batch.trim();
                            connection.ping();
                        }
                        Some(HealthAction::Idle(idle)) => {
                            warn!(idle_ms = idle.as_millis() as u64, "evicting idle peer");
                            connection.close(DisconnectReason::ReadTimeout, format!("nothing received for {idle:?}"));
                        }
                        Some(HealthAction::Unacknowledged(waited)) => {
                            warn!(waited_ms = waited.as_millis() as u64, "peer stopped acknowledging");
                            connection.close(
                                DisconnectReason::ReadTimeout,
                                format!("no delivery acknowledgement for {waited:?}"),
                            );
                        }
                        None => {}
                    }
                    // After an eviction the writer sends the Disconnect and
                    // cancels; the reader waits for that.
                    match health.poll_timeout(unconfirmed()) {
                        Some(at) => timer.as_mut().reset(at),
                        None => timer_armed = false,
                    }
                    continue;
                }
            };
            match read {
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
                Some(Ok(batch)) => batch,
            }
        };
        // Byte counters, metrics and the rate limit once per read.
        let wire_len = batch.wire_len();
        connection.received(wire_len);
        if let Some(meter) = &mut inbound
            && !meter.admit(batch.len(), wire_len)
        {
            warn!("peer over its inbound rate limit");
            context.metrics.error("throttled", "read");
            connection.close(DisconnectReason::Throttled, "inbound rate limit exceeded");
            return;
        }
        context.metrics.bytes(Direction::In, wire_len);

        let mut flow = Flow::Continue;
        loop {
            // Taken one by one: iterating the batch by value would keep a
            // second copy of it in the task's state.
            let more = match batch.next() {
                Some(body) => {
                    flow = receive_frame(
                        body,
                        connection,
                        opener.as_deref_mut(),
                        context,
                        &mut dispatch,
                    );
                    matches!(flow, Flow::Continue)
                }
                None => false,
            };
            // Waiting messages hold what decoding them was charged; past a
            // bound the handler takes them before more is decoded, so that
            // a read of many small frames cannot pile up what each alone
            // was allowed. What arrived before a Disconnect or a bad frame
            // is still handled. One await for both keeps one state for it.
            if !more || dispatch.held >= BATCH_HELD_BYTES || dispatch.batch.len() >= BATCH_MESSAGES
            {
                handle_batch(connection, context, &mut dispatch).await;
            }
            if !more {
                break;
            }
        }
        match flow {
            Flow::Continue => {
                // Before waiting for more: one clock reading, one ack and one
                // metrics update for everything that was buffered. (The
                // health check cannot run while frames are buffered: the
                // biased select takes the frame first.)
                if !reader.has_buffered_frame() {
                    let now = tokio::time::Instant::now();
                    health.received(now);
                    connection.seen(now.into_std());
                    dispatch.tally.flush();
                    connection.send_wanted_ack();
                }
            }
            Flow::PeerLeft(end) => {
                connection.finish(end);
                return;
            }
            Flow::Close(reason, details) => {
                warn!(%reason, %details, "closing connection");
                context.metrics.error(reason.as_str(), "read");
                connection.close(reason, details);
                return;
            }
        }
    }
}

/// Opens (in signed sessions) and decodes one frame; control messages are
/// acted on, application messages join the batch for the handler.
fn receive_frame(
    body: Bytes,
    connection: &Connection,
    opener: Option<&mut FrameOpener>,
    context: &SessionContext,
    dispatch: &mut Dispatch,
) -> Flow {
    // One allowance for everything decoding the frame allocates.
    let mut allowance = DecodeAllowance::for_frame(body.len());
    let flow = match opener {
        None => match control::divert(&body) {
            // Control off the handler's path: no decode bound, no slot.
            Some(Control::Ping(ping)) => {
                dispatch.tally.add(MessageKind::Ping, body.len());
                connection.push_control(Payload::Pong(Pong {
                    timestamp: ping.timestamp,
                }));
                return Flow::Continue;
            }
            Some(Control::Pong) => {
                dispatch.tally.add(MessageKind::Pong, body.len());
                return Flow::Continue;
            }
            None => receive_in_place(body, connection, context, &mut allowance, dispatch),
        },
        Some(opener) => {
            // Lent out of `dispatch`, which delivering borrows.
            let mut scratch = dispatch.signed.take().unwrap_or_default();
            let flow = open_signed(
                body,
                opener,
                &mut allowance,
                &mut scratch,
                connection,
                context,
                dispatch,
            );
            scratch.release();
            dispatch.signed = Some(scratch);
            flow
        }
    };
    // Waiting messages hold what decoding them was charged; past a bound
    // the handler takes them before more is decoded, so that a read of
    // many small frames cannot pile up what each alone was allowed.
    dispatch.held += allowance.bound() - allowance.remaining();
    flow
}

/// Decodes an unsigned frame's message where it waits for the handler, so
/// that an application message is not moved on its way there (a `Message`
/// is some 250 bytes); anything else is taken back out and delivered.
fn receive_in_place(
    body: Bytes,
    connection: &Connection,
    context: &SessionContext,
    allowance: &mut DecodeAllowance,
    dispatch: &mut Dispatch,
) -> Flow {
    let acks = connection.acks.is_some();
    let requests = connection.requests.is_some();
    let size = body.len();
    // Kept only where extension fields may follow: decoding consumes `body`.
    let whole = (acks || requests).then(|| body.clone());
    let slot = dispatch
        .batch
        .push_slot(connection.identity.clone(), connection.id);
    let decoded = dispatch
        .sender
        .decode_into(body, &mut slot.message, allowance)
        .and_then(|()| match &whole {
            Some(whole) => decode_ext(whole, &slot.message, acks, requests),
            None => Ok(None),
        });
    let ext = match decoded {
        Ok(ext) => ext,
        Err(err) => {
            if let Some(inbound) = dispatch.batch.pop_back() {
                dispatch.batch.recycle(inbound.message);
            }
            return Flow::Close(
                DisconnectReason::ProtocolError,
                format!("malformed Message: {err}"),
            );
        }
    };
    let kind = MessageKind::of(&slot.message);
    let (request_id, reply_to) = ext.map_or((0, 0), |ext| (ext.request_id, ext.reply_to));
    // As `deliver` tells them: an ack is control, a reply goes to its caller.
    if kind.is_application() && reply_to == 0 && !is_ack(acks, &slot.message, ext.as_ref()) {
        // The common case: it stays where it is, for the handler.
        if requests && request_id != 0 {
            slot.reply_to = Some(ReplyTo {
                connection: dispatch.this.clone(),
                id: request_id,
            });
        }
        dispatch.tally.add(kind, size);
        dispatch.messages_in += 1;
        dispatch.held += std::mem::size_of::<Inbound>() as u64;
        return Flow::Continue;
    }
    match dispatch.batch.pop_back() {
        Some(inbound) => deliver(
            connection,
            context,
            Decoded {
                message: inbound.message,
                ext,
            },
            size,
            dispatch,
        ),
        None => Flow::Continue,
    }
}

/// Hands the waiting application messages to the handler, in order.
async fn handle_batch(connection: &Connection, context: &SessionContext, dispatch: &mut Dispatch) {
    dispatch.held = 0;
    // Counted per batch, and before the handler sees them.
    dispatch.count_received(connection);
    handle_waiting(connection, context, dispatch).await;
    // Replies that arrived behind the batch count once it is dispatched, so
    // that an ack never counts past a message the handler has not finished.
    for _ in 0..std::mem::take(&mut dispatch.replies) {
        connection.dispatched();
    }
}

async fn handle_waiting(
    connection: &Connection,
    context: &SessionContext,
    dispatch: &mut Dispatch,
) {
    if dispatch.batch.is_empty() {
        return;
    }
    // A reply to these may be written at once.
    connection.outbox.arm_direct();
    let Some(handler) = dispatch.handler.current(&context.handler).cloned() else {
        let dropped = dispatch.batch.len();
        context
            .metrics
            .errors("no_handler", "handle", dropped as u64);
        warn!(messages = dropped, "no handler set; messages dropped");
        for inbound in dispatch.batch.drain() {
            drop(inbound);
            connection.dispatched();
        }
        return;
    };
    while let Some(first) = dispatch.batch.front() {
        let kind = MessageKind::of(&first.message);
        let before = dispatch.batch.len();
        // Handler time is sampled: two clock reads per call cost more than
        // the figure is worth on a busy connection. A call's messages are
        // all of `kind` for the handlers this crate provides; a batch
        // handler of the application's own is timed by its first message.
        let calls = dispatch.calls;
        dispatch.calls = calls.wrapping_add(1);
        let started = calls.is_multiple_of(PROCESSING_SAMPLE).then(Instant::now);
        let result = match handler.handle_batch(&mut dispatch.batch) {
            Handled::Done(result) => result,
            Handled::Pending(future) => future.await,
        };
        let taken = before.saturating_sub(dispatch.batch.len());
        for _ in 0..taken {
            connection.dispatched();
        }
        if let (Some(started), Ok(taken @ 1..)) = (started, u32::try_from(taken)) {
            // Per message: a batch handler may take many in one call.
            context.metrics.processing(kind, started.elapsed() / taken);
        }
        if let Err(err) = result {
            context.metrics.error("handler", "handle");
            warn!(error = %err, "handler failed");
        }
        if taken == 0 {
            // A batch handler that takes nothing would be called forever.
            let dropped = dispatch.batch.len();
            context.metrics.errors("handler", "handle", dropped as u64);
            warn!(
                messages = dropped,
                "handler took no message; the rest of the batch is dropped"
            );
            for _ in dispatch.batch.drain() {
                connection.dispatched();
            }
        }
    }
}

/// Application messages that wait for the handler while frames are decoded:
/// past this many it takes them before the next frame. Every busy
/// connection keeps room for this many `Message`s (248 bytes each): 128
/// rather than 256 saves 31 KiB a connection (100 clients streaming: 42 MB
/// → 39 MB peak RSS) at no measured cost in messages per second.
pub(super) const BATCH_MESSAGES: usize = 128;

/// Decoded memory (as charged) that waiting messages may hold.
const BATCH_HELD_BYTES: u64 = 256 * 1024;

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

    /// Charges `frames` frames of `size` bytes in all; false when over the limit.
    fn admit(&mut self, frames: usize, size: usize) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let limit = self.limit;
        self.frames = (self.frames + elapsed * limit.frames_per_second)
            .min(limit.frames_per_second)
            - frames as f64;
        self.bytes = (self.bytes + elapsed * limit.bytes_per_second).min(limit.bytes_per_second)
            - size as f64;
        self.frames >= 0.0 && self.bytes >= 0.0
    }
}

/// What the reader does after a message.
enum Flow {
    Continue,
    /// The peer sent `Disconnect`, for this reason.
    PeerLeft(SessionEnd),
    /// Send `Disconnect{reason}` and close.
    Close(DisconnectReason, String),
}

/// Acts on a control message; queues an application message for the handler.
fn deliver(
    connection: &Connection,
    context: &SessionContext,
    Decoded { message, ext }: Decoded,
    size: usize,
    dispatch: &mut Dispatch,
) -> Flow {
    let tally = &mut dispatch.tally;
    if let Some(acks) = &connection.acks
        && let Some(ext) = &ext
        && is_ack(true, &message, Some(ext))
    {
        tally.add(MessageKind::Ack, size);
        dispatch.batch.recycle(message);
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
    let kind = MessageKind::of(&message);
    tally.add(kind, size);
    let flow = match &message.payload {
        Some(Payload::Ping(ping)) => {
            connection.push_control(Payload::Pong(Pong {
                timestamp: ping.timestamp,
            }));
            Flow::Continue
        }
        Some(Payload::Pong(_)) => Flow::Continue,
        Some(Payload::Disconnect(disconnect)) => {
            let reason = DisconnectReason::from_proto(disconnect.reason);
            info!(%reason, details = %crate::log_safe(&disconnect.details), "peer disconnected");
            Flow::PeerLeft(SessionEnd {
                reason,
                details: disconnect.details.clone(),
                by_peer: true,
            })
        }
        Some(Payload::HandshakeRequest(_) | Payload::HandshakeResponse(_)) => Flow::Close(
            DisconnectReason::ProtocolError,
            "handshake message after the handshake".into(),
        ),
        _ => {
            dispatch.messages_in += 1;
            let (request_id, reply_to) = ext.map_or((0, 0), |ext| (ext.request_id, ext.reply_to));
            let mut inbound = Inbound {
                from: connection.identity.clone(),
                connection_id: connection.id,
                message,
                reply_to: None,
            };
            if let Some(requests) = &connection.requests {
                if reply_to != 0 {
                    // A reply goes to its caller, never to the handler; the
                    // caller's next request may be written at once. Counted
                    // before the caller wakes, as a handler's messages are.
                    connection.outbox.arm_direct();
                    dispatch.count_received(connection);
                    if !requests.complete(reply_to, inbound) {
                        let unknown = requests.unknown_reply();
                        context.metrics.error("unknown_reply", "read");
                        if unknown == 1 {
                            warn!(
                                id = reply_to,
                                "reply to no waiting request ignored (further ones logged at debug)"
                            );
                        } else {
                            debug!(
                                id = reply_to,
                                unknown, "reply to no waiting request ignored"
                            );
                        }
                    }
                    if dispatch.batch.is_empty() {
                        connection.dispatched();
                    } else {
                        dispatch.replies += 1;
                    }
                    return Flow::Continue;
                }
                if request_id != 0 {
                    inbound.reply_to = Some(ReplyTo {
                        connection: dispatch.this.clone(),
                        id: request_id,
                    });
                }
            }
            dispatch.held += std::mem::size_of::<Inbound>() as u64;
            dispatch.batch.push(inbound);
            return Flow::Continue;
        }
    };
    dispatch.batch.recycle(message);
    flow
}
