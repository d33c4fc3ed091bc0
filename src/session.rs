//! One client session, start to finish: startup → pick a server → connect → relay → log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::Client;
use crate::pick::{self, Slot};
use crate::refusal::Refusal;
use crate::relay::{self, Idle, Meters};
use crate::startup::{self, Hello, StartupError, StartupMessage};
use crate::state::{self, Counter, ListenState, raise_max};
use crate::workers::Load;
use crate::{cancel, checker, net, refusal, tls};

/// Whether the accept loop let this client in under the global and listen maxconn.
pub enum Admission {
    /// Permits held for the whole session.
    Admitted(Vec<OwnedSemaphorePermit>),
    /// Over a maxconn: the client gets this refusal once its startup packet is read. The
    /// permit bounds how many refusals are answered at once.
    Refused(Refusal, OwnedSemaphorePermit),
}

/// Counts the session in the listen's current sessions while alive.
struct Current(Arc<ListenState>);

impl Current {
    fn enter(listen: &Arc<ListenState>) -> Self {
        let c = &listen.counters;
        c.stot.inc();
        c.rate.tick();
        let now = c.cur.fetch_add(1, Relaxed) + 1;
        raise_max(&c.smax, now);
        Current(Arc::clone(listen))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        self.0.counters.cur.fetch_sub(1, Relaxed);
    }
}

/// An accepted client socket: registered with this worker's event loop already, or
/// handed over by the worker that accepted it, to be registered here.
pub enum Incoming {
    Here(TcpStream),
    Handed(std::net::TcpStream),
}

/// A client connected through to its server, ready to relay.
struct Established {
    client: Client,
    opened: Opened,
    _permits: Vec<OwnedSemaphorePermit>,
    _current: Current,
}

/// Serves one accepted client. `stop` closes the session when pglb's shutdown grace ends.
///
/// The opening (startup, pick, connect) runs in a boxed future of its own, freed once
/// the session relays: an established session keeps only what the relay and its closing
/// log line need. (A plain fn around an `async` block: an `async fn` would keep a second
/// copy of its arguments for the whole session.)
/// `load` counts the session on the worker it runs on.
pub fn serve(
    tcp: Incoming,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    admission: Admission,
    stop: CancellationToken,
    load: Load,
) -> impl Future<Output = ()> {
    let accepted = Instant::now();
    let opening = Box::pin(establish(
        tcp,
        peer,
        Arc::clone(&listen),
        admission,
        accepted,
    ));
    async move {
        let _load = load;
        if let Some(mut session) = opening.await {
            relay_and_log(&mut session, peer, &listen, &stop, accepted).await;
        }
    }
}

/// Steps 1 and 2: startup, then pick a server and connect. None when the session ended
/// there (a cancel request, a refusal, a client gone).
async fn establish(
    tcp: Incoming,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    admission: Admission,
    accepted: Instant,
) -> Option<Established> {
    let tcp = match tcp {
        Incoming::Here(tcp) => tcp,
        Incoming::Handed(tcp) => match TcpStream::from_std(tcp) {
            Ok(tcp) => tcp,
            Err(e) => {
                debug!(client = %peer, error = %e, "worker cannot watch the client socket");
                return None;
            }
        },
    };
    // 1. Startup: what does the client want? (TLS is set up here when pglb terminates it.)
    let (mut client, hello) = Box::pin(negotiate(tcp, peer, &listen)).await?;
    if let Hello::Cancel(key) = &hello {
        let routed = Box::pin(cancel::route(&listen, &listen.cancels, key)).await;
        match routed {
            cancel::Routed::Owner(addr) => {
                info!(client = %peer, listen = %listen.cfg.name, pid = key.pid, server = %addr, "cancel request routed to the session's server")
            }
            cancel::Routed::Broadcast(n) => {
                info!(client = %peer, listen = %listen.cfg.name, pid = key.pid, servers = n, "cancel request for an unknown key sent to every server up")
            }
        }
        return None;
    }
    let permits = match admission {
        Admission::Admitted(permits) => permits,
        Admission::Refused(refusal, _answering) => {
            listen.counters.denied.inc();
            refuse(client, peer, &listen, hello, refusal, accepted).await;
            return None;
        }
    };
    let current = Current::enter(&listen);

    // 2. Pick a server and connect, moving on to another server when a connect fails or
    //    the server refuses the startup before authentication.
    match Box::pin(open(&mut client, &listen, hello)).await {
        Ok(opened) => Some(Established {
            client,
            opened,
            _permits: permits,
            _current: current,
        }),
        Err((hello, refusal)) => {
            refuse(client, peer, &listen, hello, refusal, accepted).await;
            None
        }
    }
}

