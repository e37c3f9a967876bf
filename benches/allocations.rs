//! Allocations per message on the steady path, counted by a global allocator.
//!
//! A client sends 100,000 `Vote`s to a server in this process over loopback
//! (after a warm-up that grows buffers and pools), in Go's auth-disabled mode
//! and with signed frames. The figure is every allocation in the process
//! divided by the messages delivered; the protobuf decode of each delivered
//! message is measured on its own and shown as part of it, since the
//! application owns that `Message`. The "recycling" rows use a handler that
//! takes whole batches and gives each message back
//! (`InboundBatch::recycle`), so the next ones are decoded into it.
//!
//! Run: `cargo bench --bench allocations`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use publisher_transport::{
    ClientAuth, ClientConfig, Handled, Handler, Inbound, InboundBatch, Message, SecretKey,
    ServerAuth, ServerConfig, SyncHandler, TcpClient, TcpServer, TrustStore,
    proto::{
        Payload,
        rollup::v1::{Vote, XtId},
    },
};
use tokio::sync::Notify;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 10_000;
const MESSAGES: u64 = 100_000;

fn vote(hash: &Bytes) -> Message {
    // Built from shared bytes: constructing it allocates nothing.
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Vote(Vote {
            sender_chain_id: Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1]),
            xt_id: Some(XtId { hash: hash.clone() }),
            vote: true,
        })),
    }
}

/// Counts messages, giving each back to be decoded into again.
struct Recycling(Arc<dyn Fn() + Send + Sync>);

impl Handler for Recycling {
    fn handle(&self, _: Inbound) -> Handled {
        (self.0)();
        Handled::Done(Ok(()))
    }

    fn handle_batch(&self, batch: &mut InboundBatch) -> Handled {
        while let Some(inbound) = batch.pop() {
            (self.0)();
            batch.recycle(inbound.message);
        }
        Handled::Done(Ok(()))
    }
}

struct Row {
    mode: &'static str,
    handler: &'static str,
    /// Signed frames received during the measurement (0 when unsigned).
    frames: u64,
    per_message: f64,
    decode_per_message: f64,
    elapsed: Duration,
}

async fn run(signed: bool, recycle: bool) -> Row {
    let server_key = Arc::new(SecretKey::generate());
    let client_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("bench", client_key.public_key().clone()).unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default()
            .with_listen_addr("127.0.0.1:0")
            .with_inbound_limit(None),
        signed.then(|| ServerAuth::new(server_key.clone(), trust)),
    );
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let target = Arc::new(AtomicU64::new(WARM_UP));
    {
        let (received, done, target) = (received.clone(), done.clone(), target.clone());
        let count = move || {
            if received.fetch_add(1, Ordering::Relaxed) + 1 == target.load(Ordering::Relaxed) {
                done.notify_one();
            }
        };
        if recycle {
            server.set_handler(Arc::new(Recycling(Arc::new(count))));
        } else {
            server.set_handler(Arc::new(SyncHandler(move |_inbound| {
                count();
                Ok(())
            })));
        }
    }
    let addr = server.start().await.unwrap();
    let client = TcpClient::tcp(
        ClientConfig::default().with_client_id("bench-client"),
        signed
            .then(|| ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
    );
    client.connect(&addr.to_string()).await.unwrap();
    let hash = Bytes::from(vec![7u8; 32]);

    // Warm-up: buffers, pools and channel blocks reach their steady size.
    for _ in 0..WARM_UP {
        client.send(vote(&hash)).await.unwrap();
    }
    done.notified().await;

    received.store(0, Ordering::SeqCst);
    target.store(MESSAGES, Ordering::SeqCst);
    let started = Instant::now();
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..MESSAGES {
        client.send(vote(&hash)).await.unwrap();
    }
    done.notified().await;
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    let elapsed = started.elapsed();
    // Counted since start; the warm-up's frames are few next to the run's.
    let frames = server
        .metrics()
        .messages_total
        .with_label_values(&["signed_frame", "in"])
        .get();

    // What decoding alone costs for the message the handler receives.
    let mut stamped = vote(&hash);
    stamped.sender_id = "bench-client".into();
    let body = Bytes::from(stamped.encode_to_vec());
    // A recycling handler's messages are decoded into one that already
    // has its buffers.
    let mut reused = Message::default();
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..1000 {
        if recycle {
            reused.clear();
            reused.merge(body.clone()).unwrap();
            std::hint::black_box(&reused);
        } else {
            std::hint::black_box(Message::decode(body.clone()).unwrap());
        }
    }
    let decode = (ALLOCATIONS.load(Ordering::SeqCst) - before) as f64 / 1000.0;

    client.disconnect().await.unwrap();
    server.stop().await.unwrap();
    Row {
        mode: if signed { "signed" } else { "unsigned" },
        handler: if recycle { "recycling" } else { "ordinary" },
        frames,
        per_message: allocations as f64 / MESSAGES as f64,
        decode_per_message: decode,
        elapsed,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "allocations per message, {MESSAGES} Vote messages client → server (after {WARM_UP} warm-up)"
    );
    println!(
        "| mode | handler | all allocations / message | of which protobuf decode | transport alone | signed frames | time |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (signed, recycle) in [(false, false), (false, true), (true, false), (true, true)] {
        let row = runtime.block_on(run(signed, recycle));
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.2} s |",
            row.mode,
            row.handler,
            row.per_message,
            row.decode_per_message,
            (row.per_message - row.decode_per_message).max(0.0),
            row.frames,
            row.elapsed.as_secs_f64()
        );
    }
}
