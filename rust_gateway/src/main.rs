//! thaw-gateway: binds its port first, then loads the tokenizer, spawns the worker and warms
//! the page cache while requests are already accepted and queued.

mod api;
pub mod chat_template;
mod config;
mod constraint;
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
mod server;
mod startup;
mod state;
mod text;
mod tgi;
mod tools;
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
    // Refused before anything binds: a gateway that would serve everyone must not start.
    let Some((auth, webhooks)) = security(&config) else {
        return ExitCode::from(2);
    };
    logging::init(config.log_format);
    log_auth_mode(auth, config.host);
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
    let code = runtime.block_on(serve(config, argv, started, webhooks));
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

/// The auth mode and the webhook policy, or `None` after saying on stderr why the settings
/// are refused.
fn security(config: &Config) -> Option<(api::AuthMode, jobs::Webhooks)> {
    // clap reads `THAW_API_KEY=` as no key at all; an empty key is a mistake, not a choice.
    let empty_env_key = std::env::var_os("THAW_API_KEY").is_some_and(|key| key.is_empty());
    let key = config.api_key.as_deref().or(empty_env_key.then_some(""));
    let auth = match api::auth_mode(key, config.host, config.allow_unauthenticated) {
        Ok(auth) => auth,
        Err(err) => {
            eprintln!("thaw-gateway: {err}");
            return None;
        }
    };
    let policy =
        match jobs::WebhookPolicy::new(&config.webhook_allow, config.webhook_allowlist_only) {
            Ok(policy) => policy,
            Err(err) => {
                eprintln!("thaw-gateway: {err}");
                return None;
            }
        };
    Some((auth, jobs::Webhooks::new(policy)))
}

fn log_auth_mode(auth: api::AuthMode, host: std::net::IpAddr) {
    match auth {
        api::AuthMode::BearerKey => tracing::info!("auth: bearer key"),
        api::AuthMode::LoopbackOnly => tracing::info!(%host, "auth: none (loopback only)"),
        api::AuthMode::Unauthenticated => tracing::warn!(
            "auth: none, unauthenticated opt-out on {host} (THAW_ALLOW_UNAUTHENTICATED): \
             every caller that reaches this port is served"
        ),
    }
}

async fn serve(
    config: Config,
    argv: Vec<String>,
    started: Instant,
    webhooks: jobs::Webhooks,
) -> ExitCode {
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
        jobs: JobStore::with_capacity(config.max_jobs),
        webhooks: webhooks.clone(),
        activity: Arc::new(Activity::new(started)),
        tokenizing: state::tokenizer_permits(),
    };
    let limits = server::ConnectionLimits {
        max_connections: config.max_connections,
        header_read_timeout: config.header_read_timeout(),
    };
    tokio::spawn(server::serve(
        api_listener,
        api::router(app.clone()),
        limits,
    ));
    if let Some(listener) = probe_listener {
        tokio::spawn(server::serve(
            listener,
            api::probe_router(app.clone()),
            limits,
        ));
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

async fn purge_jobs(jobs: JobStore) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        jobs.purge();
    }
}
