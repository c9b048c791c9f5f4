//! Supervision of the worker: spawn it, run the handshake, relay its messages to the actor,
//! and restart it with exponential backoff when it dies.

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
    pub snapshot: PathBuf,
    pub max_start_failures: u32,
    pub backoff: Duration,
    pub start_timeout: Duration,
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
            if failures >= self.spec.max_start_failures {
                let reason = format!(
                    "the worker failed to start {failures} times in a row; last: {}",
                    exit.reason
                );
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
        let mut process =
            match WorkerProcess::spawn(&self.spec.argv, socket, &self.spec.snapshot, &self.log) {
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
