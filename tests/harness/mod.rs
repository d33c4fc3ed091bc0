//! The one test harness: real PostgreSQL, real PgBouncers and the real pglb binary on
//! loopback, each in a temporary directory, each stopped by pid when dropped (also when a
//! test panics). PostgreSQL refuses to run as root, so as root the servers run as the
//! `postgres` user.
#![allow(dead_code)] // each test file uses a different part

pub mod config_text;
pub mod deploy;
pub mod pair;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[allow(unused_imports)] // each test file uses a different part
pub use config_text::{ConfigText, edit};

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
pub const APP_DB: &str = "app";
pub const ADMIN_USER: &str = "pgb_admin";
pub const ADMIN_PASSWORD: &str = "admin-secret";

/// A loopback port nobody listens on right now. Chosen at random in 10000–29999, outside
/// Linux's ephemeral range, and never twice in one test process: a port freed by a killed
/// PgBouncer is then unlikely to be taken over by a parallel test's server.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 10_000 + (h.finish() % 20_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The pglb binary under test.
pub fn pglb_bin() -> &'static str {
    let Some(binary) = option_env!("CARGO_BIN_EXE_pglb") else {
        panic!("the pglb binary is known to integration tests only, where cargo names it");
    };
    binary
}

/// Runs `cmd` to its end and returns what it did; fails the test when it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (deploy/apt-deps.sh installs it)"))
}

/// A finished command's stdout and stderr, in that order.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, insists on success and returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes `path` the `postgres` user's when we are root (the servers run as that user).
pub fn give_to_service_user(path: &Path) {
    if is_root() {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown of {} to postgres failed", path.display());
    }
}

/// A command run as the `postgres` user when we are root.
pub fn as_service_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A temporary directory the service user can write to.
pub fn service_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    give_to_service_user(dir.path());
    dir
}

/// Finds a PostgreSQL server binary: PATH first, then Debian's versioned directory.
pub fn pg_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return p;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install postgresql (see README)"))
}

/// A child process stopped by pid on drop: `signal` first, SIGKILL if it lingers. The
/// tests' one process guard (pglb, the servers, keepalived, HAProxy, Chromium, ...).
pub struct Proc {
    pub child: Child,
    pub name: String,
    stop_signal: Signal,
}

impl Proc {
    /// Holds `child`, which `stop` (and drop) end with `stop_signal`.
    pub fn new(child: Child, name: &str, stop_signal: Signal) -> Proc {
        Proc {
            child,
            name: name.to_owned(),
            stop_signal,
        }
    }

    /// Starts `cmd` as `name`; fails the test when it cannot start.
    pub fn spawn(cmd: &mut Command, name: &str, stop_signal: Signal) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Proc::new(child, name, stop_signal)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process (spawned here and not reaped yet).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process and waits for it; returns its exit status if it exited in time.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Waits for the process to exit on its own within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr} within {limit:?}");
}

