//! Keys, signatures, addresses, key files, the trust store and backends.
//!
//! Every test that touches a backend runs over `CryptoBackend::available()`,
//! so `--all-features` also checks libsecp256k1 against the same vectors.

use std::collections::HashSet;

use hex_literal::hex;
use proptest::prelude::*;
use publisher_transport::{
    KeyError,
    crypto::{
        self, Address, CryptoBackend, Keccak, PublicKey, SecretKey, Signature, TrustMode,
        TrustStore, recover,
    },
};

// Vectors from go-ethereum crypto/signature_test.go (testmsg, testsig,
// testpubkey, testpubkeyc) and crypto/crypto_test.go (testPrivHex, testAddrHex).
const TEST_MSG: [u8; 32] = hex!("ce0677bb30baa8cf067c88db9811f4333d131bf8bcf12fe7065d211dce971008");
const TEST_SIG: [u8; 65] = hex!(
    "90f27b8b488db00b00606796d2987f6a5f59ae62ea05effe84fef5b8b0e549984a691139ad57a3f0b906637673aa2f63d1f55cb1a69199d4009eea23ceaddc9301"
);
const TEST_PUBKEY: [u8; 65] = hex!(
    "04e32df42865e97135acfb65f3bae71bdc86f4d49150ad6a440b6f15878109880a0a2b2667f7e725ceea70c673093bf67663e0312623c8e091b13cf2c0f11ef652"
);
const TEST_PUBKEYC: [u8; 33] =
    hex!("02e32df42865e97135acfb65f3bae71bdc86f4d49150ad6a440b6f15878109880a");
const TEST_PRIV_HEX: &str = "289c2857d4598e37fb9647507e47a309d6133539bf21a8b9cb6df88fd5232032";
const TEST_ADDR: [u8; 20] = hex!("970e8128ab834e8eac17ab8e3812f010678cf791");

/// The secp256k1 group order.
const N: [u8; 32] = hex!("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141");

/// `n - s`: the other `s` of the same signature (its malleable twin).
fn neg_mod_n(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        out[i] = (d + 256 * borrow) as u8;
    }
    out
}

fn test_sig() -> Signature {
    Signature::from_slice(&TEST_SIG).expect("go-ethereum testsig is canonical")
}

fn test_key() -> SecretKey {
    SecretKey::from_hex(TEST_PRIV_HEX).unwrap()
}

/// `key_bytes` must not verify testsig over `digest`: either it is not a key
/// at all (a changed coordinate is usually off the curve), or it is refused.
fn assert_not_verified(backend: CryptoBackend, key_bytes: &[u8], digest: &[u8; 32]) {
    match PublicKey::from_slice(key_bytes) {
        Err(KeyError::InvalidPublicKey { .. }) => {}
        Ok(key) => assert!(
            matches!(
                key.verify_digest_with(backend, digest, &test_sig()),
                Err(KeyError::VerificationFailed)
            ),
            "{backend}: wrong key {key} verified"
        ),
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

// ---- go-ethereum vectors -------------------------------------------------

#[test]
fn go_ecrecover() {
    for &backend in CryptoBackend::available() {
        let key = recover(backend, &TEST_MSG, &test_sig()).unwrap();
        assert_eq!(key.to_uncompressed(), TEST_PUBKEY, "{backend}");
        assert_eq!(key.to_compressed(), TEST_PUBKEYC, "{backend}");
    }
}

#[test]
fn go_verify_signature() {
    for &backend in CryptoBackend::available() {
        for key in [&TEST_PUBKEY[..], &TEST_PUBKEYC[..]] {
            let key = PublicKey::from_slice(key).unwrap();
            key.verify_digest_with(backend, &TEST_MSG, &test_sig())
                .unwrap_or_else(|e| panic!("{backend}: {e}"));
        }

        // Wrong key: the x coordinate changed.
        let mut wrong = TEST_PUBKEY;
        wrong[10] = wrong[10].wrapping_add(1);
        assert_not_verified(backend, &wrong, &TEST_MSG);
        let mut wrong_c = TEST_PUBKEYC;
        wrong_c[10] = wrong_c[10].wrapping_add(1);
        assert_not_verified(backend, &wrong_c, &TEST_MSG);
        // A valid key that did not sign.
        assert_not_verified(backend, test_key().public_key().as_compressed(), &TEST_MSG);

        // Flipped message.
        let mut msg = TEST_MSG;
        msg[0] ^= 1;
        assert_not_verified(backend, &TEST_PUBKEY, &msg);
    }
    // Go also rejects a nil key and a truncated signature.
    assert!(PublicKey::from_slice(&[]).is_err());
    assert!(Signature::from_slice(&TEST_SIG[..63]).is_err());
    assert!(Signature::from_slice(&TEST_SIG[..64]).is_err());
}

#[test]
fn go_decompress_and_compress() {
    let from_c = PublicKey::from_slice(&TEST_PUBKEYC).unwrap();
    assert_eq!(from_c.to_uncompressed(), TEST_PUBKEY);
    let from_u = PublicKey::from_slice(&TEST_PUBKEY).unwrap();
    assert_eq!(from_u.to_compressed(), TEST_PUBKEYC);

    assert!(matches!(
        PublicKey::from_slice(&TEST_PUBKEYC[..5]),
        Err(KeyError::InvalidPublicKey { len: 5, .. })
    ));
    let mut extra = TEST_PUBKEYC.to_vec();
    extra.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        PublicKey::from_slice(&extra),
        Err(KeyError::InvalidPublicKey { len: 36, .. })
    ));
}

