//! TGI-compatible routes: /generate, /generate_stream, /info, /tokenize.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};

use super::JsonBody;
use crate::engine::{EngineError, PromptLogprob};
use crate::error::ApiError;
use crate::generation::{sibling, Completion, GeneratedToken, Siblings, TextEvent};
use crate::served_model::SharedModel;
use crate::state::{Admitted, AppState};
use crate::tgi::{
    BestOfSequence, Details, GenerateBody, GenerateResponse, OutputOptions, PrefillToken,
    StreamDetails, StreamResponse, TokenInfo, TokenizedToken,
};
use crate::validation::{PromptInput, ValidRequest, MAX_SIBLINGS, MAX_STOP_SEQUENCES};

/// A validated request, started in the engine: one sibling per `best_of` candidate.
struct Started {
    model: SharedModel,
    siblings: Siblings,
    inputs: String,
    request: ValidRequest,
    options: OutputOptions,
}

async fn start(
    app: &AppState,
    mut body: GenerateBody,
    streamed: bool,
) -> Result<Started, ApiError> {
    if streamed {
        // Streams carry no prefill: the prompt's logprobs would be computed for nothing.
        if let Some(parameters) = body.parameters.as_mut() {
            parameters.decoder_input_details = None;
        }
    }
    // Off the async threads: a `grammar` is compiled here.
    let parameters = body.parameters.unwrap_or_default();
    let (spec, options) = app.off_thread(move || parameters.to_spec()).await??;
    if streamed && options.best_of > 1 {
        return Err(ApiError::Validation(
            "`best_of` > 1 cannot be streamed".into(),
        ));
    }
    let Admitted {
        model,
        request,
        slot,
    } = app
        .admit(PromptInput::Text(body.inputs.clone()), spec)
        .await?;
    let siblings =
        app.generator
            .generate_siblings(slot, model.clone(), &request, options.best_of)?;
    Ok(Started {
        model,
        siblings,
        inputs: body.inputs,
        request,
        options,
    })
}

/// The whole output of one candidate.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<TokenInfo>,
    top: Vec<Vec<TokenInfo>>,
    completion: Option<Completion>,
    /// The prompt's logprobs, when `decoder_input_details` asked for them.
    prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// What `best_of` ranks by.
    cumulative_logprob: f64,
}

impl Collected {
    fn push(&mut self, model: &SharedModel, event: TextEvent, with_top: bool) {
        match event {
            TextEvent::Started => {}
            TextEvent::PromptLogprobs(items) => self.prompt_logprobs = Some(items),
            TextEvent::Token(token) => {
                self.text.push_str(&token.text);
                if with_top {
                    self.top
                        .push(TokenInfo::alternatives(&model.tokenizer, &token));
                }
                self.cumulative_logprob += token.logprob.unwrap_or(0.0);
                self.tokens.push(TokenInfo::generated(&token));
                self.completion = token.finish.clone().or(self.completion.take());
            }
            TextEvent::Done { completion, text } => {
                self.text.push_str(&text);
                self.completion = Some(completion);
            }
        }
    }
}

/// Every candidate's whole output. The client has seen nothing yet, so a candidate whose
/// worker died simply runs again; the engine's attempt limit ends this (`Crashed`).
async fn collect(app: &AppState, started: &mut Started) -> Result<Vec<Collected>, ApiError> {
    let with_top = started.options.top_n_tokens;
    let mut out: Vec<Collected> = (0..started.options.best_of)
        .map(|_| Collected::default())
        .collect();
    while let Some((index, event)) = started.siblings.next().await {
        let Some(collected) = out.get_mut(index) else {
            continue;
        };
        match event {
            Ok(event) => collected.push(&started.model, event, with_top),
            Err(EngineError::WorkerLost) => {
                let attempts = started.siblings.attempts(index);
                let request = sibling(&started.request, index);
                let retry = app
                    .generator
                    .retry(started.model.clone(), request, attempts)?;
                *collected = Collected::default();
                started.siblings.replace(index, retry);
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(out)
}

pub async fn generate(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<GenerateBody>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let mut started = start(&app, body, false).await?;
    let mut candidates: Vec<(usize, Collected)> = collect(&app, &mut started)
        .await?
        .into_iter()
        .enumerate()
        .collect();
    // The most likely candidate is the answer (TGI's `best_of`); the rest, in order, follow.
    let best = candidates
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| a.1.cumulative_logprob.total_cmp(&b.1.cumulative_logprob))
        .map(|(at, _)| at)
        .ok_or_else(|| ApiError::Generation("generation ended without finishing".into()))?;
    let (index, chosen) = candidates.remove(best);
    let Started {
        model,
        inputs,
        request,
        options,
        ..
    } = started;
    let prefill = |collected: &Collected| {
        if options.decoder_input_details {
            PrefillToken::prompt(
                &model.tokenizer,
                &request.prompt_ids,
                collected.prompt_logprobs.as_deref(),
            )
        } else {
            Vec::new()
        }
    };
    let full_text = |text: String| {
        if options.return_full_text {
            inputs.clone() + &text
        } else {
            text
        }
    };
    let finished = |collected: &Collected| {
        collected
            .completion
            .clone()
            .ok_or_else(|| ApiError::Generation("generation ended without finishing".into()))
    };
    let completion = finished(&chosen)?;
    let chosen_prefill = prefill(&chosen);
    let mut others = Vec::with_capacity(candidates.len());
    for (at, candidate) in candidates {
        let done = finished(&candidate)?;
        others.push(BestOfSequence {
            prefill: prefill(&candidate),
            generated_text: full_text(candidate.text),
            finish_reason: done.reason,
            generated_tokens: done.generated_tokens,
            seed: sibling(&request, at).params.seed,
            tokens: candidate.tokens,
            top_tokens: candidate.top,
        });
    }
    let details = options.details.then_some(Details {
        finish_reason: completion.reason,
        generated_tokens: completion.generated_tokens,
        seed: sibling(&request, index).params.seed,
        prefill: chosen_prefill,
        tokens: chosen.tokens,
        top_tokens: chosen.top,
        best_of_sequences: (options.best_of > 1).then_some(others),
    });
    Ok(Json(GenerateResponse {
        generated_text: full_text(chosen.text),
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
    let mut started = start(&app, body, true).await?;
    let first = loop {
        match started.siblings.next().await.map(|(_, event)| event) {
            Some(Ok(TextEvent::Started | TextEvent::PromptLogprobs(_))) => continue,
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
                None => state.started.siblings.next().await.map(|(_, event)| event),
            };
            let data = match event {
                None => return None,
                Some(Ok(TextEvent::Started | TextEvent::PromptLogprobs(_))) => continue,
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
        "max_best_of": MAX_SIBLINGS,
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
