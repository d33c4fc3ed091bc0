//! The Debian package: the maintainer scripts (run against recording stand-ins, so
//! nothing on this machine changes), and the package `cargo deb` builds from this run's
//! binary, read with dpkg-deb and, as root, installed, upgraded from the previous layout
//! and purged with dpkg.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::deploy::{is_executable, read, repo, stand_ins};
use harness::{is_root, pglb_bin, run, run_ok, text};

/// Runs a maintainer script with PATH holding only recording stand-ins for the commands
/// it may call, so nothing on this machine changes. Returns the calls, one per line.
fn run_maintainer_script(script: &Path, args: &[&str], user_exists: bool) -> (bool, String) {
    run_with_systemctl(script, args, user_exists, 0)
}

/// `run_maintainer_script` whose `systemctl` stand-in exits `systemctl`.
fn run_with_systemctl(
    script: &Path,
    args: &[&str],
    user_exists: bool,
    systemctl: i32,
) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls");
    let getent = if user_exists { 0 } else { 2 };
    stand_ins(
        dir.path(),
        &[
            ("adduser", 0),
            ("deluser", 0),
            ("delgroup", 0),
            ("getent", getent),
            ("mkdir", 0),
            ("chown", 0),
            ("chmod", 0),
            ("rm", 0),
            ("rmdir", 0),
            ("cp", 0),
            ("systemctl", systemctl),
        ],
    );
    let out = run(Command::new("/bin/sh")
        .arg(script)
        .args(args)
        .env_clear()
        .env("PATH", dir.path())
        .env("CALLS", &log));
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    // Calls first, then whatever the script printed (for the assertion messages).
    (out.status.success(), format!("{calls}{}", text(&out)))
}

#[test]
fn maintainer_scripts_create_and_remove_the_pglb_user() {
    let dir = repo().join("deploy/debian");
    for name in ["postinst", "postrm", "prerm"] {
        let script = read(&format!("deploy/debian/{name}"));
        assert!(script.starts_with("#!/bin/sh\n"), "{name}");
        assert!(
            script.contains("\n#DEBHELPER#\n"),
            "{name}: #DEBHELPER# marker"
        );
        assert!(is_executable(&dir.join(name)), "{name} is executable");
        // systemctl only when systemd runs (not in chroots and containers).
        for (i, l) in script.lines().enumerate() {
            if l.trim_start().starts_with("systemctl") {
                let before: Vec<&str> = script.lines().take(i).collect();
                let guard = before
                    .iter()
                    .rev()
                    .find(|l| l.trim_start().starts_with("if "))
                    .unwrap_or_else(|| panic!("{name}: unguarded {l}"));
                assert!(
                    guard.contains("[ -d /run/systemd/system ]"),
                    "{name}: {guard}"
                );
            }
        }
    }

    let (ok, calls) = run_maintainer_script(&dir.join("postinst"), &["configure", ""], false);
    assert!(ok, "postinst configure: {calls}");
    assert!(
        calls.lines().any(
            |c| c.starts_with("adduser --quiet --system --group --no-create-home")
                && c.contains("--home /var/lib/pglb")
                && c.ends_with(" pglb")
        ),
        "{calls}"
    );
    assert!(calls.contains("mkdir -p /var/lib/pglb\n"), "{calls}");
    let home_first = calls.find("mkdir -p /var/lib/pglb").unwrap_or(usize::MAX);
    assert!(
        home_first < calls.find("adduser").unwrap_or(0),
        "the home exists before adduser: {calls}"
    );
    assert!(calls.contains("chown pglb:pglb /var/lib/pglb\n"), "{calls}");
    // An existing user is kept.
    let (ok, calls) = run_maintainer_script(&dir.join("postinst"), &["configure", "0.1.0-1"], true);
    assert!(ok && !calls.contains("adduser"), "{calls}");

    let (ok, calls) = run_maintainer_script(&dir.join("postrm"), &["purge"], true);
    assert!(ok, "postrm purge: {calls}");
    assert!(calls.contains("deluser --system pglb"), "{calls}");
    let (ok, calls) = run_maintainer_script(&dir.join("postrm"), &["remove"], true);
    assert!(
        ok && !calls.contains("deluser"),
        "remove keeps the user: {calls}"
    );
    let (ok, calls) = run_maintainer_script(&dir.join("postrm"), &["upgrade"], true);
    assert!(
        ok && !calls.contains("rm "),
        "upgrade keeps the state: {calls}"
    );
}

