//! Operations: keygen, secrecy of private keys, and the Grafana dashboard and
//! docs/OPERATIONS.md checked against the crate so they cannot drift.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser as _;
use publisher_transport::{
    ClientAuth, ClientConfig, Message, SecretKey, ServerAuth, ServerConfig, TcpClient, TcpOptions,
    TcpServer, TrustStore,
    config_file::{PublisherFile, PublisherSettings, SequencerFile, SequencerSettings},
    proto::{Payload, rollup::v1::Vote},
};
use serde_yaml_ng::Value;

#[allow(dead_code)]
#[path = "../../examples/keygen.rs"]
mod keygen;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(relative)).unwrap()
}

// ---- keygen ----

#[test]
fn keygen_creates_shows_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seq.key");
    let path_arg = path.to_str().unwrap();
    let args = |extra: &[&str]| {
        let mut argv = vec!["keygen"];
        argv.extend_from_slice(extra);
        keygen::Args::try_parse_from(argv).unwrap()
    };

    let created = keygen::run(&args(&[path_arg])).unwrap();
    let key = SecretKey::load(&path).unwrap();
    let public = key.public_key();
    assert!(created.starts_with(&format!("created {path_arg} (mode 0600)\n")));
    assert!(created.contains(&format!("public key {public}\n")));
    assert!(created.contains(&format!(
        "uncompressed {}\n",
        hex::encode(public.to_uncompressed())
    )));
    let address = public.address().to_string();
    assert!(created.contains(&format!("address {address}\n")));
    assert!(
        address.starts_with("0x") && address.chars().any(|c| c.is_ascii_uppercase()),
        "EIP-55 mixed case: {address}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let secret = std::fs::read_to_string(&path).unwrap();
    assert_no_secret(&created, &secret);

    // Refuses to overwrite; the key survives.
    let err = keygen::run(&args(&[path_arg])).unwrap_err();
    assert!(matches!(err, keygen::KeygenError::Exists(_)));
    assert_eq!(
        err.to_string(),
        format!(
            "{path_arg}: already exists; pass --force to replace it (the key it holds is lost)"
        )
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);

    // --show prints the same public forms; --force replaces.
    let shown = keygen::run(&args(&["--show", path_arg])).unwrap();
    assert_eq!(shown, keygen::describe(public));
    let replaced = keygen::run(&args(&["--force", path_arg])).unwrap();
    assert!(!replaced.contains(&public.to_string()));
    assert_ne!(std::fs::read_to_string(&path).unwrap(), secret);
    assert!(keygen::Args::try_parse_from(["keygen", "--show", "--force", path_arg]).is_err());

    // Missing directory: an error, and no stray file.
    let missing = dir.path().join("no/such/dir.key");
    assert!(keygen::create(&missing, false).is_err());
    assert!(!missing.exists());
}

// ---- private keys stay private ----

/// Fails if `text` holds any 16-character run of the key's hex.
fn assert_no_secret(text: &str, secret_hex: &str) {
    let text = text.to_ascii_lowercase();
    let secret = secret_hex.trim().to_ascii_lowercase();
    assert_eq!(secret.len(), 64, "a key file holds 64 hex characters");
    for window in secret.as_bytes().windows(16) {
        let window = std::str::from_utf8(window).unwrap();
        assert!(!text.contains(window), "private key material in: {text}");
    }
}

/// A saved key and its hex.
fn saved_key(dir: &Path, name: &str) -> (SecretKey, String) {
    let key = SecretKey::generate();
    let path = dir.join(name);
    key.save(&path).unwrap();
    (key, std::fs::read_to_string(path).unwrap())
}

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with logs captured; returns its result and the log text.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let buffer = LogBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (result, logs)
}

