//! Relay: copy bytes both ways between client and server until one side closes, an idle
//! timeout fires or pglb stops.
//!
//! The two directions are plain poll functions over one small state (no future per
//! direction, one timer): a session is a few hundred bytes plus its sockets while idle.
//! Each direction waits for readiness without a buffer and holds one only while data
//! flows. Writes apply backpressure: a client that stops reading stops pglb reading from
//! its server (at most one buffer in flight per direction).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

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

#[derive(Debug)]
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
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// A source of chunks for a pump.
trait Source {
    /// Reads the next chunk into `buf` (0 at EOF). May allocate `buf` lazily and free it
    /// while waiting.
    fn poll_chunk(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<usize>>;
}

/// A TCP read half: waits for readiness with no buffer, so an idle direction holds none;
/// the buffer lives only while data flows.
struct TcpSource<'a>(ReadHalf<'a>);

impl Source for TcpSource<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<usize>> {
        loop {
            if buf.capacity() == 0 {
                ready!(self.0.as_ref().poll_read_ready(cx))?;
                buf.reserve(CHUNK);
            }
            // Through `AsyncRead` rather than `try_read`: tokio then forgets the socket's
            // readiness after a short read, so the next wait goes straight to epoll
            // instead of first paying for a recv that returns EAGAIN (one syscall in three
            // on a request/response stream).
            match poll_read_buf(Pin::new(&mut self.0), cx, buf) {
                // Nothing to read after all: wait again without the buffer.
                Poll::Pending if buf.capacity() > 0 && buf.is_empty() => *buf = Vec::new(),
                other => return other,
            }
        }
    }
}

/// Any other stream (TLS): TLS keeps buffers of its own, so one more is no loss.
struct StreamSource<R>(R);

impl<R: AsyncRead + Unpin> Source for StreamSource<R> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<usize>> {
        if buf.capacity() == 0 {
            buf.reserve(CHUNK);
        }
        poll_read_buf(Pin::new(&mut self.0), cx, buf)
    }
}

/// One direction: read a chunk, write all of it, repeat; at EOF half-close the other
/// side so the peer sees the FIN.
struct Pump<'m, R, W> {
    from: R,
    to: W,
    side: Side,
    scanner: Scanner,
    /// The chunk being written (empty between chunks) and how much of it is out.
    buf: Vec<u8>,
    written: usize,
    /// The source ended: half-closing `to`.
    eof: bool,
    moved: u64,
    /// When this side last sent bytes, in ms since the relay began.
    last_read: u64,
    meters: [&'m AtomicU64; 2],
}

