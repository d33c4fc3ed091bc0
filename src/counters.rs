//! Counter primitives the model and the data path share: monotonic counters (one cache
//! line per worker where every relayed chunk bumps them), high-water marks, per-second
//! rates, and a size-changeable admission gate (maxconn).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Locks a mutex whose data stays usable even if a holder panicked (counters and
/// health verdicts are always in a consistent state between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Monotonic counter helpers; Relaxed is enough for statistics.
pub trait Counter {
    fn inc(&self);
    fn add(&self, n: u64);
    fn get(&self) -> u64;
}

impl Counter for AtomicU64 {
    fn inc(&self) {
        self.fetch_add(1, Relaxed);
    }
    fn add(&self, n: u64) {
        self.fetch_add(n, Relaxed);
    }
    fn get(&self) -> u64 {
        self.load(Relaxed)
    }
}

/// A counter every worker bumps on every relayed chunk (bytes in and out). Each worker
/// adds to a cache line of its own, so two cores relaying for the same server or listen
/// never pass one line back and forth; a read adds the lines up. Workers beyond
/// `STRIPES` share lines, which is still correct, only less spread.
#[derive(Debug, Default)]
pub struct StripedCounter([Stripe; STRIPES]);

const STRIPES: usize = 8;

/// One counter alone on its cache line (128 bytes: x86 fetches lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

impl StripedCounter {
    /// Back to zero (`clear counters all`).
    pub fn clear(&self) {
        for s in &self.0 {
            s.0.store(0, Relaxed);
        }
    }
}

impl Counter for StripedCounter {
    fn inc(&self) {
        self.add(1);
    }
    fn add(&self, n: u64) {
        self.0[crate::workers::current() % STRIPES]
            .0
            .fetch_add(n, Relaxed);
    }
    fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Relaxed)))
    }
}

