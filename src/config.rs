//! Configuration: TOML on disk (`raw`), validated into the types the daemon runs on.
//!
//! Parsing happens in two steps so that every error can name the file and line:
//! serde (with `deny_unknown_fields`) catches unknown keys and wrong types, then
//! `validate` checks what serde cannot (duplicate names, ranges, resolvable addresses),
//! using the spans that `toml::Spanned` kept for each table and value.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already located in its file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line; 0 when the error concerns the file as a whole (unreadable).
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.reason),
            n => write!(f, "{}:{n}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

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

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub client: Duration,
    pub server: Duration,
    /// The wait for a server's first answer (to the StartupMessage or SSLRequest): a
    /// server that accepts the connection but does not answer is given up on after this.
    pub login: Duration,
    pub queue: Duration,
    pub startup: Duration,
    /// How long a drained session may stay busy before it is closed anyway.
    pub drain: Duration,
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

/// Serde mirror of the file. Defaults live here, next to the keys.
mod raw {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(default)]
        pub global: Global,
        #[serde(default)]
        pub listen: Vec<Spanned<Listen>>,
        pub stats: Option<Spanned<Stats>>,
        pub alerts: Option<Spanned<Alerts>>,
        #[serde(default)]
        pub peer: Vec<Spanned<Peer>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Peer {
        pub name: Spanned<String>,
        pub url: Spanned<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Stats {
        pub bind: Spanned<String>,
        #[serde(default = "default_uri")]
        pub uri: Spanned<String>,
        #[serde(default = "default_refresh")]
        pub refresh: HumanDuration,
        pub auth: Option<StatsAuth>,
        pub state_file: Option<PathBuf>,
        pub socket: Option<Spanned<String>>,
        pub socket_mode: Option<Spanned<String>>,
    }

    fn default_uri() -> Spanned<String> {
        Spanned::new(0..0, "/stats".into())
    }
    fn default_refresh() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StatsAuth {
        pub user: String,
        pub password: Spanned<Secret>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Alerts {
        pub webhook_url: Spanned<String>,
        #[serde(default = "default_coalesce")]
        pub coalesce: HumanDuration,
    }

    fn default_coalesce() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Global {
        pub maxconn: Spanned<usize>,
        pub grace: HumanDuration,
        pub linger: HumanDuration,
        pub log_level: String,
        pub threads: Option<Spanned<usize>>,
        pub node: Option<String>,
        pub unknown_cancel_rate: Spanned<u32>,
        pub unknown_cancel_rate_per_client: Spanned<u32>,
    }

    impl Default for Global {
        fn default() -> Self {
            Global {
                maxconn: Spanned::new(0..0, 20_000),
                grace: HumanDuration(Duration::from_secs(30)),
                // The shipped keepalived checks every 1 s with fall 1 and a 2 s timeout,
                // then moves the VIP in ~0.2 s: 3 s covers a check that was just run.
                linger: HumanDuration(Duration::from_secs(3)),
                log_level: "info".into(),
                threads: None,
                node: None,
                unknown_cancel_rate: Spanned::new(0..0, 100),
                unknown_cancel_rate_per_client: Spanned::new(0..0, 10),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listen {
        pub name: Spanned<String>,
        pub bind: Spanned<String>,
        #[serde(default = "default_balance")]
        pub balance: Balance,
        #[serde(default = "default_listen_maxconn")]
        pub maxconn: Spanned<usize>,
        #[serde(default = "default_backlog")]
        pub backlog: u32,
        #[serde(default = "default_retries")]
        pub retries: u32,
        #[serde(default)]
        pub timeouts: Timeouts,
        #[serde(default)]
        pub check: Option<Spanned<CheckTable>>,
        pub tls: Option<Spanned<TlsTable>>,
        #[serde(default)]
        pub server: Vec<Spanned<Server>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TlsTable {
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    /// `[listen.check]` and a server's `check` override: every key optional so that a
    /// server inherits what it does not set.
    #[derive(Deserialize, Default, Clone)]
    #[serde(deny_unknown_fields)]
    pub struct CheckTable {
        #[serde(rename = "type")]
        pub kind: Option<CheckKind>,
        pub interval: Option<HumanDuration>,
        pub fastinter: Option<HumanDuration>,
        pub downinter: Option<HumanDuration>,
        pub timeout: Option<HumanDuration>,
        pub rise: Option<Spanned<u32>>,
        pub fall: Option<Spanned<u32>>,
        pub user: Option<String>,
        pub password: Option<Secret>,
        pub database: Option<String>,
        pub query: Option<String>,
        pub expect_role: Option<Role>,
        pub error_limit: Option<u32>,
        pub fallback_to_primary: Option<bool>,
    }

    impl CheckTable {
        /// `self` with the keys `over` sets replaced.
        pub fn merged(&self, over: &CheckTable) -> CheckTable {
            macro_rules! pick {
                ($($f:ident),*) => { CheckTable { $($f: over.$f.clone().or_else(|| self.$f.clone()),)* } };
            }
            pick!(
                kind,
                interval,
                fastinter,
                downinter,
                timeout,
                rise,
                fall,
                user,
                password,
                database,
                query,
                expect_role,
                error_limit,
                fallback_to_primary
            )
        }
    }

    fn default_balance() -> Balance {
        Balance::Leastconn
    }
    fn default_listen_maxconn() -> Spanned<usize> {
        Spanned::new(0..0, 12_000)
    }
    fn default_backlog() -> u32 {
        1024
    }
    fn default_retries() -> u32 {
        3
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Timeouts {
        pub connect: HumanDuration,
        pub client: HumanDuration,
        pub server: HumanDuration,
        pub login: HumanDuration,
        pub queue: HumanDuration,
        pub startup: HumanDuration,
        pub drain: HumanDuration,
    }

    impl Default for Timeouts {
        fn default() -> Self {
            let s = |secs| HumanDuration(Duration::from_secs(secs));
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

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Server {
        pub name: Spanned<String>,
        pub addr: Spanned<String>,
        #[serde(default = "default_weight")]
        pub weight: Spanned<u32>,
        #[serde(default)]
        pub maxconn: usize,
        #[serde(default)]
        pub backup: bool,
        #[serde(default)]
        pub check: Option<CheckTable>,
        #[serde(default = "default_on_marked_down")]
        pub on_marked_down: OnMarkedDown,
        #[serde(default)]
        pub slowstart: Option<HumanDuration>,
    }

    fn default_on_marked_down() -> OnMarkedDown {
        OnMarkedDown::None
    }

    fn default_weight() -> Spanned<u32> {
        Spanned::new(0..0, 100)
    }
}

/// A duration written as "5s", "30m", "250ms", "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

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
        validate(file, &at)
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

/// More worker threads than this is a typo, not a machine.
const MAX_THREADS: usize = 256;

fn validate(file: raw::File, at: &Locator) -> Result<Config, ConfigError> {
    let g = file.global;
    if *g.maxconn.get_ref() == 0 {
        return Err(at.at(&g.maxconn, "global maxconn must be at least 1"));
    }
    let threads = match g.threads {
        Some(t) if !(1..=MAX_THREADS).contains(t.get_ref()) => {
            return Err(at.at(
                &t,
                format!("global threads must be between 1 and {MAX_THREADS}"),
            ));
        }
        Some(t) => t.into_inner(),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    for rate in [&g.unknown_cancel_rate, &g.unknown_cancel_rate_per_client] {
        if *rate.get_ref() == 0 {
            return Err(at.at(
                rate,
                "unknown-key cancel rates must be at least 1 per second",
            ));
        }
    }
    let global = Global {
        maxconn: g.maxconn.into_inner(),
        grace: g.grace.0,
        linger: g.linger.0.min(g.grace.0),
        log_level: g.log_level,
        threads,
        node: g.node.unwrap_or_else(crate::webclient::hostname),
        unknown_cancels: CancelLimits {
            per_second: g.unknown_cancel_rate.into_inner(),
            per_client: g.unknown_cancel_rate_per_client.into_inner(),
        },
    };

    if file.listen.is_empty() {
        return Err(at.error(0, "no [[listen]] section: nothing to serve"));
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut listens = Vec::new();
    for spanned in file.listen {
        let span = spanned.span();
        let l = spanned.into_inner();
        let name = l.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(at.at(
                &l.name,
                format!("listen name {name:?} must be non-empty and use only letters, digits, '-', '_' or '.'"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(at.at(&l.name, format!("duplicate listen name {name:?}")));
        }
        let bind: SocketAddr = l.bind.get_ref().parse().map_err(|_| {
            at.at(
                &l.bind,
                format!(
                    "listen '{name}': bind {:?} is not an IP:port address",
                    l.bind.get_ref()
                ),
            )
        })?;
        if !binds.insert(bind) {
            return Err(at.at(
                &l.bind,
                format!("listen '{name}': bind {bind} is used twice"),
            ));
        }
        if *l.maxconn.get_ref() == 0 {
            return Err(at.at(
                &l.maxconn,
                format!("listen '{name}': maxconn must be at least 1"),
            ));
        }
        if l.server.is_empty() {
            return Err(at.error(
                span.start,
                format!("listen '{name}' has no [[listen.server]]"),
            ));
        }
        let t = &l.timeouts;
        for (key, d) in [
            ("connect", t.connect.0),
            ("client", t.client.0),
            ("server", t.server.0),
            ("login", t.login.0),
            ("queue", t.queue.0),
            ("startup", t.startup.0),
            ("drain", t.drain.0),
        ] {
            if d.is_zero() {
                return Err(at.error(
                    span.start,
                    format!("listen '{name}': timeouts.{key} must be more than 0"),
                ));
            }
        }
        let listen_check = l.check.as_ref().map(|c| c.get_ref().clone());
        let check_line = l
            .check
            .as_ref()
            .map(|c| c.span().start)
            .unwrap_or(span.start);
        let fallback_to_primary = listen_check
            .as_ref()
            .and_then(|c| c.fallback_to_primary)
            .unwrap_or(true);
        let mut server_names = HashSet::new();
        let mut servers = Vec::new();
        for s in l.server {
            let server_line = s.span().start;
            let s = s.into_inner();
            let sname = s.name.get_ref().clone();
            if sname.is_empty() || sname.contains([',', '/', ' ', '"']) {
                return Err(at.at(
                    &s.name,
                    format!("listen '{name}': server name {sname:?} must be non-empty, without ',', '/', '\"' or spaces"),
                ));
            }
            if !server_names.insert(sname.clone()) {
                return Err(at.at(
                    &s.name,
                    format!("listen '{name}': duplicate server name {sname:?}"),
                ));
            }
            if *s.weight.get_ref() > 256 {
                return Err(at.at(
                    &s.weight,
                    format!(
                        "server '{name}/{sname}': weight {} is out of range 0..256",
                        s.weight.get_ref()
                    ),
                ));
            }
            let addr = resolve(s.addr.get_ref())
                .map_err(|reason| at.at(&s.addr, format!("server '{name}/{sname}': {reason}")))?;
            let check = resolve_check(listen_check.as_ref(), s.check.as_ref()).map_err(
                |(reason, own)| {
                    at.error(
                        if own { server_line } else { check_line },
                        format!("server '{name}/{sname}': {reason}"),
                    )
                },
            )?;
            servers.push(Server {
                name: sname,
                addr,
                weight: s.weight.into_inner(),
                maxconn: s.maxconn,
                backup: s.backup,
                check,
                on_marked_down: s.on_marked_down,
                slowstart: s.slowstart.map(|d| d.0).unwrap_or(Duration::ZERO),
            });
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                let table = t.get_ref();
                let acceptor = crate::tls::acceptor(&table.cert, &table.key)
                    .map_err(|reason| at.at(t, format!("listen '{name}': tls: {reason}")))?;
                Some(Tls {
                    cert: table.cert.clone(),
                    key: table.key.clone(),
                    acceptor,
                })
            }
        };
        listens.push(Listen {
            name,
            tls,
            bind,
            balance: l.balance,
            maxconn: l.maxconn.into_inner(),
            backlog: l.backlog,
            retries: l.retries,
            fallback_to_primary,
            timeouts: Timeouts {
                connect: t.connect.0,
                client: t.client.0,
                server: t.server.0,
                login: t.login.0,
                queue: t.queue.0,
                startup: t.startup.0,
                drain: t.drain.0,
            },
            servers,
        });
    }
    let stats = match file.stats {
        None => None,
        Some(spanned) => {
            let st = spanned.into_inner();
            let bind = st.bind.get_ref().parse().map_err(|_| {
                at.at(
                    &st.bind,
                    format!(
                        "stats bind {:?} is not an IP:port address",
                        st.bind.get_ref()
                    ),
                )
            })?;
            if binds.contains(&bind) {
                return Err(at.at(
                    &st.bind,
                    format!("stats bind {bind} is also a listen's bind"),
                ));
            }
            let uri = st.uri.get_ref().clone();
            if !uri.starts_with('/')
                || uri.contains([';', '?', ' '])
                || uri == "/metrics"
                || uri == "/health"
            {
                return Err(at.at(
                    &st.uri,
                    format!(
                        "stats uri {uri:?} must be a path like \"/stats\" (not /metrics or /health)"
                    ),
                ));
            }
            if let Some(a) = &st.auth
                && (a.user.is_empty() || a.password.get_ref().expose().is_empty())
            {
                return Err(at.at(&st.bind, "stats.auth needs a non-empty user and password"));
            }
            Some(Stats {
                bind,
                uri,
                refresh: st.refresh.0,
                socket: socket_spec(st.socket.as_ref(), st.socket_mode.as_ref(), at)?,
                auth: match st.auth {
                    None => None,
                    Some(a) => Some(stats_auth(a, at)?),
                },
                state_file: st.state_file,
            })
        }
    };
    let alerts = match file.alerts {
        None => None,
        Some(spanned) => {
            let a = spanned.into_inner();
            let url = a.webhook_url.get_ref().clone();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(at.at(
                    &a.webhook_url,
                    "alerts webhook_url must start with http:// or https://",
                ));
            }
            Some(Alerts {
                webhook_url: url,
                coalesce: a.coalesce.0,
            })
        }
    };
    let peers = validate_peers(file.peer, &global.node, stats.as_ref(), at)?;
    Ok(Config {
        global,
        listens,
        stats,
        alerts,
        peers,
    })
}

/// `[[peer]]`: unique names other than this node's, http(s) URLs, and the admin
/// credentials they authenticate with.
fn validate_peers(
    peers: Vec<Spanned<raw::Peer>>,
    node: &str,
    stats: Option<&Stats>,
    at: &Locator,
) -> Result<Vec<Peer>, ConfigError> {
    let mut out: Vec<Peer> = Vec::new();
    for spanned in peers {
        let span = spanned.span();
        let p = spanned.into_inner();
        let (name, url) = (p.name.get_ref().clone(), p.url.get_ref().clone());
        if name.is_empty() || name == node || out.iter().any(|q| q.name == name) {
            return Err(at.at(
                &p.name,
                format!(
                    "peer name {name:?} must be non-empty, unique and not this node's ({node:?})"
                ),
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(at.at(&p.url, "peer url must start with http:// or https://"));
        }
        if stats.is_none_or(|s| s.auth.is_none()) {
            return Err(at.error(
                span.start,
                "[[peer]] needs [stats] with [stats.auth]: peers accept each other's operator actions with the admin credentials",
            ));
        }
        out.push(Peer {
            name,
            url: url.trim_end_matches('/').to_owned(),
        });
    }
    Ok(out)
}

/// The check a server runs: built-in defaults, then `[listen.check]`, then the server's
/// own `check` table. Without `[listen.check]` and without an override, servers are not
/// checked. Errors say whether the server's own table (true) or the listen's is at fault.
fn resolve_check(
    listen: Option<&raw::CheckTable>,
    own: Option<&raw::CheckTable>,
) -> Result<Check, (String, bool)> {
    let base = listen.cloned().unwrap_or_default();
    let c = match own {
        Some(o) => base.merged(o),
        None => base,
    };
    let configured = listen.is_some() || own.is_some();
    let kind = c.kind.unwrap_or(if configured {
        CheckKind::Tcp
    } else {
        CheckKind::None
    });
    let d = |v: Option<HumanDuration>, default_ms: u64| {
        v.map(|h| h.0).unwrap_or(Duration::from_millis(default_ms))
    };
    let interval = d(c.interval, 2000);
    let check = Check {
        kind,
        interval,
        fastinter: c.fastinter.map(|h| h.0).unwrap_or(interval),
        downinter: c.downinter.map(|h| h.0).unwrap_or(interval),
        timeout: d(c.timeout, 1000),
        rise: c.rise.as_ref().map(|r| *r.get_ref()).unwrap_or(2),
        fall: c.fall.as_ref().map(|f| *f.get_ref()).unwrap_or(3),
        user: c.user.clone().unwrap_or_else(|| "pglb_check".into()),
        password: c.password.clone().unwrap_or_default(),
        database: c.database.clone().unwrap_or_else(|| "postgres".into()),
        query: c.query.clone().unwrap_or_else(|| "SELECT 1".into()),
        expect_role: c.expect_role.unwrap_or(Role::Any),
        error_limit: c.error_limit.unwrap_or(if configured { 3 } else { 0 }),
    };
    let own_sets = |f: fn(&raw::CheckTable) -> bool| own.is_some_and(f);
    if check.rise == 0 {
        return Err((
            "check rise must be at least 1".into(),
            own_sets(|o| o.rise.is_some()),
        ));
    }
    if check.fall == 0 {
        return Err((
            "check fall must be at least 1".into(),
            own_sets(|o| o.fall.is_some()),
        ));
    }
    for (key, v) in [
        ("interval", check.interval),
        ("fastinter", check.fastinter),
        ("downinter", check.downinter),
        ("timeout", check.timeout),
    ] {
        if v < Duration::from_millis(10) {
            return Err((format!("check {key} must be at least 10ms"), own.is_some()));
        }
    }
    if check.expect_role != Role::Any && check.kind != CheckKind::Query {
        return Err((
            "expect_role needs check type \"query\"".into(),
            own.is_some(),
        ));
    }
    Ok(check)
}

/// Resolves `host:port`; host names are looked up now (at start and at reload).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("addr {text:?} needs a port (host:port)"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("addr {text:?} is not host:port"));
    }
    text.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// The password `config/pglb.toml` ships as an example: admin actions with it would be
/// open to anyone who read the example.
pub const EXAMPLE_PASSWORD: &str = "change-me";

fn stats_auth(a: raw::StatsAuth, at: &Locator) -> Result<StatsAuth, ConfigError> {
    if a.password.get_ref().expose() == EXAMPLE_PASSWORD {
        return Err(at.at(
            &a.password,
            format!(
                "[stats.auth] password is the example password {EXAMPLE_PASSWORD:?}: set a password of your own (or remove [stats.auth] to disable admin actions)"
            ),
        ));
    }
    Ok(StatsAuth {
        user: a.user,
        password: a.password.into_inner(),
    })
}

/// `[stats] socket` and `socket_mode`: an absolute path is a Unix socket, `IP:port` TCP.
fn socket_spec(
    socket: Option<&Spanned<String>>,
    mode: Option<&Spanned<String>>,
    at: &Locator,
) -> Result<Option<SocketSpec>, ConfigError> {
    let Some(socket) = socket else {
        if let Some(m) = mode {
            return Err(at.at(m, "socket_mode without socket"));
        }
        return Ok(None);
    };
    let text = socket.get_ref();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if mode.is_some() {
            return Err(at.at(
                socket,
                "socket_mode applies to a Unix socket, not to IP:port",
            ));
        }
        return Ok(Some(SocketSpec::Tcp(addr)));
    }
    if !text.starts_with('/') {
        return Err(at.at(
            socket,
            format!("stats socket {text:?} must be an absolute path or IP:port"),
        ));
    }
    let mode = match mode {
        None => 0o660,
        Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => v,
            _ => {
                return Err(at.at(
                    m,
                    format!(
                        "socket_mode {:?} is not an octal mode like \"0660\"",
                        m.get_ref()
                    ),
                ));
            }
        },
    };
    Ok(Some(SocketSpec::Unix {
        path: PathBuf::from(text),
        mode,
    }))
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
        assert!(e.reason.contains("invalid duration"), "{e}");
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
