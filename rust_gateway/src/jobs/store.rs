//! Job states and results, kept for the configured retention after they finish. The number of
//! jobs held is capped (THAW_MAX_JOBS), and a finished job keeps its unread stream as positions
//! in its output rather than a second copy of every chunk.

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
    unread: Unread,
    /// The runner has recorded the final state (a cancel alone does not settle a job).
    settled: bool,
    retention: Duration,
    cancel: Arc<Notify>,
    done: watch::Sender<bool>,
}

impl Job {
    fn expired(&self, now: Instant) -> bool {
        self.finished
            .is_some_and(|at| now.duration_since(at) >= self.retention)
    }

    /// Expired, and its runner is done with it (it may still have a webhook to deliver).
    fn purgeable(&self, now: Instant) -> bool {
        self.settled && self.expired(now)
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

/// The stream chunks /stream has not handed out yet.
enum Unread {
    Chunks(Vec<serde_json::Value>),
    /// The last `n` items of the output array (a streamed OpenAI job's output is its chunks).
    OutputTail(usize),
    /// `{"text"}` chunks whose texts, of these byte lengths, end the output's `text`.
    TextTail(Vec<usize>),
}

impl Unread {
    /// After the final output is known: the same chunks, as positions in the output where it
    /// holds them all.
    fn compact(chunks: Vec<serde_json::Value>, output: Option<&serde_json::Value>) -> Self {
        if chunks.is_empty() {
            return Self::Chunks(chunks);
        }
        match output {
            Some(serde_json::Value::Array(all)) if all.ends_with(&chunks) => {
                Self::OutputTail(chunks.len())
            }
            Some(serde_json::Value::Object(object)) => {
                let text = object.get("text").and_then(|t| t.as_str());
                match (text, text_deltas(&chunks)) {
                    (Some(text), Some(deltas)) if text.ends_with(&deltas.concat()) => {
                        Self::TextTail(deltas.iter().map(|d| d.len()).collect())
                    }
                    _ => Self::Chunks(chunks),
                }
            }
            _ => Self::Chunks(chunks),
        }
    }

    fn take(&mut self, output: Option<&serde_json::Value>) -> Vec<serde_json::Value> {
        match std::mem::replace(self, Self::Chunks(Vec::new())) {
            Self::Chunks(chunks) => chunks,
            Self::OutputTail(n) => match output {
                Some(serde_json::Value::Array(all)) => all[all.len().saturating_sub(n)..].to_vec(),
                _ => Vec::new(),
            },
            Self::TextTail(lengths) => {
                let text = output
                    .and_then(|o| o.get("text"))
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                let mut at = text.len().saturating_sub(lengths.iter().sum());
                let mut chunks = Vec::with_capacity(lengths.len());
                for length in lengths {
                    if let Some(delta) = text.get(at..at + length) {
                        chunks.push(serde_json::json!({"text": delta}));
                    }
                    at += length;
                }
                chunks
            }
        }
    }
}

/// The texts of chunks that are all exactly `{"text": "..."}`.
fn text_deltas(chunks: &[serde_json::Value]) -> Option<Vec<&str>> {
    chunks
        .iter()
        .map(|chunk| match chunk.as_object() {
            Some(object) if object.len() == 1 => object.get("text")?.as_str(),
            _ => None,
        })
        .collect()
}

/// Jobs held at once when the store is built without a cap (THAW_MAX_JOBS's default).
pub const DEFAULT_MAX_JOBS: usize = 10_000;

/// The store holds THAW_MAX_JOBS jobs (running or kept for retention); a new one must wait.
#[derive(Debug, thiserror::Error)]
#[error("too many jobs are held ({max}, THAW_MAX_JOBS); retry later")]
pub struct StoreFull {
    pub max: usize,
    /// When the first finished job's retention ends (a slot frees up then, if not before).
    pub retry_after: Duration,
}

#[derive(Clone)]
pub struct JobStore {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    max_jobs: usize,
}

impl Default for JobStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_JOBS)
    }
}

impl JobStore {
    pub fn with_capacity(max_jobs: usize) -> Self {
        Self {
            jobs: Arc::default(),
            max_jobs,
        }
    }

