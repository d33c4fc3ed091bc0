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
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::accept::{self, Shared};
use crate::config::Config;
use crate::events::Event;
use crate::notify::notify;
use crate::state::{self, ListenState, Process, lock};
use crate::workers::Pool;
use crate::{admin, alerts, cancel, checker, events, http, net, pick, reload};

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

/// One served listen: its socket's accept loop and the state it hands to new clients.
struct Served {
    bind: SocketAddr,
    current: watch::Sender<Arc<ListenState>>,
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
    /// Stops the health checks of the current generation of listens.
    checks: CancellationToken,
    workers: Arc<Pool>,
}

/// Runs pglb until `control.shutdown` completes. Binding errors are returned before any
/// client is accepted, so a bad port fails the start instead of running half a config.
pub async fn run<S: Future<Output = ()>>(
    config: Config,
    control: Control<S>,
) -> anyhow::Result<()> {
    let events = events::channel();
    let cancels = Arc::new(cancel::Registry::default());
    let listens = reload::next_generation(&[], &config.listens, &events, &cancels).listens;
    let mut listeners = Vec::new();
    for l in &listens {
        let listener = net::bind_std(l.cfg.bind, l.cfg.backlog)
            .with_context(|| format!("listen '{}': cannot bind {}", l.cfg.name, l.cfg.bind))?;
        listeners.push(listener);
    }
    if let Some(path) = config.stats.as_ref().and_then(|s| s.state_file.as_ref()) {
        admin::load(path, &listens);
    }
    let process = Arc::new(Process::new(
        listens.clone(),
        config.global.maxconn,
        Arc::clone(&control.workers),
    ));
    let stop_http = CancellationToken::new();
    if let Some(stats) = &config.stats {
        let listener = net::bind(stats.bind, 128)
            .with_context(|| format!("stats: cannot bind {}", stats.bind))?;
        info!(bind = %stats.bind, uri = %stats.uri, admin = stats.auth.is_some(), "stats listening");
        let ctx = Arc::new(http::Context {
            cfg: stats.clone(),
            process: Arc::clone(&process),
        });
        tokio::spawn(http::serve(listener, ctx, stop_http.clone()));
    }
    if let Some(a) = &config.alerts {
        tokio::spawn(alerts::run(
            a.clone(),
            events.subscribe(),
            stop_http.clone(),
        ));
    }

    anyhow::ensure!(!control.workers.is_empty(), "no worker to run sessions on");
    let tracker = TaskTracker::new();
    let close_sessions = CancellationToken::new();
    let mut daemon = Daemon {
        shared: Shared::new(
            config.global.maxconn,
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
        workers: control.workers,
    };
    for (listener, l) in listeners.into_iter().zip(&listens) {
        daemon.serve(listener, l);
    }
    for l in &listens {
        checker::spawn(l, &daemon.checks);
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

    notify("STOPPING=1\nSTATUS=stopping: waiting for sessions to finish");
    daemon.process.serving.store(false, Relaxed);
    for s in daemon.served.values() {
        s.stop.cancel();
    }
    while daemon.loops.join_next().await.is_some() {}
    tracker.close();
    let grace = daemon.config.global.grace;
    let open: usize = daemon
        .process
        .listens()
        .iter()
        .map(|l| l.counters.cur.load(Relaxed))
        .sum();
    info!(
        sessions = open,
        grace_s = grace.as_secs_f64(),
        "stopped accepting; waiting for sessions to finish"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            sessions = tracker.len(),
            "shutdown grace over: closing remaining sessions"
        );
        state::end_sessions(&close_sessions);
        let _ = tokio::time::timeout(CLOSE_WAIT, tracker.wait()).await;
    }
    daemon.checks.cancel();
    stop_http.cancel();
    info!("pglb stopped");
    Ok(())
}

impl Daemon {
    /// Starts accepting on `listener` for `listen`, on every worker.
    fn serve(&mut self, listener: std::net::TcpListener, listen: &Arc<ListenState>) {
        info!(
            listen = %listen.cfg.name,
            bind = %listen.cfg.bind,
            balance = listen.cfg.balance.as_str(),
            servers = listen.servers.len(),
            threads = self.workers.len(),
            "listening"
        );
        let (current, rx) = watch::channel(Arc::clone(listen));
        let stop = CancellationToken::new();
        for worker in 0..self.workers.len() {
            match listener.try_clone() {
                Ok(own) => {
                    let (current, shared) = (rx.clone(), self.shared.clone());
                    let task = accept::accept_loop(own, worker, current, shared, stop.clone());
                    self.loops.spawn_on(task, self.workers.handle(worker));
                }
                // Out of descriptors: fewer workers take this listen's clients.
                Err(e) => {
                    error!(listen = %listen.cfg.name, error = %e, "a worker cannot accept on this listen")
                }
            }
        }
        // `listener` closes here: each worker holds its own descriptor for the socket.
        self.served.insert(
            listen.cfg.name.clone(),
            Served {
                bind: listen.cfg.bind,
                current,
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
        if config.global.maxconn != self.config.global.maxconn {
            warn!("global maxconn changes take effect at the next restart");
        }
        if config.global.threads != self.config.global.threads {
            warn!("global threads changes take effect at the next restart");
        }
        if config.stats.as_ref().map(|s| s.bind) != self.config.stats.as_ref().map(|s| s.bind) {
            warn!("[stats] changes take effect at the next restart");
        }
        let old = self.process.listens();
        let next = reload::next_generation(&old, &config.listens, &self.events, &self.cancels);

        // Bind every new or moved listen first: if one fails, nothing changes.
        let mut fresh = Vec::new();
        for l in &next.listens {
            let moved = self
                .served
                .get(&l.cfg.name)
                .is_none_or(|s| s.bind != l.cfg.bind);
            if moved {
                let listener = net::bind_std(l.cfg.bind, l.cfg.backlog).map_err(|e| {
                    format!("listen '{}': cannot bind {}: {e}", l.cfg.name, l.cfg.bind)
                })?;
                fresh.push((listener, Arc::clone(l)));
            }
        }

        let (mut added, mut removed) = (0, 0);
        // Listens gone, or moved to another address: stop accepting there.
        let keep: Vec<(String, SocketAddr)> = next
            .listens
            .iter()
            .map(|l| (l.cfg.name.clone(), l.cfg.bind))
            .collect();
        self.served.retain(|name, s| {
            let stays = keep.iter().any(|(n, b)| n == name && *b == s.bind);
            if !stays {
                s.stop.cancel();
                removed += 1;
            }
            stays
        });
        for l in &next.listens {
            if let Some(s) = self.served.get(&l.cfg.name) {
                s.current.send_replace(Arc::clone(l));
            }
        }
        for (listener, l) in fresh {
            self.serve(listener, &l);
            added += 1;
        }
        // Sessions on servers that are gone end at their next transaction boundary.
        for s in &next.retired {
            s.set_draining(true);
        }
        self.checks.cancel();
        self.checks = CancellationToken::new();
        for l in &next.listens {
            checker::spawn(l, &self.checks);
            pick::servers_changed(l);
        }
        let servers: usize = next.listens.iter().map(|l| l.servers.len()).sum();
        let summary = format!(
            "{} listen(s) ({added} bound, {removed} closed), {servers} server(s), {} retired",
            next.listens.len(),
            next.retired.len()
        );
        self.process.set_listens(next.listens);
        self.config = config;
        Ok(summary)
    }
}
