//! Minimal end-to-end check of the TCP server and client.

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    ClientAuth, ClientConfig, Message, SecretKey, ServerAuth, ServerConfig, TcpClient, TcpServer,
    TrustStore, channel_handler,
    proto::{Payload, rollup::v1::Vote},
};

#[tokio::test]
async fn signed_round_trip_over_tcp() {
    let server_key = Arc::new(SecretKey::generate());
    let client_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client_key.public_key().clone()).unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    let client = TcpClient::tcp(
        ClientConfig::default().with_client_id("client-a"),
        Some(ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
    );
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&addr.to_string()).await.unwrap();
    let vote = Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            vote: true,
            ..Default::default()
        })),
    };
    client.send(vote.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), inbound.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*got.from, "seq-a");
    assert_eq!(got.message.sender_id, "client-a");
    assert_eq!(got.message.payload, vote.payload);
    assert!(server.connections()[0].signed_frames);

    let report = server.broadcast(vote.clone(), None).unwrap();
    assert_eq!(report.delivered, vec![std::sync::Arc::from("seq-a")]);
    let got = tokio::time::timeout(Duration::from_secs(5), client_inbound.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.sender_id, "publisher");
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
