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

use crate::pick::{self, Slot};
use crate::refusal::Refusal;
use crate::relay::{self, Idle, Meters};
use crate::startup::{self, Hello, StartupError, StartupMessage};
use crate::state::{Counter, ListenState, raise_max};
use crate::{cancel, checker, net};

/// Whether the accept loop let this client in under the global and listen maxconn.
pub enum Admission {
    /// Permits held for the whole session.
    Admitted(Vec<OwnedSemaphorePermit>),
    /// Over a maxconn: the client gets this refusal once its startup packet is read. The
    /// permit bounds how many refusals are answered at once.
    Refused(Refusal, OwnedSemaphorePermit),
}

/// Counts the session in the listen's current sessions while alive.
struct Current<'a>(&'a ListenState);

impl<'a> Current<'a> {
    fn enter(listen: &'a ListenState) -> Self {
        let c = &listen.counters;
        c.stot.inc();
        c.rate.tick();
        let now = c.cur.fetch_add(1, Relaxed) + 1;
        raise_max(&c.smax, now);
        Current(listen)
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        self.0.counters.cur.fetch_sub(1, Relaxed);
    }
}

/// Serves one accepted client. `stop` closes the session when pglb's shutdown grace ends.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    admission: Admission,
    stop: CancellationToken,
) {
    let accepted = Instant::now();
    let t = listen.cfg.timeouts;

    // 1. Startup: what does the client want?
    let hello = match timeout(t.startup, startup::read_hello(&mut client)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(StartupError::Closed | StartupError::Io(_))) => {
            // A port probe or a client that gave up: nothing worth a log line.
            debug!(client = %peer, listen = %listen.cfg.name, "client left during startup");
            return;
        }
        Ok(Err(e)) => {
            listen.counters.ereq.inc();
            warn!(client = %peer, listen = %listen.cfg.name, error = %e, "bad startup packet");
            let refusal = Refusal::BadStartup {
                sqlstate: e.sqlstate(),
                message: e.to_string(),
            };
            send_refusal(&mut client, &refusal).await;
            return;
        }
        Err(_) => {
            debug!(client = %peer, listen = %listen.cfg.name, "startup timeout");
            let refusal = Refusal::StartupTimeout {
                listen: listen.cfg.name.clone(),
                timeout: t.startup,
            };
            send_refusal(&mut client, &refusal).await;
            return;
        }
    };
    if let Hello::Cancel(key) = &hello {
        let reached = cancel::forward(&listen, key).await;
        debug!(client = %peer, listen = %listen.cfg.name, pid = key.pid, reached, "cancel request forwarded");
        return;
    }
    let _permits = match admission {
        Admission::Admitted(permits) => permits,
        Admission::Refused(refusal, _answering) => {
            listen.counters.denied.inc();
            refuse(client, peer, &listen, hello, refusal, accepted).await;
            return;
        }
    };
    let _current = Current::enter(&listen);

    // 2. Pick a server and connect, moving on to another server when a connect fails.
    let (slot, mut server, wait, connect) = match connect_with_retries(&listen).await {
        Ok(connected) => connected,
        Err(refusal) => {
            refuse(client, peer, &listen, hello, refusal, accepted).await;
            return;
        }
    };
    let srv = Arc::clone(slot.server());

    // 3. Replay what the client already sent, then relay.
    let idle = Idle {
        client: t.client,
        server: t.server,
    };
    let meters = Meters {
        to_server: [&listen.counters.bin, &srv.counters.bin],
        to_client: [&listen.counters.bout, &srv.counters.bout],
    };
    let (params, outcome) = match replay_opening(&mut client, &mut server, hello, &listen).await {
        Ok(opening) => {
            for m in meters.to_server {
                m.add(opening.to_server);
            }
            for m in meters.to_client {
                m.add(opening.to_client);
            }
            let mut kill = srv.kill.subscribe();
            let stop = async {
                tokio::select! {
                    _ = stop.cancelled() => relay::End::Shutdown,
                    _ = kill.changed() => relay::End::ServerDown,
                }
            };
            let mut o = relay::relay(&mut client, &mut server, idle, meters, stop).await;
            o.to_server += opening.to_server;
            o.to_client += opening.to_client;
            (opening.startup, o)
        }
        Err(end) => (
            None,
            relay::Outcome {
                to_server: 0,
                to_client: 0,
                end,
            },
        ),
    };
    let params = params.as_ref();
    drop(slot);

    // 4. One line per finished session.
    let total = accepted.elapsed();
    info!(
        client = %peer,
        listen = %listen.cfg.name,
        server = %srv.cfg.name,
        wait_ms = wait.as_millis() as u64,
        connect_ms = connect.as_millis() as u64,
        total_ms = total.as_millis() as u64,
        bytes_in = outcome.to_server,
        bytes_out = outcome.to_client,
        term = outcome.end.code(),
        end = %outcome.end.describe(),
        user = params.and_then(|p| p.param("user")).unwrap_or("-"),
        database = params.and_then(|p| p.param("database")).unwrap_or("-"),
        application_name = params.and_then(|p| p.param("application_name")).unwrap_or("-"),
        tls = params.is_none(),
        "session closed"
    );
}

