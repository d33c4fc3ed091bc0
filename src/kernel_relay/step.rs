//! The relay step of a session whose listen has `relay = "kernel"`: the user-space relay
//! until a ReadyForQuery answers everything (the login's, normally), the kernel from
//! there, and the user-space relay again if the kernel hands the session back. Whatever
//! fails on the way, the session goes on in user space.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::Loaded;
use super::session::{HandOverError, Moved, Watched, hand_over};
use crate::client::Client;
use crate::counters::Counter;
use crate::relay::{self, End, Idle, Meters, Outcome, Signals, Tracker};

/// Where the session's bytes went, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    User,
    Kernel,
    /// In the kernel, then handed back.
    KernelThenUser,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::User => "user",
            Path::Kernel => "kernel",
            Path::KernelThenUser => "kernel+user",
        }
    }
}

/// Sessions that went through the hand-over, since the start (for /metrics).
#[derive(Debug, Default)]
pub struct Counts {
    /// Handed to the kernel.
    pub handed_over: AtomicU64,
    /// Stayed in user space at their hand-over (see the debug or warning log line).
    pub stayed: AtomicU64,
    /// Handed back by the kernel to user space (drains, data it could not redirect).
    pub handed_back: AtomicU64,
}

pub static COUNTS: Counts = Counts {
    handed_over: AtomicU64::new(0),
    stayed: AtomicU64::new(0),
    handed_back: AtomicU64::new(0),
};

/// A session's sockets, in tokio's reactor (user-space relay) or out of it (kernel).
type Sockets = (Client, TcpStream);

/// Relays a plaintext session (`tracker` follows it), in the kernel where it can. The
/// sockets come back unless the session ended in the kernel (then they are closed).
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    kernel: &'static Loaded,
    client: Client,
    server: TcpStream,
    idle: Idle,
    meters: Meters<'_>,
    signals: Signals<'_>,
    tracker: &Tracker,
    path: &mut Path,
) -> (Option<Sockets>, Outcome) {
    let mut total = Outcome {
        to_server: 0,
        to_client: 0,
        end: End::ClientClosed,
    };
    let (mut client, mut server) = (client, server);
    let mut armed = true;
    loop {
        let out = relay::relay(
            &mut client,
            &mut server,
            idle,
            meters,
            signals,
            Some(tracker),
            armed,
        )
        .await;
        total.to_server += out.to_server;
        total.to_client += out.to_client;
        let End::HandOver(ready) = out.end else {
            total.end = out.end;
            return (Some((client, server)), total);
        };
        // One hand-over per session: a session handed back stays in user space.
        armed = false;
        let session = Session {
            kernel,
            tracker,
            idle,
            meters: &meters,
            signals: &signals,
        };
        match session
            .through_kernel((client, server), &ready, &mut total, path)
            .await
        {
            Next::Done(sockets) => return (sockets, total),
            Next::User(sockets) => (client, server) = sockets,
        }
    }
}

/// Where a session goes on after its time in the kernel.
enum Next {
    /// It is over; the sockets come back when the user-space side still has something
    /// to send (a drained client's last message) or the relay ended in user space.
    Done(Option<Sockets>),
    /// In the user-space relay again.
    User(Sockets),
}

/// Why a session stays in user space at its hand-over: expected (debug) or not (warn).
fn stayed(e: &HandOverError) {
    COUNTS.stayed.fetch_add(1, Relaxed);
    match e {
        HandOverError::Ahead(_) | HandOverError::Unsettled(_) => {
            debug!(error = %e, "session stays in the user-space relay")
        }
        _ => warn!(error = %e, "kernel relay hand-over failed; session stays in user space"),
    }
}

/// What the kernel part of a session works with.
struct Session<'a, 'm> {
    kernel: &'static Loaded,
    tracker: &'a Tracker,
    idle: Idle,
    meters: &'a Meters<'m>,
    signals: &'a Signals<'m>,
}