/// Steps 3 and 4: relay, following the protocol of plaintext sessions, then log.
async fn relay_and_log(
    session: &mut Established,
    peer: SocketAddr,
    listen: &ListenState,
    stop: &CancellationToken,
    accepted: Instant,
) {
    let t = listen.cfg.timeouts;
    let opened = &mut session.opened;
    let srv = Arc::clone(opened.slot.server());
    let client = &mut session.client;
    let idle = Idle {
        client: t.client,
        server: t.server,
    };
    let meters = Meters {
        to_server: [&listen.counters.bin, &srv.counters.bin],
        to_client: [&listen.counters.bout, &srv.counters.bout],
    };
    for (m, n) in meters
        .to_server
        .iter()
        .map(|m| (m, opened.to_server))
        .chain(meters.to_client.iter().map(|m| (m, opened.to_client)))
    {
        m.add(n);
    }
    let tracker = opened
        .startup
        .as_ref()
        .map(|_| relay::Tracker::new(Some((Arc::clone(&listen.cancels), srv.cfg.addr))));
    let ends = srv.session_signals();
    let signals = relay::Signals {
        shutdown: stop,
        kill: &ends.kill,
        drain: &ends.drain,
        drain_deadline: t.drain,
    };
    let mut outcome = relay::relay(
        client,
        &mut opened.server,
        idle,
        meters,
        signals,
        tracker.as_ref(),
    )
    .await;
    outcome.to_server += opened.to_server;
    outcome.to_client += opened.to_client;
    if let Some(key) = tracker.as_ref().and_then(|t| state::lock(&t.key).take()) {
        listen.cancels.remove(&key);
    }
    if matches!(outcome.end, relay::End::Drained) {
        // At a transaction boundary: say why, so pools reconnect elsewhere.
        let message = format!(
            "pglb: server '{}' of listen '{}' is being drained; reconnect to continue",
            srv.cfg.name, listen.cfg.name
        );
        let _ = timeout(Duration::from_secs(1), async {
            let _ = client
                .write_all(&refusal::error_response("FATAL", "57P01", &message))
                .await;
            let _ = opened.server.write_all(&[b'X', 0, 0, 0, 4]).await;
        })
        .await;
    }

    // 4. One line per finished session.
    let params = opened.startup.as_ref();
    let total = accepted.elapsed();
    info!(
        client = %peer,
        listen = %listen.cfg.name,
        server = %srv.cfg.name,
        wait_ms = opened.wait.as_millis() as u64,
        connect_ms = opened.connect.as_millis() as u64,
        total_ms = total.as_millis() as u64,
        bytes_in = outcome.to_server,
        bytes_out = outcome.to_client,
        term = outcome.end.code(),
        end = %outcome.end.describe(),
        user = params.and_then(|p| p.param("user")).as_deref().unwrap_or("-"),
        database = params.and_then(|p| p.param("database")).as_deref().unwrap_or("-"),
        application_name = params.and_then(|p| p.param("application_name")).as_deref().unwrap_or("-"),
        tls = if client.is_tls() { "terminated" } else if params.is_none() { "passthrough" } else { "none" },
        "session closed"
    );
}

