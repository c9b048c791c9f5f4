//! Tools for a chat template that does not render them: the tools are described in a system
//! message in the Hermes style (the format the output is then parsed in), earlier calls are
//! written back as `<tool_call>` blocks and tool results as `<tool_response>` user turns, so
//! that templates which only know user, assistant and system roles still render the turn.

use serde_json::Value;

use crate::chat_template::ChatMessage;

use super::ToolRequest;

/// The system text that offers the tools.
pub fn describe_tools(request: &ToolRequest) -> String {
    let mut text = String::from(
        "# Tools\n\nYou may call one or more functions to help with the user's request. \
         The functions you can call are described inside <tools></tools> as JSON, one per line:\n<tools>\n",
    );
    for tool in request.template_tools() {
        text.push_str(&serde_json::to_string(&tool).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(
        "</tools>\n\nTo call a function, answer with a JSON object holding the function's name and \
         its arguments inside <tool_call></tool_call> tags, one block per call:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <arguments-json-object>}\n</tool_call>",
    );
    text
}

/// The conversation with the tools described in the system message and tool turns in text.
pub fn rewrite_for_plain_template(
    messages: &[ChatMessage],
    request: &ToolRequest,
) -> Vec<ChatMessage> {
    let description = describe_tools(request);
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let rest = match messages.first() {
        Some(first) if first.role == "system" => {
            let content = match first.content.as_deref() {
                Some(text) if !text.is_empty() => format!("{text}\n\n{description}"),
                _ => description,
            };
            out.push(ChatMessage::text("system", content));
            &messages[1..]
        }
        _ => {
            out.push(ChatMessage::text("system", description));
            messages
        }
    };
    out.extend(plain_tool_turns(rest));
    out
}

/// Tool turns (assistant calls, tool results) written as text, for a template that only knows
/// user, assistant and system roles.
pub fn plain_tool_turns(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    merge_tool_responses(messages.iter().map(plain).collect())
}

/// Whether any message is a tool result or carries tool calls.
pub fn has_tool_turns(messages: &[ChatMessage]) -> bool {
    messages
        .iter()
        .any(|m| m.role == "tool" || m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()))
}

fn plain(message: &ChatMessage) -> ChatMessage {
    if message.role == "tool" {
        let text = message.content.clone().unwrap_or_default();
        return ChatMessage::text("user", format!("<tool_response>\n{text}\n</tool_response>"));
    }
    let Some(calls) = message.tool_calls.as_ref().filter(|c| !c.is_empty()) else {
        return message.clone();
    };
    let mut text = message.content.clone().unwrap_or_default();
    for call in calls {
        let function = call.get("function").cloned().unwrap_or(Value::Null);
        let name = function.get("name").cloned().unwrap_or(Value::Null);
        let arguments = match function.get("arguments") {
            Some(Value::String(json)) => {
                serde_json::from_str(json).unwrap_or(Value::String(json.clone()))
            }
            Some(other) => other.clone(),
            None => Value::Object(Default::default()),
        };
        let body = serde_json::json!({"name": name, "arguments": arguments});
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!("<tool_call>\n{body}\n</tool_call>"));
    }
    ChatMessage::text(&message.role, text)
}

/// Consecutive tool results become one user turn, so that roles still alternate.
fn merge_tool_responses(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for message in messages {
        let is_response = |m: &ChatMessage| {
            m.role == "user"
                && m.content
                    .as_deref()
                    .is_some_and(|c| c.starts_with("<tool_response>"))
        };
        if let Some(last) = out.last_mut() {
            if is_response(last) && is_response(&message) {
                let joined = format!(
                    "{}\n{}",
                    last.content.as_deref().unwrap_or_default(),
                    message.content.as_deref().unwrap_or_default()
                );
                last.content = Some(joined);
                continue;
            }
        }
        out.push(message);
    }
    out
}
