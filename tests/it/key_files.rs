//! Key files: concurrent creation, symlinks, and warnings about keys that
//! other users can read.

use std::{
    io::Write,
    path::Path,
    sync::{Arc, Barrier, Mutex},
};

use publisher_transport::SecretKey;

/// Runs `f` with a subscriber capturing `warn` and above; returns the log text.
fn warnings_during(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn concurrent_load_or_generate_agrees_on_one_key() {
    const CONTENDERS: usize = 8;
    // Several rounds: the race window is small, each round a fresh file.
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join(format!("node-{round}.key")));
        let start = Arc::new(Barrier::new(CONTENDERS));
        let keys: Vec<SecretKey> = (0..CONTENDERS)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    SecretKey::load_or_generate(&*path).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect();
        let on_disk = SecretKey::load(&*path).unwrap();
        for key in &keys {
            assert_eq!(key.public_key(), on_disk.public_key(), "round {round}");
        }
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}

#[test]
fn load_or_generate_never_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let first = SecretKey::generate();
    first.save(&path).unwrap();
    let loaded = SecretKey::load_or_generate(&path).unwrap();
    assert_eq!(loaded.public_key(), first.public_key());
}

#[cfg(unix)]
#[test]
fn save_replaces_a_symlink_instead_of_writing_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let path = dir.path().join("node.key");
    std::os::unix::fs::symlink(&victim, &path).unwrap();

    let key = SecretKey::generate();
    key.save(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
    assert_eq!(
        SecretKey::load(&path).unwrap().public_key(),
        key.public_key()
    );
}

#[cfg(unix)]
#[test]
fn load_or_generate_does_not_create_a_keys_file_through_a_dangling_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere.key");
    let path = dir.path().join("node.key");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert!(SecretKey::load_or_generate(&path).is_err());
    assert!(!target.exists(), "a key was written through the symlink");
}

#[cfg(unix)]
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(unix)]
#[test]
fn loading_a_key_others_can_read_warns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    SecretKey::generate().save(&path).unwrap();

    let quiet = warnings_during(|| {
        SecretKey::load(&path).unwrap();
    });
    assert!(!quiet.contains("accessible to group or others"), "{quiet}");

    chmod(&path, 0o644);
    let logged = warnings_during(|| {
        SecretKey::load(&path).unwrap();
    });
    assert!(logged.contains("accessible to group or others"), "{logged}");
    assert!(logged.contains("node.key"), "{logged}");
    assert!(logged.contains("644"), "{logged}");

    // load_or_generate loads through the same path.
    let logged = warnings_during(|| {
        SecretKey::load_or_generate(&path).unwrap();
    });
    assert!(logged.contains("accessible to group or others"), "{logged}");
}

#[cfg(all(unix, feature = "tls"))]
#[test]
fn loading_a_tls_key_others_can_read_warns() {
    use publisher_transport::tls::Identity;

    let dir = tempfile::tempdir().unwrap();
    let identity = Identity::self_signed(&["127.0.0.1"]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, identity.chain_pem()).unwrap();
    std::fs::write(&key, identity.key_pem()).unwrap();

    chmod(&key, 0o600);
    let quiet = warnings_during(|| {
        Identity::from_pem_files(&cert, &key).unwrap();
    });
    assert!(!quiet.contains("accessible to group or others"), "{quiet}");

    chmod(&key, 0o640);
    let logged = warnings_during(|| {
        Identity::from_pem_files(&cert, &key).unwrap();
    });
    assert!(logged.contains("accessible to group or others"), "{logged}");
    assert!(logged.contains("key.pem"), "{logged}");
}
