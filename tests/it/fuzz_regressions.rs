//! Replays fuzz inputs through the fuzz targets' own invariant checks
//! (`fuzz/src/lib.rs`, shared with `fuzz/fuzz_targets/`): the committed seed
//! corpus, and every input that once crashed a target.
//!
//! Regenerate the seeds with
//! `cargo test --test it fuzz_regressions::write_seed_corpus -- --ignored`.

use std::{fs, path::PathBuf};

// Each target uses a different subset of the checks.
#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

const TARGETS: [&str; 5] = [
    "frame_decoder",
    "message_decode",
    "handshake_server",
    "handshake_client",
    "signed_open",
];

fn check(target: &str) -> fn(&[u8]) {
    match target {
        "frame_decoder" => checks::check_frame_decoder,
        "message_decode" => checks::check_message_decode,
        "handshake_server" => checks::check_handshake_server,
        "handshake_client" => checks::check_handshake_client,
        "signed_open" => checks::check_signed_open,
        other => panic!("no fuzz target {other}"),
    }
}

#[test]
fn committed_seed_corpus_passes_the_fuzz_checks() {
    let mut replayed = 0;
    for target in TARGETS {
        let dir = corpus_dir().join(target);
        for entry in fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
            let path = entry.unwrap().path();
            check(target)(&fs::read(&path).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed >= 25, "only {replayed} seeds committed");
}

#[test]
fn generated_seeds_pass_the_fuzz_checks() {
    // The seeds as the library makes them today, committed or not.
    for (target, _, bytes) in checks::seed_corpus() {
        check(target)(&bytes);
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (target, name, bytes) in checks::seed_corpus() {
        let dir = corpus_dir().join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// signed_open: 64 mutations that each re-append the whole body doubled it
/// to gigabytes (an out-of-memory in the harness itself, now capped).
#[test]
fn signed_open_repeated_suffix_copies_stay_bounded() {
    let mut input = vec![2, 0];
    for _ in 0..64 {
        input.extend_from_slice(&[6, 0, 0, 0]);
    }
    checks::check_signed_open(&input);
}
