//! A server's health as HAProxy models it: a counter from 0 to rise+fall-1, UP at or above
//! `rise`. Pure state: the checker (`checker.rs`) feeds it results and acts on transitions,
//! the stats read it.

use std::time::{Duration, Instant, SystemTime};

use crate::config::{Check, CheckKind};

/// HAProxy's check_status codes; tools that read the stats CSV know these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Not checked yet.
    Ini,
    /// A local socket error (no descriptor, …).
    SockErr,
    L4Ok,
    L4Tout,
    L4Con,
    L6Ok,
    L6Tout,
    L6Rsp,
    L7Ok,
    L7Tout,
    L7Rsp,
    L7Sts,
}

impl CheckStatus {
    pub fn code(self) -> &'static str {
        match self {
            CheckStatus::Ini => "INI",
            CheckStatus::SockErr => "SOCKERR",
            CheckStatus::L4Ok => "L4OK",
            CheckStatus::L4Tout => "L4TOUT",
            CheckStatus::L4Con => "L4CON",
            CheckStatus::L6Ok => "L6OK",
            CheckStatus::L6Tout => "L6TOUT",
            CheckStatus::L6Rsp => "L6RSP",
            CheckStatus::L7Ok => "L7OK",
            CheckStatus::L7Tout => "L7TOUT",
            CheckStatus::L7Rsp => "L7RSP",
            CheckStatus::L7Sts => "L7STS",
        }
    }

    /// HAProxy's description, used in log lines ("reason: …") and check_desc.
    pub fn description(self) -> &'static str {
        match self {
            CheckStatus::Ini => "Initializing",
            CheckStatus::SockErr => "Socket error",
            CheckStatus::L4Ok => "Layer4 check passed",
            CheckStatus::L4Tout => "Layer4 timeout",
            CheckStatus::L4Con => "Layer4 connection problem",
            CheckStatus::L6Ok => "Layer6 check passed",
            CheckStatus::L6Tout => "Layer6 timeout",
            CheckStatus::L6Rsp => "Layer6 invalid response",
            CheckStatus::L7Ok => "Layer7 check passed",
            CheckStatus::L7Tout => "Layer7 timeout",
            CheckStatus::L7Rsp => "Layer7 invalid response",
            CheckStatus::L7Sts => "Layer7 wrong status",
        }
    }

    pub fn passed(self) -> bool {
        matches!(
            self,
            CheckStatus::L4Ok | CheckStatus::L6Ok | CheckStatus::L7Ok
        )
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub status: CheckStatus,
    /// SQLSTATE from an ErrorResponse, when the server sent one.
    pub code: Option<String>,
    /// What happened, in words: the PostgreSQL message or the socket error.
    pub detail: String,
    pub duration: Duration,
    /// The server's role when a query check saw it: Some(true) for a primary.
    pub primary: Option<bool>,
}

impl CheckResult {
    pub fn new(status: CheckStatus, detail: impl Into<String>) -> Self {
        CheckResult {
            status,
            code: None,
            detail: detail.into(),
            duration: Duration::ZERO,
            primary: None,
        }
    }
}

/// A change of the UP/DOWN verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// Health of one server. Owned by `ServerState` behind a mutex.
#[derive(Debug, Clone)]
pub struct Health {
    pub checked: bool,
    /// 0 ..= rise+fall-1; UP when `up` (reached `rise` and not yet fallen).
    pub counter: u32,
    pub rise: u32,
    pub fall: u32,
    pub up: bool,
    pub last: Option<(CheckResult, SystemTime)>,
    /// Failed checks ever (chkfail).
    pub failures: u64,
    /// UP→DOWN transitions (chkdown).
    pub downs: u64,
    /// When the verdict last changed (lastchg).
    pub changed: Instant,
    /// Time spent DOWN before the current period (downtime).
    pub downtime: Duration,
    /// Has been UP at least once (the first pass is not worth an alert).
    pub ever_up: bool,
}

