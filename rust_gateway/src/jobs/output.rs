//! A job's output as it is produced: the chunks `/stream` hands out and the final `output`.
//!
//! Plain jobs stream `{"text"}` chunks and end with `{"text", "finish_reason", "usage"}`. Jobs
//! with an `openai_route` produce the OpenAI objects: the response object, or with
//! `"stream": true` one chunk object per `/stream` item and the list of all chunks at the end.

use serde_json::{json, Value};

use crate::generation::TextEvent;
use crate::openai::{OutputOptions, ResponseBuilder};
use crate::served_model::SharedModel;

#[derive(Debug, Clone, Copy)]
pub enum JobFormat {
    Text,
    OpenAi(OutputOptions),
}

pub enum JobOutput {
    Text {
        text: String,
        prompt_tokens: usize,
        finish: Option<Value>,
    },
    OpenAi {
        builder: Box<ResponseBuilder>,
        /// Every chunk so far, for the final output of a streamed job.
        chunks: Vec<Value>,
    },
}

impl JobOutput {
    pub fn new(format: JobFormat, model: &SharedModel, prompt_ids: &[u32]) -> Self {
        match format {
            JobFormat::Text => Self::Text {
                text: String::new(),
                prompt_tokens: prompt_ids.len(),
                finish: None,
            },
            JobFormat::OpenAi(options) => Self::OpenAi {
                builder: Box::new(
                    ResponseBuilder::new(options, &model.model_id, prompt_ids)
                        .with_tool_format(model.tools.format),
                ),
                chunks: Vec::new(),
            },
        }
    }

    /// Takes a token or the end of choice `index` in; returns the chunks it adds to the job's
    /// stream. Text jobs have one choice.
    pub fn push(&mut self, index: usize, event: TextEvent, model: &SharedModel) -> Vec<Value> {
        match self {
            Self::Text {
                text,
                prompt_tokens,
                finish,
            } => {
                let (delta, completion) = match event {
                    TextEvent::Started | TextEvent::PromptLogprobs(_) => return Vec::new(),
                    TextEvent::Token(token) => (token.text, token.finish),
                    TextEvent::Done { completion, text } => (text, Some(completion)),
                };
                text.push_str(&delta);
                if let Some(done) = completion {
                    let generated = done.generated_tokens;
                    *finish = Some(json!({
                        "finish_reason": done.reason,
                        "usage": {
                            "prompt_tokens": *prompt_tokens,
                            "completion_tokens": generated,
                            "total_tokens": *prompt_tokens + generated,
                        },
                    }));
                }
                if delta.is_empty() {
                    Vec::new()
                } else {
                    vec![json!({"text": delta})]
                }
            }
            Self::OpenAi { builder, chunks } => {
                let Some(step) = builder.push(index, event, &model.tokenizer) else {
                    return Vec::new();
                };
                let options = builder.options();
                if !options.stream {
                    return Vec::new();
                }
                let mut new = builder.chunks(step);
                if builder.is_finished() {
                    new.extend(builder.usage_chunk());
                }
                chunks.extend(new.iter().cloned());
                new
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        match self {
            Self::Text { finish, .. } => finish.is_some(),
            Self::OpenAi { builder, .. } => builder.is_finished(),
        }
    }

    /// The job's `output`; `None` while it has not finished.
    pub fn finish(self) -> Option<Value> {
        match self {
            Self::Text { text, finish, .. } => {
                let mut output = finish?;
                output["text"] = Value::String(text);
                Some(output)
            }
            Self::OpenAi { builder, chunks } if builder.options().stream => {
                builder.is_finished().then_some(Value::Array(chunks))
            }
            Self::OpenAi { builder, .. } => builder.response().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::FinishReason;
    use crate::generation::{Completion, GeneratedToken};
    use crate::openai::{ChatRequest, CompletionRequest};
    use crate::served_model::{Limits, ServedModel};
    use crate::text::TextTokenizer;

    fn model() -> SharedModel {
        Arc::new(ServedModel {
            tokenizer: TextTokenizer::word_level(&["a", "b"]),
            model_id: "m".into(),
            eos_token_ids: vec![1],
            chat_template: None,
            tools: crate::tools::ToolSupport::new(None, None),
            limits: Limits {
                max_input_tokens: 10,
                max_total_tokens: 20,
                default_max_new_tokens: 5,
            },
        })
    }

    fn token(text: &str, finish: Option<FinishReason>) -> TextEvent {
        TextEvent::Token(GeneratedToken {
            id: 0,
            text: text.into(),
            logprob: None,
            special: false,
            top: Vec::new(),
            finish: finish.map(|reason| Completion {
                reason,
                generated_tokens: 2,
            }),
        })
    }

    fn run(format: JobFormat) -> (Vec<Value>, Option<Value>) {
        let model = model();
        let mut output = JobOutput::new(format, &model, &[0, 1, 0]);
        let mut chunks = Vec::new();
        for event in [
            TextEvent::Started,
            token("x", None),
            token("y", Some(FinishReason::Length)),
        ] {
            assert!(!output.is_finished());
            chunks.extend(output.push(0, event, &model));
        }
        assert!(output.is_finished());
        (chunks, output.finish())
    }

    #[test]
    fn text_jobs_stream_text_and_end_with_usage() {
        let (chunks, output) = run(JobFormat::Text);
        assert_eq!(chunks, vec![json!({"text": "x"}), json!({"text": "y"})]);
        assert_eq!(
            output.unwrap(),
            json!({"text": "xy", "finish_reason": "length", "usage":
                {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        );
    }

    #[test]
    fn streamed_openai_jobs_end_with_the_list_of_their_chunks() {
        let body = json!({"prompt": "a", "stream": true,
            "stream_options": {"include_usage": true}});
        let request: CompletionRequest = serde_json::from_value(body).unwrap();
        let options = request.into_request().unwrap().options;
        let (chunks, output) = run(JobFormat::OpenAi(options));
        assert_eq!(chunks.len(), 3, "two tokens and the usage chunk");
        assert_eq!(chunks[2]["usage"]["total_tokens"], 5);
        assert_eq!(output.unwrap(), Value::Array(chunks));
    }

    #[test]
    fn unstreamed_openai_jobs_end_with_the_response_object() {
        let body = json!({"messages": [{"role": "user", "content": "a"}]});
        let request: ChatRequest = serde_json::from_value(body).unwrap();
        let options = request.into_request().unwrap().options;
        let (chunks, output) = run(JobFormat::OpenAi(options));
        assert!(chunks.is_empty());
        let output = output.unwrap();
        assert_eq!(output["object"], "chat.completion");
        assert_eq!(output["choices"][0]["message"]["content"], "xy");
    }
}
