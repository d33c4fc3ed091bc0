//! The keepalived pair acts as one balancer for operators. Seen before: drain pgb1 on lb1
//! for maintenance, the VIP moves to lb2, and lb2 sends new clients straight to pgb1
//! (the state file was local). Two pglb processes on loopback as peers, over the same
//! PgBouncers.

mod harness;

use std::time::{Duration, Instant};

use harness::{ConfigText, Pglb, Stack, free_port, http_get};

struct Node {
    pglb: Option<Pglb>,
    port: u16,
    /// The runtime API's Unix socket.
    socket: std::path::PathBuf,
    stats: u16,
    config: String,
    _dir: tempfile::TempDir,
}

fn node(stack: &Stack, name: &str, port: u16, stats: u16, peer: (&str, u16)) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ConfigText::new(Pglb::config(
        port,
        "[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nrise = 1",
        &stack.servers_toml(),
    ))
    .set("global", "node", name)
    .build()
        + &format!(
            "\n[stats]\nbind = \"127.0.0.1:{stats}\"\nstate_file = \"{}\"\nsocket = \"{}\"\n\
             [stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n\n\
             [[peer]]\nname = \"{}\"\nurl = \"http://127.0.0.1:{}\"\n",
            dir.path().join("state.toml").display(),
            dir.path().join("admin.sock").display(),
            peer.0,
            peer.1
        );
    Node {
        pglb: Some(Pglb::start(&config, port)),
        port,
        socket: dir.path().join("admin.sock"),
        stats,
        config,
        _dir: dir,
    }
}

async fn status(stats: u16, server: &str) -> String {
    harness::csv_field(stats, server, "status").await
}

async fn weight(stats: u16, server: &str) -> String {
    harness::csv_field(stats, server, "weight").await
}

/// Waits until `f` holds; returns how long it took.
async fn within<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_reach_the_peer_and_survive_restarts() {
    let stack = Stack::start(2);
    let (p1, s1, p2, s2) = (free_port(), free_port(), free_port(), free_port());
    let lb1 = node(&stack, "lb1", p1, s1, ("lb2", s2));
    let mut lb2 = node(&stack, "lb2", p2, s2, ("lb1", s1));
    for s in [s1, s2] {
        within("servers UP", Duration::from_secs(5), || async move {
            status(s, "pgb1").await == "UP"
        })
        .await;
    }

    // Drain on lb1: lb2 drains too, within a second, and sends it no new client.
    harness::admin_action(s1, "pgb1", "drain").await;
    let took = within("drain reached lb2", Duration::from_secs(1), || async {
        status(s2, "pgb1").await == "DRAIN"
    })
    .await;
    println!("drain on lb1 seen on lb2 after {} ms", took.as_millis());
    let pglb2 = lb2.pglb.as_ref().expect("lb2");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pglb2.connect().await.expect("connect through lb2"));
    }
    assert_eq!(
        stack.bouncers[0].app_clients().await,
        0,
        "lb2 sends nothing to the drained pgb1"
    );
    drop(held);

    // The last action wins, whichever node took it: ready on lb2 reaches lb1.
    harness::admin_action(s2, "pgb1", "ready").await;
    within("ready reached lb1", Duration::from_secs(1), || async {
        status(s1, "pgb1").await == "UP"
    })
    .await;

    // The runtime socket and the dashboard's form reach the peer the same way, and so
    // do health checks turned off and on.
    runtime(&lb2.socket, "set server postgres/pgb1 state drain");
    within(
        "socket drain reached lb1",
        Duration::from_secs(1),
        || async { status(s1, "pgb1").await == "DRAIN" },
    )
    .await;
    let form = [
        ("Authorization", "Basic YWRtaW46czNjcmV0"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let (code, _, _) = harness::http_with(
        s1,
        "POST",
        "/stats",
        &form,
        "b=postgres&s=pgb1&action=ready",
    )
    .await;
    assert_eq!(code, 303);
    within("form ready reached lb2", Duration::from_secs(1), || async {
        status(s2, "pgb1").await == "UP"
    })
    .await;
    runtime(&lb1.socket, "disable health postgres/pgb1");
    within("health off reached lb2", Duration::from_secs(1), || async {
        status(s2, "pgb1").await == "no check"
    })
    .await;
    runtime(&lb2.socket, "enable health postgres/pgb1");
    within("health on reached lb1", Duration::from_secs(2), || async {
        status(s1, "pgb1").await == "UP"
    })
    .await;

    // lb2 down: an action on lb1 still applies locally, the dashboard shows the peer
    // unreachable; lb2 takes the newest state from lb1 before it serves.
    lb2.pglb.take();
    harness::admin_action(s1, "pgb2", "maint").await;
    assert_eq!(status(s1, "pgb2").await, "MAINT");
    within(
        "lb1 shows lb2 unreachable",
        Duration::from_secs(8),
        || async { http_get(s1, "/stats").await.1.contains("UNREACHABLE") },
    )
    .await;
    lb2.pglb = Some(Pglb::start(&lb2.config, lb2.port));
    assert_eq!(
        status(lb2.stats, "pgb2").await,
        "MAINT",
        "lb2 started with lb1's newest state"
    );
    within("lb1 sees lb2 again", Duration::from_secs(8), || async {
        http_get(s1, "/stats")
            .await
            .1
            .contains("reachable: operator actions shared")
    })
    .await;

    // Two actions seconds apart on both nodes: both end on the later one.
    harness::admin_action(s1, "pgb2", "ready").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let body = "{\"weight\": 20}";
    let (code, _, text) = harness::http(
        s2,
        "POST",
        "/api/servers/postgres/pgb2",
        Some(("admin", "s3cret")),
        body,
        "application/json",
    )
    .await;
    assert_eq!(code, 200, "{text}");
    for s in [s1, s2] {
        within(
            "the later weight wins on both",
            Duration::from_secs(2),
            || async move { weight(s, "pgb2").await == "20" },
        )
        .await;
    }
    drop(lb1);
}

/// One runtime API command through socat, as an operator's script sends it; it must be
/// taken (HAProxy's empty answer).
fn runtime(socket: &std::path::Path, command: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo '{command}' | timeout 5 socat stdio UNIX-CONNECT:{}",
            socket.display()
        ))
        .output()
        .expect("socat");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\n", "{command}");
}
