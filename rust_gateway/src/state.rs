//! The state every HTTP handler shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::error::ApiError;
use crate::generation::Generator;
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::served_model::SharedModel;
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
    pub activity: Arc<Activity>,
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

    /// Validates the request (off the async threads: long prompts take a while to tokenize).
    pub async fn prepare(
        &self,
        prompt: PromptInput,
        spec: SamplingSpec,
    ) -> Result<(SharedModel, ValidRequest), ApiError> {
        let model = self.model().await?;
        let validating = model.clone();
        let request = tokio::task::spawn_blocking(move || validate(&validating, prompt, spec))
            .await
            .map_err(|err| ApiError::Generation(format!("tokenizer task failed: {err}")))??;
        Ok((model, request))
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