#[test]
fn go_sign_recovers_address() {
    let key = test_key();
    assert_eq!(key.public_key().address(), Address(TEST_ADDR));
    let digest = crypto::keccak256(b"foo");
    assert_eq!(key.sign_message(b"foo"), key.sign_digest(&digest));
    for &backend in CryptoBackend::available() {
        let sig = key.sign_digest_with(backend, &digest);
        let recovered = recover(backend, &digest, &sig).unwrap();
        assert_eq!(recovered.address(), Address(TEST_ADDR), "{backend}");
    }
}

#[test]
fn go_malleable_signature_refused() {
    // go-ethereum TestVerifySignatureMalleable, with v = 0 appended.
    let sig = hex!(
        "638a54215d80a6713c8d523a6adc4e6e73652d859103a36b700851cb0e61b66b8ebfc1a610c57d732ec6e0a8f06a9a7a28df5051ece514702ff9cdff0b11f45400"
    );
    let key = PublicKey::from_slice(&hex!(
        "03ca634cae0d49acb401d8a4c6b6fe8c55b70d115bf400769cc1400f3258cd3138"
    ))
    .unwrap();
    let msg = hex!("d301ce462d3e639518f482c7f03821fec1e602018630ce621e1e7851c12343a6");
    assert!(matches!(
        Signature::from_slice(&sig),
        Err(KeyError::InvalidSignature { .. })
    ));

    // Its low-s twin is accepted and verifies, so only `s` was wrong above.
    let mut twin = sig;
    twin[32..64].copy_from_slice(&neg_mod_n(&sig[32..64]));
    let twin = Signature::from_slice(&twin).unwrap();
    for &backend in CryptoBackend::available() {
        key.verify_digest_with(backend, &msg, &twin)
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
    }

    // And the high-s twin of testsig is refused too (with either v).
    let mut high = TEST_SIG;
    high[32..64].copy_from_slice(&neg_mod_n(&TEST_SIG[32..64]));
    for v in [0, 1] {
        high[64] = v;
        assert!(Signature::from_slice(&high).is_err());
    }
}

