//! The health checker: one task per checked server runs probes at HAProxy's intervals and
//! turns results into UP/DOWN transitions, with the log lines, events and side effects
//! (queue re-run, shutdown-sessions, slowstart) they imply. Passive health — connection
//! errors on live traffic — enters here too.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{CheckKind, OnMarkedDown};
use crate::events::Event;
use crate::health::{CheckResult, CheckStatus, Transition};
use crate::pick;
use crate::probe;
use crate::state::{ListenState, ServerState};

/// Starts the checks of every checked server of `listen` on `checks`, the runtime of
/// the checks thread (so that nothing else the process does can delay them).
pub fn spawn(listen: &Arc<ListenState>, stop: &CancellationToken, checks: &Handle) {
    for server in listen.servers().iter() {
        let cfg = server.cfg();
        if cfg.check.kind == CheckKind::None {
            continue;
        }
        let (listen, server, stop) = (Arc::clone(listen), Arc::clone(server), stop.clone());
        checks.spawn(async move {
            let probe = move || {
                let cfg = Arc::clone(&cfg);
                async move { probe::probe(&cfg.check, cfg.addr).await }
            };
            run(listen, server, probe, stop).await;
        });
    }
}

/// Waits (at most `limit`) until every checked server has had its first check.
pub async fn first_round(listens: &[Arc<ListenState>], limit: Duration) {
    let deadline = Instant::now() + limit;
    let pending = || {
        listens.iter().any(|l| {
            l.servers().iter().any(|s| {
                s.cfg().check.kind != CheckKind::None
                    && s.admin() != crate::state::Admin::Maint
                    && s.health().last.is_none()
            })
        })
    };
    while pending() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The thread that runs every health check on an event loop of its own: however busy
/// the stats server or the main thread get, checks keep their timing (a check delayed
/// past its timeout would mark a healthy server DOWN). Stopped when dropped.
pub struct ChecksThread {
    handle: Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChecksThread {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pglb-checks".into())
            .spawn(move || runtime.block_on(until.cancelled()))?;
        Ok(ChecksThread {
            handle,
            stop,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for ChecksThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The check loop of one server. `probe` is injected so tests can script results.
pub async fn run<F, Fut>(
    listen: Arc<ListenState>,
    server: Arc<ServerState>,
    mut probe: F,
    stop: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = CheckResult>,
{
    let check = server.cfg().check.clone();
    loop {
        // In maintenance the server is out of service and not checked; with checks
        // disabled by an operator, it is not checked either.
        if server.admin() != crate::state::Admin::Maint && !server.checks_disabled() {
            let result = tokio::select! {
                r = probe() => r,
                _ = stop.cancelled() => return,
            };
            record(&listen, &server, result);
        }
        let wait = jitter(server.health().next_interval(&check));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = server.wake_checker.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Spreads checks of many servers so they do not fire together: ±10 %.
fn jitter(d: Duration) -> Duration {
    let spread = d.as_millis() as u64 / 10;
    if spread == 0 {
        return d;
    }
    d + Duration::from_millis(fastrand::u64(0..=2 * spread)) - Duration::from_millis(spread)
}

/// Applies a check result to the server's health and acts on a transition.
pub fn record(listen: &Arc<ListenState>, server: &Arc<ServerState>, result: CheckResult) {
    let role_fallback = result.status == CheckStatus::L7Sts && result.primary == Some(true);
    server.fallback_ok.store(role_fallback, Relaxed);
    let (transition, before, first_up) = {
        let mut h = server.health();
        let before = h.status_text();
        let first_up = !h.ever_up;
        let t = h.record(result.clone(), Instant::now().into_std());
        server.set_up(h.up || server.checks_disabled());
        (t, before, first_up)
    };
    if let Some(t) = transition {
        // A new server passing its first checks is no change worth an alert: it is
        // logged (in HAProxy's words, as every transition), not published.
        let alert = !(first_up && t == Transition::WentUp);
        announce(listen, server, t, &before, &result, alert);
    }
}

/// Passive health: a connect on live traffic failed. After `error_limit` in a row the
/// server is marked DOWN at once and the checker takes over (fastinter until it rises).
pub fn connect_failed(
    listen: &Arc<ListenState>,
    server: &Arc<ServerState>,
    error: &std::io::Error,
) {
    let cfg = server.cfg();
    let limit = cfg.check.error_limit;
    if limit == 0 || cfg.check.kind == CheckKind::None {
        return;
    }
    // The run is ended by live traffic only (a server's answer, see `connect_succeeded`),
    // not by a passing check: a stopped process's kernel still passes a TCP check. As
    // HAProxy's error-limit, a run that marks the server DOWN starts over.
    let errors = server.consecutive_errors.fetch_add(1, Relaxed) + 1;
    if errors < limit {
        return;
    }
    server.consecutive_errors.store(0, Relaxed);
    let mut result = CheckResult::new(
        CheckStatus::L4Con,
        format!("{errors} consecutive connection errors on live traffic, last: {error}"),
    );
    result.code = None;
    let (transition, before) = {
        let mut h = server.health();
        let before = h.status_text();
        let t = h.force_down(result.clone(), Instant::now().into_std());
        server.set_up(h.up);
        (t, before)
    };
    if let Some(t) = transition {
        announce(listen, server, t, &before, &result, true);
        server.wake_checker.notify_one();
    }
}

/// A server answered a login on live traffic: the passive error streak ends.
pub fn connect_succeeded(server: &ServerState) {
    if server.consecutive_errors.load(Relaxed) != 0 {
        server.consecutive_errors.store(0, Relaxed);
    }
}

/// Logs a transition in HAProxy's words, publishes it, and applies its side effects.
fn announce(
    listen: &Arc<ListenState>,
    server: &Arc<ServerState>,
    t: Transition,
    before: &str,
    r: &CheckResult,
    alert: bool,
) {
    let name = format!("{}/{}", listen.name, server.name);
    let (active, backup) = listen.up_counts();
    let sessions = server.sessions();
    let queued = pick::queue_len(listen);
    let code = r
        .code
        .as_deref()
        .map(|c| format!(", code: {c}"))
        .unwrap_or_default();
    let ms = r.duration.as_millis();
    let reason = r.status.description();
    match t {
        Transition::WentDown => warn!(
            "Server {name} is DOWN, reason: {reason}{code}, info: \"{}\", check duration: {ms}ms. \
             {active} active and {backup} backup servers left. {sessions} sessions active, 0 requeued, \
             {queued} remaining in queue.",
            r.detail
        ),
        Transition::WentUp => info!(
            "Server {name} is UP, reason: {reason}{code}, info: \"{}\", check duration: {ms}ms. \
             {active} active and {backup} backup servers online. 0 sessions requeued, {queued} total in queue.",
            r.detail
        ),
    }
    if alert {
        alert_server(listen, server, before, reason, &r.detail);
        alert_listen(listen, server, t, active + backup);
    }
    side_effects(listen, server, t);
}

/// The server's own change, for the alerter and the stats.
fn alert_server(
    listen: &ListenState,
    server: &ServerState,
    before: &str,
    reason: &str,
    detail: &str,
) {
    publish(
        listen,
        Event {
            listen: listen.name.clone(),
            server: Some(server.name.clone()),
            from: before.to_owned(),
            to: server.health().status_text(),
            reason: if detail.is_empty() {
                reason.to_owned()
            } else {
                format!("{reason}: {detail}")
            },
            at: SystemTime::now(),
        },
    );
}

/// The listen as a whole: its last server went down, or it has one again.
fn alert_listen(listen: &ListenState, server: &ServerState, t: Transition, up: usize) {
    let event = |from: &str, to: &str, reason: String| Event {
        listen: listen.name.clone(),
        server: None,
        from: from.into(),
        to: to.into(),
        reason,
        at: SystemTime::now(),
    };
    match t {
        Transition::WentDown if up == 0 => {
            error!("listen '{}' has no server available!", listen.name);
            listen.no_server_announced.store(true, Relaxed);
            let reason = format!("last server {} went down", server.name);
            publish(listen, event("available", "no server available", reason));
        }
        Transition::WentUp if listen.no_server_announced.swap(false, Relaxed) => {
            info!("listen '{}' has servers again", listen.name);
            let reason = format!("server {} is UP", server.name);
            publish(listen, event("no server available", "available", reason));
        }
        _ => {}
    }
}

fn publish(listen: &ListenState, event: Event) {
    let _ = listen.events.send(event);
}

/// What a transition does to sessions, weights, the queue and the listen's history.
fn side_effects(listen: &Arc<ListenState>, server: &Arc<ServerState>, t: Transition) {
    listen.backend_status();
    match t {
        Transition::WentDown => {
            if server.cfg().on_marked_down == OnMarkedDown::ShutdownSessions {
                server.kill_sessions();
            }
            server.set_weight(server.base_weight());
        }
        Transition::WentUp => {
            if !server.cfg().slowstart.is_zero() {
                tokio::spawn(slowstart(Arc::clone(listen), Arc::clone(server)));
            }
        }
    }
    pick::servers_changed(listen);
}

/// Ramps the weight up to the operator's weight over `slowstart`, so a server that just
/// recovered is not flooded by leastconn (it has the fewest sessions of all). The target
/// is read at every step: an operator who changes the weight meanwhile is obeyed, and a
/// weight of 0 takes no sessions, slowstart or not.
async fn slowstart(listen: Arc<ListenState>, server: Arc<ServerState>) {
    let span = server.cfg().slowstart;
    let started = Instant::now();
    let step = (span / 20).max(Duration::from_millis(100));
    while started.elapsed() < span {
        if !server.is_up() {
            return;
        }
        let share = started.elapsed().as_secs_f64() / span.as_secs_f64();
        server.set_weight(ramp(server.base_weight(), share));
        tokio::time::sleep(step).await;
    }
    server.set_weight(server.base_weight());
    pick::servers_changed(&listen);
}

/// The weight `share` (0..1) of the way through a slowstart towards `target`: at least 1
/// while the target is not 0, never above the target.
fn ramp(target: u32, share: f64) -> u32 {
    if target == 0 {
        return 0;
    }
    ((f64::from(target) * share).ceil() as u32).clamp(1, target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn listen(rise: u32, fall: u32) -> Arc<ListenState> {
        let mut server = crate::pick::tests::server("pgb1", 0, false);
        server.check = crate::health::tests::check(rise, fall);
        let mut cfg = crate::pick::tests::listen_cfg(vec![server], Duration::from_secs(1));
        cfg.name = "pg".into();
        cfg.fallback_to_primary = true;
        Arc::new(ListenState::new(1, cfg, crate::events::channel()))
    }

    /// Scripted probe: returns the next result and records when it was called.
    fn scripted(
        results: Vec<bool>,
        calls: Arc<Mutex<Vec<Instant>>>,
    ) -> impl FnMut() -> std::future::Ready<CheckResult> {
        let mut results = results.into_iter();
        move || {
            calls.lock().expect("calls").push(Instant::now());
            let ok = results.next().unwrap_or(true);
            std::future::ready(if ok {
                CheckResult::new(CheckStatus::L4Ok, "")
            } else {
                CheckResult::new(CheckStatus::L4Con, "Connection refused")
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn intervals_follow_the_state() {
        let l = listen(2, 3);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut events = l.events.subscribe();
        let stop = CancellationToken::new();
        // pass (UP), pass, fail, fail, fail (DOWN), fail, pass, pass (UP)
        let script = vec![true, true, false, false, false, false, true, true];
        let task = tokio::spawn(run(
            Arc::clone(&l),
            Arc::clone(&l.servers()[0]),
            scripted(script, Arc::clone(&calls)),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(30)).await;
        stop.cancel();
        let _ = task.await;

        let calls = calls.lock().expect("calls").clone();
        let gaps: Vec<u64> = calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis() as u64)
            .collect();
        // Gap i follows result i: UP settled → interval 2s; failing → fastinter 500ms;
        // settled DOWN → downinter 5s; rising → fastinter. Each ±10 % jitter.
        let expected = [2000, 2000, 500, 500, 5000, 5000, 500, 2000];
        assert!(
            gaps.len() >= expected.len(),
            "only {} checks in 30 s: {gaps:?}",
            calls.len()
        );
        for (i, (&gap, &want)) in gaps.iter().zip(&expected).enumerate() {
            assert!(
                gap.abs_diff(want) <= want / 10 + 1,
                "gap {i}: {gap}ms, expected about {want}ms ({gaps:?})"
            );
        }
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push((e.from, e.to));
        }
        let to: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
        // The first pass is not announced; the recovery of the listen is.
        assert_eq!(
            to,
            ["DOWN", "no server available", "UP", "available"],
            "{seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn passive_errors_mark_down_at_the_limit() {
        let l = listen(2, 3);
        let s = Arc::clone(&l.servers()[0]);
        record(&l, &s, CheckResult::new(CheckStatus::L4Ok, ""));
        assert!(s.is_up());
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        connect_failed(&l, &s, &e);
        connect_failed(&l, &s, &e);
        assert!(s.is_up(), "two errors are below the limit");
        connect_failed(&l, &s, &e);
        assert!(!s.is_up());
        assert_eq!(s.health().status_text(), "DOWN");
    }

    #[test]
    fn slowstart_ramps_towards_the_operator_weight_never_above() {
        assert_eq!(ramp(100, 0.0), 1);
        assert_eq!(ramp(100, 0.5), 50);
        assert_eq!(ramp(100, 1.0), 100);
        assert_eq!(
            ramp(0, 0.5),
            0,
            "weight 0 takes no sessions during slowstart"
        );
        assert_eq!(ramp(10, 0.99), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_weight_set_during_slowstart_is_kept() {
        let l = listen(1, 1);
        let s = Arc::clone(&l.servers()[0]);
        let mut cfg = (*s.cfg()).clone();
        cfg.slowstart = Duration::from_secs(10);
        let mut lc = (*l.cfg()).clone();
        lc.servers = vec![cfg];
        l.reconfigure(1, lc);
        record(&l, &s, CheckResult::new(CheckStatus::L4Ok, ""));
        assert!(s.is_up());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            s.weight() > 1 && s.weight() < 100,
            "ramping: {}",
            s.weight()
        );
        s.set_base_weight(0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.weight(), 0, "set to 0 mid-ramp stays 0");
        assert!(!s.usable());
        s.set_base_weight(40);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            s.weight(),
            40,
            "ends at the operator's weight, not the configured 100"
        );
    }
}
