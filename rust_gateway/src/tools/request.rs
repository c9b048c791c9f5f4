//! `tools`, `tool_choice` and `parallel_tool_calls` as OpenAI sends them, checked: function
//! names, parameter schemas (compiled as the grammar engine will), and a named choice that
//! exists.

use serde_json::Value;

use crate::constraint::{
    check_grammar, check_schema, closed_objects, json_schema_grammar, ConstraintError,
};

/// Most tools in one request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Longest function name (OpenAI's rule: letters, digits, `_` and `-`, 64 at most).
const MAX_NAME_CHARS: usize = 64;

/// One offered function.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// Its parameters' JSON schema (`{"type": "object"}` when none was given).
    pub parameters: Value,
    /// The tool object as the client sent it, for the chat template.
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools and how it wants them used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// `false`: at most one call.
    pub parallel: bool,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ConstraintError {
    ConstraintError::new(field, message)
}

impl ToolRequest {
    /// `None` when the request offers no tools (and names no choice that would need them).
    pub fn from_fields(
        tools: Option<&[Value]>,
        tool_choice: Option<&Value>,
        parallel_tool_calls: Option<bool>,
    ) -> Result<Option<Self>, ConstraintError> {
        let tools = tools.unwrap_or_default();
        if tools.len() > MAX_TOOLS {
            return Err(error(
                "tools",
                format!("at most {MAX_TOOLS} tools (got {})", tools.len()),
            ));
        }
        let specs = tools
            .iter()
            .enumerate()
            .map(|(i, tool)| tool_spec(i, tool))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i].iter().any(|other| other.name == spec.name) {
                return Err(error(
                    format!("tools[{i}].function.name"),
                    format!("\"{}\" is offered twice", spec.name),
                ));
            }
        }
        let choice = parse_choice(tool_choice, !specs.is_empty())?;
        if let ToolChoice::Named(name) = &choice {
            if !specs.iter().any(|spec| &spec.name == name) {
                return Err(error(
                    "tool_choice",
                    format!("names the function \"{name}\", which is not in `tools`"),
                ));
            }
        }
        if specs.is_empty() {
            if choice == ToolChoice::Required {
                return Err(error("tool_choice", "\"required\" needs `tools`"));
            }
            return Ok(None);
        }
        Ok(Some(Self {
            tools: specs,
            choice,
            parallel: parallel_tool_calls.unwrap_or(true),
        }))
    }

    /// Whether the tools go to the prompt and the output is parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// Whether a call is required (`required` or a named function): enforced by a grammar.
    pub fn forces(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// The tools a call may use: all of them, or the named one.
    pub fn callable(&self) -> Vec<&ToolSpec> {
        match &self.choice {
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// The tool objects for the chat template's `tools`.
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools.iter().map(|tool| tool.raw.clone()).collect()
    }
}

fn tool_spec(index: usize, tool: &Value) -> Result<ToolSpec, ConstraintError> {
    let field = format!("tools[{index}]");
    let kind = tool.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(error(
            format!("{field}.type"),
            "only tools of type \"function\" are supported",
        ));
    }
    let function = tool
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| error(format!("{field}.function"), "must be an object"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| error(format!("{field}.function.name"), "must be a string"))?;
    check_name(&format!("{field}.function.name"), name)?;
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => serde_json::json!({"type": "object"}),
        Some(schema) => {
            let field = format!("{field}.function.parameters");
            if !schema.is_object() {
                return Err(error(field, "must be a JSON schema object"));
            }
            check_schema(&field, schema)?;
            // Arguments beyond the declared parameters are of no use to the function.
            let schema = closed_objects(schema);
            check_grammar(&field, &json_schema_grammar(&schema))?;
            schema
        }
    };
    Ok(ToolSpec {
        name: name.to_owned(),
        parameters,
        raw: tool.clone(),
    })
}

fn check_name(field: &str, name: &str) -> Result<(), ConstraintError> {
    let valid = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(error(
            field,
            format!(
                "\"{name}\" is not a function name (1 to {MAX_NAME_CHARS} letters, digits, `_`, `-` or `.`)"
            ),
        ))
    }
}

fn parse_choice(value: Option<&Value>, has_tools: bool) -> Result<ToolChoice, ConstraintError> {
    let default = if has_tools {
        ToolChoice::Auto
    } else {
        ToolChoice::None
    };
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(text)) => match text.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(default),
            "required" => Ok(ToolChoice::Required),
            other => Err(error(
                "tool_choice",
                format!("must be \"none\", \"auto\", \"required\" or a function (got \"{other}\")"),
            )),
        },
        Some(Value::Object(map)) => {
            let name = map
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| map.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(name) => Ok(ToolChoice::Named(name.to_owned())),
                None => Err(error(
                    "tool_choice",
                    "a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )),
            }
        }
        Some(_) => Err(error(
            "tool_choice",
            "must be a string or {\"type\": \"function\", ...}",
        )),
    }
}
