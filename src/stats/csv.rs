//! HAProxy's stats CSV (`GET /stats;csv`): the same header and column order (0–99) as
//! HAProxy 2.6+, the same row types and status strings, so tools written for HAProxy read
//! it unchanged. Columns that only make sense for HTTP stay empty.

use std::fmt::Write as _;

use super::{ListenSnap, ServerSnap, Snapshot};

/// HAProxy's column names, in order.
pub const COLUMNS: [&str; 100] = [
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
    "hanafail",
    "req_rate",
    "req_rate_max",
    "req_tot",
    "cli_abrt",
    "srv_abrt",
    "comp_in",
    "comp_out",
    "comp_byp",
    "comp_rsp",
    "lastsess",
    "last_chk",
    "last_agt",
    "qtime",
    "ctime",
    "rtime",
    "ttime",
    "agent_status",
    "agent_code",
    "agent_duration",
    "check_desc",
    "agent_desc",
    "check_rise",
    "check_fall",
    "check_health",
    "agent_rise",
    "agent_fall",
    "agent_health",
    "addr",
    "cookie",
    "mode",
    "algo",
    "conn_rate",
    "conn_rate_max",
    "conn_tot",
    "intercepted",
    "dcon",
    "dses",
    "wrew",
    "connect",
    "reuse",
    "cache_lookups",
    "cache_hits",
    "srv_icur",
    "src_ilim",
    "qtime_max",
    "ctime_max",
    "rtime_max",
    "ttime_max",
    "eint",
    "idle_conn_cur",
    "safe_conn_cur",
    "used_conn_cur",
    "need_conn_est",
    "uweight",
];

/// One CSV row being filled by column name.
struct Row([String; 100]);

impl Row {
    fn new() -> Self {
        Row(std::array::from_fn(|_| String::new()))
    }

    fn set(&mut self, column: &str, value: impl ToString) -> &mut Self {
        if let Some(i) = COLUMNS.iter().position(|c| *c == column) {
            self.0[i] = csv_field(&value.to_string());
        }
        self
    }

    fn write(&self, out: &mut String) {
        for field in &self.0 {
            out.push_str(field);
            out.push(',');
        }
        out.push('\n');
    }
}

/// Quotes a field only when it needs it (commas, quotes, newlines).
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}

pub fn render(s: &Snapshot) -> String {
    render_filtered(s, &Filter::ALL)
}

/// Which rows `show stat <iid> <type> <sid>` asks for (HAProxy's runtime API): a listen
/// by iid (-1: all), row types as a bit field (1 frontend, 2 backend, 4 server; -1: all),
/// a server by sid (-1: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub iid: Option<u32>,
    pub types: u8,
    pub sid: Option<u32>,
}

impl Filter {
    pub const ALL: Filter = Filter {
        iid: None,
        types: 7,
        sid: None,
    };

    fn wants(&self, iid: u32, kind: u8, sid: u32) -> bool {
        self.iid.is_none_or(|i| i == iid)
            && self.types & kind != 0
            && (kind != SERVER || self.sid.is_none_or(|s| s == sid))
    }
}

const FRONTEND: u8 = 1;
const BACKEND: u8 = 2;
const SERVER: u8 = 4;

/// The rows of the snapshot that `filter` selects, in HAProxy's order, with their type
/// letter, iid and sid.
fn rows(s: &Snapshot, filter: &Filter) -> Vec<(char, u32, u32, Row)> {
    let mut rows = Vec::new();
    for l in &s.listens {
        if filter.wants(l.iid, FRONTEND, 0) {
            rows.push(('F', l.iid, 0, frontend(l, s.pid)));
        }
        for srv in &l.servers {
            if filter.wants(l.iid, SERVER, srv.sid) {
                rows.push(('S', l.iid, srv.sid, server(l, srv, s.pid)));
            }
        }
        if filter.wants(l.iid, BACKEND, 0) {
            rows.push(('B', l.iid, 0, backend(l, s.pid)));
        }
    }
    rows
}

/// The CSV with only the rows `filter` selects.
pub fn render_filtered(s: &Snapshot, filter: &Filter) -> String {
    let mut out = String::with_capacity(4096);
    let _ = write!(out, "# {}", COLUMNS.join(","));
    out.push_str(",\n");
    for (_, _, _, row) in rows(s, filter) {
        row.write(&mut out);
    }
    out
}

/// `show stat typed`: one line per non-empty field, as
/// `<F|B|S>.<iid>.<sid>.<column>.<name>.1:<origin><nature><scope>:<type>:<value>`.
pub fn render_typed(s: &Snapshot, filter: &Filter) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for (kind, iid, sid, row) in rows(s, filter) {
        for (i, value) in row.0.iter().enumerate() {
            if value.is_empty() {
                continue;
            }
            let (tags, ty) = typed_tags(i, kind);
            let raw = value.trim_matches('"');
            let _ = writeln!(
                out,
                "{kind}.{iid}.{sid}.{i}.{}.1:{tags}:{ty}:{raw}",
                COLUMNS[i]
            );
        }
    }
    out
}

