//! gRPC-specific behaviour: metadata, bearer tokens, trailers, size limits,
//! TLS and retry. The shared end-to-end suite covers the rest.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use publisher_transport::{
    ClientAuth, ClientConfig, DisconnectReason, GrpcClient, GrpcServer, Handled, Handler, Inbound,
    InboundBatch, Message, SecretKey, ServerAuth, ServerConfig, TransportError, TrustStore,
    backend::grpc::{
        DISCONNECT_DETAILS_TRAILER, DISCONNECT_REASON_TRAILER, GrpcBackend, GrpcOptions,
    },
    channel_handler,
    proto::{
        Payload,
        rollup::v1::{Block, Vote},
        transport::v1::{FrameBatch, frame_service_client::FrameServiceClient},
    },
    tls::{ClientTrust, Identity, ServerTrust},
};
use tokio::time::timeout;

struct Keys {
    server: Arc<SecretKey>,
    client: Arc<SecretKey>,
    trust: Arc<TrustStore>,
}

fn keys() -> Keys {
    let (server, client) = (
        Arc::new(SecretKey::generate()),
        Arc::new(SecretKey::generate()),
    );
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client.public_key().clone()).unwrap();
    Keys {
        server,
        client,
        trust,
    }
}

pub(super) fn vote() -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            vote: true,
            ..Default::default()
        })),
    }
}

fn server_config() -> ServerConfig {
    ServerConfig::default().with_listen_addr("127.0.0.1:0")
}

async fn round_trip(server_backend: GrpcBackend, client_backend: GrpcBackend) {
    let keys = keys();
    let server = GrpcServer::grpc(
        server_config(),
        server_backend,
        Some(ServerAuth::new(keys.server.clone(), keys.trust.clone())),
    );
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = GrpcClient::grpc(
        ClientConfig::default().with_client_id("seq-a"),
        client_backend,
        Some(
            ClientAuth::new(keys.client.clone()).with_server_key(keys.server.public_key().clone()),
        ),
    );
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&addr.to_string()).await.unwrap();
    client.send(vote()).await.unwrap();
    let got = timeout(Duration::from_secs(10), inbound.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*got.from, "seq-a");
    assert!(server.connections()[0].signed_frames);
    server.broadcast(vote(), None).unwrap();
    let got = timeout(Duration::from_secs(10), client_inbound.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.sender_id, "publisher");
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn signed_round_trip_over_h2c() {
    round_trip(
        GrpcBackend::new(GrpcOptions::default()),
        GrpcBackend::new(GrpcOptions::default()),
    )
    .await;
}

#[tokio::test]
async fn signed_round_trip_over_tls_with_a_pinned_certificate() {
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let server = GrpcBackend::new(GrpcOptions::default())
        .with_server_tls(&identity, &ClientTrust::default())
        .unwrap();
    let client = GrpcBackend::new(GrpcOptions::default())
        .with_client_tls(&ServerTrust::pinned(identity.fingerprint()))
        .unwrap();
    round_trip(server, client).await;
}

