//! One client session, start to finish: startup → pick a server and log in (`login`) →
//! relay → log.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cancel::Registry;
use crate::client::Client;
use crate::config::RelayMode;
use crate::counters::{Counter, Pass, raise_max};
use crate::login::{self, Failed, Opened};
use crate::refusal::Refusal;
use crate::relay::{self, Idle, Meters};
use crate::startup::{self, AfterSsl, CancelKey, Hello, StartupError, StartupMessage};
use crate::state::{self, ListenState};
use crate::workers::Load;
use crate::{cancel, kernel_relay, refusal, tls};

/// Whether the accept loop let this client in under the global and listen maxconn.
pub enum Admission {
    /// Passes held for the whole session.
    Admitted([Pass; 2]),
    /// Over a maxconn: the client gets this refusal once its startup packet is read. The
    /// permit bounds how many refusals are answered at once.
    Refused(Refusal, tokio::sync::OwnedSemaphorePermit),
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
    /// Where the session's cancel key is registered (one registry for the process).
    cancels: Arc<Registry>,
    _passes: [Pass; 2],
    _current: Current,
}

/// Serves one accepted client. `stop` closes the session when pglb's shutdown grace ends.
///
/// The opening (startup, pick, connect) runs in a boxed future of its own, freed once
/// the session relays: an established session keeps only what the relay and its closing
/// log line need. `load` counts the session on the worker it runs on.
pub fn serve(
    tcp: Incoming,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    admission: Admission,
    stop: CancellationToken,
    load: Load,
    cancels: Arc<Registry>,
) -> impl Future<Output = ()> {
    let accepted = Instant::now();
    let opening = Box::pin(establish(
        tcp,
        peer,
        Arc::clone(&listen),
        admission,
        accepted,
        cancels,
    ));
    let relay = move |session| relay_and_log(session, peer, listen, stop, accepted);
    Serve {
        _load: load,
        step: Step::Opening { opening, relay },
    }
}

pin_project_lite::pin_project! {
    /// A session's task: the opening, then the relay in the same place. (An `async`
    /// block awaiting one then the other keeps room for the established session beside
    /// the relay that owns it: a few hundred bytes more per client.)
    struct Serve<O, F, R> {
        _load: Load,
        #[pin]
        step: Step<O, F, R>,
    }
}

