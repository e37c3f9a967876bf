//! Admission of gRPC connections before any TLS or HTTP/2 work: a
//! connection cap, a per-prefix share of the connections that have not
//! opened their stream yet, and a deadline for opening it.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{AddressCheck, grpc::GrpcOptions};
use crate::admission::{PendingHandshakes, PendingSlot, Prefix};

/// What the listener admits connections by.
pub(crate) struct Admission {
    connections: Arc<tokio::sync::Semaphore>,
    pending: Arc<PendingHandshakes>,
    deadline: Duration,
    /// The server's rate limit, once the server has set it: charged for
    /// failed or timed-out TLS handshakes and connections that open no
    /// stream in time.
    pub(crate) address_check: Option<Arc<std::sync::OnceLock<AddressCheck>>>,
    /// Whether a throttled address is refused here (else by the server).
    pub(crate) refuses_throttled: bool,
}

impl Admission {
    pub(crate) fn new(options: &GrpcOptions) -> Self {
        Self {
            connections: Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1))),
            pending: PendingHandshakes::new(
                options.max_pending_connections,
                options.max_pending_connections_per_prefix,
            ),
            deadline: options.stream_deadline,
            address_check: None,
            refuses_throttled: true,
        }
    }
}

/// Accepts TCP (and TLS) connections concurrently and hands them to tonic,
/// so one slow TLS handshake never delays the others. Admission comes
/// first: the connection cap, and a pending slot for the address prefix;
/// a connection refused either is closed before any TLS or HTTP/2 work.
pub(crate) fn incoming<IO, F, Fut>(
    listener: tokio::net::TcpListener,
    nodelay: bool,
    shutdown: CancellationToken,
    admission: Admission,
    upgrade: F,
) -> ReceiverStream<io::Result<AdmittedIo<IO>>>
where
    IO: Send + 'static,
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let upgrade = Arc::new(upgrade);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote_addr)) => {
                    let check = admission
                        .address_check
                        .as_ref()
                        .and_then(|c| c.get())
                        .cloned();
                    let refuses = admission.refuses_throttled;
                    if check
                        .as_ref()
                        .is_some_and(|check| refuses && !check.admits(remote_addr.ip()))
                    {
                        info!(%remote_addr, "gRPC connection refused before its TLS handshake: throttled");
                        continue;
                    }
                    let Ok(permit) = admission.connections.clone().try_acquire_owned() else {
                        debug!(%remote_addr, "gRPC connection refused: connection cap reached");
                        continue;
                    };
                    let slot = match admission.pending.acquire(Prefix::of(remote_addr.ip())) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            debug!(%remote_addr, ?refusal, "gRPC connection refused: too many pending");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(nodelay);
                    let deadline = crate::deadline::deadline_after(admission.deadline);
                    let (tx, upgrade) = (tx.clone(), upgrade.clone());
                    tokio::spawn(async move {
                        let evicted = slot.evicted_token();
                        let io = tokio::select! {
                            () = evicted.cancelled() => {
                                debug!(%remote_addr, "gRPC connection displaced before its TLS handshake ended");
                                return;
                            }
                            io = tokio::time::timeout_at(deadline, upgrade(stream)) => io,
                        };
                        let failed = match io {
                            Ok(Ok(io)) => {
                                let admitted =
                                    AdmittedIo::new(io, remote_addr, slot, permit, deadline, check);
                                let _ = tx.send(Ok(admitted)).await;
                                return;
                            }
                            Ok(Err(err)) => err.to_string(),
                            Err(_) => "timed out".to_owned(),
                        };
                        warn!(%remote_addr, error = %failed, "gRPC TLS handshake failed");
                        if let Some(check) = check {
                            check.charge(remote_addr.ip());
                        }
                    });
                }
                Err(err) => {
                    warn!(error = %err, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Set once a connection opens its stream; until then it holds a pending
/// slot and is under the stream deadline.
#[derive(Debug)]
pub(crate) struct StreamGate {
    opened: std::sync::atomic::AtomicBool,
    slot: std::sync::Mutex<Option<PendingSlot>>,
}

impl StreamGate {
    pub(crate) fn opened(&self) {
        self.opened
            .store(true, std::sync::atomic::Ordering::Release);
        let slot = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(slot);
    }

    fn is_open(&self) -> bool {
        self.opened.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What the service learns of its connection (tonic puts it in each
/// request's extensions).
#[derive(Debug, Clone)]
pub(crate) struct AdmittedInfo {
    pub(crate) remote_addr: SocketAddr,
    pub(crate) gate: Arc<StreamGate>,
}

/// A connection tonic serves: holds its place under the connection cap and,
/// until its stream opens, fails its reads once the stream deadline passes
/// or a newcomer displaces it, which makes tonic close it.
pub(crate) struct AdmittedIo<IO> {
    io: IO,
    info: AdmittedInfo,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    evicted: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Charged once if the stream deadline passes; taken when it is.
    charge: Option<AddressCheck>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<IO> AdmittedIo<IO> {
    fn new(
        io: IO,
        remote_addr: SocketAddr,
        slot: PendingSlot,
        permit: tokio::sync::OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
        charge: Option<AddressCheck>,
    ) -> Self {
        let evicted = Box::pin(slot.evicted_token().cancelled_owned());
        Self {
            io,
            info: AdmittedInfo {
                remote_addr,
                gate: Arc::new(StreamGate {
                    opened: Default::default(),
                    slot: std::sync::Mutex::new(Some(slot)),
                }),
            },
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            evicted,
            charge,
            _permit: permit,
        }
    }
}

impl<IO> tonic::transport::server::Connected for AdmittedIo<IO> {
    type ConnectInfo = AdmittedInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AdmittedIo<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.info.gate.is_open() {
            let expired = this.deadline.as_mut().poll(cx).is_ready();
            if expired || this.evicted.as_mut().poll(cx).is_ready() {
                let why = if expired {
                    "no gRPC stream opened before the deadline"
                } else {
                    "displaced by a newer connection"
                };
                debug!(remote_addr = %this.info.remote_addr, why, "closing gRPC connection");
                // Silence is the peer's doing; displacement is not.
                if let Some(check) = this.charge.take().filter(|_| expired) {
                    check.charge(this.info.remote_addr.ip());
                }
                return std::task::Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AdmittedIo<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
