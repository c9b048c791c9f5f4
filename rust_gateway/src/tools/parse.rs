//! The model's output, split into text and tool calls as it streams.
//!
//! Text before a call's opening marker is released as it arrives, except what could still be
//! the start of a marker (and trailing whitespace, which a call would make meaningless). After
//! the marker the text is held until the call is complete: a Hermes block at its closing tag,
//! the Llama and Mistral forms at the end of the output. A call that does not parse is given
//! back as text, so a malformed attempt is never lost. The same parser serves the whole
//! response (one push, then `finish`) and the stream, so both agree.

use serde_json::Value;

use super::{ToolCall, ToolFormat};

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const LLAMA_TAG: &str = "<|python_tag|>";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseEvent {
    Content(String),
    Call(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain text; a marker may still come.
    Text,
    /// Llama only: nothing but whitespace so far; a `{` here opens the calls.
    Start,
    /// Inside a call (Hermes) or the calls (Llama, Mistral) opened by `opener`.
    Calls,
    /// Llama only: the output began with text, so it holds no calls.
    TextOnly,
}

#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    mode: Mode,
    /// Text not yet released: a possible marker prefix, trailing whitespace, or a call body.
    pending: String,
    /// What opened the current call(s), given back with them if they do not parse.
    opener: String,
    calls: usize,
}

impl ToolCallParser {
    pub fn new(format: ToolFormat) -> Self {
        let mode = match format {
            ToolFormat::Llama3 => Mode::Start,
            ToolFormat::Hermes | ToolFormat::Mistral => Mode::Text,
        };
        Self {
            format,
            mode,
            pending: String::new(),
            opener: String::new(),
            calls: 0,
        }
    }

    /// One generated token's worth: the special token it was (if the detokenizer skipped
    /// it), its text, and whether the output ends here. Returns the text to show and the
    /// calls completed.
    pub fn step(
        &mut self,
        special: Option<&str>,
        text: &str,
        finished: bool,
    ) -> (String, Vec<ToolCall>) {
        let mut events = special.map(|s| self.push_special(s)).unwrap_or_default();
        events.extend(self.push(text));
        if finished {
            events.extend(self.finish());
        }
        let mut content = String::new();
        let mut calls = Vec::new();
        for event in events {
            match event {
                ParseEvent::Content(text) => content.push_str(&text),
                ParseEvent::Call(call) => calls.push(call),
            }
        }
        (content, calls)
    }

    /// A special token the detokenizer skipped: it matters only when it is the format's marker.
    pub fn push_special(&mut self, token_text: &str) -> Vec<ParseEvent> {
        if self.format.marker() == Some(token_text) {
            self.push(token_text)
        } else {
            Vec::new()
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<ParseEvent> {
        self.pending.push_str(text);
        let mut events = Vec::new();
        loop {
            let progressed = match self.mode {
                Mode::Text => self.scan_text(&mut events),
                Mode::Start => self.scan_start(),
                Mode::Calls => self.scan_calls(&mut events),
                Mode::TextOnly => {
                    let text = std::mem::take(&mut self.pending);
                    push_content(&mut events, text);
                    false
                }
            };
            if !progressed {
                return events;
            }
        }
    }

    /// The end of the output: whatever is held is released, as calls or as text.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        let mut events = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        match self.mode {
            Mode::Calls => {
                let parsed = match self.format {
                    // A block cut short (a stop string, the length limit) may still hold a
                    // whole call, before what began its closing tag.
                    ToolFormat::Hermes => {
                        let body = pending.trim_end();
                        let cut = partial_suffix(body, HERMES_CLOSE);
                        parse_hermes_body(&body[..body.len() - cut]).map(|call| vec![call])
                    }
                    ToolFormat::Llama3 => parse_llama(&pending),
                    ToolFormat::Mistral => parse_mistral(&pending),
                };
                self.release(&mut events, parsed, pending);
            }
            Mode::Text | Mode::Start | Mode::TextOnly => {
                // After calls, trailing whitespace and the start of a marker cut off by the
                // end of the output (the length limit) are not text.
                let leftover = pending.trim();
                let cut_marker = self
                    .opening_markers()
                    .iter()
                    .any(|m| m.starts_with(leftover));
                if self.calls == 0 || !(leftover.is_empty() || cut_marker) {
                    push_content(&mut events, pending);
                }
            }
        }
        self.mode = Mode::TextOnly;
        events
    }

