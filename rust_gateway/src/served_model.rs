//! The model the gateway serves, as the gateway sees it: what it reads from the snapshot
//! directory (tokenizer, chat template, model id, EOS ids, context length, generation
//! defaults) and the prompt and generation limits these give together with the configuration.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::config::Config;
use crate::text::TextTokenizer;
use crate::tools::ToolSupport;

/// Context used when config.json does not say.
const FALLBACK_CONTEXT: usize = 4096;
const FALLBACK_MAX_NEW_TOKENS: u32 = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub default_max_new_tokens: u32,
}

impl Limits {
    pub fn new(config: &Config, context_length: Option<usize>, model_default: Option<u32>) -> Self {
        let context = context_length.unwrap_or(FALLBACK_CONTEXT);
        let max_total_tokens = config.max_total_tokens.unwrap_or(context).max(2);
        let max_input_tokens = config
            .max_input_tokens
            .unwrap_or(max_total_tokens - 1)
            .min(max_total_tokens - 1)
            .max(1);
        let default_max_new_tokens = config
            .default_max_new_tokens
            .or(model_default)
            .unwrap_or(FALLBACK_MAX_NEW_TOKENS)
            .max(1);
        Self {
            max_input_tokens,
            max_total_tokens,
            default_max_new_tokens,
        }
    }

    /// These limits within the worker's context (`max_context` of its `ready`): the worker
    /// refuses a prompt of `max_context` tokens or more and stops a sequence at `max_context`.
    pub fn clamped(&self, worker_max_context: Option<usize>) -> Self {
        let Some(context) = worker_max_context else {
            return self.clone();
        };
        let max_total_tokens = self.max_total_tokens.min(context).max(2);
        Self {
            max_input_tokens: self.max_input_tokens.min(max_total_tokens - 1),
            max_total_tokens,
            default_max_new_tokens: self.default_max_new_tokens,
        }
    }
}

pub struct ServedModel {
    pub tokenizer: TextTokenizer,
    pub model_id: String,
    pub eos_token_ids: Vec<u32>,
    /// The snapshot's chat template; `None` when it has none (or a broken one, logged).
    pub chat_template: Option<ChatTemplate>,
    /// How the model writes tool calls (from its template, or THAW_TOOL_PARSER).
    pub tools: ToolSupport,
    /// Prompt and generation limits: the model's, unless the configuration overrides them.
    pub limits: Limits,
}

pub type SharedModel = Arc<ServedModel>;

pub fn load(dir: &Path, config: &Config) -> Result<ServedModel, String> {
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let model_config = read_json(&dir.join("config.json"))?;
    let generation = read_json(&dir.join("generation_config.json"))?;
    let model_id = model_config
        .get("_name_or_path")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| dir_name(dir));
    let mut eos_token_ids = token_ids(generation.get("eos_token_id"));
    if eos_token_ids.is_empty() {
        eos_token_ids = token_ids(model_config.get("eos_token_id"));
    }
    let context_length = model_config
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    let default_max_new_tokens = generation
        .get("max_new_tokens")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    let chat_template = ChatTemplate::from_snapshot_dir(dir).unwrap_or_else(|err| {
        tracing::warn!(%err, "ignoring the snapshot's chat template");
        None
    });
    let mut tools = ToolSupport::new(
        chat_template.as_ref().map(ChatTemplate::source),
        config.tool_parser,
    );
    tools.marker_token = tools
        .format
        .marker()
        .and_then(|marker| special_token_id(&tokenizer, marker));
    Ok(ServedModel {
        tokenizer,
        chat_template,
        tools,
        model_id,
        eos_token_ids,
        limits: Limits::new(config, context_length, default_max_new_tokens),
    })
}

/// The id of `text` when the tokenizer holds it as one special token.
fn special_token_id(tokenizer: &TextTokenizer, text: &str) -> Option<u32> {
    match tokenizer.encode(text, false).ok()?.as_slice() {
        [id] if tokenizer.is_special(*id) => Some(*id),
        _ => None,
    }
}

/// A missing optional JSON file reads as an empty object; a broken one is an error.
fn read_json(path: &Path) -> Result<Value, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|err| format!("{}: {err}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Ok(Value::Object(Default::default()))
        }
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_u64)
            .map(|id| id as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_from_number_or_list() {
        assert_eq!(token_ids(Some(&serde_json::json!(2))), vec![2]);
        assert_eq!(token_ids(Some(&serde_json::json!([0, 2]))), vec![0, 2]);
        assert!(token_ids(None).is_empty());
    }

    #[test]
    fn limits_follow_the_model_unless_configured() {
        use clap::Parser;
        let config = Config::try_parse_from(["thaw-gateway"]).unwrap();
        let limits = Limits::new(&config, Some(2048), Some(64));
        assert_eq!(
            limits,
            Limits {
                max_input_tokens: 2047,
                max_total_tokens: 2048,
                default_max_new_tokens: 64
            }
        );
        let config = Config::try_parse_from(["thaw-gateway", "--max-input-tokens", "100"]).unwrap();
        assert_eq!(Limits::new(&config, None, None).max_input_tokens, 100);
    }

    #[test]
    fn limits_are_clamped_to_the_workers_context() {
        let limits = Limits {
            max_input_tokens: 2047,
            max_total_tokens: 2048,
            default_max_new_tokens: 64,
        };
        assert_eq!(limits.clamped(None), limits);
        assert_eq!(limits.clamped(Some(4096)), limits);
        let clamped = limits.clamped(Some(512));
        assert_eq!(
            (clamped.max_input_tokens, clamped.max_total_tokens),
            (511, 512)
        );
        let configured = Limits {
            max_input_tokens: 100,
            ..limits
        };
        assert_eq!(configured.clamped(Some(512)).max_input_tokens, 100);
    }
}
