//! The client half of the handshake: builds the request, checks the
//! server's response and proof (docs/PROTOCOL.md §2, §3).

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use prost::Message as _;

use super::{
    EXT_VERSION, NONCE_LEN, SequenceFloors, SignedFrameSession, client_transcript_digest,
    encode_with_ext, go_request_digest, has_feature, server_transcript_digest, session_tag,
    unix_nanos,
};
use crate::{
    crypto::{CryptoBackend, PublicKey, SecretKey, Signature},
    error::HandshakeError,
    proto::{
        rollup::v1::{HandshakeRequest, HandshakeResponse},
        transport::v1::{Feature, HandshakeRequestExt, HandshakeResponseExt},
    },
};

/// Client-side handshake settings.
#[derive(Debug, Clone)]
pub struct ClientHandshakeConfig {
    /// Our key.
    pub key: Arc<SecretKey>,
    /// The id we announce (`client_id`).
    pub client_id: String,
    /// The server key we expect. When set, a server that does not prove this
    /// key (a Go server included) is refused: mutual authentication.
    pub expected_server_key: Option<PublicKey>,
    /// Send the extension fields. Off, the request is byte-for-byte Go's.
    pub extensions: bool,
    /// Offer signed frames (needs `extensions`).
    pub signed_frames: bool,
    /// Offer delivery acknowledgements (needs `extensions`).
    pub delivery_acks: bool,
    /// Offer requests and replies (needs `extensions`).
    pub requests: bool,
    /// Crypto implementation.
    pub backend: CryptoBackend,
}

impl ClientHandshakeConfig {
    /// Extended handshake offering signed frames, no expected server key.
    pub fn new(key: Arc<SecretKey>, client_id: impl Into<String>) -> Self {
        Self {
            key,
            client_id: client_id.into(),
            expected_server_key: None,
            extensions: true,
            signed_frames: true,
            delivery_acks: true,
            requests: true,
            backend: CryptoBackend::default(),
        }
    }
}

/// What the client learned from an accepted handshake.
#[derive(Debug, Clone)]
pub struct ServerSession {
    /// The server's session id.
    pub session_id: String,
    /// The server's key, when it proved it (extended mode).
    pub server_key: Option<PublicKey>,
    /// The identity the server knows us by (extended mode).
    pub identity: Option<String>,
    /// Present when the session uses signed frames.
    pub signed_frames: Option<SignedFrameSession>,
    /// Whether both sides acknowledge delivered messages.
    pub delivery_acks: bool,
    /// Whether messages may carry request and reply ids.
    pub requests: bool,
}

/// The client half: [`ClientHandshake::start`] makes the request,
/// [`ClientHandshake::finish`] checks the response.
#[derive(Debug)]
pub struct ClientHandshake {
    config: ClientHandshakeConfig,
    request_body: Bytes,
    local_floor: u64,
    offered_signed: bool,
}

impl ClientHandshake {
    /// Builds the request at time `now` with `nonce`; `sequence_floor` is the
    /// first sequence number our signed frames will use in this session.
    pub fn start(
        config: ClientHandshakeConfig,
        now: SystemTime,
        nonce: [u8; NONCE_LEN],
        sequence_floor: u64,
    ) -> Self {
        let timestamp = unix_nanos(now);
        let key = &config.key;
        let signature = key.sign_digest_with(config.backend, &go_request_digest(timestamp, &nonce));
        let request = HandshakeRequest {
            timestamp,
            public_key: Bytes::copy_from_slice(key.public_key().as_compressed()),
            signature: Bytes::copy_from_slice(signature.as_bytes()),
            client_id: config.client_id.clone(),
            nonce: Bytes::copy_from_slice(&nonce),
        };
        let offered_signed = config.extensions && config.signed_frames;
        let request_body = if config.extensions {
            let mut features = Feature::MutualAuth as u32;
            if offered_signed {
                features |= Feature::SignedFrames as u32;
            }
            if config.delivery_acks {
                features |= Feature::DeliveryAcks as u32;
            }
            if config.requests {
                features |= Feature::Requests as u32;
            }
            let mut ext = HandshakeRequestExt {
                ext_version: EXT_VERSION,
                features,
                expected_server_key: config
                    .expected_server_key
                    .as_ref()
                    .map(|k| Bytes::copy_from_slice(k.as_compressed()))
                    .unwrap_or_default(),
                sequence_floor,
                ext_signature: Bytes::new(),
            };
            let ext_signature =
                key.sign_digest_with(config.backend, &client_transcript_digest(&request, &ext));
            ext.ext_signature = Bytes::copy_from_slice(ext_signature.as_bytes());
            encode_with_ext(&request, Some(&ext))
        } else {
            encode_with_ext(&request, None::<&HandshakeRequestExt>)
        };
        Self {
            config,
            request_body,
            local_floor: sequence_floor,
            offered_signed,
        }
    }

