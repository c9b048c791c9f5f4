//! The response bodies of TGI's routes, and their tokens built from generated ones.

use serde::Serialize;

use crate::engine::FinishReason;
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
    /// The prompt's tokens; the engine computes no prompt logprobs, so they are null.
    pub fn prompt(tokenizer: &TextTokenizer, prompt_ids: &[u32]) -> Vec<Self> {
        prompt_ids
            .iter()
            .map(|&id| Self {
                id,
                text: tokenizer.token_text(id),
                logprob: None,
            })
            .collect()
    }
}
