use serde_json::{json, Value};

use super::grammar::tool_lark;
use super::parse::ParseEvent;
use super::*;
use crate::chat_template::{ChatMessage, ChatTemplate};

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time"}})
}

fn request(choice: Value, parallel: Option<bool>) -> ToolRequest {
    ToolRequest::from_fields(Some(&[weather(), time_tool()]), Some(&choice), parallel)
        .unwrap()
        .unwrap()
}

fn refusal(tools: Value, choice: Option<Value>) -> (String, String) {
    let tools: Vec<Value> = serde_json::from_value(tools).unwrap();
    let err = ToolRequest::from_fields(Some(&tools), choice.as_ref(), None).unwrap_err();
    (err.field.clone(), err.to_string())
}

#[test]
fn choices_parse_and_default_to_auto() {
    let tools = [weather()];
    let auto = ToolRequest::from_fields(Some(&tools), None, None)
        .unwrap()
        .unwrap();
    assert_eq!(auto.choice, ToolChoice::Auto);
    assert!(auto.active() && !auto.forces() && auto.parallel);
    let none = request(json!("none"), None);
    assert!(!none.active());
    let named = request(
        json!({"type": "function", "function": {"name": "get_time"}}),
        Some(false),
    );
    assert_eq!(named.choice, ToolChoice::Named("get_time".into()));
    assert_eq!(named.callable().len(), 1);
    assert!(named.forces() && !named.parallel);
    assert_eq!(request(json!("required"), None).callable().len(), 2);
    assert_eq!(
        request(json!("required"), None).tools[1].parameters,
        json!({"type": "object"})
    );
    assert!(ToolRequest::from_fields(None, Some(&json!("auto")), None)
        .unwrap()
        .is_none());
}

#[test]
fn bad_tools_are_refused_with_the_field() {
    let absent = refusal(
        json!([weather()]),
        Some(json!({"type": "function", "function": {"name": "nope"}})),
    );
    assert_eq!(absent.0, "tool_choice");
    assert!(absent.1.contains("\"nope\""), "{}", absent.1);
    let schema = refusal(
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
        None,
    );
    assert_eq!(schema.0, "tools[0].function.parameters");
    let recursive = refusal(
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#"}}}}}]),
        None,
    );
    assert!(recursive.1.contains("recursive"), "{}", recursive.1);
    assert_eq!(
        refusal(
            json!([{"type": "function", "function": {"name": "bad name"}}]),
            None
        )
        .0,
        "tools[0].function.name"
    );
    assert_eq!(
        refusal(json!([{"type": "retrieval"}]), None).0,
        "tools[0].type"
    );
    assert_eq!(
        refusal(json!([time_tool(), time_tool()]), None).0,
        "tools[1].function.name"
    );
    assert_eq!(
        refusal(json!([weather()]), Some(json!("sometimes"))).0,
        "tool_choice"
    );
    let err = ToolRequest::from_fields(None, Some(&json!("required")), None).unwrap_err();
    assert_eq!(err.field, "tool_choice");
}

#[test]
fn formats_are_detected_from_the_template() {
    assert_eq!(
        ToolFormat::detect("{{ '<tool_call>' }}"),
        ToolFormat::Hermes
    );
    assert_eq!(ToolFormat::detect("[TOOL_CALLS] ["), ToolFormat::Mistral);
    assert_eq!(ToolFormat::detect("<|python_tag|>"), ToolFormat::Llama3);
    assert_eq!(ToolFormat::detect("{{ messages }}"), ToolFormat::Hermes);
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates");
    let read =
        |name: &str| std::fs::read_to_string(fixtures.join(format!("{name}.jinja"))).unwrap();
    assert_eq!(ToolFormat::detect(&read("llama3")), ToolFormat::Llama3);
    assert_eq!(ToolFormat::detect(&read("mistral")), ToolFormat::Mistral);
    let plain = ToolSupport::new(Some(&read("smollm2")), None);
    assert_eq!(plain.format, ToolFormat::Hermes);
    assert!(!plain.template_renders_tools);
    let forced = ToolSupport::new(Some(&read("smollm2")), Some(ToolFormat::Llama3));
    assert_eq!(forced.format, ToolFormat::Llama3);
}

