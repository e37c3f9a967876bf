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

/// A short, stable name for a message's payload type, used in logs and metric labels.
pub fn payload_kind(message: &Message) -> &'static str {
    match &message.payload {
        None => "empty",
        Some(Payload::XtRequest(_)) => "xt_request",
        Some(Payload::Vote(_)) => "vote",
        Some(Payload::Decided(_)) => "decided",
        Some(Payload::Block(_)) => "block",
        Some(Payload::CircMessage(_)) => "circ_message",
        Some(Payload::StartSlot(_)) => "start_slot",
        Some(Payload::RequestSeal(_)) => "request_seal",
        Some(Payload::RollBackAndStartSlot(_)) => "roll_back_and_start_slot",
        Some(Payload::L2Block(_)) => "l2_block",
        Some(Payload::StartSc(_)) => "start_sc",
        Some(Payload::HandshakeRequest(_)) => "handshake_request",
        Some(Payload::HandshakeResponse(_)) => "handshake_response",
        Some(Payload::Ping(_)) => "ping",
        Some(Payload::Pong(_)) => "pong",
        Some(Payload::Disconnect(_)) => "disconnect",
    }
}
