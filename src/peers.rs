//! Peers: the nodes of a keepalived pair act as one balancer for operators. An operator
//! action (drain, maint, ready, weight, checks on/off) taken on either node reaches the
//! other within a second, survives a restart of either (a starting node takes the
//! newest state from its peers before it reports ready), and an unreachable peer is
//! retried and shown on the dashboard, never blocking the action locally.
//!
//! No consensus: every server's operator state carries a version (time of the action,
//! then the node's name), and the newest wins on every node. Each node pushes its whole
//! operator state to each peer after a local action and every few seconds, over the
//! peers' stats ports with the shared admin credentials. Health stays local: each node
//! checks the servers for itself.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config;
use crate::counters::lock;
use crate::state::{self, Process};
use crate::webclient::{WebClient, client};

/// How long a peer may take to answer.
const TIMEOUT: Duration = Duration::from_secs(1);
/// A full push this often even without a change (a peer that restarted, a lost push).
const REFRESH: Duration = Duration::from_secs(5);
/// The wait before retrying a peer that failed.
const RETRY: Duration = Duration::from_secs(1);

/// This node and its peers.
#[derive(Debug)]
pub struct Peers {
    pub node: String,
    pub list: Vec<Peer>,
    /// Basic credentials peers accept (`[stats.auth]`).
    auth: Option<String>,
    /// Bumped by every local operator action: the push loops wake up.
    changed: watch::Sender<u64>,
    pub state_file: Option<PathBuf>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            node: String::new(),
            list: Vec::new(),
            auth: None,
            changed: watch::channel(0).0,
            state_file: None,
        }
    }
}

#[derive(Debug)]
pub struct Peer {
    pub cfg: config::Peer,
    pub status: Mutex<PeerStatus>,
}

/// What the dashboard shows of a peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// None before the first attempt.
    pub reachable: Option<bool>,
    pub last_ok: Option<SystemTime>,
    pub error: String,
}

/// A node's whole operator state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateMessage {
    pub node: String,
    pub servers: Vec<crate::operator_state::Entry>,
}

impl Peers {
    pub fn new(config: &config::Config) -> Self {
        let auth = config
            .stats
            .as_ref()
            .and_then(|s| s.auth.as_ref())
            .map(|a| {
                let token = base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    a.user,
                    a.password.expose()
                ));
                format!("Basic {token}")
            });
        Peers {
            node: config.global.node.clone(),
            list: config
                .peers
                .iter()
                .map(|p| Peer {
                    cfg: p.clone(),
                    status: Mutex::default(),
                })
                .collect(),
            auth,
            changed: watch::channel(0).0,
            state_file: config.stats.as_ref().and_then(|s| s.state_file.clone()),
        }
    }

    /// A local operator action happened: push it now.
    pub fn changed(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// This node's operator state, every server.
pub fn state(peers: &Peers, process: &Process) -> StateMessage {
    StateMessage {
        node: peers.node.clone(),
        servers: crate::operator_state::entries(&process.listens(), false),
    }
}

/// Applies what is newer than ours in a peer's state; returns how many servers changed.
pub fn merge(peers: &Peers, process: &Process, msg: &StateMessage) -> usize {
    let listens = process.listens();
    let mut applied = 0;
    for e in &msg.servers {
        let Some((listen, server)) = state::find_server(&listens, &e.listen, &e.server) else {
            continue;
        };
        if e.version <= server.op_version() {
            continue;
        }
        e.apply_to(&server);
        info!(
            "Server {}/{} set to {}, weight {}{} by peer {} (action of {})",
            listen.name,
            server.name,
            e.admin.as_str().to_uppercase(),
            e.weight,
            if e.checks_disabled {
                ", checks disabled"
            } else {
                ""
            },
            msg.node,
            e.version.node
        );
        crate::pick::servers_changed(&listen);
        applied += 1;
    }
    if applied > 0 {
        crate::operator_state::save_or_warn(peers.state_file.as_deref(), &listens);
    }
    applied
}

/// At start, before reporting ready: the newest operator state of every peer that
/// answers within a second.
pub async fn pull(peers: &Peers, process: &Process) {
    let client = client();
    for peer in &peers.list {
        let url = format!("{}/api/peer/state", peer.cfg.url);
        match get(&client, &url, peers.auth.as_deref()).await {
            Ok(msg) => {
                let n = merge(peers, process, &msg);
                info!(peer = %peer.cfg.name, applied = n, "operator state taken from peer at start");
                note(peer, Ok(()));
            }
            Err(e) => {
                warn!(peer = %peer.cfg.name, error = %e, "peer unreachable at start: starting with the local operator state");
                note(peer, Err(e));
            }
        }
    }
}

/// Pushes this node's operator state to every peer until `stop`: after each local
/// action, every few seconds, and again after a failure.
pub async fn run(peers: Arc<Peers>, process: Arc<Process>, stop: CancellationToken) {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..peers.list.len() {
        let (peers, process) = (Arc::clone(&peers), Arc::clone(&process));
        let (client, stop) = (client.clone(), stop.clone());
        tasks.spawn(async move { push_loop(&peers, &process, i, &client, &stop).await });
    }
    while tasks.join_next().await.is_some() {}
}

async fn push_loop(
    peers: &Peers,
    process: &Process,
    i: usize,
    client: &WebClient,
    stop: &CancellationToken,
) {
    let peer = &peers.list[i];
    let mut changed = peers.changed.subscribe();
    let url = format!("{}/api/peer/state", peer.cfg.url);
    loop {
        let body = serde_json::to_vec(&state(peers, process)).unwrap_or_default();
        let result = post(client, &url, peers.auth.as_deref(), body).await;
        let wait = if result.is_ok() { REFRESH } else { RETRY };
        if let Err(e) = &result
            && lock(&peer.status).reachable != Some(false)
        {
            warn!(peer = %peer.cfg.name, error = %e, "peer unreachable: operator state not passed on yet (retrying)");
        }
        note(peer, result);
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn note(peer: &Peer, result: Result<(), String>) {
    let mut s = lock(&peer.status);
    match result {
        Ok(()) => {
            s.reachable = Some(true);
            s.last_ok = Some(SystemTime::now());
            s.error.clear();
        }
        Err(e) => {
            s.reachable = Some(false);
            s.error = e;
        }
    }
}

async fn post(
    client: &WebClient,
    url: &str,
    auth: Option<&str>,
    body: Vec<u8>,
) -> Result<(), String> {
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("HTTP {}", resp.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 1s".into()),
    }
}

async fn get(client: &WebClient, url: &str, auth: Option<&str>) -> Result<StateMessage, String> {
    let mut req = hyper::Request::get(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("invalid state: {e}"))
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .unwrap_or_else(|_| Err("no answer within 1s".into()))
}
