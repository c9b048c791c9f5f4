use serde_json::json;

use super::limits::{MAX_ENUM_MEMBERS, MAX_SCHEMA_BYTES};
use super::*;

fn grammar(source: ConstraintSource) -> Result<String, ConstraintError> {
    FieldConstraint::new("f", source).grammar()
}

fn refused(source: ConstraintSource) -> String {
    match grammar(source) {
        Err(err) => {
            assert_eq!(err.field, "f");
            err.to_string()
        }
        Ok(g) => panic!("expected a refusal, got {g}"),
    }
}

#[test]
fn grammars_have_the_shape_python_produces() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let text = grammar(ConstraintSource::JsonSchema(schema.clone())).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        value["grammars"][0]["json_schema"],
        with_output_style(&schema)
    );
    let object: Value =
        serde_json::from_str(&grammar(ConstraintSource::JsonObject).unwrap()).unwrap();
    assert_eq!(
        object["grammars"][0]["json_schema"],
        with_output_style(&json!({"type": "object"}))
    );
    let regex: Value =
        serde_json::from_str(&grammar(ConstraintSource::Regex("a|b".into())).unwrap()).unwrap();
    assert_eq!(regex["grammars"][0]["lark_grammar"], "start: /a|b/");
    let choice: Value = serde_json::from_str(
        &grammar(ConstraintSource::Choice(vec![
            "yes".into(),
            "say \"no\"\n".into(),
        ]))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        choice["grammars"][0]["lark_grammar"],
        "start: \"yes\" | \"say \\\"no\\\"\\n\""
    );
    assert!(grammar(ConstraintSource::Lark(
        "start: \"a\"+ | %json {\"type\": \"integer\"}".into()
    ))
    .is_ok());
}

#[test]
fn json_is_laid_out_without_free_whitespace_unless_the_schema_says() {
    let styled = with_output_style(&json!({"type": "integer"}));
    assert_eq!(styled["x-guidance"]["whitespace_flexible"], json!(false));
    assert_eq!(styled["x-guidance"]["key_separator"], json!(": "));
    assert_eq!(styled["type"], json!("integer"));
    let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
    assert_eq!(with_output_style(&own), own);
    // A boolean schema has nowhere to hold options; it stays as it is.
    assert_eq!(with_output_style(&json!(true)), json!(true));
    assert!(grammar(ConstraintSource::JsonSchema(styled)).is_ok());
}

#[test]
fn malformed_input_carries_the_engines_message() {
    for source in [
        ConstraintSource::Regex("(unclosed".into()),
        ConstraintSource::Lark("start: undefined_rule".into()),
        ConstraintSource::JsonSchema(json!({"type": "no-such-type"})),
        ConstraintSource::JsonSchema(json!({"$ref": "http://example.com/schema"})),
        ConstraintSource::JsonSchema(json!("not a schema")),
    ] {
        let message = refused(source.clone());
        assert!(message.starts_with("`f`: "), "{source:?}: {message}");
        assert!(message.len() > "`f`: ".len() + 5, "{source:?}: {message}");
    }
}

#[test]
fn recursive_schemas_are_refused() {
    let direct = json!({"type": "object", "properties": {"child": {"$ref": "#"}}});
    assert!(refused(ConstraintSource::JsonSchema(direct)).contains("recursive"));
    let through_defs = json!({
        "$defs": {
            "node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/list"}}},
            "list": {"type": "array", "items": {"$ref": "#/$defs/node"}}
        },
        "$ref": "#/$defs/node"
    });
    assert!(refused(ConstraintSource::JsonSchema(through_defs)).contains("recursive"));
    // A definition used twice is shared, not recursive.
    let shared = json!({
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}
    });
    assert!(grammar(ConstraintSource::JsonSchema(shared)).is_ok());
    let dangling = json!({"$ref": "#/$defs/missing"});
    assert!(refused(ConstraintSource::JsonSchema(dangling)).contains("points to nothing"));
}

#[test]
fn sizes_are_capped() {
    let members: Vec<Value> = (0..=MAX_ENUM_MEMBERS).map(|i| json!(i)).collect();
    let huge_enum = json!({"enum": members});
    assert!(refused(ConstraintSource::JsonSchema(huge_enum)).contains("`enum`"));
    let allowed: Vec<Value> = (0..MAX_ENUM_MEMBERS)
        .map(|i| json!(format!("v{i}")))
        .collect();
    assert!(grammar(ConstraintSource::JsonSchema(json!({"enum": allowed}))).is_ok());
    let long = "x".repeat(MAX_SCHEMA_BYTES);
    let big = json!({"type": "string", "description": long});
    assert!(refused(ConstraintSource::JsonSchema(big)).contains("bytes"));
    let choices = vec!["c".to_string(); MAX_CHOICES + 1];
    assert!(refused(ConstraintSource::Choice(choices)).contains("choices"));
    assert!(refused(ConstraintSource::Choice(Vec::new())).contains("at least one"));
    assert!(refused(ConstraintSource::Regex("a".repeat(MAX_GRAMMAR_BYTES + 1))).contains("bytes"));
    assert!(refused(ConstraintSource::Lark("  ".into())).contains("empty"));
    let mut deep = json!({"type": "integer"});
    for _ in 0..100 {
        deep = json!({"type": "array", "items": deep});
    }
    assert!(refused(ConstraintSource::JsonSchema(deep)).contains("deeper"));
}

#[test]
fn one_constraint_per_request() {
    let a = FieldConstraint::new("guided_regex", ConstraintSource::Regex("a".into()));
    let b = FieldConstraint::new("response_format", ConstraintSource::JsonObject);
    assert_eq!(single(vec![a.clone()]).unwrap(), Some(a.clone()));
    assert_eq!(single(Vec::new()).unwrap(), None);
    let err = single(vec![a, b]).unwrap_err();
    assert_eq!(err.field, "response_format");
    assert!(err.message.contains("`guided_regex`"), "{err}");
}

#[test]
fn lark_literals_escape_what_lark_strings_cannot_hold() {
    assert_eq!(lark_literal("a\"b\\c"), "\"a\\\"b\\\\c\"");
    assert_eq!(lark_literal("\u{1}\u{7f}é"), "\"\\u0001\\u007fé\"");
    let lark = format!("start: {}", lark_literal("x\u{7f}\"\n\t\\y"));
    assert!(check_grammar("f", &lark_grammar(&lark)).is_ok());
}
