//! Serde mirror of the file. Defaults live here, next to the keys.

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
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh: Duration,
    pub auth: Option<StatsAuth>,
    pub state_file: Option<PathBuf>,
    pub socket: Option<Spanned<String>>,
    pub socket_mode: Option<Spanned<String>>,
}

fn default_uri() -> Spanned<String> {
    Spanned::new(0..0, "/stats".into())
}
fn default_refresh() -> Duration {
    Duration::from_secs(5)
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
    #[serde(default = "default_coalesce", with = "humantime_serde")]
    pub coalesce: Duration,
}

fn default_coalesce() -> Duration {
    Duration::from_secs(10)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Global {
    pub maxconn: Spanned<usize>,
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
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
            grace: Duration::from_secs(30),
            // The shipped keepalived checks every 1 s with fall 1 and a 2 s timeout,
            // then moves the VIP in ~0.2 s: 3 s covers a check that was just run.
            linger: Duration::from_secs(3),
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
    #[serde(default)]
    pub relay: RelayMode,
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
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub fastinter: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub downinter: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
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
    #[serde(default, with = "humantime_serde")]
    pub slowstart: Option<Duration>,
}

fn default_on_marked_down() -> OnMarkedDown {
    OnMarkedDown::None
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 100)
}
