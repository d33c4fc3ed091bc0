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
}

#[derive(Debug, Clone)]
pub struct Global {
    /// Whole-process cap on client sessions.
    pub maxconn: usize,
    /// How long SIGTERM waits for sessions to finish before closing them.
    pub grace: Duration,
    /// tracing filter used when `RUST_LOG` is not set.
    pub log_level: String,
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
    pub timeouts: Timeouts,
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub client: Duration,
    pub server: Duration,
    pub queue: Duration,
    pub startup: Duration,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    /// As written, for logs and the stats page.
    pub addr_text: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// 0 means unlimited.
    pub maxconn: usize,
    pub backup: bool,
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
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Global {
        pub maxconn: Spanned<usize>,
        pub grace: HumanDuration,
        pub log_level: String,
    }

    impl Default for Global {
        fn default() -> Self {
            Global {
                maxconn: Spanned::new(0..0, 20_000),
                grace: HumanDuration(Duration::from_secs(30)),
                log_level: "info".into(),
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
        pub server: Vec<Spanned<Server>>,
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
        pub queue: HumanDuration,
        pub startup: HumanDuration,
    }

    impl Default for Timeouts {
        fn default() -> Self {
            let s = |secs| HumanDuration(Duration::from_secs(secs));
            Timeouts {
                connect: s(5),
                client: s(30 * 60),
                server: s(30 * 60),
                queue: s(30),
                startup: s(10),
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
    }

    fn default_weight() -> Spanned<u32> {
        Spanned::new(0..0, 100)
    }
}

/// A duration written as "5s", "30m", "250ms", "1h 30m".
#[derive(Debug, Clone, Copy)]
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

fn validate(file: raw::File, at: &Locator) -> Result<Config, ConfigError> {
    let g = file.global;
    if *g.maxconn.get_ref() == 0 {
        return Err(at.at(&g.maxconn, "global maxconn must be at least 1"));
    }
    let global = Global {
        maxconn: g.maxconn.into_inner(),
        grace: g.grace.0,
        log_level: g.log_level,
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
            ("queue", t.queue.0),
            ("startup", t.startup.0),
        ] {
            if d.is_zero() {
                return Err(at.error(
                    span.start,
                    format!("listen '{name}': timeouts.{key} must be more than 0"),
                ));
            }
        }
        let mut server_names = HashSet::new();
        let mut servers = Vec::new();
        for s in l.server {
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
            servers.push(Server {
                name: sname,
                addr_text: s.addr.get_ref().clone(),
                addr,
                weight: s.weight.into_inner(),
                maxconn: s.maxconn,
                backup: s.backup,
            });
        }
        listens.push(Listen {
            name,
            bind,
            balance: l.balance,
            maxconn: l.maxconn.into_inner(),
            backlog: l.backlog,
            retries: l.retries,
            timeouts: Timeouts {
                connect: t.connect.0,
                client: t.client.0,
                server: t.server.0,
                queue: t.queue.0,
                startup: t.startup.0,
            },
            servers,
        });
    }
    Ok(Config { global, listens })
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
        let e = error_of(&GOOD.replace("localhost:6433", "no-such-host.invalid:6433"));
        assert_eq!(e.line, 19, "{e}");
        assert_eq!(e.to_string().split(':').next(), Some("t.toml"));
    }

    #[test]
    fn empty_file_is_refused() {
        assert!(error_of("").reason.contains("no [[listen]]"));
    }
}
