//! OpenAI's chat and completions APIs on top of the generator: request parsing and checks
//! (`request`), response objects (`response`) and their assembly from text events (`builder`).
//! Used by the `/v1/*` routes and by jobs whose input names an `openai_route`.

mod builder;
mod request;
mod response;
mod structured;
mod tool_calls;

pub use builder::{unix_seconds, ResponseBuilder};
pub use request::{ChatRequest, CompletionRequest, OpenAiRequest, OutputOptions, SamplingFields};
pub use response::{ModelCard, ModelList};
