//! A client holding connections to several publishers, keyed by chain id,
//! with a default chain, connect-all / disconnect-all, and send to one or all.

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

use futures::future::join_all;

use crate::{Client, error::TransportError, proto::Message};

struct Entry {
    addr: String,
    client: Arc<dyn Client>,
}

/// Publisher connections by chain id. Back-ends may differ per chain.
#[derive(Default)]
pub struct MultiPublisherClient {
    entries: RwLock<BTreeMap<String, Entry>>,
    default_chain: RwLock<Option<String>>,
}

impl std::fmt::Debug for MultiPublisherClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiPublisherClient")
            .field("chains", &self.chains())
            .field("default", &self.default_chain())
            .finish()
    }
}

/// One result per chain, in chain-id order.
pub type PerChain<T> = Vec<(String, Result<T, TransportError>)>;

impl MultiPublisherClient {
    /// No publishers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `client` for `chain_id`, to connect to `addr`. The first chain
    /// added becomes the default. Returns the client it replaced.
    pub fn add(
        &self,
        chain_id: impl Into<String>,
        addr: impl Into<String>,
        client: Arc<dyn Client>,
    ) -> Option<Arc<dyn Client>> {
        let chain_id = chain_id.into();
        let mut default = self
            .default_chain
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if default.is_none() {
            *default = Some(chain_id.clone());
        }
        let entry = Entry {
            addr: addr.into(),
            client,
        };
        self.entries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(chain_id, entry)
            .map(|old| old.client)
    }

    /// Unregisters `chain_id` (not disconnecting it); clears the default if it was.
    pub fn remove(&self, chain_id: &str) -> Option<Arc<dyn Client>> {
        let removed = self
            .entries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(chain_id)?;
        let mut default = self
            .default_chain
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if default.as_deref() == Some(chain_id) {
            *default = None;
        }
        Some(removed.client)
    }

    /// Makes `chain_id` the default.
    pub fn set_default(&self, chain_id: &str) -> Result<(), TransportError> {
        if !self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(chain_id)
        {
            return Err(TransportError::UnknownChain {
                chain_id: chain_id.to_owned(),
            });
        }
        *self
            .default_chain
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(chain_id.to_owned());
        Ok(())
    }

    /// The default chain.
    pub fn default_chain(&self) -> Option<String> {
        self.default_chain
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Registered chains, sorted.
    pub fn chains(&self) -> Vec<String> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// The client of `chain_id` (`None`: the default chain's).
    pub fn client(&self, chain_id: Option<&str>) -> Result<Arc<dyn Client>, TransportError> {
        let chain_id = match chain_id {
            Some(chain_id) => chain_id.to_owned(),
            None => self
                .default_chain()
                .ok_or_else(|| TransportError::UnknownChain {
                    chain_id: String::new(),
                })?,
        };
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&chain_id)
            .map(|entry| entry.client.clone())
            .ok_or(TransportError::UnknownChain { chain_id })
    }

    /// Chains with a live session.
    pub fn connected(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, _, client)| client.is_connected())
            .map(|(chain_id, _, _)| chain_id)
            .collect()
    }

    fn snapshot(&self) -> Vec<(String, String, Arc<dyn Client>)> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(chain_id, entry)| (chain_id.clone(), entry.addr.clone(), entry.client.clone()))
            .collect()
    }

    /// Connects every chain concurrently, each with `max_retries` retries.
    pub async fn connect_all(&self, max_retries: u32) -> PerChain<()> {
        let attempts = self
            .snapshot()
            .into_iter()
            .map(|(chain_id, addr, client)| async move {
                let result = if client.is_connected() {
                    Ok(())
                } else {
                    client.connect_with_retry(&addr, max_retries).await
                };
                (chain_id, result)
            });
        join_all(attempts).await
    }

    /// Disconnects every chain concurrently.
    pub async fn disconnect_all(&self) -> PerChain<()> {
        let closes = self
            .snapshot()
            .into_iter()
            .map(|(chain_id, _, client)| async move { (chain_id, client.disconnect().await) });
        join_all(closes).await
    }

    /// Sends to one chain (`None`: the default).
    pub async fn send(
        &self,
        chain_id: Option<&str>,
        message: Message,
    ) -> Result<(), TransportError> {
        self.client(chain_id)?.send(message).await
    }

    /// Sends to one chain (`None`: the default) and waits for its delivery
    /// acknowledgement; see [`Client::send_confirmed`].
    pub async fn send_confirmed(
        &self,
        chain_id: Option<&str>,
        message: Message,
    ) -> Result<(), TransportError> {
        self.client(chain_id)?.send_confirmed(message).await
    }

    /// Sends a request to one chain (`None`: the default) and returns its
    /// reply; see [`Client::request`].
    pub async fn request(
        &self,
        chain_id: Option<&str>,
        message: Message,
        timeout: std::time::Duration,
    ) -> Result<crate::Inbound, TransportError> {
        self.client(chain_id)?.request(message, timeout).await
    }

    /// Sends `message` to every chain concurrently.
    pub async fn send_all(&self, message: Message) -> PerChain<()> {
        let sends = self.snapshot().into_iter().map(|(chain_id, _, client)| {
            let message = message.clone();
            async move { (chain_id, client.send(message).await) }
        });
        join_all(sends).await
    }
}
