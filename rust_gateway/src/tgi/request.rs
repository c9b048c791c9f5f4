//! The request bodies of TGI's routes, and how TGI parameters map onto a [`SamplingSpec`].

use serde::Deserialize;

use crate::constraint::{ConstraintError, ConstraintSource, FieldConstraint};
use crate::error::ApiError;
use crate::validation::{top_logprobs, SamplingSpec, MAX_SIBLINGS};

#[derive(Debug, Deserialize)]
pub struct GenerateBody {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<TgiParameters>,
    /// Only for TGI's compatibility route `POST /`.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// TGI's `parameters`. Clients send explicit nulls, so everything is optional.
#[derive(Debug, Default, Deserialize)]
pub struct TgiParameters {
    pub best_of: Option<i64>,
    pub temperature: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub do_sample: Option<bool>,
    pub max_new_tokens: Option<i64>,
    pub return_full_text: Option<bool>,
    pub stop: Option<Vec<String>>,
    pub truncate: Option<i64>,
    pub watermark: Option<bool>,
    pub details: Option<bool>,
    pub decoder_input_details: Option<bool>,
    pub seed: Option<u64>,
    pub top_n_tokens: Option<i64>,
    pub grammar: Option<serde_json::Value>,
}

/// Output options that do not reach the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    pub details: bool,
    pub decoder_input_details: bool,
    pub return_full_text: bool,
    pub top_n_tokens: bool,
    /// Candidates generated; the most likely is answered, the others listed in the details.
    pub best_of: usize,
}

impl TgiParameters {
    /// TGI samples when asked to, or when any warper (temperature, top-k, top-p) is set;
    /// otherwise it is greedy. Temperature 0 is accepted as greedy (TGI refuses it).
    pub fn to_spec(&self) -> Result<(SamplingSpec, OutputOptions), ApiError> {
        let refuse = |message: &str| Err(ApiError::Validation(message.into()));
        let best_of = match self.best_of {
            None => 1,
            Some(n) if (1..=MAX_SIBLINGS).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::Validation(format!(
                    "`best_of` must be in 1..={MAX_SIBLINGS} (got {n})"
                )))
            }
        };
        if self.typical_p.is_some_and(|p| p != 1.0) {
            return refuse("`typical_p` is not supported");
        }
        if self.watermark == Some(true) {
            return refuse("`watermark` is not supported");
        }
        if let Some(n) = self.top_n_tokens {
            top_logprobs("top_n_tokens", n)?;
        }
        let warped = self.temperature.is_some_and(|t| t != 1.0)
            || self.top_k.is_some()
            || self.top_p.is_some_and(|p| p < 1.0);
        let sampling = self.do_sample.unwrap_or(false) || warped;
        // Greedy candidates would all be the same text.
        if best_of > 1 && !sampling {
            return refuse(
                "`best_of` > 1 needs sampling (`do_sample`, or a temperature, top_k or top_p)",
            );
        }
        let temperature = if sampling {
            self.temperature.or(Some(1.0))
        } else {
            Some(0.0)
        };
        let spec = SamplingSpec {
            max_new_tokens: self.max_new_tokens,
            temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self.stop.clone().unwrap_or_default(),
            logprobs: self.top_n_tokens,
            truncate: self.truncate,
            // Real prefill logprobs cost the prefix cache: asked for only when they are shown.
            prompt_logprobs: (self.details == Some(true)
                && self.decoder_input_details == Some(true))
            .then_some(0),
            constraint: self.grammar()?,
            ..SamplingSpec::default()
        };
        let options = OutputOptions {
            details: self.details.unwrap_or(false),
            decoder_input_details: self.decoder_input_details.unwrap_or(false),
            return_full_text: self.return_full_text.unwrap_or(false),
            top_n_tokens: self.top_n_tokens.is_some_and(|n| n > 0),
            best_of,
        };
        Ok((spec, options))
    }
}

