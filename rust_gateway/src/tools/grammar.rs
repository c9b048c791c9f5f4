//! The grammar that makes `tool_choice: "required"` or a named function hold: the output is
//! one call (or, with `parallel_tool_calls`, several) in the family's own syntax, each call's
//! arguments following its function's parameter schema (llguidance's `%json` inside Lark).

use crate::constraint::{
    check_grammar, lark_grammar, lark_literal, with_output_style, ConstraintError,
};

use super::{ToolChoice, ToolFormat, ToolRequest, ToolSpec};

/// The grammar for a forcing choice; `None` for `auto` and `none`. `marker_token` is the id of
/// the format's opening marker when the tokenizer has it as one special token.
pub fn tool_grammar(
    request: &ToolRequest,
    format: ToolFormat,
    marker_token: Option<u32>,
) -> Result<Option<String>, ConstraintError> {
    if !matches!(request.choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Ok(None);
    }
    let lark = tool_lark(request, format, marker_token);
    let grammar = lark_grammar(&lark);
    check_grammar("tool_choice", &grammar)?;
    Ok(Some(grammar))
}

/// The Lark source (see the module docs of `tools` for each family's syntax).
pub fn tool_lark(request: &ToolRequest, format: ToolFormat, marker_token: Option<u32>) -> String {
    let callable = request.callable();
    let mut rules = Vec::new();
    let names: Vec<String> = (0..callable.len()).map(|i| format!("call_{i}")).collect();
    rules.push(format!("call: {}", names.join(" | ")));
    for (i, tool) in callable.iter().enumerate() {
        rules.push(call_rule(format, i, tool));
        // The schema goes on one line: a `%json` body is a JSON value.
        let schema = serde_json::to_string(&with_output_style(&tool.parameters))
            .unwrap_or_else(|_| "{}".into());
        rules.push(format!("args_{i}: %json {schema}"));
    }
    let (separator, open, close) = match format {
        ToolFormat::Hermes => ("\n", String::new(), String::new()),
        ToolFormat::Llama3 => ("; ", String::new(), String::new()),
        ToolFormat::Mistral => {
            let marker = match marker_token {
                Some(id) => format!("<[{id}]>"),
                None => lark_literal("[TOOL_CALLS]"),
            };
            (", ", format!("{marker} \" [\" "), " \"]\"".to_owned())
        }
    };
    let calls = if request.parallel {
        format!("call ({} call)*", lark_literal(separator))
    } else {
        "call".to_owned()
    };
    let mut lark = format!("start: {open}{calls}{close}\n");
    lark.push_str(&rules.join("\n"));
    lark.push('\n');
    lark
}

fn call_rule(format: ToolFormat, index: usize, tool: &ToolSpec) -> String {
    let name = serde_json::to_string(&tool.name).unwrap_or_default();
    let (before, after) = match format {
        ToolFormat::Hermes => (
            format!("<tool_call>\n{{\"name\": {name}, \"arguments\": "),
            "}\n</tool_call>",
        ),
        ToolFormat::Llama3 => (format!("{{\"name\": {name}, \"parameters\": "), "}"),
        ToolFormat::Mistral => (format!("{{\"name\": {name}, \"arguments\": "), "}"),
    };
    format!(
        "call_{index}: {} args_{index} {}",
        lark_literal(&before),
        lark_literal(after)
    )
}
