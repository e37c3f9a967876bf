//! Live trust changes: removing or rotating a trusted key closes that peer's
//! live connection with AUTH_FAILURE; the new key connects without a restart.

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    ClientAuth, ClientConfig, ConnectionEvent, DisconnectReason, SecretKey, ServerAuth,
    ServerConfig, TcpClient, TcpServer, TrustStore,
};
use tokio::time::timeout;

async fn disconnected(
    events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>,
) -> (DisconnectReason, String) {
    loop {
        match timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ConnectionEvent::Disconnected {
                reason, details, ..
            } => return (reason, details),
            _ => continue,
        }
    }
}

fn client(key: &Arc<SecretKey>, server_key: &SecretKey) -> TcpClient {
    let mut config = ClientConfig::default().with_client_id("seq");
    config.auto_reconnect = false;
    TcpClient::tcp(
        config,
        Some(ClientAuth::new(key.clone()).with_server_key(server_key.public_key().clone())),
    )
}

#[tokio::test]
async fn removal_and_rotation_close_live_connections() {
    let server_key = Arc::new(SecretKey::generate());
    let (old_key, new_key, other_key) = (
        Arc::new(SecretKey::generate()),
        Arc::new(SecretKey::generate()),
        Arc::new(SecretKey::generate()),
    );
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", old_key.public_key().clone()).unwrap();
    trust.add("seq-b", other_key.public_key().clone()).unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None),
        Some(ServerAuth::new(server_key.clone(), trust.clone())),
    );
    let addr = server.start().await.unwrap().to_string();

    // Rotation: seq-a moves to a new key; the session on the old key ends.
    let old = client(&old_key, &server_key);
    let bystander = client(&other_key, &server_key);
    let mut old_events = old.events();
    old.connect(&addr).await.unwrap();
    bystander.connect(&addr).await.unwrap();
    trust.add("seq-a", new_key.public_key().clone()).unwrap();
    let (reason, details) = disconnected(&mut old_events).await;
    assert_eq!(reason, DisconnectReason::AuthFailure);
    assert_eq!(details, "key no longer trusted");
    let rotated = client(&new_key, &server_key);
    rotated.connect(&addr).await.unwrap();
    assert!(
        old.connect(&addr).await.is_err(),
        "the old key is refused now"
    );

    // Removal: seq-b is no longer trusted at all.
    let mut bystander_events = bystander.events();
    trust.remove("seq-b");
    assert_eq!(
        disconnected(&mut bystander_events).await.0,
        DisconnectReason::AuthFailure
    );
    assert!(rotated.is_connected(), "other identities are untouched");
    let identities: Vec<String> = server
        .connections()
        .into_iter()
        .map(|c| c.identity)
        .collect();
    assert_eq!(identities, ["seq-a"]);
    rotated.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

/// A Go-compatible key made extended-only loses its Go-mode session; an
/// extended session under a key whose mode changes the same way stays.
#[tokio::test]
async fn a_key_no_longer_go_compatible_loses_its_go_mode_session() {
    let server_key = Arc::new(SecretKey::generate());
    let (go_key, extended_key) = (
        Arc::new(SecretKey::generate()),
        Arc::new(SecretKey::generate()),
    );
    let trust = Arc::new(TrustStore::new());
    trust
        .add_go_compatible("seq-go", go_key.public_key().clone())
        .unwrap();
    trust
        .add_go_compatible("seq-ext", extended_key.public_key().clone())
        .unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None),
        Some(ServerAuth::new(server_key.clone(), trust.clone())),
    );
    let addr = server.start().await.unwrap().to_string();

    let mut config = ClientConfig::default().with_client_id("go");
    config.auto_reconnect = false;
    let go_peer = TcpClient::tcp(
        config,
        Some(ClientAuth {
            extensions: false,
            ..ClientAuth::new(go_key.clone())
        }),
    );
    let extended_peer = client(&extended_key, &server_key);
    let mut go_events = go_peer.events();
    go_peer.connect(&addr).await.unwrap();
    extended_peer.connect(&addr).await.unwrap();
    assert!(go_peer.stats().connection.is_some_and(|c| !c.signed_frames));

    // Same keys, extended only now.
    trust
        .add("seq-ext", extended_key.public_key().clone())
        .unwrap();
    trust.add("seq-go", go_key.public_key().clone()).unwrap();
    let (reason, details) = disconnected(&mut go_events).await;
    assert_eq!(reason, DisconnectReason::AuthFailure);
    assert_eq!(details, "key no longer trusted for Go-mode sessions");
    assert!(
        go_peer.connect(&addr).await.is_err(),
        "a Go-mode handshake is refused now"
    );
    // The seq-go change was seen after the seq-ext one, so seq-ext was
    // checked by then, and kept.
    assert!(
        server
            .connections()
            .iter()
            .any(|c| c.identity == "seq-ext" && c.signed_frames)
    );
    assert!(extended_peer.is_connected());
    extended_peer.disconnect().await.unwrap();
    server.stop().await.unwrap();
}
