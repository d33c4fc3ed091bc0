//! CancelRequests. A cancel arrives on a fresh connection carrying the (pid, secret) key of
//! the session to cancel; only the server that issued the key acts on it, the others
//! ignore it. Sending it to every usable server therefore reaches the right one, where a
//! plain TCP balancer would pick one server at random and lose most cancels.

use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::net;
use crate::startup::CancelKey;
use crate::state::ListenState;

/// How long a server may take to act on a cancel before pglb hangs up.
const LINGER: Duration = Duration::from_secs(5);

/// Sends the cancel to every server that is up; returns how many received it.
pub async fn forward(listen: &Arc<ListenState>, key: &CancelKey) -> usize {
    let packet: Arc<[u8]> = key.to_packet().into();
    let timeout = listen.cfg.timeouts.connect;
    let mut sends = JoinSet::new();
    for server in listen.servers.iter().filter(|s| s.is_up()) {
        let (addr, packet) = (server.cfg.addr, Arc::clone(&packet));
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
