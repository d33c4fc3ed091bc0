//! The stats HTTP server (hyper): dashboard, CSV, metrics, health and admin actions.
//!
//! | request | answer |
//! |---|---|
//! | `GET {uri}` | HTML dashboard |
//! | `GET {uri};csv`, `GET {uri}?csv` | HAProxy CSV |
//! | `GET /metrics` | Prometheus text |
//! | `GET /health` (or `HEAD`) | 200 while serving, 503 when stopping (keepalived: alive) |
//! | `GET /health?servers` | 200 while every listen has a usable server (keepalived: priority) |
//! | `POST {uri}` form `b`, `s`, `action`[, `weight`] | admin action, 303 back (Basic auth) |
//! | `GET /api/servers` | JSON state of every server |
//! | `POST /api/servers/{listen}/{server}` JSON `{"action": …, "weight": …}` | admin action (Basic auth) |

//!
//! Traffic on this port cannot starve anything else: health checks run on their own
//! thread, at most [`MAX_CONNECTIONS`] connections get full service (beyond that a
//! connection may ask `/health` once, then it is closed), a connection serves at most
//! [`MAX_REQUESTS`] requests, and the pages that render the whole state are paced
//! ([`RENDERS_PER_SECOND`]), so a flood waits instead of burning the main thread.
//! `/health` is never paced. One source address gets at most
//! [`MAX_CONNECTIONS_PER_SOURCE`] of the full-service connections and
//! [`RENDERS_PER_SOURCE`] places in the render queue: a flood from one host waits behind
//! itself, and an operator elsewhere still gets the dashboard.
//!
//! Admin actions are taken only from the dashboard's own origin (a browser with cached
//! credentials visiting another site must not be able to drain servers): a request whose
//! `Origin`, `Referer` or `Sec-Fetch-Site` shows another site is refused (403), and the
//! JSON API takes only `application/json` (which a cross-site form cannot send).

// Handlers return early with a ready response as their error; its size does not matter
// at one per request.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HOST, LOCATION, ORIGIN,
    REFERER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::admin::{self, Action, AdminError};
use crate::config;
use crate::peers;
use crate::state::Process;
use crate::stats::{self, html};

/// Largest request body accepted (admin forms and JSON are tiny).
const MAX_BODY: usize = 16 * 1024;
/// Listen backlog of the stats port: a burst of connections must not fill it, or the
/// kernel drops keepalived's probe (retried only after a second, past its timeout).
pub const BACKLOG: u32 = 4096;
/// Connections served in full at once; more are answered `/health` only.
pub const MAX_CONNECTIONS: usize = 256;
/// Full-service connections one source address may hold.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = MAX_CONNECTIONS / 4;
/// Renders one source address may have waiting or running at once.
pub const RENDERS_PER_SOURCE: usize = 4;
/// Requests one keep-alive connection may make before it is closed.
pub const MAX_REQUESTS: usize = 100;
/// Renders of the whole state (dashboard, CSV, metrics, JSON) per second beyond a burst.
pub const RENDERS_PER_SECOND: u32 = 50;

/// What every request handler shares.
pub struct Context {
    pub cfg: config::Stats,
    pub process: Arc<Process>,
    /// The other nodes of the pair: operator actions go to them too.
    pub peers: Arc<peers::Peers>,
    connections: Arc<Semaphore>,
    sources: Arc<Sources>,
    renders: Pacer,
}

impl Context {
    pub fn new(cfg: config::Stats, process: Arc<Process>, peers: Arc<peers::Peers>) -> Self {
        Context {
            cfg,
            process,
            peers,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            sources: Arc::default(),
            renders: Pacer::new(RENDERS_PER_SECOND),
        }
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "stats accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let ctx = Arc::clone(&ctx);
        let full = Sources::admit(&ctx.sources, peer.ip()).and_then(|share| {
            let permit = Arc::clone(&ctx.connections).try_acquire_owned().ok()?;
            Some((share, permit))
        });
        tokio::spawn(async move {
            let served = AtomicUsize::new(0);
            let lite = full.is_none();
            let service = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                let n = served.fetch_add(1, Relaxed) + 1;
                async move {
                    let mut r = if lite {
                        over_capacity(&ctx, &req)
                    } else {
                        handle(&ctx, req, peer).await
                    };
                    if lite || n >= MAX_REQUESTS {
                        r.headers_mut().insert(CONNECTION, hv("close"));
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let idle_limit = if lite { 2 } else { 10 };
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(idle_limit))
                .serve_connection(TokioIo::new(stream), service);
            // Idle keep-alive connections of browsers are bounded too.
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(300), conn).await {
                debug!(client = %peer, error = %e, "stats connection ended with an error");
            }
            drop(full);
        });
    }
}

