//! Ending the process: SIGTERM/SIGINT or the idle timeout, then a graceful drain.

use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::readiness::Phase;
use crate::state::AppState;

/// SIGTERM and SIGINT, caught from before the port is bound: a platform may stop the container
/// at any moment, and the default action would kill the gateway without stopping its worker.
pub struct StopSignals {
    term: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Resolves with the reason to stop.
pub async fn wait_for_stop(app: &AppState, signals: &mut StopSignals) -> &'static str {
    let idle = async {
        let Some(limit) = app.config.idle_timeout() else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Loading is not idleness (a restart reloads too): the clock starts at ready.
            if app.readiness.phase() == Phase::Initializing {
                app.activity.touch();
                continue;
            }
            if app.activity.idle_for() >= limit && app.generator.engine().active() == 0 {
                return;
            }
        }
    };
    tokio::select! {
        _ = signals.term.recv() => "SIGTERM",
        _ = signals.interrupt.recv() => "SIGINT",
        _ = idle => "idle timeout",
    }
}

/// Probes turn 503 and new requests are refused; admitted requests, and the webhooks of jobs
/// that end, get the grace period; then the worker is told to shut down (and killed if it does
/// not).
pub async fn drain(
    app: &AppState,
    stop_worker: watch::Sender<bool>,
    supervisor: Option<JoinHandle<()>>,
) {
    // Without a ready worker nothing queued can finish, so there is nothing to wait for but
    // webhooks already on their way.
    let worker_ready = app.readiness.phase() == Phase::Ready;
    app.readiness.set_shutting_down();
    let deadline = tokio::time::Instant::now() + app.config.shutdown_grace();
    let busy = || {
        let working = app.generator.engine().active() > 0 || app.webhooks.owed() > 0;
        (worker_ready && working) || app.webhooks.delivering() > 0
    };
    while busy() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unfinished = app.generator.engine().active();
    let webhooks = app.webhooks.owed();
    if busy() {
        tracing::warn!(
            unfinished,
            webhooks,
            "grace period over; stopping with requests or webhooks unfinished"
        );
    }
    stop_worker.send_replace(true);
    if let Some(supervisor) = supervisor {
        if tokio::time::timeout(Duration::from_secs(15), supervisor)
            .await
            .is_err()
        {
            tracing::warn!("the worker did not stop in time");
        }
    }
}
