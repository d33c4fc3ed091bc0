//! The server side of a session's opening: pick a server, connect, replay the client's
//! opening packet on it, and read the server's first answer, moving on to an untried
//! server whenever one fails before the client has seen anything from it.
//!
//! Every wait here is bounded: the connect by `timeouts.connect`, the server's first
//! answer (to the StartupMessage or the SSLRequest) by `timeouts.login`, the client's
//! next packet after a refused SSLRequest by `timeouts.startup`. A server marked DOWN
//! with `shutdown-sessions` releases the clients still waiting for its first answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::warn;

use crate::checker;
use crate::client::Client;
use crate::counters::Counter;
use crate::net;
use crate::pick::{self, Slot};
use crate::refusal::Refusal;
use crate::startup::{self, AfterSsl, CancelKey, Hello, StartupMessage};
use crate::state::{ListenState, ServerState};

/// A session connected to its server, opening exchange done.
pub struct Opened {
    pub slot: Slot,
    pub server: TcpStream,
    /// The StartupMessage, unless the session went TLS end to end.
    pub startup: Option<StartupMessage>,
    pub wait: Duration,
    pub connect: Duration,
    pub to_server: u64,
    pub to_client: u64,
}

/// Why the opening ended without a server.
pub enum Failed {
    /// pglb turns the client away; `hello` says what the client still expects.
    Refused(Refusal),
    /// The client sent a CancelRequest after its SSLRequest was refused.
    Cancel(CancelKey),
    /// The client left or was already answered: nothing more to send.
    Done,
}

/// What one server made of the client's opening.
enum Attempt {
    Opened(Opened),
    /// Failed before the client saw anything from it: try another server.
    Failed(LoginError),
    /// Refused with its own ErrorResponse before authentication.
    Refused(Bytes),
    End(Failed),
}

/// Why a server failed a login before the client saw anything from it. The words reach
/// the client (in the refusal once every server failed) and the log.
#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error("{server} ({addr}): {source}")]
    Connect {
        server: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server marked DOWN while logging in")]
    MarkedDown,
    #[error("connection lost before answering: {0}")]
    Lost(std::io::Error),
    #[error("no answer to the login within {}", humantime::format_duration(*.0))]
    NoAnswer(Duration),
}

/// Counts and durations carried from one attempt to the next.
#[derive(Default)]
struct Tally {
    wait: Duration,
    connect: Duration,
    to_server: u64,
    to_client: u64,
}

/// Opens a server for the client whose opening is `hello`. On an SSLRequest that a server
/// declines, `hello` becomes the StartupMessage the client sends next.
pub async fn open(
    client: &mut Client,
    listen: &Arc<ListenState>,
    hello: &mut Hello,
) -> Result<Opened, Failed> {
    let mut tried: Vec<Arc<ServerState>> = Vec::new();
    let mut tally = Tally::default();
    // The most telling failure so far: a server's own ErrorResponse wins over words.
    let mut last_refusal: Option<(String, Bytes)> = None;
    let mut last_failure: Option<String> = None;
    let retries = listen.cfg().retries;
    let mut connect_failures = 0;
    loop {
        let t0 = Instant::now();
        let slot = match pick::acquire(listen, &tried).await {
            Ok(slot) => slot,
            Err(refusal) => {
                return Err(Failed::Refused(give_up(
                    listen,
                    refusal,
                    last_refusal,
                    last_failure,
                    tried.len(),
                )));
            }
        };
        tally.wait += t0.elapsed();
        let server = Arc::clone(slot.server());
        tried.push(Arc::clone(&server));
        let t1 = Instant::now();
        let conn = connect(listen, &server).await;
        tally.connect += t1.elapsed();
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                connect_failures += 1;
                if connect_failures > retries {
                    return Err(Failed::Refused(Refusal::ConnectFailed {
                        listen: listen.name.clone(),
                        attempts: tried.len() as u32,
                        last_error: e.to_string(),
                    }));
                }
                server.counters.wretr.inc();
                server.counters.wredis.inc();
                last_failure = Some(e.to_string());
                continue;
            }
        };
        match attempt(client, listen, slot, conn, hello, &mut tally).await {
            Attempt::Opened(opened) => return Ok(opened),
            Attempt::End(failed) => return Err(failed),
            Attempt::Failed(reason) => {
                note_replay(listen, &server, &reason);
                last_failure = Some(format!("{}: {reason}", server.name));
            }
            Attempt::Refused(response) => {
                note_replay(listen, &server, &error_text(&response));
                last_refusal = Some((server.name.clone(), response));
            }
        }
    }
}