/// Raises a high-water mark.
pub fn raise_max(max: &AtomicUsize, value: usize) {
    max.fetch_max(value, Relaxed);
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sessions per second, as HAProxy shows it: the count of the current second (or of the
/// last one, right after it ends), and the highest seen.
#[derive(Debug, Default)]
pub struct Rate {
    /// Unix second in the high 32 bits, count in that second in the low 32.
    packed: AtomicU64,
    max: AtomicU64,
}

impl Rate {
    pub fn tick(&self) {
        let now = unix_now() & 0xffff_ffff;
        let mut cur = self.packed.load(Relaxed);
        loop {
            let next = if cur >> 32 == now {
                cur + 1
            } else {
                now << 32 | 1
            };
            match self
                .packed
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => {
                    self.max.fetch_max(next & 0xffff_ffff, Relaxed);
                    return;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Forgets the highest rate (and with `all` the current count).
    pub fn clear(&self, all: bool) {
        self.max.store(0, Relaxed);
        if all {
            self.packed.store(0, Relaxed);
        }
    }

    /// (rate, rate_max).
    pub fn read(&self) -> (u64, u64) {
        let now = unix_now() & 0xffff_ffff;
        let p = self.packed.load(Relaxed);
        let rate = if p >> 32 == now || p >> 32 == now.wrapping_sub(1) {
            p & 0xffff_ffff
        } else {
            0
        };
        (rate, self.max.load(Relaxed))
    }
}

/// HAProxy's sliding average of the last [`SAMPLES`] values (its `swrate`: each new value
/// replaces 1/N of the sum), and the highest value seen. Used for the queue, connect and
/// total times of sessions (the CSV's qtime/ctime/ttime and their *_max).
#[derive(Debug, Default)]
pub struct SlidingAvg {
    /// (sum, samples so far, capped at SAMPLES).
    sum: Mutex<(u64, u64)>,
    max: AtomicU64,
}

/// Samples the sliding averages span.
pub const SAMPLES: u64 = 1024;

impl SlidingAvg {
    pub fn add(&self, value: u64) {
        self.max.fetch_max(value, Relaxed);
        let mut s = lock(&self.sum);
        if s.1 < SAMPLES {
            s.0 += value;
            s.1 += 1;
        } else {
            s.0 = s.0 - s.0 / SAMPLES + value;
        }
    }

    /// The average (0 before any sample).
    pub fn average(&self) -> u64 {
        let s = lock(&self.sum);
        s.0.checked_div(s.1).unwrap_or(0)
    }

    pub fn max(&self) -> u64 {
        self.max.load(Relaxed)
    }

    pub fn clear(&self, all: bool) {
        self.max.store(0, Relaxed);
        if all {
            *lock(&self.sum) = (0, 0);
        }
    }
}

/// The times of sessions HAProxy reports per server and backend, in milliseconds: the
/// wait for a server place (queue), the connect, and the whole session.
#[derive(Debug, Default)]
pub struct SessionTimes {
    pub queue: SlidingAvg,
    pub connect: SlidingAvg,
    pub total: SlidingAvg,
}

impl SessionTimes {
    pub fn clear(&self, all: bool) {
        self.queue.clear(all);
        self.connect.clear(all);
        self.total.clear(all);
    }
}

/// A limit on concurrent holders that can be changed while held (listen and global
/// maxconn). Lowering it refuses newcomers at once; holders beyond the new limit are not
/// disturbed, they just keep newcomers out until enough have left.
#[derive(Debug)]
pub struct Gate {
    limit: AtomicUsize,
    used: AtomicUsize,
}

/// One place inside a [`Gate`], released on drop.
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Gate {
    pub fn new(limit: usize) -> Arc<Gate> {
        Arc::new(Gate {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        })
    }

    /// A place, unless `limit` holders are inside already.
    pub fn try_enter(self: &Arc<Self>) -> Option<Pass> {
        let limit = self.limit.load(Relaxed);
        self.used
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Pass(Arc::clone(self)))
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Holders now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Workers;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn a_striped_counter_adds_up_what_every_worker_counted() {
        let workers = Workers::start(3).expect("workers start");
        let pool = workers.pool();
        let counter = Arc::new(StripedCounter::default());
        counter.add(5); // off the workers: stripe 0, shared with worker 0
        for n in 0..pool.len() {
            let c = Arc::clone(&counter);
            let task = pool.handle(n).spawn(async move {
                for _ in 0..1000 {
                    c.add(3);
                }
                c.inc();
            });
            crate::workers::tests::wait(task).expect("task ran");
        }
        assert_eq!(counter.get(), 5 + 3 * 3001);
        let used = counter.0.iter().filter(|s| s.0.load(Relaxed) > 0).count();
        assert_eq!(
            used, 3,
            "one stripe per worker; other threads share worker 0's"
        );
    }

    #[test]
    fn sliding_averages_follow_the_last_samples() {
        let a = SlidingAvg::default();
        assert_eq!(a.average(), 0);
        a.add(10);
        a.add(30);
        assert_eq!((a.average(), a.max()), (20, 30));
        for _ in 0..20 * SAMPLES {
            a.add(100);
        }
        assert!((99..=100).contains(&a.average()), "{}", a.average());
        assert_eq!(a.max(), 100);
    }

    #[test]
    fn a_lowered_gate_refuses_newcomers_until_holders_leave() {
        let gate = Gate::new(3);
        let held: Vec<Pass> = (0..3).filter_map(|_| gate.try_enter()).collect();
        assert_eq!(held.len(), 3);
        assert!(gate.try_enter().is_none(), "full");
        gate.set_limit(1);
        let mut held = held;
        held.pop();
        assert!(gate.try_enter().is_none(), "2 holders, limit 1");
        held.pop();
        assert!(gate.try_enter().is_none(), "1 holder, limit 1");
        held.pop();
        let pass = gate.try_enter();
        assert!(pass.is_some());
        assert_eq!(gate.used(), 1);
        drop(pass);
        assert_eq!(gate.used(), 0);
    }
}
