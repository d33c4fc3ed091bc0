//! HAProxy's runtime API (the "stats socket") on a Unix socket or a TCP address, so that
//! the tools operators drive HAProxy with (socat scripts, hatop, configuration
//! management, monitoring agents) drive pglb unchanged.
//!
//! The protocol, as HAProxy speaks it: a client sends one line of commands separated by
//! `;`; each command's answer is its text followed by an empty line; then the server
//! closes. `prompt` switches the connection to interactive mode: the connection stays
//! open, and every answer is followed by the prompt `> `, until `quit` or the idle
//! timeout (`set timeout cli <seconds>`, default 10 s). Actions go through the same
//! admin layer as the dashboard and the JSON API (`crate::admin`); access is the socket
//! file's permission, as HAProxy's `level admin`.

mod commands;
mod show;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SocketSpec;
use crate::state::Process;

/// Longest command line read; a longer one ends the connection.
const MAX_LINE: u64 = 64 * 1024;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Idle time before a connection is closed (HAProxy's `stats timeout` default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The interactive prompt.
const PROMPT: &str = "> ";

/// What the commands act on.
pub struct Context {
    pub process: Arc<Process>,
    /// The other nodes of the pair: operator actions go to them too.
    pub peers: Arc<crate::peers::Peers>,
    /// Where operator actions are saved (the dashboard's `[stats] state_file`).
    pub state_file: Option<PathBuf>,
    /// Worker threads, for `show info`.
    pub threads: usize,
}

/// A bound runtime API socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// A Unix socket handed over by the previous process (an upgrade).
    pub fn inherited(
        l: std::os::unix::net::UnixListener,
        path: &std::path::Path,
    ) -> io::Result<Listener> {
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(UnixListener::from_std(l)?, path.to_owned()))
    }

    /// A TCP socket handed over by the previous process (an upgrade).
    pub fn inherited_tcp(l: std::net::TcpListener) -> io::Result<Listener> {
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(TcpListener::from_std(l)?))
    }

    /// A descriptor of the socket for a successor (an upgrade), with its role.
    pub fn handover(&self) -> Option<(&'static str, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        match self {
            Listener::Unix(l, _) => Some(("socket", l.as_fd().try_clone_to_owned().ok()?)),
            Listener::Tcp(l) => Some(("socket_tcp", l.as_fd().try_clone_to_owned().ok()?)),
        }
    }
}

/// Binds the socket. A Unix socket left by an earlier run is replaced; its mode is set
/// before any client can connect to it.
pub fn bind(spec: &SocketSpec) -> io::Result<Listener> {
    match spec {
        SocketSpec::Tcp(addr) => {
            let std = std::net::TcpListener::bind(addr)?;
            std.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(std)?))
        }
        SocketSpec::Unix { path, mode } => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && meta.file_type().is_socket()
            {
                std::fs::remove_file(path)?;
            }
            // Bound under a temporary name, given its mode, then moved into place: no
            // moment exists where the socket is reachable with the default umask's mode.
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let listener = UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))?;
            std::fs::rename(&tmp, path)?;
            Ok(Listener::Unix(listener, path.clone()))
        }
    }
}

/// Serves until `stop`; removes a Unix socket file when done.
pub async fn serve(listener: Listener, ctx: Arc<Context>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    match &listener {
        Listener::Unix(_, path) => info!(socket = %path.display(), "runtime API listening"),
        Listener::Tcp(l) => {
            info!(socket = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "runtime API listening")
        }
    }
    loop {
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "runtime API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!("runtime API: too many connections, refusing one");
            tokio::spawn(async move {
                let mut stream = stream;
                let busy = format!("Too many connections ({MAX_CONNECTIONS}); try again.\n\n");
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stream.write_all(busy.as_bytes()))
                        .await;
            });
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &ctx).await {
                debug!(error = %e, "runtime API connection ended");
            }
            drop(slot);
        });
    }
    // The file is a successor's after an upgrade: it serves on the same socket.
    if let Listener::Unix(_, path) = &listener
        && !crate::state::HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed)
    {
        let _ = std::fs::remove_file(path);
    }
}

/// A connection of either kind.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn accept(listener: &Listener) -> io::Result<Box<dyn Stream>> {
    Ok(match listener {
        Listener::Unix(l, _) => Box::new(l.accept().await?.0),
        Listener::Tcp(l) => Box::new(l.accept().await?.0),
    })
}

/// The state of one client connection.
pub struct Cli {
    /// `prompt` was given: keep the connection and print the prompt.
    pub interactive: bool,
    pub timeout: Duration,
    pub quit: bool,
}

async fn connection(stream: Box<dyn Stream>, ctx: &Context) -> io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read.take(MAX_LINE));
    let mut cli = Cli {
        interactive: false,
        timeout: DEFAULT_TIMEOUT,
        quit: false,
    };
    let mut line = String::new();
    loop {
        line.clear();
        reader.get_mut().set_limit(MAX_LINE);
        let n = match tokio::time::timeout(cli.timeout, reader.read_line(&mut line)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n as u64 == MAX_LINE && !line.ends_with('\n') {
            let said = "Command line too long (64 KiB at most).\n\n";
            return bounded(cli.timeout, write.write_all(said.as_bytes())).await;
        }
        if n == 0 || !line.ends_with('\n') {
            // EOF, or the client's last line without its newline.
            return Ok(());
        }
        for command in split_commands(line.trim_end_matches(['\n', '\r'])) {
            let out = commands::execute(ctx, &command, &mut cli);
            if cli.quit {
                return Ok(());
            }
            let mut answer = out;
            answer.push('\n');
            if cli.interactive {
                answer.push_str(PROMPT);
            }
            // A client that stops reading must not hold its connection slot for good.
            bounded(cli.timeout, write.write_all(answer.as_bytes())).await?;
        }
        bounded(cli.timeout, write.flush()).await?;
        if !cli.interactive {
            return Ok(());
        }
    }
}

/// `io` within `limit`, else a TimedOut error.
async fn bounded(limit: Duration, io: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(limit, io).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read its answer in time",
        ))
    })
}

/// Splits a line at `;` (a `\;` stays in the command), dropping empty commands.
fn split_commands(line: &str) -> Vec<String> {
    let mut commands = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                if let Some(last) = commands.last_mut() {
                    last.push(';');
                }
                chars.next();
            }
            ';' => commands.push(String::new()),
            c => {
                if let Some(last) = commands.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    commands
        .into_iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_at_unescaped_semicolons() {
        assert_eq!(
            split_commands("show info; get weight a/b ;; set x\\;y"),
            ["show info", "get weight a/b", "set x;y"]
        );
        assert!(split_commands("  ").is_empty());
    }
}
