//! Third-party clients: sequencers written in Python from docs/PROTOCOL.md
//! and the `.proto` files alone (tests/python/), with their own secp256k1,
//! Keccak-256 and framing, talk to an in-process publisher running the
//! examples' coordinator. Each completes the Go-mode handshake and one
//! XTRequest → StartSC → Vote → Decided round:
//! - over gRPC with grpcio (plain HTTP/2 and TLS with the server's PEM);
//! - over QUIC with aioquic (ALPN `publisher-transport/1`, one stream).
//!
//! The interpreter is `$PUBLISHER_TRANSPORT_PYTHON`, the virtual environment
//! `.ci/run` creates from `tests/python/requirements.txt`. Without it the
//! tests are skipped, except under CI (`$CI` set), where they fail.
#![cfg(any(feature = "grpc", feature = "quic"))]

use crate::common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use publisher_transport::{
    SecretKey, ServerAuth, ServerConfig, TransportServer, TrustStore, backend::Backend,
    channel_handler,
};
use tokio::{process::Command, task::JoinHandle, time::timeout};

/// The environment variable naming the virtual environment's interpreter.
const PYTHON_ENV: &str = "PUBLISHER_TRANSPORT_PYTHON";
/// The environment variable through which a client gets its secret key.
const CLIENT_KEY_ENV: &str = "PUBLISHER_TRANSPORT_CLIENT_KEY";
/// The identity the publisher trusts the Python client's key as.
const IDENTITY: &str = "seq-py";
/// Bound on one Python client's run, start-up and code generation included
/// (the clients bound themselves at 20 s).
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// The interpreter to run, or `None` (after saying so) to skip.
///
/// # Panics
/// Under CI without the interpreter: the virtual environment is part of CI.
fn python(test: &str) -> Option<PathBuf> {
    let set = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    match set(PYTHON_ENV) {
        Some(path) => Some(PathBuf::from(path)),
        None if set("CI").is_some() => panic!(
            "{PYTHON_ENV} is not set: .ci/run must create the Python virtual environment \
             (tests/python/requirements.txt) and export {PYTHON_ENV} to its interpreter"
        ),
        None => {
            eprintln!(
                "skipped {test}: {PYTHON_ENV} is not set (point it at a Python with \
                 tests/python/requirements.txt installed, as .ci/run does)"
            );
            None
        }
    }
}

/// A fresh client key and its 64 hex digits, for the Python side.
fn client_key() -> (SecretKey, String) {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(key) = SecretKey::from_bytes(&bytes) {
            return (key, hex::encode(bytes));
        }
    }
}

/// Authentication trusting `client` as [`IDENTITY`], Go-compatible: the
/// third-party clients speak the Go-mode handshake.
fn server_auth(client: &SecretKey) -> ServerAuth {
    let trust = Arc::new(TrustStore::new());
    trust
        .add_go_compatible(IDENTITY, client.public_key().clone())
        .unwrap();
    ServerAuth::new(Arc::new(SecretKey::generate()), trust)
}

fn server_config() -> ServerConfig {
    ServerConfig::default().with_listen_addr("127.0.0.1:0")
}

/// A running publisher: the server and the coordinator deciding its rounds.
struct Publisher<B: Backend> {
    server: TransportServer<B>,
    stats: Arc<common::CoordinatorStats>,
    coordinator: JoinHandle<()>,
    addr: String,
}

impl<B: Backend> Publisher<B> {
    async fn start(server: TransportServer<B>) -> Self {
        let (handler, inbound) = channel_handler(64);
        server.set_handler(handler);
        let coordinator = common::Coordinator::new(Arc::new(server.clone()));
        let stats = coordinator.stats();
        let coordinator = tokio::spawn(coordinator.run(inbound));
        let addr = server.start().await.unwrap().to_string();
        Self {
            server,
            stats,
            coordinator,
            addr,
        }
    }

