//! `GET /v1/models`: the one model this gateway serves.

use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::openai::{unix_seconds, ModelCard, ModelList};
use crate::readiness::Readiness;
use crate::served_model::ServedModel;
use crate::state::AppState;

/// The list `/v1/models` answers; the model was "created" when the gateway started.
/// The list with `max_model_len` as the gateway enforces it (clamped to the worker's context).
pub fn model_list(model: &ServedModel, readiness: &Readiness, max_total: usize) -> ModelList {
    let uptime_s = (readiness.elapsed_ms() / 1000.0) as u64;
    ModelList {
        object: "list",
        data: vec![ModelCard {
            id: model.model_id.clone(),
            object: "model",
            created: unix_seconds().saturating_sub(uptime_s),
            owned_by: "thaw",
            max_model_len: max_total,
        }],
    }
}

pub async fn list_models(State(app): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let model = app.model().await?;
    let max_total = app.limits(&model).max_total_tokens;
    Ok(Json(model_list(&model, &app.readiness, max_total)))
}
