//! The actor against a fake worker: queueing, dispatch, routing, cancel, crash recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::*;
use crate::protocol::{OutputItem, ReadyInfo};

struct Harness {
    engine: Engine,
    worker: mpsc::UnboundedSender<WorkerEvent>,
}

fn harness(queue_capacity: usize, ready_wait: Duration) -> Harness {
    let readiness = Arc::new(Readiness::new(Instant::now()));
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = EngineConfig {
        queue_capacity,
        max_concurrent_requests: 8,
        ready_wait,
    };
    let (engine, worker) = Engine::start(config, readiness, metrics);
    Harness { engine, worker }
}

fn request(prompt: &[u32]) -> TokenRequest {
    TokenRequest {
        prompt: prompt.to_vec(),
        params: Params::default(),
        previous_attempts: 0,
        fork_of: None,
    }
}

fn ready(max_running: u32) -> (WorkerEvent, mpsc::UnboundedReceiver<GatewayMessage>) {
    let (frames, outbox) = mpsc::unbounded_channel();
    let info = ReadyInfo {
        model: "fake".into(),
        max_context: 64,
        kv_blocks: 8,
        block_size: 16,
        max_running,
        eos_token_ids: vec![0],
    };
    (WorkerEvent::Ready { frames, info }, outbox)
}

fn item(id: u64, token: Option<u32>, finish: Option<WireFinish>) -> OutputItem {
    OutputItem {
        id,
        token,
        logprob: Some(-1.0),
        top: None,
        finish,
    }
}

fn outputs(items: Vec<OutputItem>) -> WorkerEvent {
    WorkerEvent::Message(WorkerMessage::Outputs { step: 0, items })
}

async fn next_frame(outbox: &mut mpsc::UnboundedReceiver<GatewayMessage>) -> GatewayMessage {
    tokio::time::timeout(Duration::from_secs(2), outbox.recv())
        .await
        .expect("a frame")
        .expect("open")
}

async fn next_event(stream: &mut TokenStream) -> EngineEvent {
    tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("an event")
        .expect("open")
}

fn submitted_id(frame: GatewayMessage) -> u64 {
    match frame {
        GatewayMessage::Submit { id, .. } => id,
        other => panic!("expected submit, got {other:?}"),
    }
}

#[tokio::test]
async fn queued_before_ready_then_routed() {
    let h = harness(4, Duration::from_secs(60));
    let mut stream = h.engine.submit(request(&[5, 6])).unwrap();
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    let id = submitted_id(next_frame(&mut outbox).await);
    assert_eq!(next_event(&mut stream).await, EngineEvent::Started);
    h.worker
        .send(outputs(vec![item(id, Some(7), None)]))
        .unwrap();
    h.worker
        .send(outputs(vec![item(id, Some(0), Some(WireFinish::EosToken))]))
        .unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        EngineEvent::Token(SampledToken {
            id: 7,
            finish: None,
            ..
        })
    ));
    assert!(matches!(
        next_event(&mut stream).await,
        EngineEvent::Token(SampledToken {
            id: 0,
            finish: Some(FinishReason::EosToken),
            ..
        })
    ));
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn full_queue_is_refused() {
    let h = harness(2, Duration::from_secs(60));
    let _a = h.engine.submit(request(&[1])).unwrap();
    let _b = h.engine.submit(request(&[1])).unwrap();
    assert_eq!(
        h.engine.submit(request(&[1])).err(),
        Some(EngineError::QueueFull(2))
    );
    drop(_a);
    // The cancel of a queued request frees its slot.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h.engine.submit(request(&[1])).is_ok());
}

#[tokio::test]
async fn worker_max_running_is_respected() {
    let h = harness(8, Duration::from_secs(60));
    let mut streams: Vec<_> = (0..3)
        .map(|_| h.engine.submit(request(&[1])).unwrap())
        .collect();
    let (event, mut outbox) = ready(2);
    h.worker.send(event).unwrap();
    let first = submitted_id(next_frame(&mut outbox).await);
    let _second = submitted_id(next_frame(&mut outbox).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(150), outbox.recv())
            .await
            .is_err()
    );
    h.worker
        .send(outputs(vec![item(
            first,
            Some(3),
            Some(WireFinish::Length),
        )]))
        .unwrap();
    submitted_id(next_frame(&mut outbox).await);
    assert_eq!(next_event(&mut streams[2]).await, EngineEvent::Started);
}

#[tokio::test]
async fn dropping_a_stream_cancels_it_in_the_worker() {
    let h = harness(4, Duration::from_secs(60));
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    let stream = h.engine.submit(request(&[1])).unwrap();
    let id = submitted_id(next_frame(&mut outbox).await);
    drop(stream);
    assert_eq!(next_frame(&mut outbox).await, GatewayMessage::Cancel { id });
    assert_eq!(h.engine.active(), 0);
}

