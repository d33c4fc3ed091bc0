//! What serde cannot check: names, ranges, addresses, files, each error located at its
//! line. One function per part of the file.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use toml::Spanned;

use super::*;

/// More worker threads than this is a typo, not a machine.
const MAX_THREADS: usize = 256;

pub(super) fn validate(file: raw::File, at: &Locator) -> Result<Config, ConfigError> {
    let global = validate_global(file.global, at)?;
    if file.listen.is_empty() {
        return Err(at.error(0, "no [[listen]] section: nothing to serve"));
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut listens = Vec::new();
    for spanned in file.listen {
        let (name_at, bind_at) = (
            spanned.get_ref().name.span().start,
            spanned.get_ref().bind.span().start,
        );
        let listen = validate_listen(spanned, at)?;
        if !names.insert(listen.name.clone()) {
            return Err(at.error(name_at, format!("duplicate listen name {:?}", listen.name)));
        }
        if !binds.insert(listen.bind) {
            return Err(at.error(
                bind_at,
                format!(
                    "listen '{}': bind {} is used twice",
                    listen.name, listen.bind
                ),
            ));
        }
        listens.push(listen);
    }
    let stats = match file.stats {
        None => None,
        Some(spanned) => Some(validate_stats(spanned.into_inner(), &binds, at)?),
    };
    let alerts = match file.alerts {
        None => None,
        Some(spanned) => Some(validate_alerts(spanned.into_inner(), at)?),
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

fn validate_global(g: raw::Global, at: &Locator) -> Result<Global, ConfigError> {
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
    Ok(Global {
        maxconn: g.maxconn.into_inner(),
        grace: g.grace,
        linger: g.linger.min(g.grace),
        log_level: g.log_level,
        threads,
        node: g.node.unwrap_or_else(crate::webclient::hostname),
        unknown_cancels: CancelLimits {
            per_second: g.unknown_cancel_rate.into_inner(),
            per_client: g.unknown_cancel_rate_per_client.into_inner(),
        },
    })
}

/// One `[[listen]]` with its servers (listen names and binds are unique across the file:
/// checked by the caller).
fn validate_listen(spanned: Spanned<raw::Listen>, at: &Locator) -> Result<Listen, ConfigError> {
    let span = spanned.span();
    let l = spanned.into_inner();
    let name = listen_name(&l.name, at)?;
    let bind: SocketAddr = l.bind.get_ref().parse().map_err(|_| {
        at.at(
            &l.bind,
            format!(
                "listen '{name}': bind {:?} is not an IP:port address",
                l.bind.get_ref()
            ),
        )
    })?;
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
    let timeouts = validate_timeouts(l.timeouts, &name, span.start, at)?;
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
    let servers = validate_servers(l.server, &name, listen_check.as_ref(), check_line, at)?;
    let tls = l
        .tls
        .as_ref()
        .map(|t| validate_tls(t, &name, at))
        .transpose()?;
    Ok(Listen {
        name,
        tls,
        bind,
        balance: l.balance,
        relay: l.relay,
        maxconn: l.maxconn.into_inner(),
        backlog: l.backlog,
        retries: l.retries,
        fallback_to_primary,
        timeouts,
        servers,
    })
}

/// Names appear in URLs, log lines and the runtime API: keep them plain.
fn listen_name(name: &Spanned<String>, at: &Locator) -> Result<String, ConfigError> {
    let text = name.get_ref();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if text.is_empty() || !text.chars().all(plain) {
        return Err(at.at(
            name,
            format!("listen name {text:?} must be non-empty and use only letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(text.clone())
}

/// The servers of listen `name`, unique by name.
fn validate_servers(
    raw: Vec<Spanned<raw::Server>>,
    name: &str,
    listen_check: Option<&raw::CheckTable>,
    check_line: usize,
    at: &Locator,
) -> Result<Vec<Server>, ConfigError> {
    let mut names = HashSet::new();
    let mut servers = Vec::new();
    for spanned in raw {
        let name_at = spanned.get_ref().name.span().start;
        let server = validate_server(spanned, name, listen_check, check_line, at)?;
        if !names.insert(server.name.clone()) {
            return Err(at.error(
                name_at,
                format!("listen '{name}': duplicate server name {:?}", server.name),
            ));
        }
        servers.push(server);
    }
    Ok(servers)
}

/// Certificate and key are loaded now: a reload with a bad pair keeps the running one.
fn validate_tls(t: &Spanned<raw::TlsTable>, name: &str, at: &Locator) -> Result<Tls, ConfigError> {
    let table = t.get_ref();
    let acceptor = crate::tls::acceptor(&table.cert, &table.key)
        .map_err(|reason| at.at(t, format!("listen '{name}': tls: {reason}")))?;
    Ok(Tls {
        cert: table.cert.clone(),
        key: table.key.clone(),
        acceptor,
    })
}

/// One `[[listen.server]]` of listen `name`: its check is the listen's with its own
/// overrides (errors point at whichever table is at fault).
fn validate_server(
    spanned: Spanned<raw::Server>,
    name: &str,
    listen_check: Option<&raw::CheckTable>,
    check_line: usize,
    at: &Locator,
) -> Result<Server, ConfigError> {
    let server_line = spanned.span().start;
    let s = spanned.into_inner();
    let sname = s.name.get_ref().clone();
    if sname.is_empty() || sname.contains([',', '/', ' ', '"']) {
        return Err(at.at(
            &s.name,
            format!("listen '{name}': server name {sname:?} must be non-empty, without ',', '/', '\"' or spaces"),
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
    let check = resolve_check(listen_check, s.check.as_ref()).map_err(|(reason, own)| {
        at.error(
            if own { server_line } else { check_line },
            format!("server '{name}/{sname}': {reason}"),
        )
    })?;
    Ok(Server {
        name: sname,
        addr,
        weight: s.weight.into_inner(),
        maxconn: s.maxconn,
        backup: s.backup,
        check,
        on_marked_down: s.on_marked_down,
        slowstart: s.slowstart.unwrap_or(Duration::ZERO),
    })
}

/// Every timeout must be more than 0 (a zero would refuse everyone at once).
fn validate_timeouts(
    t: Timeouts,
    listen: &str,
    line_at: usize,
    at: &Locator,
) -> Result<Timeouts, ConfigError> {
    for (key, d) in [
        ("connect", t.connect),
        ("client", t.client),
        ("server", t.server),
        ("login", t.login),
        ("queue", t.queue),
        ("startup", t.startup),
        ("drain", t.drain),
    ] {
        if d.is_zero() {
            return Err(at.error(
                line_at,
                format!("listen '{listen}': timeouts.{key} must be more than 0"),
            ));
        }
    }
    Ok(t)
}

fn validate_stats(
    st: raw::Stats,
    binds: &HashSet<SocketAddr>,
    at: &Locator,
) -> Result<Stats, ConfigError> {
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
            format!("stats uri {uri:?} must be a path like \"/stats\" (not /metrics or /health)"),
        ));
    }
    if let Some(a) = &st.auth
        && (a.user.is_empty() || a.password.get_ref().expose().is_empty())
    {
        return Err(at.at(&st.bind, "stats.auth needs a non-empty user and password"));
    }
    Ok(Stats {
        bind,
        uri,
        refresh: st.refresh,
        socket: socket_spec(st.socket.as_ref(), st.socket_mode.as_ref(), at)?,
        auth: match st.auth {
            None => None,
            Some(a) => Some(stats_auth(a, at)?),
        },
        state_file: st.state_file,
    })
}

fn validate_alerts(a: raw::Alerts, at: &Locator) -> Result<Alerts, ConfigError> {
    let url = a.webhook_url.get_ref().clone();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(at.at(
            &a.webhook_url,
            "alerts webhook_url must start with http:// or https://",
        ));
    }
    Ok(Alerts {
        webhook_url: url,
        coalesce: a.coalesce,
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
    let d = |v: Option<Duration>, default_ms: u64| v.unwrap_or(Duration::from_millis(default_ms));
    let interval = d(c.interval, 2000);
    let check = Check {
        kind,
        interval,
        fastinter: c.fastinter.unwrap_or(interval),
        downinter: c.downinter.unwrap_or(interval),
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
