//! Decoding what a frame carries: the message of an unsigned frame, the
//! messages of a signed one (opened into reused buffers), each within the
//! frame's decode allowance.

use bytes::{Buf, Bytes};
use prost::{Message as _, encoding::WireType};
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

/// The `sender_id` field a peer puts first in its messages, as last seen. A
/// body that starts with exactly these bytes has its `sender_id` copied
/// instead of decoded and checked for UTF-8 again; the rest of the body is
/// decoded as usual, so the message is the same as a full decode's.
#[derive(Debug, Default)]
pub(in crate::session) struct KnownSender {
    /// The field as encoded: key, length, contents.
    field: Vec<u8>,
    /// Its contents (valid UTF-8: taken from a decoded message).
    id: String,
}

impl KnownSender {
    /// Longest identity remembered: a peer's messages carry one identity,
    /// and a short one.
    const MAX_LEN: usize = 256;

    /// Decodes `body` into `message` within `allowance`, copying the known
    /// sender when the body starts with it, else learning it.
    pub(in crate::session) fn decode_into(
        &mut self,
        mut body: Bytes,
        message: &mut Message,
        allowance: &mut DecodeAllowance,
    ) -> Result<(), DecodeBoundError> {
        if !self.field.is_empty() && body.starts_with(&self.field) {
            message.clear();
            message.sender_id.push_str(&self.id);
            // Charged as the scan charges a first string: at least 8 bytes.
            // (A second `sender_id` in the rest, which the full scan charges
            // twice, is charged once: the string then holds at most the
            // larger of twice this and that one, which the two charges
            // cover.)
            let leading = (self.id.len() as u64).max(8);
            body.advance(self.field.len());
            return allowance.merge_into(body, leading, message);
        }
        if body.first() != Some(&SENDER_ID_KEY) {
            // Nothing to learn from.
            return allowance.decode_into(body, message);
        }
        allowance.decode_into(body.clone(), message)?;
        self.learn(&body, &message.sender_id);
        Ok(())
    }

    /// Remembers `sender_id` if `body` starts with it as its first field.
    /// A body without one (an acknowledgement) leaves what was learnt: any
    /// body that starts with the remembered bytes may take the shortcut.
    fn learn(&mut self, body: &[u8], sender_id: &str) {
        if sender_id.is_empty() || sender_id.len() > Self::MAX_LEN {
            return;
        }
        let Some(mut rest) = body.strip_prefix(&[SENDER_ID_KEY]) else {
            return;
        };
        if prost::encoding::decode_varint(&mut rest).ok() != Some(sender_id.len() as u64)
            || !rest.starts_with(sender_id.as_bytes())
        {
            return;
        }
        let field = body.len() - rest.len() + sender_id.len();
        self.field.clear();
        self.field.extend_from_slice(&body[..field]);
        self.id.clear();
        self.id.push_str(sender_id);
    }
}

