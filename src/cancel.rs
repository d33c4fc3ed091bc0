//! CancelRequests. A cancel arrives on a fresh connection carrying the (pid, secret) key of
//! the session to cancel. pglb remembers which server issued each key of its plaintext
//! sessions (BackendKeyData, see `relay::Tracker`) and sends the cancel exactly there.
//! For an unknown key (TLS passthrough, or issued before a restart) it sends the cancel
//! to every server that is up: the key is 64+ bits of secret, so only its owner acts.
//! A plain TCP balancer picks one server at random and loses most cancels.
//!
//! Sending to every server turns one unauthenticated packet into several connections, so
//! unknown keys are rate-limited, per client address and process-wide; known keys never.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::config::CancelLimits;
use crate::counters::{Counter, lock};
use crate::net;
use crate::startup::CancelKey;
use crate::state::ListenState;

/// Cancel keys of live plaintext sessions and the server that issued each, shared by all
/// listens (a cancel may come in through any of them). Entries live as long as their
/// session, so the map never outgrows the number of sessions.
#[derive(Debug)]
pub struct Registry {
    keys: Mutex<HashMap<CancelKey, SocketAddr>>,
    unknown: Mutex<Limiter>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(CancelLimits {
            per_second: 100,
            per_client: 10,
        })
    }
}

impl Registry {
    pub fn new(limits: CancelLimits) -> Self {
        Registry {
            keys: Mutex::default(),
            unknown: Mutex::new(Limiter::new(limits)),
        }
    }

    /// Takes new limits (a reload); buckets start full.
    pub fn set_limits(&self, limits: CancelLimits) {
        *lock(&self.unknown) = Limiter::new(limits);
    }

    /// May a cancel with an unknown key from `client` go out now?
    fn admit_unknown(&self, client: IpAddr) -> bool {
        lock(&self.unknown).admit(client, Instant::now())
    }

    pub fn insert(&self, key: CancelKey, server: SocketAddr) {
        lock(&self.keys).insert(key, server);
    }

    pub fn remove(&self, key: &CancelKey) {
        lock(&self.keys).remove(key);
    }

    pub fn get(&self, key: &CancelKey) -> Option<SocketAddr> {
        lock(&self.keys).get(key).copied()
    }
}

/// Where a cancel went.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// To the server that issued the key.
    Owner(SocketAddr),
    /// Key unknown (TLS session, or from before a restart): to every server that is up.
    Broadcast(usize),
    /// Key unknown and over the rate limit: dropped.
    Limited,
}

/// Routes a cancel: to its owner when the key is known, else to every server that is up
/// (within the rate limit for unknown keys).
pub async fn route(
    listen: &Arc<ListenState>,
    registry: &Registry,
    key: &CancelKey,
    client: IpAddr,
) -> Routed {
    match registry.get(key) {
        Some(addr) => {
            send_to(vec![addr], key, listen.cfg().timeouts.connect).await;
            Routed::Owner(addr)
        }
        None if registry.admit_unknown(client) => Routed::Broadcast(forward(listen, key).await),
        None => {
            listen.counters.cancels_limited.inc();
            Routed::Limited
        }
    }
}

/// How long a server may take to act on a cancel before pglb hangs up.
const LINGER: Duration = Duration::from_secs(5);

/// Sends the cancel to every server that is up; returns how many received it.
pub async fn forward(listen: &Arc<ListenState>, key: &CancelKey) -> usize {
    let servers = listen
        .servers()
        .iter()
        .filter(|s| s.is_up() && !s.is_removed())
        .map(|s| s.cfg().addr)
        .collect();
    send_to(servers, key, listen.cfg().timeouts.connect).await
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

/// Token buckets for unknown-key cancels: one for the process, one per client address.
/// A burst of twice the rate is allowed (a pool cancelling several queries at once).
#[derive(Debug)]
struct Limiter {
    limits: CancelLimits,
    all: Bucket,
    clients: HashMap<IpAddr, Bucket>,
}

/// Client buckets kept at most; beyond, full (idle) ones are forgotten.
const MAX_CLIENT_BUCKETS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(rate) * 2.0,
            at: now,
        }
    }

    fn refill(&mut self, rate: u32, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + gained).min(f64::from(rate) * 2.0);
        self.at = now;
    }
}

