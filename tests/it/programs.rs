//! The publisher and sequencer programs' command lines: each flag's help
//! describes that flag, and a configuration file and the flags are merged
//! before anything is checked, so flags supply what the file lacks.

use std::{path::Path, process::Stdio, sync::Arc, time::Duration};

use clap::{CommandFactory, Parser};
use publisher_transport::{
    ClientAuth, ClientConfig, PublicKey, SecretKey, SignedFramesPolicy, TcpClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::timeout,
};

use crate::common::cli::{PublisherArgs, SequencerArgs};

/// The help text under `flag` in `help` (clap's long help: the flag's line,
/// then its description, up to the next flag).
fn help_of(help: &str, flag: &str) -> String {
    let mut lines = help
        .lines()
        .skip_while(|line| !line.trim_start().split([' ', ',']).any(|word| word == flag));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("{flag} missing in:\n{help}"));
    let rest = lines.take_while(|line| !line.trim_start().starts_with('-'));
    std::iter::once(first)
        .chain(rest)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn each_sequencer_flag_describes_itself() {
    let help = SequencerArgs::command().render_long_help().to_string();
    let connect = help_of(&help, "--connect");
    let config = help_of(&help, "--config");
    assert!(connect.contains("Publisher address"), "{connect}");
    assert!(!config.contains("Publisher address"), "{config}");
    assert!(config.contains("Configuration file"), "{config}");
    let help = PublisherArgs::command().render_long_help().to_string();
    assert!(help_of(&help, "--listen").contains("Address to listen on"));
    assert!(help_of(&help, "--config").contains("Configuration file"));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A configuration file `name` holding `text` in a fresh directory, and
/// where a key file for the flags goes there.
fn file_and_key(name: &str, text: &str) -> (tempfile::TempDir, String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), name, text);
    let key_file = dir.path().join("flag.key");
    (dir, config, key_file)
}

fn publisher(argv: &[&str]) -> PublisherArgs {
    PublisherArgs::try_parse_from(std::iter::once("publisher").chain(argv.iter().copied())).unwrap()
}

fn sequencer(argv: &[&str]) -> SequencerArgs {
    SequencerArgs::try_parse_from(std::iter::once("sequencer").chain(argv.iter().copied())).unwrap()
}

#[test]
fn a_key_file_flag_satisfies_require_in_the_file() {
    let (_dir, config, key_file) = file_and_key(
        "publisher.toml",
        "[transport]\nlisten_addr = \"127.0.0.1:0\"\n[auth]\nenabled = true\nsigned_frames = \"require\"\n",
    );
    let key = SecretKey::load_or_generate(&key_file).unwrap();
    let setup = publisher(&[
        "--config",
        &config,
        "--key-file",
        key_file.to_str().unwrap(),
    ])
    .resolve()
    .unwrap();
    let auth = setup.auth.expect("authentication stays on");
    assert_eq!(auth.signed_frames, SignedFramesPolicy::Require);
    assert_eq!(
        auth.key.as_ref().map(|k| k.public_key()),
        Some(key.public_key())
    );
    assert_eq!(setup.key.public_key(), key.public_key());
    assert_eq!(setup.config.listen_addr, "127.0.0.1:0");
}

