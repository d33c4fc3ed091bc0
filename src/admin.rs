//! Operator actions on servers (ready, drain, maint, weight) and the state file that keeps
//! them across restarts and reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::events::Event;
use crate::pick;
use crate::state::{Admin, ListenState};

/// One operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Set(Admin),
    Weight(u32),
}

impl Action {
    /// Parses HAProxy's form values (`ready`, `drain`, `maint`) and `weight` with a value.
    pub fn parse(action: &str, weight: Option<&str>) -> Result<Action, String> {
        match action {
            "ready" => Ok(Action::Set(Admin::Ready)),
            "drain" => Ok(Action::Set(Admin::Drain)),
            "maint" => Ok(Action::Set(Admin::Maint)),
            "weight" => {
                let w = weight.ok_or("action 'weight' needs a weight")?;
                match w.trim().parse::<u32>() {
                    Ok(w) if w <= 256 => Ok(Action::Weight(w)),
                    _ => Err(format!("weight {w:?} is not a number from 0 to 256")),
                }
            }
            other => Err(format!(
                "unknown action {other:?}: use ready, drain, maint or weight"
            )),
        }
    }
}

/// Finds the listen by name or HAProxy's `#<iid>` form.
pub fn find_listen<'a>(listens: &'a [Arc<ListenState>], b: &str) -> Option<&'a Arc<ListenState>> {
    match b.strip_prefix('#').and_then(|n| n.parse::<u32>().ok()) {
        Some(iid) => listens.iter().find(|l| l.iid() == iid),
        None => listens.iter().find(|l| l.name == b),
    }
}

/// Applies an action; returns a sentence saying what changed.
pub fn apply(
    listens: &[Arc<ListenState>],
    b: &str,
    s: &str,
    action: Action,
) -> Result<String, String> {
    let listen = find_listen(listens, b).ok_or_else(|| format!("no listen {b:?}"))?;
    let server = listen
        .server(s)
        .ok_or_else(|| format!("listen '{}' has no server {s:?}", listen.name))?;
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
    pick::servers_changed(listen);
    Ok(sentence)
}

/// One server's saved operator state.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Saved {
    listen: String,
    server: String,
    admin: Admin,
    weight: u32,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct StateFile {
    #[serde(default)]
    server: Vec<Saved>,
}

/// Writes every server whose operator state differs from the configuration. Written to a
/// temporary file and renamed, so a crash never leaves half a file.
pub fn save(path: &Path, listens: &[Arc<ListenState>]) -> std::io::Result<()> {
    let mut file = StateFile::default();
    for l in listens {
        for s in l.servers().iter() {
            if s.admin() != Admin::Ready || s.base_weight() != s.cfg().weight {
                file.server.push(Saved {
                    listen: l.name.clone(),
                    server: s.name.clone(),
                    admin: s.admin(),
                    weight: s.base_weight(),
                });
            }
        }
    }
    let text = toml::to_string(&file).map_err(std::io::Error::other)?;
    let tmp = temp_path(path);
    std::fs::write(
        &tmp,
        format!("# pglb admin state: written by pglb, do not edit while it runs\n{text}"),
    )?;
    std::fs::rename(&tmp, path)
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
        server.set_admin(saved.admin);
        server.set_base_weight(saved.weight.min(256));
        info!(
            "Server {}/{} restored from the state file: {}, weight {}",
            saved.listen,
            saved.server,
            saved.admin.as_str(),
            saved.weight
        );
    }
}
