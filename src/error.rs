//! Error types, one enum per layer.

use std::{io, path::PathBuf};

use crate::proto::rollup::v1::disconnect_message::Reason;

/// Why a connection is closed, as carried in `DisconnectMessage.reason`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// Closed on purpose (shutdown, replaced by a newer connection).
    Requested,
    /// The peer broke the protocol (malformed or forged frame).
    ProtocolError,
    /// The server is at its connection limit.
    TooManyPeers,
    /// The handshake or a signature check failed.
    AuthFailure,
    /// Nothing was read within the read timeout.
    ReadTimeout,
    /// The peer did not take our frames within the write timeout.
    WriteTimeout,
    /// The network failed under the connection.
    NetworkError,
    /// A bug or resource failure on this side.
    InternalError,
    /// The peer connects or sends too fast.
    Throttled,
}

impl DisconnectReason {
    /// The protobuf enum value.
    pub fn to_proto(self) -> Reason {
        match self {
            Self::Requested => Reason::Requested,
            Self::ProtocolError => Reason::ProtocolError,
            Self::TooManyPeers => Reason::TooManyPeers,
            Self::AuthFailure => Reason::AuthFailure,
            Self::ReadTimeout => Reason::ReadTimeout,
            Self::WriteTimeout => Reason::WriteTimeout,
            Self::NetworkError => Reason::NetworkError,
            Self::InternalError => Reason::InternalError,
            Self::Throttled => Reason::Throttled,
        }
    }

    /// Maps a protobuf value; unknown numbers (a newer peer) become `ProtocolError`.
    pub fn from_proto(value: i32) -> Self {
        match Reason::try_from(value) {
            Ok(Reason::Requested) => Self::Requested,
            Ok(Reason::ProtocolError) | Err(_) => Self::ProtocolError,
            Ok(Reason::TooManyPeers) => Self::TooManyPeers,
            Ok(Reason::AuthFailure) => Self::AuthFailure,
            Ok(Reason::ReadTimeout) => Self::ReadTimeout,
            Ok(Reason::WriteTimeout) => Self::WriteTimeout,
            Ok(Reason::NetworkError) => Self::NetworkError,
            Ok(Reason::InternalError) => Self::InternalError,
            Ok(Reason::Throttled) => Self::Throttled,
        }
    }

    /// The snake_case name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::ProtocolError => "protocol_error",
            Self::TooManyPeers => "too_many_peers",
            Self::AuthFailure => "auth_failure",
            Self::ReadTimeout => "read_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::NetworkError => "network_error",
            Self::InternalError => "internal_error",
            Self::Throttled => "throttled",
        }
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the frame codec.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame announced a length of zero (Go: "empty message").
    #[error("empty message: frame length is zero")]
    EmptyFrame,
    /// A frame announced (or would need) more bytes than allowed.
    #[error("message size {size} exceeds max {max}")]
    FrameTooLarge {
        /// Announced or encoded body length in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The first bytes are another protocol's (a TLS or HTTP client on a
    /// plain endpoint): a configuration mismatch rather than a huge frame.
    #[error(
        "peer speaks {protocol}, not length-prefixed frames: check both ends' TLS / back-end settings"
    )]
    UnexpectedProtocol {
        /// What it looks like ("TLS", "HTTP").
        protocol: &'static str,
    },
    /// The WebSocket binding was broken: a text message where only binary
    /// ones carry frames, a misplaced continuation frame, or another breach
    /// of RFC 6455.
    #[error("WebSocket protocol violation: {detail}")]
    WebSocket {
        /// What the peer did.
        detail: String,
    },
    /// The frame body is not valid protobuf for the expected message.
    #[error("malformed {what}: {source}")]
    Malformed {
        /// The message type that was expected.
        what: &'static str,
        /// The protobuf error.
        source: prost::DecodeError,
    },
    /// Decoding the frame would allocate more than its bound, or the
    /// pre-scan found it malformed.
    #[error("{0}")]
    DecodeBound(#[from] crate::decode_bound::DecodeBoundError),
    /// The underlying pipe failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl CodecError {
    /// The disconnect reason a peer gets for this error.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Io(_) => DisconnectReason::NetworkError,
            _ => DisconnectReason::ProtocolError,
        }
    }
}

