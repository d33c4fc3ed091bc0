//! Configuration: TOML on disk (`raw`), validated into the types the daemon runs on.
//!
//! Parsing happens in two steps so that every error can name the file and line:
//! serde (with `deny_unknown_fields`) catches unknown keys and wrong types, then
//! `validate` checks what serde cannot (duplicate names, ranges, resolvable addresses),
//! using the spans that `toml::Spanned` kept for each table and value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", place(.file, *.line))]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the file as a whole (unreadable).
    pub line: usize,
    pub reason: String,
}

/// `file:line`, or the file alone for an error about the whole file.
fn place(file: &Path, line: usize) -> String {
    match line {
        0 => file.display().to_string(),
        n => format!("{}:{n}", file.display()),
    }
}

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub global: Global,
    pub listens: Vec<Listen>,
    /// The stats/admin HTTP server; none when `[stats]` is absent.
    pub stats: Option<Stats>,
    pub alerts: Option<Alerts>,
    /// The other pglb nodes of the pair: operator actions apply on every node.
    pub peers: Vec<Peer>,
}

/// `[[peer]]`: another pglb node (the keepalived pair's other member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its stats port, e.g. `http://10.0.0.22:8404` (admin credentials are shared).
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub bind: SocketAddr,
    /// Path of the dashboard; the CSV is at `{uri};csv`.
    pub uri: String,
    /// Dashboard auto-refresh period.
    pub refresh: Duration,
    /// Basic-auth credentials; admin actions are refused without them.
    pub auth: Option<StatsAuth>,
    /// Where admin state (drain, maint, weight) is kept across restarts.
    pub state_file: Option<PathBuf>,
    /// HAProxy's runtime API (`stats socket`): a Unix socket, or a TCP address.
    pub socket: Option<SocketSpec>,
}

/// Where the runtime API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// A Unix socket with this file mode (access is the file's permission, as HAProxy's
    /// `level admin`).
    Unix { path: PathBuf, mode: u32 },
    /// A TCP address (anyone who can connect is admin: keep it on loopback).
    Tcp(SocketAddr),
}

#[derive(Debug, Clone)]
pub struct StatsAuth {
    pub user: String,
    pub password: Secret,
}

#[derive(Debug, Clone)]
pub struct Alerts {
    /// Slack-compatible incoming webhook (http:// or https://).
    pub webhook_url: String,
    /// Changes of one server within this window are sent as one message.
    pub coalesce: Duration,
}

#[derive(Debug, Clone)]
pub struct Global {
    /// Whole-process cap on client sessions.
    pub maxconn: usize,
    /// How long SIGTERM waits for sessions to finish before closing them.
    pub grace: Duration,
    /// After SIGTERM, how long the listeners keep accepting while `/health` already says
    /// DOWN, so keepalived moves the VIP before any connection is refused.
    pub linger: Duration,
    /// tracing filter used when `RUST_LOG` is not set.
    pub log_level: String,
    /// Worker threads serving sessions (HAProxy's nbthread); by default one per core.
    pub threads: usize,
    /// This node's name for its peers (default: the host name).
    pub node: String,
    /// CancelRequests with a key pglb does not know, per second: process-wide and per
    /// client address. Each one is sent to every server, so unbounded they would let
    /// anyone multiply connections to the servers. Known keys are never limited.
    pub unknown_cancels: CancelLimits,
}

/// Rates of CancelRequests with unknown keys (per second, with a burst of twice that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelLimits {
    pub per_second: u32,
    pub per_client: u32,
}

/// Where a listen's plaintext sessions are relayed after their login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// In pglb's process: read from one socket, write to the other.
    #[default]
    User,
    /// In the kernel (BPF sockmap), when the kernel can; in user space otherwise.
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    Leastconn,
    Roundrobin,
    First,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Leastconn => "leastconn",
            Balance::Roundrobin => "roundrobin",
            Balance::First => "first",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub name: String,
    pub bind: SocketAddr,
    pub balance: Balance,
    pub relay: RelayMode,
    pub maxconn: usize,
    pub backlog: u32,
    /// Connect attempts after the first one fails, each on another server when possible.
    pub retries: u32,
    /// With `expect_role = "replica"`: when no replica is up, send clients to servers whose
    /// only fault is being the primary.
    pub fallback_to_primary: bool,
    /// TLS termination; without it SSLRequests are passed through to the server.
    pub tls: Option<Tls>,
    pub timeouts: Timeouts,
    pub servers: Vec<Server>,
}

