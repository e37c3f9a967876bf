//! Configuration files: the shipped examples load, defaults match the
//! structs', and every mistake is reported with the file and the key path.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use publisher_transport::{
    ClientConfig, CryptoBackend, KeyError, PublicKey, SecretKey, ServerConfig, SignedFramesPolicy,
    TcpClient, TcpOptions, TcpServer, TrustMode, channel_handler,
    config_file::{
        ConfigError, Format, Publisher, PublisherFile, PublisherSettings, Role, Sequencer,
        SequencerFile, SequencerSettings, Settings,
    },
};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config");

/// Writes `text` as `name` in `dir`, returning the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Copies an example into `dir` and creates the key file it names there.
fn example_in(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(Path::new(EXAMPLES).join(name), &path).unwrap();
    let key_file = match name.starts_with("publisher") {
        true => {
            PublisherSettings::read(&path)
                .unwrap()
                .auth
                .private_key_file
        }
        false => {
            SequencerSettings::read(&path)
                .unwrap()
                .auth
                .private_key_file
        }
    };
    let key_file = key_file.expect("the examples name a key file");
    assert!(key_file.starts_with(dir), "resolved next to the file");
    if !key_file.exists() {
        SecretKey::generate().save(&key_file).unwrap();
    }
    path
}

fn publisher_err(name: &str, text: &str) -> ConfigError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, text);
    PublisherFile::load(&path).expect_err("must be refused")
}

fn sequencer_err(name: &str, text: &str) -> ConfigError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, text);
    SequencerFile::load(&path).expect_err("must be refused")
}

/// The error's text from the file name on (the temporary directory varies).
fn message(err: &ConfigError) -> String {
    let text = err.to_string();
    let dir = err.path().parent().unwrap().display().to_string();
    text.strip_prefix(&format!("{dir}/"))
        .unwrap_or(&text)
        .to_owned()
}

#[test]
fn examples_load_and_formats_agree() {
    let dir = tempfile::tempdir().unwrap();
    let toml = PublisherFile::load(example_in(dir.path(), "publisher.toml")).unwrap();
    let yaml = PublisherFile::load(example_in(dir.path(), "publisher.yaml")).unwrap();
    assert_eq!(toml.transport, yaml.transport);
    assert_eq!(toml.transport.max_connections, 5000);
    assert_eq!(toml.transport.max_message_size, 50 * 1024 * 1024);
    assert_eq!(toml.transport.read_timeout, Duration::from_secs(30));
    for file in [&toml, &yaml] {
        let auth = file.auth.as_ref().expect("auth enabled");
        assert_eq!(
            auth.trust.identities(),
            ["arbitrum", "base", "optimism"],
            "trusted sequencers"
        );
        assert_eq!(auth.signed_frames, SignedFramesPolicy::Offer);
        assert!(file.public_key().is_some(), "the key file was loaded");
    }

    let toml = SequencerFile::load(example_in(dir.path(), "sequencer.toml")).unwrap();
    let yaml = SequencerFile::load(example_in(dir.path(), "sequencer.yaml")).unwrap();
    assert_eq!(toml.transport, yaml.transport);
    assert_eq!(toml.transport.client_id, "optimism");
    assert_eq!(toml.transport.max_reconnect_delay, Duration::from_secs(60));
    for file in [&toml, &yaml] {
        let auth = file.auth.as_ref().expect("auth enabled");
        assert!(auth.server_key.is_some() && auth.extensions && auth.signed_frames);
    }
    // Both sequencer files name the same key file, so the same key.
    assert_eq!(toml.public_key(), yaml.public_key());
}