#[tokio::test]
async fn worker_crash_requeues_requests_without_output() {
    let h = harness(4, Duration::from_secs(60));
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    let mut quiet = h.engine.submit(request(&[1])).unwrap();
    let mut talking = h.engine.submit(request(&[2])).unwrap();
    let _quiet_id = submitted_id(next_frame(&mut outbox).await);
    let talking_id = submitted_id(next_frame(&mut outbox).await);
    h.worker
        .send(outputs(vec![item(talking_id, Some(9), None)]))
        .unwrap();
    assert_eq!(next_event(&mut talking).await, EngineEvent::Started);
    assert!(matches!(
        next_event(&mut talking).await,
        EngineEvent::Token(_)
    ));
    h.worker.send(WorkerEvent::Lost).unwrap();
    assert_eq!(
        next_event(&mut talking).await,
        EngineEvent::Failed(EngineError::WorkerLost)
    );
    // The new worker gets the quiet request again, under a new id.
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    match next_frame(&mut outbox).await {
        GatewayMessage::Submit { id, prompt, .. } => {
            assert_eq!(prompt, vec![1]);
            assert!(id > talking_id);
        }
        other => panic!("expected submit, got {other:?}"),
    }
    assert_eq!(next_event(&mut quiet).await, EngineEvent::Started);
    assert_eq!(next_event(&mut quiet).await, EngineEvent::Started);
}

#[tokio::test]
async fn waiting_for_a_worker_that_never_comes_times_out() {
    let h = harness(4, Duration::from_millis(150));
    let mut stream = h.engine.submit(request(&[1])).unwrap();
    assert!(matches!(
        next_event(&mut stream).await,
        EngineEvent::Failed(EngineError::NotReady(_))
    ));
}

#[tokio::test]
async fn worker_error_fails_only_that_request() {
    let h = harness(4, Duration::from_secs(60));
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    let mut stream = h.engine.submit(request(&[1])).unwrap();
    let id = submitted_id(next_frame(&mut outbox).await);
    let error = WorkerMessage::Error {
        id,
        message: "too long".into(),
    };
    h.worker.send(WorkerEvent::Message(error)).unwrap();
    assert_eq!(next_event(&mut stream).await, EngineEvent::Started);
    assert_eq!(
        next_event(&mut stream).await,
        EngineEvent::Failed(EngineError::Worker("too long".into()))
    );
}

#[tokio::test]
async fn giving_up_fails_the_queue() {
    let h = harness(4, Duration::from_secs(60));
    let mut stream = h.engine.submit(request(&[1])).unwrap();
    h.worker.send(WorkerEvent::GaveUp("boom".into())).unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        EngineEvent::Failed(EngineError::Unavailable("boom".into()))
    );
}

