//! Authentication modes: Go-mode client and server, mutual authentication
//! refusals, untrusted keys, and the auth-disabled mode.

use std::sync::Arc;

use publisher_transport::{
    ClientAuth, HandshakeError, SecretKey, ServerAuth, TransportError, channel_handler,
};

use super::{
    Harness, Keys, client_config, identity, number_of, numbered, recv, registered, server_config,
    vote,
};

/// A server without a key of its own: Go mode only.
fn keyless(keys: &Keys) -> ServerAuth {
    ServerAuth {
        key: None,
        ..keys.server_auth()
    }
}

/// A client that speaks exactly Go's handshake: it is known by the identity
/// its key is trusted as, and frames are not signed.
pub async fn go_mode_client_against_extended_server<H: Harness>() {
    let keys = Keys::go_compatible(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(
        client_config("go-client"),
        Some(ClientAuth {
            extensions: false,
            ..ClientAuth::new(keys.clients[0].clone())
        }),
    );
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    let info = &server.connections()[0];
    assert_eq!(info.identity, identity(0), "the trusted id, not the claim");
    assert_eq!(info.client_id.as_deref(), Some("go-client"));
    assert!(!info.signed_frames);
    let mine = client.stats().connection.unwrap();
    assert!(!mine.signed_frames);
    assert_eq!(mine.session_id, info.session_id);

    client.send(vote(true)).await.unwrap();
    let got = recv(&mut inbound, "vote").await;
    assert_eq!(&*got.from, identity(0));
    assert_eq!(got.message.sender_id, "go-client");
    server.send(&identity(0), numbered(7)).await.unwrap();
    let got = recv(&mut client_inbound, "unicast").await;
    assert_eq!(number_of(&got.message), 7);
    server.stop().await.unwrap();
}

/// A key-less server answers a default (extended) client in Go mode, when
/// the client's key is trusted as Go-compatible.
pub async fn go_mode_server_against_default_client<H: Harness>() {
    let keys = Keys::go_compatible(1);
    let server = H::server(server_config(), Some(keyless(&keys)));
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(
        client_config("a"),
        Some(ClientAuth::new(keys.clients[0].clone())),
    );
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();
    registered(&server, &identity(0)).await;

    assert!(!server.connections()[0].signed_frames);
    let mine = client.stats().connection.unwrap();
    assert!(!mine.signed_frames);
    assert!(
        mine.session_id
            .as_deref()
            .is_some_and(|s| s.starts_with("seq-0-"))
    );
    client.send(vote(false)).await.unwrap();
    assert_eq!(&*recv(&mut inbound, "vote").await.from, identity(0));
    server.broadcast(numbered(1), None).unwrap();
    assert_eq!(
        number_of(&recv(&mut client_inbound, "broadcast").await.message),
        1
    );
    server.stop().await.unwrap();
}

/// A Go-mode handshake with a key trusted the default way (extended only) is
/// refused with a reason: otherwise an on-path attacker could strip an
/// extended client's extension and speak unsigned in its name. A key-less
/// server refuses such a key in either mode.
pub async fn go_mode_is_refused_for_a_default_key<H: Harness>() {
    let keys = Keys::new(1);
    for (case, server_auth) in [
        ("server with a key", keys.server_auth()),
        ("key-less server", keyless(&keys)),
    ] {
        let server = H::server(server_config(), Some(server_auth));
        let addr = server.start().await.unwrap();
        let go_client = H::client(
            client_config("a"),
            Some(ClientAuth {
                extensions: false,
                ..ClientAuth::new(keys.clients[0].clone())
            }),
        );
        match go_client.connect(&H::dial_addr(addr)).await {
            Err(TransportError::Handshake(HandshakeError::Rejected { reason })) => {
                assert!(
                    reason.contains("extended handshake only"),
                    "{case}: {reason}"
                );
            }
            other => panic!("{case}: expected a refusal, got {other:?}"),
        }
        assert!(server.connections().is_empty(), "{case}");
        server.stop().await.unwrap();
    }
}

/// A client that requires the server's key refuses a server that cannot
/// prove any key.
pub async fn client_requiring_server_key_refuses_go_mode_server<H: Harness>() {
    let keys = Keys::go_compatible(1);
    let server = H::server(server_config(), Some(keyless(&keys)));
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("a"), Some(keys.client_auth(0)));
    match client.connect(&H::dial_addr(addr)).await {
        Err(TransportError::Handshake(HandshakeError::ServerNotAuthenticated)) => {}
        other => panic!("expected ServerNotAuthenticated, got {other:?}"),
    }
    assert!(!client.is_connected());
    server.stop().await.unwrap();
}

