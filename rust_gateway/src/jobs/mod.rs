//! Asynchronous jobs with RunPod semantics: the store, the runner, the input format, webhooks.

mod input;
mod runner;
mod store;
mod webhook;

pub use input::RunBody;
pub use runner::{run_job, JobContext, JobSpec};
pub use store::{JobStore, JobView};
