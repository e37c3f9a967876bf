//! The handshake and a signed frame, end to end in memory (no sockets).
//!
//! A server and a client that trust each other's keys run the extended
//! handshake, the client sends one signed `Vote`, and the server verifies it
//! and refuses a tampered and a replayed copy. Then a plain Go-mode handshake.
//!
//! `cargo run --example handshake` (add `--all-features` for libsecp256k1).

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    CryptoBackend, Message, SecretKey, TrustStore,
    handshake::{
        ClientHandshake, ClientHandshakeConfig, SequenceFloors, ServerHandshake,
        ServerHandshakeConfig, ServerVerdict,
    },
    proto::{
        Payload,
        rollup::v1::{Vote, XtId},
        transport::v1::SignedFrame,
    },
    signed::{Audience, FrameOpener, SequenceCounter, seal},
};

const CLIENT_ID: &str = "sequencer-1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = CryptoBackend::default();
    let server_key = Arc::new(SecretKey::generate());
    let client_key = Arc::new(SecretKey::generate());

    // Mutual trust: the server knows the client's key under an identity, the
    // client pins the server's key.
    let trust = Arc::new(TrustStore::new());
    trust.add(CLIENT_ID, client_key.public_key().clone())?;
    let server = ServerHandshake::new(ServerHandshakeConfig::new(
        trust.clone(),
        Some(server_key.clone()),
    ));
    let mut client_config = ClientHandshakeConfig::new(client_key.clone(), CLIENT_ID);
    client_config.expected_server_key = Some(server_key.public_key().clone());

    println!("crypto backend: {backend}");
    println!("server key: {}", server_key.public_key());
    println!("client key: {}", client_key.public_key());

    // Counters start at wall-clock nanoseconds, so this session's sequence
    // numbers lie above every earlier session's.
    let now = SystemTime::now();
    let client_sequence = SequenceCounter::from_clock(now);
    let server_unicast = SequenceCounter::from_clock(now);
    let server_broadcast = SequenceCounter::from_clock(now);

    let client =
        ClientHandshake::start(client_config, now, rand::random(), client_sequence.floor());
    println!("request: {} bytes", client.request().len());
    let floors = SequenceFloors {
        unicast: server_unicast.floor(),
        broadcast: Some(server_broadcast.floor()),
    };
    let (response, accepted) = match server.respond(client.request(), SystemTime::now(), floors) {
        ServerVerdict::Accept { response, client } => (response, client),
        ServerVerdict::Reject { error, .. } => return Err(error.into()),
        _ => return Err("unexpected verdict".into()),
    };
    println!("response: {} bytes", response.len());
    let session = client.finish(&response)?;

    println!("session id: {}", session.session_id);
    println!(
        "client identity: server verified {:?}, client told {:?}",
        accepted.identity,
        session.identity.as_deref().unwrap_or("-")
    );
    println!(
        "mutual auth: {} (server proved {})",
        session.server_key.is_some(),
        session
            .server_key
            .as_ref()
            .map_or("nothing".to_string(), ToString::to_string)
    );
    println!(
        "signed frames: client {}, server {}",
        session.signed_frames.is_some(),
        accepted.signed_frames.is_some()
    );

    // Client → server: one signed frame carrying one Vote, for the server only.
    let server_session = accepted
        .signed_frames
        .as_ref()
        .ok_or("signed frames were not negotiated")?;
    let vote = Message {
        sender_id: CLIENT_ID.into(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[0, 0, 0, 1]),
            xt_id: Some(XtId {
                hash: Bytes::from(vec![0xab; 32]),
            }),
            vote: true,
        })),
    };
    let audience = Audience::Unicast {
        recipient: server_key.public_key().clone(),
        session: server_session.session_tag,
    };
    let frame = seal(
        &client_key,
        backend,
        client_sequence.next(),
        &audience,
        vec![vote.encode_to_vec().into()],
    );
    let body = frame.encode_to_vec();
    println!(
        "sealed frame: sequence {}, {} bytes",
        frame.sequence,
        body.len()
    );

    // The server never broadcasts to itself, so it needs no identity here.
    let mut opener = FrameOpener::new(
        server_session,
        server_key.public_key().clone(),
        None,
        backend,
    );

    // An on-path attacker flips the vote; the signature no longer matches.
    // Tried first: a refused frame does not advance the replay window.
    let mut forged = vote.clone();
    if let Some(Payload::Vote(v)) = &mut forged.payload {
        v.vote = false;
    }
    let tampered = SignedFrame {
        messages: vec![forged.encode_to_vec().into()],
        ..frame.clone()
    };
    match opener.open(&tampered.encode_to_vec()) {
        Ok(_) => println!("tampered frame: ACCEPTED (unexpected)"),
        Err(err) => println!("tampered frame refused: {err}"),
    }

    for message in opener.open_messages(&body)? {
        if let Some(Payload::Vote(v)) = &message.payload {
            println!(
                "verified frame: vote from {} (chain 0x{}, xt 0x{}…, commit {})",
                message.sender_id,
                hex::encode(&v.sender_chain_id),
                hex::encode(&v.xt_id.as_ref().map(|x| x.hash.clone()).unwrap_or_default()[..4]),
                v.vote
            );
        }
    }
    match opener.open(&body) {
        Ok(_) => println!("replayed frame: ACCEPTED (unexpected)"),
        Err(err) => println!("replayed frame refused: {err}"),
    }

    // Go mode: the request is byte-for-byte the Go client's. A key trusted
    // the default way is refused in Go mode, since the request could be an
    // extended one whose extension was stripped on the path.
    let mut go_config = ClientHandshakeConfig::new(client_key.clone(), CLIENT_ID);
    go_config.extensions = false;
    let now = SystemTime::now();
    let floors = SequenceFloors {
        unicast: server_unicast.floor(),
        broadcast: Some(server_broadcast.floor()),
    };
    let go_client = ClientHandshake::start(go_config.clone(), now, rand::random(), 0);
    match server.respond(go_client.request(), now, floors) {
        ServerVerdict::Reject { error, .. } => {
            println!("go-mode handshake, key trusted for the extended handshake only: {error}")
        }
        _ => return Err("a Go-mode handshake was accepted for an extended-only key".into()),
    }
    // Marked Go-compatible, the key may connect like a Go client, and the
    // server answers like the Go server (no proof of its key, no signed frames).
    trust.add_go_compatible(CLIENT_ID, client_key.public_key().clone())?;
    let go_client = ClientHandshake::start(go_config, now, rand::random(), 0);
    let response = match server.respond(go_client.request(), now, floors) {
        ServerVerdict::Accept { response, .. } => response,
        ServerVerdict::Reject { error, .. } => return Err(error.into()),
        _ => return Err("unexpected verdict".into()),
    };
    let go_session = go_client.finish(&response)?;
    let mode = match (&go_session.server_key, &go_session.signed_frames) {
        (None, None) => "Go",
        _ => "extended",
    };
    println!(
        "go-mode handshake: completed in {mode} mode, session {} (server key unproven, frames unsigned)",
        go_session.session_id
    );
    Ok(())
}
