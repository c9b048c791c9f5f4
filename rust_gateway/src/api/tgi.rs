//! TGI-compatible routes: /generate, /generate_stream, /info, /tokenize.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};

use super::JsonBody;
use crate::engine::EngineError;
use crate::error::ApiError;
use crate::generation::{Completion, GeneratedToken, TextEvent, TextStream};
use crate::served_model::SharedModel;
use crate::state::{Admitted, AppState};
use crate::tgi::{
    Details, GenerateBody, GenerateResponse, OutputOptions, PrefillToken, StreamDetails,
    StreamResponse, TokenInfo, TokenizedToken,
};
use crate::validation::{PromptInput, ValidRequest, MAX_STOP_SEQUENCES};

/// A validated request, started in the engine.
struct Started {
    model: SharedModel,
    stream: TextStream,
    inputs: String,
    request: ValidRequest,
    options: OutputOptions,
}

async fn start(app: &AppState, body: GenerateBody) -> Result<Started, ApiError> {
    let (spec, options) = body.parameters.unwrap_or_default().to_spec()?;
    let Admitted {
        model,
        request,
        slot,
    } = app
        .admit(PromptInput::Text(body.inputs.clone()), spec)
        .await?;
    let stream = app
        .generator
        .generate_in(slot, model.clone(), request.clone())?;
    Ok(Started {
        model,
        stream,
        inputs: body.inputs,
        request,
        options,
    })
}

/// The whole output of one generation.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<TokenInfo>,
    top: Vec<Vec<TokenInfo>>,
    completion: Option<Completion>,
}

async fn collect(
    model: &SharedModel,
    stream: &mut TextStream,
    with_top: bool,
) -> Result<Collected, EngineError> {
    let mut out = Collected::default();
    while let Some(event) = stream.next().await {
        match event? {
            TextEvent::Started => {}
            TextEvent::Token(token) => {
                out.text.push_str(&token.text);
                if with_top {
                    out.top
                        .push(TokenInfo::alternatives(&model.tokenizer, &token));
                }
                out.tokens.push(TokenInfo::generated(&token));
                out.completion = token.finish.clone().or(out.completion);
            }
            TextEvent::Done { completion, text } => {
                out.text.push_str(&text);
                out.completion = Some(completion);
            }
        }
    }
    Ok(out)
}

pub async fn generate(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let Started {
        model,
        mut stream,
        inputs,
        request,
        options,
    } = start(&app, body).await?;
    // The client has seen nothing yet, so a request whose worker died simply runs again; the
    // engine's attempt limit ends this (`Crashed`).
    let Collected {
        text,
        tokens,
        top,
        completion,
    } = loop {
        match collect(&model, &mut stream, options.top_n_tokens).await {
            Err(EngineError::WorkerLost) => {
                stream = app
                    .generator
                    .retry(model.clone(), request.clone(), stream.attempts())?;
            }
            other => break other?,
        }
    };
    let completion = completion
        .ok_or_else(|| ApiError::Generation("generation ended without finishing".into()))?;
    let details = options.details.then(|| Details {
        finish_reason: completion.reason,
        generated_tokens: completion.generated_tokens,
        seed: request.params.seed,
        prefill: if options.decoder_input_details {
            PrefillToken::prompt(&model.tokenizer, &request.prompt_ids)
        } else {
            Vec::new()
        },
        tokens,
        top_tokens: top,
    });
    let generated_text = if options.return_full_text {
        inputs + &text
    } else {
        text
    };
    Ok(Json(GenerateResponse {
        generated_text,
        details,
    }))
}

/// TGI's `POST /`: `/generate_stream` when `"stream": true`, else `/generate`.
pub async fn compat_generate(
    state: State<AppState>,
    body: JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    if body.0.stream == Some(true) {
        generate_stream(state, body).await
    } else {
        generate(state, body).await.map(IntoResponse::into_response)
    }
}

