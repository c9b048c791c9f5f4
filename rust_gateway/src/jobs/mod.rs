//! Asynchronous jobs with RunPod semantics: the store, the runner, the input format, webhooks.

mod input;
mod output;
mod runner;
mod store;
mod webhook;

pub use input::{JobRequest, RunBody};
pub use output::JobFormat;
pub use runner::{run_job, JobContext, JobSpec};
pub use store::{JobStatus, JobStore, JobView};
