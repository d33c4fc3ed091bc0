//! CancelRequests. A cancel arrives on a fresh connection carrying the (pid, secret) key of
//! the session to cancel. pglb remembers which server issued each key of its plaintext
//! sessions (BackendKeyData, see `relay::Tracker`) and sends the cancel exactly there.
//! For an unknown key (TLS passthrough, or issued before a restart) it sends the cancel
//! to every server that is up: the key is 64+ bits of secret, so only its owner acts.
//! A plain TCP balancer picks one server at random and loses most cancels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::net;
use crate::startup::CancelKey;
use crate::state::{ListenState, lock};

/// Cancel keys of live plaintext sessions and the server that issued each, shared by all
/// listens (a cancel may come in through any of them). Entries live as long as their
/// session, so the map never outgrows the number of sessions.
#[derive(Debug, Default)]
pub struct Registry {
    keys: Mutex<HashMap<CancelKey, SocketAddr>>,
}

impl Registry {
    pub fn insert(&self, key: CancelKey, server: SocketAddr) {
        lock(&self.keys).insert(key, server);
    }

    pub fn remove(&self, key: &CancelKey) {
        lock(&self.keys).remove(key);
    }

    pub fn get(&self, key: &CancelKey) -> Option<SocketAddr> {
        lock(&self.keys).get(key).copied()
    }

    pub fn len(&self) -> usize {
        lock(&self.keys).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a cancel went.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// To the server that issued the key.
    Owner(SocketAddr),
    /// Key unknown (TLS session, or from before a restart): to every server that is up.
    Broadcast(usize),
}

/// Routes a cancel: to its owner when the key is known, else to every server that is up.
pub async fn route(listen: &Arc<ListenState>, registry: &Registry, key: &CancelKey) -> Routed {
    match registry.get(key) {
        Some(addr) => {
            send_to(vec![addr], key, listen.cfg.timeouts.connect).await;
            Routed::Owner(addr)
        }
        None => Routed::Broadcast(forward(listen, key).await),
    }
}

/// How long a server may take to act on a cancel before pglb hangs up.
const LINGER: Duration = Duration::from_secs(5);

/// Sends the cancel to every server that is up; returns how many received it.
pub async fn forward(listen: &Arc<ListenState>, key: &CancelKey) -> usize {
    let servers = listen
        .servers
        .iter()
        .filter(|s| s.is_up())
        .map(|s| s.cfg.addr)
        .collect();
    send_to(servers, key, listen.cfg.timeouts.connect).await
}

async fn send_to(servers: Vec<SocketAddr>, key: &CancelKey, timeout: Duration) -> usize {
    let packet: Arc<[u8]> = key.to_packet().into();
    let mut sends = JoinSet::new();
    for addr in servers {
        let packet = Arc::clone(&packet);
        sends.spawn(async move {
            let mut stream = net::connect(addr, timeout).await?;
            stream.write_all(&packet).await?;
            // Like libpq, wait for the server to close: PgBouncer drops a cancel whose
            // sender hangs up before it has passed the cancel on.
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(LINGER, async {
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
            Ok::<_, std::io::Error>(())
        });
    }
    let mut delivered = 0;
    while let Some(r) = sends.join_next().await {
        if matches!(r, Ok(Ok(()))) {
            delivered += 1;
        }
    }
    delivered
}
