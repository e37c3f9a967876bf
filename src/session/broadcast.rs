//! Signed broadcasts, gathered into batches that are sealed once and shared.
//!
//! A broadcast to signed-frame peers is not sealed by its caller. It is
//! encoded into the open *batch*, and each recipient's outbox holds a place
//! for that batch where the broadcast was made. The first writer to reach a
//! place seals the batch (one signature) and every recipient writes the same
//! bytes. While the writers are busy, later
//! broadcasts join the open batch: a busy publisher signs once per batch, and
//! each peer verifies once per batch, not once per message.
//!
//! A batch takes another broadcast only while it is open: no writer has
//! sealed it and nothing was queued behind its place on any connection (that
//! *fences* it), the recipients and the exclusion are the same, and it has
//! room. So every connection still gets its unicast and broadcast messages in
//! the order they were sent. A batch's recipients are fixed, and then its
//! sequence number drawn, when it opens (docs/PROTOCOL.md §4.3: snapshot,
//! then draw). Drawing it then, not when a writer seals it, keeps the
//! numbers a connection receives in order: a lagging peer's writer may seal
//! a batch long after a fast peer's writer sealed the next one.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

use super::{Connection, SIGNED_BATCH_MAX_MESSAGES, SIGNED_FRAME_OVERHEAD, outbox::Refused};
use crate::{
    codec::{self, LENGTH_PREFIX_LEN},
    crypto::{CryptoBackend, SecretKey},
    error::{CodecError, DisconnectReason, SignedFrameError, TransportError},
    manager::{BroadcastReport, DroppedPeer},
    metrics::MessageTally,
    proto::{Message, MessageKind},
    signed::{self, Audience, SequenceCounter},
};

/// What seals a server's broadcasts.
#[derive(Debug)]
pub(crate) struct BroadcastSealer {
    pub(crate) key: Arc<SecretKey>,
    pub(crate) backend: CryptoBackend,
    /// The server's broadcast stream (docs/PROTOCOL.md §4.3).
    pub(crate) sequence: Arc<SequenceCounter>,
    pub(crate) max_frame_size: usize,
}

/// A server's signed broadcasts: the batch still open to more.
#[derive(Debug)]
pub(crate) struct BroadcastLog {
    sealer: Arc<BroadcastSealer>,
    open: Mutex<Option<Open>>,
}

#[derive(Debug)]
struct Open {
    /// Weak: a batch every recipient has written is let go at once.
    batch: Weak<PendingBatch>,
    /// The snapshot the batch was opened for, only to compare with (it
    /// keeps no connection alive).
    everyone: Weak<[Arc<Connection>]>,
}

impl BroadcastLog {
    pub(crate) fn new(sealer: BroadcastSealer) -> Self {
        Self {
            sealer: Arc::new(sealer),
            open: Mutex::new(None),
        }
    }

    /// Queues `message` for the signed-frame connections of `everyone`
    /// other than `exclude`, recording each in `report`. Refused whole if
    /// the message could never be sealed.
    fn queue(
        &self,
        everyone: &Arc<[Arc<Connection>]>,
        exclude: &str,
        message: &Message,
        report: &mut BroadcastReport,
    ) -> Result<(), TransportError> {
        let len = message.encoded_len();
        let entry = entry_len(len);
        let max = self.sealer.max_frame_size;
        let alone = entry + SIGNED_FRAME_OVERHEAD + exclude.len();
        if alone > max {
            return Err(CodecError::FrameTooLarge { size: alone, max }.into());
        }
        let kind = MessageKind::of(message);
        // Held while the places are charged: every outbox sees the batches
        // in the same order, and no broadcast joins a batch whose places are
        // still being queued.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let joined = open.as_ref().and_then(|open| {
            let batch = open.batch.upgrade()?;
            (Weak::ptr_eq(&open.everyone, &Arc::downgrade(everyone))
                && batch.exclude() == exclude
                && batch.join(message, len, max))
            .then_some(batch)
        });
        let (batch, first) = match joined {
            Some(batch) => (batch, false),
            None => {
                let sequence = self.sealer.sequence.next();
                let sealer = self.sealer.clone();
                let batch = Arc::new(PendingBatch::new(sealer, sequence, exclude, message, len));
                *open = Some(Open {
                    batch: Arc::downgrade(&batch),
                    everyone: Arc::downgrade(everyone),
                });
                (batch, true)
            }
        };
        // The first message also carries the frame's header and signature.
        let bytes = if first {
            batch.room + entry + signed::SIGNATURE_FIELD_LEN
        } else {
            entry
        };
        let recipients = everyone
            .iter()
            .filter(|c| c.is_signed() && (exclude.is_empty() || c.identity() != exclude));
        for connection in recipients {
            let queued = if connection.is_closed() {
                Err(Refused::Closed)
            } else {
                connection.outbox.push_pending(&batch, kind, bytes, first)
            };
            record(report, connection, queued);
        }
        Ok(())
    }
}

