//! Server and client settings: plain structs whose `Default` is the Go
//! package's defaults (see each field), with human-readable durations in
//! serde (`"30s"`, `"5m"`). They hold no back-end's options: those are
//! given to the back-end (e.g. [`TcpOptions`](crate::TcpOptions) to
//! [`TcpBackend::new`](crate::TcpBackend::new)).

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    codec::{DEFAULT_MAX_FRAME_SIZE, HANDSHAKE_MAX_FRAME_SIZE},
    crypto::{CryptoBackend, PublicKey, SecretKey, TrustStore},
    error::TransportError,
    handshake::{DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CLOCK_SKEW, SignedFramesPolicy},
    session::SessionConfig,
};

/// Connection rate limit per address prefix (an IPv4 address, an IPv6 /64):
/// a token bucket of `burst` tokens, refilled at `per_second`. With
/// authentication on, only connections that fail or abandon authentication
/// take a token, the handshakes a prefix has in progress count against its
/// tokens (one beyond them waits for one to end), and a prefix is refused
/// while its bucket is empty; so any number of trusted peers behind one
/// address connect at once, while failures from it, even concurrent ones,
/// are throttled. Without authentication every
/// connection takes one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens a full bucket holds: failures (with authentication) or
    /// connections (without) allowed back to back.
    pub burst: u32,
    /// Tokens added per second.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 5.0,
        }
    }
}

/// Per-connection limit on what a peer may send: token buckets of frames
/// and bytes per second, each holding one second's worth. A peer over either
/// is disconnected with `THROTTLED`.
///
/// The default (50,000 frames and 128 MiB a second) is far above what an
/// honest sequencer sends, since writers coalesce and a signed batch is one
/// frame, and it bounds what one peer can make the server verify and parse
/// (a signed frame costs a signature check). Benchmarks that measure raw
/// throughput turn it off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundLimit {
    /// Frames per second (a signed batch of many messages is one frame).
    pub frames_per_second: f64,
    /// Bytes per second, length prefixes included.
    pub bytes_per_second: f64,
}

impl Default for InboundLimit {
    fn default() -> Self {
        Self {
            frames_per_second: 50_000.0,
            bytes_per_second: 128.0 * 1024.0 * 1024.0,
        }
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (Go: ":8080").
    pub listen_addr: String,
    /// Authenticated connections served at once (Go: 1000); more are refused
    /// with `TOO_MANY_PEERS`.
    pub max_connections: usize,
    /// Nothing received for this long evicts the peer (Go: 30 s, but only logged).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Bound on a write and on `send` waiting for queue room (Go: 30 s).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Largest frame body (Go: 10 MiB).
    pub max_message_size: usize,
    /// Read buffer per connection (Go: 8192): what the first read asks
    /// for, and the least a busy connection's reads shrink back to; reads
    /// grow to 64 KiB (or this, if larger) while they fill the buffer.
    /// Applies to the TCP, TLS and QUIC back-ends (gRPC buffers itself).
    pub buffer_size: usize,
    /// Bound on a client's handshake (Go: 5 s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, the transport's own (TLS, QUIC)
    /// included (Go runs them one at a time). When it is full, a newcomer
    /// takes over the oldest slot of the prefix holding the most, if that
    /// prefix holds more than the newcomer's; otherwise the newcomer is
    /// refused with `TOO_MANY_PEERS`.
    pub max_pending_handshakes: usize,
    /// Pending handshakes one address prefix (an IPv4 address, an IPv6 /64)
    /// may hold; more from it are refused with `TOO_MANY_PEERS`. Default
    /// 128: 1/32 of the default pool, and room for a hundred sequencers
    /// behind one NAT reconnecting at once.
    pub max_pending_handshakes_per_prefix: usize,
    /// With authentication on, a connection that sends nothing for this long
    /// after being accepted is closed (the handshake timeout then bounds the
    /// rest of the handshake). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Bound on writing a final `Disconnect` (Go: 1 s).
    #[serde(with = "humantime_serde")]
    pub disconnect_timeout: Duration,
    /// Ping a peer silent for this long; `None` never pings.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    /// Messages queued per connection.
    pub send_queue_capacity: usize,
    /// Bytes queued per connection (at least 64 KiB); a message larger
    /// than this still goes when nothing else waits.
    pub send_queue_bytes: usize,
    /// Connection rate limit per address prefix; `None` disables it.
    pub rate_limit: Option<RateLimit>,
    /// How long `stop` waits for peers to take their `Disconnect`.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Memory for partly received large frames across all connections;
    /// beyond it, connections receiving large frames stop reading until it
    /// frees up, except one at a time that may finish its frame (so frames
    /// always complete). Frames up to 64 KiB never wait.
    pub read_budget: usize,
    /// Per-connection inbound rate limit (on by default, see
    /// [`InboundLimit`]); `None` for none.
    pub inbound_limit: Option<InboundLimit>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:8080".into(),
            max_connections: 1000,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_message_size: DEFAULT_MAX_FRAME_SIZE,
            buffer_size: 8192,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: 4096,
            max_pending_handshakes_per_prefix: 128,
            first_byte_timeout: Duration::from_secs(1),
            disconnect_timeout: Duration::from_secs(1),
            ping_interval: Some(Duration::from_secs(15)),
            send_queue_capacity: 4096,
            send_queue_bytes: crate::session::DEFAULT_SEND_QUEUE_BYTES,
            rate_limit: Some(RateLimit::default()),
            stop_timeout: Duration::from_secs(5),
            read_budget: 256 * 1024 * 1024,
            inbound_limit: Some(InboundLimit::default()),
        }
    }
}

