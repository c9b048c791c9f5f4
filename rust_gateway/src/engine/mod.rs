//! The engine: the gateway's single owner of the worker.
//!
//! Boundary (reused by every HTTP surface):
//!
//! * [`Engine::submit`] takes a [`TokenRequest`] (prompt token ids and validated sampling
//!   [`Params`]) and returns a [`TokenStream`] of [`EngineEvent`]s: `Started` when the request is
//!   handed to the worker, `PromptLogprobs` when the request asked for them, one `Token` per
//!   generated token (the last one carries its finish reason), `Finished` for a finish without
//!   a token (cancel), or `Failed`.
//! * Siblings (`n`, `best_of`): a request whose [`TokenRequest::fork_of`] names an earlier
//!   one's ticket is submitted with `fork_of` set to that one's wire id while it runs in the
//!   same worker, so the worker shares its prompt's KV blocks.
//! * Admission is synchronous: a full queue, a failed start-up or a shutdown is refused at once
//!   with an [`EngineError`], so routes can answer with a real status code. [`Engine::reserve`]
//!   takes the queue place first (before the prompt is tokenized); [`Engine::submit_in`] fills it.
//! * Attempts: a request runs in at most [`MAX_ATTEMPTS`] workers. A worker that dies while it
//!   runs a request costs that request one attempt (the count follows it across re-queues and
//!   the routes' retries); past the last one the request fails with [`EngineError::Crashed`],
//!   so a request that kills the worker cannot keep killing it.
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
use crate::protocol::{GatewayMessage, ReadyInfo, WireFinish, WorkerMessage};
pub use crate::protocol::{Params, PromptLogprob};
use crate::readiness::{Phase, Readiness};

/// Workers a request may run in: one crash is retried, a second fails the request.
pub const MAX_ATTEMPTS: u32 = 2;

/// A request at the token level.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub prompt: Vec<u32>,
    pub params: Params,
    /// Attempts already spent on this request by earlier submits (a route's or a job's retry).
    pub previous_attempts: u32,
    /// The [`TokenStream::ticket`] of an earlier request with the same prompt (a sibling for
    /// `n`): the worker lets this one wait for that one's prefill and share its KV blocks.
    pub fork_of: Option<u64>,
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
    /// The prompt's logprobs (asked for with `prompt_logprobs`), before the first token.
    PromptLogprobs(Vec<PromptLogprob>),
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
    /// Start-up failed, or the crash-loop breaker opened: nothing will be served.
    #[error("{0}")]
    Unavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the worker restarted while this request was generating")]
    WorkerLost,
    #[error("the worker crashed {0} times while running this request; it is not tried again")]
    Crashed(u32),
    #[error("the prompt has {tokens} tokens; the worker's context limit is {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
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
    /// Places taken in the queue: queued requests and reservations not yet submitted.
    waiting: AtomicUsize,
    active: AtomicUsize,
    next_ticket: AtomicU64,
    queue_capacity: usize,
    readiness: Arc<Readiness>,
    /// The last ready worker's `max_context` (0 until one was ready).
    max_context: AtomicUsize,
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
            max_context: AtomicUsize::new(0),
        });
        let actor = actor::Actor::new(shared.clone(), metrics, &config);
        tokio::spawn(actor.run(command_rx, worker_rx));
        (Self { shared }, worker_tx)
    }

    /// Takes a place in the queue (429 when full) before any work is spent on a request.
    pub fn reserve(&self) -> Result<QueueSlot, EngineError> {
        let shared = &self.shared;
        Self::check_phase(shared)?;
        let capacity = shared.queue_capacity;
        shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map_err(EngineError::QueueFull)?;
        Ok(QueueSlot {
            shared: shared.clone(),
            held: true,
        })
    }

    /// [`Engine::reserve`] and [`Engine::submit_in`] in one.
    #[cfg(test)]
    pub fn submit(&self, request: TokenRequest) -> Result<TokenStream, EngineError> {
        let slot = self.reserve()?;
        self.submit_in(slot, request)
    }

    /// Queues `request` in the place `slot` reserved.
    pub fn submit_in(
        &self,
        mut slot: QueueSlot,
        request: TokenRequest,
    ) -> Result<TokenStream, EngineError> {
        let shared = &self.shared;
        // The phase may have changed while the prompt was tokenized.
        Self::check_phase(shared)?;
        // From here the queued request owns the place; the actor gives it back.
        slot.held = false;
        shared.active.fetch_add(1, Ordering::AcqRel);
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let stream = TokenStream {
            ticket,
            events: receiver,
            finished: false,
            attempts: request.previous_attempts,
            shared: shared.clone(),
        };
        let pending = actor::Pending::new(ticket, request, events);
        if shared
            .commands
            .send(actor::Command::Submit(Box::new(pending)))
            .is_err()
        {
            return Err(EngineError::ShuttingDown);
        }
        Ok(stream)
    }

    fn check_phase(shared: &Shared) -> Result<(), EngineError> {
        match shared.readiness.phase() {
            Phase::ShuttingDown => Err(EngineError::ShuttingDown),
            Phase::Failed => {
                let reason = shared
                    .readiness
                    .failure()
                    .map(|f| f.reason)
                    .unwrap_or_default();
                Err(EngineError::Unavailable(reason))
            }
            Phase::Initializing | Phase::Ready => Ok(()),
        }
    }

    /// The context limit the worker reported at `ready`, once one was ready.
    pub fn worker_max_context(&self) -> Option<usize> {
        match self.shared.max_context.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// Requests admitted and not yet finished (or not yet dropped by their caller).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }
}

/// A place in the gateway queue, taken before the prompt is tokenized so that a full queue
/// refuses a request before any work is spent on it. Dropping it gives the place back.
pub struct QueueSlot {
    shared: Arc<Shared>,
    held: bool,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        if self.held {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The events of one request. Dropping it early cancels the request.
pub struct TokenStream {
    ticket: u64,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    finished: bool,
    /// Workers this request was handed to, earlier submits included (one `Started` each).
    attempts: u32,
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
        if event == EngineEvent::Started {
            self.attempts += 1;
        }
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

    /// The request's stable identity, for a sibling's [`TokenRequest::fork_of`].
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Workers this request ran in so far, for a retry's [`TokenRequest::previous_attempts`].
    pub fn attempts(&self) -> u32 {
        self.attempts
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
