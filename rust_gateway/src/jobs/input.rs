//! The body of /run and /runsync: `{"input": {...}, "webhook"?, "policy"?}`.
//!
//! `input` takes `prompt` (text) or `messages` (chat), and `sampling_params` with vLLM's names;
//! or, as RunPod's worker-vllm, `openai_route` and `openai_input` (the body of that route).

use std::time::Duration;

use serde::Deserialize;

use crate::chat_template::ChatMessage;
use crate::error::{parse_json_value, shape_errors_are_malformed, ApiError};
use crate::openai::{ChatRequest, CompletionRequest, OpenAiRequest, SamplingFields};
use crate::validation::{PromptInput, SamplingSpec};

#[derive(Debug, Deserialize)]
pub struct RunBody {
    pub input: JobInput,
    pub webhook: Option<String>,
    pub policy: Option<Policy>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Policy {
    /// Milliseconds a job may run once started.
    #[serde(rename = "executionTimeout")]
    pub execution_timeout: Option<u64>,
    /// Milliseconds from submission within which the job must finish.
    pub ttl: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct JobInput {
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub sampling_params: Option<SamplingParams>,
    pub openai_route: Option<String>,
    pub openai_input: Option<serde_json::Value>,
}

/// What a job asks for.
pub enum JobRequest {
    Text {
        prompt: PromptInput,
        spec: SamplingSpec,
    },
    OpenAi(OpenAiRequest),
    /// `openai_route: "/v1/models"`: answered at once.
    Models,
}

/// vLLM's SamplingParams names (the subset the engine honours).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingParams {
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<i64>,
}

impl Policy {
    pub fn execution_timeout(&self) -> Option<Duration> {
        self.execution_timeout.map(Duration::from_millis)
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl.map(Duration::from_millis)
    }
}

impl RunBody {
    /// The webhook URL, checked to be http(s). Where it may point is the webhook policy's
    /// check (`webhook.rs`), made at submit and again before each delivery.
    pub fn webhook_url(&self) -> Result<Option<reqwest::Url>, ApiError> {
        let Some(url) = &self.webhook else {
            return Ok(None);
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| ApiError::Validation(format!("`webhook` is not a URL: {err}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ApiError::Validation(
                "`webhook` must be an http(s) URL".into(),
            ));
        }
        Ok(Some(parsed))
    }
}

fn parse_openai<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    parse_json_value(value).map_err(shape_errors_are_malformed)
}

impl JobInput {
    pub fn into_request(self) -> Result<JobRequest, ApiError> {
        let Some(route) = &self.openai_route else {
            let (prompt, spec) = self.to_prompt()?;
            return Ok(JobRequest::Text { prompt, spec });
        };
        let body = || {
            self.openai_input.clone().ok_or_else(|| {
                ApiError::Validation(format!("`openai_route` {route} needs `openai_input`"))
            })
        };
        // The body is checked exactly as the route itself checks it.
        match route.as_str() {
            "/v1/chat/completions" => parse_openai::<ChatRequest>(body()?)?
                .into_request()
                .map(JobRequest::OpenAi),
            "/v1/completions" => parse_openai::<CompletionRequest>(body()?)?
                .into_request()
                .map(JobRequest::OpenAi),
            "/v1/models" => Ok(JobRequest::Models),
            other => Err(ApiError::Validation(format!(
                "`openai_route` must be /v1/chat/completions, /v1/completions or /v1/models \
                 (got {other:?})"
            ))),
        }
    }

    /// The prompt (text or conversation) and the sampling spec.
    fn to_prompt(&self) -> Result<(PromptInput, SamplingSpec), ApiError> {
        let prompt = match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::Validation(
                    "give `prompt` or `messages`, not both".into(),
                ))
            }
            (Some(prompt), None) => PromptInput::Text(prompt.clone()),
            (None, Some(messages)) => PromptInput::Messages(messages.clone()),
            (None, None) => {
                return Err(ApiError::Validation(
                    "`input` needs `prompt` or `messages`".into(),
                ))
            }
        };
        let spec = match &self.sampling_params {
            None => SamplingSpec::default(),
            Some(p) => p.sampling.spec(p.sampling.max_tokens, p.logprobs)?,
        };
        Ok((prompt, spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> RunBody {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn prompt_and_vllm_params() {
        let run = body(
            serde_json::json!({"input": {"prompt": "hi", "sampling_params": {
            "max_tokens": 5, "top_k": -1, "stop": "\n", "temperature": 0.0}}}),
        );
        let (prompt, spec) = run.input.to_prompt().unwrap();
        assert!(matches!(prompt, PromptInput::Text(text) if text == "hi"));
        assert_eq!(
            (spec.max_new_tokens, spec.top_k, spec.temperature),
            (Some(5), Some(0), Some(0.0))
        );
        assert_eq!(spec.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn openai_routes_take_the_route_body() {
        let request = |input: serde_json::Value| {
            body(serde_json::json!({ "input": input }))
                .input
                .into_request()
        };
        let chat = request(serde_json::json!({"openai_route": "/v1/chat/completions",
            "openai_input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}));
        assert!(matches!(chat, Ok(JobRequest::OpenAi(r)) if r.spec.max_new_tokens == Some(3)));
        let completion = request(serde_json::json!({"openai_route": "/v1/completions",
            "openai_input": {"prompt": "hi", "stream": true}}));
        assert!(matches!(completion, Ok(JobRequest::OpenAi(r)) if r.options.stream));
        let models = request(serde_json::json!({"openai_route": "/v1/models"}));
        assert!(matches!(models, Ok(JobRequest::Models)));
        let status = |input| request(input).err().map(|e| e.status().as_u16());
        assert_eq!(
            status(serde_json::json!({"openai_route": "/v1/embeddings", "openai_input": {}})),
            Some(422)
        );
        assert_eq!(
            status(serde_json::json!({"openai_route": "/v1/completions"})),
            Some(422)
        );
        assert_eq!(
            status(serde_json::json!({"openai_route": "/v1/chat/completions",
                "openai_input": {"messages": "hi"}})),
            Some(400)
        );
        assert_eq!(
            status(serde_json::json!({"openai_route": "/v1/chat/completions",
                "openai_input": {"messages": [{"role": "user", "content": "x"}], "n": 17}})),
            Some(422)
        );
    }

    #[test]
    fn needs_exactly_one_of_prompt_and_messages() {
        assert!(body(serde_json::json!({"input": {}}))
            .input
            .to_prompt()
            .is_err());
        let both = body(serde_json::json!({"input": {"prompt": "a", "messages": []}}));
        assert!(both.input.to_prompt().is_err());
    }

    #[test]
    fn webhook_must_be_http() {
        assert!(body(serde_json::json!({"input": {}, "webhook": "ftp://x"}))
            .webhook_url()
            .is_err());
        assert!(
            body(serde_json::json!({"input": {}, "webhook": "http://127.0.0.1:9/h"}))
                .webhook_url()
                .unwrap()
                .is_some()
        );
    }
}
