//! Decode bombs: frames of empty repeated entries, which decode into far
//! more memory than they take on the wire. Each is refused before it is
//! decoded, with `PROTOCOL_ERROR` and a reason, and the server's resident
//! memory grows by little more than the frame it read.
//!
//! Memory is measured in a process of its own (see [`isolated`]).

use std::{net::SocketAddr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use publisher_transport::{
    CodecError, CryptoBackend, DisconnectReason, FrameCodec, Message, SecretKey, TcpServer,
    codec::{DEFAULT_MAX_FRAME_SIZE, HANDSHAKE_MAX_FRAME_SIZE, RawFrame, frame_body},
    proto::{Payload, rollup::v1::HandshakeResponse},
    signed::{Audience, FrameOpener, seal},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::codec::Framed;

use crate::{
    dos::{in_isolation, isolated, mib, peak_rss, rss},
    e2e::{Keys, STEP_TIMEOUT, bounded, server_config},
    raw_peer::signed_handshake,
};

/// Resident memory a refused bomb may add: the frame itself, buffered while
/// it arrives (its buffer may grow to twice its length), and nothing for
/// the structs it stands for.
const ALLOWED_GROWTH: usize = 3 * DEFAULT_MAX_FRAME_SIZE;

fn put_empty_entries(buf: &mut BytesMut, field: u64, count: usize) {
    for _ in 0..count {
        buf.put_u8((field << 3 | 2) as u8);
        buf.put_u8(0);
    }
}

fn put_len_prefixed(buf: &mut BytesMut, field: u64, payload: &[u8]) {
    buf.put_u8((field << 3 | 2) as u8);
    let mut len = payload.len() as u64;
    while len >= 0x80 {
        buf.put_u8(len as u8 | 0x80);
        len >>= 7;
    }
    buf.put_u8(len as u8);
    buf.put_slice(payload);
}

/// A `rollup.v1.Message` of `size` bytes or a little less whose payload
/// (field `payload`) is nothing but empty entries of repeated field `field`.
fn message_bomb(payload: u64, field: u64, size: usize) -> Bytes {
    let mut inner = BytesMut::new();
    put_empty_entries(&mut inner, field, (size - 8) / 2);
    let mut body = BytesMut::with_capacity(size);
    put_len_prefixed(&mut body, payload, &inner);
    assert!(body.len() <= size);
    body.freeze()
}

/// A `transport.v1.SignedFrame` of `size` bytes or a little less: nothing
/// but empty `messages`, and no signature at all.
fn signed_frame_bomb(size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size);
    put_empty_entries(&mut body, 4, size / 2);
    body.freeze()
}

/// The bombs, by name: `StartSlot.l2_blocks_request`,
/// `RequestSeal.included_xts`, `XTRequest.transactions`.
fn message_bombs(size: usize) -> Vec<(&'static str, Bytes)> {
    vec![
        ("StartSlot.l2_blocks_request", message_bomb(7, 4, size)),
        ("RequestSeal.included_xts", message_bomb(8, 2, size)),
        ("XTRequest.transactions", message_bomb(2, 1, size)),
    ]
}

/// Forgets the peak resident memory so far, so that each case measures its own.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// Runs `case`, and checks and reports how much the peak resident memory
/// grew above what it was before.
async fn measured(name: &str, frame: usize, case: impl Future<Output = ()>) {
    reset_peak_rss();
    let before = rss();
    case.await;
    let grew = peak_rss().saturating_sub(before);
    println!(
        "{name}: {:.2} MiB frame, RSS {:.1} MiB, peak +{:.1} MiB",
        mib(frame),
        mib(before),
        mib(grew)
    );
    assert!(
        grew <= ALLOWED_GROWTH,
        "{name}: peak resident memory grew by {:.1} MiB",
        mib(grew)
    );
}

type Raw = Framed<TcpStream, FrameCodec>;

/// Writes a whole frame straight to the socket (a `Framed` sink would
/// first copy it into its buffer, and measure the sender).
async fn write_frame(peer: &mut Raw, frame: &[u8]) {
    peer.get_mut().write_all(frame).await.unwrap();
}

async fn raw(addr: SocketAddr) -> Raw {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        FrameCodec::new(DEFAULT_MAX_FRAME_SIZE),
    )
}