#[test]
fn omitted_keys_take_the_structs_defaults() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("p.toml", "[auth]\nenabled = false\n"),
        ("p.yaml", "auth:\n  enabled: false\n"),
        ("p.yml", "transport: {}\nauth: { enabled: false }\n"),
    ] {
        let file = PublisherFile::load(write(dir.path(), name, text)).unwrap();
        assert_eq!(file.transport, ServerConfig::default(), "{name}");
        assert_eq!(file.tcp, TcpOptions::default(), "{name}");
        assert!(file.auth.is_none());
    }
    let file = SequencerFile::load(write(dir.path(), "s.toml", "[auth]\nenabled = false")).unwrap();
    let defaults = ClientConfig {
        client_id: file.transport.client_id.clone(),
        ..ClientConfig::default()
    };
    assert_eq!(file.transport, defaults);
    assert!(!file.transport.client_id.is_empty());

    // An enabled publisher without a key: Go-mode handshakes, defaults as ServerAuth::new.
    let file = PublisherFile::load(write(dir.path(), "k.toml", "[auth]\nenabled = true")).unwrap();
    let auth = file.auth.unwrap();
    assert!(auth.key.is_none() && auth.trust.is_empty());
    assert_eq!(auth.signed_frames, SignedFramesPolicy::default());
    assert_eq!(auth.backend, CryptoBackend::default());
    assert_eq!(auth.max_clock_skew, Duration::from_secs(30));
}

#[test]
fn off_turns_optional_settings_off() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[transport]\nping_interval = \"off\"\nrate_limit = \"off\"\n\
                [transport.tcp]\nkeep_alive = \"off\"\n[auth]\nenabled = false\n";
    let yaml = "transport:\n  ping_interval: off\n  rate_limit: ~\n  tcp: { keep_alive: null }\n\
                auth: { enabled: false }\n";
    for (name, text) in [("off.toml", toml), ("off.yaml", yaml)] {
        let file = PublisherFile::load(write(dir.path(), name, text)).unwrap();
        assert_eq!(file.transport.ping_interval, None, "{name}");
        assert_eq!(file.transport.rate_limit, None, "{name}");
        assert_eq!(file.tcp.keep_alive, None, "{name}");
    }
    let err = publisher_err(
        "p.toml",
        "[transport]\nlisten_addr = \"off\"\n[auth]\nenabled = false",
    );
    assert_eq!(
        message(&err),
        "p.toml: transport.listen_addr: \"off\" turns off optional settings only; this one needs a value"
    );
    // In `auth`, "off" is a plain value.
    let file = PublisherFile::load(write(
        dir.path(),
        "sf.yaml",
        "auth: { enabled: true, signed_frames: off }",
    ))
    .unwrap();
    assert_eq!(file.auth.unwrap().signed_frames, SignedFramesPolicy::Off);
}

/// What reading `text` as `name` gives one side: its socket options, or
/// the error from the file name on.
fn read_as<R: Role>(name: &str, text: &str) -> Result<TcpOptions, String> {
    let dir = tempfile::tempdir().unwrap();
    Settings::<R>::read(write(dir.path(), name, text))
        .map(|settings| settings.tcp)
        .map_err(|err| message(&err))
}

#[test]
fn both_sides_share_the_file_handling() {
    let off = "[transport]\nping_interval = \"off\"\n[transport.tcp]\nkeep_alive = \"off\"\n\
               nodelay = false\nbacklog = 16\n[auth]\nenabled = false\n";
    let secret = "11".repeat(32);
    let both_keys =
        format!("[auth]\nenabled = true\nprivate_key_file = \"k.key\"\nprivate_key = \"{secret}\"");
    // Name, text, and the outcome both sides must give (`None`: some error).
    type Case<'a> = (&'a str, &'a str, Option<Result<TcpOptions, &'a str>>);
    let cases: [Case; 13] = [
        (
            "a.toml",
            off,
            Some(Ok(TcpOptions {
                nodelay: false,
                keep_alive: None,
                backlog: 16,
            })),
        ),
        (
            "b.yaml",
            "transport:\n  tcp: { keep_alive: 45s }\nauth: { enabled: false }",
            Some(Ok(TcpOptions {
                keep_alive: Some(Duration::from_secs(45)),
                ..TcpOptions::default()
            })),
        ),
        (
            "c.toml",
            "[transport.tcp]\nkeep_alive = \"40000s\"\n[auth]\nenabled = false",
            Some(Err(
                "c.toml: transport.tcp.keep_alive: must be between 1 s and 32767 s",
            )),
        ),
        (
            "d.yaml",
            "transport:\n  tcp: { nodelay: off }\nauth: { enabled: false }",
            Some(Err(
                "d.yaml: transport.tcp.nodelay: \"off\" turns off optional settings only; this one needs a value",
            )),
        ),
        (
            "e.toml",
            "[transport.tcp]\nkeep_alive = \"30 parsecs\"\n[auth]\nenabled = false",
            None,
        ),
        (
            "f.yaml",
            "transport:\n  tcp: { no_delay: true }\nauth: { enabled: false }",
            Some(Err(
                "f.yaml: transport.tcp.no_delay: unknown field `no_delay`, expected one of `nodelay`, `keep_alive`, `backlog`",
            )),
        ),
        ("g.toml", &both_keys, None),
        (
            "h.toml",
            "[auth]\nenabled = false\ngenerate_key_if_missing = true",
            None,
        ),
        (
            "i.toml",
            "[transport]\nmax_message_size = 1\n[auth]\nenabled = false",
            None,
        ),
        ("j.yaml", "auth: {}", None),
        ("k.toml", "[transport\n", None),
        ("l.json", "{}", None),
        (
            "m.yaml",
            "transport: { read_timeout: off }\nauth: { enabled: false }",
            None,
        ),
    ];
    for (name, text, expected) in cases {
        let publisher = read_as::<Publisher>(name, text);
        let sequencer = read_as::<Sequencer>(name, text);
        assert_eq!(publisher, sequencer, "{name}");
        if let Some(expected) = expected {
            assert_eq!(publisher, expected.map_err(str::to_owned), "{name}");
        } else {
            assert!(publisher.is_err(), "{name}: {publisher:?}");
        }
    }
}