/// A connection beyond [`MAX_CONNECTIONS`]: `/health` is answered (keepalived must get
/// its answer however busy the port is), anything else is told to come back.
fn over_capacity(ctx: &Context, req: &Request<Incoming>) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/health") => {
            let servers = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .any(|q| q == "servers");
            health(ctx, servers)
        }
        _ => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "stats server busy: too many connections",
        ),
    }
}

/// What each source address holds of the port's full service: its connections, and
/// its places in the render queue (shared by those connections).
#[derive(Default)]
struct Sources(std::sync::Mutex<HashMap<IpAddr, Source>>);

struct Source {
    connections: usize,
    renders: Arc<Semaphore>,
}

/// One full-service connection of a source address, given back on drop.
struct Share {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    /// A full-service place for a connection from `ip`, unless it holds its share.
    fn admit(sources: &Arc<Sources>, ip: IpAddr) -> Option<Share> {
        let mut all = crate::counters::lock(&sources.0);
        let source = all.entry(ip).or_insert_with(|| Source {
            connections: 0,
            renders: Arc::new(Semaphore::new(RENDERS_PER_SOURCE)),
        });
        if source.connections >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        source.connections += 1;
        Some(Share {
            sources: Arc::clone(sources),
            ip,
        })
    }

    /// Waits for one of `ip`'s places in the render queue (held until the render is
    /// done). `ip` has a full-service connection while it asks, so its entry exists.
    async fn render_place(&self, ip: IpAddr) -> Option<OwnedSemaphorePermit> {
        let places = crate::counters::lock(&self.0)
            .get(&ip)
            .map(|s| Arc::clone(&s.renders))?;
        places.acquire_owned().await.ok()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut all = crate::counters::lock(&self.sources.0);
        if let Some(source) = all.get_mut(&self.ip) {
            source.connections -= 1;
            if source.connections == 0 {
                all.remove(&self.ip);
            }
        }
    }
}

/// Paces renders of the whole state: a burst of twice the rate, then one every
/// 1/rate seconds, oldest waiter first. Waiting costs nothing while the flood lasts.
struct Pacer {
    turn: Semaphore,
    bucket: std::sync::Mutex<(f64, Instant)>,
    rate: u32,
}

impl Pacer {
    fn new(rate: u32) -> Self {
        Pacer {
            turn: Semaphore::new(1),
            bucket: std::sync::Mutex::new((f64::from(rate) * 2.0, Instant::now())),
            rate,
        }
    }

    async fn wait(&self) {
        let Ok(_turn) = self.turn.acquire().await else {
            return;
        };
        let rate = f64::from(self.rate);
        let wait = {
            let mut b = crate::counters::lock(&self.bucket);
            let now = Instant::now();
            b.0 = (b.0 + now.saturating_duration_since(b.1).as_secs_f64() * rate).min(rate * 2.0);
            b.1 = now;
            b.0 -= 1.0;
            (b.0 < 0.0).then(|| Duration::from_secs_f64(-b.0 / rate))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, hv(content_type));
    r.headers_mut().insert(CACHE_CONTROL, hv("no-cache"));
    r
}

fn hv(v: &str) -> hyper::header::HeaderValue {
    hyper::header::HeaderValue::from_str(v)
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static(""))
}

fn plain(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut b = body.into();
    b.push('\n');
    text(status, "text/plain; charset=utf-8", b)
}

fn json(status: StatusCode, value: serde_json::Value) -> Resp {
    text(status, "application/json", value.to_string())
}

