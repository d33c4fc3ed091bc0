//! Promises that must hold under faults, each written as the failure story that once broke
//! it: reloads under held sessions, a SIGSTOPped PgBouncer, PgBouncers refusing logins, a
//! server closing on the SSLRequest, unknown-key cancel floods, cross-origin admin posts,
//! alerts queued at SIGTERM. (The flooded stats port is in `tests/control_plane.rs`.)

mod harness;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use harness::{
    Bouncer, BouncerOpts, ConfigText, Pglb, Stack, csv_field, free_port, http, http_get, http_with,
    stats_toml,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const ADMIN: Option<(&str, &str)> = Some(("admin", "s3cret"));

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn clients_per_bouncer(stack: &Stack) -> Vec<usize> {
    let mut n = Vec::new();
    for b in &stack.bouncers {
        n.push(b.app_clients().await);
    }
    n
}

fn servers_with(stack: &Stack, extra: &[&str]) -> String {
    stack
        .bouncers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "[[listen.server]]\nname = \"pgb{}\"\naddr = \"{}\"\n{}\n",
                i + 1,
                b.addr(),
                extra.get(i).copied().unwrap_or("")
            )
        })
        .collect()
}

/// Seen: listen maxconn 10 and server maxconn 4, two SIGHUPs with the file unchanged,
/// then 30 sessions were open and the PgBouncers held 11/10/9; after a reload that changed
/// a weight, a drain reached none of the older sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_maxconn_leastconn_and_drain_for_older_sessions() {
    let stack = Stack::start(3);
    let (port, stats) = (free_port(), free_port());
    let config = |weight: u32| {
        let w = format!("maxconn = 4\nweight = {weight}");
        Pglb::config_with_stats(
            port,
            "maxconn = 10\n[listen.timeouts]\nqueue = \"200ms\"",
            &servers_with(&stack, &[&w, "maxconn = 4", "maxconn = 4"]),
            stats,
        )
    };
    let pglb = Pglb::start(&config(100), port);
    let mut held = Vec::new();
    for round in 0..3 {
        // Clients arrive; two reloads with an unchanged file in between.
        for _ in 0..10 {
            if let Ok(c) = pglb.connect().await {
                held.push(c);
            }
        }
        pglb.reload(&config(100));
        pglb.wait_log(
            &["configuration reloaded"],
            round + 1,
            Duration::from_secs(5),
        );
    }
    assert_eq!(held.len(), 10, "listen maxconn 10 holds across reloads");
    assert_eq!(csv_field(stats, "FRONTEND", "scur").await, "10");
    assert_eq!(csv_field(stats, "FRONTEND", "slim").await, "10");
    let per = clients_per_bouncer(&stack).await;
    assert_eq!(per.iter().sum::<usize>(), 10, "{per:?}");
    assert!(per.iter().all(|&n| n <= 4), "server maxconn 4: {per:?}");

    // A reload that changes pgb1's weight, then a drain of pgb1: its older sessions end.
    pglb.reload(&config(50));
    pglb.wait_log(&["configuration reloaded"], 4, Duration::from_secs(5));
    assert_eq!(csv_field(stats, "pgb1", "weight").await, "50");
    harness::admin_action(stats, "pgb1", "drain").await;
    let on_pgb1 = per[0];
    assert!(on_pgb1 > 0);
    let mut ended = 0;
    for c in &held {
        if c.simple_query("SELECT 1").await.is_err() {
            ended += 1;
        }
    }
    wait_until(
        "pgb1's sessions drained",
        Duration::from_secs(5),
        || async { stack.bouncers[0].app_clients().await == 0 },
    )
    .await;
    assert!(ended <= on_pgb1, "only pgb1's sessions end");

    // A lowered maxconn applies to the next client at once.
    drop(held);
    wait_until("sessions closed", Duration::from_secs(5), || async {
        csv_field(stats, "FRONTEND", "scur").await == "0"
    })
    .await;
    pglb.reload(
        &ConfigText::new(config(50))
            .set("listen", "maxconn", 2)
            .build(),
    );
    pglb.wait_log(&["configuration reloaded"], 5, Duration::from_secs(5));
    let mut again = Vec::new();
    let mut refused = 0;
    for _ in 0..5 {
        match pglb.connect().await {
            Ok(c) => again.push(c),
            Err(e) => {
                let (code, _) = harness::db_error(&e).expect("an ErrorResponse");
                assert_eq!(code, "53300");
                refused += 1;
            }
        }
    }
    assert_eq!((again.len(), refused), (2, 3));
}