/// Errors about keys, key files and signatures.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The bytes are not a valid secp256k1 private key (zero or ≥ the curve order).
    #[error("invalid private key: {reason}")]
    InvalidPrivateKey {
        /// What is wrong (never the key itself).
        reason: &'static str,
    },
    /// The bytes are not a valid compressed (33) or uncompressed (65) public key.
    #[error("invalid public key ({len} bytes): {reason}")]
    InvalidPublicKey {
        /// Length of the input.
        len: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bytes are not a valid 65-byte `r || s || v` signature.
    #[error("invalid signature: {reason}")]
    InvalidSignature {
        /// What is wrong.
        reason: &'static str,
    },
    /// A signature does not match the data and key.
    #[error("signature verification failed")]
    VerificationFailed,
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFileIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A key file does not hold 64 hex characters of a valid key.
    #[error("key file {path}: {reason}")]
    KeyFileFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        reason: String,
    },
    /// The crypto backend asked for is not compiled in.
    #[error("crypto backend {0} is not available (enable the `libsecp256k1` feature)")]
    BackendUnavailable(&'static str),
    /// No crypto backend has this name.
    #[error("unknown crypto backend {name:?} (expected k256 or libsecp256k1)")]
    UnknownBackend {
        /// The name given.
        name: String,
    },
    /// A trust entry with an empty identity.
    #[error("a trusted identity must not be empty")]
    EmptyIdentity,
    /// A trust entry with an empty chain id (give none instead).
    #[error("a trusted chain id must not be empty")]
    EmptyChainId,
    /// A trust-store change would map one key to two identities.
    #[error("public key is already trusted as {existing:?}")]
    KeyAlreadyTrusted {
        /// The identity that holds the key.
        existing: String,
    },
}

/// Why a handshake failed. The `Display` strings of the Go-mode checks are
/// exactly the Go package's, since a Go peer shows them to its operator.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A handshake frame is not valid protobuf.
    #[error("malformed handshake {what}: {source}")]
    Malformed {
        /// The message type that was expected.
        what: &'static str,
        /// The protobuf error.
        source: prost::DecodeError,
    },
    /// The request's timestamp lies more than the allowed skew ahead.
    #[error("handshake timestamp too far in future")]
    TimestampInFuture {
        /// How far ahead, in nanoseconds.
        skew_nanos: i128,
    },
    /// The request's timestamp lies more than the allowed skew behind.
    #[error("handshake timestamp too old")]
    TimestampTooOld {
        /// How far behind, in nanoseconds.
        skew_nanos: i128,
    },
    /// A key or signature field is malformed, or the signature does not match.
    #[error("invalid handshake signature: {0}")]
    BadSignature(#[source] KeyError),
    /// The key is valid but not in the trust store.
    #[error("untrusted public key - connection rejected")]
    UntrustedKey {
        /// The offending key, compressed, hex.
        public_key: String,
    },
    /// A Go-mode request for a key trusted for the extended handshake only
    /// (the extension fields may have been stripped on the path).
    #[error(
        "Go-mode handshake refused for {identity:?}: its key is trusted for the extended handshake only{}",
        if *.server_has_key { " (mark it Go-compatible to serve a Go peer)" } else { ", which a server without a key of its own cannot serve" }
    )]
    GoModeRefused {
        /// The identity the key is trusted as.
        identity: String,
        /// Whether this server could have served the extended handshake.
        server_has_key: bool,
    },
    /// The nonce was already used by this key within the clock window.
    #[error("handshake replayed: nonce already seen")]
    Replayed,
    /// The nonce memory has no room for an unexpired nonce (this key holds
    /// its share, or the memory is full): new handshakes are refused rather
    /// than forget a nonce that could be replayed.
    #[error(
        "handshake refused: too many recent handshakes{}",
        if *.from_this_key { " from this key" } else { "" }
    )]
    TooManyHandshakes {
        /// This key holds its share; otherwise the whole memory is full.
        from_this_key: bool,
    },
    /// The request is addressed to another server (its expected key is not ours).
    #[error("handshake addressed to another server")]
    WrongAudience,
    /// The server policy requires extensions (signed frames) the client lacks.
    #[error("client does not support required feature: {feature}")]
    FeatureRequired {
        /// The missing feature.
        feature: &'static str,
    },
    /// The server rejected our request; `reason` is its error string.
    #[error("handshake rejected by server: {reason}")]
    Rejected {
        /// The server's error text.
        reason: String,
    },
    /// The server did not prove its identity, but we require it.
    #[error("server did not authenticate itself (mutual authentication required)")]
    ServerNotAuthenticated,
    /// The server proved a key other than the one we expect.
    #[error("server key mismatch: expected {expected}, got {actual}")]
    WrongServerKey {
        /// The configured key, compressed hex.
        expected: String,
        /// The key the server proved, compressed hex.
        actual: String,
    },
    /// The server's proof does not verify.
    #[error("invalid server signature: {0}")]
    BadServerSignature(#[source] KeyError),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(std::time::Duration),
}

