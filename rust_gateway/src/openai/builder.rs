//! Builds OpenAI response objects from a generation's [`TextEvent`]s: stream chunks as the
//! tokens arrive, and the whole response (or the usage chunk) at the end.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::request::{OutputOptions, Surface};
use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChatTokenLogprob,
    ChunkChoice, Delta, Header, TextChoice, TextCompletion, TextLogprobs, TopLogprob, Usage,
};
use crate::engine::FinishReason;
use crate::error::ApiError;
use crate::generation::{Completion, TextEvent};
use crate::text::TextTokenizer;

/// One generated token as the logprobs listings show it.
#[derive(Debug, Clone, PartialEq)]
struct TokenRecord {
    token: String,
    logprob: f64,
    top: Vec<(String, f64)>,
    /// Characters of output text before this token (completions' `text_offset`).
    offset: usize,
}

/// What one event added: the text, the tokens (for logprobs) and the finish, if it finished.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    text: String,
    records: Vec<TokenRecord>,
    finish: Option<&'static str>,
}

pub struct ResponseBuilder {
    options: OutputOptions,
    header: Header,
    prompt_tokens: usize,
    text: String,
    chars: usize,
    records: Vec<TokenRecord>,
    completion: Option<Completion>,
    /// Chat streams announce the assistant's role in their first chunk.
    role_sent: bool,
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
    pub fn new(options: OutputOptions, model: &str, prompt_tokens: usize) -> Self {
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
            prompt_tokens,
            text: String::new(),
            chars: 0,
            records: Vec::new(),
            completion: None,
            role_sent: false,
        }
    }

    pub fn options(&self) -> OutputOptions {
        self.options
    }

    pub fn is_finished(&self) -> bool {
        self.completion.is_some()
    }

    pub fn usage(&self) -> Usage {
        let generated = self.completion.as_ref().map_or(0, |c| c.generated_tokens);
        Usage::new(self.prompt_tokens, generated)
    }

    /// Takes one event in; returns what it added (nothing for `Started`).
    pub fn push(&mut self, event: TextEvent, tokenizer: &TextTokenizer) -> Option<Step> {
        let (text, record, completion) = match event {
            TextEvent::Started => return None,
            TextEvent::Token(token) => {
                let record = self.options.logprobs.map(|_| TokenRecord {
                    token: tokenizer.token_text(token.id),
                    logprob: token.logprob.unwrap_or(f64::NAN),
                    top: token
                        .top
                        .iter()
                        .map(|&(id, logprob)| (tokenizer.token_text(id), logprob))
                        .collect(),
                    offset: self.chars,
                });
                (token.text, record, token.finish)
            }
            TextEvent::Done { completion, text } => (text, None, Some(completion)),
        };
        self.chars += text.chars().count();
        self.text.push_str(&text);
        self.records.extend(record.clone());
        let finish = completion.as_ref().map(|c| finish_reason(c.reason));
        if completion.is_some() {
            self.completion = completion;
        }
        Some(Step {
            text,
            records: record.into_iter().collect(),
            finish,
        })
    }

    /// The stream chunks for one step: none when it added nothing a client would see.
    pub fn chunks(&mut self, step: Step) -> Vec<Value> {
        if step.text.is_empty() && step.records.is_empty() && step.finish.is_none() {
            return Vec::new();
        }
        match self.options.surface {
            Surface::Chat => {
                let mut chunks = Vec::with_capacity(2);
                if !self.role_sent {
                    self.role_sent = true;
                    let role = Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    };
                    chunks.push(self.chat_chunk(role, None, None));
                }
                let logprobs = self.options.logprobs.map(|_| chat_logprobs(&step.records));
                let delta = Delta {
                    role: None,
                    content: Some(step.text),
                };
                chunks.push(self.chat_chunk(delta, logprobs, step.finish));
                chunks
            }
            Surface::Completions => {
                let logprobs = self.options.logprobs.map(|_| text_logprobs(&step.records));
                vec![to_value(TextCompletion {
                    header: self.header.clone(),
                    choices: vec![TextChoice {
                        index: 0,
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
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> Value {
        to_value(ChatChunk {
            header: self.header.clone(),
            choices: vec![ChunkChoice {
                index: 0,
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

    /// The non-streamed response object; an error when the generation never finished.
    pub fn response(&self) -> Result<Value, ApiError> {
        let completion = self
            .completion
            .as_ref()
            .ok_or_else(|| ApiError::Generation("generation ended without finishing".into()))?;
        let finish = finish_reason(completion.reason);
        let usage = self.usage();
        Ok(match self.options.surface {
            Surface::Chat => to_value(ChatCompletion {
                header: self.header.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: self.text.clone(),
                    },
                    logprobs: self.options.logprobs.map(|_| chat_logprobs(&self.records)),
                    finish_reason: finish,
                }],
                usage,
            }),
            Surface::Completions => to_value(TextCompletion {
                header: self.header.clone(),
                choices: vec![TextChoice {
                    index: 0,
                    text: self.text.clone(),
                    logprobs: self.options.logprobs.map(|_| text_logprobs(&self.records)),
                    finish_reason: Some(finish),
                }],
                usage: Some(usage),
            }),
        })
    }
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
                logprob: record.logprob,
                bytes: record.token.as_bytes().to_vec(),
                top_logprobs: record.top.iter().map(top).collect(),
            })
            .collect(),
    }
}

fn text_logprobs(records: &[TokenRecord]) -> TextLogprobs {
    TextLogprobs {
        tokens: records.iter().map(|r| r.token.clone()).collect(),
        token_logprobs: records
            .iter()
            .map(|r| Some(r.logprob).filter(|l| l.is_finite()))
            .collect(),
        top_logprobs: records
            .iter()
            .map(|r| r.top.iter().cloned().collect())
            .collect(),
        text_offset: records.iter().map(|r| r.offset).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::GeneratedToken;

    fn tokenizer() -> TextTokenizer {
        TextTokenizer::word_level(&["a", "b", "c"])
    }

    fn token(id: u32, text: &str, finish: Option<(FinishReason, usize)>) -> TextEvent {
        TextEvent::Token(GeneratedToken {
            id,
            text: text.to_string(),
            logprob: Some(-0.25),
            special: false,
            top: vec![(2, -1.5)],
            finish: finish.map(|(reason, generated_tokens)| Completion {
                reason,
                generated_tokens,
            }),
        })
    }

    fn options(surface: Surface, stream: bool, logprobs: Option<u32>) -> OutputOptions {
        OutputOptions {
            surface,
            stream,
            include_usage: stream,
            logprobs,
        }
    }

    fn run(builder: &mut ResponseBuilder, events: Vec<TextEvent>) -> Vec<Value> {
        let tokenizer = tokenizer();
        let mut chunks = Vec::new();
        for event in events {
            if let Some(step) = builder.push(event, &tokenizer) {
                chunks.extend(builder.chunks(step));
            }
        }
        chunks.extend(builder.usage_chunk());
        chunks
    }

    #[test]
    fn chat_response_with_usage_and_logprobs() {
        let mut builder = ResponseBuilder::new(options(Surface::Chat, false, Some(1)), "m", 5);
        run(
            &mut builder,
            vec![
                TextEvent::Started,
                token(0, "a", None),
                token(1, "b", Some((FinishReason::EosToken, 2))),
            ],
        );
        let response = builder.response().unwrap();
        assert_eq!(response["object"], "chat.completion");
        assert!(response["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(response["model"], "m");
        let choice = &response["choices"][0];
        assert_eq!(choice["message"]["content"], "ab");
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["finish_reason"], "stop");
        let first = &choice["logprobs"]["content"][0];
        assert_eq!(first["token"], "a");
        assert_eq!(first["logprob"], -0.25);
        assert_eq!(first["bytes"], serde_json::json!([97]));
        assert_eq!(first["top_logprobs"][0]["token"], "c");
        assert_eq!(
            response["usage"],
            serde_json::json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
        );
    }

    #[test]
    fn chat_stream_announces_the_role_then_deltas_then_usage() {
        let mut builder = ResponseBuilder::new(options(Surface::Chat, true, None), "m", 3);
        let chunks = run(
            &mut builder,
            vec![
                token(0, "a", None),
                token(1, "", None),
                token(2, "bc", Some((FinishReason::Length, 3))),
            ],
        );
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            serde_json::json!({"role": "assistant", "content": ""})
        );
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "a");
        assert!(chunks[1]["choices"][0]["finish_reason"].is_null());
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "bc");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[3]["choices"], serde_json::json!([]));
        assert_eq!(chunks[3]["usage"]["completion_tokens"], 3);
        assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    }

    #[test]
    fn completions_with_logprobs_and_a_cancelled_end() {
        let mut builder =
            ResponseBuilder::new(options(Surface::Completions, false, Some(1)), "m", 2);
        let done = TextEvent::Done {
            completion: Completion {
                reason: FinishReason::StopSequence,
                generated_tokens: 2,
            },
            text: "!".into(),
        };
        run(
            &mut builder,
            vec![token(0, "ab", None), token(1, "c", None), done],
        );
        let response = builder.response().unwrap();
        assert_eq!(response["object"], "text_completion");
        let choice = &response["choices"][0];
        assert_eq!(choice["text"], "abc!");
        assert_eq!(choice["finish_reason"], "stop");
        let logprobs = &choice["logprobs"];
        assert_eq!(logprobs["tokens"], serde_json::json!(["a", "b"]));
        assert_eq!(logprobs["text_offset"], serde_json::json!([0, 2]));
        assert_eq!(logprobs["top_logprobs"][0], serde_json::json!({"c": -1.5}));
        assert_eq!(response["usage"]["total_tokens"], 4);
    }

    #[test]
    fn unfinished_generation_is_an_error() {
        let builder = ResponseBuilder::new(options(Surface::Completions, false, None), "m", 2);
        assert!(matches!(builder.response(), Err(ApiError::Generation(_))));
        assert_eq!(builder.usage_chunk(), None);
    }
}
