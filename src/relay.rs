//! Relay: copy bytes both ways between client and server until one side closes, an idle
//! timeout fires or pglb stops.
//!
//! Each direction waits for readiness without a buffer and borrows one only while data
//! flows, so an idle session costs no buffer memory. Writes apply backpressure: a client
//! that stops reading stops pglb reading from its server (at most one buffer in flight).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;
use tokio::time::{Instant, sleep_until};

use crate::backend::Scanner;
use crate::cancel::Registry;
use crate::client::Client;
use crate::startup::CancelKey;
use crate::state::{Counter, lock};

/// Largest chunk moved per read.
const CHUNK: usize = 16 * 1024;

/// A drained session idle this long is closed even without finishing a transaction
/// (an idle pooled connection); shorter, it is probably about to be used.
const DRAIN_QUIET: Duration = Duration::from_millis(500);

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
    /// Drained at a transaction boundary (the client gets FATAL 57P01).
    Drained,
    /// Still busy when the drain deadline came.
    DrainTimeout,
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
            End::Drained => "PD",
            End::DrainTimeout => "pD",
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
            End::Drained => "drained at a transaction boundary".into(),
            End::DrainTimeout => "drain deadline reached".into(),
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
    /// Draining, and the session just became idle outside a transaction.
    Drained,
}

/// Protocol tracking of a plaintext session, shared by the two directions of its relay:
/// the cancel key, and whether the session is idle outside a transaction (all requests
/// answered, last ReadyForQuery said `I`, nothing sent since) — the only moment a drain
/// may close it without losing work.
#[derive(Debug)]
pub struct Tracker {
    /// Requests awaiting their ReadyForQuery; the startup counts as one.
    pending: AtomicI64,
    /// The server's last bytes ended with a ReadyForQuery.
    at_rest: AtomicBool,
    /// Status byte of the last ReadyForQuery.
    status: AtomicU8,
    /// A scanner gave up: the session is treated as opaque bytes.
    opaque: AtomicBool,
    /// A drain was requested.
    draining: AtomicBool,
    /// The client has sent at least one request since the startup.
    requested: AtomicBool,
    /// The key learnt from BackendKeyData.
    pub key: Mutex<Option<CancelKey>>,
    /// Where learnt keys are registered for cancel routing, with this session's server.
    registry: Option<(Arc<Registry>, SocketAddr)>,
}

impl Tracker {
    pub fn new(registry: Option<(Arc<Registry>, SocketAddr)>) -> Self {
        Tracker {
            pending: AtomicI64::new(1),
            at_rest: AtomicBool::new(false),
            status: AtomicU8::new(0),
            opaque: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            key: Mutex::new(None),
            registry,
        }
    }

    /// Idle outside a transaction, at a message boundary in both directions.
    pub fn idle(&self) -> bool {
        !self.opaque.load(Relaxed)
            && self.pending.load(Relaxed) == 0
            && self.at_rest.load(Relaxed)
            && self.status.load(Relaxed) == b'I'
    }

    fn client_bytes(&self, scanner: &mut Scanner, data: &[u8]) {
        let seen = scanner.feed(data);
        if scanner.lost() {
            self.opaque.store(true, Relaxed);
        }
        if seen.requests > 0 {
            self.pending.fetch_add(i64::from(seen.requests), Relaxed);
            self.requested.store(true, Relaxed);
        }
        self.at_rest.store(false, Relaxed);
    }

    fn server_bytes(&self, scanner: &mut Scanner, data: &[u8]) {
        let seen = scanner.feed(data);
        if scanner.lost() {
            self.opaque.store(true, Relaxed);
        }
        if let Some(key) = seen.key {
            if let Some((registry, addr)) = &self.registry {
                registry.insert(key.clone(), *addr);
            }
            *lock(&self.key) = Some(key);
        }
        if seen.readies > 0 {
            self.pending.fetch_sub(i64::from(seen.readies), Relaxed);
        }
        if let Some(status) = seen.ready {
            self.status.store(status, Relaxed);
        }
        self.at_rest.store(seen.ready.is_some(), Relaxed);
    }
}

/// Which side a pump reads, for protocol tracking.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// A source of chunks for a pump.
trait Source {
    /// Reads the next chunk into `buf` (0 at EOF). May allocate `buf` lazily and free it
    /// while waiting.
    fn next_chunk(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<usize>> + Send;
}

/// A TCP read half: waits for readiness with no buffer, so an idle direction holds none;
/// the buffer lives only while data flows.
struct TcpSource<'a>(ReadHalf<'a>);

impl Source for TcpSource<'_> {
    async fn next_chunk(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            if buf.capacity() > 0 {
                buf.clear();
                match self.0.try_read_buf(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => *buf = Vec::new(),
                    Err(e) => return Err(e),
                }
            }
            self.0.readable().await?;
            buf.reserve(CHUNK);
        }
    }
}

/// Any other stream (TLS): TLS keeps buffers of its own, so one more is no loss.
struct StreamSource<R>(R);

impl<R: AsyncRead + Unpin + Send> Source for StreamSource<R> {
    async fn next_chunk(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.clear();
        buf.reserve(CHUNK);
        self.0.read_buf(buf).await
    }
}