#[test]
fn invalid_values_name_file_and_key() {
    let cases: [(&str, &str, &str); 10] = [
        (
            "p.toml",
            "[transport]\nread_timeout = \"30 parsecs\"\n[auth]\nenabled = false",
            "p.toml: transport.read_timeout: invalid duration \"30 parsecs\": unknown time unit \"parsecs\"",
        ),
        (
            "p.yaml",
            "transport:\n  write_timeout: 30\nauth: { enabled: false }",
            "p.yaml: transport.write_timeout: invalid type: integer `30`, expected a duration (a string such as \"30s\"",
        ),
        (
            "p.toml",
            "[transport]\nmax_connections = \"many\"\n[auth]\nenabled = false",
            "p.toml: transport.max_connections: invalid type: string \"many\", expected usize",
        ),
        (
            "p.toml",
            "[transport]\nlisten = \":8080\"\n[auth]\nenabled = false",
            "p.toml: transport.listen: unknown field `listen`, expected one of `listen_addr`, `max_connections`",
        ),
        (
            "p.yaml",
            "transport:\n  tcp:\n    no_delay: true\nauth: { enabled: false }",
            "p.yaml: transport.tcp.no_delay: unknown field `no_delay`, expected one of `nodelay`, `keep_alive`, `backlog`",
        ),
        (
            "p.toml",
            "[transport.rate_limit]\nburst = 5\nper_sec = 1.0\n[auth]\nenabled = false",
            "p.toml: transport.rate_limit.per_sec: unknown field `per_sec`",
        ),
        (
            "p.toml",
            "[auth]\nenabled = true\ntrusted_sequencer = {}",
            "p.toml: auth.trusted_sequencer: unknown field `trusted_sequencer`, expected one of `enabled`",
        ),
        (
            "p.toml",
            "[metrics]\nlisten = \":9090\"\n[auth]\nenabled = false",
            "p.toml: metrics: unknown field `metrics`, expected `transport` or `auth`",
        ),
        (
            "p.yaml",
            "auth: { enabled: true, signed_frames: always }",
            "p.yaml: auth.signed_frames: unknown variant `always`, expected one of `off`, `offer`, `require`",
        ),
        (
            "p.yaml",
            "auth: { enabled: true, trusted_sequencers: { base: \"02abc\" } }",
            "p.yaml: auth.trusted_sequencers.base: invalid public key",
        ),
    ];
    for (name, text, expected) in cases {
        let err = publisher_err(name, text);
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
        let got = message(&err);
        assert!(got.starts_with(expected), "got:  {got}\nwant: {expected}…");
    }
}

