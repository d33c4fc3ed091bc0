//! Builds the kernel relay's BPF program (src/kernel_relay/relay.bpf.c) with the
//! system's clang. Without clang (or libbpf's headers) the build still succeeds: the
//! object is left empty and `relay = "kernel"` says at start-up why it is unavailable.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/kernel_relay/relay.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=PGLB_CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("relay.bpf.o");
    let status = match compile(&object) {
        Ok(()) => "built".to_owned(),
        Err(why) => {
            println!("cargo:warning=relay = \"kernel\" unavailable in this build: {why}");
            std::fs::write(&object, b"").expect("OUT_DIR is writable");
            why
        }
    };
    println!("cargo:rustc-env=PGLB_BPF_BUILD={status}");
}

fn compile(object: &std::path::Path) -> Result<(), String> {
    let clang = std::env::var("PGLB_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the multiarch path.
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => return Err(format!("no BPF build for target arch {other:?}")),
    };
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", SOURCE, "-o"])
        .arg(object)
        .output()
        .map_err(|e| format!("cannot run {clang}: {e} (install clang and libbpf-dev)"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().next().unwrap_or("").trim();
    Err(format!("{clang} failed: {first}"))
}
