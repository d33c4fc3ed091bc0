//! The stats HTTP server (hyper): dashboard, CSV, metrics, health and admin actions.
//!
//! | request | answer |
//! |---|---|
//! | `GET {uri}` | HTML dashboard |
//! | `GET {uri};csv`, `GET {uri}?csv` | HAProxy CSV |
//! | `GET /metrics` | Prometheus text |
//! | `GET /health` | 200, or 503 with the reason (for keepalived) |
//! | `POST {uri}` form `b`, `s`, `action`[, `weight`] | admin action, 303 back (Basic auth) |
//! | `GET /api/servers` | JSON state of every server |
//! | `POST /api/servers/{listen}/{server}` JSON `{"action": …, "weight": …}` | admin action (Basic auth) |

// Handlers return early with a ready response as their error; its size does not matter
// at one per request.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::admin::{self, Action};
use crate::config;
use crate::state::Process;
use crate::stats::{self, html};

/// Largest request body accepted (admin forms and JSON are tiny).
const MAX_BODY: usize = 16 * 1024;

/// What every request handler shares.
pub struct Context {
    pub cfg: config::Stats,
    pub process: Arc<Process>,
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
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                async move { Ok::<_, Infallible>(handle(&ctx, req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            // Idle keep-alive connections of browsers are bounded too.
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(300), conn).await {
                debug!(client = %peer, error = %e, "stats connection ended with an error");
            }
        });
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
    let on_page = path == uri || path.starts_with(&format!("{uri};"));
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => health(ctx),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            stats::prometheus::CONTENT_TYPE,
            stats::prometheus::render(ctx.process.snapshot()),
        ),
        (&Method::GET, "/api/servers") => json(StatusCode::OK, servers_json(ctx)),
        (&Method::POST, p) if p.starts_with("/api/servers/") => {
            if let Err(r) = authorize(ctx, &req) {
                return r;
            }
            api_action(ctx, req, peer).await
        }
        (&Method::GET, _) if on_page => {
            let options: Vec<&str> = path[uri.len()..]
                .split(';')
                .chain(query.split('&'))
                .collect();
            if options.contains(&"csv") {
                text(
                    StatusCode::OK,
                    "text/csv; charset=utf-8",
                    stats::csv::render(&ctx.process.snapshot()),
                )
            } else {
                let notice =
                    options
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
                };
                text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    html::render(&ctx.process.snapshot(), &page),
                )
            }
        }
        (&Method::POST, p) if p == uri => {
            if let Err(r) = authorize(ctx, &req) {
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

/// 200 while serving with at least one UP server per listen; 503 with the reason otherwise.
fn health(ctx: &Context) -> Resp {
    if !ctx.process.serving.load(Relaxed) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "DOWN: pglb is shutting down",
        );
    }
    let snap = ctx.process.snapshot();
    if let Some(l) = snap.listens.iter().find(|l| !l.backend_up()) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("DOWN: listen '{}' has no server available", l.name),
        );
    }
    if let Some(err) = &snap.reload_error {
        return plain(StatusCode::OK, format!("UP (last reload failed: {err})"));
    }
    plain(
        StatusCode::OK,
        format!("UP: {} listen(s) serving", snap.listens.len()),
    )
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
        .and_then(|v| v.strip_prefix("Basic "))
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
) -> Result<String, String> {
    let listens = ctx.process.listens();
    let sentence = admin::apply(&listens, b, s, action)?;
    debug!(client = %peer, "{sentence}");
    if let Some(path) = &ctx.cfg.state_file
        && let Err(e) = admin::save(path, &listens)
    {
        warn!(file = %path.display(), error = %e, "cannot write the admin state file");
    }
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
        _ => Err("the form needs fields b, s and action".into()),
    };
    let status = match &result {
        Ok(_) => "DONE",
        Err(e) => {
            warn!(client = %peer, error = %e, "admin action refused");
            "ERRP"
        }
    };
    let mut r = plain(StatusCode::SEE_OTHER, result.unwrap_or_else(|e| e));
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
        None => Err("give \"action\" (ready, drain, maint) or \"weight\"".into()),
    };
    match action.and_then(|a| run_action(ctx, &b, &s, a, peer)) {
        Ok(sentence) => json(StatusCode::OK, serde_json::json!({"result": sentence})),
        Err(e) => json(StatusCode::BAD_REQUEST, serde_json::json!({"error": e})),
    }
}

fn servers_json(ctx: &Context) -> serde_json::Value {
    let snap = ctx.process.snapshot();
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