impl Limiter {
    fn new(limits: CancelLimits) -> Self {
        Limiter {
            limits,
            all: Bucket::full(limits.per_second, Instant::now()),
            clients: HashMap::new(),
        }
    }

    fn admit(&mut self, client: IpAddr, now: Instant) -> bool {
        let CancelLimits {
            per_second,
            per_client,
        } = self.limits;
        if self.clients.len() >= MAX_CLIENT_BUCKETS {
            self.clients.retain(|_, b| {
                b.refill(per_client, now);
                b.tokens < f64::from(per_client) * 2.0
            });
        }
        let mine = self
            .clients
            .entry(client)
            .or_insert_with(|| Bucket::full(per_client, now));
        mine.refill(per_client, now);
        self.all.refill(per_second, now);
        if mine.tokens < 1.0 || self.all.tokens < 1.0 {
            return false;
        }
        mine.tokens -= 1.0;
        self.all.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counter;
    use crate::testing::{Fake, fake_recording, listen_over};

    fn key(pid: i32) -> CancelKey {
        CancelKey {
            pid,
            secret: bytes::Bytes::from_static(&[9, 9, 9, 9]),
        }
    }

    #[tokio::test]
    async fn known_keys_go_to_their_server_unknown_ones_to_every_server_up_within_the_limit() {
        // Each fake records the packet, then closes (as PostgreSQL does after a cancel).
        let mut fakes = Vec::new();
        for _ in 0..3 {
            fakes.push(fake_recording(Fake::CloseAfterFirst).await);
        }
        let listen = listen_over(&fakes.iter().map(|f| f.0).collect::<Vec<_>>());
        listen.servers()[1].set_up(false);
        let registry = Registry::new(CancelLimits {
            per_second: 100,
            per_client: 1,
        });
        let client: IpAddr = [10, 0, 0, 1].into();
        registry.insert(key(1), fakes[1].0);
        let routed = route(&listen, &registry, &key(1), client).await;
        assert_eq!(
            routed,
            Routed::Owner(fakes[1].0),
            "known: its server, even DOWN"
        );
        let got: Vec<_> = fakes.iter_mut().map(|f| f.1.try_recv().ok()).collect();
        assert_eq!(got, [None, Some(key(1).to_packet()), None]);

        // Unknown: every server up; the client's burst is 2, then it is dropped.
        for _ in 0..2 {
            let routed = route(&listen, &registry, &key(2), client).await;
            assert_eq!(routed, Routed::Broadcast(2));
        }
        for (i, f) in fakes.iter_mut().enumerate() {
            let n = std::iter::from_fn(|| f.1.try_recv().ok()).count();
            assert_eq!(n, if i == 1 { 0 } else { 2 }, "server {i}");
        }
        assert_eq!(
            route(&listen, &registry, &key(2), client).await,
            Routed::Limited
        );
        assert_eq!(listen.counters.cancels_limited.get(), 1);
        // A key forgotten when its session ended is unknown again.
        registry.remove(&key(1));
        assert_eq!(
            route(&listen, &registry, &key(1), [10, 0, 0, 2].into()).await,
            Routed::Broadcast(2)
        );
    }

    #[test]
    fn unknown_cancels_are_limited_per_client_and_overall() {
        let mut l = Limiter::new(CancelLimits {
            per_second: 5,
            per_client: 2,
        });
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let admitted = (0..10).filter(|_| l.admit(a, t0)).count();
        assert_eq!(admitted, 4, "burst of twice the per-client rate");
        // Half a second later one more token for `a`.
        assert!(l.admit(a, t0 + Duration::from_millis(500)));
        assert!(!l.admit(a, t0 + Duration::from_millis(500)));
        // Other clients share the process-wide bucket: 10 tokens at first, 5 used.
        let others = (2..20u8)
            .filter(|i| l.admit([10, 0, 0, *i].into(), t0 + Duration::from_millis(500)))
            .count();
        assert_eq!(others, 7, "10 + 2.5 refilled - 5 used, rounded down");
    }
}