/// Reads the client's opening under `timeouts.startup`, doing TLS when the listen
/// terminates it: answering an SSLRequest with `S`, or taking a direct TLS handshake
/// (first byte 0x16). Refusals for bad or missing packets are sent from here; None means
/// the session is over.
async fn negotiate(
    tcp: TcpStream,
    peer: SocketAddr,
    listen: &ListenState,
) -> Option<(Client, Hello)> {
    let t = listen.cfg.timeouts;
    let deadline = Instant::now() + t.startup;
    let acceptor = listen.cfg.tls.as_ref().map(|tls| &tls.acceptor);
    let mut first = [0u8; 1];
    let direct = match acceptor {
        Some(_) => {
            matches!(tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await, Ok(Ok(1)) if first[0] == tls::HANDSHAKE)
        }
        None => false,
    };
    let mut client = match (direct, acceptor) {
        (true, Some(acceptor)) => {
            match tokio::time::timeout_at(deadline, tls::accept(acceptor, tcp, true)).await {
                Ok(Ok(stream)) => Client::Tls(Box::new(stream)),
                outcome => {
                    debug!(client = %peer, listen = %listen.cfg.name, ?outcome, "direct TLS handshake failed");
                    return None;
                }
            }
        }
        _ => Client::Plain(tcp),
    };
    let mut hello = read_hello(&mut client, peer, listen, deadline).await?;
    if let (Hello::Ssl(_), Some(acceptor), Client::Plain(_)) = (&hello, acceptor, &client) {
        let Client::Plain(mut tcp) = client else {
            unreachable!("matched above");
        };
        tcp.write_all(b"S").await.ok()?;
        client = match tokio::time::timeout_at(deadline, tls::accept(acceptor, tcp, false)).await {
            Ok(Ok(stream)) => Client::Tls(Box::new(stream)),
            outcome => {
                debug!(client = %peer, listen = %listen.cfg.name, ?outcome, "TLS handshake failed");
                return None;
            }
        };
        hello = read_hello(&mut client, peer, listen, deadline).await?;
    }
    if client.is_tls() && matches!(hello, Hello::Ssl(_)) {
        let refusal = Refusal::BadStartup {
            sqlstate: "08P01",
            message: "SSLRequest inside TLS".into(),
        };
        send_refusal(&mut client, &refusal).await;
        return None;
    }
    Some((client, hello))
}

/// One `startup::read_hello` with the refusals its errors deserve.
async fn read_hello(
    client: &mut Client,
    peer: SocketAddr,
    listen: &ListenState,
    deadline: Instant,
) -> Option<Hello> {
    let t = listen.cfg.timeouts;
    match tokio::time::timeout_at(deadline, startup::read_hello(client)).await {
        Ok(Ok(hello)) => Some(hello),
        Ok(Err(StartupError::Closed | StartupError::Io(_))) => {
            // A port probe or a client that gave up: nothing worth a log line.
            debug!(client = %peer, listen = %listen.cfg.name, "client left during startup");
            None
        }
        Ok(Err(e)) => {
            listen.counters.ereq.inc();
            warn!(client = %peer, listen = %listen.cfg.name, error = %e, "bad startup packet");
            let refusal = Refusal::BadStartup {
                sqlstate: e.sqlstate(),
                message: e.to_string(),
            };
            send_refusal(client, &refusal).await;
            None
        }
        Err(_) => {
            debug!(client = %peer, listen = %listen.cfg.name, "startup timeout");
            let refusal = Refusal::StartupTimeout {
                listen: listen.cfg.name.clone(),
                timeout: t.startup,
            };
            send_refusal(client, &refusal).await;
            None
        }
    }
}

/// A session connected to its server, opening exchange done.
struct Opened {
    slot: Slot,
    server: TcpStream,
    /// The StartupMessage, unless the session went TLS end to end.
    startup: Option<StartupMessage>,
    wait: Duration,
    connect: Duration,
    to_server: u64,
    to_client: u64,
}

