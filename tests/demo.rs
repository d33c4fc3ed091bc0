//! The demo a newcomer runs first (`bash deploy/demo.sh`), run as they would: its
//! dashboard shows three green PgBouncers, and its printed keys kill, restart and drain
//! one, which the CSV and the printed alerts show.

mod harness;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{free_port, http_get};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The demo's process group, interrupted (as Ctrl-C would) if the test fails.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // The process group this test started (the demo leads it).
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut String,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if ok(&line) {
                    return line;
                }
            }
            Err(_) => panic!("the demo never printed {what}:\n{seen}"),
        }
    }
}

async fn wait_status(stats: u16, server: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = harness::csv_field(stats, server, "status").await;
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{server} stayed {s:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The demo, running as a newcomer starts it, in a process group of its own.
struct Started {
    demo: Demo,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    port: u16,
    stats: u16,
}

fn start_demo() -> Started {
    // The demo is an example of this crate: build it as deploy/demo.sh does (dev profile
    // here; the script builds release).
    let built = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--locked", "--example", "demo"])
        .status()
        .expect("cargo build --example demo");
    assert!(built.success());
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/examples/demo");
    let (port, stats) = (free_port(), free_port());
    use std::os::unix::process::CommandExt;
    let child = Command::new(example)
        .arg(env!("CARGO_BIN_EXE_pglb"))
        .env("PGLB_DEMO_PORT", port.to_string())
        .env("PGLB_DEMO_STATS_PORT", stats.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("start the demo");
    let mut demo = Demo(child);
    let stdout = demo.0.stdout.take().expect("stdout");
    let stdin = demo.0.stdin.take().expect("stdin");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Started {
        demo,
        stdin,
        lines,
        port,
        stats,
    }
}

/// The demo has exited, pglb's port is closed, and nothing of its process group (pglb,
/// the PgBouncers, PostgreSQL) is left.
fn assert_all_gone(demo: &mut Demo, port: u16, seen: &str) {
    let group = Pid::from_raw(demo.0.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(20);
    while matches!(demo.0.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "the demo did not stop:\n{seen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "pglb stopped"
    );
    while killpg(group, None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "processes of the demo are left:\n{}",
            group_members(group)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The demo's dashboard listens and shows its three PgBouncers UP.
async fn wait_serving(stats: u16) {
    harness::wait_listening(
        std::net::SocketAddr::from(([127, 0, 0, 1], stats)),
        "the demo's dashboard",
        Duration::from_secs(10),
    );
    for s in ["pgb1", "pgb2", "pgb3"] {
        wait_status(stats, s, "UP").await;
    }
}

/// Ctrl-C in the demo's terminal (SIGINT to its whole process group) stops pglb, the
/// PgBouncers and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_demo_and_everything_it_started() {
    // (Its stdin stays open: at end of input the demo quits as on `q`.)
    let Started {
        mut demo,
        stdin: _stdin,
        lines,
        port,
        stats,
    } = start_demo();
    let mut seen = String::new();
    wait_line(&lines, &mut seen, "the keys", |l| {
        l.starts_with("keys (then Enter):")
    });
    wait_serving(stats).await;
    let group = Pid::from_raw(demo.0.id() as i32);
    killpg(group, Signal::SIGINT).expect("Ctrl-C");
    assert_all_gone(&mut demo, port, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_the_dashboard_and_reacts_to_its_keys() {
    let Started {
        mut demo,
        mut stdin,
        lines: rx,
        port,
        stats,
    } = start_demo();
    let mut seen = String::new();
    let dashboard = wait_line(&rx, &mut seen, "the dashboard URL", |l| {
        l.starts_with("dashboard:")
    });
    assert!(
        dashboard.contains(&format!("http://127.0.0.1:{stats}/stats")),
        "{dashboard}"
    );
    assert!(
        dashboard.contains("admin: admin / "),
        "credentials printed: {dashboard}"
    );
    for line in ["connect:", "bench:", "keys (then Enter):"] {
        wait_line(&rx, &mut seen, line, |l| l.starts_with(line));
    }

    // Three green PgBouncers on the dashboard (query checks pass every 2 s).
    wait_serving(stats).await;
    let (_, page) = http_get(stats, "/stats").await;
    assert_eq!(
        page.matches("<tr class=\"up\"").count(),
        3,
        "three green rows"
    );

    // The printed keys: kill pgb2 (DOWN, and an alert printed), start it, drain pgb1.
    writeln!(stdin, "k2").expect("key");
    let killed = Instant::now();
    wait_status(stats, "pgb2", "DOWN").await;
    // Query checks every 2 s, fall 3 (faster once one failed): "about 6 s".
    let down = killed.elapsed();
    assert!(down < Duration::from_secs(9), "pgb2 DOWN after {down:?}");
    wait_line(&rx, &mut seen, "an alert for pgb2", |l| {
        l.starts_with("ALERT") && l.contains("server 'pgb2'") && l.contains("DOWN")
    });
    writeln!(stdin, "s2").expect("key");
    wait_status(stats, "pgb2", "UP").await;
    writeln!(stdin, "d1").expect("key");
    wait_status(stats, "pgb1", "DRAIN").await;
    wait_line(&rx, &mut seen, "an alert for the drain", |l| {
        l.starts_with("ALERT") && l.contains("server 'pgb1'") && l.contains("DRAIN")
    });

    writeln!(stdin, "r1").expect("key");
    wait_status(stats, "pgb1", "UP").await;

    // `q` stops everything it started: pglb, the PgBouncers and PostgreSQL all ran in the
    // demo's process group, and none of them is left.
    writeln!(stdin, "q").expect("key");
    assert_all_gone(&mut demo, port, &seen);
}

/// The processes of process group `group`, with their command lines (for the failure).
fn group_members(group: Pid) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp …: the fields after the command's closing paren.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        if rest.split_whitespace().nth(2) == Some(&group.to_string()) {
            let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            out.push_str(&format!(
                "{:?}: {}\n",
                entry.file_name(),
                cmd.replace('\0', " ")
            ));
        }
    }
    out
}
