//! Generated protobuf types.
//!
//! [`rollup::v1`] holds the messages of the Go publisher SDK, byte-compatible
//! with it; [`transport::v1`] holds this crate's negotiated extensions.

/// Messages of the `rollup` protobuf package.
pub mod rollup {
    /// Version 1: the Go-compatible messages.
    #[allow(missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/rollup.v1.rs"));
    }
}

/// Messages of this crate's `transport` protobuf package.
pub mod transport {
    /// Version 1: handshake extensions and signed frames.
    #[allow(missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/transport.v1.rs"));
    }
}

pub use rollup::v1::{Message, message::Payload};

/// What a message or frame is: its payload type, or one of the transport's
/// own frame kinds. Metrics label by it ([`label`](Self::label)); protocol
/// decisions ask it ([`is_application`](Self::is_application)), never labels.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A `Message` without a payload.
    Empty,
    /// `XTRequest`.
    XtRequest,
    /// `Vote`.
    Vote,
    /// `Decided`.
    Decided,
    /// `Block`.
    Block,
    /// `CIRCMessage`.
    CircMessage,
    /// `StartSlot`.
    StartSlot,
    /// `RequestSeal`.
    RequestSeal,
    /// `RollBackAndStartSlot`.
    RollBackAndStartSlot,
    /// `L2Block`.
    L2Block,
    /// `StartSC`.
    StartSc,
    /// `HandshakeRequest`.
    HandshakeRequest,
    /// `HandshakeResponse`.
    HandshakeResponse,
    /// `Ping`.
    Ping,
    /// `Pong`.
    Pong,
    /// `Disconnect`.
    Disconnect,
    /// A signed frame, counted as a whole before it is opened.
    SignedFrame,
    /// A delivery acknowledgement or a request for one.
    Ack,
}

impl MessageKind {
    /// Every kind, in the order of [`index`](Self::index).
    pub const ALL: [Self; 18] = [
        Self::Empty,
        Self::XtRequest,
        Self::Vote,
        Self::Decided,
        Self::Block,
        Self::CircMessage,
        Self::StartSlot,
        Self::RequestSeal,
        Self::RollBackAndStartSlot,
        Self::L2Block,
        Self::StartSc,
        Self::HandshakeRequest,
        Self::HandshakeResponse,
        Self::Ping,
        Self::Pong,
        Self::Disconnect,
        Self::SignedFrame,
        Self::Ack,
    ];

    /// The kind of `message`'s payload.
    pub fn of(message: &Message) -> Self {
        match &message.payload {
            None => Self::Empty,
            Some(Payload::XtRequest(_)) => Self::XtRequest,
            Some(Payload::Vote(_)) => Self::Vote,
            Some(Payload::Decided(_)) => Self::Decided,
            Some(Payload::Block(_)) => Self::Block,
            Some(Payload::CircMessage(_)) => Self::CircMessage,
            Some(Payload::StartSlot(_)) => Self::StartSlot,
            Some(Payload::RequestSeal(_)) => Self::RequestSeal,
            Some(Payload::RollBackAndStartSlot(_)) => Self::RollBackAndStartSlot,
            Some(Payload::L2Block(_)) => Self::L2Block,
            Some(Payload::StartSc(_)) => Self::StartSc,
            Some(Payload::HandshakeRequest(_)) => Self::HandshakeRequest,
            Some(Payload::HandshakeResponse(_)) => Self::HandshakeResponse,
            Some(Payload::Ping(_)) => Self::Ping,
            Some(Payload::Pong(_)) => Self::Pong,
            Some(Payload::Disconnect(_)) => Self::Disconnect,
        }
    }

    /// A short, stable name, used in logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::XtRequest => "xt_request",
            Self::Vote => "vote",
            Self::Decided => "decided",
            Self::Block => "block",
            Self::CircMessage => "circ_message",
            Self::StartSlot => "start_slot",
            Self::RequestSeal => "request_seal",
            Self::RollBackAndStartSlot => "roll_back_and_start_slot",
            Self::L2Block => "l2_block",
            Self::StartSc => "start_sc",
            Self::HandshakeRequest => "handshake_request",
            Self::HandshakeResponse => "handshake_response",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Disconnect => "disconnect",
            Self::SignedFrame => "signed_frame",
            Self::Ack => "ack",
        }
    }

    /// Position in [`ALL`](Self::ALL), for per-kind tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether this is an application message, as opposed to the
    /// transport's own traffic (handshake, ping, pong, disconnect, acks, the
    /// signed frame that wraps messages). Delivery acknowledgements count
    /// application messages only (docs/PROTOCOL.md §5.1).
    pub fn is_application(self) -> bool {
        !matches!(
            self,
            Self::HandshakeRequest
                | Self::HandshakeResponse
                | Self::Ping
                | Self::Pong
                | Self::Disconnect
                | Self::SignedFrame
                | Self::Ack
        )
    }
}

/// A short, stable name for a message's payload type, used in logs and metric labels.
pub fn payload_kind(message: &Message) -> &'static str {
    MessageKind::of(message).label()
}
