//! QUIC (quinn + rustls): each connection carries one bidirectional stream
//! with exactly the TCP framing, inside QUIC's TLS 1.3.
//!
//! The client opens the stream and always writes first (the handshake
//! request, or a `Ping` without authentication): a QUIC stream only becomes
//! visible to the server with its first bytes. Both sides offer [`ALPN`]; a
//! peer speaking another protocol fails the QUIC handshake.
//!
//! A self-signed certificate with a pinned fingerprint is the simplest setup
//! (see [`QuicBackend::pinned_pair`]); CAs and mutual TLS come from
//! [`crate::tls`].

use std::{
    fmt,
    future::Future,
    io::{self, IoSliceMut},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use quinn::{
    AsyncUdpSocket, Connection, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, RecvStream,
    Runtime, SendStream, TransportConfig, UdpPoller, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    udp::{RecvMeta, Transmit},
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Backend, Listener, Pipe};
use crate::{
    codec::HANDSHAKE_MAX_FRAME_SIZE,
    error::{CodecError, DisconnectReason, TransportError},
    pipe::{FrameBatch, FrameReader, FrameWriter},
    stream::{StreamFrameReader, StreamFrameWriter},
    tls::{self, ALPN, ClientTrust, Identity, ServerTrust},
};

/// QUIC settings, applied through [`quinn::TransportConfig`] on both sides.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct QuicOptions {
    /// A connection that receives nothing for this long is torn down (QUIC's
    /// `max_idle_timeout`; the shorter of the two sides' values applies).
    /// `None` leaves idle connections open. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Sends a QUIC `PING` after this long without sending anything, so an
    /// idle but healthy connection (and its NAT binding) stays up; keep it
    /// well below `idle_timeout`. `None` disables it. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(30)),
            keep_alive: Some(Duration::from_secs(15)),
        }
    }
}

impl QuicOptions {
    /// Transport settings; `accepts_stream` is true on the server, the only
    /// side that lets its peer open a stream (and only one at a time).
    fn transport(&self, accepts_stream: bool) -> Result<Arc<TransportConfig>, TransportError> {
        let mut transport = TransportConfig::default();
        let idle = self
            .idle_timeout
            .map(IdleTimeout::try_from)
            .transpose()
            .map_err(|_| TransportError::Config("quic idle_timeout: too long".into()))?;
        transport
            .max_idle_timeout(idle)
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_bidi_streams(VarInt::from_u32(u32::from(accepts_stream)))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        Ok(Arc::new(transport))
    }
}

/// The QUIC back-end. A server needs a certificate, a client a way to trust
/// the server; one value may hold both.
#[derive(Clone)]
pub struct QuicBackend {
    server: Option<quinn::ServerConfig>,
    client: Option<quinn::ClientConfig>,
}

impl fmt::Debug for QuicBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicBackend")
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

fn config_error(what: &str, err: impl fmt::Display) -> TransportError {
    TransportError::Config(format!("{what}: {err}"))
}

impl QuicBackend {
    /// A back-end that can listen (with `server`: the certificate to present
    /// and how clients are verified, [`ClientTrust::default`] for none) and
    /// dial (with `client`: how servers are verified).
    pub fn new(
        options: QuicOptions,
        server: Option<(&Identity, &ClientTrust)>,
        client: Option<&ServerTrust>,
    ) -> Result<Self, TransportError> {
        let server = server
            .map(|(identity, clients)| tls::server_config(identity, clients, &[ALPN]))
            .transpose()
            .map_err(|err| config_error("quic server TLS", err))?;
        let client = client
            .map(|trust| tls::client_config(trust, &[ALPN]))
            .transpose()
            .map_err(|err| config_error("quic client TLS", err))?;
        Self::from_rustls(options, server, client)
    }