impl HandshakeError {
    /// The disconnect reason a peer gets for this error.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Malformed { .. } => DisconnectReason::ProtocolError,
            Self::Timeout(_) => DisconnectReason::ReadTimeout,
            _ => DisconnectReason::AuthFailure,
        }
    }

    /// A short stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::TimestampInFuture { .. } => "timestamp_future",
            Self::TimestampTooOld { .. } => "timestamp_old",
            Self::BadSignature(_) => "bad_signature",
            Self::UntrustedKey { .. } => "untrusted_key",
            Self::GoModeRefused { .. } => "go_mode_refused",
            Self::Replayed => "replayed",
            Self::TooManyHandshakes { .. } => "too_many_handshakes",
            Self::WrongAudience => "wrong_audience",
            Self::FeatureRequired { .. } => "feature_required",
            Self::Rejected { .. } => "rejected",
            Self::ServerNotAuthenticated => "server_not_authenticated",
            Self::WrongServerKey { .. } => "wrong_server_key",
            Self::BadServerSignature(_) => "bad_server_signature",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// Why a signed frame was refused.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SignedFrameError {
    /// The frame is not a valid `SignedFrame`, or an inner message is not a valid `Message`.
    #[error("malformed signed frame: {0}")]
    Malformed(String),
    /// The signature does not verify against the sender's handshake key.
    #[error("signed frame signature verification failed")]
    BadSignature,
    /// The frame is addressed to another peer.
    #[error("signed frame misaddressed: {0}")]
    Misaddressed(&'static str),
    /// The sequence number was already accepted.
    #[error("signed frame replayed: sequence {sequence}")]
    Replayed {
        /// The repeated sequence number.
        sequence: u64,
    },
    /// The sequence number lies below the window or the session's floor.
    #[error("signed frame too old: sequence {sequence} below {lowest_accepted}")]
    TooOld {
        /// The frame's sequence number.
        sequence: u64,
        /// The lowest sequence number still accepted.
        lowest_accepted: u64,
    },
}

impl SignedFrameError {
    /// The disconnect reason a peer gets for this error.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Malformed(_) => DisconnectReason::ProtocolError,
            _ => DisconnectReason::AuthFailure,
        }
    }

    /// A short stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Misaddressed(_) => "misaddressed",
            Self::Replayed { .. } => "replayed",
            Self::TooOld { .. } => "too_old",
        }
    }
}

