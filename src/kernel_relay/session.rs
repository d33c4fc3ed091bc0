//! A session relayed in the kernel: the hand-over after a ReadyForQuery, then pglb
//! only watches — for a close on either side, the session signals, idle limits — and
//! moves the BPF program's byte counts into the stats.
//!
//! Bytes the kernel has queued for a socket are dropped if that socket closes or leaves
//! the map, and anything pglb writes itself must come after them. So before passing on
//! a half-close, writing a message of its own, or handing the session back, pglb waits
//! until the receiving socket's acknowledged bytes (TCP_INFO) reach what pglb wrote to it
//! before the hand-over plus what the kernel redirected into it since.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};

use super::hangups::Watch;
use super::maps::{C_DRAIN, C_PASS, Flow, Loaded, Pair};
use super::tcp_info;
use crate::counters::Counter;
use crate::relay::{End, Idle, Meters, Signals};
use crate::state::SESSION_WAKE;

/// How often a relayed session's byte counts reach the stats while bytes move; a quiet
/// session looks less and less often, up to `STATS_QUIET` (nothing to count).
const STATS_EVERY: Duration = Duration::from_secs(2);
const STATS_QUIET: Duration = Duration::from_secs(32);

/// While a drain is pending, how often pglb looks at the session's framing state even
/// without traffic (for the quiet check; traffic wakes it at once, see `signalled`).
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// A drained session idle this long is closed without waiting for a transaction to end
/// (as in the user-space relay).
const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// How long a verdict that read the control word before pglb changed it may still be
/// redirecting (it runs in softirq context: microseconds).
const VERDICT_GRACE: Duration = Duration::from_millis(2);

/// How long the hand-over waits for the bytes pglb wrote to be acknowledged.
const SETTLE: Duration = Duration::from_millis(200);

/// Why a session stayed in (or came back to) the user-space relay at its hand-over.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    #[error("bytes still in flight: {0}")]
    Unsettled(&'static str),
    #[error("the {0} sent bytes before its turn")]
    Ahead(&'static str),
    #[error("socket map: {0}")]
    Map(io::Error),
    #[error("TCP_INFO: {0}")]
    Info(io::Error),
    #[error("watching for hang-ups: {0}")]
    Watch(io::Error),
    #[error("moving the sockets out of the event loop: {0}")]
    Reactor(io::Error),
}

/// A session in the kernel relay: its sockets are out of tokio's reactor (see
/// `hangups`). Dropping it forgets the session's flows (its sockets leave the map when
/// they close).
pub struct Relayed<'a> {
    kernel: &'static Loaded,
    pair: Pair,
    client: &'a TcpStream,
    server: &'a TcpStream,
    hangups: Watch<'a>,
    /// Bytes pglb itself wrote to each socket (acknowledged at the hand-over, plus the
    /// ReadyForQuery written after it).
    wrote_client: u64,
    wrote_server: u64,
    start_ns: u64,
}

impl Drop for Relayed<'_> {
    fn drop(&mut self) {
        self.kernel.forget_flows(self.pair);
    }
}

/// Where the user-space relay picks up a session the kernel handed back.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Requests the server has yet to answer.
    pub pending: i64,
    pub at_rest: bool,
    pub status: u8,
    /// The framing can't be carried over (lost, or a message half through).
    pub opaque: bool,
    /// Handed back for a drain, idle outside a transaction: the session ends here.
    pub drained: bool,
}

/// What came of a session's time in the kernel.
#[derive(Debug)]
pub enum Watched {
    Ended(End),
    Back(Resume),
}

/// Bytes the kernel moved for a session: to its server, to its client.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_server: u64,
    pub to_client: u64,
}

/// Puts a session into the kernel relay. `ready` is the server's chunk that ends with
/// the ReadyForQuery (read, not yet forwarded): the client has nothing to send before
/// it, so no client byte can be in flight while the sockets enter the map; it is written
/// once they are in. `pending` is the requests still unanswered (normally 0).
pub async fn hand_over<'a>(
    kernel: &'static Loaded,
    client: &'a TcpStream,
    server: &'a TcpStream,
    ready: &[u8],
    pending: u64,
) -> Result<Relayed<'a>, HandOverError> {
    let (sent_client, sent_server) = settle(client, server).await?;
    if has_unread(client) {
        return Err(HandOverError::Ahead("client"));
    }
    if has_unread(server) {
        return Err(HandOverError::Ahead("server"));
    }
    let hangups = Watch::new(client, server).map_err(HandOverError::Watch)?;
    let pair = kernel
        .insert(client, server, pending)
        .map_err(HandOverError::Map)?;
    // A byte that came between the look and the insert would wait in the queue unseen.
    if has_unread(client) {
        kernel.remove(pair);
        return Err(HandOverError::Ahead("client"));
    }
    Ok(Relayed {
        kernel,
        pair,
        client,
        server,
        hangups,
        wrote_client: sent_client + ready.len() as u64,
        wrote_server: sent_server,
        start_ns: now_ns(),
    })
}