    /// From rustls configs built elsewhere. They must allow TLS 1.3 and
    /// should offer [`ALPN`] (as [`tls::server_config`] and
    /// [`tls::client_config`] do when given it).
    pub fn from_rustls(
        options: QuicOptions,
        server: Option<Arc<rustls::ServerConfig>>,
        client: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, TransportError> {
        let server = match server {
            Some(tls) => {
                let crypto = QuicServerConfig::try_from(tls)
                    .map_err(|err| config_error("quic server TLS", err))?;
                let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
                config.transport_config(options.transport(true)?);
                Some(config)
            }
            None => None,
        };
        let client = match client {
            Some(tls) => {
                let crypto = QuicClientConfig::try_from(tls)
                    .map_err(|err| config_error("quic client TLS", err))?;
                let mut config = quinn::ClientConfig::new(Arc::new(crypto));
                config.transport_config(options.transport(false)?);
                Some(config)
            }
            None => None,
        };
        Ok(Self { server, client })
    }

    /// A server back-end presenting `identity` without client certificates,
    /// and a client back-end that trusts exactly that certificate by its
    /// fingerprint: the development setup, and what a test harness needs
    /// (e.g. with `Identity::self_signed(&["127.0.0.1", "localhost"])`).
    pub fn pinned_pair(
        identity: &Identity,
        options: QuicOptions,
    ) -> Result<(Self, Self), TransportError> {
        let server = Self::new(
            options.clone(),
            Some((identity, &ClientTrust::default())),
            None,
        )?;
        let client = Self::new(
            options,
            None,
            Some(&ServerTrust::pinned(identity.fingerprint())),
        )?;
        Ok((server, client))
    }
}

/// Closes the QUIC connection once both halves of its pipe are gone, so the
/// peer learns at once that the session ended rather than at its idle timeout.
#[derive(Debug)]
struct Closer(Connection);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.close(VarInt::from_u32(0), b"session ended");
    }
}

impl Closer {
    /// Replaces quinn's bare "connection lost" by why the connection ended.
    fn explain(&self, err: io::Error) -> io::Error {
        match self.0.close_reason() {
            Some(ConnectionError::LocallyClosed) | None => err,
            Some(reason) => connection_error(reason),
        }
    }
}

fn connection_error(err: ConnectionError) -> io::Error {
    let message = format!("QUIC connection lost: {err}");
    io::Error::new(io::Error::from(err).kind(), message)
}

/// Reading half of a QUIC pipe.
#[derive(Debug)]
pub struct QuicReader {
    frames: StreamFrameReader<RecvStream>,
    connection: Arc<Closer>,
}

impl FrameReader for QuicReader {
    async fn read_frame(&mut self) -> Option<Result<Bytes, CodecError>> {
        match self.frames.read_frame().await {
            Some(Err(CodecError::Io(err))) => {
                Some(Err(CodecError::Io(self.connection.explain(err))))
            }
            other => other,
        }
    }

    async fn read_batch(&mut self) -> Option<Result<FrameBatch, CodecError>> {
        match self.frames.read_batch().await {
            Some(Err(CodecError::Io(err))) => {
                Some(Err(CodecError::Io(self.connection.explain(err))))
            }
            other => other,
        }
    }

    fn set_max_frame_size(&mut self, max: usize) {
        self.frames.set_max_frame_size(max);
    }

    fn set_read_buffer_size(&mut self, size: usize) {
        self.frames.set_read_buffer_size(size);
    }

    fn set_read_budget(&mut self, budget: std::sync::Arc<crate::stream::ReadBudget>) {
        self.frames.set_read_budget(budget);
    }

    fn has_buffered_frame(&self) -> bool {
        self.frames.has_buffered_frame()
    }
}

/// Writing half of a QUIC pipe.
#[derive(Debug)]
pub struct QuicWriter {
    frames: StreamFrameWriter<SendStream>,
    connection: Arc<Closer>,
}

