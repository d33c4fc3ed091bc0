//! The control plane that traffic cannot starve. Seen once: 3,000 connections pipelining
//! `GET /stats` without reading the answers starved the thread that ran the health
//! checks; all three healthy PgBouncers went DOWN, 3 of 100 real logins failed, and 15 of
//! 35 keepalived-style `curl -m 1 /health` probes failed, which with `fall 1` moves the
//! VIP for nothing. And a flood from one address must not shut out an operator at
//! another: the connections served in full and the renders are shared per address.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Pglb, Stack, free_port, http_get};
use tokio::io::AsyncWriteExt;

const FLOOD: usize = 3000;
const PIPELINED: usize = 100;

/// One keepalived-style probe: `curl -m 1 /health`; its time in seconds when it passed.
fn probe(stats: u16) -> Option<f64> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-f",
            "-m",
            "1",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
        ])
        .arg(format!("http://127.0.0.1:{stats}/health"))
        .output()
        .expect("curl");
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Where the operator's browser is: another loopback address than the flood's.
const OTHER_HOST: &str = "127.0.0.2";

/// `GET page` from the address `from`: the status and the time in seconds, or None when
/// nothing came back within 2 s.
fn fetch_from(from: &str, stats: u16, page: &str) -> Option<(u16, f64)> {
    let out = Command::new("curl")
        .args(["-s", "-m", "2", "-o", "/dev/null", "--interface", from])
        .args(["-w", "%{http_code} %{time_total}"])
        .arg(format!("http://127.0.0.1:{stats}{page}"))
        .output()
        .expect("curl");
    let said = String::from_utf8_lossy(&out.stdout);
    let (code, time) = said.trim().split_once(' ')?;
    Some((code.parse().ok()?, time.parse().ok()?)).filter(|(code, _)| *code != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_stats_port_fakes_no_failover() {
    harness::raise_fd_limit();
    let stack = Stack::start(3);
    let (port, stats) = (free_port(), free_port());
    let check = format!(
        "[listen.check]\ntype = \"query\"\nuser = \"{}\"\npassword = \"{}\"\ndatabase = \"{}\"\n\
         interval = \"500ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n",
        harness::APP_USER,
        harness::APP_PASSWORD,
        harness::APP_DB
    );
    let config = Pglb::config_with_open_stats(port, &check, &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    pglb.wait_log(&["is UP"], 3, Duration::from_secs(10));

    // The flood: connections that pipeline requests and never read an answer.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let request = "GET /stats HTTP/1.1\r\nHost: flood\r\n\r\n".repeat(PIPELINED);
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let (request, mut stop) = (request.clone(), stop_rx.clone());
        flood.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", stats)).await else {
                return false;
            };
            let sent = s.write_all(request.as_bytes()).await.is_ok();
            let _ = stop.wait_for(|&v| v).await;
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // During the flood: keepalived's probes and real logins.
    let probes = tokio::task::spawn_blocking(move || {
        let mut times = Vec::new();
        for _ in 0..100 {
            times.push(probe(stats));
            std::thread::sleep(Duration::from_millis(50));
        }
        times
    });
    // An operator on another host: the dashboard and the CSV, 20 times.
    let person = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|i| {
                let page = if i % 2 == 0 { "/stats" } else { "/stats;csv" };
                let got = fetch_from(OTHER_HOST, stats, page);
                std::thread::sleep(Duration::from_millis(100));
                got
            })
            .collect::<Vec<_>>()
    });
    let mut login_failures = Vec::new();
    let t0 = Instant::now();
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_secs(5), pglb.connect()).await {
            Ok(Ok(c)) => {
                if let Err(e) = c.simple_query("SELECT 1").await {
                    login_failures.push(e.to_string());
                }
            }
            Ok(Err(e)) => login_failures.push(e.to_string()),
            Err(_) => login_failures.push("login timed out".into()),
        }
    }
    let logins = t0.elapsed();
    let times = probes.await.expect("probes");
    let pages = person.await.expect("person");
    let _ = stop_tx.send(true);
    let mut sent = 0;
    for f in flood {
        if f.await.unwrap_or(false) {
            sent += 1;
        }
    }

    let failed: Vec<usize> = (0..times.len()).filter(|&i| times[i].is_none()).collect();
    let mut ok: Vec<f64> = times.iter().flatten().copied().collect();
    ok.sort_by(f64::total_cmp);
    let p99 = ok
        .get(ok.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(f64::MAX);
    println!(
        "flood: {sent} connections x {PIPELINED} requests; /health p50 {:.1} ms, p99 {:.1} ms, failed: {failed:?}; 100 logins in {logins:?}",
        ok.get(ok.len() / 2).copied().unwrap_or(0.0) * 1000.0,
        p99 * 1000.0
    );
    let slowest = pages.iter().flatten().map(|t| t.1).fold(0.0, f64::max);
    println!(
        "an operator at {OTHER_HOST} during the flood: {} of {} pages answered 200, slowest {:.0} ms",
        pages.iter().flatten().filter(|t| t.0 == 200).count(),
        pages.len(),
        slowest * 1000.0
    );
    assert!(sent >= FLOOD * 9 / 10, "the flood reached the port: {sent}");
    assert!(
        pages.iter().all(|p| p.is_some_and(|(code, _)| code == 200)),
        "the flood from one address shut another out: {pages:?}"
    );
    assert!(
        slowest < 1.0,
        "a page for another address took {:.0} ms",
        slowest * 1000.0
    );
    assert!(
        failed.is_empty(),
        "no keepalived probe may fail: {failed:?}"
    );
    assert!(p99 < 0.1, "/health p99 {:.1} ms", p99 * 1000.0);
    assert!(login_failures.is_empty(), "{login_failures:?}");
    let log = pglb.log();
    assert!(
        !log.contains("is DOWN"),
        "a healthy server went DOWN:\n{log}"
    );
    let (_, csv) = http_get(stats, "/stats;csv").await;
    for row in csv.lines().filter(|l| l.starts_with("postgres,pgb")) {
        assert!(row.contains(",UP,"), "{row}");
    }
}
