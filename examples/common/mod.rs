//! Code shared by the example programs: back-end selection ([`backend`]),
//! logging set-up, shutdown signals, message builders and the publisher's
//! cross-chain coordinator (a miniature of the Go publisher's 2PC).

// Each example compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod backend;
pub mod cli;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    Inbound, Message, Server,
    proto::{
        Payload,
        rollup::v1::{Decided, StartSc, TransactionRequest, Vote, XtId, XtRequest},
    },
};
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info, warn};
use tracing_subscriber::EnvFilter;

/// How long the coordinator waits for votes before deciding abort.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// Logs to stderr (stdout carries the examples' machine-readable lines),
/// filtered by `RUST_LOG`, else by `default`.
pub fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in log files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on Ctrl-C, or on SIGTERM (what `timeout` and `kill` send), so
/// both shut down gracefully.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Prints one line to stdout and flushes, so a reader on a pipe sees it at once.
pub fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A chain id on the wire: the big-endian bytes of `n`.
pub fn chain_id_bytes(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

/// The id of a cross-chain transaction: SHA-256 of the request's protobuf
/// encoding (prost encodes deterministically, as Go's proto.Marshal does for
/// these messages).
pub fn xt_id(request: &XtRequest) -> [u8; 32] {
    Sha256::digest(request.encode_to_vec()).into()
}

/// An XTRequest of one transaction on `chain_id`, its bytes random so every
/// request has a distinct id.
pub fn random_xt_request(chain_id: &Bytes) -> XtRequest {
    XtRequest {
        transactions: vec![TransactionRequest {
            chain_id: chain_id.clone(),
            transaction: vec![Bytes::copy_from_slice(&rand::random::<[u8; 32]>())],
        }],
    }
}

/// A message with `payload`; the transport fills in `sender_id`.
pub fn message(payload: Payload) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(payload),
    }
}

/// A sequencer's vote on the round `start` opened.
pub fn vote_for(start: &StartSc, chain_id: &Bytes, commit: bool) -> Message {
    message(Payload::Vote(Vote {
        sender_chain_id: chain_id.clone(),
        xt_id: Some(XtId {
            hash: start.xt_id.clone(),
        }),
        vote: commit,
    }))
}

/// "commit" or "abort".
pub fn decision_word(decision: bool) -> &'static str {
    if decision { "commit" } else { "abort" }
}

/// What the coordinator has done, readable while it runs.
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    /// Rounds opened (StartSC broadcast).
    pub started: AtomicU64,
    /// Rounds decided commit.
    pub committed: AtomicU64,
    /// Rounds decided abort (a false vote, a timeout or no participants).
    pub aborted: AtomicU64,
    /// Of the aborted rounds, those that timed out waiting for votes.
    pub timed_out: AtomicU64,
    /// CIRC messages relayed.
    pub relayed: AtomicU64,
    /// Votes for unknown or already decided rounds, or from non-participants.
    pub ignored_votes: AtomicU64,
}

/// One open round: who must vote, who has.
struct Round {
    sequence: u64,
    participants: HashSet<String>,
    voted: HashSet<String>,
}

/// The publisher's cross-chain coordination: XTRequest → StartSC to all →
/// votes of every participant → Decided to all. A single task owns the state,
/// so no locks are needed and decisions are made exactly once.
pub struct Coordinator {
    server: Arc<dyn Server>,
    decision_timeout: Duration,
    stats: Arc<CoordinatorStats>,
    next_sequence: u64,
    rounds: HashMap<Bytes, Round>,
    /// Deadlines in the order rounds opened; the timeout is constant, so this
    /// is also deadline order. Each entry names its round's sequence number
    /// so a deadline never expires a later round of the same xt_id.
    deadlines: VecDeque<(Instant, Bytes, u64)>,
}

