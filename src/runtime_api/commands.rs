//! The runtime API's commands, in HAProxy's syntax and wording: each returns the text
//! of its answer (the connection adds the empty line that ends it).

use crate::admin::{self, Action};
use crate::state::Admin;
use crate::stats::csv::{self, Filter};

use super::{Cli, Context, show};

/// `help`: the commands, as HAProxy lists them.
const HELP: &[(&str, &str)] = &[
    ("help", "this message"),
    ("prompt", "toggle interactive mode with prompt"),
    ("quit", "disconnect"),
    (
        "set timeout cli <delay>",
        "change this session's idle timeout (seconds)",
    ),
    ("show info", "report information about the running process"),
    (
        "show stat [<iid> <type> <sid>] [typed]",
        "report counters for each proxy and server",
    ),
    (
        "show servers state [<backend>]",
        "dump volatile server information (all or for a single backend)",
    ),
    (
        "show backend",
        "list backends (listens) in the current running config",
    ),
    ("show sess", "report the list of current sessions"),
    ("get weight <bk>/<srv>", "report a server's current weight"),
    (
        "set weight <bk>/<srv> <w>[%]",
        "change a server's weight (deprecated)",
    ),
    (
        "set server <bk>/<srv> state <ready|drain|maint>",
        "change a server's operator state",
    ),
    (
        "set server <bk>/<srv> weight <w>[%]",
        "change a server's weight",
    ),
    (
        "enable server <bk>/<srv>",
        "leave maintenance (same as set server ... state ready)",
    ),
    (
        "disable server <bk>/<srv>",
        "enter maintenance (same as set server ... state maint)",
    ),
    ("enable health <bk>/<srv>", "enable health checks"),
    (
        "disable health <bk>/<srv>",
        "disable health checks (the server counts as UP)",
    ),
    (
        "shutdown sessions server <bk>/<srv>",
        "end a server's sessions at their next transaction boundary",
    ),
    (
        "set maxconn server <bk>/<srv> <n>",
        "change a server's maxconn until the next reload",
    ),
    (
        "clear counters [all]",
        "clear max statistics counters (or all counters)",
    ),
];

fn help() -> String {
    let mut out = String::from("The following commands are valid at this level:\n");
    for (cmd, what) in HELP {
        out.push_str(&format!("  {cmd:<39} : {what}\n"));
    }
    out
}

/// Runs one command.
pub fn execute(ctx: &Context, command: &str, cli: &mut Cli) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["help"] | ["?"] => help(),
        ["prompt"] => {
            cli.interactive = !cli.interactive;
            String::new()
        }
        ["quit"] => {
            cli.quit = true;
            String::new()
        }
        ["set", "timeout", "cli", secs] => match secs.parse::<u64>() {
            Ok(s) if s > 0 => {
                cli.timeout = std::time::Duration::from_secs(s);
                String::new()
            }
            _ => "Expects an integer value.\n".into(),
        },
        ["show", "info"] => show::info(ctx),
        ["show", "stat", rest @ ..] => show_stat(ctx, rest),
        ["show", "servers", "state"] => show::servers_state(ctx, None),
        ["show", "servers", "state", backend] => show::servers_state(ctx, Some(backend)),
        ["show", "backend"] => show::backends(ctx),
        ["show", "sess"] => show::sessions(ctx),
        ["get", "weight", target] => get_weight(ctx, target),
        ["set", "weight", target, w] => weight(ctx, target, w),
        ["set", "server", target, "state", state] => set_state(ctx, target, state),
        ["set", "server", target, "weight", w] => weight(ctx, target, w),
        ["set", "server", _, ..] => {
            "'set server <srv>' only supports 'state' and 'weight'.\n".into()
        }
        ["enable", "server", target] => enable_server(ctx, target),
        ["disable", "server", target] => act(ctx, target, Action::Set(Admin::Maint)),
        ["enable", "health", target] => act(ctx, target, Action::Checks(true)),
        ["disable", "health", target] => act(ctx, target, Action::Checks(false)),
        ["shutdown", "sessions", "server", target] => act(ctx, target, Action::ShutdownSessions),
        ["set", "maxconn", "server", target, n] => match n.parse::<usize>() {
            Ok(n) => act(ctx, target, Action::Maxconn(n)),
            Err(_) => "maxconn string empty or preceded by garbage\n".into(),
        },
        ["clear", "counters"] => clear(ctx, false),
        ["clear", "counters", "all"] => clear(ctx, true),
        _ => format!(
            "Unknown command, but maybe one of the following ones is a better match:\n{}",
            help().lines().skip(1).collect::<Vec<_>>().join("\n") + "\n"
        ),
    }
}

