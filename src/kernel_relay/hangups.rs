//! Hang-ups (FIN, RST) of sockets in the kernel relay, without their data wake-ups.
//!
//! A socket in the map still wakes its pollers for every packet the program redirects
//! (the kernel calls the socket's data-ready after each verdict), so a socket left in
//! tokio's reactor would wake its worker thread once per message: the cost the kernel
//! relay exists to remove. While a session is in the kernel its sockets leave tokio's
//! reactor and sit in an epoll set of their own, registered for EPOLLRDHUP only (plus
//! EPOLLHUP and EPOLLERR, always on): data wake-ups do not match it, a close does. One
//! set for the process, waited on by a thread of its own (asleep until a close).

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::sync::Notify;

/// The process's hang-up set.
struct Hangups {
    epoll: Epoll,
    /// Who to wake for each registration token.
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    next: AtomicU64,
}

static HANGUPS: OnceLock<Result<Arc<Hangups>, String>> = OnceLock::new();

/// A session's two sockets under watch (borrowed: the watch ends before they close);
/// dropping it stops the watch.
pub struct Watch<'a> {
    hangups: Arc<Hangups>,
    token: u64,
    fds: [&'a TcpStream; 2],
    notify: Arc<Notify>,
}

impl<'a> Watch<'a> {
    /// Watches `a` and `b` (the session's client and server sockets) for a hang-up.
    pub fn new(a: &'a TcpStream, b: &'a TcpStream) -> io::Result<Watch<'a>> {
        let hangups = the_set()?;
        let token = hangups.next.fetch_add(1, Relaxed);
        let notify = Arc::new(Notify::new());
        hangups.lock().insert(token, Arc::clone(&notify));
        let watch = Watch {
            hangups,
            token,
            fds: [a, b],
            notify,
        };
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        for fd in watch.fds {
            watch
                .hangups
                .epoll
                .add(fd.as_fd(), EpollEvent::new(flags, token))?;
        }
        Ok(watch)
    }

    /// From now on, data on either socket wakes the watch too (a drained session, whose
    /// hand-back comes with a packet).
    pub fn wake_on_data(&self) -> io::Result<()> {
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        for fd in self.fds {
            let mut event = EpollEvent::new(flags, self.token);
            self.hangups.epoll.modify(fd.as_fd(), &mut event)?;
        }
        Ok(())
    }

    /// Waits until either socket may have hung up (look at both: a wake-up may also be
    /// left over from before).
    pub async fn hung_up(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        for fd in self.fds {
            let _ = self.hangups.epoll.delete(fd.as_fd());
        }
        self.hangups.lock().remove(&self.token);
    }
}

impl Hangups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The set, made (and its thread started) on first use.
fn the_set() -> io::Result<Arc<Hangups>> {
    let made = HANGUPS.get_or_init(|| {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| e.to_string())?;
        let hangups = Arc::new(Hangups {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let watched = Arc::clone(&hangups);
        std::thread::Builder::new()
            .name("pglb-hangups".into())
            .spawn(move || watch(&watched))
            .map_err(|e| e.to_string())?;
        Ok(hangups)
    });
    made.as_ref()
        .map(Arc::clone)
        .map_err(|e| io::Error::other(e.clone()))
}

/// Wakes the session of every socket that hung up, for the life of the process.
fn watch(hangups: &Hangups) {
    let mut events = [EpollEvent::empty(); 64];
    loop {
        match hangups.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => {
                let waiters = hangups.lock();
                for e in &events[..n] {
                    if let Some(w) = waiters.get(&e.data()) {
                        w.notify_one();
                    }
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                // Closes of kernel-relayed sessions are noticed at their idle limit from
                // here on: say so.
                tracing::error!(error = %e, "kernel relay: the hang-up watch stopped; closes are seen at the idle limit only");
                return;
            }
        }
    }
}
