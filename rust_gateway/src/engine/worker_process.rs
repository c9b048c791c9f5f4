//! Spawning the worker process and forwarding its output to the gateway's log.

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
    pub fn spawn(
        argv: &[String],
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