impl<'m, R: Source, W: AsyncWrite + Unpin> Pump<'m, R, W> {
    fn new(from: R, to: W, side: Side, meters: [&'m AtomicU64; 2]) -> Self {
        let scanner = match side {
            Side::Client => Scanner::frontend(),
            Side::Server => Scanner::backend(),
        };
        Pump {
            from,
            to,
            side,
            scanner,
            buf: Vec::new(),
            written: 0,
            eof: false,
            moved: 0,
            last_read: 0,
            meters,
        }
    }

    /// Moves bytes until this direction has to wait (Pending) or is over (Ready).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tracker: Option<&Tracker>,
        epoch: Instant,
    ) -> Poll<PumpEnd> {
        loop {
            if self.eof {
                // Ends the direction whether or not the half-close worked: nothing more
                // can be sent either way.
                let _ = ready!(Pin::new(&mut self.to).poll_shutdown(cx));
                return Poll::Ready(PumpEnd::Eof);
            }
            if !self.buf.is_empty() {
                while self.written < self.buf.len() {
                    match ready!(Pin::new(&mut self.to).poll_write(cx, &self.buf[self.written..])) {
                        Ok(0) => {
                            return Poll::Ready(PumpEnd::WriteError(
                                io::ErrorKind::WriteZero.into(),
                            ));
                        }
                        Ok(n) => self.written += n,
                        Err(e) => return Poll::Ready(PumpEnd::WriteError(e)),
                    }
                }
                if let Err(e) = ready!(Pin::new(&mut self.to).poll_flush(cx)) {
                    return Poll::Ready(PumpEnd::WriteError(e));
                }
                let n = self.buf.len() as u64;
                self.moved += n;
                for m in self.meters {
                    m.add(n);
                }
                if let (Some(t), Side::Server) = (tracker, self.side) {
                    t.server_bytes(&mut self.scanner, &self.buf);
                    // A transaction just ended: the first safe moment to close. (Not the
                    // ReadyForQuery that ends the login: the client is about to use its
                    // new session; the quiet check in `relay` handles it.)
                    if t.draining.load(Relaxed) && t.requested.load(Relaxed) && t.idle() {
                        return Poll::Ready(PumpEnd::Drained);
                    }
                }
                self.buf.clear();
                self.written = 0;
            }
            match ready!(self.from.poll_chunk(cx, &mut self.buf)) {
                Ok(0) => self.eof = true,
                Ok(_) => {
                    self.last_read = epoch.elapsed().as_millis() as u64;
                    // Client requests are counted before they can reach the server, so a
                    // ReadyForQuery is never mistaken for the answer to a later one.
                    if let (Some(t), Side::Client) = (tracker, self.side) {
                        t.client_bytes(&mut self.scanner, &self.buf);
                    }
                }
                Err(e) => return Poll::Ready(PumpEnd::ReadError(e)),
            }
        }
    }
}

/// What can end a session from outside. Passed as handles, not futures: the futures are
/// made once, inside the relay, which keeps every session's state small.
pub struct Signals<'a> {
    /// pglb's shutdown grace is over.
    pub shutdown: &'a CancellationToken,
    /// Changes when the server is marked DOWN with shutdown-sessions.
    pub kill: watch::Receiver<u64>,
    /// True while the server is draining: the session ends at its next idle moment
    /// (plaintext), or after `drain_deadline`.
    pub draining: watch::Receiver<bool>,
    pub drain_deadline: Duration,
}

/// Relays until the session ends or `signals` end it. `tracker` follows the protocol of
/// plaintext sessions (None: opaque TLS bytes).
pub async fn relay(
    client: &mut Client,
    server: &mut TcpStream,
    idle: Idle,
    meters: Meters<'_>,
    signals: Signals<'_>,
    tracker: Option<&Tracker>,
) -> Outcome {
    match client {
        Client::Plain(c) => {
            let (client_r, client_w) = c.split();
            let (up, down) = pumps(TcpSource(client_r), client_w, server, meters);
            run(up, down, idle, signals, tracker).await
        }
        Client::Tls(t) => {
            // Boxed: TLS sessions are few, and the plaintext relay stays small.
            let (client_r, client_w) = tokio::io::split(t.as_mut());
            let (up, down) = pumps(StreamSource(client_r), client_w, server, meters);
            Box::pin(run(up, down, idle, signals, tracker)).await
        }
    }
}

type Pumps<'m, 's, R, W> = (Pump<'m, R, WriteHalf<'s>>, Pump<'m, TcpSource<'s>, W>);

/// The two directions between a client's halves and the server.
fn pumps<'m, 's, R: Source, W: AsyncWrite + Unpin>(
    client_r: R,
    client_w: W,
    server: &'s mut TcpStream,
    meters: Meters<'m>,
) -> Pumps<'m, 's, R, W> {
    let (server_r, server_w) = server.split();
    (
        Pump::new(client_r, server_w, Side::Client, meters.to_server),
        Pump::new(
            TcpSource(server_r),
            client_w,
            Side::Server,
            meters.to_client,
        ),
    )
}

/// Which pump finished, and how.
enum Event {
    Up(PumpEnd),
    Down(PumpEnd),
}

