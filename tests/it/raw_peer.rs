//! Signed sessions with one side driven by hand, for what PROTOCOL.md says
//! about the frames a peer sees: what an acknowledgement counts and the text
//! of an impossible one (§5.1), and that each side's first unicast frame
//! carries exactly the floor it announced (§4.3).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use publisher_transport::{
    ClientAuth, ClientConfig, FrameCodec, Inbound, Message, PublicKey, SecretKey, ServerAuth,
    ServerConfig, TcpClient, TcpServer, TrustStore, channel_handler,
    codec::{HANDSHAKE_MAX_FRAME_SIZE, RawFrame, frame_body},
    handshake::{
        ClientHandshake, ClientHandshakeConfig, SequenceFloors, ServerHandshake,
        ServerHandshakeConfig, ServerVerdict, SignedFrameSession,
    },
    proto::{
        Payload,
        rollup::v1::{Ping, Pong, Vote, disconnect_message::Reason},
        transport::v1::{Ack, MessageExt, SignedFrame},
    },
    signed::{Audience, FrameOpener, seal},
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    time::timeout,
};
use tokio_util::codec::Framed;

const BOUND: Duration = Duration::from_secs(10);

/// A client that speaks the extended handshake and signed frames by hand.
pub(crate) struct RawClient {
    framed: Framed<TcpStream, FrameCodec>,
    key: Arc<SecretKey>,
    pub(crate) server_key: PublicKey,
    /// What the handshake negotiated (the server's floors among it).
    pub(crate) signed: SignedFrameSession,
    opener: FrameOpener,
    next_sequence: u64,
}

/// A started server whose handler feeds a channel, and a hand-driven client
/// in a signed session with it, trusted as "seq-a".
pub(crate) async fn signed_session() -> (TcpServer, mpsc::Receiver<Inbound>, RawClient) {
    signed_session_with(None).await
}

/// As [`signed_session`]; `receive_buffer` sets the client socket's
/// `SO_RCVBUF`, so that a client that does not read holds the server's
/// writer up after a few KiB.
pub(crate) async fn signed_session_with(
    receive_buffer: Option<u32>,
) -> (TcpServer, mpsc::Receiver<Inbound>, RawClient) {
    let key = Arc::new(SecretKey::generate());
    let server_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", key.public_key().clone()).unwrap();
    let server = TcpServer::tcp(
        ServerConfig::default().with_listen_addr("127.0.0.1:0"),
        Some(ServerAuth::new(server_key.clone(), trust)),
    );
    let (handler, inbound) = channel_handler(16);
    server.set_handler(handler);
    let addr = server.start().await.unwrap();

    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let mut framed = Framed::new(stream, FrameCodec::default());
    let (signed, opener) =
        signed_handshake(&mut framed, &key, server_key.public_key(), "raw").await;
    let next_sequence = signed.local_floors.unicast;
    let client = RawClient {
        framed,
        key,
        server_key: server_key.public_key().clone(),
        signed,
        opener,
        next_sequence,
    };
    (server, inbound, client)
}

/// The client half of an extended handshake offering signed frames, run by
/// hand over `framed`: what it negotiated, and an opener of the server's
/// frames.
pub(crate) async fn signed_handshake(
    framed: &mut Framed<TcpStream, FrameCodec>,
    key: &Arc<SecretKey>,
    server_key: &PublicKey,
    client_id: &str,
) -> (SignedFrameSession, FrameOpener) {
    let mut config = ClientHandshakeConfig::new(key.clone(), client_id);
    config.expected_server_key = Some(server_key.clone());
    let handshake = ClientHandshake::start(config, SystemTime::now(), rand::random(), 1);
    let request = frame_body(handshake.request(), HANDSHAKE_MAX_FRAME_SIZE).unwrap();
    framed.send(RawFrame(request)).await.unwrap();
    let response = timeout(BOUND, framed.next())
        .await
        .expect("a handshake response in time")
        .expect("a handshake response")
        .unwrap();
    let session = handshake.finish(&response).unwrap();
    let signed = session.signed_frames.expect("signed frames negotiated");
    let opener = FrameOpener::new(
        &signed,
        key.public_key().clone(),
        session.identity,
        Default::default(),
    );
    (signed, opener)
}

impl RawClient {
    /// Seals `messages` (encoded `Message`s, or any bytes) into the next
    /// unicast frame and sends it.
    pub(crate) async fn send(&mut self, messages: Vec<Bytes>) {
        let audience = Audience::Unicast {
            recipient: self.server_key.clone(),
            session: self.signed.session_tag,
        };
        let frame = seal(
            &self.key,
            Default::default(),
            self.next_sequence,
            &audience,
            messages,
        );
        self.next_sequence += 1;
        let bytes = frame_body(&frame.encode_to_vec(), 1 << 20).unwrap();
        self.framed.send(RawFrame(bytes)).await.unwrap();
    }