#[tokio::test]
async fn bearer_token_is_checked_by_the_server() {
    let options = GrpcOptions {
        bearer_token: Some("s3cret".into()),
        ..GrpcOptions::default()
    };
    let server = GrpcServer::grpc(server_config(), GrpcBackend::new(options.clone()), None);
    let addr = server.start().await.unwrap().to_string();

    let wrong = GrpcClient::grpc(
        ClientConfig::default(),
        GrpcBackend::new(GrpcOptions {
            bearer_token: Some("guess".into()),
            ..GrpcOptions::default()
        }),
        None,
    );
    match timeout(Duration::from_secs(10), wrong.connect(&addr))
        .await
        .unwrap()
    {
        Err(TransportError::Refused { reason, details }) => {
            assert_eq!(reason, DisconnectReason::AuthFailure);
            assert_eq!(details, "invalid bearer token");
        }
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
    // A prefix of the right token (same bytes, shorter) is refused too.
    let prefix = GrpcClient::grpc(
        ClientConfig::default(),
        GrpcBackend::new(GrpcOptions {
            bearer_token: Some("s3cre".into()),
            ..GrpcOptions::default()
        }),
        None,
    );
    match timeout(Duration::from_secs(10), prefix.connect(&addr))
        .await
        .unwrap()
    {
        Err(TransportError::Refused { reason, details }) => {
            assert_eq!(reason, DisconnectReason::AuthFailure);
            assert_eq!(details, "invalid bearer token");
        }
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
    let missing = GrpcClient::grpc(
        ClientConfig::default(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    assert!(matches!(
        timeout(Duration::from_secs(10), missing.connect(&addr))
            .await
            .unwrap(),
        Err(TransportError::Refused {
            reason: DisconnectReason::AuthFailure,
            ..
        })
    ));
    let right = GrpcClient::grpc(ClientConfig::default(), GrpcBackend::new(options), None);
    timeout(Duration::from_secs(10), right.connect(&addr))
        .await
        .unwrap()
        .unwrap();
    right.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[test]
fn bearer_token_is_in_no_debug_or_serialized_output() {
    let options = GrpcOptions {
        bearer_token: Some("tok-9f8e7d6c".into()),
        ..GrpcOptions::default()
    };
    let backend = GrpcBackend::new(options.clone());
    for text in [
        format!("{options:?}"),
        format!("{backend:?}"),
        serde_json::to_string(&options).unwrap(),
    ] {
        assert!(!text.contains("tok-9f8e7d6c"), "token leaked: {text}");
    }
    assert!(format!("{options:?}").contains("[redacted]"));
    // Read from configuration as a plain string.
    let read: GrpcOptions = serde_json::from_str(r#"{"bearer_token": "tok-9f8e7d6c"}"#).unwrap();
    assert_eq!(read.bearer_token.unwrap().expose(), "tok-9f8e7d6c");
}

#[tokio::test]
async fn messages_above_tonics_four_mib_default_pass() {
    let server = GrpcServer::grpc(
        server_config(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    let (handler, mut inbound) = channel_handler(4);
    server.set_handler(handler);
    let addr = server.start().await.unwrap().to_string();
    let client = GrpcClient::grpc(
        ClientConfig::default(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    client.connect(&addr).await.unwrap();
    let big = Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(Block {
            block_data: Bytes::from(vec![7u8; 6 * 1024 * 1024]),
            ..Default::default()
        })),
    };
    client.send(big).await.unwrap();
    let got = timeout(Duration::from_secs(20), inbound.recv())
        .await
        .unwrap()
        .unwrap();
    match got.message.payload {
        Some(Payload::Block(block)) => assert_eq!(block.block_data.len(), 6 * 1024 * 1024),
        other => panic!("unexpected {other:?}"),
    }
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// Sends `items` from a raw tonic client (what any third-party gRPC client
/// sees) to `server`, which must not require authentication, and returns
/// the metadata its session ends with: trailers, or an error's.
async fn raw_session(server: &GrpcServer, items: Vec<FrameBatch>) -> tonic::metadata::MetadataMap {
    let addr = server.start().await.unwrap();
    let mut client = FrameServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = tokio_stream::iter(items);
    let mut stream = client.session(request).await.unwrap().into_inner();
    timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return stream.trailers().await.unwrap().unwrap(),
                Err(status) => return status.metadata().clone(),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_disconnect_reason_arrives_in_trailers() {
    let server = GrpcServer::grpc(
        server_config(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    // Without auth the server reads messages at once; a garbage body breaks the protocol.
    let items = vec![FrameBatch {
        frames: vec![Bytes::from_static(b"\xff\xff\xff")],
    }];
    let ended = raw_session(&server, items).await;
    assert_eq!(
        ended.get(DISCONNECT_REASON_TRAILER).unwrap(),
        "protocol_error"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_items_frames_reach_the_handler_together_and_a_bad_one_ends_the_session_after_them() {
    // One item carries several frames; one of the next is empty (refused
    // as the TCP codec refuses an empty frame).
    let server = GrpcServer::grpc(
        server_config(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    let (tx, mut inbound) = tokio::sync::mpsc::unbounded_channel();
    let handler = Arc::new(BatchSizes {
        sizes: Mutex::new(Vec::new()),
        tx,
    });
    server.set_handler(handler.clone());
    let block = |n: u8| Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(Block {
            block_data: Bytes::from(vec![n; 3]),
            ..Default::default()
        })),
    };
    let encoded = |n: u8| Bytes::from(prost::Message::encode_to_vec(&block(n)));
    let items = vec![
        FrameBatch {
            frames: vec![encoded(1), encoded(2), encoded(3)],
        },
        FrameBatch {
            frames: vec![encoded(4), Bytes::new(), encoded(5)],
        },
    ];
    let ended = raw_session(&server, items).await;
    assert_eq!(
        ended.get(DISCONNECT_REASON_TRAILER).unwrap(),
        "protocol_error"
    );
    // Everything before the empty frame was handled, in order; nothing after.
    for n in 1..=4 {
        let got = timeout(Duration::from_secs(5), inbound.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, block(n));
    }
    // The session has ended: nothing behind the empty frame was decoded.
    assert!(inbound.try_recv().is_err());
    // The first item's three messages were handed over in one call.
    assert_eq!(*handler.sizes.lock().unwrap(), [3, 1]);
    server.stop().await.unwrap();
}

/// Records how many messages each `handle_batch` call finds waiting, and
/// passes every message on.
struct BatchSizes {
    sizes: Mutex<Vec<usize>>,
    tx: tokio::sync::mpsc::UnboundedSender<Message>,
}

impl Handler for BatchSizes {
    fn handle(&self, inbound: Inbound) -> Handled {
        let _ = self.tx.send(inbound.message);
        Handled::Done(Ok(()))
    }

    fn handle_batch(&self, batch: &mut InboundBatch) -> Handled {
        self.sizes.lock().unwrap().push(batch.len());
        while let Some(inbound) = batch.pop() {
            let _ = self.tx.send(inbound.message);
        }
        Handled::Done(Ok(()))
    }
}

#[tokio::test]
async fn opening_retries_while_the_server_is_unavailable() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let mut options = GrpcOptions::default();
    options.retry.initial = Duration::from_millis(50);
    options.retry.max_retries = Some(100);
    let backend = GrpcBackend::new(options);
    let client = GrpcClient::grpc(ClientConfig::default(), backend.clone(), None);
    let connecting = {
        let client = client.clone();
        tokio::spawn(async move { client.connect(&addr.to_string()).await })
    };
    // Only once an attempt has failed (nothing listens yet) does the server start.
    timeout(Duration::from_secs(10), async {
        while backend.open_attempts() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client retries");
    assert!(!client.is_connected());
    let server = GrpcServer::grpc(
        ServerConfig::default().with_listen_addr(addr.to_string()),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    server.start().await.unwrap();
    timeout(Duration::from_secs(20), connecting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(client.is_connected());
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// The details a server's trailers give for why it ended a raw stream.
async fn ending(stream: &mut tonic::Streaming<FrameBatch>) -> (String, String) {
    let ended = timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return stream.trailers().await.unwrap().unwrap_or_default(),
                Err(status) => return status.metadata().clone(),
            }
        }
    })
    .await
    .expect("the server ends the stream");
    let text = |key| {
        ended
            .get(key)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (
        text(DISCONNECT_REASON_TRAILER),
        text(DISCONNECT_DETAILS_TRAILER),
    )
}

/// Before authentication, the server refuses a 9 MiB first item from its
/// header, with the handshake's limit, and does not buffer it. The client,
/// in the same process, holds the whole encoded item (9 MiB); the server
/// holds at most its HTTP/2 receive window (1 MiB). Measured in all: +9.9
/// to +11.1 MiB over many runs, the spread growing with the machine's
/// load; the bound allows 3 MiB beyond the client's copy. A server that
/// kept the whole item would add 9 MiB of its own. (Precise to the byte is
/// only a peer that announces 9 MiB and sends less, as the TCP tests in
/// `dos.rs` do; over gRPC the client library always sends the whole item.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_9_mib_first_item_is_refused_before_authentication() {
    crate::dos::isolated("grpc::isolated_9_mib_first_item").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by a_9_mib_first_item_is_refused_before_authentication"]
async fn isolated_9_mib_first_item() {
    use crate::dos::{in_isolation, mib, peak_rss, rss};
    const ITEM: usize = 9 * 1024 * 1024;
    if !in_isolation("grpc::isolated_9_mib_first_item") {
        return;
    }
    let keys = keys();
    let server = GrpcServer::grpc(
        server_config(),
        GrpcBackend::new(GrpcOptions::default()),
        Some(ServerAuth::new(keys.server.clone(), keys.trust.clone())),
    );
    let addr = server.start().await.unwrap();
    let mut client = FrameServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(2 * ITEM);
    let item = FrameBatch {
        frames: vec![Bytes::from(vec![0x5a; ITEM])],
    };
    let announced = prost::Message::encoded_len(&item);
    let before = rss();
    let mut stream = client
        .session(tokio_stream::iter(vec![item]))
        .await
        .unwrap()
        .into_inner();
    let (reason, details) = ending(&mut stream).await;
    let grew = peak_rss().saturating_sub(before);
    println!(
        "9 MiB first item: {reason}: {details}; RSS {:.1} MiB, peak +{:.1} MiB",
        mib(before),
        mib(grew)
    );
    assert_eq!(reason, "protocol_error", "{details}");
    // The handshake's limit (16 KiB and room for the batch), from the header.
    assert!(
        details.contains(&format!("message size {announced} exceeds max 17408")),
        "{details}"
    );
    assert!(
        grew < ITEM + 3 * 1024 * 1024,
        "peak resident memory grew by {:.1} MiB",
        mib(grew)
    );
    server.stop().await.unwrap();
}

/// After authentication, a 9 MiB message passes, drawing on a read budget
/// far smaller than itself.
#[tokio::test]
async fn a_9_mib_message_passes_after_authentication_within_a_small_budget() {
    let keys = keys();
    let mut config = server_config();
    config.read_budget = 1024 * 1024;
    let server = GrpcServer::grpc(
        config,
        GrpcBackend::new(GrpcOptions::default()),
        Some(ServerAuth::new(keys.server.clone(), keys.trust.clone())),
    );
    let (handler, mut inbound) = channel_handler(4);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = GrpcClient::grpc(
        ClientConfig::default().with_client_id("seq-a"),
        GrpcBackend::new(GrpcOptions::default()),
        Some(
            ClientAuth::new(keys.client.clone()).with_server_key(keys.server.public_key().clone()),
        ),
    );
    client.connect(&addr.to_string()).await.unwrap();
    for n in 0..2u8 {
        let big = Message {
            sender_id: String::new(),
            payload: Some(Payload::Block(Block {
                block_data: Bytes::from(vec![n; 9 * 1024 * 1024]),
                ..Default::default()
            })),
        };
        client.send(big).await.unwrap();
        let got = timeout(Duration::from_secs(20), inbound.recv())
            .await
            .unwrap()
            .unwrap();
        match got.message.payload {
            Some(Payload::Block(block)) => {
                assert_eq!(block.block_data.len(), 9 * 1024 * 1024);
                assert!(block.block_data.iter().all(|&byte| byte == n));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// A `FrameBatch` of millions of empty frames is refused before it is decoded.
#[tokio::test]
async fn a_frame_batch_of_empty_frames_is_refused() {
    let server = GrpcServer::grpc(
        server_config(),
        GrpcBackend::new(GrpcOptions::default()),
        None,
    );
    let addr = server.start().await.unwrap();
    let mut client = FrameServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(16 * 1024 * 1024);
    let item = FrameBatch {
        frames: vec![Bytes::new(); 4 * 1024 * 1024],
    };
    let mut stream = client
        .session(tokio_stream::iter(vec![item]))
        .await
        .unwrap()
        .into_inner();
    let (reason, details) = ending(&mut stream).await;
    assert_eq!(reason, "protocol_error", "{details}");
    assert!(
        details.contains("transport.v1.FrameBatch") && details.contains("would decode to over"),
        "{details}"
    );
    server.stop().await.unwrap();
}
