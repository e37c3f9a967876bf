//! Peers that misbehave without breaking the framing: too slow to read,
//! silent before the handshake, idle after it. Raw peers are dialled with
//! the back-end's own `dial`, so these run on every back-end.

use std::time::{Duration, Instant};

use prost::Message as _;
use publisher_transport::{
    DisconnectReason, Inbound, Message,
    backend::Backend,
    channel_handler,
    proto::Payload,
    session::{FrameReader, FrameWriter},
};

use super::{
    Harness, Keys, STEP_TIMEOUT, broadcast_until_dropped, client_config, delivered, eventually,
    identity, number_of, numbered, recv, registered, server_config,
};

/// A client whose handler never returns stops reading; once its socket
/// buffers and its server-side queue fill, a broadcast drops it, while the
/// fast clients receive every broadcast reported delivered to them, then
/// keep receiving.
pub async fn slow_consumer_is_dropped_others_keep_receiving<H: Harness>() {
    let mut config = server_config();
    config.send_queue_capacity = 16;
    // The dropped peer's writer stays blocked in its write until this bound.
    config.write_timeout = Duration::from_secs(2);
    config.stop_timeout = Duration::from_secs(2);
    // No authentication: signing megabytes in a debug build only adds time.
    let server = H::server(config, None);
    let addr = server.start().await.unwrap();

    let slow = H::client(client_config("slow"), None);
    slow.set_handler(std::sync::Arc::new(|_: Inbound| {
        futures::future::pending::<Result<(), publisher_transport::HandlerError>>()
    }));
    slow.connect(&H::dial_addr(addr)).await.unwrap();
    eventually("slow registered", || server.connections().len() == 1).await;
    let slow_identity = server.connections()[0].identity.clone();

    let mut fast = Vec::new();
    let mut clients = Vec::new();
    for i in 0..2 {
        let client = H::client(client_config(&format!("fast{i}")), None);
        let (handler, rx) = channel_handler(4);
        client.set_handler(handler);
        client.connect(&H::dial_addr(addr)).await.unwrap();
        clients.push(client);
        fast.push(rx);
    }
    eventually("all registered", || server.connections().len() == 3).await;
    let mut fast: Vec<_> = server
        .connections()
        .into_iter()
        .map(|c| c.identity)
        .filter(|id| *id != slow_identity)
        .zip(fast)
        .collect();
    // Which receiver belongs to which identity does not matter: every fast
    // peer gets every broadcast.
    let sent = broadcast_until_dropped(&server, &slow_identity, &mut fast, 512 * 1024).await;
    assert!(sent > 16, "the queue alone holds 16 ({sent})");
    let slow_connection = server.manager().get(&slow_identity);
    assert!(slow_connection.is_none_or(|c| c.is_closed()));

    for n in sent + 1..=sent + 5 {
        let report = server.broadcast(numbered(n), None).unwrap();
        assert!(!delivered(&report).contains(&slow_identity), "{report:?}");
        for (identity, rx) in &mut fast {
            assert!(delivered(&report).contains(identity));
            assert_eq!(number_of(&recv(rx, "after the drop").await.message), n);
        }
    }
    server.stop().await.unwrap();
}

/// A peer that connects and never sends its handshake is cut off after the
/// handshake timeout; a legitimate client's handshake completes meanwhile.
pub async fn silent_peer_dropped_after_handshake_timeout<H: Harness>() {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
    let keys = Keys::new(1);
    let mut config = server_config();
    config.handshake_timeout = HANDSHAKE_TIMEOUT;
    let server = H::server(config, Some(keys.server_auth()));
    let addr = server.start().await.unwrap();

    let dialled = Instant::now();
    let silent = H::client_backend(&client_config("silent"))
        .dial(&H::dial_addr(addr))
        .await
        .unwrap();
    let mut reader = silent.reader;
    let cut_off = tokio::spawn(async move {
        // Whatever arrives (at most a Disconnect), the pipe must end.
        while let Some(Ok(_)) = reader.read_frame().await {}
        Instant::now()
    });

    let client = H::client(client_config("legit"), Some(keys.client_auth(0)));
    client.connect(&H::dial_addr(addr)).await.unwrap();
    let legit_done = Instant::now();
    registered(&server, &identity(0)).await;

    let cut_off = tokio::time::timeout(STEP_TIMEOUT, cut_off)
        .await
        .expect("the silent peer is cut off")
        .unwrap();
    assert!(legit_done < cut_off, "the legit handshake did not wait");
    let silent_for = cut_off - dialled;
    assert!(silent_for >= HANDSHAKE_TIMEOUT - Duration::from_millis(50));
    // Far below the 5 s default: the configured timeout applies.
    assert!(silent_for < Duration::from_secs(4), "{silent_for:?}");
    drop(silent.writer);
    assert!(client.is_connected());
    assert_eq!(server.connections().len(), 1);
    server.stop().await.unwrap();
}

/// A peer of an auth-less server that sends nothing is evicted after the
/// read timeout with `Disconnect{READ_TIMEOUT}`, then the pipe ends.
pub async fn idle_peer_evicted_with_read_timeout<H: Harness>() {
    const READ_TIMEOUT: Duration = Duration::from_millis(300);
    let mut config = server_config();
    config.read_timeout = READ_TIMEOUT;
    config.ping_interval = None;
    let server = H::server(config, None);
    let addr = server.start().await.unwrap();

    let dialled = Instant::now();
    let mut idle = H::client_backend(&client_config("idle"))
        .dial(&H::dial_addr(addr))
        .await
        .unwrap();
    // One Ping, then silence: on stream transports (QUIC) a peer that never
    // writes is never seen by the server at all.
    let ping = Message {
        sender_id: String::new(),
        payload: Some(Payload::Ping(
            publisher_transport::proto::rollup::v1::Ping { timestamp: 1 },
        )),
    };
    let frame = publisher_transport::codec::frame_message(&ping, 1 << 20).unwrap();
    idle.writer.write_segments(&[frame]).await.unwrap();
    let mut reader = idle.reader;
    let disconnect = loop {
        let body = tokio::time::timeout(STEP_TIMEOUT, reader.read_frame())
            .await
            .expect("evicted")
            .expect("a frame before the end")
            .expect("a well-formed frame");
        match Message::decode(body).unwrap().payload {
            Some(Payload::Pong(_)) => continue,
            Some(Payload::Disconnect(disconnect)) => break disconnect,
            other => panic!("expected Disconnect, got {other:?}"),
        }
    };
    let waited = dialled.elapsed();
    assert_eq!(
        DisconnectReason::from_proto(disconnect.reason),
        DisconnectReason::ReadTimeout
    );
    assert!(
        waited >= READ_TIMEOUT - Duration::from_millis(50),
        "{waited:?}"
    );
    let end = tokio::time::timeout(STEP_TIMEOUT, reader.read_frame())
        .await
        .expect("the pipe ends after the Disconnect");
    assert!(!matches!(end, Some(Ok(_))), "nothing after the Disconnect");
    eventually("unregistered", || server.connections().is_empty()).await;
    drop(idle.writer);
    server.stop().await.unwrap();
}
