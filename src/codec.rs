//! The frame format: a 4-byte big-endian body length, then the body.
//!
//! Pure and I/O-free: [`FrameCodec`] plugs into tokio-util's `Framed*` for
//! stream transports, and the free functions serve message-based ones.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::CodecError;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Default maximum body length: 10 MiB, as in the Go package.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 10 * 1024 * 1024;

/// Maximum body length before the peer is authenticated. A handshake frame is
/// a few hundred bytes; nobody unknown gets to make us buffer megabytes.
pub const HANDSHAKE_MAX_FRAME_SIZE: usize = 16 * 1024;

/// Length-prefixed frame codec.
///
/// Decoding checks the announced length as soon as its 4 bytes arrive and
/// never reserves buffer space for it: the buffer grows only with bytes that
/// actually arrive, so a peer cannot make us allocate by announcing.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_size: usize,
    /// Body length of the frame being read, once its prefix was consumed.
    pending_body: Option<usize>,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl FrameCodec {
    /// A codec refusing bodies longer than `max_frame_size` bytes.
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size,
            pending_body: None,
        }
    }

    /// The current maximum body length.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Body length of a frame whose prefix was read but whose body has not
    /// fully arrived.
    pub fn pending_body(&self) -> Option<usize> {
        self.pending_body
    }

    /// Changes the maximum, e.g. from [`HANDSHAKE_MAX_FRAME_SIZE`] to the full
    /// limit once the peer is authenticated.
    pub fn set_max_frame_size(&mut self, max_frame_size: usize) {
        self.max_frame_size = max_frame_size;
    }
}

/// Recognises the first bytes of protocols a peer may speak by mistake.
fn foreign_protocol(prefix: &[u8]) -> Option<&'static str> {
    match prefix {
        // A TLS handshake record: type 22, version 3.x.
        [0x16, 0x03, ..] => Some("TLS"),
        [b'G', b'E', b'T', b' '] | [b'P', b'O', b'S', b'T'] | [b'P', b'R', b'I', b' '] => {
            Some("HTTP")
        }
        _ => None,
    }
}

/// Checks an announced or encoded body length against `max`.
pub fn check_frame_len(len: usize, max: usize) -> Result<(), CodecError> {
    if len == 0 {
        Err(CodecError::EmptyFrame)
    } else if len > max {
        Err(CodecError::FrameTooLarge { size: len, max })
    } else {
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        let len = match self.pending_body {
            Some(len) => len,
            None => {
                let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) else {
                    return Ok(None);
                };
                let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
                if len > self.max_frame_size
                    && let Some(protocol) = foreign_protocol(prefix)
                {
                    return Err(CodecError::UnexpectedProtocol { protocol });
                }
                check_frame_len(len, self.max_frame_size)?;
                src.advance(LENGTH_PREFIX_LEN);
                self.pending_body = Some(len);
                len
            }
        };
        if src.len() < len {
            return Ok(None);
        }
        self.pending_body = None;
        Ok(Some(src.split_to(len).freeze()))
    }
}

/// Encodes a message as one frame, straight into `dst`.
pub fn encode_message<M: prost::Message>(
    message: &M,
    max_frame_size: usize,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let len = message.encoded_len();
    check_frame_len(len, max_frame_size)?;
    dst.reserve(LENGTH_PREFIX_LEN + len);
    dst.put_u32(len as u32);
    message
        .encode(dst)
        .expect("capacity was reserved for the encoded length");
    Ok(())
}

/// Encodes a message as one complete frame (prefix included), ready to be
/// shared by many writers.
pub fn frame_message<M: prost::Message>(
    message: &M,
    max_frame_size: usize,
) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    encode_message(message, max_frame_size, &mut buf)?;
    Ok(buf.freeze())
}

/// Prefixes an already encoded body with its length.
pub fn frame_body(body: &[u8], max_frame_size: usize) -> Result<Bytes, CodecError> {
    check_frame_len(body.len(), max_frame_size)?;
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX_LEN + body.len());
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    Ok(buf.freeze())
}

/// Decodes a frame body as protobuf message `M`.
pub fn decode_body<M: prost::Message + Default>(
    body: Bytes,
    what: &'static str,
) -> Result<M, CodecError> {
    M::decode(body).map_err(|source| CodecError::Malformed { what, source })
}

impl<M: prost::Message> Encoder<&M> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, message: &M, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_message(message, self.max_frame_size, dst)
    }
}

/// A complete frame, prefix included, as made by [`frame_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame(pub Bytes);

impl Encoder<RawFrame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: RawFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Message;
    use crate::proto::rollup::v1::{Vote, XtId, message::Payload};

    fn vote() -> Message {
        Message {
            sender_id: "seq-a".into(),
            payload: Some(Payload::Vote(Vote {
                sender_chain_id: Bytes::from_static(&[1, 2]),
                xt_id: Some(XtId {
                    hash: Bytes::from(vec![7u8; 32]),
                }),
                vote: true,
            })),
        }
    }

    #[test]
    fn round_trips_a_message() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(&vote(), &mut buf).unwrap();
        let body = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(decode_body::<Message>(body, "Message").unwrap(), vote());
        assert!(buf.is_empty());
    }

    #[test]
    fn prefix_is_big_endian_and_excludes_itself() {
        let frame = frame_body(b"abc", 100).unwrap();
        assert_eq!(&frame[..], &[0, 0, 0, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn waits_for_partial_frames_byte_by_byte() {
        let frame = frame_message(&vote(), DEFAULT_MAX_FRAME_SIZE).unwrap();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, byte) in frame.iter().enumerate() {
            assert!(
                codec.decode(&mut buf).unwrap().is_none(),
                "frame early at {i}"
            );
            buf.put_u8(*byte);
        }
        assert!(codec.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn zero_length_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::EmptyFrame));
    }

    #[test]
    fn oversize_is_refused_from_the_prefix_alone_without_reserving() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32(1025);
        let capacity = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            CodecError::FrameTooLarge {
                size: 1025,
                max: 1024
            }
        ));
        assert_eq!(buf.capacity(), capacity);
    }

    #[test]
    fn announced_length_is_not_reserved() {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_SIZE);
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u32(9 * 1024 * 1024);
        buf.put_slice(b"only a few bytes");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(
            buf.capacity() < 1024,
            "decoder reserved {} bytes",
            buf.capacity()
        );
    }

    #[test]
    fn encoder_refuses_empty_and_oversize_messages() {
        let empty = Message::default();
        assert!(matches!(
            frame_message(&empty, 100),
            Err(CodecError::EmptyFrame)
        ));
        assert!(matches!(
            frame_message(&vote(), 10),
            Err(CodecError::FrameTooLarge { max: 10, .. })
        ));
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for _ in 0..3 {
            codec.encode(&vote(), &mut buf).unwrap();
        }
        for _ in 0..3 {
            assert!(codec.decode(&mut buf).unwrap().is_some());
        }
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }
}
