//! A JSON body extractor whose rejections follow the gateway's error mapping:
//! 413 too large, 400 not JSON (syntax, invalid UTF-8, empty), 422 wrong shape or types.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge
                } else {
                    ApiError::Malformed(rejection.body_text())
                }
            })?;
        parse_json(&bytes).map(JsonBody)
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
}
