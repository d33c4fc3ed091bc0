//! The stats model: one snapshot of every listen and server, read from `state`, and three
//! renderers of it (HTML for people, HAProxy's CSV for tools, Prometheus for metrics).

pub mod csv;
pub mod html;
pub mod prometheus;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::counters::Counter;
use crate::pick;
use crate::state::{Admin, ListenState, Process, ServerState};

/// The whole process at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: &'static str,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Client sessions open in the whole process.
    pub current_conns: usize,
    pub maxconn: usize,
    pub listens: Vec<ListenSnap>,
    /// Set when the last configuration reload failed (its error).
    pub reload_error: Option<String>,
    /// Client sessions on each worker thread.
    pub worker_sessions: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct ListenSnap {
    pub name: String,
    pub iid: u32,
    pub bind: String,
    pub balance: &'static str,
    /// TLS terminated by pglb; otherwise SSLRequests pass through to the servers (pglb
    /// cannot see the cancel keys of those sessions).
    pub tls_terminated: bool,
    /// Frontend: sessions now, max, limit, total.
    pub scur: usize,
    pub smax: usize,
    pub slim: usize,
    pub stot: u64,
    pub bin: u64,
    pub bout: u64,
    /// Refused by maxconn.
    pub denied: u64,
    /// Bad startup packets.
    pub ereq: u64,
    pub no_server: u64,
    /// Refused with a server's own error (every server tried refused the login).
    pub server_refused: u64,
    pub queue_timeouts: u64,
    /// CancelRequests with unknown keys dropped by the rate limit.
    pub cancels_limited: u64,
    pub rate: u64,
    pub rate_max: u64,
    pub qcur: usize,
    pub qmax: usize,
    pub servers: Vec<ServerSnap>,
    /// The BACKEND row: UP while any server can serve, and its history.
    pub backend: crate::state::BackendStatus,
    /// Session times of the BACKEND row.
    pub times: Times,
}

/// Average and highest queue, connect and total times of sessions, ms (HAProxy's
/// qtime/ctime/ttime and *_max).
#[derive(Debug, Clone, Copy, Default)]
pub struct Times {
    pub qtime: u64,
    pub ctime: u64,
    pub ttime: u64,
    pub qtime_max: u64,
    pub ctime_max: u64,
    pub ttime_max: u64,
}

