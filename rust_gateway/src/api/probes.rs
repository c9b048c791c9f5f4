//! Liveness, readiness and metrics: /health, /ping, /ready, /metrics.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::middleware::authorized;
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

/// 200 only when ready. Anyone gets `{"ready", "phase"}` (probes carry no key); with the API
/// key, or when none is set, also each phase's time since exec and why start-up failed (the
/// worker's log lines may say more than a stranger should read).
pub async fn ready(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let report = app.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if authorized(&app, &headers) {
        (status, Json(report)).into_response()
    } else {
        let bare = serde_json::json!({"ready": report.ready, "phase": report.phase});
        (status, Json(bare)).into_response()
    }
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    let text = app.metrics.render(&app.readiness);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
