//! Requests and replies (docs/PROTOCOL.md §5.2): `request` returns the
//! peer's `Inbound::reply`, in both directions; timeouts and lost
//! connections fail the caller at once; Go-mode sessions refuse requests
//! without sending anything.

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    ClientAuth, ClientConfig, Handler, HandlerError, Inbound, TransportError, channel_handler,
};

use super::{
    Client, Harness, Keys, STEP_TIMEOUT, Server, client_config, eventually, identity, number_of,
    numbered, recv, registered, server_config,
};

/// A started server, and client 0 of `keys` (with `config` and `auth`)
/// connected to it; `[at_server, at_client]` are their handlers.
async fn connected<H: Harness>(
    keys: &Keys,
    config: ClientConfig,
    auth: ClientAuth,
    [at_server, at_client]: [Arc<dyn Handler>; 2],
) -> (Server<H>, Client<H>) {
    let server = H::server(server_config(), Some(keys.server_auth()));
    server.set_handler(at_server);
    let addr = server.start().await.unwrap();
    let client = H::client(config, Some(auth));
    client.set_handler(at_client);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;
    (server, client)
}

/// A handler answering request `n` with message `2n + 1`, and forwarding
/// everything else (replies must never arrive here) to the returned channel.
fn echo_handler() -> (
    Arc<dyn Handler>,
    tokio::sync::mpsc::UnboundedReceiver<Inbound>,
) {
    let (others, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |inbound: Inbound| {
        let others = others.clone();
        async move {
            if inbound.is_request() {
                let n = number_of(&inbound.message);
                inbound.reply(numbered(2 * n + 1)).await?;
            } else {
                let _ = others.send(inbound);
            }
            Ok::<(), HandlerError>(())
        }
    };
    (Arc::new(handler), rx)
}

/// Unknown replies a side has counted.
fn unknown_replies(metrics: &publisher_transport::metrics::Metrics) -> u64 {
    metrics
        .errors_total
        .with_label_values(&["unknown_reply", "read"])
        .get()
}

/// A thousand requests in flight at once, signed and unsigned sessions: each
/// gets its own answer, none reaches a handler as a message, and the
/// delivery counts of both sides still agree afterwards.
pub async fn a_thousand_requests_in_flight_are_all_answered<H: Harness>() {
    for signed in [true, false] {
        let keys = Keys::new(1);
        let (server_handler, mut at_server) = echo_handler();
        let (client_handler, mut at_client) = echo_handler();
        let auth = ClientAuth {
            signed_frames: signed,
            ..keys.client_auth(0)
        };
        let (server, client) = connected::<H>(
            &keys,
            client_config("a"),
            auth,
            [server_handler, client_handler],
        )
        .await;

        let requests = (0..1000u64).map(|n| client.request(numbered(n), STEP_TIMEOUT));
        let replies = futures::future::join_all(requests).await;
        for (n, reply) in replies.into_iter().enumerate() {
            let reply = reply.unwrap_or_else(|err| panic!("signed {signed}: request {n}: {err}"));
            assert_eq!(
                number_of(&reply.message),
                2 * n as u64 + 1,
                "signed {signed}"
            );
            assert!(!reply.is_request());
        }
        // The same through the object-safe trait.
        let dyn_client: &dyn publisher_transport::Client = &client;
        let reply = dyn_client.request(numbered(5000), STEP_TIMEOUT).await;
        assert_eq!(number_of(&reply.unwrap().message), 10_001);
        let connection = client.connection().unwrap();
        assert!(connection.takes_requests());
        assert_eq!(connection.pending_requests(), 0);
        // Replies were counted as dispatched on each side: confirmations in
        // both directions still resolve.
        client.send_confirmed(numbered(7)).await.unwrap();
        server
            .send_confirmed(&identity(0), numbered(8))
            .await
            .unwrap();
        assert_eq!(number_of(&recv_unbounded(&mut at_server).await.message), 7);
        assert_eq!(number_of(&recv_unbounded(&mut at_client).await.message), 8);
        assert!(at_server.try_recv().is_err() && at_client.try_recv().is_err());
        assert_eq!(unknown_replies(client.metrics()), 0);
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    }
}

async fn recv_unbounded(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Inbound>) -> Inbound {
    tokio::time::timeout(STEP_TIMEOUT, rx.recv())
        .await
        .expect("a message in time")
        .expect("the handler lives")
}

/// The server requests from a client, whose handler answers; `reply` on a
/// message that is not a request is refused.
pub async fn the_server_requests_from_a_client<H: Harness>() {
    let keys = Keys::new(1);
    let (server_handler, mut at_server) = channel_handler(16);
    let (client_handler, _at_client) = echo_handler();
    let auth = keys.client_auth(0);
    let (server, client) = connected::<H>(
        &keys,
        client_config("a"),
        auth,
        [server_handler, client_handler],
    )
    .await;

    let reply = server
        .request(&identity(0), numbered(20), STEP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(number_of(&reply.message), 41);
    assert_eq!(&*reply.from, identity(0));
    let dyn_server: &dyn publisher_transport::Server = &server;
    let peer = identity(0);
    let reply = dyn_server.request(&peer, numbered(30), STEP_TIMEOUT).await;
    assert_eq!(number_of(&reply.unwrap().message), 61);

    client.send(numbered(1)).await.unwrap();
    let plain = recv(&mut at_server, "a plain message").await;
    assert!(!plain.is_request());
    let refused = plain.reply(numbered(2)).await.unwrap_err();
    assert!(
        matches!(refused, TransportError::NotARequest { ref peer } if *peer == identity(0)),
        "{refused:?}"
    );
    let missing = server
        .request("nobody", numbered(3), STEP_TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, TransportError::PeerNotFound { .. }),
        "{missing:?}"
    );
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// A peer that never answers: the caller gets `RequestTimeout` and the
/// entry is gone; the answer given later is ignored and counted, and does
/// not reach the handler.
pub async fn an_unanswered_request_times_out_and_a_late_reply_is_ignored<H: Harness>() {
    let keys = Keys::new(1);
    let (server_handler, mut at_server) = channel_handler(16);
    let (client_handler, mut at_client) = channel_handler(16);
    let auth = keys.client_auth(0);
    let (server, client) = connected::<H>(
        &keys,
        client_config("a"),
        auth,
        [server_handler, client_handler],
    )
    .await;

    let wait = Duration::from_millis(200);
    let outcome = tokio::time::timeout(STEP_TIMEOUT, client.request(numbered(5), wait))
        .await
        .expect("the request's own timeout ends it");
    assert!(
        matches!(outcome, Err(TransportError::RequestTimeout { after, .. }) if after == wait),
        "{outcome:?}"
    );
    let connection = client.connection().unwrap();
    assert_eq!(
        connection.pending_requests(),
        0,
        "the timeout removed the entry"
    );

    let request = recv(&mut at_server, "the request").await;
    assert!(request.is_request());
    assert_eq!(number_of(&request.message), 5);
    request.reply(numbered(6)).await.unwrap();
    eventually("the late reply counted", || {
        unknown_replies(client.metrics()) == 1
    })
    .await;
    // Still a working session, and the late reply never reached the handler.
    server.send(&identity(0), numbered(9)).await.unwrap();
    assert_eq!(
        number_of(&recv(&mut at_client, "a plain message").await.message),
        9
    );
    assert!(at_client.try_recv().is_err());
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// Requests waiting when the connection ends fail at once, long before
/// their own timeout; the number of waiting requests is bounded.
pub async fn a_lost_connection_fails_waiting_requests<H: Harness>() {
    let keys = Keys::new(1);
    let (server_handler, mut at_server) = channel_handler(64);
    let (client_handler, _at_client) = channel_handler(1);
    let mut config = client_config("a");
    config.send_queue_capacity = 8;
    let auth = keys.client_auth(0);
    let (server, client) =
        connected::<H>(&keys, config, auth, [server_handler, client_handler]).await;
    let client = Arc::new(client);

    // Far beyond the test's own bound: only the connection's end can end them.
    let patient = Duration::from_secs(3600);
    let waiting: Vec<_> = (0..8u64)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.request(numbered(n), patient).await })
        })
        .collect();
    for _ in 0..8 {
        assert!(recv(&mut at_server, "a request").await.is_request());
    }
    let connection = client.connection().unwrap();
    assert_eq!(connection.pending_requests(), 8);
    let full = client.request(numbered(9), patient).await.unwrap_err();
    assert!(
        matches!(full, TransportError::TooManyRequests { limit: 8, .. }),
        "{full:?}"
    );

    server.stop().await.unwrap();
    for task in waiting {
        let outcome = tokio::time::timeout(STEP_TIMEOUT, task)
            .await
            .expect("failed as soon as the connection ended")
            .unwrap();
        assert!(
            matches!(outcome, Err(TransportError::ConnectionClosed { .. })),
            "{outcome:?}"
        );
    }
    assert_eq!(connection.pending_requests(), 0);
}

