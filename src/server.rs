//! The server, generic over the back-end: accept loop, admission (rate limit,
//! connection and handshake caps), one task per connection, broadcast.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    admission::{
        Attempt, PendingHandshakes, PendingRefusal, PendingSlot, Prefix, RateLimiter, refuse_early,
    },
    backend::{Backend, Listener, Pipe},
    config::{ServerAuth, ServerConfig},
    error::{CodecError, DisconnectReason, TransportError},
    handshake::{SequenceFloors, ServerHandshake, ServerHandshakeConfig},
    manager::{BroadcastReport, ConnectionManager},
    metrics::Metrics,
    proto::Message,
    session::{
        self, ConnectionInfo, Handler, HandlerSlot, SessionContext, SessionSetup,
        broadcast::{BroadcastLog, BroadcastSealer},
        send_disconnect, server_handshake, signing_state,
    },
    signed::SequenceCounter,
};

mod trust;
mod unicast;

use trust::{close_if_no_longer_trusted, log_trust_modes, watch_trust};

/// `sender_id` of the server's broadcasts, as in Go.
pub const PUBLISHER_SENDER_ID: &str = "publisher";

/// A server over back-end `B`. Cheap to clone; clones share the server.
pub struct TransportServer<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for TransportServer<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B: Backend> {
    backend: B,
    config: ServerConfig,
    auth: Option<ServerAuth>,
    handshake: Option<ServerHandshake>,
    manager: ConnectionManager,
    context: Arc<SessionContext>,
    broadcasts: Arc<SequenceCounter>,
    /// Seals signed broadcasts; `None` without a signing key.
    broadcast_log: Option<BroadcastLog>,
    next_id: AtomicU64,
    rate_limiter: Option<Arc<RateLimiter>>,
    handshakes: Arc<PendingHandshakes>,
    running: Mutex<Option<Running>>,
}

struct Running {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl<B: Backend> TransportServer<B> {
    /// A server; `auth: None` runs Go's auth-disabled mode (no handshake).
    pub fn new(backend: B, config: ServerConfig, auth: Option<ServerAuth>) -> Self {
        let handshake = auth.as_ref().map(|auth| {
            let mut hs = ServerHandshakeConfig::new(auth.trust.clone(), auth.key.clone());
            hs.signed_frames = auth.signed_frames;
            hs.delivery_acks = auth.delivery_acks;
            hs.backend = auth.backend;
            hs.max_clock_skew = auth.max_clock_skew;
            ServerHandshake::new(hs)
        });
        let broadcasts = Arc::new(SequenceCounter::from_clock(SystemTime::now()));
        let broadcast_log = auth.as_ref().and_then(|auth| {
            Some(BroadcastLog::new(BroadcastSealer {
                key: auth.key.clone()?,
                backend: auth.backend,
                sequence: broadcasts.clone(),
                max_frame_size: config.max_message_size,
            }))
        });
        let metrics = Metrics::new("server");
        let context = SessionContext::new(
            config.session(),
            Arc::new(HandlerSlot::default()),
            metrics.clone(),
            session::write_buffer_pool(&metrics),
            Some(crate::stream::ReadBudget::new(config.read_budget)),
        );
        let inner = Arc::new(Inner {
            backend,
            rate_limiter: config
                .rate_limit
                .map(|limit| Arc::new(RateLimiter::new(limit))),
            handshakes: PendingHandshakes::new(
                config.max_pending_handshakes,
                config.max_pending_handshakes_per_prefix,
            ),
            config,
            auth,
            handshake,
            manager: ConnectionManager::new(),
            context,
            broadcasts,
            broadcast_log,
            next_id: AtomicU64::new(1),
            running: Mutex::new(None),
        });
        // Queue depth is sampled at scrape time: free on the send path.
        let weak = Arc::downgrade(&inner);
        inner.context.metrics.add_probe(move || {
            if let Some(inner) = weak.upgrade() {
                let depth: usize = inner
                    .manager
                    .snapshot(None)
                    .iter()
                    .map(|c| c.queued())
                    .sum();
                inner.context.metrics.send_queue_depth.set(depth as i64);
            }
        });
        Self { inner }
    }