impl FrameWriter for QuicWriter {
    async fn write_segments(&mut self, segments: &[bytes::Bytes]) -> io::Result<()> {
        self.frames
            .write_segments(segments)
            .await
            .map_err(|err| self.connection.explain(err))
    }

    fn prefers_long_segments(&self) -> bool {
        self.frames.prefers_long_segments()
    }

    async fn shutdown(&mut self, reason: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        // Already finished, or stopped by the peer: nothing left to end.
        let _ = self.frames.0.finish();
        // Closing the connection discards stream data not yet acknowledged:
        // wait until the peer has all of it (a final `Disconnect` included)
        // before closing. Callers bound this wait, and a lost connection ends
        // it at once.
        let _ = self.frames.0.stopped().await;
        if let Some((reason, details)) = reason {
            // The reason again, out of band: what a peer that could not read
            // the `Disconnect` frame gets to see.
            let code = VarInt::from_u32(reason.to_proto() as u32);
            self.connection
                .0
                .close(code, truncate(details, MAX_CLOSE_REASON).as_bytes());
        }
        Ok(())
    }
}

/// Longest close reason sent: it must fit in one packet with room to spare.
const MAX_CLOSE_REASON: usize = 256;

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn pipe(
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
) -> Pipe<QuicReader, QuicWriter> {
    let remote_addr = Some(connection.remote_address());
    let connection = Arc::new(Closer(connection));
    Pipe {
        // The handshake limit applies until the session raises it.
        reader: QuicReader {
            frames: StreamFrameReader::new(recv, HANDSHAKE_MAX_FRAME_SIZE),
            connection: connection.clone(),
        },
        writer: QuicWriter {
            frames: StreamFrameWriter(send),
            connection,
        },
        remote_addr,
        metadata: Vec::new(),
    }
}

/// The QUIC and TLS handshakes of an accepted connection, then its stream.
pub type QuicConnecting =
    Pin<Box<dyn Future<Output = io::Result<Pipe<QuicReader, QuicWriter>>> + Send>>;

/// The accept error once the endpoint is closed.
#[derive(Debug, thiserror::Error)]
#[error("QUIC endpoint closed")]
struct EndpointClosed;

/// A bound QUIC endpoint accepting connections.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: Endpoint,
    /// Bound on opening the stream once the QUIC handshake is done.
    first_byte: Option<Duration>,
    /// Marks the socket as on its way out once the listener is gone.
    _closed: DropGuard,
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        // Refuse new connections, but let the open ones end on their own: a
        // stopping server is still sending them their `Disconnect`.
        self.endpoint.set_server_config(None);
    }
}

impl Listener for QuicListener {
    type Reader = QuicReader;
    type Writer = QuicWriter;
    type Connecting = QuicConnecting;

    async fn accept(&mut self) -> io::Result<(QuicConnecting, Option<SocketAddr>)> {
        let incoming = loop {
            let incoming = self
                .endpoint
                .accept()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, EndpointClosed))?;
            if incoming.remote_address_validated() || !incoming.may_retry() {
                break incoming;
            }
            // A first packet's source address may be forged, and the server
            // rate-limits by it: a stateless Retry makes the client prove
            // it owns the address (one more round trip) before anything is
            // spent or counted on it.
            let _ = incoming.retry();
        };
        let remote = incoming.remote_address();
        let first_byte = self.first_byte;
        // Lazy: the QUIC handshake starts only once the server has admitted
        // the connection; dropping this unpolled refuses the `Incoming`.
        let connecting = async move {
            let connection = incoming.await.map_err(connection_error)?;
            // A stream is visible with its first bytes: a connection that
            // opens none is as silent as a TCP one that sends nothing.
            let opened = connection.accept_bi();
            let (send, recv) = match first_byte {
                Some(after) => tokio::time::timeout(after, opened).await.map_err(|_| {
                    connection.close(VarInt::from_u32(0), b"no stream opened");
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no stream opened within the first-byte deadline ({after:?})"),
                    )
                })?,
                None => opened.await,
            }
            .map_err(connection_error)?;
            Ok(pipe(connection, send, recv))
        };
        Ok((Box::pin(connecting), Some(remote)))
    }

    fn set_first_byte_timeout(&mut self, timeout: Duration) {
        self.first_byte = Some(timeout);
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn is_fatal(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<EndpointClosed>())
    }
}