impl ServerConfig {
    /// Sets the listen address.
    pub fn with_listen_addr(mut self, addr: impl Into<String>) -> Self {
        self.listen_addr = addr.into();
        self
    }

    /// Sets the per-prefix rate limit (`None` disables it).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Sets the per-connection inbound limit (`None` disables it).
    pub fn with_inbound_limit(mut self, limit: Option<InboundLimit>) -> Self {
        self.inbound_limit = limit;
        self
    }

    /// Sets the connection limit.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// Checks the values; the error names the offending field.
    pub fn validate(&self) -> Result<(), TransportError> {
        common_checks(
            self.max_message_size,
            self.send_queue_capacity,
            self.send_queue_bytes,
            self.buffer_size,
            [
                ("read_timeout", self.read_timeout),
                ("write_timeout", self.write_timeout),
                ("handshake_timeout", self.handshake_timeout),
                ("first_byte_timeout", self.first_byte_timeout),
            ],
        )?;
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if self.max_pending_handshakes == 0 || self.max_pending_handshakes > MAX_COUNT {
            return invalid(
                "max_pending_handshakes",
                &format!("must be between 1 and {MAX_COUNT}"),
            );
        }
        if self.max_pending_handshakes_per_prefix == 0 {
            return invalid("max_pending_handshakes_per_prefix", "must be at least 1");
        }
        if let Some(limit) = self.rate_limit
            && (limit.burst == 0 || !limit.per_second.is_finite() || limit.per_second < 0.0)
        {
            return invalid(
                "rate_limit",
                "burst must be ≥ 1 and per_second a finite number ≥ 0",
            );
        }
        if let Some(limit) = self.inbound_limit
            && !(limit.frames_per_second > 0.0
                && limit.bytes_per_second > 0.0
                && limit.frames_per_second.is_finite()
                && limit.bytes_per_second.is_finite())
        {
            return invalid(
                "inbound_limit",
                "frames_per_second and bytes_per_second must be finite numbers > 0",
            );
        }
        if self.read_budget < 64 * 1024 || self.read_budget > MAX_COUNT {
            return invalid(
                "read_budget",
                &format!("must be between 64 KiB and {MAX_COUNT} bytes"),
            );
        }
        Ok(())
    }

    pub(crate) fn session(&self) -> SessionConfig {
        SessionConfig {
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            ping_interval: self.ping_interval,
            send_queue_capacity: self.send_queue_capacity,
            send_queue_bytes: self.send_queue_bytes,
            read_buffer_size: self.buffer_size,
            max_frame_size: self.max_message_size,
            disconnect_timeout: self.disconnect_timeout,
            inbound_limit: self.inbound_limit,
        }
    }
}