/// Go-mode sessions (and sessions without authentication) did not negotiate
/// requests: both sides refuse them with a typed error and send nothing.
pub async fn go_mode_sessions_refuse_requests_without_sending<H: Harness>() {
    let keys = Keys::go_compatible(1);
    let (server_handler, mut at_server) = channel_handler(16);
    let (client_handler, mut at_client) = channel_handler(16);
    let auth = ClientAuth {
        extensions: false,
        server_key: None,
        ..keys.client_auth(0)
    };
    let (server, client) = connected::<H>(
        &keys,
        client_config("a"),
        auth,
        [server_handler, client_handler],
    )
    .await;
    assert!(!client.connection().unwrap().takes_requests());

    let refused = client.request(numbered(1), STEP_TIMEOUT).await.unwrap_err();
    assert!(
        matches!(refused, TransportError::RequestsUnavailable { .. }),
        "{refused:?}"
    );
    let refused = server
        .request(&identity(0), numbered(2), STEP_TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, TransportError::RequestsUnavailable { ref peer } if *peer == identity(0)),
        "{refused:?}"
    );
    // Nothing went out: the first message each side receives is the next one sent.
    client.send(numbered(3)).await.unwrap();
    server.send(&identity(0), numbered(4)).await.unwrap();
    assert_eq!(
        number_of(&recv(&mut at_server, "a message").await.message),
        3
    );
    assert_eq!(
        number_of(&recv(&mut at_client, "a message").await.message),
        4
    );
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
