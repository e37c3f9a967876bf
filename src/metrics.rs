//! Prometheus metrics with the Go package's names and labels, plus this
//! crate's additions, and a `/metrics` endpoint.
//!
//! Every server and client owns its own [`Registry`]: no global state, so two
//! instances in one process (or one test binary) never mix their figures.
//! Names are `publisher_transport_<component>_<metric>`, the Go namespace and
//! subsystem. Per-message series are resolved once into handles, so the hot
//! path does no label hashing.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
    local::{LocalHistogram, LocalIntCounter},
};

use crate::{error::TransportError, proto::MessageKind};

/// Per-kind metric tables are indexed by [`MessageKind::index`].
const KINDS: usize = MessageKind::ALL.len();

/// Local count and size histogram of one kind.
type KindTally = (LocalIntCounter, LocalHistogram);

/// Per-kind counts and sizes of one direction, accumulated without atomics by
/// the one task that owns it and published by [`flush`](Self::flush): a
/// reader or writer calls it once per batch, where observing each message
/// directly would cost several atomic updates per message.
pub(crate) struct MessageTally {
    metrics: Arc<Metrics>,
    direction: Direction,
    /// The kinds seen so far: a connection carries few, so a short list
    /// searched in order costs less than a slot per kind, in time and memory.
    slots: Vec<(usize, KindTally)>,
    pending: bool,
}

impl MessageTally {
    /// Counts one message of `kind` and `size` bytes.
    pub(crate) fn add(&mut self, kind: MessageKind, size: usize) {
        let kind = kind.index();
        let index = match self.slots.iter().position(|(seen, _)| *seen == kind) {
            Some(index) => index,
            None => {
                let (count, sizes) = self.metrics.per_kind(self.direction, kind);
                self.slots.push((kind, (count.local(), sizes.local())));
                self.slots.len() - 1
            }
        };
        let (count, sizes) = &self.slots[index].1;
        count.inc();
        sizes.observe(size as f64);
        self.pending = true;
    }

    /// Forgets what was counted since the last flush (a batch that never
    /// went out is not counted as sent).
    pub(crate) fn discard(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        for (_, (count, sizes)) in &self.slots {
            count.reset();
            sizes.clear();
        }
    }

    /// Publishes what was counted since the last flush.
    pub(crate) fn flush(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        for (_, (count, sizes)) in &self.slots {
            count.flush();
            sizes.flush();
        }
    }
}

impl Drop for MessageTally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Direction label values.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    In = 0,
    Out = 1,
}

/// Per-kind, per-direction series, resolved on first use: a client or
/// server sees a few kinds, and a histogram takes about a kilobyte.
#[derive(Default)]
struct PerKind {
    messages: [[OnceLock<IntCounter>; KINDS]; 2],
    sizes: [[OnceLock<Histogram>; KINDS]; 2],
    processing: [OnceLock<Histogram>; KINDS],
}

/// Label values of [`Direction`].
const DIRECTIONS: [&str; 2] = ["in", "out"];