/// Queues `message` for every connection of `everyone` but the one named
/// `exclude`: one frame encoded for all peers without signed frames, and for
/// the others a place in the open batch of `log` (`None` without a signing
/// key: they are dropped). A peer whose queue is full is disconnected with
/// `WRITE_TIMEOUT` and listed as dropped. Refused whole, before anything is
/// queued, if the message is too large.
pub(crate) fn broadcast(
    log: Option<&BroadcastLog>,
    everyone: &Arc<[Arc<Connection>]>,
    exclude: Option<&str>,
    message: &Message,
    max_message_size: usize,
) -> Result<BroadcastReport, TransportError> {
    let recipients = || {
        everyone
            .iter()
            .filter(move |c| exclude.is_none_or(|excluded| c.identity() != excluded))
    };
    let plain = match recipients().any(|c| !c.is_signed()) {
        true => Some(codec::frame_message(message, max_message_size)?),
        false => None,
    };
    // Sized once: most broadcasts reach every connection.
    let mut report = BroadcastReport {
        delivered: Vec::with_capacity(everyone.len()),
        ..BroadcastReport::default()
    };
    if recipients().any(|c| c.is_signed()) {
        match log {
            Some(log) => log.queue(everyone, exclude.unwrap_or_default(), message, &mut report)?,
            None => report
                .dropped
                .extend(recipients().filter(|c| c.is_signed()).map(|c| DroppedPeer {
                    identity: c.identity().to_owned(),
                    reason: "no signing key for signed frames".to_owned(),
                })),
        }
    }
    if let Some(plain) = plain {
        let kind = MessageKind::of(message);
        for connection in recipients().filter(|c| !c.is_signed()) {
            let queued = connection.outbox.push_shared(plain.clone(), kind, false);
            record(&mut report, connection, queued);
        }
    }
    Ok(report)
}

/// Records how queueing a broadcast for `connection` went. A full queue
/// means a peer too slow to keep up: it is disconnected.
fn record(report: &mut BroadcastReport, connection: &Connection, queued: Result<(), Refused>) {
    let err = match queued {
        Ok(()) => return report.delivered.push(connection.identity_arc().clone()),
        Err(Refused::Full) => {
            connection.abort(DisconnectReason::WriteTimeout, "send queue full");
            TransportError::QueueFull {
                peer: connection.identity().to_owned(),
            }
        }
        Err(Refused::Closed) => connection.closed_error(),
    };
    report.dropped.push(DroppedPeer {
        identity: connection.identity().to_owned(),
        reason: err.to_string(),
    });
}

/// One signed broadcast frame in the making, shared by its recipients'
/// outboxes.
#[derive(Debug)]
pub(crate) struct PendingBatch {
    sealer: Arc<BroadcastSealer>,
    /// Drawn when the batch opened.
    sequence: u64,
    audience: Audience,
    /// Room ahead of the messages for the frame's header.
    room: usize,
    state: Mutex<BatchState>,
}

#[derive(Debug)]
enum BatchState {
    /// Messages in wire form behind `room` bytes; `open` while it may take
    /// more.
    Gathering {
        body: BytesMut,
        kinds: Vec<(MessageKind, usize)>,
        open: bool,
    },
    /// The whole frame, length prefix included, and its messages' kinds and
    /// sizes (each writer counts them once written).
    Sealed {
        frame: Bytes,
        kinds: Vec<(MessageKind, usize)>,
    },
    /// Sealing failed (a bug, not a peer's doing); every recipient's writer
    /// reports it and counts its `application` messages as lost.
    Failed { why: String, application: u64 },
}

