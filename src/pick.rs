//! Picking a server: choose one with room (see `balance`), or wait in the listen's FIFO
//! queue until one frees a place. A [`Slot`] is a session's place on a server; dropping
//! it frees the place and hands it to the first waiter.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;

use crate::balance::{self, Candidate};
use crate::counters::{Counter, raise_max};
use crate::refusal::Refusal;
use crate::state::{Dispatch, ListenState, ServerState};

/// What a pick found.
enum Found {
    Server(Arc<ServerState>),
    /// Usable servers exist but all are at maxconn.
    Full,
    /// No usable server at all.
    Nothing,
}

/// Active servers first; backups only when no active server is usable at all; last, on a
/// replica listen, healthy primaries (when `fallback_to_primary`). Called with the
/// listen's dispatch lock held.
fn find(d: &mut Dispatch, listen: &ListenState, exclude: &[Arc<ServerState>]) -> Found {
    let servers = listen.servers();
    let cfg = listen.cfg();
    let fallback = cfg.fallback_to_primary;
    let tiers: [&dyn Fn(&ServerState) -> bool; 3] = [
        &|s| !s.is_backup() && s.usable(),
        &|s| s.is_backup() && s.usable(),
        &|s| fallback && s.weight() > 0 && !s.is_removed() && s.fallback_ok.load(Relaxed),
    ];
    for tier in tiers {
        let usable = servers
            .iter()
            .enumerate()
            .filter(|(_, s)| tier(s) && !exclude.iter().any(|x| Arc::ptr_eq(x, s)));
        let mut any = false;
        let cands: Vec<Candidate> = usable
            .inspect(|_| any = true)
            .filter(|(_, s)| s.has_room())
            .map(|(idx, s)| Candidate {
                idx,
                cur: s.sessions(),
                weight: s.weight(),
            })
            .collect();
        if let Some(idx) = balance::pick(cfg.balance, &cands, &mut d.balance) {
            return Found::Server(Arc::clone(&servers[idx]));
        }
        if any {
            return Found::Full;
        }
    }
    Found::Nothing
}

/// Counts a session on `server` (dispatch lock held).
fn count_in(server: &ServerState) {
    let now = server.add_session(1);
    raise_max(&server.counters.smax, now);
    server.note_session();
}

/// Hands free places to waiters, oldest first. When no server is usable any more,
/// waiters are released with nothing (they report "no server available").
fn serve_queue(d: &mut Dispatch, listen: &ListenState) {
    while let Some(waiter) = d.queue.pop_front() {
        if waiter.is_closed() {
            continue;
        }
        match find(d, listen, &[]) {
            Found::Server(server) => {
                count_in(&server);
                if let Err(server) = waiter.send(server) {
                    // The waiter gave up meanwhile: give the place back; the loop goes
                    // on serving (the lock is held, so no re-entry).
                    server.add_session(-1);
                }
            }
            Found::Full => {
                d.queue.push_front(waiter);
                return;
            }
            Found::Nothing => {
                drop(waiter);
                d.queue.clear();
                return;
            }
        }
    }
}

/// A session's place on a server. Dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    listen: Arc<ListenState>,
    server: Arc<ServerState>,
}

impl Slot {
    pub fn server(&self) -> &Arc<ServerState> {
        &self.server
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut d = self.listen.dispatch();
        self.server.add_session(-1);
        serve_queue(&mut d, &self.listen);
    }
}

/// A client in the queue. A place sent to it is counted on its server already: when the
/// client leaves between that send and its receive, dropping the waiter frees the place.
struct Waiter {
    listen: Arc<ListenState>,
    rx: oneshot::Receiver<Arc<ServerState>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(server) = self.rx.try_recv() {
            drop(Slot {
                listen: Arc::clone(&self.listen),
                server,
            });
        }
    }
}