#[test]
fn signature_parsing() {
    let sig = test_sig();
    assert_eq!(sig.as_bytes(), &TEST_SIG);
    assert_eq!(sig.v(), 1);
    // Only the raw recovery id is accepted, not Ethereum's 27/28 nor 2/3.
    for v in [2, 3, 27, 28] {
        let mut bad = TEST_SIG;
        bad[64] = v;
        assert!(
            matches!(
                Signature::from_slice(&bad),
                Err(KeyError::InvalidSignature { .. })
            ),
            "v = {v}"
        );
    }
    // r and s must lie in [1, n).
    for (range, value) in [
        (0..32, [0u8; 32]),
        (32..64, [0; 32]),
        (0..32, N),
        (32..64, N),
    ] {
        let mut bad = TEST_SIG;
        bad[range.clone()].copy_from_slice(&value);
        assert!(Signature::from_slice(&bad).is_err(), "{range:?}");
    }
    assert!(Signature::from_slice(&[TEST_SIG.as_slice(), &[0]].concat()).is_err());
}

#[test]
fn keccak256_vectors() {
    assert_eq!(
        crypto::keccak256(b"abc"),
        hex!("4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45")
    );
    // Keccak-256 of nothing (not NIST SHA3-256's a7ffc6f8...).
    assert_eq!(
        crypto::keccak256(b""),
        hex!("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")
    );
    let mut hasher = Keccak::new();
    hasher.update(b"a").update(b"bc");
    assert_eq!(hasher.finalize(), crypto::keccak256(b"abc"));
}

// ---- backend agreement ---------------------------------------------------

#[test]
fn backends_agree_byte_for_byte() {
    let digests = [TEST_MSG, crypto::keccak256(b"foo"), [0; 32], [0xff; 32]];
    let keys = [test_key(), SecretKey::generate(), SecretKey::generate()];
    for key in &keys {
        for digest in &digests {
            let sigs: Vec<_> = CryptoBackend::available()
                .iter()
                .map(|&b| (b, key.sign_digest_with(b, digest)))
                .collect();
            for (signer, sig) in &sigs {
                assert_eq!(
                    sig,
                    &sigs[0].1,
                    "{signer} differs from {} on digest {}",
                    sigs[0].0,
                    hex::encode(digest)
                );
                assert!(Signature::from_slice(sig.as_bytes()).is_ok(), "{signer}");
                // Made by one backend, checked by each.
                for &checker in CryptoBackend::available() {
                    key.public_key()
                        .verify_digest_with(checker, digest, sig)
                        .unwrap_or_else(|e| panic!("{signer} -> {checker}: {e}"));
                    let recovered = recover(checker, digest, sig).unwrap();
                    assert_eq!(&recovered, key.public_key(), "{signer} -> {checker}");
                }
            }
        }
    }
}

