//! Operator actions on servers, one layer behind every door (the dashboard's form, the
//! JSON API, the runtime API socket): the same action has the same effect, the same
//! log line, the same event and the same state-file write whichever way it came. Also
//! the state file that keeps operator decisions across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::events::Event;
use crate::peers::Peers;
use crate::pick;
use crate::state::{Admin, ListenState, OpVersion, Process, ServerState};

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

/// One server's operator state: what the state file keeps and what peers exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub listen: String,
    pub server: String,
    pub admin: Admin,
    pub weight: u32,
    /// Health checks stopped by an operator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checks_disabled: bool,
    /// When and where it was set (the pair keeps the newest).
    #[serde(default)]
    pub version: OpVersion,
}

impl Entry {
    fn of(listen: &ListenState, s: &ServerState) -> Self {
        Entry {
            listen: listen.name.clone(),
            server: s.name.clone(),
            admin: s.admin(),
            weight: s.base_weight(),
            checks_disabled: s.checks_disabled(),
            version: s.op_version(),
        }
    }

    /// Puts this state on `server` (a restart, a peer's newer action).
    pub fn apply_to(&self, server: &ServerState) {
        server.set_admin(self.admin);
        server.set_base_weight(self.weight.min(256));
        if server.checks_disabled() != self.checks_disabled {
            server.set_checks_enabled(!self.checks_disabled);
        }
        server.set_op_version(self.version.clone());
    }
}

/// The operator state of every server (`changed_only`: those that differ from the
/// configuration or were ever set).
pub fn entries(listens: &[Arc<ListenState>], changed_only: bool) -> Vec<Entry> {
    let mut out = Vec::new();
    for l in listens {
        for s in l.servers().iter() {
            let changed = s.admin() != Admin::Ready
                || s.base_weight() != s.cfg().weight
                || s.checks_disabled()
                || s.op_version() != OpVersion::default();
            if changed || !changed_only {
                out.push(Entry::of(l, s));
            }
        }
    }
    out
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct StateFile {
    #[serde(default)]
    server: Vec<Entry>,
}

/// Writes every server whose operator state differs from the configuration. Written to a
/// temporary file and renamed, so a crash never leaves half a file.
pub fn save(path: &Path, listens: &[Arc<ListenState>]) -> std::io::Result<()> {
    let file = StateFile {
        server: entries(listens, true),
    };
    let text = toml::to_string(&file).map_err(std::io::Error::other)?;
    let tmp = temp_path(path);
    std::fs::write(
        &tmp,
        format!("# pglb admin state: written by pglb, do not edit while it runs\n{text}"),
    )?;
    std::fs::rename(&tmp, path)
}

/// `save`, with a failure logged (an action is not undone because its file could not be
/// written).
pub fn save_or_warn(path: Option<&Path>, listens: &[Arc<ListenState>]) {
    if let Some(path) = path
        && let Err(e) = save(path, listens)
    {
        warn!(file = %path.display(), error = %e, "cannot write the admin state file");
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Re-applies saved operator state. A missing file is normal (first start); entries for
/// servers no longer configured are skipped with a warning.
pub fn load(path: &Path, listens: &[Arc<ListenState>]) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the admin state file; starting with configured state");
            return;
        }
    };
    let file: StateFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            warn!(file = %path.display(), error = %e.message(), "admin state file is damaged; starting with configured state");
            return;
        }
    };
    for saved in file.server {
        let Some(server) = listens
            .iter()
            .find(|l| l.name == saved.listen)
            .and_then(|l| l.server(&saved.server))
        else {
            warn!(listen = %saved.listen, server = %saved.server, "admin state for a server no longer configured: ignored");
            continue;
        };
        saved.apply_to(&server);
        info!(
            "Server {}/{} restored from the state file: {}, weight {}",
            saved.listen,
            saved.server,
            saved.admin.as_str(),
            saved.weight
        );
    }
}