/// The refusal a client gets once no untried server is left.
fn give_up(
    listen: &ListenState,
    refusal: Refusal,
    last_refusal: Option<(String, Bytes)>,
    last_failure: Option<String>,
    tried: usize,
) -> Refusal {
    if !matches!(refusal, Refusal::NoServer { .. }) || tried == 0 {
        return refusal;
    }
    match (last_refusal, last_failure) {
        (Some((server, response)), _) => Refusal::ServerRefused {
            listen: listen.name.clone(),
            server,
            response: response.to_vec(),
        },
        (None, Some(last_error)) => Refusal::ConnectFailed {
            listen: listen.name.clone(),
            attempts: tried as u32,
            last_error,
        },
        (None, None) => refusal,
    }
}

fn note_replay(listen: &ListenState, server: &ServerState, reason: &dyn std::fmt::Display) {
    server.counters.wredis.inc();
    warn!(
        listen = %listen.name,
        server = %server.name,
        error = %reason,
        "server failed the login before answering; replaying it on another server"
    );
}

/// Connects to `server`; a failure counts towards its passive health.
async fn connect(
    listen: &Arc<ListenState>,
    server: &Arc<ServerState>,
) -> Result<TcpStream, LoginError> {
    let addr = server.cfg().addr;
    server.counters.connects.inc();
    match net::connect(addr, listen.cfg().timeouts.connect).await {
        // Its run of errors ends at its first answer, not here: a stopped process's
        // kernel still accepts connections.
        Ok(stream) => Ok(stream),
        Err(e) => {
            server.counters.econ.inc();
            checker::connect_failed(listen, server, &e);
            warn!(listen = %listen.name, server = %server.name, addr = %addr, error = %e, "connect to server failed");
            Err(LoginError::Connect {
                server: server.name.clone(),
                addr,
                source: e,
            })
        }
    }
}

/// Replays the client's opening on one connected server.
async fn attempt(
    client: &mut Client,
    listen: &Arc<ListenState>,
    slot: Slot,
    mut conn: TcpStream,
    hello: &mut Hello,
    tally: &mut Tally,
) -> Attempt {
    let server = Arc::clone(slot.server());
    let cfg = listen.cfg();
    if let Hello::Ssl(raw) = &*hello {
        let raw = raw.clone();
        let answer = first_answer(listen, &server, async {
            conn.write_all(&raw).await?;
            let mut answer = [0u8; 1];
            conn.read_exact(&mut answer).await?;
            Ok(answer[0])
        })
        .await;
        let answer = match answer {
            Ok(a) => a,
            Err(reason) => return Attempt::Failed(reason),
        };
        tally.to_server += raw.len() as u64;
        if client.write_all(&[answer]).await.is_err() {
            return Attempt::End(Failed::Done);
        }
        tally.to_client += 1;
        if answer != b'N' {
            // 'S': TLS end to end from here on (anything else is the server's to explain).
            return Attempt::Opened(opened(slot, conn, None, tally));
        }
        match timeout(
            cfg.timeouts.startup,
            startup::read_after_ssl_refused(client),
        )
        .await
        {
            Ok(Ok(AfterSsl::Startup(m))) => *hello = Hello::Startup(m),
            Ok(Ok(AfterSsl::Cancel(key))) => return Attempt::End(Failed::Cancel(key)),
            Ok(Err(e)) => {
                client.refuse_bad_startup(listen, e).await;
                return Attempt::End(Failed::Done);
            }
            Err(_) => {
                // The client was answered 'N' already: only the error is left to send.
                let refusal = Refusal::StartupTimeout {
                    listen: listen.name.clone(),
                    timeout: cfg.timeouts.startup,
                };
                client.refuse(&refusal).await;
                return Attempt::End(Failed::Done);
            }
        }
    }
    let Hello::Startup(m) = &*hello else {
        return Attempt::End(Failed::Done);
    };
    let raw = m.raw.clone();
    let first = first_answer(listen, &server, async {
        conn.write_all(&raw).await?;
        read_message(&mut conn).await
    })
    .await;
    let first = match first {
        Ok(first) if first.first() == Some(&b'E') => return Attempt::Refused(first.into()),
        Ok(first) => first,
        Err(reason) => return Attempt::Failed(reason),
    };
    tally.to_server += raw.len() as u64;
    if client.write_all(&first).await.is_err() {
        return Attempt::End(Failed::Done);
    }
    tally.to_client += first.len() as u64;
    Attempt::Opened(opened(slot, conn, Some(m.clone()), tally))
}

