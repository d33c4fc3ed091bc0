//! `/metrics` in OpenMetrics text format, through the prometheus-client crate, or in
//! Prometheus' classic text format (0.0.4) for clients that do not ask for OpenMetrics
//! (promtool, older agents): negotiated by `Accept`, as the Prometheus client libraries do.
//! Names follow HAProxy's built-in exporter with the `pglb_` prefix and `listen`/`server`
//! labels instead of `proxy`/`server` (mapping in the README).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{ListenSnap, ServerSnap, Snapshot};

/// Content type of [`render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`render_text`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Does an `Accept` header ask for OpenMetrics?
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let openmetrics = fields.next() == Some("application/openmetrics-text");
            let refused = fields.any(|f| f.replace(' ', "") == "q=0");
            openmetrics && !refused
        })
    })
}

type Labels = Vec<(&'static str, String)>;

/// Exposes one snapshot: a registry is built per scrape, so values are never stale.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    rows: Vec<(Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    match kind {
        Kind::Gauge => {
            let mut m =
                enc.encode_descriptor(name, help, None, ConstGauge::new(0f64).metric_type())?;
            for (labels, v) in &rows {
                if labels.is_empty() {
                    ConstGauge::new(*v).encode(m)?;
                    break;
                }
                ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
            }
        }
        Kind::Counter => {
            let mut m =
                enc.encode_descriptor(name, help, None, ConstCounter::new(0f64).metric_type())?;
            for (labels, v) in &rows {
                ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
            }
        }
    }
    Ok(())
}

fn listen_labels(l: &ListenSnap) -> Labels {
    vec![("listen", l.name.clone())]
}

fn server_labels(l: &ListenSnap, s: &ServerSnap) -> Labels {
    vec![("listen", l.name.clone()), ("server", s.name.clone())]
}

/// A metric family with one series per listen or per server: name, help, type, value.
type Simple<T> = (&'static str, &'static str, Kind, fn(&T) -> f64);

const LISTEN_FAMILIES: &[Simple<ListenSnap>] = &[
    (
        "pglb_listen_current_sessions",
        "Client sessions open on the listen.",
        Kind::Gauge,
        |l| l.scur as f64,
    ),
    (
        "pglb_listen_max_sessions",
        "Highest concurrent client sessions seen.",
        Kind::Gauge,
        |l| l.smax as f64,
    ),
    (
        "pglb_listen_limit_sessions",
        "Listen maxconn.",
        Kind::Gauge,
        |l| l.slim as f64,
    ),
    (
        "pglb_listen_sessions",
        "Client sessions admitted.",
        Kind::Counter,
        |l| l.stot as f64,
    ),
    (
        "pglb_listen_bytes_in",
        "Bytes from clients.",
        Kind::Counter,
        |l| l.bin as f64,
    ),
    (
        "pglb_listen_bytes_out",
        "Bytes to clients.",
        Kind::Counter,
        |l| l.bout as f64,
    ),
    (
        "pglb_listen_current_queue",
        "Clients waiting for a server slot.",
        Kind::Gauge,
        |l| l.qcur as f64,
    ),
    (
        "pglb_cancels_limited",
        "CancelRequests with a key pglb does not know, dropped by the rate limit.",
        Kind::Counter,
        |l| l.cancels_limited as f64,
    ),
];