impl Times {
    fn of(t: &crate::counters::SessionTimes) -> Self {
        Times {
            qtime: t.queue.average(),
            ctime: t.connect.average(),
            ttime: t.total.average(),
            qtime_max: t.queue.max(),
            ctime_max: t.connect.max(),
            ttime_max: t.total.max(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerSnap {
    pub name: String,
    pub sid: u32,
    pub addr: String,
    /// `UP`, `UP 1/3`, `DOWN`, `DOWN 1/2`, `DRAIN`, `MAINT`, `no check`.
    pub status: String,
    pub up: bool,
    pub admin: Admin,
    pub backup: bool,
    /// Removed by a reload; shown while its sessions drain.
    pub removed: bool,
    pub checked: bool,
    pub weight: u32,
    pub scur: usize,
    pub smax: usize,
    /// 0 when unlimited.
    pub slim: usize,
    pub stot: u64,
    pub bin: u64,
    pub bout: u64,
    pub econ: u64,
    /// Connection attempts to the server (HAProxy's `connect`).
    pub connects: u64,
    pub wretr: u64,
    pub wredis: u64,
    pub rate: u64,
    pub rate_max: u64,
    pub chkfail: u64,
    pub chkdown: u64,
    /// Seconds since the last UP/DOWN change.
    pub lastchg: u64,
    pub downtime: u64,
    /// Seconds since the last session, if any.
    pub lastsess: Option<u64>,
    pub check: Option<LastCheck>,
    pub check_kind: &'static str,
    pub rise: u32,
    pub fall: u32,
    pub health: u32,
    pub times: Times,
}

#[derive(Debug, Clone)]
pub struct LastCheck {
    /// HAProxy code: L4OK, L7STS…
    pub status: &'static str,
    pub description: &'static str,
    /// SQLSTATE when the server answered with an error.
    pub code: Option<String>,
    pub detail: String,
    pub duration_ms: u64,
    /// Seconds since it ran.
    pub age: u64,
}

impl ServerSnap {
    /// A row colour class shared by the HTML renderer and tests.
    pub fn state_class(&self) -> &'static str {
        match (self.admin, self.status.as_str()) {
            (Admin::Maint, _) => "maint",
            (Admin::Drain, _) if self.up => "drain",
            (_, s) if s.starts_with("UP ") => "going-down",
            (_, s) if s.starts_with("DOWN ") => "going-up",
            (_, "DOWN") => "down",
            _ if self.backup => "backup",
            (_, "no check") => "nocheck",
            _ => "up",
        }
    }
}

impl ListenSnap {
    /// The BACKEND row's status: UP while any server can serve.
    pub fn backend_up(&self) -> bool {
        self.backend.up
    }
}

/// Reads the current state of the whole process.
pub fn snapshot(process: &Process) -> Snapshot {
    let now = Instant::now();
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let listens: Vec<ListenSnap> = process
        .listens()
        .iter()
        .map(|l| listen_snap(l, now, unix_now))
        .collect();
    Snapshot {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        uptime_secs: now.duration_since(process.started).as_secs(),
        current_conns: listens.iter().map(|l| l.scur).sum(),
        maxconn: process.gate.limit(),
        listens,
        reload_error: crate::counters::lock(&process.reload_error).clone(),
        worker_sessions: process.worker_sessions(),
    }
}

fn listen_snap(l: &ListenState, now: Instant, unix_now: u64) -> ListenSnap {
    let c = &l.counters;
    let cfg = l.cfg();
    let (rate, rate_max) = c.rate.read();
    let qcur = pick::queue_len(l);
    let servers = l
        .servers()
        .iter()
        .chain(l.lingering().iter())
        .map(|s| server_snap(s, now, unix_now))
        .collect();
    ListenSnap {
        name: l.name.clone(),
        iid: l.iid(),
        bind: cfg.bind.to_string(),
        balance: cfg.balance.as_str(),
        tls_terminated: cfg.tls.is_some(),
        scur: c.cur.load(Relaxed),
        smax: c.smax.load(Relaxed),
        slim: l.gate.limit(),
        stot: c.stot.get(),
        bin: c.bin.get(),
        bout: c.bout.get(),
        denied: c.denied.get(),
        ereq: c.ereq.get(),
        no_server: c.no_server.get(),
        server_refused: c.server_refused.get(),
        queue_timeouts: c.queue_timeouts.get(),
        cancels_limited: c.cancels_limited.get(),
        rate,
        rate_max,
        qcur,
        qmax: c.qmax.load(Relaxed).max(qcur),
        servers,
        backend: l.backend_status(),
        times: Times::of(&c.times),
    }
}

fn server_snap(s: &ServerState, now: Instant, unix_now: u64) -> ServerSnap {
    let cfg = s.cfg();
    let h = s.health();
    let sc = &s.counters;
    let (rate, rate_max) = sc.rate.read();
    let last_session = sc.last_session.load(Relaxed);
    ServerSnap {
        name: s.name.clone(),
        sid: s.sid(),
        addr: cfg.addr.to_string(),
        status: s.status_of(&h),
        up: h.up && !s.is_removed(),
        admin: s.admin(),
        backup: s.is_backup(),
        removed: s.is_removed(),
        checked: h.checked,
        weight: s.weight(),
        scur: s.sessions(),
        smax: sc.smax.load(Relaxed),
        slim: s.maxconn(),
        stot: sc.stot.get(),
        bin: sc.bin.get(),
        bout: sc.bout.get(),
        econ: sc.econ.get(),
        connects: sc.connects.get(),
        wretr: sc.wretr.get(),
        wredis: sc.wredis.get(),
        rate,
        rate_max,
        chkfail: h.failures,
        chkdown: h.downs,
        lastchg: now.saturating_duration_since(h.changed).as_secs(),
        downtime: h.downtime(now).as_secs(),
        lastsess: (last_session > 0).then(|| unix_now.saturating_sub(last_session)),
        check: h.last.as_ref().map(|(r, at)| LastCheck {
            status: r.status.code(),
            description: r.status.description(),
            code: r.code.clone(),
            detail: r.detail.clone(),
            duration_ms: r.duration.as_millis() as u64,
            age: at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        }),
        check_kind: check_kind_name(cfg.check.kind),
        rise: h.rise,
        fall: h.fall,
        health: h.counter,
        times: Times::of(&sc.times),
    }
}

fn check_kind_name(kind: crate::config::CheckKind) -> &'static str {
    use crate::config::CheckKind::*;
    match kind {
        None => "none",
        Tcp => "tcp",
        Pgsql => "pgsql",
        Ssl => "ssl",
        Query => "query",
    }
}