/// What the opening exchange established.
struct Opening {
    /// The StartupMessage, unless the session went TLS end to end.
    startup: Option<StartupMessage>,
    to_server: u64,
    to_client: u64,
}

/// Replays the client's opening packet to the server. For an SSLRequest the server's
/// one-byte answer goes back to the client; when the server declines (`N`), the client's
/// plaintext StartupMessage is read and replayed too, so pglb still sees who connected.
async fn replay_opening(
    client: &mut TcpStream,
    server: &mut TcpStream,
    hello: Hello,
    listen: &ListenState,
) -> Result<Opening, relay::End> {
    use relay::End;
    let t = listen.cfg.timeouts;
    let raw = match hello {
        Hello::Startup(m) => {
            server.write_all(&m.raw).await.map_err(End::ServerError)?;
            return Ok(Opening {
                to_server: m.raw.len() as u64,
                to_client: 0,
                startup: Some(m),
            });
        }
        Hello::Ssl(raw) => raw,
        Hello::Cancel(_) => unreachable!("cancel requests never reach a session's server"),
    };
    server.write_all(&raw).await.map_err(End::ServerError)?;
    let mut answer = [0u8; 1];
    match timeout(t.server, server.read_exact(&mut answer)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(End::ServerError(e)),
        Err(_) => return Err(End::ServerTimeout),
    }
    client.write_all(&answer).await.map_err(End::ClientError)?;
    let mut opening = Opening {
        startup: None,
        to_server: raw.len() as u64,
        to_client: 1,
    };
    if answer[0] != b'N' {
        // 'S': TLS end to end from here on; anything else is the server's error to relay.
        return Ok(opening);
    }
    let m = match timeout(t.startup, startup::read_startup_after_ssl_refusal(client)).await {
        Ok(Ok(m)) => m,
        Ok(Err(StartupError::Io(e))) => return Err(End::ClientError(e)),
        Ok(Err(e)) => return Err(End::ClientError(std::io::Error::other(e.to_string()))),
        Err(_) => return Err(End::ClientTimeout),
    };
    server.write_all(&m.raw).await.map_err(End::ServerError)?;
    opening.to_server += m.raw.len() as u64;
    opening.startup = Some(m);
    Ok(opening)
}

/// Picks a server and connects; on failure tries another (up to `retries` more times).
/// Returns the slot, the connection, the time spent waiting for a slot and connecting.
async fn connect_with_retries(
    listen: &Arc<ListenState>,
) -> Result<(Slot, TcpStream, Duration, Duration), Refusal> {
    let mut failed: Vec<usize> = Vec::new();
    let mut last_error = String::new();
    let (mut wait, mut connect) = (Duration::ZERO, Duration::ZERO);
    for attempt in 0..=listen.cfg.retries {
        let t0 = Instant::now();
        let slot = match pick::acquire(listen, &failed).await {
            Ok(slot) => slot,
            Err(_) if !failed.is_empty() => break,
            Err(refusal) => return Err(refusal),
        };
        wait += t0.elapsed();
        let server = Arc::clone(slot.server());
        let t1 = Instant::now();
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
                failed.push(slot.index());
            }
        }
    }
    Err(Refusal::ConnectFailed {
        listen: listen.cfg.name.clone(),
        attempts: failed.len() as u32,
        last_error,
    })
}

/// Turns a client away with an ErrorResponse. An SSLRequest is answered `N` first so the
/// client sends a plaintext StartupMessage and can read the error.
async fn refuse(
    mut client: TcpStream,
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
        user = startup.as_ref().and_then(|m| m.param("user")).unwrap_or("-"),
        database = startup.as_ref().and_then(|m| m.param("database")).unwrap_or("-"),
        "session refused"
    );
    if startup.is_some() {
        send_refusal(&mut client, &refusal).await;
    }
}

async fn send_refusal(client: &mut TcpStream, refusal: &Refusal) {
    let bytes = refusal.to_error_response();
    // Best effort: the client may already be gone.
    let _ = timeout(Duration::from_secs(1), async {
        client.write_all(&bytes).await?;
        client.shutdown().await
    })
    .await;
}