/// Errors of servers, clients and connections.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket operation failed.
    #[error("{op} {addr}: {source}")]
    Io {
        /// What was being done ("bind", "connect", "accept").
        op: &'static str,
        /// The address involved.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The TLS handshake failed (untrusted, expired or mismatched certificate…).
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// The peer's address.
        addr: String,
        /// The TLS error, as rustls reports it.
        source: io::Error,
    },
    /// Connecting did not complete in time.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// Framing failed (oversize, empty, malformed, I/O on the pipe).
    #[error("frame: {0}")]
    Codec(#[from] CodecError),
    /// The server refused the connection before the handshake.
    #[error("refused by server: {reason}: {details}")]
    Refused {
        /// The server's reason.
        reason: DisconnectReason,
        /// The server's details.
        details: String,
    },
    /// The client is not connected.
    #[error("not connected")]
    NotConnected,
    /// There is no address to connect to: the one given is empty, and so is
    /// [`ClientConfig::server_addr`](crate::ClientConfig::server_addr).
    #[error("no server address for client {client_id:?}: none given and server_addr is empty")]
    NoServerAddress {
        /// The client's id.
        client_id: String,
    },
    /// No connection has this identity.
    #[error("no connection for peer {peer:?}")]
    PeerNotFound {
        /// The identity asked for.
        peer: String,
    },
    /// No client is registered for this chain id (or no default is set).
    #[error("no publisher connection for chain {chain_id:?}")]
    UnknownChain {
        /// The chain id asked for ("" for the default).
        chain_id: String,
    },
    /// The peer's send queue stayed full for the write timeout.
    #[error("send to {peer} timed out after {after:?}; peer disconnected")]
    SendTimeout {
        /// The peer.
        peer: String,
        /// The write timeout.
        after: std::time::Duration,
    },
    /// The peer's send queue was full; the peer was disconnected as too slow.
    #[error("send queue of {peer} full; peer disconnected")]
    QueueFull {
        /// The peer.
        peer: String,
    },
    /// The connection closed before the message was queued.
    #[error("connection to {peer} closed ({reason})")]
    ConnectionClosed {
        /// The peer.
        peer: String,
        /// Why it closed.
        reason: DisconnectReason,
    },
    /// The connection ended before the peer acknowledged the message; it may
    /// or may not have been delivered.
    #[error("connection to {peer} closed ({reason}) before delivery was confirmed")]
    Unconfirmed {
        /// The peer.
        peer: String,
        /// Why the connection closed.
        reason: DisconnectReason,
    },
    /// The peer did not confirm delivery within the call's deadline; the
    /// message may still arrive.
    #[error("{peer} did not confirm delivery within {deadline:?}")]
    ConfirmDeadline {
        /// The peer.
        peer: String,
        /// The deadline given.
        deadline: std::time::Duration,
    },
    /// The session did not negotiate delivery acknowledgements (the peer
    /// speaks Go's protocol, or authentication is off).
    #[error("{peer} does not acknowledge delivery")]
    ConfirmationUnavailable {
        /// The peer.
        peer: String,
    },
    /// The session did not negotiate requests (the peer speaks Go's
    /// protocol, or authentication is off): nothing was sent.
    #[error("{peer} does not take requests; nothing was sent")]
    RequestsUnavailable {
        /// The peer.
        peer: String,
    },
    /// No reply arrived in time; a reply arriving later is ignored.
    #[error("no reply from {peer} within {after:?}")]
    RequestTimeout {
        /// The peer.
        peer: String,
        /// The time the caller allowed.
        after: std::time::Duration,
    },
    /// As many requests as the connection allows already wait for replies
    /// (its `send_queue_capacity`); nothing was sent.
    #[error("{limit} requests to {peer} already wait for replies; nothing was sent")]
    TooManyRequests {
        /// The peer.
        peer: String,
        /// Requests a connection lets wait at once.
        limit: usize,
    },
    /// [`Inbound::reply`](crate::Inbound::reply) on a message that was not a
    /// request (or is itself a reply).
    #[error("the message from {peer} is not a request; there is nothing to reply to")]
    NotARequest {
        /// Who sent the message.
        peer: String,
    },
    /// Every attempt failed.
    #[error("gave up after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Box<TransportError>,
    },
    /// The server is already running, or the client already connected.
    #[error("already running")]
    AlreadyRunning,
    /// The server is not running.
    #[error("not running")]
    NotRunning,
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Why [`try_send`](crate::TransportClient::try_send) did not queue a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// The send queue is full; the message is handed back. Nothing else
    /// happened: the peer is not disconnected.
    #[error("send queue full")]
    Full(Box<crate::Message>),
    /// Any other refusal, as [`send`](crate::TransportClient::send) reports it.
    #[error(transparent)]
    Failed(#[from] TransportError),
}

impl TransportError {
    /// A short label for the error in metrics.
    pub(crate) fn metric_kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Handshake(err) => err.kind(),
            Self::Codec(_) => "codec",
            Self::Refused { .. } => "refused",
            _ => "other",
        }
    }

    /// Whether retrying the same operation later may succeed. Errors no
    /// wait can fix are not: a missing or malformed address, a refused or
    /// failed authentication, an invalid setting.
    pub fn is_transient(&self) -> bool {
        match self {
            // An address that does not parse (no port, say) stays unparsable.
            Self::Io { source, .. } => source.kind() != io::ErrorKind::InvalidInput,
            Self::ConnectTimeout { .. }
            | Self::Codec(CodecError::Io(_))
            | Self::SendTimeout { .. }
            | Self::QueueFull { .. }
            | Self::ConnectionClosed { .. }
            | Self::Unconfirmed { .. }
            | Self::ConfirmDeadline { .. }
            | Self::RequestTimeout { .. }
            | Self::TooManyRequests { .. }
            | Self::NotConnected => true,
            Self::Refused { reason, .. } => matches!(
                reason,
                DisconnectReason::Throttled
                    | DisconnectReason::TooManyPeers
                    | DisconnectReason::Requested
                    | DisconnectReason::InternalError
            ),
            Self::Handshake(HandshakeError::Timeout(_)) => true,
            _ => false,
        }
    }
}
