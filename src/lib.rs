//! Signed, length-prefixed protobuf transport between a rollup publisher and
//! its sequencers, wire-compatible with the Go publisher SDK's `transport`.
//!
//! Layers, bottom-up:
//! - [`codec`]: the frame format (4-byte big-endian length + protobuf), pure;
//! - [`crypto`]: secp256k1 keys, Ethereum-style signatures, the trust store;
//! - [`handshake`]: the authentication handshake as sans-IO state machines;
//! - [`signed`]: per-message signatures (signed frames) with anti-replay;
//! - [`pipe`]: the frame-pipe contract between sessions and back-ends;
//! - [`session`]: one connection over any frame pipe (writer, reader, health);
//! - [`backend`]: listeners and dialers of frame pipes (TCP, …);
//! - [`TransportServer`] / [`TransportClient`]: the application API, also
//!   behind the object-safe [`Server`] and [`Client`] traits.
//!
//! See `docs/PROTOCOL.md` for the exact bytes on the wire.
#![warn(missing_docs)]

mod admission;
pub mod backend;
pub mod client;
pub mod codec;
pub mod config;
pub mod config_file;
mod confirm;
pub mod crypto;
mod deadline;
pub mod decode_bound;
pub mod error;
pub mod handshake;
mod log_safe;
pub mod manager;
pub mod metrics;
pub mod multi;
pub mod pipe;
pub mod pool;
pub mod proto;
pub mod retry;
pub mod server;
pub mod session;
pub mod signed;
pub mod stream;
mod streams;
#[cfg(feature = "tls")]
pub mod tls;

/// README.md's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use backend::tcp::{TcpBackend, TcpOptions};
pub use client::{ClientStats, ConnectionEvent, TransportClient};
pub use codec::FrameCodec;
pub use config::{ClientAuth, ClientConfig, RateLimit, ServerAuth, ServerConfig};
pub use crypto::{
    Address, CryptoBackend, PublicKey, SecretKey, Signature, TrustMode, TrustStore, TrustedPeer,
};
pub use error::{
    CodecError, DisconnectReason, HandshakeError, KeyError, SignedFrameError, TransportError,
    TrySendError,
};
pub use handshake::SignedFramesPolicy;
pub(crate) use log_safe::log_safe;
pub use manager::BroadcastReport;
pub use proto::Message;
pub use retry::RetryPolicy;
pub use server::TransportServer;
pub use session::{
    ConnectionInfo, Handled, Handler, HandlerError, Inbound, InboundBatch, Messages, SyncHandler,
    channel_handler,
};

/// A TCP server.
pub type TcpServer = TransportServer<TcpBackend>;
/// A TCP client.
pub type TcpClient = TransportClient<TcpBackend>;

impl TcpServer {
    /// A TCP server with the default socket options.
    pub fn tcp(config: ServerConfig, auth: Option<ServerAuth>) -> Self {
        Self::tcp_with(TcpOptions::default(), config, auth)
    }

    /// A TCP server with these socket options (checked when it starts).
    pub fn tcp_with(options: TcpOptions, config: ServerConfig, auth: Option<ServerAuth>) -> Self {
        TransportServer::new(TcpBackend::new(options), config, auth)
    }
}

impl TcpClient {
    /// A TCP client with the default socket options.
    pub fn tcp(config: ClientConfig, auth: Option<ClientAuth>) -> Self {
        Self::tcp_with(TcpOptions::default(), config, auth)
    }

    /// A TCP client with these socket options (checked when it connects).
    pub fn tcp_with(options: TcpOptions, config: ClientConfig, auth: Option<ClientAuth>) -> Self {
        TransportClient::new(TcpBackend::new(options), config, auth)
    }
}

/// A gRPC server.
#[cfg(feature = "grpc")]
pub type GrpcServer = TransportServer<backend::grpc::GrpcBackend>;
/// A gRPC client.
#[cfg(feature = "grpc")]
pub type GrpcClient = TransportClient<backend::grpc::GrpcBackend>;

#[cfg(feature = "grpc")]
impl GrpcServer {
    /// A gRPC server on `backend` (plain or TLS); its message limits follow
    /// `config.max_message_size`.
    pub fn grpc(
        config: ServerConfig,
        mut backend: backend::grpc::GrpcBackend,
        auth: Option<ServerAuth>,
    ) -> Self {
        backend.options_mut().max_frame_size = config.max_message_size;
        TransportServer::new(backend, config, auth)
    }
}

