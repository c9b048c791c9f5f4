//! Text on the gateway's side of the protocol: tokenizer, incremental detokenizer, stop strings.

pub mod detokenizer;
pub mod stop;
pub mod tokenizer;

pub use detokenizer::IncrementalDecoder;
pub use stop::{StopMatcher, StopOutcome};
pub use tokenizer::TextTokenizer;
