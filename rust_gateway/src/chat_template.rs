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
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

const TEMPLATE_NAME: &str = "chat_template";

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0}")]
    Syntax(#[source] minijinja::Error),
    #[error("chat template rejected the conversation: {0}")]
    Render(#[source] minijinja::Error),
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
/// engine serves text-only models.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(deserialize_with = "deserialize_content")]
    pub content: String,
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
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
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template_source.to_owned())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
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
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes these as None when the caller gives none; templates test
        // `tools is not none`, which an undefined value would pass.
        ctx.insert("tools", Value::from(()));
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
        template
            .render(Value::from(ctx))
            .map_err(ChatTemplateError::Render)
    }
}

fn message_value(message: &ChatMessage) -> Value {
    let mut map: BTreeMap<&str, Value> = BTreeMap::new();
    map.insert("role", Value::from(message.role.as_str()));
    map.insert("content", Value::from(message.content.as_str()));
    Value::from(map)
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

fn deserialize_content<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
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
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a list of {\"type\": \"text\", \"text\": ...} parts")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut parts: A) -> Result<String, A::Error> {
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
        Ok(texts.join("\n"))
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, arguments in that order, not HTML-escaped.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let arg = |pos: usize, name: &str| -> Result<Option<Value>, minijinja::Error> {
        match (args.get(pos), kwargs.get::<Option<Value>>(name)?) {
            (Some(_), Some(_)) => Err(minijinja::Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson got {name} twice"),
            )),
            (Some(v), None) => Ok(Some(v.clone())),
            (None, v) => Ok(v),
        }
    };
    if args.len() > 4 {
        return Err(minijinja::Error::from(ErrorKind::TooManyArguments));
    }
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(text) => Some(text.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let (item_sep, key_sep) = match arg(2, "separators")? {
        Some(v) if !v.is_none() => {
            let item = v.get_item_by_index(0)?;
            let key = v.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be two strings",
                    ));
                }
            }
        }
        // Python drops the space after "," when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    style.write_value(&mut out, value, 0)?;
    Ok(out)
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn write_value(
        &self,
        out: &mut String,
        value: &Value,
        depth: usize,
    ) -> Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => write!(out, "{value}").map_err(fmt_error)?,
            ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, '[', ']', &items, depth, |out, item, depth| {
                    self.write_value(out, item, depth)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((json_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', &entries, depth, |out, (key, item), depth| {
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write_value(out, item, depth)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson cannot serialize a value of type {kind}"),
                ));
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[T],
        depth: usize,
        write_item: impl Fn(&mut String, &T, usize) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        for (idx, item) in items.iter().enumerate() {
            if idx > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            write_item(out, item, depth + 1)?;
        }
        if !items.is_empty() {
            self.newline(out, depth);
        }
        out.push(close);
        Ok(())
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, out: &mut String, text: &str) {
        out.push('"');
        for ch in text.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python turns non-string keys into strings (`True` -> "true", `1` -> "1").
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::Number if key.is_integer() => Ok(key.to_string()),
        ValueKind::Number => Ok(python_float_repr(f64::try_from(key.clone())?)),
        kind => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson cannot use a {kind} as an object key"),
        )),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let scientific = format!("{v:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if v != 0.0 && !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let plain = format!("{v}");
    if plain.contains('.') {
        plain
    } else {
        format!("{plain}.0")
    }
}

fn fmt_error(_: fmt::Error) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, "cannot format value")
}

/// `strftime_now(format)`: the current time (UTC, the container's local time) formatted like
/// Python's `datetime.now().strftime(format)` for the directives templates use.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, CivilTime::from_unix(seconds))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday, as Python's `weekday()`.
    weekday: usize,
    /// 1-based day of the year.
    yearday: u32,
}

impl CivilTime {
    fn from_unix(seconds: u64) -> Self {
        let days = (seconds / 86_400) as i64;
        let secs = (seconds % 86_400) as u32;
        // Shift the epoch to 0000-03-01 so that leap days fall at the end of each year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let shifted_month = (5 * day_of_year + 2) / 153;
        let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
        let month = if shifted_month < 10 {
            shifted_month + 3
        } else {
            shifted_month - 9
        } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days_before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yearday = days_before_month[month as usize - 1] + day + u32::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: secs / 3_600,
            minute: secs / 60 % 60,
            second: secs % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as usize,
            yearday,
        }
    }
}

fn strftime(format: &str, t: CivilTime) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let month = MONTHS[t.month as usize - 1];
        let weekday = WEEKDAYS[t.weekday];
        let written = match chars.next() {
            Some('Y') => write!(out, "{}", t.year),
            Some('y') => write!(out, "{:02}", t.year.rem_euclid(100)),
            Some('m') => write!(out, "{:02}", t.month),
            Some('d') => write!(out, "{:02}", t.day),
            Some('e') => write!(out, "{:2}", t.day),
            Some('j') => write!(out, "{:03}", t.yearday),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{:02}", t.hour),
            Some('I') => write!(out, "{:02}", (t.hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{:02}", t.minute),
            Some('S') => write!(out, "{:02}", t.second),
            Some('%') => write!(out, "%"),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now does not support %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        };
        written.map_err(fmt_error)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
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
    fn python_float_repr_switches_to_exponents_like_python() {
        assert_eq!(python_float_repr(3.0), "3.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1.5e15), "1500000000000000.0");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(-2.5e-7), "-2.5e-07");
    }

    #[test]
    fn civil_time_and_strftime() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208 of a leap year.
        let t = CivilTime::from_unix(1_722_000_309);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 7, 26, 13, 25, 9)
        );
        let out = strftime("%d %b %Y|%A %a %B %j %I%p %y %e %%", t).unwrap();
        assert_eq!(out, "26 Jul 2024|Friday Fri July 208 01PM 24 26 %");
        assert_eq!(CivilTime::from_unix(0).weekday, 3);
        let leap_day = CivilTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap_day.year, leap_day.month, leap_day.day), (2000, 2, 29));
        assert!(strftime("%Q", t).is_err());
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
        assert_eq!(parts.content, "a\nb");
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
        assert!(err.to_string().contains("a string or a list"), "{err}");
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
/// `apply_chat_template` renders (written by tests/test_chat_template.py).
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
            let rendered = template.render(&case.messages, case.add_generation_prompt);
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
