//! The systemd-style life cycle every daemon shares: logging to journald or stderr, `READY=1`,
//! watchdog pings, and `STOPPING=1` followed by a graceful drain on SIGTERM/SIGINT.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Logs to journald when stderr is connected to the journal (systemd sets `JOURNAL_STREAM` to
/// stderr's device and inode), human-readable to stderr otherwise. The level comes from
/// `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry.with(journald).init();
                return;
            }
            Err(e) => eprintln!("journald unavailable ({e}), logging to stderr"),
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a person at a terminal, not in pipes and log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}

/// `JOURNAL_STREAM` is inherited by children whose stderr may have been redirected, so it only
/// counts when it names the file stderr actually is.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Tells the service manager (if any) that the daemon is doing its job.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("ready")]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Pings the service manager's watchdog at half of `WATCHDOG_USEC` while the async runtime is
/// responsive. Does nothing when no watchdog is configured.
pub fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (timeout / 2).max(Duration::from_millis(10));
    tracing::debug!(?period, "watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}

/// A token cancelled on the first SIGTERM or SIGINT, after `STOPPING=1` was sent. A second
/// signal exits at once, for an operator who does not want to wait for the drain.
pub fn shutdown_token() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining, then exiting"),
            _ = int.recv() => tracing::info!("SIGINT: draining, then exiting"),
        }
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
    Ok(token)
}

/// Exponential backoff between recovery attempts (200 ms doubling to 6.4 s).
#[derive(Debug, Default)]
pub struct Backoff(u32);

impl Backoff {
    /// Sleeps for the next delay; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = Duration::from_millis(200) * 2u32.pow(self.0.min(5));
        self.0 += 1;
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.cancelled() => false,
        }
    }
}
