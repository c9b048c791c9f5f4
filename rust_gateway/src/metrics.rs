//! Prometheus metrics (GET /metrics). Names start with `thaw_`.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use crate::readiness::Readiness;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_size: IntGauge,
    pub running_requests: IntGauge,
    pub batch_size: IntGauge,
    pub kv_used_blocks: IntGauge,
    pub kv_total_blocks: IntGauge,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub input_tokens: Histogram,
    pub output_tokens: Histogram,
    pub cold_start_phase: GaugeVec,
    pub worker_restarts: IntCounter,
    pub jobs: IntCounterVec,
    pub uptime: Gauge,
}

const TOKEN_BUCKETS: &[f64] = &[1.0, 8.0, 32.0, 128.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new("thaw_requests_total", "HTTP requests by route and status"),
                &["route", "status"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new("thaw_request_duration_seconds", "HTTP request duration")
                    .buckets(prometheus::exponential_buckets(0.001, 4.0, 10)?),
                &["route"],
            )?,
            queue_size: IntGauge::new("thaw_queue_size", "Requests waiting in the gateway")?,
            running_requests: IntGauge::new(
                "thaw_running_requests",
                "Requests handed to the worker and not finished",
            )?,
            batch_size: IntGauge::new("thaw_batch_size", "Requests the worker runs per step")?,
            kv_used_blocks: IntGauge::new("thaw_kv_used_blocks", "KV-cache blocks in use")?,
            kv_total_blocks: IntGauge::new("thaw_kv_total_blocks", "KV-cache blocks in all")?,
            time_to_first_token: seconds(
                "thaw_time_to_first_token_seconds",
                "Time from admission to the first generated token",
                prometheus::exponential_buckets(0.005, 2.0, 14)?,
            )?,
            time_per_output_token: seconds(
                "thaw_time_per_output_token_seconds",
                "Mean time between generated tokens of a request",
                prometheus::exponential_buckets(0.001, 2.0, 12)?,
            )?,
            input_tokens: Histogram::with_opts(
                HistogramOpts::new("thaw_input_tokens", "Prompt tokens per request")
                    .buckets(TOKEN_BUCKETS.to_vec()),
            )?,
            output_tokens: Histogram::with_opts(
                HistogramOpts::new("thaw_output_tokens", "Generated tokens per request")
                    .buckets(TOKEN_BUCKETS.to_vec()),
            )?,
            cold_start_phase: GaugeVec::new(
                Opts::new(
                    "thaw_cold_start_phase_seconds",
                    "Time from exec of the gateway to the end of each start-up phase",
                ),
                &["phase"],
            )?,
            worker_restarts: IntCounter::new("thaw_worker_restarts_total", "Worker restarts")?,
            jobs: IntCounterVec::new(
                Opts::new(
                    "thaw_jobs_total",
                    "Finished /run and /runsync jobs by final status",
                ),
                &["status"],
            )?,
            uptime: Gauge::new("thaw_uptime_seconds", "Seconds since exec")?,
            registry,
        };
        metrics.register_all()?;
        Ok(metrics)
    }

    fn register_all(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.requests.clone()))?;
        r.register(Box::new(self.request_duration.clone()))?;
        r.register(Box::new(self.queue_size.clone()))?;
        r.register(Box::new(self.running_requests.clone()))?;
        r.register(Box::new(self.batch_size.clone()))?;
        r.register(Box::new(self.kv_used_blocks.clone()))?;
        r.register(Box::new(self.kv_total_blocks.clone()))?;
        r.register(Box::new(self.time_to_first_token.clone()))?;
        r.register(Box::new(self.time_per_output_token.clone()))?;
        r.register(Box::new(self.input_tokens.clone()))?;
        r.register(Box::new(self.output_tokens.clone()))?;
        r.register(Box::new(self.cold_start_phase.clone()))?;
        r.register(Box::new(self.worker_restarts.clone()))?;
        r.register(Box::new(self.jobs.clone()))?;
        r.register(Box::new(self.uptime.clone()))?;
        Ok(())
    }

    /// The text exposition, with the cold-start phases copied from `readiness` first.
    pub fn render(&self, readiness: &Readiness) -> String {
        for (phase, ms) in readiness.timings().iter() {
            self.cold_start_phase
                .with_label_values(&[phase.as_str()])
                .set(ms / 1000.0);
        }
        self.uptime.set(readiness.elapsed_ms() / 1000.0);
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn renders_phases_and_counters() {
        let metrics = Metrics::new().unwrap();
        let readiness = Readiness::new(Instant::now());
        readiness.record_at("port_bound", 2.0);
        metrics
            .requests
            .with_label_values(&["/generate", "200"])
            .inc();
        metrics.time_to_first_token.observe(0.02);
        let text = metrics.render(&readiness);
        assert!(text.contains(r#"thaw_cold_start_phase_seconds{phase="port_bound"} 0.002"#));
        assert!(text.contains(r#"thaw_requests_total{route="/generate",status="200"} 1"#));
        assert!(text.contains("thaw_time_to_first_token_seconds_count 1"));
    }
}