/// Seen: one of three PgBouncers stopped with SIGSTOP hung 2 of 6 new psql clients until
/// killed (the wait for its first answer used the 30-minute server timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_pgbouncer_does_not_hang_logins() {
    let stack = Stack::start(3);
    let port = free_port();
    let extra = "[listen.timeouts]\nlogin = \"1s\"\n[listen.check]\ntype = \"tcp\"\ninterval = \"500ms\"\nfall = 3\nrise = 2";
    let pglb = Pglb::start(&Pglb::config(port, extra, &stack.servers_toml()), port);
    pglb.wait_log(&["is UP"], 3, Duration::from_secs(5));
    let stopped = stack.bouncers[1].proc.as_ref().expect("running").pid();
    // A process this test started.
    let _ = kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP);
    let resume = scopeguard(stopped);
    let mut slowest = Duration::ZERO;
    let passive_down = "consecutive connection errors on live traffic, last: no answer";
    for i in 0..12 {
        if i >= 6 && pglb.log().contains(passive_down) {
            break;
        }
        let t0 = Instant::now();
        let out = Command::new("timeout")
            .args(["20", "psql", &format!("{} connect_timeout=0", pglb.dsn())])
            .args(["-X", "-At", "-c", "SELECT 1"])
            .env("PGPASSWORD", harness::APP_PASSWORD)
            .output()
            .expect("psql");
        slowest = slowest.max(t0.elapsed());
        assert!(
            out.status.success(),
            "client {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        slowest < Duration::from_secs(3),
        "slowest login {slowest:?}"
    );
    // The TCP check still connects to a stopped process (the kernel accepts): the failed
    // logins on live traffic are what mark it DOWN.
    let log = pglb.log();
    assert!(log.contains("no answer to the login within 1s"), "{log}");
    // Each miss counted towards passive health: error_limit (3) of them marked it DOWN.
    assert!(log.contains(passive_down), "{log}");
    drop(resume);
}