async fn run<R1: Source, W1: AsyncWrite + Unpin, R2: Source, W2: AsyncWrite + Unpin>(
    mut up: Pump<'_, R1, W1>,
    mut down: Pump<'_, R2, W2>,
    idle: Idle,
    signals: Signals<'_>,
    tracker: Option<&Tracker>,
) -> Outcome {
    let epoch = Instant::now();
    let mut up_done = false;
    let Signals {
        shutdown,
        mut kill,
        mut draining,
        drain_deadline: drain_after,
    } = signals;
    let stop = async {
        tokio::select! {
            _ = shutdown.cancelled() => End::Shutdown,
            _ = kill.changed() => End::ServerDown,
        }
    };
    let drain_requested = async {
        if draining.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    // One timer for every deadline (idle, drain quiet, drain deadline), reset when the
    // loop goes round: a fired timer re-checks against the latest activity.
    let timer = sleep_until(epoch + idle.client.min(idle.server));
    tokio::pin!(stop, drain_requested, timer);
    let mut drain_deadline: Option<Instant> = None;
    // The activity point at which the drain quiet check last ran (it runs once per point).
    let mut drain_checked: Option<(u64, u64)> = None;

    let end = loop {
        // Idle means no bytes in either direction; the side quiet the longest is blamed
        // and its timeout applies.
        let (lc, ls) = (up.last_read, down.last_read);
        let (quiet_since, limit, timeout_end) = if lc <= ls {
            (ls, idle.client, End::ClientTimeout)
        } else {
            (lc, idle.server, End::ServerTimeout)
        };
        let idle_at = epoch + Duration::from_millis(quiet_since) + limit;
        let quiet_check =
            drain_deadline.is_some() && tracker.is_some() && drain_checked != Some((lc, ls));
        let quiet_at = epoch + Duration::from_millis(lc.max(ls)) + DRAIN_QUIET;
        let mut wake = idle_at;
        if quiet_check {
            wake = wake.min(quiet_at);
        }
        if let Some(at) = drain_deadline {
            wake = wake.min(at);
        }
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }
        let io = poll_fn(|cx| {
            if !up_done {
                if let Poll::Ready(e) = up.poll(cx, tracker, epoch) {
                    return Poll::Ready(Event::Up(e));
                }
            }
            down.poll(cx, tracker, epoch).map(Event::Down)
        });
        tokio::select! {
            event = io => match event {
                // The client half-closed: the server may still answer.
                Event::Up(PumpEnd::Eof) => up_done = true,
                Event::Up(PumpEnd::ReadError(e)) => break End::ClientError(e),
                Event::Up(PumpEnd::WriteError(e)) => break End::ServerError(e),
                Event::Down(PumpEnd::Eof) if up_done => break End::ClientClosed,
                // The server closed: the client's half is finished too.
                Event::Down(PumpEnd::Eof) => break End::ServerClosed,
                Event::Down(PumpEnd::ReadError(e)) => break End::ServerError(e),
                Event::Down(PumpEnd::WriteError(e)) => break End::ClientError(e),
                Event::Up(PumpEnd::Drained) | Event::Down(PumpEnd::Drained) => break End::Drained,
            },
            _ = &mut drain_requested, if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + drain_after);
                if let Some(t) = tracker {
                    t.draining.store(true, Relaxed);
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if drain_deadline.is_some_and(|at| now >= at) {
                    break End::DrainTimeout;
                }
                // Activity may have happened while the timer ran: go by the latest.
                let still = up.last_read == lc && down.last_read == ls;
                if quiet_check && still && now >= quiet_at {
                    drain_checked = Some((lc, ls));
                    if tracker.is_some_and(Tracker::idle) {
                        break End::Drained;
                    }
                }
                if still && now >= idle_at {
                    break timeout_end;
                }
            }
            end = &mut stop => break end,
        }
    };
    Outcome {
        to_server: up.moved,
        to_client: down.moved,
        end,
    }
}
