//! gRPC (tonic): one bidirectional `FrameService.Session` stream per
//! connection. Each stream item is a `FrameBatch` whose elements are frame
//! bodies exactly as TCP carries them, so the handshake, signed frames and
//! everything above are the same as over TCP, and any gRPC client with the
//! `.proto` can take part.
//!
//! gRPC-native extras: HTTP/2 keep-alive, a deadline on opening the stream,
//! request metadata (`x-client-id`, `authorization: Bearer …` checked by a
//! server interceptor, and the application's own entries, which a server
//! keeps per connection within bounds), the disconnect reason in trailing
//! metadata, retry of the configured status codes (`UNAVAILABLE` by default)
//! through [`RetryPolicy`], and message-size limits derived from the
//! transport's maximum frame size (tonic's 4 MiB default would cap it).

mod client;
mod codes;
mod metadata;
mod pipe;
mod server;
mod tls_watch;

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

pub use self::{
    codes::GrpcCode,
    metadata::ClientMetadata,
    pipe::{GrpcReader, GrpcWriter},
    server::GrpcListener,
};
pub use super::bearer::BearerToken;
use super::{Backend, Pipe};
use crate::{
    codec,
    error::TransportError,
    pipe::WRITE_COALESCE_BYTES,
    retry::RetryPolicy,
    tls::{self, ClientTrust, Identity, ServerTrust},
};

/// Metadata key carrying the client id.
pub const CLIENT_ID_METADATA: &str = "x-client-id";
/// Trailer carrying the disconnect reason (snake_case, as in logs).
pub const DISCONNECT_REASON_TRAILER: &str = "x-disconnect-reason";
/// Trailer carrying the disconnect details.
pub const DISCONNECT_DETAILS_TRAILER: &str = "x-disconnect-details";

/// Items buffered per direction of a stream before the writer waits.
const STREAM_BUFFER: usize = 64;

/// gRPC settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcOptions {
    /// HTTP/2 PING interval; `None` disables keep-alive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// How long to wait for a keep-alive PING's answer.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// Send keep-alive PINGs even without active streams (client).
    pub keep_alive_while_idle: bool,
    /// Bound on establishing the HTTP/2 connection (client).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for opening the stream: the server must answer the call
    /// within it. The stream itself then lives until closed.
    #[serde(with = "humantime_serde")]
    pub call_deadline: Duration,
    /// Bearer token: required from clients by a server, sent by a client.
    /// Never serialized (a configuration written back out omits it).
    #[serde(skip_serializing)]
    pub bearer_token: Option<BearerToken>,
    /// Client id sent as `x-client-id` metadata.
    pub client_id: Option<String>,
    /// Client: application metadata sent when opening the stream. Keys are
    /// lowercase ASCII and may not be the back-end's own (`x-client-id`,
    /// `authorization`, the disconnect trailers) nor gRPC's (`grpc-…`);
    /// values are visible ASCII. Anything else is a configuration error.
    pub metadata: Vec<(String, String)>,
    /// Server: application metadata entries kept per connection; further
    /// ones are logged and dropped.
    pub max_metadata_entries: usize,
    /// Server: bytes of keys and values kept per connection.
    pub max_metadata_bytes: usize,
    /// Retry of failed connects, and of the calls failing with one of
    /// [`retryable_codes`](Self::retryable_codes), when opening a stream.
    pub retry: RetryPolicy,
    /// Status codes worth retrying the stream-opening call for.
    pub retryable_codes: Vec<GrpcCode>,
    /// Largest frame body; gRPC message limits are derived from it.
    pub max_frame_size: usize,
    /// TCP_NODELAY on the HTTP/2 connection.
    pub nodelay: bool,
    /// HTTP/2 connections a server serves at once; a TCP connection beyond
    /// it is closed at once, before any TLS or HTTP/2 work.
    pub max_connections: usize,
    /// Server: connections that have not opened their stream yet (TLS and
    /// the HTTP/2 preface included); beyond it a newcomer displaces the
    /// oldest of the address prefix holding the most, as pending handshakes
    /// do, or is closed.
    pub max_pending_connections: usize,
    /// Server: of those, what one address prefix (an IPv4 address, an IPv6
    /// /64) may hold.
    pub max_pending_connections_per_prefix: usize,
    /// Server: a connection must open its stream within this (TLS, the
    /// HTTP/2 preface and the call); otherwise it is closed.
    #[serde(with = "humantime_serde")]
    pub stream_deadline: Duration,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        Self {
            keep_alive: Some(Duration::from_secs(30)),
            keep_alive_timeout: Duration::from_secs(20),
            keep_alive_while_idle: true,
            connect_timeout: Duration::from_secs(10),
            call_deadline: Duration::from_secs(10),
            bearer_token: None,
            client_id: None,
            metadata: Vec::new(),
            max_metadata_entries: 16,
            max_metadata_bytes: 4096,
            retry: RetryPolicy {
                initial: Duration::from_millis(100),
                multiplier: 2.0,
                max_delay: Duration::from_secs(2),
                max_retries: Some(3),
                jitter: crate::retry::Jitter::UpToHalf,
            },
            retryable_codes: vec![GrpcCode::Unavailable],
            max_frame_size: codec::DEFAULT_MAX_FRAME_SIZE,
            nodelay: true,
            max_connections: 5120,
            max_pending_connections: 4096,
            max_pending_connections_per_prefix: 128,
            stream_deadline: crate::handshake::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl GrpcOptions {
    /// Checks the settings a dial or a bind would otherwise refuse.
    pub fn validate(&self) -> Result<(), TransportError> {
        metadata::client_entries(&self.metadata).map(|_| ())
    }

    /// Largest gRPC message: a batch may hold one maximal frame plus a
    /// coalesced write's worth of smaller ones.
    fn max_message_size(&self) -> usize {
        self.max_frame_size + WRITE_COALESCE_BYTES + 1024
    }
}

/// The gRPC back-end. TLS is optional: with a server identity it serves
/// HTTPS (ALPN `h2`), with a server trust it dials HTTPS.
#[derive(Clone)]
pub struct GrpcBackend {
    options: GrpcOptions,
    /// Streams this back-end (and its clones) tried to open.
    open_attempts: Arc<std::sync::atomic::AtomicU64>,
    /// Server: the metadata of each open stream's client.
    metadata: metadata::MetadataTable,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for GrpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcBackend")
            .field("options", &self.options)
            .field("server_tls", &self.server_tls.is_some())
            .field("client_tls", &self.client_tls.is_some())
            .finish()
    }
}

