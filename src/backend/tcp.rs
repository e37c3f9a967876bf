//! Plain TCP: the Go package's transport.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream, tcp::OwnedReadHalf};

use super::{Backend, Listener, Pipe};

mod writer;
use crate::{codec::HANDSHAKE_MAX_FRAME_SIZE, error::TransportError, stream::StreamFrameReader};
pub use writer::TcpWriter;

/// Socket options of the TCP back-end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TcpOptions {
    /// Disable Nagle's algorithm (Go: on). Writes are already coalesced.
    pub nodelay: bool,
    /// TCP keep-alive probe interval; `None` disables it (Go: 30 s).
    #[serde(with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// Listen backlog: connections the kernel queues before the server
    /// accepts them. 1024 by default, so that a burst of connections does
    /// not overflow the queue and cost an honest client a SYN retransmit
    /// (a second); the kernel caps it at `net.core.somaxconn` (Go: 64).
    pub backlog: u32,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            nodelay: true,
            keep_alive: Some(Duration::from_secs(30)),
            backlog: 1024,
        }
    }
}

/// Range of keep-alive times the kernel takes (whole seconds; Linux caps
/// `TCP_KEEPIDLE` and `TCP_KEEPINTVL` at 32767).
const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(32_767);

impl TcpOptions {
    /// Checks the values; the error names the offending field
    /// (`tcp.keep_alive`). Binding and dialing check them too.
    pub fn validate(&self) -> Result<(), TransportError> {
        if let Some(keep_alive) = self.keep_alive
            && !KEEP_ALIVE_RANGE.contains(&keep_alive)
        {
            return Err(TransportError::Config(
                "tcp.keep_alive: must be between 1 s and 32767 s".into(),
            ));
        }
        Ok(())
    }
}

/// The TCP back-end.
#[derive(Debug, Clone, Default)]
pub struct TcpBackend {
    options: TcpOptions,
}

impl TcpBackend {
    /// A TCP back-end with these socket options.
    pub fn new(options: TcpOptions) -> Self {
        Self { options }
    }

    fn configure(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(self.options.nodelay)?;
        if let Some(interval) = self.options.keep_alive {
            let keepalive = TcpKeepalive::new()
                .with_time(interval)
                .with_interval(interval);
            SockRef::from(stream).set_tcp_keepalive(&keepalive)?;
        }
        Ok(())
    }

    /// Connects and applies the socket options.
    pub(crate) async fn dial_stream(&self, addr: &str) -> Result<TcpStream, TransportError> {
        self.options.validate()?;
        let io_err = |source| TransportError::Io {
            op: "connect",
            addr: addr.to_owned(),
            source,
        };
        let stream = TcpStream::connect(addr).await.map_err(io_err)?;
        self.configure(&stream).map_err(io_err)?;
        Ok(stream)
    }
}

fn pipe(stream: TcpStream) -> Pipe<TcpReader, TcpWriter> {
    let remote_addr = stream.peer_addr().ok();
    let (read, write) = stream.into_split();
    Pipe {
        // The handshake limit applies until the session raises it.
        reader: StreamFrameReader::new(read, HANDSHAKE_MAX_FRAME_SIZE),
        writer: TcpWriter::new(write),
        remote_addr,
        metadata: Vec::new(),
    }
}

/// The error of a connection silent past its first-byte deadline.
fn silent(after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("nothing received within the first-byte deadline ({after:?})"),
    )
}

/// Waits until `stream` has bytes to read (or has ended), for at most
/// `deadline` when one is set.
pub(super) async fn first_bytes(stream: &TcpStream, deadline: Option<Duration>) -> io::Result<()> {
    match deadline {
        // Peeked, not merely readable: readiness may be spurious.
        Some(after) => tokio::time::timeout(after, stream.peek(&mut [0u8; 1]))
            .await
            .map_err(|_| silent(after))?
            .map(drop),
        None => Ok(()),
    }
}

