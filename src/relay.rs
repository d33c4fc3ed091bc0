//! Relay: copy bytes both ways between client and server until one side closes, an idle
//! timeout fires or pglb stops.
//!
//! The two directions are plain poll functions over one small state (no future per
//! direction, one timer), driven by one hand-written future: a session is a few hundred
//! bytes plus its sockets while idle.
//! Each direction waits for readiness without a buffer and holds one only while data
//! flows. Writes apply backpressure: a client that stops reading stops pglb reading from
//! its server (at most one buffer in flight per direction).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::either::Either;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

use crate::cancel::Registry;
use crate::client::Client;
use crate::counters::{Counter, StripedCounter, lock};
use crate::scanner::Scanner;
use crate::startup::CancelKey;
use crate::state::{SESSION_SIGNALS, SESSION_WAKE};

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
    /// Not an end: the server's chunk that ends with a ReadyForQuery, scanned but not
    /// yet sent, at a moment the session can move to the kernel relay.
    HandOver(Vec<u8>),
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
            End::HandOver(_) => "--",
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
            End::HandOver(_) => "handed to the kernel relay".into(),
        }
    }
}

/// Where a relay adds its byte counts: live, so stats move while sessions run.
#[derive(Clone, Copy)]
pub struct Meters<'a> {
    pub to_server: [&'a StripedCounter; 2],
    pub to_client: [&'a StripedCounter; 2],
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
    /// Server side, with hand-over armed: the chunk read ends with a ReadyForQuery that
    /// answers the last request.
    HandOver,
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

    /// Requests the server has yet to answer.
    pub fn pending(&self) -> i64 {
        self.pending.load(Relaxed)
    }

    /// Takes over the state the kernel relay's program followed while it relayed.
    pub fn resume(&self, r: &crate::kernel_relay::Resume) {
        self.pending.store(r.pending, Relaxed);
        self.at_rest.store(r.at_rest, Relaxed);
        self.status.store(r.status, Relaxed);
        self.requested.store(true, Relaxed);
        if r.opaque {
            self.opaque.store(true, Relaxed);
        }
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

/// Buffers kept per thread for the next chunk: a direction holds a buffer only while
/// bytes flow, and on small request/response traffic that is once per message, so
/// reusing them saves a 16 KiB malloc and free per message. A few cover a thread (it
/// moves one chunk at a time); the rest go back to the allocator.
const SPARE_BUFFERS: usize = 4;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(CHUNK))
}

fn give_buffer(mut buf: Vec<u8>) {
    buf.clear();
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < SPARE_BUFFERS && buf.capacity() == CHUNK {
            spare.push(buf);
        }
    });
}

/// A TCP read half: waits for readiness with no buffer, so an idle direction holds none;
/// the buffer lives only while data flows.
struct TcpSource<'a>(ReadHalf<'a>);