#[test]
fn missing_auth_decision_is_refused() {
    let err = publisher_err("p.toml", "[transport]\nmax_connections = 10\n");
    assert_eq!(message(&err), "p.toml: auth: missing field `auth`");
    let err = sequencer_err("s.yaml", "auth:\n  private_key_file: s.key\n");
    assert_eq!(
        message(&err),
        "s.yaml: auth.enabled: missing field `enabled`"
    );
}

#[test]
fn semantic_checks_name_file_and_key() {
    let err = publisher_err(
        "p.toml",
        "[transport]\nmax_connections = 0\n[auth]\nenabled = false",
    );
    assert_eq!(
        message(&err),
        "p.toml: transport.max_connections: must be at least 1"
    );
    assert_eq!(err.field(), Some("transport.max_connections"));
    let err = publisher_err(
        "p.yaml",
        "transport: { read_timeout: 0s }\nauth: { enabled: false }",
    );
    assert_eq!(
        message(&err),
        "p.yaml: transport.read_timeout: must be longer than zero"
    );
    let err = publisher_err(
        "p.toml",
        "[auth]\nenabled = true\nsigned_frames = \"require\"",
    );
    assert!(
        message(&err).starts_with("p.toml: auth.signed_frames: `require` needs a server key"),
        "{err}"
    );
    let err = sequencer_err(
        "s.toml",
        "[transport]\nclient_id = \"\"\n[auth]\nenabled = false",
    );
    assert_eq!(
        message(&err),
        "s.toml: transport.client_id: must not be empty"
    );
    let err = sequencer_err("s.toml", "[auth]\nenabled = true");
    assert_eq!(
        message(&err),
        "s.toml: auth: authentication needs a key: set private_key_file"
    );
    let err = sequencer_err(
        "s.toml",
        "[auth]\nenabled = true\nprivate_key_file = \"s.key\"\nsigned_frames = \"require\"",
    );
    assert!(message(&err).starts_with("s.toml: auth.signed_frames: a sequencer offers"));
    let err = sequencer_err(
        "s.toml",
        &format!(
            "[auth]\nenabled = true\nprivate_key_file = \"s.key\"\nextensions = false\npublisher_key = \"{}\"",
            SecretKey::generate().public_key()
        ),
    );
    assert_eq!(err.field(), Some("auth.publisher_key"));
    let err = publisher_err(
        "p.toml",
        &format!(
            "[auth]\nenabled = true\nprivate_key_file = \"p.key\"\nprivate_key = \"{}\"",
            "11".repeat(32)
        ),
    );
    assert_eq!(
        message(&err),
        "p.toml: auth: set private_key_file or private_key, not both"
    );
    let err = publisher_err(
        "p.toml",
        "[auth]\nenabled = true\ngenerate_key_if_missing = true",
    );
    assert_eq!(err.field(), Some("auth.generate_key_if_missing"));
}

#[test]
fn key_problems_name_file_and_key() {
    let err = publisher_err(
        "p.toml",
        "[auth]\nenabled = true\nprivate_key_file = \"missing.key\"",
    );
    let ConfigError::Key { field, source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(field, "auth.private_key_file");
    assert!(matches!(source, KeyError::KeyFileIo { .. }));
    assert!(message(&err).starts_with("p.toml: auth.private_key_file: key file "));
    assert!(err.to_string().contains("missing.key"));

    // One key under two identities.
    let key = SecretKey::generate().public_key().to_string();
    let err = publisher_err(
        "p.toml",
        &format!("[auth]\nenabled = true\n[auth.trusted_sequencers]\na = \"{key}\"\nb = \"{key}\""),
    );
    assert_eq!(
        message(&err),
        "p.toml: auth.trusted_sequencers.b: public key is already trusted as \"a\""
    );
}

/// Three public keys of fresh secret keys.
fn fresh_public_keys() -> [PublicKey; 3] {
    std::array::from_fn(|_| SecretKey::generate().public_key().clone())
}

#[test]
fn trusted_keys_are_extended_only_unless_marked_go_compatible() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = fresh_public_keys();
    let toml = format!(
        "[auth]\nenabled = true\nprivate_key = \"{}\"\n[auth.trusted_sequencers]\n\
         a = \"{a}\"\nb = {{ key = \"{b}\", go_compatible = true }}\n\
         c = {{ key = \"{c}\", go_compatible = false }}\n",
        "11".repeat(32)
    );
    let yaml = format!(
        "auth:\n  enabled: true\n  private_key: \"{}\"\n  trusted_sequencers:\n    \
         a: \"{a}\"\n    b: {{ key: \"{b}\", go_compatible: true }}\n    c: {{ key: \"{c}\" }}\n",
        "11".repeat(32)
    );
    for (name, text) in [("p.toml", toml), ("p.yaml", yaml)] {
        let file = PublisherFile::load(write(dir.path(), name, &text)).unwrap();
        let trust = file.auth.expect("auth is on").trust;
        assert_eq!(trust.mode_of("a"), Some(TrustMode::ExtendedOnly), "{name}");
        assert_eq!(trust.mode_of("b"), Some(TrustMode::GoCompatible), "{name}");
        assert_eq!(trust.mode_of("c"), Some(TrustMode::ExtendedOnly), "{name}");
        assert_eq!(trust.key_of("b"), Some(b.clone()), "{name}");
    }
    let err = publisher_err(
        "p.toml",
        &format!(
            "[auth]\nenabled = true\n[auth.trusted_sequencers]\na = {{ key = \"{a}\", go = true }}\n"
        ),
    );
    assert!(
        message(&err).starts_with("p.toml: auth.trusted_sequencers.a.go: unknown field `go`"),
        "{}",
        message(&err)
    );
}

