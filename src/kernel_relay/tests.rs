//! The kernel relay on this machine's kernel (root, BPF): the program's framing on
//! message streams split at every byte, and whole sessions through pglb's data path
//! against fake PgBouncers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Loaded, get, prepare};
use crate::config::RelayMode;
use crate::state::ListenState;
use crate::testing::{AUTH_OK, Fake, KEY_DATA, READY_IDLE, fake, listen_with, pattern};
use crate::testing::{read_exactly, serve, startup_packet};

fn kernel() -> &'static Loaded {
    if let Err(why) = prepare(1024) {
        panic!("these tests need the kernel relay (root, BPF): {why}");
    }
    get().expect("prepared")
}

/// A listen with `relay = "kernel"` over `servers`.
fn kernel_listen(servers: &[SocketAddr]) -> Arc<ListenState> {
    kernel();
    listen_with(servers, |cfg| cfg.relay = RelayMode::Kernel)
}

async fn login(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(&startup_packet("app")).await.expect("startup");
    let hello = [&AUTH_OK[..], &KEY_DATA, &READY_IDLE].concat();
    assert_eq!(read_exactly(&mut c, hello.len()).await, hello);
    c
}

/// Sessions with both sockets in the kernel's map right now.
fn in_kernel(k: &Loaded) -> usize {
    k.flow_count() / 2
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test]
async fn after_the_login_the_kernel_relays_bytes_unchanged_both_ways() {
    let k = kernel();
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve(&listen, 100);
    let before = in_kernel(k);
    let mut c = login(addr).await;
    eventually("the session is in the kernel", || in_kernel(k) > before).await;
    let data = pattern(5 << 20, 1);
    let (mut r, mut w) = c.split();
    let write = async {
        w.write_all(&data).await.expect("write");
    };
    let mut got = vec![0u8; data.len()];
    let read = timeout(Duration::from_secs(20), r.read_exact(&mut got));
    let (_, read) = tokio::join!(write, read);
    read.expect("in time").expect("read");
    assert!(got == data, "5 MiB echoed through the kernel unchanged");
    drop(c);
    eventually("the session ends and leaves the map", || {
        listen.servers()[0].sessions() == 0
    })
    .await;
    let c = &listen.counters;
    use crate::counters::Counter;
    assert!(
        c.bin.get() >= data.len() as u64,
        "bytes in counted: {}",
        c.bin.get()
    );
    assert!(
        c.bout.get() >= data.len() as u64,
        "bytes out counted: {}",
        c.bout.get()
    );
}