fn opened(slot: Slot, server: TcpStream, startup: Option<StartupMessage>, t: &Tally) -> Opened {
    Opened {
        slot,
        server,
        startup,
        wait: t.wait,
        connect: t.connect,
        to_server: t.to_server,
        to_client: t.to_client,
    }
}

/// Waits for a server's first answer within `timeouts.login`, giving up early when the
/// server is marked DOWN with shutdown-sessions. No answer in time counts towards the
/// server's passive health, like a failed connect.
async fn first_answer<T>(
    listen: &Arc<ListenState>,
    server: &Arc<ServerState>,
    exchange: impl Future<Output = std::io::Result<T>>,
) -> Result<T, LoginError> {
    let limit = listen.cfg().timeouts.login;
    let kill = server.session_signals().kill;
    let outcome = tokio::select! {
        r = timeout(limit, exchange) => r,
        _ = kill.cancelled() => return Err(LoginError::MarkedDown),
    };
    match outcome {
        Ok(Ok(answer)) => {
            checker::connect_succeeded(server);
            Ok(answer)
        }
        Ok(Err(e)) => Err(LoginError::Lost(e)),
        Err(_) => {
            let missed = LoginError::NoAnswer(limit);
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, missed.to_string());
            checker::connect_failed(listen, server, &e);
            Err(missed)
        }
    }
}

/// Largest first answer accepted from a server during startup.
const MAX_FIRST_MESSAGE: usize = 64 * 1024;

/// Reads one whole backend message (type, length, body), length-checked.
async fn read_message(server: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 5];
    server.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid message length {len} from server"),
        ));
    }
    let mut message = vec![0u8; 1 + len];
    message[..5].copy_from_slice(&header);
    server.read_exact(&mut message[5..]).await?;
    Ok(message)
}

/// The message field of an ErrorResponse, for logs.
fn error_text(message: &[u8]) -> String {
    crate::refusal::field(message, b'M')
        .unwrap_or("ErrorResponse")
        .to_owned()
}

#[cfg(test)]
mod tests {
    //! In-process tests of the login phase against small fake servers on loopback: no
    //! PostgreSQL needed, and tokio's paused clock makes the timeouts instant.
    use super::*;
    use crate::startup::{CancelKey, StartupMessage};
    use crate::testing::{AUTH_OK, Fake, fake, listen_over, socket_pair, startup_packet};

    /// A listen over the fakes, in order (balance "first").
    fn listen(addrs: &[std::net::SocketAddr]) -> Arc<ListenState> {
        listen_over(addrs)
    }

    /// A connected client socket pair: pglb's side and the test's.
    async fn client() -> (Client, TcpStream) {
        let (mine, peer) = socket_pair().await;
        (Client::Plain(mine), peer)
    }

    fn startup() -> Hello {
        match crate::startup::decode(Bytes::from(startup_packet("app"))) {
            Ok(crate::startup::Packet::Startup(m)) => Hello::Startup(m),
            other => panic!("{other:?}"),
        }
    }

    fn ssl() -> Hello {
        Hello::Ssl(Bytes::from_static(&[0, 0, 0, 8, 4, 210, 22, 47]))
    }

    fn opened_on(r: &Result<Opened, Failed>) -> String {
        match r {
            Ok(o) => o.slot.server().name.clone(),
            Err(Failed::Refused(r)) => format!("refused: {}", r.message()),
            Err(Failed::Cancel(_)) => "cancel".into(),
            Err(Failed::Done) => "done".into(),
        }
    }

    /// (Not `testing::read_exactly`: its timeout would fire at once on a paused clock.)
    async fn received(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        peer.read_exact(&mut got)
            .await
            .expect("bytes for the client");
        got
    }

