//! JSON body extractors whose rejections follow the gateway's error mapping:
//! 415 a Content-Type other than JSON, 408 a body slower than THAW_BODY_READ_TIMEOUT_S,
//! 413 too large, 400 not JSON (syntax, invalid UTF-8, empty), and a wrong shape or types
//! 422 ([`JsonBody`], TGI and job routes) or 400 ([`OpenAiJson`], as OpenAI's API answers).
//!
//! A request without a Content-Type is read as JSON: clients that omit it (curl with
//! `--data-binary` and no header, minimal HTTP libraries) have only ever meant JSON here.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::{parse_json, shape_errors_are_malformed, ApiError};
use crate::state::AppState;

pub struct JsonBody<T>(pub T);

/// A body the OpenAI routes take: OpenAI answers a body of the wrong shape with 400, and its
/// clients raise `BadRequestError` for it.
pub struct OpenAiJson<T>(pub T);

/// `application/json` or a `+json` type (parameters such as `charset` aside), or none at all.
fn is_json_or_absent(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", subtype)) => subtype == "json" || subtype.ends_with("+json"),
        _ => false,
    }
}

async fn body_bytes(request: Request, app: &AppState) -> Result<Bytes, ApiError> {
    if !is_json_or_absent(request.headers()) {
        let given = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ApiError::UnsupportedMediaType(format!(
            "the body must be JSON (Content-Type: application/json), not {given:?}"
        )));
    }
    let reading = Bytes::from_request(request, app);
    let read = match app.config.body_read_timeout() {
        Some(limit) => tokio::time::timeout(limit, reading)
            .await
            .map_err(|_| ApiError::BodyTimeout)?,
        None => reading.await,
    };
    read.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge
        } else {
            ApiError::Malformed(rejection.body_text())
        }
    })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &AppState) -> Result<Self, Self::Rejection> {
        parse_json(&body_bytes(request, app).await?).map(JsonBody)
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &AppState) -> Result<Self, Self::Rejection> {
        parse_json(&body_bytes(request, app).await?)
            .map_err(shape_errors_are_malformed)
            .map(OpenAiJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(content_type: Option<&'static str>) -> bool {
        let mut headers = HeaderMap::new();
        if let Some(value) = content_type {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        is_json_or_absent(&headers)
    }

    #[test]
    fn json_content_types_are_accepted() {
        assert!(with(None));
        assert!(with(Some("application/json")));
        assert!(with(Some("Application/JSON; charset=utf-8")));
        assert!(with(Some("application/vnd.api+json")));
    }

    #[test]
    fn other_content_types_are_refused() {
        assert!(!with(Some("text/plain")));
        assert!(!with(Some("application/x-www-form-urlencoded")));
        assert!(!with(Some("multipart/form-data; boundary=x")));
        assert!(!with(Some("application/jsonp")));
        assert!(!with(Some("")));
    }
}
