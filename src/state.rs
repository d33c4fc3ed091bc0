//! The one model of listen and server state, for the life of the process. A listen and
//! each of its servers keep their identity (by name) across reloads: a reload
//! reconfigures them in place, so every session, whatever configuration it started
//! under, counts against the same limits, the same leastconn count, and is reached by
//! the same drain, maint and shutdown-sessions. The proxy path, the health checker, the
//! admin actions and the stats all read and update these structures; nothing keeps a copy.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use crate::balance::BalanceState;
use crate::config;
pub use crate::counters::lock;
use crate::counters::{Counter, Gate, Rate, SessionTimes, StripedCounter, unix_now};
use crate::events::Event;
use crate::health::Health;
use crate::workers::Pool;

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, value: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = value;
}

/// What an operator set for a server (stats page, API): persisted in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Normal service.
    Ready,
    /// No new clients; existing sessions stay.
    Drain,
    /// Out of service; checks stop.
    Maint,
}

impl Admin {
    fn to_u8(self) -> u8 {
        match self {
            Admin::Ready => 0,
            Admin::Drain => 1,
            Admin::Maint => 2,
        }
    }

    fn from_u8(v: u8) -> Admin {
        match v {
            1 => Admin::Drain,
            2 => Admin::Maint,
            _ => Admin::Ready,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Admin::Ready => "ready",
            Admin::Drain => "drain",
            Admin::Maint => "maint",
        }
    }
}

/// Counters of one server, named after HAProxy's stats columns.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Sessions ever assigned (stot / lbtot).
    pub stot: AtomicU64,
    /// Highest concurrent sessions seen (smax).
    pub smax: AtomicUsize,
    /// Bytes from clients to this server (bin).
    pub bin: StripedCounter,
    /// Bytes from this server to clients (bout).
    pub bout: StripedCounter,
    /// Failed connection attempts (econ).
    pub econ: AtomicU64,
    /// Connection attempts (HAProxy's `connect`).
    pub connects: AtomicU64,
    /// Connect retries started after a failure on this server (wretr).
    pub wretr: AtomicU64,
    /// Sessions moved to another server after failing here (wredis).
    pub wredis: AtomicU64,
    /// Unix time of the last session assigned (lastsess).
    pub last_session: AtomicU64,
    /// New sessions per second.
    pub rate: Rate,
    /// Queue, connect and total times of its sessions.
    pub times: SessionTimes,
}

/// One server of a listen, from the first configuration that named it until it is
/// removed and its last session has ended.
#[derive(Debug)]
pub struct ServerState {
    /// Its identity within the listen.
    pub name: String,
    /// 1-based position in its listen (HAProxy's sid); a reload may renumber it.
    sid: AtomicU32,
    /// Settings of the current configuration (replaced as a whole by a reload).
    cfg: RwLock<Arc<config::Server>>,
    /// Mirror of `health.up` for the pick fast path. Written only with `health` locked.
    up: AtomicBool,
    /// Current effective weight; starts at the configured one (slowstart lowers it).
    weight: AtomicU32,
    /// The weight the server returns to: configured, or set by an operator.
    base_weight: AtomicU32,
    /// Operator state (`Admin` as u8).
    admin: AtomicU8,
    /// Sessions holding a place on it now: leastconn's measure and maxconn's count.
    /// Changed only with the listen's dispatch lock held; read by anyone.
    cur: AtomicUsize,
    /// `cfg.maxconn` and `cfg.backup`, read on every pick.
    maxconn: AtomicUsize,
    backup: AtomicBool,
    /// Removed by a reload: takes no new session, lingers while its sessions drain.
    removed: AtomicBool,
    /// Health checks stopped by an operator (`disable health`): the server counts as UP
    /// and its last verdict is ignored until `enable health`.
    checks_disabled: AtomicBool,
    pub counters: ServerCounters,
    /// The health verdict and last check; the checker writes, everyone reads.
    pub health: Mutex<Health>,
    /// Connection errors on live traffic since the last success (passive health).
    pub consecutive_errors: AtomicU32,
    /// A healthy primary failing a replica check: a fallback target for replica listens.
    pub fallback_ok: AtomicBool,
    /// What sessions starting now take to learn of a kill or a drain.
    sessions: Mutex<SessionSignals>,
    /// Wakes the checker early (after passive health marked the server down).
    pub wake_checker: Notify,
    /// Sessions relaying through this server now, for `show sess`.
    live: Mutex<HashMap<u64, LiveSession>>,
    /// When the operator state (admin, weight, checks) was last set, and on which node:
    /// peers keep the newest.
    op_version: Mutex<OpVersion>,
}

