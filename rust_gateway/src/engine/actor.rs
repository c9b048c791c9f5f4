//! The actor that owns the gateway queue and the requests running in the worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{
    EngineConfig, EngineError, EngineEvent, FinishReason, SampledToken, Shared, TokenRequest,
    WorkerEvent, MAX_ATTEMPTS,
};
use crate::metrics::Metrics;
use crate::protocol::{GatewayMessage, OutputItem, ReadyInfo, WorkerMessage};

pub enum Command {
    Submit(Box<Pending>),
    Cancel(u64),
}

/// An admitted request: `ticket` is stable for its whole life, unlike its wire id.
pub struct Pending {
    ticket: u64,
    request: TokenRequest,
    events: mpsc::UnboundedSender<EngineEvent>,
    admitted: Instant,
    /// Workers this request was handed to, earlier submits included.
    attempts: u32,
}

impl Pending {
    pub fn new(
        ticket: u64,
        request: TokenRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> Self {
        Self {
            ticket,
            attempts: request.previous_attempts,
            request,
            events,
            admitted: Instant::now(),
        }
    }

    fn send(&self, event: EngineEvent) {
        // A closed receiver means the caller went away; its cancel is already on its way.
        let _ = self.events.send(event);
    }
}

struct Running {
    pending: Pending,
    produced: bool,
    cancelled: bool,
}

struct Worker {
    frames: mpsc::UnboundedSender<GatewayMessage>,
    info: ReadyInfo,
}

pub struct Actor {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    queue: VecDeque<Pending>,
    running: HashMap<u64, Running>,
    wire_of: HashMap<u64, u64>,
    worker: Option<Worker>,
    gave_up: Option<String>,
    next_wire_id: u64,
    max_concurrent: usize,
    ready_wait: Duration,
}

impl Actor {
    pub fn new(shared: Arc<Shared>, metrics: Arc<Metrics>, config: &EngineConfig) -> Self {
        Self {
            shared,
            metrics,
            queue: VecDeque::new(),
            running: HashMap::new(),
            wire_of: HashMap::new(),
            worker: None,
            gave_up: None,
            next_wire_id: 1,
            max_concurrent: config.max_concurrent_requests.max(1),
            ready_wait: config.ready_wait,
        }
    }

    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut worker_events: mpsc::UnboundedReceiver<WorkerEvent>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(command) = commands.recv() => self.on_command(command),
                Some(event) = worker_events.recv() => self.on_worker(event),
                _ = tick.tick() => self.expire_waiting(),
                else => break,
            }
            self.dispatch();
            self.metrics.queue_size.set(self.queue.len() as i64);
            self.metrics.running_requests.set(self.running.len() as i64);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Submit(pending) => match &self.gave_up {
                Some(reason) => {
                    pending.send(EngineEvent::Failed(EngineError::Unavailable(
                        reason.clone(),
                    )));
                    self.unqueued(1);
                }
                None => self.queue.push_back(*pending),
            },
            Command::Cancel(ticket) => self.cancel(ticket),
        }
    }

    fn cancel(&mut self, ticket: u64) {
        if let Some(at) = self.queue.iter().position(|p| p.ticket == ticket) {
            self.queue.remove(at);
            self.unqueued(1);
        } else if let Some(wire_id) = self.wire_of.get(&ticket) {
            if let Some(running) = self.running.get_mut(wire_id) {
                running.cancelled = true;
            }
            if let Some(worker) = &self.worker {
                let _ = worker.frames.send(GatewayMessage::Cancel { id: *wire_id });
            }
        }
    }

    fn on_worker(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Ready { frames, info } => {
                tracing::info!(model = %info.model, max_running = info.max_running, "worker ready");
                self.shared
                    .max_context
                    .store(info.max_context as usize, Ordering::Release);
                self.worker = Some(Worker { frames, info });
            }
            WorkerEvent::Message(WorkerMessage::Outputs { items, .. }) => {
                items.into_iter().for_each(|item| self.on_output(item));
            }
            WorkerEvent::Message(WorkerMessage::Error { id, message }) => {
                if let Some(running) = self.finish(id) {
                    running
                        .pending
                        .send(EngineEvent::Failed(EngineError::Worker(message)));
                }
            }
            WorkerEvent::Message(WorkerMessage::PromptLogprobs { id, items }) => {
                if let Some(running) = self.running.get(&id) {
                    running.pending.send(EngineEvent::PromptLogprobs(items));
                }
            }
            WorkerEvent::Message(WorkerMessage::Stats(stats)) => {
                self.metrics.batch_size.set(i64::from(stats.running));
                self.metrics.kv_used_blocks.set(stats.kv_used as i64);
                self.metrics.kv_total_blocks.set(stats.kv_total as i64);
            }
            WorkerEvent::Message(other) => tracing::debug!(?other, "ignored worker message"),
            WorkerEvent::Lost => self.on_worker_lost(),
            WorkerEvent::GaveUp(reason) => {
                let error = EngineError::Unavailable(reason.clone());
                let failed = self.queue.len();
                for pending in self.queue.drain(..) {
                    pending.send(EngineEvent::Failed(error.clone()));
                }
                self.unqueued(failed);
                self.gave_up = Some(reason);
            }
        }
    }

    fn on_output(&mut self, item: OutputItem) {
        let finish = item.finish.map(FinishReason::from);
        let event = match item.token {
            Some(id) => EngineEvent::Token(SampledToken {
                id,
                logprob: item.logprob,
                top: item.top.unwrap_or_default(),
                finish,
            }),
            None => match finish {
                Some(reason) => EngineEvent::Finished(reason),
                None => return,
            },
        };
        let done = finish.is_some();
        if let Some(running) = self.running.get_mut(&item.id) {
            running.produced |= item.token.is_some();
            running.pending.send(event);
        }
        if done {
            self.finish(item.id);
        }
    }

    fn finish(&mut self, wire_id: u64) -> Option<Running> {
        let running = self.running.remove(&wire_id)?;
        self.wire_of.remove(&running.pending.ticket);
        Some(running)
    }

    /// Requests that produced nothing go back to the front of the queue, in their old order;
    /// the others cannot be resumed and end with an error. Either way the crash cost each of
    /// them an attempt: one that has none left fails, so a request that kills the worker
    /// cannot kill it again and again.
    fn on_worker_lost(&mut self) {
        self.worker = None;
        self.wire_of.clear();
        let mut requeue: Vec<Pending> = Vec::new();
        for (_, running) in self.running.drain() {
            if running.cancelled {
                continue;
            }
            let attempts = running.pending.attempts;
            if attempts >= MAX_ATTEMPTS {
                tracing::warn!(
                    ticket = running.pending.ticket,
                    attempts,
                    "the worker crashed during each attempt of this request; failing it"
                );
                running
                    .pending
                    .send(EngineEvent::Failed(EngineError::Crashed(attempts)));
            } else if running.produced {
                running
                    .pending
                    .send(EngineEvent::Failed(EngineError::WorkerLost));
            } else {
                requeue.push(running.pending);
            }
        }
        requeue.sort_by_key(|pending| pending.ticket);
        self.shared
            .waiting
            .fetch_add(requeue.len(), Ordering::AcqRel);
        if !requeue.is_empty() {
            tracing::warn!(count = requeue.len(), "worker lost; re-queueing requests");
        }
        for pending in requeue.into_iter().rev() {
            self.queue.push_front(pending);
        }
    }

    fn dispatch(&mut self) {
        let Some(worker) = &self.worker else { return };
        let limit = self
            .max_concurrent
            .min(worker.info.max_running.max(1) as usize);
        // 0 would mean the worker did not say; nothing is refused then.
        let max_context = match worker.info.max_context {
            0 => usize::MAX,
            n => n as usize,
        };
        while self.running.len() < limit {
            let Some(mut pending) = self.queue.pop_front() else {
                break;
            };
            if pending.events.is_closed() {
                self.unqueued(1);
                continue;
            }
            // Queued before the worker said how long a context it holds: refused here rather
            // than by the worker.
            let tokens = pending.request.prompt.len();
            if tokens >= max_context {
                self.unqueued(1);
                let limit = max_context;
                pending.send(EngineEvent::Failed(EngineError::PromptTooLong {
                    tokens,
                    limit,
                }));
                continue;
            }
            let id = self.next_wire_id;
            // A sibling that is not running in this worker (finished, failed, or lost with the
            // last worker) shares nothing: the fork runs as an ordinary request.
            let fork_of = pending
                .request
                .fork_of
                .and_then(|ticket| self.wire_of.get(&ticket).copied());
            let submit = GatewayMessage::Submit {
                id,
                prompt: pending.request.prompt.clone(),
                params: pending.request.params.clone(),
                fork_of,
            };
            if worker.frames.send(submit).is_err() {
                // The connection is closing; the supervisor's `Lost` follows.
                self.queue.push_front(pending);
                break;
            }
            self.next_wire_id += 1;
            self.unqueued(1);
            pending.attempts += 1;
            pending.send(EngineEvent::Started);
            self.wire_of.insert(pending.ticket, id);
            self.running.insert(
                id,
                Running {
                    pending,
                    produced: false,
                    cancelled: false,
                },
            );
        }
    }

    /// While no worker is ready, a request may wait `ready_wait` at most.
    fn expire_waiting(&mut self) {
        if self.worker.is_some() {
            return;
        }
        let limit = self.ready_wait;
        let (expired, kept): (Vec<Pending>, Vec<Pending>) = self
            .queue
            .drain(..)
            .partition(|p| p.admitted.elapsed() >= limit);
        self.queue = kept.into();
        self.unqueued(expired.len());
        for pending in expired {
            pending.send(EngineEvent::Failed(EngineError::NotReady(limit)));
        }
    }

    fn unqueued(&self, count: usize) {
        self.shared.waiting.fetch_sub(count, Ordering::AcqRel);
    }
}
