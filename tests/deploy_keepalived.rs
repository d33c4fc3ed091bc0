//! The keepalived files (deploy/keepalived/): both nodes' configs pass the real
//! `keepalived --config-test` and differ only where the nodes must, and the check and
//! notify scripts do exactly what the configs rely on (against recording stand-ins for
//! curl and logger). The pair running for real is tests/failover_*.rs.

mod harness;

use std::path::Path;
use std::process::Command;

use harness::deploy::{is_executable, read, repo, stand_ins};
use harness::{ConfigText, run, text};

/// An interface keepalived accepts on this machine (it refuses unknown ones and `lo`).
fn test_interface() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort_by_key(|n| (n != "eth1", !(n.starts_with("eth") || n.starts_with("en"))));
    names
        .into_iter()
        .next()
        .expect("a network interface other than lo")
}

/// keepalived --config-test refuses a config whose interface does not exist or whose
/// scripts are missing, not executable or writable by non-root (enable_script_security).
/// Here there is no eth1 and nothing in /usr/local/lib/pglb, so the test checks a
/// rendered copy: eth1 replaced by an interface of this machine, and the script paths
/// pointing at the repository's deploy/keepalived/ files (which are the ones installed).
#[test]
fn keepalived_configs_pass_config_test() {
    let iface = test_interface();
    let scripts = repo().join("deploy/keepalived");
    let tmp = tempfile::tempdir().expect("tempdir");
    for node in ["lb1", "lb2"] {
        let conf = read(&format!("deploy/keepalived/keepalived-{node}.conf"));
        for script in ["check-pglb", "keepalived-notify"] {
            assert!(
                conf.contains(&format!("/usr/local/lib/pglb/{script}")),
                "{node}: {script}"
            );
        }
        let rendered = ConfigText::new(conf)
            .edit("eth1", &iface)
            .edit("/usr/local/lib/pglb/", &format!("{}/", scripts.display()))
            .build();
        let path = tmp.path().join(format!("keepalived-{node}.conf"));
        std::fs::write(&path, rendered).unwrap();
        let out = run(Command::new("keepalived")
            .arg("--config-test")
            .arg("--use-file")
            .arg(&path));
        assert!(out.status.success(), "{node}: {}", text(&out));
        let said = text(&out);
        assert!(
            !said.contains("WARNING") && !said.contains("Disabling"),
            "{node}: {said}"
        );
    }
    // The same check catches a broken file (so a pass above means something).
    let broken = ConfigText::new(read("deploy/keepalived/keepalived-lb1.conf"))
        .edit("eth1", &iface)
        .edit("/usr/local/lib/pglb/", "/nonexistent/")
        .build();
    let path = tmp.path().join("broken.conf");
    std::fs::write(&path, broken).unwrap();
    let out = run(Command::new("keepalived").arg("-t").arg("-f").arg(&path));
    assert!(
        !out.status.success(),
        "missing scripts must fail: {}",
        text(&out)
    );
}

/// Lines without comments, `{`/`}` kept, and the block each line sits in.
fn keepalived_lines(conf: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    for line in conf.lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let block = stack.join("/");
        out.push((block, line.to_owned()));
        if let Some(head) = line.strip_suffix('{') {
            stack.push(head.split_whitespace().next().unwrap_or("").to_owned());
        } else if line == "}" {
            stack.pop();
        }
    }
    out
}

fn keepalived_value(conf: &str, key: &str) -> Vec<String> {
    keepalived_lines(conf)
        .into_iter()
        .filter_map(|(_, l)| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.collect::<Vec<_>>().join(" "))
        })
        .collect()
}

