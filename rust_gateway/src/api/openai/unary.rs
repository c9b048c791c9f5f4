//! Non-streamed OpenAI responses: the whole generation, then one JSON object.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::Prepared;
use crate::engine::EngineError;
use crate::error::ApiError;
use crate::generation::TextStream;
use crate::openai::ResponseBuilder;
use crate::served_model::SharedModel;
use crate::state::AppState;

/// The client has seen nothing yet, so a request whose worker died simply runs again; the
/// engine's attempt limit ends this (`Crashed`).
pub async fn respond(app: &AppState, mut prepared: Prepared) -> Result<Response, ApiError> {
    let (mut builder, mut stream) = prepared.start(app)?;
    loop {
        match drain(&prepared.model, &mut stream, &mut builder).await {
            Err(EngineError::WorkerLost) => {
                (builder, stream) = prepared.retry(app, stream.attempts())?
            }
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
