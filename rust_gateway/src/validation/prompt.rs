//! The prompt of a request: text, token ids, or a conversation for the chat template.

use crate::chat_template::ChatMessage;
use crate::error::ApiError;
use crate::served_model::ServedModel;
use crate::tools::{self, ToolRequest};

/// A prompt as text, as token ids, or as a conversation for the chat template.
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Messages(Vec<ChatMessage>),
    /// A conversation that offers tools (`tool_choice` other than "none").
    MessagesWithTools(Vec<ChatMessage>, ToolRequest),
}

impl PromptInput {
    /// The grammar that enforces a `required` or named `tool_choice`, in the served model's
    /// tool-call format.
    pub fn tool_constraint(&self, model: &ServedModel) -> Result<Option<String>, ApiError> {
        let Self::MessagesWithTools(_, request) = self else {
            return Ok(None);
        };
        let support = model.tools;
        tools::tool_grammar(request, support.format, support.marker_token)
            .map_err(|err| ApiError::Validation(err.to_string()))
    }

    /// The prompt's token ids: text is tokenized with special tokens, a rendered conversation
    /// without (the template already wrote them). A template that does not render tools gets
    /// them (and earlier tool turns) as text.
    pub fn into_ids(self, model: &ServedModel) -> Result<Vec<u32>, ApiError> {
        let (text, add_special_tokens) = match self {
            Self::Text(text) => (text, true),
            Self::Ids(ids) => return checked_ids(model, ids),
            Self::Messages(messages) => {
                // Earlier tool turns, for a template that would refuse or drop them.
                let rendered =
                    if !model.tools.template_renders_tools && tools::has_tool_turns(&messages) {
                        render(model, &tools::plain_tool_turns(&messages), None)?
                    } else {
                        render(model, &messages, None)?
                    };
                (rendered, false)
            }
            Self::MessagesWithTools(messages, request) => {
                let rendered = if model.tools.template_renders_tools {
                    render(model, &messages, Some(&request))?
                } else {
                    // The template would drop the tools: they go into the system message.
                    let messages = tools::rewrite_for_plain_template(&messages, &request);
                    render(model, &messages, None)?
                };
                (rendered, false)
            }
        };
        model
            .tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|err| ApiError::Validation(format!("cannot tokenize the prompt: {err}")))
    }
}

fn render(
    model: &ServedModel,
    messages: &[ChatMessage],
    tools: Option<&ToolRequest>,
) -> Result<String, ApiError> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::Validation("`messages` need a chat template; this model has none".into())
    })?;
    let tools = tools.map(ToolRequest::template_tools);
    template
        .render_with_tools(messages, tools.as_deref(), true)
        .map_err(|err| ApiError::Validation(err.to_string()))
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
