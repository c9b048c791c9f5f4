//! Command-line flags and environment variables (each flag has an env twin; see docs/gateway.md).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::tools::ToolFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "thaw-gateway",
    version,
    about = "HTTP gateway of thaw: answers health checks at once, queues requests while the \
             worker loads, supervises the worker and serves TGI- and RunPod-style APIs."
)]
pub struct Config {
    /// Port of the API (and of the probes unless --port-health is set).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// Optional second port that serves only /health, /ping and /ready.
    #[arg(long, env = "PORT_HEALTH")]
    pub port_health: Option<u16>,

    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Snapshot directory: tokenizer.json, config.json, generation_config.json, *.safetensors.
    #[arg(long, env = "THAW_SNAPSHOT", default_value = ".thaw/snapshots/default")]
    pub snapshot: PathBuf,

    /// Command that starts the worker, split like a shell would split it.
    #[arg(
        long,
        env = "THAW_WORKER_CMD",
        default_value = "python3 -m handler.worker"
    )]
    pub worker_cmd: String,

    /// When set, every route but /health and /ping needs `Authorization: Bearer <key>`.
    #[arg(long, env = "THAW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Most requests waiting in the gateway for a worker slot; more get 429.
    #[arg(long, env = "THAW_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Most requests handed to the worker at once (also capped by the worker's max_running).
    #[arg(long, env = "THAW_MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,

    /// Longest prompt in tokens (default: the model's context minus one).
    #[arg(long, env = "THAW_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,

    /// Longest prompt plus new tokens (default: the model's context).
    #[arg(long, env = "THAW_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,

    /// New tokens when a request does not say (default: generation_config.json's, else 256).
    #[arg(long, env = "THAW_DEFAULT_MAX_NEW_TOKENS")]
    pub default_max_new_tokens: Option<u32>,

    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "THAW_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a finished /run job stays readable.
    #[arg(long, env = "THAW_JOB_RETENTION_S", default_value_t = 1800.0)]
    pub job_retention_s: f64,

    /// Seconds a finished /runsync job stays readable.
    #[arg(long, env = "THAW_RUNSYNC_RETENTION_S", default_value_t = 60.0)]
    pub runsync_retention_s: f64,

    /// Seconds a request waits for a worker that is not ready before it gets 503.
    #[arg(long, env = "THAW_READY_WAIT_S", default_value_t = 120.0)]
    pub ready_wait_s: f64,

    /// Log format.
    #[arg(long, env = "THAW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Exit 0 after this many seconds without requests, counted from ready (scale to zero).
    /// Off when unset.
    #[arg(long, env = "THAW_IDLE_TIMEOUT")]
    pub idle_timeout_s: Option<f64>,

    /// Seconds running requests get to finish after SIGTERM.
    #[arg(long, env = "THAW_SHUTDOWN_GRACE_S", default_value_t = 30.0)]
    pub shutdown_grace_s: f64,

    /// Consecutive worker starts that may fail before start-up is declared failed.
    #[arg(long, env = "THAW_MAX_START_FAILURES", default_value_t = 3)]
    pub max_start_failures: u32,

    /// First restart delay in milliseconds; doubles with each consecutive failure.
    #[arg(long, env = "THAW_RESTART_BACKOFF_MS", default_value_t = 500)]
    pub restart_backoff_ms: u64,

    /// Seconds a worker may take from spawn to `ready` before it is killed as a failed start.
    #[arg(long, env = "THAW_WORKER_START_TIMEOUT_S", default_value_t = 900.0)]
    pub worker_start_timeout_s: f64,

    /// Read the snapshot's weight files into the page cache while the worker imports torch.
    #[arg(long, env = "THAW_PREFETCH_WEIGHTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefetch_weights: bool,

    // Slow clients, floods and crash loops.
    /// Seconds a client may take to send a request's headers, and the longest an idle
    /// connection stays open; then it is closed (0: no limit).
    #[arg(long, env = "THAW_HEADER_READ_TIMEOUT_S", default_value_t = 10.0)]
    pub header_read_timeout_s: f64,

    /// Seconds a client may take to send a request's body; then 408 (0: no limit).
    #[arg(long, env = "THAW_BODY_READ_TIMEOUT_S", default_value_t = 30.0)]
    pub body_read_timeout_s: f64,

    /// Most open connections per listening port; more wait to be accepted.
    #[arg(long, env = "THAW_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Worker exits within THAW_CRASH_LOOP_WINDOW_S after which it is not restarted and
    /// /ping answers 503 (0: restart forever).
    #[arg(long, env = "THAW_CRASH_LOOP_CRASHES", default_value_t = 5)]
    pub crash_loop_crashes: u32,

    /// The crash-loop breaker's window in seconds.
    #[arg(long, env = "THAW_CRASH_LOOP_WINDOW_S", default_value_t = 120.0)]
    pub crash_loop_window_s: f64,

    // Security: who may call, where webhooks may go, what the worker sees.
    /// Serve without THAW_API_KEY on a non-loopback address. Only behind a proxy that
    /// authenticates callers itself (RunPod's); without this or a key, such a start is refused.
    #[arg(long, env = "THAW_ALLOW_UNAUTHENTICATED", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub allow_unauthenticated: bool,

    /// Webhook targets allowed although not public: CIDRs, addresses or host names, comma-separated.
    #[arg(long, env = "THAW_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,

    /// Webhooks only to THAW_WEBHOOK_ALLOW targets (names are never looked up otherwise).
    #[arg(long, env = "THAW_WEBHOOK_ALLOWLIST_ONLY", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub webhook_allowlist_only: bool,

    /// Most jobs held at once (running, queued or kept for retention); more get 429.
    #[arg(long, env = "THAW_MAX_JOBS", default_value_t = 10_000)]
    pub max_jobs: usize,

    /// How the served model writes tool calls: hermes, llama3 or mistral (default: detected
    /// from its chat template).
    #[arg(long, env = "THAW_TOOL_PARSER", value_enum)]
    pub tool_parser: Option<ToolFormat>,

    /// Extra environment variables the worker gets, comma-separated (`NAME` or `PREFIX_*`).
    #[arg(long, env = "THAW_WORKER_ENV_PASS", value_delimiter = ',')]
    pub worker_env_pass: Vec<String>,
}

