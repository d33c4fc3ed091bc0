//! `bash deploy/demo.sh`: the production shape on loopback (PostgreSQL, three
//! PgBouncers, pglb with query checks, the stats dashboard with admin credentials, the
//! runtime API socket, alerts to a local receiver whose messages are printed), with keys
//! to kill, restart, drain and ready a PgBouncer, until `q` or Ctrl-C. Uses the same
//! harness as the tests.

#[path = "mod.rs"]
mod harness;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// Set once `q` started the stop: the watcher then leaves the cleanup to `stop`.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

/// A password for this run only.
fn password() -> String {
    let mut bytes = [0u8; 9];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints every alert posted to 127.0.0.1:`port` (a Slack-style webhook).
fn alert_receiver() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the alert receiver");
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            // One small request per connection: read until the JSON body has arrived.
            while let Ok(n) = s.read(&mut buf[got..]) {
                got += n;
                let text = String::from_utf8_lossy(&buf[..got]);
                if n == 0 || text.contains("\r\n\r\n{") && text.trim_end().ends_with('}') {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&buf[..got]).into_owned();
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            let alert = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["text"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.to_owned());
            println!("ALERT  {alert}");
        }
    });
    port
}

fn config(port: u16, stats: u16, hook: u16, password: &str, dir: &Path, servers: &str) -> String {
    let check = format!(
        "[listen.check]\ntype = \"query\"\nuser = \"{u}\"\npassword = \"{p}\"\ndatabase = \"{d}\"\n\
         interval = \"2s\"\ntimeout = \"1s\"\nrise = 2\nfall = 3\n",
        u = harness::APP_USER,
        p = harness::APP_PASSWORD,
        d = harness::APP_DB
    );
    format!(
        "[global]\nmaxconn = 1000\ngrace = \"5s\"\n\n\
         [[listen]]\nname = \"postgres\"\nbind = \"127.0.0.1:{port}\"\nbalance = \"leastconn\"\n\
         {check}\n{servers}\n\
         [stats]\nbind = \"127.0.0.1:{stats}\"\nrefresh = \"2s\"\nstate_file = \"{state}\"\nsocket = \"{sock}\"\n\
         [stats.auth]\nuser = \"admin\"\npassword = \"{password}\"\n\n\
         [alerts]\nwebhook_url = \"http://127.0.0.1:{hook}/demo\"\ncoalesce = \"2s\"\n",
        state = dir.join("state.toml").display(),
        sock = dir.join("admin.sock").display(),
    )
}

/// One line to the runtime API socket; returns its answer.
fn socket_command(socket: &Path, line: &str) -> String {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return "runtime API socket not reachable".into();
    };
    let _ = s.write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.trim().to_owned()
}

fn main() {
    let Some(binary) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: demo PATH_TO_PGLB (run it through deploy/demo.sh)");
        std::process::exit(2);
    };
    let port = env_port("PGLB_DEMO_PORT", 15432);
    let stats = env_port("PGLB_DEMO_STATS_PORT", 8404);
    println!("starting PostgreSQL 15 and three PgBouncers on loopback…");
    let stack = harness::Stack::start(3);
    stack.pg.pgbench_init();
    let dir = tempfile::Builder::new()
        .prefix("pglb-demo-")
        .tempdir()
        .expect("tempdir");
    let password = password();
    let hook = alert_receiver();
    let path = dir.path().join("pglb.toml");
    let text = config(
        port,
        stats,
        hook,
        &password,
        dir.path(),
        &stack.servers_toml(),
    );
    std::fs::write(&path, &text).expect("write config");
    let child = Command::new(&binary)
        .arg("--config")
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pglb");
    print_help(
        port,
        stats,
        &password,
        &path,
        &dir.path().join("admin.sock"),
    );

    outlive_ctrl_c();
    let stack = Arc::new(Mutex::new(Some(stack)));
    let child = Arc::new(Mutex::new(child));
    watch_pglb(Arc::clone(&child), Arc::clone(&stack));
    let socket = dir.path().join("admin.sock");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if !act(line.trim(), &stack, &socket) {
            break;
        }
    }
    stop(&child, &stack);
}

