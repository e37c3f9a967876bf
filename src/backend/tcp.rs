//! Plain TCP: the Go package's transport.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{
    TcpListener, TcpStream,
    tcp::{OwnedReadHalf, OwnedWriteHalf},
};

use super::{Backend, Listener, Pipe};
use crate::{
    codec::HANDSHAKE_MAX_FRAME_SIZE,
    error::TransportError,
    session::{StreamFrameReader, StreamFrameWriter},
};

/// Socket options of the TCP back-end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TcpOptions {
    /// Disable Nagle's algorithm (Go: on). Writes are already coalesced.
    pub nodelay: bool,
    /// TCP keep-alive probe interval; `None` disables it (Go: 30 s).
    #[serde(with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// Listen backlog (Go: accept queue of 64).
    pub backlog: u32,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            nodelay: true,
            keep_alive: Some(Duration::from_secs(30)),
            backlog: 64,
        }
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

    fn pipe(&self, stream: TcpStream) -> io::Result<Pipe<TcpReader, TcpWriter>> {
        self.configure(&stream)?;
        let remote_addr = stream.peer_addr().ok();
        let (read, write) = stream.into_split();
        Ok(Pipe {
            // The handshake limit applies until the session raises it.
            reader: StreamFrameReader::new(read, HANDSHAKE_MAX_FRAME_SIZE),
            writer: StreamFrameWriter(write),
            remote_addr,
        })
    }
}

/// Reading half of a TCP pipe.
pub type TcpReader = StreamFrameReader<OwnedReadHalf>;
/// Writing half of a TCP pipe.
pub type TcpWriter = StreamFrameWriter<OwnedWriteHalf>;

/// A bound TCP listener.
#[derive(Debug)]
pub struct TcpFrameListener {
    listener: TcpListener,
    backend: TcpBackend,
}

impl Listener for TcpFrameListener {
    type Reader = TcpReader;
    type Writer = TcpWriter;

    async fn accept(&mut self) -> io::Result<Pipe<TcpReader, TcpWriter>> {
        let (stream, _) = self.listener.accept().await?;
        self.backend.pipe(stream)
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
        })
    }

    async fn dial(&self, addr: &str) -> Result<Pipe<TcpReader, TcpWriter>, TransportError> {
        let io_err = |source| TransportError::Io {
            op: "connect",
            addr: addr.to_owned(),
            source,
        };
        let stream = TcpStream::connect(addr).await.map_err(io_err)?;
        self.pipe(stream).map_err(io_err)
    }
}
