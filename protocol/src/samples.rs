//! Canonical example messages and configurations.
//!
//! Used by the crate's tests, by the conformance vector generator
//! (`tandem-conformance gen-vectors`) and as fuzz seeds. Every value is
//! fixed, so the encodings are stable across runs.

use crate::message::*;
use crate::session::{key_id_of, CloudConfig, DeviceConfig, ModelEntry};
use crate::{ErrorCode, Limits, PROTOCOL_VERSION, SUPPORTED_VERSIONS};

/// Model id used by the samples.
pub const MODEL_ID: &str = "digits-mlp-v1";
/// Model digest used by the samples.
pub const MODEL_DIGEST: [u8; 32] = [0x4d; 32];
/// Channel binding used by the samples.
pub const CHANNEL_BINDING: [u8; 32] = [0xcb; 32];
/// Peer identity used by the samples.
pub const PEER_IDENTITY: [u8; 32] = [0x1d; 32];
/// Parameter-set id used by the samples.
pub const PARAM_SET: u16 = 1;

/// A small key blob for the samples.
pub fn key_blob() -> Vec<u8> {
    (0u8..=63).collect()
}

/// `key_id_of(key_blob())`.
pub fn key_id() -> KeyId {
    key_id_of(&key_blob())
}

/// Small limits used by the samples (keep vectors short).
pub fn limits() -> Limits {
    Limits {
        max_frame_len: 1 << 16,
        max_key_len: 1 << 14,
        max_ciphertext_len: 1 << 12,
        max_ciphertexts: 64,
        max_elements: 4096,
        max_batch: 8,
        max_in_flight: 4,
        idle_timeout_ms: 30_000,
    }
}

/// Device configuration matching [`cloud_config`].
pub fn device_config() -> DeviceConfig {
    DeviceConfig {
        versions: SUPPORTED_VERSIONS.to_vec(),
        param_sets: vec![PARAM_SET, 2],
        model_id: MODEL_ID.to_string(),
        model_digest: MODEL_DIGEST,
        limits: limits(),
        request_timeout_ms: 60_000,
    }
}

/// Cloud configuration matching [`device_config`].
pub fn cloud_config() -> CloudConfig {
    CloudConfig {
        versions: SUPPORTED_VERSIONS.to_vec(),
        param_sets: vec![PARAM_SET],
        models: vec![ModelEntry {
            model_id: MODEL_ID.to_string(),
            model_digest: MODEL_DIGEST,
        }],
        limits: limits(),
    }
}

/// Gaussian DP metadata with a rational scale and a ρ charge.
pub fn dp_gaussian() -> DpMetadata {
    DpMetadata {
        mechanism: Mechanism::DiscreteGaussian,
        scale: Scale::Rational { num: 7, den: 2 },
        charge: BudgetCharge::Rho(0.125),
        clip_bound: 4.0,
        quant_scale: 1.0 / 64.0,
    }
}

/// Laplace DP metadata with a float scale and an ε charge.
pub fn dp_laplace() -> DpMetadata {
    DpMetadata {
        mechanism: Mechanism::DiscreteLaplace,
        scale: Scale::Float(2.5),
        charge: BudgetCharge::Epsilon(0.5),
        clip_bound: 1.0,
        quant_scale: 0.01,
    }
}

/// An encrypted block with `n` small ciphertexts.
pub fn encrypted(n: usize, mode: OutputMode) -> EncryptedBlock {
    EncryptedBlock {
        param_set: PARAM_SET,
        key_id: key_id(),
        output_mode: mode,
        ciphertexts: (0..n)
            .map(|i| {
                (0..16u8)
                    .map(|b| b.wrapping_mul(3).wrapping_add(i as u8))
                    .collect()
            })
            .collect(),
    }
}

/// The ClientHello of [`device_config`].
pub fn client_hello() -> ClientHello {
    let c = device_config();
    ClientHello {
        versions: c.versions,
        param_sets: c.param_sets,
        model_id: c.model_id,
        model_digest: c.model_digest,
        channel_binding: CHANNEL_BINDING,
        limits: c.limits,
    }
}

/// The ServerHello answering [`client_hello`].
pub fn server_hello() -> ServerHello {
    ServerHello {
        version: PROTOCOL_VERSION,
        param_set: PARAM_SET,
        model_id: MODEL_ID.to_string(),
        model_digest: MODEL_DIGEST,
        limits: limits(),
    }
}