/// The version of a server's operator state: later time wins, the node name breaks ties,
/// so every node orders two actions the same way. (0, "") is "never set".
#[derive(
    Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct OpVersion {
    /// Unix time of the action, ms.
    pub ms: u64,
    pub node: String,
}

/// A session as `show sess` lists it.
#[derive(Debug, Clone, Copy)]
pub struct LiveSession {
    pub id: u64,
    pub client: SocketAddr,
    pub since: Instant,
}

/// Keeps a session in its server's list while alive.
#[derive(Debug)]
pub struct Listed {
    server: Arc<ServerState>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        lock(&self.server.live).remove(&self.id);
    }
}

/// Session ids, unique for the life of the process.
static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Bumped after any token that ends or drains sessions is cancelled. A relay looks at
/// its tokens only when this moved since it last did: the counter is one read of a line
/// that is almost never written.
pub static SESSION_SIGNALS: AtomicU64 = AtomicU64::new(0);

/// Wakes every relaying session after [`SESSION_SIGNALS`] moved. One wait per session
/// instead of one per token it could be ended by: a session in the relay is mostly an
/// idle wait, so each wait is memory held per client.
pub static SESSION_WAKE: Notify = Notify::const_new();

/// Set when pglb starts to stop: sessions drained from then on are told pglb is
/// shutting down rather than that their server is drained.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

/// Set once a successor process serves on this one's sockets (an upgrade): the runtime
/// API socket file is the successor's now and must not be removed.
pub static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Cancels a token that sessions wait on (see [`SESSION_SIGNALS`]). In this order: a
/// session that sees the counter move finds the token cancelled, and one that read the
/// counter before it moved is woken.
pub fn end_sessions(token: &CancellationToken) {
    token.cancel();
    SESSION_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    SESSION_WAKE.notify_waiters();
}

/// What ends a server's sessions early. Each session clones the tokens when it starts; a
/// token is cancelled once and then replaced, so later sessions are not affected. (Tokens,
/// not watch channels: a session waits on them with nameable futures, no boxing.)
#[derive(Debug, Default, Clone)]
pub struct SessionSignals {
    /// Cancelled to close the sessions now (also those still logging in).
    pub kill: CancellationToken,
    /// Cancelled to drain: sessions close at their next transaction boundary.
    pub drain: CancellationToken,
}

impl ServerState {
    pub fn new(sid: u32, cfg: config::Server) -> Self {
        let health = Health::new(&cfg.check);
        ServerState {
            name: cfg.name.clone(),
            sid: AtomicU32::new(sid),
            weight: AtomicU32::new(cfg.weight),
            base_weight: AtomicU32::new(cfg.weight),
            admin: AtomicU8::new(0),
            up: AtomicBool::new(health.up),
            health: Mutex::new(health),
            cur: AtomicUsize::new(0),
            maxconn: AtomicUsize::new(cfg.maxconn),
            backup: AtomicBool::new(cfg.backup),
            removed: AtomicBool::new(false),
            checks_disabled: AtomicBool::new(false),
            cfg: RwLock::new(Arc::new(cfg)),
            counters: ServerCounters::default(),
            consecutive_errors: AtomicU32::new(0),
            fallback_ok: AtomicBool::new(false),
            sessions: Mutex::default(),
            wake_checker: Notify::new(),
            live: Mutex::default(),
            op_version: Mutex::default(),
        }
    }

    pub fn op_version(&self) -> OpVersion {
        lock(&self.op_version).clone()
    }

    /// Stamps a local operator action of `node`: now, and later than the last one.
    pub(crate) fn stamp(&self, node: &str) -> OpVersion {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut v = lock(&self.op_version);
        *v = OpVersion {
            // Saturating: a version from a peer or a file may be anything.
            ms: now.max(v.ms.saturating_add(1)),
            node: node.to_owned(),
        };
        v.clone()
    }

    /// Takes a version from a peer or the state file.
    pub(crate) fn set_op_version(&self, v: OpVersion) {
        *lock(&self.op_version) = v;
    }

    /// Lists a session relaying through this server until the guard is dropped.
    pub fn list_session(self: &Arc<Self>, client: SocketAddr) -> Listed {
        let id = SESSION_IDS.fetch_add(1, Relaxed);
        let since = Instant::now();
        lock(&self.live).insert(id, LiveSession { id, client, since });
        Listed {
            server: Arc::clone(self),
            id,
        }
    }

