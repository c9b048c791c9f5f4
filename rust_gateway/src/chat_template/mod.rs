//! Chat templates: render an OpenAI-style conversation into the model's prompt text.
//!
//! Templates are the Jinja sources that Hugging Face tokenizers ship. They are rendered with
//! minijinja configured the way transformers' `apply_chat_template` configures Jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes what Python's `json.dumps` writes), so the prompt
//! is the one the model was trained on. The rendered text already holds the special tokens the
//! template adds (Llama 3 starts with `bos_token`), so it must be tokenized without adding them
//! again.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

mod python_json;
mod strftime;

use python_json::tojson;
use strftime::strftime_now;

const TEMPLATE_NAME: &str = "chat_template";

/// The work one render may do (minijinja's fuel: about one unit per instruction and per 64
/// bytes of data), so that a template that loops without end fails the request instead of
/// holding a tokenizer thread. A conversation as large as a request body may be renders with
/// room to spare (`the_fuel_budget_fits_the_largest_conversations`).
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// Longest rendered prompt in bytes; a longer one is refused before it is tokenized.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0}")]
    Syntax(#[source] minijinja::Error),
    #[error("chat template rejected the conversation: {0}")]
    Render(#[source] minijinja::Error),
    #[error("rendering the chat template took more than its work budget ({TEMPLATE_FUEL} fuel)")]
    OutOfFuel,
    #[error("the rendered chat template is longer than {MAX_RENDERED_BYTES} bytes")]
    TooLong,
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

/// One message of a conversation, as OpenAI's chat API sends it.
///
/// `content` may be a string or a list of `{"type": "text", "text": ...}` parts; text parts are
/// joined with newlines (as vLLM does). Other part types (images, audio) are refused because the
/// engine serves text-only models. It is null (`None`) in an assistant turn that only called
/// tools. `tool_calls` (assistant), `tool_call_id` and `name` (role `tool`) reach the template
/// as the client sent them, except that each call's `arguments` JSON string becomes the object
/// it encodes, which is what templates written for transformers expect (vLLM does the same).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, deserialize_with = "deserialize_content")]
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain message with text content.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `template_source`; syntax errors are reported here, not at the first request.
    pub fn new(
        template_source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(ChatTemplateError::Syntax)?;
        env.set_syntax(syntax);
        // Jinja2's default: undefined values print as "" and iterate as empty.
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template_source.to_owned())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            source: template_source.to_owned(),
            bos_token,
            eos_token,
        })
    }

    /// Loads the template of a snapshot or Hugging Face model directory: `chat_template.jinja`,
    /// else `chat_template` in `tokenizer_config.json`. `Ok(None)` when the model has none.
    pub fn from_snapshot_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?.unwrap_or(serde_json::Value::Null);
        let jinja_path = dir.join("chat_template.jinja");
        let source = match read_text_if_present(&jinja_path)? {
            Some(text) => text,
            None => match template_from_config(&config, &config_path)? {
                Some(text) => text,
                None => return Ok(None),
            },
        };
        // Older exports keep the special tokens in special_tokens_map.json only.
        let map_path = dir.join("special_tokens_map.json");
        let token_map = read_json_if_present(&map_path)?.unwrap_or(serde_json::Value::Null);
        let token =
            |name: &str| special_token(&config, name).or_else(|| special_token(&token_map, name));
        Self::new(&source, token("bos_token"), token("eos_token")).map(Some)
    }

    /// The Jinja source (tool support is read from it).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the conversation with `tools` (OpenAI tool objects) as transformers'
    /// `apply_chat_template(..., tools=...)` passes them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes these as None when the caller gives none; templates test
        // `tools is not none`, which an undefined value would pass.
        let tools = tools.map_or(Value::from(()), |tools| {
            Value::from(minijinja::value::Serde(tools))
        });
        ctx.insert("tools", tools);
        ctx.insert("documents", Value::from(()));
        // A token the tokenizer lacks stays undefined (prints as ""), as in transformers.
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        let mut output = CappedWriter::default();
        let rendered = template.render_captured_to(Value::from(ctx), &mut output);
        if output.overflowed {
            return Err(ChatTemplateError::TooLong);
        }
        match rendered {
            Ok(_) => String::from_utf8(output.bytes).map_err(|err| {
                let message = format!("the chat template wrote invalid UTF-8: {err}");
                ChatTemplateError::Render(minijinja::Error::new(
                    ErrorKind::BadSerialization,
                    message,
                ))
            }),
            Err(err) if err.kind() == ErrorKind::OutOfFuel => Err(ChatTemplateError::OutOfFuel),
            Err(err) => Err(ChatTemplateError::Render(err)),
        }
    }
}

