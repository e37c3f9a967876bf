//! The publisher program reloads its trusted keys on SIGHUP: a removed key
//! loses its live connection (AUTH_FAILURE), a rotated one connects with its
//! new key, all without a restart.

use std::{path::Path, process::Stdio, sync::Arc, time::Duration};

use publisher_transport::{
    ClientAuth, ClientConfig, ConnectionEvent, DisconnectReason, PublicKey, SecretKey, TcpClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    time::timeout,
};

fn write_config(path: &Path, key_file: &Path, trusted: &[(&str, &PublicKey)]) {
    let mut text = format!(
        r#"[transport]
listen_addr = "127.0.0.1:0"
rate_limit = "off"

[auth]
enabled = true
private_key_file = "{}"
generate_key_if_missing = true

[auth.trusted_sequencers]
"#,
        key_file.display()
    );
    for (id, key) in trusted {
        text.push_str(&format!("{id} = \"{key}\"\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// The publisher example, built next to this test binary by `cargo test`.
pub(crate) fn publisher_binary() -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("publisher")
}

fn client(key: &Arc<SecretKey>, server: &PublicKey) -> TcpClient {
    let mut config = ClientConfig::default().with_client_id("seq");
    config.auto_reconnect = false;
    TcpClient::tcp(
        config,
        Some(ClientAuth::new(key.clone()).with_server_key(server.clone())),
    )
}

#[tokio::test]
async fn sighup_applies_trust_changes_to_live_connections() {
    let binary = publisher_binary();
    if !binary.exists() {
        panic!(
            "{} is missing: `cargo test` builds the examples",
            binary.display()
        );
    }
    timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (config, key_file) = (
            dir.path().join("publisher.toml"),
            dir.path().join("publisher.key"),
        );
        let (a, b, b_rotated) = (
            Arc::new(SecretKey::generate()),
            Arc::new(SecretKey::generate()),
            Arc::new(SecretKey::generate()),
        );
        write_config(
            &config,
            &key_file,
            &[("seq-a", a.public_key()), ("seq-b", b.public_key())],
        );

        let mut publisher = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(publisher.stdout.take().unwrap()).lines();
        let addr = lines.next_line().await.unwrap().unwrap();
        let addr = addr
            .strip_prefix("listening on ")
            .expect("first line names the address")
            .to_owned();
        let server_key = lines.next_line().await.unwrap().unwrap();
        let server_key =
            PublicKey::from_hex(server_key.strip_prefix("public key ").unwrap()).unwrap();

        let (client_a, client_b) = (client(&a, &server_key), client(&b, &server_key));
        let (mut events_a, mut events_b) = (client_a.events(), client_b.events());
        client_a.connect(&addr).await.unwrap();
        client_b.connect(&addr).await.unwrap();

        // seq-a is dropped from the file, seq-b moves to a new key.
        write_config(&config, &key_file, &[("seq-b", b_rotated.public_key())]);
        let pid = publisher.id().unwrap().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .await
                .unwrap()
                .success()
        );

        for events in [&mut events_a, &mut events_b] {
            loop {
                match events.recv().await.unwrap() {
                    ConnectionEvent::Disconnected {
                        reason, details, ..
                    } => {
                        assert_eq!(reason, DisconnectReason::AuthFailure, "{details}");
                        break;
                    }
                    _ => continue,
                }
            }
        }
        let rotated = client(&b_rotated, &server_key);
        rotated.connect(&addr).await.unwrap();
        assert!(
            client_a.connect(&addr).await.is_err(),
            "seq-a is no longer trusted"
        );
        rotated.disconnect().await.unwrap();
        publisher.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// `--trust` keys must use the extended handshake; `--trust-go` keys may
/// also connect in Go mode, and the publisher names them at start-up.
#[tokio::test]
async fn trust_go_flags_mark_go_peers_and_trust_flags_refuse_go_mode() {
    let binary = publisher_binary();
    assert!(binary.exists(), "{} is missing", binary.display());
    timeout(Duration::from_secs(60), async {
        let (extended, go) = (
            Arc::new(SecretKey::generate()),
            Arc::new(SecretKey::generate()),
        );
        let mut publisher = Command::new(&binary)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--trust")
            .arg(format!("seq-a={}", extended.public_key()))
            .arg("--trust-go")
            .arg(format!("seq-go={}", go.public_key()))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(publisher.stdout.take().unwrap()).lines();
        let addr = lines.next_line().await.unwrap().unwrap();
        let addr = addr.strip_prefix("listening on ").unwrap().to_owned();
        let mut logs = BufReader::new(publisher.stderr.take().unwrap()).lines();
        let mut announced = None;
        for _ in 0..100 {
            let Some(line) = logs.next_line().await.unwrap() else {
                break;
            };
            if line.contains("Go-compatible identities") {
                announced = Some(line);
                break;
            }
        }
        let announced = announced.expect("the Go-compatible identities are logged");
        assert!(
            announced.contains("seq-go") && !announced.contains("seq-a"),
            "{announced}"
        );

        let go_mode = |key: &Arc<SecretKey>| {
            let mut config = ClientConfig::default().with_client_id("go");
            config.auto_reconnect = false;
            TcpClient::tcp(
                config,
                Some(ClientAuth {
                    extensions: false,
                    ..ClientAuth::new(key.clone())
                }),
            )
        };
        let go_peer = go_mode(&go);
        go_peer
            .connect(&addr)
            .await
            .expect("a --trust-go key connects in Go mode");
        assert!(!go_peer.stats().connection.unwrap().signed_frames);
        let err = go_mode(&extended)
            .connect(&addr)
            .await
            .expect_err("a --trust key is refused in Go mode");
        assert!(err.to_string().contains("extended handshake only"), "{err}");
        let mut config = ClientConfig::default().with_client_id("a");
        config.auto_reconnect = false;
        let extended_peer = TcpClient::tcp(config, Some(ClientAuth::new(extended.clone())));
        extended_peer.connect(&addr).await.unwrap();
        assert!(extended_peer.stats().connection.unwrap().signed_frames);
        publisher.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}