/// Lets this process outlive the terminal's Ctrl-C, which reaches the whole process group,
/// long enough to clean up (pglb stops on it; the watcher then stops the rest). SIGINT goes
/// to a handler that does nothing, installed for the rest of the process (tokio's signal
/// handling; children start with the default action again).
fn outlive_ctrl_c() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime for the SIGINT handler");
    let mut sigint = {
        let _rt = rt.enter();
        signal(SignalKind::interrupt()).expect("handle SIGINT")
    };
    std::thread::spawn(move || rt.block_on(async move { while sigint.recv().await.is_some() {} }));
}

fn print_help(port: u16, stats: u16, password: &str, config: &Path, socket: &Path) {
    let (u, p, d) = (harness::APP_USER, harness::APP_PASSWORD, harness::APP_DB);
    println!("\npglb config: {}", config.display());
    println!("dashboard:  http://127.0.0.1:{stats}/stats   (admin: admin / {password})");
    println!("csv:        curl -s 'http://127.0.0.1:{stats}/stats;csv' | cut -d, -f1,2,18,37");
    println!("connect:    psql \"host=127.0.0.1 port={port} user={u} password={p} dbname={d}\"");
    println!(
        "bench:      PGPASSWORD={p} pgbench -n -S -c 8 -T 10 -h 127.0.0.1 -p {port} -U {u} {d}"
    );
    println!(
        "runtime:    echo 'show stat' | socat stdio {}",
        socket.display()
    );
    println!("\nkeys (then Enter):  k1..k3 kill a PgBouncer   s1..s3 start it again");
    println!(
        "                    d1..d3 drain one          r1..r3 ready again     q quit (or Ctrl-C)"
    );
    println!("alerts posted to the local receiver are printed here as ALERT lines.\n");
}

/// Performs one key; false to quit.
fn act(key: &str, stack: &Mutex<Option<harness::Stack>>, socket: &Path) -> bool {
    let mut chars = key.chars();
    let (Some(what), n) = (chars.next(), chars.as_str().parse::<usize>().ok()) else {
        return true;
    };
    if what == 'q' {
        return false;
    }
    let Some(n) = n.filter(|n| (1..=3).contains(n)) else {
        println!("?  k1..k3, s1..s3, d1..d3, r1..r3 or q");
        return true;
    };
    let server = format!("postgres/pgb{n}");
    match what {
        'k' | 's' => {
            let mut guard = stack.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(stack) = guard.as_mut() {
                if what == 'k' {
                    stack.bouncers[n - 1].kill();
                    println!("pgb{n} killed: watch it turn DOWN on the dashboard");
                } else {
                    stack.bouncers[n - 1].restart();
                    println!("pgb{n} started: it comes back UP after two passing checks");
                }
            }
        }
        'd' => {
            let said = socket_command(socket, &format!("set server {server} state drain"));
            println!("set server {server} state drain {said}");
        }
        'r' => {
            let said = socket_command(socket, &format!("set server {server} state ready"));
            println!("set server {server} state ready {said}");
        }
        _ => println!("?  k1..k3, s1..s3, d1..d3, r1..r3 or q"),
    }
    true
}

/// When pglb exits (Ctrl-C reaches it too), stop everything and leave.
fn watch_pglb(child: Arc<Mutex<Child>>, stack: Arc<Mutex<Option<harness::Stack>>>) {
    std::thread::spawn(move || {
        loop {
            let exited = child
                .lock()
                .map(|mut c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited && !STOPPING.load(Ordering::SeqCst) {
                println!("pglb exited; stopping PgBouncers and PostgreSQL");
                drop(stack.lock().unwrap_or_else(|p| p.into_inner()).take());
                std::process::exit(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
}

fn stop(child: &Mutex<Child>, stack: &Mutex<Option<harness::Stack>>) {
    STOPPING.store(true, Ordering::SeqCst);
    if let Ok(mut c) = child.lock() {
        // The pglb this demo started.
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let _ = c.wait();
    }
    println!("pglb stopped; stopping PgBouncers and PostgreSQL");
    drop(stack.lock().unwrap_or_else(|p| p.into_inner()).take());
}
