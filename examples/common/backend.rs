//! Back-end selection shared by the example programs: `--backend
//! tcp|grpc|quic|ws` and the TLS flags, turned into an `Arc<dyn Server>` or
//! `Arc<dyn Client>` so the rest of each program does not care which
//! transport carries its frames.
//!
//! TLS: TCP, gRPC and WebSocket use it with `--tls` (gRPC without it is
//! h2c, WebSocket `ws://` rather than `wss://`), QUIC always does. A server presents `--tls-cert`/`--tls-key`, or else a
//! self-signed development certificate whose fingerprint it reports so
//! clients can pin it (`--pin-sha256`). `--tls-ca` is the CA a client
//! trusts, or the CA a server requires client certificates from (mutual
//! TLS); a client presents `--tls-cert`/`--tls-key` to such a server.
//! `--tls-p12` (with `--tls-p12-password-file`) gives either identity as a
//! PKCS#12 bundle instead of PEM files.

use std::{path::PathBuf, sync::Arc};

use clap::ValueEnum;
use publisher_transport::{
    Client, ClientAuth, ClientConfig, Server, ServerAuth, ServerConfig, TcpOptions,
};

/// Errors of setting up a back-end, also usable across tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which transport carries the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Length-prefixed frames over TCP (optionally inside TLS).
    Tcp,
    /// One gRPC bidirectional stream per connection (h2c, or HTTPS with TLS).
    Grpc,
    /// One QUIC stream per connection; always TLS 1.3.
    Quic,
    /// One binary WebSocket message per frame (`ws://`, or `wss://` with TLS).
    Ws,
}

impl BackendKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Grpc => "grpc",
            Self::Quic => "quic",
            Self::Ws => "ws",
        }
    }

    /// Errors when this build lacks the back-end's cargo feature, so the
    /// user learns it before anything else happens.
    pub fn ensure_available(self) -> Result<(), BoxError> {
        let available = match self {
            Self::Tcp => true,
            Self::Grpc => cfg!(feature = "grpc"),
            Self::Quic => cfg!(feature = "quic"),
            Self::Ws => cfg!(feature = "ws"),
        };
        if available {
            Ok(())
        } else {
            Err(unavailable(self))
        }
    }
}

/// The back-end and TLS flags (`#[command(flatten)]` them into a program's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Transport: tcp, grpc, quic or ws.
    #[arg(long, value_enum, default_value_t = BackendKind::Tcp)]
    pub backend: BackendKind,
    /// Request path of the WebSocket upgrade (--backend ws; default /rollup).
    #[arg(long, value_name = "PATH")]
    pub ws_path: Option<String>,
    /// Use TLS on the tcp, grpc and ws back-ends (quic always uses it).
    #[arg(long)]
    pub tls: bool,
    /// Certificate chain (PEM): a server's identity, or a client's for
    /// mutual TLS. A TLS server without it generates a self-signed one.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The same identity as one PKCS#12 bundle (.p12/.pfx): certificate
    /// chain and private key.
    #[arg(long, value_name = "PATH", conflicts_with = "tls_cert")]
    pub tls_p12: Option<PathBuf>,
    /// File holding the password of --tls-p12 (one trailing newline is
    /// ignored); without it the password is empty.
    #[arg(long, value_name = "PATH", requires = "tls_p12")]
    pub tls_p12_password_file: Option<PathBuf>,
    /// CA bundle (PEM): on a client, the CAs trusted for the server; on a
    /// server, the CAs client certificates must lead to (mutual TLS).
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// SHA-256 fingerprint of an accepted certificate (hex, colons allowed;
    /// repeatable): the server's on a client, a client's on a server.
    #[arg(long = "pin-sha256", value_name = "HEX")]
    pub pin_sha256: Vec<String>,
    /// Also speak TLS 1.2 on the tcp, grpc and ws back-ends (default: TLS 1.3 only).
    #[arg(long)]
    pub tls12: bool,
}

impl BackendArgs {
    /// Plain settings for `kind`, as a program that builds its own TLS
    /// material starts from.
    pub fn new(kind: BackendKind, tls: bool) -> Self {
        Self {
            backend: kind,
            ws_path: None,
            tls,
            tls_cert: None,
            tls_key: None,
            tls_p12: None,
            tls_p12_password_file: None,
            tls_ca: None,
            pin_sha256: Vec::new(),
            tls12: false,
        }
    }

