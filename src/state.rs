//! The one model of listen and server state. The proxy path, the health checker and the
//! stats renderers all read and update these structures; nothing keeps a copy.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::events::Event;
use crate::health::Health;
use crate::pick::Dispatch;
use crate::workers::Pool;

/// Locks a mutex whose data stays usable even if a holder panicked (counters and
/// health verdicts are always in a consistent state between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Monotonic counter helpers; Relaxed is enough for statistics.
pub trait Counter {
    fn inc(&self);
    fn add(&self, n: u64);
    fn get(&self) -> u64;
}

impl Counter for AtomicU64 {
    fn inc(&self) {
        self.fetch_add(1, Relaxed);
    }
    fn add(&self, n: u64) {
        self.fetch_add(n, Relaxed);
    }
    fn get(&self) -> u64 {
        self.load(Relaxed)
    }
}

/// A counter every worker bumps on every relayed chunk (bytes in and out). Each worker
/// adds to a cache line of its own, so two cores relaying for the same server or listen
/// never pass one line back and forth; a read adds the lines up. Workers beyond
/// `STRIPES` share lines, which is still correct, only less spread.
#[derive(Debug, Default)]
pub struct StripedCounter([Stripe; STRIPES]);

const STRIPES: usize = 8;

/// One counter alone on its cache line (128 bytes: x86 fetches lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl Counter for StripedCounter {
    fn inc(&self) {
        self.add(1);
    }
    fn add(&self, n: u64) {
        self.0[crate::workers::current() % STRIPES]
            .0
            .fetch_add(n, Relaxed);
    }
    fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Relaxed)))
    }
}