impl TgiParameters {
    /// TGI's `grammar`: `{"type": "json" | "regex" | "json_schema", "value": ...}` as one
    /// checked llguidance grammar.
    fn grammar(&self) -> Result<Option<String>, ApiError> {
        let Some(grammar) = self.grammar.as_ref().filter(|g| !g.is_null()) else {
            return Ok(None);
        };
        let refuse = |field: &str, message: &str| {
            ApiError::Validation(ConstraintError::new(field, message).to_string())
        };
        let value = grammar.get("value").filter(|v| !v.is_null());
        let value = value.ok_or_else(|| refuse("grammar.value", "is required"))?;
        let schema = |value: &serde_json::Value| match value {
            // TGI takes a schema as JSON or as a string holding it.
            serde_json::Value::String(text) => serde_json::from_str(text)
                .map_err(|err| refuse("grammar.value", &format!("not valid JSON: {err}"))),
            other => Ok(other.clone()),
        };
        let source = match grammar.get("type").and_then(serde_json::Value::as_str) {
            Some("json") => ConstraintSource::JsonSchema(schema(value)?),
            Some("json_schema") => {
                let inner = value
                    .get("schema")
                    .ok_or_else(|| refuse("grammar.value.schema", "is required"))?;
                ConstraintSource::JsonSchema(schema(inner)?)
            }
            Some("regex") => ConstraintSource::Regex(
                value
                    .as_str()
                    .ok_or_else(|| refuse("grammar.value", "a regex must be a string"))?
                    .to_owned(),
            ),
            _ => {
                return Err(refuse(
                    "grammar.type",
                    "must be \"json\", \"json_schema\" or \"regex\"",
                ))
            }
        };
        FieldConstraint::new("grammar", source)
            .grammar()
            .map(Some)
            .map_err(|err| ApiError::Validation(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: serde_json::Value) -> TgiParameters {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn greedy_unless_sampling_is_asked_for() {
        let (spec, _) = params(serde_json::json!({})).to_spec().unwrap();
        assert_eq!(spec.temperature, Some(0.0));
        let (spec, _) = params(serde_json::json!({"temperature": 0.5}))
            .to_spec()
            .unwrap();
        assert_eq!(spec.temperature, Some(0.5));
        let (spec, _) = params(serde_json::json!({"do_sample": true}))
            .to_spec()
            .unwrap();
        assert_eq!(spec.temperature, Some(1.0));
    }

    #[test]
    fn explicit_nulls_are_accepted() {
        let p = params(
            serde_json::json!({"stop": null, "details": null, "grammar": null, "best_of": null}),
        );
        assert!(p.to_spec().is_ok());
    }

    #[test]
    fn unsupported_parameters_are_refused() {
        for json in [
            serde_json::json!({"typical_p": 0.5}),
            serde_json::json!({"best_of": 2}),
            serde_json::json!({"grammar": {"type": "xml", "value": "a"}}),
            serde_json::json!({"grammar": {"type": "json", "value": {"type": "objekt"}}}),
            serde_json::json!({"grammar": {"type": "regex", "value": "(a"}}),
            serde_json::json!({"grammar": {"type": "regex"}}),
            serde_json::json!({"watermark": true}),
            serde_json::json!({"top_n_tokens": 21}),
        ] {
            assert!(matches!(
                params(json).to_spec(),
                Err(ApiError::Validation(_))
            ));
        }
    }

    #[test]
    fn grammars_become_constraints() {
        for grammar in [
            serde_json::json!({"type": "json", "value": {"type": "object"}}),
            serde_json::json!({"type": "json", "value": "{\"type\": \"integer\"}"}),
            serde_json::json!({"type": "json_schema", "value": {"name": "x", "schema": {"type": "string"}}}),
            serde_json::json!({"type": "regex", "value": "[0-9]+"}),
        ] {
            let (spec, _) = params(serde_json::json!({"grammar": grammar}))
                .to_spec()
                .unwrap();
            let constraint = spec.constraint.expect("a grammar");
            assert!(constraint.contains("\"grammars\""), "{constraint}");
        }
        let (spec, _) = params(serde_json::json!({})).to_spec().unwrap();
        assert_eq!(spec.constraint, None);
    }

    #[test]
    fn best_of_needs_sampling_and_a_bound() {
        let (_, options) = params(serde_json::json!({"best_of": 3, "do_sample": true}))
            .to_spec()
            .unwrap();
        assert_eq!(options.best_of, 3);
        let (_, options) = params(serde_json::json!({})).to_spec().unwrap();
        assert_eq!(options.best_of, 1);
        for json in [
            serde_json::json!({"best_of": 2}),
            serde_json::json!({"best_of": 17, "do_sample": true}),
            serde_json::json!({"best_of": 0, "do_sample": true}),
        ] {
            match params(json.clone()).to_spec() {
                Err(ApiError::Validation(message)) => {
                    assert!(message.contains("best_of"), "{json}: {message}")
                }
                other => panic!("{json}: expected 422, got {other:?}"),
            }
        }
    }
}
