//! Operator state that outlives a process: what an operator set on each server (admin
//! state, weight, checks stopped), kept in the state file across restarts and exchanged
//! between the nodes of a pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::state::{Admin, ListenState, OpVersion, ServerState, find_server};

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
        let Some((_, server)) = find_server(listens, &saved.listen, &saved.server) else {
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
