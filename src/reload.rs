//! Reload: the next generation of listens from a new configuration, keeping what did not
//! change. A server whose settings are unchanged keeps its state object (health, counters,
//! operator state) as is; a changed one starts fresh but keeps its operator state, and its
//! health when its check did not change. Servers that disappear are drained: their
//! sessions end at their next transaction boundary (or the drain deadline).

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::cancel::Registry;
use crate::config::Listen;
use crate::events::Event;
use crate::state::{Admin, ListenState, ServerState};

/// The next listens, and the old servers no longer served anywhere.
pub struct Generation {
    pub listens: Vec<Arc<ListenState>>,
    pub retired: Vec<Arc<ServerState>>,
}

/// Builds the listens of `configs`, reusing state from `old` where it still applies.
pub fn next_generation(
    old: &[Arc<ListenState>],
    configs: &[Listen],
    events: &broadcast::Sender<Event>,
    cancels: &Arc<Registry>,
) -> Generation {
    let listens: Vec<Arc<ListenState>> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            let before = old.iter().find(|l| l.cfg.name == cfg.name);
            let servers = cfg
                .servers
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let sid = j as u32 + 1;
                    let prev = before.and_then(|l| l.server(&s.name));
                    match prev {
                        Some(p) if p.cfg == *s && p.sid == sid => Arc::clone(p),
                        Some(p) => Arc::new(carry_over(p, ServerState::new(sid, s.clone()))),
                        None => Arc::new(ServerState::new(sid, s.clone())),
                    }
                })
                .collect();
            let mut next = ListenState::with_servers(
                i as u32 + 1,
                cfg.clone(),
                servers,
                events.clone(),
                Arc::clone(cancels),
            );
            if let Some(before) = before {
                // Same listen: its statistics continue.
                next.counters = Arc::clone(&before.counters);
            }
            Arc::new(next)
        })
        .collect();
    let still_served = |s: &ServerState| {
        listens
            .iter()
            .flat_map(|l| l.servers.iter())
            .any(|n| n.cfg.addr == s.cfg.addr)
    };
    let mut retired: Vec<Arc<ServerState>> = Vec::new();
    for s in old.iter().flat_map(|l| l.servers.iter()) {
        if !still_served(s) && !retired.iter().any(|r| Arc::ptr_eq(r, s)) {
            retired.push(Arc::clone(s));
        }
    }
    Generation { listens, retired }
}

/// Keeps an operator's decisions (and the health verdict, if checked the same way) across
/// a change of a server's settings.
fn carry_over(prev: &ServerState, next: ServerState) -> ServerState {
    if prev.admin() != Admin::Ready {
        next.set_admin(prev.admin());
    }
    if prev.base_weight() != prev.cfg.weight {
        next.set_base_weight(prev.base_weight());
    }
    if prev.cfg.check == next.cfg.check {
        let h = prev.health().clone();
        next.set_up(h.up);
        *next.health() = h;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn listens(text: &str) -> Vec<Listen> {
        Config::parse(Path::new("t.toml"), text)
            .expect("config")
            .listens
    }

    const A: &str = "[[listen]]\nname = \"pg\"\nbind = \"127.0.0.1:1\"\n[listen.check]\ntype = \"tcp\"\n\
        [[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:11\"\n[[listen.server]]\nname = \"b\"\naddr = \"127.0.0.1:12\"\n";

    #[test]
    fn unchanged_servers_keep_their_state_removed_ones_retire() {
        let events = crate::events::channel();
        let cancels = Arc::new(Registry::default());
        let first = next_generation(&[], &listens(A), &events, &cancels);
        let a = Arc::clone(&first.listens[0].servers[0]);
        let b = Arc::clone(&first.listens[0].servers[1]);
        b.set_admin(Admin::Drain);

        // b gets a new weight (changed), a is unchanged, c is new; then b is removed.
        let text = A.replace(
            "addr = \"127.0.0.1:12\"",
            "addr = \"127.0.0.1:12\"\nweight = 50",
        ) + "[[listen.server]]\nname = \"c\"\naddr = \"127.0.0.1:13\"\n";
        let second = next_generation(&first.listens, &listens(&text), &events, &cancels);
        let servers = &second.listens[0].servers;
        assert!(
            Arc::ptr_eq(&servers[0], &a),
            "unchanged server keeps its state"
        );
        assert!(!Arc::ptr_eq(&servers[1], &b));
        assert_eq!(
            servers[1].admin(),
            Admin::Drain,
            "operator state survives a change"
        );
        assert_eq!(servers[1].weight(), 50);
        assert!(second.retired.is_empty());

        let third = next_generation(
            &second.listens,
            &listens(
                A.split("[[listen.server]]\nname = \"b\"")
                    .next()
                    .unwrap_or(A),
            ),
            &events,
            &cancels,
        );
        assert_eq!(third.listens[0].servers.len(), 1);
        let retired: Vec<&str> = third.retired.iter().map(|s| s.cfg.name.as_str()).collect();
        assert_eq!(retired, ["b", "c"]);
    }
}