/// HAProxy's field tags (origin, nature, scope) and type for column `i`, as HAProxy 2.6
/// prints them in `show stat typed`.
fn typed_tags(i: usize, kind: char) -> (&'static str, &'static str) {
    match (COLUMNS[i], kind) {
        ("pxname" | "svname", _) => ("KNS", "str"),
        (
            "qcur" | "scur" | "srv_icur" | "idle_conn_cur" | "safe_conn_cur" | "used_conn_cur"
            | "need_conn_est",
            _,
        ) => ("MGP", "u32"),
        ("act" | "bck", 'B') => ("MGP", "u32"),
        ("act" | "bck", _) => ("SGP", "u32"),
        ("rate" | "rate_max", 'B') => ("MGP", "u32"),
        ("rate" | "conn_rate" | "req_rate", _) => ("MRP", "u32"),
        (
            "qmax" | "smax" | "rate_max" | "conn_rate_max" | "req_rate_max" | "qtime_max"
            | "ctime_max" | "rtime_max" | "ttime_max",
            _,
        ) => ("MMP", "u32"),
        ("slim" | "rate_lim" | "qlimit", _) => ("CLP", "u32"),
        ("status", _) => ("SGP", "str"),
        ("weight" | "uweight" | "qtime" | "ctime" | "rtime" | "ttime", _) => ("MaP", "u32"),
        ("lastchg", _) => ("MAP", "u32"),
        ("lastsess", _) => ("MAP", "s32"),
        ("downtime", _) => ("MCP", "u32"),
        ("pid", _) => ("KGP", "u32"),
        ("iid" | "sid", _) => ("KGS", "u32"),
        ("type" | "check_rise" | "check_fall" | "check_health", _) => ("CGS", "u32"),
        ("addr" | "mode" | "algo" | "cookie", _) => ("CGS", "str"),
        ("check_status" | "last_chk" | "check_desc", _) => ("MOP", "str"),
        ("check_code", _) => ("MOP", "u32"),
        ("check_duration", _) => ("MDP", "u64"),
        _ => ("MCP", "u64"),
    }
}

fn common(r: &mut Row, l: &ListenSnap, svname: &str, pid: u32) {
    r.set("pxname", &l.name)
        .set("svname", svname)
        .set("pid", pid)
        .set("iid", l.iid)
        .set("mode", "tcp");
}

fn frontend(l: &ListenSnap, pid: u32) -> Row {
    let mut r = Row::new();
    common(&mut r, l, "FRONTEND", pid);
    r.set("scur", l.scur)
        .set("smax", l.smax)
        .set("slim", l.slim)
        .set("stot", l.stot)
        .set("bin", l.bin)
        .set("bout", l.bout)
        .set("dreq", l.denied)
        .set("ereq", l.ereq)
        .set("status", "OPEN")
        .set("sid", 0)
        .set("type", 0)
        .set("rate", l.rate)
        .set("rate_lim", 0)
        .set("rate_max", l.rate_max)
        .set("conn_rate", l.rate)
        .set("conn_rate_max", l.rate_max)
        .set("conn_tot", l.stot + l.denied)
        .set("dcon", l.denied)
        .set("dses", 0)
        .set("eint", 0);
    zero(
        &mut r,
        &[
            "dresp",
            "wrew",
            "comp_in",
            "comp_out",
            "comp_byp",
            "comp_rsp",
            "req_rate",
            "req_rate_max",
            "req_tot",
        ],
    );
    r
}

/// Counters HAProxy shows as 0 for a TCP proxy (HTTP responses, rewrites, compression,
/// server-side connection reuse): 0 here too, so tools that read them as numbers do.
fn zero(r: &mut Row, columns: &[&str]) {
    for c in columns {
        r.set(c, 0);
    }
}

/// HAProxy's session time columns (all TCP: no response time, rtime 0).
fn times(r: &mut Row, t: &super::Times) {
    r.set("qtime", t.qtime)
        .set("ctime", t.ctime)
        .set("rtime", 0)
        .set("ttime", t.ttime)
        .set("qtime_max", t.qtime_max)
        .set("ctime_max", t.ctime_max)
        .set("rtime_max", 0)
        .set("ttime_max", t.ttime_max)
        .set("eint", 0);
}

