//! HAProxy's runtime API on pglb's stats socket, driven by the tools operators use with
//! HAProxy: socat scripts and hatop (in a terminal, through tmux).

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Pglb, Stack, free_port, http_get};

const CHECK: &str = "[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nrise = 1\nfall = 2\n";

/// `echo "$line" | socat stdio UNIX-CONNECT:$socket`, as scripts do.
fn socat(socket: &Path, line: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s\\n' \"$1\" | timeout 10 socat stdio UNIX-CONNECT:{}",
            socket.display()
        ))
        .arg("sh")
        .arg(line)
        .output()
        .expect("socat");
    assert!(out.status.success(), "socat {line:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Lb {
    pglb: Pglb,
    stats: u16,
    socket: std::path::PathBuf,
    state_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(stack: &Stack) -> Lb {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let state_file = dir.path().join("state.toml");
    let (port, stats) = (free_port(), free_port());
    let config = format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\nsocket = \"{}\"\nstate_file = \"{}\"\n",
        Pglb::config(port, CHECK, &stack.servers_toml()),
        socket.display(),
        state_file.display()
    );
    let pglb = Pglb::start(&config, port);
    pglb.wait_log(&["is UP"], stack.bouncers.len(), Duration::from_secs(5));
    Lb {
        pglb,
        stats,
        socket,
        state_file,
        _dir: dir,
    }
}