#[test]
fn private_keys_never_appear_in_debug_errors_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (key, secret) = saved_key(dir.path(), "k.key");
    let key = Arc::new(key);
    let trust = Arc::new(TrustStore::new());
    for debug in [
        format!("{key:?}"),
        format!("{:?}", ServerAuth::new(key.clone(), trust)),
        format!("{:?}", ClientAuth::new(key.clone())),
    ] {
        assert_no_secret(&debug, &secret);
    }

    // Every failure of a key file: the message names the file, never the content.
    let corrupt = |name: &str, content: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let mut bad_hex = secret.clone().into_bytes();
    bad_hex[40] = b'z';
    let cases = [
        corrupt("bad-hex.key", String::from_utf8(bad_hex).unwrap()),
        corrupt("short.key", secret[..63].to_owned()),
        corrupt("long.key", format!("{secret}ab")),
        dir.path().join("missing.key"),
        dir.path().to_owned(), // a directory: unreadable as a file
    ];
    for path in &cases {
        let err = SecretKey::load(path).unwrap_err();
        assert_no_secret(&err.to_string(), &secret);
        assert_no_secret(&format!("{err:?}"), &secret);
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    // The same through configuration files, inline keys included, and the logs.
    let inline_bad = format!("{}z", &secret[..63]);
    let files = [
        (
            "a.toml",
            format!("[auth]\nenabled = true\nprivate_key = \"{inline_bad}\""),
        ),
        (
            "b.toml",
            format!("[auth]\nenabled = true\nprivate_key = \"{}", &secret),
        ),
        (
            "c.toml",
            format!("[auth]\nenabled = true\nprivate_key = {}", &secret),
        ),
        (
            "d.yaml",
            format!("auth:\n  enabled: true\n  private_key: [{secret}]"),
        ),
        (
            "e.yaml",
            format!(
                "auth:\n  enabled: true\n  private_key: {}",
                secret[..63].replace(|c: char| c.is_ascii_alphabetic(), "7")
            ),
        ),
        (
            "f.yaml",
            format!("auth:\n  enabled: true\n  private_key: 0x{}", &secret[..15]),
        ),
        (
            "g.toml",
            "[auth]\nenabled = true\nprivate_key_file = \"bad-hex.key\"".to_owned(),
        ),
        (
            "h.toml",
            "[auth]\nenabled = true\nprivate_key_file = \"long.key\"".to_owned(),
        ),
    ];
    for (name, text) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (result, logs) = with_logs(|| PublisherFile::load(&path));
        let err = result.expect_err(name);
        assert_no_secret(&err.to_string(), &secret);
        assert_no_secret(&format!("{err:?}"), &secret);
        assert_no_secret(&logs, &secret);
        let (result, _) = with_logs(|| SequencerFile::load(&path));
        assert_no_secret(&result.unwrap_err().to_string(), &secret);
    }

    // A valid inline key works, with a warning that shows no key.
    let path = dir.path().join("inline.yaml");
    std::fs::write(
        &path,
        format!("auth:\n  enabled: true\n  private_key: \"0x{secret}\"\n"),
    )
    .unwrap();
    let (file, logs) = with_logs(|| PublisherFile::load(&path).unwrap());
    assert_eq!(file.public_key(), Some(key.public_key()));
    assert!(
        logs.contains("auth.private_key holds the private key inline"),
        "{logs}"
    );
    assert_no_secret(&logs, &secret);
    assert_no_secret(&format!("{file:?}"), &secret);
    assert_no_secret(
        &format!("{:?}", PublisherSettings::read(&path).unwrap()),
        &secret,
    );
    assert_no_secret(
        &format!("{:?}", SequencerSettings::read(&path).unwrap()),
        &secret,
    );
}

// ---- Grafana dashboard ----

/// Every `publisher_transport_*` identifier in `text`.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for token in text.split(|c: char| !is_ident(c)) {
        if token.starts_with("publisher_transport_") {
            into.insert(token.to_owned());
        }
    }
}

/// Query texts of the dashboard: every `expr`, and the variables' queries.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("expr" | "definition" | "query", serde_json::Value::String(text)) => {
                        out.push(text.clone())
                    }
                    _ => dashboard_queries(child, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

/// `# TYPE` of every family in a scrape.
fn families(scrape: &str, into: &mut BTreeMap<String, String>) {
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            into.insert(name.to_owned(), kind.to_owned());
        }
    }
}

fn vote() -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            vote: true,
            ..Default::default()
        })),
    }
}