async fn handle(ctx: &Context, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let uri = ctx.cfg.uri.as_str();
    // HAProxy's forms: `/stats;csv`, `/stats?csv`, `/stats?stats;csv`, `/stats/;csv`
    // (a monitoring agent appends `/;csv` to the configured URL).
    let on_page = path == uri
        || path
            .strip_prefix(uri)
            .is_some_and(|rest| rest == "/" || rest.starts_with(';') || rest.starts_with("/;"));
    // Held until the answer is rendered.
    let _place = match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/health") => {
            return health(ctx, query.split('&').any(|q| q == "servers"));
        }
        (&Method::GET, _) => {
            let place = ctx.sources.render_place(peer.ip()).await;
            ctx.renders.wait().await;
            place
        }
        _ => None,
    };
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let snap = stats::snapshot(&ctx.process);
            if stats::prometheus::wants_openmetrics(accept) {
                text(
                    StatusCode::OK,
                    stats::prometheus::CONTENT_TYPE,
                    stats::prometheus::render(snap),
                )
            } else {
                text(
                    StatusCode::OK,
                    stats::prometheus::TEXT_CONTENT_TYPE,
                    stats::prometheus::render_text(snap),
                )
            }
        }
        (&Method::GET, "/api/servers") => json(StatusCode::OK, servers_json(ctx)),
        (&Method::GET, "/api/peer/state") => match authorize(ctx, &req) {
            Ok(()) => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&peers::state(&ctx.peers, &ctx.process)).unwrap_or_default(),
            ),
            Err(r) => r,
        },
        (&Method::POST, "/api/peer/state") => {
            if let Err(r) = authorize(ctx, &req).and_then(|()| same_origin(&req)) {
                return r;
            }
            if let Err(r) = require_json(&req) {
                return r;
            }
            peer_state(ctx, req).await
        }
        (&Method::POST, p) if p.starts_with("/api/servers/") => {
            if let Err(r) = authorize(ctx, &req).and_then(|()| same_origin(&req)) {
                return r;
            }
            if let Err(r) = require_json(&req) {
                return r;
            }
            api_action(ctx, req, peer).await
        }
        (&Method::GET, _) if on_page => stats_page(ctx, &path[uri.len()..], &query),
        (&Method::POST, p) if p == uri => {
            if let Err(r) = authorize(ctx, &req).and_then(|()| same_origin(&req)) {
                return r;
            }
            form_action(ctx, req, peer).await
        }
        (&Method::GET, _) => plain(
            StatusCode::NOT_FOUND,
            format!("not found; the dashboard is at {uri}"),
        ),
        _ => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

/// The dashboard or, with the `csv` option (`;csv`, `?csv`, `?stats;csv`, `/;csv`), the
/// CSV. `rest` is the path after the stats uri.
fn stats_page(ctx: &Context, rest: &str, query: &str) -> Resp {
    let uri = ctx.cfg.uri.as_str();
    let options: Vec<&str> = rest.split(';').chain(query.split(['&', ';'])).collect();
    let snap = stats::snapshot(&ctx.process);
    if options.contains(&"csv") {
        return text(
            StatusCode::OK,
            "text/csv; charset=utf-8",
            stats::csv::render(&snap),
        );
    }
    let notice = options
        .iter()
        .find_map(|o| o.strip_prefix("st="))
        .map(|st| match st {
            "DONE" => "Action processed successfully.",
            _ => "The action could not be processed.",
        });
    let page = html::Page {
        uri,
        refresh: ctx.cfg.refresh,
        admin: ctx.cfg.auth.is_some(),
        notice,
        peers: peer_rows(ctx),
    };
    text(
        StatusCode::OK,
        "text/html; charset=utf-8",
        html::render(&snap, &page),
    )
}

/// `/health`: 200 while pglb serves (it accepts clients and answers them, with an
/// error if it has no server); 503 once it is stopping. keepalived's "alive" check.
/// `/health?servers`: 200 while every listen has a server that may take new clients (UP,
/// neither drained nor in maintenance); 503 naming the first listen without one.
/// keepalived's "has servers" check, which lowers a node's priority instead of moving
/// the VIP: with every PgBouncer down one node keeps the VIP and answers clients with
/// pglb's error at once. Reads a few atomics per server (no snapshot): it must stay cheap.
fn health(ctx: &Context, servers: bool) -> Resp {
    if !ctx.process.serving.load(Relaxed) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "DOWN: pglb is shutting down",
        );
    }
    let listens = ctx.process.listens();
    let takes_clients = |l: &crate::state::ListenState| l.servers().iter().any(|s| s.usable());
    if servers && let Some(l) = listens.iter().find(|l| !takes_clients(l)) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("DOWN: listen '{}' has no server available", l.name),
        );
    }
    if let Some(err) = crate::counters::lock(&ctx.process.reload_error).as_ref() {
        return plain(StatusCode::OK, format!("UP (last reload failed: {err})"));
    }
    let without: Vec<&str> = listens
        .iter()
        .filter(|l| !takes_clients(l))
        .map(|l| l.name.as_str())
        .collect();
    if without.is_empty() {
        plain(
            StatusCode::OK,
            format!("UP: {} listen(s) serving", listens.len()),
        )
    } else {
        plain(
            StatusCode::OK,
            format!(
                "UP: serving; no server available for listen(s) {}",
                without.join(", ")
            ),
        )
    }
}

