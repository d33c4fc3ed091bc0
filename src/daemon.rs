//! The daemon: bind every listen, accept until told to stop, reload on request, then shut
//! down gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::accept::{self, Shared};
use crate::checker::ChecksThread;
use crate::config::{Config, RelayMode};
use crate::events::Event;
use crate::notify::notify;
use crate::state::{self, ListenState, Process, lock};
use crate::workers::Pool;
use crate::{
    alerts, cancel, checker, events, http, kernel_relay, net, operator_state, peers, pick, reload,
    runtime_api, upgrade,
};

/// Why a reload left the running configuration in place.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("{0}")]
    Config(crate::config::ConfigError),
    #[error("reload task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("reading the configuration took longer than {0:?} (server names resolving?)")]
    Slow(Duration),
    #[error("listen '{listen}': cannot bind {addr}: {source}")]
    Bind {
        listen: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Extra time given to sessions to unwind once told to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long a reload may take to read the file (resolving names, loading certificates).
const LOAD_WAIT: Duration = Duration::from_secs(30);

/// What the daemon is asked to do while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: re-read the configuration, or, when the binary on disk has been replaced
    /// (a package upgrade), upgrade to it.
    Reload,
    /// SIGUSR2: upgrade to the binary on disk.
    Upgrade,
}

/// What the daemon is told from outside.
pub struct Control<S> {
    /// Completes on SIGTERM/SIGINT.
    pub shutdown: S,
    /// One message per SIGHUP (reload) or SIGUSR2 (upgrade).
    pub requests: mpsc::UnboundedReceiver<Request>,
    /// The file reloads read again.
    pub config_path: PathBuf,
    /// Where sessions run: every worker accepts on every listen (see [`crate::workers`]).
    pub workers: Arc<Pool>,
}

/// One served listen: its socket's accept loops, and a descriptor of the socket to hand
/// to a successor.
struct Served {
    bind: SocketAddr,
    stop: CancellationToken,
    handover: Option<std::net::TcpListener>,
}

