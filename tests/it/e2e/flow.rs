//! Multi-peer behaviour: fan-out, exclusion, the publisher's two-phase flow,
//! restarts, replacement, admission limits and keep-alive.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::join_all;
use prost::Message as _;
use publisher_transport::{
    ClientAuth, ConnectionEvent, DisconnectReason, Message, RateLimit, SecretKey, TransportError,
    channel_handler,
    proto::{
        Payload,
        rollup::v1::{Decided, StartSc, TransactionRequest, Vote, XtId, XtRequest},
    },
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::{
    Harness, Keys, client_config, delivered, eventually, identity, next_event, number_of, numbered,
    recv, registered, server_config, vote,
};

/// 100 clients with mutual authentication and signed frames connect at once
/// and all receive one broadcast; each one's message reaches the server
/// under its own identity.
pub async fn broadcast_reaches_100_authenticated_clients<H: Harness>() {
    const CLIENTS: usize = 100;
    let keys = Keys::new(CLIENTS);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(CLIENTS);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let dial = H::dial_addr(addr);
    let connected = join_all((0..CLIENTS).map(|i| {
        let client = H::client(client_config(&format!("c{i}")), Some(keys.client_auth(i)));
        let (handler, rx) = channel_handler(4);
        client.set_handler(handler);
        let dial = dial.clone();
        async move {
            client.connect(&dial).await.unwrap();
            (client, rx)
        }
    }))
    .await;
    eventually("100 registered", || server.connections().len() == CLIENTS).await;
    assert!(server.connections().iter().all(|c| c.signed_frames));

    let report = server.broadcast(numbered(42), None).unwrap();
    assert_eq!(report.delivered.len(), CLIENTS);
    assert!(report.dropped.is_empty());
    let mut clients = Vec::new();
    for (client, mut rx) in connected {
        let got = recv(&mut rx, "the broadcast").await;
        assert_eq!(number_of(&got.message), 42);
        assert_eq!(got.message.sender_id, "publisher");
        client.send(vote(true)).await.unwrap();
        clients.push(client);
    }
    let mut senders = Vec::new();
    for _ in 0..CLIENTS {
        senders.push(recv(&mut inbound, "votes").await.from.to_string());
    }
    senders.sort();
    let mut expected: Vec<_> = (0..CLIENTS).map(identity).collect();
    expected.sort();
    assert_eq!(senders, expected);
    server.stop().await.unwrap();
}

/// The excluded identity never gets the broadcast; the others do.
pub async fn broadcast_exclusion_skips_only_the_excluded<H: Harness>() {
    let keys = Keys::new(3);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let mut inboxes = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = H::client(client_config(&format!("c{i}")), Some(keys.client_auth(i)));
        let (handler, rx) = channel_handler(8);
        client.set_handler(handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(i)).await;
        inboxes.push(rx);
        clients.push(client);
    }
    let report = server.broadcast(numbered(1), Some(&identity(1))).unwrap();
    assert_eq!(delivered(&report), [identity(0), identity(2)]);
    let report = server.broadcast(numbered(2), None).unwrap();
    assert_eq!(report.delivered.len(), 3);
    for (i, rx) in inboxes.iter_mut().enumerate() {
        if i != 1 {
            assert_eq!(number_of(&recv(rx, "broadcast 1").await.message), 1);
        }
        // Order per connection is kept: the excluded peer's first message is 2.
        assert_eq!(number_of(&recv(rx, "broadcast 2").await.message), 2);
    }
    server.stop().await.unwrap();
}