/// A socket bound by one of this process's listeners.
struct Bound {
    addr: SocketAddr,
    /// Cancelled when the listener is dropped.
    closed: CancellationToken,
    /// Cancelled once quinn has let go of the socket.
    released: CancellationToken,
}

/// The sockets of this process's listeners until they are released.
static LISTENING: LazyLock<Mutex<Vec<Bound>>> = LazyLock::new(Mutex::default);

/// How long a bind waits for a stopped listener's socket on the same port.
/// Closed connections keep the socket for three probe timeouts: well under a
/// second on a live path, about three seconds at worst.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Binds a listener's UDP socket. A stopped listener keeps its socket until
/// its closed connections have drained (QUIC answers their late packets for a
/// while), so restarting a server on its port right after `stop` would fail
/// with "address in use": when the port is held by one of our own listeners,
/// wait for its release instead. Returns the socket and the guard that marks
/// the listener closed.
async fn bind_socket(
    addr: SocketAddr,
    runtime: &dyn Runtime,
) -> io::Result<(Arc<dyn AsyncUdpSocket>, DropGuard)> {
    let overlaps = |bound: &SocketAddr| {
        bound.port() == addr.port()
            && (bound.ip() == addr.ip()
                || bound.ip().is_unspecified()
                || addr.ip().is_unspecified())
    };
    let socket = match std::net::UdpSocket::bind(addr) {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let releasing: Vec<CancellationToken> = lock(&LISTENING)
                .iter()
                .filter(|bound| overlaps(&bound.addr) && !bound.released.is_cancelled())
                // `None` while a listener still serves on the port.
                .map(|bound| bound.closed.is_cancelled().then(|| bound.released.clone()))
                .collect::<Option<_>>()
                .unwrap_or_default();
            // Someone else's socket, or a listener still serving: in use indeed.
            if releasing.is_empty() {
                return Err(err);
            }
            let all_released = futures::future::join_all(releasing.iter().map(|r| r.cancelled()));
            let _ = tokio::time::timeout(RELEASE_WAIT, all_released).await;
            std::net::UdpSocket::bind(addr)?
        }
        other => other?,
    };
    let bound = Bound {
        addr: socket.local_addr()?,
        closed: CancellationToken::new(),
        released: CancellationToken::new(),
    };
    let socket = Arc::new(TrackedSocket {
        inner: runtime.wrap_udp_socket(socket)?,
        _released: bound.released.clone().drop_guard(),
    });
    let closed = bound.closed.clone().drop_guard();
    let mut listening = lock(&LISTENING);
    listening.retain(|bound| !bound.released.is_cancelled());
    listening.push(bound);
    Ok((socket, closed))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A listener's socket that reports when quinn drops it. Every holder of the
/// inner socket (the endpoint, each connection, each poller) holds this
/// wrapper, so the token fires exactly when the port is free again.
#[derive(Debug)]
struct TrackedSocket {
    // Dropped first: the port is free before the release is announced.
    inner: Arc<dyn AsyncUdpSocket>,
    _released: DropGuard,
}

impl AsyncUdpSocket for TrackedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(TrackedPoller {
            inner: self.inner.clone().create_io_poller(),
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[derive(Debug)]
struct TrackedPoller {
    inner: Pin<Box<dyn UdpPoller>>,
    _socket: Arc<TrackedSocket>,
}

impl UdpPoller for TrackedPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.get_mut().inner.as_mut().poll_writable(cx)
    }
}