/// Copies `from` → `to` until EOF, then half-closes `to` so the peer sees the FIN.
#[allow(clippy::too_many_arguments)] // one call site per direction, all of it needed
async fn pump<W: AsyncWrite + Unpin>(
    mut from: impl Source,
    to: &mut W,
    moved: &AtomicU64,
    last_read: &AtomicU64,
    epoch: Instant,
    meters: [&AtomicU64; 2],
    tracker: Option<&Tracker>,
    side: Side,
) -> PumpEnd {
    let mut scanner = match side {
        Side::Client => Scanner::frontend(),
        Side::Server => Scanner::backend(),
    };
    let mut buf = Vec::new();
    loop {
        let n = match from.next_chunk(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return PumpEnd::Eof;
            }
            Ok(n) => n,
            Err(e) => return PumpEnd::ReadError(e),
        };
        last_read.store(epoch.elapsed().as_millis() as u64, Relaxed);
        // Client requests are counted before they can reach the server, so a
        // ReadyForQuery is never mistaken for the answer to a later one.
        if let (Some(t), Side::Client) = (tracker, side) {
            t.client_bytes(&mut scanner, &buf[..n]);
        }
        if let Err(e) = to.write_all(&buf[..n]).await {
            return PumpEnd::WriteError(e);
        }
        moved.add(n as u64);
        for m in meters {
            m.add(n as u64);
        }
        if let (Some(t), Side::Server) = (tracker, side) {
            t.server_bytes(&mut scanner, &buf[..n]);
            // A transaction just ended: the first safe moment to close. (Not the
            // ReadyForQuery that ends the login: the client is about to use its new
            // session; the quiet check in `relay` handles it.)
            if t.draining.load(Relaxed) && t.requested.load(Relaxed) && t.idle() {
                return PumpEnd::Drained;
            }
        }
    }
}

/// How a drain reaches a session: `requested` completes when the server is set to drain;
/// the session then ends at its next idle moment (plaintext), or at `deadline`.
pub struct Drain<F> {
    pub requested: F,
    pub deadline: Duration,
}

/// Relays until the session ends. `stop` completes with the reason when pglb must close
/// the session (shutdown grace over, server marked down with shutdown-sessions).
/// `tracker` follows the protocol of plaintext sessions (None: opaque TLS bytes).
pub async fn relay(
    client: &mut Client,
    server: &mut TcpStream,
    idle: Idle,
    meters: Meters<'_>,
    stop: impl Future<Output = End>,
    tracker: Option<&Tracker>,
    drain: Drain<impl Future<Output = ()>>,
) -> Outcome {
    match client {
        Client::Plain(c) => {
            let (r, w) = c.split();
            relay_halves(TcpSource(r), w, server, idle, meters, stop, tracker, drain).await
        }
        Client::Tls(t) => {
            let (r, w) = tokio::io::split(t.as_mut());
            relay_halves(
                StreamSource(r),
                w,
                server,
                idle,
                meters,
                stop,
                tracker,
                drain,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)] // `relay`'s arguments, with the client split
async fn relay_halves<W: AsyncWrite + Unpin>(
    client_r: impl Source,
    mut client_w: W,
    server: &mut TcpStream,
    idle: Idle,
    meters: Meters<'_>,
    stop: impl Future<Output = End>,
    tracker: Option<&Tracker>,
    drain: Drain<impl Future<Output = ()>>,
) -> Outcome {
    let epoch = Instant::now();
    let (to_server, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
    let (last_client, last_server) = (AtomicU64::new(0), AtomicU64::new(0));
    let (server_r, mut server_w) = server.split();
    let upstream = pump(
        client_r,
        &mut server_w,
        &to_server,
        &last_client,
        epoch,
        meters.to_server,
        tracker,
        Side::Client,
    );
    let downstream = pump(
        TcpSource(server_r),
        &mut client_w,
        &to_client,
        &last_server,
        epoch,
        meters.to_client,
        tracker,
        Side::Server,
    );
    let drain_requested = drain.requested;
    tokio::pin!(upstream, downstream, stop, drain_requested);
    let (mut up_done, mut down_done) = (false, false);
    let mut drain_deadline: Option<Instant> = None;
    // The activity point at which the drain quiet check last ran (it runs once per point).
    let mut drain_checked: Option<(u64, u64)> = None;

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
                PumpEnd::Drained => break End::Drained,
            },
            r = &mut downstream, if !down_done => match r {
                PumpEnd::Eof if up_done => break End::ClientClosed,
                PumpEnd::Eof => down_done = true,
                PumpEnd::ReadError(e) => break End::ServerError(e),
                PumpEnd::WriteError(e) => break End::ClientError(e),
                PumpEnd::Drained => break End::Drained,
            },
            _ = &mut drain_requested, if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + drain.deadline);
                if let Some(t) = tracker {
                    t.draining.store(true, Relaxed);
                }
            }
            _ = sleep_until(epoch + Duration::from_millis(lc.max(ls)) + DRAIN_QUIET),
                if drain_deadline.is_some() && tracker.is_some() && drain_checked != Some((lc, ls)) => {
                drain_checked = Some((lc, ls));
                let quiet = last_client.load(Relaxed) == lc && last_server.load(Relaxed) == ls;
                if quiet && tracker.is_some_and(Tracker::idle) {
                    break End::Drained;
                }
            }
            _ = sleep_until(drain_deadline.unwrap_or(epoch)), if drain_deadline.is_some() => break End::DrainTimeout,
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
