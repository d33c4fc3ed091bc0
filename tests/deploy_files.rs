//! The deployment files: the systemd unit, the Debian package, keepalived, Vagrant and
//! Docker. None of them can run for real here (no systemd as PID 1, no VRRP peer, no
//! Vagrant, no Docker engine), so each is checked with the real tool that reads it
//! (systemd-analyze, keepalived --config-test, ruby -c, PyYAML, pgbouncer, pglb --check,
//! cargo-deb and dpkg-deb) and for the properties the topology depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (deploy/apt-deps.sh installs it)"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pglb_check(path: &Path) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_pglb"))
        .arg("--config")
        .arg(path)
        .arg("--check"));
    assert!(
        out.status.success(),
        "{}: pglb --check: {}",
        path.display(),
        text(&out)
    );
    assert!(
        text(&out).contains("configuration is valid"),
        "{}",
        text(&out)
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o111 == 0o111)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// systemd unit

/// `[Section]` → key → values (a key may repeat: ExecReload, SystemCallFilter).
fn parse_unit(unit: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    for (n, line) in unit.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "line {}: no continuations", n + 1);
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        assert!(!current.is_empty(), "line {}: key outside a section", n + 1);
        sections
            .entry(current.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    sections
}

#[test]
fn systemd_unit_is_notify_hardened_and_unprivileged() {
    let unit = parse_unit(&read("deploy/pglb.service"));
    let service = &unit["Service"];
    let one = |k: &str| -> &str {
        let v = service
            .get(k)
            .unwrap_or_else(|| panic!("[Service] has no {k}="));
        assert_eq!(v.len(), 1, "{k}= is set {} times", v.len());
        &v[0]
    };
    let config = "--config /etc/pglb/pglb.toml";
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("ExecStart"), format!("/usr/bin/pglb {config}"));
    assert_eq!(
        one("ExecStartPre"),
        format!("/usr/bin/pglb {config} --check")
    );
    let reload = &service["ExecReload"];
    assert_eq!(
        reload.last().map(String::as_str),
        Some("/bin/kill -HUP $MAINPID"),
        "reload ends with SIGHUP to the main pid: {reload:?}"
    );
    for r in &reload[..reload.len() - 1] {
        assert_eq!(r, &format!("/usr/bin/pglb {config} --check"), "{reload:?}");
    }
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("RestartSec"), "1");

    // The stop timeout must outlast the graceful stop of the shipped config.
    let shipped: toml::Table = toml::from_str(&read("config/pglb.toml")).expect("config");
    let global = shipped["global"].as_table().expect("[global]");
    let grace = humantime::parse_duration(global["grace"].as_str().expect("grace")).unwrap();
    let stop: u64 = one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        Duration::from_secs(stop) >= grace + Duration::from_secs(10),
        "TimeoutStopSec={stop} vs grace {grace:?}"
    );
    // Two descriptors per session (client + server) at [global] maxconn, plus slack.
    let maxconn = global["maxconn"].as_integer().expect("maxconn") as u64;
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE number");
    assert!(nofile >= 2 * maxconn + 1024, "LimitNOFILE={nofile}");
    assert!(nofile >= 12_000 + 1024);

    assert_eq!(one("User"), "pglb");
    assert_eq!(one("Group"), "pglb");
    assert_eq!(one("StateDirectory"), "pglb");
    let state_file = shipped["stats"]["state_file"].as_str().expect("state_file");
    assert!(
        state_file.starts_with("/var/lib/pglb/"),
        "the state file must be in the StateDirectory (the only writable path): {state_file}"
    );
    // Ports 5432 and 8404 need no capability: the bounding set is empty.
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert!(
        service
            .get("AmbientCapabilities")
            .is_none_or(|v| v == &[""])
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    // The hostname in alerts is read from /proc/sys: it must stay visible.
    assert!(!service.contains_key("ProcSubset"));
    assert!(!service.contains_key("PrivateNetwork"));
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
}

