//! Asynchronous jobs with RunPod semantics: the store, the runner, the input format, webhooks
//! (and which addresses they may reach).

mod address;
mod input;
mod output;
mod runner;
mod store;
mod webhook;

pub use input::{JobRequest, RunBody};
pub use output::JobFormat;
pub use runner::{run_job, JobContext, JobSpec};
pub use store::{JobStatus, JobStore, JobView, StoreFull};
pub use webhook::{WebhookPolicy, Webhooks};