#[cfg(feature = "grpc")]
impl GrpcClient {
    /// A gRPC client on `backend` (plain or TLS); it sends `config.client_id`
    /// as `x-client-id` metadata and follows `config.max_message_size`.
    pub fn grpc(
        config: ClientConfig,
        mut backend: backend::grpc::GrpcBackend,
        auth: Option<ClientAuth>,
    ) -> Self {
        let options = backend.options_mut();
        options.max_frame_size = config.max_message_size;
        options.client_id = Some(config.client_id.clone());
        TransportClient::new(backend, config, auth)
    }
}

/// The server side of every back-end, object-safe (the Go `Server` interface).
#[async_trait::async_trait]
pub trait Server: Send + Sync {
    /// Listens on the configured address; returns the bound address.
    async fn start(&self) -> Result<SocketAddr, TransportError>;
    /// Listens on `addr` (port 0 picks one); returns the bound address.
    async fn listen(&self, addr: &str) -> Result<SocketAddr, TransportError>;
    /// Graceful stop: `Disconnect{REQUESTED}` to every peer, bounded in time.
    async fn stop(&self) -> Result<(), TransportError>;
    /// The bound address while running.
    fn local_addr(&self) -> Option<SocketAddr>;
    /// Sends to every peer but `exclude`; never waits on a slow peer.
    fn broadcast(
        &self,
        message: Message,
        exclude: Option<&str>,
    ) -> Result<BroadcastReport, TransportError>;
    /// Sends to one peer by identity.
    async fn send(&self, peer: &str, message: Message) -> Result<(), TransportError>;
    /// Queues for one peer without waiting; a full queue hands the message back.
    fn try_send(&self, peer: &str, message: Message) -> Result<(), TrySendError>;
    /// Sends to one peer and waits for its delivery acknowledgement.
    async fn send_confirmed(&self, peer: &str, message: Message) -> Result<(), TransportError>;
    /// Sends a request to one peer and returns its reply.
    async fn request(
        &self,
        peer: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError>;
    /// Sets the handler of inbound messages.
    fn set_handler(&self, handler: Arc<dyn Handler>);
    /// Metadata and counters of every connection.
    fn connections(&self) -> Vec<ConnectionInfo>;
    /// This server's metrics.
    fn metrics(&self) -> Arc<metrics::Metrics>;
    /// The back-end's name ("tcp", "grpc", "quic", …).
    fn backend_name(&self) -> &'static str;
}

#[async_trait::async_trait]
impl<B: backend::Backend> Server for TransportServer<B> {
    async fn start(&self) -> Result<SocketAddr, TransportError> {
        TransportServer::start(self).await
    }
    async fn listen(&self, addr: &str) -> Result<SocketAddr, TransportError> {
        TransportServer::listen(self, addr).await
    }
    async fn stop(&self) -> Result<(), TransportError> {
        TransportServer::stop(self).await
    }
    fn local_addr(&self) -> Option<SocketAddr> {
        TransportServer::local_addr(self)
    }
    fn broadcast(
        &self,
        message: Message,
        exclude: Option<&str>,
    ) -> Result<BroadcastReport, TransportError> {
        TransportServer::broadcast(self, message, exclude)
    }
    async fn send(&self, peer: &str, message: Message) -> Result<(), TransportError> {
        TransportServer::send(self, peer, message).await
    }
    fn try_send(&self, peer: &str, message: Message) -> Result<(), TrySendError> {
        TransportServer::try_send(self, peer, message)
    }
    async fn send_confirmed(&self, peer: &str, message: Message) -> Result<(), TransportError> {
        TransportServer::send_confirmed(self, peer, message).await
    }
    async fn request(
        &self,
        peer: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError> {
        TransportServer::request(self, peer, message, timeout).await
    }
    fn set_handler(&self, handler: Arc<dyn Handler>) {
        TransportServer::set_handler(self, handler)
    }
    fn connections(&self) -> Vec<ConnectionInfo> {
        TransportServer::connections(self)
    }
    fn metrics(&self) -> Arc<metrics::Metrics> {
        TransportServer::metrics(self).clone()
    }
    fn backend_name(&self) -> &'static str {
        TransportServer::backend_name(self)
    }
}

/// The client side of every back-end, object-safe (the Go `Client` interface).
#[async_trait::async_trait]
pub trait Client: Send + Sync {
    /// Connects once; an empty `addr` means the configured server address.
    async fn connect(&self, addr: &str) -> Result<(), TransportError>;
    /// Connects with `max_retries` retries and Go's backoff; `addr` as in `connect`.
    async fn connect_with_retry(&self, addr: &str, max_retries: u32) -> Result<(), TransportError>;
    /// Closes the session and stops reconnecting.
    async fn disconnect(&self) -> Result<(), TransportError>;
    /// Closes and connects again to the last address.
    async fn reconnect(&self) -> Result<(), TransportError>;
    /// Sends a message to the server.
    async fn send(&self, message: Message) -> Result<(), TransportError>;
    /// Queues a message without waiting; a full queue hands it back. Not an
    /// `async` method, so calling it through `dyn Client` costs no boxed
    /// future: the fast path of a streaming sender.
    fn try_send(&self, message: Message) -> Result<(), TrySendError>;
    /// Sends a message and waits for the server's delivery acknowledgement.
    async fn send_confirmed(&self, message: Message) -> Result<(), TransportError>;
    /// Sends a request to the server and returns its reply.
    async fn request(&self, message: Message, timeout: Duration)
    -> Result<Inbound, TransportError>;
    /// Whether a session is up.
    fn is_connected(&self) -> bool;
    /// The client id.
    fn id(&self) -> String;
    /// Counters.
    fn stats(&self) -> ClientStats;
    /// Sets the handler of messages from the server.
    fn set_handler(&self, handler: Arc<dyn Handler>);
    /// Sets the read timeout of future sessions.
    fn set_read_timeout(&self, timeout: Duration);
    /// Sets the write timeout of future sessions.
    fn set_write_timeout(&self, timeout: Duration);
    /// Sets the first reconnect delay.
    fn set_reconnect_delay(&self, delay: Duration);
    /// Connection-state events.
    fn events(&self) -> tokio::sync::broadcast::Receiver<ConnectionEvent>;
    /// This client's metrics.
    fn metrics(&self) -> Arc<metrics::Metrics>;
}

#[async_trait::async_trait]
impl<B: backend::Backend> Client for TransportClient<B> {
    async fn connect(&self, addr: &str) -> Result<(), TransportError> {
        TransportClient::connect(self, addr).await
    }
    async fn connect_with_retry(&self, addr: &str, max_retries: u32) -> Result<(), TransportError> {
        TransportClient::connect_with_retry(self, addr, max_retries).await
    }
    async fn disconnect(&self) -> Result<(), TransportError> {
        TransportClient::disconnect(self).await
    }
    async fn reconnect(&self) -> Result<(), TransportError> {
        TransportClient::reconnect(self).await
    }
    async fn send(&self, message: Message) -> Result<(), TransportError> {
        TransportClient::send(self, message).await
    }
    fn try_send(&self, message: Message) -> Result<(), TrySendError> {
        TransportClient::try_send(self, message)
    }
    async fn send_confirmed(&self, message: Message) -> Result<(), TransportError> {
        TransportClient::send_confirmed(self, message).await
    }
    async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Inbound, TransportError> {
        TransportClient::request(self, message, timeout).await
    }
    fn is_connected(&self) -> bool {
        TransportClient::is_connected(self)
    }
    fn id(&self) -> String {
        TransportClient::id(self)
    }
    fn stats(&self) -> ClientStats {
        TransportClient::stats(self)
    }
    fn set_handler(&self, handler: Arc<dyn Handler>) {
        TransportClient::set_handler(self, handler)
    }
    fn set_read_timeout(&self, timeout: Duration) {
        TransportClient::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Duration) {
        TransportClient::set_write_timeout(self, timeout)
    }
    fn set_reconnect_delay(&self, delay: Duration) {
        TransportClient::set_reconnect_delay(self, delay)
    }
    fn events(&self) -> tokio::sync::broadcast::Receiver<ConnectionEvent> {
        TransportClient::events(self)
    }
    fn metrics(&self) -> Arc<metrics::Metrics> {
        TransportClient::metrics(self).clone()
    }
}

#[cfg(feature = "quic")]
pub use backend::quic::{QuicBackend, QuicOptions};

/// A QUIC server.
#[cfg(feature = "quic")]
pub type QuicServer = TransportServer<backend::quic::QuicBackend>;
/// A QUIC client.
#[cfg(feature = "quic")]
pub type QuicClient = TransportClient<backend::quic::QuicBackend>;

#[cfg(feature = "ws")]
pub use backend::ws::{WsBackend, WsOptions};

/// A WebSocket server.
#[cfg(feature = "ws")]
pub type WsServer = TransportServer<backend::ws::WsBackend>;
/// A WebSocket client.
#[cfg(feature = "ws")]
pub type WsClient = TransportClient<backend::ws::WsBackend>;