/// `systemd-analyze verify` needs a running systemd (not in this container);
/// `security --offline=yes` reads the unit file alone and scores its sandboxing.
#[test]
fn systemd_unit_exposure_score_is_low() {
    let unit = repo().join("deploy/pglb.service");
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit),
    );
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for pglb.service:"))
        .unwrap_or_else(|| panic!("no overall score in:\n{out}"));
    let score: f64 = line
        .split("pglb.service:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    assert!(score < 5.0, "exposure {score}: {line}");
    // Every capability and namespace check passes.
    for l in out.lines().filter(|l| l.starts_with('✗')) {
        assert!(
            !l.contains("CapabilityBoundingSet") && !l.contains("RestrictNamespaces"),
            "{l}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Debian package

/// Runs a maintainer script with PATH holding only recording stand-ins for the commands
/// it may call, so nothing on this machine changes. Returns the calls, one per line.
fn run_maintainer_script(script: &Path, args: &[&str], user_exists: bool) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls");
    for tool in [
        "adduser",
        "deluser",
        "delgroup",
        "getent",
        "mkdir",
        "chown",
        "chmod",
        "rm",
        "rmdir",
        "cp",
        "systemctl",
    ] {
        let exit = if tool == "getent" && !user_exists {
            2
        } else {
            0
        };
        let path = dir.path().join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"${{0##*/}} $*\" >>\"$CALLS\"\nexit {exit}\n"),
        )
        .expect("write stand-in");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
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
    std::fs::copy(env!("CARGO_BIN_EXE_pglb"), staged.join("release/pglb")).unwrap();
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
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

// ---------------------------------------------------------------------------------------
// keepalived

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
        let rendered = conf
            .replace("eth1", &iface)
            .replace("/usr/local/lib/pglb/", &format!("{}/", scripts.display()));
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
    let broken = read("deploy/keepalived/keepalived-lb1.conf")
        .replace("eth1", &iface)
        .replace("/usr/local/lib/pglb/", "/nonexistent/");
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
        // alive: fall 1 / timeout 2 (see the file's comment and tests/failover.rs);
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

/// Stand-ins for curl and logger that record their arguments.
fn fake_tools(dir: &Path, tools: &[(&str, i32)]) {
    for (tool, exit) in tools {
        let path = dir.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nprintf '%s\\n' \"${{0##*/}} $*\" >>\"$CALLS\"\nexit {exit}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
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
            fake_tools(tmp.path(), &[("curl", curl_exit)]);
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
    fake_tools(tmp.path(), &[("logger", 1)]);
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

// ---------------------------------------------------------------------------------------
// Shell scripts

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

// ---------------------------------------------------------------------------------------
// Docker

/// YAML → JSON through Debian's PyYAML (python3-yaml), the parser docker-compose v1 uses.
fn yaml(rel: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            ])
            .arg(repo().join(rel)),
    );
    serde_json::from_str(&out).expect("json")
}

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
    let mut rendered = cfg.clone();
    for n in 1..=3 {
        rendered = rendered.replace(&format!("\"pgb{n}:6432\""), "\"127.0.0.1:6432\"");
    }
    assert_ne!(rendered, cfg);
    std::fs::write(&path, rendered).unwrap();
    pglb_check(&path);
}

/// Kills the child when dropped (the test may panic while it runs).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The compose PgBouncers' pgbouncer.ini and userlist.txt, loaded by Debian's real
/// PgBouncer (only listen address, port and file paths rewritten to run here): it must
/// start, accept a SCRAM login from the userlist, and report the pool settings.
#[test]
fn docker_pgbouncer_config_runs_on_a_real_pgbouncer() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let ini = read("docker/pgbouncer/pgbouncer.ini")
        .replace(
            "auth_file = /etc/pgbouncer/userlist.txt",
            &format!("auth_file = {}/userlist.txt", tmp.path().display()),
        )
        .replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        .replace("listen_port = 6432", &format!("listen_port = {port}"));
    std::fs::write(tmp.path().join("pgbouncer.ini"), &ini).unwrap();
    std::fs::write(
        tmp.path().join("userlist.txt"),
        read("docker/pgbouncer/userlist.txt"),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/sbin/pgbouncer");
    cmd.arg(tmp.path().join("pgbouncer.ini"));
    if is_root() {
        // PgBouncer refuses to run as root: run it as postgres, like the harness does.
        use std::os::unix::process::CommandExt;
        let id = |flag: &str| -> u32 {
            run_ok(Command::new("id").args([flag, "postgres"]))
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        for f in ["", "pgbouncer.ini", "userlist.txt"] {
            std::os::unix::fs::chown(tmp.path().join(f), Some(uid), Some(gid)).unwrap();
        }
        cmd.uid(uid).gid(gid);
    }
    let mut child = KillOnDrop(cmd.spawn().expect("start /usr/sbin/pgbouncer"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
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

// ---------------------------------------------------------------------------------------
// Vagrant

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
