//! Supervision of the worker: spawn it, run the handshake, relay its messages to the actor,
//! and restart it with exponential backoff when it dies, until it fails to start too many
//! times in a row or crashes too often (the crash-loop breaker): a platform that sees `/ping`
//! fail replaces the machine, where restarting forever would bill a loop.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::worker_process::WorkerProcess;
use super::{LogTail, WorkerEvent};
use crate::metrics::Metrics;
use crate::protocol::{self, GatewayMessage, WorkerMessage, PROTOCOL_VERSION};
use crate::readiness::Readiness;

pub struct WorkerSpec {
    pub argv: Vec<String>,
    /// Extra environment names the worker may see (THAW_WORKER_ENV_PASS).
    pub env_pass: Vec<String>,
    pub snapshot: PathBuf,
    pub max_start_failures: u32,
    pub backoff: Duration,
    pub start_timeout: Duration,
    /// Worker exits within `crash_window` that open the breaker (0: never).
    pub max_crashes: u32,
    pub crash_window: Duration,
}

pub struct Supervisor {
    pub spec: WorkerSpec,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub events: mpsc::UnboundedSender<WorkerEvent>,
    pub log: LogTail,
    /// Turns true when the gateway shuts down: stop the worker, do not restart it.
    pub stop: watch::Receiver<bool>,
}

/// How one worker process ended.
struct Exit {
    was_ready: bool,
    reason: String,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Supervisor {
    pub async fn run(mut self, listener: UnixListener, socket: PathBuf) {
        let mut failures = 0u32;
        let mut breaker = CrashBreaker::new(self.spec.max_crashes, self.spec.crash_window);
        loop {
            let exit = self.run_once(&listener, &socket).await;
            self.readiness.set_worker_lost();
            let _ = self.events.send(WorkerEvent::Lost);
            if *self.stop.borrow() {
                tracing::info!("worker stopped");
                return;
            }
            failures = if exit.was_ready { 0 } else { failures + 1 };
            tracing::warn!(reason = %exit.reason, failures, "worker exited");
            let give_up = if breaker.record(Instant::now()) {
                Some(format!(
                    "crash loop: the worker exited {} times within {:?}, so it is not restarted \
                     (THAW_CRASH_LOOP_CRASHES, THAW_CRASH_LOOP_WINDOW_S); last: {}",
                    self.spec.max_crashes, self.spec.crash_window, exit.reason
                ))
            } else if failures >= self.spec.max_start_failures {
                Some(format!(
                    "the worker failed to start {failures} times in a row; last: {}",
                    exit.reason
                ))
            } else {
                None
            };
            if let Some(reason) = give_up {
                tracing::error!(%reason, "giving up on the worker");
                self.readiness.set_failed(reason.clone(), self.log.lines());
                let _ = self.events.send(WorkerEvent::GaveUp(reason));
                return;
            }
            self.metrics.worker_restarts.inc();
            let delay = self
                .spec
                .backoff
                .saturating_mul(1 << failures.saturating_sub(1).min(16))
                .min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => return,
            }
        }
    }

