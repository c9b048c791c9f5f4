use serde_json::json;

use super::*;
use crate::generation::GeneratedToken;

fn tokenizer() -> TextTokenizer {
    TextTokenizer::word_level(&["a", "b", "c"])
}

fn scored(id: u32, text: &str, logprob: f64, finish: Option<(FinishReason, usize)>) -> TextEvent {
    TextEvent::Token(GeneratedToken {
        id,
        text: text.to_string(),
        logprob: Some(logprob),
        special: false,
        top: vec![(2, -1.5)],
        finish: finish.map(|(reason, generated_tokens)| Completion {
            reason,
            generated_tokens,
        }),
    })
}

fn token(id: u32, text: &str, finish: Option<(FinishReason, usize)>) -> TextEvent {
    scored(id, text, -0.25, finish)
}

fn options(surface: Surface, stream: bool, logprobs: Option<u32>) -> OutputOptions {
    OutputOptions {
        surface,
        stream,
        include_usage: stream,
        logprobs,
        n: 1,
        best_of: 1,
        echo: false,
        tool_calls: false,
    }
}

fn run(builder: &mut ResponseBuilder, events: Vec<(usize, TextEvent)>) -> Vec<Value> {
    let tokenizer = tokenizer();
    let mut chunks = Vec::new();
    for (index, event) in events {
        if let Some(step) = builder.push(index, event, &tokenizer) {
            chunks.extend(builder.chunks(step));
        }
    }
    chunks.extend(builder.usage_chunk());
    chunks
}

fn first(events: Vec<TextEvent>) -> Vec<(usize, TextEvent)> {
    events.into_iter().map(|event| (0, event)).collect()
}