    /// The sessions relaying through this server now, oldest first.
    pub fn live_sessions(&self) -> Vec<LiveSession> {
        let mut v: Vec<LiveSession> = lock(&self.live).values().copied().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// The settings of the current configuration.
    pub fn cfg(&self) -> Arc<config::Server> {
        read(&self.cfg)
    }

    pub fn sid(&self) -> u32 {
        self.sid.load(Relaxed)
    }

    /// Takes the settings of a new configuration, keeping what the operator decided. A
    /// new address or check starts the health verdict afresh; sessions connected to an
    /// old address end at their next transaction boundary.
    fn reconfigure(&self, sid: u32, next: config::Server) {
        self.sid.store(sid, Relaxed);
        let old = self.cfg();
        if *old == next {
            return;
        }
        if self.base_weight() == old.weight {
            // Not overridden by an operator: the configured weight applies.
            self.set_base_weight(next.weight);
        }
        self.maxconn.store(next.maxconn, Relaxed);
        self.backup.store(next.backup, Relaxed);
        let moved = old.addr != next.addr;
        if moved || old.check != next.check {
            let mut h = self.health();
            let before = h.clone();
            *h = Health::new(&next.check);
            h.failures = before.failures;
            h.downs = before.downs;
            h.downtime = before.downtime;
            self.set_up(h.up || self.checks_disabled());
            self.consecutive_errors.store(0, Relaxed);
            self.fallback_ok.store(false, Relaxed);
        }
        if moved {
            self.drain_running();
        }
        write(&self.cfg, Arc::new(next));
    }

    pub fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// May the balancer send it new clients?
    pub fn usable(&self) -> bool {
        self.up.load(Relaxed)
            && self.weight() > 0
            && self.admin() == Admin::Ready
            && !self.is_removed()
    }

    /// Room for one more session under its maxconn (0: unlimited)?
    pub fn has_room(&self) -> bool {
        let max = self.maxconn.load(Relaxed);
        max == 0 || self.sessions() < max
    }

    pub fn maxconn(&self) -> usize {
        self.maxconn.load(Relaxed)
    }

    pub fn is_backup(&self) -> bool {
        self.backup.load(Relaxed)
    }

    /// Sessions holding a place on this server now.
    pub fn sessions(&self) -> usize {
        self.cur.load(Relaxed)
    }

    /// Counts a session in or out; only under the listen's dispatch lock.
    pub(crate) fn add_session(&self, delta: isize) -> usize {
        if delta >= 0 {
            self.cur.fetch_add(delta as usize, Relaxed) + delta as usize
        } else {
            let d = delta.unsigned_abs();
            self.cur.fetch_sub(d, Relaxed).saturating_sub(d)
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
    }

    pub fn admin(&self) -> Admin {
        Admin::from_u8(self.admin.load(Relaxed))
    }

    pub(crate) fn set_admin(&self, admin: Admin) {
        self.admin.store(admin.to_u8(), Relaxed);
        self.set_draining(admin == Admin::Drain || self.is_removed());
    }

    /// The signals for a session starting on this server now.
    pub fn session_signals(&self) -> SessionSignals {
        lock(&self.sessions).clone()
    }

    /// Closes the sessions running on this server (on-marked-down shutdown-sessions),
    /// including those still waiting for its first answer; sessions that start
    /// afterwards are not affected.
    pub(crate) fn kill_sessions(&self) {
        let mut s = lock(&self.sessions);
        end_sessions(&s.kill);
        s.kill = CancellationToken::new();
    }

    /// While on, sessions on this server (running or starting) close at their next
    /// transaction boundary. Turning it off spares sessions that start afterwards.
    pub(crate) fn set_draining(&self, on: bool) {
        let mut s = lock(&self.sessions);
        if on {
            end_sessions(&s.drain);
        } else if s.drain.is_cancelled() {
            s.drain = CancellationToken::new();
        }
    }

    /// Drains the sessions running now, sparing those that start afterwards (also the
    /// runtime API's `shutdown sessions server`).
    pub(crate) fn drain_running(&self) {
        let mut s = lock(&self.sessions);
        if !s.drain.is_cancelled() {
            end_sessions(&s.drain);
            s.drain = CancellationToken::new();
        }
    }

    /// Taken out of the configuration: no new sessions, running ones drain.
    fn retire(&self) {
        self.removed.store(true, Relaxed);
        self.set_draining(true);
    }

    /// Named again by a reload while it lingered.
    fn revive(&self) {
        self.removed.store(false, Relaxed);
        self.set_draining(self.admin() == Admin::Drain);
    }

    /// The weight outside slowstart: configured or set by an operator.
    pub fn base_weight(&self) -> u32 {
        self.base_weight.load(Relaxed)
    }

    pub(crate) fn set_base_weight(&self, weight: u32) {
        self.base_weight.store(weight, Relaxed);
        self.weight.store(weight, Relaxed);
    }

    /// Status as the stats show it: a removed server, MAINT and DRAIN (operator) before
    /// the health text.
    pub fn status_of(&self, h: &Health) -> String {
        if self.is_removed() {
            return "DRAIN (removed)".into();
        }
        let up = h.up || self.checks_disabled();
        match self.admin() {
            Admin::Maint => "MAINT".into(),
            Admin::Drain if up => "DRAIN".into(),
            _ if self.checks_disabled() => "no check".into(),
            _ => h.status_text(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
    }

    pub fn checks_disabled(&self) -> bool {
        self.checks_disabled.load(Relaxed)
    }

    /// `disable health` / `enable health`: while disabled the server counts as UP; once
    /// enabled again its last verdict applies until the next check.
    pub(crate) fn set_checks_enabled(&self, on: bool) {
        let h = self.health();
        self.checks_disabled.store(!on, Relaxed);
        self.set_up(h.up || !on);
    }

    /// A runtime `maxconn` (the next reload applies the configured one again).
    pub(crate) fn set_maxconn(&self, maxconn: usize) {
        self.maxconn.store(maxconn, Relaxed);
    }

    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Relaxed);
    }

    pub(crate) fn note_session(&self) {
        self.counters.stot.inc();
        self.counters.rate.tick();
        self.counters.last_session.store(unix_now(), Relaxed);
    }
}

impl ServerCounters {
    fn clear(&self, all: bool) {
        self.smax.store(0, Relaxed);
        self.rate.clear(all);
        self.times.clear(all);
        if all {
            for c in [
                &self.stot,
                &self.econ,
                &self.connects,
                &self.wretr,
                &self.wredis,
            ] {
                c.store(0, Relaxed);
            }
            self.bin.clear();
            self.bout.clear();
        }
    }
}

/// Counters of a listen's front door (HAProxy's FRONTEND row).
#[derive(Debug, Default)]
pub struct ListenCounters {
    /// Client sessions open now (scur).
    pub cur: AtomicUsize,
    pub smax: AtomicUsize,
    /// Client connections accepted (stot).
    pub stot: AtomicU64,
    pub bin: StripedCounter,
    pub bout: StripedCounter,
    /// Clients refused by maxconn (dreq/denied).
    pub denied: AtomicU64,
    /// Bad or missing startup packets (ereq).
    pub ereq: AtomicU64,
    /// Clients refused because no server could take them.
    pub no_server: AtomicU64,
    /// Clients refused with a server's own error (every server refused the login).
    pub server_refused: AtomicU64,
    /// Clients whose queue wait ran out.
    pub queue_timeouts: AtomicU64,
    /// CancelRequests with unknown keys dropped by the rate limit.
    pub cancels_limited: AtomicU64,
    /// Highest queue length seen (qmax).
    pub qmax: AtomicUsize,
    /// New client sessions per second.
    pub rate: Rate,
    /// Queue, connect and total times of the listen's sessions (the BACKEND row).
    pub times: SessionTimes,
}

impl ListenCounters {
    fn clear(&self, all: bool) {
        self.smax.store(self.cur.load(Relaxed), Relaxed);
        self.qmax.store(0, Relaxed);
        self.rate.clear(all);
        self.times.clear(all);
        if all {
            for c in [
                &self.stot,
                &self.denied,
                &self.ereq,
                &self.no_server,
                &self.server_refused,
                &self.queue_timeouts,
                &self.cancels_limited,
            ] {
                c.store(0, Relaxed);
            }
            self.bin.clear();
            self.bout.clear();
        }
    }
}

/// The listen and the server of these names, when both exist.
pub fn find_server(
    listens: &[Arc<ListenState>],
    listen: &str,
    server: &str,
) -> Option<(Arc<ListenState>, Arc<ServerState>)> {
    let l = listens.iter().find(|l| l.name == listen)?;
    Some((Arc::clone(l), l.server(server)?))
}

/// The balancer's memory and the clients waiting for a place, oldest first; `pick`
/// works on it under the listen's lock, held for a few comparisons and never across an
/// await. (The session counts live on the servers, changed only under this lock.)
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub(crate) balance: BalanceState,
    /// Each waiter is sent the server whose place was counted for it.
    pub(crate) queue: VecDeque<oneshot::Sender<Arc<ServerState>>>,
}

impl Dispatch {
    fn new(servers: usize) -> Self {
        Dispatch {
            balance: BalanceState::new(servers),
            queue: VecDeque::new(),
        }
    }