/// The next frame body; `None` at the end of the stream.
async fn next(peer: &mut Raw) -> Option<Bytes> {
    match tokio::time::timeout(STEP_TIMEOUT, peer.next())
        .await
        .expect("a frame or the end of the stream")
    {
        Some(Ok(body)) => Some(body),
        None | Some(Err(CodecError::Io(_))) => None,
        Some(Err(err)) => panic!("the server sent a bad frame: {err}"),
    }
}

/// Reads to the end of the stream and returns the `Disconnect` seen on the
/// way; frames that `open` cannot make messages of are skipped.
async fn disconnect(
    peer: &mut Raw,
    mut open: impl FnMut(&Bytes) -> Vec<Message>,
) -> (DisconnectReason, String) {
    let mut seen = None;
    for _ in 0..16 {
        let Some(body) = next(peer).await else {
            break;
        };
        for message in open(&body) {
            if let Some(Payload::Disconnect(disconnect)) = message.payload {
                seen = Some((
                    DisconnectReason::from_proto(disconnect.reason),
                    disconnect.details,
                ));
            }
        }
    }
    seen.expect("a Disconnect before the end of the stream")
}

fn plain(body: &Bytes) -> Vec<Message> {
    Message::decode(body.clone()).into_iter().collect()
}

fn assert_refused_as_too_large(name: &str, (reason, details): (DisconnectReason, String)) {
    println!("{name}: {reason}: {details}");
    assert_eq!(reason, DisconnectReason::ProtocolError, "{name}: {details}");
    assert!(
        details.contains("would decode to over"),
        "{name}: the reason names the bound: {details}"
    );
}

/// 10 MiB bombs from peers of a server without authentication, of a
/// server that authenticates (16 KiB before the handshake, 10 MiB inside a
/// signed session after it) and `SignedFrame.messages` refused before its
/// signature is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_bombs_are_refused_without_growing_memory() {
    isolated("decode_bombs::isolated_decode_bombs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by decode_bombs_are_refused_without_growing_memory"]
async fn isolated_decode_bombs() {
    if !in_isolation("decode_bombs::isolated_decode_bombs") {
        return;
    }
    // Building and signing 10 MiB frames takes a while in a debug build:
    // each part has its own bound, within the parent's 90 s.
    bounded(unauthenticated_peers()).await;
    bounded(before_authentication()).await;
    after_authentication().await;
}