/// Refuses a request that a browser sent on behalf of another site. Browsers send
/// `Origin` on every cross-origin POST (and `Sec-Fetch-Site`); tools like curl send
/// neither, and are let through.
fn same_origin(req: &Request<Incoming>) -> Result<(), Resp> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header(HOST).unwrap_or("");
    let authority = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        rest.split('/').next().unwrap_or("").to_ascii_lowercase()
    };
    let foreign = match (header(ORIGIN), header(REFERER)) {
        (Some("null"), _) => true,
        (Some(origin), _) => authority(origin) != host.to_ascii_lowercase(),
        (None, Some(referer)) => authority(referer) != host.to_ascii_lowercase(),
        (None, None) => false,
    } || req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s.eq_ignore_ascii_case("cross-site"));
    if foreign {
        warn!(
            origin = header(ORIGIN).unwrap_or("-"),
            host, "admin action from another origin refused"
        );
        return Err(plain(
            StatusCode::FORBIDDEN,
            "admin actions are accepted only from the dashboard's own origin",
        ));
    }
    Ok(())
}

/// The JSON endpoints take only `application/json`, which a cross-site form cannot send.
fn require_json(req: &Request<Incoming>) -> Result<(), Resp> {
    if is_json(req) {
        return Ok(());
    }
    Err(json(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        serde_json::json!({"error": "send it as Content-Type: application/json"}),
    ))
}

fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Basic auth, compared in constant time. Without `[stats.auth]` admin is disabled.
fn authorize(ctx: &Context, req: &Request<Incoming>) -> Result<(), Resp> {
    let Some(auth) = &ctx.cfg.auth else {
        return Err(plain(
            StatusCode::FORBIDDEN,
            "admin actions are disabled: configure [stats.auth]",
        ));
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, token)| token)
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .unwrap_or_default();
    let expected = format!("{}:{}", auth.user, auth.password.expose());
    if constant_time_eq(&given, expected.as_bytes()) {
        return Ok(());
    }
    let mut r = plain(StatusCode::UNAUTHORIZED, "authentication required");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, hv("Basic realm=\"pglb admin\""));
    Err(r)
}

/// Compares without an early exit, so timing does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large or unreadable",
        )),
    }
}

fn run_action(
    ctx: &Context,
    b: &str,
    s: &str,
    action: Action,
    peer: SocketAddr,
) -> Result<String, AdminError> {
    let sentence = admin::run(
        &ctx.process,
        &ctx.peers,
        ctx.cfg.state_file.as_deref(),
        b,
        s,
        action,
    )?;
    debug!(client = %peer, "{sentence}");
    Ok(sentence)
}

/// HAProxy's admin form: `b` (listen), `s` (server), `action`, and `weight` for weights.
async fn form_action(ctx: &Context, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let raw = match body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&raw).into_owned().collect();
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let result = match (get("b"), get("s"), get("action")) {
        (Some(b), Some(s), Some(action)) => {
            Action::parse(action, get("weight")).and_then(|a| run_action(ctx, b, s, a, peer))
        }
        _ => Err(AdminError::Invalid(
            "the form needs fields b, s and action".into(),
        )),
    };
    let status = match &result {
        Ok(_) => "DONE",
        Err(e) => {
            warn!(client = %peer, error = %e, "admin action refused");
            "ERRP"
        }
    };
    let mut r = plain(
        StatusCode::SEE_OTHER,
        result.unwrap_or_else(|e| e.to_string()),
    );
    r.headers_mut()
        .insert(LOCATION, hv(&format!("{};st={status}", ctx.cfg.uri)));
    r
}

