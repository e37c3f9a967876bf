//! Pings and pongs recognised from their first fields, without decoding a
//! `Message`: they are answered (or noted) without touching the handler's
//! path, its decode bound, or a message slot.

use prost::Message as _;

use crate::proto::rollup::v1::Ping;

/// Field numbers in `rollup.v1.Message` (proto/rollup/v1).
const SENDER_ID: u64 = 1;
const PING: u64 = 14;
const PONG: u64 = 15;

/// A control message taken off the fast path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Control {
    Ping(Ping),
    Pong,
}

/// Recognises a body that is exactly a ping or a pong, after an optional
/// `sender_id`: anything else (other fields, repeated fields, another
/// order) is left to the full decode, which would read it the same way.
pub(super) fn divert(body: &[u8]) -> Option<Control> {
    let mut rest = body;
    let mut sender: &[u8] = &[];
    if rest.first() == Some(&key(SENDER_ID)) {
        (_, sender) = length_delimited(&mut rest)?;
    }
    // Most bodies are not control messages: the key's one byte tells, and
    // a key spelled in more bytes is left to the full decode.
    if !matches!(rest.first(), Some(&k) if k == key(PING) || k == key(PONG)) {
        return None;
    }
    let (number, payload) = length_delimited(&mut rest)?;
    if !rest.is_empty() {
        return None;
    }
    // The full decode refuses a `sender_id` that is not UTF-8. Checked only
    // now: most bodies are not control messages.
    std::str::from_utf8(sender).ok()?;
    match number {
        PING => Ping::decode(payload).ok().map(Control::Ping),
        // An empty or valid `Pong` carries nothing the session uses.
        PONG => crate::proto::rollup::v1::Pong::decode(payload)
            .ok()
            .map(|_| Control::Pong),
        _ => None,
    }
}

/// The one-byte key of length-delimited field `number` (below 16).
const fn key(number: u64) -> u8 {
    (number << 3 | 2) as u8
}

/// The next field if it is length-delimited: its number and contents.
fn length_delimited<'a>(rest: &mut &'a [u8]) -> Option<(u64, &'a [u8])> {
    let key = prost::encoding::decode_varint(rest).ok()?;
    if key & 7 != 2 {
        return None;
    }
    let len = usize::try_from(prost::encoding::decode_varint(rest).ok()?).ok()?;
    if len > rest.len() {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    *rest = after;
    Some((key >> 3, contents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        Message, Payload,
        rollup::v1::{Pong, Vote},
    };

    fn body(sender: &str, payload: Payload) -> Vec<u8> {
        Message {
            sender_id: sender.into(),
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    #[test]
    fn pings_and_pongs_are_recognised_with_or_without_a_sender() {
        for sender in ["", "peer"] {
            let ping = body(sender, Payload::Ping(Ping { timestamp: 42 }));
            assert_eq!(divert(&ping), Some(Control::Ping(Ping { timestamp: 42 })));
            let pong = body(sender, Payload::Pong(Pong { timestamp: 7 }));
            assert_eq!(divert(&pong), Some(Control::Pong));
        }
        // A ping of timestamp 0 is an empty sub-message.
        let zero = body("", Payload::Ping(Ping { timestamp: 0 }));
        assert_eq!(divert(&zero), Some(Control::Ping(Ping { timestamp: 0 })));
    }

    #[test]
    fn anything_else_takes_the_full_decode() {
        let vote = body("peer", Payload::Vote(Vote::default()));
        assert_eq!(divert(&vote), None);
        // A ping followed by more fields: the full decode decides.
        let mut ping_then_vote = body("", Payload::Ping(Ping { timestamp: 1 }));
        ping_then_vote.extend(body("", Payload::Vote(Vote::default())));
        assert_eq!(divert(&ping_then_vote), None);
        // A ping with extension fields (an ack request, field 101).
        let mut with_ext = body("", Payload::Ping(Ping { timestamp: 1 }));
        with_ext.extend([0xa8, 0x06, 0x01]);
        assert_eq!(divert(&with_ext), None);
        // A sender that is not UTF-8, truncated or malformed bodies.
        let mut bad_sender = body("peer", Payload::Ping(Ping { timestamp: 1 }));
        bad_sender[2] = 0xff;
        assert_eq!(divert(&bad_sender), None);
        assert!(Message::decode(&bad_sender[..]).is_err());
        let ping = body("", Payload::Ping(Ping { timestamp: 1 }));
        assert_eq!(divert(&ping[..ping.len() - 1]), None);
        assert_eq!(divert(&[]), None);
        assert_eq!(divert(&[0x72, 0x02, 0x08]), None, "a ping cut short");
        // A key spelled in two bytes: the full decode reads it as a ping.
        let long_key = [0xf2, 0x00, 0x02, 0x08, 0x01];
        assert_eq!(divert(&long_key), None);
        let full = Message::decode(&long_key[..]).expect("decodes");
        assert_eq!(full.payload, Some(Payload::Ping(Ping { timestamp: 1 })));
    }

    #[test]
    fn what_is_recognised_decodes_the_same_in_full() {
        for (sender, payload) in [
            (
                "",
                Payload::Ping(Ping {
                    timestamp: i64::MIN,
                }),
            ),
            ("x", Payload::Pong(Pong { timestamp: 3 })),
        ] {
            let encoded = body(sender, payload.clone());
            let full = Message::decode(&encoded[..]).expect("decodes");
            match (divert(&encoded), full.payload) {
                (Some(Control::Ping(ping)), Some(Payload::Ping(full))) => assert_eq!(ping, full),
                (Some(Control::Pong), Some(Payload::Pong(_))) => {}
                other => panic!("disagreement: {other:?}"),
            }
        }
    }
}
