//! Tool calls in OpenAI's wire shapes: whole in a message, and as stream deltas (the call's
//! id, type and name first, then its arguments).

use serde::Serialize;

use crate::engine::FinishReason;
use crate::tools::ToolCall;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallObject {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

pub fn call_objects(calls: &[ToolCall]) -> Vec<ToolCallObject> {
    calls
        .iter()
        .map(|call| ToolCallObject {
            id: call.id.clone(),
            kind: "function",
            function: FunctionCall {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        })
        .collect()
}

/// Two deltas per call, numbered from `first` (the calls the choice streamed before).
pub fn call_deltas(first: usize, calls: &[ToolCall]) -> Vec<ToolCallDelta> {
    let mut deltas = Vec::with_capacity(2 * calls.len());
    for (offset, call) in calls.iter().enumerate() {
        let index = (first + offset) as u32;
        deltas.push(ToolCallDelta {
            index,
            id: Some(call.id.clone()),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(call.name.clone()),
                arguments: String::new(),
            },
        });
        deltas.push(ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: call.arguments.clone(),
            },
        });
    }
    deltas
}

/// `tool_calls` when the choice called a tool and was not cut short by the length limit.
pub fn finish_with_calls(reason: FinishReason, called: bool) -> Option<&'static str> {
    (called && reason != FinishReason::Length).then_some("tool_calls")
}

/// A message's content beside its calls: what preceded them, or null when that was blank.
pub fn content_beside(text: &str, calls: &[ToolCall]) -> Option<String> {
    if calls.is_empty() {
        return Some(text.to_owned());
    }
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::engine::FinishReason;
    use crate::generation::{Completion, GeneratedToken, TextEvent};
    use crate::openai::request::Surface;
    use crate::openai::{OutputOptions, ResponseBuilder};
    use crate::text::TextTokenizer;
    use crate::tools::ToolFormat;

    fn options(stream: bool, tool_calls: bool) -> OutputOptions {
        OutputOptions {
            surface: Surface::Chat,
            stream,
            include_usage: false,
            logprobs: None,
            n: 1,
            best_of: 1,
            echo: false,
            tool_calls,
        }
    }

    fn token(text: &str, special: bool, finish: Option<FinishReason>) -> TextEvent {
        TextEvent::Token(GeneratedToken {
            id: if special { 1 } else { 0 },
            text: text.to_owned(),
            logprob: Some(-0.5),
            special,
            top: Vec::new(),
            finish: finish.map(|reason| Completion {
                reason,
                generated_tokens: 4,
            }),
        })
    }

    /// Streams `events` through a builder; the chunks and the builder.
    fn run(
        stream: bool,
        tool_calls: bool,
        format: ToolFormat,
        events: Vec<TextEvent>,
    ) -> (Vec<Value>, ResponseBuilder) {
        let tokenizer = TextTokenizer::word_level(&["a", "[TOOL_CALLS]"]);
        let mut builder = ResponseBuilder::new(options(stream, tool_calls), "m", &[0, 0])
            .with_tool_format(format);
        let mut chunks = Vec::new();
        for event in events {
            if let Some(step) = builder.push(0, event, &tokenizer) {
                chunks.extend(builder.chunks(step));
            }
        }
        (chunks, builder)
    }

    fn hermes_events() -> Vec<TextEvent> {
        vec![
            token("I will look.", false, None),
            token("\n<tool_", false, None),
            token("call>\n{\"name\": \"get_weather\", ", false, None),
            token(
                "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                false,
                None,
            ),
            token("", false, Some(FinishReason::EosToken)),
        ]
    }

    #[test]
    fn a_whole_response_carries_the_calls() {
        let (_, builder) = run(false, true, ToolFormat::Hermes, hermes_events());
        let response = builder.response().unwrap();
        let choice = &response["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "I will look.");
        let call = &choice["message"]["tool_calls"][0];
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}));
    }

    #[test]
    fn without_tools_the_text_is_left_alone() {
        let (_, builder) = run(false, false, ToolFormat::Hermes, hermes_events());
        let response = builder.response().unwrap();
        let message = &response["choices"][0]["message"];
        assert!(message["content"].as_str().unwrap().contains("<tool_call>"));
        assert!(message.get("tool_calls").is_none());
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn a_stream_sends_text_then_the_call_in_two_deltas() {
        let (chunks, _) = run(true, true, ToolFormat::Hermes, hermes_events());
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        let text: String = deltas
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(text, "I will look.");
        let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
        assert_eq!(calls.len(), 2, "{chunks:?}");
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["type"], "function");
        assert_eq!(calls[0][0]["function"]["name"], "get_weather");
        assert_eq!(calls[0][0]["function"]["arguments"], "");
        assert!(calls[1][0].get("id").is_none());
        assert_eq!(calls[1][0]["function"]["arguments"], "{\"city\":\"Paris\"}");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(last["choices"][0]["delta"], json!({}));
    }

    #[test]
    fn a_skipped_special_marker_still_opens_the_calls() {
        let events = vec![
            token("", true, None),
            token(" [{\"name\": \"f\", \"arguments\": {}}]", false, None),
            token("", false, Some(FinishReason::EosToken)),
        ];
        let (_, builder) = run(false, true, ToolFormat::Mistral, events);
        let response = builder.response().unwrap();
        let message = &response["choices"][0]["message"];
        assert!(message["content"].is_null());
        assert_eq!(message["tool_calls"][0]["id"].as_str().unwrap().len(), 9);
    }

    #[test]
    fn a_call_cut_by_the_length_limit_finishes_with_length() {
        let events = vec![token(
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}",
            false,
            Some(FinishReason::Length),
        )];
        let (_, builder) = run(false, true, ToolFormat::Hermes, events);
        let response = builder.response().unwrap();
        assert_eq!(response["choices"][0]["finish_reason"], "length");
    }
}
