//! Validation shared by every API: a prompt and a [`SamplingSpec`] in, a [`ValidRequest`] out.
//!
//! Every sampling bound lives here, once, and docs/sampling_contract.json states the same
//! bounds for the worker; `contract_tests` keeps the two equal.

mod prompt;

#[cfg(test)]
mod contract_tests;

use crate::engine::Params;
use crate::error::ApiError;
use crate::served_model::{Limits, ServedModel};

pub use prompt::PromptInput;

pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop string in bytes: the stop matcher holds back and rescans up to this much text
/// per token, and no tokenizer's token or chat marker comes near it.
pub const MAX_STOP_BYTES: usize = 512;
/// Most alternatives reported per token (OpenAI's `top_logprobs` cap).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// The worker seeds a signed 64-bit generator.
pub const MAX_SEED: i64 = i64::MAX;
/// Most `logit_bias` entries per request, and the largest bias either way (OpenAI's).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;
pub const MAX_LOGIT_BIAS: f64 = 100.0;
/// Most siblings of one request (OpenAI's `n` and `best_of`, TGI's `best_of`): each is a
/// request of its own in the worker, so one request cannot fill the batch.
pub const MAX_SIBLINGS: i64 = 16;
/// Most extra stop token ids per request.
pub const MAX_STOP_TOKEN_IDS: usize = 256;

/// A float parameter's bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloatParam {
    pub name: &'static str,
    pub min: f64,
    /// `min` itself is refused.
    pub min_exclusive: bool,
    pub max: Option<f64>,
    pub default: f64,
}

/// An integer parameter's bounds (inclusive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntParam {
    pub name: &'static str,
    pub min: i64,
    pub max: Option<i64>,
}

pub const TEMPERATURE: FloatParam = FloatParam {
    name: "temperature",
    min: 0.0,
    min_exclusive: false,
    max: Some(100.0),
    default: 1.0,
};
pub const TOP_P: FloatParam = FloatParam {
    name: "top_p",
    min: 0.0,
    min_exclusive: true,
    max: Some(1.0),
    default: 1.0,
};
pub const MIN_P: FloatParam = FloatParam {
    name: "min_p",
    min: 0.0,
    min_exclusive: false,
    max: Some(1.0),
    default: 0.0,
};
pub const REPETITION_PENALTY: FloatParam = FloatParam {
    name: "repetition_penalty",
    min: 0.0,
    min_exclusive: true,
    max: None,
    default: 1.0,
};
pub const PRESENCE_PENALTY: FloatParam = FloatParam {
    name: "presence_penalty",
    min: -2.0,
    min_exclusive: false,
    max: Some(2.0),
    default: 0.0,
};
pub const FREQUENCY_PENALTY: FloatParam = FloatParam {
    name: "frequency_penalty",
    ..PRESENCE_PENALTY
};

pub const MAX_NEW_TOKENS: IntParam = IntParam {
    name: "max_new_tokens",
    min: 1,
    max: None,
};
pub const TOP_K: IntParam = IntParam {
    name: "top_k",
    min: 0,
    max: None,
};
pub const LOGPROBS: IntParam = IntParam {
    name: "logprobs",
    min: 0,
    max: Some(MAX_TOP_LOGPROBS),
};
pub const SEED: IntParam = IntParam {
    name: "seed",
    min: 0,
    max: Some(MAX_SEED),
};
pub const MIN_TOKENS: IntParam = IntParam {
    name: "min_tokens",
    min: 0,
    max: None,
};
pub const PROMPT_LOGPROBS: IntParam = IntParam {
    name: "prompt_logprobs",
    min: 0,
    max: Some(MAX_TOP_LOGPROBS),
};
/// Each bias's bounds (the default, 0, is "no bias").
pub const LOGIT_BIAS: FloatParam = FloatParam {
    name: "logit_bias",
    min: -MAX_LOGIT_BIAS,
    min_exclusive: false,
    max: Some(MAX_LOGIT_BIAS),
    default: 0.0,
};

/// `stop` as OpenAI and vLLM take it: one string or a list.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
}

impl StopStrings {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(stop) => vec![stop],
            Self::Many(stops) => stops,
        }
    }
}

/// Sampling parameters as a client sent them, before validation. `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct SamplingSpec {
    pub max_new_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub logprobs: Option<i64>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<i64>,
    /// `(token id, bias)` pairs, ids as the client sent them.
    pub logit_bias: Vec<(i64, f64)>,
    pub min_tokens: Option<i64>,
    /// Token ids that end generation like EOS (vLLM's `stop_token_ids`).
    pub stop_token_ids: Vec<i64>,
    /// An llguidance grammar (serialized `TopLevelGrammar`), already compiled and checked.
    pub constraint: Option<String>,
    /// Logprobs of the prompt's tokens with this many alternatives each.
    pub prompt_logprobs: Option<i64>,
}

