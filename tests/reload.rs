//! SIGHUP reloads: listens and servers change under load without a failed transaction;
//! a bad file changes nothing and says so; systemd hears about it all.

mod harness;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, free_port, http_get};
use nix::sys::signal::Signal;

fn servers(stack: &Stack, which: &[usize]) -> String {
    which
        .iter()
        .map(|&i| {
            format!(
                "[[listen.server]]\nname = \"pgb{}\"\naddr = \"{}\"\n",
                i + 1,
                stack.bouncers[i].addr()
            )
        })
        .collect()
}

fn config(port: u16, stats: u16, servers: &str, extra_listen: &str) -> String {
    format!(
        "{}\n{extra_listen}\n[stats]\nbind = \"127.0.0.1:{stats}\"\n[stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n",
        Pglb::config(
            port,
            "[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nrise = 1\n",
            servers
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_pgbench_fail_no_transaction() {
    let stack = Stack::start(3);
    stack.pg.pgbench_init();
    let (port, stats) = (free_port(), free_port());
    let pglb = Pglb::start(&config(port, stats, &servers(&stack, &[0, 1, 2]), ""), port);
    pglb.wait_log(&["is UP"], 3, Duration::from_secs(5));
    // A long-lived session on a server that every generation keeps (pgb1 is in all of them).
    let kept = pglb.connect().await.expect("connect");
    let bench =
        harness::pgbench(port, &["-n", "-C", "-S", "-c", "4", "-j", "2", "-T", "8"]).output();
    let reloads = async {
        let lists: [&[usize]; 4] = [&[0, 1], &[0, 2], &[0], &[0, 1, 2]];
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            pglb.reload(&config(port, stats, &servers(&stack, lists[i % 4]), ""));
        }
    };
    let (out, ()) = tokio::join!(bench, reloads);
    let out = out.expect("pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    let log = pglb.wait_log(&["configuration reloaded"], 10, Duration::from_secs(3));
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("configuration reloaded"))
            .count(),
        10,
        "{log}"
    );
    kept.simple_query("SELECT 1")
        .await
        .expect("a session on a kept server is untouched by reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_running_config_and_says_why() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let good = config(port, stats, &servers(&stack, &[0]), "");
    let pglb = Pglb::start(&good, port);
    pglb.wait_log(&["is UP"], 1, Duration::from_secs(5));
    // A misspelt key in the listen.
    let bad = ConfigText::new(good.clone())
        .set("listen", "balanse", "leastconn")
        .build();
    pglb.reload(&bad);
    let log = pglb.wait_log(&["reload failed"], 1, Duration::from_secs(3));
    let line = log
        .lines()
        .find(|l| l.contains("reload failed"))
        .expect("reload failed line");
    assert!(
        line.contains("pglb.toml:") && line.contains("unknown field `balanse`"),
        "{line}"
    );
    let (code, body) = http_get(stats, "/health").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("last reload failed") && body.contains("balanse"),
        "{body}"
    );
    let (_, page) = http_get(stats, "/stats").await;
    assert!(
        page.contains("Last configuration reload failed"),
        "the dashboard shows it"
    );
    assert_eq!(last_reload_success(stats).await, 0.0);
    let c = pglb
        .connect()
        .await
        .expect("still serving with the old config");
    c.simple_query("SELECT 1").await.expect("query");
    // Fixing the file clears the error.
    pglb.reload(&good);
    pglb.wait_log(&["configuration reloaded"], 1, Duration::from_secs(3));
    let (_, body) = http_get(stats, "/health").await;
    assert!(body.starts_with("UP: "), "{body}");
    assert_eq!(last_reload_success(stats).await, 1.0);

    // What a reload cannot change is said, and the rest of the file still applies.
    let later = ConfigText::new(good.clone())
        .set("global", "threads", 7)
        .set("stats", "bind", format!("127.0.0.1:{}", free_port()))
        .build();
    pglb.reload(&later);
    let log = pglb.wait_log(&["configuration reloaded"], 2, Duration::from_secs(3));
    for words in [
        "global threads changes take effect at the next restart",
        "[stats] changes take effect at the next restart",
    ] {
        assert!(log.contains(words), "{words}:\n{log}");
    }
    assert_eq!(
        http_get(stats, "/health").await.0,
        200,
        "the stats port stays"
    );
}

/// `pglb_process_last_reload_success` as /metrics says it.
async fn last_reload_success(stats: u16) -> f64 {
    let (_, metrics) = http_get(stats, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pglb_process_last_reload_success "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pglb_process_last_reload_success in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listens_and_keeps_admin_state() {
    let stack = Stack::start(2);
    let (port, stats, second) = (free_port(), free_port(), free_port());
    let base = config(port, stats, &servers(&stack, &[0, 1]), "");
    let pglb = Pglb::start(&base, port);
    pglb.wait_log(&["is UP"], 2, Duration::from_secs(5));
    let (code, _, _) = harness::http(
        stats,
        "POST",
        "/api/servers/postgres/pgb2",
        Some(("admin", "s3cret")),
        "{\"action\": \"maint\"}",
        "application/json",
    )
    .await;
    assert_eq!(code, 200);
    let session = pglb.connect().await.expect("connect");

    let extra = format!(
        "[[listen]]\nname = \"reads\"\nbind = \"127.0.0.1:{second}\"\n{}",
        servers(&stack, &[1])
    );
    // TOML: the extra listen must come after the first listen's tables.
    let with_second = ConfigText::new(base.clone())
        .insert_before("stats", &extra)
        .build();
    pglb.reload(&with_second);
    pglb.wait_log(&["configuration reloaded"], 1, Duration::from_secs(3));
    let dsn = format!("host=127.0.0.1 port={second} user=app password=app-secret dbname=app");
    let c = harness::connect_dsn(&dsn)
        .await
        .expect("the new listen serves");
    c.simple_query("SELECT 1").await.expect("query");
    let (_, csv) = http_get(stats, "/stats;csv").await;
    assert!(
        csv.lines()
            .any(|l| l.starts_with("postgres,pgb2,") && l.contains(",MAINT,")),
        "maint survives the reload:\n{csv}"
    );
    assert!(
        csv.lines().any(|l| l.starts_with("reads,FRONTEND,")),
        "{csv}"
    );

    pglb.reload(&base);
    pglb.wait_log(&["configuration reloaded"], 2, Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::net::TcpStream::connect(("127.0.0.1", second)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the removed listen still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    session
        .simple_query("SELECT 1")
        .await
        .expect("the first listen's session survived both reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_notified_of_ready_reload_and_stop() {
    let stack = Stack::start(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let (port, stats) = (free_port(), free_port());
    let cfg = config(port, stats, &servers(&stack, &[0]), "");
    let path = sock_path.to_str().expect("utf-8 path");
    let mut pglb = Pglb::start_with_env(&cfg, port, &[("NOTIFY_SOCKET", path)]);
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1\nSTATUS=serving"));
    pglb.reload(&cfg);
    assert!(next().starts_with("RELOADING=1"));
    assert!(next().starts_with("READY=1\nSTATUS=serving; reloaded"));
    pglb.proc.signal(Signal::SIGTERM);
    assert!(next().starts_with("STOPPING=1"));
    assert!(
        pglb.proc
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}