    async fn run_once(&mut self, listener: &UnixListener, socket: &std::path::Path) -> Exit {
        let mut process = match WorkerProcess::spawn(
            &self.spec.argv,
            &self.spec.env_pass,
            socket,
            &self.spec.snapshot,
            &self.log,
        ) {
            Ok(process) => process,
            Err(err) => {
                let reason = format!("cannot start `{}`: {err}", self.spec.argv.join(" "));
                self.log.push(reason.clone());
                return Exit {
                    was_ready: false,
                    reason,
                };
            }
        };
        let spawned_ms = self.readiness.record("worker_spawned");
        let deadline = Instant::now() + self.spec.start_timeout;
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => return self.ended(&mut process, false, format!("accept failed: {err}")).await,
            },
            status = process.child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let reason = format!("the worker exited ({status}) before connecting");
                return self.ended(&mut process, false, reason).await;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let reason = format!("no connection within {:?}", self.spec.start_timeout);
                return self.ended(&mut process, false, reason).await;
            }
            _ = self.stop.changed() => {
                // Not connected yet, so it cannot be asked to stop.
                let _ = process.child.start_kill();
                return self.ended(&mut process, false, "stopped".into()).await;
            }
        };
        let (reader, writer) = stream.into_split();
        let (frames, outbox) = mpsc::unbounded_channel();
        let writer_task = tokio::spawn(write_frames(writer, outbox));
        let (was_ready, reason) = self.relay(reader, &frames, spawned_ms, deadline).await;
        drop(frames);
        let exit = self.ended(&mut process, was_ready, reason).await;
        // The actor may still hold a sender; the process is gone, so nothing is left to write.
        writer_task.abort();
        exit
    }

    /// Reads the worker's frames until the connection ends; returns (was ready, why it ended).
    async fn relay(
        &mut self,
        mut reader: OwnedReadHalf,
        frames: &mpsc::UnboundedSender<GatewayMessage>,
        spawned_ms: f64,
        deadline: Instant,
    ) -> (bool, String) {
        let mut greeted = false;
        let mut was_ready = false;
        let mut fatal: Option<String> = None;
        loop {
            let body = tokio::select! {
                body = protocol::read_body(&mut reader) => body,
                _ = tokio::time::sleep_until(deadline), if !was_ready => {
                    return (false, format!("not ready within {:?}", self.spec.start_timeout));
                }
                _ = self.stop.changed() => {
                    let _ = frames.send(GatewayMessage::Shutdown);
                    return (was_ready, "stopped".into());
                }
            };
            let message = match body {
                Ok(Some(body)) => protocol::decode_body::<WorkerMessage>(&body),
                Ok(None) => {
                    let why = fatal.unwrap_or_else(|| "the worker closed its connection".into());
                    return (was_ready, why);
                }
                Err(err) => Err(err),
            };
            let message = match message {
                Ok(message) => message,
                Err(err) => return (was_ready, format!("protocol error: {err}")),
            };
            match message {
                WorkerMessage::Hello { version, pid } if !greeted => {
                    if version != PROTOCOL_VERSION {
                        let reason = format!(
                            "protocol version {version} is not supported; the gateway speaks {PROTOCOL_VERSION}"
                        );
                        let _ = frames.send(GatewayMessage::Reject {
                            reason: reason.clone(),
                        });
                        return (false, reason);
                    }
                    tracing::info!(pid, "worker connected");
                    greeted = true;
                    let _ = frames.send(GatewayMessage::Welcome {
                        version: PROTOCOL_VERSION,
                    });
                }
                _ if !greeted => {
                    return (false, "protocol error: the first frame is not hello".into())
                }
                WorkerMessage::Phase { name, ms } => {
                    tracing::info!(phase = %name, ms, "worker phase");
                    self.readiness.record_at(&name, spawned_ms + ms);
                }
                WorkerMessage::Ready(info) => {
                    was_ready = true;
                    self.readiness.record("worker_ready");
                    self.readiness.set_worker_ready();
                    let _ = self.events.send(WorkerEvent::Ready {
                        frames: frames.clone(),
                        info,
                    });
                }
                WorkerMessage::Fatal { message } => {
                    tracing::error!(%message, "worker reported a fatal error");
                    fatal = Some(message);
                }
                other => {
                    let _ = self.events.send(WorkerEvent::Message(other));
                }
            }
        }
    }

    async fn ended(&self, process: &mut WorkerProcess, was_ready: bool, reason: String) -> Exit {
        let grace = Duration::from_secs(if *self.stop.borrow() { 10 } else { 2 });
        let status = process.reap(grace).await;
        Exit {
            was_ready,
            reason: format!("{reason} (worker {status})"),
        }
    }
}

/// The crash-rate breaker: `max_crashes` worker exits within `window` open it.
pub struct CrashBreaker {
    max_crashes: u32,
    window: Duration,
    crashes: VecDeque<Instant>,
}

impl CrashBreaker {
    pub fn new(max_crashes: u32, window: Duration) -> Self {
        Self {
            max_crashes,
            window,
            crashes: VecDeque::new(),
        }
    }

    /// Records a crash at `now`; true when it is the `max_crashes`-th within the window.
    pub fn record(&mut self, now: Instant) -> bool {
        if self.max_crashes == 0 {
            return false;
        }
        self.crashes.push_back(now);
        while let Some(&first) = self.crashes.front() {
            if now.saturating_duration_since(first) <= self.window {
                break;
            }
            self.crashes.pop_front();
        }
        self.crashes.len() >= self.max_crashes as usize
    }
}

async fn write_frames(
    mut writer: OwnedWriteHalf,
    mut outbox: mpsc::UnboundedReceiver<GatewayMessage>,
) {
    while let Some(message) = outbox.recv().await {
        if let Err(err) = protocol::write_message(&mut writer, &message).await {
            tracing::warn!(%err, "cannot write to the worker");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_on_k_crashes_within_the_window() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut breaker = CrashBreaker::new(3, Duration::from_secs(60));
        assert!(!breaker.record(at(0)));
        assert!(!breaker.record(at(10)));
        assert!(breaker.record(at(60)), "three crashes within 60 s");
    }

    #[test]
    fn crashes_older_than_the_window_are_forgotten() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut breaker = CrashBreaker::new(3, Duration::from_secs(60));
        assert!(!breaker.record(at(0)));
        assert!(!breaker.record(at(50)));
        // The first crash is 61 s old now: two in the window.
        assert!(!breaker.record(at(61)));
        assert!(!breaker.record(at(200)));
        assert!(!breaker.record(at(300)));
        assert!(!breaker.record(at(301)));
        assert!(breaker.record(at(302)));
    }

    #[test]
    fn zero_crashes_means_no_breaker() {
        let mut breaker = CrashBreaker::new(0, Duration::from_secs(60));
        let now = Instant::now();
        assert!((0..100).all(|_| !breaker.record(now)));
    }
}