/// An accepted TCP connection: resolves to its pipe once the peer has sent
/// its first bytes (at once when no first-byte deadline is set).
#[derive(Debug)]
pub struct TcpConnecting {
    stream: Option<TcpStream>,
    first_byte: Option<Duration>,
    /// Started at the first poll.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for TcpConnecting {
    type Output = io::Result<Pipe<TcpReader, TcpWriter>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(stream) = &this.stream else {
            return Poll::Ready(Err(io::Error::other("polled after completion")));
        };
        if let Some(after) = this.first_byte {
            // Readiness alone may be spurious on a fresh socket: peek.
            let mut byte = [0u8; 1];
            let mut peeked = tokio::io::ReadBuf::new(&mut byte);
            match stream.poll_peek(cx, &mut peeked) {
                // Data, or the end of the stream (the handshake reports it).
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    let deadline = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                    return match deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(silent(after))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        Poll::Ready(
            this.stream
                .take()
                .map(pipe)
                .ok_or_else(|| io::Error::other("no stream")),
        )
    }
}

/// Reading half of a TCP pipe.
pub type TcpReader = StreamFrameReader<OwnedReadHalf>;

/// A bound TCP listener.
#[derive(Debug)]
pub struct TcpFrameListener {
    listener: TcpListener,
    backend: TcpBackend,
    pub(super) first_byte: Option<Duration>,
}

impl TcpFrameListener {
    /// The next connection, with the socket options applied.
    pub(super) async fn accept_stream(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, remote) = self.listener.accept().await?;
        self.backend.configure(&stream)?;
        Ok((stream, remote))
    }
}

impl Listener for TcpFrameListener {
    type Reader = TcpReader;
    type Writer = TcpWriter;
    type Connecting = TcpConnecting;

    async fn accept(&mut self) -> io::Result<(Self::Connecting, Option<SocketAddr>)> {
        let (stream, remote) = self.accept_stream().await?;
        let connecting = TcpConnecting {
            stream: Some(stream),
            first_byte: self.first_byte,
            deadline: None,
        };
        Ok((connecting, Some(remote)))
    }

    fn set_first_byte_timeout(&mut self, timeout: Duration) {
        self.first_byte = Some(timeout);
    }

