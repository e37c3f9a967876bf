//! Messages lost with a connection are counted one by one, those of the
//! batch being written when it is cut off included, and that batch's pooled
//! buffer goes back to the pool.

use std::time::Duration;

use bytes::Bytes;
use publisher_transport::{
    ClientConfig, Message, ServerConfig, TcpClient, TcpServer,
    metrics::Metrics,
    proto::{Payload, rollup::v1::Block},
};
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};

const STEP: Duration = Duration::from_secs(10);
/// 64 MiB: more than the socket buffers of both ends can hold (Linux allows
/// up to 4 MiB sending and 32 MiB receiving by default), so the writer is
/// blocked on a peer that does not read when the server stops.
const MESSAGES: u64 = 1000;
const MESSAGE_BYTES: usize = 64 * 1024;

fn undelivered(metrics: &Metrics) -> u64 {
    metrics
        .errors_total
        .with_label_values(&["undelivered", "write"])
        .get()
}

fn blocks_written(metrics: &Metrics) -> u64 {
    metrics
        .messages_total
        .with_label_values(&["block", "out"])
        .get()
}

/// Share of the write-buffer pool lent out, as the metric reports it.
fn write_buffers_in_use(metrics: &Metrics) -> f64 {
    metrics.render();
    metrics
        .buffer_utilization
        .with_label_values(&["write"])
        .get()
}

fn block() -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(Block {
            block_data: Bytes::from(vec![7u8; MESSAGE_BYTES]),
            ..Default::default()
        })),
    }
}

/// Waits for the writer's report of what it lost.
async fn reported_lost(metrics: &Metrics) -> u64 {
    timeout(STEP, async {
        loop {
            let lost = undelivered(metrics);
            if lost > 0 {
                return lost;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the writer reports what it lost")
}

/// Waits for the writer's report of what it lost, then checks that every
/// message was either written or counted lost, and that no write buffer is
/// still lent out.
async fn assert_every_message_accounted_for(metrics: &Metrics) {
    let lost = reported_lost(metrics).await;
    let written = blocks_written(metrics);
    assert_eq!(
        lost + written,
        MESSAGES,
        "{lost} counted lost, {written} written of {MESSAGES}"
    );
    assert!(lost > 1, "lost messages counted per connection: {lost}");
    assert_eq!(
        write_buffers_in_use(metrics),
        0.0,
        "the cut batch's buffer was not returned"
    );
}

#[tokio::test]
async fn every_message_lost_with_a_cut_connection_is_counted_and_its_buffer_returned() {
    let server = TcpServer::tcp(
        ServerConfig {
            stop_timeout: Duration::from_millis(300),
            disconnect_timeout: Duration::from_millis(300),
            ping_interval: None,
            ..ServerConfig::default()
                .with_listen_addr("127.0.0.1:0")
                .with_rate_limit(None)
        },
        None,
    );
    let addr = server.start().await.unwrap();
    assert_eq!(write_buffers_in_use(server.metrics()), 0.0);

    // A peer that connects and never reads.
    let _peer = TcpStream::connect(addr).await.unwrap();
    let identity = timeout(STEP, async {
        loop {
            if let Some(info) = server.connections().pop() {
                return info.identity;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    for _ in 0..MESSAGES {
        server.try_send(&identity, block()).unwrap();
    }
    // Cut off by the stop timeout while blocked on the peer.
    timeout(STEP, server.stop()).await.unwrap().unwrap();
    assert_every_message_accounted_for(server.metrics()).await;
}

#[tokio::test]
async fn every_message_lost_with_a_timed_out_write_is_counted_and_its_buffer_returned() {
    // A server that accepts and never reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let silent = tokio::spawn(async move { listener.accept().await.map(|(stream, _)| stream) });
    let client = TcpClient::tcp(
        ClientConfig {
            write_timeout: Duration::from_millis(300),
            disconnect_timeout: Duration::from_millis(300),
            ping_interval: None,
            auto_reconnect: false,
            // Room for all of them: the write must take them, then fail.
            send_queue_bytes: 64 * 1024 * 1024,
            ..ClientConfig::default()
        },
        None,
    );
    timeout(STEP, client.connect(&addr)).await.unwrap().unwrap();
    let _held = timeout(STEP, silent).await.unwrap().unwrap().unwrap();
    for _ in 0..MESSAGES {
        client.try_send(block()).unwrap();
    }
    // The write blocks on the silent server until the write timeout.
    assert_every_message_accounted_for(client.metrics()).await;
}

#[tokio::test]
async fn small_broadcasts_cut_off_are_each_written_or_counted_lost() {
    // Small shared frames are copied into one buffer per write: a write cut
    // off must still count every broadcast it carried. 62 MB of them: more
    // than the socket buffers of both ends hold (see MESSAGES).
    const BROADCASTS: u64 = 64_000;
    const PAYLOAD: usize = 960;
    let server = TcpServer::tcp(
        ServerConfig {
            stop_timeout: Duration::from_millis(300),
            disconnect_timeout: Duration::from_millis(300),
            ping_interval: None,
            // Room for all of them: the writer must take them, then be cut.
            send_queue_capacity: BROADCASTS as usize,
            ..ServerConfig::default()
                .with_listen_addr("127.0.0.1:0")
                .with_rate_limit(None)
        },
        None,
    );
    let addr = server.start().await.unwrap();
    // A peer that never reads.
    let _peer = TcpStream::connect(addr).await.unwrap();
    timeout(STEP, async {
        while server.connections().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let small = Message {
        sender_id: String::new(),
        payload: Some(Payload::Block(Block {
            block_data: Bytes::from(vec![7u8; PAYLOAD]),
            ..Default::default()
        })),
    };
    for _ in 0..BROADCASTS {
        let report = server.broadcast(small.clone(), None).unwrap();
        assert!(report.dropped.is_empty(), "the peer's queue has room");
        // Let the writer take them while they come.
        tokio::task::yield_now().await;
    }
    timeout(STEP, server.stop()).await.unwrap().unwrap();
    let metrics = server.metrics();
    let lost = reported_lost(metrics).await;
    let written = blocks_written(metrics);
    assert_eq!(lost + written, BROADCASTS, "{lost} lost, {written} written");
    assert!(
        written > 0,
        "some were written before the peer's buffers filled"
    );
    assert_eq!(
        write_buffers_in_use(metrics),
        0.0,
        "a write buffer is still lent"
    );
}
