//! The multi-publisher client over two real servers.

use std::{sync::Arc, time::Duration};

use publisher_transport::{
    Client, ClientConfig, Message, ServerConfig, TcpClient, TcpServer, TransportError,
    channel_handler,
    multi::MultiPublisherClient,
    proto::{Payload, rollup::v1::Decided},
};
use tokio::time::timeout;

/// An application message (control messages such as Ping never reach handlers).
fn message(n: i64) -> Message {
    Message {
        sender_id: String::new(),
        payload: Some(Payload::Decided(Decided {
            xt_id: None,
            decision: n % 2 == 0,
        })),
    }
}

#[tokio::test]
async fn routes_by_chain_with_default_and_fan_out() {
    timeout(Duration::from_secs(30), async {
        let mut servers = Vec::new();
        let mut inboxes = Vec::new();
        let multi = MultiPublisherClient::new();
        for chain in ["chain-a", "chain-b"] {
            let server = TcpServer::tcp(
                ServerConfig::default().with_listen_addr("127.0.0.1:0"),
                None,
            );
            let (handler, inbox) = channel_handler(16);
            server.set_handler(handler);
            let addr = server.start().await.unwrap();
            let client: Arc<dyn Client> = Arc::new(TcpClient::tcp(ClientConfig::default(), None));
            multi.add(chain, addr.to_string(), client);
            servers.push(server);
            inboxes.push(inbox);
        }
        assert_eq!(multi.default_chain().as_deref(), Some("chain-a"));
        for (chain, result) in multi.connect_all(0).await {
            result.unwrap_or_else(|err| panic!("{chain}: {err}"));
        }
        assert_eq!(multi.connected(), ["chain-a", "chain-b"]);

        multi.send(None, message(1)).await.unwrap();
        assert!(inboxes[0].recv().await.is_some(), "default chain gets it");
        multi.send(Some("chain-b"), message(2)).await.unwrap();
        assert!(inboxes[1].recv().await.is_some());
        for (_, result) in multi.send_all(message(3)).await {
            result.unwrap();
        }
        assert!(inboxes[0].recv().await.is_some() && inboxes[1].recv().await.is_some());

        assert!(matches!(
            multi.send(Some("chain-z"), message(4)).await,
            Err(TransportError::UnknownChain { .. })
        ));
        // Without authentication there are no acknowledgements to wait for.
        assert!(matches!(
            multi.send_confirmed(Some("chain-b"), message(6)).await,
            Err(TransportError::ConfirmationUnavailable { .. })
        ));
        assert!(matches!(
            multi.send_confirmed(Some("chain-z"), message(7)).await,
            Err(TransportError::UnknownChain { .. })
        ));
        multi.set_default("chain-b").unwrap();
        assert!(multi.set_default("chain-z").is_err());

        for (_, result) in multi.disconnect_all().await {
            result.unwrap();
        }
        assert!(multi.connected().is_empty());
        assert!(matches!(
            multi.send(None, message(5)).await,
            Err(TransportError::NotConnected)
        ));
        for server in servers {
            server.stop().await.unwrap();
        }
    })
    .await
    .expect("test timed out");
}
