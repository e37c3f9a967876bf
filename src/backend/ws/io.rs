//! The frame pipe over one WebSocket: tungstenite keeps the protocol state
//! and reads and writes memory only ([`Buffers`]); the halves here move the
//! bytes between that memory and the socket.
//!
//! Why not tungstenite's own async binding: the frame limit must follow the
//! session (16 KiB before authentication, the full size after), and only
//! [`WebSocket::set_config`] can change it on a live connection, which the
//! binding does not expose.

use std::{
    io::{self, Read, Write},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tungstenite::{
    Message, WebSocket,
    error::{CapacityError, Error as WsError, ProtocolError},
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
};

use crate::{
    codec,
    error::{CodecError, DisconnectReason},
    pipe::{FrameReader, FrameWriter, frame_bodies},
};

/// Any byte stream a WebSocket runs over: TCP, or TLS over TCP.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The socket of a WebSocket pipe.
pub(super) type WsStream = Box<dyn Io>;

/// Bytes read from the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// The settings tungstenite enforces: no message or frame beyond `max`, so
/// a peer's announced length is refused before anything is reserved for it.
pub(super) fn config(max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_CHUNK)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Bytes waiting to be written to the socket. Shared so that what a failed
/// upgrade wrote (an HTTP error response) outlives the handshake state.
#[derive(Debug, Clone, Default)]
pub(super) struct Outbox(Arc<Mutex<BytesMut>>);

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, BytesMut> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Everything queued so far.
    pub(super) fn take(&self) -> Bytes {
        self.lock().split().freeze()
    }
}

/// The in-memory stream tungstenite runs on: what was read from the socket,
/// and what is to be written to it. Reading an empty input blocks (until
/// the socket delivers more), or ends once the socket has.
#[derive(Debug, Default)]
pub(super) struct Buffers {
    pub(super) input: BytesMut,
    pub(super) eof: bool,
    pub(super) output: Outbox,
}

impl Read for Buffers {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl Write for Buffers {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads what the socket has into `chunk` (cancel-safe: bytes read stay
/// there); 0 at the end of the stream.
pub(super) async fn read_chunk(
    socket: &mut (impl AsyncRead + Unpin),
    chunk: &mut BytesMut,
) -> io::Result<usize> {
    chunk.reserve(READ_CHUNK);
    socket.read_buf(chunk).await
}

impl Buffers {
    /// Hands tungstenite what [`read_chunk`] read (`n` bytes, 0 at the end).
    pub(super) fn deliver(&mut self, chunk: &mut BytesMut, n: usize) {
        self.input.extend_from_slice(chunk);
        chunk.clear();
        if n == 0 {
            self.eof = true;
        }
    }
}

/// A tungstenite error as the session sees it.
pub(super) fn codec_error(err: WsError) -> CodecError {
    match err {
        WsError::Io(err) => CodecError::Io(err),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            CodecError::FrameTooLarge {
                size,
                max: max_size,
            }
        }
        other => CodecError::WebSocket {
            detail: other.to_string(),
        },
    }
}

/// A tungstenite error on the sending side.
pub(super) fn io_error(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::other(other.to_string()),
    }
}

/// What both halves share.
struct State {
    ws: WebSocket<Buffers>,
    /// Taken from the outbox, not yet all written: whoever writes next
    /// starts here, so a cancelled write never tears a WebSocket frame.
    in_flight: Bytes,
}

struct Core {
    state: Mutex<State>,
    socket: tokio::sync::Mutex<WriteHalf<WsStream>>,
}

impl Core {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_output(&self) -> bool {
        let mut state = self.state();
        !state.in_flight.is_empty() || !state.ws.get_mut().output.lock().is_empty()
    }

    /// Writes out what is queued, holding the socket's write side.
    async fn write_out(&self, socket: &mut WriteHalf<WsStream>) -> io::Result<()> {
        loop {
            let next = {
                let mut state = self.state();
                if state.in_flight.is_empty() {
                    state.in_flight = state.ws.get_mut().output.take();
                }
                state.in_flight.clone()
            };
            if next.is_empty() {
                return socket.flush().await;
            }
            let n = socket.write(&next).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.state().in_flight.advance(n);
        }
    }

