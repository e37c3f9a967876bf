//! The frame pipe over one gRPC stream: frame bodies in, batches of frame
//! bodies out, and the status that ends a server stream.

use std::{collections::VecDeque, io, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{
    Code, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
};

use super::{DISCONNECT_DETAILS_TRAILER, DISCONNECT_REASON_TRAILER};
use crate::{
    backend::{grpc_codec, grpc_inbound::InboundLimits},
    codec,
    error::{CodecError, DisconnectReason},
    pipe::{FrameBatch as Frames, FrameReader, FrameWriter, WRITE_COALESCE_BYTES, frame_bodies},
    proto::transport::v1::FrameBatch,
};

/// Reads frame bodies from the items of a gRPC stream.
pub struct GrpcReader {
    /// `None` once handed to the drain on drop.
    pub(super) stream: Option<Streaming<FrameBatch>>,
    pub(super) pending: VecDeque<Bytes>,
    pub(super) max_frame_size: usize,
    /// Server side: the limits the request body applies as items arrive.
    pub(super) limits: Option<Arc<InboundLimits>>,
    /// Client side: drain the response rather than reset it when dropped.
    pub(super) drain_on_drop: bool,
    /// Server side: keeps the client's metadata on record while the stream lives.
    pub(super) _metadata: Option<super::metadata::MetadataEntry>,
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

    /// The frames of the next stream item, taken as one batch: the session
    /// then does its per-read work (clock, metrics, acknowledgements) once
    /// per item rather than once per frame, and hands the handler the
    /// item's messages together.
    async fn read_batch(&mut self) -> Option<Result<Frames, CodecError>> {
        loop {
            if !self.pending.is_empty() {
                // Left over when an item held a frame over the limit: the
                // frames before it go first, then `read_frame` reports it.
                let fit = accepted(&self.pending, self.max_frame_size);
                if fit == 0 {
                    return Some(self.read_frame().await?.map(Frames::one));
                }
                return Some(Ok(Frames::from_bodies(self.pending.drain(..fit).collect())));
            }
            match self.stream.as_mut()?.next().await? {
                Ok(item) => {
                    let frames = item.frames.len();
                    if frames > 0 && accepted(&item.frames, self.max_frame_size) == frames {
                        // The decoded item's vector carries the batch.
                        return Some(Ok(Frames::from_bodies(item.frames)));
                    }
                    self.pending.extend(item.frames);
                }
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

/// How many of `frames`, from the first, the length check accepts.
fn accepted<'a>(frames: impl IntoIterator<Item = &'a Bytes>, max: usize) -> usize {
    frames
        .into_iter()
        .take_while(|frame| codec::check_frame_len(frame.len(), max).is_ok())
        .count()
}

pub(super) fn status_to_io(status: &Status) -> io::Error {
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
pub(super) enum Outlet {
    Server(mpsc::Sender<Result<FrameBatch, Status>>),
    Client(Option<mpsc::Sender<FrameBatch>>),
}

/// Writes frames as items of a gRPC stream: one item per coalesced write.
#[derive(Debug)]
pub struct GrpcWriter {
    pub(super) outlet: Outlet,
}

impl FrameWriter for GrpcWriter {
    async fn write_segments(&mut self, segments: &[Bytes]) -> io::Result<()> {
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "gRPC stream closed");
        // One item per coalesced write's worth of frames (the peer's item
        // limit allows one largest frame plus that much).
        let mut frames = Vec::new();
        let mut size = 0;
        let mut bodies = frame_bodies(segments)?.into_iter().peekable();
        while let Some(body) = bodies.next() {
            size += body.len();
            frames.push(body);
            let full = bodies
                .peek()
                .is_some_and(|next| size + next.len() > WRITE_COALESCE_BYTES);
            if !full && bodies.peek().is_some() {
                continue;
            }
            let batch = FrameBatch {
                frames: std::mem::take(&mut frames),
            };
            size = 0;
            match &self.outlet {
                Outlet::Server(tx) => tx.send(Ok(batch)).await.map_err(|_| closed())?,
                Outlet::Client(Some(tx)) => tx.send(batch).await.map_err(|_| closed())?,
                Outlet::Client(None) => return Err(closed()),
            }
        }
        Ok(())
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