/// The key of `sender_id`, field 1, length-delimited.
const SENDER_ID_KEY: u8 = 1 << 3 | WireType::LengthDelimited as u8;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode_bound::tests::peak_allocation,
        proto::{Payload, rollup::v1::Vote},
    };

    fn encoded(sender: &str, chain: &'static [u8]) -> Bytes {
        Message {
            sender_id: sender.into(),
            payload: Some(Payload::Vote(Vote {
                sender_chain_id: Bytes::from_static(chain),
                ..Vote::default()
            })),
        }
        .encode_to_vec()
        .into()
    }

    /// Decodes `body` both ways, and into a new message to see what that
    /// allocates; returns whether the known sender was used.
    fn same_as_full_decode(known: &mut KnownSender, body: &Bytes) -> bool {
        let copied = !known.field.is_empty() && body.starts_with(&known.field);
        let mut again = KnownSender {
            field: known.field.clone(),
            id: known.id.clone(),
        };
        let expected = DecodeAllowance::for_frame(body.len()).decode::<Message>(body.clone());
        // A reused message, as a recycling handler gives back.
        let mut reused = Message {
            sender_id: "an earlier sender".into(),
            payload: Some(Payload::Vote(Vote::default())),
        };
        let mut allowance = DecodeAllowance::for_frame(body.len());
        let got = known.decode_into(body.clone(), &mut reused, &mut allowance);
        match expected {
            Ok(expected) => {
                got.expect("decodes as in full");
                assert_eq!(reused, expected);
            }
            Err(_) => assert!(got.is_err(), "refused as in full"),
        }
        if !copied {
            // The full decode, whose charge the scan's own tests cover.
            return false;
        }
        // Into a new message: the charge covers what decoding allocates.
        let mut fresh = Message::default();
        let mut allowance = DecodeAllowance::for_frame(body.len());
        // Shares the body the way a read buffer is shared: slicing it then
        // allocates nothing of its own.
        drop(body.clone());
        let (allocated, got) =
            peak_allocation(|| again.decode_into(body.clone(), &mut fresh, &mut allowance));
        if got.is_ok() {
            let charged = allowance.bound() - allowance.remaining();
            assert!(
                charged >= allocated,
                "charged {charged} < allocated {allocated}"
            );
        }
        true
    }

    #[test]
    fn a_known_sender_is_copied_and_the_message_is_the_same() {
        let mut known = KnownSender::default();
        let first = encoded("sequencer-1", b"a");
        assert!(
            !same_as_full_decode(&mut known, &first),
            "learnt, not known"
        );
        assert!(same_as_full_decode(
            &mut known,
            &encoded("sequencer-1", b"b")
        ));
        // Another sender, or none: decoded in full, and learnt anew.
        assert!(!same_as_full_decode(
            &mut known,
            &encoded("sequencer-2", b"c")
        ));
        assert!(same_as_full_decode(
            &mut known,
            &encoded("sequencer-2", b"d")
        ));
        // A body without a sender (an ack) leaves what was learnt.
        assert!(!same_as_full_decode(&mut known, &encoded("", b"e")));
        assert!(same_as_full_decode(
            &mut known,
            &encoded("sequencer-2", b"f")
        ));
        // A body that is the sender and nothing else.
        let alone = Message {
            sender_id: "sequencer-2".into(),
            payload: None,
        };
        assert!(same_as_full_decode(
            &mut known,
            &Bytes::from(alone.encode_to_vec())
        ));
        // A later `sender_id` in the same body wins, as in a full decode.
        let mut twice = encoded("sequencer-2", b"g").to_vec();
        twice.extend_from_slice(&encoded("impostor", b"").to_vec()[..10]);
        assert!(same_as_full_decode(&mut known, &Bytes::from(twice)));
        let mut longer = encoded("sequencer-2", b"g").to_vec();
        let impostor = "i".repeat(100);
        longer.extend_from_slice(&[0x0a, 100]);
        longer.extend_from_slice(impostor.as_bytes());
        assert!(same_as_full_decode(&mut known, &Bytes::from(longer)));
        // One that outgrows the first string's buffer, but not twice over.
        let mut regrown = encoded("sequencer-2", b"g").to_vec();
        regrown.extend_from_slice(&[0x0a, 21]);
        regrown.extend_from_slice(&[b'x'; 21]);
        assert!(same_as_full_decode(&mut known, &Bytes::from(regrown)));
        // Whatever follows the known sender is still checked.
        let mut broken = encoded("sequencer-2", b"h").to_vec();
        broken.push(0xff);
        assert!(same_as_full_decode(&mut known, &Bytes::from(broken)));
        let mut not_utf8 = encoded("sequencer-2", b"i").to_vec();
        not_utf8.extend_from_slice(&[0x0a, 0x01, 0xff]);
        assert!(same_as_full_decode(&mut known, &Bytes::from(not_utf8)));
        // A length spelled in two bytes is learnt as spelled.
        let spelled = |chain: &'static [u8]| {
            let mut body = vec![0x0a, 0x8b, 0x00];
            body.extend_from_slice(b"sequencer-3");
            body.extend_from_slice(&encoded("", chain));
            Bytes::from(body)
        };
        assert!(!same_as_full_decode(&mut known, &spelled(b"j")));
        assert!(same_as_full_decode(&mut known, &spelled(b"k")));
        assert!(!same_as_full_decode(
            &mut known,
            &encoded("sequencer-3", b"l")
        ));
    }
}
