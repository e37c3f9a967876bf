//! WebSocket (RFC 6455), `ws://` and `wss://`: for peers that reach the
//! server only through HTTP infrastructure (load balancers, reverse
//! proxies). Each frame body travels as one binary WebSocket message,
//! without the 4-byte length prefix (the message carries the length); text
//! messages are a protocol error. Handshake and messages are those of every
//! back-end.
//!
//! The server upgrades requests for one path ([`WsOptions::path`]) and
//! answers any other with HTTP 404. Admission, the first-byte deadline and
//! the TLS handshake come before the upgrade, as on TCP. tungstenite
//! answers WebSocket pings and closes.

mod io;

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::TlsAcceptor;
use tungstenite::{
    HandshakeError,
    client::IntoClientRequest,
    handshake::{
        HandshakeRole,
        server::{Callback, ErrorResponse, Request, Response},
    },
    http::{StatusCode, uri::PathAndQuery},
};

use self::io::{Buffers, WsStream};
pub use self::io::{WsReader, WsWriter};
use super::{
    Backend, Listener, Pipe,
    tcp::{TcpBackend, TcpFrameListener, TcpOptions},
};
use crate::{
    codec::HANDSHAKE_MAX_FRAME_SIZE,
    error::TransportError,
    tls::{ClientTrust, Identity, ServerTrust},
};

/// The upgrade path unless configured otherwise.
pub const DEFAULT_PATH: &str = "/rollup";

/// The TLS application protocol offered on `wss://`: HTTP/1.1, which
/// proxies and load balancers in between expect of a WebSocket.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Settings of the WebSocket back-end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WsOptions {
    /// Request path of the upgrade (default `/rollup`): a server refuses
    /// any other with HTTP 404; a client asks for it unless the address it
    /// dials names its own (`ws://host:port/path`).
    pub path: String,
    /// Socket options of the TCP connection underneath.
    pub tcp: TcpOptions,
}

impl Default for WsOptions {
    fn default() -> Self {
        Self {
            path: DEFAULT_PATH.to_owned(),
            tcp: TcpOptions::default(),
        }
    }
}

impl WsOptions {
    /// Checks the values; the error names the offending field.
    pub fn validate(&self) -> Result<(), TransportError> {
        check_path(&self.path)?;
        self.tcp.validate()
    }
}

fn check_path(path: &str) -> Result<(), TransportError> {
    let valid = path.starts_with('/')
        && path
            .parse::<PathAndQuery>()
            .is_ok_and(|parsed| parsed.query().is_none());
    if valid {
        Ok(())
    } else {
        Err(TransportError::Config(format!(
            "ws.path: {path:?} is not an absolute request path without a query"
        )))
    }
}

/// The WebSocket back-end: `ws://`, or `wss://` with a TLS config. A server
/// needs a certificate for `wss://`; a client dials `wss://` when it has a
/// way to trust the server, unless the address says `ws://`.
#[derive(Clone)]
pub struct WsBackend {
    tcp: TcpBackend,
    path: Arc<str>,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for WsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsBackend")
            .field("tcp", &self.tcp)
            .field("path", &self.path)
            .field("server_tls", &self.server_tls.is_some())
            .field("client_tls", &self.client_tls.is_some())
            .finish()
    }
}

impl WsBackend {
    /// A plain (`ws://`) back-end.
    pub fn new(options: WsOptions) -> Result<Self, TransportError> {
        options.validate()?;
        Ok(Self {
            tcp: TcpBackend::new(options.tcp),
            path: options.path.into(),
            server_tls: None,
            client_tls: None,
        })
    }

    /// Listens with `wss://`, presenting `identity` and verifying client
    /// certificates as `clients` says.
    pub fn with_server_tls(
        self,
        identity: &Identity,
        clients: &ClientTrust,
    ) -> Result<Self, TransportError> {
        let config = crate::tls::server_config(identity, clients, &[ALPN_HTTP1])
            .map_err(|err| TransportError::Config(format!("ws server TLS: {err}")))?;
        Ok(self.with_rustls(Some(config), None))
    }

    /// Dials `wss://`, verifying the server as `trust` says.
    pub fn with_client_tls(self, trust: &ServerTrust) -> Result<Self, TransportError> {
        let config = crate::tls::client_config(trust, &[ALPN_HTTP1])
            .map_err(|err| TransportError::Config(format!("ws client TLS: {err}")))?;
        Ok(self.with_rustls(None, Some(config)))
    }

    /// The same back-end over other socket options (checked when binding
    /// or dialing).
    #[must_use]
    pub fn with_tcp(mut self, options: TcpOptions) -> Self {
        self.tcp = TcpBackend::new(options);
        self
    }