    /// The back-end's name.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// This server's metrics (its own registry).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.context.metrics
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The live connections.
    pub fn manager(&self) -> &ConnectionManager {
        &self.inner.manager
    }

    /// The trust store, for live changes (`None` without authentication).
    pub fn trust(&self) -> Option<&Arc<crate::TrustStore>> {
        self.inner.auth.as_ref().map(|auth| &auth.trust)
    }

    /// Listens on `addr` and serves until [`stop`](Self::stop). Returns the
    /// bound address (the real port when `addr` asks for port 0).
    pub async fn listen(&self, addr: &str) -> Result<SocketAddr, TransportError> {
        if self.local_addr().is_some() {
            return Err(TransportError::AlreadyRunning);
        }
        self.inner.config.validate()?;
        if let Some(auth) = &self.inner.auth {
            auth.validate()?;
        }
        let mut listener = self.inner.backend.bind(addr).await?;
        if self.inner.auth.is_some() {
            // A client always speaks first when authenticating.
            listener.set_first_byte_timeout(self.inner.config.first_byte_timeout);
            if let Some(limiter) = self.inner.rate_limiter.clone() {
                let charged = limiter.clone();
                let check =
                    crate::backend::AddressCheck::new(move |ip| limiter.admits(Prefix::of(ip)))
                        .with_charge(move |ip| {
                            charged.charge(Prefix::of(ip));
                        });
                listener.set_address_check(check);
            }
        }
        let local_addr = listener.local_addr().map_err(|source| TransportError::Io {
            op: "bind",
            addr: addr.to_owned(),
            source,
        })?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        {
            let mut running = self
                .inner
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if running.is_some() {
                return Err(TransportError::AlreadyRunning);
            }
            *running = Some(Running {
                local_addr,
                shutdown: shutdown.clone(),
                tasks: tasks.clone(),
            });
        }
        info!(
            backend = self.inner.backend.name(),
            %local_addr,
            auth = self.inner.auth.is_some(),
            "listening"
        );
        // Tracked, so that `stop` also waits for the listener to be dropped:
        // otherwise the port can still be bound when `stop` returns, and a
        // restart on the same address fails with "address in use".
        tasks.spawn(accept_loop(
            self.inner.clone(),
            listener,
            shutdown.clone(),
            tasks.clone(),
        ));
        if let Some(auth) = &self.inner.auth {
            log_trust_modes(auth);
            let changes = auth.trust.changes();
            tasks.spawn(watch_trust(self.inner.clone(), changes, shutdown.clone()));
        }
        Ok(local_addr)
    }

    /// Listens on the configured `listen_addr`.
    pub async fn start(&self) -> Result<SocketAddr, TransportError> {
        let addr = self.inner.config.listen_addr.clone();
        self.listen(&addr).await
    }

    /// The bound address while running.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|running| running.local_addr)
    }

    /// Stops accepting, sends every peer `Disconnect{REQUESTED}`, and waits up
    /// to the configured stop timeout for them to go; stragglers are cut.
    pub async fn stop(&self) -> Result<(), TransportError> {
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(TransportError::NotRunning)?;
        running.shutdown.cancel();
        for connection in self.inner.manager.snapshot(None) {
            connection.close(DisconnectReason::Requested, "server shutting down");
        }
        running.tasks.close();
        if tokio::time::timeout(self.inner.config.stop_timeout, running.tasks.wait())
            .await
            .is_err()
        {
            warn!("stop timeout: closing the remaining connections");
            for connection in self.inner.manager.snapshot(None) {
                connection.abort(DisconnectReason::Requested, "server shutting down");
            }
            let _ =
                tokio::time::timeout(self.inner.config.disconnect_timeout, running.tasks.wait())
                    .await;
        }
        info!("stopped");
        Ok(())
    }

