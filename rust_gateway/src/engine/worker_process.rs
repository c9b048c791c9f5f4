//! Spawning the worker process and forwarding its output to the gateway's log.
//!
//! The worker gets an allowlisted environment, not the gateway's: the API key and credentials
//! it does not use (cloud keys, RunPod's key) stay out of a process that runs model code and
//! writes logs.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::LogTail;

pub struct WorkerProcess {
    pub child: Child,
    forwarders: Vec<JoinHandle<()>>,
}

impl WorkerProcess {
    /// `env_pass`: names (or `PREFIX_*`) the operator lets through besides the allowlist.
    pub fn spawn(
        argv: &[String],
        env_pass: &[String],
        socket: &Path,
        snapshot: &Path,
        log: &LogTail,
    ) -> std::io::Result<Self> {
        let (program, args) = argv.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty worker command")
        })?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(worker_env(std::env::vars_os(), env_pass))
            .env("THAW_SOCKET", socket)
            .env("THAW_SNAPSHOT", snapshot)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // If the gateway dies without stopping the worker (SIGKILL, OOM killer), the kernel
        // kills the worker too, so no orphan keeps the GPU. The signal follows the spawning
        // thread, which is one of the runtime's worker threads: they live as long as the process.
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let mut forwarders = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            forwarders.push(tokio::spawn(forward_lines(stdout, "stdout", log.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward_lines(stderr, "stderr", log.clone())));
        }
        Ok(Self { child, forwarders })
    }

    /// Waits up to `grace` for the process to exit, then kills it. Returns how it ended.
    pub async fn reap(&mut self, grace: Duration) -> String {
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        };
        // Let the last lines reach the log tail before anyone reads it.
        for forwarder in self.forwarders.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), forwarder).await;
        }
        match status {
            Ok(status) => status.to_string(),
            Err(err) => format!("unknown exit ({err})"),
        }
    }
}

async fn forward_lines<R: AsyncRead + Unpin>(stream: R, name: &'static str, log: LogTail) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                tracing::info!(target: "worker", stream = name, "{text}");
                log.push(text);
            }
        }
    }
}

/// The worker's own settings (README's worker table) and what it reads besides.
const WORKER_SETTINGS: &[&str] = &[
    "THAW_DEVICE",
    "THAW_DTYPE",
    "THAW_KV_CACHE_BYTES",
    "THAW_MAX_NUM_SEQS",
    "THAW_MAX_BATCHED_TOKENS",
    "THAW_BLOCK_SIZE",
    "THAW_ATTENTION_BACKEND",
    "THAW_CPU_KERNELS",
    "THAW_GPU_MEMORY_FRACTION",
    "THAW_CUDA_GRAPH_MAX_BATCH",
    "THAW_FAULT_INJECT",
    "THAW_KERNEL_CACHE",
];

/// What any process needs to run: paths, locale, Python, and the CUDA / Triton / torch / OpenMP
/// tuning an operator may set. A `*` ends a prefix.
const PROCESS_BASICS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
    "PYTHON*",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_*",
    "NVIDIA_*",
    "TRITON_*",
    "TORCH*",
    "PYTORCH_*",
    "OMP_*",
    "KMP_*",
    "MKL_*",
    "OPENBLAS_*",
    "XDG_*",
    "CC",
];

/// Whether `name` matches `pattern`: the same name, or a prefix when the pattern ends in `*`.
fn matches(pattern: &str, name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The variables of `vars` the worker gets: its settings, the process basics and `extra`
/// (THAW_WORKER_ENV_PASS).
pub fn worker_env<I, S>(vars: I, extra: &[S]) -> Vec<(OsString, OsString)>
where
    I: IntoIterator<Item = (OsString, OsString)>,
    S: AsRef<str>,
{
    let passes = |name: &OsStr| {
        WORKER_SETTINGS
            .iter()
            .chain(PROCESS_BASICS)
            .any(|pattern| matches(pattern, name))
            || extra
                .iter()
                .map(|pattern| pattern.as_ref().trim())
                .any(|pattern| !pattern.is_empty() && matches(pattern, name))
    };
    vars.into_iter().filter(|(name, _)| passes(name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(names: &[&str]) -> Vec<(OsString, OsString)> {
        names
            .iter()
            .map(|name| (OsString::from(name), OsString::from("v")))
            .collect()
    }

    fn passed(names: &[&str], extra: &[&str]) -> Vec<String> {
        worker_env(env(names), extra)
            .into_iter()
            .map(|(name, _)| name.into_string().unwrap())
            .collect()
    }

    #[test]
    fn credentials_and_gateway_settings_stay_out() {
        let secrets = [
            "THAW_API_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "RUNPOD_API_KEY",
            "HF_TOKEN",
            "GITHUB_TOKEN",
            "THAW_WEBHOOK_ALLOW",
            "THAW_WORKER_CMD",
            "PORT",
            "LD_PRELOAD",
        ];
        assert!(passed(&secrets, &[]).is_empty());
    }

    #[test]
    fn the_worker_settings_and_process_basics_pass() {
        let needed = [
            "THAW_DEVICE",
            "THAW_DTYPE",
            "THAW_KV_CACHE_BYTES",
            "THAW_MAX_NUM_SEQS",
            "THAW_MAX_BATCHED_TOKENS",
            "THAW_BLOCK_SIZE",
            "THAW_ATTENTION_BACKEND",
            "THAW_CPU_KERNELS",
            "THAW_GPU_MEMORY_FRACTION",
            "THAW_CUDA_GRAPH_MAX_BATCH",
            "THAW_FAULT_INJECT",
            "THAW_KERNEL_CACHE",
            "PATH",
            "HOME",
            "LANG",
            "LC_ALL",
            "PYTHONPATH",
            "PYTHONUNBUFFERED",
            "VIRTUAL_ENV",
            "LD_LIBRARY_PATH",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_VISIBLE_DEVICES",
            "TRITON_CACHE_DIR",
            "TORCHINDUCTOR_CACHE_DIR",
            "PYTORCH_CUDA_ALLOC_CONF",
            "OMP_NUM_THREADS",
            "XDG_CACHE_HOME",
            "CC",
        ];
        assert_eq!(passed(&needed, &[]), needed);
    }

    #[test]
    fn extra_names_and_prefixes_pass_on_request() {
        let names = [
            "STUB_TOKENS",
            "STUB_MAX_RUNNING",
            "MY_FLAG",
            "OTHER",
            "HF_HOME",
        ];
        assert_eq!(
            passed(&names, &["STUB_*", " MY_FLAG ", "", "HF_HOME"]),
            ["STUB_TOKENS", "STUB_MAX_RUNNING", "MY_FLAG", "HF_HOME"]
        );
        // A bare `*` is an operator's explicit choice to pass everything.
        assert_eq!(passed(&["A", "B"], &["*"]), ["A", "B"]);
    }
}