/// A throwaway PostgreSQL 15 cluster on 127.0.0.1.
pub struct Postgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = service_dir("pglb-pg-");
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "postgres-secret\n").expect("pwfile");
        if is_root() {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&pwfile)
                .status();
        }
        run_ok(
            as_service_user(&pg_bin("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .stdout(Stdio::null()),
        );
        let port = free_port();
        let mut conf = String::new();
        let _ = writeln!(conf, "port = {port}");
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(conf, "unix_socket_directories = '{}'", dir.path().display());
        conf.push_str(
            "max_connections = 300\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nwal_level = replica\nmax_wal_senders = 5\nlog_min_messages = warning\n",
        );
        let conf_path = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("postgresql.auto.conf");
        let mut hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap_or_default();
        hba.push_str("host replication all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");

        let mut pg = Postgres {
            port,
            dir,
            proc: None,
        };
        pg.launch();
        pg.psql(&format!(
            "CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"
        ));
        pg.psql(&format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"));
        pg
    }

    /// A streaming replica of `primary` (pg_basebackup -R), on its own port.
    pub fn start_replica(primary: &Postgres) -> Postgres {
        let dir = service_dir("pglb-pgr-");
        let data = dir.path().join("data");
        run_ok(
            as_service_user(&pg_bin("pg_basebackup"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-D",
                ])
                .arg(&data)
                .env("PGPASSWORD", "postgres-secret"),
        );
        let port = free_port();
        let conf_path = data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap_or_default();
        let _ = writeln!(conf, "port = {port}");
        let _ = writeln!(conf, "unix_socket_directories = '{}'", dir.path().display());
        std::fs::write(&conf_path, conf).expect("replica conf");
        let mut pg = Postgres {
            port,
            dir,
            proc: None,
        };
        pg.launch();
        pg
    }

    /// Starts the server process on the existing data directory and waits for it.
    pub fn launch(&mut self) {
        let log_path = self.dir.path().join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log");
        if is_root() {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&log_path)
                .status();
        }
        let child = as_service_user(&pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        // SIGINT is PostgreSQL's fast shutdown.
        self.proc = Some(Proc::new(child, "postgres", Signal::SIGINT));
        self.wait_ready();
    }

    /// Promotes a replica to primary.
    pub fn promote(&self) {
        self.psql("SELECT pg_promote(true, 30)");
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new(pg_bin("pg_isready"))
                .args(["-q", "-h"])
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres did not start: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the unix socket.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        run_ok(
            Command::new("psql")
                .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(self.dir.path())
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    db,
                    "-c",
                    sql,
                ]),
        )
    }

    /// Creates pgbench tables in the app database (scale 1), owned by the app user.
    pub fn pgbench_init(&self) {
        run_ok(
            Command::new("pgbench")
                .args(["-i", "-q", "-s", "1", "-h"])
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", APP_USER, APP_DB])
                .env("PGPASSWORD", APP_PASSWORD),
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

/// Options for a PgBouncer.
#[derive(Clone)]
pub struct BouncerOpts {
    pub auth_type: &'static str,
    pub max_client_conn: u32,
    pub pool_size: u32,
    /// A directory with `server.crt`/`server.key` (see `make_ca`): PgBouncer then offers
    /// TLS to its clients (`client_tls_sslmode = allow`).
    pub tls: Option<PathBuf>,
}

impl Default for BouncerOpts {
    fn default() -> Self {
        BouncerOpts {
            auth_type: "scram-sha-256",
            max_client_conn: 2000,
            pool_size: 20,
            tls: None,
        }
    }
}

/// A PgBouncer in transaction pooling mode in front of `Postgres`.
pub struct Bouncer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
    pg_port: u16,
    opts: BouncerOpts,
}

impl Bouncer {
    pub fn start(pg: &Postgres, opts: BouncerOpts) -> Bouncer {
        let dir = service_dir("pglb-pgb-");
        let mut b = Bouncer {
            port: free_port(),
            dir,
            proc: None,
            pg_port: pg.port,
            opts,
        };
        b.write_config();
        b.restart();
        b
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let ini = format!(
            "[databases]\n\
             {APP_DB} = host=127.0.0.1 port={pg} dbname={APP_DB}\n\
             postgres = host=127.0.0.1 port={pg} dbname=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = {auth}\n\
             auth_file = {d}/userlist.txt\n\
             admin_users = {ADMIN_USER}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool}\n\
             max_client_conn = {maxc}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {d}/pgbouncer.log\n\
             server_login_retry = 1\n{tls}",
            pg = self.pg_port,
            port = self.port,
            auth = self.opts.auth_type,
            pool = self.opts.pool_size,
            maxc = self.opts.max_client_conn,
            d = d.display(),
            tls = self.tls_settings(),
        );
        std::fs::write(d.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        std::fs::write(
            d.join("userlist.txt"),
            format!("\"{APP_USER}\" \"{APP_PASSWORD}\"\n\"{ADMIN_USER}\" \"{ADMIN_PASSWORD}\"\n"),
        )
        .expect("userlist");
    }

    /// Copies the certificate into the PgBouncer's own directory (the service user must
    /// read it) and returns the settings that use it.
    fn tls_settings(&self) -> String {
        let Some(src) = &self.opts.tls else {
            return String::new();
        };
        let d = self.dir.path();
        for f in ["server.crt", "server.key"] {
            std::fs::copy(src.join(f), d.join(f)).expect("copy certificate");
            give_to_service_user(&d.join(f));
        }
        format!(
            "client_tls_sslmode = allow\nclient_tls_cert_file = {d}/server.crt\nclient_tls_key_file = {d}/server.key\n",
            d = d.display()
        )
    }

    /// (Re)starts the process on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let child = as_service_user(Path::new("/usr/sbin/pgbouncer"))
            .arg(self.dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (install the pgbouncer package)");
        self.proc = Some(Proc::new(child, "pgbouncer", Signal::SIGINT));
        wait_listening(self.addr(), "pgbouncer", Duration::from_secs(10));
    }

    /// Stops the process (the port then refuses connections).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    /// `app_clients` from a thread without a runtime.
    pub fn app_clients_blocking(&self) -> usize {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(self.app_clients())
    }

    /// Clients of the app database connected to this PgBouncer (`SHOW CLIENTS`).
    pub async fn app_clients(&self) -> usize {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={ADMIN_USER} password={ADMIN_PASSWORD} dbname=pgbouncer",
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("pgbouncer admin console");
        tokio::spawn(conn);
        let rows = client
            .simple_query("SHOW CLIENTS")
            .await
            .expect("SHOW CLIENTS");
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .filter(|r| r.get("database") == Some(APP_DB) && r.get("user") == Some(APP_USER))
            .count()
    }
}

/// PostgreSQL plus `n` PgBouncers: the production topology on loopback.
pub struct Stack {
    pub pg: Postgres,
    pub bouncers: Vec<Bouncer>,
}

impl Stack {
    pub fn start(n: usize) -> Stack {
        Stack::start_with(n, BouncerOpts::default())
    }

    pub fn start_with(n: usize, opts: BouncerOpts) -> Stack {
        let pg = Postgres::start();
        let bouncers = (0..n).map(|_| Bouncer::start(&pg, opts.clone())).collect();
        Stack { pg, bouncers }
    }

    /// `[[listen.server]]` entries pgb1..pgbN for a pglb config.
    pub fn servers_toml(&self) -> String {
        servers_toml(&self.bouncers)
    }
}

/// The pglb binary under test, with its config and stderr log in a temporary directory.
pub struct Pglb {
    pub dir: tempfile::TempDir,
    pub proc: Proc,
    pub port: u16,
}

impl Pglb {
    /// Starts pglb with `config` (which must bind `127.0.0.1:{port}`) and waits for the port.
    pub fn start(config: &str, port: u16) -> Pglb {
        Pglb::start_with_env(config, port, &[])
    }

    /// Writes a new configuration and sends SIGHUP (a reload).
    pub fn reload(&self, config: &str) {
        std::fs::write(self.dir.path().join("pglb.toml"), config).expect("write config");
        self.proc.signal(Signal::SIGHUP);
    }

    /// Like `start`, with extra environment variables for the process.
    pub fn start_with_env(config: &str, port: u16, env: &[(&str, &str)]) -> Pglb {
        let dir = tempfile::Builder::new()
            .prefix("pglb-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("pglb.toml");
        std::fs::write(&cfg, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("pglb.log")).expect("log");
        let child = Command::new(pglb_bin())
            .arg("--config")
            .arg(&cfg)
            .env(
                "RUST_LOG",
                std::env::var("PGLB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pglb");
        let p = Pglb {
            dir,
            proc: Proc::new(child, "pglb", Signal::SIGTERM),
            port,
        };
        // Ready once a listen logged that it accepts (a probe connection would count as a
        // client; "stats listening" comes earlier, before the first checks).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.log().contains("INFO pglb::daemon: listening listen=") {
            assert!(
                Instant::now() < deadline,
                "pglb did not start listening on port {port}: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// A simple config: one listen on a fresh port over `servers_toml`.
    pub fn config(port: u16, listen_extra: &str, servers_toml: &str) -> String {
        format!(
            "[global]\nmaxconn = 5000\ngrace = \"5s\"\nlinger = \"100ms\"\n\n[[listen]]\nname = \"postgres\"\nbind = \"127.0.0.1:{port}\"\n{listen_extra}\n{servers_toml}"
        )
    }

    /// `config` with `[stats]` on `stats` and no credentials: a read-only dashboard.
    #[allow(dead_code)] // not every test binary uses every helper
    pub fn config_with_open_stats(
        port: u16,
        listen_extra: &str,
        servers_toml: &str,
        stats: u16,
    ) -> String {
        format!(
            "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\n",
            Pglb::config(port, listen_extra, servers_toml)
        )
    }

    /// `config` with `[stats]` on `stats` and the tests' admin credentials.
    pub fn config_with_stats(
        port: u16,
        listen_extra: &str,
        servers_toml: &str,
        stats: u16,
    ) -> String {
        format!(
            "{}\n{}",
            Pglb::config(port, listen_extra, servers_toml),
            stats_toml(stats)
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pglb.log")).unwrap_or_default()
    }

    /// Waits until `count` log lines contain all of `needles`; returns the log. Fails the
    /// test when they do not appear within `limit`.
    pub fn wait_log(&self, needles: &[&str], count: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            let n = log
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .count();
            if n >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} log line(s) with {needles:?} within {limit:?}, saw {n}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// libpq-style connection string for the app user through pglb.
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}",
            self.port
        )
    }

    /// Connects a tokio-postgres client through pglb (connection task spawned).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_dsn(&self.dsn()).await
    }
}

/// A tokio-postgres client and its connection task, whose result says how the server
/// ended the connection (a FATAL sent outside a query arrives there, not at the client).
#[allow(dead_code)] // not every test binary uses every helper
pub type Watched = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

impl Pglb {
    /// `connect`, keeping the connection task's result.
    #[allow(dead_code)]
    pub async fn connect_watched(&self) -> Result<Watched, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls).await?;
        Ok((client, tokio::spawn(conn)))
    }
}

/// The FATAL that ended a watched connection: its SQLSTATE and message (panics when it
/// ended otherwise, or not within 5 s).
#[allow(dead_code)]
pub async fn fatal_at_end(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> (String, String) {
    match tokio::time::timeout(Duration::from_secs(5), conn).await {
        Ok(Ok(Err(e))) => db_error(&e).unwrap_or_else(|| panic!("ended without a FATAL: {e}")),
        other => panic!("the connection did not end with an error: {other:?}"),
    }
}

pub async fn connect_dsn(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `connect_dsn`, retried for up to 3 s: for a PgBouncer with a tiny `max_client_conn`,
/// whose only place may still be held for a moment by the probe that saw it listen.
pub async fn connect_dsn_patiently(
    dsn: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match connect_dsn(dsn).await {
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

/// The SQLSTATE and message of a tokio-postgres error, if the server sent one.
pub fn db_error(e: &tokio_postgres::Error) -> Option<(String, String)> {
    e.as_db_error()
        .map(|d| (d.code().code().to_owned(), d.message().to_owned()))
}

/// A minimal HTTP/1.1 client for the stats server: returns (status, headers, body).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
    content_type: &str,
) -> (u16, String, String) {
    use base64::Engine as _;
    let mut headers = Vec::new();
    if !body.is_empty() {
        headers.push(("Content-Type".to_owned(), content_type.to_owned()));
    }
    if let Some((u, p)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        headers.push(("Authorization".to_owned(), format!("Basic {token}")));
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    http_with(port, method, path, &headers, body).await
}

/// Like [`http`], with the request headers given as they are.
pub async fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to stats");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("send request");
    // Read the headers, then Content-Length bytes (some servers keep the socket open).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no complete response within 10s"),
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if method == "HEAD" || len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http(port, "GET", path, None, "", "").await;
    (status, body)
}

/// pgbench against 127.0.0.1:`port` as the app user, with `args` before the connection
/// options (e.g. `["-n", "-S", "-c", "8", "-T", "5"]`).
pub fn pgbench(port: u16, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("pgbench");
    c.args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", APP_USER, APP_DB])
        .env("PGPASSWORD", APP_PASSWORD);
    c
}

/// Open descriptors of a process (0 once it is gone).
#[allow(dead_code)] // not every test binary uses every helper
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process, KiB (0 once it is gone).
#[allow(dead_code)]
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An admin action through the JSON API (`drain`, `ready`, `maint`, ...) on a server of
/// listen `postgres`, as the tests' admin user; asserts it was accepted.
#[allow(dead_code)]
pub async fn admin_action(stats: u16, server: &str, action: &str) {
    let body = format!("{{\"action\": \"{action}\"}}");
    let path = format!("/api/servers/postgres/{server}");
    let (code, _, text) = http(
        stats,
        "POST",
        &path,
        Some(("admin", "s3cret")),
        &body,
        "application/json",
    )
    .await;
    assert_eq!(code, 200, "{action} {server}: {text}");
}

/// A CA and a server certificate for localhost / 127.0.0.1, made with openssl.
pub fn make_ca(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=pglb test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// A one-listen config terminating TLS with the certificate `make_ca` wrote in `dir`.
pub fn tls_config(port: u16, dir: &Path, servers: &str) -> String {
    let tls = format!(
        "[listen.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    Pglb::config(port, &tls, servers)
}

/// A local Slack-style webhook receiver: answers 200 and passes on each request body.
pub async fn webhook() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = receiver.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = receiver.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send(body.to_owned());
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                            break;
                        }
                    }
                }
            });
        }
    });
    (port, rx)
}

