//! Non-streamed OpenAI responses: the whole generation, then one JSON object.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::Prepared;
use crate::api::RETRIES_AFTER_WORKER_LOST;
use crate::engine::EngineError;
use crate::error::ApiError;
use crate::generation::TextStream;
use crate::openai::ResponseBuilder;
use crate::served_model::SharedModel;
use crate::state::AppState;

pub async fn respond(app: &AppState, prepared: Prepared) -> Result<Response, ApiError> {
    let mut retries = 0;
    loop {
        let (mut builder, mut stream) = prepared.start(app)?;
        match drain(&prepared.model, &mut stream, &mut builder).await {
            Err(EngineError::WorkerLost) if retries < RETRIES_AFTER_WORKER_LOST => retries += 1,
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