    /// Calls parsed from `body`, or the opener and `body` back as text; whether calls came.
    fn release(
        &mut self,
        events: &mut Vec<ParseEvent>,
        parsed: Option<Vec<Value>>,
        body: String,
    ) -> bool {
        let calls: Option<Vec<ToolCall>> = parsed.and_then(|values| {
            values
                .iter()
                .map(|value| ToolCall::from_json(self.format, value))
                .collect()
        });
        match calls {
            Some(calls) if !calls.is_empty() => {
                self.calls += calls.len();
                events.extend(calls.into_iter().map(ParseEvent::Call));
                true
            }
            _ => {
                let opener = std::mem::take(&mut self.opener);
                push_content(events, opener + &body);
                false
            }
        }
    }

    /// The markers that open a call in text mode.
    fn opening_markers(&self) -> &'static [&'static str] {
        match self.format {
            ToolFormat::Hermes => &[HERMES_OPEN],
            ToolFormat::Mistral => &[MISTRAL_OPEN],
            ToolFormat::Llama3 => &[],
        }
    }

    /// Text mode: release text up to a marker; returns whether the mode changed.
    fn scan_text(&mut self, events: &mut Vec<ParseEvent>) -> bool {
        let markers = self.opening_markers();
        if let Some((at, marker)) = markers
            .iter()
            .filter_map(|m| self.pending.find(m).map(|at| (at, *m)))
            .min()
        {
            // Whitespace before a call separates it from the text; it is not text itself.
            let before: String = self.pending[..at].trim_end().to_owned();
            self.pending.drain(..at + marker.len());
            push_content(events, before);
            self.opener = marker.to_owned();
            self.mode = Mode::Calls;
            return true;
        }
        // Hold back what may begin a marker, and trailing whitespace.
        let mut keep = markers
            .iter()
            .map(|m| partial_suffix(&self.pending, m))
            .max()
            .unwrap_or(0);
        let body_end = self.pending.len() - keep;
        let trimmed = self.pending[..body_end].trim_end().len();
        keep += body_end - trimmed;
        let release = self.pending.len() - keep;
        if release > 0 {
            let text: String = self.pending.drain(..release).collect();
            push_content(events, text);
        }
        false
    }

    /// Llama: the first non-blank character decides between calls and text.
    fn scan_start(&mut self) -> bool {
        let trimmed = self.pending.trim_start();
        if trimmed.is_empty() || LLAMA_TAG.starts_with(trimmed) {
            return false;
        }
        if let Some(rest) = trimmed.strip_prefix(LLAMA_TAG) {
            self.opener = LLAMA_TAG.to_owned();
            self.pending = rest.to_owned();
            self.mode = Mode::Calls;
        } else if trimmed.starts_with('{') {
            self.pending = trimmed.to_owned();
            self.mode = Mode::Calls;
        } else {
            self.mode = Mode::TextOnly;
        }
        true
    }

    /// Calls mode: a Hermes block ends at its closing tag; the other forms at the end.
    fn scan_calls(&mut self, events: &mut Vec<ParseEvent>) -> bool {
        if self.format != ToolFormat::Hermes {
            return false;
        }
        let Some(end) = self.pending.find(HERMES_CLOSE) else {
            return false;
        };
        let body: String = self.pending[..end].to_owned();
        self.pending.drain(..end + HERMES_CLOSE.len());
        let parsed = parse_hermes_body(&body).map(|call| vec![call]);
        if !self.release(events, parsed, body) {
            push_content(events, HERMES_CLOSE.to_owned());
        }
        self.mode = Mode::Text;
        true
    }
}

/// Adds text to the events, merged with the text event before it.
fn push_content(events: &mut Vec<ParseEvent>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(ParseEvent::Content(last)) = events.last_mut() {
        last.push_str(&text);
    } else {
        events.push(ParseEvent::Content(text));
    }
}

/// The length of the longest end of `text` that begins `marker` (but is not all of it).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .filter(|&n| n <= text.len() && text.is_char_boundary(text.len() - n))
        .find(|&n| marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

fn parse_hermes_body(body: &str) -> Option<Value> {
    serde_json::from_str(body.trim()).ok()
}

/// Llama's calls: JSON objects separated by `;` (or whitespace).
fn parse_llama(body: &str) -> Option<Vec<Value>> {
    let mut values = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            return Some(values);
        }
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        let used = stream.byte_offset();
        values.push(value);
        rest = &rest[used..];
    }
}

/// Mistral's calls: one JSON array of calls (a lone object is taken as one call).
fn parse_mistral(body: &str) -> Option<Vec<Value>> {
    match serde_json::from_str::<Value>(body.trim()).ok()? {
        Value::Array(values) => Some(values),
        object @ Value::Object(_) => Some(vec![object]),
        _ => None,
    }
}