#[tokio::test]
async fn a_request_whose_worker_crashes_twice_fails() {
    let h = harness(4, Duration::from_secs(60));
    let mut poison = h.engine.submit(request(&[1])).unwrap();
    for _ in 0..MAX_ATTEMPTS {
        let (event, mut outbox) = ready(4);
        h.worker.send(event).unwrap();
        submitted_id(next_frame(&mut outbox).await);
        assert_eq!(next_event(&mut poison).await, EngineEvent::Started);
        h.worker.send(WorkerEvent::Lost).unwrap();
    }
    assert_eq!(
        next_event(&mut poison).await,
        EngineEvent::Failed(EngineError::Crashed(MAX_ATTEMPTS))
    );
    assert_eq!(poison.attempts(), MAX_ATTEMPTS);
    // It is not handed to the next worker.
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(150), outbox.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn attempts_follow_a_request_into_its_retry() {
    let h = harness(4, Duration::from_secs(60));
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    let mut first = h.engine.submit(request(&[1])).unwrap();
    let id = submitted_id(next_frame(&mut outbox).await);
    h.worker
        .send(outputs(vec![item(id, Some(9), None)]))
        .unwrap();
    assert_eq!(next_event(&mut first).await, EngineEvent::Started);
    assert!(matches!(
        next_event(&mut first).await,
        EngineEvent::Token(_)
    ));
    h.worker.send(WorkerEvent::Lost).unwrap();
    assert_eq!(
        next_event(&mut first).await,
        EngineEvent::Failed(EngineError::WorkerLost)
    );
    // The route runs it again, carrying the attempt it spent.
    let retry = TokenRequest {
        previous_attempts: first.attempts(),
        ..request(&[1])
    };
    let mut second = h.engine.submit(retry).unwrap();
    let (event, mut outbox) = ready(4);
    h.worker.send(event).unwrap();
    submitted_id(next_frame(&mut outbox).await);
    assert_eq!(next_event(&mut second).await, EngineEvent::Started);
    h.worker.send(WorkerEvent::Lost).unwrap();
    assert_eq!(
        next_event(&mut second).await,
        EngineEvent::Failed(EngineError::Crashed(2))
    );
}

#[tokio::test]
async fn a_crash_costs_only_the_requests_in_the_worker() {
    let h = harness(4, Duration::from_secs(60));
    let (event, mut outbox) = ready(1);
    h.worker.send(event).unwrap();
    let mut running = h.engine.submit(request(&[1])).unwrap();
    let mut queued = h.engine.submit(request(&[2])).unwrap();
    submitted_id(next_frame(&mut outbox).await);
    assert_eq!(next_event(&mut running).await, EngineEvent::Started);
    for _ in 0..2 {
        h.worker.send(WorkerEvent::Lost).unwrap();
        let (event, mut outbox) = ready(1);
        h.worker.send(event).unwrap();
        let id = submitted_id(next_frame(&mut outbox).await);
        if running.attempts() < MAX_ATTEMPTS {
            assert_eq!(next_event(&mut running).await, EngineEvent::Started);
            continue;
        }
        // The twice-crashed request failed; the queued one runs in its first attempt.
        assert_eq!(
            next_event(&mut running).await,
            EngineEvent::Failed(EngineError::Crashed(2))
        );
        assert_eq!(next_event(&mut queued).await, EngineEvent::Started);
        assert_eq!(queued.attempts(), 1);
        h.worker
            .send(outputs(vec![item(id, Some(3), Some(WireFinish::Length))]))
            .unwrap();
        assert!(matches!(
            next_event(&mut queued).await,
            EngineEvent::Token(SampledToken {
                finish: Some(FinishReason::Length),
                ..
            })
        ));
    }
}

#[tokio::test]
async fn a_prompt_longer_than_the_workers_context_is_refused_at_dispatch() {
    let h = harness(4, Duration::from_secs(60));
    assert_eq!(h.engine.worker_max_context(), None);
    let prompt: Vec<u32> = (0..64).collect();
    let mut stream = h.engine.submit(request(&prompt)).unwrap();
    let (event, _outbox) = ready(4);
    h.worker.send(event).unwrap();
    assert_eq!(
        next_event(&mut stream).await,
        EngineEvent::Failed(EngineError::PromptTooLong {
            tokens: 64,
            limit: 64
        })
    );
    assert_eq!(h.engine.worker_max_context(), Some(64));
}

#[tokio::test]
async fn a_reserved_slot_counts_until_dropped_or_used() {
    let h = harness(1, Duration::from_secs(60));
    let slot = h.engine.reserve().unwrap();
    assert_eq!(h.engine.reserve().err(), Some(EngineError::QueueFull(1)));
    drop(slot);
    let slot = h.engine.reserve().unwrap();
    let _stream = h.engine.submit_in(slot, request(&[1])).unwrap();
    assert_eq!(h.engine.reserve().err(), Some(EngineError::QueueFull(1)));
}

#[tokio::test]
async fn forks_name_their_running_sibling_and_prompt_logprobs_are_routed() {
    let h = harness(8, Duration::from_secs(60));
    let (event, mut outbox) = ready(8);
    h.worker.send(event).unwrap();
    let mut parent = h.engine.submit(request(&[3, 4])).unwrap();
    let parent_id = submitted_id(next_frame(&mut outbox).await);
    let fork = TokenRequest {
        fork_of: Some(parent.ticket()),
        ..request(&[3, 4])
    };
    let _fork = h.engine.submit(fork).unwrap();
    match next_frame(&mut outbox).await {
        GatewayMessage::Submit { fork_of, .. } => assert_eq!(fork_of, Some(parent_id)),
        other => panic!("expected submit, got {other:?}"),
    }
    let scored = vec![(-1.5, Some(vec![(4, -1.5)]))];
    h.worker
        .send(WorkerEvent::Message(WorkerMessage::PromptLogprobs {
            id: parent_id,
            items: scored.clone(),
        }))
        .unwrap();
    assert_eq!(next_event(&mut parent).await, EngineEvent::Started);
    assert_eq!(
        next_event(&mut parent).await,
        EngineEvent::PromptLogprobs(scored)
    );
    // A sibling that finished shares nothing: the fork goes as an ordinary request.
    h.worker
        .send(outputs(vec![item(
            parent_id,
            Some(1),
            Some(WireFinish::Length),
        )]))
        .unwrap();
    assert!(matches!(
        next_event(&mut parent).await,
        EngineEvent::Token(_)
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = TokenRequest {
        fork_of: Some(parent.ticket()),
        ..request(&[3, 4])
    };
    let _late = h.engine.submit(late).unwrap();
    match next_frame(&mut outbox).await {
        GatewayMessage::Submit { fork_of, .. } => assert_eq!(fork_of, None),
        other => panic!("expected submit, got {other:?}"),
    }
}
