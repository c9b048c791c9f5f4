//! Structured output fields of the OpenAI routes: `response_format` (OpenAI) and vLLM's
//! `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar` extras, turned into one
//! checked llguidance grammar.

use serde::Deserialize;
use serde_json::Value;

use crate::constraint::{self, closed_objects, ConstraintError, ConstraintSource, FieldConstraint};
use crate::error::ApiError;

#[derive(Debug, Default, Deserialize)]
pub struct StructuredFields {
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

pub fn constraint_error(error: ConstraintError) -> ApiError {
    ApiError::Validation(error.to_string())
}

impl StructuredFields {
    /// The one constraint these fields ask for, if any (two are refused).
    pub fn constraint(&self) -> Result<Option<FieldConstraint>, ApiError> {
        let mut found = Vec::new();
        if let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) {
            found.extend(response_format(format)?);
        }
        if let Some(schema) = self.guided_json.as_ref().filter(|s| !s.is_null()) {
            found.push(FieldConstraint::new(
                "guided_json",
                ConstraintSource::JsonSchema(schema_value("guided_json", schema)?),
            ));
        }
        if let Some(regex) = &self.guided_regex {
            found.push(FieldConstraint::new(
                "guided_regex",
                ConstraintSource::Regex(regex.clone()),
            ));
        }
        if let Some(choices) = &self.guided_choice {
            found.push(FieldConstraint::new(
                "guided_choice",
                ConstraintSource::Choice(choices.clone()),
            ));
        }
        if let Some(grammar) = &self.guided_grammar {
            found.push(FieldConstraint::new(
                "guided_grammar",
                ConstraintSource::Lark(grammar.clone()),
            ));
        }
        constraint::single(found).map_err(constraint_error)
    }
}

/// `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn response_format(format: &Value) -> Result<Option<FieldConstraint>, ApiError> {
    let refuse =
        |field: &str, message: &str| Err(constraint_error(ConstraintError::new(field, message)));
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(FieldConstraint::new(
            "response_format",
            ConstraintSource::JsonObject,
        ))),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return refuse("response_format.json_schema", "must be an object");
            };
            let field = "response_format.json_schema.schema";
            // Strict, as OpenAI means it: objects take only the properties they name.
            let strict = spec.get("strict").and_then(Value::as_bool) == Some(true);
            match spec.get("schema") {
                None | Some(Value::Null) => refuse(field, "a JSON schema is required"),
                Some(schema) => {
                    let schema = schema_value(field, schema)?;
                    let schema = if strict {
                        closed_objects(&schema)
                    } else {
                        schema
                    };
                    Ok(Some(FieldConstraint::new(
                        field,
                        ConstraintSource::JsonSchema(schema),
                    )))
                }
            }
        }
        _ => refuse(
            "response_format.type",
            "must be \"text\", \"json_object\" or \"json_schema\"",
        ),
    }
}

/// A schema given as JSON, or as a string holding JSON (vLLM takes both).
pub fn schema_value(field: &str, value: &Value) -> Result<Value, ApiError> {
    match value {
        Value::String(text) => serde_json::from_str(text).map_err(|err| {
            constraint_error(ConstraintError::new(
                field,
                format!("not valid JSON: {err}"),
            ))
        }),
        other => Ok(other.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(body: Value) -> StructuredFields {
        serde_json::from_value(body).unwrap()
    }

    fn refused(body: Value) -> String {
        match fields(body).constraint() {
            Err(ApiError::Validation(message)) => message,
            other => panic!("expected 422, got {other:?}"),
        }
    }

    #[test]
    fn each_form_becomes_one_constraint() {
        let cases = [
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"guided_json": "{\"type\": \"integer\"}"}),
                "guided_json",
            ),
            (json!({"guided_regex": "[a-z]+"}), "guided_regex"),
            (json!({"guided_choice": ["yes", "no"]}), "guided_choice"),
            (json!({"guided_grammar": "start: \"a\"+"}), "guided_grammar"),
        ];
        for (body, field) in cases {
            let found = fields(body.clone()).constraint().unwrap().unwrap();
            assert_eq!(found.field, field, "{body}");
            assert!(found.grammar().is_ok(), "{body}");
        }
        let text = fields(json!({"response_format": {"type": "text"}}));
        assert_eq!(text.constraint().unwrap(), None);
    }

    #[test]
    fn bad_forms_name_their_field() {
        assert!(
            refused(json!({"response_format": {"type": "xml"}})).contains("response_format.type")
        );
        assert!(refused(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
        )
        .contains("response_format.json_schema.schema"));
        assert!(refused(json!({"guided_json": "{nope"})).contains("guided_json"));
        let two = refused(json!({"guided_regex": "a", "guided_choice": ["a"]}));
        assert!(
            two.contains("guided_choice") && two.contains("only one"),
            "{two}"
        );
    }
}
