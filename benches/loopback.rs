//! In-process loopback throughput per back-end: one client streams 100-byte
//! messages to a server on 127.0.0.1, and an iteration ends when the
//! server's handler has received every message sent in it.
//!
//! `cargo bench --all-features --bench loopback` (gRPC and QUIC need their
//! features; TLS rows need `tls`). The same machinery as `examples/loadgen`
//! builds the back-ends, on a 2-worker runtime as there.

#[path = "../examples/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::backend::{self, BackendArgs, BackendKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use publisher_transport::{
    Client, ClientConfig, Inbound, Message, Server, ServerConfig, SyncHandler, TcpOptions,
    proto::{
        Payload,
        rollup::v1::{Vote, XtId},
    },
};
use tokio::{runtime::Runtime, sync::Notify};

/// Messages per iteration: enough to fill the pipes and amortise the wait.
const MESSAGES: u64 = 20_000;
/// Encoded size of each message, `sender_id` stamp included.
const MESSAGE_LEN: usize = 100;
/// Longest an iteration may take before the bench gives up.
const ITERATION_LIMIT: Duration = Duration::from_secs(30);

/// A `Vote` padded so that, once the client stamps its id, the message is
/// [`MESSAGE_LEN`] bytes.
fn vote(client_id: &str) -> Message {
    let with_chain_id = |len: usize| Message {
        sender_id: client_id.to_owned(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from(vec![0x42; len]),
            xt_id: Some(XtId {
                hash: Bytes::from(vec![0xab; 32]),
            }),
            vote: true,
        })),
    };
    let mut message = with_chain_id(1 + MESSAGE_LEN - with_chain_id(1).encoded_len());
    assert_eq!(message.encoded_len(), MESSAGE_LEN);
    // The client stamps its id; sending it empty avoids a copy per message.
    message.sender_id.clear();
    message
}

/// Handler-side count, and a wake-up once it reaches `target`.
#[derive(Default)]
struct Received {
    count: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

struct Loopback {
    server: Arc<dyn Server>,
    client: Arc<dyn Client>,
    received: Arc<Received>,
}

async fn connect(kind: BackendKind, tls: bool) -> Loopback {
    let mut args = BackendArgs::new(kind, tls);
    let setup = backend::server(
        &args,
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_rate_limit(None)
            .with_inbound_limit(None),
        TcpOptions::default(),
        None,
    )
    .expect("server");
    let received = Arc::new(Received::default());
    let counter = received.clone();
    setup
        .server
        .set_handler(Arc::new(SyncHandler(move |_: Inbound| {
            let count = counter.count.fetch_add(1, Ordering::Relaxed) + 1;
            if count == counter.target.load(Ordering::Relaxed) {
                counter.reached.notify_one();
            }
            Ok(())
        })));
    let addr = setup.server.start().await.expect("listen");
    args.pin_sha256.extend(setup.fingerprint.clone());
    let mut config = ClientConfig::default().with_client_id("bench");
    config.auto_reconnect = false;
    let client = backend::ClientFactory::new(&args)
        .expect("client factory")
        .client(config, TcpOptions::default(), None);
    client.connect(&addr.to_string()).await.expect("connect");
    Loopback {
        server: setup.server,
        client,
        received,
    }
}

/// Sends `MESSAGES` × `iters` messages; returns the time until the handler
/// had the last one.
async fn stream(loopback: &Loopback, iters: u64) -> Duration {
    let template = vote("bench");
    let received = &loopback.received;
    let start_count = received.count.load(Ordering::Relaxed);
    let target = start_count + MESSAGES * iters;
    received.target.store(target, Ordering::Relaxed);
    let reached = received.reached.notified();
    tokio::pin!(reached);
    reached.as_mut().enable();
    let started = Instant::now();
    // On a worker, as an application's task would be.
    let client = loopback.client.clone();
    tokio::spawn(async move {
        for _ in 0..MESSAGES * iters {
            client
                .send(template.clone())
                .await
                .expect("send while streaming");
        }
    })
    .await
    .expect("sender task");
    if received.count.load(Ordering::Relaxed) < target {
        tokio::time::timeout(ITERATION_LIMIT * iters as u32, reached)
            .await
            .expect("the server received every message");
    }
    started.elapsed()
}

fn loopback(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = vec![("tcp", BackendKind::Tcp, false)];
    if cfg!(feature = "tls") {
        rows.push(("tcp+tls", BackendKind::Tcp, true));
    }
    if cfg!(feature = "grpc") {
        rows.push(("grpc", BackendKind::Grpc, false));
    }
    if cfg!(feature = "quic") {
        rows.push(("quic", BackendKind::Quic, false));
    }
    let mut group = c.benchmark_group("loopback_stream_100B");
    group
        .throughput(Throughput::Elements(MESSAGES))
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for (name, kind, tls) in rows {
        let loopback = runtime.block_on(connect(kind, tls));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| runtime.block_on(stream(&loopback, iters)))
        });
        shut_down(&runtime, loopback);
    }
    group.finish();
}

fn shut_down(runtime: &Runtime, loopback: Loopback) {
    runtime.block_on(async {
        let _ = loopback.client.disconnect().await;
        let _ = loopback.server.stop().await;
    });
}

criterion_group!(benches, loopback);
criterion_main!(benches);
