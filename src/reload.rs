//! Reload: a new configuration applied to the running listens in place. A listen named
//! again keeps its state object (counters, limits, queue, servers by name: see
//! `state::ListenState::reconfigure`); a new one starts; one no longer named drains its
//! sessions and is forgotten once they end.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::config::Listen;
use crate::events::Event;
use crate::state::ListenState;

/// The listens served after a reload, and those it removed.
pub struct Applied {
    pub listens: Vec<Arc<ListenState>>,
    pub removed: Vec<Arc<ListenState>>,
}

/// Applies `configs` to the listens served now (`old`; empty at start).
pub fn apply(
    old: &[Arc<ListenState>],
    configs: &[Listen],
    events: &broadcast::Sender<Event>,
) -> Applied {
    let listens = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| {
            let iid = i as u32 + 1;
            match old.iter().find(|l| l.name == cfg.name) {
                Some(l) => {
                    l.reconfigure(iid, cfg.clone());
                    Arc::clone(l)
                }
                None => Arc::new(ListenState::new(iid, cfg.clone(), events.clone())),
            }
        })
        .collect::<Vec<_>>();
    let removed: Vec<Arc<ListenState>> = old
        .iter()
        .filter(|l| !configs.iter().any(|c| c.name == l.name))
        .cloned()
        .collect();
    for l in &removed {
        l.retire();
    }
    Applied { listens, removed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::Admin;
    use std::path::Path;

    fn listens(text: &str) -> Vec<Listen> {
        Config::parse(Path::new("t.toml"), text)
            .expect("config")
            .listens
    }

    const A: &str = "[[listen]]\nname = \"pg\"\nbind = \"127.0.0.1:1\"\n[listen.check]\ntype = \"tcp\"\n\
        [[listen.server]]\nname = \"a\"\naddr = \"127.0.0.1:11\"\n[[listen.server]]\nname = \"b\"\naddr = \"127.0.0.1:12\"\n";

    #[test]
    fn servers_keep_their_state_by_name_removed_ones_linger() {
        let events = crate::events::channel();
        let first = apply(&[], &listens(A), &events);
        let l = Arc::clone(&first.listens[0]);
        let a = Arc::clone(&l.servers()[0]);
        let b = Arc::clone(&l.servers()[1]);
        b.set_admin(Admin::Drain);

        // b gets a new weight, a is unchanged, c is new.
        let text = A.replace(
            "addr = \"127.0.0.1:12\"",
            "addr = \"127.0.0.1:12\"\nweight = 50",
        ) + "[[listen.server]]\nname = \"c\"\naddr = \"127.0.0.1:13\"\n";
        let second = apply(&first.listens, &listens(&text), &events);
        assert!(
            Arc::ptr_eq(&second.listens[0], &l),
            "the listen keeps its identity"
        );
        let servers = l.servers();
        assert!(Arc::ptr_eq(&servers[0], &a));
        assert!(
            Arc::ptr_eq(&servers[1], &b),
            "a changed server keeps its identity"
        );
        assert_eq!(b.admin(), Admin::Drain, "operator state survives a change");
        assert_eq!(b.weight(), 50);
        assert_eq!(servers.len(), 3);

        // b removed: it no longer serves, and lingers only while it has sessions.
        let only_a = A
            .split("[[listen.server]]\nname = \"b\"")
            .next()
            .unwrap_or(A);
        let third = apply(&second.listens, &listens(only_a), &events);
        assert!(third.removed.is_empty());
        assert_eq!(l.servers().len(), 1);
        assert!(b.is_removed() && !b.usable());
        assert!(l.lingering().is_empty(), "no session: not shown");

        // A listen no longer configured drains.
        let other = A.replace("name = \"pg\"", "name = \"pg2\"");
        let fourth = apply(&third.listens, &listens(&other), &events);
        assert_eq!(fourth.removed.len(), 1);
        assert!(a.is_removed());
        assert!(!Arc::ptr_eq(&fourth.listens[0], &l));
    }
}
