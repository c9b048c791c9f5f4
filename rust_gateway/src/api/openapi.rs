//! `GET /openapi.json`: the OpenAPI 3 document of every route, kept in
//! `rust_gateway/openapi.json` and checked against real responses by `tests/gateway/test_openapi.py`.

use axum::http::header;
use axum::response::IntoResponse;

const DOCUMENT: &str = include_str!("../../openapi.json");

pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_json() {
        let document: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3."));
        assert!(document["paths"]["/v1/chat/completions"]["post"].is_object());
    }
}