    /// Whether the connection runs inside TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls || self.backend == BackendKind::Quic
    }

    /// Refuses flags that would silently be ignored, and back-ends this
    /// build lacks.
    pub fn validate(&self) -> Result<(), BoxError> {
        self.backend.ensure_available()?;
        if self.ws_path.is_some() && self.backend != BackendKind::Ws {
            return Err("--ws-path applies to --backend ws only".into());
        }
        let tls_flags = self.tls_cert.is_some()
            || self.tls_p12.is_some()
            || self.tls_ca.is_some()
            || !self.pin_sha256.is_empty()
            || self.tls12;
        if tls_flags && !self.uses_tls() {
            return Err(format!(
                "TLS flags given but --backend {} runs without TLS: add --tls",
                self.backend.name()
            )
            .into());
        }
        if self.uses_tls() && !cfg!(feature = "tls") {
            return Err("TLS: not available in this build (enable the `tls` feature)".into());
        }
        Ok(())
    }
}

/// A server ready to listen, and how clients can trust it.
pub struct ServerSetup {
    /// The server.
    pub server: Arc<dyn Server>,
    /// SHA-256 fingerprint (hex) of the certificate presented, when TLS is on.
    pub fingerprint: Option<String>,
    /// Whether that certificate was generated at start-up.
    pub self_signed: bool,
}

/// Builds the server `args` select; `tcp` applies to the tcp back-end. A
/// TLS server without `--tls-cert` presents a fresh self-signed certificate
/// for the host of `config.listen_addr` (and localhost).
pub fn server(
    args: &BackendArgs,
    config: ServerConfig,
    tcp: TcpOptions,
    auth: Option<ServerAuth>,
) -> Result<ServerSetup, BoxError> {
    args.validate()?;
    #[cfg(feature = "tls")]
    let tls = if args.uses_tls() {
        Some(tls::ServerTls::load(args, &config.listen_addr)?)
    } else {
        None
    };
    #[cfg(not(feature = "tls"))]
    let tls: Option<std::convert::Infallible> = None;

    let server: Arc<dyn Server> = match (args.backend, &tls) {
        (BackendKind::Tcp, None) => {
            Arc::new(publisher_transport::TcpServer::tcp_with(tcp, config, auth))
        }
        #[cfg(feature = "tls")]
        (BackendKind::Tcp, Some(tls)) => {
            use publisher_transport::{TransportServer, backend::tcp::tls::TcpTlsBackend};
            let rustls = publisher_transport::tls::server_config(
                &tls.identity,
                &tls.clients,
                &[publisher_transport::tls::ALPN],
            )?;
            let backend = TcpTlsBackend::new(tcp, Some(rustls), None);
            Arc::new(TransportServer::new(backend, config, auth))
        }
        #[cfg(feature = "grpc")]
        (BackendKind::Grpc, tls) => {
            use publisher_transport::{
                GrpcServer,
                backend::grpc::{GrpcBackend, GrpcOptions},
            };
            let mut backend = GrpcBackend::new(GrpcOptions::default());
            if let Some(tls) = tls {
                backend = backend.with_server_tls(&tls.identity, &tls.clients)?;
            }
            Arc::new(GrpcServer::grpc(config, backend, auth))
        }
        #[cfg(feature = "quic")]
        (BackendKind::Quic, Some(tls)) => {
            use publisher_transport::{QuicBackend, QuicOptions, QuicServer};
            let backend = QuicBackend::new(
                QuicOptions::default(),
                Some((&tls.identity, &tls.clients)),
                None,
            )?;
            Arc::new(QuicServer::new(backend, config, auth))
        }
        #[cfg(feature = "ws")]
        (BackendKind::Ws, tls) => {
            use publisher_transport::{WsBackend, WsServer};
            let mut backend = WsBackend::new(ws_options(args, tcp))?;
            if let Some(tls) = tls {
                backend = backend.with_server_tls(&tls.identity, &tls.clients)?;
            }
            Arc::new(WsServer::new(backend, config, auth))
        }
        #[allow(unreachable_patterns)]
        (kind, _) => return Err(unavailable(kind)),
    };
    #[cfg(feature = "tls")]
    let (fingerprint, self_signed) = match &tls {
        Some(tls) => (
            Some(tls.identity.fingerprint().to_string()),
            tls.self_signed,
        ),
        None => (None, false),
    };
    #[cfg(not(feature = "tls"))]
    let (fingerprint, self_signed) = (None, false);
    Ok(ServerSetup {
        server,
        fingerprint,
        self_signed,
    })
}

