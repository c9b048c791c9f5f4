//! Builds OpenAI response objects from a generation's [`TextEvent`]s: stream chunks as the
//! tokens arrive, and the whole response (or the usage chunk) at the end.
//!
//! A request with `n` (or `best_of`) runs as siblings, one per choice; their events come in
//! tagged with the choice's index, interleaved, and every chunk names its choice's `index`.

use std::cmp::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::request::{OutputOptions, Surface};
use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChatTokenLogprob,
    ChunkChoice, Delta, Header, TextChoice, TextCompletion, TextLogprobs, TopLogprob, Usage,
};
use super::tool_calls::{call_deltas, call_objects, content_beside, finish_with_calls};
use crate::engine::{FinishReason, PromptLogprob};
use crate::error::ApiError;
use crate::generation::{Completion, TextEvent};
use crate::text::{IncrementalDecoder, TextTokenizer};
use crate::tools::{ToolCall, ToolCallParser, ToolFormat};

/// One token as the logprobs listings show it.
#[derive(Debug, Clone, PartialEq)]
struct TokenRecord {
    token: String,
    /// `None` for the prompt's first token, which nothing predicts.
    logprob: Option<f64>,
    top: Option<Vec<(String, f64)>>,
    /// Characters of the choice's text before this token (completions' `text_offset`).
    offset: usize,
}

/// What one event added to one choice: the text, the tokens (for logprobs) and the finish.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    index: usize,
    text: String,
    records: Vec<TokenRecord>,
    finish: Option<&'static str>,
    /// Tool calls completed by this event, and how many the choice had before.
    tool_calls: Vec<ToolCall>,
    calls_before: usize,
}

/// One choice as it is generated.
#[derive(Debug, Default)]
struct Choice {
    text: String,
    chars: usize,
    records: Vec<TokenRecord>,
    completion: Option<Completion>,
    /// Chat streams announce the assistant's role in each choice's first chunk.
    role_sent: bool,
    /// Completions `echo`: the prompt was put in front of the text.
    echoed: bool,
    prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// Sum of the generated tokens' logprobs: what `best_of` ranks by.
    cumulative_logprob: f64,
    /// Chat with tools: splits the output into text and calls.
    tool_parser: Option<ToolCallParser>,
    tool_calls: Vec<ToolCall>,
}

pub struct ResponseBuilder {
    options: OutputOptions,
    header: Header,
    prompt_ids: Vec<u32>,
    choices: Vec<Choice>,
    /// The served model's tool-call format, when the request offers tools.
    tool_format: Option<ToolFormat>,
}

/// OpenAI has no reason for "stopped on EOS" apart from a stop string: both are `stop`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence | FinishReason::Cancelled => "stop",
    }
}

pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_value(object: impl Serialize) -> Value {
    // Plain structs of strings and numbers always serialize; NaN logprobs become null.
    serde_json::to_value(object).unwrap_or(Value::Null)
}

impl ResponseBuilder {
    /// A builder for `options.candidates()` choices of a generation from `prompt_ids`.
    pub fn new(options: OutputOptions, model: &str, prompt_ids: &[u32]) -> Self {
        let (prefix, object) = match (options.surface, options.stream) {
            (Surface::Chat, false) => ("chatcmpl", "chat.completion"),
            (Surface::Chat, true) => ("chatcmpl", "chat.completion.chunk"),
            (Surface::Completions, _) => ("cmpl", "text_completion"),
        };
        Self {
            options,
            header: Header {
                id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
                object,
                created: unix_seconds(),
                model: model.to_string(),
                system_fingerprint: None,
            },
            prompt_ids: prompt_ids.to_vec(),
            choices: (0..options.candidates())
                .map(|_| Choice::default())
                .collect(),
            tool_format: None,
        }
    }

    /// Parses each chat choice for tool calls in `format` when the request offers tools.
    pub fn with_tool_format(mut self, format: ToolFormat) -> Self {
        if self.options.tool_calls && self.options.surface == Surface::Chat {
            self.tool_format = Some(format);
            for index in 0..self.choices.len() {
                self.reset(index);
            }
        }
        self
    }

