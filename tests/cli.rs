//! The binary's command line: `--check` accepts good files and refuses bad ones with
//! file, line and reason, as an operator would see it.

use std::path::Path;
use std::process::Command;

/// Runs pglb: its exit code, stdout and stderr.
fn pglb(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pglb"))
        .args(args)
        .output()
        .expect("run pglb");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pglb.toml");
    let (code, stdout, stderr) = pglb(&["--config", path.to_str().expect("utf-8 path"), "--check"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("configuration is valid"));
    // Safe as shipped: the stats port on loopback, admin actions off until the operator
    // sets a password of their own.
    let text = std::fs::read_to_string(&path).expect("config");
    let config = pglb::Config::parse(&path, &text).expect("parses");
    let stats = config.stats.expect("[stats]");
    assert!(stats.bind.ip().is_loopback(), "{}", stats.bind);
    assert!(stats.auth.is_none(), "no active example password");
}

#[test]
fn bad_configs_are_refused_with_file_line_and_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs");
    for (file, line, reason) in [
        ("unknown_key.toml", 5, "unknown field `max_conn`"),
        (
            "duplicate_server.toml",
            10,
            "duplicate server name \"pgb1\"",
        ),
        ("bad_address.toml", 7, "needs a port"),
        (
            "bad_duration.toml",
            5,
            "string \"five seconds\", expected a duration",
        ),
        (
            "missing_cert.toml",
            5,
            "tls: cannot read certificate file /nonexistent/pglb-cert.pem",
        ),
        (
            "example_password.toml",
            13,
            "[stats.auth] password is the example password \"change-me\"",
        ),
    ] {
        let path = dir.join(file);
        let path = path.to_str().expect("utf-8 path");
        let (code, _, stderr) = pglb(&["--config", path, "--check"]);
        assert_eq!(code, Some(1), "{file} must be refused with exit 1");
        let expected = format!("{path}:{line}: ");
        assert!(
            stderr.contains(&expected),
            "{file}: expected {expected:?} in {stderr:?}"
        );
        assert!(
            stderr.contains(reason),
            "{file}: expected {reason:?} in {stderr:?}"
        );
        // Starting the daemon with it fails the same way, before binding anything.
        let (code, _, stderr) = pglb(&["--config", path]);
        assert!(code == Some(1) && stderr.contains(&expected), "{stderr}");
    }
}

#[test]
fn missing_file_is_named() {
    let (code, _, stderr) = pglb(&["--config", "/nonexistent/pglb.toml", "--check"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("/nonexistent/pglb.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn version_and_help() {
    let (code, stdout, _) = pglb(&["--version"]);
    assert!(code == Some(0) && stdout.starts_with("pglb "), "{stdout}");
    let (code, stdout, _) = pglb(&["--help"]);
    assert!(
        code == Some(0) && stdout.contains("--check") && stdout.contains("--config"),
        "{stdout}"
    );
}
