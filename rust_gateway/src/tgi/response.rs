//! The response bodies of TGI's routes, and their tokens built from generated ones.

use serde::Serialize;

use crate::engine::{FinishReason, PromptLogprob};
use crate::generation::GeneratedToken;
use crate::text::TextTokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f64>,
    pub special: bool,
}

#[derive(Debug, Serialize)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<TokenInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<TokenInfo>>,
    /// With `best_of` > 1: the candidates not chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

/// A `best_of` candidate that was not chosen, as TGI lists it.
#[derive(Debug, Serialize)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<TokenInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<TokenInfo>>,
}

#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Serialize)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
}

/// One SSE event of /generate_stream; only the last carries `generated_text` and `details`.
#[derive(Debug, Serialize)]
pub struct StreamResponse {
    pub index: usize,
    pub token: TokenInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<TokenInfo>>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Serialize)]
pub struct TokenizedToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

impl TokenInfo {
    pub fn generated(token: &GeneratedToken) -> Self {
        Self {
            id: token.id,
            text: token.text.clone(),
            logprob: token.logprob,
            special: token.special,
        }
    }

    /// The most likely alternatives to `token`, each with its own text.
    pub fn alternatives(tokenizer: &TextTokenizer, token: &GeneratedToken) -> Vec<Self> {
        token
            .top
            .iter()
            .map(|&(id, logprob)| Self {
                id,
                text: tokenizer.token_text(id),
                logprob: Some(logprob),
                special: tokenizer.is_special(id),
            })
            .collect()
    }
}

impl PrefillToken {
    /// The prompt's tokens with their logprobs: `logprobs` holds one per token from the second
    /// on (the first has nothing to be predicted from, so its logprob is null, as TGI's).
    pub fn prompt(
        tokenizer: &TextTokenizer,
        prompt_ids: &[u32],
        logprobs: Option<&[PromptLogprob]>,
    ) -> Vec<Self> {
        prompt_ids
            .iter()
            .enumerate()
            .map(|(position, &id)| Self {
                id,
                text: tokenizer.token_text(id),
                logprob: position
                    .checked_sub(1)
                    .and_then(|before| logprobs?.get(before))
                    .map(|&(logprob, _)| logprob),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_logprobs_start_at_the_second_token() {
        let tokenizer = TextTokenizer::word_level(&["a", "b", "c"]);
        let logprobs = [(-1.0, None), (-2.5, Some(vec![(0, -0.5)]))];
        let prefill = PrefillToken::prompt(&tokenizer, &[0, 1, 2], Some(&logprobs));
        let values: Vec<_> = prefill.iter().map(|p| p.logprob).collect();
        assert_eq!(values, vec![None, Some(-1.0), Some(-2.5)]);
        assert_eq!(prefill[1].text, "b");
        let without = PrefillToken::prompt(&tokenizer, &[0, 1], None);
        assert!(without.iter().all(|p| p.logprob.is_none()));
    }
}
