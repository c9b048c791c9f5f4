//! The request bodies of TGI's routes, and how TGI parameters map onto a [`SamplingSpec`].

use serde::Deserialize;

use crate::error::ApiError;
use crate::validation::{top_logprobs, SamplingSpec};

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
}

impl TgiParameters {
    /// TGI samples when asked to, or when any warper (temperature, top-k, top-p) is set;
    /// otherwise it is greedy. Temperature 0 is accepted as greedy (TGI refuses it).
    pub fn to_spec(&self) -> Result<(SamplingSpec, OutputOptions), ApiError> {
        let refuse = |message: &str| Err(ApiError::Validation(message.into()));
        if self.best_of.is_some_and(|n| n > 1) {
            return refuse("`best_of` > 1 is not supported");
        }
        if self.typical_p.is_some_and(|p| p != 1.0) {
            return refuse("`typical_p` is not supported");
        }
        if self.grammar.as_ref().is_some_and(|g| !g.is_null()) {
            return refuse("`grammar` is not supported");
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
            ..SamplingSpec::default()
        };
        let options = OutputOptions {
            details: self.details.unwrap_or(false),
            decoder_input_details: self.decoder_input_details.unwrap_or(false),
            return_full_text: self.return_full_text.unwrap_or(false),
            top_n_tokens: self.top_n_tokens.is_some_and(|n| n > 0),
        };
        Ok((spec, options))
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
            serde_json::json!({"grammar": {"type": "json", "value": {}}}),
            serde_json::json!({"watermark": true}),
            serde_json::json!({"top_n_tokens": 21}),
        ] {
            assert!(matches!(
                params(json).to_spec(),
                Err(ApiError::Validation(_))
            ));
        }
    }
}
