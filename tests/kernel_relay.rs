//! `relay = "kernel"` with the real parts: PostgreSQL behind a PgBouncer, driven by psql,
//! pgbench and tokio-postgres. Every byte is checked end to end (md5 of a 100 MB COPY
//! in and out, a 10 MB value both ways), and each test checks that its sessions really
//! were relayed in the kernel (the session log line says `relay="kernel"`).

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{APP_DB, Pglb, Stack, free_port, pglb_bin, run_ok};

/// A pglb over `stack` whose listen relays in the kernel.
fn kernel_pglb(stack: &Stack) -> Pglb {
    let port = free_port();
    let extra = "relay = \"kernel\"\n[listen.timeouts]\nclient = \"5m\"\nserver = \"5m\"\n";
    let pglb = Pglb::start(&Pglb::config(port, extra, &stack.servers_toml()), port);
    pglb.wait_log(
        &["kernel relay ready (self-test passed)"],
        1,
        Duration::from_secs(5),
    );
    pglb
}

/// The session log lines that say the kernel relayed them.
fn kernel_sessions(pglb: &Pglb) -> Vec<String> {
    pglb.log()
        .lines()
        .filter(|l| l.contains("session closed") && l.contains("relay=\"kernel\""))
        .map(str::to_owned)
        .collect()
}

