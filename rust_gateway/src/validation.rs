//! Validation shared by every API: sampling parameters and prompt length limits.

use crate::config::Config;
use crate::engine::Params;
use crate::error::ApiError;
use crate::generation::GenerateRequest;

/// Context used when config.json does not say.
const FALLBACK_CONTEXT: usize = 4096;
const FALLBACK_MAX_NEW_TOKENS: u32 = 256;
pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub default_max_new_tokens: u32,
}

impl Limits {
    pub fn new(config: &Config, context_length: Option<usize>, model_default: Option<u32>) -> Self {
        let context = context_length.unwrap_or(FALLBACK_CONTEXT);
        let max_total_tokens = config.max_total_tokens.unwrap_or(context).max(2);
        let max_input_tokens = config
            .max_input_tokens
            .unwrap_or(max_total_tokens - 1)
            .min(max_total_tokens - 1)
            .max(1);
        let default_max_new_tokens = config
            .default_max_new_tokens
            .or(model_default)
            .unwrap_or(FALLBACK_MAX_NEW_TOKENS)
            .max(1);
        Self {
            max_input_tokens,
            max_total_tokens,
            default_max_new_tokens,
        }
    }
}

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
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Validation(message.into())
}

fn in_range(
    name: &str,
    value: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, ApiError> {
    let value = value.unwrap_or(default);
    if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(invalid(format!("`{name}` must be {rule} (got {value})")))
    }
}

/// Checks `spec` against the limits and builds the request for the engine.
pub fn build_request(
    spec: SamplingSpec,
    mut prompt_ids: Vec<u32>,
    limits: &Limits,
) -> Result<GenerateRequest, ApiError> {
    let temperature = in_range(
        "temperature",
        spec.temperature,
        1.0,
        |t| (0.0..=100.0).contains(&t),
        "in 0..=100",
    )?;
    let top_p = in_range(
        "top_p",
        spec.top_p,
        1.0,
        |p| p > 0.0 && p <= 1.0,
        "in (0, 1]",
    )?;
    let min_p = in_range(
        "min_p",
        spec.min_p,
        0.0,
        |p| (0.0..=1.0).contains(&p),
        "in [0, 1]",
    )?;
    let repetition_penalty = in_range(
        "repetition_penalty",
        spec.repetition_penalty,
        1.0,
        |p| p > 0.0,
        "positive",
    )?;
    let presence_penalty = in_range(
        "presence_penalty",
        spec.presence_penalty,
        0.0,
        |p| (-2.0..=2.0).contains(&p),
        "in [-2, 2]",
    )?;
    let frequency_penalty = in_range(
        "frequency_penalty",
        spec.frequency_penalty,
        0.0,
        |p| (-2.0..=2.0).contains(&p),
        "in [-2, 2]",
    )?;
    let top_k = match spec.top_k {
        None => 0,
        Some(k) if k >= 0 => u32::try_from(k).map_err(|_| invalid("`top_k` is too large"))?,
        Some(k) => return Err(invalid(format!("`top_k` must not be negative (got {k})"))),
    };
    let logprobs = match spec.logprobs {
        None => 0,
        Some(n) if (0..=MAX_TOP_LOGPROBS).contains(&n) => n as u32,
        Some(n) => {
            return Err(invalid(format!(
                "top logprobs must be in 0..={MAX_TOP_LOGPROBS} (got {n})"
            )))
        }
    };
    if spec.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
        )));
    }
    if spec.stop.iter().any(String::is_empty) {
        return Err(invalid("stop sequences must not be empty"));
    }
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
        Some(n) if n < 1 => return Err(invalid(format!("max new tokens must be positive (got {n})"))),
        Some(n) if n as u64 > room as u64 => {
            return Err(invalid(format!(
                "the prompt ({input} tokens) plus {n} new tokens exceeds the limit of {} (THAW_MAX_TOTAL_TOKENS)",
                limits.max_total_tokens
            )))
        }
        Some(n) => n as u32,
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
        stop_token_ids: Vec::new(),
        ignore_eos: spec.ignore_eos,
        logprobs,
    };
    Ok(GenerateRequest {
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

    fn build(spec: SamplingSpec, prompt_len: usize) -> Result<GenerateRequest, ApiError> {
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

    #[test]
    fn out_of_range_parameters_are_refused() {
        assert!(rejected(SamplingSpec {
            top_p: Some(1.5),
            ..Default::default()
        })
        .contains("top_p"));
        assert!(rejected(SamplingSpec {
            top_p: Some(0.0),
            ..Default::default()
        })
        .contains("top_p"));
        assert!(rejected(SamplingSpec {
            temperature: Some(-1.0),
            ..Default::default()
        })
        .contains("temperature"));
        assert!(rejected(SamplingSpec {
            max_new_tokens: Some(-5),
            ..Default::default()
        })
        .contains("positive"));
        assert!(rejected(SamplingSpec {
            max_new_tokens: Some(0),
            ..Default::default()
        })
        .contains("positive"));
        assert!(rejected(SamplingSpec {
            top_k: Some(-1),
            ..Default::default()
        })
        .contains("top_k"));
        assert!(rejected(SamplingSpec {
            logprobs: Some(21),
            ..Default::default()
        })
        .contains("logprobs"));
        assert!(rejected(SamplingSpec {
            stop: vec![String::new()],
            ..Default::default()
        })
        .contains("stop"));
        assert!(rejected(SamplingSpec {
            frequency_penalty: Some(3.0),
            ..Default::default()
        })
        .contains("frequency"));
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
    fn limits_follow_the_model_unless_configured() {
        use clap::Parser;
        let config = Config::try_parse_from(["thaw-gateway"]).unwrap();
        let limits = Limits::new(&config, Some(2048), Some(64));
        assert_eq!(
            limits,
            Limits {
                max_input_tokens: 2047,
                max_total_tokens: 2048,
                default_max_new_tokens: 64
            }
        );
        let config = Config::try_parse_from(["thaw-gateway", "--max-input-tokens", "100"]).unwrap();
        assert_eq!(Limits::new(&config, None, None).max_input_tokens, 100);
    }
}
