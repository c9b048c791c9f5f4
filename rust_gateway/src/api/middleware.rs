//! Layers around the routes: request metrics and shutdown refusal, and the API key check; and
//! the rule that decides at start whether the gateway may serve without a key.

use std::net::IpAddr;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::readiness::Phase;
use crate::state::AppState;

const PROBES: [&str; 3] = ["/health", "/ping", "/ready"];
/// Polled by machines, not users: they do not keep an idle gateway alive.
const NOT_ACTIVITY: [&str; 4] = ["/health", "/ping", "/ready", "/metrics"];

/// Who may call the API, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    BearerKey,
    /// No key, but only this machine can connect.
    LoopbackOnly,
    /// No key on a reachable address, because the operator said so.
    Unauthenticated,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    #[error(
        "THAW_API_KEY (--api-key) is set but empty: that is a misconfiguration, not \"no key\"; \
         set a non-empty key, or unset the variable"
    )]
    EmptyKey,
    #[error(
        "refusing to listen on {0} without an API key: anyone who can reach the port could use \
         the model. Set THAW_API_KEY=<secret> (--api-key) so that callers must send \
         `Authorization: Bearer <secret>`; or listen on loopback only (HOST=127.0.0.1); or, only \
         when a proxy in front authenticates every caller (RunPod's does), set \
         THAW_ALLOW_UNAUTHENTICATED=true (--allow-unauthenticated)"
    )]
    OpenWithoutKey(IpAddr),
}

/// The auth mode for a key (`None`: not set at all), the listen address and the opt-out.
pub fn auth_mode(
    api_key: Option<&str>,
    host: IpAddr,
    allow_unauthenticated: bool,
) -> Result<AuthMode, AuthConfigError> {
    match api_key {
        Some(key) if key.trim().is_empty() => Err(AuthConfigError::EmptyKey),
        Some(_) => Ok(AuthMode::BearerKey),
        None if host.is_loopback() => Ok(AuthMode::LoopbackOnly),
        None if allow_unauthenticated => Ok(AuthMode::Unauthenticated),
        None => Err(AuthConfigError::OpenWithoutKey(host)),
    }
}

/// True when no key is set, or the request carries it (`Authorization: Bearer <key>`,
/// compared in constant time).
pub fn authorized(app: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &app.config.api_key else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    bool::from(given.as_bytes().ct_eq(key.as_bytes()))
}

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

/// With THAW_API_KEY set: `Authorization: Bearer <key>`, compared in constant time. Only
/// requests that pass count as activity for THAW_IDLE_TIMEOUT: refused ones (401) must not keep
/// an endpoint billing.
pub async fn require_api_key(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !authorized(&app, request.headers()) {
        return Err(ApiError::Unauthorized);
    }
    let route = request.extensions().get::<MatchedPath>();
    if !route.is_some_and(|route| NOT_ACTIVITY.contains(&route.as_str())) {
        app.activity.touch();
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reachable_address_needs_a_key_or_the_opt_out() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let v6_any: IpAddr = "::".parse().unwrap();
        let lan: IpAddr = "192.168.1.5".parse().unwrap();
        for host in [any, v6_any, lan] {
            assert_eq!(
                auth_mode(None, host, false),
                Err(AuthConfigError::OpenWithoutKey(host))
            );
            assert_eq!(auth_mode(None, host, true), Ok(AuthMode::Unauthenticated));
            assert_eq!(auth_mode(Some("k"), host, false), Ok(AuthMode::BearerKey));
        }
        for host in ["127.0.0.1", "127.0.0.2", "::1"] {
            let host: IpAddr = host.parse().unwrap();
            assert_eq!(auth_mode(None, host, false), Ok(AuthMode::LoopbackOnly));
        }
    }

    #[test]
    fn an_empty_key_is_refused_everywhere() {
        for key in ["", "  "] {
            for host in ["127.0.0.1", "0.0.0.0"] {
                let result = auth_mode(Some(key), host.parse().unwrap(), true);
                assert_eq!(result, Err(AuthConfigError::EmptyKey));
            }
        }
        let message = AuthConfigError::EmptyKey.to_string();
        assert!(message.contains("set but empty"), "{message}");
    }

    #[test]
    fn the_refusal_says_how_to_fix_it() {
        let message = AuthConfigError::OpenWithoutKey("0.0.0.0".parse().unwrap()).to_string();
        for hint in [
            "THAW_API_KEY",
            "HOST=127.0.0.1",
            "THAW_ALLOW_UNAUTHENTICATED=true",
        ] {
            assert!(message.contains(hint), "{hint}: {message}");
        }
    }
}
