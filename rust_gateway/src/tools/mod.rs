//! Tool calling: the `tools` a request offers and its `tool_choice` (`request`), how they reach
//! the prompt when the chat template ignores them (`prompt`), the grammar that enforces
//! `required` and named choices (`grammar`), and the parsers that turn the model's output back
//! into `tool_calls`, streamed or whole (`parse`).
//!
//! Each model family writes its calls its own way; the format is detected from the chat
//! template's text (or set with THAW_TOOL_PARSER):
//! - `hermes` (Qwen 2.5/3, Hermes, and every template that ignores tools):
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call;
//! - `llama3` (Llama 3.1+ JSON tool calling): `{"name": ..., "parameters": {...}}`, calls
//!   separated by `;`, optionally after `<|python_tag|>`;
//! - `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
//!
//! `tool_choice: "none"` leaves the tools out of the prompt and the output unparsed (vLLM's
//! default), so the model answers in text.

mod call;
mod grammar;
mod parse;
mod prompt;
mod request;

pub use call::ToolCall;
pub use grammar::tool_grammar;
pub use parse::ToolCallParser;
pub use prompt::{has_tool_turns, plain_tool_turns, rewrite_for_plain_template};
pub use request::{ToolChoice, ToolRequest, ToolSpec};

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
}

impl ToolFormat {
    /// The format a chat template teaches its model; Hermes when the template shows none.
    pub fn detect(template_source: &str) -> Self {
        if template_source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template_source.contains("<tool_call>") {
            Self::Hermes
        } else if template_source.contains("<|python_tag|>")
            || (template_source.contains("<|start_header_id|>")
                && template_source.contains("\"parameters\""))
        {
            Self::Llama3
        } else {
            Self::Hermes
        }
    }

    /// The text that opens a call when the template writes it as one token (a special token
    /// whose id the grammar names, so that the model is not made to spell it out).
    pub fn marker(self) -> Option<&'static str> {
        match self {
            Self::Mistral => Some("[TOOL_CALLS]"),
            Self::Llama3 => Some("<|python_tag|>"),
            Self::Hermes => None,
        }
    }
}

/// What the served model needs for tools: its format, whether its template renders `tools`,
/// and the id of the format's marker when that is a special token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSupport {
    pub format: ToolFormat,
    pub template_renders_tools: bool,
    pub marker_token: Option<u32>,
}

impl ToolSupport {
    /// From the chat template's source; `forced` (THAW_TOOL_PARSER) wins over detection.
    pub fn new(template_source: Option<&str>, forced: Option<ToolFormat>) -> Self {
        let source = template_source.unwrap_or("");
        Self {
            format: forced.unwrap_or_else(|| ToolFormat::detect(source)),
            template_renders_tools: source.contains("tools"),
            marker_token: None,
        }
    }
}

#[cfg(test)]
mod tests;
