//! High availability for real, the PgBouncers behind the pair: on the keepalived pair
//! with the shipped deploy/keepalived configs (tests/harness/pair.rs), every PgBouncer
//! goes down (both nodes lose priority, neither goes FAULT, the VIP stays and clients get
//! pglb's error at once), then a PgBouncer drained on the master stays drained after a
//! failover (the drain reached the other node through the peers).
//!
//! Needs root (network namespaces, keepalived); CI runs as root.

mod harness;

use std::time::{Duration, Instant};

use harness::pair::{Lab, admin, in_netns, psql_vip};
use nix::sys::signal::Signal;

#[test]
fn pgbouncers_down_keep_the_vip_and_a_drain_outlives_the_failover() {
    Lab::run("failover_servers", scenario);
}

fn scenario(lab: &mut Lab) {
    let client = lab.client.clone();

    // ---- b. every PgBouncer down: both nodes lose priority, neither goes FAULT, the VIP
    //         stays where it is and clients get pglb's error at once.
    let master = lab.master();
    for b in &mut lab.db.bouncers {
        b.kill();
    }
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(4) {
        assert_eq!(lab.master(), master, "the VIP stays on one node");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    let err = psql_vip(&client, "SELECT 1").expect_err("no server");
    let took = t0.elapsed();
    assert!(err.contains("has no server available"), "{err}");
    assert!(took < Duration::from_secs(1), "the FATAL took {took:?}");
    println!(
        "b. every PgBouncer down: VIP stayed on {} for 4 s; psql at the VIP got pglb's FATAL in {} ms",
        lab.nodes[master].name,
        took.as_millis()
    );
    // Restarted where they run: in the db namespace.
    let db_ns = lab.net.ns("db");
    let bouncers = &mut lab.db.bouncers;
    in_netns(&db_ns, || {
        for b in bouncers.iter_mut() {
            b.restart();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.nodes.iter().all(|n| n.servers_ok()) {
        assert!(Instant::now() < deadline, "PgBouncers back on both nodes");
        std::thread::sleep(Duration::from_millis(100));
    }

    // ---- c. drain pgb1 on the master, then fail over: the new master sends clients
    //         elsewhere too (the drain reached it through the peers).
    let from = lab.master();
    let to = 1 - from;
    let drained = admin(&lab.nodes[from], "set server postgres/pgb1 state drain");
    assert!(drained, "drain on {}", lab.nodes[from].name);
    std::thread::sleep(Duration::from_millis(1000));
    let seen = lab.nodes[from].states().len();
    let row = lab.failover(
        "c. drain on master, then SIGKILL its pglb",
        from,
        Duration::from_millis(100),
        |lab| lab.nodes[from].signal_pglb(Signal::SIGKILL),
    );
    lab.nodes[from].wait_state("FAULT", seen, Duration::from_secs(1));
    let pgb1 = &lab.db.bouncers[0];
    let before = in_netns(&db_ns, || pgb1.app_clients_blocking());
    for _ in 0..6 {
        assert_eq!(psql_vip(&client, "SELECT 1").as_deref(), Ok("1"));
    }
    let pgb1 = &lab.db.bouncers[0];
    assert_eq!(
        in_netns(&db_ns, || pgb1.app_clients_blocking()),
        before,
        "{} sent a client to the drained pgb1",
        lab.nodes[to].name
    );
    println!(
        "c. drain on {} reached {}: after the failover no client went to pgb1",
        lab.nodes[from].name, lab.nodes[to].name
    );
    lab.rows.push(row);
    assert!(admin(
        &lab.nodes[to],
        "set server postgres/pgb1 state ready"
    ));
    lab.nodes[from].pglb = None;
    let seen = lab.nodes[from].states().len();
    lab.nodes[from].start_pglb();
    lab.nodes[from].wait_state("BACKUP", seen, Duration::from_secs(6));
}
