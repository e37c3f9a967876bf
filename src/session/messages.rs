//! Received messages as a bounded [`Stream`], for applications that pull
//! rather than register a callback.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::Stream;
use tokio::sync::mpsc::{self, error::TrySendError as QueueError};
use tracing::debug;

use super::handler::{Handled, Handler, HandlerError, Inbound};
use crate::proto::MessageKind;

/// The verified messages of a server's or client's connections, in each
/// connection's order, as a [`Stream`]. It holds at most the capacity it
/// was made with: while it is full, connections stop reading (their peers
/// feel the backpressure) and nothing is dropped. It ends once its handler
/// has been replaced (or its server or client dropped) and no connection
/// holds it any more.
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::Receiver<Inbound>,
    skipped: Arc<AtomicU64>,
}

impl Messages {
    /// Messages of kinds this stream does not take (see
    /// [`message_stream`]), counted and left out.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The next message; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }
}

impl Stream for Messages {
    type Item = Inbound;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        self.rx.poll_recv(cx)
    }
}

/// Which kinds a stream takes: a flag per [`MessageKind`].
type Wanted = [bool; MessageKind::ALL.len()];

struct StreamHandler {
    tx: mpsc::Sender<Inbound>,
    wanted: Option<Wanted>,
    skipped: Arc<AtomicU64>,
}

impl Handler for StreamHandler {
    fn handle(&self, inbound: Inbound) -> Handled {
        if let Some(wanted) = &self.wanted {
            let kind = MessageKind::of(&inbound.message);
            if !wanted[kind.index()] {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                debug!(kind = kind.label(), from = %inbound.from, "message of a kind the stream does not take");
                return Handled::Done(Ok(()));
            }
        }
        match self.tx.try_send(inbound) {
            Ok(()) => Handled::Done(Ok(())),
            Err(QueueError::Full(inbound)) => {
                let tx = self.tx.clone();
                Handled::Pending(Box::pin(async move {
                    tx.send(inbound)
                        .await
                        .map_err(|_| HandlerError::from("message stream dropped"))
                }))
            }
            Err(QueueError::Closed(_)) => Handled::Done(Err("message stream dropped".into())),
        }
    }
}

/// A handler feeding a [`Messages`] stream of at most `capacity` messages.
/// With `kinds`, only messages of those kinds join the stream; the others
/// are counted ([`Messages::skipped`]) and logged at debug level. A
/// stream that is dropped makes every later message a handler error
/// (counted, logged): set another handler first.
pub fn message_stream(
    capacity: usize,
    kinds: Option<&[MessageKind]>,
) -> (Arc<dyn Handler>, Messages) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let wanted = kinds.map(|kinds| {
        let mut wanted = [false; MessageKind::ALL.len()];
        for kind in kinds {
            wanted[kind.index()] = true;
        }
        wanted
    });
    let skipped = Arc::new(AtomicU64::new(0));
    let handler = StreamHandler {
        tx,
        wanted,
        skipped: skipped.clone(),
    };
    (Arc::new(handler), Messages { rx, skipped })
}