    /// Waiters still waiting (some may have timed out but not yet been pruned).
    pub(crate) fn queued(&self) -> usize {
        self.queue.iter().filter(|w| !w.is_closed()).count()
    }
}

/// A listen: its configuration, its servers, and the dispatcher that hands out places.
#[derive(Debug)]
pub struct ListenState {
    pub name: String,
    /// 1-based position in the config (HAProxy's iid).
    iid: AtomicU32,
    cfg: RwLock<Arc<config::Listen>>,
    /// The servers of the current configuration, in its order.
    servers: RwLock<Arc<Vec<Arc<ServerState>>>>,
    /// Servers a reload removed whose sessions have not all ended yet.
    lingering: Mutex<Vec<Arc<ServerState>>>,
    pub counters: ListenCounters,
    /// The listen's maxconn; a pass is held for the whole client session.
    pub gate: Arc<Gate>,
    /// The balancer's memory and the queue.
    dispatch: Mutex<Dispatch>,
    pub started: Instant,
    /// Where server state changes are published (logs, stats, alerts).
    pub events: broadcast::Sender<Event>,
    /// "No server available" was announced: the next server UP announces the recovery.
    pub no_server_announced: AtomicBool,
    /// UP/DOWN history of the listen as a whole (the BACKEND row).
    backend: Mutex<BackendHealth>,
}

/// The BACKEND row's status history: UP while any server can serve.
#[derive(Debug)]
struct BackendHealth {
    up: bool,
    ever_up: bool,
    changed: Instant,
    downtime: std::time::Duration,
}

/// The BACKEND row's status now: (up, seconds since it last changed, seconds DOWN in all).
#[derive(Debug, Clone, Copy)]
pub struct BackendStatus {
    pub up: bool,
    pub lastchg: u64,
    pub downtime: u64,
}

impl ListenState {
    pub fn new(iid: u32, cfg: config::Listen, events: broadcast::Sender<Event>) -> Self {
        let servers: Vec<_> = cfg
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| Arc::new(ServerState::new(i as u32 + 1, s.clone())))
            .collect();
        ListenState {
            name: cfg.name.clone(),
            iid: AtomicU32::new(iid),
            gate: Gate::new(cfg.maxconn),
            dispatch: Mutex::new(Dispatch::new(servers.len())),
            servers: RwLock::new(Arc::new(servers)),
            lingering: Mutex::default(),
            cfg: RwLock::new(Arc::new(cfg)),
            counters: ListenCounters::default(),
            started: Instant::now(),
            events,
            no_server_announced: AtomicBool::new(false),
            backend: Mutex::new(BackendHealth {
                up: false,
                ever_up: false,
                changed: Instant::now(),
                downtime: std::time::Duration::ZERO,
            }),
        }
    }