/// Smallest `buffer_size`: below this a read costs more than it carries.
pub const MIN_READ_BUFFER: usize = 1024;
/// Largest `buffer_size`: the most one connection reads ahead at once.
pub const MAX_READ_BUFFER: usize = 16 * 1024 * 1024;

/// Largest count a setting backed by a semaphore or bounded channel may hold
/// (tokio's `Semaphore::MAX_PERMITS`, about 2.3 × 10¹⁸ on 64-bit targets).
pub const MAX_COUNT: usize = tokio::sync::Semaphore::MAX_PERMITS;

fn invalid(field: &str, problem: &str) -> Result<(), TransportError> {
    Err(TransportError::Config(format!("{field}: {problem}")))
}

fn common_checks<const N: usize>(
    max_message_size: usize,
    send_queue_capacity: usize,
    send_queue_bytes: usize,
    buffer_size: usize,
    timeouts: [(&str, Duration); N],
) -> Result<(), TransportError> {
    if max_message_size < HANDSHAKE_MAX_FRAME_SIZE || max_message_size > u32::MAX as usize {
        return invalid(
            "max_message_size",
            &format!(
                "must be between {HANDSHAKE_MAX_FRAME_SIZE} and {} bytes",
                u32::MAX
            ),
        );
    }
    if send_queue_capacity == 0 || send_queue_capacity > MAX_COUNT {
        return invalid(
            "send_queue_capacity",
            &format!("must be between 1 and {MAX_COUNT}"),
        );
    }
    if send_queue_bytes < 64 * 1024 {
        return invalid("send_queue_bytes", "must be at least 64 KiB");
    }
    if !(MIN_READ_BUFFER..=MAX_READ_BUFFER).contains(&buffer_size) {
        return invalid(
            "buffer_size",
            &format!("must be between {MIN_READ_BUFFER} and {MAX_READ_BUFFER} bytes"),
        );
    }
    for (field, timeout) in timeouts {
        if timeout.is_zero() {
            return invalid(field, "must be longer than zero");
        }
    }
    Ok(())
}

/// Client settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Address `connect`, `connect_with_retry` and `connect_with_policy`
    /// dial when given an empty one (`""`, as Go's sequencer passes), and
    /// `reconnect` before anything was dialled. Empty: such calls fail with
    /// [`TransportError::NoServerAddress`].
    pub server_addr: String,
    /// Our id, sent in the handshake and as `sender_id` (Go: a fresh UUID v7).
    pub client_id: String,
    /// Bound on establishing the connection (Go: 10 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Nothing received for this long drops the connection (Go: 30 s).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Bound on a write and on `send` waiting for queue room (Go: 10 s).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// First wait before reconnecting; doubles per failure (Go: 5 s).
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Duration,
    /// Cap of the doubling (Go: 1 minute).
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
    /// Reconnect automatically after a lost connection.
    pub auto_reconnect: bool,
    /// Largest frame body (Go: 10 MiB).
    pub max_message_size: usize,
    /// Read buffer (Go: 8192); see [`ServerConfig::buffer_size`].
    pub buffer_size: usize,
    /// Bound on the handshake exchange (Go: 5 s on the server's side).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Ping after this long without receiving anything (Go: every 15 s).
    #[serde(with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    /// Messages queued before `send` waits.
    pub send_queue_capacity: usize,
    /// Bytes queued before `send` waits; see [`ServerConfig::send_queue_bytes`].
    pub send_queue_bytes: usize,
    /// Bound on writing a final `Disconnect` (Go: 1 s).
    #[serde(with = "humantime_serde")]
    pub disconnect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            server_addr: "127.0.0.1:8080".into(),
            client_id: uuid::Uuid::now_v7().to_string(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            reconnect_delay: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(60),
            auto_reconnect: true,
            max_message_size: DEFAULT_MAX_FRAME_SIZE,
            buffer_size: 8192,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            ping_interval: Some(Duration::from_secs(15)),
            send_queue_capacity: 4096,
            send_queue_bytes: crate::session::DEFAULT_CLIENT_SEND_QUEUE_BYTES,
            disconnect_timeout: Duration::from_secs(1),
        }
    }
}

