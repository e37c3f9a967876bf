//! Back-ends: how frames move. Each supplies a listener and a dialer of frame
//! pipes ([`crate::pipe`]) and nothing else; handshake, signatures and
//! health live above them and work the same over every back-end.

#[cfg(feature = "grpc")]
mod bearer;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "grpc")]
mod grpc_admission;
#[cfg(feature = "grpc")]
pub(crate) mod grpc_codec;
#[cfg(feature = "grpc")]
mod grpc_inbound;
#[cfg(feature = "quic")]
pub mod quic;
pub mod tcp;
#[cfg(feature = "ws")]
pub mod ws;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

pub use crate::pipe::Pipe;
use crate::{
    error::TransportError,
    pipe::{FrameReader, FrameWriter},
};

/// Whether a peer's address may open a connection now: the server's rate
/// limit, for a listener to apply before any work on the connection; and
/// how to charge that limit for a failure the listener sees first (a failed
/// or timed-out TLS handshake, a connection that never opens its stream).
#[derive(Clone)]
pub struct AddressCheck {
    admits: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    charge: Option<Arc<dyn Fn(IpAddr) + Send + Sync>>,
}

impl AddressCheck {
    /// A check by `admits`, charging nothing.
    pub fn new(admits: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Self {
        Self {
            admits: Arc::new(admits),
            charge: None,
        }
    }

    /// The same check, charging failures seen by the listener to `charge`.
    #[must_use]
    pub fn with_charge(mut self, charge: impl Fn(IpAddr) + Send + Sync + 'static) -> Self {
        self.charge = Some(Arc::new(charge));
        self
    }

    /// Whether `ip` may open a connection now.
    pub fn admits(&self, ip: IpAddr) -> bool {
        (self.admits)(ip)
    }

    /// Charges `ip` for a connection that failed by its own doing before
    /// reaching the server (never for one displaced or shut down).
    pub fn charge(&self, ip: IpAddr) {
        if let Some(charge) = &self.charge {
            charge(ip);
        }
    }
}

impl std::fmt::Debug for AddressCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressCheck").finish_non_exhaustive()
    }
}

/// Accepts connections.
pub trait Listener: Send + 'static {
    /// Reading half of an accepted pipe.
    type Reader: FrameReader;
    /// Writing half of an accepted pipe.
    type Writer: FrameWriter;
    /// What is left of establishing an accepted connection: waiting for the
    /// peer's first bytes, then a TLS or QUIC handshake. It must do no work
    /// until first polled: the server admits the connection (rate limit,
    /// pending-handshake slot) first, and refuses it by dropping this, which
    /// closes the connection (QUIC: refuses it) before any handshake work.
    /// The server awaits it in the connection's own task, under the
    /// handshake deadline, so a slow peer never holds up accepting.
    type Connecting: Future<Output = std::io::Result<Pipe<Self::Reader, Self::Writer>>>
        + Send
        + 'static;

    /// The next connection and the peer's address. Errors are
    /// per-connection (the listener goes on) unless [`Listener::is_fatal`]
    /// says otherwise.
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(Self::Connecting, Option<SocketAddr>)>> + Send;

    /// The bound address (the real port when bound to port 0).
    fn local_addr(&self) -> std::io::Result<SocketAddr>;

    /// Bounds how long an accepted connection may stay silent before its
    /// first bytes (the server sets it when authentication is on, where the
    /// client always speaks first). Default: not applied.
    fn set_first_byte_timeout(&mut self, _timeout: Duration) {}

    /// Gives a listener that runs a transport handshake of its own before
    /// handing connections over (gRPC over TLS) the server's check of a
    /// peer's address (its rate limit), to apply before that handshake.
    /// Default: not used.
    fn set_address_check(&mut self, _check: AddressCheck) {}

    /// The pipe of `connecting` at no cost, where establishing it costs
    /// nothing (plain TCP; a gRPC stream already open), so that a refusal
    /// can tell the peer why; otherwise `connecting` back, to be dropped.
    fn pipe_now(
        connecting: Self::Connecting,
    ) -> Result<Pipe<Self::Reader, Self::Writer>, Self::Connecting> {
        Err(connecting)
    }

    /// Whether an accept error means the listener itself is broken.
    fn is_fatal(_error: &std::io::Error) -> bool {
        false
    }
}

/// A way to listen and dial: one per transport (TCP, gRPC, QUIC, WebSocket).
pub trait Backend: Clone + Send + Sync + 'static {
    /// Reading half of a pipe.
    type Reader: FrameReader;
    /// Writing half of a pipe.
    type Writer: FrameWriter;
    /// The listener `bind` returns.
    type Listener: Listener<Reader = Self::Reader, Writer = Self::Writer>;

    /// Short name for logs and reports ("tcp", "grpc", "quic").
    fn name(&self) -> &'static str;

    /// Listens on `addr` (`host:port`; port 0 picks one).
    fn bind(
        &self,
        addr: &str,
    ) -> impl Future<Output = Result<Self::Listener, TransportError>> + Send;

    /// Connects to `addr`. The caller bounds it with the connect timeout.
    fn dial(
        &self,
        addr: &str,
    ) -> impl Future<Output = Result<Pipe<Self::Reader, Self::Writer>, TransportError>> + Send;
}