impl Source for TcpSource<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>) -> Poll<io::Result<usize>> {
        loop {
            if buf.capacity() == 0 {
                ready!(self.0.as_ref().poll_read_ready(cx))?;
                *buf = take_buffer();
            }
            // Through `AsyncRead` rather than `try_read`: tokio then forgets the socket's
            // readiness after a short read, so the next wait goes straight to epoll
            // instead of first paying for a recv that returns EAGAIN (one syscall in three
            // on a request/response stream).
            match poll_read_buf(Pin::new(&mut self.0), cx, buf) {
                // Nothing to read after all: wait again without the buffer.
                Poll::Pending if buf.capacity() > 0 && buf.is_empty() => {
                    give_buffer(std::mem::take(buf))
                }
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
    /// The chunk being written (empty between chunks) and how much of it is out (a
    /// chunk is at most `CHUNK` bytes).
    buf: Vec<u8>,
    written: u32,
    /// The source ended: half-closing `to`.
    eof: bool,
    /// Server side: stop at a chunk ending in a ReadyForQuery that answers every request
    /// (for the kernel relay).
    hand_over: bool,
    /// The chunk in `buf` was scanned when read (hand-over armed).
    scanned: bool,
    moved: u64,
    /// When this side last sent bytes, in ns since the relay began (fine enough that a
    /// request and the answer before it never share a tick: the idle rule blames the side
    /// that fell quiet first).
    last_read: u64,
    meters: [&'m StripedCounter; 2],
}

impl<'m, R: Source, W: AsyncWrite + Unpin> Pump<'m, R, W> {
    fn new(from: R, to: W, side: Side, meters: [&'m StripedCounter; 2]) -> Self {
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
            hand_over: false,
            scanned: false,
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
                while (self.written as usize) < self.buf.len() {
                    let rest = &self.buf[self.written as usize..];
                    match ready!(Pin::new(&mut self.to).poll_write(cx, rest)) {
                        Ok(0) => {
                            return Poll::Ready(PumpEnd::WriteError(
                                io::ErrorKind::WriteZero.into(),
                            ));
                        }
                        Ok(n) => self.written += n as u32,
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
                    if !std::mem::take(&mut self.scanned) {
                        t.server_bytes(&mut self.scanner, &self.buf);
                    }
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
                    self.last_read = epoch.elapsed().as_nanos() as u64;
                    // Client requests are counted before they can reach the server, so a
                    // ReadyForQuery is never mistaken for the answer to a later one.
                    if let (Some(t), Side::Client) = (tracker, self.side) {
                        t.client_bytes(&mut self.scanner, &self.buf);
                    }
                    if let (Some(t), true) = (tracker, self.hand_over) {
                        t.server_bytes(&mut self.scanner, &self.buf);
                        self.scanned = true;
                        if t.pending() == 0 && t.at_rest.load(Relaxed) && !t.opaque.load(Relaxed) {
                            return Poll::Ready(PumpEnd::HandOver);
                        }
                    }
                }
                Err(e) => return Poll::Ready(PumpEnd::ReadError(e)),
            }
        }
    }
}

/// What can end a session from outside, as tokens: the relay waits on them with
/// nameable futures kept inside its own state (no per-session boxing).
#[derive(Clone, Copy)]
pub struct Signals<'a> {
    /// pglb's shutdown grace is over.
    pub shutdown: &'a CancellationToken,
    /// The server was marked DOWN with shutdown-sessions.
    pub kill: &'a CancellationToken,
    /// The server is draining: the session ends at its next idle moment (plaintext), or
    /// after `drain_deadline`.
    pub drain: &'a CancellationToken,
    pub drain_deadline: Duration,
}

/// Relays until the session ends or `signals` end it. `tracker` follows the protocol of
/// plaintext sessions (None: opaque TLS bytes). A plain fn, not an `async fn`: the
/// future is the relay's own state and nothing else (an `async fn` keeps its arguments
/// beside it for the whole session). `hand_over`: end with `End::HandOver` at the first
/// moment the session can move to the kernel relay (plaintext only).
pub fn relay<'a>(
    client: &'a mut Client,
    server: &'a mut TcpStream,
    idle: Idle,
    meters: Meters<'a>,
    signals: Signals<'a>,
    tracker: Option<&'a Tracker>,
    hand_over: bool,
) -> impl Future<Output = Outcome> + 'a {
    match client {
        Client::Plain(c) => {
            let (client_r, client_w) = c.split();
            let (up, mut down) = pumps(TcpSource(client_r), client_w, server, meters);
            down.hand_over = hand_over && tracker.is_some();
            Either::Left(Run::new(up, down, idle, signals, tracker))
        }
        Client::Tls(t) => {
            // Boxed: TLS sessions are few, and the plaintext relay stays small.
            let (client_r, client_w) = tokio::io::split(t.as_mut());
            let (up, down) = pumps(StreamSource(client_r), client_w, server, meters);
            Either::Right(Box::pin(Run::new(up, down, idle, signals, tracker)))
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

pin_project_lite::pin_project! {
    /// The relay of one session, written as a plain future so that an idle session is
    /// just this state: the two pumps, one timer, and a wait on each signal. (An `async
    /// fn` with `select!` kept about twice as much per session: copies of its arguments
    /// and a future per branch.)
    #[project = RunProj]
    struct Run<'a, R1, W1, R2, W2> {
        up: Pump<'a, R1, W1>,
        down: Pump<'a, R2, W2>,
        // The client half-closed: only the server's direction is left.
        up_done: bool,
        idle: Idle,
        tracker: Option<&'a Tracker>,
        epoch: Instant,
        drain_after: Duration,
        // Set once a drain was requested: when the session must be gone.
        drain_deadline: Option<Instant>,
        // The activity point at which the drain quiet check last ran (once per point).
        drain_checked: Option<(u64, u64)>,
        // `SESSION_SIGNALS` when the tokens were last looked at, and the waker they hold.
        signals_seen: u64,
        waker: Option<Waker>,
        shutdown: &'a CancellationToken,
        kill: &'a CancellationToken,
        drain: &'a CancellationToken,
        // One timer for every deadline (idle, drain quiet, drain deadline), moved to the
        // nearest one on each poll.
        #[pin]
        timer: Sleep,
        // Woken when any session token was cancelled (`SESSION_WAKE`).
        #[pin]
        wake: Notified<'static>,
    }
}

impl<'a, R1, W1, R2, W2> Run<'a, R1, W1, R2, W2> {
    fn new(
        up: Pump<'a, R1, W1>,
        down: Pump<'a, R2, W2>,
        idle: Idle,
        signals: Signals<'a>,
        tracker: Option<&'a Tracker>,
    ) -> Self {
        let epoch = Instant::now();
        Run {
            up,
            down,
            up_done: false,
            idle,
            tracker,
            epoch,
            drain_after: signals.drain_deadline,
            drain_deadline: None,
            drain_checked: None,
            signals_seen: 0,
            waker: None,
            timer: sleep_until(epoch + idle.client.min(idle.server)),
            shutdown: signals.shutdown,
            kill: signals.kill,
            drain: signals.drain,
            wake: SESSION_WAKE.notified(),
        }
    }
}

impl<R1: Source, W1: AsyncWrite + Unpin, R2: Source, W2: AsyncWrite + Unpin> Future
    for Run<'_, R1, W1, R2, W2>
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut this = self.project();
        let end = loop {
            if let Some(end) = this.poll_signals(cx) {
                break end;
            }
            match this.poll_pumps(cx) {
                Turn::End(end) => break end,
                Turn::Again => continue,
                Turn::Waiting => {}
            }
            match this.poll_deadlines(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(end)) => break end,
                Poll::Ready(None) => {}
            }
        };
        Poll::Ready(Outcome {
            to_server: this.up.moved,
            to_client: this.down.moved,
            end,
        })
    }
}