impl Coordinator {
    /// A coordinator broadcasting through `server`.
    pub fn new(server: Arc<dyn Server>) -> Self {
        Self {
            server,
            decision_timeout: DECISION_TIMEOUT,
            stats: Arc::default(),
            next_sequence: 1,
            rounds: HashMap::new(),
            deadlines: VecDeque::new(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<CoordinatorStats> {
        self.stats.clone()
    }

    /// Consumes inbound messages (from a `channel_handler`) until the channel closes.
    pub async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>) {
        loop {
            let next_deadline = self.deadlines.front().map(|(at, _, _)| *at);
            tokio::select! {
                received = inbound.recv() => match received {
                    Some(inbound) => self.on_inbound(inbound),
                    None => return,
                },
                _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)),
                    if next_deadline.is_some() => self.expire(Instant::now()),
            }
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let Inbound {
            from,
            message: received,
            ..
        } = inbound;
        let kind = publisher_transport::proto::payload_kind(&received);
        match received.payload {
            Some(Payload::XtRequest(request)) => self.start(&from, request),
            Some(Payload::Vote(vote)) => self.on_vote(&from, vote),
            Some(Payload::CircMessage(circ)) => {
                // Relay to every other sequencer; the sender already has it.
                match self
                    .server
                    .broadcast(message(Payload::CircMessage(circ)), Some(&from))
                {
                    Ok(report) => {
                        self.stats.relayed.fetch_add(1, Ordering::Relaxed);
                        debug!(%from, recipients = report.delivered.len(), "relayed CIRC message");
                    }
                    Err(err) => warn!(%from, error = %err, "CIRC relay failed"),
                }
            }
            _ => debug!(%from, kind, "ignored message"),
        }
    }

    fn start(&mut self, from: &str, request: XtRequest) {
        let id = Bytes::copy_from_slice(&xt_id(&request));
        if self.rounds.contains_key(&id) {
            warn!(%from, xt_id = %hex::encode(&id), "duplicate XTRequest of an open round ignored");
            return;
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let start = message(Payload::StartSc(StartSc {
            slot: 0,
            xt_sequence_number: sequence,
            xt_request: Some(request),
            xt_id: id.clone(),
        }));
        // The sender is a participant too, so nobody is excluded.
        let report = match self.server.broadcast(start, None) {
            Ok(report) => report,
            Err(err) => {
                warn!(%from, error = %err, "StartSC broadcast failed; XTRequest dropped");
                return;
            }
        };
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        debug!(%from, sequence, xt_id = %hex::encode(&id), participants = report.delivered.len(), "round started");
        if report.delivered.is_empty() {
            // Nobody can vote: commit needs at least one yes.
            self.decide(&id, false);
            return;
        }
        self.deadlines
            .push_back((Instant::now() + self.decision_timeout, id.clone(), sequence));
        self.rounds.insert(
            id,
            Round {
                sequence,
                participants: report.delivered.iter().map(|id| id.to_string()).collect(),
                voted: HashSet::new(),
            },
        );
    }

    fn on_vote(&mut self, from: &str, vote: Vote) {
        let id = vote.xt_id.map(|x| x.hash).unwrap_or_default();
        let Some(round) = self.rounds.get_mut(&id) else {
            // Unknown, or a late vote after the decision: decisions are final.
            self.stats.ignored_votes.fetch_add(1, Ordering::Relaxed);
            debug!(%from, xt_id = %hex::encode(&id), "vote for no open round ignored");
            return;
        };
        if !round.participants.contains(from) {
            // Joined after the StartSC went out: not asked, so not counted.
            self.stats.ignored_votes.fetch_add(1, Ordering::Relaxed);
            debug!(%from, xt_id = %hex::encode(&id), "vote from a non-participant ignored");
            return;
        }
        if !vote.vote {
            self.decide(&id, false);
            return;
        }
        round.voted.insert(from.to_owned());
        if round.voted.len() == round.participants.len() {
            self.decide(&id, true);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.deadlines.front()
            && *at <= now
        {
            let (_, id, sequence) = self.deadlines.pop_front().expect("front exists");
            if self.rounds.get(&id).is_some_and(|r| r.sequence == sequence) {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                warn!(xt_id = %hex::encode(&id), "votes missing after the decision timeout: abort");
                self.decide(&id, false);
            }
        }
    }

    fn decide(&mut self, id: &Bytes, decision: bool) {
        self.rounds.remove(id);
        let counter = if decision {
            &self.stats.committed
        } else {
            &self.stats.aborted
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let decided = message(Payload::Decided(Decided {
            xt_id: Some(XtId { hash: id.clone() }),
            decision,
        }));
        match self.server.broadcast(decided, None) {
            Ok(report) => info!(
                xt_id = %hex::encode(id),
                decision = decision_word(decision),
                recipients = report.delivered.len(),
                "decided"
            ),
            Err(err) => warn!(xt_id = %hex::encode(id), error = %err, "Decided broadcast failed"),
        }
    }
}
