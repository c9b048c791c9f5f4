//! Gateway ↔ worker protocol, version 2 (docs/protocol.md): messages and frames.

mod frames;
mod messages;

pub use frames::{decode_body, read_body, write_message};
#[cfg(test)]
pub use frames::{encode, FrameError};
pub use messages::{
    GatewayMessage, OutputItem, Params, PromptLogprob, ReadyInfo, WireFinish, WorkerMessage,
    PROTOCOL_VERSION,
};

#[cfg(test)]
mod golden_tests;
