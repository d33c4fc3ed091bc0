//! PostgreSQL protocol awareness end to end: cancels reach the right PgBouncer, drains
//! close sessions only at transaction boundaries, and a PgBouncer that refuses a startup
//! is skipped without the client noticing.

mod harness;

use std::time::{Duration, Instant};

use harness::{Bouncer, BouncerOpts, Pglb, Stack, db_error, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_session_s_pgbouncer_20_of_20() {
    cancels_reach_their_pgbouncer(RelayMode::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_kernel_relay_cancels_reach_the_session_s_pgbouncer_20_of_20() {
    cancels_reach_their_pgbouncer(RelayMode::Kernel).await;
}

async fn cancels_reach_their_pgbouncer(mode: RelayMode) {
    let stack = Stack::start(3);
    let port = free_port();
    let config = Pglb::config(port, mode.listen_key(), &stack.servers_toml());
    let pglb = Pglb::start(&config, port);
    // Three sessions at once, one per PgBouncer, so a wrongly routed cancel would show.
    for round in 0..20 {
        let client = pglb.connect().await.expect("connect");
        let token = client.cancel_token();
        let query = tokio::spawn(async move {
            let r = client.simple_query("SELECT pg_sleep(30)").await;
            (r, client)
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sent = Instant::now();
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send cancel");
        let (result, _client) = tokio::time::timeout(Duration::from_secs(1), query)
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the query was not cancelled within a second")
            })
            .expect("join");
        let err = result.expect_err("cancelled");
        assert_eq!(
            db_error(&err).map(|e| e.0).as_deref(),
            Some("57014"),
            "round {round}: {err}"
        );
        assert!(sent.elapsed() < Duration::from_secs(1));
    }
    let log = pglb.wait_log(
        &["cancel request routed to the session's server"],
        20,
        Duration::from_secs(2),
    );
    let routed = log
        .lines()
        .filter(|l| l.contains("cancel request routed to the session's server"))
        .count();
    assert_eq!(
        routed, 20,
        "every cancel went to its owner, none broadcast:\n{log}"
    );
    mode.assert_relayed(&pglb.wait_log(&["session closed"], 10, Duration::from_secs(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_transaction_then_closes_with_57p01() {
    drain_waits_for_the_transaction(RelayMode::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_kernel_relay_drain_waits_for_the_transaction_then_closes_with_57p01() {
    drain_waits_for_the_transaction(RelayMode::Kernel).await;
}

/// `[listen] relay`: the same promises hold in both modes.
#[derive(Clone, Copy, PartialEq)]
enum RelayMode {
    User,
    Kernel,
}

impl RelayMode {
    fn listen_key(self) -> &'static str {
        match self {
            RelayMode::User => "",
            RelayMode::Kernel => "relay = \"kernel\"",
        }
    }

    /// Asserts the sessions in `log` went where this mode sends them.
    fn assert_relayed(self, log: &str) {
        let closed = log.lines().filter(|l| l.contains("session closed"));
        let want = match self {
            RelayMode::User => "relay=\"user\"",
            RelayMode::Kernel => "relay=\"kernel",
        };
        let (mut n, mut elsewhere) = (0, Vec::new());
        for line in closed {
            n += 1;
            if !line.contains(want) {
                elsewhere.push(line);
            }
        }
        assert!(n > 0 && elsewhere.is_empty(), "not {want}: {elsewhere:?}");
    }
}

async fn drain_waits_for_the_transaction(mode: RelayMode) {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_stats(port, mode.listen_key(), &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    let (client, conn) = pglb.connect_watched().await.expect("connect");
    let on = if stack.bouncers[0].app_clients().await == 1 {
        "pgb1"
    } else {
        "pgb2"
    };

    client
        .simple_query("CREATE TABLE IF NOT EXISTS drained (v int)")
        .await
        .expect("create");
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO drained VALUES (1)")
        .await
        .expect("insert");
    harness::admin_action(stats, on, "drain").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Inside the transaction the session is left alone…
    client
        .simple_query("INSERT INTO drained VALUES (2)")
        .await
        .expect("still in the transaction");
    client.simple_query("COMMIT").await.expect("commit");
    // …and closed right after it, with the reason.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("drained after the commit");
    assert!(
        err.is_closed() || db_error(&err).is_some_and(|e| e.0 == "57P01"),
        "{err}"
    );
    let (code, message) = harness::fatal_at_end(conn).await;
    assert_eq!(code, "57P01", "{message}");
    assert_eq!(
        message,
        format!("pglb: server '{on}' of listen 'postgres' is being drained; reconnect to continue")
    );
    let log = pglb.wait_log(
        &["drained at a transaction boundary"],
        1,
        Duration::from_secs(2),
    );
    assert!(log.contains("term=\"PD\""), "{log}");

    // Nothing was lost: both rows are there, read through the other PgBouncer.
    let other = pglb.connect().await.expect("reconnect elsewhere");
    let rows = other
        .simple_query("SELECT count(*) FROM drained")
        .await
        .expect("count");
    let count = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("2"));
    mode.assert_relayed(&pglb.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_while_draining_loses_no_transaction() {
    pgbench_while_draining(RelayMode::User).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_kernel_relay_pgbench_tpcb_while_draining_loses_no_transaction() {
    pgbench_while_draining(RelayMode::Kernel).await;
}

async fn pgbench_while_draining(mode: RelayMode) {
    let stack = Stack::start(3);
    stack.pg.pgbench_init();
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_stats(port, mode.listen_key(), &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    // -C: a connection per transaction, as a pool that reconnects after a drain would.
    let bench = harness::pgbench(port, &["-n", "-C", "-c", "6", "-j", "2", "-T", "8"]).output();
    let drain = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        harness::admin_action(stats, "pgb1", "drain").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        harness::admin_action(stats, "pgb1", "ready").await;
    };
    let (out, ()) = tokio::join!(bench, drain);
    let out = out.expect("pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("aborted"),
        "a client was aborted:\n{stderr}"
    );
    // While pgb1 was drained, new sessions went to the others only.
    let log = pglb.log();
    assert!(!log.contains("drain deadline reached"), "{log}");
    let sessions = |s: &str| {
        log.lines()
            .filter(|l| l.contains("session closed") && l.contains(&format!("server={s} ")))
            .count()
    };
    assert!(
        sessions("pgb2") > sessions("pgb1") && sessions("pgb3") > sessions("pgb1"),
        "{log}"
    );
    mode.assert_relayed(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_refusing_the_startup_is_skipped_silently() {
    let stack = Stack::start(1);
    // pgb1 takes one client at most; that place is taken by a direct connection.
    let tiny = Bouncer::start(
        &stack.pg,
        BouncerOpts {
            max_client_conn: 1,
            ..BouncerOpts::default()
        },
    );
    let dsn = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        tiny.port,
        harness::APP_USER,
        harness::APP_PASSWORD,
        harness::APP_DB
    );
    let _occupant = harness::connect_dsn_patiently(&dsn)
        .await
        .expect("direct connection to pgb1");
    let servers = format!(
        "[[listen.server]]\nname = \"pgb1\"\naddr = \"{}\"\n[[listen.server]]\nname = \"pgb2\"\naddr = \"{}\"\n",
        tiny.addr(),
        stack.bouncers[0].addr()
    );
    let port = free_port();
    // `first` always tries pgb1 before pgb2.
    let pglb = Pglb::start(&Pglb::config(port, "balance = \"first\"", &servers), port);
    for _ in 0..10 {
        let c = pglb
            .connect()
            .await
            .expect("the client never sees pgb1's refusal");
        c.simple_query("SELECT 1").await.expect("query");
    }
    let log = pglb.log();
    let replays = log
        .lines()
        .filter(|l| l.contains("replaying it on another server"))
        .count();
    assert_eq!(replays, 10, "{log}");
    assert!(
        log.contains("no more connections allowed"),
        "PgBouncer's reason is logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_drain_deadlines_close_sessions_with_their_reason() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let timeouts =
        "[listen.timeouts]\nclient = \"1500ms\"\nserver = \"1500ms\"\ndrain = \"500ms\"\n";
    let config = Pglb::config_with_stats(port, timeouts, &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);

    // Idle past the limit: closed. Busy for longer than the limit: kept.
    let idle = pglb.connect().await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    let busy = pglb.connect().await.expect("connect");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        busy.simple_query("SELECT 1")
            .await
            .expect("a busy session stays open");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        idle.simple_query("SELECT 1").await.is_err(),
        "idle session kept"
    );
    let timed_out = ["term=\"cD\"", "end=client idle timeout"];
    let log = pglb.wait_log(&timed_out, 1, Duration::from_secs(2));
    let closed = |needles: &[&str]| {
        log.lines()
            .filter(|l| l.contains("session closed") && needles.iter().all(|n| l.contains(n)))
            .count()
    };
    assert_eq!(closed(&timed_out), 1, "{log}");
    assert_eq!(closed(&[]), 1, "only the idle session closed:\n{log}");
    drop(busy);

    // A query whose server stays silent past its idle limit: cut, the server blamed.
    // Sent right after the login's answer (within a millisecond, here): the server is
    // the side that fell quiet first.
    let slow = pglb.connect().await.expect("connect");
    assert!(slow.simple_query("SELECT pg_sleep(3)").await.is_err());
    pglb.wait_log(
        &["term=\"sD\"", "end=server idle timeout"],
        1,
        Duration::from_secs(3),
    );

    // Drained inside a transaction: closed at the drain deadline, not at a boundary.
    let open = pglb.connect().await.expect("connect");
    open.simple_query("BEGIN; SELECT 1").await.expect("begin");
    harness::admin_action(stats, "pgb1", "drain").await;
    let deadline = ["term=\"pD\"", "end=drain deadline reached"];
    let log = pglb.wait_log(&deadline, 1, Duration::from_secs(3));
    assert!(
        log.lines().any(|l| deadline.iter().all(|n| l.contains(n))),
        "{log}"
    );
    assert!(open.simple_query("SELECT 1").await.is_err(), "{log}");
}