/// Seen: with `on_marked_down = "shutdown-sessions"`, a client waiting for a hung
/// server's first answer stayed there although the server was marked DOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_marked_down_releases_clients_still_logging_in() {
    let stack = Stack::start(1);
    // "hung" accepts connections (its TCP check passes) and never answers; closing its
    // listener later makes the check fail, while the accepted sockets stay open.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    hung.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_accepting = std::sync::Arc::clone(&stop);
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop_accepting.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = hung.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(hung);
        std::thread::sleep(Duration::from_secs(10));
        drop(held);
    });
    let servers = format!(
        "[[listen.server]]\nname = \"hung\"\naddr = \"{hung_addr}\"\non_marked_down = \"shutdown-sessions\"\n\
         [[listen.server]]\nname = \"pgb1\"\naddr = \"{}\"\n",
        stack.bouncers[0].addr()
    );
    let port = free_port();
    // A login timeout far longer than the test: only the DOWN can release the client.
    let extra = "balance = \"first\"\n[listen.timeouts]\nlogin = \"60s\"\n\
        [listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nfall = 1\nrise = 1\nerror_limit = 0";
    let pglb = Pglb::start(&Pglb::config(port, extra, &servers), port);
    pglb.wait_log(&["Server postgres/hung is UP"], 1, Duration::from_secs(5));
    let dsn = pglb.dsn();
    let t0 = Instant::now();
    let client = tokio::spawn(async move { harness::connect_dsn(&dsn).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !client.is_finished(),
        "the client waits on hung's first answer"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let c = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("released when hung was marked DOWN")
        .expect("join")
        .expect("replayed on pgb1");
    c.simple_query("SELECT 1").await.expect("query");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let log = pglb.log();
    assert!(log.contains("server marked DOWN while logging in"), "{log}");
    drop(holder);
}

/// Keeps a SIGSTOPped process from staying stopped when the test fails.
struct Resume(u32);

fn scopeguard(pid: u32) -> Resume {
    Resume(pid)
}

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

/// Seen: three PgBouncers answering `no more connections allowed (max_client_conn)`
/// reached psql as pglb's own "has no server available", counted as no_server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_server_refuses_psql_gets_the_last_servers_own_error() {
    let pg = harness::Postgres::start();
    let tiny = BouncerOpts {
        max_client_conn: 1,
        ..BouncerOpts::default()
    };
    let bouncers: Vec<Bouncer> = (0..3).map(|_| Bouncer::start(&pg, tiny.clone())).collect();
    let mut occupants = Vec::new();
    for b in &bouncers {
        let dsn = format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            b.port,
            harness::APP_USER,
            harness::APP_PASSWORD,
            harness::APP_DB
        );
        occupants.push(harness::connect_dsn_patiently(&dsn).await.expect("direct"));
    }
    let servers = harness::servers_toml(&bouncers);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_stats(port, "", &servers, stats);
    let pglb = Pglb::start(&config, port);
    let out = Command::new("psql")
        .arg(pglb.dsn())
        .args(["-X", "-At", "-c", "SELECT 1"])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no more connections allowed (max_client_conn)"),
        "psql shows PgBouncer's own words: {err}"
    );
    assert!(!err.contains("no server available"), "{err}");
    let log = pglb.wait_log(
        &["session refused", "refused=\"server-refused\""],
        1,
        Duration::from_secs(3),
    );
    let replays = log
        .lines()
        .filter(|l| l.contains("replaying it on another server"))
        .count();
    assert_eq!(replays, 3, "every server tried once: {log}");
    let (_, metrics) = http_get(stats, "/metrics").await;
    assert!(
        metrics
            .contains("pglb_listen_refused_total{listen=\"postgres\",reason=\"server_refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pglb_listen_refused_total{listen=\"postgres\",reason=\"no_server\"} 0"),
        "{metrics}"
    );
    drop(occupants);
}