impl Session<'_, '_> {
    /// Hands the session to the kernel at `ready` (the ReadyForQuery the user-space relay
    /// held back) and follows it until it ends or comes back; adds what moved to `total`.
    async fn through_kernel(
        &self,
        sockets: Sockets,
        ready: &[u8],
        total: &mut Outcome,
        path: &mut Path,
    ) -> Next {
        let mut moved = Moved::default();
        let (watched, sockets) = self.in_kernel(sockets, ready, &mut moved).await;
        total.to_server += moved.to_server;
        total.to_client += moved.to_client;
        let Some((mut client, server)) = sockets else {
            // Ended in the kernel (its sockets closed there), or lost on the way back.
            *path = Path::Kernel;
            total.end = match watched {
                Ok(Watched::Ended(end)) => end,
                _ => End::ServerError(std::io::Error::other("sockets lost after the kernel relay")),
            };
            return Next::Done(None);
        };
        match watched {
            Ok(Watched::Ended(end)) => {
                *path = Path::Kernel;
                total.end = end;
                Next::Done(None)
            }
            Ok(Watched::Back(resume)) => {
                COUNTS.handed_back.fetch_add(1, Relaxed);
                self.tracker.resume(&resume);
                if resume.drained {
                    // Over at the boundary: only pglb's FATAL is left to send.
                    *path = Path::Kernel;
                    total.end = End::Drained;
                    return Next::Done(Some((client, server)));
                }
                *path = Path::KernelThenUser;
                Next::User((client, server))
            }
            Err(e) => {
                stayed(&e);
                if let Some(end) = self.forward(&mut client, ready).await {
                    total.end = end;
                    return Next::Done(Some((client, server)));
                }
                add(&self.meters.to_client, ready.len() as u64);
                total.to_client += ready.len() as u64;
                Next::User((client, server))
            }
        }
    }

    /// Sends the held-back ReadyForQuery to a client the kernel did not take. It may be
    /// the client that stopped reading (the hand-over failed because it had not
    /// acknowledged the result): bounded by its idle limit and the session's signals, as
    /// the user-space relay is. `Some`: how the session ended instead.
    async fn forward(&self, client: &mut Client, ready: &[u8]) -> Option<End> {
        let s = self.signals;
        let drain_over = async {
            s.drain.cancelled().await;
            tokio::time::sleep(s.drain_deadline).await;
        };
        tokio::select! {
            sent = tokio::time::timeout(self.idle.client, client.write_all(ready)) => match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(End::ClientError(e)),
                Err(_) => Some(End::ClientTimeout),
            },
            _ = s.shutdown.cancelled() => Some(End::Shutdown),
            _ = s.kill.cancelled() => Some(End::ServerDown),
            _ = drain_over => Some(End::DrainTimeout),
        }
    }

    /// Takes the sockets out of tokio's reactor, hands the session to the kernel,
    /// forwards the ReadyForQuery, watches it there; the sockets go back into the reactor
    /// when the user-space relay needs them again. None: the session ended in the kernel.
    async fn in_kernel(
        &self,
        (client, server): Sockets,
        ready: &[u8],
        moved: &mut Moved,
    ) -> (Result<Watched, HandOverError>, Option<Sockets>) {
        let Client::Plain(client) = client else {
            let tls = Err(HandOverError::Ahead("TLS client"));
            return (tls, Some((client, server)));
        };
        let (client, server) = match (client.into_std(), server.into_std()) {
            (Ok(c), Ok(s)) => (c, s),
            (Err(e), _) | (_, Err(e)) => {
                // into_std only fails on a socket already deregistered: the session is over.
                return (Err(HandOverError::Reactor(e)), None);
            }
        };
        let watched = self.watch(&client, &server, ready, moved).await;
        if matches!(watched, Ok(Watched::Ended(_))) {
            return (watched, None);
        }
        match (TcpStream::from_std(client), TcpStream::from_std(server)) {
            (Ok(c), Ok(s)) => (watched, Some((Client::Plain(c), s))),
            (Err(e), _) | (_, Err(e)) => (Ok(Watched::Ended(End::ServerError(e))), None),
        }
    }

    async fn watch(
        &self,
        client: &std::net::TcpStream,
        server: &std::net::TcpStream,
        ready: &[u8],
        moved: &mut Moved,
    ) -> Result<Watched, HandOverError> {
        let pending = self.tracker.pending().max(0) as u64;
        let relayed = hand_over(self.kernel, client, server, ready, pending).await?;
        COUNTS.handed_over.fetch_add(1, Relaxed);
        if let Err(e) = relayed.forward_ready(ready).await {
            return Ok(Watched::Ended(End::ClientError(e)));
        }
        add(&self.meters.to_client, ready.len() as u64);
        moved.to_client += ready.len() as u64;
        let mut in_kernel = Moved::default();
        let watched = relayed
            .watch(self.idle, self.meters, self.signals, &mut in_kernel)
            .await;
        moved.to_server += in_kernel.to_server;
        moved.to_client += in_kernel.to_client;
        Ok(watched)
    }
}

fn add(meters: &[&crate::counters::StripedCounter; 2], n: u64) {
    for m in meters {
        m.add(n);
    }
}