/// Signatures by libsecp256k1 (what go-ethereum's cgo `crypto.Sign` uses),
/// pinned so the k256-only build is held to the same bytes.
#[test]
fn sign_matches_libsecp256k1_vectors() {
    let key = test_key();
    let cases = [
        (
            crypto::keccak256(b"foo"),
            hex!(
                "d155e94305af7e07dd8c32873e5c03cb95c9e05960ef85be9c07f671da58c73718c19adc397a211aa9e87e519e2038c5a3b658618db335f74f800b8e0cfeef4401"
            ),
        ),
        // A digest ≥ n: RFC 6979 seeds the nonce with it reduced mod n.
        (
            [0xff; 32],
            hex!(
                "2d7acadbf3fc5a0fd00de1cd07d8b3abe0daabb00e0f8d285956cce85cc4d877003d82cd4f57d9eda5e3342e804bb71d8296f0f3033e107e73e3a385ecda98cd00"
            ),
        ),
    ];
    for (digest, expected) in cases {
        for &backend in CryptoBackend::available() {
            let sig = key.sign_digest_with(backend, &digest);
            assert_eq!(
                hex::encode(sig.as_bytes()),
                hex::encode(expected),
                "{backend}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sign_verify_recover_any(secret in any::<[u8; 32]>(), digest in any::<[u8; 32]>()) {
        let key = SecretKey::from_bytes(&secret);
        prop_assume!(key.is_ok());
        let key = key.unwrap();
        let first = key.sign_digest_with(CryptoBackend::K256, &digest);
        let mut other = digest;
        other[31] ^= 0x80;
        for &backend in CryptoBackend::available() {
            let sig = key.sign_digest_with(backend, &digest);
            prop_assert_eq!(sig, first);
            prop_assert!(key.public_key().verify_digest_with(backend, &digest, &sig).is_ok());
            prop_assert!(key.public_key().verify_digest_with(backend, &other, &sig).is_err());
            prop_assert_eq!(&recover(backend, &digest, &sig).unwrap(), key.public_key());
        }
    }
}

// ---- EIP-55 --------------------------------------------------------------

#[test]
fn eip55_checksum() {
    // go-ethereum common/types_test.go TestAddressHexChecksum.
    let cases = [
        (
            hex!("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"),
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        ),
        (
            hex!("fb6916095ca1df60bb79ce92ce3ea74c37c5d359"),
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        ),
        (
            hex!("dbf03b407c01e7cd3cbea99509d93f8dddc8c6fb"),
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        ),
        (
            hex!("d1220a0cf47c7b9be7a2e6ba89f429762e7b9adb"),
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ),
        (
            hex!("000000000000000000000000000000000000000a"),
            "0x000000000000000000000000000000000000000A",
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(Address(bytes).to_string(), expected);
    }
}

// ---- secret keys and key files -------------------------------------------

#[test]
fn generate_sign_verify() {
    let key = SecretKey::generate();
    assert_ne!(key.public_key(), SecretKey::generate().public_key());
    let sig = key.sign_message(b"hello");
    let digest = crypto::keccak256(b"hello");
    for &backend in CryptoBackend::available() {
        key.public_key()
            .verify_digest_with(backend, &digest, &sig)
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
    }
    assert!(key.public_key().verify_digest(&digest, &sig).is_ok());
}

#[test]
fn secret_key_parsing() {
    for bytes in [[0u8; 32], [0xff; 32], N] {
        assert!(matches!(
            SecretKey::from_bytes(&bytes),
            Err(KeyError::InvalidPrivateKey { .. })
        ));
    }
    let expected = test_key();
    for text in [
        format!("0x{TEST_PRIV_HEX}"),
        format!("  {TEST_PRIV_HEX}\n"),
        format!("\t0x{}  \r\n", TEST_PRIV_HEX.to_uppercase()),
    ] {
        let key = SecretKey::from_hex(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(key.public_key(), expected.public_key());
    }
    for text in [&TEST_PRIV_HEX[1..], "0x", "", &format!("{TEST_PRIV_HEX}00")] {
        assert!(SecretKey::from_hex(text).is_err(), "{text:?}");
    }
    let non_hex = TEST_PRIV_HEX.replace('c', "g");
    assert!(SecretKey::from_hex(&non_hex).is_err());
}

#[test]
fn secret_key_debug_hides_key() {
    let key = test_key();
    let debug = format!("{key:?} {key:#?}");
    assert!(!debug.contains(TEST_PRIV_HEX), "{debug}");
    assert!(
        !debug.to_lowercase().contains(&TEST_PRIV_HEX[..16]),
        "{debug}"
    );
    // It does name the public key, which is what a log reader needs.
    assert!(debug.contains(&key.public_key().to_string()), "{debug}");
}

#[test]
fn key_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let key = SecretKey::generate();
    key.save(&path).unwrap();

    let content = std::fs::read_to_string(&path).unwrap();
    assert_eq!(content.len(), 64, "{content:?}");
    assert!(
        content
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{content:?}"
    );
    assert_eq!(
        SecretKey::load(&path).unwrap().public_key(),
        key.public_key()
    );

    // Hand-edited files: 0x prefix and a trailing newline are fine.
    std::fs::write(&path, format!("0x{TEST_PRIV_HEX}\n")).unwrap();
    assert_eq!(
        SecretKey::load(&path).unwrap().public_key(),
        test_key().public_key()
    );
}

#[cfg(unix)]
#[test]
fn key_file_mode_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;

    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();

    let fresh = dir.path().join("fresh.key");
    SecretKey::generate().save(&fresh).unwrap();
    assert_eq!(mode(&fresh), 0o600);

    // An existing world-readable file is tightened, and fully overwritten.
    let existing = dir.path().join("existing.key");
    std::fs::write(&existing, "x".repeat(200)).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = SecretKey::generate();
    key.save(&existing).unwrap();
    assert_eq!(mode(&existing), 0o600);
    assert_eq!(std::fs::read_to_string(&existing).unwrap().len(), 64);
    assert_eq!(
        SecretKey::load(&existing).unwrap().public_key(),
        key.public_key()
    );
}

#[test]
fn key_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.key");
    match SecretKey::load(&path) {
        Err(KeyError::KeyFileIo { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected KeyFileIo, got {other:?}"),
    }
}

#[test]
fn key_file_bad_format_hides_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.key");
    let cases: [(&str, Vec<u8>); 6] = [
        ("garbage", b"secret passphrase, not a key".to_vec()),
        ("binary", vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0xfe, 0x80]),
        ("63 chars", TEST_PRIV_HEX.as_bytes()[..63].to_vec()),
        ("non-hex", TEST_PRIV_HEX.replace('c', "g").into_bytes()),
        ("zero key", "0".repeat(64).into_bytes()),
        (
            "two keys",
            format!("{TEST_PRIV_HEX}\n{TEST_PRIV_HEX}").into_bytes(),
        ),
    ];
    for (what, content) in cases {
        std::fs::write(&path, &content).unwrap();
        let err = match SecretKey::load(&path) {
            Err(err @ KeyError::KeyFileFormat { .. }) => err,
            other => panic!("{what}: expected KeyFileFormat, got {other:?}"),
        };
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(&path.display().to_string()),
            "{what}: {shown}"
        );
        let text = String::from_utf8_lossy(&content);
        assert!(
            !shown.contains(text.trim()),
            "{what}: leaks content: {shown}"
        );
        // Not even a recognisable part of a near-miss key.
        assert!(!shown.contains(&TEST_PRIV_HEX[..16]), "{what}: {shown}");
    }
}

