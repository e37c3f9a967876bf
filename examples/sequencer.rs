//! A miniature sequencer: connects to a publisher, votes on every StartSC,
//! prints every decision, and optionally submits an XTRequest periodically.
//! Reconnects by itself when the publisher restarts.
//!
//! ```text
//! cargo run --example sequencer -- --connect 127.0.0.1:8080 --key-file seq-a.key \
//!     --publisher-key 02ab… --client-id seq-a --chain-id 1 --xt-every 500ms \
//!     [--backend tcp|grpc|quic|ws] [--tls] [--pin-sha256 <publisher's tls fingerprint>]
//! ```
//!
//! With TLS (QUIC, or `--tls`) the publisher's certificate is verified by
//! `--tls-ca` and/or `--pin-sha256`; `--tls-cert`/`--tls-key` present a
//! client certificate to a publisher that requires one.
//!
//! Prints `public key <hex>` (unless `--no-auth`), `connected to ADDR` per
//! (re)connection and `decided <xt_id hex> commit|abort` per decision on
//! stdout; logs on stderr (`RUST_LOG`, default `info`).

#[path = "common/mod.rs"]
mod common;

use std::{process::ExitCode, sync::Arc, time::Duration};

use bytes::Bytes;
use clap::Parser;
use common::{
    backend,
    cli::{SequencerArgs, VoteChoice},
};
use publisher_transport::{Client, ConnectionEvent, Inbound, channel_handler, proto::Payload};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tracing::{debug, info, warn};

#[tokio::main]
async fn main() -> ExitCode {
    let args = SequencerArgs::parse();
    common::init_tracing("info");
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: SequencerArgs) -> Result<ExitCode, backend::BoxError> {
    let factory = backend::ClientFactory::new(&args.transport)?;
    let setup = args.resolve()?;
    if let Some(auth) = &setup.auth {
        // The publisher operator needs it for --trust.
        common::say(format!("public key {}", auth.key.public_key()));
    }
    let connect = setup.config.server_addr.clone();
    let client = factory.client(setup.config, setup.tcp, setup.auth);
    let (handler, inbound) = channel_handler(1024);
    client.set_handler(handler);
    // Subscribed before connecting, so the first `Connected` is seen too.
    let events = client.events();
    tokio::spawn(report_events(events));

    let chain_id = common::chain_id_bytes(args.chain_id);
    tokio::spawn(serve(
        client.clone(),
        inbound,
        chain_id.clone(),
        args.vote == VoteChoice::Commit,
    ));

    tokio::select! {
        // "" is the configured address, as in the Go sequencer.
        connected = client.connect_with_retry("", args.retries) => {
            connected.map_err(|err| match connect.as_str() {
                "" => format!("cannot connect: {err}"),
                addr => format!("cannot connect to {addr}: {err}"),
            })?;
        }
        _ = common::shutdown_signal() => return Ok(ExitCode::from(130)),
    }
    info!(client_id = %client.id(), backend = args.transport.backend.name(), "sequencer running");

    if let Some(every) = args.xt_every {
        tokio::spawn(submit_periodically(client.clone(), chain_id, every));
    }

    common::shutdown_signal().await;
    info!("shutting down");
    if let Err(err) = client.disconnect().await {
        debug!(error = %err, "disconnect");
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `connected to ADDR` per session, the reconnects included.
async fn report_events(mut events: tokio::sync::broadcast::Receiver<ConnectionEvent>) {
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Connected { addr, .. }) => {
                common::say(format!("connected to {addr}"))
            }
            // The client reconnects by itself unless we disconnected.
            Ok(ConnectionEvent::Disconnected {
                reason,
                details,
                by_peer,
            }) => info!(%reason, details, by_peer, "disconnected"),
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => debug!(missed, "connection events missed"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Votes on each StartSC and prints each Decided.
async fn serve(
    client: Arc<dyn Client>,
    mut inbound: mpsc::Receiver<Inbound>,
    chain_id: Bytes,
    commit: bool,
) {
    while let Some(Inbound { message, .. }) = inbound.recv().await {
        match message.payload {
            Some(Payload::StartSc(start)) => {
                debug!(sequence = start.xt_sequence_number, xt_id = %hex::encode(&start.xt_id), "StartSC");
                if let Err(err) = client
                    .send(common::vote_for(&start, &chain_id, commit))
                    .await
                {
                    warn!(xt_id = %hex::encode(&start.xt_id), error = %err, "vote not sent");
                }
            }
            Some(Payload::Decided(decided)) => {
                let id = decided.xt_id.map(|x| x.hash).unwrap_or_default();
                common::say(format!(
                    "decided {} {}",
                    hex::encode(&id),
                    common::decision_word(decided.decision)
                ));
            }
            Some(Payload::CircMessage(circ)) => info!(
                label = circ.label,
                source_chain = %hex::encode(&circ.source_chain),
                "CIRC message"
            ),
            _ => debug!(
                kind = publisher_transport::proto::payload_kind(&message),
                "ignored message"
            ),
        }
    }
}

/// Submits an XTRequest every `every` while connected.
async fn submit_periodically(client: Arc<dyn Client>, chain_id: Bytes, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    // After an outage, resume the pace rather than send a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !client.is_connected() {
            continue;
        }
        let request = common::random_xt_request(&chain_id);
        let id = common::xt_id(&request);
        match client
            .send(common::message(Payload::XtRequest(request)))
            .await
        {
            Ok(()) => debug!(xt_id = %hex::encode(id), "XTRequest sent"),
            Err(err) => warn!(error = %err, "XTRequest not sent"),
        }
    }
}