/// The columns of `row` (pxname,svname) that do not move by themselves.
fn stable(csv: &str, row: &str) -> Vec<String> {
    let header: Vec<&str> = csv
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let line = csv
        .lines()
        .find(|l| l.starts_with(row))
        .unwrap_or_else(|| panic!("no row {row} in {csv}"));
    let keep = [
        "pxname",
        "svname",
        "status",
        "weight",
        "act",
        "bck",
        "iid",
        "sid",
        "type",
        "addr",
        "slim",
        "stot",
        "scur",
        "check_status",
        "algo",
        "mode",
    ];
    header
        .iter()
        .zip(line.split(','))
        .filter(|(h, _)| keep.contains(h))
        .map(|(h, v)| format!("{h}={v}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socat_scripts_drive_the_socket_like_haproxys() {
    let stack = Stack::start(2);
    let mut lb = start(&stack);
    let sock = lb.socket.as_path();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "access is the socket file's mode");

    let info = socat(sock, "show info");
    assert!(
        info.contains("Name: pglb\n") && info.contains(&format!("Pid: {}\n", lb.pglb.proc.pid())),
        "{info}"
    );
    assert!(info.ends_with("\n\n"), "an answer ends with an empty line");

    // The socket's CSV and the HTTP CSV agree.
    let (_, http_csv) = http_get(lb.stats, "/stats;csv").await;
    let sock_csv = socat(sock, "show stat");
    for row in [
        "postgres,FRONTEND",
        "postgres,pgb1",
        "postgres,pgb2",
        "postgres,BACKEND",
    ] {
        assert_eq!(stable(&sock_csv, row), stable(&http_csv, row), "{row}");
    }
    let servers_only = socat(sock, "show stat -1 4 -1");
    assert_eq!(
        servers_only
            .lines()
            .filter(|l| l.starts_with("postgres,"))
            .count(),
        2
    );
    assert!(!servers_only.contains("FRONTEND"));
    let typed = socat(sock, "show stat typed");
    assert!(typed.contains("S.1.1.17.status.1:SGP:str:UP\n"), "{typed}");
    assert!(
        typed.contains("F.1.0.0.pxname.1:KNS:str:postgres\n"),
        "{typed}"
    );

    // Actions, HAProxy's wording, and the same state file as the dashboard's.
    assert_eq!(socat(sock, "set server postgres/pgb1 state drain"), "\n");
    let csv = socat(sock, "show stat -1 4 -1");
    assert!(
        csv.contains("postgres,pgb1,")
            && stable(&csv, "postgres,pgb1").contains(&"status=DRAIN".to_owned()),
        "{csv}"
    );
    let saved = std::fs::read_to_string(&lb.state_file).expect("state file written");
    assert!(saved.contains("admin = \"drain\""), "{saved}");
    assert_eq!(
        socat(sock, "get weight postgres/pgb2"),
        "100 (initial 100)\n\n"
    );
    assert_eq!(socat(sock, "set server postgres/pgb2 weight 50%"), "\n");
    assert_eq!(
        socat(
            sock,
            "set weight postgres/pgb2 40; get weight postgres/pgb2"
        ),
        "\n40 (initial 100)\n\n"
    );
    assert_eq!(
        socat(sock, "get weight postgres/nope"),
        "No such server.\n\n"
    );
    assert_eq!(socat(sock, "get weight nope/pgb1"), "No such backend.\n\n");
    assert_eq!(
        socat(sock, "get weight postgres"),
        "Require 'backend/server'.\n\n"
    );
    assert_eq!(
        socat(sock, "set server postgres/pgb1 state bogus"),
        "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n"
    );
    assert!(socat(sock, "frobnicate").starts_with("Unknown command"));
    let state = socat(sock, "show servers state postgres");
    let mut lines = state.lines();
    assert_eq!(lines.next(), Some("1"), "format version 1");
    assert!(
        lines
            .next()
            .unwrap_or("")
            .starts_with("# be_id be_name srv_id srv_name")
    );
    let pgb1: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    assert_eq!(pgb1.len(), 25, "{state}");
    assert_eq!(
        &pgb1[..8],
        ["1", "postgres", "1", "pgb1", "127.0.0.1", "2", "8", "100"],
        "drained: admin state 0x08"
    );
    assert_eq!(
        socat(sock, "show servers state nope"),
        "Can't find backend.\n\n"
    );
    assert_eq!(socat(sock, "show backend"), "# name\npostgres\n\n");

    // HAProxy's older pair of words for maintenance.
    assert_eq!(socat(sock, "disable server postgres/pgb2"), "\n");
    assert!(
        stable(&socat(sock, "show stat"), "postgres,pgb2").contains(&"status=MAINT".to_owned())
    );
    assert_eq!(socat(sock, "enable server postgres/pgb2"), "\n");
    assert!(stable(&socat(sock, "show stat"), "postgres,pgb2").contains(&"status=UP".to_owned()));
    let help = socat(sock, "help");
    assert!(
        help.starts_with("The following commands are valid at this level:\n")
            && help.contains("enable server <bk>/<srv>")
            && help.contains("clear counters [all]"),
        "{help}"
    );

    // Health checks off and on; a runtime maxconn.
    assert_eq!(socat(sock, "disable health postgres/pgb2"), "\n");
    assert!(
        stable(&socat(sock, "show stat"), "postgres,pgb2").contains(&"status=no check".to_owned())
    );
    assert_eq!(
        socat(
            sock,
            "enable health postgres/pgb2; set maxconn server postgres/pgb2 7"
        ),
        "\n\n"
    );
    assert!(stable(&socat(sock, "show stat"), "postgres,pgb2").contains(&"slim=7".to_owned()));

    // Sessions: listed, then ended at a transaction boundary by `shutdown sessions`.
    assert_eq!(socat(sock, "set server postgres/pgb1 state ready"), "\n");
    let c = lb.pglb.connect().await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");
    let sess = socat(sock, "show sess");
    assert!(
        sess.contains("proto=tcpv4 src=127.0.0.1:")
            && sess.contains("fe=postgres be=postgres srv=pgb"),
        "{sess}"
    );
    let srv = sess
        .split("srv=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        socat(sock, &format!("shutdown sessions server postgres/{srv}")),
        "\n"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
        assert!(Instant::now() < deadline, "the idle session was not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... while the server still takes new clients.
    let d = lb
        .pglb
        .connect()
        .await
        .expect("connect after shutdown sessions");
    d.simple_query("SELECT 1").await.expect("query");
    drop(d);

    // `clear counters`: the maxima only; `all`: every counter.
    assert_ne!(harness::csv_field(lb.stats, &srv, "smax").await, "0");
    assert_eq!(socat(sock, "clear counters"), "\n");
    assert_eq!(harness::csv_field(lb.stats, &srv, "smax").await, "0");
    assert_ne!(harness::csv_field(lb.stats, &srv, "stot").await, "0");
    assert_eq!(socat(sock, "clear counters all"), "\n");
    assert!(stable(&socat(sock, "show stat"), "postgres,pgb1").contains(&"stot=0".to_owned()));

    // Interactive mode, as hatop and other long-lived clients use it.
    let out = socat(sock, "prompt");
    assert_eq!(out, "\n> ");
    let script = "printf 'prompt\\nshow backend\\nset timeout cli 5\\nquit\\n'";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{script} | timeout 10 socat stdio UNIX-CONNECT:{}",
            sock.display()
        ))
        .output()
        .expect("socat");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\n> # name\npostgres\n\n> \n> "
    );

    // Past its 64 connections the socket says so, instead of closing without a word.
    let held: Vec<_> = (0..64)
        .map(|_| std::os::unix::net::UnixStream::connect(sock).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut said = String::new();
    use std::io::Read as _;
    let _ = extra.read_to_string(&mut said);
    assert_eq!(said, "Too many connections (64); try again.\n\n");
    drop(held);

    // A line past the limit is answered, not just dropped.
    use std::io::Write as _;
    let mut long = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    long.write_all(&[b'x'; 70_000]).expect("write");
    long.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut said = String::new();
    let _ = long.read_to_string(&mut said);
    assert_eq!(said, "Command line too long (64 KiB at most).\n\n");

    // A client that asks for many answers and does not read them is closed once a
    // write has waited its CLI timeout (1 s here), instead of holding its place.
    let mut greedy = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    let line = format!("set timeout cli 1;{}\n", "show stat typed;".repeat(3500));
    greedy.write_all(line.as_bytes()).expect("request");
    std::thread::sleep(Duration::from_secs(4));
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let (mut total, mut chunk) = (0usize, vec![0u8; 1 << 16]);
    loop {
        match greedy.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("still open after {total} bytes: {e}"),
        }
    }
    let one = socat(sock, "show stat typed").len();
    assert!(
        total < one * 3500 / 2,
        "closed early: {total} of {} bytes",
        one * 3500
    );

    // The socket file goes with the process.
    lb.pglb.proc.stop();
    assert!(!sock.exists(), "the socket is removed when pglb stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_form_answers_tools_that_use_host_and_port() {
    let stack = Stack::start(1);
    let (port, stats, api) = (free_port(), free_port(), free_port());
    let config = format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\nsocket = \"127.0.0.1:{api}\"\n",
        Pglb::config(port, "", &stack.servers_toml())
    );
    let _pglb = Pglb::start(&config, port);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo 'show backend' | timeout 5 socat stdio TCP:127.0.0.1:{api}"
        ))
        .output()
        .expect("socat");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "# name\npostgres\n\n");
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the tmux session even when the test fails.
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn wait_screen(session: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let screen = tmux(&["capture-pane", "-t", session, "-p"]);
        if ok(&screen) {
            return screen;
        }
        assert!(Instant::now() < deadline, "{what}; screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hatop_shows_the_servers_and_puts_one_in_maintenance() {
    let stack = Stack::start(2);
    let lb = start(&stack);
    let session = format!("pglb-hatop-{}", lb.stats);
    let _guard = Tmux(session.clone());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "40",
        &format!("hatop -s {}", lb.socket.display()),
    ]);
    let screen = wait_screen(&session, "hatop shows both servers UP", |s| {
        s.contains("pglb Version")
            && s.lines()
                .filter(|l| l.starts_with("pgb") && l.contains(" UP "))
                .count()
                == 2
    });
    assert!(screen.contains(">>> postgres"), "{screen}");
    // hatop's embedded CLI (mode 5), then back to the status screen (mode 1).
    tmux(&["send-keys", "-t", &session, "Escape", "5"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "disable server postgres/pgb1",
        "Enter",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", &session, "Escape", "1"]);
    wait_screen(&session, "hatop shows pgb1 in MAINT", |s| {
        s.lines()
            .any(|l| l.starts_with("pgb1") && l.contains("MAINT"))
    });
    let (_, csv) = http_get(lb.stats, "/stats;csv").await;
    assert!(
        stable(&csv, "postgres,pgb1").contains(&"status=MAINT".to_owned()),
        "{csv}"
    );
    tmux(&["send-keys", "-t", &session, "q"]);
}
