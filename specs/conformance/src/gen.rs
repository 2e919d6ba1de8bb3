//! Vector generator (`tandem-conformance gen-vectors DIR`). Deterministic:
//! a fixed-seed SplitMix64 picks truncation points, so re-running produces
//! identical files and checksums.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tandem_protocol::*;

use crate::{hexutil, json as mj, transcript};

/// Fixed generator seed.
pub const SEED: u64 = 0x7A4D_E301_2026_0001;

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }
}

/// Limits every message vector is decoded under.
pub fn limits_json(l: &Limits) -> Value {
    json!({
        "max_frame_len": l.max_frame_len, "max_key_len": l.max_key_len,
        "max_ciphertext_len": l.max_ciphertext_len, "max_ciphertexts": l.max_ciphertexts,
        "max_elements": l.max_elements, "max_batch": l.max_batch,
        "max_in_flight": l.max_in_flight, "idle_timeout_ms": l.idle_timeout_ms,
    })
}

fn enc(m: &Message) -> Result<Vec<u8>, String> {
    m.encode().map_err(|e| e.to_string())
}

fn sample(name: &str) -> Result<Message, String> {
    samples::messages()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, m)| m)
        .ok_or_else(|| format!("no sample {name}"))
}

fn invalid(id: String, bytes: &[u8], code: ErrorCode, note: &str) -> Value {
    invalid_v(id, bytes, code, note, PROTOCOL_VERSION)
}

/// An invalid vector decoded under the body layout of protocol `version` (TDM-VER-3).
fn invalid_v(id: String, bytes: &[u8], code: ErrorCode, note: &str, version: u16) -> Value {
    json!({"id": id, "version": version, "hex": hexutil::encode(bytes),
        "expect_error": format!("{code:?}"), "note": note})
}

fn request_with(id: u64, name: &str) -> Result<Vec<u8>, String> {
    match sample(name)? {
        Message::InferRequest(mut r) => {
            r.request_id = id;
            enc(&Message::InferRequest(r))
        }
        _ => Err("not a request".into()),
    }
}

fn valid_vectors() -> Result<Vec<Value>, String> {
    samples::messages()
        .into_iter()
        .map(|(name, m)| {
            Ok(
                json!({"id": format!("msg/{name}"), "version": m.wire_version(),
                "hex": hexutil::encode(&enc(&m)?), "decoded": mj::message(&m)}),
            )
        })
        .collect()
}

