//! Non-streamed OpenAI responses: the whole generation, then one JSON object.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::Prepared;
use crate::engine::EngineError;
use crate::error::ApiError;
use crate::state::AppState;

/// The client has seen nothing yet, so a choice whose worker died simply runs again; the
/// engine's attempt limit ends this (`Crashed`). Any other failure fails the response, and
/// dropping the siblings cancels the choices still running.
pub async fn respond(app: &AppState, mut prepared: Prepared) -> Result<Response, ApiError> {
    let (mut builder, mut siblings) = prepared.start(app)?;
    while let Some((index, event)) = siblings.next().await {
        match event {
            Ok(event) => {
                builder.push(index, event, &prepared.model.tokenizer);
            }
            Err(EngineError::WorkerLost) => {
                let retry = prepared.retry(app, index, siblings.attempts(index))?;
                builder.reset(index);
                siblings.replace(index, retry);
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(Json(builder.response()?).into_response())
}
