//! The one mapping from errors to HTTP status codes: JSON `{"error", "error_type"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Malformed(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than the limit (THAW_MAX_BODY_BYTES)")]
    BodyTooLarge,
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Generation(String),
}

/// Seconds a client told 429 should wait before it retries.
const RETRY_AFTER_S: &str = "1";

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Generation(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::BodyTooLarge => "payload_too_large",
            Self::Validation(_) => "validation",
            Self::Overloaded(_) => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::Generation(_) => "generation",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.to_string(), "error_type": self.error_type()})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, Self::Overloaded(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::QueueFull(_) => Self::Overloaded(message),
            EngineError::NotReady(_)
            | EngineError::StartupFailed(_)
            | EngineError::ShuttingDown => Self::Unavailable(message),
            EngineError::WorkerLost | EngineError::Worker(_) => Self::Generation(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn engine_errors_map_to_honest_codes() {
        let code = |e: EngineError| ApiError::from(e).status().as_u16();
        assert_eq!(code(EngineError::QueueFull(3)), 429);
        assert_eq!(code(EngineError::NotReady(Duration::from_secs(1))), 503);
        assert_eq!(code(EngineError::StartupFailed("x".into())), 503);
        assert_eq!(code(EngineError::ShuttingDown), 503);
        assert_eq!(code(EngineError::WorkerLost), 500);
    }

    #[test]
    fn overloaded_has_retry_after() {
        let response = ApiError::Overloaded("full".into()).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