/// Waits (briefly) until both sockets have had every byte pglb wrote acknowledged, and
/// returns those counts.
async fn settle(client: &TcpStream, server: &TcpStream) -> Result<(u64, u64), HandOverError> {
    let give_up = Instant::now() + SETTLE;
    loop {
        let c = tcp_info::sent(fd(client)).map_err(HandOverError::Info)?;
        let s = tcp_info::sent(fd(server)).map_err(HandOverError::Info)?;
        if c.settled() && s.settled() {
            return Ok((c.acked, s.acked));
        }
        if Instant::now() >= give_up {
            let who = if c.settled() { "server" } else { "client" };
            return Err(HandOverError::Unsettled(who));
        }
        sleep(Duration::from_millis(1)).await;
    }
}

fn fd(s: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    s.as_fd()
}

/// Whether a socket holds bytes nobody read yet (the sockets are non-blocking).
fn has_unread(s: &TcpStream) -> bool {
    matches!(peek(s), Some(Ok(n)) if n > 0)
}

/// A look at a non-blocking socket: Some(Ok(0)) at EOF, Some(Ok(n)) with bytes to read,
/// None with nothing yet.
fn peek(s: &TcpStream) -> Option<io::Result<usize>> {
    let mut one = [MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(s).peek(&mut one) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        other => Some(other),
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Relayed<'_> {
    /// Writes the ReadyForQuery that ended the login (see `hand_over`: the client's
    /// socket had everything acknowledged, so a few bytes go out at once; waits briefly
    /// otherwise).
    pub async fn forward_ready(&self, ready: &[u8]) -> io::Result<()> {
        let mut rest = ready;
        let give_up = Instant::now() + SETTLE;
        while !rest.is_empty() {
            match (&*self.client).write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= give_up {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flows(&self) -> io::Result<(Flow, Flow)> {
        self.kernel.flows(self.pair)
    }

    /// Watches the session until it ends or is handed back. `moved` follows the bytes
    /// the kernel moved (also added to `meters` as they go).
    pub async fn watch(
        &self,
        idle: Idle,
        meters: &Meters<'_>,
        signals: &Signals<'_>,
        moved: &mut Moved,
    ) -> Watched {
        let mut watch = Watching {
            relayed: self,
            idle,
            meters,
            moved,
            client_eof: false,
            drain_deadline: None,
        };
        let end = watch.run(signals).await;
        watch.count();
        end
    }
}

/// The state of one watch.
struct Watching<'r, 'a, 'm> {
    relayed: &'r Relayed<'a>,
    idle: Idle,
    meters: &'r Meters<'m>,
    moved: &'r mut Moved,
    /// The client half-closed (passed on to the server).
    client_eof: bool,
    drain_deadline: Option<Instant>,
}

impl Watching<'_, '_, '_> {
    async fn run(&mut self, signals: &Signals<'_>) -> Watched {
        let r = self.relayed;
        let mut stats_every = STATS_EVERY;
        let mut next_stats = Instant::now() + stats_every;
        loop {
            let wake = SESSION_WAKE.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if let Some(end) = self.signalled(signals) {
                return end;
            }
            let flows = match r.flows() {
                Ok(f) => f,
                Err(e) => return Watched::Ended(End::ServerError(e)),
            };
            if Instant::now() >= next_stats {
                stats_every = if self.count_from(flows) {
                    STATS_EVERY
                } else {
                    (stats_every * 2).min(STATS_QUIET)
                };
                next_stats = Instant::now() + stats_every;
            }
            if flows.0.back || flows.1.back {
                // The program handed the session back at an idle ReadyForQuery.
                return self.take_back(true).await;
            }
            let (idle_at, timeout_end) = self.idle_deadline(flows);
            let now = Instant::now();
            if now >= idle_at {
                return Watched::Ended(timeout_end);
            }
            let mut wake_at = idle_at.min(next_stats);
            if let Some(at) = self.drain_deadline {
                if now >= at {
                    return Watched::Ended(End::DrainTimeout);
                }
                if quiet(flows, now_ns()) {
                    return self.take_back(false).await;
                }
                wake_at = wake_at.min(at).min(now + DRAIN_POLL);
            }
            tokio::select! {
                _ = r.hangups.hung_up() => {
                    if let Some(watched) = self.look_at_sockets().await {
                        return watched;
                    }
                }
                _ = sleep_until(wake_at) => {}
                _ = wake => {}
            }
        }
    }

    /// After a hang-up wake-up: which socket closed (or failed, or has data the kernel
    /// passed up), and what follows.
    async fn look_at_sockets(&mut self) -> Option<Watched> {
        let r = self.relayed;
        if !self.client_eof {
            match peek(r.client) {
                Some(Ok(0)) => {
                    if let Err(end) = self.pass_client_eof().await {
                        return Some(Watched::Ended(end));
                    }
                }
                // Data passed up to pglb: the kernel could not redirect it.
                Some(Ok(_)) => return Some(self.take_back(false).await),
                Some(Err(e)) => return Some(Watched::Ended(End::ClientError(e))),
                None => {}
            }
        }
        let mut server = peek(r.server);
        if self.client_eof
            && matches!(&server, Some(Err(e)) if e.raw_os_error() == Some(libc::EPIPE))
        {
            // The client's FIN, an empty packet, was redirected too, and the kernel's
            // worker sent it after pglb had half-closed the server itself: that failed
            // send is all the error says (every byte before it was acknowledged). The
            // look took the error; look again.
            server = peek(r.server);
        }
        match server {
            Some(Ok(0)) => Some(Watched::Ended(self.pass_server_eof().await)),
            Some(Ok(_)) => Some(self.take_back(false).await),
            Some(Err(e)) => Some(Watched::Ended(End::ServerError(e))),
            None => None,
        }
    }

    /// Shutdown, kill and drain, as the user-space relay reads them.
    fn signalled(&mut self, signals: &Signals<'_>) -> Option<Watched> {
        if signals.shutdown.is_cancelled() {
            return Some(Watched::Ended(End::Shutdown));
        }
        if signals.kill.is_cancelled() {
            return Some(Watched::Ended(End::ServerDown));
        }
        if self.drain_deadline.is_none() && signals.drain.is_cancelled() {
            self.drain_deadline = Some(Instant::now() + signals.drain_deadline);
            if let Err(e) = self.relayed.kernel.control(self.relayed.pair, C_DRAIN) {
                return Some(Watched::Ended(End::ServerError(e)));
            }
            // From now on every packet wakes the watch: the one that ends the
            // transaction is when the program hands the session back.
            if let Err(e) = self.relayed.hangups.wake_on_data() {
                return Some(Watched::Ended(End::ServerError(e)));
            }
        }
        None
    }

    /// The idle deadline and who is blamed, by the user-space relay's rule: no bytes
    /// either way for the limit of the side that has been quiet longer.
    fn idle_deadline(&self, (c, s): (Flow, Flow)) -> (Instant, End) {
        let start = self.relayed.start_ns;
        let (lc, ls) = (c.last_ns.max(start), s.last_ns.max(start));
        let (quiet_since, limit, end) = if lc <= ls {
            (ls, self.idle.client, End::ClientTimeout)
        } else {
            (lc, self.idle.server, End::ServerTimeout)
        };
        let ago = Duration::from_nanos(now_ns().saturating_sub(quiet_since));
        let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now) + limit;
        (at, end)
    }

    /// The client half-closed: once the server has every byte the client sent, pass the
    /// FIN on.
    async fn pass_client_eof(&mut self) -> Result<(), End> {
        let r = self.relayed;
        flush(r, Side::Server, self.idle.server).await?;
        let _ = socket2::SockRef::from(r.server).shutdown(Shutdown::Write);
        self.client_eof = true;
        Ok(())
    }

    /// The server closed: once the client has every byte, close the client's side too.
    async fn pass_server_eof(&mut self) -> End {
        let r = self.relayed;
        if let Err(end) = flush(r, Side::Client, self.idle.client).await {
            return end;
        }
        let _ = socket2::SockRef::from(r.client).shutdown(Shutdown::Write);
        if self.client_eof {
            End::ClientClosed
        } else {
            End::ServerClosed
        }
    }

    /// Stops the redirects and gives the session back to the user-space relay, once
    /// every byte the kernel took is where it was going. `by_program`: the program
    /// stopped at an idle ReadyForQuery of a drain.
    async fn take_back(&mut self, by_program: bool) -> Watched {
        let r = self.relayed;
        let before = r.flows().ok();
        // However the watch noticed, the program may have stopped at the boundary itself.
        let by_program = by_program || before.is_some_and(|(c, s)| c.back || s.back);
        if let Err(e) = r.kernel.control(r.pair, C_PASS | C_DRAIN) {
            return Watched::Ended(End::ServerError(e));
        }
        sleep(VERDICT_GRACE).await;
        let (c, s) = match r.flows() {
            Ok(f) => f,
            Err(e) => return Watched::Ended(End::ServerError(e)),
        };
        for (to, limit) in [
            (Side::Server, self.idle.server),
            (Side::Client, self.idle.client),
        ] {
            if let Err(end) = flush(r, to, limit).await {
                return Watched::Ended(end);
            }
        }
        // The failed send of a redirected client FIN (see `look_at_sockets`) would
        // otherwise reach the user-space relay as a server error.
        if self.client_eof {
            match r.server.take_error() {
                Ok(Some(e)) if e.raw_os_error() != Some(libc::EPIPE) => {
                    return Watched::Ended(End::ServerError(e));
                }
                Ok(_) => {}
                Err(e) => return Watched::Ended(End::ServerError(e)),
            }
        }
        // A quiet drain ends here only if nothing moved while the redirects stopped.
        let still = before.is_some_and(|(bc, bs)| bc.bytes == c.bytes && bs.bytes == s.bytes);
        let drained = self.drain_deadline.is_some() && (by_program || (still && idle((c, s))));
        Watched::Back(Resume {
            pending: c.messages as i64 - s.messages as i64,
            at_rest: s.at_rest,
            status: s.status,
            opaque: c.opaque || s.opaque || !c.at_boundary || !s.at_boundary,
            drained,
        })
    }

    /// Adds the bytes moved since the last count to the stats.
    fn count(&mut self) {
        if let Ok(flows) = self.relayed.flows() {
            self.count_from(flows);
        }
    }

    /// Whether any byte moved since the last count.
    fn count_from(&mut self, (c, s): (Flow, Flow)) -> bool {
        let up = c.bytes.saturating_sub(self.moved.to_server);
        let down = s.bytes.saturating_sub(self.moved.to_client);
        for m in self.meters.to_server {
            m.add(up);
        }
        for m in self.meters.to_client {
            m.add(down);
        }
        self.moved.to_server += up;
        self.moved.to_client += down;
        up + down > 0
    }
}

/// Idle outside a transaction: the server's last word was ReadyForQuery 'I' and every
/// request has its answer.
fn idle((c, s): (Flow, Flow)) -> bool {
    !c.opaque && !s.opaque && s.at_rest && s.status == b'I' && c.messages == s.messages
}

/// Idle (see `idle`) and quiet for `DRAIN_QUIET`.
fn quiet(flows: (Flow, Flow), now: u64) -> bool {
    let last = flows.0.last_ns.max(flows.1.last_ns);
    idle(flows) && now.saturating_sub(last) >= DRAIN_QUIET.as_nanos() as u64
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Waits until `to` has acknowledged every byte meant for it, giving up after `limit`
/// without progress (a peer that stopped reading).
async fn flush(r: &Relayed<'_>, to: Side, limit: Duration) -> Result<(), End> {
    let (sock, wrote) = match to {
        Side::Client => (r.client, r.wrote_client),
        Side::Server => (r.server, r.wrote_server),
    };
    let error = |e| match to {
        Side::Client => End::ClientError(e),
        Side::Server => End::ServerError(e),
    };
    let mut deadline = Instant::now() + limit;
    let mut last = 0;
    let mut pause = Duration::from_micros(200);
    loop {
        let (c, s) = r.flows().map_err(error)?;
        let redirected = if to == Side::Client { s.bytes } else { c.bytes };
        let acked = tcp_info::sent(fd(sock)).map_err(error)?.acked;
        if acked >= wrote + redirected {
            return Ok(());
        }
        if acked > last {
            last = acked;
            deadline = Instant::now() + limit;
        } else if Instant::now() >= deadline {
            return Err(match to {
                Side::Client => End::ClientTimeout,
                Side::Server => End::ServerTimeout,
            });
        }
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