fn md5_of(path: &std::path::Path) -> String {
    let out = run_ok(Command::new("md5sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// psql as the app user through pglb, stopping at the first error.
fn psql(pglb: &Pglb, command: &str) -> String {
    run_ok(Command::new("psql").arg(pglb.dsn()).args([
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        command,
    ]))
}

/// `lines` lines of varied printable text (no tab or backslash: COPY text format as is).
fn write_copy_file(path: &std::path::Path, bytes: usize) {
    use std::io::Write;
    let mut rng = fastrand::Rng::with_seed(19);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut written = 0;
    while written < bytes {
        let len = rng.usize(1..400);
        let line: String = (0..len)
            .map(|_| rng.char('!'..='~'))
            .filter(|c| *c != '\\')
            .collect();
        writeln!(out, "{line}").expect("write");
        written += line.len() + 1;
    }
    out.flush().expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_100_mb_in_and_out_through_the_kernel_relay_is_byte_exact() {
    let stack = Stack::start(1);
    let pglb = kernel_pglb(&stack);
    let dir = tempfile::tempdir().expect("tempdir");
    let (file_in, file_out) = (dir.path().join("in.txt"), dir.path().join("out.txt"));
    write_copy_file(&file_in, 100 << 20);
    psql(
        &pglb,
        "CREATE TABLE copied (id bigserial PRIMARY KEY, data text)",
    );
    psql(
        &pglb,
        &format!("\\copy copied(data) from '{}'", file_in.display()),
    );
    // What arrived, read by PostgreSQL itself (not through pglb).
    let stored = stack.pg.psql_db(
        APP_DB,
        "SELECT md5(string_agg(data || E'\\n', '' ORDER BY id)) FROM copied",
    );
    assert_eq!(stored.trim(), md5_of(&file_in), "COPY in: bytes changed");
    psql(
        &pglb,
        &format!(
            "\\copy (SELECT data FROM copied ORDER BY id) to '{}'",
            file_out.display()
        ),
    );
    assert_eq!(
        md5_of(&file_out),
        md5_of(&file_in),
        "COPY out: bytes changed"
    );
    let log = pglb.wait_log(&["session closed"], 3, Duration::from_secs(5));
    let kernel = kernel_sessions(&pglb);
    assert!(
        kernel.len() >= 3,
        "psql sessions in the kernel: {kernel:?}\n{log}"
    );
    // The stats still count the bytes the kernel moved (over 100 MB each way).
    let moved = |field: &str| {
        kernel
            .iter()
            .filter_map(|l| l.split(&format!("{field}=")).nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    assert!(moved("bytes_in") > 100 << 20, "{kernel:?}");
    assert!(moved("bytes_out") > 100 << 20, "{kernel:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_value_goes_in_and_comes_back_whole() {
    let stack = Stack::start(1);
    let pglb = kernel_pglb(&stack);
    let mut rng = fastrand::Rng::with_seed(10);
    let value: String = (0..10 << 20).map(|_| rng.alphanumeric()).collect();
    let client = pglb.connect().await.expect("connect");
    client
        .batch_execute("CREATE TABLE big (v text)")
        .await
        .expect("create");
    client
        .execute("INSERT INTO big VALUES ($1)", &[&value])
        .await
        .expect("insert 10 MB");
    let row = client
        .query_one("SELECT v FROM big", &[])
        .await
        .expect("select");
    let back: &str = row.get(0);
    assert_eq!(back.len(), value.len());
    assert!(back == value, "the 10 MB value changed on the way");
    drop(client);
    pglb.wait_log(&["session closed"], 1, Duration::from_secs(5));
    assert!(!kernel_sessions(&pglb).is_empty(), "{}", pglb.log());
}

/// pgbench's summary: transactions processed and failed.
fn pgbench_counts(stdout: &str) -> (u64, u64) {
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field("number of transactions actually processed: "),
        field("number of failed transactions: "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_kernel_relay_has_no_failures_with_or_without_reconnects() {
    let stack = Stack::start(1);
    stack.pg.pgbench_init();
    let pglb = kernel_pglb(&stack);
    for args in [
        &["-n", "-S", "-c", "8", "-j", "2", "-T", "5"][..],
        // A connection per transaction: a hand-over and a close each time.
        &["-n", "-S", "-C", "-c", "4", "-j", "2", "-T", "3"][..],
        &["-n", "-c", "4", "-j", "2", "-T", "3"][..],
    ] {
        let out = harness::pgbench(pglb.port, args)
            .output()
            .await
            .expect("pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench {args:?}: {stdout}\n{stderr}");
        let (processed, failed) = pgbench_counts(&stdout);
        assert!(processed > 50, "pgbench {args:?}: {stdout}");
        assert_eq!(failed, 0, "pgbench {args:?}: {stdout}");
    }
    let kernel = kernel_sessions(&pglb);
    assert!(
        kernel.len() > 50,
        "sessions relayed in the kernel: {}",
        kernel.len()
    );
    // pgbench ends each connection with Terminate and a close (or, for those still in a
    // transaction when -T runs out, just a close: a client abort, CD). None ends as a
    // server error (SD): the session log says what happened, as in user space.
    let server_errors: Vec<_> = kernel
        .iter()
        .filter(|l| l.contains("term=\"SD\""))
        .collect();
    assert!(
        server_errors.is_empty(),
        "{} of {}: {:?}",
        server_errors.len(),
        kernel.len(),
        server_errors.first()
    );
}

#[test]
fn check_says_whether_the_kernel_can_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("pglb.toml");
    let port = free_port();
    let text = Pglb::config(
        port,
        "relay = \"kernel\"",
        "[[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:6432\"\n",
    );
    std::fs::write(&cfg, text).expect("write");
    let out = run_ok(
        Command::new(pglb_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("--check"),
    );
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(
        out.contains("kernel relay: ready (self-test passed)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_kernel_sessions_at_their_transaction_boundary() {
    let stack = Stack::start(1);
    let mut pglb = kernel_pglb(&stack);
    let idle = pglb.connect().await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    let busy = pglb.connect().await.expect("connect");
    busy.simple_query("BEGIN; SELECT 1").await.expect("begin");
    let t0 = std::time::Instant::now();
    pglb.proc.signal(nix::sys::signal::Signal::SIGTERM);
    // The idle one ends at once with PostgreSQL's admin_shutdown and pglb's reason.
    let mut ended = None;
    while t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = idle.simple_query("SELECT 1").await {
            ended = Some(e);
            break;
        }
    }
    let e = ended.expect("the idle session ended");
    let said = harness::db_error(&e).map(|(code, msg)| format!("{code} {msg}"));
    assert!(
        idle.is_closed() || said.as_deref().is_some_and(|s| s.contains("shutting down")),
        "{e} / {said:?}"
    );
    // The one inside a transaction finishes it.
    busy.simple_query("SELECT 2")
        .await
        .expect("the transaction goes on");
    busy.simple_query("COMMIT").await.expect("commit");
    assert!(
        pglb.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "pglb still running:\n{}",
        pglb.log()
    );
    let log = pglb.log();
    assert!(!log.contains("shutdown grace over"), "{log}");
    assert_eq!(kernel_sessions(&pglb).len(), 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_kernel_relay_on_for_new_sessions() {
    let stack = Stack::start(1);
    let port = free_port();
    let user = Pglb::config(port, "", &stack.servers_toml());
    let pglb = Pglb::start(&user, port);
    let before = pglb.connect().await.expect("connect");
    before.simple_query("SELECT 1").await.expect("query");
    pglb.reload(&harness::edit(
        &user,
        "bind =",
        "relay = \"kernel\"\nbind =",
    ));
    pglb.wait_log(&["kernel relay ready"], 1, Duration::from_secs(5));
    pglb.wait_log(&["configuration reloaded"], 1, Duration::from_secs(5));
    let after = pglb.connect().await.expect("connect after the reload");
    after.simple_query("SELECT 2").await.expect("query");
    // The session from before keeps working where it is.
    before
        .simple_query("SELECT 3")
        .await
        .expect("older session");
    drop((before, after));
    let log = pglb.wait_log(&["session closed"], 2, Duration::from_secs(5));
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session closed"))
        .collect();
    assert_eq!(closed.len(), 2, "{log}");
    assert!(
        closed.iter().any(|l| l.contains("relay=\"user\"")) && kernel_sessions(&pglb).len() == 1,
        "{log}"
    );
}

/// What the systemd drop-in (deploy/kernel-relay.conf) grants is what it takes: as an
/// unprivileged user pglb can load the kernel relay with CAP_BPF and CAP_NET_ADMIN, and
/// with either alone it says why not and relays in user space.
#[test]
fn an_unprivileged_pglb_needs_exactly_cap_bpf_and_cap_net_admin() {
    assert!(
        harness::is_root(),
        "this test switches users: run it as root"
    );
    let dir = harness::service_dir("pglb-caps-");
    let bin = dir.path().join("pglb");
    std::fs::copy(pglb_bin(), &bin).expect("copy pglb");
    let cfg = dir.path().join("pglb.toml");
    let text = Pglb::config(
        free_port(),
        "relay = \"kernel\"",
        "[[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:6432\"\n",
    );
    std::fs::write(&cfg, text).expect("write");
    for path in [dir.path(), &bin, &cfg] {
        harness::give_to_service_user(path);
    }
    let check = |caps: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
        if !caps.is_empty() {
            c.arg(format!("--inh-caps={caps}"))
                .arg(format!("--ambient-caps={caps}"));
        }
        run_ok(
            c.arg("--")
                .arg(&bin)
                .arg("--config")
                .arg(&cfg)
                .arg("--check"),
        )
    };
    let both = check("+bpf,+net_admin");
    assert!(
        both.contains("kernel relay: ready (self-test passed)"),
        "{both}"
    );
    for caps in ["", "+bpf", "+net_admin"] {
        let out = check(caps);
        assert!(
            out.contains("kernel relay: unavailable")
                && out.contains("Operation not permitted")
                && out.contains("CAP_BPF and CAP_NET_ADMIN")
                && out.contains("relay in user space"),
            "caps {caps:?}: {out}"
        );
    }
}

/// TLS sessions stay in user space on a `relay = "kernel"` listen (the kernel would move
/// ciphertext pglb must decrypt); plaintext ones on the same listen go to the kernel,
/// and /metrics counts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_kernel_listen_tls_stays_in_user_space_and_metrics_count_both() {
    let stack = Stack::start(1);
    let certs = tempfile::tempdir().expect("tempdir");
    harness::make_ca(certs.path());
    let (port, stats) = (free_port(), free_port());
    let text = harness::tls_config(port, certs.path(), &stack.servers_toml());
    let text = harness::edit(&text, "[listen.tls]", "relay = \"kernel\"\n[listen.tls]");
    let pglb = Pglb::start(&format!("{text}\n{}", harness::stats_toml(stats)), port);
    pglb.wait_log(&["kernel relay ready"], 1, Duration::from_secs(5));
    for sslmode in ["require", "disable"] {
        let out = Command::new("psql")
            .arg(format!("{} sslmode={sslmode}", pglb.dsn()))
            .args(["-X", "-At", "-c", "SELECT 'through pglb'"])
            .output()
            .expect("psql");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("through pglb"),
            "{sslmode}: {said}"
        );
    }
    let log = pglb.wait_log(&["session closed"], 2, Duration::from_secs(5));
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session closed"))
        .collect();
    let tls = closed
        .iter()
        .find(|l| l.contains("tls=\"terminated\""))
        .expect("TLS session");
    assert!(tls.contains("relay=\"user\""), "{tls}");
    let plain = closed
        .iter()
        .find(|l| l.contains("tls=\"none\""))
        .expect("plain session");
    assert!(plain.contains("relay=\"kernel\""), "{plain}");
    let (_, metrics) = harness::http_get(stats, "/metrics").await;
    for line in [
        "pglb_kernel_relay_available 1.0",
        "pglb_kernel_relay_sessions_total{outcome=\"handed_over\"} 1.0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
}