    /// Writes out what is queued. A reader (answering a ping or a close)
    /// leaves it to a writer already at work rather than wait behind it;
    /// that writer looks again once it lets go.
    async fn drain(&self, wait: bool) -> io::Result<()> {
        loop {
            let mut socket = if wait {
                self.socket.lock().await
            } else {
                match self.socket.try_lock() {
                    Ok(socket) => socket,
                    Err(_) => return Ok(()),
                }
            };
            self.write_out(&mut socket).await?;
            drop(socket);
            if !self.has_output() {
                return Ok(());
            }
        }
    }
}

/// Reading half of a WebSocket pipe.
pub struct WsReader {
    core: Arc<Core>,
    socket: ReadHalf<WsStream>,
    chunk: BytesMut,
    max_frame_size: usize,
}

impl std::fmt::Debug for WsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsReader")
            .field("max_frame_size", &self.max_frame_size)
            .finish_non_exhaustive()
    }
}

/// Writing half of a WebSocket pipe.
pub struct WsWriter {
    core: Arc<Core>,
}

impl std::fmt::Debug for WsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsWriter").finish_non_exhaustive()
    }
}

/// The two halves of an upgraded connection; `max` is the frame limit
/// `ws` was configured with.
pub(super) fn halves(ws: WebSocket<Buffers>, socket: WsStream, max: usize) -> (WsReader, WsWriter) {
    let (read, write) = tokio::io::split(socket);
    let core = Arc::new(Core {
        state: Mutex::new(State {
            ws,
            in_flight: Bytes::new(),
        }),
        socket: tokio::sync::Mutex::new(write),
    });
    let reader = WsReader {
        core: core.clone(),
        socket: read,
        chunk: BytesMut::new(),
        max_frame_size: max,
    };
    (reader, WsWriter { core })
}

impl FrameReader for WsReader {
    async fn read_frame(&mut self) -> Option<Result<Bytes, CodecError>> {
        loop {
            let (read, replies) = {
                let mut state = self.core.state();
                let read = state.ws.read();
                let replies = !state.ws.get_mut().output.lock().is_empty();
                (read, replies)
            };
            // Pongs and the answer to a close, queued by tungstenite.
            if replies && let Err(err) = self.core.drain(false).await {
                return Some(Err(CodecError::Io(err)));
            }
            match read {
                Ok(Message::Binary(body)) => {
                    return Some(
                        codec::check_frame_len(body.len(), self.max_frame_size).map(|()| body),
                    );
                }
                Ok(Message::Text(_)) => {
                    return Some(Err(CodecError::WebSocket {
                        detail: "text message (frames travel in binary messages)".into(),
                    }));
                }
                // A close ends the stream; tungstenite has queued its answer.
                Ok(Message::Close(_)) => return None,
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(WsError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                    // Read outside the lock: it may wait for long.
                    match read_chunk(&mut self.socket, &mut self.chunk).await {
                        Ok(n) => self.core.state().ws.get_mut().deliver(&mut self.chunk, n),
                        Err(err) => return Some(Err(CodecError::Io(err))),
                    }
                }
                // The peer closed (or dropped) the connection between
                // messages, or a close was already seen.
                Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                ) => return None,
                Err(err) => return Some(Err(codec_error(err))),
            }
        }
    }

    fn set_max_frame_size(&mut self, max: usize) {
        self.max_frame_size = max;
        self.core.state().ws.set_config(|config| {
            config.max_message_size = Some(max);
            config.max_frame_size = Some(max);
        });
    }
}

impl FrameWriter for WsWriter {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        let bodies = frame_bodies(segments)?;
        {
            let mut state = self.core.state();
            for body in bodies {
                // Buffered in memory: the socket is written once below.
                state.ws.write(Message::Binary(body)).map_err(io_error)?;
            }
            state.ws.flush().map_err(io_error)?;
        }
        self.core.drain(true).await
    }

    async fn shutdown(&mut self, reason: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: match reason {
                Some((reason, _)) => reason.as_str().into(),
                None => "".into(),
            },
        };
        // Already closed (the peer's close answered): nothing to add.
        let _ = self.core.state().ws.close(Some(close));
        self.core.drain(true).await?;
        self.core.socket.lock().await.shutdown().await
    }
}
