//! The client, generic over the back-end: connect (with retry), send,
//! automatic reconnect, connection-state events.

use std::{
    sync::{
        Arc, Mutex, PoisonError, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

mod sending;

use crate::{
    backend::{Backend, Pipe},
    config::{ClientAuth, ClientConfig},
    error::{DisconnectReason, TransportError},
    handshake::{ClientHandshake, ClientHandshakeConfig, NONCE_LEN},
    metrics::Metrics,
    pool::BufferPool,
    retry::RetryPolicy,
    session::{
        self, Connection, ConnectionInfo, Handler, HandlerSlot, SessionContext, SessionEnd,
        SessionSetup, client_handshake, signing_state,
    },
    signed::SequenceCounter,
};

/// A change of the client's connection state.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// A session is up.
    Connected {
        /// The server address.
        addr: String,
        /// The server's session id, when authenticated.
        session_id: Option<String>,
        /// Whether this came from the automatic reconnect.
        reconnect: bool,
    },
    /// The session ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
        /// Details for logs.
        details: String,
        /// Whether the server ended it.
        by_peer: bool,
    },
    /// An automatic reconnect attempt failed; another follows after `retry_in`.
    ReconnectFailed {
        /// Attempt number since the connection was lost.
        attempt: u32,
        /// The error.
        error: String,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
}

/// Client counters, cumulative over reconnects.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStats {
    /// The client id.
    pub id: String,
    /// Whether a session is up.
    pub connected: bool,
    /// The address of the current or last server.
    pub server_addr: Option<String>,
    /// The current session, if any.
    pub connection: Option<ConnectionInfo>,
    /// Connection attempts made.
    pub connect_attempts: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Sessions re-established by the automatic reconnect.
    pub reconnects: u64,
}

/// A client over back-end `B`. Cheap to clone; clones share the client.
pub struct TransportClient<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for TransportClient<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B: Backend> {
    backend: B,
    config: RwLock<ClientConfig>,
    auth: Option<ClientAuth>,
    handler: Arc<HandlerSlot>,
    /// Read on every send, written only when a session starts or ends.
    current: RwLock<Option<Arc<Connection>>>,
    server_addr: Mutex<Option<String>>,
    /// Cancels the session supervisor (and its reconnect loop) on `disconnect`.
    supervisor: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    events: broadcast::Sender<ConnectionEvent>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    write_buffers: Arc<BufferPool>,
    connect_attempts: AtomicU64,
    connect_failures: AtomicU64,
    reconnects: AtomicU64,
}

