//! JSON body extractors whose rejections follow the gateway's error mapping:
//! 413 too large, 400 not JSON (syntax, invalid UTF-8, empty), and a wrong shape or types
//! 422 ([`JsonBody`], TGI and job routes) or 400 ([`OpenAiJson`], as OpenAI's API answers).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::{parse_json, shape_errors_are_malformed, ApiError};

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
