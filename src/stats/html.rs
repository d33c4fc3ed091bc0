//! The dashboard: one table per listen (FRONTEND, servers, BACKEND), HAProxy's column
//! groups and row colours, admin buttons when credentials are configured. Self-contained:
//! inline CSS, no script, no asset from anywhere.

use std::fmt::Write as _;
use std::time::Duration;

use super::{ListenSnap, ServerSnap, Snapshot};

/// What the page needs besides the snapshot.
pub struct Page<'a> {
    pub uri: &'a str,
    pub refresh: Duration,
    /// Show admin forms (credentials are configured).
    pub admin: bool,
    /// Result of the last admin action, shown once (`;st=DONE`).
    pub notice: Option<&'a str>,
    /// The other nodes of the pair: (name, url, status).
    pub peers: Vec<(String, String, String)>,
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

const STYLE: &str = r#"
body { font-family: Helvetica, Arial, sans-serif; font-size: 13px; margin: 12px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px 0; }
.info { margin-bottom: 12px; color: #444; }
.error { background: #ff9090; padding: 6px; margin-bottom: 10px; }
.notice { background: #c0ffc0; padding: 6px; margin-bottom: 10px; }
table { border-collapse: collapse; margin-bottom: 18px; }
th, td { border: 1px solid #999; padding: 2px 5px; text-align: right; white-space: nowrap; }
th { background: #20377f; color: #fff; font-weight: normal; }
th.group { background: #3050a0; text-align: center; }
td.name, td.status, td.chk { text-align: left; }
caption { text-align: left; font-weight: bold; font-size: 15px; padding: 4px 0; }
tr.frontend td, tr.backend td { background: #d0d8f0; font-weight: bold; }
tr.up td { background: #c0ffc0; }
tr.going-down td { background: #ffffa0; }
tr.going-up td { background: #ffd020; }
tr.down td { background: #ff9090; }
tr.drain td { background: #20a0ff; }
tr.maint td { background: #c07820; }
tr.backup td { background: #b0d0ff; }
tr.nocheck td { background: #e0e0e0; }
form { display: inline; margin: 0; }
button { font-size: 11px; padding: 0 4px; }
input.w { width: 3.5em; font-size: 11px; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 4px; border: 1px solid #999; }
"#;

pub fn render(s: &Snapshot, page: &Page) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let refresh = page.refresh.as_secs().max(1);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{refresh};url={uri}\">\
         <title>pglb statistics</title><style>{STYLE}</style></head><body>\n",
        uri = esc(page.uri)
    );
    let _ = writeln!(
        h,
        "<h1>pglb statistics</h1><div class=\"info\">version {} &middot; pid {} &middot; uptime {} &middot; \
         current connections {} / max {} &middot; refresh {}s &middot; <a href=\"{uri};csv\">CSV</a> &middot; \
         <a href=\"/metrics\">metrics</a></div>",
        esc(s.version),
        s.pid,
        human_duration(s.uptime_secs),
        s.current_conns,
        s.maxconn,
        refresh,
        uri = esc(page.uri)
    );
    if let Some(err) = &s.reload_error {
        let _ = writeln!(
            h,
            "<div class=\"error\">Last configuration reload failed: {}</div>",
            esc(err)
        );
    }
    if let Some(n) = page.notice {
        let _ = writeln!(h, "<div class=\"notice\">{}</div>", esc(n));
    }
    h.push_str(
        "<div class=\"legend\"><span style=\"background:#c0ffc0\">up</span><span style=\"background:#ffffa0\">going down</span>\
         <span style=\"background:#ffd020\">going up</span><span style=\"background:#ff9090\">down</span>\
         <span style=\"background:#20a0ff\">drain</span><span style=\"background:#c07820\">maintenance</span>\
         <span style=\"background:#b0d0ff\">backup</span><span style=\"background:#e0e0e0\">no check</span></div><br>\n",
    );
    for l in &s.listens {
        listen_table(&mut h, l, page);
    }
    peers_table(&mut h, &page.peers);
    h.push_str("</body></html>\n");
    h
}

/// The pair's other nodes and whether operator actions reach them.
fn peers_table(h: &mut String, peers: &[(String, String, String)]) {
    if peers.is_empty() {
        return;
    }
    h.push_str("<table id=\"peers\"><caption>Peers (operator actions are shared)</caption>\n<tr><th>Peer</th><th>URL</th><th>Status</th></tr>\n");
    for (name, url, status) in peers {
        let class = if status.starts_with("reachable") {
            "up"
        } else {
            "down"
        };
        let _ = writeln!(
            h,
            "<tr class=\"{class}\" id=\"peer-{n}\"><td>{n}</td><td>{u}</td><td>{st}</td></tr>",
            n = esc(name),
            u = esc(url),
            st = esc(status)
        );
    }
    h.push_str("</table>\n");
}

fn listen_table(h: &mut String, l: &ListenSnap, page: &Page) {
    let _ = write!(
        h,
        "<table id=\"listen-{name}\"><caption>{name} &mdash; bind {bind}, balance {algo}{tls}{limited}</caption>\n\
         <tr><th class=\"group\"></th><th class=\"group\" colspan=\"3\">Queue</th><th class=\"group\" colspan=\"2\">Session rate</th>\
         <th class=\"group\" colspan=\"6\">Sessions</th><th class=\"group\" colspan=\"2\">Bytes</th><th class=\"group\">Denied</th>\
         <th class=\"group\" colspan=\"2\">Errors</th><th class=\"group\" colspan=\"2\">Warnings</th><th class=\"group\" colspan=\"8\">Server</th>{admin_head}</tr>\n\
         <tr><th></th><th>Cur</th><th>Max</th><th>Limit</th><th>Cur</th><th>Max</th><th>Cur</th><th>Max</th><th>Limit</th><th>Total</th>\
         <th>LbTot</th><th>Last</th><th>In</th><th>Out</th><th>Req</th><th>Req</th><th>Conn</th><th>Retr</th><th>Redis</th>\
         <th>Status</th><th>LastChk</th><th>Wght</th><th>Act</th><th>Bck</th><th>Chk</th><th>Dwn</th><th>Dwntme</th>{admin_sub}</tr>\n",
        name = esc(&l.name),
        bind = esc(&l.bind),
        algo = l.balance,
        tls = if l.tls_terminated {
            ", TLS terminated"
        } else {
            ", TLS passed through (cancels of TLS clients: best effort)"
        },
        limited = if l.cancels_limited > 0 {
            format!(
                ", {} unknown-key cancels dropped by the rate limit",
                l.cancels_limited
            )
        } else {
            String::new()
        },
        admin_head = if page.admin {
            "<th class=\"group\">Admin</th>"
        } else {
            ""
        },
        admin_sub = if page.admin { "<th></th>" } else { "" },
    );
    let _ = writeln!(
        h,
        "<tr class=\"frontend\"><td class=\"name\">Frontend</td><td></td><td></td><td></td><td>{}</td><td>{}</td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td></td><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td></td><td></td><td></td><td class=\"status\">OPEN</td><td></td><td></td><td></td><td></td><td></td><td></td><td></td>{}</tr>",
        l.rate,
        l.rate_max,
        l.scur,
        l.smax,
        l.slim,
        l.stot,
        bytes(l.bin),
        bytes(l.bout),
        l.denied,
        l.ereq,
        if page.admin { "<td></td>" } else { "" },
    );
    for s in &l.servers {
        server_row(h, l, s, page);
    }
    let sum = |f: fn(&ServerSnap) -> u64| l.servers.iter().map(f).sum::<u64>();
    let act = l.servers.iter().filter(|s| !s.backup && s.up).count();
    let bck = l.servers.iter().filter(|s| s.backup && s.up).count();
    let _ = write!(
        h,
        "<tr class=\"backend\"><td class=\"name\">Backend</td><td>{}</td><td>{}</td><td></td><td></td><td></td><td>{}</td>\
         <td></td><td>{}</td><td>{}</td><td>{}</td><td></td><td>{}</td><td>{}</td><td></td><td></td><td>{}</td><td>{}</td><td>{}</td>\
         <td class=\"status\">{}</td><td></td><td></td><td>{act}</td><td>{bck}</td><td></td><td>{}</td><td></td>{}</tr>\n</table>\n",
        l.qcur,
        l.qmax,
        l.servers.iter().map(|s| s.scur).sum::<usize>(),
        l.slim,
        sum(|s| s.stot),
        sum(|s| s.stot),
        bytes(sum(|s| s.bin)),
        bytes(sum(|s| s.bout)),
        sum(|s| s.econ),
        sum(|s| s.wretr),
        sum(|s| s.wredis),
        if l.backend_up() { "UP" } else { "DOWN" },
        sum(|s| s.chkdown),
        if page.admin { "<td></td>" } else { "" },
    );
}

/// The operator's buttons for one server (only with admin enabled).
fn admin_cell(h: &mut String, l: &ListenSnap, s: &ServerSnap, page: &Page) {
    let _ = write!(
        h,
        "<td><form method=\"post\" action=\"{uri}\"><input type=\"hidden\" name=\"b\" value=\"{listen}\">\
         <input type=\"hidden\" name=\"s\" value=\"{name}\">\
         <button name=\"action\" value=\"ready\">Ready</button><button name=\"action\" value=\"drain\">Drain</button>\
         <button name=\"action\" value=\"maint\">Maint</button>\
         <input class=\"w\" name=\"weight\" value=\"{weight}\"><button name=\"action\" value=\"weight\">Set weight</button></form></td>",
        uri = esc(page.uri),
        listen = esc(&l.name),
        name = esc(&s.name),
        weight = s.weight,
    );
}

/// The LastChk cell: the last result and how long it took, details on hover.
fn last_check_cell(s: &ServerSnap) -> String {
    match &s.check {
        Some(c) => {
            let code = c
                .code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            let detail = if c.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", c.detail)
            };
            format!(
                "<span title=\"{} ({}), {}ms, {}s ago\">{}{} in {}ms{}</span>",
                esc(c.description),
                esc(s.check_kind),
                c.duration_ms,
                c.age,
                esc(c.status),
                esc(&code),
                c.duration_ms,
                esc(&detail)
            )
        }
        None if s.checked => "INI".into(),
        None => String::new(),
    }
}

fn server_row(h: &mut String, l: &ListenSnap, s: &ServerSnap, page: &Page) {
    let last_chk = last_check_cell(s);
    let checked = |v: String| if s.checked { v } else { String::new() };
    let status = if s.checked || s.status != "no check" {
        format!("{} {}", human_duration(s.lastchg), esc(&s.status))
    } else {
        esc(&s.status)
    };
    let _ = write!(
        h,
        "<tr class=\"{class}\" id=\"server-{listen}-{name}\" data-status=\"{status_attr}\"><td class=\"name\" title=\"{addr}\">{name}</td>\
         <td>0</td><td>0</td><td></td><td>{rate}</td><td>{rate_max}</td><td>{scur}</td><td>{smax}</td><td>{slim}</td><td>{stot}</td>\
         <td>{stot}</td><td>{last}</td><td>{bin}</td><td>{bout}</td><td></td><td></td><td>{econ}</td><td>{wretr}</td><td>{wredis}</td>\
         <td class=\"status\">{status}</td><td class=\"chk\">{last_chk}</td><td>{weight}</td><td>{act}</td><td>{bck}</td>\
         <td>{chkfail}</td><td>{chkdown}</td><td>{downtime}</td>",
        class = s.state_class(),
        listen = esc(&l.name),
        name = esc(&s.name),
        status_attr = esc(&s.status),
        addr = esc(&s.addr),
        rate = s.rate,
        rate_max = s.rate_max,
        scur = s.scur,
        smax = s.smax,
        slim = if s.slim > 0 {
            s.slim.to_string()
        } else {
            String::new()
        },
        stot = s.stot,
        last = s.lastsess.map(human_duration).unwrap_or_default(),
        bin = bytes(s.bin),
        bout = bytes(s.bout),
        econ = s.econ,
        wretr = s.wretr,
        wredis = s.wredis,
        weight = s.weight,
        act = if s.backup { "-" } else { "Y" },
        bck = if s.backup { "Y" } else { "-" },
        // Check counters mean nothing for a server that is not checked.
        chkfail = checked(s.chkfail.to_string()),
        chkdown = checked(s.chkdown.to_string()),
        downtime = checked(human_duration(s.downtime)),
    );
    if page.admin {
        admin_cell(h, l, s, page);
    }
    h.push_str("</tr>\n");
}
