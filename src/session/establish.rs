//! Establishing a session over a fresh pipe: the handshake, and refusals.

use super::{FrameReader, FrameSigner, FrameWriter};
use std::{
    io,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use crate::{
    codec::{self, HANDSHAKE_MAX_FRAME_SIZE},
    crypto::{CryptoBackend, SecretKey},
    error::{CodecError, DisconnectReason, HandshakeError, TransportError},
    handshake::{
        AcceptedClient, ClientHandshake, SequenceFloors, ServerHandshake, ServerSession,
        ServerVerdict, SignedFrameSession, disconnect_body,
    },
    proto::{Message, Payload, rollup::v1::DisconnectMessage},
    signed::{FrameOpener, SequenceCounter},
};

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
        if let Err(err) = writer.write_segments(std::slice::from_ref(&frame)).await {
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
                writer.write_segments(&[frames.freeze()]).await?;
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
        writer.write_segments(&[frames.freeze()]).await?;
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
        writer.write_segments(std::slice::from_ref(&frame)).await?;
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