#[test]
fn load_or_generate_creates_then_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub.key");
    assert!(!path.exists());
    let first = SecretKey::load_or_generate(&path).unwrap();
    assert!(path.exists());
    let second = SecretKey::load_or_generate(&path).unwrap();
    assert_eq!(first.public_key(), second.public_key());
    assert_eq!(
        SecretKey::load(&path).unwrap().public_key(),
        first.public_key()
    );

    // A corrupt file is an error, not silently replaced by a new identity.
    std::fs::write(&path, "corrupt").unwrap();
    assert!(matches!(
        SecretKey::load_or_generate(&path),
        Err(KeyError::KeyFileFormat { .. })
    ));
}

// ---- public keys ---------------------------------------------------------

#[test]
fn public_key_forms_are_one_key() {
    let compressed = PublicKey::from_slice(&TEST_PUBKEYC).unwrap();
    let uncompressed = PublicKey::from_slice(&TEST_PUBKEY).unwrap();
    assert_eq!(compressed, uncompressed);
    let set: HashSet<_> = [compressed.clone(), uncompressed].into_iter().collect();
    assert_eq!(set.len(), 1);

    let hex_c = hex::encode(TEST_PUBKEYC);
    assert_eq!(compressed.to_string(), hex_c);
    for text in [
        hex_c.clone(),
        format!("0x{hex_c}"),
        format!("0x{}", hex::encode(TEST_PUBKEY)),
        format!(" {} \n", hex::encode(TEST_PUBKEY)),
    ] {
        assert_eq!(PublicKey::from_hex(&text).unwrap(), compressed, "{text:?}");
        assert_eq!(text.parse::<PublicKey>().unwrap(), compressed, "{text:?}");
    }
}