impl Config {
    pub fn ready_wait(&self) -> Duration {
        secs(self.ready_wait_s)
    }

    pub fn shutdown_grace(&self) -> Duration {
        secs(self.shutdown_grace_s)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout_s.map(secs)
    }

    pub fn job_retention(&self) -> Duration {
        secs(self.job_retention_s)
    }

    pub fn runsync_retention(&self) -> Duration {
        secs(self.runsync_retention_s)
    }

    pub fn header_read_timeout(&self) -> Option<Duration> {
        positive_secs(self.header_read_timeout_s)
    }

    pub fn body_read_timeout(&self) -> Option<Duration> {
        positive_secs(self.body_read_timeout_s)
    }
}

/// Seconds from a flag as a Duration; negative or NaN values count as zero.
pub fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}

/// A timeout from a flag where 0 (or less) means none.
fn positive_secs(value: f64) -> Option<Duration> {
    Some(secs(value)).filter(|duration| !duration.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let cfg = Config::try_parse_from(["thaw-gateway"]).expect("defaults");
        // The environment of whoever runs the tests may set some of these.
        let unset = |name: &str| std::env::var_os(name).is_none();
        if unset("PORT") {
            assert_eq!(cfg.port, 8080);
        }
        if unset("THAW_WORKER_CMD") {
            assert_eq!(cfg.worker_cmd, "python3 -m handler.worker");
        }
        if unset("THAW_PREFETCH_WEIGHTS") {
            assert!(cfg.prefetch_weights);
        }
    }

    #[test]
    fn flags_override() {
        let cfg = Config::try_parse_from([
            "thaw-gateway",
            "--port",
            "9000",
            "--log-format",
            "json",
            "--prefetch-weights",
            "false",
        ])
        .expect("flags");
        assert_eq!(cfg.port, 9000);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert!(!cfg.prefetch_weights);
    }

    #[test]
    fn negative_seconds_are_zero() {
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::NAN), Duration::ZERO);
    }
}
