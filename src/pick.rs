//! Picking a server: choose one with room (see `balance`), or wait in the listen's FIFO
//! queue until one frees a slot. A [`Slot`] is a session's claim on a server; dropping it
//! frees the place and hands it to the first waiter.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;

use crate::balance::{self, BalanceState, Candidate};
use crate::refusal::Refusal;
use crate::state::{Counter, ListenState, ServerState, raise_max};

/// Per-listen dispatch state, guarded by the listen's mutex. Held only for a few
/// comparisons per pick: never across an await.
#[derive(Debug)]
pub struct Dispatch {
    /// Sessions each server holds (the leastconn measure and the maxconn check).
    cur: Vec<usize>,
    balance: BalanceState,
    /// Clients waiting for a slot, oldest first.
    queue: VecDeque<oneshot::Sender<Slot>>,
}

/// What a pick found.
enum Found {
    Server(usize),
    /// Usable servers exist but all are at maxconn.
    Full,
    /// No usable server at all.
    Nothing,
}

impl Dispatch {
    pub fn new(servers: usize) -> Self {
        Dispatch {
            cur: vec![0; servers],
            balance: BalanceState::new(servers),
            queue: VecDeque::new(),
        }
    }

    pub fn current(&self) -> &[usize] {
        &self.cur
    }

    /// Waiters still waiting (some may have timed out but not yet been pruned).
    pub fn queued(&self) -> usize {
        self.queue.iter().filter(|w| !w.is_closed()).count()
    }

    /// Active servers first; backups only when no active server is usable at all; last,
    /// on a replica listen, healthy primaries (when `fallback_to_primary`).
    fn find(&mut self, listen: &ListenState, exclude: &[usize]) -> Found {
        let tiers: [&dyn Fn(&ServerState) -> bool; 3] = [
            &|s| !s.cfg.backup && s.usable(),
            &|s| s.cfg.backup && s.usable(),
            &|s| listen.cfg.fallback_to_primary && s.weight() > 0 && s.fallback_ok.load(Relaxed),
        ];
        for tier in tiers {
            let usable = listen
                .servers
                .iter()
                .enumerate()
                .filter(|(i, s)| tier(s) && !exclude.contains(i));
            let mut any = false;
            let cands: Vec<Candidate> = usable
                .inspect(|_| any = true)
                .filter(|(i, s)| s.cfg.maxconn == 0 || self.cur[*i] < s.cfg.maxconn)
                .map(|(idx, s)| Candidate {
                    idx,
                    cur: self.cur[idx],
                    weight: s.weight(),
                })
                .collect();
            if let Some(idx) = balance::pick(listen.cfg.balance, &cands, &mut self.balance) {
                return Found::Server(idx);
            }
            if any {
                return Found::Full;
            }
        }
        Found::Nothing
    }

    fn take(&mut self, listen: &Arc<ListenState>, idx: usize) -> Slot {
        self.cur[idx] += 1;
        let server = &listen.servers[idx];
        raise_max(&server.counters.smax, self.cur[idx]);
        server.note_session();
        Slot {
            listen: Arc::clone(listen),
            idx,
        }
    }

    /// Hands free slots to waiters, oldest first. When no server is usable any more,
    /// waiters are released with nothing (they report "no server available").
    fn serve_queue(&mut self, listen: &Arc<ListenState>) {
        while let Some(waiter) = self.queue.pop_front() {
            if waiter.is_closed() {
                continue;
            }
            match self.find(listen, &[]) {
                Found::Server(idx) => {
                    let slot = self.take(listen, idx);
                    if let Err(slot) = waiter.send(slot) {
                        // The waiter gave up meanwhile: undo without re-entering the lock.
                        self.cur[slot.idx] -= 1;
                        std::mem::forget(slot);
                    }
                }
                Found::Full => {
                    self.queue.push_front(waiter);
                    return;
                }
                Found::Nothing => {
                    drop(waiter);
                    self.queue.clear();
                    return;
                }
            }
        }
    }
}

/// A session's place on a server. Dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    listen: Arc<ListenState>,
    idx: usize,
}

impl Slot {
    pub fn index(&self) -> usize {
        self.idx
    }

    pub fn server(&self) -> &Arc<ServerState> {
        &self.listen.servers[self.idx]
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let listen = Arc::clone(&self.listen);
        let mut d = listen.dispatch();
        d.cur[self.idx] -= 1;
        d.serve_queue(&listen);
    }
}

