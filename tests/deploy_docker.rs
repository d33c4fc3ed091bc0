//! The Docker files (docker/): no Docker engine runs here, so the compose file is read
//! with PyYAML (the parser docker-compose v1 uses), the Dockerfile for its stages and
//! sources, docker/pglb.toml with `pglb --check`, and the compose PgBouncers' config on
//! Debian's real PgBouncer.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::deploy::{pglb_check, read, repo, yaml};
use harness::{
    ConfigText, Proc, as_service_user, free_port, give_to_service_user, run_ok, service_dir,
};
use nix::sys::signal::Signal;

/// `key = value` of one section of an ini file (PgBouncer's format).
fn ini_section(ini: &str, section: &str) -> BTreeMap<String, String> {
    let mut in_section = false;
    let mut out = BTreeMap::new();
    for line in ini.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

#[test]
fn docker_compose_runs_postgres_and_three_pgbouncers() {
    let compose = yaml("docker/docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["postgres", "pgb1", "pgb2", "pgb3", "pglb"])
    );

    let pg = &services["postgres"];
    assert!(pg["image"].as_str().unwrap().starts_with("postgres:15"));
    assert!(pg["environment"]["POSTGRES_PASSWORD"].is_string());
    let volumes: Vec<&str> = pg["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let initdb = volumes
        .iter()
        .find(|v| v.contains(":/docker-entrypoint-initdb.d"))
        .expect("an initdb mount");
    let initdb_dir = repo()
        .join("docker")
        .join(initdb.split(':').next().unwrap());
    let sql: String = std::fs::read_dir(&initdb_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(sql.contains("CREATE ROLE app LOGIN PASSWORD"), "{sql}");
    assert!(sql.contains("CREATE DATABASE app OWNER app"), "{sql}");
    assert!(
        sql.contains("CREATE ROLE pglb_check LOGIN PASSWORD"),
        "{sql}"
    );
    // PostgreSQL must hold every PgBouncer's full pool.
    let command: Vec<&str> = pg["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let max_connections: u32 = command
        .iter()
        .find_map(|a| a.strip_prefix("max_connections="))
        .expect("max_connections")
        .parse()
        .unwrap();

    let ini = read("docker/pgbouncer/pgbouncer.ini");
    let bouncer = ini_section(&ini, "pgbouncer");
    for (k, v) in [
        ("pool_mode", "transaction"),
        ("default_pool_size", "70"),
        ("max_client_conn", "4000"),
        ("auth_type", "scram-sha-256"),
        ("listen_port", "6432"),
        ("auth_file", "/etc/pgbouncer/userlist.txt"),
    ] {
        assert_eq!(
            bouncer.get(k).map(String::as_str),
            Some(v),
            "pgbouncer.ini {k}"
        );
    }
    assert!(
        max_connections >= 3 * 70 + 10,
        "max_connections={max_connections}"
    );
    let databases = ini_section(&ini, "databases");
    assert!(databases["app"].contains("host=postgres"));
    assert!(databases.contains_key("postgres"), "the check's database");

    for (name, host_port) in [("pgb1", 6432), ("pgb2", 6433), ("pgb3", 6434)] {
        let s = &services[name];
        assert!(s["image"].as_str().unwrap().contains("pgbouncer"), "{name}");
        assert_eq!(
            s["ports"],
            serde_json::json!([format!("{host_port}:6432")]),
            "{name}"
        );
        let mounts: Vec<&str> = s["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for (file, target) in [
            ("pgbouncer.ini", "/etc/pgbouncer/pgbouncer.ini"),
            ("userlist.txt", "/etc/pgbouncer/userlist.txt"),
        ] {
            assert!(
                mounts.contains(&format!("./pgbouncer/{file}:{target}:ro").as_str()),
                "{name}: {mounts:?}"
            );
        }
        assert!(
            s["ulimits"]["nofile"]["soft"].as_u64().unwrap() > 4000,
            "{name}"
        );
        assert_eq!(
            s["depends_on"]["postgres"]["condition"], "service_healthy",
            "{name}"
        );
    }

    let lb = &services["pglb"];
    assert_eq!(lb["profiles"], serde_json::json!(["lb"]));
    assert_eq!(lb["build"]["context"], "..");
    assert_eq!(lb["build"]["dockerfile"], "docker/Dockerfile");
    assert!(
        repo()
            .join("docker")
            .join("..")
            .join("docker/Dockerfile")
            .is_file()
    );
    assert_eq!(lb["ports"], serde_json::json!(["5432:5432", "8404:8404"]));
    assert!(
        lb["volumes"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("./pglb.toml:/etc/pglb/pglb.toml:ro"))
    );

    // The check role and password pglb uses exist in PostgreSQL and PgBouncer.
    let users = read("docker/pgbouncer/userlist.txt");
    for cfg in ["docker/pglb.toml", "vagrant/pglb.toml"] {
        let t: toml::Table = toml::from_str(&read(cfg)).unwrap();
        let check = t["listen"][0]["check"].as_table().unwrap();
        let (user, password) = (
            check["user"].as_str().unwrap(),
            check["password"].as_str().unwrap(),
        );
        assert_eq!(check["type"].as_str(), Some("query"), "{cfg}");
        assert!(
            users.contains(&format!("\"{user}\" \"{password}\"")),
            "{cfg}: {user} not in userlist.txt"
        );
        assert!(
            sql.contains(&format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'")),
            "{cfg}: {user} not created by initdb"
        );
        assert!(
            databases.contains_key(check["database"].as_str().unwrap()),
            "{cfg}"
        );
    }
}

#[test]
fn dockerfile_builds_release_and_runs_unprivileged() {
    let dockerfile = read("docker/Dockerfile");
    let instructions: Vec<String> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter(|l| !l.starts_with(' '))
        .map(str::to_owned)
        .collect();
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "two stages: {froms:?}");
    assert_eq!(froms[0], "FROM rust:1-bookworm AS builder");
    assert!(froms[1].starts_with("FROM debian:bookworm-slim"));
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("ca-certificates"));
    assert!(dockerfile.contains("useradd --system"));
    let last_stage = dockerfile
        .split("FROM debian:bookworm-slim")
        .nth(1)
        .unwrap();
    for line in [
        "COPY --from=builder /pglb /usr/bin/pglb",
        "COPY config/pglb.toml /etc/pglb/pglb.toml",
        "USER pglb",
        "EXPOSE 5432 8404",
        "ENTRYPOINT [\"/usr/bin/pglb\"]",
        "CMD [\"--config\", \"/etc/pglb/pglb.toml\"]",
    ] {
        assert!(
            last_stage.lines().any(|l| l == line),
            "runtime stage lacks {line:?}"
        );
    }
    // Every COPY source from the build context exists (the context is the repo root).
    for l in &instructions {
        let Some(args) = l.strip_prefix("COPY ") else {
            continue;
        };
        if !args.starts_with("--from") {
            let parts: Vec<&str> = args.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(
                    repo().join(src).exists(),
                    "COPY {src}: not in the repository"
                );
            }
        }
    }
    // The context filter lets those sources through.
    let ignore = read("docker/Dockerfile.dockerignore");
    for keep in ["!Cargo.toml", "!Cargo.lock", "!src/", "!config/"] {
        assert!(ignore.lines().any(|l| l == keep), "{keep}");
    }
}

/// docker/pglb.toml names its servers pgb1..pgb3, which only resolve on the compose
/// network, and pglb resolves names at start. So the check runs on a copy with those
/// host names rewritten to 127.0.0.1: everything else is validated as shipped.
#[test]
fn docker_pglb_config_is_valid() {
    let cfg = read("docker/pglb.toml");
    let t: toml::Table = toml::from_str(&cfg).unwrap();
    let servers = t["listen"][0]["server"].as_array().unwrap();
    let addrs: Vec<&str> = servers
        .iter()
        .map(|s| s["addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["pgb1:6432", "pgb2:6432", "pgb3:6432"]);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pglb.toml");
    let mut rendered = ConfigText::new(cfg.clone());
    for n in 1..=3 {
        rendered = rendered.edit(&format!("\"pgb{n}:6432\""), "\"127.0.0.1:6432\"");
    }
    let rendered = rendered.build();
    assert_ne!(rendered, cfg);
    std::fs::write(&path, rendered).unwrap();
    pglb_check(&path);
}

/// The compose PgBouncers' pgbouncer.ini and userlist.txt, loaded by Debian's real
/// PgBouncer (only listen address, port and file paths rewritten to run here): it must
/// start, accept a SCRAM login from the userlist, and report the pool settings.
#[test]
fn docker_pgbouncer_config_runs_on_a_real_pgbouncer() {
    // PgBouncer refuses to run as root: as root it runs as postgres, like the harness's.
    let tmp = service_dir("pglb-docker-pgb-");
    let port = free_port();
    let ini = ConfigText::new(read("docker/pgbouncer/pgbouncer.ini"))
        .edit(
            "auth_file = /etc/pgbouncer/userlist.txt",
            &format!("auth_file = {}/userlist.txt", tmp.path().display()),
        )
        .edit("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        .edit("listen_port = 6432", &format!("listen_port = {port}"))
        .build();
    std::fs::write(tmp.path().join("pgbouncer.ini"), &ini).unwrap();
    std::fs::write(
        tmp.path().join("userlist.txt"),
        read("docker/pgbouncer/userlist.txt"),
    )
    .unwrap();
    for f in ["pgbouncer.ini", "userlist.txt"] {
        give_to_service_user(&tmp.path().join(f));
    }
    let mut pgbouncer = Proc::spawn(
        as_service_user(Path::new("/usr/sbin/pgbouncer")).arg(tmp.path().join("pgbouncer.ini")),
        "/usr/sbin/pgbouncer",
        Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = pgbouncer.child.try_wait().unwrap() {
            panic!("pgbouncer exited with {status} on the compose config");
        }
        assert!(Instant::now() < deadline, "pgbouncer is not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let users = read("docker/pgbouncer/userlist.txt");
    let admin_user = ini_section(&ini, "pgbouncer")["admin_users"].clone();
    let admin_password = users
        .lines()
        .find_map(|l| l.strip_prefix(&format!("\"{admin_user}\" \"")))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("the admin user in userlist.txt");
    let show = run_ok(
        Command::new("psql")
            .args(["-X", "-At", "-F", "|", "-c", "SHOW CONFIG"])
            .arg(format!(
                "host=127.0.0.1 port={port} user={admin_user} dbname=pgbouncer"
            ))
            .env("PGPASSWORD", admin_password),
    );
    let config: BTreeMap<&str, &str> = show
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((f.next()?, f.next()?))
        })
        .collect();
    for (k, v) in [
        ("pool_mode", "transaction"),
        ("default_pool_size", "70"),
        ("max_client_conn", "4000"),
        ("auth_type", "scram-sha-256"),
    ] {
        assert_eq!(config.get(k).copied(), Some(v), "SHOW CONFIG {k}");
    }
}