    /// Sets the handler of inbound messages (replacing any previous one).
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        self.inner.context.handler.set(handler);
    }

    /// Sends `message` to every peer except `exclude`. It is encoded once for
    /// all peers without signed frames, and once for all signed-frame peers,
    /// into a batch that the first of their writers seals: broadcasts made
    /// while the writers are busy share one frame and one signature. Each
    /// peer still gets its messages in the order they were sent. Never waits
    /// on a slow peer: a peer whose queue is full is disconnected and listed
    /// as dropped.
    pub fn broadcast(
        &self,
        mut message: Message,
        exclude: Option<&str>,
    ) -> Result<BroadcastReport, TransportError> {
        let started = Instant::now();
        message.sender_id = PUBLISHER_SENDER_ID.to_owned();
        // The recipients are fixed before any sequence number is drawn (it is
        // drawn when the batch is sealed): every recipient's handshake
        // announced a floor at or below it (docs/PROTOCOL.md §4.3).
        let everyone = self.inner.manager.everyone();
        let report = session::broadcast::broadcast(
            self.inner.broadcast_log.as_ref(),
            &everyone,
            exclude,
            &message,
            self.inner.config.max_message_size,
        )?;
        let recipients = report.delivered.len() + report.dropped.len();
        (self.inner.context.metrics).broadcast(recipients, started.elapsed());
        debug!(
            recipients,
            dropped = report.dropped.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "broadcast"
        );
        for dropped in &report.dropped {
            warn!(peer = %dropped.identity, reason = %dropped.reason, "broadcast dropped peer");
        }
        Ok(report)
    }

    /// Metadata and counters of every live connection.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.inner.manager.infos()
    }
}

