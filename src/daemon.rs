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
use crate::config::Config;
use crate::events::Event;
use crate::notify::notify;
use crate::state::{self, ListenState, Process, lock};
use crate::workers::Pool;
use crate::{admin, alerts, cancel, checker, events, http, net, peers, pick, reload, runtime_api};

/// Extra time given to sessions to unwind once told to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What the daemon is told from outside.
pub struct Control<S> {
    /// Completes on SIGTERM/SIGINT.
    pub shutdown: S,
    /// One message per SIGHUP.
    pub reload: mpsc::UnboundedReceiver<()>,
    /// The file reloads read again.
    pub config_path: PathBuf,
    /// Where sessions run: every worker accepts on every listen (see [`crate::workers`]).
    pub workers: Arc<Pool>,
}

/// One served listen: its socket's accept loops.
struct Served {
    bind: SocketAddr,
    stop: CancellationToken,
}

/// Everything that lives across reloads.
struct Daemon {
    config: Config,
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
}

/// Runs pglb until `control.shutdown` completes. Binding errors are returned before any
/// client is accepted, so a bad port fails the start instead of running half a config.
pub async fn run<S: Future<Output = ()>>(
    config: Config,
    control: Control<S>,
) -> anyhow::Result<()> {
    let events = events::channel();
    let cancels = Arc::new(cancel::Registry::new(config.global.unknown_cancels));
    let listens = reload::apply(&[], &config.listens, &events, &cancels).listens;
    startup_warnings(&config);
    let mut listeners = Vec::new();
    for l in &listens {
        let cfg = l.cfg();
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
    if let Some(path) = config.stats.as_ref().and_then(|s| s.state_file.as_ref()) {
        admin::load(path, &listens);
    }
    let process = Arc::new(Process::new(
        listens.clone(),
        config.global.maxconn,
        peers::Peers::new(&config),
        Arc::clone(&control.workers),
    ));
    if !process.peers.list.is_empty() {
        // Before serving: the pair's newest operator state (bounded: 1 s per peer).
        peers::pull(&process).await;
    }
    let stop_http = CancellationToken::new();
    if let Some(stats) = &config.stats {
        let listener = net::bind(stats.bind, http::BACKLOG)
            .with_context(|| format!("stats: cannot bind {}", stats.bind))?;
        info!(bind = %stats.bind, uri = %stats.uri, admin = stats.auth.is_some(), "stats listening");
        let ctx = Arc::new(http::Context::new(stats.clone(), Arc::clone(&process)));
        tokio::spawn(http::serve(listener, ctx, stop_http.clone()));
        if let Some(spec) = &stats.socket {
            let socket = runtime_api::bind(spec)
                .with_context(|| format!("stats socket: cannot bind {spec:?}"))?;
            let ctx = Arc::new(runtime_api::Context {
                process: Arc::clone(&process),
                state_file: stats.state_file.clone(),
                threads: control.workers.len(),
            });
            tokio::spawn(runtime_api::serve(socket, ctx, stop_http.clone()));
        }
    }
    let stop_alerts = CancellationToken::new();
    let alerter = config.alerts.as_ref().map(|a| {
        tokio::spawn(alerts::run(
            a.clone(),
            events.subscribe(),
            stop_alerts.clone(),
        ))
    });

    anyhow::ensure!(!control.workers.is_empty(), "no worker to run sessions on");
    let tracker = TaskTracker::new();
    let close_sessions = CancellationToken::new();
    let mut daemon = Daemon {
        shared: Shared::new(
            Arc::clone(&process.gate),
            tracker.clone(),
            close_sessions.clone(),
            Arc::clone(&control.workers),
        ),
        config,
        process,
        events,
        cancels,
        served: HashMap::new(),
        loops: JoinSet::new(),
        checks: CancellationToken::new(),
        checks_thread: ChecksThread::start().context("cannot start the health-check thread")?,
        workers: control.workers,
    };
    for (listener, l) in listeners.into_iter().zip(&listens) {
        daemon.serve(listener, l);
    }
    for l in &listens {
        checker::spawn(l, &daemon.checks, daemon.checks_thread.handle());
    }
    if !daemon.process.peers.list.is_empty() {
        tokio::spawn(peers::run(Arc::clone(&daemon.process), stop_http.clone()));
    }
    notify(&format!(
        "READY=1\nSTATUS=serving {} listen(s)",
        listens.len()
    ));

    let Control {
        shutdown,
        mut reload,
        config_path,
        ..
    } = control;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => daemon.reload(&config_path),
        }
    }

    daemon.stop(&tracker, &close_sessions).await;
    daemon.checks.cancel();
    stop_http.cancel();
    // Alerts still queued go out now (bounded); any that cannot are logged as lost.
    stop_alerts.cancel();
    if let Some(alerter) = alerter
        && tokio::time::timeout(alerts::SHUTDOWN_FLUSH + CLOSE_WAIT, alerter)
            .await
            .is_err()
    {
        warn!("alerter did not finish: queued alerts lost");
    }
    info!("pglb stopped");
    Ok(())
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

/// A hint for a failed bind of a privileged port.
fn low_port_hint(addr: SocketAddr) -> &'static str {
    if addr.port() < 1024 {
        " (ports below 1024 need CAP_NET_BIND_SERVICE: see the comment in deploy/pglb.service)"
    } else {
        ""
    }
}

impl Daemon {
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
        for s in self.served.values() {
            s.stop.cancel();
        }
        while self.loops.join_next().await.is_some() {}
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
            },
        );
    }

    /// Re-reads the configuration. Invalid: the running one stays, and the error is
    /// logged and shown (stats page, /health). Valid: listens and servers are added,
    /// changed and removed without touching a running session.
    fn reload(&mut self, path: &std::path::Path) {
        notify("RELOADING=1\nSTATUS=reloading");
        match self.try_reload(path) {
            Ok(summary) => {
                *lock(&self.process.reload_error) = None;
                info!("configuration reloaded from {}: {summary}", path.display());
                notify(&format!("READY=1\nSTATUS=serving; reloaded: {summary}"));
            }
            Err(e) => {
                error!("reload failed, keeping the running configuration: {e}");
                *lock(&self.process.reload_error) = Some(e.clone());
                notify(&format!("READY=1\nSTATUS=serving; last reload failed: {e}"));
            }
        }
    }

    fn try_reload(&mut self, path: &std::path::Path) -> Result<String, String> {
        let config = Config::load(path).map_err(|e| e.to_string())?;
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
                let listener = net::bind_std(l.bind, l.backlog)
                    .map_err(|e| format!("listen '{}': cannot bind {}: {e}", l.name, l.bind))?;
                fresh.push((l.name.clone(), listener));
            }
        }

        // Limits a reload lowers apply to the next client.
        self.process.gate.set_limit(config.global.maxconn);
        self.cancels.set_limits(config.global.unknown_cancels);
        let old = self.process.listens();
        let applied = reload::apply(&old, &config.listens, &self.events, &self.cancels);

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