/// Scrapes of a server and a client after real traffic: a refused connect,
/// an authenticated session, messages both ways, a broadcast, a rejected
/// handshake, a message with no handler set.
async fn scrapes_after_traffic() -> (String, String) {
    let server_key = Arc::new(SecretKey::generate());
    let client_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust
        .add("optimism", client_key.public_key().clone())
        .unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    let addr = server.start().await.unwrap().to_string();

    let mut config = ClientConfig::default().with_client_id("optimism");
    config.auto_reconnect = false;
    let client = TcpClient::tcp(
        config.clone(),
        Some(ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    assert!(client.connect(&closed_addr).await.is_err());
    client.connect(&addr).await.unwrap();
    client.send(vote()).await.unwrap();
    server.broadcast(vote(), None).unwrap();
    let rogue = TcpClient::tcp(
        config,
        Some(ClientAuth::new(Arc::new(SecretKey::generate()))),
    );
    assert!(rogue.connect(&addr).await.is_err());
    // Until the server has read the message and the client the broadcast.
    let seen = |text: &str| text.contains("type=\"vote\"} 1");
    for _ in 0..500 {
        if seen(&server.metrics().render()) && seen(&client.metrics().render()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Label sets appear on first use; these need forged frames to occur,
    // and handler time a handler (this server has none).
    for metrics in [server.metrics(), client.metrics()] {
        metrics
            .signature_failures_total
            .with_label_values(&["bad_signature"]);
        metrics.processing_duration.with_label_values(&["vote"]);
    }
    let scrapes = (server.metrics().render(), client.metrics().render());
    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
    scrapes
}

#[tokio::test]
async fn dashboard_queries_only_metrics_the_crate_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docs/grafana/publisher-transport.json"))
            .expect("the dashboard is valid JSON");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "unique panel ids"
        );
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
            assert!(!panel["targets"].as_array().unwrap().is_empty());
        }
    }

    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let mut referenced = BTreeSet::new();
    for query in &queries {
        metric_names(query, &mut referenced);
    }
    let (server, client) = scrapes_after_traffic().await;
    let mut exported = BTreeMap::new();
    families(&server, &mut exported);
    families(&client, &mut exported);
    let mut unknown = Vec::new();
    for name in &referenced {
        let histogram_base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| exported.get(*base).map(String::as_str) == Some("histogram"));
        if !exported.contains_key(name) && histogram_base.is_none() {
            unknown.push(name.clone());
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics no scrape has: {unknown:?}\nexported: {:?}",
        exported.keys().collect::<Vec<_>>()
    );
    // What the dashboard promises to show.
    for family in [
        "publisher_transport_server_connections_active",
        "publisher_transport_server_connections_total",
        "publisher_transport_server_messages_total",
        "publisher_transport_server_broadcast_recipients_total_bucket",
        "publisher_transport_server_broadcast_duration_seconds_bucket",
        "publisher_transport_server_handshakes_total",
        "publisher_transport_server_signature_failures_total",
        "publisher_transport_server_send_queue_depth",
        "publisher_transport_server_bytes_total",
        "publisher_transport_server_errors_total",
        "publisher_transport_client_reconnects_total",
    ] {
        assert!(referenced.contains(family), "the dashboard shows {family}");
    }
}

// ---- docs/OPERATIONS.md ----

/// The lines of the section under `heading`, up to the next heading.
fn section<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != heading);
    assert!(lines.next().is_some(), "OPERATIONS.md has `{heading}`");
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// Table rows of a section: first cell (without backticks) → second cell.
fn table(lines: &[&str]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let key = cells[0].trim_start_matches("| ").trim_matches('`');
            (key.to_owned(), cells[1].trim().to_owned())
        })
        .collect()
}

/// Leaf key paths of a serialized config and their defaults as TOML
/// literals (`"off"` for an absent optional setting).
fn leaves(value: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    let key = |k: &Value| format!("{prefix}{}", k.as_str().unwrap());
    match value {
        Value::Mapping(map) => {
            for (k, child) in map {
                leaves(child, &format!("{}.", key(k)), out);
            }
        }
        leaf => {
            let literal = match leaf {
                Value::Null => "\"off\"".to_owned(),
                Value::String(text) => format!("{text:?}"),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("unexpected default {other:?}"),
            };
            out.insert(prefix.trim_end_matches('.').to_owned(), literal);
        }
    }
}

/// The documented table must list exactly the struct's keys, each with its
/// default.
fn check_reference(doc: &str, heading: &str, defaults: &Value, free: &[&str]) {
    let mut expected = BTreeMap::new();
    leaves(defaults, "", &mut expected);
    let documented = table(&section(doc, heading));
    let wanted: Vec<String> = expected
        .iter()
        .map(|(key, default)| format!("| `{key}` | `{default}` | … |"))
        .collect();
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "keys of `{heading}`; rows wanted:\n{}",
        wanted.join("\n")
    );
    for (key, default) in &expected {
        if !free.contains(&key.as_str()) {
            assert_eq!(
                documented[key],
                format!("`{default}`"),
                "default of {key} in `{heading}`"
            );
        }
    }
}

