//! Binary upgrades without a refused connection and without a failover: the running
//! process starts the new binary on the same listening sockets (handed over as
//! descriptors, never closed), waits until it serves, then stops accepting and lets its
//! own sessions end at their transaction boundary. The kernel keeps one queue per
//! listening socket, so a client is accepted by one process or the other, never refused;
//! `/health` answers throughout (the new process serves the same stats socket), so the
//! VIP stays.
//!
//! Triggered by SIGUSR2, or by SIGHUP (`systemctl reload`) once the binary on disk is
//! not the one running (the Debian package's upgrade replaces it, then reloads).
//!
//! The descriptors travel as systemd's socket-activation protocol does (`LISTEN_FDS`,
//! descriptors from 3, read with the `listenfd` crate), with their roles in
//! `PGLB_LISTEN_NAMES`; the operator state travels in a file named by
//! `PGLB_UPGRADE_STATE`; the new process says it serves by connecting to the Unix socket
//! named by `PGLB_UPGRADE_READY`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tracing::{info, warn};

const NAMES_ENV: &str = "PGLB_LISTEN_NAMES";
const READY_ENV: &str = "PGLB_UPGRADE_READY";
const STATE_ENV: &str = "PGLB_UPGRADE_STATE";
/// How long the new process may take to serve before the upgrade is abandoned.
const READY_WAIT: Duration = Duration::from_secs(15);
/// How long the new binary's `--check` of the configuration may take.
const CHECK_WAIT: Duration = Duration::from_secs(30);

/// Why an upgrade did not happen (the running process goes on serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the new binary refuses the configuration: {0}")]
    Check(String),
    #[error("the new binary's --check did not finish within {0:?}")]
    CheckHung(Duration),
    #[error("cannot start the new binary: {0}")]
    Spawn(std::io::Error),
    #[error("the new process did not serve within {0:?}")]
    NotReady(Duration),
    #[error("the new process exited before serving ({0})")]
    Exited(std::process::ExitStatus),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The binary this process was started from, to tell when it has been replaced.
#[derive(Debug, Clone)]
pub struct Binary {
    pub path: PathBuf,
    /// (device, inode) of the running image.
    running: Option<(u64, u64)>,
}

impl Binary {
    pub fn current() -> Self {
        let path = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/pglb"));
        let running = std::fs::metadata("/proc/self/exe")
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Binary { path, running }
    }

    /// Is the file at `path` another binary than the one running (a package upgrade)?
    pub fn replaced(&self) -> bool {
        let on_disk = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        on_disk.is_some() && self.running.is_some() && on_disk != self.running
    }
}

/// Listening sockets handed over by the previous process, by role.
#[derive(Debug, Default)]
pub struct Inherited {
    tcp: HashMap<String, std::net::TcpListener>,
    unix: Option<UnixListener>,
    /// The previous process's operator state (a `peers::StateMessage` as JSON).
    pub state: Option<String>,
}

impl Inherited {
    /// What the previous process handed over, if this process was started by an upgrade.
    pub fn from_env() -> Self {
        let Ok(names) = std::env::var(NAMES_ENV) else {
            return Inherited::default();
        };
        let mut fds = listenfd::ListenFd::from_env();
        let mut inherited = Inherited::default();
        for (i, name) in names.split(',').enumerate() {
            let taken = if name == "socket" {
                fds.take_unix_listener(i).map(|l| {
                    inherited.unix = l;
                })
            } else {
                fds.take_tcp_listener(i).map(|l| {
                    if let Some(l) = l {
                        inherited.tcp.insert(name.to_owned(), l);
                    }
                })
            };
            if let Err(e) = taken {
                warn!(name, error = %e, "an inherited socket is unusable: binding anew");
            }
        }
        inherited.state = std::env::var(STATE_ENV)
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok());
        inherited
    }

    /// The listening socket for `role` if it was handed over bound to `addr`.
    pub fn take_tcp(
        &mut self,
        role: &str,
        addr: std::net::SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let l = self.tcp.remove(role)?;
        (l.local_addr().ok() == Some(addr)).then_some(l)
    }

    pub fn take_unix(&mut self) -> Option<UnixListener> {
        self.unix.take()
    }

    pub fn is_upgrade(&self) -> bool {
        !self.tcp.is_empty() || self.unix.is_some() || self.state.is_some()
    }
}

/// Tells the process that started this one that it serves now.
pub fn announce_ready() {
    if let Ok(path) = std::env::var(READY_ENV) {
        if let Err(e) = std::os::unix::net::UnixStream::connect(&path) {
            warn!(error = %e, "cannot tell the previous process that this one serves");
        }
    }
}

/// Starts `binary` with `args` on the given sockets (role, descriptor) and the operator
/// state `state` (JSON); returns its pid once it serves.
pub async fn start_successor(
    binary: &Path,
    args: &[String],
    sockets: Vec<(String, OwnedFd)>,
    state: String,
) -> Result<u32, UpgradeError> {
    check(binary, args).await?;
    let dir = std::env::temp_dir();
    let me = std::process::id();
    let ready_path = dir.join(format!("pglb-upgrade-{me}.sock"));
    let state_path = dir.join(format!("pglb-upgrade-{me}.json"));
    let _ = std::fs::remove_file(&ready_path);
    std::fs::write(&state_path, state)?;
    let ready = tokio::net::UnixListener::bind(&ready_path)?;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let names = names.join(",");
    let mappings = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (_, fd))| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect::<Vec<_>>();
    let count = mappings.len();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args)
        .env(NAMES_ENV, names)
        .env("LISTEN_FDS", count.to_string())
        .env_remove("LISTEN_PID")
        .env(READY_ENV, &ready_path)
        .env(STATE_ENV, &state_path);
    cmd.fd_mappings(mappings)
        .map_err(|e| UpgradeError::Spawn(std::io::Error::other(e)))?;
    let mut child = Successor(Some(cmd.spawn().map_err(UpgradeError::Spawn)?));
    let pid = child.pid();
    info!(pid, binary = %binary.display(), "upgrade: new process started on the same sockets");
    let outcome = wait_ready(&ready, &mut child).await;
    let _ = std::fs::remove_file(&ready_path);
    let _ = std::fs::remove_file(&state_path);
    outcome.map(|()| {
        // It serves: it lives on without this process.
        child.0.take();
        pid
    })
}

/// The new process until it serves: killed if the upgrade is abandoned, whether it
/// failed or this process was told to stop meanwhile.
struct Successor(Option<std::process::Child>);

impl Successor {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_ready(
    ready: &tokio::net::UnixListener,
    child: &mut Successor,
) -> Result<(), UpgradeError> {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        if let Some(status) = child.exited() {
            return Err(UpgradeError::Exited(status));
        }
        let step = tokio::time::Instant::now() + Duration::from_millis(200);
        match tokio::time::timeout_at(step.min(deadline), ready.accept()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(UpgradeError::NotReady(READY_WAIT));
            }
            Err(_) => {}
        }
    }
}

/// The new binary must accept the configuration (`--check`) before it gets the sockets.
/// A check that hangs is killed at [`CHECK_WAIT`].
async fn check(binary: &Path, args: &[String]) -> Result<(), UpgradeError> {
    let run = tokio::process::Command::new(binary)
        .args(args)
        .arg("--check")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CHECK_WAIT, run)
        .await
        .map_err(|_| UpgradeError::CheckHung(CHECK_WAIT))?
        .map_err(UpgradeError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UpgradeError::Check(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}
