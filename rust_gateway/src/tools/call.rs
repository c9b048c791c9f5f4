//! One parsed tool call, as OpenAI's `tool_calls` entries carry it.

use serde_json::Value;

use super::ToolFormat;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

impl ToolCall {
    /// A call from the model's JSON: `{"name": str, <arguments_key>: object or JSON string}`;
    /// `None` when it is not shaped so.
    pub fn from_json(format: ToolFormat, value: &Value) -> Option<Self> {
        let object = value.as_object()?;
        let name = object.get("name")?.as_str()?.trim();
        if name.is_empty() {
            return None;
        }
        let arguments = ["arguments", "parameters"]
            .iter()
            .find_map(|key| object.get(*key))
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let arguments = match arguments {
            Value::Object(map) => serde_json::to_string(&map).ok()?,
            // Some models write the arguments as a JSON string, as OpenAI sends them.
            Value::String(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => serde_json::to_string(&map).ok()?,
                _ => return None,
            },
            _ => return None,
        };
        Some(Self {
            id: new_id(format),
            name: name.to_owned(),
            arguments,
        })
    }
}

/// `call_` and 24 random characters; Mistral's template insists on 9 alphanumerics.
fn new_id(format: ToolFormat) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    match format {
        ToolFormat::Mistral => random[..9].to_owned(),
        ToolFormat::Hermes | ToolFormat::Llama3 => format!("call_{}", &random[..24]),
    }
}
