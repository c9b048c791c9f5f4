//! The body of /run and /runsync: `{"input": {...}, "webhook"?, "policy"?}`.
//!
//! `input` takes `prompt` (text) or `messages` (chat), and `sampling_params` with vLLM's names.

use std::time::Duration;

use serde::Deserialize;

use crate::chat_template::ChatMessage;
use crate::error::ApiError;
use crate::state::PromptInput;
use crate::validation::SamplingSpec;

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
}

/// vLLM's SamplingParams names (the subset the engine honours).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<StopStrings>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
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
    /// The webhook URL, checked to be http(s).
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

impl JobInput {
    /// The prompt (text or conversation) and the sampling spec.
    pub fn to_prompt(&self) -> Result<(PromptInput, SamplingSpec), ApiError> {
        if self.openai_route.is_some() {
            return Err(ApiError::Validation(
                "`openai_route` is not supported yet".into(),
            ));
        }
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
        let params = self.sampling_params.as_ref();
        let spec = match params {
            None => SamplingSpec::default(),
            Some(p) => SamplingSpec {
                max_new_tokens: p.max_tokens,
                temperature: p.temperature,
                top_k: p.top_k.map(|k| if k == -1 { 0 } else { k }),
                top_p: p.top_p,
                min_p: p.min_p,
                repetition_penalty: p.repetition_penalty,
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
                seed: p.seed,
                stop: match &p.stop {
                    None => Vec::new(),
                    Some(StopStrings::One(stop)) => vec![stop.clone()],
                    Some(StopStrings::Many(stops)) => stops.clone(),
                },
                ignore_eos: p.ignore_eos.unwrap_or(false),
                logprobs: p.logprobs,
                truncate: None,
            },
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