const SERVER_FAMILIES: &[Simple<ServerSnap>] = &[
    (
        "pglb_server_up",
        "1 while the server's health is UP (or it is not checked), whatever the operator \
         state; pglb_server_status tells DRAIN and MAINT apart.",
        Kind::Gauge,
        |s| f64::from(u8::from(s.up)),
    ),
    (
        "pglb_server_check_duration_seconds",
        "Duration of the last check.",
        Kind::Gauge,
        |s| {
            s.check
                .as_ref()
                .map(|c| c.duration_ms as f64 / 1000.0)
                .unwrap_or(0.0)
        },
    ),
    (
        "pglb_server_current_sessions",
        "Sessions on the server now.",
        Kind::Gauge,
        |s| s.scur as f64,
    ),
    (
        "pglb_server_max_sessions",
        "Highest concurrent sessions seen.",
        Kind::Gauge,
        |s| s.smax as f64,
    ),
    (
        "pglb_server_sessions",
        "Sessions assigned to the server.",
        Kind::Counter,
        |s| s.stot as f64,
    ),
    (
        "pglb_server_bytes_in",
        "Bytes sent to the server.",
        Kind::Counter,
        |s| s.bin as f64,
    ),
    (
        "pglb_server_bytes_out",
        "Bytes received from the server.",
        Kind::Counter,
        |s| s.bout as f64,
    ),
    (
        "pglb_server_connection_errors",
        "Failed connection attempts.",
        Kind::Counter,
        |s| s.econ as f64,
    ),
    (
        "pglb_server_retry_warnings",
        "Connection retries after a failure.",
        Kind::Counter,
        |s| s.wretr as f64,
    ),
    (
        "pglb_server_redispatch_warnings",
        "Sessions moved to another server after a failure.",
        Kind::Counter,
        |s| s.wredis as f64,
    ),
    (
        "pglb_server_check_failures",
        "Failed health checks.",
        Kind::Counter,
        |s| s.chkfail as f64,
    ),
    (
        "pglb_server_check_up_down",
        "UP to DOWN transitions.",
        Kind::Counter,
        |s| s.chkdown as f64,
    ),
    (
        "pglb_server_downtime_seconds",
        "Time spent DOWN.",
        Kind::Counter,
        |s| s.downtime as f64,
    ),
    (
        "pglb_server_weight",
        "Effective weight.",
        Kind::Gauge,
        |s| f64::from(s.weight),
    ),
];

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_process(&mut enc, &self.0)?;
        encode_listens(&mut enc, &self.0)?;
        encode_servers(&mut enc, &self.0)
    }
}

fn encode_process(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), std::fmt::Error> {
    let one = |v: f64| vec![(vec![], v)];
    family(
        enc,
        "pglb_process_uptime_seconds",
        "Seconds since pglb started.",
        Kind::Gauge,
        one(s.uptime_secs as f64),
    )?;
    family(
        enc,
        "pglb_process_current_connections",
        "Client sessions open in the process.",
        Kind::Gauge,
        one(s.current_conns as f64),
    )?;
    let workers = s
        .worker_sessions
        .iter()
        .enumerate()
        .map(|(n, v)| (vec![("worker", n.to_string())], *v as f64))
        .collect();
    family(
        enc,
        "pglb_worker_current_sessions",
        "Client sessions running on each worker thread.",
        Kind::Gauge,
        workers,
    )?;
    family(
        enc,
        "pglb_process_max_connections",
        "Global maxconn.",
        Kind::Gauge,
        one(s.maxconn as f64),
    )?;
    family(
        enc,
        "pglb_process_last_reload_success",
        "1 when the last configuration reload succeeded (or none happened).",
        Kind::Gauge,
        one(if s.reload_error.is_some() { 0.0 } else { 1.0 }),
    )?;
    encode_kernel_relay(enc)
}

/// The kernel relay (`relay = "kernel"`): whether it is loaded, and what became of the
/// sessions at their hand-over.
fn encode_kernel_relay(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    use crate::kernel_relay::{COUNTS, get};
    use std::sync::atomic::Ordering::Relaxed;
    family(
        enc,
        "pglb_kernel_relay_available",
        "1 when the kernel relay is loaded and passed its self-test.",
        Kind::Gauge,
        vec![(vec![], if get().is_some() { 1.0 } else { 0.0 })],
    )?;
    let rows = [
        ("handed_over", &COUNTS.handed_over),
        ("stayed_in_user_space", &COUNTS.stayed),
        ("handed_back", &COUNTS.handed_back),
    ]
    .into_iter()
    .map(|(what, n)| (vec![("outcome", what.to_string())], n.load(Relaxed) as f64))
    .collect();
    family(
        enc,
        "pglb_kernel_relay_sessions",
        "Sessions of relay = \"kernel\" listens at their hand-over: handed to the kernel, \
         kept in user space (pipelining client, bytes in flight, map full), handed back \
         (drain, undeliverable data).",
        Kind::Counter,
        rows,
    )
}

