//! Structured output: every user-facing form of a constraint (OpenAI `response_format`, vLLM's
//! `guided_*` extras, TGI's `grammar`, tool choices) becomes one llguidance grammar, the
//! serialized `TopLevelGrammar` the worker hands to `LLMatcher`, and is compiled here before
//! the request is queued so that a grammar the engine cannot build is a 422, not a failed
//! generation.
//!
//! The sizes are capped first (`limits`): compiling is bounded by the grammar's size, and a
//! request body may be megabytes. Recursive `$ref`s are refused (`limits::check_schema`).

mod compile;
mod limits;
mod strict;

use serde_json::Value;

pub use compile::{check_grammar, lark_literal};
pub use limits::{check_schema, MAX_CHOICES, MAX_GRAMMAR_BYTES};
pub use strict::closed_objects;

/// Why a constraint was refused, with the request field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct ConstraintError {
    pub field: String,
    pub message: String,
}

impl ConstraintError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A constraint as the user gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSource {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    JsonSchema(Value),
    /// A regular expression the whole output must match.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// A constraint and the request field that carried it (named in errors).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldConstraint {
    pub field: String,
    pub source: ConstraintSource,
}

impl FieldConstraint {
    pub fn new(field: impl Into<String>, source: ConstraintSource) -> Self {
        Self {
            field: field.into(),
            source,
        }
    }

    /// The checked llguidance grammar (serialized `TopLevelGrammar`).
    pub fn grammar(&self) -> Result<String, ConstraintError> {
        let field = self.field.as_str();
        let grammar = match &self.source {
            ConstraintSource::JsonObject => {
                json_schema_grammar(&serde_json::json!({"type": "object"}))
            }
            ConstraintSource::JsonSchema(schema) => {
                check_schema(field, schema)?;
                json_schema_grammar(schema)
            }
            ConstraintSource::Regex(regex) => {
                limits::check_text(field, "regular expression", regex)?;
                grammar_json(llguidance::api::TopLevelGrammar::from_regex(regex))
            }
            ConstraintSource::Choice(choices) => choice_grammar(field, choices)?,
            ConstraintSource::Lark(lark) => {
                limits::check_text(field, "grammar", lark)?;
                lark_grammar(lark)
            }
        };
        check_grammar(field, &grammar)?;
        Ok(grammar)
    }
}

/// At most one constraint per request: two would have to be intersected, which no API asks for.
pub fn single(
    constraints: Vec<FieldConstraint>,
) -> Result<Option<FieldConstraint>, ConstraintError> {
    let mut constraints = constraints.into_iter();
    let first = constraints.next();
    if let (Some(first), Some(second)) = (&first, constraints.next()) {
        return Err(ConstraintError::new(
            second.field.clone(),
            format!(
                "only one constraint per request: `{}` is already given",
                first.field
            ),
        ));
    }
    Ok(first)
}

/// The grammar Python's `LLMatcher.grammar_from_json_schema` gives for `schema` in the
/// output style of [`with_output_style`].
pub fn json_schema_grammar(schema: &Value) -> String {
    grammar_json(llguidance::api::TopLevelGrammar::from_json_schema(
        with_output_style(schema),
    ))
}

/// `schema` with llguidance's JSON layout options set, unless the schema sets its own
/// (`x-guidance`): no free whitespace between tokens, and `", "` / `": "` separators as
/// `json.dumps` writes them. Free whitespace lets a small model sampled at temperature 1 emit
/// nothing but blanks until it runs out of tokens; a fixed layout leaves it only content to
/// choose, in the spacing models saw most in training.
pub fn with_output_style(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.entry(OUTPUT_STYLE_KEY).or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Where llguidance reads its JSON compile options inside a schema.
const OUTPUT_STYLE_KEY: &str = "x-guidance";

/// A Lark grammar as a serialized `TopLevelGrammar`.
pub fn lark_grammar(lark: &str) -> String {
    grammar_json(llguidance::api::TopLevelGrammar::from_lark(lark.to_owned()))
}

fn choice_grammar(field: &str, choices: &[String]) -> Result<String, ConstraintError> {
    if choices.is_empty() {
        return Err(ConstraintError::new(field, "must list at least one choice"));
    }
    if choices.len() > MAX_CHOICES {
        return Err(ConstraintError::new(
            field,
            format!("at most {MAX_CHOICES} choices (got {})", choices.len()),
        ));
    }
    let total: usize = choices.iter().map(String::len).sum();
    if total > MAX_GRAMMAR_BYTES {
        return Err(ConstraintError::new(
            field,
            format!("the choices may hold {MAX_GRAMMAR_BYTES} bytes at most (got {total})"),
        ));
    }
    if choices.iter().any(String::is_empty) {
        return Err(ConstraintError::new(field, "choices must not be empty"));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| lark_literal(c)).collect();
    Ok(lark_grammar(&format!(
        "start: {}",
        alternatives.join(" | ")
    )))
}

fn grammar_json(grammar: llguidance::api::TopLevelGrammar) -> String {
    // A struct of strings and JSON values always serializes.
    serde_json::to_string(&grammar).unwrap_or_default()
}

#[cfg(test)]
mod tests;