fn invalid_vectors() -> Result<Vec<Value>, String> {
    let mut rng = SplitMix(SEED);
    let mut out = Vec::new();
    let mal = ErrorCode::MalformedMessage;
    let lim = ErrorCode::LimitExceeded;
    for (name, m) in samples::messages() {
        let b = enc(&m)?;
        // TDM-FRAME-7: truncations (last byte, inside header, random point).
        let mut cuts = vec![
            b.len() - 1,
            3,
            FRAME_HEADER_LEN + rng.below(b.len() - FRAME_HEADER_LEN),
        ];
        // One vector per distinct cut (ids are unique).
        cuts.sort_unstable();
        cuts.dedup();
        let v = m.wire_version();
        for cut in cuts {
            out.push(invalid_v(
                format!("truncated/{name}/{cut}"),
                &b[..cut],
                mal,
                "TDM-FRAME-7",
                v,
            ));
        }
        // TDM-FRAME-7: a truncated field inside a complete frame — the body is cut (last
        // byte, and a random point) and the length field rewritten to match, so the frame is
        // whole but its last field is short.
        let body_len = b.len() - FRAME_HEADER_LEN;
        let mut body_cuts = vec![body_len - 1, rng.below(body_len)];
        body_cuts.sort_unstable();
        body_cuts.dedup();
        for keep in body_cuts {
            out.push(invalid_v(
                format!("truncated_field/{name}/{keep}"),
                &reframe(&b[..FRAME_HEADER_LEN + keep])?,
                mal,
                "TDM-FRAME-7 complete frame, short field",
                v,
            ));
        }
        // TDM-FRAME-6: one trailing byte inside the frame.
        let mut t = b.clone();
        t.push(0);
        let len = u32::try_from(t.len() - FRAME_HEADER_LEN).map_err(|e| e.to_string())?;
        t[2..6].copy_from_slice(&len.to_be_bytes());
        out.push(invalid_v(
            format!("trailing/{name}"),
            &t,
            mal,
            "TDM-FRAME-6",
            v,
        ));
    }
    let close = enc(&sample("close_no_error")?)?;
    for v in [0u8, 2, 0xff] {
        let mut b = close.clone();
        b[0] = v;
        out.push(invalid(
            format!("frame/version_{v}"),
            &b,
            mal,
            "TDM-FRAME-2",
        ));
    }
    for t in [0u8, 9, 0x80, 0xff] {
        let mut b = close.clone();
        b[1] = t;
        out.push(invalid(
            format!("frame/type_{t:02x}"),
            &b,
            mal,
            "TDM-FRAME-5",
        ));
    }
    for len in [samples::limits().max_frame_len + 1, u32::MAX] {
        let mut b = vec![1u8, 5];
        b.extend_from_slice(&len.to_be_bytes());
        out.push(invalid(
            format!("frame/length_{len}"),
            &b,
            lim,
            "TDM-FRAME-3 header only",
        ));
    }
    order_vectors(&mut out)?;
    // Field domains.
    let mut push = |id: &str, m: Message, code: ErrorCode, note: &str| -> Result<(), String> {
        out.push(invalid(format!("field/{id}"), &enc(&m)?, code, note));
        Ok(())
    };
    let mut h = samples::client_hello();
    h.model_id = "bad id".into();
    push("model_id_space", Message::ClientHello(h), mal, "TDM-MSG-3")?;
    let mut h = samples::client_hello();
    h.versions.clear();
    push("versions_empty", Message::ClientHello(h), mal, "TDM-MSG-3")?;
    let mut h = samples::client_hello();
    h.param_sets = vec![1; 17];
    push("param_sets_17", Message::ClientHello(h), lim, "TDM-MSG-3")?;
    let mut h = samples::server_hello();
    h.limits.max_in_flight = 0;
    push(
        "limits_zero_in_flight",
        Message::ServerHello(h),
        mal,
        "TDM-LIM-2",
    )?;
    let mut h = samples::server_hello();
    h.limits.max_frame_len = 4095;
    push(
        "limits_frame_4095",
        Message::ServerHello(h),
        mal,
        "TDM-LIM-2",
    )?;
    let noised = |dp: DpMetadata, batch: u16, values: Vec<i32>| {
        Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch,
            payload: RequestPayload::Noised(NoisedBlock { dp, values }),
        })
    };
    let g = samples::dp_gaussian();
    push(
        "dp_clip_nan",
        noised(
            DpMetadata {
                clip_bound: f64::NAN,
                ..g
            },
            1,
            vec![1],
        ),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "dp_quant_zero",
        noised(
            DpMetadata {
                quant_scale: 0.0,
                ..g
            },
            1,
            vec![1],
        ),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "dp_scale_den_zero",
        noised(
            DpMetadata {
                scale: Scale::Rational { num: 1, den: 0 },
                ..g
            },
            1,
            vec![1],
        ),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "dp_scale_inf",
        noised(
            DpMetadata {
                scale: Scale::Float(f64::INFINITY),
                ..g
            },
            1,
            vec![1],
        ),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "dp_rho_negative",
        noised(
            DpMetadata {
                charge: BudgetCharge::Rho(-0.5),
                ..g
            },
            1,
            vec![1],
        ),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "values_not_multiple_of_batch",
        noised(g, 2, vec![1, 2, 3]),
        mal,
        "TDM-MSG-10",
    )?;
    push(
        "batch_over_limit",
        noised(g, 9, vec![1; 9]),
        lim,
        "TDM-MSG-7",
    )?;
    push(
        "values_over_limit",
        noised(g, 1, vec![0; 4097]),
        lim,
        "TDM-MSG-10",
    )?;
    let mut r = noised(g, 1, vec![1]);
    if let Message::InferRequest(x) = &mut r {
        x.request_id = 0;
    }
    push("request_id_zero", r, mal, "TDM-MSG-7")?;
    push("batch_zero", noised(g, 0, vec![1]), mal, "TDM-MSG-7")?;
    let e1 = samples::encrypted(1, OutputMode::NoKey);
    let resp = |e: EncryptedBlock| {
        Message::InferResponse(InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(0),
            payload: ResponsePayload::Encrypted(e),
        })
    };
    push(
        "ciphertexts_empty",
        resp(EncryptedBlock {
            ciphertexts: vec![],
            ..e1.clone()
        }),
        mal,
        "TDM-MSG-9",
    )?;
    push(
        "ciphertext_empty",
        resp(EncryptedBlock {
            ciphertexts: vec![vec![]],
            ..e1.clone()
        }),
        mal,
        "TDM-MSG-9",
    )?;
    push(
        "ciphertext_over_limit",
        resp(EncryptedBlock {
            ciphertexts: vec![vec![7; 4097]],
            ..e1.clone()
        }),
        lim,
        "TDM-MSG-9",
    )?;
    push(
        "plain_empty",
        Message::InferResponse(InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(0),
            payload: ResponsePayload::Plain(vec![]),
        }),
        mal,
        "TDM-MSG-11",
    )?;
    push(
        "packed_key_empty",
        Message::KeyRegister(KeyRegister {
            key_id: [0; 32],
            param_set: 1,
            output_mode: OutputMode::Packed,
            channel_binding: [0; 32],
            key_blob: vec![],
        }),
        mal,
        "TDM-MSG-5",
    )?;
    push(
        "key_blob_over_limit",
        Message::KeyRegister(KeyRegister {
            key_id: [0; 32],
            param_set: 1,
            output_mode: OutputMode::Packed,
            channel_binding: [0; 32],
            key_blob: vec![1; 16385],
        }),
        lim,
        "TDM-KEY-1",
    )?;
    push(
        "request_error_no_error",
        Message::RequestError(RequestError {
            request_id: 1,
            code: ErrorCode::NoError,
        }),
        mal,
        "TDM-MSG-12",
    )?;
    // Raw byte patches for enum values the encoder cannot produce.
    let patch = |name: &str, off: usize, v: u8| -> Result<Vec<u8>, String> {
        let mut b = enc(&sample(name)?)?;
        *b.get_mut(off).ok_or("offset")? = v;
        Ok(b)
    };
    out.push(invalid(
        "field/protection_3".into(),
        &patch("request_noised_laplace", 6 + 14, 3)?,
        mal,
        "TDM-MSG-8",
    ));
    out.push(invalid(
        "field/mechanism_2".into(),
        &patch("request_noised_laplace", 6 + 15, 2)?,
        mal,
        "TDM-MSG-10",
    ));
    out.push(invalid(
        "field/output_mode_2".into(),
        &patch("request_encrypted_nokey", 6 + 15 + 2 + 32, 2)?,
        mal,
        "TDM-MSG-9",
    ));
    out.push(invalid(
        "field/response_kind_2".into(),
        &patch("response_plain", 6 + 16, 2)?,
        mal,
        "TDM-MSG-11",
    ));
    out.push(invalid_v(
        "field/response_kind_2_v1".into(),
        &patch("response_plain_v1", 6 + 12, 2)?,
        mal,
        "TDM-MSG-11, TDM-VER-3 (version-1 layout)",
        1,
    ));
    // TDM-VER-3: a body in the other version's layout. A version-1 response read as version 2
    // loses 4 bytes to cloud_eval_us; a version-2 response read as version 1 has them left over.
    out.push(invalid_v(
        "version/v1_response_under_v2".into(),
        &enc(&sample("response_encrypted_v1")?)?,
        mal,
        "TDM-VER-3, TDM-MSG-14",
        2,
    ));
    out.push(invalid_v(
        "version/v2_response_under_v1".into(),
        &enc(&sample("response_plain")?)?,
        mal,
        "TDM-VER-3, TDM-FRAME-6",
        1,
    ));
    out.push(invalid(
        "field/error_code_13".into(),
        &[1, 8, 0, 0, 0, 2, 0, 13],
        mal,
        "TDM-ERR-2",
    ));
    out.push(invalid(
        "field/error_code_ffff".into(),
        &[1, 8, 0, 0, 0, 2, 0xff, 0xff],
        mal,
        "TDM-ERR-2",
    ));
    Ok(out)
}