/// A request that passed validation: what the generator consumes.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub params: Params,
    pub stop: Vec<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Validation(message.into())
}

impl FloatParam {
    /// The value, or the default when not given.
    pub fn check(&self, value: Option<f64>) -> Result<f64, ApiError> {
        let value = value.unwrap_or(self.default);
        let above_min = if self.min_exclusive {
            value > self.min
        } else {
            value >= self.min
        };
        if value.is_finite() && above_min && self.max.is_none_or(|max| value <= max) {
            return Ok(value);
        }
        let rule = match (self.min_exclusive, self.max) {
            (true, None) if self.min == 0.0 => "positive".to_string(),
            (true, None) => format!("above {}", self.min),
            (false, None) => format!("at least {}", self.min),
            (true, Some(max)) => format!("in ({}, {max}]", self.min),
            (false, Some(max)) => format!("in [{}, {max}]", self.min),
        };
        Err(invalid(format!(
            "`{}` must be {rule} (got {value})",
            self.name
        )))
    }
}

impl IntParam {
    /// Checks `value`; `field` is the route's own name for the parameter.
    pub fn check(&self, field: &str, value: impl Into<i128>) -> Result<(), ApiError> {
        let value = value.into();
        let (min, max) = (i128::from(self.min), self.max.map(i128::from));
        if value >= min && max.is_none_or(|max| value <= max) {
            return Ok(());
        }
        let rule = match (self.min, self.max) {
            (0, None) => "must not be negative".to_string(),
            (1, None) => "must be positive".to_string(),
            (min, None) => format!("must be at least {min}"),
            (min, Some(max)) => format!("must be in {min}..={max}"),
        };
        Err(invalid(format!("`{field}` {rule} (got {value})")))
    }
}

/// A top-logprobs count under the route's own name for it.
pub fn top_logprobs(field: &str, n: i64) -> Result<u32, ApiError> {
    LOGPROBS.check(field, n)?;
    u32::try_from(n).map_err(|_| invalid(format!("`{field}` is too large")))
}

/// Renders and tokenizes the prompt, then checks it and `spec` against `limits` (the model's,
/// clamped to what the worker holds). Blocking: long prompts take a while to tokenize.
pub fn validate(
    model: &ServedModel,
    limits: &Limits,
    prompt: PromptInput,
    spec: SamplingSpec,
) -> Result<ValidRequest, ApiError> {
    // Cheap checks first: a request refused for its parameters costs no tokenization.
    check_stops(&spec.stop)?;
    check_vocab(&spec, model.tokenizer.vocab_size())?;
    let mut spec = spec;
    if let Some(grammar) = prompt.tool_constraint(model)? {
        spec.constraint = Some(grammar);
    }
    let ids = prompt.into_ids(model)?;
    build_request(spec, ids, limits)
}

/// Token ids in `logit_bias` and `stop_token_ids` reach the worker's tensors: each must be
/// inside the vocabulary.
fn check_vocab(spec: &SamplingSpec, vocab: usize) -> Result<(), ApiError> {
    let outside = |id: i64| usize::try_from(id).map_or(true, |id| id >= vocab);
    if let Some((id, _)) = spec.logit_bias.iter().find(|(id, _)| outside(*id)) {
        return Err(invalid(format!(
            "`logit_bias` names token {id}, outside the vocabulary (size {vocab})"
        )));
    }
    if let Some(id) = spec.stop_token_ids.iter().find(|&&id| outside(id)) {
        return Err(invalid(format!(
            "`stop_token_ids` holds {id}, outside the vocabulary (size {vocab})"
        )));
    }
    Ok(())
}

/// Bias bounds and the entry cap; ids are checked against the vocabulary by [`validate`].
fn logit_bias(pairs: &[(i64, f64)]) -> Result<Vec<(u32, f64)>, ApiError> {
    if pairs.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(invalid(format!(
            "`logit_bias` may hold {MAX_LOGIT_BIAS_ENTRIES} entries at most (got {})",
            pairs.len()
        )));
    }
    pairs
        .iter()
        .map(|&(id, bias)| {
            let id = u32::try_from(id)
                .map_err(|_| invalid(format!("`logit_bias` token id {id} is not a token id")))?;
            Ok((id, LOGIT_BIAS.check(Some(bias))?))
        })
        .collect()
}