impl ClientConfig {
    /// Sets the client id.
    pub fn with_client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Sets the server address.
    pub fn with_server_addr(mut self, addr: impl Into<String>) -> Self {
        self.server_addr = addr.into();
        self
    }

    /// Sets the first reconnect delay.
    pub fn with_reconnect_delay(mut self, delay: Duration) -> Self {
        self.reconnect_delay = delay;
        self
    }

    /// Checks the values; the error names the offending field.
    pub fn validate(&self) -> Result<(), TransportError> {
        common_checks(
            self.max_message_size,
            self.send_queue_capacity,
            self.send_queue_bytes,
            self.buffer_size,
            [
                ("connect_timeout", self.connect_timeout),
                ("read_timeout", self.read_timeout),
                ("write_timeout", self.write_timeout),
                ("handshake_timeout", self.handshake_timeout),
            ],
        )?;
        if self.client_id.is_empty() {
            return invalid("client_id", "must not be empty");
        }
        Ok(())
    }

    pub(crate) fn session(&self) -> SessionConfig {
        SessionConfig {
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            ping_interval: self.ping_interval,
            send_queue_capacity: self.send_queue_capacity,
            send_queue_bytes: self.send_queue_bytes,
            read_buffer_size: self.buffer_size,
            max_frame_size: self.max_message_size,
            disconnect_timeout: self.disconnect_timeout,
            inbound_limit: None,
        }
    }
}

/// Server authentication. Without it (`None` where an `Option` is taken) the
/// server runs Go's auth-disabled mode: no handshake at all.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    /// Trusted client keys by identity; live changes apply to new handshakes.
    pub trust: Arc<TrustStore>,
    /// The server's key: proves the server to extended clients and signs its
    /// frames. Without it only Go-mode handshakes happen.
    pub key: Option<Arc<SecretKey>>,
    /// Signed-frame negotiation.
    pub signed_frames: SignedFramesPolicy,
    /// Accept delivery acknowledgements from extended clients that offer
    /// them (what [`Connection::send_confirmed`](crate::session::Connection::send_confirmed)
    /// needs). On by default.
    pub delivery_acks: bool,
    /// Crypto implementation.
    pub backend: CryptoBackend,
    /// Allowed clock difference of handshake timestamps (Go: 30 s).
    pub max_clock_skew: Duration,
}

impl ServerAuth {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), TransportError> {
        if self.signed_frames == SignedFramesPolicy::Require && self.key.is_none() {
            return invalid(
                "auth.signed_frames",
                "`require` needs a server key (signed frames need mutual authentication)",
            );
        }
        Ok(())
    }

    /// Authentication with `key`, trusting `trust`, offering signed frames.
    pub fn new(key: Arc<SecretKey>, trust: Arc<TrustStore>) -> Self {
        Self {
            trust,
            key: Some(key),
            signed_frames: SignedFramesPolicy::default(),
            delivery_acks: true,
            backend: CryptoBackend::default(),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

/// Client authentication.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Our key.
    pub key: Arc<SecretKey>,
    /// The publisher's key; when set, a server that does not prove it is refused.
    pub server_key: Option<PublicKey>,
    /// Speak the handshake extensions (off: exactly Go's handshake).
    pub extensions: bool,
    /// Offer signed frames.
    pub signed_frames: bool,
    /// Offer delivery acknowledgements (needs `extensions`; what
    /// `send_confirmed` needs). On by default.
    pub delivery_acks: bool,
    /// Crypto implementation.
    pub backend: CryptoBackend,
}

impl ClientAuth {
    /// Extended handshake with `key`, signed frames offered, any server key.
    pub fn new(key: Arc<SecretKey>) -> Self {
        Self {
            key,
            server_key: None,
            extensions: true,
            signed_frames: true,
            delivery_acks: true,
            backend: CryptoBackend::default(),
        }
    }

    /// Requires the server to prove `server_key` (mutual authentication).
    pub fn with_server_key(mut self, server_key: PublicKey) -> Self {
        self.server_key = Some(server_key);
        self
    }
}
