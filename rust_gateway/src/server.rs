//! The HTTP listeners: one accept loop per port, with a cap on open connections and a deadline
//! for each request's headers, so that clients that connect and then trickle (or send nothing)
//! cannot hold the gateway's sockets and tasks for free. The body deadline is the extractor's
//! (`api/extract.rs`): only routes that read a body wait for one.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How many connections one listener keeps open, and how long a request's headers may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Also bounds how long an idle keep-alive connection stays open.
    pub header_read_timeout: Option<Duration>,
}

/// After a failed accept (out of file descriptors, say), wait this long before the next one
/// rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until the process exits.
pub async fn serve(listener: TcpListener, router: axum::Router, limits: ConnectionLimits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // A permit first: connections over the cap wait in the kernel's accept queue, not in
        // tasks of ours.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!(%err, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Server-sent events are written token by token.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection ended with an error");
            }
        });
    }
}