/// Everything that lives across reloads.
struct Daemon {
    config: Config,
    config_path: PathBuf,
    process: Arc<Process>,
    events: broadcast::Sender<Event>,
    cancels: Arc<cancel::Registry>,
    served: HashMap<String, Served>,
    loops: JoinSet<()>,
    shared: Shared,
    /// Stops the health checks of the current configuration.
    checks: CancellationToken,
    /// Where the checks run.
    checks_thread: ChecksThread,
    workers: Arc<Pool>,
    /// The stats port and runtime API socket, to hand to a successor.
    stats_handover: Option<std::net::TcpListener>,
    /// The runtime API socket and its role ("socket" for Unix, "socket_tcp").
    socket_handover: Option<(&'static str, std::os::fd::OwnedFd)>,
    binary: upgrade::Binary,
    /// The other nodes of the pair.
    peers: Arc<peers::Peers>,
}

/// How the main loop ended.
enum Ending {
    /// SIGTERM/SIGINT.
    Stop,
    /// A successor serves on our sockets.
    HandedOver,
}

/// Runs pglb until `control.shutdown` completes. Binding errors are returned before any
/// client is accepted, so a bad port fails the start instead of running half a config.
pub async fn run<S: Future<Output = ()>>(
    config: Config,
    control: Control<S>,
) -> anyhow::Result<()> {
    let binary = upgrade::Binary::current();
    let mut inherited = upgrade::Inherited::from_env();
    let events = events::channel();
    let cancels = Arc::new(cancel::Registry::new(config.global.unknown_cancels));
    let listens = reload::apply(&[], &config.listens, &events).listens;
    startup_warnings(&config);
    prepare_kernel_relay(&config);
    let listeners = bind_listens(&listens, &mut inherited)?;
    if let Some(path) = config.stats.as_ref().and_then(|s| s.state_file.as_ref()) {
        operator_state::load(path, &listens);
    }
    let process = Arc::new(Process::new(
        listens.clone(),
        config.global.maxconn,
        Arc::clone(&control.workers),
    ));
    let peers = Arc::new(peers::Peers::new(&config));
    take_operator_state(&peers, &process, &inherited).await;
    let stop_http = CancellationToken::new();
    let http_tasks = TaskTracker::new();
    let (stats_handover, socket_handover) = start_stats(
        &config,
        &process,
        &peers,
        &mut inherited,
        control.workers.len(),
        (&stop_http, &http_tasks),
    )?;
    let (alerter, stop_alerts) = start_alerts(&config, &events);

    anyhow::ensure!(!control.workers.is_empty(), "no worker to run sessions on");
    let tracker = TaskTracker::new();
    let close_sessions = CancellationToken::new();
    let mut daemon = Daemon {
        shared: Shared::new(
            Arc::clone(&process.gate),
            tracker.clone(),
            close_sessions.clone(),
            Arc::clone(&control.workers),
            Arc::clone(&cancels),
        ),
        config,
        config_path: control.config_path.clone(),
        process,
        events,
        cancels,
        served: HashMap::new(),
        loops: JoinSet::new(),
        checks: CancellationToken::new(),
        checks_thread: ChecksThread::start().context("cannot start the health-check thread")?,
        workers: control.workers,
        stats_handover,
        socket_handover,
        binary,
        peers,
    };
    daemon
        .start_serving(&listens, listeners, &stop_http, &inherited)
        .await;

    let ending = daemon.main_loop(control.shutdown, control.requests).await;
    match ending {
        Ending::Stop => daemon.stop(&tracker, &close_sessions).await,
        Ending::HandedOver => daemon.wind_down(&tracker, &close_sessions).await,
    }
    daemon.checks.cancel();
    stop_http.cancel();
    http_tasks.close();
    // The runtime API removes its socket file on its way out.
    let _ = tokio::time::timeout(Duration::from_secs(1), http_tasks.wait()).await;
    flush_alerts(alerter, &stop_alerts).await;
    info!("pglb stopped");
    Ok(())
}

/// The alerter, when alerts are configured, and the token that stops it.
fn start_alerts(
    config: &Config,
    events: &broadcast::Sender<Event>,
) -> (Option<tokio::task::JoinHandle<()>>, CancellationToken) {
    let stop = CancellationToken::new();
    let alerter = config
        .alerts
        .as_ref()
        .map(|a| tokio::spawn(alerts::run(a.clone(), events.subscribe(), stop.clone())));
    (alerter, stop)
}

/// Alerts still queued go out now (bounded); any that cannot are logged as lost.
async fn flush_alerts(alerter: Option<tokio::task::JoinHandle<()>>, stop: &CancellationToken) {
    stop.cancel();
    if let Some(alerter) = alerter
        && tokio::time::timeout(alerts::SHUTDOWN_FLUSH + CLOSE_WAIT, alerter)
            .await
            .is_err()
    {
        warn!("alerter did not finish: queued alerts lost");
    }
}

/// How long a start waits for the first check of every server before taking clients.
const FIRST_CHECKS: Duration = Duration::from_secs(2);

/// Each listen's socket: handed over by the previous process, or bound now.
fn bind_listens(
    listens: &[Arc<ListenState>],
    inherited: &mut upgrade::Inherited,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::new();
    for l in listens {
        let cfg = l.cfg();
        if let Some(listener) = inherited.take_tcp(&format!("listen:{}", l.name), cfg.bind) {
            info!(listen = %l.name, bind = %cfg.bind, "listening socket taken over from the previous process");
            listeners.push(listener);
            continue;
        }
        let listener = net::bind_std(cfg.bind, cfg.backlog).with_context(|| {
            format!(
                "listen '{}': cannot bind {}{}",
                l.name,
                cfg.bind,
                low_port_hint(cfg.bind)
            )
        })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The previous process's operator state (an upgrade), then the pair's newest (peers).
async fn take_operator_state(
    peers: &peers::Peers,
    process: &Process,
    inherited: &upgrade::Inherited,
) {
    if let Some(state) = &inherited.state
        && let Ok(msg) = serde_json::from_str::<peers::StateMessage>(state)
    {
        let n = peers::merge(peers, process, &msg);
        info!(
            servers = n,
            "operator state taken over from the previous process"
        );
    }
    if !peers.list.is_empty() {
        // Before serving: the pair's newest operator state (bounded: 1 s per peer).
        peers::pull(peers, process).await;
    }
}

type Handovers = (
    Option<std::net::TcpListener>,
    Option<(&'static str, std::os::fd::OwnedFd)>,
);

/// The stats server and the runtime API, on sockets handed over or bound now; returns
/// descriptors of both for a successor.
fn start_stats(
    config: &Config,
    process: &Arc<Process>,
    peers: &Arc<peers::Peers>,
    inherited: &mut upgrade::Inherited,
    threads: usize,
    (stop, tasks): (&CancellationToken, &TaskTracker),
) -> anyhow::Result<Handovers> {
    let Some(stats) = &config.stats else {
        return Ok((None, None));
    };
    let std_listener = match inherited.take_tcp("stats", stats.bind) {
        Some(l) => l,
        None => net::bind_std(stats.bind, http::BACKLOG)
            .with_context(|| format!("stats: cannot bind {}", stats.bind))?,
    };
    let stats_handover = std_listener.try_clone().ok();
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    info!(bind = %stats.bind, uri = %stats.uri, admin = stats.auth.is_some(), "stats listening");
    let ctx = Arc::new(http::Context::new(
        stats.clone(),
        Arc::clone(process),
        Arc::clone(peers),
    ));
    tasks.spawn(http::serve(listener, ctx, stop.clone()));
    let Some(spec) = &stats.socket else {
        return Ok((stats_handover, None));
    };
    let bind =
        || runtime_api::bind(spec).with_context(|| format!("stats socket: cannot bind {spec:?}"));
    let socket = match spec {
        crate::config::SocketSpec::Unix { path, .. } => match inherited.take_unix() {
            Some(l) => runtime_api::Listener::inherited(l, path)?,
            None => bind()?,
        },
        crate::config::SocketSpec::Tcp(addr) => match inherited.take_tcp("socket_tcp", *addr) {
            Some(l) => runtime_api::Listener::inherited_tcp(l)?,
            None => bind()?,
        },
    };
    let socket_handover = socket.handover();
    let ctx = Arc::new(runtime_api::Context {
        process: Arc::clone(process),
        peers: Arc::clone(peers),
        state_file: stats.state_file.clone(),
        threads,
    });
    tasks.spawn(runtime_api::serve(socket, ctx, stop.clone()));
    Ok((stats_handover, socket_handover))
}

/// What an operator should know before pglb serves (HAProxy warns the same way).
fn startup_warnings(config: &Config) {
    let servers: usize = config.listens.iter().map(|l| l.servers.len()).sum();
    let need = net::descriptors_needed(config.global.maxconn, servers);
    if let Some(limit) = net::open_files_limit()
        && limit < need
    {
        warn!(
            limit,
            needed = need,
            maxconn = config.global.maxconn,
            "the open-files limit is below what [global] maxconn needs (2 per session plus \
             checks and listeners): clients will be refused with EMFILE before maxconn; \
             raise LimitNOFILE (ulimit -n) or lower maxconn"
        );
    }
}

/// Loads the kernel relay when a listen asks for it (once per process: a reload that
/// turns it on loads it then), and says which listens use it.
fn prepare_kernel_relay(config: &Config) {
    let wanted: Vec<&str> = config
        .listens
        .iter()
        .filter(|l| l.relay == RelayMode::Kernel)
        .map(|l| l.name.as_str())
        .collect();
    if wanted.is_empty() {
        return;
    }
    let sessions = u32::try_from(config.global.maxconn).unwrap_or(u32::MAX);
    match kernel_relay::prepare(sessions) {
        Ok(held) if held < sessions => warn!(
            listens = ?wanted,
            kernel_sessions = held,
            maxconn = sessions,
            "kernel relay ready, but its maps were sized at start for fewer sessions than \
             [global] maxconn now allows: sessions past that relay in user space until pglb \
             restarts"
        ),
        Ok(_) => info!(
            listens = ?wanted,
            "kernel relay ready (self-test passed): plaintext sessions of these listens are relayed in the kernel after their login"
        ),
        Err(why) => warn!(
            listens = ?wanted,
            reason = %why,
            "kernel relay unavailable: these listens relay in user space"
        ),
    }
}

/// A hint for a failed bind of a privileged port.
fn low_port_hint(addr: SocketAddr) -> &'static str {
    if addr.port() < 1024 {
        " (ports below 1024 need CAP_NET_BIND_SERVICE: see the comment in deploy/pglb.service)"
    } else {
        ""
    }
}

impl Daemon {
    /// Starts the checks, waits (bounded) for every server's first one, then takes
    /// clients: a restarted or upgraded pglb does not turn clients away while it learns
    /// who is UP. Then the pair's exchange, and readiness for systemd and a predecessor.
    async fn start_serving(
        &mut self,
        listens: &[Arc<ListenState>],
        listeners: Vec<std::net::TcpListener>,
        stop_http: &CancellationToken,
        inherited: &upgrade::Inherited,
    ) {
        for l in listens {
            checker::spawn(l, &self.checks, self.checks_thread.handle());
        }
        checker::first_round(listens, FIRST_CHECKS).await;
        for (listener, l) in listeners.into_iter().zip(listens) {
            self.serve(listener, l);
        }
        if !self.peers.list.is_empty() {
            let (peers, process) = (Arc::clone(&self.peers), Arc::clone(&self.process));
            tokio::spawn(peers::run(peers, process, stop_http.clone()));
        }
        notify(&format!(
            "READY=1\nSTATUS=serving {} listen(s)",
            listens.len()
        ));
        if inherited.is_upgrade() {
            upgrade::announce_ready();
        }
    }

    /// Serves until a stop signal or a successful upgrade.
    async fn main_loop<S: Future<Output = ()>>(
        &mut self,
        shutdown: S,
        mut requests: mpsc::UnboundedReceiver<Request>,
    ) -> Ending {
        tokio::pin!(shutdown);
        loop {
            let request = tokio::select! {
                _ = &mut shutdown => return Ending::Stop,
                Some(r) = requests.recv() => r,
            };
            let path = self.config_path.clone();
            // A stop signal wins over a reload or an upgrade in progress (which is then
            // abandoned: a successor not yet serving is killed).
            let upgraded = tokio::select! {
                _ = &mut shutdown => return Ending::Stop,
                upgraded = async {
                    match request {
                        Request::Reload if !self.binary.replaced() => {
                            self.reload(&path).await;
                            false
                        }
                        _ => self.upgrade().await,
                    }
                } => upgraded,
            };
            if upgraded {
                return Ending::HandedOver;
            }
        }
    }

    /// Starts the binary on disk on this process's sockets; true once it serves.
    async fn upgrade(&mut self) -> bool {
        notify("RELOADING=1\nSTATUS=upgrading: starting the new binary on the same sockets");
        info!(binary = %self.binary.path.display(), "upgrade: starting the new binary on the same sockets");
        let mut sockets: Vec<(String, std::os::fd::OwnedFd)> = Vec::new();
        for (name, s) in &self.served {
            if let Some(l) = s.handover.as_ref().and_then(|l| l.try_clone().ok()) {
                sockets.push((format!("listen:{name}"), l.into()));
            }
        }
        if let Some(l) = self
            .stats_handover
            .as_ref()
            .and_then(|l| l.try_clone().ok())
        {
            sockets.push(("stats".into(), l.into()));
        }
        if let Some((role, fd)) = &self.socket_handover
            && let Ok(fd) = fd.try_clone()
        {
            sockets.push(((*role).into(), fd));
        }
        let state =
            serde_json::to_string(&peers::state(&self.peers, &self.process)).unwrap_or_default();
        let args = vec![
            "--config".to_owned(),
            self.config_path.display().to_string(),
        ];
        match upgrade::start_successor(&self.binary.path, &args, sockets, state).await {
            Ok(pid) => {
                info!(
                    pid,
                    "upgrade: the new process serves; this one stops accepting and lets its sessions end"
                );
                notify(&format!(
                    "MAINPID={pid}\nREADY=1\nSTATUS=upgraded: pid {pid} serves"
                ));
                true
            }
            Err(e) => {
                error!("upgrade failed, this process goes on serving: {e}");
                notify("READY=1\nSTATUS=serving; last upgrade failed");
                false
            }
        }
    }

    /// After a hand-over: stop accepting (the successor accepts on the same sockets, so
    /// nothing is refused and `/health` keeps answering), end sessions at their
    /// transaction boundary, `grace` as the cap.
    async fn wind_down(&mut self, tracker: &TaskTracker, close_sessions: &CancellationToken) {
        state::STOPPING.store(true, Relaxed);
        state::HANDED_OVER.store(true, Relaxed);
        self.stop_accepting().await;
        for l in self.process.listens().iter() {
            l.drain_running();
        }
        tracker.close();
        if tokio::time::timeout(self.config.global.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = tracker.len(),
                "upgrade: grace over, closing remaining sessions"
            );
            state::end_sessions(close_sessions);
            let _ = tokio::time::timeout(CLOSE_WAIT, tracker.wait()).await;
        }
    }

    /// Ends every accept loop and closes this process's descriptors of the listening
    /// sockets (after a hand-over the successor holds its own): from now on the ports
    /// refuse, or belong to the successor.
    async fn stop_accepting(&mut self) {
        for s in self.served.values_mut() {
            s.stop.cancel();
            s.handover = None;
        }
        while self.loops.join_next().await.is_some() {}
    }

    /// The stop sequence: `/health` turns DOWN at once (keepalived moves the VIP) while
    /// the listeners keep accepting for `linger`; sessions idle outside a transaction end
    /// at once with 57P01, the others at their next boundary; `grace` (from the signal)
    /// is the hard cap.
    async fn stop(&mut self, tracker: &TaskTracker, close_sessions: &CancellationToken) {
        let started = tokio::time::Instant::now();
        let (grace, linger) = (self.config.global.grace, self.config.global.linger);
        notify(
            "STOPPING=1\nSTATUS=stopping: /health says DOWN, sessions end at their transaction boundary",
        );
        self.process.serving.store(false, Relaxed);
        state::STOPPING.store(true, Relaxed);
        let drain_all = |process: &Process| {
            for l in process.listens().iter() {
                l.drain_running();
            }
        };
        drain_all(&self.process);
        info!(
            linger_s = linger.as_secs_f64(),
            "stopping: /health says DOWN; still accepting while the VIP moves away"
        );
        tokio::time::sleep(linger).await;
        self.stop_accepting().await;
        // Sessions that started while lingering end at their boundary too.
        drain_all(&self.process);
        tracker.close();
        let open: usize = self
            .process
            .listens()
            .iter()
            .map(|l| l.counters.cur.load(Relaxed))
            .sum();
        let left = grace.saturating_sub(started.elapsed());
        info!(
            sessions = open,
            grace_left_s = left.as_secs_f64(),
            "stopped accepting; waiting for sessions to end at their transaction boundary"
        );
        if tokio::time::timeout(left, tracker.wait()).await.is_err() {
            warn!(
                sessions = tracker.len(),
                "shutdown grace over: closing remaining sessions"
            );
            state::end_sessions(close_sessions);
            let _ = tokio::time::timeout(CLOSE_WAIT, tracker.wait()).await;
        }
    }

    /// Starts accepting on `listener` for `listen`, on every worker.
    fn serve(&mut self, listener: std::net::TcpListener, listen: &Arc<ListenState>) {
        info!(
            listen = %listen.name,
            bind = %listen.cfg().bind,
            balance = listen.cfg().balance.as_str(),
            servers = listen.servers().len(),
            threads = self.workers.len(),
            "listening"
        );
        let stop = CancellationToken::new();
        let handover = listener.try_clone().ok();
        for worker in 0..self.workers.len() {
            match listener.try_clone() {
                Ok(own) => {
                    let (listen, shared) = (Arc::clone(listen), self.shared.clone());
                    let task = accept::accept_loop(own, worker, listen, shared, stop.clone());
                    self.loops.spawn_on(task, self.workers.handle(worker));
                }
                // Out of descriptors: fewer workers take this listen's clients.
                Err(e) => {
                    error!(listen = %listen.name, error = %e, "a worker cannot accept on this listen")
                }
            }
        }
        // `listener` closes here: each worker holds its own descriptor for the socket.
        self.served.insert(
            listen.name.clone(),
            Served {
                bind: listen.cfg().bind,
                stop,
                handover,
            },
        );
    }

    /// Re-reads the configuration. Invalid: the running one stays, and the error is
    /// logged and shown (stats page, /health). Valid: listens and servers are added,
    /// changed and removed without touching a running session.
    async fn reload(&mut self, path: &std::path::Path) {
        notify("RELOADING=1\nSTATUS=reloading");
        // Reading the file resolves server names and loads certificates: off this thread,
        // which also serves the stats port and /health (a slow resolver must not stall it).
        let file = path.to_owned();
        let load = tokio::task::spawn_blocking(move || Config::load(&file));
        let loaded = match tokio::time::timeout(LOAD_WAIT, load).await {
            Ok(Ok(loaded)) => loaded.map_err(ReloadError::Config),
            Ok(Err(e)) => Err(ReloadError::Task(e)),
            Err(_) => Err(ReloadError::Slow(LOAD_WAIT)),
        };
        match loaded.and_then(|config| self.try_reload(config)) {
            Ok(summary) => {
                *lock(&self.process.reload_error) = None;
                info!("configuration reloaded from {}: {summary}", path.display());
                notify(&format!("READY=1\nSTATUS=serving; reloaded: {summary}"));
            }
            Err(e) => {
                error!("reload failed, keeping the running configuration: {e}");
                *lock(&self.process.reload_error) = Some(e.to_string());
                notify(&format!("READY=1\nSTATUS=serving; last reload failed: {e}"));
            }
        }
    }

    fn try_reload(&mut self, config: Config) -> Result<String, ReloadError> {
        if config.global.threads != self.config.global.threads {
            warn!("global threads changes take effect at the next restart");
        }
        if config.stats.as_ref().map(|s| s.bind) != self.config.stats.as_ref().map(|s| s.bind) {
            warn!("[stats] changes take effect at the next restart");
        }
        // Bind every new or moved listen first: if one fails, nothing changes.
        let mut fresh = Vec::new();
        for l in &config.listens {
            let moved = self.served.get(&l.name).is_none_or(|s| s.bind != l.bind);
            if moved {
                let listener =
                    net::bind_std(l.bind, l.backlog).map_err(|source| ReloadError::Bind {
                        listen: l.name.clone(),
                        addr: l.bind,
                        source,
                    })?;
                fresh.push((l.name.clone(), listener));
            }
        }

        prepare_kernel_relay(&config);
        // Limits a reload lowers apply to the next client.
        self.process.gate.set_limit(config.global.maxconn);
        self.cancels.set_limits(config.global.unknown_cancels);
        let old = self.process.listens();
        let applied = reload::apply(&old, &config.listens, &self.events);

        // Listens gone, or moved to another address: stop accepting there.
        let (mut added, mut removed) = (0, 0);
        self.served.retain(|name, s| {
            let stays = config
                .listens
                .iter()
                .any(|l| l.name == *name && l.bind == s.bind);
            if !stays {
                s.stop.cancel();
                removed += 1;
            }
            stays
        });
        for (name, listener) in fresh {
            if let Some(l) = applied.listens.iter().find(|l| l.name == name) {
                self.serve(listener, &Arc::clone(l));
                added += 1;
            }
        }
        self.checks.cancel();
        self.checks = CancellationToken::new();
        for l in &applied.listens {
            checker::spawn(l, &self.checks, self.checks_thread.handle());
            pick::servers_changed(l);
        }
        let servers: usize = applied.listens.iter().map(|l| l.servers().len()).sum();
        let lingering: usize = applied.listens.iter().map(|l| l.lingering().len()).sum();
        let summary = format!(
            "{} listen(s) ({added} bound, {removed} closed), {servers} server(s), \
             {lingering} removed server(s) draining, {} removed listen(s)",
            applied.listens.len(),
            applied.removed.len()
        );
        self.process.set_listens(applied.listens);
        self.config = config;
        Ok(summary)
    }
}