/// Collects the rendered text and fails the render past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct CappedWriter {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered template is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn message_value(message: &ChatMessage) -> Value {
    let mut map: BTreeMap<&str, Value> = BTreeMap::new();
    map.insert("role", Value::from(message.role.as_str()));
    map.insert(
        "content",
        message
            .content
            .as_deref()
            .map_or(Value::from(()), Value::from),
    );
    if let Some(calls) = &message.tool_calls {
        let calls: Vec<serde_json::Value> = calls.iter().map(decoded_arguments).collect();
        map.insert("tool_calls", Value::from(minijinja::value::Serde(&calls)));
    }
    if let Some(id) = &message.tool_call_id {
        map.insert("tool_call_id", Value::from(id.as_str()));
    }
    if let Some(name) = &message.name {
        map.insert("name", Value::from(name.as_str()));
    }
    Value::from(map)
}

/// A tool call whose `function.arguments` JSON string is replaced by the object it encodes.
fn decoded_arguments(call: &serde_json::Value) -> serde_json::Value {
    let mut call = call.clone();
    if let Some(arguments) = call.pointer_mut("/function/arguments") {
        if let Some(decoded) = arguments
            .as_str()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        {
            *arguments = decoded;
        }
    }
    call
}

fn read_text_if_present(path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatTemplateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>, ChatTemplateError> {
    let Some(text) = read_text_if_present(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ChatTemplateError::Json {
            path: path.to_owned(),
            source,
        })
}

/// `chat_template` is a string, or a list of `{"name", "template"}` of which "default" is used.
fn template_from_config(
    config: &serde_json::Value,
    path: &Path,
) -> Result<Option<String>, ChatTemplateError> {
    let config_error = |reason: &str| ChatTemplateError::Config {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template"))
            .and_then(|t| t.as_str())
            .map(|t| Some(t.to_owned()))
            .ok_or_else(|| config_error("chat_template list has no template named \"default\"")),
        Some(_) => Err(config_error("chat_template must be a string or a list")),
    }
}

/// Special tokens are saved as plain strings or as `{"content": ...}` (AddedToken) maps.
fn special_token(config: &serde_json::Value, name: &str) -> Option<String> {
    match config.get(name)? {
        serde_json::Value::String(token) => Some(token.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn deserialize_content<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    deserializer.deserialize_any(ContentVisitor)
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

struct ContentVisitor;

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, null, or a list of {\"type\": \"text\", \"text\": ...} parts")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<String>, E> {
        Ok(Some(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Option<String>, E> {
        Ok(Some(text))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut parts: A) -> Result<Option<String>, A::Error> {
        let mut texts: Vec<String> = Vec::new();
        while let Some(part) = parts.next_element::<ContentPart>()? {
            if part.kind != "text" {
                return Err(de::Error::custom(format!(
                    "content parts of type \"{}\" are not supported; only \"text\" parts are",
                    part.kind
                )));
            }
            let text = part.text.ok_or_else(|| {
                de::Error::custom("a \"text\" content part needs a \"text\" field")
            })?;
            texts.push(text);
        }
        Ok(Some(texts.join("\n")))
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::text(role, content)
    }

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))?.render(messages, true)
    }

    #[test]
    fn renders_with_python_string_methods_and_trimmed_blocks() {
        let source = "{% for m in messages %}\n  {% if m.content.startswith('x') %}{{ m.content.strip().upper() }}{% endif %}\n{% endfor %}{{ bos_token }}";
        let out = render(source, &[msg("user", "x  a "), msg("user", "b")]).unwrap();
        assert_eq!(out, "X  A<s>");
    }

    #[test]
    fn a_template_that_loops_runs_out_of_fuel() {
        let source =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = render(source, &[msg("user", "hi")]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::OutOfFuel), "{err}");
    }

    #[test]
    fn a_rendering_past_the_cap_is_refused() {
        // Each message is written 64 times: cheap in fuel, long in output.
        let source = "{% for m in messages %}{% for i in range(64) %}{{ m.content }}{% endfor %}{% endfor %}";
        let big = "x".repeat(MAX_RENDERED_BYTES / 64 + 1);
        let err = render(source, &[msg("user", &big)]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::TooLong), "{err}");
    }

    #[test]
    fn loop_controls_are_enabled() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}";
        assert_eq!(render(source, &[msg("a", ""), msg("b", "")]).unwrap(), "a");
    }

    #[test]
    fn raise_exception_becomes_a_render_error_with_the_message() {
        let source = "{{ raise_exception('roles must alternate') }}";
        let err = render(source, &[]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)));
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err}");
    }

    #[test]
    fn missing_special_tokens_render_as_empty_and_tools_are_none() {
        let template =
            ChatTemplate::new("[{{ bos_token }}]{{ tools is none }}", None, None).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "[]True");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ {'a': [1, 2.5, none, true], 'b': 'é\"\\n<'} | tojson }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}|{{ {'b': 1, 'a': 1e20} | tojson(sort_keys=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        let out = render(source, &[]).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\\n<\"}|[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]|[]|{\"a\": 1e+20, \"b\": 1}|\"\\u00e9\""
        );
    }

    #[test]
    fn strftime_now_renders_today() {
        let out = render("{{ strftime_now('%Y-%m-%d') }}", &[]).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert!(out.starts_with("20"), "{out}");
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_refused() {
        let parts: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(parts.content.as_deref(), Some("a\nb"));
        let err = serde_json::from_str::<ChatMessage>(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("\"image_url\" are not supported"),
            "{err}"
        );
        let err =
            serde_json::from_str::<ChatMessage>(r#"{"role":"user","content":7}"#).unwrap_err();
        assert!(
            err.to_string().contains("a string, null, or a list"),
            "{err}"
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chat_template_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn snapshot_dir_prefers_the_jinja_file_and_reads_token_maps() {
        let dir = temp_dir("jinja");
        std::fs::write(
            dir.join("chat_template.jinja"),
            "{{ bos_token }}|{{ eos_token }}",
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "unused", "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        let template = ChatTemplate::from_snapshot_dir(&dir).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "<s>|</s>");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_dir_falls_back_to_the_config_and_named_templates() {
        let dir = temp_dir("config");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"eos_token": "<e>"}"#,
        )
        .unwrap();
        let template = ChatTemplate::from_snapshot_dir(&dir).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "D<e>");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_dir_without_a_template_gives_none_and_bad_json_an_error() {
        let dir = temp_dir("none");
        assert!(ChatTemplate::from_snapshot_dir(&dir).unwrap().is_none());
        std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
        let err = ChatTemplate::from_snapshot_dir(&dir).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Json { .. }), "{err}");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
        let err = ChatTemplate::from_snapshot_dir(&dir).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Config { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The comparison with transformers: tests/fixtures/chat_templates/expected.json holds what
/// `apply_chat_template` renders (written by tests/gateway/test_chat_template.py).
#[cfg(test)]
mod transformers_fixtures {
    use super::*;

    #[derive(Deserialize)]
    struct ExpectedFile {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        template: String,
        name: String,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        #[serde(default)]
        tools: Option<Vec<serde_json::Value>>,
        expected: Option<String>,
        error: Option<String>,
    }

    #[derive(Deserialize)]
    struct Tokens {
        bos_token: Option<String>,
        eos_token: Option<String>,
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates")
    }

    fn load_cases() -> Vec<Case> {
        let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
        serde_json::from_str::<ExpectedFile>(&text).unwrap().cases
    }

    fn load_template(name: &str) -> ChatTemplate {
        let dir = fixture_dir();
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let tokens: Tokens = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        ChatTemplate::new(&source, tokens.bos_token, tokens.eos_token).unwrap()
    }

    /// One line per case whose Rust rendering differs from transformers'.
    fn mismatches(cases: &[Case]) -> Vec<String> {
        let mut templates: BTreeMap<String, ChatTemplate> = BTreeMap::new();
        let mut out = Vec::new();
        for case in cases {
            let template = templates
                .entry(case.template.clone())
                .or_insert_with(|| load_template(&case.template));
            let rendered = template.render_with_tools(
                &case.messages,
                case.tools.as_deref(),
                case.add_generation_prompt,
            );
            let label = format!("{}/{}", case.template, case.name);
            match (&case.expected, &case.error, rendered) {
                (Some(want), _, Ok(got)) if *want == got => {}
                (None, Some(want), Err(err)) if err.to_string().contains(want.as_str()) => {}
                (want, want_err, got) => out.push(format!(
                    "{label}: transformers gave {want:?} (error {want_err:?}), Rust gave {got:?}"
                )),
            }
        }
        out
    }

    /// As many messages as a default-sized body (THAW_MAX_BODY_BYTES) can carry, and one
    /// message as long as such a body, render within the fuel budget with each fixture template.
    #[test]
    fn the_fuel_budget_fits_the_largest_conversations() {
        let body = 2 * 1024 * 1024;
        let message = |role: &str, content: &str| ChatMessage::text(role, content);
        // `{"role":"user","content":"x"},` is 30 bytes; an odd count ends with the user.
        let count = (body / 30) | 1;
        let roles = ["user", "assistant"];
        let many: Vec<ChatMessage> = (0..count).map(|i| message(roles[i % 2], "x")).collect();
        let long = vec![message("user", &"x ".repeat(body / 2))];
        for name in ["llama3", "mistral", "qwen2", "smollm2"] {
            let template = load_template(name);
            for messages in [&many, &long] {
                let rendered = template.render(messages, true);
                assert!(rendered.is_ok(), "{name}: {:?}", rendered.err());
            }
        }
    }

    #[test]
    fn fixtures_render_like_transformers() {
        let cases = load_cases();
        let templates: std::collections::BTreeSet<&str> =
            cases.iter().map(|c| c.template.as_str()).collect();
        assert_eq!(
            templates.into_iter().collect::<Vec<_>>(),
            ["llama3", "mistral", "qwen2", "smollm2"]
        );
        let failed = mismatches(&cases);
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }

    #[test]
    fn the_comparison_catches_a_changed_rendering_and_a_missing_error() {
        let mut cases = load_cases();
        let rendered = cases.iter().position(|c| c.expected.is_some()).unwrap();
        let refused = cases.iter().position(|c| c.error.is_some()).unwrap();
        cases[rendered].expected.as_mut().unwrap().push(' ');
        cases[refused].error = Some("a message no template raises".into());
        let picked = [&cases[rendered], &cases[refused]];
        let labels: Vec<String> = picked
            .iter()
            .map(|c| format!("{}/{}", c.template, c.name))
            .collect();
        let failed = mismatches(&cases);
        assert_eq!(failed.len(), 2, "{failed:?}");
        for (line, label) in failed.iter().zip(labels) {
            assert!(line.starts_with(&format!("{label}:")), "{line}");
        }
    }
}
