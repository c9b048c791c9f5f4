//! The prompt of a request: text, token ids, or a conversation for the chat template.

use crate::chat_template::ChatMessage;
use crate::error::ApiError;
use crate::served_model::ServedModel;

/// A prompt as text, as token ids, or as a conversation for the chat template.
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Messages(Vec<ChatMessage>),
}

impl PromptInput {
    /// The prompt's token ids: text is tokenized with special tokens, a rendered conversation
    /// without (the template already wrote them).
    pub fn into_ids(self, model: &ServedModel) -> Result<Vec<u32>, ApiError> {
        let (text, add_special_tokens) = match self {
            Self::Text(text) => (text, true),
            Self::Ids(ids) => return checked_ids(model, ids),
            Self::Messages(messages) => {
                let template = model.chat_template.as_ref().ok_or_else(|| {
                    ApiError::Validation(
                        "`messages` need a chat template; this model has none".into(),
                    )
                })?;
                let rendered = template
                    .render(&messages, true)
                    .map_err(|err| ApiError::Validation(err.to_string()))?;
                (rendered, false)
            }
        };
        model
            .tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|err| ApiError::Validation(format!("cannot tokenize the prompt: {err}")))
    }
}

/// Token ids go to the worker as they are, so ids outside the vocabulary are refused here.
fn checked_ids(model: &ServedModel, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    let vocab = model.tokenizer.vocab_size();
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::Validation(format!(
            "token id {id} is outside the vocabulary (size {vocab})"
        ))),
        None => Ok(ids),
    }
}
