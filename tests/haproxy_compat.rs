//! Stats that mean what HAProxy's mean: pglb's CSV beside HAProxy 2.6's on the same
//! PgBouncers (every column that differs is listed, with its reason, in
//! `tests/fixtures/haproxy_csv_differences.txt` and the README), `/metrics` through
//! Prometheus' own linter, the Grafana dashboard against the metrics that exist, and
//! HAProxy's CSV URL forms.

mod harness;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{Pglb, Proc, Stack, free_port, http_get, http_with};
use nix::sys::signal::Signal;

const DIFFERENCES: &str = include_str!("fixtures/haproxy_csv_differences.txt");

/// HAProxy 2.6 in front of the same servers, as the production stack runs it.
struct Haproxy {
    _proc: Proc,
    _dir: tempfile::TempDir,
}

fn haproxy(port: u16, stats: u16, stack: &Stack) -> Haproxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let servers: String = stack
        .bouncers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "  server pgb{} {} check inter 200ms fall 3 rise 2\n",
                i + 1,
                b.addr()
            )
        })
        .collect();
    let cfg = format!(
        "global\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30m\n  timeout server 30m\n\
         frontend stats\n  mode http\n  bind 127.0.0.1:{stats}\n  stats enable\n  stats uri /stats\n\
         listen postgres\n  bind 127.0.0.1:{port}\n  balance leastconn\n  option pgsql-check user {}\n{servers}",
        harness::APP_USER
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("haproxy.cfg");
    let proc = Proc::spawn(
        Command::new("/usr/sbin/haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "haproxy (deploy/apt-deps.sh installs it)",
        Signal::SIGKILL,
    );
    harness::wait_listening(
        std::net::SocketAddr::from(([127, 0, 0, 1], stats)),
        "haproxy",
        Duration::from_secs(5),
    );
    Haproxy {
        _proc: proc,
        _dir: dir,
    }
}

/// (header, rows by svname kind: FRONTEND, BACKEND, or "server").
fn parse(csv: &str) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    let mut lines = csv.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .map(str::to_owned)
        .collect();
    let rows = lines
        .filter(|l| l.starts_with("postgres,"))
        .map(|l| {
            let f: Vec<String> = l.split(',').map(str::to_owned).collect();
            let kind = match f[1].as_str() {
                "FRONTEND" | "BACKEND" => f[1].clone(),
                _ => "server".to_owned(),
            };
            (kind, f)
        })
        .collect();
    (header, rows)
}