async fn resolve(addr: &str, op: &'static str) -> Result<SocketAddr, TransportError> {
    let io_err = |source| TransportError::Io {
        op,
        addr: addr.to_owned(),
        source,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(io_err)?
        .next()
        .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no address")))
}

/// Whether a connection error is the TLS handshake failing (a QUIC
/// CRYPTO_ERROR, 0x100 + the TLS alert), on our side or the peer's.
fn is_tls_failure(err: &ConnectionError) -> bool {
    let code = match err {
        ConnectionError::TransportError(err) => err.code,
        ConnectionError::ConnectionClosed(close) => close.error_code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

impl Backend for QuicBackend {
    type Reader = QuicReader;
    type Writer = QuicWriter;
    type Listener = QuicListener;

    fn name(&self) -> &'static str {
        "quic"
    }

    async fn bind(&self, addr: &str) -> Result<QuicListener, TransportError> {
        let config = self
            .server
            .clone()
            .ok_or_else(|| TransportError::Config("a QUIC server needs a certificate".into()))?;
        let socket_addr = resolve(addr, "bind").await?;
        let io_err = |source| TransportError::Io {
            op: "bind",
            addr: addr.to_owned(),
            source,
        };
        let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
        let (socket, closed) = bind_socket(socket_addr, runtime.as_ref())
            .await
            .map_err(io_err)?;
        let endpoint = Endpoint::new_with_abstract_socket(
            EndpointConfig::default(),
            Some(config),
            socket,
            runtime,
        )
        .map_err(io_err)?;
        Ok(QuicListener {
            endpoint,
            first_byte: None,
            _closed: closed,
        })
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<QuicReader, QuicWriter>, TransportError> {
        let config = self.client.clone().ok_or_else(|| {
            TransportError::Config("a QUIC client needs a trust configuration".into())
        })?;
        let name =
            tls::server_name_for(addr).map_err(|err| TransportError::Config(err.to_string()))?;
        let remote = resolve(addr, "connect").await?;
        let io_err = |source| TransportError::Io {
            op: "connect",
            addr: addr.to_owned(),
            source,
        };
        // One endpoint (UDP socket) per connection, like a TCP socket: it
        // lives exactly as long as its connection, so a dropped client leaves
        // no background socket behind, and a reconnect starts on a fresh port
        // rather than on a path the network may have forgotten. A client holds
        // one connection at a time, so sharing would save nothing.
        let local: SocketAddr = if remote.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = Endpoint::client(local).map_err(io_err)?;
        let connection = endpoint
            .connect_with(config, remote, &name.to_str())
            .map_err(|err| io_err(io::Error::new(io::ErrorKind::InvalidInput, err)))?
            .await
            .map_err(|err| {
                if is_tls_failure(&err) {
                    TransportError::Tls {
                        addr: addr.to_owned(),
                        source: io::Error::new(io::ErrorKind::PermissionDenied, err),
                    }
                } else {
                    io_err(connection_error(err))
                }
            })?;
        // Opening sends nothing: the stream reaches the server with our first write.
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|err| io_err(connection_error(err)))?;
        Ok(pipe(connection, send, recv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        assert_eq!(truncate("short", 256), "short");
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("ééé", 4), "éé");
    }

    #[test]
    fn only_a_closed_endpoint_is_fatal() {
        let closed = io::Error::new(io::ErrorKind::NotConnected, EndpointClosed);
        assert!(QuicListener::is_fatal(&closed));
        let other = io::Error::new(io::ErrorKind::NotConnected, "handshake failed");
        assert!(!QuicListener::is_fatal(&other));
    }

    #[test]
    fn options_reject_an_idle_timeout_quic_cannot_carry() {
        let options = QuicOptions {
            idle_timeout: Some(Duration::from_secs(u64::MAX / 1000)),
            ..QuicOptions::default()
        };
        assert!(matches!(
            options.transport(true),
            Err(TransportError::Config(_))
        ));
        assert!(QuicOptions::default().transport(false).is_ok());
    }
}
