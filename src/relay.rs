//! Relay: copy bytes both ways between client and server until one side closes, an idle
//! timeout fires or pglb stops.
//!
//! Each direction waits for readiness without a buffer and borrows one only while data
//! flows, so an idle session costs no buffer memory. Writes apply backpressure: a client
//! that stops reading stops pglb reading from its server (at most one buffer in flight).

use std::future::Future;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until};

use crate::state::Counter;

/// Largest chunk moved per read.
const CHUNK: usize = 16 * 1024;

/// How a relayed session ended.
#[derive(Debug)]
pub enum End {
    ClientClosed,
    ServerClosed,
    ClientTimeout,
    ServerTimeout,
    ClientError(io::Error),
    ServerError(io::Error),
    /// pglb's shutdown grace ran out.
    Shutdown,
    /// The server was marked DOWN and its sessions are shut down.
    ServerDown,
}

impl End {
    /// HAProxy-style two-letter termination state (who, phase): `--` is a normal close.
    pub fn code(&self) -> &'static str {
        match self {
            End::ClientClosed | End::ServerClosed => "--",
            End::ClientTimeout => "cD",
            End::ServerTimeout => "sD",
            End::ClientError(_) => "CD",
            End::ServerError(_) => "SD",
            End::Shutdown => "KD",
            End::ServerDown => "SK",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            End::ClientClosed => "client closed".into(),
            End::ServerClosed => "server closed".into(),
            End::ClientTimeout => "client idle timeout".into(),
            End::ServerTimeout => "server idle timeout".into(),
            End::ClientError(e) => format!("client error: {e}"),
            End::ServerError(e) => format!("server error: {e}"),
            End::Shutdown => "closed by shutdown".into(),
            End::ServerDown => "server marked down: session shut down".into(),
        }
    }
}

/// Where a relay adds its byte counts: live, so stats move while sessions run.
pub struct Meters<'a> {
    pub to_server: [&'a AtomicU64; 2],
    pub to_client: [&'a AtomicU64; 2],
}

/// Idle limits per side.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub client: Duration,
    pub server: Duration,
}

/// Bytes moved and how the session ended.
#[derive(Debug)]
pub struct Outcome {
    pub to_server: u64,
    pub to_client: u64,
    pub end: End,
}

enum PumpEnd {
    Eof,
    ReadError(io::Error),
    WriteError(io::Error),
}

/// Copies `from` → `to` until EOF, then half-closes `to` so the peer sees the FIN.
async fn pump(
    from: &ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    moved: &AtomicU64,
    last_read: &AtomicU64,
    epoch: Instant,
    meters: [&AtomicU64; 2],
) -> PumpEnd {
    loop {
        if let Err(e) = from.readable().await {
            return PumpEnd::ReadError(e);
        }
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return PumpEnd::Eof;
                }
                Ok(n) => {
                    last_read.store(epoch.elapsed().as_millis() as u64, Relaxed);
                    if let Err(e) = to.write_all(&buf[..n]).await {
                        return PumpEnd::WriteError(e);
                    }
                    moved.add(n as u64);
                    for m in meters {
                        m.add(n as u64);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return PumpEnd::ReadError(e),
            }
        }
        // `buf` is dropped here: an idle direction holds no buffer.
    }
}

/// Relays until the session ends. `stop` completes with the reason when pglb must close
/// the session (shutdown grace over, server marked down with shutdown-sessions).
pub async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    idle: Idle,
    meters: Meters<'_>,
    stop: impl Future<Output = End>,
) -> Outcome {
    let epoch = Instant::now();
    let (to_server, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
    let (last_client, last_server) = (AtomicU64::new(0), AtomicU64::new(0));
    let (client_r, mut client_w) = client.split();
    let (server_r, mut server_w) = server.split();
    let upstream = pump(
        &client_r,
        &mut server_w,
        &to_server,
        &last_client,
        epoch,
        meters.to_server,
    );
    let downstream = pump(
        &server_r,
        &mut client_w,
        &to_client,
        &last_server,
        epoch,
        meters.to_client,
    );
    tokio::pin!(upstream, downstream, stop);
    let (mut up_done, mut down_done) = (false, false);

    let end = loop {
        // Idle means no bytes in either direction; the side quiet the longest is blamed
        // and its timeout applies.
        let (lc, ls) = (last_client.load(Relaxed), last_server.load(Relaxed));
        let (quiet_since, limit, timeout_end) = if lc <= ls {
            (ls, idle.client, End::ClientTimeout)
        } else {
            (lc, idle.server, End::ServerTimeout)
        };
        let deadline = epoch + Duration::from_millis(quiet_since) + limit;
        tokio::select! {
            r = &mut upstream, if !up_done => match r {
                PumpEnd::Eof if down_done => break End::ClientClosed,
                PumpEnd::Eof => up_done = true,
                PumpEnd::ReadError(e) => break End::ClientError(e),
                PumpEnd::WriteError(e) => break End::ServerError(e),
            },
            r = &mut downstream, if !down_done => match r {
                PumpEnd::Eof if up_done => break End::ClientClosed,
                PumpEnd::Eof => down_done = true,
                PumpEnd::ReadError(e) => break End::ServerError(e),
                PumpEnd::WriteError(e) => break End::ClientError(e),
            },
            _ = sleep_until(deadline) => {
                // Activity may have happened while we slept: only end if still idle.
                if last_client.load(Relaxed) == lc && last_server.load(Relaxed) == ls {
                    break timeout_end;
                }
            }
            end = &mut stop => break end,
        }
        if down_done && !up_done {
            // The server closed: the client's half is finished too.
            break End::ServerClosed;
        }
    };
    Outcome {
        to_server: to_server.load(Relaxed),
        to_client: to_client.load(Relaxed),
        end,
    }
}
