//! RunPod-style job routes: /run, /runsync, /status/{id}, /stream/{id}, /cancel/{id}.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::openai::model_list;
use super::JsonBody;
use crate::error::ApiError;
use crate::jobs::{
    run_job, JobContext, JobFormat, JobRequest, JobSpec, JobStatus, JobStore, JobView, RunBody,
    StoreFull,
};
use crate::state::AppState;

/// RunPod's /runsync waits 90 s by default and 300 s at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(90);
const MAX_WAIT: Duration = Duration::from_secs(300);

/// A job route's refusal: an API error, or a full job store (429 with a Retry-After that says
/// when a slot frees up).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Full(#[from] StoreFull),
}

impl IntoResponse for SubmitError {
    fn into_response(self) -> Response {
        match self {
            Self::Api(error) => error.into_response(),
            Self::Full(full) => {
                let mut response = ApiError::Overloaded(full.to_string()).into_response();
                let seconds = full.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                response
            }
        }
    }
}

/// A job registered in the store, removed again unless it is started (a refused request, or a
/// client gone while its prompt was being prepared, must not hold a slot).
struct Reservation<'a> {
    store: &'a JobStore,
    id: String,
    kept: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.store.remove(&self.id);
        }
    }
}

/// Validates, admits and starts a job; returns its id.
async fn submit(app: &AppState, body: RunBody, retention: Duration) -> Result<String, SubmitError> {
    let webhook = body.webhook_url()?;
    if let Some(url) = &webhook {
        app.webhooks
            .check_at_submit(url)
            .await
            .map_err(|refusal| ApiError::Validation(refusal.to_string()))?;
    }
    let policy = body.policy.unwrap_or_default();
    let (prompt, spec, format, candidates) = match body.input.into_request()? {
        JobRequest::Text { prompt, spec } => (prompt, spec, JobFormat::Text, 1),
        JobRequest::OpenAi(request) => (
            request.prompt,
            request.spec,
            JobFormat::OpenAi(request.options),
            request.options.candidates(),
        ),
        JobRequest::Models => return models_job(app, retention).await,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let cancel = app.jobs.insert(&id, retention)?;
    let mut reservation = Reservation {
        store: &app.jobs,
        id: id.clone(),
        kept: false,
    };
    let admitted = app.admit(prompt, spec).await?;
    let (model, request) = (admitted.model, admitted.request);
    let stream = app
        .generator
        .generate_siblings(admitted.slot, model.clone(), &request, candidates)
        .map_err(ApiError::from)?;
    reservation.kept = true;
    let context = JobContext {
        generator: app.generator.clone(),
        store: app.jobs.clone(),
        metrics: app.metrics.clone(),
        webhooks: app.webhooks.clone(),
    };
    if webhook.is_some() {
        // Settled by the delivery at the job's end; the shutdown drain waits for it.
        app.webhooks.promise();
    }
    let spec = JobSpec {
        id: id.clone(),
        model,
        request,
        format,
        candidates,
        execution_timeout: policy.execution_timeout(),
        ttl: policy.ttl(),
        webhook,
    };
    tokio::spawn(run_job(context, spec, stream, cancel));
    Ok(id)
}

/// A `/v1/models` job needs no generation: it is complete as soon as it is accepted.
async fn models_job(app: &AppState, retention: Duration) -> Result<String, SubmitError> {
    let model = app.model().await?;
    let max_total = app.limits(&model).max_total_tokens;
    let output = serde_json::to_value(model_list(&model, &app.readiness, max_total))
        .map_err(|err| ApiError::Generation(format!("cannot encode the model list: {err}")))?;
    let id = uuid::Uuid::new_v4().to_string();
    app.jobs.insert(&id, retention)?;
    app.jobs.set_started(&id);
    app.jobs
        .finish(&id, JobStatus::Completed, Some(output), None);
    Ok(id)
}

pub async fn run(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<RunBody>,
) -> Result<Json<Value>, SubmitError> {
    let id = submit(&app, body, app.config.job_retention()).await?;
    Ok(Json(json!({"id": id, "status": "IN_QUEUE"})))
}

pub async fn runsync(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    JsonBody(body): JsonBody<RunBody>,
) -> Result<Json<JobView>, SubmitError> {
    let wait = wait_from_query(query.as_deref())?;
    let id = submit(&app, body, app.config.runsync_retention()).await?;
    if let Some(mut done) = app.jobs.watch_done(&id) {
        let _ = tokio::time::timeout(wait, done.wait_for(|finished| *finished)).await;
    }
    Ok(view(&app, &id).map(Json)?)
}

/// `?wait=<ms>`, capped at 300 s.
fn wait_from_query(query: Option<&str>) -> Result<Duration, ApiError> {
    let Some(query) = query else {
        return Ok(DEFAULT_WAIT);
    };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("wait=") {
            let ms: u64 = value.parse().map_err(|_| {
                ApiError::Malformed(format!("`wait` must be milliseconds (got {value:?})"))
            })?;
            return Ok(Duration::from_millis(ms).min(MAX_WAIT));
        }
    }
    Ok(DEFAULT_WAIT)
}

fn view(app: &AppState, id: &str) -> Result<JobView, ApiError> {
    app.jobs.view(id).ok_or_else(|| unknown(id))
}

fn unknown(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no job {id:?} (unknown, or its result has expired)"
    ))
}

pub async fn status(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    view(&app, &id).map(Json)
}

/// The chunks produced since the last call: `{"id", "status", "stream": [{"output": ...}]}`.
pub async fn stream(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (status, chunks) = app.jobs.take_chunks(&id).ok_or_else(|| unknown(&id))?;
    let stream: Vec<Value> = chunks
        .into_iter()
        .map(|output| json!({"output": output}))
        .collect();
    Ok(Json(json!({"id": id, "status": status, "stream": stream})))
}

pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let status = app.jobs.cancel(&id).ok_or_else(|| unknown(&id))?;
    Ok(Json(json!({"id": id, "status": status})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_store_answers_429_with_when_to_retry() {
        let full = StoreFull {
            max: 3,
            retry_after: Duration::from_millis(41_200),
        };
        let response = SubmitError::Full(full).into_response();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "42");
        let soon = StoreFull {
            max: 3,
            retry_after: Duration::ZERO,
        };
        let response = SubmitError::Full(soon).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn wait_parameter() {
        assert_eq!(wait_from_query(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(
            wait_from_query(Some("wait=1500")).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            wait_from_query(Some("x=1&wait=999999999")).unwrap(),
            MAX_WAIT
        );
        assert!(wait_from_query(Some("wait=soon")).is_err());
    }
}
