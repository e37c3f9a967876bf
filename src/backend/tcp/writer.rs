//! The writing half of a TCP pipe, shared between the session's writer task
//! and its direct writes.

use std::{
    io::{self, IoSlice},
    net::Shutdown,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use socket2::SockRef;
use tokio::{
    io::AsyncWrite,
    net::{TcpStream, tcp::OwnedWriteHalf},
};

use crate::{
    error::DisconnectReason,
    pipe::{DirectWrite, FrameWriter},
    stream::StreamFrameWriter,
};

/// Writing half of a TCP pipe. It offers direct writes
/// ([`FrameWriter::direct`]): a reply on an idle connection is written by
/// the task that sends it.
#[derive(Debug)]
pub struct TcpWriter(StreamFrameWriter<SharedHalf>);

impl TcpWriter {
    pub(super) fn new(half: OwnedWriteHalf) -> Self {
        Self(StreamFrameWriter(SharedHalf(Arc::new(half))))
    }
}

impl FrameWriter for TcpWriter {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        self.0.write_segments(segments).await
    }

    async fn shutdown(&mut self, reason: Option<(DisconnectReason, &str)>) -> io::Result<()> {
        self.0.shutdown(reason).await
    }

    fn direct(&self) -> Option<Arc<dyn DirectWrite>> {
        Some(self.0.0.0.clone())
    }

    fn prefers_long_segments(&self) -> bool {
        self.0.prefers_long_segments()
    }
}

impl DirectWrite for OwnedWriteHalf {
    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        OwnedWriteHalf::try_write(self, data)
    }
}

/// The write half behind an `Arc`: the writer task waits for the socket to
/// take more, direct writes only try. Both go through the socket's own
/// readiness, so neither misses a wake-up.
#[derive(Debug)]
struct SharedHalf(Arc<OwnedWriteHalf>);

impl SharedHalf {
    fn stream(&self) -> &TcpStream {
        (*self.0).as_ref()
    }

    fn poll_with(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let stream = self.stream();
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match write(stream) {
                // Readiness was stale; trying cleared it, so the next poll waits.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for SharedHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_with(cx, |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_with(cx, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The half may still be shared with a direct-write handle: shut the
        // socket's sending side down explicitly rather than on the last drop.
        let result = SockRef::from(self.stream()).shutdown(Shutdown::Write);
        Poll::Ready(match result {
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
            result => result,
        })
    }
}
