//! The `show` commands whose formats tools parse: `show info` (hatop reads its
//! `Key: value` lines), `show servers state` (HAProxy's server-state file format,
//! version 1), `show backend`, `show sess`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::counters::Counter;
use crate::health::CheckStatus;
use crate::state::{Admin, ServerState};

use super::Context;

/// `show info`: process facts under HAProxy's names.
pub fn info(ctx: &Context) -> String {
    let p = &ctx.process;
    let listens = p.listens();
    let up = p.started.elapsed().as_secs();
    let sum =
        |f: &dyn Fn(&crate::state::ListenState) -> u64| listens.iter().map(|l| f(l)).sum::<u64>();
    let cur = sum(&|l| l.counters.cur.load(Relaxed) as u64);
    let total = sum(&|l| l.counters.stot.get());
    let rate = sum(&|l| l.counters.rate.read().0);
    let rate_max = listens
        .iter()
        .map(|l| l.counters.rate.read().1)
        .max()
        .unwrap_or(0);
    let bytes_out = sum(&|l| l.counters.bout.get());
    let fields: Vec<(&str, String)> = vec![
        ("Name", "pglb".into()),
        ("Version", env!("CARGO_PKG_VERSION").into()),
        ("Release_date", "-".into()),
        ("Nbthread", ctx.threads.to_string()),
        ("Nbproc", "1".into()),
        ("Process_num", "1".into()),
        ("Pid", std::process::id().to_string()),
        ("Uptime", uptime(up)),
        ("Uptime_sec", up.to_string()),
        ("Ulimit-n", open_files_limit()),
        ("Maxsock", open_files_limit()),
        ("Maxconn", p.gate.limit().to_string()),
        ("Hard_maxconn", p.gate.limit().to_string()),
        ("CurrConns", cur.to_string()),
        ("CumConns", total.to_string()),
        ("CumReq", total.to_string()),
        ("Maxpipes", "0".into()),
        ("PipesUsed", "0".into()),
        ("PipesFree", "0".into()),
        ("ConnRate", rate.to_string()),
        ("ConnRateLimit", "0".into()),
        ("MaxConnRate", rate_max.to_string()),
        ("SessRate", rate.to_string()),
        ("SessRateLimit", "0".into()),
        ("MaxSessRate", rate_max.to_string()),
        ("Tasks", cur.to_string()),
        ("Run_queue", "0".into()),
        ("node", hostname()),
        ("Stopping", u8::from(!p.serving.load(Relaxed)).to_string()),
        ("Jobs", cur.to_string()),
        ("Listeners", listens.len().to_string()),
        ("TotalBytesOut", bytes_out.to_string()),
        ("Start_time_sec", start_time(up).to_string()),
    ];
    let mut out = String::new();
    for (k, v) in fields {
        let _ = writeln!(out, "{k}: {v}");
    }
    out
}

/// HAProxy's uptime text: `0d 1h02m03s`.
fn uptime(secs: u64) -> String {
    format!(
        "{}d {}h{:02}m{:02}s",
        secs / 86_400,
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

fn start_time(up: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(up))
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "-".into())
}

fn open_files_limit() -> String {
    crate::net::open_files_limit().map_or_else(|| "0".into(), |n| n.to_string())
}

/// `show servers state [<backend>]`: HAProxy's format version 1.
pub fn servers_state(ctx: &Context, backend: Option<&str>) -> String {
    let listens = ctx.process.listens();
    let chosen: Vec<_> = match backend {
        None => listens.iter().collect(),
        Some(b) => match crate::admin::find_listen(&listens, b) {
            Some(l) => vec![l],
            None => return "Can't find backend.\n".into(),
        },
    };
    let mut out = String::from(
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight \
         srv_iweight srv_time_since_last_change srv_check_status srv_check_result \
         srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id \
         srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
         srv_agent_addr srv_agent_port\n",
    );
    for l in chosen {
        for s in l.servers().iter() {
            let _ = writeln!(out, "{} {} {}", l.iid(), l.name, server_state(s));
        }
    }
    out
}

/// One server's fields after `be_id be_name`.
fn server_state(s: &ServerState) -> String {
    let cfg = s.cfg();
    let h = s.health();
    let up = h.up || s.checks_disabled();
    // srv_op_state: 0 stopped, 2 running. srv_admin_state: 0x01 forced maintenance,
    // 0x08 forced drain.
    let op = if up { 2 } else { 0 };
    let admin = match s.admin() {
        Admin::Ready => 0,
        Admin::Maint => 0x01,
        Admin::Drain => 0x08,
    };
    let (check_status, result) = match &h.last {
        None if h.checked => (1, 0),
        None => (0, 0),
        Some((r, _)) => (
            check_status_number(r.status),
            if r.status.passed() { 3 } else { 2 },
        ),
    };
    // srv_check_state: 0x02 configured, 0x04 enabled.
    let check_state = match (h.checked, s.checks_disabled()) {
        (false, _) => 0,
        (true, true) => 0x02,
        (true, false) => 0x06,
    };
    format!(
        "{} {} {} {op} {admin} {} {} {} {check_status} {result} {} {check_state} 0 0 0 - {} - 0 0 - - 0",
        s.sid(),
        s.name,
        cfg.addr.ip(),
        s.base_weight(),
        cfg.weight,
        h.changed.elapsed().as_secs(),
        h.counter,
        cfg.addr.port(),
    )
}

/// HAProxy's `enum healthcheck_status` values.
fn check_status_number(c: CheckStatus) -> u8 {
    match c {
        CheckStatus::Ini => 1,
        CheckStatus::SockErr => 5,
        CheckStatus::L4Ok => 6,
        CheckStatus::L4Tout => 7,
        CheckStatus::L4Con => 8,
        CheckStatus::L6Ok => 9,
        CheckStatus::L6Tout => 10,
        CheckStatus::L6Rsp => 11,
        CheckStatus::L7Tout => 12,
        CheckStatus::L7Rsp => 13,
        CheckStatus::L7Ok => 15,
        CheckStatus::L7Sts => 17,
    }
}

/// `show backend`.
pub fn backends(ctx: &Context) -> String {
    let mut out = String::from("# name\n");
    for l in ctx.process.listens().iter() {
        let _ = writeln!(out, "{}", l.name);
    }
    out
}

/// `show sess`: one line per session relaying now, in HAProxy's key=value shape.
pub fn sessions(ctx: &Context) -> String {
    let mut out = String::new();
    for l in ctx.process.listens().iter() {
        for s in l.servers().iter().chain(l.lingering().iter()) {
            for live in s.live_sessions() {
                let proto = if live.client.is_ipv4() {
                    "tcpv4"
                } else {
                    "tcpv6"
                };
                let _ = writeln!(
                    out,
                    "0x{:x}: proto={proto} src={} fe={} be={} srv={} ts=00 age={} calls=0",
                    live.id,
                    live.client,
                    l.name,
                    l.name,
                    s.name,
                    human_time(live.since.elapsed().as_secs()),
                );
            }
        }
    }
    out
}

/// HAProxy's short human time: `12s`, `3m4s`, `2h5m`, `1d3h`.
fn human_time(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, s / 60 % 60),
        s => format!("{}d{}h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_haproxy_writes_them() {
        assert_eq!(uptime(3723), "0d 1h02m03s");
        assert_eq!(uptime(90_061), "1d 1h01m01s");
        assert_eq!(human_time(5), "5s");
        assert_eq!(human_time(185), "3m5s");
        assert_eq!(human_time(7300), "2h1m");
    }
}
