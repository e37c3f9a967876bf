//! The listening side: the `FrameService` implementation handing each
//! opened stream over as a frame pipe, the bearer-token check, and the
//! HTTP/2 server behind a [`GrpcListener`].

use std::{collections::VecDeque, io, net::SocketAddr, sync::Arc};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status, Streaming, service::interceptor::InterceptedService,
    transport::Server,
};
use tracing::{debug, warn};

use super::{
    CLIENT_ID_METADATA, GrpcBackend, STREAM_BUFFER,
    metadata::{ClientMetadata, MetadataTable},
    pipe::{GrpcReader, GrpcWriter, Outlet},
};
use crate::{
    backend::{
        AddressCheck, Listener, Pipe,
        bearer::TokenDigest,
        grpc_admission::{Admission, AdmittedInfo, incoming},
        grpc_inbound::{InboundLimits, LimitInbound},
    },
    codec,
    error::TransportError,
    proto::transport::v1::{
        FrameBatch,
        frame_service_server::{FrameService, FrameServiceServer},
    },
};

struct Service {
    accepted: mpsc::Sender<(Pipe<GrpcReader, GrpcWriter>, Option<SocketAddr>)>,
    max_frame_size: usize,
    metadata: MetadataTable,
    max_metadata_entries: usize,
    max_metadata_bytes: usize,
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
        let kept = ClientMetadata::keep(
            request.metadata(),
            self.max_metadata_entries,
            self.max_metadata_bytes,
        );
        let entries = kept.entries.clone();
        // Most clients send none: then nothing is recorded.
        let metadata = remote_addr
            .filter(|_| kept != ClientMetadata::default())
            .map(|peer| self.metadata.insert(peer, kept));
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let pipe = Pipe {
            reader: GrpcReader {
                stream: Some(request.into_inner()),
                pending: VecDeque::new(),
                max_frame_size: codec::HANDSHAKE_MAX_FRAME_SIZE.min(self.max_frame_size),
                limits,
                drain_on_drop: false,
                _metadata: metadata,
            },
            writer: GrpcWriter {
                outlet: Outlet::Server(tx),
            },
            remote_addr,
            metadata: entries,
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
    address_check: Arc<std::sync::OnceLock<AddressCheck>>,
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

    fn set_address_check(&mut self, check: AddressCheck) {
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
            metadata: self.metadata.clone(),
            max_metadata_entries: self.options.max_metadata_entries,
            max_metadata_bytes: self.options.max_metadata_bytes,
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

impl GrpcBackend {
    /// Serves `FrameService` on `addr`; the listener yields its streams.
    pub(super) async fn serve(&self, addr: &str) -> Result<GrpcListener, TransportError> {
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
}
