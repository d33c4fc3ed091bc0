//! Worker threads: one single-threaded tokio runtime per thread, each with its own event
//! loop, accepting on every listen and running its sessions to their end.
//!
//! Like HAProxy's threads, and unlike a work-stealing runtime, a session never moves
//! between threads once it runs: a socket's readiness wakes the thread that owns it, with
//! no cross-thread hand-off (futex wake-ups, shared run queues), which measured about a
//! fifth less CPU per transaction on small request/response traffic. What keeps the
//! threads evenly loaded is the accept: whichever worker accepts a client gives it to the
//! worker with the fewest sessions (itself on a tie), as HAProxy's listener does. The
//! control work (health checks, stats, reloads, signals) stays on the main thread.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker number; 0 on any other thread (the control thread).
    static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The number of the worker running the caller (0 off the workers).
pub fn current() -> usize {
    CURRENT.with(|c| c.get())
}

/// The running worker threads. Dropping it stops them: tasks still on a worker are
/// dropped (their sockets close), so drop it only once sessions are done or given up on.
pub struct Workers {
    pool: Arc<Pool>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

/// What the rest of pglb sees of the workers: where to spawn, and how loaded each is.
#[derive(Debug)]
pub struct Pool {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Sessions running on this worker.
    sessions: AtomicUsize,
}

impl Workers {
    /// Starts `count` (at least one) worker threads, named `pglb-worker-N`.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(count);
        let mut workers = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let (tx, rx) = mpsc::sync_channel(1);
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("pglb-worker-{n}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(n));
                    let _ = tx.send(runtime.handle().clone());
                    runtime.block_on(stop.cancelled());
                })?;
            threads.push(thread);
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread died while starting"))?;
            workers.push(Worker {
                handle,
                sessions: AtomicUsize::new(0),
            });
        }
        Ok(Workers {
            pool: Arc::new(Pool { workers }),
            threads,
            stop,
        })
    }

    pub fn pool(&self) -> Arc<Pool> {
        Arc::clone(&self.pool)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Pool {
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Worker `n`'s runtime (panics when out of range: indexes come from this pool).
    pub fn handle(&self, n: usize) -> &Handle {
        &self.workers[n].handle
    }

    /// The worker a new session should run on: the one with the fewest sessions,
    /// `me` (the accepting worker) on a tie, so an even load moves nothing.
    pub fn pick(&self, me: usize) -> usize {
        let load = |n: usize| {
            self.workers
                .get(n)
                .map_or(usize::MAX, |w| w.sessions.load(Relaxed))
        };
        (0..self.workers.len()).fold(me, |best, n| if load(n) < load(best) { n } else { best })
    }

    /// Sessions running on each worker, in worker order.
    pub fn sessions(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.sessions.load(Relaxed))
            .collect()
    }

    /// Counts a session on worker `n` while the returned guard lives.
    pub fn enter(self: &Arc<Self>, n: usize) -> Load {
        if let Some(w) = self.workers.get(n) {
            w.sessions.fetch_add(1, Relaxed);
        }
        Load {
            pool: Arc::clone(self),
            n,
        }
    }
}

/// One session counted on a worker.
pub struct Load {
    pool: Arc<Pool>,
    n: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(w) = self.pool.workers.get(self.n) {
            w.sessions.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_own_worker_thread() {
        let workers = Workers::start(2).expect("workers start");
        let pool = workers.pool();
        let seen: Vec<(String, usize)> = (0..pool.len())
            .map(|n| {
                let task = pool.handle(n).spawn(async {
                    tokio::task::yield_now().await;
                    let name = std::thread::current().name().map(String::from);
                    (name.unwrap_or_default(), current())
                });
                wait(task).unwrap_or_default()
            })
            .collect();
        assert_eq!(
            seen,
            [("pglb-worker-0".into(), 0), ("pglb-worker-1".into(), 1)]
        );
    }

    #[test]
    fn new_sessions_go_to_the_least_loaded_worker() {
        let workers = Workers::start(3).expect("workers start");
        let pool = workers.pool();
        assert_eq!(pool.pick(1), 1, "all even: the accepting worker keeps it");
        let a = pool.enter(1);
        assert_eq!(pool.pick(1), 0, "the first of the idle ones");
        let b = pool.enter(0);
        let c = pool.enter(2);
        assert_eq!(pool.pick(2), 2, "even again");
        drop((a, c));
        assert_eq!(pool.pick(0), 1);
        drop(b);
        assert_eq!(pool.pick(0), 0);
    }

    /// Waits for a task from a thread outside any runtime.
    pub(crate) fn wait<T>(task: tokio::task::JoinHandle<T>) -> Option<T> {
        Builder::new_current_thread()
            .build()
            .ok()?
            .block_on(task)
            .ok()
    }
}
