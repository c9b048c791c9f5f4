//! Layers around the routes: request metrics and shutdown refusal, and the API key check.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::readiness::Phase;
use crate::state::AppState;

const PROBES: [&str; 3] = ["/health", "/ping", "/ready"];
/// Polled by machines, not users: they do not keep an idle gateway alive.
const NOT_ACTIVITY: [&str; 4] = ["/health", "/ping", "/ready", "/metrics"];

/// Counts every request by route and status; during shutdown, refuses all but the probes.
pub async fn observe(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let is_probe = PROBES.contains(&route.as_str());
    let started = Instant::now();
    let response = if !is_probe && app.readiness.phase() == Phase::ShuttingDown {
        ApiError::Unavailable("the server is shutting down".into()).into_response()
    } else {
        if !NOT_ACTIVITY.contains(&route.as_str()) {
            app.activity.touch();
        }
        next.run(request).await
    };
    let status = response.status();
    app.metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    app.metrics
        .request_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// With THAW_API_KEY set: `Authorization: Bearer <key>`, compared in constant time.
pub async fn require_api_key(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &app.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}
