//! High availability for real, planned operations: on the keepalived pair with the
//! shipped deploy/keepalived configs (tests/harness/pair.rs), `systemctl stop` of pglb
//! on the master (SIGTERM), a hand-over by stopping keepalived on the master, and a
//! binary upgrade on the master (SIGUSR2). A stop refuses no client and the VIP moves; a
//! hand-over fails no connection started after the VIP left; an upgrade keeps the VIP
//! where it is and fails nothing.
//!
//! Needs root (network namespaces, keepalived); CI runs as root.

mod harness;

use std::time::{Duration, Instant};

use harness::pair::{Lab, Probe, TARGET};
use nix::sys::signal::Signal;

#[test]
fn planned_stop_hand_over_and_upgrade_refuse_no_client() {
    Lab::run("failover_planned", scenario);
}

/// The operations, in order; each leaves one master and a healthy backup for the next.
fn scenario(lab: &mut Lab) {
    let client = lab.client.clone();
    let (lb1, lb2) = (0usize, 1usize);

    // ---- b. a planned stop: SIGTERM pglb on the master (lb1) under a connect loop.
    let mut row = lab.failover(
        "b. SIGTERM pglb on master lb1 (systemctl stop)",
        lb1,
        Duration::from_millis(50),
        |lab| lab.nodes[lb1].signal_pglb(Signal::SIGTERM),
    );
    // pglb keeps accepting while keepalived moves the VIP: nothing is refused; only a
    // connection in flight at the very moment the VIP moves can be cut.
    let refused = row
        .probe
        .errors
        .iter()
        .filter(|e| e.contains("refused"))
        .count();
    assert_eq!(
        refused, 0,
        "a stop refused connections: {:?}",
        row.probe.errors
    );
    let off = row.off.map_or(i128::MAX, |d| d.as_millis() as i128);
    let after: Vec<_> = row
        .probe
        .fails
        .iter()
        .filter(|(at, _)| *at >= off + 100)
        .collect();
    assert!(
        after.is_empty(),
        "connections after the move failed: {after:?} {:?}",
        row.probe.errors
    );
    // How many are in flight at the move depends on how slowly psql logs in on a loaded
    // machine; what must hold is that each failure was open while the VIP left lb1 (the
    // move is polled every 20 ms): one that ended before was cut by pglb itself.
    let before: Vec<_> = row
        .probe
        .fails
        .iter()
        .filter(|(at, took)| at + (*took as i128) < off - 50)
        .collect();
    assert!(
        before.is_empty(),
        "connections ended failing before the VIP left lb1: {before:?} {:?}",
        row.probe.errors
    );
    row.note = format!(
        "{} failed (in flight at the move), 0 refused",
        row.probe.failed
    );
    lab.rows.push(row);
    lab.nodes[lb1]
        .pglb
        .as_mut()
        .map(|p| p.wait_exit(Duration::from_secs(8)));
    lab.nodes[lb1].pglb = None;
    let seen = lab.nodes[lb1].states().len();
    lab.nodes[lb1].start_pglb();
    lab.nodes[lb1].wait_state("BACKUP", seen, Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(1000));

    // ---- c. planned hand-over back to lb1: SIGTERM keepalived on lb2 (priority-0
    //         adverts).
    let mut row = lab.failover(
        "c. planned: SIGTERM keepalived on lb2",
        lb2,
        Duration::from_millis(50),
        |lab| {
            lab.nodes[lb2]
                .keepalived
                .as_ref()
                .unwrap()
                .proc
                .signal(Signal::SIGTERM)
        },
    );
    // A connection open while the VIP moves lives on the old master and is cut; every
    // connection started after the VIP left lb2 must succeed (at worst after a SYN
    // retransmission while the client's ARP entry still names lb2).
    let off = row.off.expect("VIP removed from lb2").as_millis() as i128;
    let cut = row.probe.fails.iter().filter(|(at, _)| *at < off).count();
    let after: Vec<_> = row
        .probe
        .fails
        .iter()
        .filter(|(at, _)| *at >= off)
        .collect();
    assert!(
        after.is_empty(),
        "planned hand-over: connections started after the VIP left lb2 failed: {after:?} {:?}",
        row.probe.errors
    );
    assert!(row.vip < TARGET, "planned hand-over took {:?}", row.vip);
    row.note = format!("{cut} in flight at the move cut; 0 later");
    lab.rows.push(row);
    lab.nodes[lb2].keepalived.as_mut().unwrap().terminate();
    lab.restart_keepalived(lb2);

    // ---- d. binary upgrade on the master (SIGUSR2): the VIP does not move, nothing fails.
    let master = lab.master();
    let probe = Probe::start(
        &client,
        Duration::from_millis(50),
        200,
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    lab.nodes[master].signal_pglb(Signal::SIGUSR2);
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(4) {
        assert_eq!(lab.master(), master, "the VIP stays during an upgrade");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = probe.finish(t0);
    println!(
        "d. binary upgrade (SIGUSR2) on master {}: VIP stayed; {} of {} connections failed: {:?}",
        lab.nodes[master].name, stats.failed, stats.attempts, stats.errors
    );
    assert_eq!(
        stats.failed, 0,
        "connections failed during the upgrade: {:?}",
        stats.errors
    );
    let log = lab.nodes[master].pglb_log();
    assert!(log.contains("upgrade: the new process serves"), "{log}");
    // The successor is this test's too, though no guard holds it: `Lab::run` stops it by
    // its pid, also when the test fails.
    assert!(
        harness::successor_pid(&log).is_some(),
        "the successor's pid in the log"
    );
}