/// The keys an `auth` section accepts, from the unknown-key error.
fn auth_keys(publisher: bool) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, "[auth]\nenabled = false\nnot_a_key = 1\n").unwrap();
    let err = if publisher {
        PublisherSettings::read(&path).unwrap_err()
    } else {
        SequencerSettings::read(&path).unwrap_err()
    };
    let text = err.to_string();
    let (_, expected) = text.split_once("expected one of ").expect(&text);
    expected
        .split(", ")
        .map(|k| k.trim_matches('`').to_owned())
        .collect()
}

#[test]
fn operations_reference_matches_the_config_structs() {
    let doc = read("docs/OPERATIONS.md");
    // A `transport` section: the config's keys and `tcp`, the TCP back-end's.
    let transport = |config: Value| {
        let mut section = config;
        section.as_mapping_mut().unwrap().insert(
            "tcp".into(),
            serde_yaml_ng::to_value(TcpOptions::default()).unwrap(),
        );
        section
    };
    check_reference(
        &doc,
        "### `transport` (publisher: `ServerConfig`)",
        &transport(serde_yaml_ng::to_value(ServerConfig::default()).unwrap()),
        &[],
    );
    check_reference(
        &doc,
        "### `transport` (sequencer: `ClientConfig`)",
        &transport(serde_yaml_ng::to_value(ClientConfig::default()).unwrap()),
        &["client_id"],
    );
    for (publisher, heading) in [
        (true, "### `auth` (publisher)"),
        (false, "### `auth` (sequencer)"),
    ] {
        let documented: BTreeSet<String> = table(&section(&doc, heading)).into_keys().collect();
        assert_eq!(documented, auth_keys(publisher), "keys of `{heading}`");
    }
}

/// Pieces of a quoted error or log line that the crate (or the system)
/// prints verbatim: placeholders `<…>`, `…`, `: ` and `field=` split it.
fn fragments(quoted: &str) -> Vec<String> {
    let mut text = String::new();
    let mut in_placeholder = false;
    for c in quoted.chars() {
        match c {
            '<' => in_placeholder = true,
            '>' if in_placeholder => {
                in_placeholder = false;
                text.push('\u{0}');
            }
            '…' => text.push('\u{0}'),
            _ if in_placeholder => {}
            _ => text.push(c),
        }
    }
    let text = text.replace(": ", "\u{0}");
    let mut pieces = Vec::new();
    for part in text.split('\u{0}') {
        let mut piece = String::new();
        for word in part.split(' ') {
            match word.split_once('=') {
                Some((field, value))
                    if !field.is_empty()
                        && field.chars().all(|c| c.is_ascii_lowercase() || c == '_') =>
                {
                    pieces.push(std::mem::take(&mut piece));
                    piece.push_str(value);
                }
                _ => {
                    if !piece.is_empty() {
                        piece.push(' ');
                    }
                    piece.push_str(word);
                }
            }
        }
        pieces.push(piece);
    }
    pieces
        .into_iter()
        .map(|p| p.trim().trim_matches('"').trim().to_owned())
        .filter(|p| p.chars().count() >= 12)
        .collect()
}

#[test]
fn troubleshooting_quotes_the_crates_own_texts() {
    let doc = read("docs/OPERATIONS.md");
    let mut corpus = String::new();
    // Every source file of the library and the programs, at any depth.
    let mut dirs = vec![
        Path::new(ROOT).join("src"),
        Path::new(ROOT).join("examples"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                corpus.push_str(&std::fs::read_to_string(path).unwrap());
            }
        }
    }
    // Texts of the operating system and rustls, quoted as they appear.
    let external = [
        "Connection refused (os error 111)",
        "invalid peer certificate",
        "ApplicationVerificationFailure",
        "received corrupt message of type InvalidContentType",
        "received fatal alert",
        "AccessDenied",
    ];
    let rows: Vec<&str> = section(&doc, "## Troubleshooting")
        .into_iter()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Symptom"))
        .collect();
    assert!(rows.len() >= 12, "a row per common problem");
    let mut checked = 0;
    for row in rows {
        let seen = row.split(" | ").nth(1).expect("a `What you see` column");
        for quoted in seen.split('`').skip(1).step_by(2) {
            for piece in fragments(quoted) {
                let known = corpus.contains(&piece)
                    || external
                        .iter()
                        .any(|e| piece.contains(e) || e.contains(&piece));
                assert!(
                    known,
                    "{piece:?} (from `{quoted}`) is not a text the crate prints"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} fragments checked");
}
