//! The Vagrant topology (vagrant/): Vagrant cannot run here, so the Vagrantfile is
//! checked with `ruby -c` and for the addresses and provisioners, the VM config with
//! `pglb --check` against the db VM's published PgBouncer ports, and each node's config
//! as provision-lb.sh renders it.

mod harness;

use std::process::Command;

use harness::deploy::{pglb_check, read, repo, yaml};
use harness::{run, run_ok};

#[test]
fn vagrant_topology_is_consistent() {
    let vagrantfile = repo().join("vagrant/Vagrantfile");
    let out = run_ok(Command::new("ruby").arg("-c").arg(&vagrantfile));
    assert!(out.contains("Syntax OK"), "{out}");
    let v = read("vagrant/Vagrantfile");
    assert!(v.contains("config.vm.box = \"debian/bookworm64\""));
    for ip in ["192.168.1.20", "192.168.1.10", "192.168.1.11"] {
        assert!(v.contains(&format!("\"{ip}\"")), "{ip}");
    }
    assert!(v.contains("path: \"provision-lb.sh\", args: [name]"));
    assert!(v.contains("path: \"provision-db.sh\""));
    assert!(
        v.contains("\"..\", \"/vagrant\""),
        "the repo root is /vagrant"
    );

    // The VM config: valid, and its servers are the db VM's published PgBouncer ports.
    pglb_check(&repo().join("vagrant/pglb.toml"));
    let t: toml::Table = toml::from_str(&read("vagrant/pglb.toml")).unwrap();
    let listen = &t["listen"][0];
    assert_eq!(listen["bind"].as_str(), Some("0.0.0.0:5432"));
    let addrs: Vec<&str> = listen["server"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["addr"].as_str().unwrap())
        .collect();
    let compose = yaml("docker/docker-compose.yml");
    let published: Vec<String> = ["pgb1", "pgb2", "pgb3"]
        .iter()
        .map(|s| {
            let p = compose["services"][s]["ports"][0].as_str().unwrap();
            format!("192.168.1.20:{}", p.split(':').next().unwrap())
        })
        .collect();
    assert_eq!(addrs, published);
    assert_eq!(t["stats"]["bind"].as_str(), Some("0.0.0.0:8404"));
    assert_eq!(
        t["stats"]["state_file"].as_str(),
        Some("/var/lib/pglb/state.toml")
    );
    assert!(t["stats"]["auth"]["user"].is_str());

    // Every file the provisioners take from /vagrant is in the repository.
    for script in ["vagrant/provision-lb.sh", "vagrant/provision-db.sh"] {
        let body = read(script);
        for word in body.split(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            let Some(rel) = word.strip_prefix("/vagrant/") else {
                continue;
            };
            let rel = rel.trim_end_matches('/').replace("$node", "lb1");
            if rel.starts_with("target/") {
                continue; // the .deb, built on the host
            }
            assert!(repo().join(&rel).exists(), "{script}: /vagrant/{rel}");
        }
    }
    let lb = read("vagrant/provision-lb.sh");
    for needle in [
        "apt-get install -y -qq keepalived curl",
        "/vagrant/target/debian/pglb_*.deb",
        "/etc/pglb/pglb.toml",
        "/usr/local/lib/pglb/check-pglb",
        "/usr/local/lib/pglb/keepalived-notify",
        "keepalived -t -f",
        "[[peer]]",
        "systemctl enable pglb keepalived",
    ] {
        assert!(lb.contains(needle), "provision-lb.sh: {needle}");
    }
    let db = read("vagrant/provision-db.sh");
    for needle in ["docker.io docker-compose", "/vagrant/docker/", "up -d"] {
        assert!(db.contains(needle), "provision-db.sh: {needle}");
    }
}

/// provision-lb.sh gives each VM its node name and the other VM as its peer: the two
/// rendered files pass `--check` and name each other.
#[test]
fn vagrant_nodes_are_configured_as_peers() {
    let shared = read("vagrant/pglb.toml");
    for (node, peer, peer_ip) in [
        ("lb1", "lb2", "192.168.1.11"),
        ("lb2", "lb1", "192.168.1.10"),
    ] {
        let out = run(Command::new("bash")
            .arg("-c")
            .arg(format!(
                "sed -e 's/^node = \"lb1\"/node = \"{node}\"/' vagrant/pglb.toml; \
             printf '\\n[[peer]]\\nname = \"%s\"\\nurl = \"http://%s:8404\"\\n' {peer} {peer_ip}"
            ))
            .current_dir(repo()));
        let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            rendered.contains(&format!("node = \"{node}\"")),
            "{rendered}"
        );
        assert!(rendered.contains(&format!("url = \"http://{peer_ip}:8404\"")));
        assert!(rendered.len() > shared.len());
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pglb.toml");
        std::fs::write(&path, rendered).unwrap();
        pglb_check(&path);
    }
}