/// The publisher's two-phase flow in miniature: a client submits an
/// `XTRequest`, the publisher broadcasts `StartSC`, every client votes, the
/// publisher broadcasts `Decided`. Two transactions run; one gets a veto.
pub async fn two_phase_commit_in_miniature<H: Harness>() {
    const CLIENTS: usize = 4;
    const VETO: &[u8] = b"abort";
    let keys = Keys::new(CLIENTS);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(64);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    // The publisher: a task driving the protocol from the server's inbox.
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut sequence = 0;
            let mut votes: HashMap<Bytes, HashMap<String, bool>> = HashMap::new();
            let mut decided = 0;
            while decided < 2 {
                let got = inbound.recv().await.expect("server inbox open");
                match got.message.payload {
                    Some(Payload::XtRequest(request)) => {
                        sequence += 1;
                        let xt_id = Bytes::from(Sha256::digest(request.encode_to_vec()).to_vec());
                        votes.insert(xt_id.clone(), HashMap::new());
                        let start = StartSc {
                            slot: 1,
                            xt_sequence_number: sequence,
                            xt_request: Some(request),
                            xt_id,
                        };
                        let report = server.broadcast(message(Payload::StartSc(start)), None);
                        assert_eq!(report.unwrap().delivered.len(), CLIENTS);
                    }
                    Some(Payload::Vote(vote)) => {
                        let hash = vote.xt_id.expect("vote names its xt").hash;
                        let tally = votes.get_mut(&hash).expect("vote for a started xt");
                        assert!(tally.insert(got.from.to_string(), vote.vote).is_none());
                        if tally.len() == CLIENTS {
                            let decision = tally.values().all(|&commit| commit);
                            let decided_msg = Decided {
                                xt_id: Some(XtId { hash }),
                                decision,
                            };
                            server
                                .broadcast(message(Payload::Decided(decided_msg)), None)
                                .unwrap();
                            decided += 1;
                        }
                    }
                    other => panic!("unexpected message {other:?}"),
                }
            }
        })
    };

    // Sequencers: vote on every StartSC (no to a vetoed transaction), report
    // every decision.
    let (decisions_tx, mut decisions) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let client = H::client(client_config(&format!("c{i}")), Some(keys.client_auth(i)));
        let (handler, mut rx) = channel_handler(16);
        client.set_handler(handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(i)).await;
        let sequencer = client.clone();
        let decisions_tx = decisions_tx.clone();
        let chain = Bytes::from(vec![0, 0, 0, i as u8 + 1]);
        tokio::spawn(async move {
            while let Some(got) = rx.recv().await {
                match got.message.payload {
                    Some(Payload::StartSc(start)) => {
                        let veto = start.xt_request.iter().any(|r| {
                            r.transactions
                                .iter()
                                .any(|t| t.transaction.iter().any(|tx| tx == VETO))
                        });
                        let vote = Vote {
                            sender_chain_id: chain.clone(),
                            xt_id: Some(XtId { hash: start.xt_id }),
                            vote: !(veto && i == 0),
                        };
                        sequencer.send(message(Payload::Vote(vote))).await.unwrap();
                    }
                    Some(Payload::Decided(decided)) => {
                        decisions_tx.send((i, decided)).unwrap();
                    }
                    other => panic!("unexpected message {other:?}"),
                }
            }
        });
        clients.push(client);
    }

    let xt = |tx: &'static [u8]| XtRequest {
        transactions: vec![
            TransactionRequest {
                chain_id: Bytes::from_static(&[0, 0, 0, 1]),
                transaction: vec![Bytes::from_static(tx)],
            },
            TransactionRequest {
                chain_id: Bytes::from_static(&[0, 0, 0, 2]),
                transaction: vec![Bytes::from_static(b"rlp-tx")],
            },
        ],
    };
    let commit = xt(b"transfer");
    let abort = xt(VETO);
    clients[1]
        .send(message(Payload::XtRequest(commit.clone())))
        .await
        .unwrap();
    clients[2]
        .send(message(Payload::XtRequest(abort.clone())))
        .await
        .unwrap();

    let id_of = |request: &XtRequest| Bytes::from(Sha256::digest(request.encode_to_vec()).to_vec());
    let expected = HashMap::from([(id_of(&commit), true), (id_of(&abort), false)]);
    let mut seen: HashMap<usize, HashMap<Bytes, bool>> = HashMap::new();
    for _ in 0..2 * CLIENTS {
        let (i, decided) = tokio::time::timeout(super::STEP_TIMEOUT, decisions.recv())
            .await
            .expect("a decision")
            .unwrap();
        let hash = decided.xt_id.unwrap().hash;
        assert!(
            seen.entry(i)
                .or_default()
                .insert(hash, decided.decision)
                .is_none()
        );
    }
    for i in 0..CLIENTS {
        assert_eq!(seen[&i], expected, "client {i}");
    }
    publisher.await.unwrap();
    server.stop().await.unwrap();
}