impl<B: Backend> TransportClient<B> {
    /// A client; `auth: None` connects without a handshake (a server with auth disabled).
    pub fn new(backend: B, config: ClientConfig, auth: Option<ClientAuth>) -> Self {
        let (events, _) = broadcast::channel(64);
        let metrics = Metrics::new("client");
        let write_buffers = session::write_buffer_pool(&metrics);
        let inner = Arc::new(Inner {
            backend,
            config: RwLock::new(config),
            auth,
            handler: Arc::new(HandlerSlot::default()),
            current: RwLock::new(None),
            server_addr: Mutex::new(None),
            supervisor: Mutex::new(None),
            events,
            next_id: AtomicU64::new(1),
            metrics,
            write_buffers,
            connect_attempts: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        inner.metrics.add_probe(move || {
            if let Some(inner) = weak.upgrade() {
                let current = inner
                    .current
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let depth = current.map_or(0, |c| c.queued());
                inner.metrics.send_queue_depth.set(depth as i64);
            }
        });
        Self { inner }
    }

    /// This client's metrics (its own registry).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The client id.
    pub fn id(&self) -> String {
        self.config().client_id
    }

    /// A copy of the settings.
    pub fn config(&self) -> ClientConfig {
        self.inner
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update_config(&self, change: impl FnOnce(&mut ClientConfig)) {
        change(
            &mut self
                .inner
                .config
                .write()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// Sets the read timeout of future sessions.
    pub fn set_read_timeout(&self, timeout: Duration) {
        self.update_config(|c| c.read_timeout = timeout);
    }

    /// Sets the write timeout of future sessions.
    pub fn set_write_timeout(&self, timeout: Duration) {
        self.update_config(|c| c.write_timeout = timeout);
    }

    /// Sets the first reconnect delay.
    pub fn set_reconnect_delay(&self, delay: Duration) {
        self.update_config(|c| c.reconnect_delay = delay);
    }

    /// Sets the handler of messages from the server.
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        self.inner.handler.set(handler);
    }

    /// Connection-state events from now on.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.subscribe()
    }

    /// Whether a session is up.
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|c| !c.is_closed())
    }

    fn current(&self) -> Option<Arc<Connection>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current session.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.current()
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        let connection = self.current().filter(|c| !c.is_closed());
        ClientStats {
            id: self.id(),
            connected: connection.is_some(),
            server_addr: self
                .inner
                .server_addr
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            connection: connection.map(|c| c.info()),
            connect_attempts: self.inner.connect_attempts.load(Ordering::Relaxed),
            connect_failures: self.inner.connect_failures.load(Ordering::Relaxed),
            reconnects: self.inner.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Connects to `addr` once; on success the session is supervised and,
    /// if `auto_reconnect` is on, re-established after a loss. An empty
    /// `addr` means [`ClientConfig::server_addr`]; with that empty too the
    /// call fails with [`TransportError::NoServerAddress`], never retried.
    pub async fn connect(&self, addr: &str) -> Result<(), TransportError> {
        if self.is_connected() {
            return Err(TransportError::AlreadyRunning);
        }
        let addr = &*self.server_addr_or_configured(addr)?;
        self.stop_supervisor().await;
        *self
            .inner
            .server_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(addr.to_owned());
        let (connection, task) = establish(&self.inner, addr).await?;
        let _ = self.inner.events.send(ConnectionEvent::Connected {
            addr: addr.to_owned(),
            session_id: connection.info().session_id,
            reconnect: false,
        });
        self.supervise(addr.to_owned(), connection, task);
        Ok(())
    }

    /// `addr`, or the configured address if `addr` is empty.
    fn server_addr_or_configured(&self, addr: &str) -> Result<String, TransportError> {
        let config = self.config();
        match (addr, config.server_addr) {
            ("", configured) if configured.is_empty() => Err(TransportError::NoServerAddress {
                client_id: config.client_id,
            }),
            ("", configured) => Ok(configured),
            (addr, _) => Ok(addr.to_owned()),
        }
    }

    /// Connects with up to `max_retries` retries (`max_retries + 1` attempts),
    /// waiting as the Go client does: the reconnect delay doubling to one
    /// minute, plus jitter in `[0, delay/2)`. Errors that cannot heal (a
    /// refused handshake, no address: see [`TransportError::is_transient`])
    /// stop at once. An empty `addr` means the configured one, as in
    /// [`connect`](Self::connect).
    pub async fn connect_with_retry(
        &self,
        addr: &str,
        max_retries: u32,
    ) -> Result<(), TransportError> {
        let policy = RetryPolicy::go_connect(self.config().reconnect_delay, max_retries);
        self.connect_with_policy(addr, &policy).await
    }

    /// Connects, retrying by `policy`; `addr` as in [`connect`](Self::connect).
    pub async fn connect_with_policy(
        &self,
        addr: &str,
        policy: &RetryPolicy,
    ) -> Result<(), TransportError> {
        let mut attempts = 0u32;
        let result = policy
            .retry(
                "connect",
                || {
                    attempts += 1;
                    if attempts > 1 {
                        self.inner.metrics.retry_attempts_total.inc();
                    }
                    self.connect(addr)
                },
                TransportError::is_transient,
            )
            .await;
        result.map_err(|last| match last {
            last if attempts > 1 => TransportError::RetriesExhausted {
                attempts,
                last: Box::new(last),
            },
            last => last,
        })
    }

    /// Closes the session (sending `Disconnect{REQUESTED}`) and stops any
    /// automatic reconnect. Returns once the session has ended.
    pub async fn disconnect(&self) -> Result<(), TransportError> {
        let had_supervisor = self.stop_supervisor().await;
        let current = self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match current {
            Some(connection) if !connection.is_closed() => {
                connection.close(DisconnectReason::Requested, "client disconnect");
                connection.closed().await;
                Ok(())
            }
            _ if had_supervisor => Ok(()),
            _ => Err(TransportError::NotConnected),
        }
    }

    /// Closes the current session, if any, and connects again to the last
    /// address dialled, else to the configured one.
    pub async fn reconnect(&self) -> Result<(), TransportError> {
        let last = self
            .inner
            .server_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _ = self.disconnect().await;
        // `connect` resolves "" to the configured address, or refuses it.
        self.connect(last.as_deref().unwrap_or_default()).await
    }

    fn supervise(
        &self,
        addr: String,
        connection: Arc<Connection>,
        task: tokio::task::JoinHandle<SessionEnd>,
    ) {
        let stop = CancellationToken::new();
        let inner = Arc::downgrade(&self.inner);
        let handle = tokio::spawn(
            supervise(inner, addr, connection, task, stop.clone())
                .instrument(info_span!("client_supervisor")),
        );
        *self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((stop, handle));
    }

    /// Stops the supervisor; returns whether one was running.
    async fn stop_supervisor(&self) -> bool {
        let supervisor = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some((stop, handle)) = supervisor else {
            return false;
        };
        stop.cancel();
        let _ = handle.await;
        true
    }
}

/// Dials, handshakes and starts a session; emits `Connected` on success.
async fn establish<B: Backend>(
    inner: &Arc<Inner<B>>,
    addr: &str,
) -> Result<(Arc<Connection>, tokio::task::JoinHandle<SessionEnd>), TransportError> {
    inner.connect_attempts.fetch_add(1, Ordering::Relaxed);
    let result = try_establish(inner, addr).await;
    if let Err(err) = &result {
        inner.connect_failures.fetch_add(1, Ordering::Relaxed);
        inner.metrics.error(err.metric_kind(), "connect");
    }
    result
}

async fn try_establish<B: Backend>(
    inner: &Arc<Inner<B>>,
    addr: &str,
) -> Result<(Arc<Connection>, tokio::task::JoinHandle<SessionEnd>), TransportError> {
    let config = inner
        .config
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    config.validate()?;
    // The request is signed before dialing, so that its bytes follow the
    // connection at once: a server closes a connection that stays silent.
    let prepared = inner.auth.as_ref().map(|auth| {
        let unicast = SequenceCounter::from_clock(SystemTime::now());
        let handshake = ClientHandshake::start(
            ClientHandshakeConfig {
                key: auth.key.clone(),
                client_id: config.client_id.clone(),
                expected_server_key: auth.server_key.clone(),
                extensions: auth.extensions,
                signed_frames: auth.signed_frames,
                delivery_acks: auth.delivery_acks,
                requests: true,
                backend: auth.backend,
            },
            SystemTime::now(),
            rand::random::<[u8; NONCE_LEN]>(),
            unicast.floor(),
        );
        (auth, unicast, handshake)
    });
    let Pipe {
        mut reader,
        mut writer,
        remote_addr,
        ..
    } = match tokio::time::timeout(config.connect_timeout, inner.backend.dial(addr)).await {
        Ok(pipe) => pipe?,
        Err(_) => {
            return Err(TransportError::ConnectTimeout {
                addr: addr.to_owned(),
                after: config.connect_timeout,
            });
        }
    };
    let mut setup = SessionSetup {
        identity: Arc::from(format!("server@{addr}")),
        client_id: Some(config.client_id.clone()),
        session_id: None,
        remote_addr,
        signer: None,
        opener: None,
        sender_id: Some(config.client_id.clone()),
        peer_key: None,
        delivery_acks: false,
        requests: false,
        go_mode: false,
        chain_id: None,
        metadata: Vec::new(),
        first_frame: None,
    };
    if let Some((auth, unicast, handshake)) = prepared {
        let server = client_handshake(
            &mut reader,
            &mut writer,
            handshake,
            config.handshake_timeout,
        )
        .await?;
        if let Some(server_key) = &server.server_key {
            setup.identity = Arc::from(format!("publisher:{server_key}"));
        }
        let (signer, opener) = signing_state(
            server.signed_frames.as_ref(),
            Some(&auth.key),
            server.identity.clone(),
            Some(unicast),
            auth.backend,
        );
        info!(
            %addr,
            session_id = %server.session_id,
            mutual = server.server_key.is_some(),
            signed_frames = signer.is_some(),
            "handshake complete"
        );
        setup.peer_key = server.server_key.clone();
        setup.session_id = Some(server.session_id);
        setup.signer = signer;
        setup.opener = opener;
        setup.delivery_acks = server.delivery_acks;
        setup.requests = server.requests;
        setup.go_mode = server.server_key.is_none();
    }
    let context = SessionContext::new(
        config.session(),
        inner.handler.clone(),
        inner.metrics.clone(),
        inner.write_buffers.clone(),
        None,
    );
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let unauthenticated = inner.auth.is_none();
    let (connection, task) = session::start_session(id, reader, writer, setup, context);
    if unauthenticated {
        // Without a handshake the client would otherwise say nothing until its
        // first message, and on stream transports (QUIC, gRPC) the server only
        // learns of the connection from its first bytes.
        connection.ping();
    }
    *inner
        .current
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
    Ok((connection, task))
}

/// Watches a session; after it ends, reconnects with doubling waits until it
/// succeeds or `stop` fires. Holds the client only weakly: dropping the last
/// handle of a client ends its session and this task.
async fn supervise<B: Backend>(
    client: Weak<Inner<B>>,
    addr: String,
    mut connection: Arc<Connection>,
    mut task: tokio::task::JoinHandle<SessionEnd>,
    stop: CancellationToken,
) {
    loop {
        let end = tokio::select! {
            end = &mut task => end,
            _ = stop.cancelled() => {
                connection.close(DisconnectReason::Requested, "client disconnect");
                let grace = client.upgrade().map_or(Duration::from_secs(1), |inner| {
                    inner.config.read().unwrap_or_else(PoisonError::into_inner).disconnect_timeout
                });
                let end = match tokio::time::timeout(grace.saturating_mul(2), &mut task).await {
                    Ok(end) => end,
                    Err(_) => {
                        connection.abort(DisconnectReason::Requested, "client disconnect");
                        task.await
                    }
                };
                if let Some(inner) = client.upgrade() {
                    emit_disconnected(&inner, &connection, end);
                }
                return;
            }
        };
        let Some(inner) = client.upgrade() else {
            return;
        };
        emit_disconnected(&inner, &connection, end);
        let config = inner
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        drop(inner);
        if !config.auto_reconnect {
            return;
        }
        let policy = RetryPolicy {
            max_delay: config.max_reconnect_delay,
            ..RetryPolicy::go_connect(config.reconnect_delay, 0).with_max_retries(None)
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let wait = policy.delay(attempt);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let Some(inner) = client.upgrade() else {
                return;
            };
            if attempt > 1 {
                inner.metrics.retry_attempts_total.inc();
            }
            let established = tokio::select! {
                _ = stop.cancelled() => return,
                result = establish(&inner, &addr) => result,
            };
            match established {
                Ok((new_connection, new_task)) => {
                    inner.reconnects.fetch_add(1, Ordering::Relaxed);
                    inner.metrics.reconnects_total.inc();
                    info!(%addr, attempt, "reconnected");
                    let _ = inner.events.send(ConnectionEvent::Connected {
                        addr: addr.clone(),
                        session_id: new_connection.info().session_id,
                        reconnect: true,
                    });
                    connection = new_connection;
                    task = new_task;
                    break;
                }
                Err(err) => {
                    let retry_in = policy.base_delay(attempt + 1);
                    warn!(%addr, attempt, error = %crate::log_safe(&err.to_string()), "reconnect failed");
                    let _ = inner.events.send(ConnectionEvent::ReconnectFailed {
                        attempt,
                        error: err.to_string(),
                        retry_in,
                    });
                }
            }
        }
    }
}

impl<B: Backend> Drop for Inner<B> {
    /// The last handle is gone: stop reconnecting and close the session.
    fn drop(&mut self) {
        let supervisor = self
            .supervisor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((stop, _)) = supervisor {
            stop.cancel();
        }
        let current = self
            .current
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(connection) = current {
            connection.close(DisconnectReason::Requested, "client dropped");
        }
    }
}

fn emit_disconnected<B: Backend>(
    inner: &Inner<B>,
    connection: &Arc<Connection>,
    end: Result<SessionEnd, tokio::task::JoinError>,
) {
    let end = end.unwrap_or_else(|err| SessionEnd {
        reason: DisconnectReason::InternalError,
        details: format!("session task failed: {err}"),
        by_peer: false,
    });
    {
        let mut current = inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
            *current = None;
        }
    }
    let _ = inner.events.send(ConnectionEvent::Disconnected {
        reason: end.reason,
        details: end.details,
        by_peer: end.by_peer,
    });
}
