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
use crate::generation::TextStream;
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
    respond(&app, body.into_request()?).await
}

pub async fn completions(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    respond(&app, body.into_request()?).await
}

/// A validated request, its place in the queue until it starts, and how to answer it.
struct Prepared {
    model: SharedModel,
    request: ValidRequest,
    options: OutputOptions,
    slot: Option<QueueSlot>,
}

impl Prepared {
    /// Starts the generation in the queue place taken at admission.
    fn start(&mut self, app: &AppState) -> Result<(ResponseBuilder, TextStream), ApiError> {
        let generator = &app.generator;
        let (model, request) = (self.model.clone(), self.request.clone());
        let stream = match self.slot.take() {
            Some(slot) => generator.generate_in(slot, model, request)?,
            None => generator.generate(model, request)?,
        };
        Ok((self.builder(), stream))
    }

    /// Runs the request again after its worker was lost, with a fresh builder.
    fn retry(
        &self,
        app: &AppState,
        previous_attempts: u32,
    ) -> Result<(ResponseBuilder, TextStream), ApiError> {
        let stream =
            app.generator
                .retry(self.model.clone(), self.request.clone(), previous_attempts)?;
        Ok((self.builder(), stream))
    }

    fn builder(&self) -> ResponseBuilder {
        ResponseBuilder::new(
            self.options,
            &self.model.model_id,
            self.request.prompt_ids.len(),
        )
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
