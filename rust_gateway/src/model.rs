//! What the gateway reads from the snapshot directory: tokenizer, model limits, generation
//! defaults; and the page-cache warm-up of the weight files.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::config::Config;
use crate::text::TextTokenizer;
use crate::validation::Limits;

pub struct ModelInfo {
    pub tokenizer: TextTokenizer,
    pub model_id: String,
    pub eos_token_ids: Vec<u32>,
    /// The snapshot's chat template; `None` when it has none (or a broken one, logged).
    pub chat_template: Option<ChatTemplate>,
    /// Prompt and generation limits: the model's, unless the configuration overrides them.
    pub limits: Limits,
}

pub type SharedModel = Arc<ModelInfo>;

pub fn load(dir: &Path, config: &Config) -> Result<ModelInfo, String> {
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
    Ok(ModelInfo {
        tokenizer,
        chat_template,
        model_id,
        eos_token_ids,
        limits: Limits::new(config, context_length, default_max_new_tokens),
    })
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

/// Reads every `*.safetensors` file once, sequentially, so that the worker's mmap finds the
/// pages already cached. Returns the bytes read.
pub fn prefetch_weights(dir: &Path) -> std::io::Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    let mut buffer = vec![0u8; 8 << 20];
    let mut total = 0u64;
    for path in files {
        let mut file = File::open(&path)?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
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
    fn prefetch_reads_only_weight_files() {
        let dir = std::env::temp_dir().join(format!("thaw-prefetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.safetensors"), vec![1u8; 1000]).unwrap();
        std::fs::write(dir.join("b.safetensors"), vec![1u8; 24]).unwrap();
        std::fs::write(dir.join("notes.txt"), vec![1u8; 7]).unwrap();
        assert_eq!(prefetch_weights(&dir).unwrap(), 1024);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
