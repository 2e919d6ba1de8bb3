//! proptest strategies for every message type.
#![allow(dead_code)]

use proptest::collection::vec;
use proptest::prelude::*;
use tandem_protocol::*;

pub fn limits() -> Limits {
    Limits::default()
}

pub fn arb_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

pub fn arb_model_id() -> impl Strategy<Value = String> {
    "[!-~]{1,64}"
}

pub fn arb_limits() -> impl Strategy<Value = Limits> {
    (
        4096u32..=(256 << 20),
        1u32..,
        1u32..,
        1u32..,
        1u32..,
        1u16..,
        1u16..,
        1u32..,
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| Limits {
            max_frame_len: a,
            max_key_len: b,
            max_ciphertext_len: c,
            max_ciphertexts: d,
            max_elements: e,
            max_batch: f,
            max_in_flight: g,
            idle_timeout_ms: h,
        })
}

fn pos_f64() -> impl Strategy<Value = f64> {
    (1e-300f64..1e300).prop_filter("positive", |v| *v > 0.0)
}

pub fn arb_dp() -> impl Strategy<Value = DpMetadata> {
    let scale = prop_oneof![
        (1u64.., 1u64..).prop_map(|(num, den)| Scale::Rational { num, den }),
        pos_f64().prop_map(Scale::Float),
    ];
    let charge = prop_oneof![
        (0f64..1e6).prop_map(BudgetCharge::Rho),
        (0f64..1e6).prop_map(BudgetCharge::Epsilon),
    ];
    let mech = prop_oneof![
        Just(Mechanism::DiscreteGaussian),
        Just(Mechanism::DiscreteLaplace)
    ];
    (mech, scale, charge, pos_f64(), pos_f64()).prop_map(|(mechanism, scale, charge, c, q)| {
        DpMetadata {
            mechanism,
            scale,
            charge,
            clip_bound: c,
            quant_scale: q,
        }
    })
}

pub fn arb_mode() -> impl Strategy<Value = OutputMode> {
    prop_oneof![Just(OutputMode::NoKey), Just(OutputMode::Packed)]
}

pub fn arb_enc() -> impl Strategy<Value = EncryptedBlock> {
    (
        any::<u16>(),
        any::<[u8; 32]>(),
        arb_mode(),
        vec(vec(any::<u8>(), 1..40), 1..5),
    )
        .prop_map(
            |(param_set, key_id, output_mode, ciphertexts)| EncryptedBlock {
                param_set,
                key_id,
                output_mode,
                ciphertexts,
            },
        )
}

pub fn arb_client_hello() -> impl Strategy<Value = Message> {
    (
        vec(any::<u16>(), 1..=16),
        vec(any::<u16>(), 1..=16),
        arb_model_id(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        arb_limits(),
    )
        .prop_map(
            |(versions, param_sets, model_id, model_digest, channel_binding, limits)| {
                Message::ClientHello(ClientHello {
                    versions,
                    param_sets,
                    model_id,
                    model_digest,
                    channel_binding,
                    limits,
                })
            },
        )
}

pub fn arb_server_hello() -> impl Strategy<Value = Message> {
    (
        any::<u16>(),
        any::<u16>(),
        arb_model_id(),
        any::<[u8; 32]>(),
        arb_limits(),
    )
        .prop_map(|(version, param_set, model_id, model_digest, limits)| {
            Message::ServerHello(ServerHello {
                version,
                param_set,
                model_id,
                model_digest,
                limits,
            })
        })
}

pub fn arb_key_register() -> impl Strategy<Value = Message> {
    (
        any::<[u8; 32]>(),
        any::<u16>(),
        any::<[u8; 32]>(),
        vec(any::<u8>(), 1..200),
        any::<bool>(),
    )
        .prop_map(|(key_id, param_set, channel_binding, blob, nokey_empty)| {
            let (output_mode, key_blob) = if nokey_empty {
                (OutputMode::NoKey, Vec::new())
            } else {
                (OutputMode::Packed, blob)
            };
            Message::KeyRegister(KeyRegister {
                key_id,
                param_set,
                output_mode,
                channel_binding,
                key_blob,
            })
        })
}

pub fn arb_key_ack() -> impl Strategy<Value = Message> {
    any::<[u8; 32]>().prop_map(|key_id| Message::KeyAck(KeyAck { key_id }))
}

pub fn arb_request() -> impl Strategy<Value = Message> {
    let payload = (1u16..=64).prop_flat_map(|batch| {
        prop_oneof![
            arb_enc().prop_map(RequestPayload::Encrypted),
            (arb_dp(), 1usize..8, vec(any::<i32>(), 64 * 8)).prop_map(move |(dp, w, vals)| {
                let n = usize::from(batch) * w;
                RequestPayload::Noised(NoisedBlock {
                    dp,
                    values: vals.into_iter().cycle().take(n).collect(),
                })
            }),
            (arb_dp(), arb_enc()).prop_map(|(dp, enc)| RequestPayload::NoisedEncrypted { dp, enc }),
        ]
        .prop_map(move |p| (batch, p))
    });
    (1u64.., any::<u32>(), payload).prop_map(|(request_id, layer_id, (batch, payload))| {
        Message::InferRequest(InferRequest {
            request_id,
            layer_id,
            batch,
            payload,
        })
    })
}

pub fn arb_response() -> impl Strategy<Value = Message> {
    let payload = prop_oneof![
        arb_enc().prop_map(ResponsePayload::Encrypted),
        vec(any::<i64>(), 1..50).prop_map(ResponsePayload::Plain),
    ];
    // TDM-VER-3: both layouts (None = version 1, Some = version 2 with cloud_eval_us).
    (
        1u64..,
        any::<u32>(),
        proptest::option::of(any::<u32>()),
        payload,
    )
        .prop_map(|(request_id, layer_id, cloud_eval_us, payload)| {
            Message::InferResponse(InferResponse {
                request_id,
                layer_id,
                cloud_eval_us,
                payload,
            })
        })
}

pub fn arb_request_error() -> impl Strategy<Value = Message> {
    (
        1u64..,
        arb_code().prop_filter("not NoError", |c| *c != ErrorCode::NoError),
    )
        .prop_map(|(request_id, code)| Message::RequestError(RequestError { request_id, code }))
}

pub fn arb_close() -> impl Strategy<Value = Message> {
    arb_code().prop_map(|code| Message::Close(Close { code }))
}

pub fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_client_hello(),
        arb_server_hello(),
        arb_key_register(),
        arb_key_ack(),
        arb_request(),
        arb_response(),
        arb_request_error(),
        arb_close(),
    ]
}