impl Health {
    /// A checked server starts DOWN, one success short of UP: it takes no client before
    /// a check has passed. An unchecked one is UP for good.
    pub fn new(check: &Check) -> Self {
        let checked = check.kind != CheckKind::None;
        Health {
            checked,
            counter: if checked { check.rise - 1 } else { 0 },
            rise: check.rise,
            fall: check.fall,
            up: !checked,
            last: None,
            failures: 0,
            downs: 0,
            changed: Instant::now(),
            downtime: Duration::ZERO,
            ever_up: !checked,
        }
    }

    fn max(&self) -> u32 {
        self.rise + self.fall - 1
    }

    /// Applies one result (HAProxy's rules): when UP, each failure lowers the counter and
    /// the `fall`-th in a row marks DOWN; when DOWN, each success raises it and the
    /// `rise`-th marks UP.
    pub fn record(&mut self, result: CheckResult, now: Instant) -> Option<Transition> {
        let passed = result.status.passed();
        self.last = Some((result, SystemTime::now()));
        if passed {
            if self.up {
                self.counter = self.max();
                return None;
            }
            self.counter += 1;
            if self.counter >= self.rise {
                return Some(self.set_up(now));
            }
            None
        } else {
            if !self.up {
                // As HAProxy: failures are counted while UP only (chkfail). A server
                // whose very first check fails has been DOWN since the start: one
                // transition (chkdown), downtime from the start.
                if self.downs == 0 && !self.ever_up {
                    self.downs = 1;
                }
                self.counter = 0;
                return None;
            }
            self.failures += 1;
            if self.counter > self.rise {
                self.counter -= 1;
                return None;
            }
            Some(self.set_down(now))
        }
    }

    /// Marks DOWN at once (passive health: errors on live traffic).
    pub fn force_down(&mut self, result: CheckResult, now: Instant) -> Option<Transition> {
        self.last = Some((result, SystemTime::now()));
        if self.up {
            self.failures += 1;
            Some(self.set_down(now))
        } else {
            None
        }
    }

    fn set_up(&mut self, now: Instant) -> Transition {
        // The wait for the very first check is not downtime.
        if self.downs > 0 {
            self.downtime += now.saturating_duration_since(self.changed);
        }
        self.up = true;
        self.ever_up = true;
        self.counter = self.max();
        self.changed = now;
        Transition::WentUp
    }

    fn set_down(&mut self, now: Instant) -> Transition {
        self.up = false;
        self.counter = 0;
        self.downs += 1;
        self.changed = now;
        Transition::WentDown
    }

    /// Total time DOWN so far, the current period included.
    pub fn downtime(&self, now: Instant) -> Duration {
        if self.up || self.downs == 0 {
            self.downtime
        } else {
            self.downtime + now.saturating_duration_since(self.changed)
        }
    }

    /// HAProxy's status text: `UP`, `UP 1/3` (failing), `DOWN`, `DOWN 1/2` (recovering),
    /// `no check`.
    pub fn status_text(&self) -> String {
        if !self.checked {
            return "no check".into();
        }
        if self.up {
            let failed = self.max() - self.counter;
            if failed == 0 {
                "UP".into()
            } else {
                format!("UP {failed}/{}", self.fall)
            }
        } else if self.counter == 0 {
            "DOWN".into()
        } else {
            format!("DOWN {}/{}", self.counter, self.rise)
        }
    }

    /// Whether the verdict is settled (no change under way).
    pub fn settled(&self) -> bool {
        (self.up && self.counter == self.max()) || (!self.up && self.counter == 0)
    }

