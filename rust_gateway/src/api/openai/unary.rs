//! Non-streamed OpenAI responses: the whole generation, then one JSON object.

use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::EngineError;
use crate::error::ApiError;
use crate::generation::{GenerateRequest, TextStream};
use crate::model::SharedModel;
use crate::openai::{OutputOptions, ResponseBuilder};
use crate::state::AppState;

/// The client has seen nothing yet when the worker dies, so the request simply runs again.
const MAX_RETRIES: usize = 2;

pub async fn respond(
    app: &AppState,
    model: SharedModel,
    request: GenerateRequest,
    options: OutputOptions,
) -> Result<Response, ApiError> {
    let mut retries = 0;
    loop {
        let mut builder = ResponseBuilder::new(options, &model.model_id, request.prompt_ids.len());
        let mut stream = app.generator.generate(model.clone(), request.clone())?;
        match drain(&model, &mut stream, &mut builder).await {
            Err(EngineError::WorkerLost) if retries < MAX_RETRIES => retries += 1,
            Err(error) => return Err(error.into()),
            Ok(()) => return Ok(Json(builder.response()?).into_response()),
        }
    }
}

async fn drain(
    model: &SharedModel,
    stream: &mut TextStream,
    builder: &mut ResponseBuilder,
) -> Result<(), EngineError> {
    while let Some(event) = stream.next().await {
        builder.push(event?, &model.tokenizer);
    }
    Ok(())
}