/// Seen: with libpq's default `sslmode=prefer`, 3 of 9 logins failed ("early eof") when
/// one of three servers closed on the SSLRequest; with `sslmode=disable`, none did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrequest_logins_are_replayed_like_plaintext_ones() {
    let stack = Stack::start(2);
    // A server that closes every connection as soon as the SSLRequest arrives.
    let closer = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closer_addr = closer.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::Read;
        for mut s in closer.incoming().flatten() {
            let mut b = [0u8; 8];
            let _ = s.read_exact(&mut b);
        }
    });
    let servers = format!(
        "[[listen.server]]\nname = \"closer\"\naddr = \"{closer_addr}\"\n{}",
        stack.servers_toml()
    );
    let port = free_port();
    let pglb = Pglb::start(
        &Pglb::config(port, "balance = \"roundrobin\"", &servers),
        port,
    );
    for mode in ["prefer", "disable"] {
        for i in 0..9 {
            let out = Command::new("psql")
                .arg(format!("{} sslmode={mode}", pglb.dsn()))
                .args(["-X", "-At", "-c", "SELECT 1"])
                .env("PGPASSWORD", harness::APP_PASSWORD)
                .output()
                .expect("psql");
            assert!(
                out.status.success(),
                "sslmode={mode} login {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let log = pglb.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("replaying it on another server"))
            .count()
            >= 6,
        "the closer got its share and was skipped: {log}"
    );
}

/// Seen: 3,000 CancelRequests with random keys made 9,000 connections to the PgBouncers
/// in 0.9 s. Unknown keys are now rate-limited; a known key is never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_cancels_are_rate_limited_known_ones_never() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start(3);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_stats(port, "", &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    let victim = pglb.connect().await.expect("connect");
    let t0 = Instant::now();
    let mut sent = 0;
    for i in 0..3000u32 {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            continue;
        };
        let mut p = vec![0, 0, 0, 16, 4, 210, 22, 46];
        p.extend_from_slice(&(i as i32 + 100_000).to_be_bytes());
        p.extend_from_slice(&fastrand_bytes(i));
        if s.write_all(&p).await.is_ok() {
            sent += 1;
        }
    }
    let flood = t0.elapsed();
    // Meanwhile a real cancel for a known key goes through.
    let token = victim.cancel_token();
    let sleeper = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let r = tokio::time::timeout(Duration::from_secs(3), sleeper)
        .await
        .expect("the known-key cancel worked within 3 s")
        .expect("join");
    let e = r.expect_err("cancelled");
    assert_eq!(
        harness::db_error(&e).map(|(c, _)| c).as_deref(),
        Some("57014")
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, metrics) = http_get(stats, "/metrics").await;
    let limited: f64 = metrics
        .lines()
        .find(|l| l.starts_with("pglb_cancels_limited_total{listen=\"postgres\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let broadcast = pglb
        .log()
        .lines()
        .filter(|l| l.contains("sent to every server up"))
        .count();
    // 10/s per client with a burst of 20, for the length of the flood.
    let allowed = 20.0 + 10.0 * flood.as_secs_f64() + 10.0;
    assert!(
        (broadcast as f64) <= allowed,
        "{broadcast} unknown cancels broadcast in {flood:?} (sent {sent})"
    );
    assert!(
        limited >= f64::from(sent) - allowed,
        "limited {limited} of {sent}"
    );
    let (_, page) = http_get(stats, "/stats").await;
    assert!(
        page.contains(&format!(
            "{limited} unknown-key cancels dropped by the rate limit"
        )),
        "the dashboard shows the count"
    );
}

/// Seen: a server configured with `weight = 0` took clients during its slowstart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_takes_no_client_during_slowstart() {
    let stack = Stack::start(2);
    let port = free_port();
    // `first` would give every client to pgb1 if it were usable at all.
    let extra = "balance = \"first\"\n[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nrise = 1\nfall = 2";
    let servers = servers_with(&stack, &["weight = 0\nslowstart = \"20s\"", ""]);
    let pglb = Pglb::start(&Pglb::config(port, extra, &servers), port);
    pglb.wait_log(&["is UP"], 2, Duration::from_secs(5));
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(pglb.connect().await.expect("connect"));
    }
    assert_eq!(clients_per_bouncer(&stack).await, vec![0, 6]);
}

fn fastrand_bytes(seed: u32) -> [u8; 4] {
    (seed.wrapping_mul(2_654_435_761)).to_be_bytes()
}