/// Where systemd runs, a package upgrade (`configure` with the old version) of a running
/// pglb reloads it, which starts the new binary on the same sockets; a first install or
/// a stopped service is not reloaded (nor started).
#[test]
fn postinst_reloads_a_running_pglb_on_upgrade_only() {
    // The script as it runs where systemd does: its test for /run/systemd/system pointed
    // at a directory that exists.
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = tmp.path().join("postinst");
    let text = read("deploy/debian/postinst").replace(
        "[ -d /run/systemd/system ]",
        &format!("[ -d {} ]", tmp.path().display()),
    );
    std::fs::write(&script, text).expect("write");
    let (ok, calls) = run_with_systemctl(&script, &["configure", "0.1.0-1"], true, 0);
    assert!(ok, "{calls}");
    assert!(
        calls.contains("systemctl is-active --quiet pglb\nsystemctl reload pglb\n"),
        "upgrade of a running pglb: {calls}"
    );
    let (ok, calls) = run_with_systemctl(&script, &["configure", ""], false, 0);
    assert!(
        ok && !calls.contains("reload pglb"),
        "first install: {calls}"
    );
    // `is-active` exits 3 for a stopped unit.
    let (ok, calls) = run_with_systemctl(&script, &["configure", "0.1.0-1"], true, 3);
    assert!(ok && !calls.contains("reload pglb"), "stopped: {calls}");
    assert!(
        !calls.contains("start") && !calls.contains("restart"),
        "never started: {calls}"
    );
}

/// A full `cargo deb` compiles the release profile (fat LTO): about 4 minutes from
/// scratch, 1.5 after a source change, more than nextest's 4-minute limit allows. So
/// this packages the binary this test run already built: a staged target dir whose
/// release/pglb is CARGO_BIN_EXE_pglb, then `cargo deb --no-build`. The metadata,
/// assets, conffiles and maintainer scripts are exactly those of a release build.
#[test]
fn package_builds_with_binary_unit_and_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let staged = tmp.path().join("target");
    std::fs::create_dir_all(staged.join("release")).unwrap();
    std::fs::copy(pglb_bin(), staged.join("release/pglb")).unwrap();
    let out_dir = tmp.path().join("out");
    run_ok(
        Command::new(env!("CARGO"))
            .current_dir(repo())
            .args(["deb", "--no-build", "--fast", "-o"])
            .arg(&out_dir)
            .env("CARGO_TARGET_DIR", &staged),
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let deb = &debs[0];
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("pglb_{}-", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );

    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    let entry = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .to_owned()
    };
    // "mode owner size date time path"; dpkg-deb shows root as 0/0 or root/root.
    for (path, mode) in [
        ("./usr/bin/pglb", "-rwxr-xr-x"),
        ("./usr/share/pglb/pglb.toml", "-rw-r--r--"),
        ("./usr/share/pglb/kernel-relay.conf", "-rw-r--r--"),
        ("./lib/systemd/system/pglb.service", "-rw-r--r--"),
        ("./usr/share/doc/pglb/README", "-rw-r--r--"),
    ] {
        let line = entry(path);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], mode, "{line}");
        assert!(["0/0", "root/root"].contains(&fields[1]), "{line}");
    }

    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(deb));
    for needle in [
        "Package: pglb",
        "Section: net",
        "Priority: optional",
        " postinst ",
        " postrm ",
    ] {
        assert!(info.contains(needle), "{needle:?} not in:\n{info}");
    }
    let depends = run_ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"));
    assert!(
        depends.contains("adduser") && depends.contains("libc6"),
        "{depends}"
    );

    // The control files are ours, the payload is the repository's files.
    let control = tmp.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    // No conffile: an upgrade never stops at dpkg's prompt (postinst creates the file).
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    assert!(!conffiles.contains("/etc/pglb"), "{conffiles}");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --quiet --system --group --no-create-home"));
    let root = tmp.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    assert_eq!(
        std::fs::read_to_string(root.join("lib/systemd/system/pglb.service")).unwrap(),
        read("deploy/pglb.service")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("usr/share/pglb/pglb.toml")).unwrap(),
        read("config/pglb.toml")
    );
    // The packaged binary accepts the packaged config.
    let out = run(Command::new(root.join("usr/bin/pglb"))
        .arg("--config")
        .arg(root.join("usr/share/pglb/pglb.toml"))
        .arg("--check"));
    assert!(out.status.success(), "{}", text(&out));
    install_and_upgrade(deb, &root, tmp.path());
}