async fn accept_loop<B: Backend>(
    inner: Arc<Inner<B>>,
    mut listener: B::Listener,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((connecting, remote_addr)) => {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("connection", id, remote = ?remote_addr);
                let serving =
                    serve::<B>(inner.clone(), id, connecting, remote_addr, shutdown.clone());
                tasks.spawn(serving.instrument(span));
            }
            Err(err) if B::Listener::is_fatal(&err) => {
                error!(error = %err, "listener failed; no longer accepting");
                return;
            }
            Err(err) => {
                // Typically EMFILE or a connection reset before accept: back
                // off briefly rather than spin.
                warn!(error = %err, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// Runs `work` unless the connection's pending slot is displaced by a
/// newcomer or the server stops first (then `None`). Neither is the peer's
/// doing, so its attempt is not charged for it.
async fn while_pending<T>(
    slot: &PendingSlot,
    shutdown: &CancellationToken,
    charge: Option<&mut Attempt>,
    metrics: &Metrics,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        () = slot.evicted() => {
            info!("pending connection displaced by a newcomer");
            metrics.connection("displaced");
        }
        () = shutdown.cancelled() => debug!("pending connection closed: server shutting down"),
        done = work => return Some(done),
    }
    if let Some(charge) = charge {
        charge.disarm();
    }
    None
}

/// Admits, authenticates and runs one connection.
async fn serve<B: Backend>(
    inner: Arc<Inner<B>>,
    id: u64,
    connecting: <B::Listener as Listener>::Connecting,
    remote_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
) {
    let config = &inner.config;
    let metrics = &inner.context.metrics;
    metrics.connection("accepted");
    // Admission comes first, before any work on the peer's behalf: the
    // transport's handshake (TLS, QUIC) only starts once it is admitted.
    let prefix = Prefix::of(remote_addr.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip()));
    let authenticating = inner.handshake.is_some();
    if let Some(limiter) = &inner.rate_limiter {
        // With authentication only failures are charged (below).
        let admitted = if authenticating {
            limiter.admits(prefix)
        } else {
            limiter.charge(prefix)
        };
        if !admitted {
            let details = "connection rate limit";
            let reason = DisconnectReason::Throttled;
            return Box::pin(refuse_early::<B::Listener>(
                connecting,
                authenticating,
                metrics,
                config,
                reason,
                details,
            ))
            .await;
        }
    }
    let slot = match inner.handshakes.acquire(prefix) {
        Ok(slot) => slot,
        Err(refusal) => {
            let details = match refusal {
                PendingRefusal::PrefixFull => "too many pending handshakes from this address",
                PendingRefusal::PoolFull => "too many pending handshakes",
            };
            let reason = DisconnectReason::TooManyPeers;
            return Box::pin(refuse_early::<B::Listener>(
                connecting,
                authenticating,
                metrics,
                config,
                reason,
                details,
            ))
            .await;
        }
    };
    // One deadline for the transport's handshake and ours.
    let deadline = crate::deadline::deadline_after(config.handshake_timeout);
    // With authentication, the attempt waits while the prefix's attempts in
    // flight claim every token, so concurrent failures cannot outrun it.
    let mut charge = match inner.rate_limiter.as_ref().filter(|_| authenticating) {
        None => Attempt::unlimited(),
        Some(limiter) => {
            let waiting = tokio::time::timeout_at(deadline, limiter.attempt(prefix));
            let Some(attempt) = while_pending(&slot, &shutdown, None, metrics, waiting).await
            else {
                return;
            };
            match attempt {
                Ok(Some(attempt)) => attempt,
                _ => {
                    drop(slot);
                    let (reason, details) = (DisconnectReason::Throttled, "connection rate limit");
                    return Box::pin(refuse_early::<B::Listener>(
                        connecting,
                        authenticating,
                        metrics,
                        config,
                        reason,
                        details,
                    ))
                    .await;
                }
            }
        }
    };
    // Boxed, as the handshake below and the refusals are: each runs once,
    // and inline they would widen the state this task keeps while the
    // session lasts.
    let establishing = Box::pin(tokio::time::timeout_at(deadline, connecting));
    let Some(established) =
        while_pending(&slot, &shutdown, Some(&mut charge), metrics, establishing).await
    else {
        return;
    };
    let pipe = match established {
        Ok(Ok(pipe)) => pipe,
        Ok(Err(err)) => {
            warn!(error = %err, "transport handshake failed");
            metrics.connection("transport_failed");
            return;
        }
        Err(_) => {
            warn!("transport handshake timed out");
            metrics.connection("transport_failed");
            return;
        }
    };
    let Pipe {
        mut reader,
        mut writer,
        remote_addr: pipe_addr,
        metadata: pipe_metadata,
    } = pipe;
    let remote_addr = pipe_addr.or(remote_addr);
    // With authentication the limit is applied once the identity is known, so
    // a peer reconnecting at capacity replaces its old session.
    let mut slot = Some(slot);
    if !authenticating {
        slot = None;
        if inner.manager.len() >= config.max_connections {
            let (reason, details) = (DisconnectReason::TooManyPeers, "connection limit reached");
            info!(%reason, details, "connection refused");
            metrics.connection(&format!("refused_{reason}"));
            Box::pin(send_disconnect(
                &mut writer,
                reason,
                details,
                config.disconnect_timeout,
            ))
            .await;
            return;
        }
    }

    let (setup, response) = match &inner.handshake {
        None => (
            SessionSetup {
                identity: Arc::from(id.to_string()),
                client_id: None,
                session_id: None,
                remote_addr,
                signer: None,
                opener: None,
                sender_id: None,
                peer_key: None,
                delivery_acks: false,
                requests: false,
                go_mode: false,
                chain_id: None,
                metadata: pipe_metadata,
                first_frame: None,
            },
            None,
        ),
        Some(handshake) => {
            let Some(slot) = slot else { return };
            let unicast = SequenceCounter::from_clock(SystemTime::now());
            let floors = SequenceFloors {
                unicast: unicast.floor(),
                broadcast: Some(inner.broadcasts.floor()),
            };
            let exchange = Box::pin(server_handshake(
                &mut reader,
                &mut writer,
                handshake,
                floors,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
                config.disconnect_timeout,
            ));
            let Some(outcome) =
                while_pending(&slot, &shutdown, Some(&mut charge), metrics, exchange).await
            else {
                return;
            };
            drop(slot);
            let (client, response) = match outcome {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Charged before it is counted, so the count says the
                    // charge is done.
                    drop(charge);
                    let reason = match &err {
                        TransportError::Handshake(err) => err.kind(),
                        TransportError::Codec(CodecError::Io(_)) => "io",
                        TransportError::Codec(_) => "malformed",
                        _ => "other",
                    };
                    warn!(error = %err, reason, "handshake failed");
                    metrics.handshake("rejected", reason);
                    metrics.connection("handshake_failed");
                    if reason == "replayed" {
                        metrics.replay_refusals_total.inc();
                    }
                    return;
                }
            };
            // Authenticated: free of charge, and its place goes to the next.
            charge.disarm();
            drop(charge);
            // The identity is known now: a peer replacing its own session is
            // always let in; anyone else only below the connection limit.
            if inner.manager.get(&client.identity).is_none()
                && inner.manager.len() >= config.max_connections
            {
                info!(identity = %client.identity, "connection refused: connection limit reached");
                metrics.connection("refused_too_many_peers");
                Box::pin(session::refuse_after_handshake(
                    &mut writer,
                    DisconnectReason::TooManyPeers,
                    "connection limit reached",
                    "connection limit reached",
                    config.disconnect_timeout,
                ))
                .await;
                return;
            }
            metrics.handshake("accepted", if client.extended { "extended" } else { "go" });
            info!(
                identity = %client.identity,
                client_id = %crate::log_safe(&client.client_id),
                extended = client.extended,
                signed_frames = client.signed_frames.is_some(),
                "handshake accepted"
            );
            let auth = inner.auth.as_ref().expect("a handshake implies auth");
            let (signer, opener) = signing_state(
                client.signed_frames.as_ref(),
                auth.key.as_ref(),
                None,
                Some(unicast),
                auth.backend,
            );
            let setup = SessionSetup {
                identity: Arc::from(client.identity),
                client_id: Some(client.client_id),
                session_id: Some(client.session_id),
                remote_addr,
                signer,
                opener,
                sender_id: None,
                peer_key: Some(client.public_key.clone()),
                delivery_acks: client.delivery_acks,
                requests: client.requests,
                go_mode: !client.extended,
                chain_id: client.chain_id,
                metadata: pipe_metadata,
                first_frame: None,
            };
            (setup, Some(response))
        }
    };

    let setup = SessionSetup {
        first_frame: response,
        ..setup
    };
    let (connection, task) =
        session::start_session(id, reader, writer, setup, inner.context.clone());
    let replaces = inner.manager.get(connection.identity()).is_some();
    if !replaces && inner.manager.len() >= config.max_connections {
        connection.close(DisconnectReason::TooManyPeers, "connection limit reached");
    } else {
        #[cfg(test)]
        crate::admission::tests::before_register(connection.identity());
        if let Some(old) = inner.manager.insert(connection.clone()) {
            info!(
                old_id = old.id(),
                "replaced an older connection of the same identity"
            );
        }
        // A trust change between the handshake's check and the insert was
        // not seen by `watch_trust` (it only looks at registered
        // connections): look again now that this one is registered.
        if let Some(auth) = &inner.auth {
            close_if_no_longer_trusted(auth, &connection);
        }
        // `stop` cancels before it closes the registered connections: one
        // registered after its look is closed here.
        if shutdown.is_cancelled() && !connection.is_closed() {
            connection.close(DisconnectReason::Requested, "server shutting down");
        }
    }
    let _ = task.await;
    inner.manager.remove(&connection);
}
