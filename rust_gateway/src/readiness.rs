//! Start-up phase, the time of each phase since exec, and why start-up failed.
//!
//! /ping, /ready and the metrics read this; start-up tasks, the worker supervisor and the
//! shutdown sequence write it.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Initializing,
    Ready,
    Failed,
    ShuttingDown,
}

pub struct Readiness {
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    model_loaded: bool,
    worker_ready: bool,
    failure: Option<Failure>,
    shutting_down: bool,
    timings: Timings,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub reason: String,
    pub worker_log: Vec<String>,
}

/// Phase timings in the order they happened, serialized as a JSON object.
#[derive(Debug, Clone, Default)]
pub struct Timings(Vec<(String, f64)>);

impl Timings {
    fn set(&mut self, name: &str, ms: f64) {
        match self.0.iter_mut().find(|(known, _)| known == name) {
            Some(entry) => entry.1 = ms,
            None => self.0.push((name.to_string(), ms)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, f64)> {
        self.0.iter()
    }
}

impl Serialize for Timings {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, ms) in &self.0 {
            map.serialize_entry(name, &((ms * 1000.0).round() / 1000.0))?;
        }
        map.end()
    }
}

/// Body of GET /ready.
#[derive(Debug, Serialize)]
pub struct ReadyReport {
    pub phase: Phase,
    pub ready: bool,
    pub timings_ms: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_log: Option<Vec<String>>,
}

impl Readiness {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            state: Mutex::new(State::default()),
        }
    }

    pub fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Records that phase `name` finished now.
    pub fn record(&self, name: &str) -> f64 {
        let ms = self.elapsed_ms();
        self.record_at(name, ms);
        ms
    }

    pub fn record_at(&self, name: &str, ms: f64) {
        self.lock().timings.set(name, ms);
    }

    pub fn set_model_loaded(&self) {
        let mut state = self.lock();
        state.model_loaded = true;
        Self::note_ready(&mut state, self.elapsed_ms());
    }

    pub fn set_worker_ready(&self) {
        let mut state = self.lock();
        state.worker_ready = true;
        Self::note_ready(&mut state, self.elapsed_ms());
    }

    /// The worker went away; it is being restarted.
    pub fn set_worker_lost(&self) {
        self.lock().worker_ready = false;
    }

    pub fn set_failed(&self, reason: String, worker_log: Vec<String>) {
        let mut state = self.lock();
        if state.failure.is_none() {
            state.failure = Some(Failure { reason, worker_log });
        }
    }

    pub fn set_shutting_down(&self) {
        self.lock().shutting_down = true;
    }

    pub fn phase(&self) -> Phase {
        Self::phase_of(&self.lock())
    }

    pub fn failure(&self) -> Option<Failure> {
        self.lock().failure.clone()
    }

    pub fn timings(&self) -> Timings {
        self.lock().timings.clone()
    }

    pub fn report(&self) -> ReadyReport {
        let state = self.lock();
        let phase = Self::phase_of(&state);
        ReadyReport {
            phase,
            ready: phase == Phase::Ready,
            timings_ms: state.timings.clone(),
            reason: state.failure.as_ref().map(|failure| failure.reason.clone()),
            worker_log: state
                .failure
                .as_ref()
                .map(|failure| failure.worker_log.clone()),
        }
    }

    fn note_ready(state: &mut State, now_ms: f64) {
        if state.model_loaded
            && state.worker_ready
            && !state.timings.iter().any(|(n, _)| n == "ready")
        {
            state.timings.set("ready", now_ms);
        }
    }

    fn phase_of(state: &State) -> Phase {
        if state.shutting_down {
            Phase::ShuttingDown
        } else if state.failure.is_some() {
            Phase::Failed
        } else if state.model_loaded && state.worker_ready {
            Phase::Ready
        } else {
            Phase::Initializing
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_start_up() {
        let readiness = Readiness::new(Instant::now());
        assert_eq!(readiness.phase(), Phase::Initializing);
        readiness.record("port_bound");
        readiness.set_worker_ready();
        assert_eq!(
            readiness.phase(),
            Phase::Initializing,
            "tokenizer still loading"
        );
        readiness.set_model_loaded();
        assert_eq!(readiness.phase(), Phase::Ready);
        let report = serde_json::to_value(readiness.report()).unwrap();
        let timings = report["timings_ms"].as_object().unwrap();
        assert!(timings.contains_key("port_bound") && timings.contains_key("ready"));
        readiness.set_worker_lost();
        assert_eq!(readiness.phase(), Phase::Initializing);
        readiness.set_failed("worker exited 1".into(), vec!["boom".into()]);
        assert_eq!(readiness.phase(), Phase::Failed);
        assert_eq!(
            readiness.report().reason.as_deref(),
            Some("worker exited 1")
        );
        readiness.set_shutting_down();
        assert_eq!(readiness.phase(), Phase::ShuttingDown);
    }

    #[test]
    fn timings_keep_their_order_and_update_in_place() {
        let mut timings = Timings::default();
        timings.set("b", 1.0);
        timings.set("a", 2.0);
        timings.set("b", 3.0);
        assert_eq!(
            serde_json::to_string(&timings).unwrap(),
            r#"{"b":3.0,"a":2.0}"#
        );
    }
}
