//! Liveness, readiness and metrics: /health, /ping, /ready, /metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::readiness::Phase;
use crate::state::AppState;

/// Liveness: the process is up. Answered from the first millisecond.
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// RunPod's load-balancer contract: 204 initializing, 200 ready, anything else unhealthy.
pub async fn ping(State(app): State<AppState>) -> Response {
    match app.readiness.phase() {
        Phase::Ready => Json(serde_json::json!({"status": "healthy"})).into_response(),
        Phase::Initializing => StatusCode::NO_CONTENT.into_response(),
        Phase::Failed | Phase::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// The phase, each phase's time since exec, and why start-up failed. 200 only when ready.
pub async fn ready(State(app): State<AppState>) -> Response {
    let report = app.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.metrics.render(&app.readiness);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