#[test]
fn public_key_invalid() {
    let invalid = |bytes: &[u8]| {
        matches!(
            PublicKey::from_slice(bytes),
            Err(KeyError::InvalidPublicKey { len, .. }) if len == bytes.len()
        )
    };
    // Wrong lengths.
    for len in [0, 1, 32, 34, 64, 66] {
        assert!(invalid(&vec![2; len]), "len {len}");
    }
    // Wrong prefix for the length (0x06/0x07 are SEC1 "hybrid" keys).
    let mut c = TEST_PUBKEYC;
    for prefix in [0, 1, 4, 5] {
        c[0] = prefix;
        assert!(invalid(&c), "33 bytes, prefix {prefix}");
    }
    let mut u = TEST_PUBKEY;
    for prefix in [0, 2, 3, 6, 7] {
        u[0] = prefix;
        assert!(invalid(&u), "65 bytes, prefix {prefix}");
    }
    // Not on the curve: y changed, and x ≥ p.
    let mut off = TEST_PUBKEY;
    off[64] ^= 1;
    assert!(invalid(&off));
    let mut big_x = [0xff; 33];
    big_x[0] = 2;
    assert!(invalid(&big_x));

    for text in ["zz", "0x", "0x02", &hex::encode(TEST_PUBKEYC)[1..]] {
        assert!(
            matches!(
                PublicKey::from_hex(text),
                Err(KeyError::InvalidPublicKey { .. })
            ),
            "{text:?}"
        );
    }
}

// ---- trust store ---------------------------------------------------------

#[test]
fn trust_store_add_lookup_remove() {
    let store = TrustStore::new();
    assert!(store.is_empty());
    let alice = SecretKey::generate().public_key().clone();
    let bob = SecretKey::generate().public_key().clone();

    assert!(store.add("alice", alice.clone()).unwrap().is_none());
    assert!(store.is_trusted(&alice));
    assert!(!store.is_trusted(&bob));
    assert_eq!(store.identity_of(&alice).as_deref(), Some("alice"));
    assert_eq!(store.identity_of(&bob), None);
    assert_eq!(store.key_of("alice"), Some(alice.clone()));
    assert_eq!(store.key_of("bob"), None);
    assert_eq!(store.len(), 1);

    // Re-adding the same pair is a no-op that keeps the key trusted.
    assert_eq!(
        store.add("alice", alice.clone()).unwrap(),
        Some(alice.clone())
    );
    assert!(store.is_trusted(&alice));

    assert_eq!(store.remove("alice"), Some(alice.clone()));
    assert!(!store.is_trusted(&alice));
    assert_eq!(store.identity_of(&alice), None);
    assert_eq!(store.remove("alice"), None);
    assert!(store.is_empty());
}

#[test]
fn trust_store_normalises_key_form() {
    let store = TrustStore::new();
    store.add_bytes("go-peer", &TEST_PUBKEY).unwrap();
    let compressed = PublicKey::from_slice(&TEST_PUBKEYC).unwrap();
    assert!(store.is_trusted(&compressed));
    assert_eq!(store.identity_of(&compressed).as_deref(), Some("go-peer"));
    assert_eq!(
        store.key_of("go-peer").unwrap().to_compressed(),
        TEST_PUBKEYC
    );
    assert!(matches!(
        store.add_bytes("x", &TEST_PUBKEY[..64]),
        Err(KeyError::InvalidPublicKey { .. })
    ));
}

#[test]
fn trust_store_rotation() {
    let store = TrustStore::new();
    let old = SecretKey::generate().public_key().clone();
    let new = SecretKey::generate().public_key().clone();
    store.add("seq-1", old.clone()).unwrap();
    assert_eq!(store.add("seq-1", new.clone()).unwrap(), Some(old.clone()));
    assert!(!store.is_trusted(&old));
    assert_eq!(store.identity_of(&old), None);
    assert!(store.is_trusted(&new));
    assert_eq!(store.key_of("seq-1"), Some(new));
    assert_eq!(store.len(), 1);
}

