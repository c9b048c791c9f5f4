//! The one mapping from errors to HTTP status codes: JSON `{"error", "error_type"}`.
//! Request bodies that fail to parse map here too: 400 when they are not JSON, 422 when
//! they have the wrong shape or types (400 on the OpenAI routes, as OpenAI answers).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

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
    UnsupportedMediaType(String),
    #[error("the request body did not arrive within THAW_BODY_READ_TIMEOUT_S")]
    BodyTimeout,
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
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
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
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BodyTimeout => "request_timeout",
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
        match self {
            Self::Overloaded(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
            }
            // The rest of the body may still be on its way: the connection cannot be reused.
            Self::BodyTimeout => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            EngineError::QueueFull(_) => Self::Overloaded(message),
            EngineError::NotReady(_) | EngineError::Unavailable(_) | EngineError::ShuttingDown => {
                Self::Unavailable(message)
            }
            EngineError::PromptTooLong { .. } => Self::Validation(message),
            EngineError::WorkerLost | EngineError::Crashed(_) | EngineError::Worker(_) => {
                Self::Generation(message)
            }
        }
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|err| match err.classify() {
        Category::Data => ApiError::Validation(format!("invalid request: {err}")),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::Malformed(format!("the body is not valid JSON: {err}"))
        }
    })
}

/// The same checks for a JSON value that is already parsed (a job's `openai_input`).
pub fn parse_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value)
        .map_err(|err| ApiError::Validation(format!("invalid request: {err}")))
}

/// Turns the 422 of a wrong shape into OpenAI's 400.
pub fn shape_errors_are_malformed(error: ApiError) -> ApiError {
    match error {
        ApiError::Validation(message) => ApiError::Malformed(message),
        other => other,
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
        assert_eq!(code(EngineError::Unavailable("x".into())), 503);
        assert_eq!(code(EngineError::ShuttingDown), 503);
        assert_eq!(code(EngineError::WorkerLost), 500);
        assert_eq!(code(EngineError::Crashed(2)), 500);
        let too_long = EngineError::PromptTooLong {
            tokens: 9,
            limit: 8,
        };
        assert_eq!(code(too_long), 422);
    }

    #[test]
    fn a_body_timeout_closes_the_connection() {
        let response = ApiError::BodyTimeout.into_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn overloaded_has_retry_after() {
        let response = ApiError::Overloaded("full".into()).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        n: u32,
    }

    #[test]
    fn syntax_errors_are_400_and_type_errors_422() {
        let status = |bytes: &[u8]| parse_json::<Body>(bytes).unwrap_err().status().as_u16();
        assert_eq!(status(b"{\"n\": "), 400);
        assert_eq!(status(b""), 400);
        assert_eq!(status(b"{\"n\": \"\xff\"}"), 400);
        assert_eq!(status(b"{\"n\": \"seven\"}"), 422);
        assert_eq!(status(b"{}"), 422);
        assert!(parse_json::<Body>(b"{\"n\": 7}").is_ok());
    }

    #[test]
    fn openai_routes_answer_wrong_shapes_with_400() {
        let error = parse_json::<Body>(b"{\"n\": \"seven\"}").unwrap_err();
        assert_eq!(shape_errors_are_malformed(error).status().as_u16(), 400);
        let too_large = shape_errors_are_malformed(ApiError::BodyTooLarge);
        assert_eq!(too_large.status().as_u16(), 413);
    }
}