/// Rewrites the frame length field to the number of body bytes present.
fn reframe(frame: &[u8]) -> Result<Vec<u8>, String> {
    let mut b = frame.to_vec();
    let len = u32::try_from(b.len().saturating_sub(FRAME_HEADER_LEN)).map_err(|e| e.to_string())?;
    b.get_mut(2..6)
        .ok_or("frame shorter than a header")?
        .copy_from_slice(&len.to_be_bytes());
    Ok(b)
}

/// Vectors that pin the order of checks (TDM-MSG-2, protocol.md §2.1): which code wins when
/// a frame breaks two rules, and limit-before-remaining for counts.
fn order_vectors(out: &mut Vec<Value>) -> Result<(), String> {
    let mal = ErrorCode::MalformedMessage;
    let lim = ErrorCode::LimitExceeded;
    let mut add = |id: &str, b: &[u8], code: ErrorCode, note: &str| {
        out.push(invalid(format!("order/{id}"), b, code, note));
    };
    // Header: version, then type, then length; fewer than 6 bytes is truncation.
    add(
        "version_before_length",
        &[2, 5, 0xff, 0xff, 0xff, 0xff],
        mal,
        "TDM-FRAME-2 before TDM-FRAME-3",
    );
    add(
        "type_before_length",
        &[1, 0x42, 0xff, 0xff, 0xff, 0xff],
        mal,
        "TDM-FRAME-5 before TDM-FRAME-3",
    );
    add(
        "short_header_big_length",
        &[1, 5, 0xff, 0xff, 0xff],
        mal,
        "TDM-FRAME-7 header incomplete: length not yet checked",
    );
    let g = samples::dp_gaussian();
    let noised = |batch: u16, values: Vec<i32>| {
        Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch,
            payload: RequestPayload::Noised(NoisedBlock { dp: g, values }),
        })
    };
    // A count above its limit is LimitExceeded even when the announced bytes are absent.
    let mut b = enc(&noised(1, vec![]))?;
    let n = b.len();
    b[n - 4..].copy_from_slice(&4097u32.to_be_bytes());
    add(
        "count_over_limit_without_bytes",
        &b,
        lim,
        "TDM-MSG-2 bound before bytes remaining",
    );
    // Within the limit but more than the bytes left: MalformedMessage.
    let mut b = enc(&noised(1, vec![]))?;
    b[n - 4..].copy_from_slice(&4096u32.to_be_bytes());
    add(
        "count_within_limit_short",
        &b,
        mal,
        "TDM-MSG-2 bytes remaining",
    );
    // Ciphertext list: count 2 needs at least 2 x 5 bytes; 9 remain, so MalformedMessage
    // before the first ciphertext's (oversized) length is read.
    let resp = Message::InferResponse(InferResponse {
        request_id: 1,
        layer_id: 0,
        cloud_eval_us: Some(0),
        payload: ResponsePayload::Encrypted(EncryptedBlock {
            ciphertexts: vec![vec![]],
            ..samples::encrypted(1, OutputMode::NoKey)
        }),
    });
    let mut b = enc(&resp)?;
    let n = b.len();
    b[n - 8..n - 4].copy_from_slice(&2u32.to_be_bytes());
    b[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    b.extend_from_slice(&[0; 5]);
    add(
        "ciphertext_count_min_size",
        &reframe(&b)?,
        mal,
        "TDM-MSG-2 minimum element size 5 checked before the first element",
    );
    // Key blob length above max_key_len with no blob bytes: LimitExceeded.
    let kr = Message::KeyRegister(KeyRegister {
        key_id: [0; 32],
        param_set: 1,
        output_mode: OutputMode::NoKey,
        channel_binding: [0; 32],
        key_blob: vec![],
    });
    let mut b = enc(&kr)?;
    let n = b.len();
    b[n - 4..].copy_from_slice(&(samples::limits().max_key_len + 1).to_be_bytes());
    add(
        "key_blob_over_limit_without_bytes",
        &b,
        lim,
        "TDM-KEY-1, TDM-MSG-2",
    );
    // First bad field wins.
    let mut b = enc(&noised(9, vec![1; 9]))?;
    b[FRAME_HEADER_LEN + 14] = 3;
    add(
        "batch_over_limit_then_bad_protection",
        &b,
        lim,
        "TDM-MSG-2 batch (LimitExceeded) before protection (Malformed)",
    );
    add(
        "batch_zero_then_values_over_limit",
        &enc(&noised(0, vec![0; 4097]))?,
        mal,
        "TDM-MSG-2 batch 0 (Malformed) before the value count (LimitExceeded)",
    );
    let mut h = samples::client_hello();
    h.versions = vec![1; 17];
    h.model_id = "bad id".into();
    add(
        "versions_17_then_bad_model_id",
        &enc(&Message::ClientHello(h))?,
        lim,
        "TDM-MSG-2 list bound before model id",
    );
    let mut h = samples::client_hello();
    h.versions.clear();
    h.param_sets = vec![1; 17];
    add(
        "versions_empty_then_param_sets_17",
        &enc(&Message::ClientHello(h))?,
        mal,
        "TDM-MSG-2 empty list before the next list's bound",
    );
    let mut h = samples::client_hello();
    h.model_id = "m".repeat(65);
    add(
        "model_id_65",
        &enc(&Message::ClientHello(h))?,
        lim,
        "TDM-MSG-2 fixed bound 64",
    );
    // A limits block value is a setting, not a length in this frame: MalformedMessage.
    let mut h = samples::server_hello();
    h.limits.max_frame_len = limits::HARD_MAX_FRAME_LEN + 1;
    add(
        "limits_frame_len_above_hard_max",
        &enc(&Message::ServerHello(h))?,
        mal,
        "TDM-LIM-2, TDM-MSG-2",
    );
    let mut h = samples::server_hello();
    h.limits.max_in_flight = 0;
    h.limits.max_frame_len = u32::MAX;
    add(
        "limits_first_bad_value",
        &enc(&Message::ServerHello(h))?,
        mal,
        "TDM-LIM-2 checked in wire order",
    );
    Ok(())
}

