//! Strict schemas: objects take only the properties they name unless the schema says
//! otherwise (`additionalProperties` absent becomes `false`). OpenAI's strict mode requires
//! this of a schema, and a function's arguments are useless beyond its parameters, so tool
//! parameters and `strict` response formats are closed this way before compiling: without it
//! a model may pad the arguments with whatever keys it likes.

use serde_json::{Map, Value};

/// Keywords whose value is one schema.
const ONE_SCHEMA: &[&str] = &[
    "items",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
];
/// Keywords whose value is a list of schemas.
const SCHEMA_LISTS: &[&str] = &["prefixItems", "anyOf", "oneOf", "items"];
/// Keywords whose value maps names to schemas.
const SCHEMA_MAPS: &[&str] = &[
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];

/// `schema` with every object that names its properties closed to others.
pub fn closed_objects(schema: &Value) -> Value {
    let mut schema = schema.clone();
    close(&mut schema, false);
    schema
}

/// `in_all_of`: a branch of `allOf` stays open, or the branches would refuse each other's
/// properties.
fn close(node: &mut Value, in_all_of: bool) {
    let Value::Object(map) = node else {
        return;
    };
    let open =
        map.contains_key("additionalProperties") || map.contains_key("unevaluatedProperties");
    if map.contains_key("properties") && !open && !in_all_of {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (key, value) in map.iter_mut() {
        let key = key.as_str();
        if ONE_SCHEMA.contains(&key) {
            close(value, false);
        }
        if SCHEMA_LISTS.contains(&key) {
            if let Value::Array(items) = value {
                items.iter_mut().for_each(|item| close(item, false));
            }
        }
        if key == "allOf" {
            if let Value::Array(items) = value {
                items.iter_mut().for_each(|item| close(item, true));
            }
        }
        if SCHEMA_MAPS.contains(&key) {
            if let Value::Object(named) = value {
                close_named(named);
            }
        }
    }
}

fn close_named(named: &mut Map<String, Value>) {
    named.values_mut().for_each(|schema| close(schema, false));
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn objects_are_closed_unless_they_say_otherwise() {
        let schema = json!({
            "type": "object",
            "properties": {
                "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                "open": {"type": "object", "properties": {}, "additionalProperties": true},
                "list": {"type": "array", "items": {"properties": {"y": {}}}},
                "both": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
            },
            "$defs": {"d": {"properties": {"z": {}}}},
            "enum": [{"properties": 1}]
        });
        let closed = closed_objects(&schema);
        assert_eq!(closed["additionalProperties"], false);
        let props = &closed["properties"];
        assert!(
            props.get("additionalProperties").is_none(),
            "a name map is not a schema"
        );
        assert_eq!(props["properties"]["additionalProperties"], false);
        assert_eq!(props["open"]["additionalProperties"], true);
        assert_eq!(props["list"]["items"]["additionalProperties"], false);
        assert!(props["both"]["allOf"][0]
            .get("additionalProperties")
            .is_none());
        assert_eq!(closed["$defs"]["d"]["additionalProperties"], false);
        assert_eq!(closed["enum"], json!([{"properties": 1}]));
    }
}
