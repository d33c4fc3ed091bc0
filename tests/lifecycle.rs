//! Stopping and upgrading without losing a connection. Seen before: `systemctl stop`
//! closed the listener at SIGTERM, so clients were refused until keepalived noticed
//! (0–8 refused connections over up to 755 ms), and one idle psql session made every
//! stop wait the full `grace` (30 s) before it was cut with "closed by shutdown".

mod harness;

use std::time::{Duration, Instant};

use harness::{Pglb, Stack, free_port, http_get};

fn config(port: u16, stats: u16, stack: &Stack, linger: &str) -> String {
    Pglb::config(port, "", &stack.servers_toml())
        .replace("linger = \"100ms\"", &format!("linger = \"{linger}\""))
        .replace("grace = \"5s\"", "grace = \"30s\"")
        + &format!("\n[stats]\nbind = \"127.0.0.1:{stats}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_down_keeps_accepting_and_ends_idle_sessions_at_once() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let text = config(port, stats, &stack, "2s");
    assert!(text.contains("linger = \"2s\"") && text.contains("grace = \"30s\""));
    let mut pglb = Pglb::start(&text, port);
    let idle = pglb.connect().await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    let busy = pglb.connect().await.expect("connect");
    busy.simple_query("BEGIN; SELECT 1").await.expect("begin");

    let t0 = Instant::now();
    pglb.proc.signal(libc::SIGTERM);
    // /health says DOWN at once: keepalived moves the VIP away first.
    let (code, body) = http_get(stats, "/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(t0.elapsed() < Duration::from_millis(500));

    // Meanwhile new clients are still served, for the linger time.
    let mut served = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        let c = pglb
            .connect()
            .await
            .expect("no connection refused while lingering");
        c.simple_query("SELECT 1")
            .await
            .expect("query while lingering");
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served >= 10, "{served} clients served while lingering");

    // The idle session was ended at once, with PostgreSQL's admin_shutdown.
    let e = idle
        .simple_query("SELECT 1")
        .await
        .expect_err("idle session ended");
    let err = e.to_string();
    assert!(
        idle.is_closed() || err.contains("shutting down") || err.contains("closed"),
        "{err}"
    );
    // The session inside a transaction finishes it, then ends at the boundary.
    busy.simple_query("SELECT 2")
        .await
        .expect("the transaction goes on");
    busy.simple_query("COMMIT").await.expect("commit");
    let status = pglb.proc.wait_exit(Duration::from_secs(8));
    assert!(
        status.is_some(),
        "pglb still running 8 s after SIGTERM:\n{}",
        pglb.log()
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "a stop with only idle sessions takes about the linger time (2 s), not grace: {took:?}"
    );
    let log = pglb.log();
    assert!(
        log.contains("still accepting while the VIP moves away"),
        "{log}"
    );
    assert!(!log.contains("shutdown grace over"), "{log}");
}

/// Seen: where the unit's LimitNOFILE could not be granted, pglb ran with fewer
/// descriptors than its maxconn needs and said nothing.
#[test]
fn a_descriptor_limit_below_maxconn_is_warned_about_at_start() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("pglb.toml");
    std::fs::write(
        &config,
        Pglb::config(
            port,
            "",
            "[[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n",
        )
        .replace("maxconn = 5000", "maxconn = 1000"),
    )
    .expect("config");
    let log = dir.path().join("log");
    let mut child = std::process::Command::new("prlimit")
        .arg("--nofile=512:512")
        .arg(env!("CARGO_BIN_EXE_pglb"))
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("prlimit (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("listening") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("open-files limit is below what [global] maxconn needs")
            && text.contains("limit=512")
            && text.contains("needed=2065"),
        "{text}"
    );
}
