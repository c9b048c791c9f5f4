//! The state every HTTP handler shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use crate::config::Config;
use crate::engine::QueueSlot;
use crate::error::ApiError;
use crate::generation::Generator;
use crate::jobs::{JobStore, Webhooks};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::served_model::{Limits, SharedModel};
use crate::validation::{validate, PromptInput, SamplingSpec, ValidRequest};

/// The served model's tokenizer, chat template and limits, once loaded.
#[derive(Clone)]
pub enum ModelSlot {
    Loading,
    Loaded(SharedModel),
    Failed(String),
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub generator: Generator,
    pub model: watch::Receiver<ModelSlot>,
    pub jobs: JobStore,
    /// Where job webhooks may go, and the deliveries the shutdown waits for.
    pub webhooks: Webhooks,
    pub activity: Arc<Activity>,
    /// Tokenization and template rendering run on blocking threads, this many at once.
    pub tokenizing: Arc<Semaphore>,
}

/// Permits for [`AppState::tokenizing`]: one per core.
pub fn tokenizer_permits() -> Arc<Semaphore> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Arc::new(Semaphore::new(cores))
}

/// A validated request that holds its place in the queue.
pub struct Admitted {
    pub model: SharedModel,
    pub request: ValidRequest,
    pub slot: QueueSlot,
}

impl AppState {
    /// The loaded model, waiting for it (up to THAW_READY_WAIT_S) while it loads.
    pub async fn model(&self) -> Result<SharedModel, ApiError> {
        let mut watch = self.model.clone();
        let loaded = async move {
            watch
                .wait_for(|slot| !matches!(slot, ModelSlot::Loading))
                .await
                .map(|slot| slot.clone())
        };
        match tokio::time::timeout(self.config.ready_wait(), loaded).await {
            Ok(Ok(ModelSlot::Loaded(model))) => Ok(model),
            Ok(Ok(ModelSlot::Failed(reason))) => {
                Err(ApiError::Unavailable(format!("start-up failed: {reason}")))
            }
            _ => Err(ApiError::Unavailable(
                "the tokenizer is still loading".into(),
            )),
        }
    }

    /// Takes a place in the queue (429 when full), then validates the request: a full queue
    /// refuses a request before its prompt is tokenized.
    pub async fn admit(
        &self,
        prompt: PromptInput,
        spec: SamplingSpec,
    ) -> Result<Admitted, ApiError> {
        let slot = self.generator.engine().reserve()?;
        let model = self.model().await?;
        let validating = model.clone();
        let limits = self.limits(&model);
        let request = self
            .off_thread(move || validate(&validating, &limits, prompt, spec))
            .await??;
        Ok(Admitted {
            model,
            request,
            slot,
        })
    }

    /// The model's limits, clamped to the context the worker reported it can hold.
    pub fn limits(&self, model: &SharedModel) -> Limits {
        model
            .limits
            .clamped(self.generator.engine().worker_max_context())
    }

    /// Runs tokenizer work (long prompts, chat templates) on a blocking thread, at most
    /// [`AppState::tokenizing`] at once.
    pub async fn off_thread<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self
            .tokenizing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        // The permit moves into the task: a client that goes away does not free it early.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|err| ApiError::Generation(format!("tokenizer task failed: {err}")))
    }
}

/// When the last API request arrived, for THAW_IDLE_TIMEOUT.
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}