/// `POST /api/servers/{listen}/{server}` with `{"action": "drain"}` or `{"weight": 50}`.
async fn api_action(ctx: &Context, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches("/api/servers/").split('/');
    let (Some(b), Some(s), None) = (parts.next(), parts.next(), parts.next()) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "use /api/servers/{listen}/{server}"}),
        );
    };
    let (b, s) = (b.to_owned(), s.to_owned());
    let raw = match body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("invalid JSON: {e}")}),
            );
        }
    };
    let weight = v.get("weight").map(|w| w.to_string());
    let action = match v.get("action").and_then(|a| a.as_str()) {
        Some(a) => Action::parse(a, weight.as_deref()),
        None if weight.is_some() => Action::parse("weight", weight.as_deref()),
        None => Err(AdminError::Invalid(
            "give \"action\" (ready, drain, maint) or \"weight\"".into(),
        )),
    };
    match action.and_then(|a| run_action(ctx, &b, &s, a, peer)) {
        Ok(sentence) => json(StatusCode::OK, serde_json::json!({"result": sentence})),
        Err(e) => json(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// A peer's operator state: what is newer than ours is applied.
async fn peer_state(ctx: &Context, req: Request<Incoming>) -> Resp {
    let raw = match body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match serde_json::from_slice::<peers::StateMessage>(&raw) {
        Ok(msg) => {
            let applied = peers::merge(&ctx.peers, &ctx.process, &msg);
            json(StatusCode::OK, serde_json::json!({"applied": applied}))
        }
        Err(e) => json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": format!("invalid peer state: {e}")}),
        ),
    }
}

/// The dashboard's peers table: name, URL, status.
fn peer_rows(ctx: &Context) -> Vec<(String, String, String)> {
    ctx.peers
        .list
        .iter()
        .map(|p| {
            let s = crate::counters::lock(&p.status).clone();
            let status = match s.reachable {
                None => "not contacted yet".to_owned(),
                Some(true) => "reachable: operator actions shared".to_owned(),
                Some(false) => format!(
                    "UNREACHABLE: {} (retrying; actions still apply here)",
                    s.error
                ),
            };
            (p.cfg.name.clone(), p.cfg.url.clone(), status)
        })
        .collect()
}

fn servers_json(ctx: &Context) -> serde_json::Value {
    let snap = stats::snapshot(&ctx.process);
    let listens: Vec<serde_json::Value> = snap
        .listens
        .iter()
        .map(|l| {
            let servers: Vec<serde_json::Value> = l
                .servers
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "addr": s.addr,
                        "status": s.status,
                        "admin": s.admin.as_str(),
                        "weight": s.weight,
                        "backup": s.backup,
                        "sessions": s.scur,
                        "check_status": s.check.as_ref().map(|c| c.status),
                        "check_detail": s.check.as_ref().map(|c| c.detail.clone()),
                    })
                })
                .collect();
            serde_json::json!({"name": l.name, "sessions": l.scur, "servers": servers})
        })
        .collect();
    serde_json::json!({"listens": listens})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_address_gets_its_share_of_full_service_and_leaves_no_entry_behind() {
        let sources = Arc::new(Sources::default());
        let (flood, other): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_SOURCE)
            .map(|_| Sources::admit(&sources, flood).expect("within its share"))
            .collect();
        assert!(Sources::admit(&sources, flood).is_none(), "past its share");
        let operator = Sources::admit(&sources, other).expect("another address");
        let places: Vec<_> = render_places(&sources, flood).await;
        assert_eq!(places.len(), RENDERS_PER_SOURCE);
        let waiting = tokio::time::timeout(Duration::from_millis(50), sources.render_place(flood));
        assert!(
            waiting.await.is_err(),
            "a fifth render waits for its own address"
        );
        assert!(
            sources.render_place(other).await.is_some(),
            "not for others"
        );
        drop((held, operator, places));
        assert!(crate::counters::lock(&sources.0).is_empty());
    }

    async fn render_places(sources: &Sources, ip: IpAddr) -> Vec<OwnedSemaphorePermit> {
        let mut places = Vec::new();
        for _ in 0..RENDERS_PER_SOURCE {
            places.push(sources.render_place(ip).await.expect("a place"));
        }
        places
    }
}
