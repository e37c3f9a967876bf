//! What a gRPC peer's request stream may make the server buffer.
//!
//! tonic checks an item's announced length against one limit fixed for the
//! service, then reserves and buffers the whole item before decoding it. A
//! peer that has not authenticated yet must not get that far with more than
//! a handshake's worth of bytes, and large items must draw on the shared
//! [`ReadBudget`] as TCP frames do. So each request body is wrapped, before
//! tonic sees it, in [`LimitedBody`], which follows the gRPC framing (a
//! 5-byte header per item: a compression flag, then a big-endian length):
//! it refuses an item whose announced length exceeds the current limit as
//! soon as its header arrives, and passes on the bytes of items larger than
//! [`UNBUDGETED_FRAME_BYTES`] only once the budget covers them. The limit
//! and the budget are shared with the connection's frame reader, which
//! raises the limit once the peer is authenticated.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tonic::{Status, body::Body, codegen::http, server::NamedService};

use super::grpc_codec::refusal;
use crate::{
    codec::HANDSHAKE_MAX_FRAME_SIZE,
    error::CodecError,
    pipe::WRITE_COALESCE_BYTES,
    stream::{ReadBudget, UNBUDGETED_FRAME_BYTES},
};

/// Bytes of a gRPC item header.
const ITEM_HEADER_LEN: usize = 5;

/// Room in an item for the `FrameBatch` encoding around its frames.
const BATCH_OVERHEAD: usize = 1024;

/// The largest item a reader of frames of at most `max_frame_size` bytes
/// takes: one frame, and once past the handshake, a coalesced batch besides.
pub(crate) fn item_limit(max_frame_size: usize) -> usize {
    let batch = if max_frame_size > HANDSHAKE_MAX_FRAME_SIZE {
        WRITE_COALESCE_BYTES
    } else {
        0
    };
    max_frame_size
        .saturating_add(batch)
        .saturating_add(BATCH_OVERHEAD)
}

/// Limits shared by one request body and the frame reader of its stream.
#[derive(Debug)]
pub(crate) struct InboundLimits {
    max_item: AtomicUsize,
    budget: Mutex<Option<Arc<ReadBudget>>>,
}

impl InboundLimits {
    fn new(max_frame_size: usize) -> Self {
        Self {
            max_item: AtomicUsize::new(item_limit(max_frame_size)),
            budget: Mutex::new(None),
        }
    }

    /// Frames of up to `max` bytes from now on.
    pub(crate) fn set_max_frame_size(&self, max: usize) {
        self.max_item.store(item_limit(max), Ordering::Release);
    }

    /// Large items draw on `budget` from now on.
    pub(crate) fn set_read_budget(&self, budget: Arc<ReadBudget>) {
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget);
    }

    fn budget(&self) -> Option<Arc<ReadBudget>> {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Wraps a service so that every request body is a [`LimitedBody`] whose
/// [`InboundLimits`] ride in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct LimitInbound<S> {
    inner: S,
    initial_max_frame_size: usize,
}

impl<S> LimitInbound<S> {
    /// Items start limited to frames of `initial_max_frame_size` bytes.
    pub(crate) fn new(inner: S, initial_max_frame_size: usize) -> Self {
        Self {
            inner,
            initial_max_frame_size,
        }
    }
}

impl<S: NamedService> NamedService for LimitInbound<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for LimitInbound<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let limits = Arc::new(InboundLimits::new(self.initial_max_frame_size));
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(limits.clone());
        let body = Body::new(LimitedBody::new(body, limits));
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// Budget granted to a body: a share of it, or the overdraft.
enum Grant {
    Bytes(OwnedSemaphorePermit),
    Overdraft(OwnedSemaphorePermit),
}

type Acquiring = Pin<Box<dyn Future<Output = Result<Grant, AcquireError>> + Send>>;

/// A request body that refuses oversize items from their header and holds
/// back the bytes of large items until the read budget covers them.
pub(crate) struct LimitedBody {
    inner: Body,
    limits: Arc<InboundLimits>,
    header: [u8; ITEM_HEADER_LEN],
    header_len: usize,
    /// Bytes of the current item's body still to come.
    item_left: usize,
    /// Whether the current item draws on the budget.
    budgeted: bool,
    /// A chunk inspected and waiting for budget.
    waiting: Option<(Bytes, usize)>,
    acquiring: Option<Acquiring>,
    held: Option<OwnedSemaphorePermit>,
    overdraft: Option<OwnedSemaphorePermit>,
    refused: bool,
}

impl LimitedBody {
    fn new(inner: Body, limits: Arc<InboundLimits>) -> Self {
        Self {
            inner,
            limits,
            header: [0; ITEM_HEADER_LEN],
            header_len: 0,
            item_left: 0,
            budgeted: false,
            waiting: None,
            acquiring: None,
            held: None,
            overdraft: None,
            refused: false,
        }
    }

