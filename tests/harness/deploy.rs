//! Reading the deployment files (deploy/, docker/, vagrant/, config/) for the tests that
//! check them with the real tools that read them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::{pglb_bin, run, run_ok, text};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A repository file's text.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// `pglb --check` accepts the config at `path`.
pub fn pglb_check(path: &Path) {
    let out = run(Command::new(pglb_bin())
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

/// Executable by its owner, group and others.
pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o111 == 0o111)
        .unwrap_or(false)
}

/// YAML → JSON through Debian's PyYAML (python3-yaml), the parser docker-compose v1 uses.
pub fn yaml(rel: &str) -> serde_json::Value {
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

/// Stand-ins in `dir` for `tools` (name, exit code): each appends its name and arguments,
/// one line per call, to the file named by `$CALLS`, and exits with its code.
pub fn stand_ins(dir: &Path, tools: &[(&str, i32)]) {
    for (tool, exit) in tools {
        let path = dir.join(tool);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nprintf '%s\\n' \"${{0##*/}} $*\" >>\"$CALLS\"\nexit {exit}\n"),
        )
        .expect("write stand-in");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
