//! Every frame of docs/protocol_golden.json decodes and re-encodes byte for byte.

use super::*;

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn goldens() -> Vec<serde_json::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol_golden.json");
    let text = std::fs::read_to_string(path).expect("docs/protocol_golden.json");
    serde_json::from_str(&text).expect("golden JSON")
}

/// Decodes the body as whichever side's message it is, re-encodes it, and gives its JSON form.
fn roundtrip(body: &[u8]) -> (Vec<u8>, serde_json::Value) {
    if let Ok(msg) = decode_body::<WorkerMessage>(body) {
        return (
            encode(&msg).expect("encode"),
            serde_json::to_value(&msg).expect("json"),
        );
    }
    let msg: GatewayMessage = decode_body(body).expect("a worker or a gateway message");
    (
        encode(&msg).expect("encode"),
        serde_json::to_value(&msg).expect("json"),
    )
}

#[test]
fn golden_frames_roundtrip_byte_for_byte() {
    let goldens = goldens();
    let mut seen = std::collections::BTreeSet::new();
    for golden in &goldens {
        let name = golden["name"].as_str().expect("name");
        let frame = from_hex(golden["hex"].as_str().expect("hex"));
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - 4, "{name}: length prefix");
        let (encoded, json) = roundtrip(&frame[4..]);
        assert_eq!(encoded, frame, "{name}: re-encoded bytes differ");
        assert_eq!(json, golden["message"], "{name}: decoded message differs");
        seen.insert(golden["message"]["t"].as_str().expect("t").to_string());
    }
    let all = [
        "hello",
        "phase",
        "ready",
        "outputs",
        "error",
        "prompt_logprobs",
        "stats",
        "fatal",
        "welcome",
        "reject",
        "submit",
        "cancel",
        "shutdown",
    ];
    for t in all {
        assert!(seen.contains(t), "no golden frame for {t}");
    }
}

#[test]
fn unknown_type_and_non_map_are_errors() {
    let unknown = rmp_serde::to_vec_named(&serde_json::json!({"t": "bogus", "id": 1})).unwrap();
    assert!(decode_body::<WorkerMessage>(&unknown).is_err());
    let not_a_map = rmp_serde::to_vec(&[1, 2, 3]).unwrap();
    assert!(decode_body::<WorkerMessage>(&not_a_map).is_err());
    assert!(decode_body::<WorkerMessage>(&[0xc1]).is_err());
}

#[test]
fn unknown_keys_are_ignored_and_integer_floats_accepted() {
    let body = rmp_serde::to_vec_named(&serde_json::json!(
        {"t": "phase", "name": "kv_allocated", "ms": 12, "extra": [1, 2]}
    ))
    .unwrap();
    let msg: WorkerMessage = decode_body(&body).expect("decodes");
    assert_eq!(
        msg,
        WorkerMessage::Phase {
            name: "kv_allocated".into(),
            ms: 12.0
        }
    );
}

#[tokio::test]
async fn frames_stream_over_a_pipe() {
    let (mut a, mut b) = tokio::io::duplex(1024);
    write_message(&mut a, &GatewayMessage::Cancel { id: 9 })
        .await
        .expect("write");
    drop(a);
    let body = read_body(&mut b).await.expect("read").expect("one frame");
    assert_eq!(
        decode_body::<GatewayMessage>(&body).unwrap(),
        GatewayMessage::Cancel { id: 9 }
    );
    assert!(read_body(&mut b).await.expect("clean end").is_none());
}

#[tokio::test]
async fn oversized_length_is_refused() {
    let (mut a, mut b) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut a, &u32::MAX.to_be_bytes())
        .await
        .unwrap();
    assert!(matches!(
        read_body(&mut b).await,
        Err(FrameError::TooLarge(_))
    ));
}
