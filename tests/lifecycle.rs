//! Stopping and upgrading without losing a connection. Seen before: `systemctl stop`
//! closed the listener at SIGTERM, so clients were refused until keepalived noticed
//! (0–8 refused connections over up to 755 ms), and one idle psql session made every
//! stop wait the full `grace` (30 s) before it was cut with "closed by shutdown".

mod harness;

use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, free_port, http_get};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn config(port: u16, stats: u16, stack: &Stack, linger: &str) -> String {
    ConfigText::new(Pglb::config(port, "", &stack.servers_toml()))
        .set("global", "linger", linger)
        .set("global", "grace", "30s")
        .build()
        + &format!("\n[stats]\nbind = \"127.0.0.1:{stats}\"\n")
}

/// pglb run from its own copy of the binary, as a package installs it, so a test can
/// replace the file under the running process.
struct Installed {
    dir: tempfile::TempDir,
    binary: std::path::PathBuf,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Installed {
    fn new(config: &str) -> Installed {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("pglb");
        std::fs::copy(env!("CARGO_BIN_EXE_pglb"), &binary).expect("copy binary");
        let (log, path) = (dir.path().join("pglb.log"), dir.path().join("pglb.toml"));
        std::fs::write(&path, config).expect("config");
        Installed {
            dir,
            binary,
            config: path,
            log,
        }
    }

    /// Starts it (stopped by pid when the guard goes) and waits until it listens.
    fn start(&self) -> harness::Proc {
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&self.log).expect("log"));
        let pglb = harness::Proc::spawn(&mut cmd, "pglb", Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("listening listen=postgres") {
            assert!(Instant::now() < deadline, "{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        pglb
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the binary with a copy of `file`: a new inode, as a package upgrade does.
    fn replace_binary(&self, file: &std::path::Path) {
        let fresh = self.dir.path().join("pglb.new");
        std::fs::copy(file, &fresh).expect("copy");
        std::fs::rename(&fresh, &self.binary).expect("replace the binary");
    }

    /// Replaces the binary with a shell script of `lines`.
    fn replace_with_script(&self, lines: &str) {
        let script = self.dir.path().join("script");
        std::fs::write(&script, format!("#!/bin/sh\n{lines}\n")).expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        self.replace_binary(&script);
    }

    /// The app user's libpq connection string for `port`.
    fn dsn(port: u16) -> String {
        format!(
            "host=127.0.0.1 port={port} user={} password={} dbname={}",
            harness::APP_USER,
            harness::APP_PASSWORD,
            harness::APP_DB
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_down_keeps_accepting_and_ends_idle_sessions_at_once() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    let text = config(port, stats, &stack, "2s");
    assert!(text.contains("linger = \"2s\"") && text.contains("grace = \"30s\""));
    let mut pglb = Pglb::start(&text, port);
    let (idle, idle_conn) = pglb.connect_watched().await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    let (busy, busy_conn) = pglb.connect_watched().await.expect("connect");
    busy.simple_query("BEGIN; SELECT 1").await.expect("begin");

    let t0 = Instant::now();
    pglb.proc.signal(Signal::SIGTERM);
    // /health says DOWN at once: keepalived moves the VIP away first.
    loop {
        let (code, body) = http_get(stats, "/health").await;
        if code == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(300),
            "/health still {code}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

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
    let shutting_down = (
        "57P01".to_owned(),
        "pglb is shutting down; reconnect to continue".to_owned(),
    );
    assert_eq!(harness::fatal_at_end(idle_conn).await, shutting_down);
    // The session inside a transaction finishes it, then ends at the boundary.
    busy.simple_query("SELECT 2")
        .await
        .expect("the transaction goes on");
    busy.simple_query("COMMIT").await.expect("commit");
    // …and ends at that boundary, with the same words.
    assert_eq!(harness::fatal_at_end(busy_conn).await, shutting_down);
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
        ConfigText::new(Pglb::config(
            port,
            "",
            "[[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:1\"\n",
        ))
        .set("global", "maxconn", 1000)
        .build(),
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

/// Seen before: an upgrade (`apt upgrade` restarts the unit) was a failover with
/// refused connections. Now the binary is replaced and `systemctl reload` (SIGHUP)
/// starts it on the same sockets: no connection is refused, `/health` keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_binary_takes_over_the_sockets_on_reload_without_refusing_anyone() {
    let stack = Stack::start(2);
    let (port, stats) = (free_port(), free_port());
    // The runtime API on TCP too: it must be handed over like the other sockets.
    let api = free_port();
    let installed = Installed::new(
        &(self::config(port, stats, &stack, "100ms") + &format!("socket = \"127.0.0.1:{api}\"\n")),
    );
    let mut old = installed.start();
    let read_log = || installed.log();
    let dsn = Installed::dsn(port);
    let idle = harness::connect_dsn(&dsn).await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    let busy = harness::connect_dsn(&dsn).await.expect("connect");
    busy.simple_query("BEGIN; SELECT 1").await.expect("begin");

    // A client connecting every 20 ms, and keepalived's probe every 100 ms, throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (dsn2, stop2) = (dsn.clone(), std::sync::Arc::clone(&stop));
    let clients = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match harness::connect_dsn(&dsn2).await {
                Ok(c) => match c.simple_query("SELECT 1").await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                },
                Err(e) => failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    });
    let stop3 = std::sync::Arc::clone(&stop);
    let probes = tokio::spawn(async move {
        let mut bad = Vec::new();
        while !stop3.load(std::sync::atomic::Ordering::Relaxed) {
            let (code, body) = http_get(stats, "/health").await;
            if code != 200 {
                bad.push(body);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bad
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The package replaces the file (a new inode), then reloads.
    installed.replace_binary(std::path::Path::new(env!("CARGO_BIN_EXE_pglb")));
    old.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !read_log().contains("upgrade: the new process serves") {
        assert!(Instant::now() < deadline, "no hand-over:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The old process: its idle session ended, the transaction finishes, then it exits.
    assert!(
        idle.simple_query("SELECT 1").await.is_err(),
        "idle session ended by the old process"
    );
    busy.simple_query("COMMIT")
        .await
        .expect("the transaction finished on the old process");
    assert!(
        old.wait_exit(Duration::from_secs(10)).is_some(),
        "old process still running:\n{}",
        read_log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = clients.await.expect("clients");
    let bad = probes.await.expect("probes");
    println!(
        "upgrade: {ok} connections served, {} failed; /health failures: {}",
        failed.len(),
        bad.len()
    );
    assert!(
        failed.is_empty(),
        "connections failed during the upgrade: {failed:?}"
    );
    assert!(bad.is_empty(), "/health failed during the upgrade: {bad:?}");
    assert!(ok > 20, "{ok}");

    // The new process serves on its own and stops cleanly.
    let text = read_log();
    let new_pid = harness::successor_pid(&text).expect("the new pid in the log");
    assert!(
        text.contains("listening socket taken over from the previous process"),
        "{text}"
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo 'show backend' | timeout 5 socat stdio TCP:127.0.0.1:{api}"
        ))
        .output()
        .expect("socat");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "# name\npostgres\n\n",
        "the runtime API answers after the upgrade"
    );
    let c = harness::connect_dsn(&dsn)
        .await
        .expect("the new process serves");
    c.simple_query("SELECT 1").await.expect("query");
    drop(c);
    assert!(harness::stop_pid(new_pid), "new process did not stop");
}

/// The runtime API's Unix socket survives an upgrade (SIGUSR2): the successor serves the
/// same socket file, which the old process leaves in place.
#[test]
fn sigusr2_hands_the_unix_runtime_socket_to_the_new_process() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let config = dir.path().join("pglb.toml");
    let text = self::config(port, stats, &stack, "100ms")
        + &format!("socket = \"{}\"\n", socket.display());
    std::fs::write(&config, text).expect("config");
    let log = dir.path().join("pglb.log");
    let mut old = std::process::Command::new(env!("CARGO_BIN_EXE_pglb"))
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start pglb");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !read_log().contains(needle) {
            assert!(Instant::now() < deadline, "{needle}:\n{}", read_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("listening listen=postgres");
    let show = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 'show backend' | timeout 5 socat stdio UNIX-CONNECT:{}",
                socket.display()
            ))
            .output()
            .expect("socat");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(show(), "# name\npostgres\n\n");
    // The pglb this test started.
    let _ = kill(Pid::from_raw(old.id() as i32), Signal::SIGUSR2);
    wait_for("upgrade: the new process serves");
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(old.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "old process still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        socket.exists(),
        "the old process left the successor's socket file"
    );
    assert_eq!(
        show(),
        "# name\npostgres\n\n",
        "the new process answers on it"
    );
    let pid = harness::successor_pid(&read_log()).expect("new pid");
    assert!(harness::stop_pid(pid), "new process did not stop");
}

/// An upgrade that cannot happen is abandoned and the running process goes on serving,
/// whatever the new binary does wrong: it refuses the configuration, it exits before
/// serving, or it never says it serves (abandoned after 15 s, and killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_running_process_serving() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let good = self::config(port, stats, &stack, "100ms");
    let installed = Installed::new(&good);
    let config = &installed.config;
    let pglb = installed.start();
    let read_log = || installed.log();
    let failures = || {
        read_log()
            .matches("upgrade failed, this process goes on serving")
            .count()
    };
    let upgrade = |why: &str, limit: Duration| {
        let before = failures();
        pglb.signal(Signal::SIGUSR2);
        let deadline = Instant::now() + limit;
        while failures() == before {
            assert!(
                Instant::now() < deadline,
                "{why}: not abandoned:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = read_log();
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("upgrade failed"))
            .unwrap_or("");
        assert!(line.contains(why), "{line}");
    };
    let dsn = Installed::dsn(port);
    let serves = || async {
        let c = harness::connect_dsn(&dsn)
            .await
            .expect("the old process serves");
        c.simple_query("SELECT 1").await.expect("query");
    };
    let held = harness::connect_dsn(&dsn).await.expect("connect");

    // 1. The configuration on disk no longer passes (the new binary's --check says why).
    std::fs::write(
        config,
        good.replace("[global]", "[global]\nno_such_key = 1"),
    )
    .expect("bad");
    upgrade(
        "the new binary refuses the configuration",
        Duration::from_secs(10),
    );
    assert!(read_log().contains("no_such_key"), "{}", read_log());
    std::fs::write(config, &good).expect("config");
    serves().await;

    // 2. and 3. A new "binary" that passes --check, then exits, or then never serves.
    let script = |body: &str| {
        let check = "for a; do [ \"$a\" = --check ] && exit 0; done";
        installed.replace_with_script(&format!("{check}\n{body}"));
    };
    script("exit 3");
    upgrade(
        "the new process exited before serving",
        Duration::from_secs(10),
    );
    serves().await;
    script(&format!(
        "echo $$ > {}/hung.pid\nexec sleep 60",
        installed.dir.path().display()
    ));
    let t0 = Instant::now();
    upgrade(
        "the new process did not serve within 15s",
        Duration::from_secs(25),
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(14),
        "{:?}",
        t0.elapsed()
    );
    let hung: i32 = std::fs::read_to_string(installed.dir.path().join("hung.pid"))
        .expect("the hung successor's pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        kill(Pid::from_raw(hung), None).is_err(),
        "the hung successor was killed"
    );
    serves().await;

    // Throughout, the session held on the old process was never touched, and /health
    // stayed up.
    held.simple_query("SELECT 1")
        .await
        .expect("the held session");
    assert_eq!(http_get(stats, "/health").await.0, 200);
    drop(pglb);
}

/// Ctrl-C in a terminal (SIGINT) stops pglb as SIGTERM does: exit 0, sessions told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_like_sigterm() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let mut pglb = Pglb::start(&config(port, stats, &stack, "100ms"), port);
    let (idle, conn) = pglb.connect_watched().await.expect("connect");
    idle.simple_query("SELECT 1").await.expect("query");
    pglb.proc.signal(Signal::SIGINT);
    let (code, message) = harness::fatal_at_end(conn).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("57P01", "pglb is shutting down; reconnect to continue")
    );
    let status = pglb.proc.wait_exit(Duration::from_secs(8));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        pglb.log()
    );
    assert!(pglb.log().contains("SIGINT received"), "{}", pglb.log());
}

/// A stop signal wins over an upgrade in progress: with the new binary's `--check` hung,
/// SIGTERM still stops pglb at once, and the hung check is killed, not left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_upgrade_check_stops_at_once() {
    let stack = Stack::start(1);
    let (port, stats) = (free_port(), free_port());
    let installed = Installed::new(&self::config(port, stats, &stack, "100ms"));
    let mut pglb = installed.start();
    let read_log = || installed.log();
    // The "new binary": its --check never finishes.
    let pid_file = installed.dir.path().join("check.pid");
    installed.replace_with_script(&format!("echo $$ > {}\nexec sleep 60", pid_file.display()));
    pglb.signal(Signal::SIGUSR2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the check never ran:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let check: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    let t0 = Instant::now();
    pglb.signal(Signal::SIGTERM);
    let status = pglb.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        read_log()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
    // Gone, or a zombie waiting for its new parent to reap it: not sleeping on.
    let stat = std::fs::read_to_string(format!("/proc/{check}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z")),
        "the hung check was not killed: {stat}"
    );
}
