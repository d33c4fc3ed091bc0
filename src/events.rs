//! Server state changes, published for whoever watches: the stats page and the alerter.

use std::time::SystemTime;

use tokio::sync::broadcast;

/// One change of a server's (or a listen's) state.
#[derive(Debug, Clone)]
pub struct Event {
    pub listen: String,
    /// None for listen-wide events ("no server available").
    pub server: Option<String>,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub at: SystemTime,
}

/// A channel sized for bursts of changes; slow consumers lose the oldest, never block
/// the proxy.
pub fn channel() -> broadcast::Sender<Event> {
    broadcast::Sender::new(1024)
}