#[test]
fn publisher_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file_key, flag_key, other) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    let config = write(
        dir.path(),
        "publisher.toml",
        &format!(
            "[auth]\nenabled = true\n[auth.trusted_sequencers]\n\
             seq-a = {{ key = \"{}\", chain_id = 901 }}\nseq-b = \"{}\"\n",
            file_key.public_key(),
            other.public_key()
        ),
    );
    let trust_a = format!("seq-a={}", flag_key.public_key());
    let setup = publisher(&[
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--trust",
        &trust_a,
    ])
    .resolve()
    .unwrap();
    assert_eq!(setup.config.listen_addr, "127.0.0.1:0");
    let trust = &setup.auth.unwrap().trust;
    assert_eq!(trust.key_of("seq-a").as_ref(), Some(flag_key.public_key()));
    assert_eq!(trust.key_of("seq-b").as_ref(), Some(other.public_key()));
    assert_eq!(trust.chain_of("seq-b"), None);

    // Flags turn authentication on over a file that has it off, and
    // `--no-auth` turns it off over one that has it on.
    let off = write(dir.path(), "off.toml", "[auth]\nenabled = false\n");
    let trust_b = format!("seq-b={}", other.public_key());
    let setup = publisher(&["--config", &off, "--trust", &trust_b])
        .resolve()
        .unwrap();
    assert!(setup.auth.unwrap().trust.key_of("seq-b").is_some());
    let setup = publisher(&["--config", &config, "--no-auth"])
        .resolve()
        .unwrap();
    assert!(setup.auth.is_none());

    // One key under two identities is refused, naming the flag.
    let twice = format!("seq-c={}", other.public_key());
    let err = publisher(&["--config", &config, "--trust", &twice])
        .resolve()
        .unwrap_err();
    assert!(err.to_string().starts_with("--trust seq-c=…: "), "{err}");
}

#[test]
fn sequencer_flags_complete_the_file() {
    // No key in the file: the flag gives it.
    let (dir, config, key_file) = file_and_key(
        "sequencer.toml",
        "[transport]\nserver_addr = \"publisher.example:8080\"\n[auth]\nenabled = true\n",
    );
    let setup = sequencer(&[
        "--config",
        &config,
        "--key-file",
        key_file.to_str().unwrap(),
    ])
    .resolve()
    .unwrap();
    let key = SecretKey::load(&key_file).unwrap();
    assert_eq!(setup.auth.unwrap().key.public_key(), key.public_key());
    assert_eq!(setup.config.server_addr, "publisher.example:8080");
    // Without it the file's own check stands.
    let err = sequencer(&["--config", &config]).resolve().unwrap_err();
    assert!(
        err.to_string()
            .ends_with("auth: authentication needs a key: set private_key_file"),
        "{err}"
    );
    // A flag is checked with the file: mutual authentication needs the
    // extensions the file turns off.
    let plain = write(
        dir.path(),
        "plain.toml",
        "[auth]\nenabled = true\nextensions = false\n",
    );
    let publisher_key = SecretKey::generate().public_key().to_string();
    let key_arg = key_file.to_str().unwrap();
    let err = sequencer(&[
        "--config",
        &plain,
        "--key-file",
        key_arg,
        "--publisher-key",
        &publisher_key,
    ])
    .resolve()
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("auth.publisher_key: mutual authentication needs"),
        "{err}"
    );
    let setup = sequencer(&[
        "--config",
        &config,
        "--key-file",
        key_arg,
        "--connect",
        "127.0.0.1:9",
        "--client-id",
        "seq-a",
        "--publisher-key",
        &publisher_key,
    ])
    .resolve()
    .unwrap();
    assert_eq!(setup.config.server_addr, "127.0.0.1:9");
    assert_eq!(setup.config.client_id, "seq-a");
    assert_eq!(
        setup.auth.unwrap().server_key.map(|k| k.to_string()),
        Some(publisher_key)
    );
}

