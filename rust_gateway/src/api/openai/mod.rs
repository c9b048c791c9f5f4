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
use crate::openai::{ChatRequest, CompletionRequest, OpenAiRequest};
use crate::state::AppState;

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

async fn respond(app: &AppState, request: OpenAiRequest) -> Result<Response, ApiError> {
    let options = request.options;
    let (model, generate) = app.prepare(request.prompt, request.spec).await?;
    if options.stream {
        stream::respond(app, model, generate, options).await
    } else {
        unary::respond(app, model, generate, options).await
    }
}