/// The previous package's layout (0.1.0: the example installed as the conffile
/// /etc/pglb/pglb.toml), built from this package's files.
fn previous_package(new_root: &Path, work: &Path) -> PathBuf {
    let old = work.join("old-root");
    run_ok(Command::new("cp").arg("-a").arg(new_root).arg(&old));
    std::fs::create_dir_all(old.join("etc/pglb")).unwrap();
    std::fs::rename(
        old.join("usr/share/pglb/pglb.toml"),
        old.join("etc/pglb/pglb.toml"),
    )
    .unwrap();
    std::fs::create_dir_all(old.join("DEBIAN")).unwrap();
    std::fs::write(
        old.join("DEBIAN/control"),
        "Package: pglb\nVersion: 0.0.9-1\nArchitecture: amd64\nMaintainer: pglb tests <t@pglb.invalid>\n\
         Depends: adduser\nDescription: pglb, previous layout (test)\n",
    )
    .unwrap();
    std::fs::write(old.join("DEBIAN/conffiles"), "/etc/pglb/pglb.toml\n").unwrap();
    let deb = work.join("pglb_0.0.9-1_amd64.deb");
    run_ok(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&old)
            .arg(&deb),
    );
    deb
}

/// Purges the test's package even when the test fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "pglb"])
            .stdin(std::process::Stdio::null())
            .output();
    }
}

/// dpkg, never interactive: stdin is /dev/null, as in unattended upgrades.
fn dpkg(args: &[&str], deb: Option<&Path>) -> String {
    let mut cmd = Command::new("dpkg");
    cmd.args(args).stdin(std::process::Stdio::null());
    if let Some(d) = deb {
        cmd.arg(d);
    }
    let out = run(&mut cmd);
    let said = text(&out);
    assert!(out.status.success(), "dpkg {args:?}: {said}");
    said
}

/// Installs the package on this machine (tests run as root in CI), the way users do:
/// a fresh install creates a config the service user can read; an upgrade from the
/// conffile layout over an edited config keeps the edit without a prompt; purge removes
/// everything. Refuses to touch a machine where pglb is installed already.
fn install_and_upgrade(deb: &Path, new_root: &Path, work: &Path) {
    if !is_root() {
        println!("package install/upgrade: skipped, needs root (CI runs as root)");
        return;
    }
    let installed = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "pglb"]));
    assert!(
        !String::from_utf8_lossy(&installed.stdout).contains("install ok installed"),
        "pglb is installed on this machine: the package test will not touch it"
    );
    let config = Path::new("/etc/pglb/pglb.toml");
    let old = previous_package(new_root, work);
    let _purge = Purge;
    dpkg(&["-i"], Some(&old));
    let mut edited = std::fs::read_to_string(config).unwrap();
    edited.push_str("\n# edited by the operator\n");
    std::fs::write(config, &edited).unwrap();

    let said = dpkg(&["-i"], Some(deb));
    // dpkg itself notes once that the old package's /etc/pglb still holds the (kept)
    // config; nothing else may warn.
    let others: Vec<&str> = said
        .lines()
        .filter(|l| l.to_lowercase().contains("warning"))
        .filter(|l| !l.contains("unable to delete old directory '/etc/pglb'"))
        .collect();
    assert!(others.is_empty(), "no maintainer-script warning: {said}");
    assert_eq!(
        std::fs::read_to_string(config).unwrap(),
        edited,
        "the operator's edit survives"
    );
    assert_eq!(
        std::fs::read_to_string("/usr/share/pglb/pglb.toml").unwrap(),
        read("config/pglb.toml")
    );
    dpkg(&["--purge", "pglb"], None);
    assert!(!config.exists(), "purge removes the config");

    // Fresh install: the example becomes /etc/pglb/pglb.toml, root:pglb 0640, which the
    // service user can read (`--check` as pglb, as systemd's ExecStartPre runs it).
    let said = dpkg(&["-i"], Some(deb));
    assert!(!said.to_lowercase().contains("warning"), "{said}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(config).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o640);
    let out = run(Command::new("setpriv")
        .args([
            "--reuid=pglb",
            "--regid=pglb",
            "--init-groups",
            "/usr/bin/pglb",
            "--config",
        ])
        .arg(config)
        .arg("--check"));
    assert!(out.status.success(), "{}", text(&out));
    dpkg(&["--purge", "pglb"], None);
    let gone = run(Command::new("getent").args(["passwd", "pglb"]));
    assert!(!gone.status.success(), "purge removes the user");
}