impl GrpcBackend {
    /// Plain HTTP/2 (h2c). Settings are checked when dialling; see
    /// [`try_new`](Self::try_new) to check them at once.
    pub fn new(options: GrpcOptions) -> Self {
        Self {
            options,
            open_attempts: Arc::default(),
            metadata: metadata::MetadataTable::default(),
            server_tls: None,
            client_tls: None,
        }
    }

    /// As [`new`](Self::new), refusing invalid settings (such as metadata
    /// keys or values) with [`TransportError::Config`].
    pub fn try_new(options: GrpcOptions) -> Result<Self, TransportError> {
        options.validate()?;
        Ok(Self::new(options))
    }

    /// Server: the application metadata the client connected from `peer`
    /// sent (see [`ConnectionInfo::remote_addr`](crate::ConnectionInfo::remote_addr)),
    /// while its stream is open; `None` if it sent none.
    pub fn client_metadata(&self, peer: std::net::SocketAddr) -> Option<Arc<ClientMetadata>> {
        self.metadata.get(peer)
    }

    /// Serves TLS with `identity`, verifying client certificates by `clients`.
    pub fn with_server_tls(
        mut self,
        identity: &Identity,
        clients: &ClientTrust,
    ) -> Result<Self, tls::TlsError> {
        self.server_tls = Some(tls::server_config(identity, clients, &[b"h2"])?);
        Ok(self)
    }

    /// Dials TLS, verifying the server by `trust`.
    pub fn with_client_tls(mut self, trust: &ServerTrust) -> Result<Self, tls::TlsError> {
        self.client_tls = Some(tls::client_config(trust, &[b"h2"])?);
        Ok(self)
    }

    /// Streams this back-end and its clones tried to open, retries included.
    pub fn open_attempts(&self) -> u64 {
        self.open_attempts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The settings.
    pub fn options(&self) -> &GrpcOptions {
        &self.options
    }

    /// Mutable settings, e.g. to set the client id or frame limit.
    pub fn options_mut(&mut self) -> &mut GrpcOptions {
        &mut self.options
    }
}

impl Backend for GrpcBackend {
    type Reader = GrpcReader;
    type Writer = GrpcWriter;
    type Listener = GrpcListener;

    fn name(&self) -> &'static str {
        if self.server_tls.is_some() || self.client_tls.is_some() {
            "grpc+tls"
        } else {
            "grpc"
        }
    }
    async fn bind(&self, addr: &str) -> Result<GrpcListener, TransportError> {
        self.serve(addr).await
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<GrpcReader, GrpcWriter>, TransportError> {
        let codes = &self.options.retryable_codes;
        self.options
            .retry
            .retry(
                "grpc open",
                || self.open(addr),
                |failure: &client::OpenFailure| match failure.code {
                    Some(code) => codes.iter().any(|retryable| retryable.is(code)),
                    None => client::is_unavailable(&failure.error),
                },
            )
            .await
            .map_err(|failure| failure.error)
    }
}
