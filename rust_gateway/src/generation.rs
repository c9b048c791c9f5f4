//! Text generation on top of the engine: the boundary every HTTP surface uses.
//!
//! [`Generator::generate`] takes a [`ValidRequest`] (prompt ids, validated params, stop
//! strings) and returns a [`TextStream`] of [`TextEvent`]s whose tokens carry their text delta.
//! Text is released incrementally (multi-byte characters complete, stop strings trimmed); a stop
//! string ends generation with `stop_sequence` and cancels the request in the worker.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{
    Engine, EngineError, EngineEvent, FinishReason, QueueSlot, SampledToken, TokenRequest,
    TokenStream,
};
use crate::metrics::Metrics;
use crate::served_model::SharedModel;
use crate::text::{IncrementalDecoder, StopMatcher, StopOutcome};
use crate::validation::ValidRequest;

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Text this token releases (empty while a character or a possible stop string is incomplete).
    pub text: String,
    pub logprob: Option<f64>,
    pub special: bool,
    pub top: Vec<(u32, f64)>,
    /// Set on the last token.
    pub finish: Option<Completion>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub reason: FinishReason,
    pub generated_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TextEvent {
    /// The worker took the request (it left the gateway queue).
    Started,
    Token(GeneratedToken),
    /// Finished without a final token (cancelled); `text` is whatever was still held back.
    Done {
        completion: Completion,
        text: String,
    },
}

#[derive(Clone)]
pub struct Generator {
    engine: Engine,
    metrics: Arc<Metrics>,
}

impl Generator {
    pub fn new(engine: Engine, metrics: Arc<Metrics>) -> Self {
        Self { engine, metrics }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn generate(
        &self,
        model: SharedModel,
        request: ValidRequest,
    ) -> Result<TextStream, EngineError> {
        let slot = self.engine.reserve()?;
        self.generate_in(slot, model, request)
    }

    /// Starts `request` in the queue place `slot` reserved before it was validated.
    pub fn generate_in(
        &self,
        slot: QueueSlot,
        model: SharedModel,
        request: ValidRequest,
    ) -> Result<TextStream, EngineError> {
        self.start(slot, model, request, 0)
    }

    /// Runs `request` again after its worker was lost; `previous_attempts` (the failed
    /// stream's [`TextStream::attempts`]) count against the request's limit.
    pub fn retry(
        &self,
        model: SharedModel,
        request: ValidRequest,
        previous_attempts: u32,
    ) -> Result<TextStream, EngineError> {
        let slot = self.engine.reserve()?;
        self.start(slot, model, request, previous_attempts)
    }

    fn start(
        &self,
        slot: QueueSlot,
        model: SharedModel,
        request: ValidRequest,
        previous_attempts: u32,
    ) -> Result<TextStream, EngineError> {
        let input_tokens = request.prompt_ids.len();
        let tokens = self.engine.submit_in(
            slot,
            TokenRequest {
                prompt: request.prompt_ids,
                params: request.params,
                previous_attempts,
            },
        )?;
        self.metrics.input_tokens.observe(input_tokens as f64);
        Ok(TextStream {
            tokens,
            model,
            metrics: self.metrics.clone(),
            decoder: IncrementalDecoder::default(),
            stops: StopMatcher::new(request.stop),
            generated: 0,
            admitted: Instant::now(),
            first_token_at: None,
            done: false,
        })
    }
}

pub struct TextStream {
    tokens: TokenStream,
    model: SharedModel,
    metrics: Arc<Metrics>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    generated: usize,
    admitted: Instant,
    first_token_at: Option<Instant>,
    done: bool,
}

impl TextStream {
    /// Workers this request ran in, earlier attempts included.
    pub fn attempts(&self) -> u32 {
        self.tokens.attempts()
    }

    pub async fn next(&mut self) -> Option<Result<TextEvent, EngineError>> {
        if self.done {
            return None;
        }
        let event = match self.tokens.next().await {
            Some(event) => event,
            None => {
                self.done = true;
                return None;
            }
        };
        Some(match event {
            EngineEvent::Started => Ok(TextEvent::Started),
            EngineEvent::Token(sampled) => Ok(TextEvent::Token(self.on_token(sampled))),
            EngineEvent::Finished(reason) => {
                let text = self.flush();
                Ok(TextEvent::Done {
                    completion: self.complete(reason),
                    text,
                })
            }
            EngineEvent::Failed(error) => {
                self.done = true;
                Err(error)
            }
        })
    }

    fn on_token(&mut self, sampled: SampledToken) -> GeneratedToken {
        self.generated += 1;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            self.metrics
                .time_to_first_token
                .observe(self.admitted.elapsed().as_secs_f64());
        }
        // A token the tokenizer cannot decode contributes no text rather than failing the request.
        let delta = self
            .decoder
            .push(&self.model.tokenizer, sampled.id)
            .unwrap_or_default();
        let (mut text, reason) = match self.stops.push(&delta) {
            StopOutcome::Continue(text) => (text, sampled.finish),
            StopOutcome::Stopped(text) => (text, Some(FinishReason::StopSequence)),
        };
        let finish = reason.map(|reason| {
            if reason == FinishReason::StopSequence {
                self.tokens.cancel();
            } else {
                text.push_str(&self.flush());
            }
            self.complete(reason)
        });
        GeneratedToken {
            id: sampled.id,
            text,
            logprob: sampled.logprob,
            special: self.model.tokenizer.is_special(sampled.id),
            top: sampled.top,
            finish,
        }
    }

    /// Everything still held back by the detokenizer and the stop matcher.
    fn flush(&mut self) -> String {
        let tail = self
            .decoder
            .flush(&self.model.tokenizer)
            .unwrap_or_default();
        match self.stops.push(&tail) {
            StopOutcome::Continue(text) => text + &self.stops.finish(),
            StopOutcome::Stopped(text) => text,
        }
    }

    fn complete(&mut self, reason: FinishReason) -> Completion {
        self.done = true;
        self.metrics.output_tokens.observe(self.generated as f64);
        if let Some(first) = self.first_token_at.filter(|_| self.generated > 1) {
            let per_token = first.elapsed().as_secs_f64() / (self.generated - 1) as f64;
            self.metrics.time_per_output_token.observe(per_token);
        }
        Completion {
            reason,
            generated_tokens: self.generated,
        }
    }
}
