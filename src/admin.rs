//! Operator actions on servers, one layer behind every door (the dashboard's form, the
//! JSON API, the runtime API socket): the same action has the same effect, the same
//! log line, the same event and the same state-file write whichever way it came.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use crate::events::Event;
use crate::operator_state::save_or_warn;
use crate::peers::Peers;
use crate::pick;
use crate::state::{Admin, ListenState, Process, ServerState};

/// One operator action on one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Set(Admin),
    /// An absolute weight (0..=256).
    Weight(u32),
    /// A percentage of the configured weight (HAProxy's `weight 50%`).
    WeightPercent(u32),
    /// Start or stop the health checks (`enable health` / `disable health`).
    Checks(bool),
    /// End the sessions running now at their next transaction boundary (or the drain
    /// deadline); the server keeps taking new clients.
    ShutdownSessions,
    /// A runtime maxconn (0: unlimited), until the next reload.
    Maxconn(usize),
}

/// Why an action was not taken. `Display` explains it for people (dashboard, JSON);
/// [`AdminError::cli`] is HAProxy's wording, which runtime-API tools match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no listen {0:?}")]
    NoSuchListen(String),
    #[error("listen '{listen}' has no server {server:?}")]
    NoSuchServer { listen: String, server: String },
    #[error("{0}")]
    Invalid(String),
}

impl AdminError {
    /// HAProxy's words for the runtime API.
    pub fn cli(&self) -> String {
        match self {
            AdminError::NoSuchListen(_) => "No such backend.".into(),
            AdminError::NoSuchServer { .. } => "No such server.".into(),
            AdminError::Invalid(m) => m.clone(),
        }
    }

    /// The HTTP status this refusal deserves.
    pub fn http_status(&self) -> u16 {
        match self {
            AdminError::NoSuchListen(_) | AdminError::NoSuchServer { .. } => 404,
            AdminError::Invalid(_) => 400,
        }
    }
}

impl Action {
    /// Parses the dashboard's form values (`ready`, `drain`, `maint`) and `weight` with a
    /// value (HAProxy's stats page actions).
    pub fn parse(action: &str, weight: Option<&str>) -> Result<Action, AdminError> {
        match action {
            "ready" => Ok(Action::Set(Admin::Ready)),
            "drain" => Ok(Action::Set(Admin::Drain)),
            "maint" => Ok(Action::Set(Admin::Maint)),
            "weight" => {
                let w = weight
                    .ok_or_else(|| AdminError::Invalid("action 'weight' needs a weight".into()))?;
                parse_weight(w)
            }
            other => Err(AdminError::Invalid(format!(
                "unknown action {other:?}: use ready, drain, maint or weight"
            ))),
        }
    }
}

/// `N` (0..=256) or `N%` of the configured weight.
pub fn parse_weight(text: &str) -> Result<Action, AdminError> {
    let t = text.trim();
    if let Some(pct) = t.strip_suffix('%') {
        return match pct.parse::<u32>() {
            Ok(p) => Ok(Action::WeightPercent(p)),
            Err(_) => Err(AdminError::Invalid(
                "Empty weight string empty or preceded by garbage".into(),
            )),
        };
    }
    match t.parse::<u32>() {
        Ok(w) if w <= 256 => Ok(Action::Weight(w)),
        Ok(_) => Err(AdminError::Invalid(
            "Absolute weight can only be between 0 and 256 inclusive.".into(),
        )),
        Err(_) => Err(AdminError::Invalid(
            "Empty weight string empty or preceded by garbage".into(),
        )),
    }
}

/// Finds the listen by name or HAProxy's `#<iid>` form.
pub fn find_listen<'a>(listens: &'a [Arc<ListenState>], b: &str) -> Option<&'a Arc<ListenState>> {
    match b.strip_prefix('#').and_then(|n| n.parse::<u32>().ok()) {
        Some(iid) => listens.iter().find(|l| l.iid() == iid),
        None => listens.iter().find(|l| l.name == b),
    }
}

/// Finds `listen/server`.
pub fn find(
    listens: &[Arc<ListenState>],
    b: &str,
    s: &str,
) -> Result<(Arc<ListenState>, Arc<ServerState>), AdminError> {
    let listen = find_listen(listens, b).ok_or_else(|| AdminError::NoSuchListen(b.into()))?;
    let server = listen.server(s).ok_or_else(|| AdminError::NoSuchServer {
        listen: listen.name.clone(),
        server: s.into(),
    })?;
    Ok((Arc::clone(listen), server))
}

/// Applies an action and, with a state file, saves the operator state; returns a
/// sentence saying what changed (also logged).
pub fn run(
    process: &Process,
    peers: &Peers,
    state_file: Option<&Path>,
    b: &str,
    s: &str,
    action: Action,
) -> Result<String, AdminError> {
    let listens = process.listens();
    let sentence = apply(&listens, b, s, action)?;
    if shared_with_peers(action) {
        // The newest action wins on every node of the pair.
        let (_, server) = find(&listens, b, s)?;
        server.stamp(&peers.node);
        peers.changed();
    }
    save_or_warn(state_file, &listens);
    Ok(sentence)
}

/// Operator state that the nodes of a pair share; `shutdown sessions` and a runtime
/// maxconn stay local.
fn shared_with_peers(action: Action) -> bool {
    !matches!(action, Action::ShutdownSessions | Action::Maxconn(_))
}

/// Applies an action; returns a sentence saying what changed.
pub fn apply(
    listens: &[Arc<ListenState>],
    b: &str,
    s: &str,
    action: Action,
) -> Result<String, AdminError> {
    let (listen, server) = find(listens, b, s)?;
    let before = server.status_of(&server.health());
    let what = match action {
        Action::Set(admin) => {
            server.set_admin(admin);
            format!("set to {}", admin.as_str().to_uppercase())
        }
        Action::Weight(w) => {
            server.set_base_weight(w);
            format!("weight set to {w}")
        }
        Action::WeightPercent(p) => {
            let w = (u64::from(server.cfg().weight) * u64::from(p) / 100).min(256) as u32;
            server.set_base_weight(w);
            format!("weight set to {w} ({p}% of {})", server.cfg().weight)
        }
        Action::Checks(on) => {
            server.set_checks_enabled(on);
            server.wake_checker.notify_one();
            (if on {
                "health checks enabled"
            } else {
                "health checks disabled"
            })
            .into()
        }
        Action::ShutdownSessions => {
            server.drain_running();
            format!(
                "{} session(s) told to end at their next transaction boundary",
                server.sessions()
            )
        }
        Action::Maxconn(n) => {
            server.set_maxconn(n);
            format!("maxconn set to {n}")
        }
    };
    let after = server.status_of(&server.health());
    let sentence = format!("Server {}/{} {what} by admin", listen.name, server.name);
    info!("{sentence}");
    if before != after {
        let _ = listen.events.send(Event {
            listen: listen.name.clone(),
            server: Some(server.name.clone()),
            from: before,
            to: after,
            reason: format!("{what} by admin"),
            at: SystemTime::now(),
        });
    }
    pick::servers_changed(&listen);
    listen.backend_status();
    Ok(sentence)
}
