//! OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! Any `model` value is accepted (the gateway serves one model); responses name the
//! snapshot's model. Streams are server-sent events ending with `data: [DONE]`.

mod models;
mod stream;
mod unary;

use axum::extract::State;
use axum::response::Response;

use super::extract::OpenAiJson;
use crate::engine::QueueSlot;
use crate::error::ApiError;
use crate::generation::{sibling, Siblings, TextStream};
use crate::openai::{
    ChatRequest, CompletionRequest, OpenAiRequest, OutputOptions, ResponseBuilder,
};
use crate::served_model::SharedModel;
use crate::state::{Admitted, AppState};
use crate::validation::ValidRequest;

pub use models::{list_models, model_list};

pub async fn chat_completions(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    // Off the async threads: schemas and tools are compiled into grammars here.
    let request = app.off_thread(move || body.into_request()).await??;
    respond(&app, request).await
}

pub async fn completions(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let request = app.off_thread(move || body.into_request()).await??;
    respond(&app, request).await
}

/// A validated request, its place in the queue until it starts, and how to answer it.
struct Prepared {
    model: SharedModel,
    request: ValidRequest,
    options: OutputOptions,
    slot: Option<QueueSlot>,
}

impl Prepared {
    /// Starts the generation, one sibling per choice (`n`, `best_of`), the first in the queue
    /// place taken at admission.
    fn start(&mut self, app: &AppState) -> Result<(ResponseBuilder, Siblings), ApiError> {
        let generator = &app.generator;
        let slot = match self.slot.take() {
            Some(slot) => slot,
            None => generator.engine().reserve()?,
        };
        let count = self.options.candidates();
        let siblings =
            generator.generate_siblings(slot, self.model.clone(), &self.request, count)?;
        Ok((self.builder(), siblings))
    }

    /// Runs choice `index` again after its worker was lost.
    fn retry(
        &self,
        app: &AppState,
        index: usize,
        previous_attempts: u32,
    ) -> Result<TextStream, ApiError> {
        let request = sibling(&self.request, index);
        Ok(app
            .generator
            .retry(self.model.clone(), request, previous_attempts)?)
    }

    fn builder(&self) -> ResponseBuilder {
        ResponseBuilder::new(self.options, &self.model.model_id, &self.request.prompt_ids)
            .with_tool_format(self.model.tools.format)
    }
}

async fn respond(app: &AppState, request: OpenAiRequest) -> Result<Response, ApiError> {
    let options = request.options;
    let Admitted {
        model,
        request,
        slot,
    } = app.admit(request.prompt, request.spec).await?;
    let prepared = Prepared {
        model,
        request,
        options,
        slot: Some(slot),
    };
    if options.stream {
        stream::respond(app, prepared).await
    } else {
        unary::respond(app, prepared).await
    }
}
