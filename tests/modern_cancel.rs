//! Cancels from libpq 17+ (`PQcancelCreate`/`PQcancelBlocking`, psycopg 3's
//! `cancel_safe()`): the cancel connection negotiates encryption like a normal one, so
//! with `sslmode=prefer` it sends an SSLRequest, reads `N`, then the CancelRequest. Driven
//! by psycopg 3 with the libpq 18 it bundles (installed from PyPI by `deploy/apt-deps.sh`),
//! through pglb to three PgBouncers, to PostgreSQL with protocol 3.2 asked for, and over
//! TLS that pglb terminates.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Pglb, Postgres, Stack, free_port, make_ca, tls_config};

/// Runs `tests/clients/cancel_safe.py` against `dsn`; returns its JSON report.
fn cancel_safe(dsn: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/cancel_safe.py");
    let out = Command::new("timeout")
        .args(["30", "python3", script, dsn])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .expect("python3 (psycopg[binary] from deploy/apt-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cancel_safe.py {dsn}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

/// The report says: libpq 17 or later, cancelled within 1 s of the call, no error.
fn assert_cancelled(report: &serde_json::Value, what: &str) {
    let libpq = report["libpq"].as_i64().unwrap_or(0);
    assert!(
        libpq >= 170000,
        "{what}: libpq {libpq} lacks the new cancel API"
    );
    assert_eq!(report["cancelled"], true, "{what}: {report}");
    assert!(report["cancel_error"].is_null(), "{what}: {report}");
    let after = report["after_cancel"].as_f64().unwrap_or(f64::MAX);
    assert!(
        after < 1.0,
        "{what}: took {after} s after the cancel: {report}"
    );
}

fn dsn(port: u16, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={} dbname={} {extra}",
        harness::APP_USER,
        harness::APP_DB
    )
}

#[test]
fn cancel_safe_through_pgbouncers_with_sslmode_prefer_and_disable() {
    let stack = Stack::start(3);
    let port = free_port();
    let pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    // Several rounds, so that sessions land on every PgBouncer: a cancel sent to the
    // wrong one would be lost.
    for round in 0..3 {
        for mode in ["prefer", "disable"] {
            let report = cancel_safe(&dsn(port, &format!("sslmode={mode}")));
            assert_cancelled(&report, &format!("round {round}, sslmode={mode}"));
        }
    }
    let log = pglb.log();
    assert!(
        !log.contains("startup-timeout"),
        "a cancel became a refusal: {log}"
    );
    let routed = log
        .lines()
        .filter(|l| l.contains("cancel request routed to the session's server"))
        .count();
    assert_eq!(
        routed, 6,
        "every cancel went to its session's server: {log}"
    );
}

#[test]
fn cancel_safe_to_postgres_asking_for_protocol_3_2() {
    let pg = Postgres::start();
    let port = free_port();
    let servers = format!(
        "[[listen.server]]\nname = \"pg\"\naddr = \"127.0.0.1:{}\"\n",
        pg.port
    );
    let _pglb = Pglb::start(&Pglb::config(port, "", &servers), port);
    for mode in ["prefer", "disable"] {
        let report = cancel_safe(&dsn(
            port,
            &format!("sslmode={mode} max_protocol_version=3.2"),
        ));
        assert_cancelled(&report, &format!("PostgreSQL, sslmode={mode}"));
    }
}

#[test]
fn cancel_safe_inside_tls_that_pglb_terminates() {
    let stack = Stack::start(2);
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path());
    let port = free_port();
    let pglb = Pglb::start(&tls_config(port, certs.path(), &stack.servers_toml()), port);
    for mode in ["require", "prefer"] {
        for round in 0..2 {
            let report = cancel_safe(&dsn(port, &format!("sslmode={mode}")));
            // "SSL error: unexpected eof while reading" here meant no close_notify.
            assert_cancelled(&report, &format!("TLS round {round}, sslmode={mode}"));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = pglb.log();
    let routed = log
        .lines()
        .filter(|l| l.contains("cancel request routed to the session's server"))
        .count();
    assert_eq!(routed, 4, "{log}");
}