fn message(payload: Payload) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(payload),
    }
}

/// After the server restarts on the same port, the client's automatic
/// reconnect re-establishes the session and sending works again.
pub async fn reconnect_after_server_restart_on_same_port<H: Harness>() {
    let keys = Keys::new(1);
    let first = H::server(server_config(), Some(keys.server_auth()));
    let addr = first.start().await.unwrap();
    let mut config = client_config("a");
    config.auto_reconnect = true;
    let client = H::client(config, Some(keys.client_auth(0)));
    let mut events = client.events();
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&first, &identity(0)).await;

    first.stop().await.unwrap();
    let event = next_event(&mut events, "disconnected", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    assert!(matches!(
        event,
        ConnectionEvent::Disconnected {
            reason: DisconnectReason::Requested,
            by_peer: true,
            ..
        }
    ));

    let second = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(8);
    second.set_handler(handler);
    assert_eq!(second.listen(&addr.to_string()).await.unwrap(), addr);
    let event = next_event(&mut events, "reconnected", |e| {
        matches!(e, ConnectionEvent::Connected { .. })
    })
    .await;
    assert!(matches!(
        event,
        ConnectionEvent::Connected {
            reconnect: true,
            ..
        }
    ));
    assert!(client.is_connected());
    assert!(client.stats().reconnects >= 1);
    client.send(numbered(5)).await.unwrap();
    let got = recv(&mut inbound, "message after the restart").await;
    assert_eq!(number_of(&got.message), 5);
    assert_eq!(&*got.from, identity(0));
    client.disconnect().await.unwrap();
    second.stop().await.unwrap();
}

/// A second session of an identity replaces the first, which is told
/// `Disconnect{REQUESTED, "replaced"}`.
pub async fn second_connection_of_an_identity_replaces_the_first<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let first = H::client(client_config("first"), Some(keys.client_auth(0)));
    let mut first_events = first.events();
    first.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    let second = H::client(client_config("second"), Some(keys.client_auth(0)));
    let (handler, mut rx) = channel_handler(8);
    second.set_handler(handler);
    second.connect(&H::dial_addr(addr)).await.unwrap();
    let event = next_event(&mut first_events, "replaced", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    match event {
        ConnectionEvent::Disconnected {
            reason,
            details,
            by_peer,
        } => {
            assert_eq!(reason, DisconnectReason::Requested);
            assert_eq!(details, "replaced");
            assert!(by_peer);
        }
        other => panic!("{other:?}"),
    }
    eventually("only the second remains", || {
        let connections = server.connections();
        connections.len() == 1 && connections[0].client_id.as_deref() == Some("second")
    })
    .await;
    assert!(!first.is_connected());
    assert!(second.is_connected());
    let report = server.broadcast(numbered(9), None).unwrap();
    assert_eq!(delivered(&report), [identity(0)]);
    assert_eq!(number_of(&recv(&mut rx, "broadcast").await.message), 9);
    server.stop().await.unwrap();
}