impl PendingBatch {
    pub(super) fn new(
        sealer: Arc<BroadcastSealer>,
        sequence: u64,
        exclude: &str,
        first: &Message,
        len: usize,
    ) -> Self {
        let audience = Audience::Broadcast {
            exclude: exclude.to_owned(),
        };
        let room = signed::header_room(&audience);
        let mut body = BytesMut::with_capacity(room + 11 + len + signed::SIGNATURE_FIELD_LEN);
        body.put_bytes(0, room);
        signed::put_message_field(&mut body, len);
        // Capacity is reserved and the length measured: cannot fail.
        let _ = first.encode(&mut body);
        Self {
            sealer,
            sequence,
            audience,
            room,
            state: Mutex::new(BatchState::Gathering {
                body,
                kinds: vec![(MessageKind::of(first), len)],
                open: true,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclude(&self) -> &str {
        match &self.audience {
            Audience::Broadcast { exclude } => exclude,
            _ => "",
        }
    }

    /// Appends `message` (its `encoded_len` is `len`) if the batch is open
    /// and has room for it within `max_frame_size`.
    pub(super) fn join(&self, message: &Message, len: usize, max_frame_size: usize) -> bool {
        let entry = entry_len(len);
        let mut state = self.lock();
        let BatchState::Gathering { body, kinds, open } = &mut *state else {
            return false;
        };
        if !*open
            || kinds.len() >= SIGNED_BATCH_MAX_MESSAGES
            || body.len() - LENGTH_PREFIX_LEN + entry + SIGNED_FRAME_OVERHEAD > max_frame_size
        {
            *open = false;
            return false;
        }
        body.reserve(entry + signed::SIGNATURE_FIELD_LEN);
        signed::put_message_field(body, len);
        let _ = message.encode(body);
        kinds.push((MessageKind::of(message), len));
        true
    }

    /// Still gathering: a writer about to take its place lets the
    /// broadcaster run once first (see `writer`).
    pub(super) fn is_open(&self) -> bool {
        matches!(&*self.lock(), BatchState::Gathering { open: true, .. })
    }

    /// Takes no more messages: something was queued behind a place.
    pub(super) fn fence(&self) {
        if let BatchState::Gathering { open, .. } = &mut *self.lock() {
            *open = false;
        }
    }

    /// The sealed frame, sealing it now if no writer has yet, with the
    /// number of application messages in it. Once sealed, its messages are
    /// added to `tally`; a batch that cannot be sealed still says how many
    /// it held, for the writer to count as lost.
    pub(super) fn frame(&self, tally: &mut MessageTally) -> (Result<Bytes, SignedFrameError>, u64) {
        let mut state = self.lock();
        let (mut body, kinds) = match &mut *state {
            BatchState::Sealed { frame, kinds } => return (Ok(frame.clone()), count(kinds, tally)),
            BatchState::Failed { why, application } => {
                return (Err(SignedFrameError::Malformed(why.clone())), *application);
            }
            BatchState::Gathering { body, kinds, .. } => {
                (std::mem::take(body), std::mem::take(kinds))
            }
        };
        let sealer = &self.sealer;
        let sealed = signed::seal_in_place(
            &sealer.key,
            sealer.backend,
            self.sequence,
            &self.audience,
            &mut body,
            self.room,
            kinds.len(),
        );
        match sealed {
            Ok((start, signature)) => {
                body.put_slice(&signature);
                let frame = body.freeze().slice(start..);
                let application = count(&kinds, tally);
                *state = BatchState::Sealed {
                    frame: frame.clone(),
                    kinds,
                };
                (Ok(frame), application)
            }
            Err(err) => {
                let application = kinds.iter().filter(|(k, _)| k.is_application()).count() as u64;
                *state = BatchState::Failed {
                    why: match &err {
                        SignedFrameError::Malformed(why) => why.clone(),
                        other => other.to_string(),
                    },
                    application,
                };
                (Err(err), application)
            }
        }
    }
}

/// Bytes of a `messages` entry of a message `len` bytes long, field header
/// included.
fn entry_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Adds `kinds` to `tally`; the number of application messages among them.
fn count(kinds: &[(MessageKind, usize)], tally: &mut MessageTally) -> u64 {
    let mut application = 0;
    for &(kind, size) in kinds {
        tally.add(kind, size);
        application += u64::from(kind.is_application());
    }
    application
}