/// A back-end prepared once (TLS material loaded, configs built), cloned
/// for every client.
#[derive(Clone)]
enum Prepared {
    Tcp,
    #[cfg(feature = "tls")]
    TcpTls(Arc<rustls::ClientConfig>),
    #[cfg(feature = "grpc")]
    Grpc(publisher_transport::backend::grpc::GrpcBackend),
    #[cfg(feature = "quic")]
    Quic(publisher_transport::QuicBackend),
    #[cfg(feature = "ws")]
    Ws(publisher_transport::WsBackend),
}

/// Makes clients of the back-end `args` select.
#[derive(Clone)]
pub struct ClientFactory {
    prepared: Prepared,
}

impl ClientFactory {
    /// Loads and checks what `args` name (CA bundle, pins, client certificate).
    pub fn new(args: &BackendArgs) -> Result<Self, BoxError> {
        args.validate()?;
        #[cfg(feature = "tls")]
        let trust = if args.uses_tls() {
            Some(tls::server_trust(args)?)
        } else {
            None
        };
        #[cfg(not(feature = "tls"))]
        let trust: Option<std::convert::Infallible> = None;

        let prepared = match (args.backend, trust) {
            (BackendKind::Tcp, None) => Prepared::Tcp,
            #[cfg(feature = "tls")]
            (BackendKind::Tcp, Some(trust)) => Prepared::TcpTls(
                publisher_transport::tls::client_config(&trust, &[publisher_transport::tls::ALPN])?,
            ),
            #[cfg(feature = "grpc")]
            (BackendKind::Grpc, trust) => {
                use publisher_transport::backend::grpc::{GrpcBackend, GrpcOptions};
                let mut backend = GrpcBackend::new(GrpcOptions::default());
                if let Some(trust) = trust {
                    backend = backend.with_client_tls(&trust)?;
                }
                Prepared::Grpc(backend)
            }
            #[cfg(feature = "quic")]
            (BackendKind::Quic, Some(trust)) => {
                use publisher_transport::{QuicBackend, QuicOptions};
                Prepared::Quic(QuicBackend::new(
                    QuicOptions::default(),
                    None,
                    Some(&trust),
                )?)
            }
            #[cfg(feature = "ws")]
            (BackendKind::Ws, trust) => {
                use publisher_transport::WsBackend;
                let mut backend = WsBackend::new(ws_options(args, TcpOptions::default()))?;
                if let Some(trust) = trust {
                    backend = backend.with_client_tls(&trust)?;
                }
                Prepared::Ws(backend)
            }
            #[allow(unreachable_patterns)]
            (kind, _) => return Err(unavailable(kind)),
        };
        Ok(Self { prepared })
    }

    /// A new client; `tcp` applies to the tcp back-end.
    pub fn client(
        &self,
        config: ClientConfig,
        tcp: TcpOptions,
        auth: Option<ClientAuth>,
    ) -> Arc<dyn Client> {
        match &self.prepared {
            Prepared::Tcp => Arc::new(publisher_transport::TcpClient::tcp_with(tcp, config, auth)),
            #[cfg(feature = "tls")]
            Prepared::TcpTls(rustls) => {
                use publisher_transport::{TransportClient, backend::tcp::tls::TcpTlsBackend};
                let backend = TcpTlsBackend::new(tcp, None, Some(rustls.clone()));
                Arc::new(TransportClient::new(backend, config, auth))
            }
            #[cfg(feature = "grpc")]
            Prepared::Grpc(backend) => Arc::new(publisher_transport::GrpcClient::grpc(
                config,
                backend.clone(),
                auth,
            )),
            #[cfg(feature = "quic")]
            Prepared::Quic(backend) => Arc::new(publisher_transport::QuicClient::new(
                backend.clone(),
                config,
                auth,
            )),
            #[cfg(feature = "ws")]
            Prepared::Ws(backend) => Arc::new(publisher_transport::WsClient::new(
                backend.clone().with_tcp(tcp),
                config,
                auth,
            )),
        }
    }
}

