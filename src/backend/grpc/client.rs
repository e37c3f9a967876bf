//! The dialling side: the HTTP/2 channel (plain or TLS), opening one
//! `Session` stream, and the errors a caller can act on.

use std::{collections::VecDeque, io};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, transport::Endpoint};

use super::{
    CLIENT_ID_METADATA, GrpcBackend, STREAM_BUFFER,
    pipe::{GrpcReader, GrpcWriter, Outlet, status_to_io},
};
use crate::{
    backend::Pipe,
    codec,
    error::{DisconnectReason, TransportError},
    proto::transport::v1::frame_service_client::FrameServiceClient,
    tls,
};

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
    pub(super) async fn open(
        &self,
        addr: &str,
    ) -> Result<Pipe<GrpcReader, GrpcWriter>, TransportError> {
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