    /// Adds rustls configs built elsewhere (each only when given).
    #[must_use]
    pub fn with_rustls(
        mut self,
        server: Option<Arc<rustls::ServerConfig>>,
        client: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        self.server_tls = server.or(self.server_tls);
        self.client_tls = client.or(self.client_tls);
        self
    }

    /// A `wss://` server presenting `identity`, and a client trusting
    /// exactly that certificate by its fingerprint: the development setup.
    pub fn pinned_pair(
        identity: &Identity,
        options: WsOptions,
    ) -> Result<(Self, Self), TransportError> {
        let server =
            Self::new(options.clone())?.with_server_tls(identity, &ClientTrust::default())?;
        let client =
            Self::new(options)?.with_client_tls(&ServerTrust::pinned(identity.fingerprint()))?;
        Ok((server, client))
    }
}

/// The pipe of an upgraded connection, with the handshake's frame limit.
fn pipe(
    ws: tungstenite::WebSocket<Buffers>,
    socket: WsStream,
    remote_addr: Option<SocketAddr>,
) -> Pipe<WsReader, WsWriter> {
    let (reader, writer) = io::halves(ws, socket, HANDSHAKE_MAX_FRAME_SIZE);
    Pipe {
        reader,
        writer,
        remote_addr,
        metadata: Vec::new(),
    }
}

/// Runs a tungstenite handshake over `socket`: writes what it queued, reads
/// what it waits for, until it is done or fails. A failure's last words (an
/// HTTP error response) are written before it is reported.
async fn drive<R>(
    socket: &mut WsStream,
    output: io::Outbox,
    mut attempt: Result<R::FinalResult, HandshakeError<R>>,
) -> Result<R::FinalResult, tungstenite::Error>
where
    R: HandshakeRole<InternalStream = Buffers>,
{
    let mut chunk = BytesMut::new();
    loop {
        let queued = output.take();
        if !queued.is_empty() {
            socket.write_all(&queued).await?;
            socket.flush().await?;
        }
        match attempt {
            Ok(done) => return Ok(done),
            Err(HandshakeError::Failure(err)) => {
                let _ = socket.shutdown().await;
                return Err(err);
            }
            Err(HandshakeError::Interrupted(mut mid)) => {
                let n = io::read_chunk(socket, &mut chunk).await?;
                mid.get_mut().get_mut().deliver(&mut chunk, n);
                attempt = mid.handshake();
            }
        }
    }
}

/// Upgrades requests for one path; any other gets 404.
struct PathCheck(Arc<str>);

impl Callback for PathCheck {
    // The signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() == &*self.0 {
            Ok(response)
        } else {
            let mut refusal = ErrorResponse::new(Some("no WebSocket endpoint here\n".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    }
}

/// The server side of the upgrade: requests for another path get 404.
async fn accept(
    mut socket: WsStream,
    path: Arc<str>,
) -> std::io::Result<(tungstenite::WebSocket<Buffers>, WsStream)> {
    let buffers = Buffers::default();
    let output = buffers.output.clone();
    let check = PathCheck(path);
    let config = io::config(HANDSHAKE_MAX_FRAME_SIZE);
    let attempt = tungstenite::accept_hdr_with_config(buffers, check, Some(config));
    match drive(&mut socket, output, attempt).await {
        Ok(ws) => Ok((ws, socket)),
        Err(tungstenite::Error::Io(err)) => Err(err),
        Err(err) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("WebSocket upgrade refused: {err}"),
        )),
    }
}

/// The client side of the upgrade, for `url`.
async fn connect(
    mut socket: WsStream,
    url: &str,
) -> Result<(tungstenite::WebSocket<Buffers>, WsStream), TransportError> {
    let config_err =
        |err: tungstenite::Error| TransportError::Config(format!("ws address {url:?}: {err}"));
    let request = url.into_client_request().map_err(config_err)?;
    let buffers = Buffers::default();
    let output = buffers.output.clone();
    let config = io::config(HANDSHAKE_MAX_FRAME_SIZE);
    let attempt = tungstenite::client::client_with_config(request, buffers, Some(config));
    match drive(&mut socket, output, attempt).await {
        Ok((ws, _response)) => Ok((ws, socket)),
        // Another path, or no WebSocket endpoint: retrying will not help
        // (unlike a proxy's 502 or 503 while the server restarts).
        Err(tungstenite::Error::Http(response))
            if response.status().is_client_error()
                && ![StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS]
                    .contains(&response.status()) =>
        {
            Err(TransportError::Config(format!(
                "{url}: the server refused the WebSocket upgrade with HTTP {}",
                response.status()
            )))
        }
        Err(err) => Err(TransportError::Io {
            op: "WebSocket upgrade",
            addr: url.to_owned(),
            source: match err {
                tungstenite::Error::Io(err) => err,
                other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
            },
        }),
    }
}

