//! The start-up work that runs while the port already answers: load the tokenizer, spawn and
//! supervise the worker, and read the weights into the page cache.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::engine::{LogTail, Supervisor, WorkerEvent, WorkerSpec};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::served_model;
use crate::state::ModelSlot;

/// Lines of worker output kept for /ready.
const LOG_TAIL_LINES: usize = 40;

/// A private directory holding the worker socket; removed at shutdown.
pub struct SocketDir {
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl SocketDir {
    pub fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!(
            "thaw-gateway-{}-{}",
            std::process::id(),
            &nonce[..8]
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let socket = dir.join("worker.sock");
        Ok(Self { dir, socket })
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawns the supervisor; returns its task, or `None` when the socket cannot be created.
pub fn start_worker(
    config: &Config,
    argv: Vec<String>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<WorkerEvent>,
    stop: watch::Receiver<bool>,
    sockets: &SocketDir,
) -> Option<JoinHandle<()>> {
    let listener = match UnixListener::bind(&sockets.socket) {
        Ok(listener) => listener,
        Err(err) => {
            let reason = format!("cannot listen on {}: {err}", sockets.socket.display());
            readiness.set_failed(reason.clone(), Vec::new());
            let _ = events.send(WorkerEvent::GaveUp(reason));
            return None;
        }
    };
    let supervisor = Supervisor {
        spec: WorkerSpec {
            argv,
            env_pass: config.worker_env_pass.clone(),
            snapshot: config.snapshot.clone(),
            max_start_failures: config.max_start_failures.max(1),
            backoff: std::time::Duration::from_millis(config.restart_backoff_ms),
            start_timeout: crate::config::secs(config.worker_start_timeout_s),
            max_crashes: config.crash_loop_crashes,
            crash_window: crate::config::secs(config.crash_loop_window_s),
        },
        readiness,
        metrics,
        events,
        log: LogTail::new(LOG_TAIL_LINES),
        stop,
    };
    Some(tokio::spawn(
        supervisor.run(listener, sockets.socket.clone()),
    ))
}

/// Loads tokenizer, chat template and limits off the async threads and publishes them.
pub fn load_model(config: Arc<Config>, readiness: Arc<Readiness>, slot: watch::Sender<ModelSlot>) {
    tokio::task::spawn_blocking(
        move || match served_model::load(&config.snapshot, &config) {
            Ok(info) => {
                readiness.record("tokenizer_loaded");
                readiness.set_model_loaded();
                tracing::info!(model = %info.model_id, "tokenizer loaded");
                slot.send_replace(ModelSlot::Loaded(Arc::new(info)));
            }
            Err(reason) => {
                let reason = format!("cannot load the snapshot's tokenizer: {reason}");
                tracing::error!(%reason);
                readiness.set_failed(reason.clone(), Vec::new());
                slot.send_replace(ModelSlot::Failed(reason));
            }
        },
    );
}

pub fn prefetch_weights(dir: &Path, readiness: Arc<Readiness>) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || match read_weights(&dir) {
        Ok(bytes) => {
            readiness.record("weights_prefetched");
            tracing::info!(bytes, "weights read into the page cache");
        }
        Err(err) => tracing::warn!(%err, "cannot prefetch the weights"),
    });
}

/// Reads every `*.safetensors` file once, sequentially, so that the worker's mmap finds the
/// pages already cached. Returns the bytes read.
fn read_weights(dir: &Path) -> std::io::Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    let mut buffer = vec![0u8; 8 << 20];
    let mut total = 0u64;
    for path in files {
        let mut file = File::open(&path)?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_reads_only_weight_files() {
        let dir = std::env::temp_dir().join(format!("thaw-prefetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.safetensors"), vec![1u8; 1000]).unwrap();
        std::fs::write(dir.join("b.safetensors"), vec![1u8; 24]).unwrap();
        std::fs::write(dir.join("notes.txt"), vec![1u8; 7]).unwrap();
        assert_eq!(read_weights(&dir).unwrap(), 1024);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
