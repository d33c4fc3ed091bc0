//! The stats server against real PgBouncers: HAProxy-compatible CSV, Prometheus metrics,
//! /health, admin actions with authentication and a state file, and webhook alerts.

mod harness;

use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, free_port, http, http_get};

const CHECK: &str = "[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nfastinter = \"100ms\"\ndowninter = \"200ms\"\nrise = 2\nfall = 2\n";

/// pglb on `port` over the stack's PgBouncers with tcp checks, and its stats on `stats`.
fn checked_with_stats(port: u16, stack: &Stack, stats: u16, stats_extra: &str) -> String {
    format!(
        "{}\n{}",
        Pglb::config(port, CHECK, &stack.servers_toml()),
        stats_toml(stats, stats_extra)
    )
}

fn stats_toml(port: u16, extra: &str) -> String {
    format!(
        "[stats]\nbind = \"127.0.0.1:{port}\"\nrefresh = \"1s\"\n{extra}\n[stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n"
    )
}

/// Parses the CSV with a plain CSV reader into (header, rows).
fn parse_csv(text: &str) -> (Vec<String>, Vec<csv::StringRecord>) {
    let text = text.strip_prefix("# ").expect("CSV starts with '# '");
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_owned)
        .collect();
    let rows = reader.records().map(|r| r.expect("row")).collect();
    (header, rows)
}

fn field<'a>(header: &[String], row: &'a csv::StringRecord, name: &str) -> &'a str {
    let i = header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    row.get(i).unwrap_or("")
}

async fn server_status(stats: u16, server: &str) -> String {
    let (code, body) = http_get(stats, "/stats;csv").await;
    assert_eq!(code, 200);
    let (header, rows) = parse_csv(&body);
    let row = rows
        .iter()
        .find(|r| field(&header, r, "svname") == server)
        .expect("server row");
    field(&header, row, "status").to_owned()
}

