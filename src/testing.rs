//! Fixtures for in-process tests of the data path: small fake servers on loopback that
//! answer the way a PgBouncer (or a broken one) would, connected socket pairs, and
//! protocol messages. With tokio's paused clock the timeouts cost nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{Shared, accept_loop};
use crate::cancel::Registry;
use crate::config::{Balance, CancelLimits, CheckKind};
use crate::counters::Gate;
use crate::pick::tests::{listen_cfg, server};
use crate::state::ListenState;
use crate::workers::Workers;

/// AuthenticationOk.
pub const AUTH_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
/// ReadyForQuery, idle.
pub const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];
/// BackendKeyData for pid 4242, secret 0x01020304.
pub const KEY_DATA: [u8; 13] = [b'K', 0, 0, 0, 12, 0, 0, 0x10, 0x92, 1, 2, 3, 4];

/// What a fake server does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Fake {
    /// Reads the StartupMessage, answers an ErrorResponse.
    Refuse(&'static str),
    /// Reads the StartupMessage, answers AuthenticationOk and nothing more.
    Accept,
    /// Logs in like a PgBouncer (AuthenticationOk, BackendKeyData, ReadyForQuery), then
    /// echoes every byte it gets.
    Echo,
    /// Reads whatever comes, never answers.
    Hang,
    /// Accepts and closes at once.
    Close,
    /// Reads the first packet (an SSLRequest, a CancelRequest), then closes.
    CloseAfterFirst,
    /// Answers the SSLRequest `N`, then behaves as `Accept`.
    DeclineSsl,
    /// Answers in another protocol.
    Http,
    /// Logs in like `Echo`, reads a request, answers `pattern(n, 7)` and closes at once.
    Blast(usize),
}

/// A fake server; what each connection sent first (up to 1 KiB) arrives on the channel.
pub async fn fake_recording(behavior: Fake) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(converse(s, behavior, tx.clone()));
        }
    });
    (addr, rx)
}

pub async fn fake(behavior: Fake) -> SocketAddr {
    fake_recording(behavior).await.0
}

async fn converse(mut s: TcpStream, behavior: Fake, first: mpsc::UnboundedSender<Vec<u8>>) {
    let mut buf = vec![0u8; 1024];
    if matches!(behavior, Fake::Close) {
        return;
    }
    let n = s.read(&mut buf).await.unwrap_or(0);
    let _ = first.send(buf[..n].to_vec());
    match behavior {
        Fake::Close | Fake::CloseAfterFirst => {}
        Fake::Hang => std::future::pending::<()>().await,
        Fake::Refuse(msg) => {
            let e = crate::refusal::error_response("FATAL", "08P01", msg);
            let _ = s.write_all(&e).await;
        }
        Fake::Http => {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
        Fake::Accept | Fake::DeclineSsl => {
            if matches!(behavior, Fake::DeclineSsl) && n == 8 {
                let _ = s.write_all(b"N").await;
                let _ = s.read(&mut buf).await;
            }
            let _ = s.write_all(&AUTH_OK).await;
            std::future::pending::<()>().await;
        }
        Fake::Blast(n) => {
            let hello = [&AUTH_OK[..], &KEY_DATA, &READY_IDLE].concat();
            if s.write_all(&hello).await.is_ok() && s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                let _ = s.write_all(&pattern(n, 7)).await;
            }
        }
        Fake::Echo => {
            let hello = [&AUTH_OK[..], &KEY_DATA, &READY_IDLE].concat();
            if s.write_all(&hello).await.is_ok() {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        }
    }
}

/// A listen over these servers, in order (balance "first"), without checks.
pub fn listen_over(addrs: &[SocketAddr]) -> Arc<ListenState> {
    listen_with(addrs, |_| {})
}

/// `listen_over`, with `edit` applied to its settings.
pub fn listen_with(
    addrs: &[SocketAddr],
    edit: impl FnOnce(&mut crate::config::Listen),
) -> Arc<ListenState> {
    let servers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut s = server(&format!("s{}", i + 1), 0, false);
            s.addr = *a;
            s.check.kind = CheckKind::None;
            s
        })
        .collect();
    let mut cfg = listen_cfg(servers, Duration::from_secs(1));
    cfg.balance = Balance::First;
    cfg.timeouts.login = Duration::from_secs(5);
    cfg.timeouts.startup = Duration::from_secs(5);
    edit(&mut cfg);
    Arc::new(ListenState::new(1, cfg, crate::events::channel()))
}

/// pglb's accept loop for `listen` on a worker of its own, under a global maxconn;
/// returns the address clients connect to. Keep the workers alive for the test.
pub fn serve(listen: &Arc<ListenState>, global_maxconn: usize) -> (SocketAddr, Workers) {
    serve_on("127.0.0.1:0", listen, global_maxconn)
}

/// `serve` with its listening socket bound to `bind` (`"[::1]:0"`).
pub fn serve_on(
    bind: &str,
    listen: &Arc<ListenState>,
    global_maxconn: usize,
) -> (SocketAddr, Workers) {
    let workers = Workers::start(1).expect("worker");
    let pool = workers.pool();
    let listener = crate::net::bind_std(bind.parse().expect("addr"), 64).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shared = Shared::new(
        Gate::new(global_maxconn),
        TaskTracker::new(),
        CancellationToken::new(),
        Arc::clone(&pool),
        Arc::new(Registry::new(CancelLimits {
            per_second: 100,
            per_client: 10,
        })),
    );
    let stop = CancellationToken::new();
    pool.handle(0)
        .spawn(accept_loop(listener, 0, Arc::clone(listen), shared, stop));
    (addr, workers)
}

/// A connected TCP pair on loopback: (the side pglb holds, the other end).
pub async fn socket_pair() -> (TcpStream, TcpStream) {
    socket_pair_on("127.0.0.1").await
}

/// `socket_pair` on another loopback address (`"::1"`).
pub async fn socket_pair_on(ip: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind((ip, 0)).await.expect("bind");
    let peer = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (mine, _) = l.accept().await.expect("accept");
    (mine, peer)
}

/// A StartupMessage (protocol 3.0) for `user`.
pub fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("user\0{user}\0\0").as_bytes());
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// `n` bytes that differ from one position to the next (a shifted or dropped byte shows).
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// Exactly `n` bytes from `s`, within 5 s.
pub async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("bytes in time")
        .expect("bytes");
    got
}