/// Seen: a form POST from another origin ran `maint`; JSON sent as text/plain (no browser
/// preflight) ran `drain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_only_from_the_dashboards_own_origin() {
    use base64::Engine as _;
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_stats(port, "", &stack.servers_toml(), stats);
    let _pglb = Pglb::start(&config, port);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:s3cret")
    );
    let form = "b=postgres&s=pgb1&action=maint";
    let form_type = ("Content-Type", "application/x-www-form-urlencoded");
    let evil = [
        ("Authorization", basic.as_str()),
        form_type,
        ("Origin", "http://evil.example"),
    ];
    let (code, _, _) = http_with(stats, "POST", "/stats", &evil, form).await;
    assert_eq!(code, 403, "cross-origin form post");
    let referer = [
        ("Authorization", basic.as_str()),
        form_type,
        ("Referer", "http://evil.example/page"),
    ];
    let (code, _, _) = http_with(stats, "POST", "/stats", &referer, form).await;
    assert_eq!(code, 403, "cross-site referer");
    let fetch = [
        ("Authorization", basic.as_str()),
        form_type,
        ("Sec-Fetch-Site", "cross-site"),
    ];
    let (code, _, _) = http_with(stats, "POST", "/stats", &fetch, form).await;
    assert_eq!(code, 403, "Sec-Fetch-Site: cross-site");
    let body = "{\"action\": \"drain\"}";
    let (code, _, _) = http(
        stats,
        "POST",
        "/api/servers/postgres/pgb1",
        ADMIN,
        body,
        "text/plain",
    )
    .await;
    assert_eq!(code, 415, "JSON as text/plain is not taken");
    assert_eq!(csv_field(stats, "pgb1", "status").await, "no check");

    // The dashboard's own origin, and tools that send no Origin, still work; the scheme
    // name is case-insensitive.
    let own = format!("http://127.0.0.1:{stats}");
    let lower = basic.replacen("Basic", "basic", 1);
    let same = [
        ("Authorization", lower.as_str()),
        form_type,
        ("Origin", own.as_str()),
    ];
    let (code, _, _) = http_with(stats, "POST", "/stats", &same, form).await;
    assert_eq!(code, 303);
    assert_eq!(csv_field(stats, "pgb1", "status").await, "MAINT");
    let (code, _, _) = http(
        stats,
        "POST",
        "/api/servers/postgres/pgb1",
        ADMIN,
        "{\"action\": \"ready\"}",
        "application/json",
    )
    .await;
    assert_eq!(code, 200);

    // The form's other shapes: the listen by `#iid`, a weight; and a listen that does
    // not exist.
    let weight = "b=%231&s=pgb1&action=weight&weight=30";
    let (code, _, _) = http_with(stats, "POST", "/stats", &same, weight).await;
    assert_eq!(code, 303);
    assert_eq!(csv_field(stats, "pgb1", "weight").await, "30");
    let (code, _, _) = http(
        stats,
        "POST",
        "/api/servers/nope/pgb1",
        ADMIN,
        "{\"action\": \"drain\"}",
        "application/json",
    )
    .await;
    assert_eq!(code, 404, "an unknown listen");

    let (code, head, body) = http_with(stats, "HEAD", "/health", &[], "").await;
    assert_eq!(code, 200, "{head}");
    assert!(body.is_empty());
}

/// Without `[stats.auth]` the dashboard is read-only: an admin action is 403 with or
/// without credentials, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_configured_admin_actions_are_refused() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_open_stats(port, "", &stack.servers_toml(), stats);
    let _pglb = Pglb::start(&config, port);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let (code, _, body) = http_with(
        stats,
        "POST",
        "/stats",
        &[form],
        "b=postgres&s=pgb1&action=maint",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, _, _) = http(
        stats,
        "POST",
        "/api/servers/postgres/pgb1",
        ADMIN,
        "{\"action\": \"drain\"}",
        "application/json",
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(csv_field(stats, "pgb1", "status").await, "no check");
}

/// Seen: two state changes, then SIGTERM: 0 of 2 alerts delivered with coalesce = "10s".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_queued_at_sigterm_are_delivered() {
    let stack = Stack::start(2);
    let (hook, mut rx) = harness::webhook().await;
    let (port, stats) = (free_port(), free_port());
    let config = format!(
        "{}\n{}\n[alerts]\nwebhook_url = \"http://127.0.0.1:{hook}/hook\"\ncoalesce = \"10s\"\n",
        Pglb::config(port, "", &stack.servers_toml()),
        stats_toml(stats)
    );
    let mut pglb = Pglb::start(&config, port);
    harness::admin_action(stats, "pgb1", "drain").await;
    harness::admin_action(stats, "pgb2", "maint").await;
    let t0 = Instant::now();
    pglb.proc.stop();
    assert!(t0.elapsed() < Duration::from_secs(15), "stop is bounded");
    let mut texts = Vec::new();
    while let Ok(Some(body)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        texts.push(v["text"].as_str().unwrap_or_default().to_owned());
    }
    let all = texts.join("\n");
    assert!(
        all.contains("server 'pgb1'") && all.contains("DRAIN"),
        "{all}\n{}",
        pglb.log()
    );
    assert!(
        all.contains("server 'pgb2'") && all.contains("MAINT"),
        "{all}"
    );
}