/// A client expecting another server key: the server sees the request is
/// addressed to someone else and refuses it (PROTOCOL.md §3.1 step 5).
pub async fn server_refuses_request_for_another_server<H: Harness>() {
    let keys = Keys::new(1);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let other_server = SecretKey::generate().public_key().clone();
    let client = H::client(
        client_config("a"),
        Some(ClientAuth::new(keys.clients[0].clone()).with_server_key(other_server)),
    );
    match client.connect(&H::dial_addr(addr)).await {
        Err(TransportError::Handshake(HandshakeError::Rejected { reason })) => {
            assert_eq!(reason, "handshake addressed to another server");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(server.connections().is_empty());
    server.stop().await.unwrap();
}

/// An untrusted key is refused with Go's exact error string, in extended
/// and in Go mode, and never registered.
pub async fn untrusted_client_key_is_refused_with_go_string<H: Harness>() {
    const GO_ERROR: &str = "untrusted public key - connection rejected";
    let keys = Keys::new(0);
    let server = H::server(server_config(), Some(keys.server_auth()));
    let addr = server.start().await.unwrap();
    let stranger = Arc::new(SecretKey::generate());
    for extensions in [true, false] {
        let client = H::client(
            client_config("stranger"),
            Some(ClientAuth {
                extensions,
                ..ClientAuth::new(stranger.clone())
            }),
        );
        let err = client.connect(&H::dial_addr(addr)).await.unwrap_err();
        assert!(
            err.to_string().contains(GO_ERROR),
            "extensions {extensions}: {err}"
        );
        match err {
            TransportError::Handshake(HandshakeError::Rejected { reason }) => {
                assert_eq!(reason, GO_ERROR)
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        // A refused key cannot heal: connect_with_retry stops after one attempt.
        let before = client.stats().connect_attempts;
        assert!(
            client
                .connect_with_retry(&H::dial_addr(addr), 3)
                .await
                .is_err()
        );
        assert_eq!(client.stats().connect_attempts, before + 1);
    }
    assert!(server.connections().is_empty());
    server.stop().await.unwrap();
}

/// Authentication off on both sides: no handshake, and `from` is the
/// connection id, which also addresses `send`.
pub async fn auth_disabled_server_uses_connection_ids<H: Harness>() {
    let server = H::server(server_config(), None);
    let (handler, mut inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();
    let client = H::client(client_config("plain"), None);
    let (client_handler, mut client_inbound) = channel_handler(16);
    client.set_handler(client_handler);
    client.connect(&H::dial_addr(addr)).await.unwrap();

    client.send(vote(true)).await.unwrap();
    let got = recv(&mut inbound, "vote").await;
    assert_eq!(*got.from, got.connection_id.to_string());
    assert_eq!(got.message.sender_id, "plain");
    let info = &server.connections()[0];
    assert_eq!(info.identity, *got.from);
    assert_eq!(info.session_id, None);
    assert!(!info.signed_frames);

    server.send(&got.from, numbered(3)).await.unwrap();
    assert_eq!(
        number_of(&recv(&mut client_inbound, "unicast").await.message),
        3
    );
    server.stop().await.unwrap();
}
