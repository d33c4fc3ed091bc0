//! High availability for real, unplanned faults: on the keepalived pair with the shipped
//! deploy/keepalived configs (tests/harness/pair.rs), pglb is SIGKILLed on the master
//! (also with pgbench running), keepalived dies (every process, or its main process
//! only) and the master's link goes down. Each time the VIP must reach the other node
//! within the failover target and new client connections fail at most while it moves;
//! with nopreempt a recovered node stays BACKUP.
//!
//! Needs root (network namespaces, keepalived); CI runs as root.

mod harness;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use harness::pair::{
    LB_IPS, Lab, TARGET, assert_fail_run, in_netns, ip, kill_pglb, ms, pgbench, pgbench_value,
    psql_vip,
};
use harness::{run, text};

#[test]
fn vip_leaves_a_master_whose_pglb_or_keepalived_dies_or_whose_link_goes_down() {
    Lab::run("failover_crash", scenario);
}

/// The faults, in order; each leaves one master and a healthy backup for the next.
fn scenario(lab: &mut Lab) {
    let client = lab.client.clone();
    let (lb1, lb2) = (0usize, 1usize);
    let every = Duration::from_millis(100);

    // ---- b. SIGKILL pglb on the master.
    let row = kill_pglb(lab, lb1, "b. SIGKILL pglb on master lb1", None);
    lab.rows.push(row);

    // ---- c. pglb back on lb1: with nopreempt the VIP stays on lb2.
    let seen = lab.nodes[lb1].states().len();
    lab.nodes[lb1].pglb = None;
    lab.nodes[lb1].start_pglb();
    let t0 = Instant::now();
    lab.nodes[lb1].wait_state("BACKUP", seen, Duration::from_secs(6));
    let eligible = t0.elapsed();
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(2) {
        assert_eq!(lab.master(), lb2, "nopreempt: VIP must stay on lb2");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "c. pglb restarted on lb1: BACKUP after {} ms (rise 2); VIP stayed on lb2 for 2 s",
        ms(eligible)
    );

    // ---- d. clients and pgbench while pglb on the master (lb2) is killed.
    let row = kill_pglb(lab, lb2, "d. SIGKILL pglb on lb2, pgbench running", Some(6));
    lab.rows.push(row);
    let out = run(&mut pgbench(&client, 3));
    let said = text(&out);
    assert!(out.status.success(), "pgbench after the failover: {said}");
    let done = pgbench_value(&said, "number of transactions actually processed:").unwrap_or(0);
    let failed = pgbench_value(&said, "number of failed transactions:");
    println!("d. pgbench -S -T 3 after the failover: {done} transactions, failed: {failed:?}");
    assert!(done > 0, "{said}");
    assert_eq!(failed, Some(0), "{said}");
    lab.nodes[lb2].pglb = None;
    let seen = lab.nodes[lb2].states().len();
    lab.nodes[lb2].start_pglb();
    lab.nodes[lb2].wait_state("BACKUP", seen, Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(1000));

    // ---- e. keepalived on the master crashes: SIGKILL to all its processes.
    let mut row = lab.failover("e. SIGKILL keepalived (all) on lb1", lb1, every, |lab| {
        lab.nodes[lb1].keepalived.as_mut().unwrap().crash()
    });
    assert!(
        row.vip < TARGET,
        "keepalived crash: VIP moved after {:?}",
        row.vip
    );
    assert_fail_run(&row);
    row.note = if row.off.is_none() {
        "VIP also stays on lb1 until keepalived restarts".to_owned()
    } else {
        String::new()
    };
    lab.rows.push(row);
    lab.restart_keepalived(lb1); // removes a stale VIP at start

    // ---- e'. SIGKILL only keepalived's main process on the master (lb2).
    let mut row = lab.failover(
        "e'. SIGKILL keepalived main pid on lb2",
        lb2,
        every,
        |lab| lab.nodes[lb2].keepalived.as_mut().unwrap().kill_main(),
    );
    assert!(
        row.vip < TARGET,
        "keepalived main killed: VIP moved after {:?}",
        row.vip
    );
    assert_fail_run(&row);
    row.note = "its VRRP child stops gracefully".to_owned();
    lab.rows.push(row);
    lab.restart_keepalived(lb2);

    // ---- f. the master's link goes down.
    let iface = lab.net.iface();
    let lb1_ns = lab.nodes[lb1].ns.clone();
    let seen = lab.nodes[lb1].states().len();
    let mut row = lab.failover("f. link down on master lb1", lb1, every, |_| {
        ip(&["-n", &lb1_ns, "link", "set", &iface, "down"]);
    });
    lab.nodes[lb1].wait_state("FAULT", seen, Duration::from_secs(2));
    assert!(row.vip < TARGET, "link down: VIP moved after {:?}", row.vip);
    assert_fail_run(&row);
    let lb1_addr: SocketAddr = format!("{}:5432", LB_IPS[0]).parse().unwrap();
    let answered = in_netns(&client, || {
        TcpStream::connect_timeout(&lb1_addr, Duration::from_millis(1000)).is_ok()
    });
    assert!(!answered, "lb1 must not answer with its link down");
    let (s1, s2) = (lab.nodes[lb1].sessions(), lab.nodes[lb2].sessions());
    assert_eq!(psql_vip(&client, "SELECT 1").as_deref(), Ok("1"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lab.nodes[lb1].sessions(),
        s1,
        "lb1 served a client with its link down"
    );
    assert!(lab.nodes[lb2].sessions() > s2, "lb2 serves the VIP");
    row.note = "lb1 FAULT; lb1:5432 does not answer".to_owned();
    lab.rows.push(row);
    let seen = lab.nodes[lb1].states().len();
    ip(&["-n", &lb1_ns, "link", "set", &iface, "up"]);
    lab.nodes[lb1].wait_state("BACKUP", seen, Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(lab.master(), lb2, "nopreempt: lb1 back as BACKUP");
}
