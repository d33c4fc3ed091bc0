//! Socket set-up shared by the listeners, the server connections and the health checks.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpStream;

/// Keepalive probes find dead peers (a VM gone, a cable pulled) long before idle timeouts.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Latency over throughput: PostgreSQL messages are small and interactive.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    SockRef::from(stream).set_tcp_keepalive(&keepalive())
}

/// A non-blocking listening socket not yet tied to a runtime: each worker takes its own
/// descriptor for it (`try_clone`) and accepts from the one queue.
///
/// The relaying options are set here once: Linux copies TCP_NODELAY and the keepalive
/// settings from the listening socket to every connection it accepts, which saves five
/// setsockopt calls per client (`accepted_connections_inherit_relay_options`).
pub fn bind_std(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Connects within `timeout`, tuned for relaying.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))??;
    tune(&stream)?;
    Ok(stream)
}

/// The soft open-files limit of this process (from /proc: no libc call needed).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// Descriptors pglb needs at `maxconn` sessions: two per session (client and server),
/// one per health check, and some for listeners, stats and alerts.
pub fn descriptors_needed(maxconn: usize, servers: usize) -> u64 {
    2 * maxconn as u64 + servers as u64 + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_relay_options() {
        let listener = bind_std("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
        let listener = tokio::net::TcpListener::from_std(listener).expect("runtime");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sock = SockRef::from(&accepted);
        assert!(accepted.nodelay().expect("nodelay"), "TCP_NODELAY");
        assert!(sock.keepalive().expect("keepalive"), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(60)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("intvl"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("cnt"), 6);
    }
}
