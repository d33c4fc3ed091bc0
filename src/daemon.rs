//! The daemon: bind every listen, accept until told to stop, then shut down gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accept::{self, Shared};
use crate::config::Config;
use crate::state::ListenState;
use crate::state::Process;
use crate::{admin, alerts, cancel, checker, events, http, net};

/// Extra time given to sessions to unwind once told to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs pglb until `shutdown` completes. Binding errors are returned before any client
/// is accepted, so a bad port fails the start instead of running half a config.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let events = events::channel();
    let cancels = Arc::new(cancel::Registry::default());
    let listens: Vec<Arc<ListenState>> = config
        .listens
        .iter()
        .enumerate()
        .map(|(i, l)| {
            Arc::new(ListenState::new(
                i as u32 + 1,
                l.clone(),
                events.clone(),
                Arc::clone(&cancels),
            ))
        })
        .collect();
    let mut listeners = Vec::new();
    for l in &listens {
        let listener = net::bind(l.cfg.bind, l.cfg.backlog)
            .with_context(|| format!("listen '{}': cannot bind {}", l.cfg.name, l.cfg.bind))?;
        listeners.push(listener);
    }

    if let Some(path) = config.stats.as_ref().and_then(|s| s.state_file.as_ref()) {
        admin::load(path, &listens);
    }
    let process = Arc::new(Process::new(listens.clone(), config.global.maxconn));
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

    let tracker = TaskTracker::new();
    let close_sessions = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let shared = Shared::new(
        config.global.maxconn,
        tracker.clone(),
        close_sessions.clone(),
    );
    let stop_checks = CancellationToken::new();
    for l in &listens {
        checker::spawn(l, &stop_checks);
    }
    let mut loops = JoinSet::new();
    for (listener, l) in listeners.into_iter().zip(&listens) {
        info!(
            listen = %l.cfg.name,
            bind = %l.cfg.bind,
            balance = l.cfg.balance.as_str(),
            servers = l.servers.len(),
            "listening"
        );
        loops.spawn(accept::accept_loop(
            listener,
            Arc::clone(l),
            shared.clone(),
            stop_accepting.clone(),
        ));
    }

    shutdown.await;
    process
        .serving
        .store(false, std::sync::atomic::Ordering::Relaxed);
    stop_accepting.cancel();
    while loops.join_next().await.is_some() {}
    tracker.close();
    let grace = config.global.grace;
    let open: usize = listens
        .iter()
        .map(|l| l.counters.cur.load(std::sync::atomic::Ordering::Relaxed))
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
        close_sessions.cancel();
        let _ = tokio::time::timeout(CLOSE_WAIT, tracker.wait()).await;
    }
    stop_checks.cancel();
    stop_http.cancel();
    info!("pglb stopped");
    Ok(())
}