/// The publisher program with `args`, logging at `info` on a piped stderr.
fn spawn_publisher(args: &[&str]) -> Child {
    let binary = crate::sighup::publisher_binary();
    assert!(binary.exists(), "{} is missing", binary.display());
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The log lines up to the one saying the publisher runs.
async fn start_up_logs(publisher: &mut Child) -> Vec<String> {
    let mut logs = BufReader::new(publisher.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(line) = logs.next_line().await.unwrap() {
        let done = line.contains("publisher running");
        seen.push(line);
        if done {
            return seen;
        }
    }
    panic!("the publisher stopped: {seen:#?}");
}

#[tokio::test]
async fn empty_trust_warning_considers_the_trust_flags() {
    timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let config = write(
            dir.path(),
            "publisher.toml",
            "[transport]\nlisten_addr = \"127.0.0.1:0\"\n[auth]\nenabled = true\n[auth.trusted_sequencers]\n",
        );
        let refused = |logs: &[String]| logs.iter().any(|l| l.contains("every sequencer is refused"));

        let mut alone = spawn_publisher(&["--config", &config]);
        let logs = start_up_logs(&mut alone).await;
        assert!(refused(&logs), "no warning: {logs:#?}");
        alone.kill().await.unwrap();

        let trust = format!("seq-a={}", SecretKey::generate().public_key());
        let mut with_flags = spawn_publisher(&["--config", &config, "--trust", &trust]);
        let logs = start_up_logs(&mut with_flags).await;
        assert!(!refused(&logs), "a false warning: {logs:#?}");
        with_flags.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn publisher_stats_show_each_sequencers_chain() {
    timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Arc::new(SecretKey::generate()),
            Arc::new(SecretKey::generate()),
        );
        let config = write(
            dir.path(),
            "publisher.yaml",
            &format!(
                "transport: {{ listen_addr: \"127.0.0.1:0\", rate_limit: \"off\" }}\n\
                 auth:\n  enabled: true\n  trusted_sequencers:\n    \
                 seq-a: {{ key: \"{}\", chain_id: 901 }}\n    seq-b: \"{}\"\n",
                a.public_key(),
                b.public_key()
            ),
        );
        let mut publisher = spawn_publisher(&["--config", &config, "--stats-every", "50ms"]);
        let mut lines = BufReader::new(publisher.stdout.take().unwrap()).lines();
        let addr = lines.next_line().await.unwrap().unwrap();
        let addr = addr.strip_prefix("listening on ").unwrap().to_owned();
        let server_key = lines.next_line().await.unwrap().unwrap();
        let server_key =
            PublicKey::from_hex(server_key.strip_prefix("public key ").unwrap()).unwrap();
        let mut clients = Vec::new();
        for (id, key) in [("a", &a), ("b", &b)] {
            let mut config = ClientConfig::default().with_client_id(id);
            config.auto_reconnect = false;
            let auth = ClientAuth::new(key.clone()).with_server_key(server_key.clone());
            let client = TcpClient::tcp(config, Some(auth));
            client.connect(&addr).await.unwrap();
            clients.push(client);
        }
        loop {
            let line = lines.next_line().await.unwrap().expect("stats lines");
            if line.starts_with("stats connections=2 ") {
                assert!(line.ends_with(" chains=seq-a:901,seq-b:-"), "{line}");
                break;
            }
        }
        publisher.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_pkcs12_bundle_is_the_servers_tls_identity() {
    use publisher_transport::{ServerConfig, TcpOptions, tls::Identity};

    use crate::common::backend;

    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let bundle = dir.path().join("publisher.p12");
    std::fs::write(&bundle, identity.to_pkcs12("hunter2").unwrap()).unwrap();
    let bundle = bundle.to_str().unwrap();
    let right = write(dir.path(), "right.txt", "hunter2\n");
    let wrong = write(dir.path(), "wrong.txt", "hunter3\n");
    let setup = |password_file: &str| {
        let args = publisher(&[
            "--tls",
            "--tls-p12",
            bundle,
            "--tls-p12-password-file",
            password_file,
        ]);
        let config = ServerConfig::default().with_listen_addr("127.0.0.1:0");
        backend::server(&args.transport, config, TcpOptions::default(), None)
    };
    let served = setup(&right).unwrap();
    assert_eq!(served.fingerprint, Some(identity.fingerprint().to_string()));
    assert!(!served.self_signed);
    let err = setup(&wrong).err().expect("a wrong password is refused");
    assert!(err.to_string().contains("wrong password"), "{err}");
    // One identity at a time.
    let both = PublisherArgs::try_parse_from([
        "publisher",
        "--tls",
        "--tls-p12",
        bundle,
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
    ]);
    assert!(both.is_err());
}
