//! The shell scripts shipped in deploy/ and vagrant/: each parses (the maintainer
//! scripts also with dash, Debian's /bin/sh), names its shell, and is executable where it
//! is run directly.

mod harness;

use std::process::Command;

use harness::deploy::{is_executable, read, repo};
use harness::{run, text};

#[test]
fn shell_scripts_parse_and_are_executable() {
    let scripts = [
        ("deploy/keepalived/check-pglb", "bash"),
        ("deploy/keepalived/keepalived-notify", "bash"),
        ("deploy/debian/postinst", "sh"),
        ("deploy/debian/postrm", "sh"),
        ("deploy/debian/prerm", "sh"),
        ("deploy/apt-deps.sh", "bash"),
        ("vagrant/provision-lb.sh", "bash"),
        ("vagrant/provision-db.sh", "bash"),
    ];
    for (script, shell) in scripts {
        let path = repo().join(script);
        // dash for the maintainer scripts: Debian's /bin/sh, stricter than bash.
        let shells: &[&str] = if shell == "sh" {
            &["sh", "bash"]
        } else {
            &["bash"]
        };
        for sh in shells {
            let out = run(Command::new(sh).arg("-n").arg(&path));
            assert!(out.status.success(), "{sh} -n {script}: {}", text(&out));
        }
        let first = read(script).lines().next().unwrap_or("").to_owned();
        assert!(
            first.starts_with("#!") && first.contains(shell),
            "{script}: {first}"
        );
        if script != "deploy/apt-deps.sh" {
            assert!(is_executable(&path), "{script} must be executable");
        }
    }
}