#[test]
fn keepalived_nodes_differ_only_in_priority_router_id_and_peers() {
    let lb1 = read("deploy/keepalived/keepalived-lb1.conf");
    let lb2 = read("deploy/keepalived/keepalived-lb2.conf");
    let (l1, l2) = (keepalived_lines(&lb1), keepalived_lines(&lb2));
    assert_eq!(l1.len(), l2.len(), "same structure");
    for ((b1, a), (b2, b)) in l1.iter().zip(&l2) {
        assert_eq!(b1, b2);
        if a == b {
            continue;
        }
        let key = a.split_whitespace().next().unwrap();
        let allowed = ["router_id", "priority", "unicast_src_ip"].contains(&key)
            || b1.ends_with("unicast_peer");
        assert!(
            allowed,
            "lb1 and lb2 differ where they need not: {a:?} vs {b:?}"
        );
    }

    for (node, conf, prio, me, peer) in [
        ("lb1", &lb1, 150, "192.168.1.10", "192.168.1.11"),
        ("lb2", &lb2, 100, "192.168.1.11", "192.168.1.10"),
    ] {
        let v = |k: &str| keepalived_value(conf, k);
        assert_eq!(v("router_id"), [format!("pglb_{node}")]);
        assert_eq!(v("vrrp_version"), ["3"], "{node}");
        assert_eq!(v("enable_script_security"), [""], "{node}");
        assert_eq!(v("script_user"), ["root"], "{node}");
        assert_eq!(
            v("script"),
            [
                "\"/usr/local/lib/pglb/check-pglb alive\"",
                "\"/usr/local/lib/pglb/check-pglb servers\""
            ],
            "{node}"
        );
        assert_eq!(v("interval"), ["1", "1"]);
        // alive: fall 1 / timeout 2 (see the file's comment and tests/failover_crash.rs);
        // servers: lowers the priority (weight -60), never FAULT.
        assert_eq!(v("timeout"), ["2", "2"]);
        assert_eq!(v("fall"), ["1", "2"]);
        assert_eq!(v("rise"), ["2", "2"]);
        assert_eq!(v("weight"), ["-60"]);
        assert_eq!(v("vrrp_instance"), ["VI_PGLB {"]);
        // nopreempt works only from an initial BACKUP state, on both nodes.
        assert_eq!(v("state"), ["BACKUP"], "{node}");
        assert_eq!(v("nopreempt"), [""], "{node}");
        assert!(v("preempt_delay").is_empty());
        assert_eq!(v("interface"), ["eth1"]);
        assert_eq!(v("virtual_router_id"), ["51"]);
        assert_eq!(v("priority"), [prio.to_string()]);
        assert_eq!(v("advert_int"), ["0.2"]);
        assert!(
            v("authentication").is_empty(),
            "{node}: no auth with VRRPv3"
        );
        assert_eq!(v("unicast_src_ip"), [me]);
        assert_eq!(v("192.168.1.100/24"), ["dev eth1"], "{node}: the VIP");
        let lines = keepalived_lines(conf);
        let peers: Vec<&str> = lines
            .iter()
            .filter(|(b, l)| b.ends_with("unicast_peer") && l != "}")
            .map(|(_, l)| l.as_str())
            .collect();
        assert_eq!(peers, [peer], "{node}");
        for check in ["chk_pglb", "chk_pglb_servers"] {
            assert!(
                lines
                    .iter()
                    .any(|(b, l)| b.ends_with("track_script") && l == check),
                "{node}: track_script {check}"
            );
        }
        assert_eq!(v("notify"), ["/usr/local/lib/pglb/keepalived-notify"]);
    }
}

#[test]
fn keepalived_scripts_check_health_and_log_transitions() {
    let dir = repo().join("deploy/keepalived");
    for script in ["check-pglb", "keepalived-notify"] {
        assert!(
            is_executable(&dir.join(script)),
            "{script} must be executable"
        );
    }
    // check-pglb: exactly curl's verdict on the right URL: the mode picks the path, the
    // address comes from the argument, else the config's [stats] bind, else the default.
    let cfg_dir = tempfile::tempdir().unwrap();
    let config = cfg_dir.path().join("pglb.toml");
    std::fs::write(
        &config,
        "[[listen]]\nbind = \"0.0.0.0:5432\"\n[stats]  # the dashboard\nuri = \"/stats\"\nbind = \"10.0.0.21:9404\"\n",
    )
    .unwrap();
    let zeros = cfg_dir.path().join("zeros.toml");
    std::fs::write(&zeros, "[stats]\nbind = \"0.0.0.0:8405\"\n").unwrap();
    let missing = cfg_dir.path().join("missing.toml");
    let cases: [(&[&str], &Path, &str); 5] = [
        (&["alive"], &missing, "http://127.0.0.1:8404/health"),
        (
            &["servers"],
            &missing,
            "http://127.0.0.1:8404/health?servers",
        ),
        (&["alive"], &config, "http://10.0.0.21:9404/health"),
        (&["servers"], &zeros, "http://127.0.0.1:8405/health?servers"),
        (
            &["alive", "192.0.2.7:8404"],
            &config,
            "http://192.0.2.7:8404/health",
        ),
    ];
    for (args, cfg, url) in cases {
        for (curl_exit, expect_ok) in [(0, true), (22, false), (28, false), (7, false)] {
            let tmp = tempfile::tempdir().unwrap();
            stand_ins(tmp.path(), &[("curl", curl_exit)]);
            let calls = tmp.path().join("calls");
            let out = run(Command::new(dir.join("check-pglb"))
                .args(args)
                .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
                .env("PGLB_CONFIG", cfg)
                .env("CALLS", &calls));
            assert_eq!(
                out.status.success(),
                expect_ok,
                "{args:?}: curl exit {curl_exit}"
            );
            let called = std::fs::read_to_string(&calls).unwrap();
            assert_eq!(
                called.trim(),
                format!("curl -fsS -m 1 -o /dev/null {url}"),
                "{args:?}"
            );
        }
    }
    let out = run(Command::new(dir.join("check-pglb")).arg("bogus"));
    assert_eq!(out.status.code(), Some(2), "a bad mode is a usage error");
    // keepalived-notify: TYPE NAME STATE PRIORITY to syslog with the pglb-keepalived tag;
    // exits 0 even when logging fails.
    let tmp = tempfile::tempdir().unwrap();
    stand_ins(tmp.path(), &[("logger", 1)]);
    let calls = tmp.path().join("calls");
    let out = run(Command::new(dir.join("keepalived-notify"))
        .args(["INSTANCE", "VI_PGLB", "MASTER", "150"])
        .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
        .env("CALLS", &calls));
    assert!(out.status.success(), "{}", text(&out));
    let called = std::fs::read_to_string(&calls).unwrap();
    assert!(called.starts_with("logger -t pglb-keepalived "), "{called}");
    assert!(
        called.contains("INSTANCE VI_PGLB is now MASTER (priority 150)"),
        "{called}"
    );
}