/// SSE in TGI's shape. The first token is awaited before answering, so an error known before
/// it (not ready, queue full, worker failure) gets its real status code instead of a 200.
pub async fn generate_stream(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Response, ApiError> {
    let mut started = start(&app, body).await?;
    let first = loop {
        match started.stream.next().await {
            Some(Ok(TextEvent::Started)) => continue,
            Some(Ok(event)) => break Some(event),
            Some(Err(error)) => return Err(error.into()),
            None => break None,
        }
    };
    let prefix = started
        .options
        .return_full_text
        .then(|| started.inputs.clone());
    let state = SseState {
        started,
        first,
        text: prefix.unwrap_or_default(),
        index: 0,
        ended: false,
    };
    Ok(Sse::new(sse_events(state))
        .keep_alive(KeepAlive::default())
        .into_response())
}

struct SseState {
    started: Started,
    first: Option<TextEvent>,
    text: String,
    index: usize,
    ended: bool,
}

fn sse_events(state: SseState) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(state, |mut state| async move {
        loop {
            if state.ended {
                return None;
            }
            let event = match state.first.take() {
                Some(event) => Some(Ok(event)),
                None => state.started.stream.next().await,
            };
            let data = match event {
                None => return None,
                Some(Ok(TextEvent::Started)) => continue,
                Some(Ok(TextEvent::Token(token))) => state.token_event(&token),
                Some(Ok(TextEvent::Done { completion, .. })) => {
                    state.ended = true;
                    let error =
                        ApiError::Generation(format!("generation ended: {:?}", completion.reason));
                    error.body()
                }
                Some(Err(error)) => {
                    state.ended = true;
                    ApiError::from(error).body()
                }
            };
            return Some((Ok(Event::default().data(data.to_string())), state));
        }
    })
}

impl SseState {
    fn token_event(&mut self, token: &GeneratedToken) -> serde_json::Value {
        self.index += 1;
        self.text.push_str(&token.text);
        let model = &self.started.model;
        let finish = token.finish.as_ref();
        self.ended = finish.is_some();
        let response = StreamResponse {
            index: self.index,
            token: TokenInfo::generated(token),
            top_tokens: self
                .started
                .options
                .top_n_tokens
                .then(|| TokenInfo::alternatives(&model.tokenizer, token)),
            generated_text: finish.map(|_| self.text.clone()),
            details: finish.map(|completion| StreamDetails {
                finish_reason: completion.reason,
                generated_tokens: completion.generated_tokens,
                seed: self.started.request.params.seed,
            }),
        };
        serde_json::to_value(response).unwrap_or_default()
    }
}

pub async fn info(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let model = app.model().await?;
    let limits = &app.limits(&model);
    Ok(Json(serde_json::json!({
        "model_id": model.model_id,
        "model_sha": null,
        "model_dtype": null,
        "model_device_type": null,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": app.config.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "max_new_tokens_default": limits.default_max_new_tokens,
        "max_client_batch_size": 1,
        "eos_token_ids": model.eos_token_ids,
        "ready": app.readiness.report().ready,
        "router": "thaw-gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
    })))
}

pub async fn tokenize(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Json<Vec<TokenizedToken>>, ApiError> {
    // Tokenizing costs what a generation's prompt costs: it takes a queue place like one.
    let _slot = app.generator.engine().reserve()?;
    let model = app.model().await?;
    let inputs = body.inputs;
    let text = inputs.clone();
    let spans = app
        .off_thread(move || model.tokenizer.encode_spans(&text))
        .await?
        .map_err(|err| ApiError::Validation(format!("cannot tokenize: {err}")))?;
    Ok(Json(
        spans
            .into_iter()
            .map(|span| TokenizedToken {
                id: span.id,
                text: inputs
                    .get(span.start..span.stop)
                    .unwrap_or_default()
                    .to_string(),
                start: span.start,
                stop: span.stop,
            })
            .collect(),
    ))
}
