//! The snapshot's `tokenizer.json`, wrapped for the three things the gateway needs.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::Tokenizer;

use super::detokenizer::Decode;

pub struct TextTokenizer {
    inner: Tokenizer,
    special: HashSet<u32>,
}

/// One token of a tokenized text: its id and its byte span in the text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpan {
    pub id: u32,
    pub start: usize,
    pub stop: usize,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let inner =
            Tokenizer::from_file(path).map_err(|err| format!("{}: {err}", path.display()))?;
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Self { inner, special })
    }

    /// A whitespace-split word-level tokenizer whose ids are the positions of `words`.
    #[cfg(test)]
    pub fn word_level(words: &[&str]) -> Self {
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(id, word)| (word.to_string(), serde_json::Value::from(id)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]},
            "pre_tokenizer": {"type": "Whitespace"},
        });
        let inner: Tokenizer = json.to_string().parse().expect("a valid tokenizer");
        Self {
            inner,
            special: HashSet::new(),
        }
    }

    /// Token ids of a prompt. Plain prompts get the tokenizer's own special tokens (BOS);
    /// a rendered chat template already holds them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| err.to_string())?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn encode_spans(&self, text: &str) -> Result<Vec<TokenSpan>, String> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|err| err.to_string())?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, stop))| TokenSpan { id, start, stop })
            .collect())
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// The text of one token on its own (for token listings, not for streaming).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }
}

impl Decode for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|err| err.to_string())
    }

    /// `decode` skips special tokens.
    fn is_skipped(&self, id: u32) -> bool {
        self.is_special(id)
    }
}