fn stop_token_ids(ids: &[i64]) -> Result<Vec<u32>, ApiError> {
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid(format!(
            "`stop_token_ids` may hold {MAX_STOP_TOKEN_IDS} ids at most (got {})",
            ids.len()
        )));
    }
    ids.iter()
        .map(|&id| {
            u32::try_from(id)
                .map_err(|_| invalid(format!("`stop_token_ids` holds {id}, not a token id")))
        })
        .collect()
}

fn check_stops(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
        )));
    }
    if stop.iter().any(String::is_empty) {
        return Err(invalid("stop sequences must not be empty"));
    }
    if let Some(long) = stop.iter().find(|stop| stop.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!(
            "stop sequences may be {MAX_STOP_BYTES} bytes long at most (got {})",
            long.len()
        )));
    }
    Ok(())
}

/// Checks `spec` against the limits and builds the request for the engine.
pub fn build_request(
    spec: SamplingSpec,
    mut prompt_ids: Vec<u32>,
    limits: &Limits,
) -> Result<ValidRequest, ApiError> {
    let temperature = TEMPERATURE.check(spec.temperature)?;
    let top_p = TOP_P.check(spec.top_p)?;
    let min_p = MIN_P.check(spec.min_p)?;
    let repetition_penalty = REPETITION_PENALTY.check(spec.repetition_penalty)?;
    let presence_penalty = PRESENCE_PENALTY.check(spec.presence_penalty)?;
    let frequency_penalty = FREQUENCY_PENALTY.check(spec.frequency_penalty)?;
    let top_k = match spec.top_k {
        None => 0,
        Some(k) => {
            TOP_K.check(TOP_K.name, k)?;
            u32::try_from(k).map_err(|_| invalid("`top_k` is too large"))?
        }
    };
    let logprobs = match spec.logprobs {
        None => 0,
        Some(n) => top_logprobs(LOGPROBS.name, n)?,
    };
    if let Some(seed) = spec.seed {
        SEED.check(SEED.name, seed)?;
    }
    let logit_bias = logit_bias(&spec.logit_bias)?;
    let stop_token_ids = stop_token_ids(&spec.stop_token_ids)?;
    let prompt_logprobs = match spec.prompt_logprobs {
        None => None,
        Some(n) => Some(top_logprobs(PROMPT_LOGPROBS.name, n)?),
    };
    check_stops(&spec.stop)?;
    if let Some(truncate) = spec.truncate {
        let keep = usize::try_from(truncate)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| {
                invalid(format!(
                    "`truncate` must be a positive integer (got {truncate})"
                ))
            })?;
        if prompt_ids.len() > keep {
            prompt_ids.drain(..prompt_ids.len() - keep);
        }
    }
    if prompt_ids.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    let input = prompt_ids.len();
    if input > limits.max_input_tokens {
        return Err(invalid(format!(
            "the prompt has {input} tokens; the limit is {} (THAW_MAX_INPUT_TOKENS)",
            limits.max_input_tokens
        )));
    }
    let room = limits.max_total_tokens - input;
    let max_new_tokens = match spec.max_new_tokens {
        None => limits.default_max_new_tokens.min(room as u32),
        Some(n) => {
            MAX_NEW_TOKENS.check(MAX_NEW_TOKENS.name, n)?;
            if n as u64 > room as u64 {
                return Err(invalid(format!(
                    "the prompt ({input} tokens) plus {n} new tokens exceeds the limit of {} (THAW_MAX_TOTAL_TOKENS)",
                    limits.max_total_tokens
                )));
            }
            n as u32
        }
    };
    let min_tokens = match spec.min_tokens {
        None => 0,
        Some(n) => {
            MIN_TOKENS.check(MIN_TOKENS.name, n)?;
            if n > i64::from(max_new_tokens) {
                return Err(invalid(format!(
                    "`min_tokens` ({n}) must not exceed the maximum of new tokens ({max_new_tokens})"
                )));
            }
            n as u32
        }
    };
    let params = Params {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        seed: spec.seed,
        stop_token_ids,
        ignore_eos: spec.ignore_eos,
        logprobs,
        logit_bias,
        min_tokens,
        constraint: spec.constraint,
        prompt_logprobs,
    };
    Ok(ValidRequest {
        prompt_ids,
        params,
        stop: spec.stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_input_tokens: 8,
            max_total_tokens: 12,
            default_max_new_tokens: 100,
        }
    }

    fn build(spec: SamplingSpec, prompt_len: usize) -> Result<ValidRequest, ApiError> {
        build_request(spec, (0..prompt_len as u32).collect(), &limits())
    }

    fn rejected(spec: SamplingSpec) -> String {
        match build(spec, 3) {
            Err(ApiError::Validation(message)) => message,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fit_the_room_left() {
        let request = build(SamplingSpec::default(), 3).unwrap();
        assert_eq!(request.params.max_new_tokens, 9);
        assert_eq!(request.params.temperature, 1.0);
        assert_eq!(request.params.top_p, 1.0);
    }

    /// The sampling bounds are checked against docs/sampling_contract.json in
    /// `contract_tests`; stop strings are not part of the worker's contract.
    #[test]
    fn stop_sequences_are_checked() {
        let stops = |stop: Vec<String>| {
            rejected(SamplingSpec {
                stop,
                ..Default::default()
            })
        };
        assert!(stops(vec![String::new()]).contains("stop"));
        assert!(stops(vec!["x".into(); MAX_STOP_SEQUENCES + 1]).contains("at most"));
        assert!(stops(vec!["x".repeat(MAX_STOP_BYTES + 1)]).contains("bytes long"));
        let longest = SamplingSpec {
            stop: vec!["é".repeat(MAX_STOP_BYTES / 2)],
            ..Default::default()
        };
        assert!(build(longest, 3).is_ok());
    }

    #[test]
    fn prompt_limits() {
        assert!(
            matches!(build(SamplingSpec::default(), 9), Err(ApiError::Validation(m)) if m.contains("limit is 8"))
        );
        assert!(matches!(
            build(SamplingSpec::default(), 0),
            Err(ApiError::Validation(_))
        ));
        let too_many = SamplingSpec {
            max_new_tokens: Some(10),
            ..Default::default()
        };
        assert!(
            matches!(build(too_many, 3), Err(ApiError::Validation(m)) if m.contains("exceeds"))
        );
    }

    #[test]
    fn truncate_keeps_the_end_of_the_prompt() {
        let spec = SamplingSpec {
            truncate: Some(2),
            ..Default::default()
        };
        assert_eq!(build(spec, 20).unwrap().prompt_ids, vec![18, 19]);
    }

    #[test]
    fn seeds_fit_in_63_bits() {
        let seeded = |seed| SamplingSpec {
            seed: Some(seed),
            ..Default::default()
        };
        assert_eq!(
            build(seeded(i64::MAX as u64), 3).unwrap().params.seed,
            Some(i64::MAX as u64)
        );
        assert!(rejected(seeded(i64::MAX as u64 + 1)).contains("`seed`"));
    }

    #[test]
    fn messages_name_the_field_and_the_rule() {
        assert_eq!(
            rejected(SamplingSpec {
                temperature: Some(100.5),
                ..Default::default()
            }),
            "`temperature` must be in [0, 100] (got 100.5)"
        );
        assert_eq!(
            rejected(SamplingSpec {
                repetition_penalty: Some(0.0),
                ..Default::default()
            }),
            "`repetition_penalty` must be positive (got 0)"
        );
        assert_eq!(
            top_logprobs("top_n_tokens", 21).unwrap_err().to_string(),
            "`top_n_tokens` must be in 0..=20 (got 21)"
        );
    }

    #[test]
    fn token_lists_are_checked_against_the_vocabulary_and_caps() {
        let spec = |logit_bias: Vec<(i64, f64)>, stop_token_ids: Vec<i64>| SamplingSpec {
            logit_bias,
            stop_token_ids,
            ..Default::default()
        };
        assert!(check_vocab(&spec(vec![(9, 1.0)], vec![9]), 10).is_ok());
        let outside = check_vocab(&spec(vec![(10, 1.0)], Vec::new()), 10).unwrap_err();
        assert!(outside.to_string().contains("`logit_bias`"), "{outside}");
        let outside = check_vocab(&spec(Vec::new(), vec![-2]), 10).unwrap_err();
        assert!(
            outside.to_string().contains("`stop_token_ids`"),
            "{outside}"
        );
        let many = spec(Vec::new(), vec![1; MAX_STOP_TOKEN_IDS + 1]);
        assert!(rejected(many).contains("at most"));
        let sent = build(spec(vec![(3, -2.5)], vec![4, 5]), 3).unwrap().params;
        assert_eq!(sent.logit_bias, vec![(3, -2.5)]);
        assert_eq!(sent.stop_token_ids, vec![4, 5]);
    }
}