/// `[listen.tls]`: the certificate pglb presents, loaded when the file is read.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A listen's `[listen.timeouts]`, read as written (every key optional) and checked by
/// `validate` (none may be 0).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    #[serde(with = "humantime_serde")]
    pub client: Duration,
    #[serde(with = "humantime_serde")]
    pub server: Duration,
    /// The wait for a server's first answer (to the StartupMessage or SSLRequest): a
    /// server that accepts the connection but does not answer is given up on after this.
    #[serde(with = "humantime_serde")]
    pub login: Duration,
    #[serde(with = "humantime_serde")]
    pub queue: Duration,
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// How long a drained session may stay busy before it is closed anyway.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            connect: s(5),
            client: s(30 * 60),
            server: s(30 * 60),
            login: s(5),
            queue: s(30),
            startup: s(10),
            drain: s(300),
        }
    }
}

/// How a server's health is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// No checks: the server is always usable ("no check").
    None,
    /// TCP connect, closed with an RST.
    Tcp,
    /// HAProxy's pgsql-check: StartupMessage, pass on an authentication request.
    Pgsql,
    /// SSLRequest, pass on `S` or `N`.
    Ssl,
    /// Log in, run a query, optionally check the role.
    Query,
}

/// The role a query check expects of the PostgreSQL behind the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Any,
    Primary,
    Replica,
}

/// A password: never printed by Debug, logs or the stats page.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Health-check settings of one server (listen defaults with its overrides applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub fastinter: Duration,
    pub downinter: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub query: String,
    pub expect_role: Role,
    /// Consecutive connection errors on live traffic that mark the server DOWN (0: off).
    pub error_limit: u32,
}

/// What happens to a server's sessions when it is marked DOWN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMarkedDown {
    /// Sessions continue (HAProxy's default).
    None,
    /// Sessions are closed so clients reconnect elsewhere.
    ShutdownSessions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// 0 means unlimited.
    pub maxconn: usize,
    pub backup: bool,
    pub check: Check,
    pub on_marked_down: OnMarkedDown,
    /// After recovery, the weight ramps up over this long (zero: at once).
    pub slowstart: Duration,
}

mod raw;
mod validate;

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = Locator { path, text };
        let file: raw::File = toml::from_str(text).map_err(|e| {
            at.error(
                e.span().map(|s| s.start).unwrap_or(0),
                e.message().trim_end().to_owned(),
            )
        })?;
        validate::validate(file, &at)
    }
}

