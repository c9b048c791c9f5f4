//! The engine: the gateway's single owner of the worker.
//!
//! Boundary (reused by every HTTP surface):
//!
//! * [`Engine::submit`] takes a [`TokenRequest`] (prompt token ids and validated sampling
//!   [`Params`]) and returns a [`TokenStream`] of [`EngineEvent`]s: `Started` when the request is
//!   handed to the worker, one `Token` per generated token (the last one carries its finish
//!   reason), `Finished` for a finish without a token (cancel), or `Failed`.
//! * Admission is synchronous: a full queue, a failed start-up or a shutdown is refused at once
//!   with an [`EngineError`], so routes can answer with a real status code.
//! * Dropping a [`TokenStream`] before it finished cancels the request in the worker (its KV
//!   blocks are freed): a client that disconnects needs no extra code in the routes.
//! * Text (detokenization, stop strings) is layered on top by `crate::generation`.
//!
//! Inside, an actor task (`actor.rs`) owns the queue and the requests running in the worker,
//! and a supervisor task (`supervisor.rs`) owns the worker process and its socket.
//!
//! Queueing policy: the gateway keeps requests in its own FIFO queue and hands the worker at
//! most `min(THAW_MAX_CONCURRENT_REQUESTS, ready.max_running)` at a time, so that queued
//! requests can still be cancelled, expired or re-queued cheaply and the worker's scheduler
//! only sees what it can run.

mod actor;
mod log_tail;
mod supervisor;
mod worker_process;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

pub use log_tail::LogTail;
pub use supervisor::{Supervisor, WorkerSpec};

use crate::metrics::Metrics;
pub use crate::protocol::Params;
use crate::protocol::{GatewayMessage, ReadyInfo, WireFinish, WorkerMessage};
use crate::readiness::{Phase, Readiness};

/// A request at the token level.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub prompt: Vec<u32>,
    pub params: Params,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    EosToken,
    Length,
    StopSequence,
    Cancelled,
}

impl From<WireFinish> for FinishReason {
    fn from(finish: WireFinish) -> Self {
        match finish {
            WireFinish::EosToken => Self::EosToken,
            WireFinish::Length => Self::Length,
            WireFinish::Cancelled => Self::Cancelled,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: Option<f64>,
    pub top: Vec<(u32, f64)>,
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Started,
    Token(SampledToken),
    Finished(FinishReason),
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("the worker was not ready within {0:?}")]
    NotReady(Duration),
    #[error("start-up failed: {0}")]
    StartupFailed(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the worker restarted while this request was generating")]
    WorkerLost,
    #[error("the worker failed this request: {0}")]
    Worker(String),
}

/// What the supervisor tells the actor about the worker.
#[derive(Debug)]
pub enum WorkerEvent {
    /// The worker said `ready`; `frames` writes to its socket.
    Ready {
        frames: mpsc::UnboundedSender<GatewayMessage>,
        info: ReadyInfo,
    },
    /// `outputs`, `error` or `stats`.
    Message(WorkerMessage),
    /// The worker is gone; a new one is being started.
    Lost,
    /// Start-up failed for good.
    GaveUp(String),
}

pub struct EngineConfig {
    pub queue_capacity: usize,
    pub max_concurrent_requests: usize,
    pub ready_wait: Duration,
}

struct Shared {
    commands: mpsc::UnboundedSender<actor::Command>,
    waiting: AtomicUsize,
    active: AtomicUsize,
    next_ticket: AtomicU64,
    queue_capacity: usize,
    readiness: Arc<Readiness>,
}

#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the actor; the returned sender is where the supervisor reports the worker.
    pub fn start(
        config: EngineConfig,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::UnboundedSender<WorkerEvent>) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            commands,
            waiting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(1),
            queue_capacity: config.queue_capacity,
            readiness,
        });
        let actor = actor::Actor::new(shared.clone(), metrics, &config);
        tokio::spawn(actor.run(command_rx, worker_rx));
        (Self { shared }, worker_tx)
    }

    pub fn submit(&self, request: TokenRequest) -> Result<TokenStream, EngineError> {
        let shared = &self.shared;
        match shared.readiness.phase() {
            Phase::ShuttingDown => return Err(EngineError::ShuttingDown),
            Phase::Failed => {
                let reason = shared
                    .readiness
                    .failure()
                    .map(|f| f.reason)
                    .unwrap_or_default();
                return Err(EngineError::StartupFailed(reason));
            }
            Phase::Initializing | Phase::Ready => {}
        }
        let capacity = shared.queue_capacity;
        shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map_err(EngineError::QueueFull)?;
        shared.active.fetch_add(1, Ordering::AcqRel);
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let stream = TokenStream {
            ticket,
            events: receiver,
            finished: false,
            shared: shared.clone(),
        };
        let pending = actor::Pending::new(ticket, request, events);
        if shared
            .commands
            .send(actor::Command::Submit(pending))
            .is_err()
        {
            return Err(EngineError::ShuttingDown);
        }
        Ok(stream)
    }

    /// Requests admitted and not yet finished (or not yet dropped by their caller).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }
}

/// The events of one request. Dropping it early cancels the request.
pub struct TokenStream {
    ticket: u64,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    finished: bool,
    shared: Arc<Shared>,
}

impl TokenStream {
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if self.finished {
            return None;
        }
        // The actor never drops a sender without a final event, except when it stops.
        let event = self
            .events
            .recv()
            .await
            .unwrap_or(EngineEvent::Failed(EngineError::ShuttingDown));
        self.finished = matches!(
            event,
            EngineEvent::Finished(_)
                | EngineEvent::Failed(_)
                | EngineEvent::Token(SampledToken {
                    finish: Some(_),
                    ..
                })
        );
        Some(event)
    }

    /// Stops the request in the worker; no more events are read.
    pub fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self
                .shared
                .commands
                .send(actor::Command::Cancel(self.ticket));
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.cancel();
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