    /// The next frame from the server, opened: its sequence number and
    /// messages; `None` once the server closed the connection.
    pub(crate) async fn receive(&mut self) -> Option<(u64, Vec<Bytes>)> {
        let body = timeout(BOUND, self.framed.next()).await.unwrap()?.ok()?;
        let sequence = SignedFrame::decode(&body[..]).unwrap().sequence;
        let messages = self.opener.open(&body).expect("the server's frames open");
        Some((sequence, messages))
    }

    /// Every message the server sends until it closes the connection.
    pub(crate) async fn receive_until_closed(&mut self) -> Vec<Message> {
        let mut received = Vec::new();
        while let Some((_, messages)) = self.receive().await {
            received.extend(messages.into_iter().map(|m| Message::decode(m).unwrap()));
        }
        received
    }
}

pub(crate) fn encode(message: &Message) -> Bytes {
    message.encode_to_vec().into()
}

fn control(ext: MessageExt) -> Bytes {
    ext.encode_to_vec().into()
}

fn vote() -> Message {
    Message {
        sender_id: "seq-a".into(),
        payload: Some(Payload::Vote(Vote {
            vote: true,
            ..Default::default()
        })),
    }
}

fn ping(timestamp: i64) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Ping(Ping { timestamp })),
    }
}

const ACK_REQUEST: MessageExt = MessageExt {
    ack: None,
    ack_request: true,
    request_id: 0,
    reply_to: 0,
};

/// Reads the server's frames until it sends an ack; returns the ack's count
/// and every other message before it.
async fn until_ack(client: &mut RawClient) -> (u64, Vec<Message>) {
    let mut others = Vec::new();
    while let Some((_, messages)) = client.receive().await {
        for bytes in messages {
            let message = Message::decode(bytes.clone()).unwrap();
            let ext = MessageExt::decode(bytes).unwrap();
            match ext.ack {
                Some(Ack { delivered }) if message.payload.is_none() => return (delivered, others),
                _ => others.push(message),
            }
        }
    }
    panic!("the server closed without acknowledging; it sent {others:?}");
}

// PROTOCOL.md §5.1: only application messages count, not the Ping or the
// ack request travelling with them.
#[tokio::test]
async fn an_ack_counts_the_application_messages_received() {
    let (server, mut inbound, mut client) = signed_session().await;
    client
        .send(vec![
            encode(&ping(7)),
            encode(&vote()),
            encode(&vote()),
            control(ACK_REQUEST),
        ])
        .await;
    let (delivered, others) = until_ack(&mut client).await;
    assert_eq!(delivered, 2);
    assert_eq!(
        others.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        [Some(Payload::Pong(Pong { timestamp: 7 }))],
        "the Ping was answered, not counted"
    );
    for _ in 0..2 {
        let received = timeout(BOUND, inbound.recv()).await.unwrap().unwrap();
        assert_eq!(&*received.from, "seq-a");
    }

    // The count is cumulative over the session.
    client
        .send(vec![encode(&vote()), control(ACK_REQUEST)])
        .await;
    assert_eq!(until_ack(&mut client).await.0, 3);
    server.stop().await.unwrap();
}

// PROTOCOL.md §5.1: an ack above what the server sent closes the session,
// and the Disconnect says why.
#[tokio::test]
async fn an_impossible_ack_closes_the_session_with_its_counts() {
    let (server, _inbound, mut client) = signed_session().await;
    let ack = MessageExt {
        ack: Some(Ack { delivered: 1 }),
        ack_request: false,
        request_id: 0,
        reply_to: 0,
    };
    client.send(vec![control(ack)]).await;
    let received = client.receive_until_closed().await;
    let [
        Message {
            payload: Some(Payload::Disconnect(disconnect)),
            ..
        },
    ] = &received[..]
    else {
        panic!("expected only a Disconnect, got {received:?}");
    };
    assert_eq!(disconnect.reason, Reason::ProtocolError as i32);
    assert_eq!(
        disconnect.details,
        "ack of 1 messages; 0 sent, 0 acknowledged before"
    );
    server.stop().await.unwrap();
}

// PROTOCOL.md §4.3: the server's first unicast frame of a session carries
// the unicast floor it announced.
#[tokio::test]
async fn the_servers_first_unicast_frame_carries_its_announced_floor() {
    let (server, _inbound, mut client) = signed_session().await;
    client.send(vec![encode(&ping(1))]).await;
    let (sequence, messages) = client.receive().await.expect("a Pong");
    assert_eq!(sequence, client.signed.peer_floors.unicast);
    assert_eq!(messages.len(), 1);
    server.stop().await.unwrap();
}