    /// The BACKEND row's status, its history brought up to date first. (A server that
    /// is up and not in maintenance makes the backend UP; the wait for the first check
    /// is not downtime.)
    pub fn backend_status(&self) -> BackendStatus {
        let up = self
            .servers()
            .iter()
            .any(|s| s.is_up() && s.admin() != Admin::Maint);
        let mut b = lock(&self.backend);
        let now = Instant::now();
        if up != b.up {
            if up && b.ever_up {
                let down_for = now.saturating_duration_since(b.changed);
                b.downtime += down_for;
            }
            b.ever_up |= up;
            b.up = up;
            b.changed = now;
        }
        let current_down = if !b.up && b.ever_up {
            now.saturating_duration_since(b.changed)
        } else {
            std::time::Duration::ZERO
        };
        BackendStatus {
            up,
            lastchg: now.saturating_duration_since(b.changed).as_secs(),
            downtime: (b.downtime + current_down).as_secs(),
        }
    }

    /// The settings of the current configuration.
    pub fn cfg(&self) -> Arc<config::Listen> {
        read(&self.cfg)
    }

    pub fn iid(&self) -> u32 {
        self.iid.load(Relaxed)
    }

    /// The servers of the current configuration.
    pub fn servers(&self) -> Arc<Vec<Arc<ServerState>>> {
        read(&self.servers)
    }