/// Without authentication, frames of up to 10 MiB are read from the first byte.
async fn unauthenticated_peers() {
    let server = TcpServer::tcp(server_config(), None);
    let addr = server.start().await.unwrap();
    for (name, body) in message_bombs(DEFAULT_MAX_FRAME_SIZE) {
        let frame = frame_body(&body, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let name = format!("unauthenticated {name}");
        measured(&name, body.len(), async {
            let mut peer = raw(addr).await;
            write_frame(&mut peer, &frame).await;
            assert_refused_as_too_large(&name, disconnect(&mut peer, plain).await);
        })
        .await;
    }
    server.stop().await.unwrap();
}

/// Before the handshake only 16 KiB frames are read: the largest bombs that
/// fit are refused as handshakes, and cost nothing to refuse.
async fn before_authentication() {
    let keys = Keys::new(1);
    let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let mut bombs = message_bombs(HANDSHAKE_MAX_FRAME_SIZE);
    bombs.push((
        "SignedFrame.messages",
        signed_frame_bomb(HANDSHAKE_MAX_FRAME_SIZE),
    ));
    for (name, body) in bombs {
        let frame = frame_body(&body, HANDSHAKE_MAX_FRAME_SIZE).unwrap();
        let name = format!("before authentication {name}");
        measured(&name, body.len(), async {
            let mut peer = raw(addr).await;
            peer.send(RawFrame(frame)).await.unwrap();
            // A refused handshake: a refusing response, then a Disconnect.
            let refusal = next(&mut peer).await.expect("a handshake response");
            let response = HandshakeResponse::decode(refusal).unwrap();
            assert!(!response.accepted, "{name}: {response:?}");
            let (reason, details) = disconnect(&mut peer, plain).await;
            println!("{name}: {reason}: {details}");
            assert_ne!(reason, DisconnectReason::Requested, "{name}: {details}");
        })
        .await;
    }
    server.stop().await.unwrap();
}

/// A signed session opened by hand: its peer key, opener and where to send.
struct SignedPeer {
    peer: Raw,
    key: Arc<SecretKey>,
    opener: FrameOpener,
    audience: Audience,
    sequence: u64,
}

impl SignedPeer {
    async fn connect(addr: SocketAddr, keys: &Keys) -> Self {
        let key = keys.clients[0].clone();
        let mut peer = raw(addr).await;
        let (signed, opener) =
            signed_handshake(&mut peer, &key, keys.server.public_key(), "bomber").await;
        Self {
            peer,
            key,
            opener,
            audience: Audience::Unicast {
                recipient: keys.server.public_key().clone(),
                session: signed.session_tag,
            },
            sequence: signed.local_floors.unicast,
        }
    }

    async fn send(&mut self, frame: &[u8]) {
        write_frame(&mut self.peer, frame).await;
    }

    /// A correctly signed frame carrying `message`, length prefix included.
    fn sealed(&mut self, message: Bytes) -> Bytes {
        let frame = seal(
            &self.key,
            CryptoBackend::default(),
            self.sequence,
            &self.audience,
            vec![message],
        );
        self.sequence += 1;
        frame_body(&frame.encode_to_vec(), DEFAULT_MAX_FRAME_SIZE).unwrap()
    }

    async fn disconnect(&mut self) -> (DisconnectReason, String) {
        let opener = &mut self.opener;
        disconnect(&mut self.peer, |body| {
            opener.open_messages(body).unwrap_or_else(|_| plain(body))
        })
        .await
    }
}

/// Inside an authenticated, signed session: a correctly signed frame
/// carrying a bomb, and a bomb of empty `SignedFrame.messages` refused
/// before its signature is checked (it has none).
async fn after_authentication() {
    let keys = Keys::new(1);
    let server = TcpServer::tcp(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    // Room for the signed frame around the message.
    for (name, message) in message_bombs(DEFAULT_MAX_FRAME_SIZE - 256) {
        bounded(async {
            let mut peer = SignedPeer::connect(addr, &keys).await;
            let frame = peer.sealed(message);
            let name = format!("signed {name}");
            measured(&name, frame.len(), async {
                peer.send(&frame).await;
                assert_refused_as_too_large(&name, peer.disconnect().await);
            })
            .await;
        })
        .await;
    }
    bounded(async {
        // Correctly signed: 131,000 empty messages, each a valid `Message`,
        // and an unknown field the signature does not cover, which pads
        // the frame to 5 MiB and so raises its bound (to 21 MiB). The
        // frame's own message list fits that bound; the receiver's result
        // per message (272 bytes, 36 MB in all) does not.
        let mut peer = SignedPeer::connect(addr, &keys).await;
        let frame = {
            let sealed = seal(
                &peer.key,
                CryptoBackend::default(),
                peer.sequence,
                &peer.audience,
                vec![Bytes::new(); 131_000],
            );
            let mut body = BytesMut::from(&sealed.encode_to_vec()[..]);
            drop(sealed);
            let padding = DEFAULT_MAX_FRAME_SIZE / 2 - body.len() - 8;
            put_len_prefixed(&mut body, 15, &vec![0; padding]);
            frame_body(&body, DEFAULT_MAX_FRAME_SIZE).unwrap()
        };
        let name = "signed frame of 131,000 empty messages";
        measured(name, frame.len(), async {
            peer.send(&frame).await;
            let (reason, details) = peer.disconnect().await;
            assert!(
                details.starts_with("malformed signed frame: "),
                "{name}: {details}"
            );
            assert_refused_as_too_large(name, (reason, details));
        })
        .await;
    })
    .await;
    bounded(async {
        let mut peer = SignedPeer::connect(addr, &keys).await;
        let body = signed_frame_bomb(DEFAULT_MAX_FRAME_SIZE);
        let frame = frame_body(&body, DEFAULT_MAX_FRAME_SIZE).unwrap();
        drop(body);
        let name = "signed SignedFrame.messages";
        measured(name, frame.len(), async {
            peer.send(&frame).await;
            let (reason, details) = peer.disconnect().await;
            assert!(
                details.starts_with("malformed signed frame: "),
                "{name}: {details}"
            );
            assert_refused_as_too_large(name, (reason, details));
        })
        .await;
        server.stop().await.unwrap();
    })
    .await;
}
