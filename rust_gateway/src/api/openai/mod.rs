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
use crate::error::ApiError;
use crate::generation::TextStream;
use crate::openai::{
    ChatRequest, CompletionRequest, OpenAiRequest, OutputOptions, ResponseBuilder,
};
use crate::served_model::SharedModel;
use crate::state::AppState;
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

/// A validated request and how to answer it.
struct Prepared {
    model: SharedModel,
    request: ValidRequest,
    options: OutputOptions,
}

impl Prepared {
    /// Starts one generation, with a fresh builder for its response.
    fn start(&self, app: &AppState) -> Result<(ResponseBuilder, TextStream), ApiError> {
        let builder = ResponseBuilder::new(
            self.options,
            &self.model.model_id,
            self.request.prompt_ids.len(),
        );
        let stream = app
            .generator
            .generate(self.model.clone(), self.request.clone())?;
        Ok((builder, stream))
    }
}

async fn respond(app: &AppState, request: OpenAiRequest) -> Result<Response, ApiError> {
    let options = request.options;
    let (model, request) = app.prepare(request.prompt, request.spec).await?;
    let prepared = Prepared {
        model,
        request,
        options,
    };
    if options.stream {
        stream::respond(app, prepared).await
    } else {
        unary::respond(app, prepared).await
    }
}