#[test]
fn forcing_grammars_compile_in_every_format() {
    for format in [ToolFormat::Hermes, ToolFormat::Llama3, ToolFormat::Mistral] {
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ] {
            for parallel in [true, false] {
                let req = request(choice.clone(), Some(parallel));
                for marker in [None, Some(5)] {
                    let grammar = tool_grammar(&req, format, marker).unwrap();
                    assert!(grammar.is_some(), "{format:?} {choice}");
                }
            }
        }
        assert_eq!(
            tool_grammar(&request(json!("auto"), None), format, None).unwrap(),
            None
        );
    }
    let named = request(
        json!({"type": "function", "function": {"name": "get_weather"}}),
        Some(false),
    );
    let hermes = tool_lark(&named, ToolFormat::Hermes, None);
    assert!(hermes.starts_with("start: call\n"), "{hermes}");
    assert!(hermes.contains("call_0: \"<tool_call>\\n{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": \" args_0 \"}\\n</tool_call>\""), "{hermes}");
    assert!(
        hermes.contains("args_0: %json {\"type\":\"object\""),
        "{hermes}"
    );
    assert!(!hermes.contains("get_time"));
    let mistral = tool_lark(
        &request(json!("required"), None),
        ToolFormat::Mistral,
        Some(5),
    );
    assert!(
        mistral.starts_with("start: <[5]> \" [\" call (\", \" call)* \"]\"\n"),
        "{mistral}"
    );
    let llama = tool_lark(&request(json!("required"), None), ToolFormat::Llama3, None);
    assert!(llama.contains("\\\"parameters\\\": \" args_1"), "{llama}");
}

/// Everything a parser gives for `text` pushed in `pieces`, merged: (content, calls).
fn run(format: ToolFormat, pieces: &[&str]) -> (String, Vec<(String, Value)>) {
    let mut parser = ToolCallParser::new(format);
    let mut events = Vec::new();
    for piece in pieces {
        events.extend(parser.push(piece));
    }
    events.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for event in events {
        match event {
            ParseEvent::Content(text) => content.push_str(&text),
            ParseEvent::Call(call) => {
                assert!(!call.id.is_empty());
                calls.push((call.name, serde_json::from_str(&call.arguments).unwrap()));
            }
        }
    }
    (content, calls)
}

/// The whole text, and the text split at every byte boundary (char boundaries), agree.
fn parse_everywhere(format: ToolFormat, text: &str) -> (String, Vec<(String, Value)>) {
    let whole = run(format, &[text]);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for &(at, _) in &chars {
        let split = run(format, &[&text[..at], &text[at..]]);
        assert_eq!(split, whole, "{format:?} split at {at} of {text:?}");
    }
    let singles: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = singles.iter().map(String::as_str).collect();
    assert_eq!(
        run(format, &refs),
        whole,
        "{format:?} char by char: {text:?}"
    );
    whole
}

#[test]
fn hermes_calls_parse_whole_and_streamed() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n</tool_call>";
    let (content, calls) = parse_everywhere(ToolFormat::Hermes, text);
    assert_eq!(content, "Let me check.");
    assert_eq!(
        calls,
        vec![
            ("get_weather".to_string(), json!({"city": "Paris"})),
            ("get_time".to_string(), json!({})),
        ]
    );
    let unclosed = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}";
    assert_eq!(parse_everywhere(ToolFormat::Hermes, unclosed).1.len(), 1);
    let half_closed = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_ca";
    assert_eq!(
        parse_everywhere(ToolFormat::Hermes, half_closed),
        (String::new(), vec![("get_time".to_string(), json!({}))])
    );
    // A second call cut short by the length limit leaves no text behind.
    let cut = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n<tool";
    assert_eq!(parse_everywhere(ToolFormat::Hermes, cut).0, "");
    let plain = "No tools needed: 1 < 2 and <tool is fine.\n";
    assert_eq!(
        parse_everywhere(ToolFormat::Hermes, plain),
        (plain.to_string(), vec![])
    );
}

#[test]
fn malformed_calls_fall_back_to_text() {
    let broken = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {</tool_call>";
    assert_eq!(
        parse_everywhere(ToolFormat::Hermes, broken),
        (broken.to_string(), vec![])
    );
    let nameless = "<tool_call>{\"arguments\": {}}</tool_call> after";
    assert_eq!(parse_everywhere(ToolFormat::Hermes, nameless).0, nameless);
    let cut = "<tool_call>\n{\"name\": \"get_ti";
    assert_eq!(
        parse_everywhere(ToolFormat::Hermes, cut),
        (cut.to_string(), vec![])
    );
    let mistral = "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {]";
    assert_eq!(parse_everywhere(ToolFormat::Mistral, mistral).0, mistral);
    let llama = "{\"name\": \"f\", \"parameters\": {\"a\": 1}} trailing words";
    assert_eq!(parse_everywhere(ToolFormat::Llama3, llama).0, llama);
    let array_args = "{\"name\": \"f\", \"parameters\": [1]}";
    assert_eq!(parse_everywhere(ToolFormat::Llama3, array_args).1, vec![]);
}

#[test]
fn llama_calls_parse_whole_and_streamed() {
    let text = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"get_time\", \"parameters\": {}}";
    let (content, calls) = parse_everywhere(ToolFormat::Llama3, text);
    assert_eq!(content, "");
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0],
        ("get_weather".to_string(), json!({"city": "Oslo"}))
    );
    let tagged = "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}";
    assert_eq!(parse_everywhere(ToolFormat::Llama3, tagged).1.len(), 1);
    let prose = "The answer is {\"name\": 1}.";
    assert_eq!(
        parse_everywhere(ToolFormat::Llama3, prose),
        (prose.to_string(), vec![])
    );
    // The tag as a skipped special token.
    let mut parser = ToolCallParser::new(ToolFormat::Llama3);
    assert!(parser.push_special("<|eot_id|>").is_empty());
    assert!(parser.push_special("<|python_tag|>").is_empty());
    let mut events = parser.push("{\"name\": \"get_time\", \"parameters\": {}}");
    events.extend(parser.finish());
    assert!(
        matches!(&events[..], [ParseEvent::Call(call)] if call.name == "get_time" && call.id.starts_with("call_"))
    );
}

