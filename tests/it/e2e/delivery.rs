//! Delivery acknowledgements (docs/PROTOCOL.md §5.1): `send_confirmed`
//! resolves only once the peer's handler has the message, fails when the
//! connection ends first, and is refused where the session cannot confirm.

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    ClientAuth, DisconnectReason, Handled, Handler, Inbound, InboundBatch, ServerAuth,
    TransportError, TrySendError, channel_handler,
};
use tokio::sync::{Semaphore, mpsc};

use super::{
    Harness, Keys, STEP_TIMEOUT, client_config, identity, number_of, numbered, recv, registered,
    server_config,
};

/// Forwards each message's number, then takes a permit of `gate` before
/// returning (permits are never given back, so each opens one message):
/// a handler that has the message but has not finished with it.
struct GatedHandler {
    seen: mpsc::UnboundedSender<u64>,
    gate: Arc<Semaphore>,
}

impl Handler for GatedHandler {
    fn handle(&self, inbound: Inbound) -> Handled {
        let _ = self.seen.send(number_of(&inbound.message));
        let gate = self.gate.clone();
        Handled::Pending(Box::pin(async move {
            let _ = gate.acquire_owned().await.map(|permit| permit.forget());
            Ok(())
        }))
    }
}

/// A started server whose handler is a [`GatedHandler`].
async fn gated_server<H: Harness>(
    keys: &Keys,
) -> (
    super::Server<H>,
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<u64>,
    Arc<Semaphore>,
) {
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (seen, seen_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    server.set_handler(Arc::new(GatedHandler {
        seen,
        gate: gate.clone(),
    }));
    let addr = server.start().await.unwrap();
    (server, addr, seen_rx, gate)
}

/// Confirmed sends in both directions, signed and unsigned sessions, mixed
/// with plain sends: each `Ok` comes after the handler has the message and
/// everything sent before it.
pub async fn confirmed_sends_follow_the_handler<H: Harness>() {
    for signed in [true, false] {
        let keys = Keys::new(1);
        let server = H::server(server_config(), Some(keys.server_auth()));
        let (handler, mut at_server) = channel_handler(1024);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = H::client(
            client_config("a"),
            Some(ClientAuth {
                signed_frames: signed,
                ..keys.client_auth(0)
            }),
        );
        let (client_handler, mut at_client) = channel_handler(1024);
        client.set_handler(client_handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        registered(&server, &identity(0)).await;

        for round in 0..20u64 {
            // Plain sends first: a confirmation covers what preceded it.
            for k in 0..5 {
                client.send(numbered(round * 10 + k)).await.unwrap();
            }
            client
                .send_confirmed(numbered(round * 10 + 5))
                .await
                .unwrap();
            for k in 0..=5 {
                let got = at_server.try_recv().unwrap_or_else(|_| {
                    panic!(
                        "signed {signed}: message {} confirmed but not handled",
                        round * 10 + k
                    )
                });
                assert_eq!(number_of(&got.message), round * 10 + k);
            }
        }
        // Broadcasts count like unicast messages.
        let peer = identity(0);
        for n in 0..20 {
            let report = server.broadcast(numbered(1000 + n), None).unwrap();
            assert_eq!(report.delivered.len(), 1);
            server.send_confirmed(&peer, numbered(n)).await.unwrap();
            for expected in [1000 + n, n] {
                let got = at_client.try_recv().expect("confirmed, so handled");
                assert_eq!(number_of(&got.message), expected);
            }
        }
        // Many in flight at once, resolved in any order, all handled.
        let sends = (100..164).map(|n| client.send_confirmed(numbered(n)));
        for result in futures::future::join_all(sends).await {
            result.unwrap();
        }
        let mut handled = 0;
        while at_server.try_recv().is_ok() {
            handled += 1;
        }
        assert_eq!(handled, 64, "signed {signed}");
        assert!(at_client.try_recv().is_err(), "nothing unexpected arrived");
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    }
}

/// A handler that holds the message holds its confirmation; a connection
/// that ends first turns it into `Unconfirmed`.
pub async fn confirmation_waits_for_the_handler_and_fails_when_the_session_ends<H: Harness>() {
    let keys = Keys::new(1);
    let (server, addr, mut seen_rx, gate) = gated_server::<H>(&keys).await;
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    let first = tokio::spawn({
        let client = client.clone();
        async move { client.send_confirmed(numbered(1)).await }
    });
    let handled = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv()).await;
    assert_eq!(handled.unwrap(), Some(1), "the handler has it");
    // The handler has not returned: no confirmation may arrive meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished(),
        "confirmed before the handler returned"
    );
    gate.add_permits(1);
    tokio::time::timeout(STEP_TIMEOUT, first)
        .await
        .expect("confirmed once the handler returned")
        .unwrap()
        .unwrap();

    // Now a message the handler never finishes, and the session ends.
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.send_confirmed(numbered(2)).await }
    });
    let handled = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv()).await;
    assert_eq!(handled.unwrap(), Some(2));
    let connection = server.manager().get(&identity(0)).expect("connected");
    connection.close(DisconnectReason::InternalError, "test ends the session");
    let result = tokio::time::timeout(STEP_TIMEOUT, second)
        .await
        .expect("the sender learns the outcome")
        .unwrap();
    match result {
        Err(TransportError::Unconfirmed { peer, .. }) => assert!(!peer.is_empty()),
        other => panic!("expected Unconfirmed, got {other:?}"),
    }
    let err = client.send_confirmed(numbered(3)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    // Let every held or later message through.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    server.stop().await.unwrap();
}