/// The `settings` object of `transcripts.json`: everything a runner needs besides the steps.
pub fn settings_json() -> Result<Value, String> {
    let d = samples::device_config();
    let c = samples::cloud_config();
    let mut requests = serde_json::Map::new();
    for name in [
        "request_noised_gaussian",
        "request_noised_laplace",
        "request_encrypted_packed",
        "request_encrypted_nokey",
        "request_noised_encrypted",
        "request_noised_layer5_batch4",
    ] {
        requests.insert(name.into(), json!(hexutil::encode(&enc(&sample(name)?)?)));
    }
    Ok(json!({
        "device": {
            "versions": d.versions, "param_sets": d.param_sets, "model_id": d.model_id,
            "model_digest": hexutil::encode(&d.model_digest), "limits": limits_json(&d.limits),
            "request_timeout_ms": d.request_timeout_ms,
        },
        "cloud": {
            "versions": c.versions, "param_sets": c.param_sets,
            "models": c.models.iter().map(|m| json!({"model_id": m.model_id,
                "model_digest": hexutil::encode(&m.model_digest)})).collect::<Vec<_>>(),
            "limits": limits_json(&c.limits),
        },
        "channel_binding": hexutil::encode(&samples::CHANNEL_BINDING),
        "peer_identity": hexutil::encode(&samples::PEER_IDENTITY),
        "register_key": {"key_blob": hexutil::encode(&samples::key_blob()), "output_mode": "packed"},
        "requests": requests,
    }))
}