    /// Registers a new job; returns the signal its runner watches for cancellation.
    pub fn insert(&self, id: &str, retention: Duration) -> Result<Arc<Notify>, StoreFull> {
        let now = Instant::now();
        let mut jobs = self.lock();
        if jobs.len() >= self.max_jobs {
            jobs.retain(|_, job| !job.purgeable(now));
        }
        if jobs.len() >= self.max_jobs {
            let retry_after = jobs
                .values()
                .filter(|job| job.settled)
                .filter_map(|job| job.finished?.checked_add(job.retention))
                .map(|frees| frees.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            return Err(StoreFull {
                max: self.max_jobs,
                retry_after,
            });
        }
        let cancel = Arc::new(Notify::new());
        let job = Job {
            status: JobStatus::InQueue,
            created: now,
            started: None,
            finished: None,
            output: None,
            error: None,
            unread: Unread::Chunks(Vec::new()),
            settled: false,
            retention,
            cancel: cancel.clone(),
            done: watch::channel(false).0,
        };
        jobs.insert(id.to_string(), job);
        Ok(cancel)
    }

    /// Forgets a job that was registered but never started (its request was refused).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
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
            if let Unread::Chunks(chunks) = &mut job.unread {
                chunks.push(chunk);
            }
        }
    }

    /// A retry starts from scratch: chunks of the lost attempt are dropped.
    pub fn reset_progress(&self, id: &str) {
        if let Some(job) = self.lock().get_mut(id) {
            job.unread = Unread::Chunks(Vec::new());
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
        job.settled = true;
        if let Unread::Chunks(chunks) = &mut job.unread {
            let chunks = std::mem::take(chunks);
            job.unread = Unread::compact(chunks, job.output.as_ref());
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
        let chunks = job.unread.take(job.output.as_ref());
        Some((job.status, chunks))
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
        jobs.retain(|_, job| !job.purgeable(now));
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
        store.insert("a", Duration::ZERO).unwrap();
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
        store.insert("b", Duration::from_secs(60)).unwrap();
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

    #[test]
    fn a_full_store_refuses_until_a_slot_frees() {
        let store = JobStore::with_capacity(2);
        store.insert("a", Duration::from_secs(600)).unwrap();
        store.insert("b", Duration::ZERO).unwrap();
        let full = store.insert("c", Duration::ZERO).unwrap_err();
        assert_eq!(full.max, 2);
        // Nothing finished yet: no slot frees at a known time.
        assert_eq!(full.retry_after, Duration::from_secs(1));
        store.finish("a", JobStatus::Completed, None, None);
        let full = store.insert("c", Duration::ZERO).unwrap_err();
        assert!(full.retry_after > Duration::from_secs(590), "{full:?}");
        // "b" expires at once when it finishes, and a full store purges before refusing.
        store.finish("b", JobStatus::Completed, None, None);
        store.insert("c", Duration::ZERO).unwrap();
        assert_eq!(store.len(), 2);
        store.remove("c");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_cancelled_job_stays_until_its_runner_settles_it() {
        let store = JobStore::with_capacity(1);
        store.insert("a", Duration::ZERO).unwrap();
        store.cancel("a");
        assert_eq!(store.purge(), 0);
        assert!(store.insert("b", Duration::ZERO).is_err());
        assert!(store
            .finish("a", JobStatus::Cancelled, None, None)
            .is_some());
        assert_eq!(store.purge(), 1);
    }

    #[test]
    fn finished_text_jobs_keep_unread_chunks_as_positions_in_the_output() {
        let store = JobStore::default();
        store.insert("t", Duration::from_secs(60)).unwrap();
        for delta in ["Grü", "ße", " 🙂", "!"] {
            store.push_chunk("t", serde_json::json!({ "text": delta }));
        }
        assert_eq!(store.take_chunks("t").unwrap().1.len(), 4);
        for delta in ["a", "é", "b"] {
            store.push_chunk("t", serde_json::json!({ "text": delta }));
        }
        let output = serde_json::json!({"text": "Grüße 🙂!aéb", "finish_reason": "length"});
        store.finish("t", JobStatus::Completed, Some(output), None);
        {
            let jobs = store.lock();
            assert!(
                matches!(&jobs["t"].unread, Unread::TextTail(lengths) if lengths == &[1, 2, 1])
            );
        }
        let (status, chunks) = store.take_chunks("t").unwrap();
        assert_eq!(status, JobStatus::Completed);
        let texts: Vec<_> = chunks.iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["a", "é", "b"]);
        assert!(store.take_chunks("t").unwrap().1.is_empty());
        assert_eq!(
            store.view("t").unwrap().output.unwrap()["text"],
            "Grüße 🙂!aéb"
        );
    }

    #[test]
    fn finished_streamed_openai_jobs_hand_out_the_tail_of_their_output() {
        let store = JobStore::default();
        store.insert("o", Duration::from_secs(60)).unwrap();
        let all: Vec<_> = (0..5).map(|i| serde_json::json!({"i": i})).collect();
        for chunk in &all[..2] {
            store.push_chunk("o", chunk.clone());
        }
        store.take_chunks("o");
        for chunk in &all[2..] {
            store.push_chunk("o", chunk.clone());
        }
        store.finish("o", JobStatus::Completed, Some(all.clone().into()), None);
        assert!(matches!(store.lock()["o"].unread, Unread::OutputTail(3)));
        assert_eq!(store.take_chunks("o").unwrap().1, all[2..].to_vec());
        assert!(store.take_chunks("o").unwrap().1.is_empty());
    }

    #[test]
    fn chunks_the_output_does_not_hold_are_kept() {
        let store = JobStore::default();
        store.insert("f", Duration::from_secs(60)).unwrap();
        store.push_chunk("f", serde_json::json!({"text": "partial"}));
        store.finish("f", JobStatus::Failed, None, Some("boom".into()));
        assert!(matches!(&store.lock()["f"].unread, Unread::Chunks(c) if c.len() == 1));
        store.insert("g", Duration::from_secs(60)).unwrap();
        store.push_chunk("g", serde_json::json!({"text": "x", "extra": 1}));
        let output = serde_json::json!({"text": "x"});
        store.finish("g", JobStatus::Completed, Some(output), None);
        assert!(matches!(&store.lock()["g"].unread, Unread::Chunks(c) if c.len() == 1));
        assert_eq!(store.take_chunks("g").unwrap().1.len(), 1);
    }
}
