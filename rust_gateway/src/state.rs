//! The state every HTTP handler shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::chat_template::ChatMessage;
use crate::config::Config;
use crate::error::ApiError;
use crate::generation::{GenerateRequest, Generator};
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::model::SharedModel;
use crate::readiness::Readiness;
use crate::validation::{build_request, SamplingSpec};

/// The snapshot's tokenizer and limits, once loaded.
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

    /// Renders and tokenizes the prompt (off the async threads: long prompts take a while),
    /// then validates the request.
    pub async fn prepare(
        &self,
        prompt: PromptInput,
        spec: SamplingSpec,
    ) -> Result<(SharedModel, GenerateRequest), ApiError> {
        let model = self.model().await?;
        let tokenizer_model = model.clone();
        let ids = tokio::task::spawn_blocking(move || prompt.to_ids(&tokenizer_model))
            .await
            .map_err(|err| ApiError::Generation(format!("tokenizer task failed: {err}")))??;
        let request = build_request(spec, ids, &model.limits)?;
        Ok((model, request))
    }
}

/// A prompt as text, as token ids, or as a conversation for the chat template.
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Messages(Vec<ChatMessage>),
}

impl PromptInput {
    fn to_ids(&self, model: &SharedModel) -> Result<Vec<u32>, ApiError> {
        let (text, add_special_tokens) = match self {
            Self::Text(text) => (text.clone(), true),
            Self::Ids(ids) => return checked_ids(model, ids),
            Self::Messages(messages) => {
                let template = model.chat_template.as_ref().ok_or_else(|| {
                    ApiError::Validation(
                        "`messages` need a chat template; this model has none".into(),
                    )
                })?;
                let rendered = template
                    .render(messages, true)
                    .map_err(|err| ApiError::Validation(err.to_string()))?;
                (rendered, false)
            }
        };
        model
            .tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|err| ApiError::Validation(format!("cannot tokenize the prompt: {err}")))
    }
}

/// Token ids go to the worker as they are, so ids outside the vocabulary are refused here.
fn checked_ids(model: &SharedModel, ids: &[u32]) -> Result<Vec<u32>, ApiError> {
    let vocab = model.tokenizer.vocab_size();
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::Validation(format!(
            "token id {id} is outside the vocabulary (size {vocab})"
        ))),
        None => Ok(ids.to_vec()),
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