/// Named canonical messages: at least one per type and per variant.
pub fn messages() -> Vec<(&'static str, Message)> {
    let noised = |batch: u16, dp: DpMetadata, values: Vec<i32>| {
        Message::InferRequest(InferRequest {
            request_id: 2,
            layer_id: 1,
            batch,
            payload: RequestPayload::Noised(NoisedBlock { dp, values }),
        })
    };
    vec![
        ("client_hello", Message::ClientHello(client_hello())),
        (
            "client_hello_multi",
            Message::ClientHello(ClientHello {
                versions: vec![1, 2, 7],
                param_sets: vec![3, 1, 2],
                model_id: "minilm-l6~split.3".into(),
                model_digest: [0xaa; 32],
                channel_binding: [0x01; 32],
                limits: Limits::default(),
            }),
        ),
        ("server_hello", Message::ServerHello(server_hello())),
        (
            "key_register_packed",
            Message::KeyRegister(KeyRegister {
                key_id: key_id(),
                param_set: PARAM_SET,
                output_mode: OutputMode::Packed,
                channel_binding: CHANNEL_BINDING,
                key_blob: key_blob(),
            }),
        ),
        (
            "key_register_nokey_empty",
            Message::KeyRegister(KeyRegister {
                key_id: [0x22; 32],
                param_set: PARAM_SET,
                output_mode: OutputMode::NoKey,
                channel_binding: CHANNEL_BINDING,
                key_blob: Vec::new(),
            }),
        ),
        ("key_ack", Message::KeyAck(KeyAck { key_id: key_id() })),
        (
            "request_encrypted_packed",
            Message::InferRequest(InferRequest {
                request_id: 1,
                layer_id: 0,
                batch: 1,
                payload: RequestPayload::Encrypted(encrypted(2, OutputMode::Packed)),
            }),
        ),
        (
            "request_encrypted_nokey",
            Message::InferRequest(InferRequest {
                request_id: 9,
                layer_id: 3,
                batch: 2,
                payload: RequestPayload::Encrypted(encrypted(1, OutputMode::NoKey)),
            }),
        ),
        (
            "request_noised_gaussian",
            noised(2, dp_gaussian(), vec![0, -1, 127, -128, i32::MAX, i32::MIN]),
        ),
        (
            "request_noised_laplace",
            noised(1, dp_laplace(), vec![5, -5, 42]),
        ),
        (
            "request_noised_encrypted",
            Message::InferRequest(InferRequest {
                request_id: u64::MAX,
                layer_id: u32::MAX,
                batch: 8,
                payload: RequestPayload::NoisedEncrypted {
                    dp: dp_gaussian(),
                    enc: encrypted(3, OutputMode::Packed),
                },
            }),
        ),
        (
            // TDM-REQ-8, TDM-REQ-9: a later layer (k > 0) of a multi-layer model, 4 rows of
            // 3 values each (batch = rows, never spanning layers).
            "request_noised_layer5_batch4",
            Message::InferRequest(InferRequest {
                request_id: 3,
                layer_id: 5,
                batch: 4,
                payload: RequestPayload::Noised(NoisedBlock {
                    dp: dp_gaussian(),
                    values: vec![1, 2, 3, -1, -2, -3, 0, 0, 0, 127, -128, 64],
                }),
            }),
        ),
        (
            "response_encrypted",
            Message::InferResponse(InferResponse {
                request_id: 1,
                layer_id: 0,
                cloud_eval_us: Some(105_250),
                payload: ResponsePayload::Encrypted(encrypted(1, OutputMode::Packed)),
            }),
        ),
        (
            "response_plain",
            Message::InferResponse(InferResponse {
                request_id: 2,
                layer_id: 1,
                cloud_eval_us: Some(u32::MAX),
                payload: ResponsePayload::Plain(vec![0, -1, i64::MAX, i64::MIN, 1234]),
            }),
        ),
        (
            // TDM-MSG-14: 0 = the cloud did not measure.
            "response_plain_layer5_unmeasured",
            Message::InferResponse(InferResponse {
                request_id: 2,
                layer_id: 5,
                cloud_eval_us: Some(0),
                payload: ResponsePayload::Plain(vec![6, -6, 0, 191]),
            }),
        ),
        (
            // TDM-VER-3: the version-1 layout (no cloud_eval_us), what a v1 session carries.
            "response_encrypted_v1",
            Message::InferResponse(InferResponse {
                request_id: 1,
                layer_id: 0,
                cloud_eval_us: None,
                payload: ResponsePayload::Encrypted(encrypted(1, OutputMode::Packed)),
            }),
        ),
        (
            "response_plain_v1",
            Message::InferResponse(InferResponse {
                request_id: 2,
                layer_id: 1,
                cloud_eval_us: None,
                payload: ResponsePayload::Plain(vec![0, -1, i64::MAX, i64::MIN, 1234]),
            }),
        ),
        (
            "request_error_unknown_key",
            Message::RequestError(RequestError {
                request_id: 1,
                code: ErrorCode::UnknownKey,
            }),
        ),
        (
            "request_error_busy",
            Message::RequestError(RequestError {
                request_id: 77,
                code: ErrorCode::Busy,
            }),
        ),
        (
            "close_no_error",
            Message::Close(Close {
                code: ErrorCode::NoError,
            }),
        ),
        (
            "close_protocol_violation",
            Message::Close(Close {
                code: ErrorCode::ProtocolViolation,
            }),
        ),
        (
            "close_idle_timeout",
            Message::Close(Close {
                code: ErrorCode::IdleTimeout,
            }),
        ),
    ]
}
