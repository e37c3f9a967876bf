//! gRPC (tonic): one bidirectional `FrameService.Session` stream per
//! connection. Each stream item is a `FrameBatch` whose elements are frame
//! bodies exactly as TCP carries them, so the handshake, signed frames and
//! everything above are the same as over TCP, and any gRPC client with the
//! `.proto` can take part.
//!
//! gRPC-native extras: HTTP/2 keep-alive, a deadline on opening the stream,
//! request metadata (`x-client-id`, and `authorization: Bearer …` checked by a
//! server interceptor), the disconnect reason in trailing metadata, retry of
//! `UNAVAILABLE` through [`RetryPolicy`], and message-size limits derived from
//! the transport's maximum frame size (tonic's 4 MiB default would cap it).

use std::{collections::VecDeque, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Endpoint, Server},
};
use tracing::{debug, warn};

pub use super::bearer::BearerToken;
use super::{
    Backend, Listener, Pipe,
    bearer::TokenDigest,
    grpc_admission::{Admission, AdmittedInfo, incoming},
    grpc_codec,
    grpc_inbound::{InboundLimits, LimitInbound},
};
use crate::{
    codec::{self},
    error::{CodecError, DisconnectReason, TransportError},
    pipe::{FrameReader, FrameWriter, WRITE_COALESCE_BYTES, frame_bodies},
    proto::transport::v1::{
        FrameBatch,
        frame_service_client::FrameServiceClient,
        frame_service_server::{FrameService, FrameServiceServer},
    },
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
    /// Retry of `UNAVAILABLE` (and failed connects) when opening a stream.
    pub retry: RetryPolicy,
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
            retry: RetryPolicy {
                initial: Duration::from_millis(100),
                multiplier: 2.0,
                max_delay: Duration::from_secs(2),
                max_retries: Some(3),
                jitter: crate::retry::Jitter::UpToHalf,
            },
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
    /// Plain HTTP/2 (h2c).
    pub fn new(options: GrpcOptions) -> Self {
        Self {
            options,
            open_attempts: Arc::default(),
            server_tls: None,
            client_tls: None,
        }
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

// ---------------------------------------------------------------------------
// Frame pipe over a gRPC stream
// ---------------------------------------------------------------------------

/// Reads frame bodies from the items of a gRPC stream.
pub struct GrpcReader {
    /// `None` once handed to the drain on drop.
    stream: Option<Streaming<FrameBatch>>,
    pending: VecDeque<Bytes>,
    max_frame_size: usize,
    /// Server side: the limits the request body applies as items arrive.
    limits: Option<Arc<InboundLimits>>,
    /// Client side: drain the response rather than reset it when dropped.
    drain_on_drop: bool,
}

impl Drop for GrpcReader {
    fn drop(&mut self) {
        // Dropping a response stream resets it (RST_STREAM), and HTTP/2 then
        // discards our last request frames, the `Disconnect` among them.
        // Reading to the server's end instead lets them arrive.
        if let (true, Some(mut stream)) = (self.drain_on_drop, self.stream.take())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = stream.next().await {}
                })
                .await;
            });
        }
    }
}

impl std::fmt::Debug for GrpcReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcReader")
            .field("pending", &self.pending.len())
            .field("max_frame_size", &self.max_frame_size)
            .finish()
    }
}

impl FrameReader for GrpcReader {
    async fn read_frame(&mut self) -> Option<Result<Bytes, CodecError>> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                // The same limits as the TCP codec, frame by frame.
                return Some(
                    codec::check_frame_len(frame.len(), self.max_frame_size).map(|()| frame),
                );
            }
            // `Streaming::next` is cancel-safe: a partly received item stays buffered.
            match self.stream.as_mut()?.next().await? {
                Ok(batch) => self.pending.extend(batch.frames),
                Err(status) if status.code() == Code::Ok => return None,
                Err(status) => {
                    let err = grpc_codec::codec_error(&status)
                        .unwrap_or_else(|| CodecError::Io(status_to_io(&status)));
                    return Some(Err(err));
                }
            }
        }
    }

    fn set_max_frame_size(&mut self, max: usize) {
        self.max_frame_size = max;
        if let Some(limits) = &self.limits {
            limits.set_max_frame_size(max);
        }
    }

    fn set_read_budget(&mut self, budget: Arc<crate::stream::ReadBudget>) {
        if let Some(limits) = &self.limits {
            limits.set_read_budget(budget);
        }
    }

    fn has_buffered_frame(&self) -> bool {
        !self.pending.is_empty()
    }
}

