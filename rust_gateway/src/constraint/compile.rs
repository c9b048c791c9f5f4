//! Compiling a grammar with llguidance, as the worker's `LLMatcher` will, to refuse what it
//! cannot build before the request is queued.
//!
//! No tokenizer is needed: JSON schemas, regular expressions and Lark rules compile without
//! one, and the only token references we write are by id (`<[id]>`), which resolve without a
//! vocabulary too.

use std::panic::{catch_unwind, AssertUnwindSafe};

use llguidance::api::{GrammarInit, ParserLimits, TopLevelGrammar, ValidationResult};

use super::ConstraintError;

/// Compiles a serialized `TopLevelGrammar`; the error carries llguidance's message.
pub fn check_grammar(field: &str, grammar: &str) -> Result<(), ConstraintError> {
    let parsed: TopLevelGrammar = serde_json::from_str(grammar)
        .map_err(|err| ConstraintError::new(field, format!("not a grammar: {err}")))?;
    let limits = ParserLimits {
        // The message names the failing part; the grammar itself would only echo the request.
        verbose_errors: false,
        ..ParserLimits::default()
    };
    // llguidance reports malformed input as errors, but a panic must not take the
    // request's blocking thread (and with it the permit) down either.
    let result = catch_unwind(AssertUnwindSafe(|| {
        GrammarInit::Serialized(parsed).validate(None, limits)
    }));
    match result {
        Ok(ValidationResult::Error(message)) => Err(ConstraintError::new(field, message)),
        Ok(_) => Ok(()),
        Err(_) => Err(ConstraintError::new(
            field,
            "the grammar engine failed on it",
        )),
    }
}

/// `text` as a Lark string literal (JSON string syntax, control characters escaped).
pub fn lark_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
