//! The kernel relay (`[listen] relay = "kernel"`): after its login, a plaintext session's
//! sockets go into a BPF socket map whose verdict program redirects each socket's data
//! to its peer, so the session's bytes no longer pass through pglb's process.
//!
//! Opt-in and never the only way: at start pglb loads the program and runs a self-test
//! (a byte-exact exchange through the kernel over loopback); if either fails it logs why
//! and relays in user space. A session whose hand-over fails stays in user space too,
//! and one the program hands back (a drain, data it could not redirect) continues there.

mod hangups;
mod maps;
mod session;
mod step;
mod tcp_info;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

pub(crate) use maps::Loaded;
pub(crate) use session::Resume;
pub(crate) use step::{COUNTS, Path, relay};

/// The kernel relay of this process, once `prepare` ran: the loaded program, or why not.
static KERNEL: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// Loads the program and self-tests it (once per process; later calls return the first
/// answer). `sessions`: how many sessions the maps must hold at once. Returns how many
/// they hold: fewer than asked when a reload raised maxconn past the size they were
/// loaded with (sessions past it stay in user space).
pub fn prepare(sessions: u32) -> Result<u32, String> {
    let loaded = KERNEL.get_or_init(|| {
        let loaded = Loaded::load(sessions).map_err(|e| explain(&e))?;
        self_test(&loaded).map_err(|e| format!("self-test failed: {e}"))?;
        Ok(loaded)
    });
    loaded.as_ref().map(|l| l.sessions).map_err(Clone::clone)
}

/// An error with its causes (aya's top-level words alone rarely say why), and what to do
/// about the usual one.
fn explain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let words = c.to_string();
        if !text.contains(&words) {
            // Each cause's words often repeat the one before: keep only what is new.
            let new = words.rsplit(": ").next().unwrap_or(&words);
            text = format!("{text}: {new}");
        }
        cause = c.source();
    }
    if text.contains("Operation not permitted") {
        text.push_str(
            " (the kernel relay needs CAP_BPF and CAP_NET_ADMIN: see deploy/kernel-relay.conf)",
        );
    }
    text
}

/// The kernel relay, if `prepare` succeeded.
pub(crate) fn get() -> Option<&'static Loaded> {
    KERNEL.get().and_then(|k| k.as_ref().ok())
}

/// Bytes sent each way by the self-test.
const TEST_BYTES: usize = 1 << 20;

/// Two loopback connections joined through the kernel relay, as a client and its server
/// are: 1 MiB one way and a ReadyForQuery the other must arrive unchanged, and the
/// program must have framed and counted them.
fn self_test(kernel: &Loaded) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(e("bind"))?;
    let addr = listener.local_addr().map_err(e("bind"))?;
    let mut far_client = TcpStream::connect(addr).map_err(e("connect"))?;
    let (near_client, _) = listener.accept().map_err(e("accept"))?;
    let near_server = TcpStream::connect(addr).map_err(e("connect"))?;
    let (mut far_server, _) = listener.accept().map_err(e("accept"))?;
    for s in [&far_client, &far_server] {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(e("timeout"))?;
    }
    let pair = kernel
        .insert(&near_client, &near_server, 0)
        .map_err(e("socket map"))?;
    let outcome = (|| {
        // A CopyData message carrying the pattern, so the framing has a body to skip.
        let mut up = vec![b'd'];
        up.extend_from_slice(&(TEST_BYTES as u32 + 4).to_be_bytes());
        up.extend((0..TEST_BYTES).map(|i| (i * 7 + i / 251) as u8));
        let writer = {
            let mut to = far_client.try_clone().map_err(e("clone"))?;
            let up = up.clone();
            std::thread::spawn(move || to.write_all(&up))
        };
        let mut got = vec![0u8; up.len()];
        far_server.read_exact(&mut got).map_err(e("relayed read"))?;
        writer
            .join()
            .map_err(|_| "writer panicked".to_string())?
            .map_err(e("write"))?;
        if got != up {
            return Err("bytes changed on the way".into());
        }
        let ready = b"Z\0\0\0\x05I";
        far_server.write_all(ready).map_err(e("write"))?;
        let mut back = [0u8; 6];
        far_client
            .read_exact(&mut back)
            .map_err(e("relayed read"))?;
        if &back != ready {
            return Err("bytes changed on the way back".into());
        }
        let (c, s) = kernel.flows(pair).map_err(e("flows"))?;
        if c.bytes != up.len() as u64 || s.messages != 1 || s.status != b'I' || !s.at_rest {
            return Err(format!("counted wrong: client {c:?}, server {s:?}"));
        }
        Ok(())
    })();
    kernel.remove(pair);
    outcome
}

/// Words for a failed step of the self-test.
fn e(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |err| format!("{what}: {err}")
}

#[cfg(test)]
mod tests;