#[test]
fn chat_response_with_usage_and_logprobs() {
    let mut builder = ResponseBuilder::new(options(Surface::Chat, false, Some(1)), "m", &[0; 5]);
    run(
        &mut builder,
        first(vec![
            TextEvent::Started,
            token(0, "a", None),
            token(1, "b", Some((FinishReason::EosToken, 2))),
        ]),
    );
    let response = builder.response().unwrap();
    assert_eq!(response["object"], "chat.completion");
    assert!(response["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(response["model"], "m");
    let choice = &response["choices"][0];
    assert_eq!(choice["message"]["content"], "ab");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let first = &choice["logprobs"]["content"][0];
    assert_eq!(first["token"], "a");
    assert_eq!(first["logprob"], -0.25);
    assert_eq!(first["bytes"], json!([97]));
    assert_eq!(first["top_logprobs"][0]["token"], "c");
    assert_eq!(
        response["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    );
}

#[test]
fn chat_stream_announces_the_role_then_deltas_then_usage() {
    let mut builder = ResponseBuilder::new(options(Surface::Chat, true, None), "m", &[0; 3]);
    let chunks = run(
        &mut builder,
        first(vec![
            token(0, "a", None),
            token(1, "", None),
            token(2, "bc", Some((FinishReason::Length, 3))),
        ]),
    );
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "a");
    assert!(chunks[1]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "bc");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 3);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
}

#[test]
fn completions_with_logprobs_and_a_cancelled_end() {
    let mut builder =
        ResponseBuilder::new(options(Surface::Completions, false, Some(1)), "m", &[0, 1]);
    let done = TextEvent::Done {
        completion: Completion {
            reason: FinishReason::StopSequence,
            generated_tokens: 2,
        },
        text: "!".into(),
    };
    run(
        &mut builder,
        first(vec![token(0, "ab", None), token(1, "c", None), done]),
    );
    let response = builder.response().unwrap();
    assert_eq!(response["object"], "text_completion");
    let choice = &response["choices"][0];
    assert_eq!(choice["text"], "abc!");
    assert_eq!(choice["finish_reason"], "stop");
    let logprobs = &choice["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["a", "b"]));
    assert_eq!(logprobs["text_offset"], json!([0, 2]));
    assert_eq!(logprobs["top_logprobs"][0], json!({"c": -1.5}));
    assert_eq!(response["usage"]["total_tokens"], 4);
}

#[test]
fn unfinished_generation_is_an_error() {
    let builder = ResponseBuilder::new(options(Surface::Completions, false, None), "m", &[0, 1]);
    assert!(matches!(builder.response(), Err(ApiError::Generation(_))));
    assert_eq!(builder.usage_chunk(), None);
}

#[test]
fn n_choices_are_indexed_and_their_usage_summed() {
    let options = OutputOptions {
        n: 2,
        best_of: 2,
        ..options(Surface::Chat, false, None)
    };
    let mut builder = ResponseBuilder::new(options, "m", &[0; 4]);
    run(
        &mut builder,
        vec![
            (1, token(1, "b", None)),
            (0, token(0, "a", Some((FinishReason::EosToken, 1)))),
        ],
    );
    assert!(!builder.is_finished(), "choice 1 is still running");
    run(
        &mut builder,
        vec![(1, token(2, "c", Some((FinishReason::Length, 2))))],
    );
    let response = builder.response().unwrap();
    let choices = response["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["content"], "a");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[1]["message"]["content"], "bc");
    assert_eq!(choices[1]["finish_reason"], "length");
    assert_eq!(
        response["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
}

#[test]
fn streamed_choices_interleave_tagged_by_index() {
    let options = OutputOptions {
        n: 2,
        best_of: 2,
        ..options(Surface::Chat, true, None)
    };
    let mut builder = ResponseBuilder::new(options, "m", &[0; 2]);
    let chunks = run(
        &mut builder,
        vec![
            (0, token(0, "a", None)),
            (1, token(1, "b", None)),
            (1, token(2, "c", Some((FinishReason::Length, 2)))),
            (0, token(0, "a", Some((FinishReason::Length, 2)))),
        ],
    );
    let tagged: Vec<(u64, Value)> = chunks
        .iter()
        .filter_map(|c| {
            let choice = c["choices"].get(0)?;
            Some((choice["index"].as_u64()?, choice["delta"].clone()))
        })
        .collect();
    assert_eq!(
        tagged,
        vec![
            (0, json!({"role": "assistant", "content": ""})),
            (0, json!({"content": "a"})),
            (1, json!({"role": "assistant", "content": ""})),
            (1, json!({"content": "b"})),
            (1, json!({"content": "c"})),
            (0, json!({"content": "a"})),
        ]
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);
}

#[test]
fn best_of_answers_the_most_likely_candidates() {
    let options = OutputOptions {
        n: 1,
        best_of: 3,
        ..options(Surface::Completions, false, None)
    };
    let mut builder = ResponseBuilder::new(options, "m", &[0]);
    let end = Some((FinishReason::Length, 1));
    run(
        &mut builder,
        vec![
            (0, scored(0, "a", -2.0, end)),
            (1, scored(1, "b", -0.5, end)),
            (2, scored(2, "c", -1.0, end)),
        ],
    );
    let response = builder.response().unwrap();
    assert_eq!(response["choices"].as_array().unwrap().len(), 1);
    assert_eq!(response["choices"][0]["text"], "b");
    assert_eq!(response["choices"][0]["index"], 0);
    assert_eq!(
        response["usage"]["completion_tokens"], 3,
        "every candidate counts"
    );
}

#[test]
fn echo_puts_the_prompt_and_its_logprobs_first() {
    let options = OutputOptions {
        echo: true,
        ..options(Surface::Completions, false, Some(1))
    };
    let mut builder = ResponseBuilder::new(options, "m", &[0, 1]);
    run(
        &mut builder,
        first(vec![
            TextEvent::Started,
            TextEvent::PromptLogprobs(vec![(-3.0, Some(vec![(2, -0.5)]))]),
            token(2, "c", Some((FinishReason::Length, 1))),
        ]),
    );
    let response = builder.response().unwrap();
    let choice = &response["choices"][0];
    assert_eq!(choice["text"], "a bc");
    let logprobs = &choice["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["a", "b", "c"]));
    assert_eq!(logprobs["token_logprobs"], json!([null, -3.0, -0.25]));
    assert_eq!(
        logprobs["top_logprobs"],
        json!([null, {"c": -0.5}, {"c": -1.5}])
    );
    assert_eq!(logprobs["text_offset"], json!([0, 1, 3]));
    assert_eq!(response["usage"]["completion_tokens"], 1);
}

#[test]
fn a_reset_choice_starts_over() {
    let mut builder = ResponseBuilder::new(options(Surface::Completions, false, None), "m", &[0]);
    run(&mut builder, first(vec![token(0, "a", None)]));
    builder.reset(0);
    run(
        &mut builder,
        first(vec![token(1, "b", Some((FinishReason::Length, 1)))]),
    );
    assert_eq!(builder.response().unwrap()["choices"][0]["text"], "b");
}