#[test]
fn mistral_calls_parse_whole_and_streamed() {
    let text = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}, {\"name\": \"get_time\", \"arguments\": {}}]";
    let (content, calls) = parse_everywhere(ToolFormat::Mistral, text);
    assert_eq!(content, "");
    assert_eq!(calls.len(), 2);
    // The marker as a special token, which the detokenizer skips.
    let mut parser = ToolCallParser::new(ToolFormat::Mistral);
    let mut events = parser.push("Sure.");
    events.extend(parser.push_special("[TOOL_CALLS]"));
    events.extend(parser.push(" [{\"name\": \"get_time\", \"arguments\": {}}]"));
    events.extend(parser.finish());
    assert_eq!(events[0], ParseEvent::Content("Sure.".into()));
    assert!(
        matches!(&events[1], ParseEvent::Call(call) if call.id.len() == 9 && call.arguments == "{}")
    );
}

#[test]
fn plain_templates_get_the_tools_in_the_system_message() {
    let req = request(json!("auto"), None);
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}});
    let messages = vec![
        ChatMessage::text("system", "Be brief."),
        ChatMessage::text("user", "Time?"),
        ChatMessage {
            tool_calls: Some(vec![call]),
            content: None,
            ..ChatMessage::text("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("call_1".into()),
            ..ChatMessage::text("tool", "12:00")
        },
    ];
    let rewritten = rewrite_for_plain_template(&messages, &req);
    let roles: Vec<&str> = rewritten.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    let system = rewritten[0].content.as_deref().unwrap();
    assert!(system.starts_with("Be brief.\n\n# Tools"), "{system}");
    assert!(system.contains("\"name\":\"get_weather\""), "{system}");
    assert_eq!(
        rewritten[2].content.as_deref(),
        Some("<tool_call>\n{\"name\":\"get_time\",\"arguments\":{\"tz\":\"UTC\"}}\n</tool_call>")
    );
    assert_eq!(
        rewritten[3].content.as_deref(),
        Some("<tool_response>\n12:00\n</tool_response>")
    );
}

#[test]
fn templates_receive_tools_and_tool_turns() {
    let source = "{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}[{{ m.role }}:{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.tz }}{% endif %}{{ m.tool_call_id }}]{% endfor %}{{ tools[0] | tojson }}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let call = json!({"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"UTC\"}"}});
    let messages = vec![
        ChatMessage {
            tool_calls: Some(vec![call]),
            content: None,
            ..ChatMessage::text("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("c".into()),
            ..ChatMessage::text("tool", "12:00")
        },
    ];
    let tools = request(json!("auto"), None).template_tools();
    let out = template
        .render_with_tools(&messages, Some(&tools), false)
        .unwrap();
    // Keys keep the client's order, as Python's dicts do.
    assert_eq!(
        out,
        "get_weather;get_time;[assistant:NoneUTC][tool:12:00c]{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}"
    );
}

/// A whole round trip (tools offered, a call, its result) renders with every fixture template,
/// through the template where it takes tools and through the system message where it does not.
#[test]
fn fixture_templates_render_a_tool_round_trip() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates");
    let req = request(json!("auto"), None);
    let call = json!({"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}});
    let messages = vec![
        ChatMessage::text("user", "Weather in Paris?"),
        ChatMessage {
            tool_calls: Some(vec![call]),
            content: None,
            ..ChatMessage::text("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("abcdefghi".into()),
            name: Some("get_weather".into()),
            ..ChatMessage::text("tool", "{\"celsius\": 21}")
        },
    ];
    for name in ["llama3", "mistral", "qwen2", "smollm2"] {
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let tokens: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        let token = |key: &str| tokens[key].as_str().map(str::to_owned);
        let template = ChatTemplate::new(&source, token("bos_token"), token("eos_token")).unwrap();
        let support = ToolSupport::new(Some(&source), None);
        let rendered = if support.template_renders_tools {
            template.render_with_tools(&messages, Some(&req.template_tools()), true)
        } else {
            template.render(&rewrite_for_plain_template(&messages, &req), true)
        };
        let rendered = rendered.unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(rendered.contains("get_weather"), "{name}: {rendered}");
        assert!(rendered.contains("21"), "{name}: {rendered}");
        assert!(rendered.contains("Paris"), "{name}: {rendered}");
    }
}