/// Sessions that did not negotiate acknowledgements refuse `send_confirmed`
/// with a typed error, and plain `send` still works there.
pub async fn sessions_without_acks_refuse_confirmation<H: Harness>() {
    let keys = Keys::go_compatible(1);
    let cases: [(&str, Option<ServerAuth>, Option<ClientAuth>); 4] = [
        (
            "go-mode client",
            Some(keys.server_auth()),
            Some(ClientAuth {
                extensions: false,
                ..ClientAuth::new(keys.clients[0].clone())
            }),
        ),
        (
            "client without acks",
            Some(keys.server_auth()),
            Some(ClientAuth {
                delivery_acks: false,
                ..keys.client_auth(0)
            }),
        ),
        (
            "server without acks",
            Some(ServerAuth {
                delivery_acks: false,
                ..keys.server_auth()
            }),
            Some(keys.client_auth(0)),
        ),
        ("no authentication", None, None),
    ];
    for (case, server_auth, client_auth) in cases {
        let authenticated = server_auth.is_some();
        let server = H::server(server_config(), server_auth);
        let (handler, mut inbound) = channel_handler(16);
        server.set_handler(handler);
        let addr = server.start().await.unwrap();
        let client = H::client(client_config("a"), client_auth);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        let err = client.send_confirmed(numbered(1)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::ConfirmationUnavailable { .. }),
            "{case}: {err}"
        );
        client.send(numbered(2)).await.unwrap();
        let got = recv(&mut inbound, case).await;
        assert_eq!(number_of(&got.message), 2, "{case}");
        let peer = got.from.to_string();
        let err = server.send_confirmed(&peer, numbered(3)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::ConfirmationUnavailable { .. }),
            "{case}: {err}"
        );
        if authenticated {
            assert_eq!(peer, identity(0), "{case}");
        }
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    }
}

/// `try_send` queues without waiting; on a full queue it hands the message
/// back and the connection stays up, and once the peer reads again every
/// queued message arrives.
pub async fn try_send_hands_back_what_a_full_queue_cannot_take<H: Harness>() {
    let keys = Keys::new(1);
    let (server, addr, mut seen_rx, gate) = gated_server::<H>(&keys).await;
    let mut config = client_config("a");
    config.send_queue_capacity = 2;
    let client = H::client(config, Some(keys.client_auth(0)));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    // The handler holds the first message, so the server stops reading;
    // 256 KiB messages then fill the pipe and the queue within a few hundred.
    let big = |n: u64| super::block(n, bytes::Bytes::from(vec![7u8; 256 * 1024]));
    let mut queued = 0u64;
    let handed_back = loop {
        match client.try_send(big(queued)) {
            Ok(()) => queued += 1,
            Err(TrySendError::Full(message)) => break message,
            Err(err) => panic!("unexpected: {err}"),
        }
        assert!(queued < 4096, "the queue never filled");
    };
    assert_eq!(
        number_of(&handed_back),
        queued,
        "the refused message comes back"
    );
    assert!(client.is_connected(), "a full queue does not disconnect");

    // Let the server read again: everything queued arrives, in order.
    for expected in 0..queued {
        let got = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv()).await;
        assert_eq!(got.unwrap(), Some(expected));
        gate.add_permits(1);
    }
    client.send(*handed_back).await.unwrap();
    let got = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv()).await;
    assert_eq!(got.unwrap(), Some(queued));
    gate.add_permits(1);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// A peer that keeps sending while its handler is stuck answers no pings