/// Connects to a server and replays the client's opening on it.
///
/// For an SSLRequest the server's one-byte answer goes back to the client; when the server
/// declines (`N`), the client's plaintext StartupMessage is read so pglb still follows the
/// session. For a plaintext StartupMessage the server's first answer is read before it is
/// passed on: an ErrorResponse before any authentication request (PgBouncer's "no more
/// connections allowed", or PostgreSQL unreachable behind it) makes pglb replay the
/// startup on another server, and the client never sees that error.
async fn open(
    client: &mut Client,
    listen: &Arc<ListenState>,
    mut hello: Hello,
) -> Result<Opened, (Hello, Refusal)> {
    let t = listen.cfg.timeouts;
    let mut tried: Vec<usize> = Vec::new();
    let (mut wait, mut connect) = (Duration::ZERO, Duration::ZERO);
    let (mut to_server, mut to_client) = (0u64, 0u64);
    let mut replays = 0;
    loop {
        let (slot, mut server, w, c) = match connect_with_retries(listen, &mut tried).await {
            Ok(connected) => connected,
            Err(refusal) => return Err((hello, refusal)),
        };
        wait += w;
        connect += c;
        let srv = Arc::clone(slot.server());
        let io_failed = |e: std::io::Error, who: &str| Refusal::ConnectFailed {
            listen: listen.cfg.name.clone(),
            attempts: 1,
            last_error: format!("{who}: {e}"),
        };

        // TLS request: pass it on and let the server answer.
        if let Hello::Ssl(raw) = &hello {
            let answer = async {
                server.write_all(raw).await?;
                let mut answer = [0u8; 1];
                server.read_exact(&mut answer).await?;
                Ok::<_, std::io::Error>(answer[0])
            };
            let answer = match timeout(t.server, answer).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return Err((hello, io_failed(e, &srv.cfg.name))),
                Err(_) => {
                    return Err((
                        hello,
                        io_failed(std::io::ErrorKind::TimedOut.into(), &srv.cfg.name),
                    ));
                }
            };
            to_server += raw.len() as u64;
            if client.write_all(&[answer]).await.is_err() {
                return Err((hello, Refusal::ShuttingDown));
            }
            to_client += 1;
            if answer != b'N' {
                // 'S': TLS end to end from here on (anything else is the server's to explain).
                return Ok(Opened {
                    slot,
                    server,
                    startup: None,
                    wait,
                    connect,
                    to_server,
                    to_client,
                });
            }
            match timeout(t.startup, startup::read_startup_after_ssl_refusal(client)).await {
                Ok(Ok(m)) => hello = Hello::Startup(m),
                _ => {
                    return Err((
                        Hello::Ssl(raw.clone()),
                        Refusal::StartupTimeout {
                            listen: listen.cfg.name.clone(),
                            timeout: t.startup,
                        },
                    ));
                }
            }
        }
        let Hello::Startup(m) = &hello else {
            unreachable!("cancel requests are routed before a server is picked");
        };

        // Plaintext startup: replay it and look at the first answer.
        let first = async {
            server.write_all(&m.raw).await?;
            read_message(&mut server).await
        };
        // The client has seen nothing from this server yet, so a refusal or a dropped
        // connection (a PgBouncer going away) is replayed elsewhere, invisibly.
        let last_try = replays >= listen.cfg.retries;
        let refused = match timeout(t.server, first).await {
            // Out of replays, the server's own error (e.g. "no such database") is the
            // most useful answer: pass it on.
            Ok(Ok(first)) if first.first() == Some(&b'E') && !last_try => Err(error_text(&first)),
            Ok(Ok(first)) => Ok(first),
            Ok(Err(e)) => Err(format!("connection lost before answering: {e}")),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(t.server)
            )),
        };
        let first = match refused {
            Ok(first) => first,
            Err(reason) if !last_try => {
                replays += 1;
                srv.counters.wredis.inc();
                warn!(
                    listen = %listen.cfg.name,
                    server = %srv.cfg.name,
                    error = %reason,
                    "server refused the startup; replaying it on another server"
                );
                tried.push(slot.index());
                continue;
            }
            Err(reason) => {
                return Err((
                    hello,
                    Refusal::ConnectFailed {
                        listen: listen.cfg.name.clone(),
                        attempts: replays + 1,
                        last_error: format!("{}: {reason}", srv.cfg.name),
                    },
                ));
            }
        };
        to_server += m.raw.len() as u64;
        if client.write_all(&first).await.is_err() {
            return Err((hello, Refusal::ShuttingDown));
        }
        to_client += first.len() as u64;
        let Hello::Startup(m) = hello else {
            unreachable!("checked above");
        };
        return Ok(Opened {
            slot,
            server,
            startup: Some(m),
            wait,
            connect,
            to_server,
            to_client,
        });
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
    message
        .get(5..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'M'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_else(|| "ErrorResponse".into())
}

