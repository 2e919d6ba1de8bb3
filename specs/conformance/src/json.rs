//! Decoded-field JSON for messages (the "decoded" half of each vector).

use serde_json::{json, Value};
use tandem_protocol::*;

use crate::hexutil::encode as hex;

fn limits(l: &Limits) -> Value {
    json!({
        "max_frame_len": l.max_frame_len, "max_key_len": l.max_key_len,
        "max_ciphertext_len": l.max_ciphertext_len, "max_ciphertexts": l.max_ciphertexts,
        "max_elements": l.max_elements, "max_batch": l.max_batch,
        "max_in_flight": l.max_in_flight, "idle_timeout_ms": l.idle_timeout_ms,
    })
}

fn mode(m: OutputMode) -> &'static str {
    match m {
        OutputMode::NoKey => "nokey",
        OutputMode::Packed => "packed",
    }
}

fn enc(e: &EncryptedBlock) -> Value {
    json!({
        "param_set": e.param_set, "key_id": hex(&e.key_id), "output_mode": mode(e.output_mode),
        "ciphertexts": e.ciphertexts.iter().map(|c| hex(c)).collect::<Vec<_>>(),
    })
}

fn dp(d: &DpMetadata) -> Value {
    let scale = match d.scale {
        Scale::Rational { num, den } => json!({"rational": [num, den]}),
        Scale::Float(f) => json!({"f64_bits": format!("{:016x}", f.to_bits()), "value": f}),
    };
    let charge = match d.charge {
        BudgetCharge::Rho(f) => json!({"rho_bits": format!("{:016x}", f.to_bits()), "value": f}),
        BudgetCharge::Epsilon(f) => {
            json!({"epsilon_bits": format!("{:016x}", f.to_bits()), "value": f})
        }
    };
    json!({
        "mechanism": match d.mechanism {
            Mechanism::DiscreteGaussian => "discrete_gaussian",
            Mechanism::DiscreteLaplace => "discrete_laplace",
        },
        "scale": scale, "charge": charge,
        "clip_bound_bits": format!("{:016x}", d.clip_bound.to_bits()),
        "quant_scale_bits": format!("{:016x}", d.quant_scale.to_bits()),
    })
}

/// The decoded fields of `m` as JSON.
pub fn message(m: &Message) -> Value {
    match m {
        Message::ClientHello(h) => json!({"type": "ClientHello",
            "versions": h.versions, "param_sets": h.param_sets, "model_id": h.model_id,
            "model_digest": hex(&h.model_digest), "channel_binding": hex(&h.channel_binding),
            "limits": limits(&h.limits)}),
        Message::ServerHello(h) => json!({"type": "ServerHello",
            "version": h.version, "param_set": h.param_set, "model_id": h.model_id,
            "model_digest": hex(&h.model_digest), "limits": limits(&h.limits)}),
        Message::KeyRegister(k) => json!({"type": "KeyRegister",
            "key_id": hex(&k.key_id), "param_set": k.param_set,
            "output_mode": mode(k.output_mode), "channel_binding": hex(&k.channel_binding),
            "key_blob": hex(&k.key_blob)}),
        Message::KeyAck(k) => json!({"type": "KeyAck", "key_id": hex(&k.key_id)}),
        Message::InferRequest(r) => {
            let payload = match &r.payload {
                RequestPayload::Encrypted(e) => json!({"protection": "encrypted", "enc": enc(e)}),
                RequestPayload::Noised(n) => {
                    json!({"protection": "noised", "dp": dp(&n.dp), "values": n.values})
                }
                RequestPayload::NoisedEncrypted { dp: d, enc: e } => {
                    json!({"protection": "noised_encrypted", "dp": dp(d), "enc": enc(e)})
                }
            };
            json!({"type": "InferRequest", "request_id": r.request_id,
                "layer_id": r.layer_id, "batch": r.batch, "payload": payload})
        }
        Message::InferResponse(r) => {
            let payload = match &r.payload {
                ResponsePayload::Encrypted(e) => json!({"kind": "encrypted", "enc": enc(e)}),
                ResponsePayload::Plain(v) => json!({"kind": "plain", "values": v}),
            };
            // TDM-MSG-14: `cloud_eval_us` is null in the version-1 layout.
            json!({"type": "InferResponse", "request_id": r.request_id,
                "layer_id": r.layer_id, "cloud_eval_us": r.cloud_eval_us, "payload": payload})
        }
        Message::RequestError(e) => json!({"type": "RequestError",
            "request_id": e.request_id, "code": format!("{:?}", e.code)}),
        Message::Close(c) => json!({"type": "Close", "code": format!("{:?}", c.code)}),
    }
}