    /// Servers removed by a reload that still have sessions.
    pub fn lingering(&self) -> Vec<Arc<ServerState>> {
        let mut l = lock(&self.lingering);
        l.retain(|s| s.sessions() > 0);
        l.clone()
    }

    /// Takes a new configuration in place: servers keep their state by name, new ones
    /// start, removed ones drain and linger until their last session ends. A lowered
    /// maxconn applies to the next client.
    pub fn reconfigure(&self, iid: u32, cfg: config::Listen) {
        self.iid.store(iid, Relaxed);
        self.gate.set_limit(cfg.maxconn);
        // Under the dispatch lock: no pick sees half the change.
        let mut dispatch = self.dispatch();
        let current = self.servers();
        let mut lingering = lock(&self.lingering);
        let next: Vec<Arc<ServerState>> = cfg
            .servers
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let sid = j as u32 + 1;
                let kept = current.iter().find(|x| x.name == s.name).cloned();
                let revived = || {
                    let at = lingering.iter().position(|x| x.name == s.name)?;
                    let server = lingering.remove(at);
                    server.revive();
                    Some(server)
                };
                match kept.or_else(revived) {
                    Some(server) => {
                        server.reconfigure(sid, s.clone());
                        server
                    }
                    None => Arc::new(ServerState::new(sid, s.clone())),
                }
            })
            .collect();
        for old in current.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                old.retire();
                lingering.push(Arc::clone(old));
            }
        }
        // Positions changed: the balancer starts over.
        dispatch.balance = BalanceState::new(next.len());
        write(&self.servers, Arc::new(next));
        write(&self.cfg, Arc::new(cfg));
    }

    /// `clear counters [all]`: high-water marks (and with `all` every counter) of the
    /// listen and its servers start again from zero.
    pub fn clear_counters(&self, all: bool) {
        self.counters.clear(all);
        for s in self.servers().iter() {
            s.counters.clear(all);
            if all {
                let mut h = s.health();
                h.failures = 0;
                h.downs = 0;
                h.downtime = std::time::Duration::ZERO;
            }
        }
    }

    /// Ends every session running now at its next transaction boundary (shutdown).
    pub fn drain_running(&self) {
        for s in self.servers().iter().chain(self.lingering().iter()) {
            s.drain_running();
        }
    }

    /// The listen is gone from the configuration: every session drains.
    pub fn retire(&self) {
        for s in self.servers().iter() {
            s.retire();
        }
    }

    pub(crate) fn dispatch(&self) -> MutexGuard<'_, Dispatch> {
        lock(&self.dispatch)
    }

    /// A server of the current configuration, by name.
    pub fn server(&self, name: &str) -> Option<Arc<ServerState>> {
        self.servers().iter().find(|s| s.name == name).cloned()
    }

    /// Servers that are up, split (active, backup).
    pub fn up_counts(&self) -> (usize, usize) {
        let servers = self.servers();
        let up = |backup: bool| {
            servers
                .iter()
                .filter(|s| s.is_backup() == backup && s.is_up())
                .count()
        };
        (up(false), up(true))
    }
}

/// The whole process as the stats and admin see it: the listens served now and
/// process-wide facts.
#[derive(Debug)]
pub struct Process {
    listens: RwLock<Arc<Vec<Arc<ListenState>>>>,
    /// Global maxconn: a pass is held for the whole client session.
    pub gate: Arc<Gate>,
    pub started: Instant,
    /// The error of the last failed reload; cleared by a successful one.
    pub reload_error: Mutex<Option<String>>,
    /// Cleared when shutdown begins: `/health` then reports 503.
    pub serving: AtomicBool,
    /// The worker threads, for their session counts.
    workers: Arc<Pool>,
}

impl Process {
    pub fn new(listens: Vec<Arc<ListenState>>, maxconn: usize, workers: Arc<Pool>) -> Self {
        Process {
            listens: RwLock::new(Arc::new(listens)),
            gate: Gate::new(maxconn),
            workers,
            started: Instant::now(),
            reload_error: Mutex::new(None),
            serving: AtomicBool::new(true),
        }
    }

    pub fn listens(&self) -> Arc<Vec<Arc<ListenState>>> {
        read(&self.listens)
    }

    pub fn set_listens(&self, listens: Vec<Arc<ListenState>>) {
        write(&self.listens, Arc::new(listens));
    }

    /// Client sessions on each worker thread.
    pub fn worker_sessions(&self) -> Vec<usize> {
        self.workers.sessions()
    }
}