    /// The wait before the next check: `interval` when settled UP, `downinter` when settled
    /// DOWN, `fastinter` while changing.
    pub fn next_interval(&self, check: &Check) -> Duration {
        match (self.up, self.settled()) {
            (true, true) => check.interval,
            (false, true) => check.downinter,
            _ => check.fastinter,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Role, Secret};

    /// A tcp check with these thresholds (also used by the checker's tests).
    pub(crate) fn check(rise: u32, fall: u32) -> Check {
        Check {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            fastinter: Duration::from_millis(500),
            downinter: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            rise,
            fall,
            user: "u".into(),
            password: Secret::default(),
            database: "d".into(),
            query: "SELECT 1".into(),
            expect_role: Role::Any,
            error_limit: 3,
        }
    }

    fn ok() -> CheckResult {
        CheckResult::new(CheckStatus::L4Ok, "")
    }
    fn bad() -> CheckResult {
        CheckResult::new(CheckStatus::L4Con, "Connection refused")
    }

    #[test]
    fn starts_down_and_rises_after_one_pass() {
        let c = check(2, 3);
        let mut h = Health::new(&c);
        let now = Instant::now();
        assert!(!h.up);
        assert_eq!(h.status_text(), "DOWN 1/2");
        assert_eq!(h.record(ok(), now), Some(Transition::WentUp));
        assert_eq!(h.status_text(), "UP");
        assert_eq!(h.next_interval(&c), c.interval);
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_passes() {
        let c = check(2, 3);
        let mut h = Health::new(&c);
        let now = Instant::now();
        h.record(ok(), now);
        assert_eq!(h.record(bad(), now), None);
        assert_eq!(h.status_text(), "UP 1/3");
        assert_eq!(h.next_interval(&c), c.fastinter);
        assert_eq!(h.record(bad(), now), None);
        assert_eq!(h.status_text(), "UP 2/3");
        assert_eq!(h.record(bad(), now), Some(Transition::WentDown));
        assert_eq!(h.status_text(), "DOWN");
        assert_eq!(h.next_interval(&c), c.downinter);
        assert_eq!((h.failures, h.downs), (3, 1));
        assert_eq!(h.record(bad(), now), None);
        assert_eq!(
            h.failures, 3,
            "failures while DOWN are not counted (HAProxy's chkfail)"
        );
        assert_eq!(h.record(ok(), now), None);
        assert_eq!(h.status_text(), "DOWN 1/2");
        // A failure while recovering starts the count again.
        assert_eq!(h.record(bad(), now), None);
        assert_eq!(h.status_text(), "DOWN");
        h.record(ok(), now);
        assert_eq!(h.record(ok(), now), Some(Transition::WentUp));
        assert_eq!(h.status_text(), "UP");
    }

    #[test]
    fn a_server_down_from_the_start_counts_one_down_and_its_downtime() {
        let c = check(2, 3);
        let mut h = Health::new(&c);
        let t0 = h.changed;
        h.record(bad(), t0 + Duration::from_secs(1));
        h.record(bad(), t0 + Duration::from_secs(2));
        assert_eq!((h.failures, h.downs), (0, 1));
        assert_eq!(
            h.downtime(t0 + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        // A server that passes its first check was never down.
        let mut fine = Health::new(&c);
        fine.record(ok(), fine.changed);
        assert_eq!(
            (
                fine.downs,
                fine.downtime(fine.changed + Duration::from_secs(5))
            ),
            (0, Duration::ZERO)
        );
    }

    #[test]
    fn a_pass_resets_a_partial_fall() {
        let c = check(2, 3);
        let mut h = Health::new(&c);
        let now = Instant::now();
        h.record(ok(), now);
        h.record(bad(), now);
        h.record(bad(), now);
        h.record(ok(), now);
        assert_eq!(h.status_text(), "UP");
        assert_eq!(h.record(bad(), now), None, "needs three new failures");
    }

    #[test]
    fn unchecked_servers_are_up() {
        let mut c = check(2, 3);
        c.kind = CheckKind::None;
        let h = Health::new(&c);
        assert!(h.up);
        assert_eq!(h.status_text(), "no check");
    }

    #[test]
    fn downtime_accumulates() {
        let c = check(1, 1);
        let mut h = Health::new(&c);
        let t0 = Instant::now();
        h.record(ok(), t0);
        h.record(bad(), t0 + Duration::from_secs(10));
        assert_eq!(
            h.downtime(t0 + Duration::from_secs(15)),
            Duration::from_secs(5)
        );
        h.record(ok(), t0 + Duration::from_secs(20));
        assert_eq!(
            h.downtime(t0 + Duration::from_secs(99)),
            Duration::from_secs(10)
        );
    }
}
