//! Accepting clients: admission under the global and listen maxconn, then one task per
//! session. Accept errors (EMFILE when out of descriptors, ECONNABORTED…) back off
//! instead of spinning or stopping the listener.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::cancel::Registry;
use crate::counters::Gate;
use crate::refusal::Refusal;
use crate::session::{self, Admission, Incoming};
use crate::state::ListenState;
use crate::workers::Pool;

/// Refused clients are answered by short tasks; this caps how many run at once so a
/// flood beyond maxconn costs bounded work (beyond it, the socket is simply closed).
const MAX_REFUSING: usize = 256;

/// What every accept loop shares.
#[derive(Clone)]
pub struct Shared {
    /// Global maxconn (the process's gate: a reload may change it).
    pub global: Arc<Gate>,
    /// Bounds the tasks that answer refused clients.
    pub refusing: Arc<Semaphore>,
    /// Session tasks, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the shutdown grace ends: sessions close.
    pub close_sessions: CancellationToken,
    /// Where sessions run.
    pub workers: Arc<Pool>,
    /// Cancel keys of live sessions: one registry for the process (a cancel may come in
    /// through any listen).
    pub cancels: Arc<Registry>,
}

impl Shared {
    pub fn new(
        global: Arc<Gate>,
        tracker: TaskTracker,
        close_sessions: CancellationToken,
        workers: Arc<Pool>,
        cancels: Arc<Registry>,
    ) -> Self {
        Shared {
            global,
            cancels,
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            tracker,
            close_sessions,
            workers,
        }
    }
}

/// Accepts until `stop` is cancelled, then drops the listener (the port closes once every
/// worker's loop has dropped its descriptor). Runs on worker `me`, whose event loop
/// watches the listener; each client goes to the least loaded worker.
/// The listen's state lives as long as the process serves it: a reload reconfigures it
/// in place, so new clients and running sessions see one set of limits.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    me: usize,
    listen: Arc<ListenState>,
    shared: Shared,
    stop: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(listen = %listen.name, error = %e, "worker cannot watch the listening socket");
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff = FIRST_BACKOFF;
                conn
            }
            Err(e) => {
                warn!(listen = %listen.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // TCP_NODELAY and keepalive come from the listening socket (`net::bind_std`).
        let admission = match admit(&listen, &shared) {
            Ok(admission) => admission,
            Err(()) => {
                debug!(client = %peer, "too many refusals in flight: closing");
                continue;
            }
        };
        let (listen, close) = (Arc::clone(&listen), shared.close_sessions.clone());
        let worker = shared.workers.pick(me);
        let tcp = if worker == me {
            Incoming::Here(stream)
        } else {
            // Another worker's event loop must own the socket: hand it over unregistered.
            match stream.into_std() {
                Ok(s) => Incoming::Handed(s),
                Err(e) => {
                    debug!(client = %peer, error = %e, "cannot hand the client to another worker");
                    continue;
                }
            }
        };
        let load = shared.workers.enter(worker);
        let cancels = Arc::clone(&shared.cancels);
        let session = session::serve(tcp, peer, listen, admission, close, load, cancels);
        // On this worker's own handle, tokio queues the task locally (no wake-up).
        shared
            .tracker
            .spawn_on(session, shared.workers.handle(worker));
    }
}

/// Takes a global and a listen permit, or decides the refusal. Err when even the
/// refusal cannot be afforded.
fn admit(listen: &Arc<ListenState>, shared: &Shared) -> Result<Admission, ()> {
    let refusal = |scope, limit| Refusal::TooManyClients {
        listen: listen.name.clone(),
        scope,
        limit,
    };
    let global = shared.global.try_enter();
    let local = listen.gate.try_enter();
    let refused = match (global, local) {
        (Some(g), Some(l)) => return Ok(Admission::Admitted([g, l])),
        (None, _) => refusal("global", shared.global.limit()),
        (_, None) => refusal("listen", listen.gate.limit()),
    };
    match Arc::clone(&shared.refusing).try_acquire_owned() {
        Ok(permit) => Ok(Admission::Refused(refused, permit)),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    //! The whole data path in process (accept → startup → pick → relay) against fake
    //! PgBouncers on loopback, on a real worker thread.
    use super::*;
    use crate::startup::CancelKey;
    use crate::testing::{AUTH_OK, Fake, KEY_DATA, READY_IDLE, fake_recording, listen_over};
    use crate::testing::{query, read_exactly, serve, startup_packet};
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    /// Logs in through pglb: the fake's AuthenticationOk, key and ReadyForQuery arrive.
    async fn login(addr: SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&startup_packet("app")).await.expect("startup");
        let hello = [&AUTH_OK[..], &KEY_DATA, &READY_IDLE].concat();
        assert_eq!(read_exactly(&mut c, hello.len()).await, hello);
        c
    }

    #[tokio::test]
    async fn a_client_reaches_its_server_and_bytes_flow_both_ways() {
        let (pgb, mut first) = fake_recording(Fake::Echo).await;
        let listen = listen_over(&[pgb]);
        let (addr, _workers) = serve(&listen, 100);
        let mut c = login(addr).await;
        assert_eq!(first.recv().await.expect("startup"), startup_packet("app"));
        let q = query("SELECT 1");
        c.write_all(&q).await.expect("query");
        assert_eq!(
            read_exactly(&mut c, q.len()).await,
            q,
            "echoed through pglb"
        );
        assert_eq!(listen.servers()[0].sessions(), 1);
        assert_eq!(listen.counters.stot.load(Relaxed), 1);
        drop(c);
        for _ in 0..100 {
            if listen.servers()[0].sessions() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listen.servers()[0].sessions(), 0, "the place is freed");
    }

    #[tokio::test]
    async fn a_cancel_request_goes_to_the_server_that_issued_the_key() {
        let (other, mut at_other) = fake_recording(Fake::Echo).await;
        let (issuer, mut at_issuer) = fake_recording(Fake::Echo).await;
        // Balance "first": the session goes to `other` unless it is down.
        let listen = listen_over(&[other, issuer]);
        listen.servers()[0].set_up(false);
        let (addr, _workers) = serve(&listen, 100);
        let _session = login(addr).await;
        at_issuer.recv().await.expect("the session's startup");
        listen.servers()[0].set_up(true);
        let key = CancelKey {
            pid: 4242,
            secret: bytes::Bytes::from_static(&[1, 2, 3, 4]),
        };
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&key.to_packet()).await.expect("cancel");
        let got = timeout(Duration::from_secs(5), at_issuer.recv())
            .await
            .expect("in time");
        assert_eq!(got.expect("cancel"), key.to_packet());
        assert!(at_other.try_recv().is_err(), "nothing went elsewhere");
    }

    #[tokio::test]
    async fn over_maxconn_the_client_hears_why() {
        let (pgb, _) = fake_recording(Fake::Echo).await;
        let listen = listen_over(&[pgb]);
        let (addr, _workers) = serve(&listen, 1);
        let _held = login(addr).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&startup_packet("app")).await.expect("startup");
        let mut answer = Vec::new();
        timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
            .await
            .expect("in time")
            .expect("read");
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(answer.first(), Some(&b'E'), "{text}");
        assert!(text.contains("53300"), "{text}");
        assert!(text.contains("global maxconn 1"), "{text}");
        assert_eq!(
            listen.servers()[0].sessions(),
            1,
            "the refused one took no place"
        );
    }
}