#[test]
fn trust_store_one_key_one_identity() {
    let store = TrustStore::new();
    let shared = SecretKey::generate().public_key().clone();
    let other = SecretKey::generate().public_key().clone();
    store.add("a", shared.clone()).unwrap();
    store.add("b", other.clone()).unwrap();

    match store.add("c", shared.clone()) {
        Err(KeyError::KeyAlreadyTrusted { existing }) => assert_eq!(existing, "a"),
        other => panic!("expected KeyAlreadyTrusted, got {other:?}"),
    }
    assert_eq!(store.key_of("c"), None);

    // Rotating b onto a's key fails too, and b keeps its own key.
    assert!(matches!(
        store.add("b", shared.clone()),
        Err(KeyError::KeyAlreadyTrusted { .. })
    ));
    assert_eq!(store.key_of("b"), Some(other.clone()));
    assert_eq!(store.identity_of(&other).as_deref(), Some("b"));
    assert_eq!(store.identity_of(&shared).as_deref(), Some("a"));
}

#[test]
fn trust_store_modes_default_to_extended_only_and_changes_are_announced() {
    let store = TrustStore::new();
    let mut changes = store.changes();
    let key = SecretKey::generate().public_key().clone();
    store.add("seq", key.clone()).unwrap();
    assert_eq!(store.mode_of("seq"), Some(TrustMode::ExtendedOnly));
    assert_eq!(changes.try_recv().unwrap(), "seq");
    assert!(store.go_compatible_identities().is_empty());

    // Same key, Go-compatible now: a change worth announcing.
    store.add_go_compatible("seq", key.clone()).unwrap();
    assert_eq!(store.mode_of("seq"), Some(TrustMode::GoCompatible));
    assert_eq!(changes.try_recv().unwrap(), "seq");
    assert_eq!(store.go_compatible_identities(), ["seq"]);
    // Nothing changed: nothing announced.
    store.add_go_compatible("seq", key.clone()).unwrap();
    assert!(changes.try_recv().is_err());
    store.add("seq", key).unwrap();
    assert_eq!(store.mode_of("seq"), Some(TrustMode::ExtendedOnly));
    assert_eq!(changes.try_recv().unwrap(), "seq");
}

#[test]
fn trust_store_refuses_an_empty_identity() {
    let store = TrustStore::new();
    let key = SecretKey::generate().public_key().clone();
    assert!(matches!(
        store.add("", key.clone()),
        Err(KeyError::EmptyIdentity)
    ));
    assert!(matches!(
        store.add_go_compatible("", key.clone()),
        Err(KeyError::EmptyIdentity)
    ));
    assert!(store.is_empty() && !store.is_trusted(&key));
}

#[test]
fn trust_store_identities_sorted() {
    let store = TrustStore::new();
    for id in ["charlie", "alice", "bob"] {
        store
            .add(id, SecretKey::generate().public_key().clone())
            .unwrap();
    }
    assert_eq!(store.identities(), ["alice", "bob", "charlie"]);
}

// ---- backends ------------------------------------------------------------

#[test]
fn backend_names() {
    assert_eq!(
        "k256".parse::<CryptoBackend>().unwrap(),
        CryptoBackend::K256
    );
    match "nope".parse::<CryptoBackend>() {
        Err(KeyError::UnknownBackend { name }) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownBackend, got {other:?}"),
    }
    let available = CryptoBackend::available();
    assert!(available.contains(&CryptoBackend::K256));
    assert!(available.contains(&CryptoBackend::default()));
    assert_eq!(
        available.contains(&CryptoBackend::Libsecp256k1),
        cfg!(feature = "libsecp256k1")
    );
    for &backend in available {
        assert_eq!(
            backend.to_string().parse::<CryptoBackend>().unwrap(),
            backend
        );
    }
    // Asking for libsecp256k1 works exactly when it is compiled in.
    let parsed = "libsecp256k1".parse::<CryptoBackend>();
    if cfg!(feature = "libsecp256k1") {
        assert_eq!(parsed.unwrap(), CryptoBackend::Libsecp256k1);
    } else {
        assert!(matches!(parsed, Err(KeyError::BackendUnavailable(_))));
    }
}
