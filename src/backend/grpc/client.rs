//! The dialling side: the HTTP/2 channel (plain or TLS), opening one
//! `Session` stream, and the errors a caller can act on.

use std::{collections::VecDeque, io};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, transport::Endpoint};

use super::{
    CLIENT_ID_METADATA, GrpcBackend, STREAM_BUFFER, metadata,
    pipe::{GrpcReader, GrpcWriter, Outlet, status_to_io},
    tls_watch::{self, TlsFailure, Watched},
};
use crate::{
    backend::Pipe,
    codec,
    error::{DisconnectReason, TransportError},
    proto::transport::v1::frame_service_client::FrameServiceClient,
    tls,
};

impl GrpcBackend {
    /// The channel to `addr`, and where its TLS failure is recorded.
    async fn channel(
        &self,
        addr: &str,
        failure: &TlsFailure,
    ) -> Result<tonic::transport::Channel, TransportError> {
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
        let watch = failure.clone();
        let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let (tls, name, target) = (tls.clone(), name.clone(), target.clone());
            let failure = watch.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                tcp.set_nodelay(nodelay)?;
                let inner = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .inspect_err(|err| tls_watch::note(&failure, err))?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(Watched { inner, failure }))
            }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|err| tls_error(addr, failure).unwrap_or_else(|| connect_error(addr, &err)))
    }

    /// Opens one `Session` stream; the caller retries by the failure's code.
    pub(super) async fn open(
        &self,
        addr: &str,
    ) -> Result<Pipe<GrpcReader, GrpcWriter>, OpenFailure> {
        self.open_attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entries = metadata::client_entries(&self.options.metadata)?;
        let limit = self.options.max_message_size();
        let failure = TlsFailure::default();
        let channel = self.channel(addr, &failure).await?;
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
        for (key, value) in entries {
            request.metadata_mut().append(key, value);
        }
        let response = tokio::time::timeout(self.options.call_deadline, client.session(request))
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                addr: addr.to_owned(),
                after: self.options.call_deadline,
            })?
            .map_err(|status| match tls_error(addr, &failure) {
                // A refused certificate stays refused, whatever the code.
                Some(error) => OpenFailure { error, code: None },
                None => OpenFailure {
                    code: Some(status.code()),
                    error: status_error(addr, status),
                },
            })?;
        let remote_addr = addr.parse().ok();
        Ok(Pipe {
            reader: GrpcReader {
                stream: Some(response.into_inner()),
                pending: VecDeque::new(),
                max_frame_size: codec::HANDSHAKE_MAX_FRAME_SIZE,
                limits: None,
                drain_on_drop: true,
                _metadata: None,
            },
            writer: GrpcWriter {
                outlet: Outlet::Client(Some(tx)),
            },
            remote_addr,
            metadata: Vec::new(),
        })
    }
}

/// Why opening a stream failed, with the call's status code when the
/// server answered one (what decides a retry).
#[derive(Debug)]
pub(super) struct OpenFailure {
    pub(super) error: TransportError,
    pub(super) code: Option<Code>,
}

impl From<TransportError> for OpenFailure {
    fn from(error: TransportError) -> Self {
        Self { error, code: None }
    }
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// The TLS failure of the connection, as the error it is.
fn tls_error(addr: &str, failure: &TlsFailure) -> Option<TransportError> {
    failure.get().map(|tls| TransportError::Tls {
        addr: addr.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, tls.clone()),
    })
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

/// Errors worth retrying: the server is (momentarily) unavailable.
pub(super) fn is_unavailable(err: &TransportError) -> bool {
    match err {
        TransportError::Io { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
        ),
        TransportError::ConnectTimeout { .. } => true,
        _ => false,
    }
}
