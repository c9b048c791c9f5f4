//! JSON body extractors whose rejections follow the gateway's error mapping:
//! 413 too large, 400 not JSON (syntax, invalid UTF-8, empty), and a wrong shape or types
//! 422 ([`JsonBody`], TGI and job routes) or 400 ([`OpenAiJson`], as OpenAI's API answers).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;

pub struct JsonBody<T>(pub T);

/// A body the OpenAI routes take: OpenAI answers a body of the wrong shape with 400, and its
/// clients raise `BadRequestError` for it.
pub struct OpenAiJson<T>(pub T);

async fn body_bytes<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge
            } else {
                ApiError::Malformed(rejection.body_text())
            }
        })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        parse_json(&body_bytes(request, state).await?).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        parse_json(&body_bytes(request, state).await?)
            .map_err(shape_errors_are_malformed)
            .map(OpenAiJson)
    }
}

/// Turns the 422 of a wrong shape into OpenAI's 400.
pub fn shape_errors_are_malformed(error: ApiError) -> ApiError {
    match error {
        ApiError::Validation(message) => ApiError::Malformed(message),
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;

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
