//! Runs one job to a final state. A job whose generation was cut by a worker crash is retried
//! from scratch, so an accepted job is not lost to a crash it did not cause; the attempts
//! follow it, and a job whose worker crashed in every attempt the engine allows is FAILED
//! with that reason.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::output::{JobFormat, JobOutput};
use super::store::{JobStatus, JobStore};
use super::webhook::Webhooks;
use crate::engine::EngineError;
use crate::generation::{Generator, Siblings, TextEvent};
use crate::metrics::Metrics;
use crate::served_model::SharedModel;
use crate::validation::ValidRequest;

#[derive(Clone)]
pub struct JobContext {
    pub generator: Generator,
    pub store: JobStore,
    pub metrics: Arc<Metrics>,
    pub webhooks: Webhooks,
}

pub struct JobSpec {
    pub id: String,
    pub model: SharedModel,
    pub request: ValidRequest,
    pub format: JobFormat,
    /// Siblings generated (an OpenAI job's `n` or `best_of`).
    pub candidates: usize,
    pub execution_timeout: Option<Duration>,
    pub ttl: Option<Duration>,
    pub webhook: Option<reqwest::Url>,
}

/// How one attempt ended.
enum Attempt {
    Completed(serde_json::Value),
    /// The worker was lost; the attempts spent so far.
    Retry(u32),
    Failed(String),
    Cancelled,
    TimedOut,
}

/// While the queue is full, a retry waits this long before it asks again.
const RETRY_ADMISSION_EVERY: Duration = Duration::from_millis(200);

pub async fn run_job(context: JobContext, spec: JobSpec, first: Siblings, cancel: Arc<Notify>) {
    let created = Instant::now();
    let mut deadlines = Deadlines {
        ttl: spec.ttl.map(|ttl| created + ttl),
        execution: None,
    };
    let mut stream = Some(first);
    let mut attempts = 0;
    let outcome = loop {
        let mut current = match stream.take() {
            Some(current) => current,
            None => {
                match context.generator.retry_siblings(
                    spec.model.clone(),
                    &spec.request,
                    spec.candidates,
                    attempts,
                ) {
                    Ok(current) => current,
                    Err(EngineError::QueueFull(_)) => {
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY_ADMISSION_EVERY) => continue,
                            _ = cancel.notified() => break Attempt::Cancelled,
                            _ = deadlines.next() => break Attempt::TimedOut,
                        }
                    }
                    Err(error) => break Attempt::Failed(error.to_string()),
                }
            }
        };
        match attempt(&context, &spec, &mut current, &cancel, &mut deadlines).await {
            Attempt::Retry(spent) => {
                tracing::warn!(job = %spec.id, attempts = spent, "worker lost mid-generation; retrying the job");
                attempts = spent;
                context.store.reset_progress(&spec.id);
            }
            other => break other,
        }
    };
    let (status, output, error) = match outcome {
        Attempt::Completed(output) => (JobStatus::Completed, Some(output), None),
        Attempt::Failed(message) => (JobStatus::Failed, None, Some(message)),
        Attempt::Cancelled => (JobStatus::Cancelled, None, None),
        Attempt::TimedOut => (
            JobStatus::TimedOut,
            None,
            Some("the job ran past its time limit".into()),
        ),
        Attempt::Retry(_) => (JobStatus::Failed, None, Some("retry loop ended".into())),
    };
    let Some(view) = context.store.finish(&spec.id, status, output, error) else {
        return;
    };
    context
        .metrics
        .jobs
        .with_label_values(&[view.status.as_str()])
        .inc();
    if let Some(url) = spec.webhook {
        context.webhooks.deliver(url, view).await;
    }
}

async fn attempt(
    context: &JobContext,
    spec: &JobSpec,
    stream: &mut Siblings,
    cancel: &Notify,
    deadlines: &mut Deadlines,
) -> Attempt {
    let mut output = JobOutput::new(spec.format, &spec.model, &spec.request.prompt_ids);
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = cancel.notified() => return Attempt::Cancelled,
            _ = deadlines.next() => return Attempt::TimedOut,
        };
        // A sibling's lost worker retries them all: the job's output restarts from scratch.
        let (index, event) = match event {
            None => return Attempt::Failed("generation ended without finishing".into()),
            Some((_, Err(EngineError::WorkerLost))) => {
                return Attempt::Retry(stream.max_attempts())
            }
            Some((_, Err(error))) => return Attempt::Failed(error.to_string()),
            Some((index, Ok(event))) => (index, event),
        };
        if event == TextEvent::Started {
            context.store.set_started(&spec.id);
            if let (None, Some(limit)) = (deadlines.execution, spec.execution_timeout) {
                deadlines.execution = Some(Instant::now() + limit);
            }
        }
        for chunk in output.push(index, event, &spec.model) {
            context.store.push_chunk(&spec.id, chunk);
        }
        if output.is_finished() {
            return match output.finish() {
                Some(value) => Attempt::Completed(value),
                None => Attempt::Failed("the response could not be built".into()),
            };
        }
    }
}

struct Deadlines {
    ttl: Option<Instant>,
    execution: Option<Instant>,
}

impl Deadlines {
    /// Resolves when the earliest deadline passes; never when there is none.
    async fn next(&self) {
        match self.ttl.into_iter().chain(self.execution).min() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}