fn encode_listens(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), std::fmt::Error> {
    for (name, help, kind, value) in LISTEN_FAMILIES {
        let rows = s
            .listens
            .iter()
            .map(|l| (listen_labels(l), value(l)))
            .collect();
        family(enc, name, help, *kind, rows)?;
    }
    let mut refusals = Vec::new();
    for l in &s.listens {
        for (reason, v) in [
            ("maxconn", l.denied),
            ("no_server", l.no_server),
            ("server_refused", l.server_refused),
            ("queue_timeout", l.queue_timeouts),
            ("bad_startup", l.ereq),
        ] {
            let mut labels = listen_labels(l);
            labels.push(("reason", reason.to_owned()));
            refusals.push((labels, v as f64));
        }
    }
    family(
        enc,
        "pglb_listen_refused",
        "Clients refused with an ErrorResponse, by reason.",
        Kind::Counter,
        refusals,
    )
}

fn encode_servers(enc: &mut DescriptorEncoder, s: &Snapshot) -> Result<(), std::fmt::Error> {
    let servers: Vec<(&ListenSnap, &ServerSnap)> = s
        .listens
        .iter()
        .flat_map(|l| l.servers.iter().map(move |srv| (l, srv)))
        .collect();
    let mut status = Vec::new();
    for (l, srv) in &servers {
        let current = match srv.status.as_str() {
            "MAINT" => "MAINT",
            "DRAIN" | "DRAIN (removed)" => "DRAIN",
            "no check" => "NOCHECK",
            _ if srv.up => "UP",
            _ => "DOWN",
        };
        for state in ["UP", "DOWN", "DRAIN", "MAINT", "NOCHECK"] {
            let mut labels = server_labels(l, srv);
            labels.push(("state", state.to_owned()));
            status.push((labels, if state == current { 1.0 } else { 0.0 }));
        }
    }
    family(
        enc,
        "pglb_server_status",
        "Current state of the server, one series per state (1 = current).",
        Kind::Gauge,
        status,
    )?;
    let check_status = servers
        .iter()
        .filter_map(|(l, srv)| {
            let c = srv.check.as_ref()?;
            let mut labels = server_labels(l, srv);
            labels.push(("code", c.status.to_owned()));
            Some((labels, 1.0))
        })
        .collect();
    family(
        enc,
        "pglb_server_check_status",
        "Last check status (HAProxy code in the label).",
        Kind::Gauge,
        check_status,
    )?;
    for (name, help, kind, value) in SERVER_FAMILIES {
        let rows = servers
            .iter()
            .map(|(l, srv)| (server_labels(l, srv), value(srv)))
            .collect();
        family(enc, name, help, *kind, rows)?;
    }
    Ok(())
}

/// Renders the snapshot as OpenMetrics text.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Renders the snapshot in Prometheus' classic text format: the OpenMetrics text with
/// counter families named by their `_total` series (so their HELP and TYPE match the
/// samples), and no `# UNIT` or `# EOF` lines.
pub fn render_text(snapshot: Snapshot) -> String {
    let open = render(snapshot);
    let mut counters: Vec<String> = Vec::new();
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.push(name.to_owned());
        }
    }
    let mut out = String::with_capacity(open.len() + 64 * counters.len());
    for line in open.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match header {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.iter().any(|c| c == name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiates_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
        assert!(!wants_openmetrics(None));
    }
}