/// The metrics of one server or client.
pub struct Metrics {
    registry: Registry,
    /// `connections_total{state}`: opened, closed, `refused_<reason>`, handshake_failed.
    pub connections_total: IntCounterVec,
    /// `connections_active`.
    pub connections_active: IntGauge,
    /// `connection_duration_seconds`.
    pub connection_duration: Histogram,
    /// `messages_total{type,direction}`.
    pub messages_total: IntCounterVec,
    /// `message_size_bytes{type,direction}`.
    pub message_size: HistogramVec,
    /// `message_processing_duration_seconds{type}`: time in the handler per
    /// message, measured on one handler call in 16 (a call that takes
    /// several messages counts its time divided among them).
    pub processing_duration: HistogramVec,
    /// `broadcasts_total`.
    pub broadcasts_total: IntCounter,
    /// `broadcast_recipients_total`: recipients per broadcast (a histogram, as in Go).
    pub broadcast_recipients: Histogram,
    /// `broadcast_duration_seconds`.
    pub broadcast_duration: Histogram,
    /// `buffer_utilization_ratio{type}`: share of pooled buffers in use.
    pub buffer_utilization: prometheus::GaugeVec,
    /// `send_queue_depth`: frames queued in writers (replaces Go's `worker_pool_queue_size`).
    pub send_queue_depth: IntGauge,
    /// `errors_total{type,operation}`.
    pub errors_total: IntCounterVec,
    /// `handshakes_total{result,reason}`.
    pub handshakes_total: IntCounterVec,
    /// `signature_failures_total{kind}`: signed frames refused, by error kind.
    pub signature_failures_total: IntCounterVec,
    /// `replay_refusals_total`: signed frames or handshakes refused as replays.
    pub replay_refusals_total: IntCounter,
    /// `bytes_total{direction}`: bytes on the wire, length prefixes included.
    pub bytes_total: IntCounterVec,
    /// `reconnects_total`: sessions re-established automatically.
    pub reconnects_total: IntCounter,
    /// `retry_attempts_total`: connection attempts after a failure.
    pub retry_attempts_total: IntCounter,
    bytes: [IntCounter; 2],
    per_kind: PerKind,
    /// Refresh sampled gauges (queue depth, pool use) just before a scrape.
    probes: std::sync::Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn buckets_seconds() -> Vec<f64> {
    vec![
        0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
    ]
}

impl Metrics {
    /// Metrics of `component` ("server", "client", …) in a fresh registry.
    pub fn new(component: &str) -> Arc<Self> {
        let subsystem = format!("transport_{component}");
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .namespace("publisher")
                .subsystem(subsystem.clone())
        };
        let hopts = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help)
                .namespace("publisher")
                .subsystem(subsystem.clone())
                .buckets(buckets)
        };
        let registry = Registry::new();
        let counter_vec = |name, help, labels: &[&str]| {
            let metric = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let counter = |name, help| {
            let metric = IntCounter::with_opts(opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram = |name, help, buckets| {
            let metric = Histogram::with_opts(hopts(name, help, buckets)).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram_vec = |name, help, labels: &[&str], buckets| {
            let metric =
                HistogramVec::new(hopts(name, help, buckets), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name, help| {
            let metric = IntGauge::with_opts(opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };

        let connections_total = counter_vec(
            "connections_total",
            "Connection events by state.",
            &["state"],
        );
        let connections_active = gauge("connections_active", "Connections currently established.");
        let connection_duration = histogram(
            "connection_duration_seconds",
            "Lifetime of closed connections.",
            vec![1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0],
        );
        let messages_total = counter_vec(
            "messages_total",
            "Messages by payload type and direction.",
            &["type", "direction"],
        );
        let message_size = histogram_vec(
            "message_size_bytes",
            "Encoded message sizes by payload type and direction.",
            &["type", "direction"],
            prometheus::exponential_buckets(64.0, 4.0, 10).expect("valid buckets"),
        );
        let processing_duration = histogram_vec(
            "message_processing_duration_seconds",
            "Time the handler took per message, by payload type.",
            &["type"],
            buckets_seconds(),
        );
        let broadcasts_total = counter("broadcasts_total", "Broadcasts sent.");
        let broadcast_recipients = histogram(
            "broadcast_recipients_total",
            "Recipients per broadcast.",
            prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid buckets"),
        );
        let broadcast_duration = histogram(
            "broadcast_duration_seconds",
            "Time to encode and queue a broadcast (writers seal signed batches).",
            buckets_seconds(),
        );
        let buffer_utilization = prometheus::GaugeVec::new(
            opts(
                "buffer_utilization_ratio",
                "Share of pooled buffers in use, by type.",
            ),
            &["type"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(buffer_utilization.clone()))
            .expect("unique metric");
        let send_queue_depth = gauge("send_queue_depth", "Frames waiting in connection writers.");
        let errors_total = counter_vec(
            "errors_total",
            "Errors by type and operation.",
            &["type", "operation"],
        );
        let handshakes_total = counter_vec(
            "handshakes_total",
            "Handshake outcomes by result and reason.",
            &["result", "reason"],
        );
        let signature_failures_total = counter_vec(
            "signature_failures_total",
            "Signed frames refused, by reason.",
            &["kind"],
        );
        let replay_refusals_total = counter(
            "replay_refusals_total",
            "Frames or handshakes refused as replays.",
        );
        let bytes_total = counter_vec(
            "bytes_total",
            "Bytes on the wire by direction.",
            &["direction"],
        );
        let reconnects_total =
            counter("reconnects_total", "Sessions re-established automatically.");
        let retry_attempts_total = counter(
            "retry_attempts_total",
            "Connection attempts after a failure.",
        );

        let per_kind = PerKind::default();
        let bytes = DIRECTIONS.map(|d| bytes_total.with_label_values(&[d]));
        // Only the pooled write buffers are measured (`type="write"`): the
        // read buffers belong to their connections, not to a pool.
        buffer_utilization.with_label_values(&["write"]).set(0.0);

        Arc::new(Self {
            registry,
            connections_total,
            connections_active,
            connection_duration,
            messages_total,
            message_size,
            processing_duration,
            broadcasts_total,
            broadcast_recipients,
            broadcast_duration,
            buffer_utilization,
            send_queue_depth,
            errors_total,
            handshakes_total,
            signature_failures_total,
            replay_refusals_total,
            bytes_total,
            reconnects_total,
            retry_attempts_total,
            bytes,
            per_kind,
            probes: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The registry, to add application metrics or serve it elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds a function run before each scrape, to sample a gauge that is
    /// too hot to update on every message.
    pub fn add_probe(&self, probe: impl Fn() + Send + Sync + 'static) {
        self.probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(probe));
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        for probe in self
            .probes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            probe();
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// A tally of this direction's messages for one task to accumulate.
    pub(crate) fn tally(self: &Arc<Self>, direction: Direction) -> MessageTally {
        MessageTally {
            metrics: self.clone(),
            direction,
            slots: Vec::new(),
            pending: false,
        }
    }

    /// The count and size series of `kind` (an index) in `direction`.
    fn per_kind(&self, direction: Direction, kind: usize) -> (&IntCounter, &Histogram) {
        let (label, d) = (MessageKind::ALL[kind].label(), direction as usize);
        let count = self.per_kind.messages[d][kind].get_or_init(|| {
            self.messages_total
                .with_label_values(&[label, DIRECTIONS[d]])
        });
        let sizes = self.per_kind.sizes[d][kind]
            .get_or_init(|| self.message_size.with_label_values(&[label, DIRECTIONS[d]]));
        (count, sizes)
    }

    /// Counts one message outside a tally (a direct write).
    pub(crate) fn message(&self, direction: Direction, kind: MessageKind, size: usize) {
        let (count, sizes) = self.per_kind(direction, kind.index());
        count.inc();
        sizes.observe(size as f64);
    }

    pub(crate) fn processing(&self, kind: MessageKind, took: Duration) {
        self.per_kind.processing[kind.index()]
            .get_or_init(|| self.processing_duration.with_label_values(&[kind.label()]))
            .observe(took.as_secs_f64());
    }

    pub(crate) fn bytes(&self, direction: Direction, count: usize) {
        self.bytes[direction as usize].inc_by(count as u64);
    }

    /// Records one broadcast to `recipients` peers that took `elapsed`.
    pub(crate) fn broadcast(&self, recipients: usize, elapsed: std::time::Duration) {
        self.broadcasts_total.inc();
        self.broadcast_recipients.observe(recipients as f64);
        self.broadcast_duration.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn error(&self, kind: &str, operation: &str) {
        self.errors(kind, operation, 1);
    }

    /// Counts `count` errors at once (e.g. each message lost with a connection).
    pub(crate) fn errors(&self, kind: &str, operation: &str, count: u64) {
        self.errors_total
            .with_label_values(&[kind, operation])
            .inc_by(count);
    }

    pub(crate) fn connection(&self, state: &str) {
        self.connections_total.with_label_values(&[state]).inc();
    }

    pub(crate) fn handshake(&self, result: &str, reason: &str) {
        self.handshakes_total
            .with_label_values(&[result, reason])
            .inc();
    }
}

/// Serves `GET /metrics` for `metrics` on `addr` until `shutdown` resolves.
/// Returns the bound address (the real port for port 0).
pub async fn serve(
    metrics: Vec<Arc<Metrics>>,
    addr: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, TransportError> {
    use axum::{Router, http::header, routing::get};
    let io_err = |source| TransportError::Io {
        op: "bind",
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(io_err)?;
    let local_addr = listener.local_addr().map_err(io_err)?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                let body: String = metrics.iter().map(|m| m.render()).collect();
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %err, "metrics endpoint failed");
        }
    });
    Ok(local_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Payload, rollup::v1::Ping};

    #[test]
    fn kinds_index_their_own_position_and_only_payloads_are_application() {
        for (position, kind) in MessageKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), position, "{kind:?}");
        }
        let ping = crate::Message {
            sender_id: String::new(),
            payload: Some(Payload::Ping(Ping { timestamp: 0 })),
        };
        assert_eq!(MessageKind::of(&ping), MessageKind::Ping);
        assert_eq!(MessageKind::of(&crate::Message::default()).label(), "empty");
        assert!(!MessageKind::Ping.is_application());
        assert!(!MessageKind::Ack.is_application());
        assert!(MessageKind::Decided.is_application());
        assert!(MessageKind::Empty.is_application());
    }
}
