//! Health checks against real PgBouncers and PostgreSQL: what goes DOWN, when, and why.

mod harness;

use std::time::{Duration, Instant};

use harness::{APP_PASSWORD, APP_USER, BouncerOpts, ConfigText, Pglb, Postgres, Stack, free_port};

/// Fast intervals so transitions happen within a second or two.
fn check_toml(kind: &str, extra: &str) -> String {
    format!(
        "[listen.check]\ntype = \"{kind}\"\ninterval = \"300ms\"\nfastinter = \"100ms\"\ndowninter = \"300ms\"\n\
         timeout = \"2s\"\nrise = 2\nfall = 3\nuser = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\ndatabase = \"app\"\n{extra}\n"
    )
}

fn wait_for(pglb: &Pglb, needle: &str, count: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    let log = pglb.wait_log(&[needle], count, limit);
    let n = log.lines().filter(|l| l.contains(needle)).count();
    assert!(
        n >= count,
        "expected {count} log lines with {needle:?} within {limit:?}:\n{log}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pgbouncer_goes_down_gets_no_clients_and_comes_back() {
    let mut stack = Stack::start(3);
    let port = free_port();
    let pglb = Pglb::start(
        &Pglb::config(port, &check_toml("tcp", ""), &stack.servers_toml()),
        port,
    );
    wait_for(
        &pglb,
        "is UP, reason: Layer4 check passed",
        3,
        Duration::from_secs(5),
    );

    stack.bouncers[1].kill();
    let took = wait_for(
        &pglb,
        "Server postgres/pgb2 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\"",
        1,
        Duration::from_secs(3),
    );
    // At most one settled interval to notice, then fall × fastinter.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let log = pglb.log();
    assert!(log.contains("2 active and 0 backup servers left"), "{log}");

    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(pglb.connect().await.expect("connect while pgb2 is down"));
    }
    assert_eq!(
        stack.bouncers[0].app_clients().await + stack.bouncers[2].app_clients().await,
        30
    );
    assert!(
        !pglb.log().contains("connect to server failed"),
        "no client was sent to the DOWN server"
    );

    stack.bouncers[1].restart();
    wait_for(
        &pglb,
        "Server postgres/pgb2 is UP",
        1,
        Duration::from_secs(3),
    );
    let c = pglb.connect().await.expect("connect");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_check_sees_postgres_down_where_pgsql_check_does_not() {
    let mut stack = Stack::start(2);
    let (p1, p2) = (free_port(), free_port());
    let config = format!(
        "[global]\nmaxconn = 100\n\n\
         [[listen]]\nname = \"query\"\nbind = \"127.0.0.1:{p1}\"\n{}{}\n\
         [[listen]]\nname = \"pgsql\"\nbind = \"127.0.0.1:{p2}\"\n{}{}",
        check_toml("query", ""),
        stack.servers_toml(),
        check_toml("pgsql", ""),
        stack.servers_toml(),
    );
    let pglb = Pglb::start(&config, p1);
    wait_for(
        &pglb,
        "is UP, reason: Layer7 check passed",
        4,
        Duration::from_secs(5),
    );

    stack.pg.stop();
    let log_needle = "Server query/pgb1 is DOWN, reason: Layer7 wrong status";
    wait_for(&pglb, log_needle, 1, Duration::from_secs(10));
    wait_for(
        &pglb,
        "listen 'query' has no server available!",
        1,
        Duration::from_secs(10),
    );
    let log = pglb.log();
    let line = log
        .lines()
        .find(|l| l.contains(log_needle))
        .expect("down line");
    // PgBouncer's own words about PostgreSQL being unreachable, with its SQLSTATE.
    assert!(
        line.contains("code: 08P01") && line.contains("info: \""),
        "{line}"
    );
    // pgsql-check passes at PgBouncer's password prompt: it never notices.
    assert!(
        !log.contains("Server pgsql/pgb1 is DOWN") && !log.contains("Server pgsql/pgb2 is DOWN"),
        "pgsql servers must stay UP:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_ssl_checks_leave_no_pgbouncer_log_line() {
    let stack = Stack::start(1);
    let before = stack.bouncers[0].log().lines().count();
    let (p1, p2) = (free_port(), free_port());
    let config = format!(
        "[[listen]]\nname = \"tcp\"\nbind = \"127.0.0.1:{p1}\"\n{}{}\n\
         [[listen]]\nname = \"ssl\"\nbind = \"127.0.0.1:{p2}\"\n{}{}",
        check_toml("tcp", ""),
        stack.servers_toml(),
        check_toml("ssl", ""),
        stack.servers_toml(),
    );
    let pglb = Pglb::start(&config, p1);
    wait_for(&pglb, "is UP", 2, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(2)).await; // about 6 more checks of each kind
    let log = pglb.log();
    assert!(
        log.contains("Layer4 check passed") && log.contains("Layer6 check passed"),
        "{log}"
    );
    let bouncer_log = stack.bouncers[0].log();
    let new: Vec<&str> = bouncer_log
        .lines()
        .skip(before)
        .filter(|l| !l.contains(" stats: "))
        .collect();
    assert!(new.is_empty(), "checks left PgBouncer log lines: {new:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_checks_log_in_with_scram_and_md5() {
    for auth in ["scram-sha-256", "md5"] {
        let stack = Stack::start_with(
            1,
            BouncerOpts {
                auth_type: auth,
                ..BouncerOpts::default()
            },
        );
        let port = free_port();
        let pglb = Pglb::start(
            &Pglb::config(port, &check_toml("query", ""), &stack.servers_toml()),
            port,
        );
        wait_for(
            &pglb,
            "is UP, reason: Layer7 check passed",
            1,
            Duration::from_secs(5),
        );
        let log = stack.bouncers[0].log();
        assert!(
            log.contains("login attempt: db=app user=app"),
            "{auth}: the check logged in:\n{log}"
        );

        // A wrong password keeps the server DOWN, with PgBouncer's reason.
        let port = free_port();
        let bad = ConfigText::new(check_toml("query", ""))
            .set("listen.check", "password", "wrong")
            .build();
        let pglb = Pglb::start(&Pglb::config(port, &bad, &stack.servers_toml()), port);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let err = pglb.connect().await.expect_err("no server is UP");
        assert_eq!(
            harness::db_error(&err).map(|e| e.0).as_deref(),
            Some("57P03"),
            "{auth}"
        );
        let log = pglb.log();
        assert!(!log.contains("is UP"), "{auth}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_checks_route_writes_to_the_primary_and_reads_to_the_replica() {
    let primary = Postgres::start();
    let replica = Postgres::start_replica(&primary);
    let b_primary = harness::Bouncer::start(&primary, BouncerOpts::default());
    let b_replica = harness::Bouncer::start(&replica, BouncerOpts::default());
    let servers = format!(
        "[[listen.server]]\nname = \"db1\"\naddr = \"{}\"\n[[listen.server]]\nname = \"db2\"\naddr = \"{}\"\n",
        b_primary.addr(),
        b_replica.addr()
    );
    let (pw, pr) = (free_port(), free_port());
    let config = format!(
        "[[listen]]\nname = \"write\"\nbind = \"127.0.0.1:{pw}\"\n{}{servers}\n\
         [[listen]]\nname = \"read\"\nbind = \"127.0.0.1:{pr}\"\n{}{servers}",
        check_toml("query", "expect_role = \"primary\""),
        check_toml("query", "expect_role = \"replica\""),
    );
    let pglb = Pglb::start(&config, pw);
    wait_for(&pglb, "is UP", 2, Duration::from_secs(5));
    let in_recovery = |port: u16| async move {
        let dsn = format!(
            "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname=app"
        );
        let c = harness::connect_dsn(&dsn).await.expect("connect");
        // Simple protocol: PgBouncer's transaction pooling cannot keep prepared statements.
        let rows = c
            .simple_query("SELECT pg_is_in_recovery()")
            .await
            .expect("query");
        rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
            _ => None,
        }) == Some(true)
    };
    for _ in 0..6 {
        assert!(!in_recovery(pw).await, "write listen reached a replica");
        assert!(in_recovery(pr).await, "read listen reached the primary");
    }
    let log = pglb.log();
    assert!(
        log.contains("Server write/db1 is UP") && log.contains("Server read/db2 is UP"),
        "{log}"
    );
    assert!(
        !log.contains("Server write/db2 is UP") && !log.contains("Server read/db1 is UP"),
        "{log}"
    );

    // Promote the replica: it passes the primary check now, and fails the replica check.
    replica.promote();
    wait_for(&pglb, "Server write/db2 is UP", 1, Duration::from_secs(10));
    wait_for(&pglb, "Server read/db2 is DOWN", 1, Duration::from_secs(10));
    // No replica left: the read listen falls back to a primary rather than refusing.
    assert!(!in_recovery(pr).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_on_live_traffic_mark_down_before_the_checks_do() {
    let mut stack = Stack::start(3);
    let port = free_port();
    // Checks every 10 s: fall × interval would take 30 s to notice.
    let check = ConfigText::new(check_toml("tcp", "error_limit = 2"))
        .set("listen.check", "interval", "10s")
        .set("listen.check", "fastinter", "10s")
        .set("listen.check", "downinter", "10s")
        .build();
    let pglb = Pglb::start(&Pglb::config(port, &check, &stack.servers_toml()), port);
    wait_for(&pglb, "is UP", 3, Duration::from_secs(5));
    stack.bouncers[0].kill();
    let started = Instant::now();
    for _ in 0..20 {
        let c = pglb
            .connect()
            .await
            .expect("no client fails: retries go elsewhere");
        c.simple_query("SELECT 1").await.expect("query");
    }
    let log = pglb.log();
    let down = log
        .lines()
        .find(|l| l.contains("Server postgres/pgb1 is DOWN"))
        .unwrap_or_else(|| panic!("passive health did not mark pgb1 down:\n{log}"));
    assert!(
        down.contains("2 consecutive connection errors on live traffic"),
        "{down}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let failures = log
        .lines()
        .filter(|l| l.contains("connect to server failed"))
        .count();
    assert_eq!(
        failures, 2,
        "after the limit no client is sent to pgb1:\n{log}"
    );
}