/// Picks a server and connects; on failure tries another (up to `retries` more times),
/// never one in `tried`, which grows with every server that failed.
/// Returns the slot, the connection, the time spent waiting for a slot and connecting.
async fn connect_with_retries(
    listen: &Arc<ListenState>,
    tried: &mut Vec<usize>,
) -> Result<(Slot, TcpStream, Duration, Duration), Refusal> {
    let mut last_error = String::new();
    let (mut wait, mut connect) = (Duration::ZERO, Duration::ZERO);
    let mut attempts = 0;
    for attempt in 0..=listen.cfg.retries {
        let t0 = Instant::now();
        let slot = match pick::acquire(listen, tried).await {
            Ok(slot) => slot,
            Err(_) if attempts > 0 => break,
            Err(refusal) => return Err(refusal),
        };
        wait += t0.elapsed();
        let server = Arc::clone(slot.server());
        let t1 = Instant::now();
        attempts += 1;
        match net::connect(server.cfg.addr, listen.cfg.timeouts.connect).await {
            Ok(stream) => {
                checker::connect_succeeded(&server);
                return Ok((slot, stream, wait, connect + t1.elapsed()));
            }
            Err(e) => {
                connect += t1.elapsed();
                server.counters.econ.inc();
                checker::connect_failed(listen, slot.index(), &e);
                warn!(
                    listen = %listen.cfg.name,
                    server = %server.cfg.name,
                    addr = %server.cfg.addr,
                    error = %e,
                    attempt = attempt + 1,
                    "connect to server failed"
                );
                if attempt < listen.cfg.retries {
                    server.counters.wretr.inc();
                    server.counters.wredis.inc();
                }
                last_error = format!("{} ({}): {e}", server.cfg.name, server.cfg.addr);
                tried.push(slot.index());
            }
        }
    }
    Err(Refusal::ConnectFailed {
        listen: listen.cfg.name.clone(),
        attempts,
        last_error,
    })
}

/// Turns a client away with an ErrorResponse. An SSLRequest is answered `N` first so the
/// client sends a plaintext StartupMessage and can read the error.
async fn refuse(
    mut client: Client,
    peer: SocketAddr,
    listen: &ListenState,
    hello: Hello,
    refusal: Refusal,
    accepted: Instant,
) {
    let startup: Option<StartupMessage> = match hello {
        Hello::Startup(m) => Some(m),
        Hello::Ssl(_) => {
            let read = async {
                client.write_all(b"N").await.ok()?;
                startup::read_startup_after_ssl_refusal(&mut client)
                    .await
                    .ok()
            };
            let left = listen
                .cfg
                .timeouts
                .startup
                .saturating_sub(accepted.elapsed());
            timeout(left, read).await.ok().flatten()
        }
        Hello::Cancel(_) => None,
    };
    info!(
        client = %peer,
        listen = %listen.cfg.name,
        refused = refusal.kind(),
        reason = %refusal.message(),
        total_ms = accepted.elapsed().as_millis() as u64,
        user = startup.as_ref().and_then(|m| m.param("user")).as_deref().unwrap_or("-"),
        database = startup.as_ref().and_then(|m| m.param("database")).as_deref().unwrap_or("-"),
        "session refused"
    );
    if startup.is_some() {
        send_refusal(&mut client, &refusal).await;
    }
}

async fn send_refusal(client: &mut Client, refusal: &Refusal) {
    let bytes = refusal.to_error_response();
    // Best effort: the client may already be gone.
    let _ = timeout(Duration::from_secs(1), async {
        client.write_all(&bytes).await?;
        client.shutdown().await
    })
    .await;
}