fn step_input(bytes: &[u8], now: u64) -> Value {
    json!({"op": "input", "hex": hexutil::encode(bytes), "now": now})
}

/// The encoded `InferResponse` to request `request_id` on layer 1 with plain `values`
/// (`cloud_eval_us`: `None` for the version-1 layout, TDM-MSG-14).
fn plain_response(
    request_id: u64,
    cloud_eval_us: Option<u32>,
    values: Vec<i64>,
) -> Result<Vec<u8>, String> {
    enc(&Message::InferResponse(InferResponse {
        request_id,
        layer_id: 1,
        cloud_eval_us,
        payload: ResponsePayload::Plain(values),
    }))
}

/// The encoded `RequestError` refusing request `request_id` with `code`.
fn request_error(request_id: u64, code: ErrorCode) -> Result<Vec<u8>, String> {
    enc(&Message::RequestError(RequestError { request_id, code }))
}

fn transcripts() -> Result<Vec<Value>, String> {
    let hello = enc(&Message::ClientHello(samples::client_hello()))?;
    let shello = enc(&Message::ServerHello(samples::server_hello()))?;
    let key = enc(&sample("key_register_packed")?)?;
    let close = enc(&sample("close_no_error")?)?;
    let kid = hexutil::encode(&samples::key_id());
    let mut cloud: Vec<(&str, Vec<Value>)> = vec![
        ("handshake", vec![step_input(&hello, 1)]),
        (
            "handshake_byte_by_byte",
            hello
                .iter()
                .enumerate()
                .map(|(i, b)| step_input(&[*b], i as u64))
                .collect(),
        ),
        (
            "key_then_encrypted_request",
            vec![
                step_input(&hello, 1),
                step_input(&key, 2),
                step_input(&request_with(1, "request_encrypted_packed")?, 3),
                json!({"op": "respond_echo", "request_id": 1, "now": 4}),
                step_input(&close, 5),
            ],
        ),
        (
            "noised_request",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_noised_gaussian")?, 2),
                json!({"op": "respond_echo", "request_id": 1, "now": 3}),
            ],
        ),
        (
            "noised_encrypted_preloaded_key",
            vec![
                json!({"op": "allow_key", "key_id": kid}),
                step_input(&hello, 1),
                step_input(&request_with(5, "request_noised_encrypted")?, 2),
                json!({"op": "respond_echo", "request_id": 5, "now": 3}),
            ],
        ),
        (
            "all_frames_in_one_write",
            vec![step_input(
                &[
                    hello.clone(),
                    key.clone(),
                    request_with(1, "request_encrypted_nokey")?,
                ]
                .concat(),
                1,
            )],
        ),
        (
            "unknown_key_request_error",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_encrypted_packed")?, 2),
            ],
        ),
        (
            "replayed_request_id",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(3, "request_noised_laplace")?, 2),
                step_input(&request_with(3, "request_noised_laplace")?, 3),
            ],
        ),
        (
            "decreasing_request_id",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(3, "request_noised_laplace")?, 2),
                step_input(&request_with(2, "request_noised_laplace")?, 3),
            ],
        ),
        ("in_flight_overflow", {
            let mut v = vec![step_input(&hello, 1)];
            for i in 1..=5 {
                v.push(step_input(
                    &request_with(i, "request_noised_laplace")?,
                    1 + i,
                ));
            }
            v
        }),
        (
            "idle_timeout",
            vec![
                step_input(&hello, 1),
                json!({"op": "timeout", "now": 30_000}),
                json!({"op": "timeout", "now": 30_001}),
            ],
        ),
        (
            "hello_timeout",
            vec![json!({"op": "timeout", "now": 30_000})],
        ),
        (
            // TDM-TIME-2, TDM-FRAME-7: half a frame is traffic and is waited for; the
            // deadline (2 + 30 000) fires at its instant.
            "partial_frame_then_idle_timeout",
            vec![
                step_input(&hello, 1),
                step_input(
                    request_with(1, "request_noised_laplace")?
                        .get(..10)
                        .ok_or("short")?,
                    2,
                ),
                json!({"op": "timeout", "now": 30_001}),
                json!({"op": "timeout", "now": 30_002}),
            ],
        ),
        (
            // TDM-TIME-2: no deadline while a response is owed; it restarts at the answer.
            "idle_suspended_while_owing",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_noised_gaussian")?, 2),
                json!({"op": "timeout", "now": 100_000}),
                json!({"op": "respond_echo", "request_id": 1, "now": 100_001}),
                json!({"op": "timeout", "now": 130_000}),
                json!({"op": "timeout", "now": 130_001}),
            ],
        ),
        (
            // TDM-LIM-3: a body of exactly 1024 bytes passes the header check (then fails as
            // a malformed ClientHello); 1025 is refused from the header (next transcript).
            "handshake_frame_at_limit",
            vec![step_input(
                &[&[1u8, 1, 0, 0, 4, 0][..], &[0u8; 1024][..]].concat(),
                1,
            )],
        ),
        (
            "oversized_handshake_frame",
            vec![step_input(&[1, 1, 0, 0, 4, 1], 1)],
        ),
        (
            "oversized_frame_after_handshake",
            vec![step_input(&hello, 1), step_input(&[1, 5, 0, 1, 0, 1], 2)],
        ),
        (
            "unknown_type_mid_session",
            vec![step_input(&hello, 1), step_input(&[1, 0x42, 0, 0, 0, 0], 2)],
        ),
        (
            "server_hello_to_cloud",
            vec![step_input(&hello, 1), step_input(&shello, 2)],
        ),
        (
            "request_before_hello",
            vec![step_input(&request_with(1, "request_noised_laplace")?, 1)],
        ),
        ("channel_binding_mismatch", {
            let mut h = samples::client_hello();
            h.channel_binding = [0; 32];
            vec![step_input(&enc(&Message::ClientHello(h))?, 1)]
        }),
        ("no_common_version", {
            let mut h = samples::client_hello();
            h.versions = vec![3, 4];
            vec![step_input(&enc(&Message::ClientHello(h))?, 1)]
        }),
        ("unknown_model", {
            let mut h = samples::client_hello();
            h.model_digest = [0; 32];
            vec![step_input(&enc(&Message::ClientHello(h))?, 1)]
        }),
        ("key_id_mismatch", {
            let Message::KeyRegister(mut k) = sample("key_register_packed")? else {
                return Err("k".into());
            };
            k.key_id = [0; 32];
            vec![
                step_input(&hello, 1),
                step_input(&enc(&Message::KeyRegister(k))?, 2),
            ]
        }),
        (
            // TDM-MSG-14, TDM-EVAL-1: a version-2 session reports the evaluation time.
            "response_with_eval_time",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_noised_gaussian")?, 2),
                json!({"op": "respond_echo", "request_id": 1, "cloud_eval_us": 4321, "now": 3}),
            ],
        ),
        ("v1_device_gets_v1_response", {
            // TDM-VER-1, TDM-VER-3: a device offering only version 1 is answered in the
            // version-1 layout, without cloud_eval_us, whatever the application measured.
            let mut h = samples::client_hello();
            h.versions = vec![1];
            vec![
                step_input(&enc(&Message::ClientHello(h))?, 1),
                step_input(&request_with(1, "request_noised_gaussian")?, 2),
                json!({"op": "respond_echo", "request_id": 1, "cloud_eval_us": 777, "now": 3}),
            ]
        }),
        (
            // TDM-REQ-8, TDM-REQ-9: layer k > 0 with batch 4 and layer 1 in flight together;
            // answered in the other order (responses are matched by request id).
            "multi_layer_requests_answered_out_of_order",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_noised_layer5_batch4")?, 2),
                step_input(&request_with(2, "request_noised_laplace")?, 3),
                json!({"op": "respond_echo", "request_id": 2, "cloud_eval_us": 10, "now": 4}),
                json!({"op": "respond_echo", "request_id": 1, "cloud_eval_us": 20, "now": 5}),
            ],
        ),
        (
            // TDM-REQ-8, TDM-REQ-6: a layer id the model does not serve is refused with
            // RequestError InvalidRequest and the next request is served on the same session.
            "unserved_layer_refused_session_continues",
            vec![
                step_input(&hello, 1),
                step_input(&request_with(1, "request_noised_layer5_batch4")?, 2),
                json!({"op": "respond_error", "request_id": 1, "code": "InvalidRequest", "now": 3}),
                step_input(&request_with(2, "request_noised_laplace")?, 4),
                json!({"op": "respond_echo", "request_id": 2, "cloud_eval_us": 30, "now": 5}),
            ],
        ),
        ("truncated_request_closes", {
            // TDM-FRAME-7: a complete frame whose request body is cut inside the values is
            // MalformedMessage and closes the session.
            let r = request_with(1, "request_noised_layer5_batch4")?;
            let cut = reframe(r.get(..r.len() - 6).ok_or("short")?)?;
            vec![step_input(&hello, 1), step_input(&cut, 2)]
        }),
        (
            "input_after_close",
            vec![
                step_input(&hello, 1),
                step_input(&close, 2),
                step_input(&key, 3),
            ],
        ),
    ];
    let mut dev: Vec<(&str, Vec<Value>)> = vec![
        ("handshake", vec![step_input(&shello, 1)]),
        (
            "request_response",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_gaussian", "now": 2}),
                step_input(&plain_response(1, Some(2_500), vec![6, 7])?, 3),
            ],
        ),
        (
            "key_register_and_ack",
            vec![
                step_input(&shello, 1),
                json!({"op": "register_key", "now": 2}),
                step_input(&enc(&sample("key_ack")?)?, 3),
            ],
        ),
        (
            "request_error",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                step_input(&request_error(1, ErrorCode::Busy)?, 3),
            ],
        ),
        ("duplicate_response", {
            let r = plain_response(1, Some(2_500), vec![6])?;
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                step_input(&r, 3),
                step_input(&r, 4),
            ]
        }),
        ("in_flight_limit_local", {
            let mut v = vec![step_input(&shello, 1)];
            for i in 0..5 {
                v.push(json!({"op": "send", "sample": "request_noised_laplace", "now": 2 + i}));
            }
            v
        }),
        ("server_hello_wrong_model", {
            let mut h = samples::server_hello();
            h.model_digest = [1; 32];
            vec![step_input(&enc(&Message::ServerHello(h))?, 1)]
        }),
        ("server_hello_raised_limits", {
            let mut h = samples::server_hello();
            h.limits.max_in_flight = 9;
            vec![step_input(&enc(&Message::ServerHello(h))?, 1)]
        }),
        (
            "request_timeout",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                json!({"op": "timeout", "now": 60_001}),
                json!({"op": "timeout", "now": 60_002}),
            ],
        ),
        (
            // TDM-TIME-3: a response is traffic; with nothing in flight the negotiated idle
            // timeout (30 000) applies again from it.
            "idle_after_response",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                step_input(&plain_response(1, Some(2_500), vec![42])?, 10),
                json!({"op": "timeout", "now": 30_009}),
                json!({"op": "timeout", "now": 30_010}),
            ],
        ),
        ("server_hello_wrong_param_set", {
            // TDM-PAR-2: a parameter set the device did not offer.
            let mut h = samples::server_hello();
            h.param_set = 9;
            vec![step_input(&enc(&Message::ServerHello(h))?, 1)]
        }),
        (
            "peer_close_error",
            vec![
                step_input(&shello, 1),
                step_input(
                    &enc(&Message::Close(Close {
                        code: ErrorCode::Busy,
                    }))?,
                    2,
                ),
            ],
        ),
        ("v1_server_hello_then_v1_response", {
            // TDM-VER-2, TDM-VER-3: the cloud chose version 1 (offered by the device): its
            // responses have the version-1 layout and report no evaluation time.
            let mut h = samples::server_hello();
            h.version = 1;
            vec![
                step_input(&enc(&Message::ServerHello(h))?, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                step_input(&plain_response(1, None, vec![42])?, 3),
            ]
        }),
        (
            // TDM-VER-3: in a version-2 session a version-1-layout response is malformed.
            "v1_layout_response_in_v2_session",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 2}),
                step_input(&plain_response(1, None, vec![42])?, 3),
            ],
        ),
        (
            // TDM-REQ-8, TDM-REQ-6: the cloud refuses a layer it does not serve; the session
            // stays ready and the next request (layer 1) is answered.
            "unserved_layer_refused_then_next_request",
            vec![
                step_input(&shello, 1),
                json!({"op": "send", "sample": "request_noised_layer5_batch4", "now": 2}),
                step_input(&request_error(1, ErrorCode::InvalidRequest)?, 3),
                json!({"op": "send", "sample": "request_noised_laplace", "now": 4}),
                step_input(&plain_response(2, Some(900), vec![42])?, 5),
            ],
        ),
        (
            "local_close",
            vec![
                step_input(&shello, 1),
                json!({"op": "close", "code": "NoError"}),
            ],
        ),
    ];
    let settings = transcript::Settings::from_json(&settings_json()?)?;
    let mut out = Vec::new();
    for (role, list) in [("cloud", &mut cloud), ("device", &mut dev)] {
        for (name, steps) in list.drain(..) {
            let (records, fin) = transcript::execute(role, &steps, &settings)?;
            out.push(
                json!({"id": format!("transcript/{role}/{name}"), "role": role,
                "steps": records, "final": fin}),
            );
        }
    }
    Ok(out)
}

