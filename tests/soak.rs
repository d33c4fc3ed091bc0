//! Chaos soak: clients open short sessions through pglb while a driver kills and restarts
//! PgBouncers at random (never all at once), drains servers and brings them back, and
//! reloads the configuration. `PGLB_SOAK_SECS` sets the length (default 60 s in CI).
//!
//! At the end: pglb never died; no new connection failed except the few that were talking
//! to a PgBouncer at the instant it was killed (and those failed loudly, none hung); pglb's
//! descriptors and memory are back near where they started; the stats add up. Run twice:
//! with the user-space relay and with `relay = "kernel"`.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use harness::{Pglb, Stack, edit, free_port, http_get, open_fds, rss_kib};
use tokio::sync::Mutex;

fn soak_secs() -> u64 {
    std::env::var("PGLB_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

fn config(port: u16, stats: u16, stack: &Stack, weight: u32, relay: &str) -> String {
    let check = "relay = \"RELAY\"\n[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nfastinter = \"100ms\"\ndowninter = \"200ms\"\nrise = 1\nfall = 2\nerror_limit = 2\n[listen.timeouts]\ndrain = \"5s\"\n"
        .replace("RELAY", relay);
    let servers = edit(
        &stack.servers_toml(),
        "addr =",
        &format!("weight = {weight}\naddr ="),
    );
    format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\n[stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n",
        Pglb::config(port, &check, &servers)
    )
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Connection (startup or login) failures, with when they happened.
    connect_failures: Mutex<Vec<(Instant, String)>>,
    /// Errors inside an established session (its PgBouncer was killed): loud, allowed.
    session_errors: AtomicU64,
    /// Operations that ran into the 10 s guard: never allowed.
    hangs: AtomicU64,
}

async fn client_loop(pglb_dsn: String, until: Instant, tally: Arc<Tally>) {
    while Instant::now() < until {
        let attempt = async {
            let (client, conn) = tokio_postgres::connect(&pglb_dsn, tokio_postgres::NoTls)
                .await
                .map_err(|e| (true, e.to_string()))?;
            tokio::spawn(conn);
            client
                .simple_query("BEGIN; SELECT abalance FROM pgbench_accounts WHERE aid = 1; COMMIT")
                .await
                .map_err(|e| (false, e.to_string()))?;
            Ok::<(), (bool, String)>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => {
                tally.ok.fetch_add(1, Relaxed);
            }
            Ok(Err((true, e))) => tally
                .connect_failures
                .lock()
                .await
                .push((Instant::now(), e)),
            Ok(Err((false, _))) => {
                tally.session_errors.fetch_add(1, Relaxed);
            }
            Err(_) => {
                tally.hangs.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Whether some server other than `i` is up and not drained (the chaos never takes the
/// last one away).
fn others_usable(alive: &[bool; 3], drained: Option<usize>, i: usize) -> bool {
    (0..3).any(|j| j != i && alive[j] && drained != Some(j))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_nothing_silently() {
    soak("user").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_with_the_kernel_relay_loses_nothing_silently() {
    let log = soak("kernel").await;
    let kernel = log
        .lines()
        .filter(|l| l.contains("relay=\"kernel\""))
        .count();
    assert!(kernel > 100, "sessions relayed in the kernel: {kernel}");
}

/// The soak with `[listen] relay = relay`; returns pglb's log.
async fn soak(relay: &str) -> String {
    let mut stack = Stack::start(3);
    stack.pg.pgbench_init();
    let (port, stats) = (free_port(), free_port());
    let mut pglb = Pglb::start(&config(port, stats, &stack, 100, relay), port);
    pglb.wait_log(&["is UP"], 3, Duration::from_secs(5));
    let pid = pglb.proc.pid();
    // Warm up, then take the baseline.
    for _ in 0..20 {
        let c = pglb.connect().await.expect("warm-up");
        c.simple_query("SELECT 1").await.expect("warm-up query");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    let secs = soak_secs();
    let until = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client_loop(pglb.dsn(), until, Arc::clone(&tally))))
        .collect();

    // The chaos driver, in this task: one action every 0.5–1.5 s.
    let mut kills: Vec<Instant> = Vec::new();
    let (mut restarts, mut drains, mut reloads) = (0, 0, 0);
    let mut alive = [true; 3];
    let mut drained: Option<usize> = None;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..1500))).await;
        match fastrand::u8(0..4) {
            0 => {
                let i = fastrand::usize(0..3);
                if alive[i] && others_usable(&alive, drained, i) {
                    kills.push(Instant::now());
                    stack.bouncers[i].kill();
                    alive[i] = false;
                }
            }
            1 => {
                if let Some(i) = (0..3).find(|i| !alive[*i]) {
                    stack.bouncers[i].restart();
                    alive[i] = true;
                    restarts += 1;
                }
            }
            2 => {
                let (i, action) = match drained.take() {
                    Some(i) => (i, "ready"),
                    None => {
                        let i = fastrand::usize(0..3);
                        if !others_usable(&alive, None, i) {
                            continue;
                        }
                        drained = Some(i);
                        (i, "drain")
                    }
                };
                harness::admin_action(stats, &format!("pgb{}", i + 1), action).await;
                drains += 1;
            }
            _ => {
                pglb.reload(&config(
                    port,
                    stats,
                    &stack,
                    [100, 150, 200][fastrand::usize(0..3)],
                    relay,
                ));
                reloads += 1;
            }
        }
    }
    for c in clients {
        c.await.expect("client loop");
    }
    for (i, b) in stack.bouncers.iter_mut().enumerate() {
        if !alive[i] {
            b.restart();
        }
    }

    let ok = tally.ok.load(Relaxed);
    let failures = tally.connect_failures.lock().await.clone();
    // A connect failure is excused only right after a kill (its PgBouncer died mid-login).
    let unexcused: Vec<&(Instant, String)> = failures
        .iter()
        .filter(|(at, _)| {
            !kills
                .iter()
                .any(|k| *at >= *k && at.duration_since(*k) < Duration::from_secs(2))
        })
        .collect();
    println!(
        "soak {secs}s: {ok} sessions ok, {} kills, {restarts} restarts, {drains} drain/ready, {reloads} reloads; \
         {} connect failures right after a kill, {} session errors (killed mid-session), {} hangs",
        kills.len(),
        failures.len() - unexcused.len(),
        tally.session_errors.load(Relaxed),
        tally.hangs.load(Relaxed)
    );
    assert!(pglb.proc.running(), "pglb died");
    assert!(ok > secs, "too little traffic went through: {ok}");
    assert!(
        unexcused.is_empty(),
        "new connections failed while servers were up: {unexcused:?}"
    );
    assert_eq!(tally.hangs.load(Relaxed), 0, "an operation hung");

    // Resources back near the start once the clients are gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fds_after, rss_after) = (open_fds(pid), rss_kib(pid));
    println!("pglb fds {fds_before} → {fds_after}, RSS {rss_before} → {rss_after} KiB");
    assert!(
        fds_after <= fds_before + 4,
        "descriptors leaked: {fds_before} → {fds_after}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grew: {rss_before} → {rss_after} KiB"
    );

    // Stats add up: sessions admitted = sessions ended (log lines) + sessions open.
    let (_, metrics) = http_get(stats, "/metrics").await;
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0) as u64
    };
    let admitted = value("pglb_listen_sessions_total{listen=\"postgres\"}");
    let open = value("pglb_listen_current_sessions{listen=\"postgres\"}");
    // The listen's counters live across reloads, so the whole log counts.
    let log = pglb.log();
    let ended = log
        .lines()
        .filter(|l| l.contains("session closed") || l.contains("session refused"))
        .count() as u64;
    assert_eq!(
        admitted,
        ended + open,
        "admitted {admitted} = ended {ended} + open {open}"
    );
    pglb.proc.stop();
    log
}