    pub fn options(&self) -> OutputOptions {
        self.options
    }

    /// Every choice finished.
    pub fn is_finished(&self) -> bool {
        self.choices.iter().all(|c| c.completion.is_some())
    }

    /// Forgets what choice `index` produced, for a retry of its generation.
    pub fn reset(&mut self, index: usize) {
        if let Some(choice) = self.choices.get_mut(index) {
            *choice = Choice {
                tool_parser: self.tool_format.map(ToolCallParser::new),
                ..Choice::default()
            };
        }
    }

    /// The prompt once; the tokens of every choice (every `best_of` candidate).
    pub fn usage(&self) -> Usage {
        let generated = self
            .choices
            .iter()
            .filter_map(|c| c.completion.as_ref())
            .map(|c| c.generated_tokens)
            .sum();
        Usage::new(self.prompt_ids.len(), generated)
    }

    /// Takes one event of choice `index` in; returns what it added (nothing for `Started`).
    pub fn push(
        &mut self,
        index: usize,
        event: TextEvent,
        tokenizer: &TextTokenizer,
    ) -> Option<Step> {
        let wants_records = self.options.logprobs.is_some();
        let echo = self.options.echo;
        let prompt_ids = &self.prompt_ids;
        let choice = self.choices.get_mut(index)?;
        let mut step = Step {
            index,
            ..Step::default()
        };
        if echo
            && !choice.echoed
            && !matches!(event, TextEvent::Started | TextEvent::PromptLogprobs(_))
        {
            choice.echoed = true;
            let (text, offsets) = echo_text(tokenizer, prompt_ids);
            step.text = text;
            if wants_records {
                let logprobs = choice.prompt_logprobs.as_deref();
                step.records = prompt_records(tokenizer, prompt_ids, &offsets, logprobs);
            }
        }
        let mut special = None;
        let (text, completion) = match event {
            TextEvent::Started => return None,
            TextEvent::PromptLogprobs(items) => {
                choice.prompt_logprobs = Some(items);
                return None;
            }
            TextEvent::Token(token) => {
                choice.cumulative_logprob += token.logprob.unwrap_or(0.0);
                if wants_records {
                    let offset = choice.chars + step.text.chars().count();
                    step.records.push(TokenRecord {
                        token: tokenizer.token_text(token.id),
                        logprob: token.logprob,
                        top: Some(
                            token
                                .top
                                .iter()
                                .map(|&(id, logprob)| (tokenizer.token_text(id), logprob))
                                .collect(),
                        ),
                        offset,
                    });
                }
                if token.special {
                    special = Some(tokenizer.token_text(token.id));
                }
                (token.text, token.finish)
            }
            TextEvent::Done { completion, text } => (text, Some(completion)),
        };
        let text = match choice.tool_parser.as_mut() {
            Some(parser) => {
                let (content, calls) = parser.step(special.as_deref(), &text, completion.is_some());
                step.calls_before = choice.tool_calls.len();
                choice.tool_calls.extend(calls.iter().cloned());
                step.tool_calls = calls;
                content
            }
            None => text,
        };
        step.text.push_str(&text);
        choice.chars += step.text.chars().count();
        choice.text.push_str(&step.text);
        choice.records.extend(step.records.iter().cloned());
        let called = !choice.tool_calls.is_empty();
        step.finish = completion
            .as_ref()
            .map(|c| finish_with_calls(c.reason, called).unwrap_or(finish_reason(c.reason)));
        if completion.is_some() {
            choice.completion = completion;
        }
        Some(step)
    }

