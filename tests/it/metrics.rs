//! The /metrics endpoint, scraped over HTTP during real traffic: every metric
//! the crate documents must move.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use publisher_transport::{
    ClientAuth, ClientConfig, FrameCodec, Message, RateLimit, RetryPolicy, SecretKey, ServerAuth,
    ServerConfig, TcpClient, TcpServer, TrustStore, channel_handler,
    codec::RawFrame,
    metrics,
    proto::{
        Payload,
        rollup::v1::{Vote, XtId},
        transport::v1::SignedFrame,
    },
    retry::Jitter,
    signed::{Audience, seal},
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, sync::oneshot, time::timeout};
use tokio_util::codec::Framed;

use crate::raw_peer::signed_handshake;

/// Sum of every sample of `name` (all label sets), from the text format.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut totals = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let name = series.split('{').next().unwrap().to_owned();
        *totals.entry(name.clone()).or_insert(0.0) += value.parse::<f64>().expect("numeric sample");
        if let Some(labels) = series.split_once('{').map(|(_, l)| l.trim_end_matches('}')) {
            *totals.entry(series_key(&name, labels)).or_insert(0.0) +=
                value.parse::<f64>().unwrap();
        }
    }
    totals
}

/// `name{a="1",b="2"}` with labels sorted, so lookups need not know the order.
fn series_key(name: &str, labels: &str) -> String {
    let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    labels.sort_unstable();
    format!("{name}{{{}}}", labels.join(","))
}

async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    // Bodies may be chunked; keep only sample and comment lines.
    let body: String = body
        .lines()
        .filter(|l| l.starts_with('#') || l.starts_with("publisher_"))
        .map(|l| format!("{l}\n"))
        .collect();
    parse(&body)
}

fn vote(n: u8) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[1]),
            xt_id: Some(XtId {
                hash: Bytes::from(vec![n; 32]),
            }),
            vote: true,
        })),
    }
}

#[tokio::test]
async fn every_metric_moves_under_real_traffic() {
    timeout(Duration::from_secs(60), run())
        .await
        .expect("test timed out");
}