/// A dialled address: `host:port`, or a `ws://` / `wss://` URL.
struct Target<'a> {
    host_port: &'a str,
    tls: Option<bool>,
    path: Option<&'a str>,
}

fn target(addr: &str) -> Target<'_> {
    let (tls, rest) = if let Some(rest) = addr.strip_prefix("wss://") {
        (Some(true), rest)
    } else if let Some(rest) = addr.strip_prefix("ws://") {
        (Some(false), rest)
    } else {
        (None, addr)
    };
    match rest.find('/') {
        Some(slash) if tls.is_some() => Target {
            host_port: &rest[..slash],
            tls,
            path: Some(&rest[slash..]),
        },
        _ => Target {
            host_port: rest,
            tls,
            path: None,
        },
    }
}

/// An accepted connection on its way to a pipe: first bytes, TLS, upgrade.
pub type WsConnecting =
    Pin<Box<dyn Future<Output = std::io::Result<Pipe<WsReader, WsWriter>>> + Send>>;

/// A bound WebSocket listener.
pub struct WsListener {
    tcp: TcpFrameListener,
    acceptor: Option<TlsAcceptor>,
    path: Arc<str>,
}

impl std::fmt::Debug for WsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsListener")
            .field("tcp", &self.tcp)
            .field("tls", &self.acceptor.is_some())
            .field("path", &self.path)
            .finish()
    }
}

impl Listener for WsListener {
    type Reader = WsReader;
    type Writer = WsWriter;
    type Connecting = WsConnecting;

    async fn accept(&mut self) -> std::io::Result<(WsConnecting, Option<SocketAddr>)> {
        let (stream, remote) = self.tcp.accept_stream().await?;
        let acceptor = self.acceptor.clone();
        let first_byte = self.tcp.first_byte;
        let path = self.path.clone();
        // Lazy: nothing happens until the server has admitted it.
        let connecting = async move {
            super::tcp::first_bytes(&stream, first_byte).await?;
            let socket: WsStream = match acceptor {
                Some(acceptor) => Box::new(acceptor.accept(stream).await?),
                None => Box::new(stream),
            };
            let (ws, socket) = accept(socket, path).await?;
            Ok(pipe(ws, socket, Some(remote)))
        };
        Ok((Box::pin(connecting), Some(remote)))
    }

    fn set_first_byte_timeout(&mut self, timeout: Duration) {
        self.tcp.set_first_byte_timeout(timeout);
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl Backend for WsBackend {
    type Reader = WsReader;
    type Writer = WsWriter;
    type Listener = WsListener;

    fn name(&self) -> &'static str {
        if self.server_tls.is_some() || self.client_tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }

    async fn bind(&self, addr: &str) -> Result<WsListener, TransportError> {
        Ok(WsListener {
            tcp: self.tcp.bind(addr).await?,
            acceptor: self.server_tls.clone().map(TlsAcceptor::from),
            path: self.path.clone(),
        })
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<WsReader, WsWriter>, TransportError> {
        let target = target(addr);
        let tls = target.tls.unwrap_or(self.client_tls.is_some());
        let path = target.path.unwrap_or(&self.path);
        check_path(path)?;
        let tcp: TcpStream = self.tcp.dial_stream(target.host_port).await?;
        let remote = tcp.peer_addr().ok();
        let socket: WsStream = if tls {
            let config = self.client_tls.clone().ok_or_else(|| {
                TransportError::Config("a wss:// client needs a trust configuration".into())
            })?;
            Box::new(super::tcp::tls::connect(config, target.host_port, tcp).await?)
        } else {
            Box::new(tcp)
        };
        let scheme = if tls { "wss" } else { "ws" };
        let url = format!("{scheme}://{}{path}", target.host_port);
        let (ws, socket) = connect(socket, &url).await?;
        Ok(pipe(ws, socket, remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_paths() {
        let plain = target("127.0.0.1:9000");
        assert_eq!(
            (plain.host_port, plain.tls, plain.path),
            ("127.0.0.1:9000", None, None)
        );
        let url = target("wss://example.org:443/a/b");
        assert_eq!(
            (url.host_port, url.tls, url.path),
            ("example.org:443", Some(true), Some("/a/b"))
        );
        let bare = target("ws://h:1");
        assert_eq!(
            (bare.host_port, bare.tls, bare.path),
            ("h:1", Some(false), None)
        );
        assert!(check_path("/rollup").is_ok());
        for bad in ["", "rollup", "/a?b=1", "/a b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