/// and sends no acks, yet never looks idle: the confirmation deadline (the
/// read timeout) ends the session, and the wait, with `Unconfirmed`.
pub async fn a_peer_that_stops_acknowledging_is_disconnected<H: Harness>() {
    let keys = Keys::new(1);
    let (server, addr, mut seen_rx, gate) = gated_server::<H>(&keys).await;
    let mut config = client_config("a");
    config.read_timeout = Duration::from_secs(1);
    config.ping_interval = Some(Duration::from_millis(200));
    let client = H::client(config, Some(keys.client_auth(0)));
    let (client_handler, _at_client) = channel_handler(1024);
    client.set_handler(client_handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    let confirmed = tokio::spawn({
        let client = client.clone();
        async move { client.send_confirmed(numbered(1)).await }
    });
    let handled = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv()).await;
    assert_eq!(handled.unwrap(), Some(1), "the handler has it and holds it");
    // The server keeps talking, so the client never sees an idle link.
    let chatter = async {
        for n in 0..100 {
            let _ = server.broadcast(numbered(1000 + n), None);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let result = tokio::select! {
        result = confirmed => result.unwrap(),
        () = chatter => panic!("still waiting for a confirmation after 10 s"),
    };
    match result {
        Err(TransportError::Unconfirmed { reason, .. }) => {
            assert_eq!(reason, DisconnectReason::ReadTimeout)
        }
        other => panic!("expected Unconfirmed, got {other:?}"),
    }
    // Let every held or later message through.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    server.stop().await.unwrap();
}

/// Takes every message of a batch at once, notes its number and where its
/// `sender_id` lives, and gives the message back for reuse.
struct RecyclingHandler {
    seen: mpsc::UnboundedSender<(u64, usize)>,
}

impl Handler for RecyclingHandler {
    fn handle(&self, _: Inbound) -> Handled {
        Handled::Done(Err("only batches are expected".into()))
    }

    fn handle_batch(&self, batch: &mut InboundBatch) -> Handled {
        let messages: Vec<Inbound> = batch.drain().collect();
        for inbound in messages {
            let _ = self.seen.send((
                number_of(&inbound.message),
                inbound.message.sender_id.as_ptr() as usize,
            ));
            batch.recycle(inbound.message);
        }
        Handled::Done(Ok(()))
    }
}

/// A handler that takes whole batches gets every message once, in order,
/// and messages it gives back are decoded into again (their `sender_id`
/// buffers come back), in plain and signed sessions.
pub async fn a_batch_handler_gets_everything_in_order_and_reuses_messages<H: Harness>() {
    const MESSAGES: u64 = 3_000;
    for signed in [false, true] {
        let keys = Keys::new(1);
        let server = H::server(server_config(), Some(keys.server_auth()));
        let (seen, mut seen_rx) = mpsc::unbounded_channel();
        server.set_handler(Arc::new(RecyclingHandler { seen }));
        let addr = server.start().await.unwrap();
        let client = H::client(
            client_config("a-client-id-long-enough-to-live-on-the-heap"),
            Some(ClientAuth {
                signed_frames: signed,
                ..keys.client_auth(0)
            }),
        );
        client.connect(&H::dial_addr(addr)).await.unwrap();
        for n in 0..MESSAGES {
            client.send(numbered(n)).await.unwrap();
        }
        let mut buffers = std::collections::HashSet::new();
        let mut reused = 0;
        for expected in 0..MESSAGES {
            let (n, buffer) = tokio::time::timeout(STEP_TIMEOUT, seen_rx.recv())
                .await
                .expect("message in time")
                .expect("handler alive");
            assert_eq!(n, expected, "signed {signed}: out of order");
            if !buffers.insert(buffer) {
                reused += 1;
            }
        }
        // Until the recycled pool has grown to the most that waits for the
        // handler at once (under 256 messages, plus a signed frame of up to
        // 1,024), some messages have nothing recycled to decode into.
        let warming = 256 + publisher_transport::session::SIGNED_BATCH_MAX_MESSAGES as u64;
        assert!(
            reused >= MESSAGES - warming,
            "signed {signed}: only {reused} of {MESSAGES} messages reused a buffer"
        );
        client.disconnect().await.unwrap();
        server.stop().await.unwrap();
    }
}