/// Gets a place on a server of `listen`, avoiding the servers in `exclude` (those that
/// already failed this client). Queues up to `queue_timeout` when all are full.
pub async fn acquire(
    listen: &Arc<ListenState>,
    exclude: &[Arc<ServerState>],
) -> Result<Slot, Refusal> {
    let mut waiter = {
        let mut d = listen.dispatch();
        // Newcomers queue behind earlier waiters rather than overtaking them.
        let found = if d.queued() > 0 {
            Found::Full
        } else {
            find(&mut d, listen, exclude)
        };
        match found {
            Found::Server(server) => {
                count_in(&server);
                let listen = Arc::clone(listen);
                return Ok(Slot { listen, server });
            }
            Found::Nothing => {
                return Err(Refusal::NoServer {
                    listen: listen.name.clone(),
                });
            }
            Found::Full => {
                let (tx, rx) = oneshot::channel();
                d.queue.push_back(tx);
                raise_max(&listen.counters.qmax, d.queue.len());
                Waiter {
                    listen: Arc::clone(listen),
                    rx,
                }
            }
        }
    };
    let wait = listen.cfg().timeouts.queue;
    match tokio::time::timeout(wait, &mut waiter.rx).await {
        Ok(Ok(server)) => Ok(Slot {
            listen: Arc::clone(listen),
            server,
        }),
        Ok(Err(_)) => Err(Refusal::NoServer {
            listen: listen.name.clone(),
        }),
        Err(_) => {
            listen.counters.queue_timeouts.inc();
            Err(Refusal::QueueTimeout {
                listen: listen.name.clone(),
                waited: wait,
            })
        }
    }
}

/// Re-runs the queue after servers changed (came up, weight raised, went down).
pub fn servers_changed(listen: &Arc<ListenState>) {
    serve_queue(&mut listen.dispatch(), listen);
}