fn status_to_io(status: &Status) -> io::Error {
    let kind = match status.code() {
        Code::Unavailable | Code::Cancelled => io::ErrorKind::ConnectionReset,
        Code::DeadlineExceeded => io::ErrorKind::TimedOut,
        Code::Unauthenticated | Code::PermissionDenied => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!("gRPC status {:?}: {}", status.code(), status.message()),
    )
}

/// Where a writer's batches go: the server's response stream or the client's request stream.
#[derive(Debug)]
enum Outlet {
    Server(mpsc::Sender<Result<FrameBatch, Status>>),
    Client(Option<mpsc::Sender<FrameBatch>>),
}

/// Writes frames as items of a gRPC stream: one item per coalesced write.
#[derive(Debug)]
pub struct GrpcWriter {
    outlet: Outlet,
}

impl FrameWriter for GrpcWriter {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        let batch = FrameBatch {
            frames: frame_bodies(segments)?,
        };
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "gRPC stream closed");
        match &self.outlet {
            Outlet::Server(tx) => tx.send(Ok(batch)).await.map_err(|_| closed()),
            Outlet::Client(Some(tx)) => tx.send(batch).await.map_err(|_| closed()),
            Outlet::Client(None) => Err(closed()),
        }
    }

    async fn shutdown(&mut self, reason: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        match &mut self.outlet {
            Outlet::Server(tx) => {
                // Ends the response with a status whose trailers carry the reason.
                let status = disconnect_status(reason);
                let _ = tx.send(Err(status)).await;
            }
            // Dropping the sender ends the request stream (half-close).
            Outlet::Client(tx) => drop(tx.take()),
        }
        Ok(())
    }
}