/// `backend/server`, or HAProxy's complaint.
fn target(text: &str) -> Result<(&str, &str), String> {
    match text.split_once('/') {
        Some((b, s)) if !b.is_empty() && !s.is_empty() => Ok((b, s)),
        _ => Err("Require 'backend/server'.\n".into()),
    }
}

/// Runs an action through the admin layer (the same as the dashboard's).
fn act(ctx: &Context, target_text: &str, action: Action) -> String {
    let (b, s) = match target(target_text) {
        Ok(t) => t,
        Err(e) => return e,
    };
    match admin::run(
        &ctx.process,
        &ctx.peers,
        ctx.state_file.as_deref(),
        b,
        s,
        action,
    ) {
        Ok(_) => String::new(),
        Err(e) => format!("{}\n", e.cli()),
    }
}

fn set_state(ctx: &Context, target: &str, state: &str) -> String {
    let admin = match state {
        "ready" => Admin::Ready,
        "drain" => Admin::Drain,
        "maint" => Admin::Maint,
        _ => return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n".into(),
    };
    act(ctx, target, Action::Set(admin))
}

fn weight(ctx: &Context, target: &str, w: &str) -> String {
    match admin::parse_weight(w) {
        Ok(action) => act(ctx, target, action),
        Err(e) => format!("{}\n", e.cli()),
    }
}

/// Runs `f` on `backend/server`, or answers HAProxy's complaint.
fn with_server(
    ctx: &Context,
    target_text: &str,
    f: impl FnOnce(&crate::state::ServerState) -> String,
) -> String {
    let (b, s) = match target(target_text) {
        Ok(t) => t,
        Err(e) => return e,
    };
    match admin::find(&ctx.process.listens(), b, s) {
        Ok((_, server)) => f(&server),
        Err(e) => format!("{}\n", e.cli()),
    }
}

/// `enable server` leaves maintenance; a drained server stays drained.
fn enable_server(ctx: &Context, target_text: &str) -> String {
    with_server(ctx, target_text, |server| {
        if server.admin() == Admin::Maint {
            act(ctx, target_text, Action::Set(Admin::Ready))
        } else {
            String::new()
        }
    })
}

fn get_weight(ctx: &Context, target_text: &str) -> String {
    with_server(ctx, target_text, |server| {
        format!(
            "{} (initial {})\n",
            server.base_weight(),
            server.cfg().weight
        )
    })
}

/// `show stat [<iid> <type> <sid>] [typed]`.
fn show_stat(ctx: &Context, args: &[&str]) -> String {
    let (typed, args) = match args.split_last() {
        Some((&"typed", rest)) => (true, rest),
        _ => (false, args),
    };
    let filter = match args {
        [] => Filter::ALL,
        [iid, kind, sid] => {
            let num = |t: &str| t.parse::<i64>().ok();
            match (num(iid), num(kind), num(sid)) {
                (Some(i), Some(k), Some(s)) => Filter {
                    iid: u32::try_from(i).ok().filter(|_| i >= 0),
                    types: if k < 0 { 7 } else { (k & 7) as u8 },
                    sid: u32::try_from(s).ok().filter(|_| s >= 0),
                },
                _ => return "No such proxy.\n".into(),
            }
        }
        _ => return "Usage: show stat [<iid> <type> <sid>] [typed]\n".into(),
    };
    let snap = crate::stats::snapshot(&ctx.process);
    if typed {
        csv::render_typed(&snap, &filter)
    } else {
        csv::render_filtered(&snap, &filter)
    }
}

fn clear(ctx: &Context, all: bool) -> String {
    for l in ctx.process.listens().iter() {
        l.clear_counters(all);
    }
    String::new()
}