    fn pipe_now(connecting: TcpConnecting) -> Result<Pipe<TcpReader, TcpWriter>, TcpConnecting> {
        match connecting.stream {
            Some(stream) => Ok(pipe(stream)),
            None => Err(connecting),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Backend for TcpBackend {
    type Reader = TcpReader;
    type Writer = TcpWriter;
    type Listener = TcpFrameListener;

    fn name(&self) -> &'static str {
        "tcp"
    }

    async fn bind(&self, addr: &str) -> Result<TcpFrameListener, TransportError> {
        // Refused once here, rather than by every accepted socket.
        self.options.validate()?;
        let io_err = |source| TransportError::Io {
            op: "bind",
            addr: addr.to_owned(),
            source,
        };
        let socket_addr = tokio::net::lookup_host(addr)
            .await
            .map_err(io_err)?
            .next()
            .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no address")))?;
        let socket = if socket_addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(io_err)?;
        socket.set_reuseaddr(true).map_err(io_err)?;
        socket.bind(socket_addr).map_err(io_err)?;
        let listener = socket.listen(self.options.backlog).map_err(io_err)?;
        Ok(TcpFrameListener {
            listener,
            backend: self.clone(),
            first_byte: None,
        })
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<TcpReader, TcpWriter>, TransportError> {
        Ok(pipe(self.dial_stream(addr).await?))
    }
}

/// TCP with TLS (rustls): the same frames inside a TLS session.
#[cfg(feature = "tls")]
pub mod tls {
    use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc};

    use tokio::{
        io::{ReadHalf, WriteHalf},
        net::TcpStream,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

    use super::{TcpBackend, TcpFrameListener, TcpOptions};
    use crate::{
        backend::{Backend, Listener, Pipe},
        codec::HANDSHAKE_MAX_FRAME_SIZE,
        error::TransportError,
        stream::{StreamFrameReader, StreamFrameWriter},
    };

    /// Reading half of a TLS pipe.
    pub type TlsReader = StreamFrameReader<ReadHalf<TlsStream<TcpStream>>>;
    /// Writing half of a TLS pipe.
    pub type TlsWriter = StreamFrameWriter<WriteHalf<TlsStream<TcpStream>>>;
    /// A TLS handshake in progress on an accepted connection.
    pub type TlsConnecting =
        Pin<Box<dyn Future<Output = io::Result<Pipe<TlsReader, TlsWriter>>> + Send>>;

    /// TCP + TLS. A server needs a [`rustls::ServerConfig`], a client a
    /// [`rustls::ClientConfig`] (see [`crate::tls`]).
    #[derive(Clone)]
    pub struct TcpTlsBackend {
        tcp: TcpBackend,
        server: Option<Arc<rustls::ServerConfig>>,
        client: Option<Arc<rustls::ClientConfig>>,
    }

    impl std::fmt::Debug for TcpTlsBackend {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TcpTlsBackend")
                .field("tcp", &self.tcp)
                .field("server", &self.server.is_some())
                .field("client", &self.client.is_some())
                .finish()
        }
    }

    impl TcpTlsBackend {
        /// Like [`new`](Self::new), building the rustls configs from the
        /// [`crate::tls`] settings (as the gRPC and QUIC back-ends take them).
        pub fn from_identity(
            options: TcpOptions,
            server: Option<(&crate::tls::Identity, &crate::tls::ClientTrust)>,
            client: Option<&crate::tls::ServerTrust>,
        ) -> Result<Self, crate::tls::TlsError> {
            let alpn: &[&[u8]] = &[crate::tls::ALPN];
            let server = server
                .map(|(identity, clients)| crate::tls::server_config(identity, clients, alpn))
                .transpose()?;
            let client = client
                .map(|trust| crate::tls::client_config(trust, alpn))
                .transpose()?;
            Ok(Self::new(options, server, client))
        }

        /// A back-end that can listen (with `server`) and dial (with `client`).
        pub fn new(
            options: TcpOptions,
            server: Option<Arc<rustls::ServerConfig>>,
            client: Option<Arc<rustls::ClientConfig>>,
        ) -> Self {
            Self {
                tcp: TcpBackend::new(options),
                server,
                client,
            }
        }
    }

    fn pipe(
        stream: TlsStream<TcpStream>,
        remote_addr: Option<SocketAddr>,
    ) -> Pipe<TlsReader, TlsWriter> {
        let (read, write) = tokio::io::split(stream);
        Pipe {
            reader: StreamFrameReader::new(read, HANDSHAKE_MAX_FRAME_SIZE),
            writer: StreamFrameWriter(write),
            remote_addr,
            metadata: Vec::new(),
        }
    }

    /// A TLS listener: accepts TCP; the TLS handshake runs in the connection's task.
    pub struct TcpTlsListener {
        tcp: TcpFrameListener,
        acceptor: TlsAcceptor,
    }

    impl std::fmt::Debug for TcpTlsListener {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TcpTlsListener")
                .field("tcp", &self.tcp)
                .finish_non_exhaustive()
        }
    }

    impl Listener for TcpTlsListener {
        type Reader = TlsReader;
        type Writer = TlsWriter;
        type Connecting = TlsConnecting;

        async fn accept(&mut self) -> io::Result<(TlsConnecting, Option<SocketAddr>)> {
            let (stream, remote) = self.tcp.accept_stream().await?;
            let acceptor = self.acceptor.clone();
            let first_byte = self.tcp.first_byte;
            // Lazy: nothing happens until the server has admitted it.
            let connecting = async move {
                super::first_bytes(&stream, first_byte).await?;
                let stream = acceptor.accept(stream).await?;
                Ok(pipe(TlsStream::Server(stream), Some(remote)))
            };
            Ok((Box::pin(connecting), Some(remote)))
        }

        fn set_first_byte_timeout(&mut self, timeout: std::time::Duration) {
            self.tcp.set_first_byte_timeout(timeout);
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.tcp.local_addr()
        }
    }

    impl Backend for TcpTlsBackend {
        type Reader = TlsReader;
        type Writer = TlsWriter;
        type Listener = TcpTlsListener;

        fn name(&self) -> &'static str {
            "tcp+tls"
        }

        async fn bind(&self, addr: &str) -> Result<TcpTlsListener, TransportError> {
            let config = self.server.clone().ok_or_else(|| {
                TransportError::Config("a TLS server needs a server certificate".into())
            })?;
            Ok(TcpTlsListener {
                tcp: self.tcp.bind(addr).await?,
                acceptor: TlsAcceptor::from(config),
            })
        }

        async fn dial(&self, addr: &str) -> Result<Pipe<TlsReader, TlsWriter>, TransportError> {
            let config = self.client.clone().ok_or_else(|| {
                TransportError::Config("a TLS client needs a trust configuration".into())
            })?;
            let tcp = self.tcp.dial_stream(addr).await?;
            let remote = tcp.peer_addr().ok();
            let stream = connect(config, addr, tcp).await?;
            Ok(pipe(TlsStream::Client(stream), remote))
        }
    }

    /// The client side of TLS over `tcp`, dialled as `addr` (`host:port`,
    /// whose host the server's certificate must name).
    pub(crate) async fn connect(
        config: Arc<rustls::ClientConfig>,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TransportError> {
        let name = crate::tls::server_name_for(addr)
            .map_err(|err| TransportError::Config(err.to_string()))?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| TransportError::Tls {
                addr: addr.to_owned(),
                source,
            })
    }
}