fn server(l: &ListenSnap, s: &ServerSnap, pid: u32) -> Row {
    let mut r = Row::new();
    common(&mut r, l, &s.name, pid);
    r.set("qcur", 0)
        .set("qmax", 0)
        .set("scur", s.scur)
        .set("smax", s.smax)
        .set("stot", s.stot)
        .set("bin", s.bin)
        .set("bout", s.bout)
        .set("econ", s.econ)
        .set("eresp", 0)
        .set("wretr", s.wretr)
        .set("wredis", s.wredis)
        .set("status", &s.status)
        .set("weight", s.weight)
        .set("act", u8::from(!s.backup))
        .set("bck", u8::from(s.backup))
        .set("lastchg", s.lastchg)
        .set("sid", s.sid)
        .set("lbtot", s.stot)
        .set("type", 2)
        .set("rate", s.rate)
        .set("rate_max", s.rate_max)
        .set("addr", &s.addr)
        .set("cli_abrt", 0)
        .set("srv_abrt", 0)
        .set("uweight", s.weight);
    times(&mut r, &s.times);
    zero(
        &mut r,
        &[
            "dresp",
            "wrew",
            "reuse",
            "srv_icur",
            "idle_conn_cur",
            "safe_conn_cur",
        ],
    );
    r.set("connect", s.connects)
        .set("used_conn_cur", s.scur)
        .set("need_conn_est", s.scur);
    if s.slim > 0 {
        r.set("slim", s.slim);
    }
    if s.checked {
        r.set("chkfail", s.chkfail)
            .set("chkdown", s.chkdown)
            .set("downtime", s.downtime)
            .set("check_rise", s.rise)
            .set("check_fall", s.fall)
            .set("check_health", s.health);
    }
    if let Some(c) = &s.check {
        // check_code is a number for HAProxy's tools (its L5-7 code): 0 for a check that
        // got a PostgreSQL answer; the SQLSTATE of an error goes in front of last_chk.
        let detail = match &c.code {
            Some(code) => format!("{code}: {}", c.detail),
            None => c.detail.clone(),
        };
        r.set("check_status", c.status)
            .set("check_duration", c.duration_ms)
            .set("check_desc", c.description)
            .set("last_chk", detail);
        if c.status.starts_with("L6") || c.status.starts_with("L7") {
            r.set("check_code", 0);
        }
    }
    match s.lastsess {
        Some(secs) => r.set("lastsess", secs),
        None => r.set("lastsess", -1),
    };
    r
}

fn backend(l: &ListenSnap, pid: u32) -> Row {
    let mut r = Row::new();
    common(&mut r, l, "BACKEND", pid);
    let sum = |f: fn(&ServerSnap) -> u64| l.servers.iter().map(f).sum::<u64>();
    let serving = |s: &&ServerSnap| s.up && s.admin == crate::state::Admin::Ready;
    let act = l
        .servers
        .iter()
        .filter(|s| !s.backup)
        .filter(serving)
        .count();
    let bck = l
        .servers
        .iter()
        .filter(|s| s.backup)
        .filter(serving)
        .count();
    let weight: u32 = l.servers.iter().filter(serving).map(|s| s.weight).sum();
    r.set("qcur", l.qcur)
        .set("qmax", l.qmax)
        .set("scur", l.servers.iter().map(|s| s.scur).sum::<usize>())
        .set("smax", l.servers.iter().map(|s| s.smax).max().unwrap_or(0))
        .set("slim", l.slim)
        .set("stot", sum(|s| s.stot))
        .set("bin", sum(|s| s.bin))
        .set("bout", sum(|s| s.bout))
        .set("econ", sum(|s| s.econ))
        .set("eresp", 0)
        .set("wretr", sum(|s| s.wretr))
        .set("wredis", sum(|s| s.wredis))
        .set("status", if l.backend_up() { "UP" } else { "DOWN" })
        .set("weight", weight)
        .set("act", act)
        .set("bck", bck)
        .set("chkdown", sum(|s| s.chkdown))
        .set("sid", 0)
        .set("lbtot", sum(|s| s.stot))
        .set("type", 1)
        .set("rate", l.servers.iter().map(|s| s.rate).sum::<u64>())
        .set(
            "rate_max",
            l.servers.iter().map(|s| s.rate_max).max().unwrap_or(0),
        )
        .set("algo", l.balance)
        .set("cli_abrt", 0)
        .set("srv_abrt", 0)
        .set("uweight", weight)
        .set("lastchg", l.backend.lastchg)
        .set("downtime", l.backend.downtime);
    times(&mut r, &l.times);
    zero(
        &mut r,
        &[
            "dreq", "dresp", "wrew", "reuse", "comp_in", "comp_out", "comp_byp", "comp_rsp",
        ],
    );
    r.set("connect", sum(|s| s.connects));
    match l.servers.iter().filter_map(|s| s.lastsess).min() {
        Some(secs) => r.set("lastsess", secs),
        None => r.set("lastsess", -1),
    };
    r
}
