//! The `pglb` binary: parse arguments, set up logging and signals, run the daemon.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// PostgreSQL-aware TCP load balancer for PgBouncer fleets.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, default_value = "/etc/pglb/pglb.toml")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 when valid, 1 with file:line: reason when not.
    #[arg(long)]
    check: bool,
}

/// With a listen on `relay = "kernel"`: whether this machine can (the same load and
/// self-test as at start). Unavailable is not an error: those listens relay in user space.
fn check_kernel_relay(config: &pglb::Config) {
    use pglb::config::RelayMode;
    if !config.listens.iter().any(|l| l.relay == RelayMode::Kernel) {
        return;
    }
    let sessions = u32::try_from(config.global.maxconn).unwrap_or(u32::MAX);
    match pglb::kernel_relay::prepare(sessions) {
        Ok(_) => println!("kernel relay: ready (self-test passed)"),
        Err(why) => {
            println!("kernel relay: unavailable ({why}); those listens relay in user space")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match pglb::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pglb: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.check {
        println!("{}: configuration is valid", cli.config.display());
        check_kernel_relay(&config);
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.global.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    // Sessions run on the workers; the main thread's runtime does the control work.
    let workers = pglb::workers::Workers::start(config.global.threads);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let (workers, runtime) = match (workers, runtime) {
        (Ok(w), Ok(rt)) => (w, rt),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("pglb: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(forward_signals(tx));
        let control = pglb::daemon::Control {
            shutdown: shutdown_signal(),
            requests,
            config_path: cli.config.clone(),
            workers: workers.pool(),
        };
        pglb::run(config, control).await
    });
    drop(workers);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// Turns each SIGHUP into a reload request and each SIGUSR2 into an upgrade request.
async fn forward_signals(tx: tokio::sync::mpsc::UnboundedSender<pglb::daemon::Request>) {
    use pglb::daemon::Request;
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install the SIGHUP/SIGUSR2 handlers: reload needs a restart");
        return;
    };
    loop {
        let request = tokio::select! {
            Some(()) = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                Request::Reload
            }
            Some(()) = usr2.recv() => {
                tracing::info!("SIGUSR2 received: upgrading to the binary on disk");
                Request::Upgrade
            }
            else => return,
        };
        if tx.send(request).is_err() {
            return;
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop pglb with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