/// Raises this process's open-files soft limit to its hard limit (children inherit it).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

/// `[[listen.server]]` entries pgb1..pgbN for `bouncers`.
pub fn servers_toml(bouncers: &[Bouncer]) -> String {
    bouncers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "[[listen.server]]\nname = \"pgb{}\"\naddr = \"{}\"\n",
                i + 1,
                b.addr()
            )
        })
        .collect()
}

/// `[stats]` on `port` with the tests' admin credentials (admin / s3cret).
pub fn stats_toml(port: u16) -> String {
    format!(
        "[stats]\nbind = \"127.0.0.1:{port}\"\n[stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n"
    )
}

/// A field of the stats CSV: the row whose svname is `svname` (listen `postgres`), the
/// column named `column` (empty when either is missing).
pub async fn csv_field(stats: u16, svname: &str, column: &str) -> String {
    let (_, body) = http_get(stats, "/stats;csv").await;
    let mut lines = body.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let Some(col) = header.iter().position(|h| *h == column) else {
        return String::new();
    };
    lines
        .find(|l| l.starts_with(&format!("postgres,{svname},")))
        .and_then(|l| l.split(',').nth(col))
        .unwrap_or_default()
        .to_owned()
}

/// The pid of the process an upgrade started, from the old process's log.
pub fn successor_pid(log: &str) -> Option<i32> {
    log.lines()
        .find(|l| l.contains("new process started on the same sockets"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
}

/// Stops a process this test started but holds no guard for (an upgrade's successor):
/// SIGTERM, then SIGKILL after 10 s. True when it stopped on SIGTERM. A zombie waiting for
/// whoever adopted it counts as stopped.
pub fn stop_pid(pid: i32) -> bool {
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    };
    // A process this test started.
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        return false;
    }
    true
}
