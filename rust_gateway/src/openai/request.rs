//! The bodies of `/v1/chat/completions` and `/v1/completions`, and how they map onto the
//! engine: sampling spec, prompt, and the output options the response builder needs.
//!
//! Fields the engine cannot honour are refused with 422 rather than ignored; unknown fields
//! are ignored (as vLLM does), so clients that send extras keep working.

use serde::Deserialize;
use serde_json::Value;

use super::structured::{constraint_error, StructuredFields};
use crate::chat_template::ChatMessage;
use crate::error::ApiError;
use crate::tools::ToolRequest;
use crate::validation::{top_logprobs, PromptInput, SamplingSpec, StopStrings, MAX_SIBLINGS};

/// OpenAI's default `max_tokens` for the legacy completions API (vLLM uses the same).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;
/// Most choices (`n`) and candidates (`best_of`) per request.
pub const MAX_CHOICES: i64 = MAX_SIBLINGS;

/// Which of the two APIs a request (and its response objects) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Chat,
    Completions,
}

/// Sampling fields under OpenAI's and vLLM's names (vLLM adds `top_k`, `min_p`,
/// `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`); RunPod's worker-vllm
/// takes the same in a job's `sampling_params`.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
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
    /// OpenAI's map from token id (a string) to a bias in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
}

impl SamplingFields {
    pub fn spec(
        &self,
        max_tokens: Option<i64>,
        logprobs: Option<i64>,
    ) -> Result<SamplingSpec, ApiError> {
        Ok(SamplingSpec {
            max_new_tokens: max_tokens,
            temperature: self.temperature,
            // vLLM spells "off" as -1.
            top_k: self.top_k.map(|k| if k == -1 { 0 } else { k }),
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self
                .stop
                .clone()
                .map(StopStrings::into_vec)
                .unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
            logit_bias: self.logit_bias()?,
            min_tokens: self.min_tokens,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ..SamplingSpec::default()
        })
    }

    /// The bias map as pairs; bounds and the vocabulary are validation's to check.
    fn logit_bias(&self) -> Result<Vec<(i64, f64)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(key, value)| {
                let id = key.trim().parse::<i64>().map_err(|_| {
                    ApiError::Validation(format!(
                        "`logit_bias` keys must be token ids (got {key:?})"
                    ))
                })?;
                let bias = value.as_f64().ok_or_else(|| {
                    ApiError::Validation(format!(
                        "`logit_bias` values must be numbers (got {value} for {key:?})"
                    ))
                })?;
                Ok((id, bias))
            })
            .collect()
    }
}