/// A webhook that answers every request with `status`, or with `None` never answers
/// (holding the connection); returns its port and how many requests it got.
async fn failing_webhook(status: Option<u16>) -> (u16, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 8192];
            if !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                continue;
            }
            seen.fetch_add(1, Relaxed);
            match status {
                Some(code) => {
                    let head = format!(
                        "HTTP/1.1 {code} Failing\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                }
                None => held.push(s),
            }
        }
    });
    (port, count)
}

fn alerts_config(port: u16, stats: u16, stack: &Stack, hook: u16, coalesce: &str) -> String {
    format!(
        "{}\n{}\n[alerts]\nwebhook_url = \"http://127.0.0.1:{hook}/hook\"\ncoalesce = \"{coalesce}\"\n",
        Pglb::config(port, "", &stack.servers_toml()),
        stats_toml(stats)
    )
}

/// A webhook that keeps failing gets five attempts, with backoff, and then the loss is
/// logged with the message's text; pglb serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_webhook_keeps_refusing_is_retried_then_logged_as_lost() {
    let stack = Stack::start(2);
    let (hook, requests) = failing_webhook(Some(500)).await;
    let (port, stats) = (free_port(), free_port());
    let pglb = Pglb::start(&alerts_config(port, stats, &stack, hook, "100ms"), port);
    let t0 = Instant::now();
    harness::admin_action(stats, "pgb1", "drain").await;
    let log = pglb.wait_log(&["alert lost"], 1, Duration::from_secs(20));
    let took = t0.elapsed();
    let line = log.lines().find(|l| l.contains("alert lost")).unwrap_or("");
    assert!(
        line.contains("HTTP 500")
            && line.contains("after 5 attempts")
            && line.contains("server 'pgb1'"),
        "{line}"
    );
    assert_eq!(requests.load(Relaxed), 5, "five attempts");
    // Backoff 0.5 + 1 + 2 + 4 s between them.
    assert!(took >= Duration::from_secs(7), "retried too fast: {took:?}");
    let c = pglb.connect().await.expect("still serving");
    c.simple_query("SELECT 1").await.expect("query");
}

/// At SIGTERM, alerts a hung webhook cannot take are given up within the 10 s flush
/// time and each logged as lost at shutdown, with its text: the one whose delivery was
/// under way (retrying) and the one that came while it was; the stop stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_a_hung_webhook_cannot_take_is_logged_as_lost_at_shutdown() {
    let stack = Stack::start(2);
    let (hook, requests) = failing_webhook(None).await;
    let (port, stats) = (free_port(), free_port());
    let mut pglb = Pglb::start(&alerts_config(port, stats, &stack, hook, "100ms"), port);
    harness::admin_action(stats, "pgb2", "drain").await;
    // pgb2's alert is being delivered (its webhook never answers) when pgb1's comes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    harness::admin_action(stats, "pgb1", "maint").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    pglb.proc.signal(Signal::SIGTERM);
    let status = pglb.proc.wait_exit(Duration::from_secs(20));
    let took = t0.elapsed();
    let log = pglb.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("alert lost at shutdown"))
        .collect();
    for (server, state) in [("pgb2", "DRAIN"), ("pgb1", "MAINT")] {
        assert!(
            lost.iter()
                .any(|l| l.contains(&format!("server '{server}'")) && l.contains(state)),
            "{server} {state} not logged as lost:\n{log}"
        );
    }
    assert!(requests.load(Relaxed) >= 2, "both deliveries tried");
    // linger (100 ms here), then at most the 10 s flush.
    assert!(took < Duration::from_secs(12), "stop took {took:?}");
}