/// The status ending a server stream: the gRPC code closest to the reason,
/// with the reason and details in trailing metadata.
fn disconnect_status(reason: Option<(DisconnectReason, &str)>) -> Status {
    let (reason, details) = reason.unwrap_or((DisconnectReason::Requested, "closed"));
    let code = match reason {
        DisconnectReason::Requested => Code::Ok,
        DisconnectReason::ProtocolError => Code::InvalidArgument,
        DisconnectReason::TooManyPeers | DisconnectReason::Throttled => Code::ResourceExhausted,
        DisconnectReason::AuthFailure => Code::PermissionDenied,
        DisconnectReason::ReadTimeout | DisconnectReason::WriteTimeout => Code::DeadlineExceeded,
        DisconnectReason::NetworkError => Code::Unavailable,
        _ => Code::Internal,
    };
    let mut trailers = MetadataMap::new();
    trailers.insert(
        DISCONNECT_REASON_TRAILER,
        MetadataValue::from_static(reason.as_str()),
    );
    // Metadata values must be visible ASCII; keep what is and drop the rest.
    let printable: String = details
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    if let Ok(value) = printable.parse() {
        trailers.insert(DISCONNECT_DETAILS_TRAILER, value);
    }
    Status::with_metadata(code, details.to_owned(), trailers)
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

struct Service {
    accepted: mpsc::Sender<(Pipe<GrpcReader, GrpcWriter>, Option<SocketAddr>)>,
    max_frame_size: usize,
}

#[tonic::async_trait]
impl FrameService for Service {
    type SessionStream = ReceiverStream<Result<FrameBatch, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<FrameBatch>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let limits = request.extensions().get::<Arc<InboundLimits>>().cloned();
        let admitted = request.extensions().get::<AdmittedInfo>().cloned();
        let remote_addr = admitted.as_ref().map(|info| info.remote_addr);
        if let Some(info) = &admitted {
            info.gate.opened();
        }
        if let Some(client_id) = request.metadata().get(CLIENT_ID_METADATA) {
            let client_id = String::from_utf8_lossy(client_id.as_bytes());
            debug!(client_id = %crate::log_safe(&client_id), ?remote_addr, "gRPC session opened");
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let pipe = Pipe {
            reader: GrpcReader {
                stream: Some(request.into_inner()),
                pending: VecDeque::new(),
                max_frame_size: codec::HANDSHAKE_MAX_FRAME_SIZE.min(self.max_frame_size),
                limits,
                drain_on_drop: false,
            },
            writer: GrpcWriter {
                outlet: Outlet::Server(tx),
            },
            remote_addr,
        };
        self.accepted
            .send((pipe, remote_addr))
            .await
            .map_err(|_| Status::unavailable("server is shutting down"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Checks `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
struct BearerCheck(Option<TokenDigest>);

impl tonic::service::Interceptor for BearerCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if expected.matches(token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated("missing bearer token")),
        }
    }
}

/// Accepted gRPC sessions, as frame pipes.
pub struct GrpcListener {
    accepted: mpsc::Receiver<(Pipe<GrpcReader, GrpcWriter>, Option<SocketAddr>)>,
    local_addr: SocketAddr,
    /// The server's rate limit, applied before TLS handshakes.
    address_check: Arc<std::sync::OnceLock<super::AddressCheck>>,
    /// Stops the HTTP/2 server when the listener goes away.
    _shutdown: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for GrpcListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcListener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Listener for GrpcListener {
    type Reader = GrpcReader;
    type Writer = GrpcWriter;
    type Connecting = std::future::Ready<io::Result<Pipe<GrpcReader, GrpcWriter>>>;

    async fn accept(&mut self) -> io::Result<(Self::Connecting, Option<SocketAddr>)> {
        match self.accepted.recv().await {
            Some((pipe, remote)) => Ok((std::future::ready(Ok(pipe)), remote)),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "gRPC server stopped",
            )),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    fn set_address_check(&mut self, check: super::AddressCheck) {
        let _ = self.address_check.set(check);
    }

    fn pipe_now(
        connecting: Self::Connecting,
    ) -> Result<Pipe<GrpcReader, GrpcWriter>, Self::Connecting> {
        // The stream is already open: a refusal can always say why.
        connecting
            .into_inner()
            .map_err(|err| std::future::ready(Err(err)))
    }

    fn is_fatal(error: &io::Error) -> bool {
        error.kind() == io::ErrorKind::NotConnected
    }
}

impl GrpcBackend {
    fn router(
        &self,
        accepted: mpsc::Sender<(Pipe<GrpcReader, GrpcWriter>, Option<SocketAddr>)>,
    ) -> tonic::transport::server::Router {
        let limit = self.options.max_message_size();
        let service = FrameServiceServer::new(Service {
            accepted,
            max_frame_size: self.options.max_frame_size,
        })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
        let token = self
            .options
            .bearer_token
            .as_ref()
            .map(|token| TokenDigest::of(token.expose()));
        let mut server = Server::builder()
            .http2_keepalive_interval(self.options.keep_alive)
            .http2_keepalive_timeout(Some(self.options.keep_alive_timeout))
            .tcp_nodelay(self.options.nodelay)
            // Each connection carries one `Session` stream.
            .max_concurrent_streams(Some(1))
            .concurrency_limit_per_connection(1);
        // Items are limited to a handshake until the session raises it.
        let initial = codec::HANDSHAKE_MAX_FRAME_SIZE.min(self.options.max_frame_size);
        server.add_service(LimitInbound::new(
            InterceptedService::new(service, BearerCheck(token)),
            initial,
        ))
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

impl GrpcBackend {
    async fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, TransportError> {
        let io_err = |op: &'static str, err: &dyn std::fmt::Display| TransportError::Io {
            op,
            addr: addr.to_owned(),
            source: io::Error::other(err.to_string()),
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| io_err("connect", &err))?
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(self.options.nodelay)
            .keep_alive_while_idle(self.options.keep_alive_while_idle)
            .keep_alive_timeout(self.options.keep_alive_timeout)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024));
        let endpoint = match self.options.keep_alive {
            Some(interval) => endpoint.http2_keep_alive_interval(interval),
            None => endpoint.keep_alive_while_idle(false),
        };
        let Some(tls) = self.client_tls.clone() else {
            return endpoint
                .connect()
                .await
                .map_err(|err| connect_error(addr, &err));
        };
        let name =
            tls::server_name_for(addr).map_err(|err| TransportError::Config(err.to_string()))?;
        let target = addr.to_owned();
        let nodelay = self.options.nodelay;
        let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(nodelay)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|err| connect_error(addr, &err))
    }

    /// Opens one `Session` stream; retried by the caller on `UNAVAILABLE`.
    async fn open(&self, addr: &str) -> Result<Pipe<GrpcReader, GrpcWriter>, TransportError> {
        self.open_attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limit = self.options.max_message_size();
        let channel = self.channel(addr).await?;
        let mut client = FrameServiceClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Some(client_id) = &self.options.client_id
            && let Ok(value) = client_id.parse()
        {
            request.metadata_mut().insert(CLIENT_ID_METADATA, value);
        }
        if let Some(token) = &self.options.bearer_token {
            let value = format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| TransportError::Config("bearer token is not valid metadata".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = tokio::time::timeout(self.options.call_deadline, client.session(request))
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                addr: addr.to_owned(),
                after: self.options.call_deadline,
            })?
            .map_err(|status| status_error(addr, status))?;
        let remote_addr = addr.parse().ok();
        Ok(Pipe {
            reader: GrpcReader {
                stream: Some(response.into_inner()),
                pending: VecDeque::new(),
                max_frame_size: codec::HANDSHAKE_MAX_FRAME_SIZE,
                limits: None,
                drain_on_drop: true,
            },
            writer: GrpcWriter {
                outlet: Outlet::Client(Some(tx)),
            },
            remote_addr,
        })
    }
}

fn connect_error(addr: &str, err: &tonic::transport::Error) -> TransportError {
    // tonic wraps the cause; its chain says what actually failed.
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    TransportError::Io {
        op: "connect",
        addr: addr.to_owned(),
        source: io::Error::new(io::ErrorKind::ConnectionRefused, message),
    }
}

/// A gRPC status as the transport error a caller can act on.
fn status_error(addr: &str, status: Status) -> TransportError {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => TransportError::Refused {
            reason: DisconnectReason::AuthFailure,
            details: status.message().to_owned(),
        },
        Code::ResourceExhausted => TransportError::Refused {
            reason: DisconnectReason::TooManyPeers,
            details: status.message().to_owned(),
        },
        _ => TransportError::Io {
            op: "open stream",
            addr: addr.to_owned(),
            source: status_to_io(&status),
        },
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
        let io_err = |source| TransportError::Io {
            op: "bind",
            addr: addr.to_owned(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(io_err)?;
        let local_addr = listener.local_addr().map_err(io_err)?;
        let (accepted_tx, accepted) = mpsc::channel(STREAM_BUFFER);
        let router = self.router(accepted_tx);
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let nodelay = self.options.nodelay;
        let address_check = Arc::new(std::sync::OnceLock::new());
        match self.server_tls.clone() {
            None => {
                let mut admission = Admission::new(&self.options);
                // Over plain h2c a throttled call is told why by the server;
                // the listener only charges connections that open no stream.
                admission.address_check = Some(address_check.clone());
                admission.refuses_throttled = false;
                let incoming = incoming(
                    listener,
                    nodelay,
                    shutdown.clone(),
                    admission,
                    |tcp| async move { Ok(tcp) },
                );
                tokio::spawn(async move {
                    if let Err(err) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        warn!(error = %err, "gRPC server failed");
                    }
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let mut admission = Admission::new(&self.options);
                // Over TLS a throttled address is refused before the TLS
                // handshake, without a word.
                admission.address_check = Some(address_check.clone());
                let incoming =
                    incoming(listener, nodelay, shutdown.clone(), admission, move |tcp| {
                        let acceptor = acceptor.clone();
                        async move { acceptor.accept(tcp).await }
                    });
                tokio::spawn(async move {
                    if let Err(err) = router.serve_with_incoming_shutdown(incoming, signal).await {
                        warn!(error = %err, "gRPC server failed");
                    }
                });
            }
        }
        Ok(GrpcListener {
            accepted,
            local_addr,
            address_check,
            _shutdown: shutdown.drop_guard(),
        })
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<GrpcReader, GrpcWriter>, TransportError> {
        self.options
            .retry
            .retry("grpc open", || self.open(addr), is_unavailable)
            .await
    }
}

/// Errors worth retrying: the server is (momentarily) unavailable.
fn is_unavailable(err: &TransportError) -> bool {
    match err {
        TransportError::Io { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
        ),
        TransportError::ConnectTimeout { .. } => true,
        _ => false,
    }
}
