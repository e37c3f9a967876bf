//! Decoding what a frame carries: the message of an unsigned frame, the
//! messages of a signed one (opened into reused buffers), each within the
//! frame's decode allowance.

use bytes::Bytes;
use prost::Message as _;
use tracing::warn;

use super::{Dispatch, Flow, deliver};
use crate::{
    decode_bound::{DecodeAllowance, DecodeBoundError},
    error::SignedFrameError,
    proto::{
        Message, MessageKind,
        transport::v1::{MessageExt, SignedFrame},
    },
    session::{Connection, InboundBatch, SessionContext},
    signed::FrameOpener,
};

/// A message as received: decoded, with its extension fields when it may
/// carry some.
pub(in crate::session) struct Decoded {
    pub(super) message: Message,
    /// Present for payload-less messages in sessions with acknowledgements,
    /// and for every message in sessions with requests.
    pub(super) ext: Option<MessageExt>,
}

/// Decodes one received message. Acknowledgements ride on payload-less
/// messages (docs/PROTOCOL.md §5.1), request and reply ids on application
/// messages (§5.2): the extension fields are decoded, and must decode, only
/// in sessions that negotiated them.
fn decode_inbound(
    encoded: &Bytes,
    mut message: Message,
    acks: bool,
    requests: bool,
    allowance: &mut DecodeAllowance,
) -> Result<Decoded, DecodeBoundError> {
    allowance.decode_into(encoded.clone(), &mut message)?;
    let ext = decode_ext(encoded, &message, acks, requests)?;
    Ok(Decoded { message, ext })
}

/// The extension fields of a decoded `message`, where the session may have
/// them: on payload-less messages with acknowledgements, on every message
/// with requests.
pub(super) fn decode_ext(
    encoded: &Bytes,
    message: &Message,
    acks: bool,
    requests: bool,
) -> Result<Option<MessageExt>, DecodeBoundError> {
    if !(requests || (acks && message.payload.is_none())) {
        return Ok(None);
    }
    // Allocates nothing: an inline `Ack`, a flag and two ids.
    MessageExt::decode(encoded.clone())
        .map(Some)
        .map_err(|source| DecodeBoundError::Decode {
            what: "transport.v1.MessageExt",
            source,
        })
}

/// Whether a decoded message is an acknowledgement (or a request for one):
/// control, never for the handler (docs/PROTOCOL.md §5.1).
pub(super) fn is_ack(acks: bool, message: &Message, ext: Option<&MessageExt>) -> bool {
    acks && message.payload.is_none() && ext.is_some_and(|ext| ext.ack.is_some() || ext.ack_request)
}

/// Decodes every message of an opened signed frame within the frame's
/// allowance, into `decoded`. The results' vector is charged up front, so that a frame of
/// many tiny messages is refused before anything is built.
pub(in crate::session) fn decode_all(
    frame_len: usize,
    encoded: &[Bytes],
    acks: bool,
    requests: bool,
    allowance: &mut DecodeAllowance,
    batch: &mut InboundBatch,
    decoded: &mut Vec<Decoded>,
) -> Result<(), DecodeBoundError> {
    let slots = (encoded.len() as u64).saturating_mul(std::mem::size_of::<Decoded>() as u64);
    allowance.reserve("the messages of a signed frame", frame_len, slots)?;
    decoded.clear();
    decoded.reserve(encoded.len());
    for bytes in encoded {
        let message = batch.spare();
        decoded.push(decode_inbound(bytes, message, acks, requests, allowance)?);
    }
    Ok(())
}

/// Opens a signed frame into `scratch`, decodes its messages and delivers them.
pub(super) fn open_signed(
    body: Bytes,
    opener: &mut FrameOpener,
    allowance: &mut DecodeAllowance,
    scratch: &mut SignedScratch,
    connection: &Connection,
    context: &SessionContext,
    dispatch: &mut Dispatch,
) -> Flow {
    let acks = connection.acks.is_some();
    let requests = connection.requests.is_some();
    let body_len = body.len();
    match opener.open_into(body, allowance, &mut scratch.frame) {
        Ok(()) => {
            dispatch.tally.add(MessageKind::SignedFrame, body_len);
            let encoded = &scratch.frame.messages;
            // Every message is decoded before the first is handled:
            // a frame with one undecodable message delivers nothing,
            // control messages included (docs/PROTOCOL.md §4.1).
            match decode_all(
                body_len,
                encoded,
                acks,
                requests,
                allowance,
                &mut dispatch.batch,
                &mut scratch.decoded,
            ) {
                Ok(()) => {
                    let mut flow = Flow::Continue;
                    for (inbound, bytes) in scratch.decoded.drain(..).zip(encoded) {
                        flow = deliver(connection, context, inbound, bytes.len(), dispatch);
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
    }
}

/// What opening signed frames reuses from frame to frame: the decoded
/// frame (its message list) and the decoded messages' slots.
#[derive(Default)]
pub(in crate::session) struct SignedScratch {
    frame: SignedFrame,
    decoded: Vec<Decoded>,
}

impl SignedScratch {
    /// Slots kept between frames: a larger frame's are let go, so a burst
    /// of large frames does not leave each connection holding them.
    const KEPT_SLOTS: usize = 64;

    /// Lets go of everything that refers to the frame's buffer, keeping
    /// the message list's capacity.
    pub(super) fn release(&mut self) {
        self.frame.messages.clear();
        self.frame.signature = Bytes::new();
        self.frame.audience = None;
        self.decoded.clear();
        if self.decoded.capacity() > Self::KEPT_SLOTS {
            self.decoded = Vec::new();
        }
    }
}