/// Writes `messages.json`, `invalid.json`, `transcripts.json` and
/// `SHA256SUMS` into `dir`. Returns the number of vectors written.
pub fn generate(dir: &std::path::Path) -> Result<usize, String> {
    let lim = limits_json(&samples::limits());
    let files = [
        (
            "messages.json",
            json!({"kind": "valid", "seed": SEED, "limits": lim, "vectors": valid_vectors()?}),
        ),
        (
            "invalid.json",
            json!({"kind": "invalid", "seed": SEED, "limits": lim, "vectors": invalid_vectors()?}),
        ),
        (
            "transcripts.json",
            json!({"kind": "transcript", "seed": SEED, "settings": settings_json()?,
                "vectors": transcripts()?}),
        ),
    ];
    let mut sums = String::new();
    let mut n = 0;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    for (name, v) in files {
        n += v["vectors"].as_array().map_or(0, Vec::len);
        let mut text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        text.push('\n');
        std::fs::write(dir.join(name), &text).map_err(|e| e.to_string())?;
        sums.push_str(&format!(
            "{}  {name}\n",
            hexutil::encode(&Sha256::digest(text.as_bytes()))
        ));
    }
    std::fs::write(dir.join("SHA256SUMS"), sums).map_err(|e| e.to_string())?;
    Ok(n)
}