// PROTOCOL.md §4.3: so does the client's first frame, against a server
// driven by hand.
#[tokio::test]
async fn the_clients_first_frame_carries_its_announced_floor() {
    let client_key = Arc::new(SecretKey::generate());
    let server_key = Arc::new(SecretKey::generate());
    let trust = Arc::new(TrustStore::new());
    trust.add("seq-a", client_key.public_key().clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();

    let client = TcpClient::tcp(
        ClientConfig::default().with_client_id("seq-a"),
        Some(ClientAuth::new(client_key).with_server_key(server_key.public_key().clone())),
    );
    let connecting = tokio::spawn(async move { client.connect(&addr).await.map(|()| client) });

    let (stream, _) = timeout(BOUND, listener.accept()).await.unwrap().unwrap();
    let mut framed = Framed::new(stream, FrameCodec::default());
    let request = timeout(BOUND, framed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let handshake = ServerHandshake::new(ServerHandshakeConfig::new(trust, Some(server_key)));
    let floors = SequenceFloors {
        unicast: 1_000,
        broadcast: None,
    };
    let ServerVerdict::Accept {
        response,
        client: accepted,
    } = handshake.respond(&request, SystemTime::now(), floors)
    else {
        panic!("the request is refused");
    };
    let announced = accepted
        .signed_frames
        .expect("signed frames")
        .peer_floors
        .unicast;
    let body = frame_body(&response, 1 << 20).unwrap();
    framed.send(RawFrame(body)).await.unwrap();

    let client = timeout(BOUND, connecting).await.unwrap().unwrap().unwrap();
    client.send(vote()).await.unwrap();
    let body = timeout(BOUND, framed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let frame = SignedFrame::decode(&body[..]).unwrap();
    assert_eq!(frame.sequence, announced);
    assert_eq!(frame.messages.len(), 1);
    drop(client);
}

/// `message` with the extension fields of `ext` appended, as a sender of
/// requests and replies writes it (PROTOCOL.md §5.2).
fn with_ids(message: &Message, ext: MessageExt) -> Bytes {
    let mut bytes = message.encode_to_vec();
    bytes.extend(ext.encode_to_vec());
    bytes.into()
}

const NO_IDS: MessageExt = MessageExt {
    ack: None,
    ack_request: false,
    request_id: 0,
    reply_to: 0,
};

// PROTOCOL.md §5.2: a request reaches the handler, whose reply names the
// request's id in field 103 after the message's own fields; a reply naming
// no waiting request is ignored and counted, never handed to the handler.
#[tokio::test]
async fn requests_and_replies_carry_their_ids_on_the_wire() {
    let (server, mut inbound, mut client) = signed_session().await;
    assert!(
        server.manager().get("seq-a").unwrap().takes_requests(),
        "negotiated with an extended client"
    );
    let request = MessageExt {
        request_id: 300,
        ..NO_IDS
    };
    let bytes = with_ids(&vote(), request);
    assert_eq!(&bytes[bytes.len() - 4..], [0xb0, 0x06, 0xac, 0x02]);
    client.send(vec![bytes]).await;
    let received = timeout(BOUND, inbound.recv()).await.unwrap().unwrap();
    assert!(received.is_request());
    let mut answer = vote();
    answer.sender_id.clear();
    received.reply(answer.clone()).await.unwrap();
    let (_, messages) = client.receive().await.expect("the reply");
    let [reply] = &messages[..] else {
        panic!("expected one message, got {messages:?}");
    };
    assert_eq!(Message::decode(reply.clone()).unwrap(), answer);
    assert_eq!(
        MessageExt::decode(reply.clone()).unwrap(),
        MessageExt {
            reply_to: 300,
            ..NO_IDS
        }
    );
    assert_eq!(&reply[reply.len() - 4..], [0xb8, 0x06, 0xac, 0x02]);

    // A reply to nothing, then a plain vote: only the vote is handled.
    let forged = MessageExt {
        reply_to: 77,
        ..NO_IDS
    };
    client
        .send(vec![with_ids(&vote(), forged), encode(&vote())])
        .await;
    let handled = timeout(BOUND, inbound.recv()).await.unwrap().unwrap();
    assert!(!handled.is_request());
    assert!(inbound.try_recv().is_err());
    let unknown = server
        .metrics()
        .errors_total
        .with_label_values(&["unknown_reply", "read"])
        .get();
    assert_eq!(unknown, 1);
    server.stop().await.unwrap();
}