/// Fields both APIs share. `model` and `user` are accepted like any unknown field: the
/// gateway serves one model.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// `response_format` and vLLM's `guided_*` extras.
    #[serde(flatten)]
    pub structured: StructuredFields,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Vec<Value>>,
    pub function_call: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A completions prompt: text, a list of texts, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// What the response builder needs to know beyond the generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputOptions {
    pub surface: Surface,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(n)`: report each token's logprob and its `n` most likely alternatives.
    pub logprobs: Option<u32>,
    /// Choices answered.
    pub n: u32,
    /// Choices generated (`best_of`, at least `n`): the `n` most likely are answered.
    pub best_of: u32,
    /// Completions: the prompt comes first in each choice's text (and logprobs).
    pub echo: bool,
    /// Chat with tools offered (`tool_choice` other than "none"): the output is parsed for
    /// tool calls.
    pub tool_calls: bool,
}

impl OutputOptions {
    /// Siblings to generate.
    pub fn candidates(&self) -> usize {
        self.best_of.max(self.n).max(1) as usize
    }
}

/// A parsed and checked OpenAI request, ready for validation.
pub struct OpenAiRequest {
    pub prompt: PromptInput,
    pub spec: SamplingSpec,
    pub options: OutputOptions,
}

fn refuse<T>(message: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::Validation(message.into()))
}

/// A choice count in 1..=[`MAX_CHOICES`].
fn choices(field: &str, value: i64) -> Result<u32, ApiError> {
    if (1..=MAX_CHOICES).contains(&value) {
        return Ok(value as u32);
    }
    refuse(format!(
        "`{field}` must be in 1..={MAX_CHOICES} (got {value})"
    ))
}

impl CommonFields {
    fn n(&self) -> Result<u32, ApiError> {
        choices("n", self.n.unwrap_or(1))
    }

    fn spec(
        &self,
        max_tokens: Option<i64>,
        logprobs: Option<u32>,
    ) -> Result<SamplingSpec, ApiError> {
        self.sampling.spec(max_tokens, logprobs.map(i64::from))
    }

    fn options(&self, surface: Surface, logprobs: Option<u32>, n: u32) -> OutputOptions {
        let stream = self.stream.unwrap_or(false);
        OutputOptions {
            surface,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            logprobs,
            n,
            best_of: n,
            echo: false,
            tool_calls: false,
        }
    }
}

/// `null`, absent, or one of the given strings.
fn is_one_of(value: Option<&Value>, allowed: &[&str]) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => allowed.contains(&text.as_str()),
        Some(_) => false,
    }
}

impl ChatRequest {
    pub fn into_request(self) -> Result<OpenAiRequest, ApiError> {
        let n = self.common.n()?;
        let tools = ToolRequest::from_fields(
            self.tools.as_deref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )
        .map_err(constraint_error)?
        .filter(ToolRequest::active);
        if self.functions.as_ref().is_some_and(|f| !f.is_empty())
            || !is_one_of(self.function_call.as_ref(), &["none", "auto"])
        {
            return refuse("function calling is not supported");
        }
        let constraint = self.common.structured.constraint()?;
        if let (Some(constraint), Some(tools)) = (&constraint, &tools) {
            if tools.forces() {
                return refuse(format!(
                    "`tool_choice` \"required\" or a named function cannot be combined with `{}`",
                    constraint.field
                ));
            }
        }
        if self.messages.is_empty() {
            return refuse("`messages` must not be empty");
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, top) => Some(top_logprobs("top_logprobs", top.unwrap_or(0))?),
            (false, Some(top)) if top > 0 => {
                return refuse("`top_logprobs` needs `logprobs: true`");
            }
            (false, _) => None,
        };
        let max_tokens = self
            .max_completion_tokens
            .or(self.common.sampling.max_tokens);
        let mut spec = self.common.spec(max_tokens, logprobs)?;
        spec.constraint = constraint
            .map(|c| c.grammar())
            .transpose()
            .map_err(constraint_error)?;
        Ok(OpenAiRequest {
            spec,
            options: OutputOptions {
                tool_calls: tools.is_some(),
                ..self.common.options(Surface::Chat, logprobs, n)
            },
            prompt: match tools {
                Some(tools) => PromptInput::MessagesWithTools(self.messages, tools),
                None => PromptInput::Messages(self.messages),
            },
        })
    }
}

impl CompletionRequest {
    pub fn into_request(self) -> Result<OpenAiRequest, ApiError> {
        let n = self.common.n()?;
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return refuse("`suffix` is not supported");
        }
        let best_of = match self.best_of {
            None => n,
            Some(best_of) => choices("best_of", best_of)?,
        };
        if best_of < n {
            return refuse(format!("`best_of` ({best_of}) must be at least `n` ({n})"));
        }
        if best_of > n && self.common.stream == Some(true) {
            return refuse("`best_of` cannot be used with `stream`");
        }
        let echo = self.echo.unwrap_or(false);
        let logprobs = self
            .logprobs
            .map(|n| top_logprobs("logprobs", n))
            .transpose()?;
        let max_tokens = self
            .common
            .sampling
            .max_tokens
            .or(Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
        let mut spec = self.common.spec(max_tokens, logprobs)?;
        spec.constraint = self
            .common
            .structured
            .constraint()?
            .map(|c| c.grammar())
            .transpose()
            .map_err(constraint_error)?;
        // Echoed logprobs start with the prompt's own.
        if echo {
            spec.prompt_logprobs = logprobs.map(i64::from);
        }
        Ok(OpenAiRequest {
            spec,
            options: OutputOptions {
                best_of,
                echo,
                ..self.common.options(Surface::Completions, logprobs, n)
            },
            prompt: self.prompt.into_prompt()?,
        })
    }
}

impl PromptField {
    /// One prompt per request: batches would need `n` choices, which the engine does not return.
    fn into_prompt(self) -> Result<PromptInput, ApiError> {
        let single = |count: usize| {
            if count == 1 {
                Ok(())
            } else {
                refuse(format!(
                    "`prompt` must hold exactly one prompt (got {count}); send one request each"
                ))
            }
        };
        match self {
            Self::Text(text) => Ok(PromptInput::Text(text)),
            Self::Texts(mut texts) => {
                single(texts.len())?;
                Ok(PromptInput::Text(texts.remove(0)))
            }
            Self::Ids(ids) => Ok(PromptInput::Ids(ids)),
            Self::IdLists(mut lists) => {
                single(lists.len())?;
                Ok(PromptInput::Ids(lists.remove(0)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<OpenAiRequest, ApiError> {
        serde_json::from_value::<ChatRequest>(body)
            .expect("the body parses")
            .into_request()
    }

    fn completion(body: Value) -> Result<OpenAiRequest, ApiError> {
        serde_json::from_value::<CompletionRequest>(body)
            .expect("the body parses")
            .into_request()
    }

    fn refused<T>(result: Result<T, ApiError>) -> String {
        match result {
            Err(ApiError::Validation(message)) => message,
            Err(other) => panic!("expected 422, got {other:?}"),
            Ok(_) => panic!("expected 422, got a request"),
        }
    }

    const HI: &str = r#"[{"role": "user", "content": "hi"}]"#;

    fn messages() -> Value {
        serde_json::from_str(HI).unwrap()
    }

    #[test]
    fn chat_parameters_reach_the_spec() {
        let request = chat(json!({
            "model": "anything", "messages": messages(), "max_completion_tokens": 7,
            "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "x",
            "presence_penalty": 0.1, "frequency_penalty": 0.2, "top_k": -1, "min_p": 0.05,
            "repetition_penalty": 1.1, "ignore_eos": true, "logprobs": true, "top_logprobs": 2,
            "stream": true, "stream_options": {"include_usage": true}, "n": 1
        }))
        .unwrap();
        let spec = request.spec;
        assert_eq!(spec.max_new_tokens, Some(7));
        assert_eq!((spec.temperature, spec.top_p), (Some(0.5), Some(0.9)));
        assert_eq!(
            (spec.seed, spec.top_k, spec.logprobs),
            (Some(3), Some(0), Some(2))
        );
        assert_eq!(spec.stop, vec!["x".to_string()]);
        assert!(spec.ignore_eos);
        assert_eq!(
            request.options,
            OutputOptions {
                surface: Surface::Chat,
                stream: true,
                include_usage: true,
                logprobs: Some(2),
                n: 1,
                best_of: 1,
                echo: false,
                tool_calls: false,
            }
        );
        assert!(matches!(request.prompt, PromptInput::Messages(m) if m.len() == 1));
    }

    #[test]
    fn include_usage_only_applies_to_streams() {
        let request = chat(json!({"messages": messages(),
            "stream_options": {"include_usage": true}}))
        .unwrap();
        assert!(!request.options.include_usage);
        assert_eq!(request.options.logprobs, None);
    }

    #[test]
    fn unsupported_chat_parameters_are_refused() {
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let bad_schema =
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]);
        for (extra, word) in [
            (json!({"n": 17}), "`n`"),
            (json!({"n": 0}), "`n`"),
            (json!({"tool_choice": "required"}), "`tool_choice`"),
            (
                json!({"tools": tool, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "`tool_choice`",
            ),
            (
                json!({"tools": bad_schema}),
                "`tools[0].function.parameters`",
            ),
            (
                json!({"tools": tool, "tool_choice": "required", "guided_regex": "a"}),
                "`guided_regex`",
            ),
            (json!({"functions": [{"name": "f"}]}), "function"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#"}}}}}}),
                "`response_format.json_schema.schema`",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "guided_json": {}}),
                "only one",
            ),
            (json!({"logit_bias": {"x": 5}}), "logit_bias"),
            (json!({"logit_bias": {"1": "high"}}), "logit_bias"),
            (json!({"top_logprobs": 2}), "logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
        ] {
            let mut body = json!({"messages": messages()});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            match chat(body) {
                Err(ApiError::Validation(message)) => assert!(message.contains(word), "{extra}"),
                Err(other) => panic!("{extra}: expected 422, got {other:?}"),
                Ok(_) => panic!("{extra}: expected 422, got a request"),
            }
        }
        assert!(refused(chat(json!({"messages": []}))).contains("empty"));
    }

    #[test]
    fn tools_and_constraints_reach_the_request() {
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let auto = chat(json!({"messages": messages(), "tools": tool})).unwrap();
        assert!(auto.options.tool_calls);
        assert!(matches!(auto.prompt, PromptInput::MessagesWithTools(_, _)));
        assert_eq!(auto.spec.constraint, None);
        let none =
            chat(json!({"messages": messages(), "tools": tool, "tool_choice": "none"})).unwrap();
        assert!(!none.options.tool_calls);
        assert!(matches!(none.prompt, PromptInput::Messages(_)));
        let json =
            chat(json!({"messages": messages(), "response_format": {"type": "json_object"}}))
                .unwrap();
        assert!(json.spec.constraint.unwrap().contains("json_schema"));
        let regex = completion(json!({"prompt": "a", "guided_regex": "[0-9]+"})).unwrap();
        assert!(regex.spec.constraint.unwrap().contains("lark_grammar"));
    }

    #[test]
    fn harmless_values_of_unsupported_parameters_pass() {
        let tool = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(chat(
            json!({"messages": messages(), "tools": tool, "tool_choice": "none",
            "response_format": {"type": "text"}, "logit_bias": {}, "min_tokens": 0,
            "function_call": "auto", "user": "u", "unknown_field": 1})
        )
        .is_ok());
    }

    #[test]
    fn completion_prompts_in_every_shape() {
        let prompt = |value: Value| completion(json!({"prompt": value})).map(|r| r.prompt);
        assert!(matches!(prompt(json!("a")), Ok(PromptInput::Text(t)) if t == "a"));
        assert!(matches!(prompt(json!(["a"])), Ok(PromptInput::Text(t)) if t == "a"));
        assert!(matches!(prompt(json!([1, 2])), Ok(PromptInput::Ids(ids)) if ids == [1, 2]));
        assert!(matches!(prompt(json!([[3]])), Ok(PromptInput::Ids(ids)) if ids == [3]));
        assert!(refused(prompt(json!(["a", "b"]))).contains("exactly one"));
        assert!(refused(prompt(json!([[1], [2]]))).contains("exactly one"));
    }

    #[test]
    fn completion_defaults_and_refusals() {
        let request = completion(json!({"prompt": "a", "logprobs": 3})).unwrap();
        assert_eq!(
            request.spec.max_new_tokens,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS)
        );
        assert_eq!(request.options.logprobs, Some(3));
        assert_eq!(request.spec.temperature, None);
        for (extra, word) in [
            (json!({"suffix": "z"}), "suffix"),
            (json!({"best_of": 2, "n": 3}), "best_of"),
            (json!({"best_of": 17}), "best_of"),
            (json!({"best_of": 2, "stream": true}), "stream"),
            (json!({"logprobs": 50}), "logprobs"),
            (json!({"n": 17}), "`n`"),
        ] {
            let mut body = json!({"prompt": "a"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert!(refused(completion(body)).contains(word), "{extra}");
        }
    }

    #[test]
    fn wrong_types_do_not_parse() {
        assert!(serde_json::from_value::<ChatRequest>(json!({"messages": "not a list"})).is_err());
        assert!(serde_json::from_value::<CompletionRequest>(json!({"prompt": 5})).is_err());
        assert!(serde_json::from_value::<CompletionRequest>(
            json!({"prompt": "a", "temperature": "hot"})
        )
        .is_err());
    }

    #[test]
    fn choices_bias_and_echo_reach_the_request() {
        let request = chat(json!({"messages": messages(), "n": 3, "seed": 5,
            "logit_bias": {"7": -100, " 9": 2.5}, "min_tokens": 2, "stop_token_ids": [4]}))
        .unwrap();
        assert_eq!((request.options.n, request.options.candidates()), (3, 3));
        let mut bias = request.spec.logit_bias.clone();
        bias.sort_by_key(|&(id, _)| id);
        assert_eq!(bias, vec![(7, -100.0), (9, 2.5)]);
        assert_eq!(request.spec.min_tokens, Some(2));
        assert_eq!(request.spec.stop_token_ids, vec![4]);
        let best = completion(json!({"prompt": "a", "n": 2, "best_of": 4})).unwrap();
        assert_eq!((best.options.n, best.options.candidates()), (2, 4));
        let echo = completion(json!({"prompt": "a", "echo": true, "logprobs": 2})).unwrap();
        assert!(echo.options.echo);
        assert_eq!(echo.spec.prompt_logprobs, Some(2));
        let plain = completion(json!({"prompt": "a", "echo": true})).unwrap();
        assert_eq!(
            plain.spec.prompt_logprobs, None,
            "no logprobs, no prompt logprobs"
        );
    }
}
