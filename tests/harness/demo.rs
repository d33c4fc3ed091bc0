//! `bash deploy/demo.sh`: PostgreSQL + three PgBouncers on loopback with pglb in front,
//! until Ctrl-C. Uses the same harness as the tests.

#[path = "mod.rs"]
mod harness;

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn main() {
    let Some(binary) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: demo PATH_TO_PGLB (run it through deploy/demo.sh)");
        std::process::exit(2);
    };
    let port: u16 = std::env::var("PGLB_DEMO_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(15432);
    println!("starting PostgreSQL 15 and three PgBouncers on loopback…");
    let stack = harness::Stack::start(3);
    stack.pg.pgbench_init();
    let dir = tempfile::Builder::new()
        .prefix("pglb-demo-")
        .tempdir()
        .expect("tempdir");
    let config = dir.path().join("pglb.toml");
    let text = harness::Pglb::config(port, "balance = \"leastconn\"", &stack.servers_toml());
    std::fs::write(&config, &text).expect("write config");
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pglb");
    let dsn = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        harness::APP_USER,
        harness::APP_PASSWORD,
        harness::APP_DB
    );
    println!("\npglb config: {}\n{text}", config.display());
    for (i, b) in stack.bouncers.iter().enumerate() {
        println!(
            "pgb{} = PgBouncer on {} (transaction pooling)",
            i + 1,
            b.addr()
        );
    }
    println!("\nconnect:  psql \"{dsn}\"");
    println!(
        "bench:    PGPASSWORD={} pgbench -n -S -c 8 -T 10 -h 127.0.0.1 -p {port} -U {} {}",
        harness::APP_PASSWORD,
        harness::APP_USER,
        harness::APP_DB
    );
    println!("stop:     Ctrl-C\n");
    // SAFETY: ignoring SIGINT here (children already started keep their handlers) lets this
    // process outlive Ctrl-C long enough to stop and clean up what it started.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    // pglb exits on the terminal's Ctrl-C (SIGINT reaches the whole process group); the
    // harness then stops PgBouncer and PostgreSQL when `stack` drops.
    let status = child.wait();
    println!("pglb exited: {status:?}; stopping PgBouncers and PostgreSQL");
    drop(stack);
}