/// Queue length now, for stats.
pub fn queue_len(listen: &ListenState) -> usize {
    listen.dispatch().queued()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{
        Balance, Check, CheckKind, Listen, OnMarkedDown, Role, Secret, Server, Timeouts,
    };
    use std::time::Duration;

    pub(crate) fn server(name: &str, maxconn: usize, backup: bool) -> Server {
        Server {
            name: name.into(),
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
        }
    }

    pub(crate) fn listen_cfg(servers: Vec<Server>, queue: Duration) -> Listen {
        let d = Duration::from_secs(1);
        Listen {
            relay: Default::default(),
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
                login: d,
                queue,
                startup: d,
                drain: d,
            },
            servers,
        }
    }

    fn listen(maxconn: &[usize], backup: &[bool], queue: Duration) -> Arc<ListenState> {
        let servers = maxconn
            .iter()
            .zip(backup)
            .enumerate()
            .map(|(i, (&maxconn, &backup))| server(&format!("s{i}"), maxconn, backup))
            .collect();
        Arc::new(ListenState::new(
            1,
            listen_cfg(servers, queue),
            crate::events::channel(),
        ))
    }

    fn sessions(l: &ListenState) -> Vec<usize> {
        l.servers().iter().map(|s| s.sessions()).collect()
    }

    fn name(slot: &Slot) -> String {
        slot.server().name.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn full_servers_queue_fifo_then_time_out() {
        let l = listen(&[1], &[false], Duration::from_secs(5));
        let first = acquire(&l, &[]).await.expect("free slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| name(&s)) });
        tokio::task::yield_now().await;
        assert_eq!(queue_len(&l), 1);
        drop(first);
        assert_eq!(waiter.await.expect("join"), Ok("s0".to_owned()));
        // Now nobody releases: the next waiter times out with 53300.
        let held = acquire(&l, &[]).await.expect("free slot");
        let err = acquire(&l, &[]).await.expect_err("queue timeout");
        assert_eq!(err.sqlstate(), "53300");
        drop(held);
        assert_eq!(sessions(&l), vec![0]);
    }

    #[tokio::test]
    async fn backup_only_when_no_active_usable() {
        let l = listen(&[0, 0], &[false, true], Duration::from_secs(1));
        let active = Arc::clone(&l.servers()[0]);
        assert_eq!(name(&acquire(&l, &[]).await.expect("slot")), "s0");
        // Active excluded (it failed): the backup takes the client.
        assert_eq!(
            name(&acquire(&l, &[Arc::clone(&active)]).await.expect("slot")),
            "s1"
        );
        for s in l.servers().iter() {
            s.set_up(false);
        }
        let err = acquire(&l, &[]).await.expect_err("nothing usable");
        assert_eq!(err.sqlstate(), "57P03");
    }

    /// As HAProxy: an active server at its maxconn makes clients queue for it; the
    /// backup is for when no active server is usable, not for overflow.
    #[tokio::test(start_paused = true)]
    async fn a_full_active_server_queues_clients_rather_than_spilling_to_the_backup() {
        let l = listen(&[1, 0], &[false, true], Duration::from_secs(60));
        let held = acquire(&l, &[]).await.expect("slot");
        assert_eq!(name(&held), "s0");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| name(&s)) });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "queued, not sent to the backup");
        drop(held);
        let got = waiter.await.expect("join").expect("slot once s0 has room");
        assert_eq!(got, "s0");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_told_when_servers_vanish() {
        let l = listen(&[1], &[false], Duration::from_secs(60));
        let _held = acquire(&l, &[]).await.expect("slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| name(&s)) });
        tokio::task::yield_now().await;
        l.servers()[0].set_up(false);
        servers_changed(&l);
        let err = waiter.await.expect("join").expect_err("no server");
        assert_eq!(err.sqlstate(), "57P03");
    }

    #[tokio::test]
    async fn a_waiter_that_left_gives_its_place_back() {
        let l = listen(&[1], &[false], Duration::from_secs(60));
        let held = acquire(&l, &[]).await.expect("slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| name(&s)) });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(
            sessions(&l),
            vec![0],
            "no place leaked to the waiter that left"
        );
        assert!(acquire(&l, &[]).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiter_that_left_after_being_served_gives_the_place_back() {
        // The place is counted and sent, but the waiter is gone before it reads it.
        let l = listen(&[1], &[false], Duration::from_secs(60));
        let held = acquire(&l, &[]).await.expect("slot");
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move { acquire(&l2, &[]).await.map(|s| name(&s)) });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(sessions(&l), vec![1], "counted for the waiter");
        waiter.abort();
        assert!(waiter.await.is_err(), "aborted before it ran again");
        assert_eq!(sessions(&l), vec![0], "no place leaked");
    }

    #[tokio::test]
    async fn sessions_of_every_configuration_count_against_one_limit() {
        // Server maxconn 2; a reload with the same settings and one that changes the
        // weight: sessions from before still count, so a third is queued, not admitted.
        let l = listen(&[2], &[false], Duration::from_millis(50));
        let a = acquire(&l, &[]).await.expect("slot");
        l.reconfigure(1, l.cfg().as_ref().clone());
        let mut changed = l.cfg().as_ref().clone();
        changed.servers[0].weight = 50;
        l.reconfigure(1, changed);
        let b = acquire(&l, &[]).await.expect("slot");
        assert!(
            Arc::ptr_eq(a.server(), b.server()),
            "one server, one identity"
        );
        assert_eq!(sessions(&l), vec![2]);
        assert_eq!(
            acquire(&l, &[]).await.expect_err("full").sqlstate(),
            "53300"
        );
        // A lowered maxconn applies to the next client.
        let mut lowered = l.cfg().as_ref().clone();
        lowered.servers[0].maxconn = 1;
        l.reconfigure(1, lowered);
        drop(a);
        assert!(acquire(&l, &[]).await.is_err(), "1 session, maxconn now 1");
        drop(b);
        assert!(acquire(&l, &[]).await.is_ok());
    }

    #[tokio::test]
    async fn a_removed_server_lingers_until_its_last_session_ends() {
        let l = listen(&[0, 0], &[false, false], Duration::from_millis(50));
        let on_s1 = acquire(&l, &[Arc::clone(&l.servers()[0])])
            .await
            .expect("slot");
        assert_eq!(name(&on_s1), "s1");
        let drain = on_s1.server().session_signals().drain;
        let mut only_s0 = l.cfg().as_ref().clone();
        only_s0.servers.truncate(1);
        l.reconfigure(1, only_s0);
        assert!(drain.is_cancelled(), "its sessions drain");
        let lingering = l.lingering();
        assert_eq!(lingering.len(), 1);
        assert_eq!(
            lingering[0].status_of(&lingering[0].health()),
            "DRAIN (removed)"
        );
        for _ in 0..3 {
            assert_eq!(name(&acquire(&l, &[]).await.expect("slot")), "s0");
        }
        drop(on_s1);
        assert!(l.lingering().is_empty(), "gone with its last session");
    }
}
