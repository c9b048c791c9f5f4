//! Streamed OpenAI responses: one `data: {chunk}` event per visible step, the usage chunk
//! when asked for, then `data: [DONE]`.
//!
//! The first chunk is awaited before the response starts, so an error known before it (not
//! ready, queue full, the worker refusing the request) keeps its status code. A later error
//! arrives as a final `data: {"error", "error_type"}` event. Dropping the response (the client
//! went away) drops the generation, which cancels the request in the worker.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::Value;

use super::Prepared;
use crate::error::ApiError;
use crate::generation::Siblings;
use crate::openai::ResponseBuilder;
use crate::served_model::SharedModel;
use crate::state::AppState;

struct ChunkStream {
    model: SharedModel,
    /// One stream per choice; their chunks interleave, tagged by `index`.
    siblings: Siblings,
    builder: ResponseBuilder,
    /// Event data produced but not sent yet.
    pending: VecDeque<String>,
    ended: bool,
}

impl ChunkStream {
    /// Reads events until one produces chunks, the generation finishes, or it fails.
    async fn fill(&mut self) -> Result<(), ApiError> {
        while self.pending.is_empty() && !self.builder.is_finished() {
            match self.siblings.next().await {
                Some((index, Ok(event))) => {
                    if let Some(step) = self.builder.push(index, event, &self.model.tokenizer) {
                        let chunks = self.builder.chunks(step);
                        self.pending.extend(chunks.iter().map(Value::to_string));
                    }
                }
                Some((_, Err(error))) => return Err(error.into()),
                None => {
                    return Err(ApiError::Generation(
                        "generation ended without finishing".into(),
                    ))
                }
            }
        }
        if self.builder.is_finished() && !self.ended {
            self.ended = true;
            let usage = self.builder.usage_chunk();
            self.pending.extend(usage.as_ref().map(Value::to_string));
            self.pending.push_back(DONE.into());
        }
        Ok(())
    }

    /// The next event's data; `None` once everything, `[DONE]` included, was sent.
    async fn next_data(&mut self) -> Option<String> {
        if self.pending.is_empty() && !self.ended {
            if let Err(error) = self.fill().await {
                self.ended = true;
                return Some(error.body().to_string());
            }
        }
        self.pending.pop_front()
    }
}

/// The stream's last event, as OpenAI sends it.
const DONE: &str = "[DONE]";

pub async fn respond(app: &AppState, mut prepared: Prepared) -> Result<Response, ApiError> {
    let (builder, siblings) = prepared.start(app)?;
    let mut chunks = ChunkStream {
        model: prepared.model,
        siblings,
        builder,
        pending: VecDeque::new(),
        ended: false,
    };
    chunks.fill().await?;
    Ok(Sse::new(events(chunks))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn events(chunks: ChunkStream) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(chunks, |mut chunks| async move {
        let data = chunks.next_data().await?;
        Some((Ok(Event::default().data(data)), chunks))
    })
}