    /// Checks that exactly one round ran and was committed, then stops.
    async fn finish(self) {
        let stats = &self.stats;
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        assert_eq!(count(&stats.started), 1, "rounds started");
        assert_eq!(count(&stats.committed), 1, "rounds committed");
        assert_eq!(count(&stats.aborted), 0, "rounds aborted");
        assert_eq!(count(&stats.ignored_votes), 0, "votes ignored");
        self.server.stop().await.unwrap();
        self.coordinator.abort();
    }
}

/// Runs `tests/python/<script>` with `args` and the client's key, bounded by
/// [`CLIENT_DEADLINE`] (the process is killed when it runs over), and
/// asserts that it succeeded.
async fn run_client(python: &Path, script: &str, args: &[&str], key_hex: &str) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let child = Command::new(python)
        .arg(&path)
        .args(args)
        .env(CLIENT_KEY_ENV, key_hex)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {} {}: {err}", python.display(), path.display()));
    let output = timeout(CLIENT_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} still running after {CLIENT_DEADLINE:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        output.status
    );
    eprintln!("{script}:\n{stdout}");
    assert!(
        stdout.lines().any(|line| line == "ok"),
        "{script} did not report success:\n{stdout}"
    );
    output
}

/// The certificate's PEM in a temporary file, for the client to trust.
fn pem_file(pem: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(pem.as_bytes()).unwrap();
    file.flush().unwrap();
    file
}

#[cfg(feature = "grpc")]
mod grpc {
    use publisher_transport::{
        GrpcServer,
        backend::grpc::{GrpcBackend, GrpcOptions},
        tls::{ClientTrust, Identity},
    };

    use super::*;

    async fn round(backend: GrpcBackend, ca_file: Option<&Path>, test: &str) {
        let Some(python) = python(test) else {
            return;
        };
        let (key, key_hex) = client_key();
        let server = GrpcServer::grpc(server_config(), backend, Some(server_auth(&key)));
        let publisher = Publisher::start(server).await;
        let ca = ca_file.map(|path| path.to_str().unwrap());
        let mut args = vec![
            publisher.addr.as_str(),
            "--client-id",
            IDENTITY,
            "--expect-identity",
            IDENTITY,
        ];
        args.extend(ca.iter().flat_map(|ca| ["--ca-file", ca]));
        run_client(&python, "grpc_client.py", &args, &key_hex).await;
        publisher.finish().await;
    }

    #[tokio::test]
    async fn python_grpcio_client_votes_over_h2c() {
        round(
            GrpcBackend::new(GrpcOptions::default()),
            None,
            "python_grpcio_client_votes_over_h2c",
        )
        .await;
    }

    #[tokio::test]
    async fn python_grpcio_client_votes_over_tls() {
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let pem = pem_file(&identity.chain_pem());
        let backend = GrpcBackend::new(GrpcOptions::default())
            .with_server_tls(&identity, &ClientTrust::default())
            .unwrap();
        round(
            backend,
            Some(pem.path()),
            "python_grpcio_client_votes_over_tls",
        )
        .await;
    }
}

#[cfg(feature = "quic")]
mod quic {
    use publisher_transport::{
        QuicBackend, QuicOptions,
        tls::{ClientTrust, Identity},
    };

    use super::*;

    #[tokio::test]
    async fn python_aioquic_client_votes_over_quic() {
        let Some(python) = python("python_aioquic_client_votes_over_quic") else {
            return;
        };
        let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
        let pem = pem_file(&identity.chain_pem());
        let backend = QuicBackend::new(
            QuicOptions::default(),
            Some((&identity, &ClientTrust::default())),
            None,
        )
        .unwrap();
        let (key, key_hex) = client_key();
        let server = TransportServer::new(backend, server_config(), Some(server_auth(&key)));
        let publisher = Publisher::start(server).await;
        let args = [
            publisher.addr.as_str(),
            "--ca-file",
            pem.path().to_str().unwrap(),
            "--client-id",
            IDENTITY,
            "--expect-identity",
            IDENTITY,
        ];
        run_client(&python, "quic_client.py", &args, &key_hex).await;
        publisher.finish().await;
    }
}