#[test]
fn trusted_keys_may_carry_their_chain_id() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = fresh_public_keys();
    let toml = format!(
        "[auth]\nenabled = true\n[auth.trusted_sequencers]\n\
         a = {{ key = \"{a}\", chain_id = 901 }}\n\
         b = {{ key = \"{b}\", chain_id = \"op-mainnet\", go_compatible = true }}\nc = \"{c}\"\n"
    );
    let yaml = format!(
        "auth:\n  enabled: true\n  trusted_sequencers:\n    \
         a: {{ key: \"{a}\", chain_id: 901 }}\n    \
         b: {{ key: \"{b}\", chain_id: op-mainnet, go_compatible: true }}\n    c: \"{c}\"\n"
    );
    for (name, text) in [("p.toml", toml), ("p.yaml", yaml)] {
        let settings = PublisherSettings::read(write(dir.path(), name, &text)).unwrap();
        let entry = &settings.auth.trusted_sequencers["a"];
        assert_eq!(entry.chain_id.as_deref(), Some("901"), "{name}");
        let trust = settings.resolve().unwrap().auth.expect("auth is on").trust;
        assert_eq!(trust.chain_of("a").as_deref(), Some("901"), "{name}");
        assert_eq!(trust.chain_of("b").as_deref(), Some("op-mainnet"), "{name}");
        assert_eq!(trust.mode_of("b"), Some(TrustMode::GoCompatible), "{name}");
        assert_eq!(trust.chain_of("c"), None, "{name}");
        assert_eq!(
            trust.lookup(a.as_compressed()).unwrap().chain_id.as_deref(),
            Some("901")
        );
    }
    for (chain_id, problem) in [
        ("\"\"", "must not be empty"),
        ("-1", "must not be negative"),
    ] {
        let err = publisher_err(
            "p.toml",
            &format!(
                "[auth]\nenabled = true\n[auth.trusted_sequencers]\n\
                 a = {{ key = \"{a}\", chain_id = {chain_id} }}\n"
            ),
        );
        assert!(
            message(&err).starts_with("p.toml: auth.trusted_sequencers.a.chain_id: ")
                && message(&err).contains(problem),
            "{}",
            message(&err)
        );
    }
}

