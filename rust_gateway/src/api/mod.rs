//! HTTP surface: the routers and their layers.

mod extract;
mod jobs;
mod middleware;
mod openai;
mod openapi;
mod probes;
mod tgi;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

use extract::JsonBody;

/// A client of a non-streamed route has seen nothing yet when the worker dies, so its request
/// simply runs again (this many times at most).
const RETRIES_AFTER_WORKER_LOST: usize = 2;

/// Every route on PORT. /health, /ping and /openapi.json are open; the rest need the API key
/// when one is set.
pub fn router(app: AppState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(probes::metrics))
        .route("/", post(tgi::compat_generate))
        .route("/generate", post(tgi::generate))
        .route("/generate_stream", post(tgi::generate_stream))
        .route("/info", get(tgi::info))
        .route("/tokenize", post(tgi::tokenize))
        .route("/run", post(jobs::run))
        .route("/runsync", post(jobs::runsync))
        .route("/status/{id}", get(jobs::status).post(jobs::status))
        .route("/stream/{id}", get(jobs::stream).post(jobs::stream))
        .route("/cancel/{id}", post(jobs::cancel))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models));
    with_probes(&app, protected)
        .route("/openapi.json", get(openapi::document))
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::observe,
        ))
        .with_state(app)
}

/// `/health` and `/ping` open; `/ready` and `protected` behind the API key; 404 for the rest.
fn with_probes(app: &AppState, protected: Router<AppState>) -> Router<AppState> {
    let protected = protected.route("/ready", get(probes::ready)).route_layer(
        axum::middleware::from_fn_with_state(app.clone(), middleware::require_api_key),
    );
    Router::new()
        .route("/health", get(probes::health))
        .route("/ping", get(probes::ping))
        .merge(protected)
        .fallback(not_found)
}

/// Only the probes, for PORT_HEALTH.
pub fn probe_router(app: AppState) -> Router {
    with_probes(&app, Router::new()).with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
