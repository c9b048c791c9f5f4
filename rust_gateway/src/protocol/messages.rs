//! The messages of docs/protocol.md. Fields are declared in the document's key order, and
//! `rmp_serde::to_vec_named` writes them in declaration order, so encodings are canonical.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 2;

/// Messages the worker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello {
        version: u32,
        pid: u32,
    },
    Phase {
        name: String,
        ms: f64,
    },
    Ready(ReadyInfo),
    Outputs {
        step: u64,
        items: Vec<OutputItem>,
    },
    Error {
        id: u64,
        message: String,
    },
    Stats(WorkerStats),
    /// One entry per prompt token from the second on: its logprob and top alternatives.
    PromptLogprobs {
        id: u64,
        items: Vec<PromptLogprob>,
    },
    Fatal {
        message: String,
    },
}

/// Messages the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum GatewayMessage {
    Welcome {
        version: u32,
    },
    Reject {
        reason: String,
    },
    Submit {
        id: u64,
        prompt: Vec<u32>,
        params: Params,
        /// An earlier request with the same prompt whose prefill this one waits for (`n`).
        fork_of: Option<u64>,
    },
    Cancel {
        id: u64,
    },
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub model: String,
    pub max_context: u32,
    pub kv_blocks: u64,
    pub block_size: u32,
    pub max_running: u32,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub running: u32,
    pub waiting: u32,
    pub kv_used: u64,
    pub kv_total: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
}

/// One request's result of one engine step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputItem {
    pub id: u64,
    pub token: Option<u32>,
    pub logprob: Option<f64>,
    pub top: Option<Vec<(u32, f64)>>,
    pub finish: Option<WireFinish>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFinish {
    EosToken,
    Length,
    Cancelled,
}

/// Sampling parameters of a `submit`, already validated by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub max_new_tokens: u32,
    pub temperature: f64,
    pub top_k: u32,
    pub top_p: f64,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: Option<u64>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub logprobs: u32,
    /// `(token, bias)` pairs added to the logits before any other sampling step.
    pub logit_bias: Vec<(u32, f64)>,
    /// EOS and stop token ids cannot be sampled before this many tokens (0 = off).
    pub min_tokens: u32,
    /// An llguidance grammar (serialized `TopLevelGrammar`) every sampled token must satisfy.
    pub constraint: Option<String>,
    /// Logprobs of the prompt's tokens with this many alternatives each (`None` = none).
    pub prompt_logprobs: Option<u32>,
}

/// A prompt token's logprob and its alternatives (`None` when none were asked for).
pub type PromptLogprob = (f64, Option<Vec<(u32, f64)>>);

/// A test fixture (greedy, 16 tokens); the defaults clients get are validation's.
#[cfg(test)]
impl Default for Params {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: 0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            constraint: None,
            prompt_logprobs: None,
        }
    }
}
