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
pub use middleware::{auth_mode, AuthMode};

/// Every route on PORT. /health, /ping, /ready (its bare status) and /openapi.json are open;
/// the rest need the API key when one is set.
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
        .route("/v1/models", get(openai::list_models))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::require_api_key,
        ));
    with_probes(protected)
        .route("/openapi.json", get(openapi::document))
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::observe,
        ))
        .with_state(app)
}

/// `/health`, `/ping` and `/ready` open (`/ready` gives its details only with the key), then
/// `routes`; 404 for the rest.
fn with_probes(routes: Router<AppState>) -> Router<AppState> {
    Router::new()
        .route("/health", get(probes::health))
        .route("/ping", get(probes::ping))
        .route("/ready", get(probes::ready))
        .merge(routes)
        .fallback(not_found)
}

/// Only the probes, for PORT_HEALTH.
pub fn probe_router(app: AppState) -> Router {
    with_probes(Router::new()).with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}
