//! The core daemon end to end: real PostgreSQL, three real PgBouncers, real clients.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, db_error, edit, free_port};
use nix::sys::signal::Signal;

async fn clients_per_bouncer(stack: &Stack) -> Vec<usize> {
    let mut counts = Vec::new();
    for b in &stack.bouncers {
        counts.push(b.app_clients().await);
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leastconn_spreads_idle_clients_evenly() {
    let stack = Stack::start(3);
    let port = free_port();
    let pglb = Pglb::start(
        &Pglb::config(port, "balance = \"leastconn\"", &stack.servers_toml()),
        port,
    );
    let mut held = Vec::new();
    for _ in 0..30 {
        let c = pglb.connect().await.expect("connect through pglb");
        c.simple_query("SELECT 1").await.expect("query");
        held.push(c);
    }
    assert_eq!(clients_per_bouncer(&stack).await, vec![10, 10, 10]);
    drop(held);
    // Each closed session leaves one log line naming the user and database.
    let log = pglb.wait_log(
        &["session closed", "user=\"app\""],
        30,
        Duration::from_secs(5),
    );
    let closed = log
        .lines()
        .filter(|l| l.contains("session closed") && l.contains("user=\"app\" database=\"app\""))
        .count();
    assert_eq!(closed, 30, "one log line per session:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_shift_the_split() {
    let stack = Stack::start(3);
    let port = free_port();
    let servers = edit(
        &stack.servers_toml(),
        &format!("addr = \"{}\"\n", stack.bouncers[2].addr()),
        &format!("addr = \"{}\"\nweight = 200\n", stack.bouncers[2].addr()),
    );
    let pglb = Pglb::start(&Pglb::config(port, "", &servers), port);
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(pglb.connect().await.expect("connect"));
    }
    assert_eq!(clients_per_bouncer(&stack).await, vec![10, 10, 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_servers_queue_then_time_out_with_an_error_response() {
    let stack = Stack::start(1);
    let port = free_port();
    let servers = format!("{}maxconn = 2\n", stack.servers_toml());
    let pglb = Pglb::start(
        &Pglb::config(port, "[listen.timeouts]\nqueue = \"1500ms\"\n", &servers),
        port,
    );
    let a = pglb.connect().await.expect("first");
    let b = pglb.connect().await.expect("second");

    // A third client waits in the queue and gets in when a slot frees.
    let dsn = pglb.dsn();
    let waiting = tokio::spawn(async move { harness::connect_dsn(&dsn).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "third client must wait while the server is full"
    );
    drop(a);
    let c = waiting.await.expect("join").expect("queued client gets in");
    c.simple_query("SELECT 1")
        .await
        .expect("query after queueing");

    // Nobody leaves now: the queue times out and the client is told why.
    let started = Instant::now();
    let err = pglb.connect().await.expect_err("queue timeout");
    let (code, msg) = db_error(&err).expect("an ErrorResponse, not a bare close");
    assert_eq!(code, "53300");
    assert!(msg.contains("queue timed out"), "{msg}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "waited the queue timeout"
    );
    drop((b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_maxconn_refuses_with_53300_and_psql_prints_it() {
    let stack = Stack::start(1);
    let port = free_port();
    let pglb = Pglb::start(
        &Pglb::config(port, "maxconn = 1", &stack.servers_toml()),
        port,
    );
    let _held = pglb.connect().await.expect("first client");
    let err = pglb.connect().await.expect_err("over maxconn");
    let (code, msg) = db_error(&err).expect("ErrorResponse");
    assert_eq!(code, "53300");
    assert!(msg.contains("too many clients"), "{msg}");

    // psql (libpq, sslmode=prefer: SSLRequest first) shows the reason to the user.
    let out = Command::new("psql")
        .arg(format!("{} sslmode=prefer", pglb.dsn()))
        .args(["-X", "-c", "SELECT 1"])
        .output()
        .expect("psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("too many clients (listen maxconn 1 reached)"),
        "psql printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pgbouncer_costs_no_new_connection() {
    let mut stack = Stack::start(3);
    let port = free_port();
    let pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    stack.bouncers[1].kill();
    let mut failures = Vec::new();
    for _ in 0..100 {
        match pglb.connect().await {
            Ok(c) => {
                if let Err(e) = c.simple_query("SELECT 1").await {
                    failures.push(e.to_string());
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 failed: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        pglb.log().contains("connect to server failed"),
        "the failures are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_up_gives_psql_a_reason() {
    // Two servers on ports where nothing listens.
    let port = free_port();
    let servers = format!(
        "[[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:{}\"\n[[listen.server]]\nname = \"b\"\naddr = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    );
    let _pglb = Pglb::start(&Pglb::config(port, "", &servers), port);
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user=app dbname=app sslmode=disable"
        ))
        .args(["-X", "-w", "-c", "SELECT 1"])
        .output()
        .expect("psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr
            .contains("pglb: listen 'postgres': could not connect to a server after 2 attempt(s)"),
        "psql printed: {stderr}"
    );
    assert!(
        stderr.contains("Connection refused"),
        "psql printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_through_pglb_has_no_failures() {
    let stack = Stack::start(3);
    stack.pg.pgbench_init();
    let port = free_port();
    let pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    let out = harness::pgbench(port, &["-n", "-S", "-c", "8", "-j", "2", "-T", "5"])
        .output()
        .await
        .expect("pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("pgbench summary");
    assert!(processed > 100, "{stdout}");
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    // The 8 clients (and pgbench's first connection) were spread over the three PgBouncers.
    let log = pglb.wait_log(&["session closed"], 9, Duration::from_secs(5));
    for s in ["server=pgb1", "server=pgb2", "server=pgb3"] {
        assert!(log.contains(s), "no session on {s}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_sessions_finish() {
    let stack = Stack::start(1);
    let port = free_port();
    let mut pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    let client = pglb.connect().await.expect("connect");
    // A session inside a transaction when SIGTERM comes finishes it (an idle one would
    // be ended at once: tests/lifecycle.rs).
    client.simple_query("BEGIN").await.expect("begin");
    pglb.proc.signal(Signal::SIGTERM);
    // After the linger (100 ms here) no new client is taken.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        pglb.connect().await.is_err(),
        "no new clients after SIGTERM"
    );
    let rows = client
        .simple_query("SELECT 42")
        .await
        .expect("existing session still works");
    client.simple_query("COMMIT").await.expect("commit");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("42"));
    drop(client);
    let status = pglb
        .proc
        .wait_exit(Duration::from_secs(4))
        .expect("pglb exits once sessions are done");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_grace_ends_stuck_sessions() {
    let stack = Stack::start(1);
    let port = free_port();
    let config = ConfigText::new(Pglb::config(port, "", &stack.servers_toml()))
        .set("global", "grace", "1s")
        .build();
    let mut pglb = Pglb::start(&config, port);
    let client = pglb.connect().await.expect("connect");
    // Stuck inside a transaction: only the grace ends it.
    client.simple_query("BEGIN").await.expect("begin");
    let started = Instant::now();
    pglb.proc.signal(Signal::SIGTERM);
    let status = pglb
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("pglb exits after the grace");
    assert!(status.success());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the grace period was honoured"
    );
    let log = pglb.log();
    assert!(log.contains("closing remaining sessions"), "{log}");
    // Its log line says who ended it, in HAProxy's letters: K(illed) at D(ata) phase.
    let line = log
        .lines()
        .find(|l| l.contains("session closed"))
        .unwrap_or("");
    assert!(line.contains("term=\"KD\""), "{line}");
}
