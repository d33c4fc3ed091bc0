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
use crate::testing::{read_exactly, serve, serve_on, socket_pair, socket_pair_on, startup_packet};

fn kernel() -> &'static Loaded {
    if let Err(why) = prepare(8192) {
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
    let (r, w) = c.split();
    let got = through(w, r, &data).await;
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

/// Two loopback connections joined in the kernel's map as a client and its server are;
/// the test holds the far ends.
struct Joined {
    k: &'static Loaded,
    pair: super::maps::Pair,
    far_client: TcpStream,
    far_server: TcpStream,
    _near: (TcpStream, TcpStream),
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.k.remove(self.pair);
    }
}

async fn joined() -> Joined {
    let k = kernel();
    let (near_client, far_client) = socket_pair().await;
    let (near_server, far_server) = socket_pair().await;
    let pair = k
        .insert(&near_client, &near_server, 0)
        .expect("into the map");
    Joined {
        k,
        pair,
        far_client,
        far_server,
        _near: (near_client, near_server),
    }
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A server's answers with three ReadyForQuery (`T`, `E`, then `I` last), and bytes
/// inside other messages that look like one.
fn backend_stream() -> Vec<u8> {
    [
        message(
            b'T',
            b"\0\x01id\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        ),
        message(b'D', b"\0\x01\0\0\0\x06Z\0\0\0\x05I"),
        message(b'C', b"SELECT 1\0"),
        message(b'Z', b"T"),
        message(b'E', b"SERROR\0C42601\0Msyntax error\0\0"),
        message(b'Z', b"E"),
        message(b'S', b"application_name\0Z\0"),
        message(b'n', b""),
        message(b'Z', b"I"),
    ]
    .concat()
}

/// A client's requests: a Query, an extended-protocol exchange ending in Sync, a
/// FunctionCall (3 requests), and a CopyData whose bytes look like a Query.
fn frontend_stream() -> Vec<u8> {
    [
        message(b'Q', b"SELECT 1\0"),
        message(b'P', b"\0SELECT $1\0\0\0"),
        message(b'B', b"\0\0\0\0\0\x01\0\0\0\x011\0\0"),
        message(b'E', b"\0\0\0\0\0"),
        message(b'S', b""),
        message(b'd', b"Q\0\0\0\x05x"),
        message(b'F', b"\0\0\x04\xd2\0\0\0\0\0\0"),
    ]
    .concat()
}

/// Sends `stream` from `from` in the pieces `cuts` makes, each read at `to` before the
/// next is sent (so each reaches the program as a packet of its own).
async fn send_in_pieces(from: &mut TcpStream, to: &mut TcpStream, stream: &[u8], cuts: &[usize]) {
    let mut at = 0;
    for &end in cuts.iter().chain([&stream.len()]) {
        from.write_all(&stream[at..end]).await.expect("write");
        assert_eq!(read_exactly(to, end - at).await, &stream[at..end]);
        at = end;
    }
}

/// Every way to cut a stream of `len` bytes in two, then one byte at a time.
fn cut_plans(len: usize) -> impl Iterator<Item = Vec<usize>> {
    let halves = (1..len).map(|k| vec![k]);
    halves.chain(std::iter::once((1..len).collect()))
}

#[tokio::test]
async fn the_program_frames_server_messages_split_at_every_byte() {
    let mut j = joined().await;
    let stream = backend_stream();
    let mut rounds = 0;
    for cuts in cut_plans(stream.len()) {
        send_in_pieces(&mut j.far_server, &mut j.far_client, &stream, &cuts).await;
        rounds += 1;
        let (_, s) = j.k.flows(j.pair).expect("flows");
        let at = format!("cut at {cuts:?}");
        assert_eq!(s.messages, 3 * rounds, "ReadyForQuery counted, {at}");
        assert_eq!(s.status, b'I', "{at}");
        assert!(s.at_rest && s.at_boundary && !s.opaque, "{at}: {s:?}");
        assert_eq!(s.bytes, stream.len() as u64 * rounds, "{at}");
    }
}

#[tokio::test]
async fn the_program_counts_client_requests_split_at_every_byte() {
    let mut j = joined().await;
    let stream = frontend_stream();
    let mut rounds = 0;
    for cuts in cut_plans(stream.len()) {
        send_in_pieces(&mut j.far_client, &mut j.far_server, &stream, &cuts).await;
        rounds += 1;
        let (c, _) = j.k.flows(j.pair).expect("flows");
        assert_eq!(c.messages, 3 * rounds, "requests counted, cut at {cuts:?}");
        assert!(c.at_boundary && !c.opaque, "cut at {cuts:?}: {c:?}");
    }
}

#[tokio::test]
async fn a_message_that_cannot_be_postgresql_makes_the_stream_opaque_not_stuck() {
    let mut j = joined().await;
    // A length below 4 is impossible: framing stops, the bytes still flow.
    let junk = [b'Z', 0, 0, 0, 1, b'x', b'y'];
    send_in_pieces(&mut j.far_server, &mut j.far_client, &junk, &[]).await;
    let more = backend_stream();
    send_in_pieces(&mut j.far_server, &mut j.far_client, &more, &[3]).await;
    let (_, s) = j.k.flows(j.pair).expect("flows");
    assert!(s.opaque, "{s:?}");
    assert_eq!(
        s.messages, 0,
        "nothing counted after the stream stopped making sense"
    );
}

/// Writes `data` into `w` while reading as much from `r` (bounded), and returns it.
async fn through(
    mut w: impl AsyncWriteExt + Unpin,
    mut r: impl AsyncReadExt + Unpin,
    data: &[u8],
) -> Vec<u8> {
    let mut got = vec![0u8; data.len()];
    let (wrote, read) = tokio::join!(
        w.write_all(data),
        timeout(Duration::from_secs(20), r.read_exact(&mut got))
    );
    wrote.expect("write");
    read.expect("in time").expect("read");
    got
}

/// Everything until the server's side closes, within `limit`.
async fn read_to_close(c: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    timeout(limit, c.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    got
}

#[tokio::test]
async fn a_server_closing_right_after_a_large_result_loses_nothing() {
    // What a socket map does if its socket closes with bytes still queued in the
    // kernel: they vanish. pglb waits for the client to have them all.
    let size = 8 << 20;
    let listen = kernel_listen(&[fake(Fake::Blast(size)).await]);
    let (addr, _workers) = serve(&listen, 100);
    let want = pattern(size, 7);
    for round in 0..20 {
        let mut c = login(addr).await;
        c.write_all(&crate::testing::query("SELECT big"))
            .await
            .expect("query");
        let got = read_to_close(&mut c, Duration::from_secs(20)).await;
        assert_eq!(got.len(), size, "round {round}: all bytes, then the close");
        assert!(got == want, "round {round}: bytes unchanged");
    }
}

#[tokio::test]
async fn a_slow_reader_gets_every_byte_of_a_result_its_server_closed_after() {
    let size = 4 << 20;
    let listen = kernel_listen(&[fake(Fake::Blast(size)).await]);
    let (addr, _workers) = serve(&listen, 100);
    let mut c = login(addr).await;
    c.write_all(&crate::testing::query("SELECT big"))
        .await
        .expect("query");
    let mut got = Vec::with_capacity(size);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // ~64 KiB per 10 ms: over half a second for the whole result.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let n = timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("bytes in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got == pattern(size, 7),
        "{} of {size} bytes, unchanged",
        got.len()
    );
}

#[tokio::test]
async fn a_client_half_close_reaches_the_server_after_every_byte_and_the_answer_comes_back() {
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve(&listen, 100);
    let data = pattern(3 << 20, 3);
    // Rounds: the client's FIN races the kernel's worker (a FIN redirected after pglb
    // half-closed the server marked it EPIPE, ending the session with the echo still
    // under way, in about one round of seven).
    for round in 0..12 {
        let mut c = login(addr).await;
        c.write_all(&data).await.expect("write");
        c.shutdown().await.expect("half-close");
        // The echo server sees EOF only after all 3 MiB, echoes them, then closes.
        let got = read_to_close(&mut c, Duration::from_secs(20)).await;
        assert!(
            got == data,
            "round {round}: {} of {} bytes back, unchanged",
            got.len(),
            data.len()
        );
    }
}

fn handed_over() -> u64 {
    super::COUNTS
        .handed_over
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// (stayed in user space, handed back) since the start: `/metrics`'
/// `pglb_kernel_relay_sessions_total` outcomes. (One process per test under nextest.)
fn other_outcomes() -> (u64, u64) {
    let c = &super::COUNTS;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    (load(&c.stayed), load(&c.handed_back))
}

/// A request and, once echoed by `Fake::Echo`, its answer: the program counts the Query
/// on the way in and the ReadyForQuery (`status`) on the way back.
fn transaction(status: u8) -> Vec<u8> {
    [crate::testing::query("SELECT 1"), message(b'Z', &[status])].concat()
}

/// The FATAL a drained session ends with.
fn assert_drained(rest: &[u8]) {
    let text = String::from_utf8_lossy(rest);
    assert_eq!(rest.first(), Some(&b'E'), "an ErrorResponse: {text:?}");
    assert!(
        text.contains("57P01") && text.contains("drained"),
        "{text:?}"
    );
}

#[tokio::test]
async fn a_drain_ends_a_kernel_session_at_its_transaction_boundary_not_inside() {
    kernel();
    let listen = listen_with(&[fake(Fake::Echo).await], |cfg| {
        cfg.relay = RelayMode::Kernel;
        cfg.timeouts.drain = Duration::from_secs(10);
        cfg.timeouts.client = Duration::from_secs(30);
        cfg.timeouts.server = Duration::from_secs(30);
    });
    let (addr, _workers) = serve(&listen, 100);
    let mut c = login(addr).await;
    eventually("handed to the kernel", || handed_over() == 1).await;
    listen.servers()[0].set_draining(true);
    // Inside a transaction ('T'): the session stays, past the drain's quiet time.
    let open = transaction(b'T');
    c.write_all(&open).await.expect("write");
    assert_eq!(read_exactly(&mut c, open.len()).await, open);
    let mut more = [0u8; 1];
    let early = timeout(Duration::from_millis(1200), c.read(&mut more)).await;
    assert!(
        early.is_err(),
        "nothing (no close, no error) inside a transaction: {early:?}"
    );
    // The transaction ends ('I'): the answer arrives whole, then the FATAL, then the close.
    let close = transaction(b'I');
    c.write_all(&close).await.expect("write");
    let rest = read_to_close(&mut c, Duration::from_secs(5)).await;
    assert_eq!(&rest[..close.len()], &close[..], "the answer first");
    assert_drained(&rest[close.len()..]);
    assert_eq!(other_outcomes(), (0, 1), "handed back for the FATAL");
}

#[tokio::test]
async fn a_drain_closes_a_kernel_session_idle_outside_a_transaction() {
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve(&listen, 100);
    let mut c = login(addr).await;
    let done = transaction(b'I');
    c.write_all(&done).await.expect("write");
    assert_eq!(read_exactly(&mut c, done.len()).await, done);
    eventually("handed to the kernel", || handed_over() == 1).await;
    let asked = std::time::Instant::now();
    listen.servers()[0].set_draining(true);
    let rest = read_to_close(&mut c, Duration::from_secs(5)).await;
    assert_drained(&rest);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn shutdown_sessions_ends_a_kernel_session_at_once() {
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve(&listen, 100);
    let mut c = login(addr).await;
    eventually("handed to the kernel", || handed_over() == 1).await;
    let open = transaction(b'T');
    c.write_all(&open).await.expect("write");
    assert_eq!(read_exactly(&mut c, open.len()).await, open);
    listen.servers()[0].kill_sessions();
    let rest = read_to_close(&mut c, Duration::from_secs(2)).await;
    assert!(rest.is_empty(), "{rest:?}");
    eventually("the place is freed", || listen.servers()[0].sessions() == 0).await;
}

#[tokio::test]
async fn a_quiet_kernel_session_ends_at_the_client_idle_limit() {
    let listen = listen_with(&[fake(Fake::Echo).await], |cfg| {
        cfg.relay = RelayMode::Kernel;
        cfg.timeouts.client = Duration::from_secs(1);
    });
    kernel();
    let (addr, _workers) = serve(&listen, 100);
    let t0 = std::time::Instant::now();
    let mut c = login(addr).await;
    eventually("handed to the kernel", || handed_over() == 1).await;
    // Traffic pushes the limit back.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let q = transaction(b'I');
        c.write_all(&q).await.expect("write");
        assert_eq!(read_exactly(&mut c, q.len()).await, q);
    }
    let quiet = std::time::Instant::now();
    let rest = read_to_close(&mut c, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "{rest:?}");
    let idle = quiet.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(3),
        "closed {idle:?} after the last bytes ({:?} after the start)",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_query_pipelined_behind_the_startup_is_answered_before_the_hand_over_and_nothing_is_lost()
{
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve(&listen, 100);
    let mut c = TcpStream::connect(addr).await.expect("connect");
    // A query pipelined behind the startup, before the ReadyForQuery.
    let early = transaction(b'I');
    c.write_all(&[startup_packet("app"), early.clone()].concat())
        .await
        .expect("write");
    let hello = [&AUTH_OK[..], &KEY_DATA, &READY_IDLE].concat();
    let want = [hello, early].concat();
    assert_eq!(read_exactly(&mut c, want.len()).await, want);
    let later = transaction(b'I');
    c.write_all(&later).await.expect("write");
    assert_eq!(read_exactly(&mut c, later.len()).await, later);
    // Handed over at the first ReadyForQuery that answered everything (the pipelined
    // query's, not the login's).
    assert_eq!(handed_over(), 1);
    assert_eq!(other_outcomes(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_short_sessions_all_go_through_the_kernel_and_leave_no_trace() {
    const SESSIONS: usize = 10_000;
    const AT_ONCE: usize = 50;
    let k = kernel();
    // Room for the sessions whose close is still being passed on: the client's FIN,
    // then the server's answering one (tens of ms here, a debug build with its fake
    // servers on the same two cores).
    let listen = listen_with(&[fake(Fake::Echo).await], |cfg| {
        cfg.relay = RelayMode::Kernel;
        cfg.maxconn = 4000;
    });
    let (addr, _workers) = serve(&listen, 4000);
    let before = k.flow_count();
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..AT_ONCE {
        clients.spawn(async move {
            for i in (n..SESSIONS).step_by(AT_ONCE) {
                let mut c = login(addr).await;
                let q = [transaction(b'I'), pattern(i % 3000, i as u64)].concat();
                c.write_all(&q).await.expect("write");
                assert_eq!(read_exactly(&mut c, q.len()).await, q, "session {i}");
            }
        });
    }
    let all = timeout(Duration::from_secs(120), async {
        while let Some(done) = clients.join_next().await {
            done.expect("client task");
        }
    });
    all.await.expect("10,000 sessions within 2 minutes");
    eventually("every session ended", || {
        listen.servers()[0].sessions() == 0
    })
    .await;
    assert_eq!(
        handed_over(),
        SESSIONS as u64,
        "every session went through the kernel"
    );
    eventually("no flow left behind", || k.flow_count() == before).await;
    use crate::counters::Counter;
    assert_eq!(listen.counters.stot.get(), SESSIONS as u64);
}

#[tokio::test]
async fn stats_count_a_kernel_session_s_bytes_while_it_runs() {
    use crate::counters::Counter;
    kernel();
    let listen = listen_with(&[fake(Fake::Echo).await], |cfg| {
        cfg.relay = RelayMode::Kernel;
        cfg.timeouts.client = Duration::from_secs(30);
        cfg.timeouts.server = Duration::from_secs(30);
    });
    let (addr, _workers) = serve(&listen, 100);
    let mut c = login(addr).await;
    eventually("handed to the kernel", || handed_over() == 1).await;
    let data = pattern(1 << 20, 5);
    let (r, w) = c.split();
    through(w, r, &data).await;
    // Counted within one stats period (2 s), the session still open.
    let counted = || listen.counters.bin.get() >= data.len() as u64;
    for _ in 0..40 {
        if counted() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted(), "bytes in: {}", listen.counters.bin.get());
    assert!(listen.counters.bout.get() >= data.len() as u64);
    assert_eq!(listen.servers()[0].sessions(), 1, "still running");
}

#[tokio::test]
async fn full_maps_refuse_a_session_whole_and_leave_nothing_behind() {
    // Maps sized for one session (as after a reload raised maxconn past their size):
    // the second hand-over must fail cleanly, so its session stays in user space.
    kernel();
    let k = Loaded::load(1).expect("a second, one-session copy of the program");
    assert_eq!(k.sessions, 1);
    let first = (socket_pair().await, socket_pair().await);
    let pair = k.insert(&first.0.0, &first.1.0, 0).expect("the first fits");
    let second = (socket_pair().await, socket_pair().await);
    assert!(k.insert(&second.0.0, &second.1.0, 0).is_err(), "no room");
    assert_eq!(k.flow_count(), 2, "only the first session's flows");
    k.remove(pair);
    let again = k.insert(&second.0.0, &second.1.0, 0).expect("room again");
    k.remove(again);
    assert_eq!(k.flow_count(), 0);
}

#[tokio::test]
async fn an_ipv6_client_and_an_ipv4_server_are_joined_byte_exact() {
    let k = kernel();
    let (near_client, mut far_client) = socket_pair_on("::1").await;
    let (near_server, mut far_server) = socket_pair_on("127.0.0.1").await;
    let pair = k
        .insert(&near_client, &near_server, 0)
        .expect("into the map");
    let up = pattern(1 << 20, 11);
    let down = pattern(1 << 20, 12);
    assert!(
        through(&mut far_client, &mut far_server, &up).await == up,
        "to the server"
    );
    assert!(
        through(&mut far_server, &mut far_client, &down).await == down,
        "to the client"
    );
    let (c, s) = k.flows(pair).expect("flows");
    assert_eq!((c.bytes, s.bytes), (up.len() as u64, down.len() as u64));
    k.remove(pair);
}

#[tokio::test]
async fn a_session_from_an_ipv6_client_goes_through_the_kernel_byte_exact() {
    let k = kernel();
    let listen = kernel_listen(&[fake(Fake::Echo).await]);
    let (addr, _workers) = serve_on("[::1]:0", &listen, 100);
    let before = in_kernel(k);
    let mut c = login(addr).await;
    eventually("the IPv6 session is in the kernel", || {
        in_kernel(k) > before
    })
    .await;
    let data = pattern(1 << 20, 13);
    let (r, w) = c.split();
    assert!(through(w, r, &data).await == data, "1 MiB echoed unchanged");
    drop(c);
    eventually("the session ends and leaves the map", || {
        listen.servers()[0].sessions() == 0 && in_kernel(k) == before
    })
    .await;
}