async fn run() {
    let server_key = Arc::new(SecretKey::generate());
    let client_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client_key.public_key().clone()).unwrap();
    // The raw sessions below get an identity of their own, so they never
    // replace the real client's connection.
    let raw_key = Arc::new(SecretKey::generate());
    trust.add("raw", raw_key.public_key().clone()).unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            // One failed handshake empties the bucket; the next is throttled.
            .with_rate_limit(Some(RateLimit {
                burst: 1,
                per_second: 0.0,
            })),
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    let (handler, mut inbound) = channel_handler(1024);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    let client = TcpClient::tcp(
        ClientConfig::default()
            .with_client_id("client-a")
            .with_reconnect_delay(Duration::from_millis(10)),
        Some(ClientAuth::new(client_key.clone()).with_server_key(server_key.public_key().clone())),
    );
    let (stop_metrics, stopped) = oneshot::channel::<()>();
    let metrics_addr = metrics::serve(
        vec![server.metrics().clone(), client.metrics().clone()],
        "127.0.0.1:0",
        async {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    let before = scrape(metrics_addr).await;

    // A failed attempt then success: retries are counted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let quick = RetryPolicy::go_connect(Duration::from_millis(1), 1).with_jitter(Jitter::None);
    assert!(
        client
            .connect_with_policy(&closed_addr.to_string(), &quick)
            .await
            .is_err()
    );
    client.connect(&addr.to_string()).await.unwrap();

    // Traffic both ways: unicast batches and a broadcast.
    for n in 0..50 {
        client.send(vote(n)).await.unwrap();
    }
    for _ in 0..50 {
        timeout(Duration::from_secs(5), inbound.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let report = server.broadcast(vote(99), None).unwrap();
    assert_eq!(report.delivered.len(), 1);

    // A forged and then a replayed signed frame, over a raw socket.
    forged_and_replayed_frames(addr, &raw_key, &server_key).await;

    // An untrusted key: a refused handshake, charged to 127.0.0.1's bucket
    // (before it is counted as failed).
    let stranger = TcpClient::tcp(
        ClientConfig::default(),
        Some(ClientAuth::new(Arc::new(SecretKey::generate()))),
    );
    assert!(stranger.connect(&addr.to_string()).await.is_err());
    let failed = || {
        server
            .metrics()
            .connections_total
            .with_label_values(&["handshake_failed"])
            .get()
    };
    for _ in 0..200 {
        if failed() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failed(), 1);

    // Throttled: the failure used up 127.0.0.1's bucket of one (successful
    // handshakes are never charged).
    let throttled = TcpClient::tcp(
        ClientConfig::default(),
        Some(ClientAuth::new(client_key.clone())),
    );
    match throttled.connect(&addr.to_string()).await {
        Err(publisher_transport::TransportError::Refused { reason, .. }) => {
            assert_eq!(reason, publisher_transport::DisconnectReason::Throttled)
        }
        other => panic!("expected a throttled refusal, got {other:?}"),
    }

    // The server restarts: the client reconnects by itself.
    let mut events = client.events();
    server.stop().await.unwrap();
    let server_again = TcpServer::tcp(
        ServerConfig::default().with_rate_limit(None),
        Some(ServerAuth::new(server_key.clone(), {
            let trust = Arc::new(TrustStore::new());
            trust.add("seq-a", client_key.public_key().clone()).unwrap();
            trust
        })),
    );
    server_again.listen(&addr.to_string()).await.unwrap();
    loop {
        match timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            publisher_transport::ConnectionEvent::Connected {
                reconnect: true, ..
            } => break,
            _ => continue,
        }
    }

    let after = scrape(metrics_addr).await;
    let moved = |name: &str| {
        let name = &match name.split_once('{') {
            Some((base, labels)) => series_key(base, labels.trim_end_matches('}')),
            None => name.to_owned(),
        };
        let delta =
            after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0);
        assert!(
            delta > 0.0,
            "{name} did not move (before {:?}, after {:?})",
            before.get(name),
            after.get(name)
        );
    };
    for component in ["server", "client"] {
        let p = format!("publisher_transport_{component}_");
        for metric in [
            "connections_total",
            "connection_duration_seconds_count",
            "messages_total",
            "message_size_bytes_count",
            "bytes_total",
            "errors_total",
        ] {
            moved(&format!("{p}{metric}"));
        }
    }
    let s = "publisher_transport_server_";
    for metric in [
        "message_processing_duration_seconds_count",
        "broadcasts_total",
        "broadcast_recipients_total_count",
        "broadcast_duration_seconds_count",
        "handshakes_total",
        "signature_failures_total",
        "replay_refusals_total",
    ] {
        moved(&format!("{s}{metric}"));
    }
    moved(&format!(
        "{s}connections_total{{state=\"refused_throttled\"}}"
    ));
    moved(&format!(
        "{s}handshakes_total{{result=\"rejected\",reason=\"untrusted_key\"}}"
    ));
    moved(&format!(
        "{s}signature_failures_total{{kind=\"bad_signature\"}}"
    ));
    moved(&format!(
        "{s}messages_total{{type=\"vote\",direction=\"in\"}}"
    ));
    moved(&format!(
        "{s}messages_total{{type=\"signed_frame\",direction=\"in\"}}"
    ));
    moved("publisher_transport_client_reconnects_total");
    moved("publisher_transport_client_retry_attempts_total");
    // Gauges exist (sampled at scrape time); values may be 0 at rest.
    for gauge in [
        "publisher_transport_server_connections_active",
        "publisher_transport_server_send_queue_depth",
        "publisher_transport_server_buffer_utilization_ratio",
        "publisher_transport_client_connections_active",
    ] {
        assert!(after.contains_key(gauge), "{gauge} missing");
    }
    assert_eq!(after["publisher_transport_client_connections_active"], 1.0);

    client.disconnect().await.unwrap();
    server_again.stop().await.unwrap();
    let _ = stop_metrics.send(());
}

/// Completes a real handshake by hand, then sends a frame with a bad
/// signature, and on a second session the same valid frame twice.
async fn forged_and_replayed_frames(
    addr: std::net::SocketAddr,
    client_key: &Arc<SecretKey>,
    server_key: &Arc<SecretKey>,
) {
    for replay in [false, true] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut framed = Framed::new(stream, FrameCodec::default());
        let (signed, _) =
            signed_handshake(&mut framed, client_key, server_key.public_key(), "raw").await;
        let audience = Audience::Unicast {
            recipient: server_key.public_key().clone(),
            session: signed.session_tag,
        };
        let mut frame = seal(
            client_key,
            Default::default(),
            signed.local_floors.unicast,
            &audience,
            vec![Bytes::from(vote(1).encode_to_vec())],
        );
        if !replay {
            let mut signature = frame.signature.to_vec();
            signature[10] ^= 1;
            frame.signature = signature.into();
        }
        let body = frame.encode_to_vec();
        let _ = SignedFrame::decode(&body[..]).unwrap();
        let bytes = publisher_transport::codec::frame_body(&body, 1 << 20).unwrap();
        framed.send(RawFrame(bytes.clone())).await.unwrap();
        if replay {
            framed.send(RawFrame(bytes)).await.unwrap();
        }
        // The server closes the connection after refusing.
        while let Some(Ok(_)) = timeout(Duration::from_secs(5), framed.next())
            .await
            .unwrap()
        {}
    }
}