/// The WebSocket settings of `args`, over `tcp`.
#[cfg(feature = "ws")]
fn ws_options(args: &BackendArgs, tcp: TcpOptions) -> publisher_transport::WsOptions {
    let mut options = publisher_transport::WsOptions {
        tcp,
        ..Default::default()
    };
    if let Some(path) = &args.ws_path {
        options.path.clone_from(path);
    }
    options
}

fn unavailable(kind: BackendKind) -> BoxError {
    format!(
        "--backend {0}: not available in this build (enable the `{0}` feature)",
        kind.name()
    )
    .into()
}

/// Names a development certificate for `listen_addr` must carry: its host,
/// plus the loopback names (a server listening on every interface is
/// reached by whatever name the client uses; pinning does not check names).
pub fn certificate_names(listen_addr: &str) -> Vec<String> {
    let host = match listen_addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => listen_addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    let mut names = Vec::new();
    if !host.is_empty() && !unspecified {
        names.push(host.to_owned());
    }
    for name in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

#[cfg(feature = "tls")]
mod tls {
    use publisher_transport::tls::{ClientTrust, Fingerprint, Identity, ServerTrust, load_certs};

    use super::{BackendArgs, BoxError, certificate_names};

    /// A server's certificate and how it verifies client certificates.
    pub struct ServerTls {
        pub identity: Identity,
        pub clients: ClientTrust,
        pub self_signed: bool,
    }

    impl ServerTls {
        pub fn load(args: &BackendArgs, listen_addr: &str) -> Result<Self, BoxError> {
            let (identity, self_signed) = match identity(args)? {
                Some(identity) => (identity, false),
                None => {
                    let names = certificate_names(listen_addr);
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    (Identity::self_signed(&names)?, true)
                }
            };
            let clients = ClientTrust {
                roots: match &args.tls_ca {
                    Some(path) => load_certs(path)?,
                    None => Vec::new(),
                },
                pins: parse_pins(&args.pin_sha256)?,
                allow_tls12: args.tls12,
            };
            Ok(Self {
                identity,
                clients,
                self_signed,
            })
        }
    }

    /// How a client verifies the server, and its certificate for mutual TLS.
    pub fn server_trust(args: &BackendArgs) -> Result<ServerTrust, BoxError> {
        let trust = ServerTrust {
            roots: match &args.tls_ca {
                Some(path) => load_certs(path)?,
                None => Vec::new(),
            },
            pins: parse_pins(&args.pin_sha256)?,
            identity: identity(args)?,
            allow_tls12: args.tls12,
        };
        if trust.roots.is_empty() && trust.pins.is_empty() {
            return Err(format!(
                "--backend {}: TLS needs a way to verify the server: give --tls-ca or \
                 --pin-sha256 (a server with a generated certificate prints its \
                 `tls fingerprint`)",
                args.backend.name()
            )
            .into());
        }
        Ok(trust)
    }

    /// The identity given by --tls-cert/--tls-key or --tls-p12, if any.
    fn identity(args: &BackendArgs) -> Result<Option<Identity>, BoxError> {
        if let Some(bundle) = &args.tls_p12 {
            let password = match &args.tls_p12_password_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|err| {
                        format!("--tls-p12-password-file {}: {err}", path.display())
                    })?;
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    text.strip_suffix('\r').unwrap_or(text).to_owned()
                }
                None => String::new(),
            };
            return Ok(Some(Identity::from_pkcs12(bundle, &password)?));
        }
        match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem_files(cert, key)?)),
            _ => Ok(None),
        }
    }

    fn parse_pins(pins: &[String]) -> Result<Vec<Fingerprint>, BoxError> {
        pins.iter()
            .map(|pin| {
                pin.parse::<Fingerprint>()
                    .map_err(|err| format!("--pin-sha256: {err}").into())
            })
            .collect()
    }
}
