//! Text generation on top of the engine: the boundary every HTTP surface uses.
//!
//! [`Generator::generate`] takes a [`ValidRequest`] (prompt ids, validated params, stop
//! strings) and returns a [`TextStream`] of [`TextEvent`]s whose tokens carry their text delta.
//! Text is released incrementally (multi-byte characters complete, stop strings trimmed); a stop
//! string ends generation with `stop_sequence` and cancels the request in the worker.
//!
//! [`Generator::generate_siblings`] starts `n` requests for one prompt (OpenAI's `n` and
//! `best_of`): the first as given, the others forks of it that share its prompt's KV blocks,
//! read together through [`Siblings`].

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::select_all;

use crate::engine::{
    Engine, EngineError, EngineEvent, FinishReason, PromptLogprob, QueueSlot, SampledToken,
    TokenRequest, TokenStream,
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
    /// The prompt's logprobs (when asked for): one per prompt token from the second on.
    PromptLogprobs(Vec<PromptLogprob>),
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

    /// Starts `count` siblings of `request` (`count` >= 1): the first in `slot`, each other
    /// one in a queue place of its own, as a fork of the first (see [`sibling`]). A refusal
    /// of any (a full queue) drops those already started, which cancels them.
    pub fn generate_siblings(
        &self,
        slot: QueueSlot,
        model: SharedModel,
        request: &ValidRequest,
        count: usize,
    ) -> Result<Siblings, EngineError> {
        self.siblings(slot, model, request, count, 0)
    }

    /// Runs all siblings again after their worker was lost (a job's retry); `previous_attempts`
    /// count against each one's limit.
    pub fn retry_siblings(
        &self,
        model: SharedModel,
        request: &ValidRequest,
        count: usize,
        previous_attempts: u32,
    ) -> Result<Siblings, EngineError> {
        let slot = self.engine.reserve()?;
        self.siblings(slot, model, request, count, previous_attempts)
    }

    fn siblings(
        &self,
        slot: QueueSlot,
        model: SharedModel,
        request: &ValidRequest,
        count: usize,
        previous_attempts: u32,
    ) -> Result<Siblings, EngineError> {
        let attempts = previous_attempts;
        let first = self.start(slot, model.clone(), sibling(request, 0), attempts, None)?;
        // A sibling that asks for prompt logprobs computes its whole prompt anyway: it shares
        // nothing, so it need not wait for the first one's prefill.
        let parent =
            Some(first.tokens.ticket()).filter(|_| request.params.prompt_logprobs.is_none());
        let mut streams = vec![Some(first)];
        for index in 1..count {
            let slot = self.engine.reserve()?;
            let fork = self.start(
                slot,
                model.clone(),
                sibling(request, index),
                attempts,
                parent,
            )?;
            streams.push(Some(fork));
        }
        Ok(Siblings { streams })
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
        self.start(slot, model, request, previous_attempts, None)
    }

    fn start(
        &self,
        slot: QueueSlot,
        model: SharedModel,
        request: ValidRequest,
        previous_attempts: u32,
        fork_of: Option<u64>,
    ) -> Result<TextStream, EngineError> {
        let input_tokens = request.prompt_ids.len();
        let tokens = self.engine.submit_in(
            slot,
            TokenRequest {
                prompt: request.prompt_ids,
                params: request.params,
                previous_attempts,
                fork_of,
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
            EngineEvent::PromptLogprobs(items) => Ok(TextEvent::PromptLogprobs(items)),
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

/// The request of sibling `index` of `request`: with a seed, sibling i samples with seed + i
/// (wrapping inside the seed's 63 bits) so that the choices differ yet are reproducible.
pub fn sibling(request: &ValidRequest, index: usize) -> ValidRequest {
    let mut sibling = request.clone();
    if let Some(seed) = sibling.params.seed.as_mut() {
        *seed = seed.wrapping_add(index as u64) & (i64::MAX as u64);
    }
    sibling
}

/// The streams of a request's siblings, read together: events come tagged with the sibling's
/// index as they arrive. Dropping it cancels every sibling still running.
pub struct Siblings {
    /// `None` once that sibling's stream ended.
    streams: Vec<Option<TextStream>>,
}

impl Siblings {
    /// The next event of any sibling; `None` once every sibling's stream ended.
    pub async fn next(&mut self) -> Option<(usize, Result<TextEvent, EngineError>)> {
        loop {
            let pending: Vec<_> = self
                .streams
                .iter_mut()
                .enumerate()
                .filter_map(|(index, stream)| {
                    let stream = stream.as_mut()?;
                    Some(Box::pin(async move { (index, stream.next().await) }))
                })
                .collect();
            if pending.is_empty() {
                return None;
            }
            // `TextStream::next` is cancel-safe: the futures not chosen lose nothing.
            let ((index, event), _, _) = select_all(pending).await;
            match event {
                Some(event) => return Some((index, event)),
                None => self.streams[index] = None,
            }
        }
    }

    /// The most workers any sibling ran in, for a retry of them all.
    pub fn max_attempts(&self) -> u32 {
        self.streams
            .iter()
            .flatten()
            .map(TextStream::attempts)
            .max()
            .unwrap_or(0)
    }

    /// Workers sibling `index` ran in, for its retry.
    pub fn attempts(&self, index: usize) -> u32 {
        self.streams
            .get(index)
            .and_then(Option::as_ref)
            .map_or(0, TextStream::attempts)
    }

    /// Puts a new stream (a retry) in the place of sibling `index`.
    pub fn replace(&mut self, index: usize, stream: TextStream) {
        if let Some(place) = self.streams.get_mut(index) {
            *place = Some(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Params;

    fn seeded(seed: Option<u64>) -> ValidRequest {
        ValidRequest {
            prompt_ids: vec![1, 2],
            params: Params {
                seed,
                ..Params::default()
            },
            stop: Vec::new(),
        }
    }

    #[test]
    fn siblings_sample_with_seed_plus_their_index() {
        let seeds: Vec<_> = (0..3)
            .map(|i| sibling(&seeded(Some(7)), i).params.seed)
            .collect();
        assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
        let top = i64::MAX as u64;
        assert_eq!(sibling(&seeded(Some(top)), 1).params.seed, Some(0));
        assert_eq!(sibling(&seeded(None), 2).params.seed, None);
    }
}
