//! Caps on what a request may ask the grammar engine to compile, and the schema shapes refused
//! before compiling: compile time grows with the grammar, and a body may be megabytes.

use std::collections::BTreeSet;

use serde_json::Value;

use super::ConstraintError;

/// Largest JSON schema (serialized) in bytes.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Most members of one `enum`.
pub const MAX_ENUM_MEMBERS: usize = 1024;
/// Most strings in a `guided_choice`.
pub const MAX_CHOICES: usize = 1024;
/// Largest regular expression, Lark grammar or list of choices in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// Deepest nesting of a schema; deeper ones are refused rather than walked.
const MAX_SCHEMA_DEPTH: usize = 64;

pub fn check_text(field: &str, what: &str, text: &str) -> Result<(), ConstraintError> {
    if text.trim().is_empty() {
        return Err(ConstraintError::new(field, format!("the {what} is empty")));
    }
    if text.len() > MAX_GRAMMAR_BYTES {
        return Err(ConstraintError::new(
            field,
            format!(
                "the {what} may be {MAX_GRAMMAR_BYTES} bytes long at most (got {})",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a JSON schema's size, its enums, and that no `$ref` leads back to itself.
pub fn check_schema(field: &str, schema: &Value) -> Result<(), ConstraintError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ConstraintError::new(
            field,
            "a JSON schema must be an object or a boolean",
        ));
    }
    let bytes = serde_json::to_string(schema).map_or(usize::MAX, |s| s.len());
    if bytes > MAX_SCHEMA_BYTES {
        return Err(ConstraintError::new(
            field,
            format!("the schema may be {MAX_SCHEMA_BYTES} bytes long at most (got {bytes})"),
        ));
    }
    let mut walk = Walk {
        field,
        root: schema,
        expanding: Vec::new(),
        finished: BTreeSet::new(),
    };
    walk.node(schema, 0)
}

struct Walk<'a> {
    field: &'a str,
    root: &'a Value,
    /// The `$ref`s being followed, outermost first.
    expanding: Vec<String>,
    /// `$ref`s already followed to their end.
    finished: BTreeSet<String>,
}

impl Walk<'_> {
    fn error(&self, message: String) -> ConstraintError {
        ConstraintError::new(self.field, message)
    }

    fn node(&mut self, node: &Value, depth: usize) -> Result<(), ConstraintError> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(self.error(format!(
                "the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
            )));
        }
        match node {
            Value::Object(map) => {
                if let Some(Value::Array(members)) = map.get("enum") {
                    if members.len() > MAX_ENUM_MEMBERS {
                        return Err(self.error(format!(
                            "an `enum` may list {MAX_ENUM_MEMBERS} members at most (got {})",
                            members.len()
                        )));
                    }
                }
                if let Some(Value::String(target)) = map.get("$ref") {
                    self.reference(target, depth)?;
                }
                for (key, value) in map {
                    // `enum` and `const` hold values, not schemas.
                    if key != "enum" && key != "const" && key != "examples" && key != "default" {
                        self.node(value, depth + 1)?;
                    }
                }
                Ok(())
            }
            Value::Array(items) => items.iter().try_for_each(|item| self.node(item, depth + 1)),
            _ => Ok(()),
        }
    }

    /// Follows a local `$ref` (`#` or `#/a/b`); others are left to the engine, which refuses
    /// what it cannot resolve.
    fn reference(&mut self, target: &str, depth: usize) -> Result<(), ConstraintError> {
        let Some(pointer) = target.strip_prefix('#') else {
            return Ok(());
        };
        if self.expanding.iter().any(|t| t == target) {
            return Err(self.error(format!(
                "recursive schemas are not supported (`$ref` \"{target}\" refers back to itself)"
            )));
        }
        if self.finished.contains(target) {
            return Ok(());
        }
        let Some(resolved) = resolve(self.root, pointer) else {
            return Err(self.error(format!("`$ref` \"{target}\" points to nothing")));
        };
        self.expanding.push(target.to_owned());
        self.node(resolved, depth + 1)?;
        self.expanding.pop();
        self.finished.insert(target.to_owned());
        Ok(())
    }
}

/// A JSON pointer (RFC 6901, percent-decoding aside) into `root`.
fn resolve<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(root);
    }
    let decoded = pointer.replace("%25", "%");
    root.pointer(&decoded)
}