async fn wait_status(stats: u16, server: &str, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let s = server_status(stats, server).await;
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{server} is {s:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn csv_header_matches_the_haproxy_reference() {
    let expected = include_str!("fixtures/haproxy_csv_columns.txt")
        .lines()
        .find(|l| l.starts_with("pxname,svname,"))
        .expect("column list in the fixture");
    assert_eq!(pglb::stats::csv::COLUMNS.join(","), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_rows_follow_a_killed_and_restarted_pgbouncer() {
    let mut stack = Stack::start(3);
    let (port, stats) = (free_port(), free_port());
    let config = checked_with_stats(port, &stack, stats, "");
    let pglb = Pglb::start(&config, port);
    wait_status(stats, "pgb1", "UP", Duration::from_secs(5)).await;

    let c = pglb.connect().await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");
    let (_, body) = http_get(stats, "/stats;csv").await;
    let first_line = body.lines().next().expect("header line");
    assert!(
        first_line.starts_with("# pxname,svname,qcur,")
            && first_line.ends_with("need_conn_est,uweight,")
    );
    let (header, rows) = parse_csv(&body);
    assert_eq!(
        header.len(),
        101,
        "100 columns and the empty one after the trailing comma"
    );
    let kinds: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                field(&header, r, "svname"),
                field(&header, r, "type"),
                field(&header, r, "status"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("FRONTEND", "0", "OPEN"),
            ("pgb1", "2", "UP"),
            ("pgb2", "2", "UP"),
            ("pgb3", "2", "UP"),
            ("BACKEND", "1", "UP")
        ]
    );
    let frontend = &rows[0];
    assert_eq!(field(&header, frontend, "scur"), "1");
    assert_eq!(field(&header, frontend, "mode"), "tcp");
    let backend = &rows[4];
    assert_eq!(field(&header, backend, "algo"), "leastconn");
    assert_eq!(field(&header, backend, "act"), "3");
    assert_eq!(field(&header, &rows[1], "check_status"), "L4OK");
    drop(c);

    stack.bouncers[1].kill();
    wait_status(stats, "pgb2", "DOWN", Duration::from_secs(3)).await;
    let (_, body) = http_get(stats, "/stats?csv").await;
    let (header, rows) = parse_csv(&body);
    let pgb2 = rows
        .iter()
        .find(|r| field(&header, r, "svname") == "pgb2")
        .expect("row");
    assert_eq!(field(&header, pgb2, "check_status"), "L4CON");
    assert_eq!(field(&header, pgb2, "last_chk"), "Connection refused");
    assert_eq!(
        field(&header, pgb2, "check_desc"),
        "Layer4 connection problem"
    );
    assert_eq!(field(&header, pgb2, "chkdown"), "1");
    let backend = rows
        .iter()
        .find(|r| field(&header, r, "svname") == "BACKEND")
        .expect("row");
    assert_eq!(field(&header, backend, "act"), "2");

    stack.bouncers[1].restart();
    wait_status(stats, "pgb2", "UP", Duration::from_secs(3)).await;
}

/// GET /metrics, parsed as Prometheus text.
async fn scrape(stats: u16) -> prometheus_parse::Scrape {
    let (code, body) = http_get(stats, "/metrics").await;
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text")
}

/// The sum of a metric's samples, only those with `label` when given.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_evenly_over_worker_threads() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let config = ConfigText::new(checked_with_stats(port, &stack, stats, ""))
        .set("global", "threads", 2)
        .build();
    let pglb = Pglb::start(&config, port);
    // One after another: each new client goes to the worker with fewer sessions,
    // whichever worker accepted it.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let c = pglb.connect().await.expect("connect");
        c.simple_query("SELECT 1").await.expect("query");
        clients.push(c);
    }
    let scrape = scrape(stats).await;
    let on = |w: &str| sum(&scrape, "pglb_worker_current_sessions", Some(("worker", w)));
    assert_eq!((on("0"), on("1")), (10.0, 10.0));
    // And every session works at once, whichever thread relays it.
    let queries = clients
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(0.2)"));
    for r in futures_util::future::join_all(queries).await {
        r.expect("query");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_health_flips_when_all_servers_are_down() {
    let mut stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let config = checked_with_stats(port, &stack, stats, "");
    let pglb = Pglb::start(&config, port);
    wait_status(stats, "pgb2", "UP", Duration::from_secs(5)).await;
    let c = pglb.connect().await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");

    let scrape = scrape(stats).await;
    let value =
        |name: &str, server: Option<&str>| sum(&scrape, name, server.map(|s| ("server", s)));
    assert_eq!(value("pglb_listen_current_sessions", None), 1.0);
    assert_eq!(value("pglb_server_up", None), 2.0);
    assert_eq!(value("pglb_server_sessions_total", None), 1.0);
    assert!(value("pglb_server_bytes_in_total", None) > 0.0);
    assert_eq!(value("pglb_server_weight", Some("pgb1")), 100.0);
    drop(c);

    // Drained or in maintenance, a server is still up (its health); the status and the
    // JSON API say which.
    harness::admin_action(stats, "pgb1", "drain").await;
    harness::admin_action(stats, "pgb2", "maint").await;
    let later = self::scrape(stats).await;
    assert_eq!(sum(&later, "pglb_server_up", None), 2.0);
    let state_of = |server: &str| {
        later
            .samples
            .iter()
            .filter(|s| s.metric == "pglb_server_status" && s.labels.get("server") == Some(server))
            .find(|s| matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 1.0))
            .and_then(|s| s.labels.get("state").map(str::to_owned))
    };
    assert_eq!(state_of("pgb1").as_deref(), Some("DRAIN"));
    assert_eq!(state_of("pgb2").as_deref(), Some("MAINT"));
    let (_, json) = http_get(stats, "/api/servers").await;
    let api: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let servers = &api["listens"][0]["servers"];
    assert_eq!(api["listens"][0]["name"], "postgres", "{json}");
    for (i, name, admin, status) in [(0, "pgb1", "drain", "DRAIN"), (1, "pgb2", "maint", "MAINT")] {
        assert_eq!(servers[i]["name"], name, "{json}");
        assert_eq!(servers[i]["admin"], admin, "{json}");
        assert_eq!(servers[i]["status"], status, "{json}");
        assert_eq!(servers[i]["weight"], 100, "{json}");
    }
    harness::admin_action(stats, "pgb1", "ready").await;
    harness::admin_action(stats, "pgb2", "ready").await;

    let (code, body) = http_get(stats, "/health").await;
    assert_eq!((code, body.trim()), (200, "UP: 1 listen(s) serving"));
    stack.bouncers[0].kill();
    stack.bouncers[1].kill();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (code, body) = http_get(stats, "/health?servers").await;
        if code == 503 {
            assert_eq!(
                body.trim(),
                "DOWN: listen 'postgres' has no server available"
            );
            break;
        }
        assert!(Instant::now() < deadline, "/health?servers stayed {code}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // pglb itself still serves (it answers clients with its error): alive.
    let (code, body) = http_get(stats, "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("no server available for listen(s) postgres"),
        "{body}"
    );
    let (_, body) = http_get(stats, "/metrics").await;
    assert!(
        body.contains("pglb_server_status{listen=\"postgres\",server=\"pgb1\",state=\"DOWN\"} 1"),
        "{body}"
    );
    stack.bouncers[0].restart();
    stack.bouncers[1].restart();
    // Every server drained counts as none for the "has servers" check.
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(stats, "/health?servers").await.0 != 200 {
        assert!(Instant::now() < deadline, "servers did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness::admin_action(stats, "pgb1", "drain").await;
    harness::admin_action(stats, "pgb2", "maint").await;
    let (code, body) = http_get(stats, "/health?servers").await;
    assert_eq!(
        (code, body.trim()),
        (503, "DOWN: listen 'postgres' has no server available")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_credentials_drains_and_survives_a_restart() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state_file = state_dir.path().join("state.toml");
    let extra = format!("state_file = \"{}\"", state_file.display());
    let config = checked_with_stats(port, &stack, stats, &extra);
    let mut pglb = Pglb::start(&config, port);
    wait_status(stats, "pgb2", "UP", Duration::from_secs(5)).await;
    let before = pglb.connect().await.expect("connect");
    before.simple_query("SELECT 1").await.expect("query");

    let form = "b=postgres&s=pgb1&action=drain";
    let urlencoded = "application/x-www-form-urlencoded";
    let (code, head, _) = http(stats, "POST", "/stats", None, form, urlencoded).await;
    assert_eq!(code, 401);
    assert!(
        head.to_lowercase().contains("www-authenticate: basic"),
        "{head}"
    );
    let (code, _, _) = http(
        stats,
        "POST",
        "/stats",
        Some(("admin", "wrong")),
        form,
        urlencoded,
    )
    .await;
    assert_eq!(code, 401);
    let (code, head, _) = http(
        stats,
        "POST",
        "/stats",
        Some(("admin", "s3cret")),
        form,
        urlencoded,
    )
    .await;
    assert_eq!(code, 303);
    assert!(head.contains("location: /stats;st=DONE"), "{head}");
    assert_eq!(server_status(stats, "pgb1").await, "DRAIN");

    // Drain: no new client goes to pgb1. The existing session (on pgb1: leastconn's
    // first pick) was idle, so it is closed at once with FATAL 57P01 (see protocol.rs).
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(pglb.connect().await.expect("connect"));
    }
    assert_eq!(stack.bouncers[1].app_clients().await, 6);
    // The idle session on pgb1 ends once it has been quiet for half a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while stack.bouncers[0].app_clients().await > 0 {
        assert!(
            Instant::now() < deadline,
            "pgb1 kept its drained idle session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        before.simple_query("SELECT 1").await.is_err(),
        "the idle session on pgb1 was drained"
    );

    // JSON API: a weight, then a bad request explained.
    let (code, _, body) = http(
        stats,
        "POST",
        "/api/servers/postgres/pgb2",
        Some(("admin", "s3cret")),
        "{\"weight\": 50}",
        "application/json",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = http(
        stats,
        "POST",
        "/api/servers/postgres/nope",
        Some(("admin", "s3cret")),
        "{\"action\": \"drain\"}",
        "application/json",
    )
    .await;
    assert_eq!(
        code, 404,
        "an unknown server is not found, not a bad request"
    );
    assert!(body.contains("has no server \\\"nope\\\""), "{body}");

    // Restart: the drain and the weight come back from the state file.
    drop((before, held));
    pglb.proc.stop();
    let pglb = Pglb::start(&config, port);
    wait_status(stats, "pgb1", "DRAIN", Duration::from_secs(5)).await;
    let (_, body) = http_get(stats, "/stats;csv").await;
    let (header, rows) = parse_csv(&body);
    let pgb2 = rows
        .iter()
        .find(|r| field(&header, r, "svname") == "pgb2")
        .expect("row");
    assert_eq!(field(&header, pgb2, "weight"), "50");
    assert!(pglb.log().contains("restored from the state file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_posted_to_the_webhook() {
    let mut stack = Stack::start(2);
    let (hook, mut rx) = harness::webhook().await;
    let (port, stats) = (free_port(), free_port());
    let alerts = format!(
        "[alerts]\nwebhook_url = \"http://127.0.0.1:{hook}/services/T000/B000/XXX\"\ncoalesce = \"300ms\"\n"
    );
    let config = format!("{}\n{alerts}", checked_with_stats(port, &stack, stats, ""));
    let _pglb = Pglb::start(&config, port);
    // Servers passing their first checks are not a change worth a message.
    _pglb.wait_log(&["is UP, reason"], 2, Duration::from_secs(5));
    if let Ok(Some(body)) = tokio::time::timeout(Duration::from_millis(800), rx.recv()).await {
        panic!("an alert for the first UP: {body}");
    }

    stack.bouncers[0].kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let body = match tokio::time::timeout(deadline - Instant::now(), rx.recv()).await {
            Ok(Some(b)) => b,
            _ => panic!("no DOWN alert:\n{}", _pglb.log()),
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        let t = v["text"].as_str().unwrap_or_default().to_owned();
        if t.contains("server 'pgb1'") && t.contains("UP 1/2 → DOWN") {
            break t;
        }
    };
    assert!(
        text.contains("listen 'postgres'")
            && text.contains("Connection refused")
            && text.contains("[pglb@"),
        "{text}"
    );

    // The last server down, then back: "no server available", then "has servers again".
    stack.bouncers[1].kill();
    let mut texts = String::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !texts.contains("has no server available!") {
        match tokio::time::timeout(deadline - Instant::now(), rx.recv()).await {
            Ok(Some(b)) => texts.push_str(&b),
            _ => panic!("no 'no server available' alert: {texts}"),
        }
    }
    stack.bouncers[1].restart();
    while !texts.contains("has servers again") {
        match tokio::time::timeout(deadline - Instant::now(), rx.recv()).await {
            Ok(Some(b)) => texts.push_str(&b),
            _ => panic!("no recovery alert: {texts}"),
        }
    }
}