/// Turns byte offsets into `file:line` errors.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, offset: usize, reason: impl fmt::Display) -> ConfigError {
        let offset = offset.min(self.text.len());
        let line = self.text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        ConfigError {
            file: self.path.to_owned(),
            line,
            reason: reason.to_string(),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, reason: impl fmt::Display) -> ConfigError {
        self.error(spanned.span().start, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    const GOOD: &str = r#"
[global]
maxconn = 100

[[listen]]
name = "postgres"
bind = "127.0.0.1:5432"
balance = "roundrobin"
[listen.timeouts]
connect = "250ms"
client = "30m"

[[listen.server]]
name = "pgb1"
addr = "127.0.0.1:6432"

[[listen.server]]
name = "pgb2"
addr = "localhost:6433"
weight = 50
backup = true
"#;

    #[test]
    fn parses_defaults_and_durations() {
        let c = parse(GOOD).expect("valid config");
        let l = &c.listens[0];
        assert_eq!(l.balance, Balance::Roundrobin);
        assert_eq!(l.timeouts.connect, Duration::from_millis(250));
        assert_eq!(l.timeouts.client, Duration::from_secs(1800));
        assert_eq!(l.timeouts.startup, Duration::from_secs(10));
        // Defaults the README and config/pglb.toml state.
        assert_eq!(l.timeouts.server, Duration::from_secs(1800));
        assert_eq!(l.timeouts.login, Duration::from_secs(5));
        assert_eq!(l.timeouts.queue, Duration::from_secs(30));
        assert_eq!(l.timeouts.drain, Duration::from_secs(300));
        assert_eq!(l.retries, 3);
        assert_eq!(l.servers[0].weight, 100);
        assert!(l.servers[1].backup);
        assert_eq!(l.servers[1].addr.port(), 6433);
    }

    fn error_of(text: &str) -> ConfigError {
        parse(text).expect_err("config must be refused")
    }

    #[test]
    fn unknown_key_names_its_line() {
        let e = error_of(&GOOD.replace("balance = \"roundrobin\"", "balanse = \"roundrobin\""));
        assert_eq!(e.line, 8, "{e}");
        assert!(e.reason.contains("balanse"), "{e}");
    }

    #[test]
    fn duplicate_server_names_its_line() {
        let e = error_of(&GOOD.replace("\"pgb2\"", "\"pgb1\""));
        assert_eq!(e.line, 18, "{e}");
        assert!(e.reason.contains("duplicate server name"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_line() {
        let e = error_of(&GOOD.replace("127.0.0.1:5432", "127.0.0.1"));
        assert_eq!(e.line, 7, "{e}");
        let e = error_of(&GOOD.replace("weight = 50", "weight = 300"));
        assert_eq!(e.line, 20, "{e}");
        let e = error_of(&GOOD.replace("\"250ms\"", "\"soon\""));
        assert_eq!(e.line, 10, "{e}");
        assert!(e.reason.contains("expected a duration"), "{e}");
        let e = error_of(&GOOD.replace("maxconn = 100", "maxconn = 0"));
        assert_eq!(e.line, 3, "{e}");
        let e = error_of(&GOOD.replace("maxconn = 100", "maxconn = 100\nthreads = 0"));
        assert_eq!(e.line, 4, "{e}");
        assert!(e.reason.contains("threads must be between 1 and"), "{e}");
        let threads = |text: &str| parse(text).expect("valid").global.threads;
        assert_eq!(
            threads(&GOOD.replace("maxconn = 100", "maxconn = 100\nthreads = 3")),
            3
        );
        assert!(threads(GOOD) >= 1, "by default one per core");
        let e = error_of(&GOOD.replace("localhost:6433", "no-such-host.invalid:6433"));
        assert_eq!(e.line, 19, "{e}");
        assert_eq!(e.to_string().split(':').next(), Some("t.toml"));
    }

    #[test]
    fn checks_inherit_and_override() {
        let text = GOOD.replace(
            "[[listen.server]]\nname = \"pgb1\"",
            "[listen.check]\ntype = \"query\"\nfall = 2\npassword = \"hunter2\"\n\n[[listen.server]]\nname = \"pgb1\"\ncheck = { type = \"tcp\", rise = 5 }",
        );
        let c = parse(&text).expect("valid");
        let (a, b) = (
            &c.listens[0].servers[0].check,
            &c.listens[0].servers[1].check,
        );
        assert_eq!((a.kind, a.rise, a.fall), (CheckKind::Tcp, 5, 2));
        assert_eq!((b.kind, b.rise, b.fall), (CheckKind::Query, 2, 2));
        assert_eq!(b.password.expose(), "hunter2");
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "passwords are masked in Debug"
        );
        // Without [listen.check], servers are not checked.
        assert_eq!(
            parse(GOOD).expect("valid").listens[0].servers[0].check.kind,
            CheckKind::None
        );
        let e = error_of(&text.replace("fall = 2", "fall = 0"));
        assert!(e.reason.contains("fall must be at least 1"), "{e}");
        assert_eq!(e.line, 13, "{e}");
    }

    #[test]
    fn empty_file_is_refused() {
        assert!(error_of("").reason.contains("no [[listen]]"));
    }
}
