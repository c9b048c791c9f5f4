//! Job states and results, kept for the configured retention after they finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::TimedOut => "TIMED_OUT",
        }
    }
}

/// The body of /status, /runsync and webhooks (RunPod's field names).
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    #[serde(rename = "delayTime", skip_serializing_if = "Option::is_none")]
    pub delay_time_ms: Option<u64>,
    #[serde(rename = "executionTime", skip_serializing_if = "Option::is_none")]
    pub execution_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Job {
    status: JobStatus,
    created: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    output: Option<serde_json::Value>,
    error: Option<String>,
    /// Stream chunks not yet read by /stream.
    chunks: Vec<serde_json::Value>,
    retention: Duration,
    cancel: Arc<Notify>,
    done: watch::Sender<bool>,
}

impl Job {
    fn expired(&self, now: Instant) -> bool {
        self.finished
            .is_some_and(|at| now.duration_since(at) >= self.retention)
    }

    fn view(&self, id: &str) -> JobView {
        let ms = |d: Duration| d.as_millis() as u64;
        let end = self.finished.unwrap_or_else(Instant::now);
        JobView {
            id: id.to_string(),
            status: self.status,
            delay_time_ms: Some(ms(self.started.unwrap_or(end).duration_since(self.created))),
            execution_time_ms: self.started.map(|start| ms(end.duration_since(start))),
            output: self.output.clone(),
            error: self.error.clone(),
        }
    }
}

#[derive(Clone, Default)]
pub struct JobStore {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

impl JobStore {
    /// Registers a new job; returns the signal its runner watches for cancellation.
    pub fn insert(&self, id: &str, retention: Duration) -> Arc<Notify> {
        let cancel = Arc::new(Notify::new());
        let job = Job {
            status: JobStatus::InQueue,
            created: Instant::now(),
            started: None,
            finished: None,
            output: None,
            error: None,
            chunks: Vec::new(),
            retention,
            cancel: cancel.clone(),
            done: watch::channel(false).0,
        };
        self.lock().insert(id.to_string(), job);
        cancel
    }

    pub fn view(&self, id: &str) -> Option<JobView> {
        let jobs = self.lock();
        jobs.get(id)
            .filter(|job| !job.expired(Instant::now()))
            .map(|job| job.view(id))
    }

    pub fn set_started(&self, id: &str) {
        if let Some(job) = self.lock().get_mut(id) {
            if job.status == JobStatus::InQueue {
                job.status = JobStatus::InProgress;
                job.started.get_or_insert_with(Instant::now);
            }
        }
    }

    pub fn push_chunk(&self, id: &str, chunk: serde_json::Value) {
        if let Some(job) = self.lock().get_mut(id) {
            job.chunks.push(chunk);
        }
    }

    /// A retry starts from scratch: chunks of the lost attempt are dropped.
    pub fn reset_progress(&self, id: &str) {
        if let Some(job) = self.lock().get_mut(id) {
            job.chunks.clear();
        }
    }

    /// Records the final state unless the job already has one (a cancel wins the race).
    pub fn finish(
        &self,
        id: &str,
        status: JobStatus,
        output: Option<serde_json::Value>,
        error: Option<String>,
    ) -> Option<JobView> {
        let mut jobs = self.lock();
        let job = jobs.get_mut(id)?;
        if !job.status.is_final() {
            job.status = status;
            job.output = output;
            job.error = error;
            job.finished = Some(Instant::now());
        }
        job.done.send_replace(true);
        Some(job.view(id))
    }

    /// The chunks produced since the last call, and the job's status.
    pub fn take_chunks(&self, id: &str) -> Option<(JobStatus, Vec<serde_json::Value>)> {
        let mut jobs = self.lock();
        let job = jobs
            .get_mut(id)
            .filter(|job| !job.expired(Instant::now()))?;
        Some((job.status, std::mem::take(&mut job.chunks)))
    }

    /// Cancels an unfinished job at once and tells its runner; returns the resulting status.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let mut jobs = self.lock();
        let job = jobs
            .get_mut(id)
            .filter(|job| !job.expired(Instant::now()))?;
        if !job.status.is_final() {
            job.status = JobStatus::Cancelled;
            job.finished = Some(Instant::now());
            job.cancel.notify_one();
        }
        Some(job.status)
    }

    /// Turns true when the job finishes.
    pub fn watch_done(&self, id: &str) -> Option<watch::Receiver<bool>> {
        self.lock().get(id).map(|job| job.done.subscribe())
    }

    /// Drops finished jobs whose retention has passed.
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let mut jobs = self.lock();
        let before = jobs.len();
        jobs.retain(|_, job| !job.expired(now));
        before - jobs.len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_retention() {
        let store = JobStore::default();
        store.insert("a", Duration::ZERO);
        assert_eq!(store.view("a").unwrap().status, JobStatus::InQueue);
        store.set_started("a");
        store.push_chunk("a", serde_json::json!({"text": "x"}));
        let (status, chunks) = store.take_chunks("a").unwrap();
        assert_eq!((status, chunks.len()), (JobStatus::InProgress, 1));
        assert!(store.take_chunks("a").unwrap().1.is_empty());
        store.finish("a", JobStatus::Completed, Some(serde_json::json!({})), None);
        // Zero retention: gone as soon as it finished.
        assert!(store.view("a").is_none());
        assert_eq!(store.purge(), 1);
    }

    #[test]
    fn cancel_wins_over_a_later_finish() {
        let store = JobStore::default();
        store.insert("b", Duration::from_secs(60));
        assert_eq!(store.cancel("b"), Some(JobStatus::Cancelled));
        store.finish("b", JobStatus::Completed, None, None);
        assert_eq!(store.view("b").unwrap().status, JobStatus::Cancelled);
        assert!(store.cancel("nope").is_none());
    }

    #[test]
    fn statuses_serialize_like_runpod() {
        assert_eq!(
            serde_json::to_value(JobStatus::TimedOut).unwrap(),
            "TIMED_OUT"
        );
        assert_eq!(JobStatus::InQueue.as_str(), "IN_QUEUE");
    }
}