    #[tokio::test]
    async fn a_refusing_server_is_skipped_and_the_next_one_answers() {
        let l = listen(&[
            fake(Fake::Refuse("no more connections allowed")).await,
            fake(Fake::Accept).await,
        ]);
        let (mut c, mut peer) = client().await;
        let mut hello = startup();
        let r = open(&mut c, &l, &mut hello).await;
        assert_eq!(opened_on(&r), "s2");
        assert_eq!(
            received(&mut peer, 9).await,
            AUTH_OK,
            "only the answering server's bytes"
        );
        assert_eq!(l.servers()[0].counters.wredis.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_server_costs_at_most_the_login_timeout() {
        let l = listen(&[fake(Fake::Hang).await, fake(Fake::Accept).await]);
        let (mut c, _peer) = client().await;
        let t0 = tokio::time::Instant::now();
        let r = open(&mut c, &l, &mut startup()).await;
        assert_eq!(opened_on(&r), "s2");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
    }

    /// A stopped process's kernel still accepts connections: only its silence counts,
    /// and error_limit (3) silent logins in a row mark it DOWN, so the next login does
    /// not wait for it at all.
    #[tokio::test(start_paused = true)]
    async fn logins_a_hung_server_never_answers_mark_it_down() {
        let l = crate::testing::listen_with(
            &[fake(Fake::Hang).await, fake(Fake::Accept).await],
            |cfg| {
                for s in &mut cfg.servers {
                    s.check.kind = crate::config::CheckKind::Tcp;
                    s.check.rise = 1;
                    s.check.error_limit = 3;
                }
            },
        );
        // Both pass their first check (rise 1), as a stopped PgBouncer's TCP check would.
        for s in l.servers().iter() {
            let passed = crate::health::CheckResult::new(crate::health::CheckStatus::L4Ok, "");
            let mut h = s.health();
            h.record(passed, std::time::Instant::now());
            s.set_up(h.up);
        }
        assert!(l.servers()[0].is_up());
        for _ in 0..3 {
            let (mut c, _peer) = client().await;
            assert_eq!(opened_on(&open(&mut c, &l, &mut startup()).await), "s2");
        }
        assert!(!l.servers()[0].is_up(), "three misses in a row: DOWN");
        let (mut c, _peer) = client().await;
        let t0 = tokio::time::Instant::now();
        assert_eq!(opened_on(&open(&mut c, &l, &mut startup()).await), "s2");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn with_every_server_refusing_the_client_gets_the_last_ones_error() {
        let l = listen(&[
            fake(Fake::Refuse("first")).await,
            fake(Fake::Refuse("last words")).await,
        ]);
        let (mut c, _peer) = client().await;
        match open(&mut c, &l, &mut startup()).await {
            Err(Failed::Refused(r @ Refusal::ServerRefused { .. })) => {
                assert_eq!(r.kind(), "server-refused");
                assert!(r.message().starts_with("last words"), "{}", r.message());
                assert_eq!(r.sqlstate(), "08P01");
            }
            other => panic!("{}", opened_on(&other)),
        }
    }

    #[tokio::test]
    async fn a_server_closing_on_the_sslrequest_is_replayed_and_n_sent_once() {
        let l = listen(&[
            fake(Fake::CloseAfterFirst).await,
            fake(Fake::DeclineSsl).await,
        ]);
        let (mut c, mut peer) = client().await;
        let mut hello = ssl();
        let talk = tokio::spawn(async move {
            let n = received(&mut peer, 1).await;
            if let Hello::Startup(StartupMessage { raw, .. }) = startup() {
                peer.write_all(&raw).await.expect("startup");
            }
            let ok = received(&mut peer, 9).await;
            (n, ok)
        });
        let r = open(&mut c, &l, &mut hello).await;
        assert_eq!(opened_on(&r), "s2");
        let (n, ok) = talk.await.expect("client side");
        assert_eq!((n, ok), (b"N".to_vec(), AUTH_OK.to_vec()));
        assert!(
            matches!(hello, Hello::Startup(_)),
            "the client went on in plaintext"
        );
    }

    #[tokio::test]
    async fn a_cancel_after_a_declined_sslrequest_is_handed_back_for_routing() {
        let l = listen(&[fake(Fake::DeclineSsl).await]);
        let (mut c, mut peer) = client().await;
        let key = CancelKey {
            pid: 77,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let packet = key.to_packet();
        let talk = tokio::spawn(async move {
            let n = received(&mut peer, 1).await;
            peer.write_all(&packet).await.expect("cancel");
            n
        });
        match open(&mut c, &l, &mut ssl()).await {
            Err(Failed::Cancel(got)) => assert_eq!(got, key),
            other => panic!("{}", opened_on(&other)),
        }
        assert_eq!(talk.await.expect("client"), b"N", "one N, the server's");
        assert_eq!(l.servers()[0].sessions(), 0, "the place was given back");
    }
}
