//! docs/sampling_contract.json, the sampling contract the worker's tests read too: the bounds
//! here are the file's, the submit frame's params are the file's, and every case is accepted
//! or refused as the file says.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::*;

const FLOATS: [FloatParam; 6] = [
    TEMPERATURE,
    TOP_P,
    MIN_P,
    REPETITION_PENALTY,
    PRESENCE_PENALTY,
    FREQUENCY_PENALTY,
];
const INTS: [IntParam; 6] = [
    MAX_NEW_TOKENS,
    TOP_K,
    LOGPROBS,
    SEED,
    MIN_TOKENS,
    PROMPT_LOGPROBS,
];

fn contract() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/sampling_contract.json"
    );
    let text = std::fs::read_to_string(path).expect("docs/sampling_contract.json");
    serde_json::from_str(&text).expect("contract JSON")
}

fn params(contract: &Value) -> &Vec<Value> {
    contract["params"].as_array().expect("params")
}

fn name(param: &Value) -> &str {
    param["name"].as_str().expect("name")
}

fn limits() -> Limits {
    Limits {
        max_input_tokens: 8,
        max_total_tokens: 4096,
        default_max_new_tokens: 16,
    }
}

/// Wire params as a client's spec.
fn spec(wire: &Map<String, Value>) -> SamplingSpec {
    let mut spec = SamplingSpec::default();
    for (name, value) in wire {
        let int = || Some(value.as_i64().unwrap_or_else(|| panic!("{name}: {value}")));
        let float = || Some(value.as_f64().unwrap_or_else(|| panic!("{name}: {value}")));
        match name.as_str() {
            "max_new_tokens" => spec.max_new_tokens = int(),
            "temperature" => spec.temperature = float(),
            "top_k" => spec.top_k = int(),
            "top_p" => spec.top_p = float(),
            "min_p" => spec.min_p = float(),
            "repetition_penalty" => spec.repetition_penalty = float(),
            "presence_penalty" => spec.presence_penalty = float(),
            "frequency_penalty" => spec.frequency_penalty = float(),
            "seed" if value.is_null() => spec.seed = None,
            "seed" => spec.seed = Some(value.as_u64().expect("a non-negative seed")),
            "ignore_eos" => spec.ignore_eos = value.as_bool().expect("ignore_eos"),
            "logprobs" => spec.logprobs = int(),
            "stop_token_ids" => {
                spec.stop_token_ids = serde_json::from_value(value.clone()).expect("ids")
            }
            "logit_bias" => spec.logit_bias = serde_json::from_value(value.clone()).expect("pairs"),
            "min_tokens" => spec.min_tokens = int(),
            "constraint" => spec.constraint = value.as_str().map(str::to_string),
            "prompt_logprobs" => spec.prompt_logprobs = value.as_i64(),
            other => panic!("{other}: not mapped onto SamplingSpec"),
        }
    }
    spec
}

#[test]
fn the_submit_params_are_the_contracts() {
    let contract = contract();
    let listed: BTreeSet<&str> = params(&contract).iter().map(name).collect();
    let base: BTreeSet<&str> = contract["base"]
        .as_object()
        .expect("base")
        .keys()
        .map(String::as_str)
        .collect();
    let frame = serde_json::to_value(Params::default()).expect("params encode");
    let fields: BTreeSet<&str> = frame
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(listed, fields, "params[] against the submit frame's Params");
    assert_eq!(base, fields, "base against the submit frame's Params");
}

#[test]
fn the_bounds_are_the_contracts() {
    let contract = contract();
    let mut bounded = BTreeSet::new();
    for param in params(&contract) {
        let name = name(param);
        match param["type"].as_str().expect("type") {
            "float" => {
                let rust = FLOATS
                    .iter()
                    .find(|p| p.name == name)
                    .unwrap_or_else(|| panic!("{name}: no FloatParam"));
                assert_eq!(Some(rust.min), param["min"].as_f64(), "{name} min");
                let exclusive = param["min_exclusive"].as_bool().unwrap_or(false);
                assert_eq!(rust.min_exclusive, exclusive, "{name} min_exclusive");
                assert_eq!(rust.max, param["max"].as_f64(), "{name} max");
                assert_eq!(Some(rust.default), param["default"].as_f64(), "{name}");
            }
            "int" | "int|nil" => {
                let rust = INTS
                    .iter()
                    .find(|p| p.name == name)
                    .unwrap_or_else(|| panic!("{name}: no IntParam"));
                assert_eq!(Some(rust.min), param["min"].as_i64(), "{name} min");
                assert_eq!(rust.max, param["max"].as_i64(), "{name} max");
            }
            "list[[int,float]]" => {
                assert_eq!(name, LOGIT_BIAS.name);
                assert_eq!(Some(LOGIT_BIAS.min), param["bias_min"].as_f64());
                assert_eq!(LOGIT_BIAS.max, param["bias_max"].as_f64());
                let entries = param["max_entries"].as_u64().expect("max_entries");
                assert_eq!(entries, MAX_LOGIT_BIAS_ENTRIES as u64);
                continue;
            }
            _ => continue,
        }
        bounded.insert(name);
    }
    let rust: BTreeSet<&str> = FLOATS
        .iter()
        .map(|p| p.name)
        .chain(INTS.iter().map(|p| p.name))
        .collect();
    assert_eq!(bounded, rust, "bounded params in the file and in Rust");
    let by_name = |wanted: &str| {
        params(&contract)
            .iter()
            .find(|p| name(p) == wanted)
            .cloned()
            .expect("listed")
    };
    assert_eq!(by_name("logprobs")["max"].as_i64(), Some(MAX_TOP_LOGPROBS));
    assert_eq!(by_name("seed")["max"].as_i64(), Some(MAX_SEED));
}

#[test]
fn unset_params_take_the_contracts_defaults() {
    let contract = contract();
    let request = build_request(SamplingSpec::default(), vec![1], &limits()).expect("defaults");
    let frame = serde_json::to_value(&request.params).expect("params encode");
    for param in params(&contract) {
        if let Some(default) = param.get("default") {
            assert_eq!(&frame[name(param)], default, "{}", name(param));
        }
    }
}

#[test]
fn every_case_is_accepted_or_refused_as_the_contract_says() {
    let contract = contract();
    let base = contract["base"].as_object().expect("base");
    let cases = contract["cases"].as_array().expect("cases");
    assert!(cases.len() > 10, "the contract lost its cases");
    for case in cases {
        let mut wire = base.clone();
        wire.extend(case["set"].as_object().expect("set").clone());
        let result = build_request(spec(&wire), vec![1], &limits());
        if case["valid"].as_bool().expect("valid") {
            let request = result.unwrap_or_else(|err| panic!("{case}: refused: {err}"));
            let frame = serde_json::to_value(&request.params).expect("params encode");
            assert_eq!(frame, Value::Object(wire), "{case}: sent as given");
        } else {
            let field = case["field"].as_str().expect("field");
            match result {
                Err(ApiError::Validation(message)) => {
                    assert!(message.contains(field), "{case}: {message}")
                }
                other => panic!("{case}: expected a validation error, got {other:?}"),
            }
        }
    }
}