pin_project_lite::pin_project! {
    #[project = StepProj]
    #[project_replace = StepOwn]
    enum Step<O, F, R> {
        Opening { opening: O, relay: F },
        Relaying { #[pin] relay: R },
        Done,
    }
}

impl<O, F, R> Future for Serve<O, F, R>
where
    O: Future<Output = Option<Established>> + Unpin,
    F: FnOnce(Established) -> R,
    R: Future<Output = ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut step = self.project().step;
        loop {
            match step.as_mut().project() {
                StepProj::Opening { opening, .. } => {
                    let established = ready!(Pin::new(opening).poll(cx));
                    let StepOwn::Opening { relay, .. } = step.as_mut().project_replace(Step::Done)
                    else {
                        unreachable!("the step was Opening");
                    };
                    match established {
                        Some(session) => step.set(Step::Relaying {
                            relay: relay(session),
                        }),
                        None => return Poll::Ready(()),
                    }
                }
                StepProj::Relaying { relay } => {
                    ready!(relay.poll(cx));
                    step.set(Step::Done);
                    return Poll::Ready(());
                }
                StepProj::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Steps 1 and 2: startup, then pick a server and log in. None when the session ended
/// there (a cancel request, a refusal, a client gone).
async fn establish(
    tcp: Incoming,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    admission: Admission,
    accepted: Instant,
    cancels: Arc<Registry>,
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
    let (mut client, mut hello) = Box::pin(negotiate(tcp, peer, &listen)).await?;
    if let Hello::Cancel(key) = &hello {
        Box::pin(cancel(client, peer, &listen, &cancels, key)).await;
        return None;
    }
    let passes = match admission {
        Admission::Admitted(passes) => passes,
        Admission::Refused(refusal, _answering) => {
            listen.counters.denied.inc();
            refuse(client, peer, &listen, &cancels, hello, refusal, accepted).await;
            return None;
        }
    };
    let current = Current::enter(&listen);

    // 2. Pick a server and log in, moving on to an untried server when one fails or
    //    refuses before the client has seen anything from it.
    match Box::pin(login::open(&mut client, &listen, &mut hello)).await {
        Ok(opened) => Some(Established {
            client,
            opened: count_opening(&listen, opened),
            cancels,
            _passes: passes,
            _current: current,
        }),
        Err(Failed::Refused(refusal)) => {
            refuse(client, peer, &listen, &cancels, hello, refusal, accepted).await;
            None
        }
        Err(Failed::Cancel(key)) => {
            drop(current);
            Box::pin(cancel(client, peer, &listen, &cancels, &key)).await;
            None
        }
        Err(Failed::Done) => None,
    }
}

/// Adds a successful opening's queue and connect times to the server's and the listen's
/// averages.
fn count_opening(listen: &ListenState, opened: Opened) -> Opened {
    let srv = opened.slot.server();
    for times in [&srv.counters.times, &listen.counters.times] {
        times.queue.add(opened.wait.as_millis() as u64);
        times.connect.add(opened.connect.as_millis() as u64);
    }
    opened
}

/// Routes a CancelRequest, then ends its connection as PostgreSQL does: once the cancel
/// was passed on, with a TLS close_notify when TLS was used.
async fn cancel(
    mut client: Client,
    peer: SocketAddr,
    listen: &Arc<ListenState>,
    registry: &Registry,
    key: &CancelKey,
) {
    match cancel::route(listen, registry, key, peer.ip()).await {
        cancel::Routed::Owner(addr) => {
            info!(client = %peer, listen = %listen.name, pid = key.pid, server = %addr, "cancel request routed to the session's server")
        }
        cancel::Routed::Broadcast(n) => {
            info!(client = %peer, listen = %listen.name, pid = key.pid, servers = n, "cancel request for an unknown key sent to every server up")
        }
        cancel::Routed::Limited => {
            warn!(client = %peer, listen = %listen.name, pid = key.pid, "cancel request for an unknown key dropped: over the rate limit")
        }
    }
    let _ = timeout(Duration::from_secs(1), client.shutdown()).await;
}

/// Steps 3 and 4: relay, following the protocol of plaintext sessions, then log. (A plain
/// fn around an `async` block: an `async fn` keeps a second copy of its arguments, the
/// session among them, for the whole session.)
#[allow(clippy::manual_async_fn)]
fn relay_and_log(
    mut session: Established,
    peer: SocketAddr,
    listen: Arc<ListenState>,
    stop: CancellationToken,
    accepted: Instant,
) -> impl Future<Output = ()> {
    async move {
        // Captures the whole session, not just the fields used below (an async block
        // captures only those): its passes hold the maxconn places until it ends.
        let _whole = &session;
        let (listen, stop) = (&*listen, &stop);
        let srv = Arc::clone(session.opened.slot.server());
        let tls = session.client.is_tls();
        let (opened_up, opened_down) = (session.opened.to_server, session.opened.to_client);
        let tracker = session
            .opened
            .startup
            .as_ref()
            .map(|_| relay::Tracker::new(Some((Arc::clone(&session.cancels), srv.cfg().addr))));
        let ends = srv.session_signals();
        let _listed = srv.list_session(peer);
        let terms = Terms::of(listen, &srv, &ends, stop, (opened_up, opened_down));
        let kernel = match (listen.cfg().relay, &tracker, tls) {
            (RelayMode::Kernel, Some(t), false) => kernel_relay::get().map(|k| (k, t)),
            _ => None,
        };
        let mut path = kernel_relay::Path::User;
        let mut outcome = match kernel {
            Some((kernel, tracker)) => {
                let sockets = (session.client, session.opened.server);
                // Boxed: user-space sessions stay as small.
                Box::pin(relay_in_kernel(kernel, tracker, sockets, terms, &mut path)).await
            }
            // Inline, not a helper `async fn`: its future would keep a second copy of
            // the terms for the whole session (168 bytes more per client).
            None => {
                let (client, server) = (&mut session.client, &mut session.opened.server);
                let Terms {
                    idle,
                    meters,
                    signals,
                    names: (srv, listen),
                } = terms;
                let tracker = tracker.as_ref();
                let outcome =
                    relay::relay(client, server, idle, meters, signals, tracker, false).await;
                if matches!(outcome.end, relay::End::Drained) {
                    // At a transaction boundary: say why, so pools reconnect elsewhere.
                    say_drained(client, server, srv, listen).await;
                }
                outcome
            }
        };
        outcome.to_server += opened_up;
        outcome.to_client += opened_down;
        if let Some(key) = tracker.as_ref().and_then(|t| state::lock(&t.key).take()) {
            session.cancels.remove(&key);
        }

        // 4. One line per finished session.
        let total = accepted.elapsed();
        for times in [&srv.counters.times, &listen.counters.times] {
            times.total.add(total.as_millis() as u64);
        }
        let timing = (session.opened.wait, session.opened.connect, total);
        let startup = session.opened.startup.as_ref();
        log_closed(
            peer,
            listen,
            &srv.name,
            startup,
            &outcome,
            timing,
            (tls, path),
        );
    }
}

/// What either relay is given besides the sockets.
struct Terms<'a> {
    idle: Idle,
    meters: Meters<'a>,
    signals: relay::Signals<'a>,
    /// The server's and the listen's names, for a drained client's last message.
    names: (&'a str, &'a str),
}

impl<'a> Terms<'a> {
    /// The listen's timeouts, the server's and pglb's signals, and the listen's and the
    /// server's byte meters, charged with the login's bytes (`up`, `down`).
    fn of(
        listen: &'a ListenState,
        srv: &'a state::ServerState,
        ends: &'a state::SessionSignals,
        stop: &'a CancellationToken,
        (up, down): (u64, u64),
    ) -> Self {
        let t = listen.cfg().timeouts;
        let meters = Meters {
            to_server: [&listen.counters.bin, &srv.counters.bin],
            to_client: [&listen.counters.bout, &srv.counters.bout],
        };
        meters.to_server.iter().for_each(|m| m.add(up));
        meters.to_client.iter().for_each(|m| m.add(down));
        Terms {
            idle: Idle {
                client: t.client,
                server: t.server,
            },
            meters,
            signals: relay::Signals {
                shutdown: stop,
                kill: &ends.kill,
                drain: &ends.drain,
                drain_deadline: t.drain,
            },
            names: (&srv.name, &listen.name),
        }
    }
}

/// Step 3 in the kernel. The sockets leave tokio's hands: the kernel relay closes them
/// when the session ends there, or gives them back for a drained client's last message.
async fn relay_in_kernel(
    kernel: &'static kernel_relay::Loaded,
    tracker: &relay::Tracker,
    (client, server): (Client, TcpStream),
    terms: Terms<'_>,
    path: &mut kernel_relay::Path,
) -> relay::Outcome {
    let Terms {
        idle,
        meters,
        signals,
        names: (srv, listen),
    } = terms;
    let (sockets, outcome) =
        kernel_relay::relay(kernel, client, server, idle, meters, signals, tracker, path).await;
    if let (relay::End::Drained, Some((mut c, mut s))) = (&outcome.end, sockets) {
        say_drained(&mut c, &mut s, srv, listen).await;
    }
    outcome
}

/// Tells a client drained at a transaction boundary why its session ends (so pools
/// reconnect elsewhere), and the server that the session is over.
async fn say_drained(client: &mut Client, server: &mut TcpStream, srv: &str, listen: &str) {
    let message = if state::STOPPING.load(Relaxed) {
        "pglb is shutting down; reconnect to continue".to_owned()
    } else {
        format!(
            "pglb: server '{}' of listen '{}' is being drained; reconnect to continue",
            srv, listen
        )
    };
    let _ = timeout(Duration::from_secs(1), async {
        let _ = client
            .write_all(&refusal::error_response("FATAL", "57P01", &message))
            .await;
        let _ = server.write_all(&[b'X', 0, 0, 0, 4]).await;
    })
    .await;
}

/// The one log line of a finished session.
fn log_closed(
    peer: SocketAddr,
    listen: &ListenState,
    server: &str,
    params: Option<&StartupMessage>,
    outcome: &relay::Outcome,
    (wait, connect, total): (Duration, Duration, Duration),
    (tls, path): (bool, kernel_relay::Path),
) {
    info!(
        client = %peer,
        listen = %listen.name,
        server = %server,
        wait_ms = wait.as_millis() as u64,
        connect_ms = connect.as_millis() as u64,
        total_ms = total.as_millis() as u64,
        bytes_in = outcome.to_server,
        bytes_out = outcome.to_client,
        term = outcome.end.code(),
        end = %outcome.end.describe(),
        user = params.and_then(|p| p.param("user")).as_deref().unwrap_or("-"),
        database = params.and_then(|p| p.param("database")).as_deref().unwrap_or("-"),
        application_name = params.and_then(|p| p.param("application_name")).as_deref().unwrap_or("-"),
        tls = if tls { "terminated" } else if params.is_none() { "passthrough" } else { "none" },
        cancel = if params.is_none() { "best-effort" } else { "routed" },
        relay = path.as_str(),
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
    let deadline = Instant::now() + listen.cfg().timeouts.startup;
    let cfg = listen.cfg();
    let acceptor = cfg.tls.as_ref().map(|tls| &tls.acceptor);
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
                    debug!(client = %peer, listen = %listen.name, ?outcome, "direct TLS handshake failed");
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
                debug!(client = %peer, listen = %listen.name, ?outcome, "TLS handshake failed");
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
        client.refuse(&refusal).await;
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
    let t = listen.cfg().timeouts;
    match tokio::time::timeout_at(deadline, startup::read_hello(client)).await {
        Ok(Ok(hello)) => Some(hello),
        Ok(Err(StartupError::Closed | StartupError::Io(_))) => {
            // A port probe or a client that gave up: nothing worth a log line.
            debug!(client = %peer, listen = %listen.name, "client left during startup");
            None
        }
        Ok(Err(e)) => {
            listen.counters.ereq.inc();
            warn!(client = %peer, listen = %listen.name, error = %e, "bad startup packet");
            let refusal = Refusal::BadStartup {
                sqlstate: e.sqlstate(),
                message: e.to_string(),
            };
            client.refuse(&refusal).await;
            None
        }
        Err(_) => {
            debug!(client = %peer, listen = %listen.name, "startup timeout");
            let refusal = Refusal::StartupTimeout {
                listen: listen.name.clone(),
                timeout: t.startup,
            };
            client.refuse(&refusal).await;
            None
        }
    }
}

/// Turns a client away with an ErrorResponse. An SSLRequest is answered `N` first so the
/// client sends a plaintext StartupMessage and can read the error (or a CancelRequest,
/// which is routed).
async fn refuse(
    mut client: Client,
    peer: SocketAddr,
    listen: &Arc<ListenState>,
    registry: &Registry,
    hello: Hello,
    refusal: Refusal,
    accepted: Instant,
) {
    match &refusal {
        Refusal::NoServer { .. } => listen.counters.no_server.inc(),
        Refusal::ServerRefused { .. } => listen.counters.server_refused.inc(),
        _ => {}
    }
    let startup: Option<StartupMessage> = match hello {
        Hello::Startup(m) => Some(m),
        Hello::Ssl(_) => {
            let read = async {
                client.write_all(b"N").await.ok()?;
                startup::read_after_ssl_refused(&mut client).await.ok()
            };
            let left = listen
                .cfg()
                .timeouts
                .startup
                .saturating_sub(accepted.elapsed());
            match timeout(left, read).await.ok().flatten() {
                Some(AfterSsl::Startup(m)) => Some(m),
                Some(AfterSsl::Cancel(key)) => {
                    cancel(client, peer, listen, registry, &key).await;
                    return;
                }
                None => None,
            }
        }
        Hello::Cancel(_) => None,
    };
    info!(
        client = %peer,
        listen = %listen.name,
        refused = refusal.kind(),
        reason = %refusal.message(),
        total_ms = accepted.elapsed().as_millis() as u64,
        user = startup.as_ref().and_then(|m| m.param("user")).as_deref().unwrap_or("-"),
        database = startup.as_ref().and_then(|m| m.param("database")).as_deref().unwrap_or("-"),
        "session refused"
    );
    if startup.is_some() {
        client.refuse(&refusal).await;
    }
}