/// What one turn of the two pumps came to.
enum Turn {
    End(End),
    /// The client half-closed: turn again with the server's direction only.
    Again,
    /// Both directions wait for the sockets.
    Waiting,
}

impl<R1: Source, W1: AsyncWrite + Unpin, R2: Source, W2: AsyncWrite + Unpin>
    RunProj<'_, '_, R1, W1, R2, W2>
{
    /// Shutdown, kill and drain. The tokens need a look only when one was cancelled
    /// since the last look (the counter moved) or when the task's waker changed; only
    /// then is the wake-up re-armed too (arming takes a lock every session shares).
    fn poll_signals(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let sent = SESSION_SIGNALS.load(SeqCst);
        let new_waker = !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if !new_waker && sent == *self.signals_seen {
            return None;
        }
        if new_waker {
            *self.waker = Some(cx.waker().clone());
        }
        *self.signals_seen = sent;
        // Armed after the counter was read and before the tokens are: a token cancelled
        // after this look moves the counter later and wakes the task (`end_sessions`).
        self.wake.set(SESSION_WAKE.notified());
        if self.wake.as_mut().poll(cx).is_ready() {
            // Another signal came in between: look again on the next poll.
            cx.waker().wake_by_ref();
        }
        if self.shutdown.is_cancelled() {
            return Some(End::Shutdown);
        }
        if self.kill.is_cancelled() {
            return Some(End::ServerDown);
        }
        if self.drain_deadline.is_none() && self.drain.is_cancelled() {
            *self.drain_deadline = Some(Instant::now() + *self.drain_after);
            if let Some(t) = self.tracker {
                t.draining.store(true, Relaxed);
            }
        }
        None
    }

    fn poll_pumps(&mut self, cx: &mut Context<'_>) -> Turn {
        let (tracker, epoch) = (*self.tracker, *self.epoch);
        if !*self.up_done {
            match self.up.poll(cx, tracker, epoch) {
                // The client half-closed: the server may still answer.
                Poll::Ready(PumpEnd::Eof) => {
                    *self.up_done = true;
                    return Turn::Again;
                }
                Poll::Ready(PumpEnd::ReadError(e)) => return Turn::End(End::ClientError(e)),
                Poll::Ready(PumpEnd::WriteError(e)) => return Turn::End(End::ServerError(e)),
                Poll::Ready(PumpEnd::Drained) => return Turn::End(End::Drained),
                Poll::Ready(PumpEnd::HandOver) => unreachable!("only the server side hands over"),
                Poll::Pending => {}
            }
        }
        match self.down.poll(cx, tracker, epoch) {
            Poll::Ready(PumpEnd::Eof) if *self.up_done => Turn::End(End::ClientClosed),
            // The server closed: the client's half is finished too.
            Poll::Ready(PumpEnd::Eof) => Turn::End(End::ServerClosed),
            Poll::Ready(PumpEnd::ReadError(e)) => Turn::End(End::ServerError(e)),
            Poll::Ready(PumpEnd::WriteError(e)) => Turn::End(End::ClientError(e)),
            Poll::Ready(PumpEnd::Drained) => Turn::End(End::Drained),
            Poll::Ready(PumpEnd::HandOver) => {
                // Only with nothing of the client's on its way to the server.
                let up = &self.up;
                if up.buf.is_empty() && !up.eof && !*self.up_done && up.scanner.at_boundary() {
                    self.down.hand_over = false;
                    // A copy of just the chunk: the session may live in the kernel for
                    // hours, and the 16 KiB buffer goes back to the pool.
                    let chunk = self.down.buf.clone();
                    give_buffer(std::mem::take(&mut self.down.buf));
                    Turn::End(End::HandOver(chunk))
                } else {
                    // Sent in user space (already scanned); armed again for the next one.
                    Turn::Again
                }
            }
            Poll::Pending => Turn::Waiting,
        }
    }

    /// Both directions wait: arms the timer for the nearest deadline. Idle means no
    /// bytes either way; the side quiet the longest is blamed and its limit applies.
    /// Ready(None): the timer fired with nothing due (turn again).
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> Poll<Option<End>> {
        let (tracker, epoch) = (*self.tracker, *self.epoch);
        let (lc, ls) = (self.up.last_read, self.down.last_read);
        let (quiet_since, limit, timeout_end) = if lc <= ls {
            (ls, self.idle.client, End::ClientTimeout)
        } else {
            (lc, self.idle.server, End::ServerTimeout)
        };
        let idle_at = epoch + Duration::from_nanos(quiet_since) + limit;
        let quiet_check = self.drain_deadline.is_some()
            && tracker.is_some()
            && *self.drain_checked != Some((lc, ls));
        let quiet_at = epoch + Duration::from_nanos(lc.max(ls)) + DRAIN_QUIET;
        let mut wake = idle_at;
        if quiet_check {
            wake = wake.min(quiet_at);
        }
        if let Some(at) = *self.drain_deadline {
            wake = wake.min(at);
        }
        // Moved earlier at once; moved later only once it fired (activity pushes the
        // idle deadline on every message, and a reset is not free): a timer that fires
        // early finds nothing due and is re-armed here.
        let armed = self.timer.deadline();
        if wake < armed || (wake > armed && self.timer.is_elapsed()) {
            self.timer.as_mut().reset(wake);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // A deadline passed with no bytes moved since it was computed.
        let now = Instant::now();
        if self.drain_deadline.is_some_and(|at| now >= at) {
            return Poll::Ready(Some(End::DrainTimeout));
        }
        if quiet_check && now >= quiet_at {
            *self.drain_checked = Some((lc, ls));
            if tracker.is_some_and(Tracker::idle) {
                return Poll::Ready(Some(End::Drained));
            }
        }
        Poll::Ready((now >= idle_at).then_some(timeout_end))
    }
}

#[cfg(test)]
mod tests {
    //! The relay between two loopback socket pairs: no PostgreSQL, paused clock for the
    //! timeouts.
    use super::*;
    use crate::state::end_sessions;
    use crate::testing::{READY_IDLE, pattern, query, socket_pair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The far ends the test drives: the client's and the server's.
    struct Ends {
        client: TcpStream,
        server: TcpStream,
    }

    #[derive(Default)]
    struct Tokens {
        shutdown: CancellationToken,
        kill: CancellationToken,
        drain: CancellationToken,
    }

    const IDLE: Idle = Idle {
        client: Duration::from_secs(30),
        server: Duration::from_secs(60),
    };

    /// Runs a relay between fresh socket pairs; the test gets the far ends and the
    /// tokens, the relay's outcome comes from the task. (Tests that move bytes run on the
    /// real clock: a paused clock jumps to the next timer whenever every task waits,
    /// bytes in flight on loopback included.)
    async fn start(
        tracked: bool,
        tokens: Arc<Tokens>,
        idle: Idle,
    ) -> (Ends, tokio::task::JoinHandle<(Outcome, Arc<Tracker>)>) {
        let (client_side, client) = socket_pair().await;
        let (mut server_side, server) = socket_pair().await;
        let task = tokio::spawn(async move {
            let counters: [StripedCounter; 4] = Default::default();
            let meters = Meters {
                to_server: [&counters[0], &counters[1]],
                to_client: [&counters[2], &counters[3]],
            };
            let signals = Signals {
                shutdown: &tokens.shutdown,
                kill: &tokens.kill,
                drain: &tokens.drain,
                drain_deadline: Duration::from_secs(300),
            };
            let tracker = Arc::new(Tracker::new(None));
            let mut client = Client::Plain(client_side);
            let t = tracked.then_some(&*tracker);
            let out = relay(
                &mut client,
                &mut server_side,
                idle,
                meters,
                signals,
                t,
                false,
            )
            .await;
            assert_eq!(counters[0].get(), out.to_server, "meters follow the bytes");
            assert_eq!(counters[2].get(), out.to_client);
            (out, tracker)
        });
        (Ends { client, server }, task)
    }

    #[tokio::test]
    async fn bytes_arrive_unchanged_both_ways_and_a_client_half_close_lets_the_server_finish() {
        let (mut ends, task) = start(false, Arc::new(Tokens::default()), IDLE).await;
        let up = pattern(3 << 20, 1);
        let down = pattern(5 << 20, 2);
        let (mut cr, mut cw) = ends.client.split();
        let (mut sr, mut sw) = ends.server.split();
        let client = async {
            write_in_pieces(&mut cw, &up, 3).await;
            cw.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.expect("read");
            got
        };
        let server = async {
            let mut got = Vec::new();
            sr.read_to_end(&mut got)
                .await
                .expect("read until the client's FIN");
            write_in_pieces(&mut sw, &down, 4).await;
            sw.shutdown().await.expect("close");
            got
        };
        let (at_client, at_server) = tokio::join!(client, server);
        assert!(at_server == up, "client → server bytes differ");
        assert!(at_client == down, "server → client bytes differ");
        let (out, _) = task.await.expect("relay");
        assert!(matches!(out.end, End::ClientClosed), "{:?}", out.end);
        assert_eq!(
            (out.to_server, out.to_client),
            (up.len() as u64, down.len() as u64)
        );
    }

    /// Writes `data` in uneven pieces, so message and read boundaries never line up.
    async fn write_in_pieces<W: AsyncWrite + Unpin>(to: &mut W, data: &[u8], seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut rest = data;
        while !rest.is_empty() {
            let n = rng.usize(1..=rest.len().min(70_000));
            to.write_all(&rest[..n]).await.expect("write");
            rest = &rest[n..];
        }
    }

    /// A client that resets its connection mid-session (a killed process, a NAT that
    /// dropped it): "client error", HAProxy's CD; the server's reset is SD.
    #[tokio::test]
    async fn a_reset_ends_the_session_as_an_error_of_the_side_that_sent_it() {
        for client_resets in [true, false] {
            let (mut ends, task) = start(false, Arc::new(Tokens::default()), IDLE).await;
            ends.client.write_all(b"Q").await.expect("write");
            let mut b = [0u8; 1];
            ends.server.read_exact(&mut b).await.expect("relayed");
            let gone = if client_resets {
                ends.client
            } else {
                ends.server
            };
            // SO_LINGER 0: the close sends an RST.
            socket2::SockRef::from(&gone)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            drop(gone);
            let (out, _) = task.await.expect("relay");
            let want = if client_resets { "CD" } else { "SD" };
            assert_eq!(out.end.code(), want, "{:?}", out.end);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_session_ends_at_the_client_idle_limit() {
        let (_ends, task) = start(false, Arc::new(Tokens::default()), IDLE).await;
        let t0 = Instant::now();
        let (out, _) = task.await.expect("relay");
        assert!(matches!(out.end, End::ClientTimeout), "{:?}", out.end);
        let waited = t0.elapsed();
        assert!(
            waited >= IDLE.client && waited < IDLE.client + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn traffic_pushes_the_idle_limit_back() {
        let idle = Idle {
            client: Duration::from_millis(300),
            server: Duration::from_millis(300),
        };
        let (mut ends, task) = start(false, Arc::new(Tokens::default()), idle).await;
        let t0 = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ends.client.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            ends.server.read_exact(&mut b).await.expect("relayed");
            ends.server.write_all(b"y").await.expect("write");
            ends.client.read_exact(&mut b).await.expect("relayed");
        }
        let (out, _) = task.await.expect("relay");
        assert!(
            matches!(out.end, End::ClientTimeout | End::ServerTimeout),
            "{:?}",
            out.end
        );
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
    }

    #[tokio::test]
    async fn a_drain_waits_for_the_transaction_to_end_then_closes_at_ready_for_query() {
        let tokens = Arc::new(Tokens::default());
        let (mut ends, task) = start(true, Arc::clone(&tokens), IDLE).await;
        // The login's ReadyForQuery, then a transaction is open ('T').
        ends.server.write_all(&READY_IDLE).await.expect("write");
        ends.client.write_all(&query("BEGIN")).await.expect("write");
        let mut q = vec![0u8; query("BEGIN").len()];
        ends.server.read_exact(&mut q).await.expect("relayed");
        ends.server
            .write_all(&[b'Z', 0, 0, 0, 5, b'T'])
            .await
            .expect("write");
        end_sessions(&tokens.drain);
        // Past the quiet check (DRAIN_QUIET): busy, so it stays.
        tokio::time::sleep(DRAIN_QUIET * 2).await;
        assert!(
            !task.is_finished(),
            "inside a transaction: the session stays"
        );
        ends.client
            .write_all(&query("COMMIT"))
            .await
            .expect("write");
        let mut q = vec![0u8; query("COMMIT").len()];
        ends.server.read_exact(&mut q).await.expect("relayed");
        ends.server.write_all(&READY_IDLE).await.expect("write");
        let (out, tracker) = task.await.expect("relay");
        assert!(matches!(out.end, End::Drained), "{:?}", out.end);
        assert!(tracker.idle());
        // The client got every ReadyForQuery, the last one included.
        let mut got = vec![0u8; 18];
        ends.client.read_exact(&mut got).await.expect("bytes");
        assert_eq!(&got[12..], &READY_IDLE);
    }

    #[tokio::test]
    async fn a_server_marked_down_or_shutdown_ends_a_waiting_session() {
        type Pick = fn(&Tokens) -> &CancellationToken;
        let cases: [(Pick, &str); 2] = [(|t| &t.kill, "ServerDown"), (|t| &t.shutdown, "Shutdown")];
        for (token, want) in cases {
            let tokens = Arc::new(Tokens::default());
            let (_ends, task) = start(true, Arc::clone(&tokens), IDLE).await;
            // The relay is waiting for bytes by now: the signal has to wake it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!task.is_finished());
            end_sessions(token(&tokens));
            let (out, _) = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("woken")
                .expect("relay");
            assert_eq!(format!("{:?}", out.end), want);
        }
    }
}