    /// Body of the request frame to send.
    pub fn request(&self) -> &Bytes {
        &self.request_body
    }

    /// Checks the server's response body.
    pub fn finish(self, response_body: &[u8]) -> Result<ServerSession, HandshakeError> {
        let malformed = |what| move |source| HandshakeError::Malformed { what, source };
        let response =
            HandshakeResponse::decode(response_body).map_err(malformed("HandshakeResponse"))?;
        if !response.accepted {
            return Err(HandshakeError::Rejected {
                reason: response.error,
            });
        }
        let ext = HandshakeResponseExt::decode(response_body)
            .map_err(malformed("HandshakeResponseExt"))?;
        if !self.config.extensions || ext.ext_version < EXT_VERSION {
            // A Go server (or we asked for Go mode): nothing proves its identity.
            if self.config.expected_server_key.is_some() {
                return Err(HandshakeError::ServerNotAuthenticated);
            }
            return Ok(ServerSession {
                session_id: response.session_id,
                server_key: None,
                identity: None,
                signed_frames: None,
                delivery_acks: false,
                requests: false,
            });
        }

        let server_key = PublicKey::from_slice(&ext.server_public_key)
            .map_err(HandshakeError::BadServerSignature)?;
        if let Some(expected) = &self.config.expected_server_key
            && *expected != server_key
        {
            return Err(HandshakeError::WrongServerKey {
                expected: expected.to_string(),
                actual: server_key.to_string(),
            });
        }
        let proof = Signature::from_slice(&ext.server_signature)
            .map_err(HandshakeError::BadServerSignature)?;
        server_key
            .verify_recoverable_with(
                self.config.backend,
                &server_transcript_digest(&self.request_body, &response, &ext),
                &proof,
            )
            .map_err(HandshakeError::BadServerSignature)?;

        let signed = has_feature(ext.features, Feature::SignedFrames);
        if signed && !self.offered_signed {
            return Err(HandshakeError::Rejected {
                reason: "server enabled signed frames that were not offered".into(),
            });
        }
        let delivery_acks = has_feature(ext.features, Feature::DeliveryAcks);
        if delivery_acks && !self.config.delivery_acks {
            return Err(HandshakeError::Rejected {
                reason: "server enabled delivery acknowledgements that were not offered".into(),
            });
        }
        let requests = has_feature(ext.features, Feature::Requests);
        if requests && !self.config.requests {
            return Err(HandshakeError::Rejected {
                reason: "server enabled requests that were not offered".into(),
            });
        }
        let signed_frames = signed.then(|| SignedFrameSession {
            session_tag: session_tag(&self.request_body, response_body),
            peer_key: server_key.clone(),
            peer_floors: SequenceFloors {
                unicast: ext.unicast_floor,
                broadcast: Some(ext.broadcast_floor),
            },
            local_floors: SequenceFloors {
                unicast: self.local_floor,
                broadcast: None,
            },
        });
        Ok(ServerSession {
            session_id: response.session_id,
            server_key: Some(server_key),
            identity: Some(ext.identity),
            signed_frames,
            delivery_acks,
            requests,
        })
    }
}
