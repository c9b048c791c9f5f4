//! thaw-gateway: binds its port first, then loads the tokenizer, spawns the worker and warms
//! the page cache while requests are already accepted and queued.

mod api;
pub mod chat_template;
mod config;
mod engine;
mod error;
mod generation;
mod jobs;
mod lifecycle;
mod logging;
mod metrics;
mod openai;
mod protocol;
mod readiness;
mod served_model;
mod startup;
mod state;
mod text;
mod tgi;
mod validation;

#[cfg(test)]
mod layers_tests;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;

use config::Config;
use engine::{Engine, EngineConfig};
use generation::Generator;
use jobs::JobStore;
use metrics::Metrics;
use readiness::Readiness;
use state::{Activity, AppState, ModelSlot};

fn main() -> ExitCode {
    let started = Instant::now();
    let config = Config::parse();
    let Some(argv) = shlex::split(&config.worker_cmd).filter(|argv| !argv.is_empty()) else {
        eprintln!(
            "thaw-gateway: THAW_WORKER_CMD {:?} is not a command line",
            config.worker_cmd
        );
        return ExitCode::from(2);
    };
    logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("thaw-gateway: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(config, argv, started));
    // Blocking start-up tasks (a page-cache read of large weights) must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn bind(host: std::net::IpAddr, port: u16) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|err| {
            tracing::error!(%err, port, "cannot bind");
            ExitCode::FAILURE
        })
}

async fn serve(config: Config, argv: Vec<String>, started: Instant) -> ExitCode {
    let mut signals = match lifecycle::StopSignals::install() {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!(%err, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let config = Arc::new(config);
    let readiness = Arc::new(Readiness::new(started));
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(err) => {
            tracing::error!(%err, "cannot register metrics");
            return ExitCode::FAILURE;
        }
    };
    let api_listener = match bind(config.host, config.port).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let probe_listener = match config.port_health.filter(|&port| port != config.port) {
        Some(port) => match bind(config.host, port).await {
            Ok(listener) => Some(listener),
            Err(code) => return code,
        },
        None => None,
    };
    let engine_config = EngineConfig {
        queue_capacity: config.queue_capacity,
        max_concurrent_requests: config.max_concurrent_requests,
        ready_wait: config.ready_wait(),
    };
    let (engine, worker_events) = Engine::start(engine_config, readiness.clone(), metrics.clone());
    let (model_slot, model_watch) = watch::channel(ModelSlot::Loading);
    let app = AppState {
        config: config.clone(),
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        generator: Generator::new(engine, metrics.clone()),
        model: model_watch,
        jobs: JobStore::default(),
        activity: Arc::new(Activity::new(started)),
    };
    tokio::spawn(serve_http(api_listener, api::router(app.clone())));
    if let Some(listener) = probe_listener {
        tokio::spawn(serve_http(listener, api::probe_router(app.clone())));
    }
    readiness.record("port_bound");
    tracing::info!(port = config.port, "listening");

    // The worker first: importing torch is the long pole.
    let (stop_worker, stop_watch) = watch::channel(false);
    let sockets = match startup::SocketDir::create() {
        Ok(sockets) => Some(sockets),
        Err(err) => {
            readiness.set_failed(
                format!("cannot create the socket directory: {err}"),
                Vec::new(),
            );
            None
        }
    };
    let supervisor = sockets.as_ref().and_then(|sockets| {
        startup::start_worker(
            &config,
            argv,
            readiness.clone(),
            metrics.clone(),
            worker_events,
            stop_watch,
            sockets,
        )
    });
    startup::load_model(config.clone(), readiness.clone(), model_slot);
    if config.prefetch_weights {
        startup::prefetch_weights(&config.snapshot, readiness.clone());
    }
    tokio::spawn(purge_jobs(app.jobs.clone()));

    let reason = lifecycle::wait_for_stop(&app, &mut signals).await;
    tracing::info!(reason, "shutting down");
    lifecycle::drain(&app, stop_worker, supervisor).await;
    if let Some(sockets) = sockets {
        sockets.remove();
    }
    tracing::info!("bye");
    ExitCode::SUCCESS
}

async fn serve_http(listener: TcpListener, router: axum::Router) {
    if let Err(err) = axum::serve(listener, router).await {
        tracing::error!(%err, "HTTP server stopped");
    }
}

async fn purge_jobs(jobs: JobStore) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        jobs.purge();
    }
}
