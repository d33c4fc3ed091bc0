//! Resource abuse and secrets: idle floods, running out of descriptors, clients that stop
//! reading, maxconn, and passwords that must never show.

mod harness;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, free_port, http_get, open_fds, rss_kib};

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // Fields after the command: state is not numeric, so utime/stime are at 10 and 11 here.
    (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) as f64 / 100.0
}

/// Time for a real client to connect, log in and run a query through pglb.
async fn login_time(pglb: &Pglb) -> Duration {
    let started = Instant::now();
    let c = pglb.connect().await.expect("real client connects");
    c.simple_query("SELECT 1").await.expect("query");
    started.elapsed()
}

async fn median_login(pglb: &Pglb) -> Duration {
    let mut times = Vec::new();
    for _ in 0..7 {
        times.push(login_time(pglb).await);
    }
    times.sort();
    times[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_silent_connections_do_not_delay_a_real_client() {
    let stack = Stack::start(1);
    let port = free_port();
    // Production-like limits: the silent connections count against maxconn, as in HAProxy.
    let config = ConfigText::new(Pglb::config(
        port,
        "[listen.timeouts]\nstartup = \"3s\"\n",
        &stack.servers_toml(),
    ))
    .set("global", "maxconn", 20000)
    .build();
    let pglb = Pglb::start(&config, port);
    let pid = pglb.proc.pid();
    let baseline = median_login(&pglb).await;
    let fds_before = open_fds(pid);

    let mut silent = Vec::new();
    for _ in 0..5000 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).expect("silent connection"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        open_fds(pid) >= fds_before + 4900,
        "pglb holds the silent connections"
    );
    let loaded = median_login(&pglb).await;
    println!("login through pglb: {baseline:?} alone, {loaded:?} with 5000 silent connections");
    assert!(
        loaded < baseline + Duration::from_millis(50),
        "{loaded:?} vs {baseline:?}"
    );

    // After the startup timeout every silent connection is closed by pglb.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > fds_before + 10 {
        assert!(
            Instant::now() < deadline,
            "silent connections still open: {} fds",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_backs_off_and_recovers() {
    let stack = Stack::start(1);
    let port = free_port();
    let mut pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    let pid = pglb.proc.pid();
    // 64 descriptors: a few dozen clients exhaust them (each session needs two).
    let ok = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=64:")
        .status()
        .expect("prlimit");
    assert!(ok.success());
    let cpu_before = cpu_secs(pid);
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_secs(pid) - cpu_before;
    assert!(spent < 0.5, "pglb spun at EMFILE: {spent:.2}s of CPU in 2s");
    assert!(
        pglb.log().contains("accept failed"),
        "the condition is logged"
    );
    assert!(pglb.proc.running(), "pglb is alive");
    drop(held);
    Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg("--nofile=4096:")
        .status()
        .expect("prlimit");
    // Load gone: real clients are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pglb.connect().await {
            Ok(c) if c.simple_query("SELECT 1").await.is_ok() => break,
            _ => assert!(Instant::now() < deadline, "pglb did not recover"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_make_pglb_buffer() {
    use std::io::Read;
    // PgBouncer with trust auth, so a raw client can log in without a SCRAM exchange.
    let stack = Stack::start_with(
        1,
        harness::BouncerOpts {
            auth_type: "trust",
            ..harness::BouncerOpts::default()
        },
    );
    let port = free_port();
    let pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    let pid = pglb.proc.pid();
    let rss_before = rss_kib(pid);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend(body);
    s.write_all(&startup).expect("startup");
    // Read the login answer (up to ReadyForQuery) so the session is ready.
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut login = Vec::new();
    let mut chunk = [0u8; 4096];
    while !login.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = s.read(&mut chunk).expect("login answer");
        assert!(n > 0, "closed during login: {login:?}");
        login.extend_from_slice(&chunk[..n]);
    }
    // Ask for ~200 MB, then never read.
    let query = b"SELECT repeat('x', 1000000) FROM generate_series(1, 200)\0";
    let mut q = vec![b'Q'];
    q.extend(((query.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(query);
    s.write_all(&q).expect("query");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let growth = rss_kib(pid).saturating_sub(rss_before);
    println!("pglb RSS growth with a stalled 200 MB result: {growth} KiB");
    assert!(
        growth < 8 * 1024,
        "pglb buffered {growth} KiB for a client that does not read"
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_maxconn_refuses_then_recovers() {
    let stack = Stack::start(1);
    let port = free_port();
    let config = ConfigText::new(Pglb::config(port, "", &stack.servers_toml()))
        .set("global", "maxconn", 3)
        .build();
    let pglb = Pglb::start(&config, port);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pglb.connect().await.expect("under maxconn"));
    }
    let err = pglb.connect().await.expect_err("over global maxconn");
    let (code, msg) = harness::db_error(&err).expect("ErrorResponse");
    assert_eq!(code, "53300");
    assert!(msg.contains("global maxconn 3"), "{msg}");
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    pglb.connect().await.expect("a place freed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show_in_logs_stats_or_metrics() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let check = format!(
        "[listen.check]\ntype = \"query\"\nuser = \"{}\"\npassword = \"{}\"\ndatabase = \"app\"\ninterval = \"200ms\"\n",
        harness::APP_USER,
        harness::APP_PASSWORD
    );
    let config = format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\n[stats.auth]\nuser = \"admin\"\npassword = \"hunter2-admin-secret\"\n",
        Pglb::config(port, &check, &stack.servers_toml())
    );
    // Debug-level logging, the most verbose an operator would turn on.
    let pglb = Pglb::start_with_env(&config, port, &[("RUST_LOG", "debug")]);
    pglb.wait_log(&["is UP"], 1, Duration::from_secs(5));
    let c = pglb.connect().await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");
    let mut seen = pglb.log();
    for path in [
        "/stats",
        "/stats;csv",
        "/metrics",
        "/api/servers",
        "/health",
    ] {
        seen.push_str(&http_get(stats, path).await.1);
    }
    let (_, head, body) = harness::http(
        stats,
        "POST",
        "/stats",
        Some(("admin", "wrong")),
        "b=postgres&s=pgb1&action=drain",
        "application/x-www-form-urlencoded",
    )
    .await;
    seen.push_str(&head);
    seen.push_str(&body);
    for secret in [harness::APP_PASSWORD, "hunter2-admin-secret"] {
        assert!(!seen.contains(secret), "{secret:?} leaked");
    }
}