    /// Follows the item framing through `chunk`; returns how many of its
    /// bytes belong to budgeted items, or the refusal of an oversize item.
    fn inspect(&mut self, mut chunk: &[u8]) -> Result<usize, CodecError> {
        let mut budgeted = 0;
        while !chunk.is_empty() {
            if self.item_left > 0 {
                let n = self.item_left.min(chunk.len());
                if self.budgeted {
                    budgeted += n;
                }
                self.item_left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (ITEM_HEADER_LEN - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == ITEM_HEADER_LEN {
                self.header_len = 0;
                let len =
                    u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")) as usize;
                let max = self.limits.max_item.load(Ordering::Acquire);
                if len > max {
                    return Err(CodecError::FrameTooLarge { size: len, max });
                }
                self.item_left = len;
                self.budgeted = len > UNBUDGETED_FRAME_BYTES;
            }
        }
        Ok(budgeted)
    }

    /// Whether budget must still be taken so that `needed` more bytes are covered.
    fn shortfall(&self, budget: &ReadBudget, needed: usize) -> u32 {
        if self.overdraft.is_some() {
            return 0;
        }
        let held = self.held.as_ref().map_or(0, |permit| permit.num_permits());
        // Never more than the whole budget, or it would wait forever.
        needed
            .min(budget.total().saturating_sub(held))
            .min(UNBUDGETED_FRAME_BYTES) as u32
    }

    fn release_if_done(&mut self) {
        if self.item_left == 0 || !self.budgeted {
            self.held = None;
            self.overdraft = None;
        }
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if this.refused {
                return Poll::Ready(None);
            }
            if let Some(needed) = this.waiting.as_ref().map(|(_, needed)| *needed) {
                let budget = this.limits.budget();
                let short = budget
                    .as_deref()
                    .map_or(0, |budget| this.shortfall(budget, needed));
                if short == 0 {
                    let (chunk, _) = this.waiting.take().expect("a waiting chunk");
                    this.release_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                let budget = budget.expect("a budget when short of it");
                let acquiring = this.acquiring.get_or_insert_with(|| {
                    let under_way = this.held.is_some();
                    Box::pin(async move {
                        tokio::select! {
                            biased;
                            permit = budget.bytes().acquire_many_owned(short) => permit.map(Grant::Bytes),
                            permit = budget.overdraft().acquire_owned(), if under_way => {
                                permit.map(Grant::Overdraft)
                            }
                        }
                    })
                });
                let grant = ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                match grant {
                    Ok(Grant::Bytes(permit)) => {
                        if let Some((_, needed)) = &mut this.waiting {
                            *needed = needed.saturating_sub(permit.num_permits());
                        }
                        match &mut this.held {
                            Some(held) => held.merge(permit),
                            None => this.held = Some(permit),
                        }
                    }
                    Ok(Grant::Overdraft(permit)) => this.overdraft = Some(permit),
                    Err(_) => {
                        return Poll::Ready(Some(Err(Status::internal("read budget closed"))));
                    }
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let chunk = match frame.into_data() {
                Ok(chunk) => chunk,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            match this.inspect(&chunk) {
                Ok(0) => {
                    this.release_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Ok(budgeted) => this.waiting = Some((chunk, budgeted)),
                Err(err) => {
                    this.refused = true;
                    return Poll::Ready(Some(Err(refusal(err))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && (self.refused || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(len: usize) -> Vec<u8> {
        let mut item = vec![0];
        item.extend_from_slice(&(len as u32).to_be_bytes());
        item.resize(ITEM_HEADER_LEN + len, 7);
        item
    }

    #[test]
    fn oversize_items_are_refused_from_their_header() {
        let limits = Arc::new(InboundLimits::new(HANDSHAKE_MAX_FRAME_SIZE));
        let mut body = LimitedBody::new(Body::empty(), limits.clone());
        let max = item_limit(HANDSHAKE_MAX_FRAME_SIZE);
        // Header split across chunks, then a body split too.
        let small = item(max);
        assert_eq!(body.inspect(&small[..3]).unwrap(), 0);
        assert_eq!(body.inspect(&small[3..100]).unwrap(), 0);
        assert_eq!(body.inspect(&small[100..]).unwrap(), 0);
        let err = body.inspect(&item(9 * 1024 * 1024)[..5]).unwrap_err();
        assert!(
            matches!(err, CodecError::FrameTooLarge { size, max: m } if size == 9 * 1024 * 1024 && m == max),
            "{err:?}"
        );
        // Once authenticated, large items pass and are budgeted.
        limits.set_max_frame_size(10 * 1024 * 1024);
        let mut body = LimitedBody::new(Body::empty(), limits);
        let large = item(200_000);
        assert_eq!(
            body.inspect(&large[..1000]).unwrap(),
            1000 - ITEM_HEADER_LEN
        );
        assert_eq!(body.inspect(&large[1000..]).unwrap(), large.len() - 1000);
        assert_eq!(body.item_left, 0);
    }
}