#[test]
fn syntax_errors_and_formats() {
    let err = publisher_err("p.toml", "[transport\nmax_connections = 1\n");
    let ConfigError::Syntax {
        format,
        line: Some(1),
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*format, Format::Toml);
    assert!(message(&err).starts_with("p.toml: invalid TOML: "), "{err}");
    assert!(message(&err).ends_with("at line 1 column 11"), "{err}");

    let err = publisher_err("p.yaml", "auth:\n  enabled: true\n bad: [\n");
    assert!(matches!(
        err,
        ConfigError::Syntax {
            format: Format::Yaml,
            line: Some(_),
            ..
        }
    ));
    assert!(message(&err).starts_with("p.yaml: invalid YAML: "), "{err}");

    let err = publisher_err("p.json", "{}");
    assert_eq!(
        message(&err),
        "p.json: unknown configuration format (expected .toml, .yaml or .yml)"
    );
    let err = PublisherFile::load("/nonexistent/publisher.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().starts_with("/nonexistent/publisher.toml: "));
    assert_eq!(Format::from_path(Path::new("a/b.YML")), Some(Format::Yaml));
}

#[test]
fn key_files_resolve_next_to_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let key = SecretKey::generate();
    key.save(dir.path().join("keys/seq.key")).unwrap();
    let path = write(
        dir.path(),
        "s.toml",
        "[auth]\nenabled = true\nprivate_key_file = \"keys/seq.key\"",
    );
    let file = SequencerFile::load(&path).unwrap();
    assert_eq!(file.public_key(), Some(key.public_key()));

    // generate_key_if_missing creates the file, owner-only.
    let path = write(
        dir.path(),
        "p.yaml",
        "auth: { enabled: true, private_key_file: keys/new.key, generate_key_if_missing: true }",
    );
    let first = PublisherFile::load(&path).unwrap();
    let again = PublisherFile::load(&path).unwrap();
    assert_eq!(first.public_key(), again.public_key());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keys/new.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn files_drive_a_mutually_authenticated_session() {
    let dir = tempfile::tempdir().unwrap();
    let publisher_key = SecretKey::generate();
    publisher_key
        .save(dir.path().join("publisher.key"))
        .unwrap();
    let sequencer_key = SecretKey::generate();
    sequencer_key.save(dir.path().join("seq.key")).unwrap();
    let publisher = PublisherFile::load(write(
        dir.path(),
        "publisher.toml",
        &format!(
            "[transport]\nlisten_addr = \"127.0.0.1:0\"\n\
             [auth]\nenabled = true\nprivate_key_file = \"publisher.key\"\nsigned_frames = \"require\"\n\
             [auth.trusted_sequencers]\noptimism = \"{}\"\n",
            sequencer_key.public_key()
        ),
    ))
    .unwrap();
    let (config, tcp, auth) = publisher.into_parts();
    let server = TcpServer::tcp_with(tcp, config, auth);
    let (handler, _inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    let sequencer = SequencerFile::load(write(
        dir.path(),
        "sequencer.yaml",
        &format!(
            "transport:\n  server_addr: \"{addr}\"\n  client_id: optimism\n\
             auth:\n  enabled: true\n  private_key_file: seq.key\n  publisher_key: \"{}\"\n",
            publisher_key.public_key()
        ),
    ))
    .unwrap();
    let (config, tcp, auth) = sequencer.into_parts();
    let addr = config.server_addr.clone();
    let client = TcpClient::tcp_with(tcp, config, auth);
    client.connect(&addr).await.unwrap();
    let peers = server.connections();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].identity, "optimism");
    assert!(peers[0].signed_frames);
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
}

#[test]
fn queue_bytes_and_read_buffer_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "[transport]\nsend_queue_bytes = 1048576\nbuffer_size = 16384\n[auth]\nenabled = false";
    let file = PublisherFile::load(write(dir.path(), "p.toml", text)).unwrap();
    assert_eq!(file.transport.send_queue_bytes, 1 << 20);
    assert_eq!(file.transport.buffer_size, 16384);
    let file = SequencerFile::load(write(
        dir.path(),
        "s.yaml",
        "transport: { send_queue_bytes: 131072, buffer_size: 4096 }\nauth: { enabled: false }",
    ))
    .unwrap();
    assert_eq!(file.transport.send_queue_bytes, 128 * 1024);
    assert_eq!(file.transport.buffer_size, 4096);
    for (text, expected) in [
        (
            "[transport]\nbuffer_size = 0\n[auth]\nenabled = false",
            "p.toml: transport.buffer_size: must be between 1024 and 16777216 bytes",
        ),
        (
            "[transport]\nsend_queue_bytes = 100\n[auth]\nenabled = false",
            "p.toml: transport.send_queue_bytes: must be at least 64 KiB",
        ),
    ] {
        assert_eq!(message(&publisher_err("p.toml", text)), expected);
    }
}