/// `kind column` for every column filled in one CSV and empty in the other.
fn filled_differently(ours: &str, theirs: &str) -> BTreeSet<String> {
    let (h1, r1) = parse(ours);
    let (h2, r2) = parse(theirs);
    let mut out = BTreeSet::new();
    for kind in ["FRONTEND", "server", "BACKEND"] {
        let a = r1.iter().find(|(k, _)| k == kind).map(|(_, f)| f);
        let b = r2.iter().find(|(k, _)| k == kind).map(|(_, f)| f);
        let (Some(a), Some(b)) = (a, b) else {
            out.insert(format!("{kind} (row missing)"));
            continue;
        };
        for (i, name) in h1.iter().enumerate().take(100) {
            if name.is_empty() || h2.get(i) != Some(name) {
                continue;
            }
            let ours = a.get(i).is_some_and(|v| !v.is_empty());
            let theirs = b.get(i).is_some_and(|v| !v.is_empty());
            if ours != theirs {
                let side = if ours { "pglb only" } else { "haproxy only" };
                out.insert(format!("{kind} {name} ({side})"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_columns_match_haproxy_2_6_on_the_same_pgbouncers() {
    let stack = Stack::start(2);
    let (hport, hstats) = (free_port(), free_port());
    let _haproxy = haproxy(hport, hstats, &stack);
    let (port, stats) = (free_port(), free_port());
    let check = format!(
        "[listen.check]\ntype = \"pgsql\"\nuser = \"{}\"\ninterval = \"200ms\"\nrise = 2\nfall = 3\n",
        harness::APP_USER
    );
    let config = Pglb::config_with_open_stats(port, &check, &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    pglb.wait_log(&["is UP"], 2, Duration::from_secs(5));
    // The same traffic through both: a few sessions each.
    for p in [port, hport] {
        let dsn = format!(
            "host=127.0.0.1 port={p} user={} password={} dbname={}",
            harness::APP_USER,
            harness::APP_PASSWORD,
            harness::APP_DB
        );
        for _ in 0..4 {
            let c = harness::connect_dsn(&dsn).await.expect("connect");
            c.simple_query("SELECT 1").await.expect("query");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, ours) = http_get(stats, "/stats;csv").await;
    // HAProxy answers chunked: curl reads it.
    let theirs = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            &format!("http://127.0.0.1:{hstats}/stats;csv"),
        ])
        .output()
        .expect("curl");
    let theirs = String::from_utf8_lossy(&theirs.stdout).into_owned();
    let (h1, _) = parse(&ours);
    let (h2, _) = parse(&theirs);
    assert_eq!(h1[..100], h2[..100], "the same first 100 columns, in order");

    let found = filled_differently(&ours, &theirs);
    let expected: BTreeSet<String> = DIFFERENCES
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(" — ").next().unwrap_or(l).trim().to_owned())
        .collect();
    let new: Vec<&String> = found.difference(&expected).collect();
    let gone: Vec<&String> = expected.difference(&found).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "columns filled differently from HAProxy 2.6:\n  not explained: {new:?}\n  listed but no longer different: {gone:?}\n\nours:\n{ours}\ntheirs:\n{theirs}"
    );
    // Every listed difference is explained in the README.
    let readme = include_str!("../README.md");
    for d in &expected {
        let column = d.split(' ').nth(1).unwrap_or("");
        assert!(
            readme.contains(&format!("`{column}`")),
            "README does not explain {d}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_metrics_and_the_grafana_dashboard_uses_only_them() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let check = "[listen.check]\ntype = \"tcp\"";
    let config = Pglb::config_with_open_stats(port, check, &stack.servers_toml(), stats);
    let pglb = Pglb::start(&config, port);
    pglb.wait_log(&["is UP"], 2, Duration::from_secs(5));
    let c = pglb.connect().await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");

    // Without an Accept header (promtool, curl): Prometheus' classic text format.
    let (_, head, text) = http_with(stats, "GET", "/metrics", &[], "").await;
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let said = promtool_check(&text);
    assert!(said.is_empty(), "promtool: {said}\n{text}");
    // Prometheus itself asks for OpenMetrics and gets it.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (_, head, open) = http_with(stats, "GET", "/metrics", &[("Accept", accept)], "").await;
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(open.trim_end().ends_with("# EOF"));
    // promtool 2.42 lints the classic format only; Prometheus itself takes the
    // OpenMetrics answer whole.
    prometheus_scrapes(stats);

    // The Grafana dashboard: provisioning-ready (a datasource variable, no import-time
    // inputs) and every metric it queries exists.
    let dashboard = include_str!("../deploy/grafana/pglb-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
    assert!(
        json.get("__inputs").is_none() && !dashboard.contains("${DS_"),
        "import-only inputs"
    );
    let vars = json["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "datasource")
    );
    let names: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut queried = BTreeSet::new();
    for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("pglb_") {
            queried.insert(word.to_owned());
        }
    }
    assert!(!queried.is_empty());
    for m in &queried {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(m.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            names.contains(m.as_str()) || names.contains(base),
            "the dashboard queries {m}, which /metrics does not have"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxys_csv_url_forms_answer_csv() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let config = Pglb::config_with_open_stats(port, "", &stack.servers_toml(), stats);
    let _pglb = Pglb::start(&config, port);
    let deadline = Instant::now() + Duration::from_secs(2);
    for path in [
        "/stats;csv",
        "/stats?csv",
        "/stats?stats;csv",
        "/stats/;csv",
        "/stats;csv;norefresh",
    ] {
        let (code, body) = http_get(stats, path).await;
        assert_eq!(code, 200, "{path}");
        assert!(body.starts_with("# pxname,svname,"), "{path}: {body}");
        assert!(Instant::now() < deadline);
    }
}

/// Seen: `chkfail` counted every failed check of a server DOWN since start (209 where
/// HAProxy counted 4), and its `downtime` and `chkdown` stayed 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_since_start_reads_as_in_haproxy() {
    let stack = Stack::start(1);
    let dead = free_port();
    let servers = format!(
        "{}[[listen.server]]\nname = \"dead\"\naddr = \"127.0.0.1:{dead}\"\n",
        stack.servers_toml()
    );
    let (port, stats) = (free_port(), free_port());
    let check = "[listen.check]\ntype = \"tcp\"\ninterval = \"100ms\"\ndowninter = \"100ms\"\nrise = 2\nfall = 3\n";
    let config = Pglb::config_with_open_stats(port, check, &servers, stats);
    let _pglb = Pglb::start(&config, port);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (_, csv) = http_get(stats, "/stats;csv").await;
    let (header, rows) = parse(&csv);
    let col = |name: &str| header.iter().position(|h| h == name).expect("column");
    let row = rows
        .iter()
        .find(|(_, f)| f[1] == "dead")
        .map(|(_, f)| f.clone())
        .expect("dead row");
    assert_eq!(row[col("status")], "DOWN");
    assert_eq!(
        row[col("chkfail")],
        "0",
        "failed checks while DOWN do not count"
    );
    assert_eq!(
        row[col("chkdown")],
        "1",
        "DOWN since start is one transition"
    );
    let downtime: u64 = row[col("downtime")].parse().unwrap_or(0);
    assert!(downtime >= 2, "downtime counts from the start: {downtime}");
    let backend = rows
        .iter()
        .find(|(k, _)| k == "BACKEND")
        .map(|(_, f)| f.clone())
        .expect("backend row");
    assert!(!backend[col("lastchg")].is_empty() && backend[col("downtime")] == "0");
}

/// `promtool check metrics` on `text`: what it said (empty when it passed and found
/// nothing to lint), or why it failed.
fn promtool_check(text: &str) -> String {
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (deploy/apt-deps.sh installs prometheus)");
    use std::io::Write as _;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = lint.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() {
        true => said.trim().to_owned(),
        false => format!("failed: {said}"),
    }
}

/// A real Prometheus (Debian's, as the VMs run it) scrapes pglb's `/metrics` (asking for
/// OpenMetrics, as it does) without an error, and a counter's samples arrive.
fn prometheus_scrapes(stats: u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pglb\n    \
             static_configs:\n      - targets: ['127.0.0.1:{stats}']\n"
        ),
    )
    .expect("config");
    let web = free_port();
    let _prometheus = Proc::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).expect("log")),
        "prometheus",
        Signal::SIGTERM,
    );
    let api = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-m", "2", &format!("http://127.0.0.1:{web}{path}")])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let targets = loop {
        let t = api("/api/v1/targets");
        if t.contains("\"health\":\"up\"") {
            break t;
        }
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "not scraped: {t}\n{log}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(targets.contains("\"lastError\":\"\""), "{targets}");
    let samples = api("/api/v1/query?query=pglb_listen_sessions_total");
    assert!(
        samples.contains("\"listen\":\"postgres\""),
        "a counter's samples: {samples}"
    );
}