/// With a bucket of two and no refill, trusted clients come and go freely
/// (a successful handshake is never charged); two failed handshakes from the
/// same address use the bucket up, and the next connection is throttled:
/// told why where the transport lets a refusal say so (TCP, gRPC), refused
/// before its transport handshake otherwise (QUIC).
pub async fn per_ip_throttle_charges_only_failures<H: Harness>() {
    let keys = Keys::new(3);
    let config = server_config().with_rate_limit(Some(RateLimit {
        burst: 2,
        per_second: 0.0,
    }));
    let server = H::server(config, Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = H::client(client_config(&format!("c{i}")), Some(keys.client_auth(i)));
        client.connect(&H::dial_addr(addr)).await.unwrap();
        clients.push(client);
    }
    let counted = |label: &str| {
        server
            .metrics()
            .connections_total
            .with_label_values(&[label])
            .get()
    };
    for attempt in 1..=2 {
        let stranger = H::client(
            client_config("stranger"),
            Some(ClientAuth::new(Arc::new(SecretKey::generate()))),
        );
        let refused = stranger.connect(&H::dial_addr(addr)).await;
        assert!(refused.is_err(), "an untrusted key got in: {refused:?}");
        // Counted once charged.
        eventually("the failure charged", || {
            counted("handshake_failed") == attempt
        })
        .await;
    }
    let fourth = H::client(client_config("c0"), Some(keys.client_auth(0)));
    let refused = fourth.connect(&H::dial_addr(addr)).await;
    if H::EXPLAINS_EARLY_REFUSALS {
        match &refused {
            Err(
                err @ TransportError::Refused {
                    reason: DisconnectReason::Throttled,
                    ..
                },
            ) => assert!(err.to_string().contains("throttled"), "{err}"),
            other => panic!("expected Refused(Throttled), got {other:?}"),
        }
    } else {
        assert!(refused.is_err(), "{refused:?}");
    }
    assert_eq!(counted("refused_throttled"), 1);
    // The admitted ones are unaffected.
    eventually("three registered", || server.connections().len() == 3).await;
    for client in &clients {
        client.send(vote(true)).await.unwrap();
    }
    server.stop().await.unwrap();
}

/// At `max_connections`, another identity is refused with `TOO_MANY_PEERS`.
pub async fn max_connections_refuses_another_identity<H: Harness>() {
    let keys = Keys::new(2);
    let server = H::server(
        server_config().with_max_connections(1),
        Some(keys.server_auth()),
    );
    let (handler, mut inbound) = channel_handler(8);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let first = H::client(client_config("c0"), Some(keys.client_auth(0)));
    first.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    let second = H::client(client_config("c1"), Some(keys.client_auth(1)));
    match second.connect(&H::dial_addr(addr)).await {
        Err(TransportError::Refused {
            reason: DisconnectReason::TooManyPeers,
            ..
        }) => {}
        other => panic!("expected Refused(TooManyPeers), got {other:?}"),
    }
    first.send(vote(true)).await.unwrap();
    assert_eq!(&*recv(&mut inbound, "vote").await.from, identity(0));
    assert_eq!(server.connections().len(), 1);
    server.stop().await.unwrap();
}

/// A client that answers the server's pings outlives many read timeouts.
pub async fn client_answering_pings_is_not_evicted<H: Harness>() {
    let keys = Keys::new(1);
    let mut config = server_config();
    config.read_timeout = Duration::from_millis(300);
    config.ping_interval = Some(Duration::from_millis(100));
    let server = H::server(config, Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(8);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let mut client_config = client_config("a");
    client_config.ping_interval = None; // only the server's pings keep it alive
    let client = H::client(client_config, Some(keys.client_auth(0)));
    let mut events = client.events();
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    let connection = server.manager().get(&identity(0)).unwrap();

    // Over three read timeouts with nothing but pings and pongs.
    let quiet = tokio::time::sleep(Duration::from_millis(1_000));
    tokio::select! {
        _ = quiet => {}
        _ = connection.closed() => panic!("evicted: {:?}", connection.end()),
    }
    assert!(client.is_connected());
    assert!(
        std::iter::from_fn(|| events.try_recv().ok())
            .all(|e| !matches!(e, ConnectionEvent::Disconnected { .. }))
    );
    client.send(vote(true)).await.unwrap();
    let got = recv(&mut inbound, "vote").await;
    assert_eq!(got.connection_id, connection.id(), "the same session");
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