/// Raises a high-water mark.
pub fn raise_max(max: &AtomicUsize, value: usize) {
    max.fetch_max(value, Relaxed);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sessions per second, as HAProxy shows it: the count of the current second (or of the
/// last one, right after it ends), and the highest seen.
#[derive(Debug, Default)]
pub struct Rate {
    /// Unix second in the high 32 bits, count in that second in the low 32.
    packed: AtomicU64,
    max: AtomicU64,
}

impl Rate {
    pub fn tick(&self) {
        let now = unix_now() & 0xffff_ffff;
        let mut cur = self.packed.load(Relaxed);
        loop {
            let next = if cur >> 32 == now {
                cur + 1
            } else {
                now << 32 | 1
            };
            match self
                .packed
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => {
                    self.max.fetch_max(next & 0xffff_ffff, Relaxed);
                    return;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// (rate, rate_max).
    pub fn read(&self) -> (u64, u64) {
        let now = unix_now() & 0xffff_ffff;
        let p = self.packed.load(Relaxed);
        let rate = if p >> 32 == now || p >> 32 == now.wrapping_sub(1) {
            p & 0xffff_ffff
        } else {
            0
        };
        (rate, self.max.load(Relaxed))
    }
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
    /// Connect retries started after a failure on this server (wretr).
    pub wretr: AtomicU64,
    /// Sessions moved to another server after failing here (wredis).
    pub wredis: AtomicU64,
    /// Unix time of the last session assigned (lastsess).
    pub last_session: AtomicU64,
    /// New sessions per second.
    pub rate: Rate,
}

/// One server of a listen.
#[derive(Debug)]
pub struct ServerState {
    /// 1-based position in its listen (HAProxy's sid).
    pub sid: u32,
    pub cfg: config::Server,
    /// Mirror of `health.up` for the pick fast path. Written only with `health` locked.
    up: AtomicBool,
    /// Current effective weight; starts at the configured one (slowstart lowers it).
    weight: AtomicU32,
    /// The weight the server returns to: configured, or set by an operator.
    base_weight: AtomicU32,
    /// Operator state (`Admin` as u8).
    admin: std::sync::atomic::AtomicU8,
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
}

/// Bumped before any token that ends or drains sessions is cancelled. A relay looks at
/// its tokens only when this moved since it last did: looking takes two locks that every
/// session shares, on every wake-up, while the counter is one read of a line that is
/// almost never written.
pub static SESSION_SIGNALS: AtomicU64 = AtomicU64::new(0);

/// Cancels a token that sessions wait on (see [`SESSION_SIGNALS`]).
pub fn end_sessions(token: &CancellationToken) {
    SESSION_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    token.cancel();
}

/// What ends a server's sessions early. Each session clones the tokens when it starts; a
/// token is cancelled once and then replaced, so later sessions are not affected. (Tokens,
/// not watch channels: a session waits on them with nameable futures, no boxing.)
#[derive(Debug, Default, Clone)]
pub struct SessionSignals {
    /// Cancelled to close the sessions now.
    pub kill: CancellationToken,
    /// Cancelled to drain: sessions close at their next transaction boundary.
    pub drain: CancellationToken,
}

impl ServerState {
    pub fn new(sid: u32, cfg: config::Server) -> Self {
        let health = Health::new(&cfg.check);
        ServerState {
            sid,
            weight: AtomicU32::new(cfg.weight),
            base_weight: AtomicU32::new(cfg.weight),
            admin: std::sync::atomic::AtomicU8::new(0),
            up: AtomicBool::new(health.up),
            health: Mutex::new(health),
            cfg,
            counters: ServerCounters::default(),
            consecutive_errors: AtomicU32::new(0),
            fallback_ok: AtomicBool::new(false),
            sessions: Mutex::default(),
            wake_checker: Notify::new(),
        }
    }

    pub fn health(&self) -> MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// May the balancer send it new clients?
    pub fn usable(&self) -> bool {
        self.up.load(Relaxed) && self.weight() > 0 && self.admin() == Admin::Ready
    }

    pub fn admin(&self) -> Admin {
        Admin::from_u8(self.admin.load(Relaxed))
    }

    pub(crate) fn set_admin(&self, admin: Admin) {
        self.admin.store(admin.to_u8(), Relaxed);
        self.set_draining(admin == Admin::Drain);
    }

    /// The signals for a session starting on this server now.
    pub fn session_signals(&self) -> SessionSignals {
        lock(&self.sessions).clone()
    }

    /// Closes the sessions running on this server (on-marked-down shutdown-sessions);
    /// sessions that start afterwards are not affected.
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

    /// The weight outside slowstart: configured or set by an operator.
    pub fn base_weight(&self) -> u32 {
        self.base_weight.load(Relaxed)
    }

    pub(crate) fn set_base_weight(&self, weight: u32) {
        self.base_weight.store(weight, Relaxed);
        self.weight.store(weight, Relaxed);
    }

    /// Status as the stats show it: MAINT and DRAIN (operator) before the health text.
    pub fn status_of(&self, h: &Health) -> String {
        match self.admin() {
            Admin::Maint => "MAINT".into(),
            Admin::Drain if h.up => "DRAIN".into(),
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

    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Relaxed);
    }

    pub(crate) fn note_session(&self) {
        self.counters.stot.inc();
        self.counters.rate.tick();
        self.counters.last_session.store(unix_now(), Relaxed);
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
    /// Clients whose queue wait ran out.
    pub queue_timeouts: AtomicU64,
    /// Highest queue length seen (qmax).
    pub qmax: AtomicUsize,
    /// New client sessions per second.
    pub rate: Rate,
}

/// A listen: its configuration, its servers, and the dispatcher that hands out slots.
#[derive(Debug)]
pub struct ListenState {
    /// 1-based position in the config (HAProxy's iid).
    pub iid: u32,
    pub cfg: config::Listen,
    pub servers: Vec<Arc<ServerState>>,
    /// Shared with the listen's earlier generations: a reload does not reset its stats.
    pub counters: Arc<ListenCounters>,
    /// Per-listen maxconn; a permit is held for the whole client session.
    pub maxconn: Arc<Semaphore>,
    /// Session counts per server, the balancer's memory and the queue.
    dispatch: Mutex<Dispatch>,
    pub started: Instant,
    /// Where server state changes are published (logs, stats, alerts).
    pub events: broadcast::Sender<Event>,
    /// Cancel keys of live sessions, shared by every listen.
    pub cancels: Arc<crate::cancel::Registry>,
}

impl ListenState {
    pub fn new(
        iid: u32,
        cfg: config::Listen,
        events: broadcast::Sender<Event>,
        cancels: Arc<crate::cancel::Registry>,
    ) -> Self {
        let servers: Vec<_> = cfg
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| Arc::new(ServerState::new(i as u32 + 1, s.clone())))
            .collect();
        ListenState::with_servers(iid, cfg, servers, events, cancels)
    }

    /// A listen over existing server states (a reload keeps the unchanged ones).
    pub fn with_servers(
        iid: u32,
        cfg: config::Listen,
        servers: Vec<Arc<ServerState>>,
        events: broadcast::Sender<Event>,
        cancels: Arc<crate::cancel::Registry>,
    ) -> Self {
        ListenState {
            iid,
            maxconn: Arc::new(Semaphore::new(cfg.maxconn)),
            dispatch: Mutex::new(Dispatch::new(servers.len())),
            servers,
            cfg,
            counters: Arc::default(),
            started: Instant::now(),
            events,
            cancels,
        }
    }

    pub(crate) fn dispatch(&self) -> MutexGuard<'_, Dispatch> {
        lock(&self.dispatch)
    }

    /// Sessions each server holds now, and the queue length.
    pub fn load(&self) -> (Vec<usize>, usize) {
        let d = self.dispatch();
        (d.current().to_vec(), d.queued())
    }

    pub fn server(&self, name: &str) -> Option<&Arc<ServerState>> {
        self.servers.iter().find(|s| s.cfg.name == name)
    }

    /// Servers that are up, split (active, backup).
    pub fn up_counts(&self) -> (usize, usize) {
        let active = self
            .servers
            .iter()
            .filter(|s| !s.cfg.backup && s.is_up())
            .count();
        let backup = self
            .servers
            .iter()
            .filter(|s| s.cfg.backup && s.is_up())
            .count();
        (active, backup)
    }
}

/// The whole process as the stats and admin see it: the listens now served (replaced as a
/// whole on reload) and process-wide facts.
#[derive(Debug)]
pub struct Process {
    listens: std::sync::RwLock<Arc<Vec<Arc<ListenState>>>>,
    pub maxconn: usize,
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
            listens: std::sync::RwLock::new(Arc::new(listens)),
            maxconn,
            workers,
            started: Instant::now(),
            reload_error: Mutex::new(None),
            serving: AtomicBool::new(true),
        }
    }

    pub fn listens(&self) -> Arc<Vec<Arc<ListenState>>> {
        Arc::clone(&self.listens.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set_listens(&self, listens: Vec<Arc<ListenState>>) {
        *self.listens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(listens);
    }

    pub fn snapshot(&self) -> crate::stats::Snapshot {
        crate::stats::snapshot(
            &self.listens(),
            self.maxconn,
            self.started,
            lock(&self.reload_error).clone(),
            self.workers.sessions(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Workers;

    #[test]
    fn a_striped_counter_adds_up_what_every_worker_counted() {
        let workers = Workers::start(3).expect("workers start");
        let pool = workers.pool();
        let counter = Arc::new(StripedCounter::default());
        counter.add(5); // off the workers: stripe 0, shared with worker 0
        for n in 0..pool.len() {
            let c = Arc::clone(&counter);
            let task = pool.handle(n).spawn(async move {
                for _ in 0..1000 {
                    c.add(3);
                }
                c.inc();
            });
            crate::workers::tests::wait(task).expect("task ran");
        }
        assert_eq!(counter.get(), 5 + 3 * 3001);
        let used = counter.0.iter().filter(|s| s.0.load(Relaxed) > 0).count();
        assert_eq!(
            used, 3,
            "one stripe per worker; other threads share worker 0's"
        );
    }
}