    /// The stream chunks for one step: none when it added nothing a client would see.
    pub fn chunks(&mut self, step: Step) -> Vec<Value> {
        if step.text.is_empty()
            && step.records.is_empty()
            && step.finish.is_none()
            && step.tool_calls.is_empty()
        {
            return Vec::new();
        }
        let index = step.index as u32;
        match self.options.surface {
            Surface::Chat => {
                let mut chunks = Vec::with_capacity(2);
                let Some(choice) = self.choices.get_mut(step.index) else {
                    return chunks;
                };
                let called = !choice.tool_calls.is_empty();
                if !choice.role_sent {
                    choice.role_sent = true;
                    let role = Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        ..Delta::default()
                    };
                    chunks.push(self.chat_chunk(index, role, None, None));
                }
                let logprobs = self.options.logprobs.map(|_| chat_logprobs(&step.records));
                let calls = call_deltas(step.calls_before, &step.tool_calls);
                if calls.is_empty() {
                    // After a call, an empty delta (the finish) carries no content at all.
                    let delta = Delta {
                        content: (!called || !step.text.is_empty()).then_some(step.text),
                        ..Delta::default()
                    };
                    chunks.push(self.chat_chunk(index, delta, logprobs, step.finish));
                    return chunks;
                }
                // Text before the calls, then one chunk per call delta; the finish goes last.
                let mut logprobs = logprobs;
                if !step.text.is_empty() {
                    let delta = Delta {
                        content: Some(step.text),
                        ..Delta::default()
                    };
                    chunks.push(self.chat_chunk(index, delta, logprobs.take(), None));
                }
                let last = calls.len() - 1;
                for (i, call) in calls.into_iter().enumerate() {
                    let delta = Delta {
                        tool_calls: Some(vec![call]),
                        ..Delta::default()
                    };
                    let finish = if i == last { step.finish } else { None };
                    chunks.push(self.chat_chunk(index, delta, logprobs.take(), finish));
                }
                chunks
            }
            Surface::Completions => {
                let logprobs = self.options.logprobs.map(|_| text_logprobs(&step.records));
                vec![to_value(TextCompletion {
                    header: self.header.clone(),
                    choices: vec![TextChoice {
                        index,
                        text: step.text,
                        logprobs,
                        finish_reason: step.finish,
                    }],
                    usage: None,
                })]
            }
        }
    }

    fn chat_chunk(
        &self,
        index: u32,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> Value {
        to_value(ChatChunk {
            header: self.header.clone(),
            choices: vec![ChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
        })
    }

    /// With `stream_options.include_usage`: the last chunk, with no choices and the usage.
    pub fn usage_chunk(&self) -> Option<Value> {
        if !self.options.include_usage {
            return None;
        }
        let usage = Some(self.usage());
        Some(match self.options.surface {
            Surface::Chat => to_value(ChatChunk {
                header: self.header.clone(),
                choices: Vec::new(),
                usage,
            }),
            Surface::Completions => to_value(TextCompletion {
                header: self.header.clone(),
                choices: Vec::new(),
                usage,
            }),
        })
    }

    /// The choices to answer with: all of them, or with `best_of` the `n` whose tokens are
    /// the most likely together, best first.
    fn answered(&self) -> Vec<&Choice> {
        let mut choices: Vec<&Choice> = self.choices.iter().collect();
        let n = self.options.n as usize;
        if n < choices.len() {
            choices.sort_by(|a, b| {
                b.cumulative_logprob
                    .partial_cmp(&a.cumulative_logprob)
                    .unwrap_or(Ordering::Equal)
            });
            choices.truncate(n);
        }
        choices
    }

    /// The non-streamed response object; an error when a choice never finished.
    pub fn response(&self) -> Result<Value, ApiError> {
        let unfinished = || ApiError::Generation("generation ended without finishing".into());
        if !self.is_finished() {
            return Err(unfinished());
        }
        let usage = self.usage();
        let answered = self.answered();
        Ok(match self.options.surface {
            Surface::Chat => {
                let mut choices = Vec::with_capacity(answered.len());
                for (index, choice) in answered.into_iter().enumerate() {
                    let completion = choice.completion.as_ref().ok_or_else(unfinished)?;
                    let called = !choice.tool_calls.is_empty();
                    choices.push(ChatChoice {
                        index: index as u32,
                        message: assistant_message(&choice.text, &choice.tool_calls),
                        logprobs: self
                            .options
                            .logprobs
                            .map(|_| chat_logprobs(&choice.records)),
                        finish_reason: finish_with_calls(completion.reason, called)
                            .unwrap_or(finish_reason(completion.reason)),
                    });
                }
                to_value(ChatCompletion {
                    header: self.header.clone(),
                    choices,
                    usage,
                })
            }
            Surface::Completions => {
                let mut choices = Vec::with_capacity(answered.len());
                for (index, choice) in answered.into_iter().enumerate() {
                    let completion = choice.completion.as_ref().ok_or_else(unfinished)?;
                    choices.push(TextChoice {
                        index: index as u32,
                        text: choice.text.clone(),
                        logprobs: self
                            .options
                            .logprobs
                            .map(|_| text_logprobs(&choice.records)),
                        finish_reason: Some(finish_reason(completion.reason)),
                    });
                }
                to_value(TextCompletion {
                    header: self.header.clone(),
                    choices,
                    usage: Some(usage),
                })
            }
        })
    }
}

/// A finished chat choice's text as the assistant's message: the one place where the text
/// becomes `content` (and, with tools, `tool_calls`).
fn assistant_message(text: &str, calls: &[ToolCall]) -> AssistantMessage {
    AssistantMessage {
        role: "assistant",
        content: content_beside(text, calls),
        tool_calls: (!calls.is_empty()).then(|| call_objects(calls)),
    }
}

/// The prompt as text, for `echo`, decoded as generated text is; and where in it each token
/// starts (in characters).
fn echo_text(tokenizer: &TextTokenizer, prompt_ids: &[u32]) -> (String, Vec<usize>) {
    let mut decoder = IncrementalDecoder::default();
    let mut text = String::new();
    let mut chars = 0;
    let mut offsets = Vec::with_capacity(prompt_ids.len());
    for &id in prompt_ids {
        offsets.push(chars);
        let delta = decoder.push(tokenizer, id).unwrap_or_default();
        chars += delta.chars().count();
        text.push_str(&delta);
    }
    text.push_str(&decoder.flush(tokenizer).unwrap_or_default());
    (text, offsets)
}

/// The prompt's tokens for `echo` with `logprobs`: the first has no logprob (as OpenAI's).
fn prompt_records(
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    offsets: &[usize],
    logprobs: Option<&[PromptLogprob]>,
) -> Vec<TokenRecord> {
    prompt_ids
        .iter()
        .zip(offsets)
        .enumerate()
        .map(|(position, (&id, &offset))| {
            let scored = position
                .checked_sub(1)
                .and_then(|before| logprobs?.get(before));
            TokenRecord {
                token: tokenizer.token_text(id),
                logprob: scored.map(|&(logprob, _)| logprob),
                top: scored.map(|(_, top)| {
                    top.iter()
                        .flatten()
                        .map(|&(id, logprob)| (tokenizer.token_text(id), logprob))
                        .collect()
                }),
                offset,
            }
        })
        .collect()
}

fn chat_logprobs(records: &[TokenRecord]) -> ChatLogprobs {
    let top = |(token, logprob): &(String, f64)| TopLogprob {
        token: token.clone(),
        logprob: *logprob,
        bytes: token.as_bytes().to_vec(),
    };
    ChatLogprobs {
        content: records
            .iter()
            .map(|record| ChatTokenLogprob {
                token: record.token.clone(),
                logprob: record.logprob.unwrap_or(f64::NAN),
                bytes: record.token.as_bytes().to_vec(),
                top_logprobs: record.top.iter().flatten().map(top).collect(),
            })
            .collect(),
    }
}

fn text_logprobs(records: &[TokenRecord]) -> TextLogprobs {
    TextLogprobs {
        tokens: records.iter().map(|r| r.token.clone()).collect(),
        token_logprobs: records
            .iter()
            .map(|r| r.logprob.filter(|l| l.is_finite()))
            .collect(),
        top_logprobs: records
            .iter()
            .map(|r| r.top.as_ref().map(|top| top.iter().cloned().collect()))
            .collect(),
        text_offset: records.iter().map(|r| r.offset).collect(),
    }
}

#[cfg(test)]
#[path = "builder_tests.rs"]
mod tests;