/// Gets a slot on a server of `listen`, avoiding the servers in `exclude` (those that
/// just failed to connect). Queues up to `queue_timeout` when all are full.
pub async fn acquire(listen: &Arc<ListenState>, exclude: &[usize]) -> Result<Slot, Refusal> {
    let waiter = {
        let mut d = listen.dispatch();
        // Newcomers queue behind earlier waiters rather than overtaking them.
        let found = if d.queued() > 0 {
            Found::Full
        } else {
            d.find(listen, exclude)
        };
        match found {
            Found::Server(idx) => return Ok(d.take(listen, idx)),
            Found::Nothing => {
                listen.counters.no_server.inc();
                return Err(Refusal::NoServer {
                    listen: listen.cfg.name.clone(),
                });
            }
            Found::Full => {
                let (tx, rx) = oneshot::channel();
                d.queue.push_back(tx);
                raise_max(&listen.counters.qmax, d.queue.len());
                rx
            }
        }
    };
    let wait = listen.cfg.timeouts.queue;
    match tokio::time::timeout(wait, waiter).await {
        Ok(Ok(slot)) => Ok(slot),
        Ok(Err(_)) => {
            listen.counters.no_server.inc();
            Err(Refusal::NoServer {
                listen: listen.cfg.name.clone(),
            })
        }
        Err(_) => {
            listen.counters.queue_timeouts.inc();
            Err(Refusal::QueueTimeout {
                listen: listen.cfg.name.clone(),
                waited: wait,
            })
        }
    }
}

/// Re-runs the queue after servers changed (came up, weight raised, went down).
pub fn servers_changed(listen: &Arc<ListenState>) {
    listen.dispatch().serve_queue(listen);
}

/// Queue length now, for stats.
pub fn queue_len(listen: &ListenState) -> usize {
    listen.dispatch().queued()
}

/// Sessions on one server now.
pub fn sessions_on(listen: &ListenState, idx: usize) -> usize {
    listen.dispatch().current().get(idx).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Balance, Check, CheckKind, Listen, OnMarkedDown, Role, Secret, Server, Timeouts,
    };
    use std::time::Duration;

    fn listen(maxconn: &[usize], backup: &[bool], queue: Duration) -> Arc<ListenState> {
        let servers = maxconn
            .iter()
            .zip(backup)
            .enumerate()
            .map(|(i, (&maxconn, &backup))| Server {
                name: format!("s{i}"),
                addr_text: "127.0.0.1:1".into(),
                addr: "127.0.0.1:1".parse().expect("addr"),
                weight: 100,
                maxconn,
                backup,
                check: Check {
                    kind: CheckKind::None,
                    interval: Duration::from_secs(2),
                    fastinter: Duration::from_secs(2),
                    downinter: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    rise: 2,
                    fall: 3,
                    user: String::new(),
                    password: Secret::default(),
                    database: String::new(),
                    query: String::new(),
                    expect_role: Role::Any,
                    error_limit: 0,
                },
                on_marked_down: OnMarkedDown::None,
                slowstart: Duration::ZERO,
            })
            .collect();
        let d = Duration::from_secs(1);
        Arc::new(ListenState::new(
            1,
            Listen {
                name: "l".into(),
                bind: "127.0.0.1:0".parse().expect("addr"),
                balance: Balance::Leastconn,
                maxconn: 100,
                backlog: 16,
                retries: 3,
                fallback_to_primary: false,
                tls: None,
                timeouts: Timeouts {
                    connect: d,
                    client: d,
                    server: d,
                    queue,
                    startup: d,
                    drain: d,
                },
                servers,
            },
            crate::events::channel(),
            Default::default(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn full_servers_queue_fifo_then_time_out() {
        let l = listen(&[1], &[false], Duration::from_secs(5));
        let first = acquire(&l, &[]).await.expect("free slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| s.index()) });
        tokio::task::yield_now().await;
        assert_eq!(queue_len(&l), 1);
        drop(first);
        assert_eq!(waiter.await.expect("join"), Ok(0));
        // Now nobody releases: the next waiter times out with 53300.
        let held = acquire(&l, &[]).await.expect("free slot");
        let err = acquire(&l, &[]).await.expect_err("queue timeout");
        assert_eq!(err.sqlstate(), "53300");
        drop(held);
        assert_eq!(l.load().0, vec![0]);
    }

    #[tokio::test]
    async fn backup_only_when_no_active_usable() {
        let l = listen(&[0, 0], &[false, true], Duration::from_secs(1));
        assert_eq!(acquire(&l, &[]).await.expect("slot").index(), 0);
        // Active excluded (it failed to connect): the backup takes the client.
        assert_eq!(acquire(&l, &[0]).await.expect("slot").index(), 1);
        l.servers[0].set_up(false);
        l.servers[1].set_up(false);
        let err = acquire(&l, &[]).await.expect_err("nothing usable");
        assert_eq!(err.sqlstate(), "57P03");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_told_when_servers_vanish() {
        let l = listen(&[1], &[false], Duration::from_secs(60));
        let _held = acquire(&l, &[]).await.expect("slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| s.index()) });
        tokio::task::yield_now().await;
        l.servers[0].set_up(false);
        servers_changed(&l);
        let err = waiter.await.expect("join").expect_err("no server");
        assert_eq!(err.sqlstate(), "57P03");
    }
}
