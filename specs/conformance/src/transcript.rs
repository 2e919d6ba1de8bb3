//! Session transcripts: a role (device or cloud) driven by a list of steps;
//! each step records the frames the session emits, its events and result.
//! The generator runs the steps to record expectations; the runner runs them
//! again and compares byte for byte.

use serde_json::{json, Value};
use tandem_protocol::*;

use crate::hexutil;

/// The fixed inputs every transcript of a file shares (its `settings` object): both sides'
/// configurations, the connection's channel binding and peer identity, the key the device
/// registers and the requests the device sends by name. Stored in the vector file, so a
/// runner needs nothing from `tandem_protocol::samples`.
pub struct Settings {
    device: DeviceConfig,
    cloud: CloudConfig,
    channel_binding: [u8; 32],
    peer_identity: [u8; 32],
    key_blob: Vec<u8>,
    requests: Vec<(String, InferRequest)>,
}

fn hex32(v: &Value, what: &str) -> Result<[u8; 32], String> {
    hexutil::decode(v.as_str().ok_or(format!("settings: no {what}"))?)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or(format!("settings: {what} is not 32 bytes of hex"))
}

fn u16_list(v: &Value, what: &str) -> Result<Vec<u16>, String> {
    v.as_array()
        .ok_or(format!("settings: no {what}"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or(format!("settings: bad {what}"))
        })
        .collect()
}

impl Settings {
    /// Parses the `settings` object of a transcript file.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let limits = |w: &Value| crate::run::limits_from(w).ok_or("settings: bad limits");
        let d = &v["device"];
        let device = DeviceConfig {
            versions: u16_list(&d["versions"], "device.versions")?,
            param_sets: u16_list(&d["param_sets"], "device.param_sets")?,
            model_id: d["model_id"]
                .as_str()
                .ok_or("settings: device.model_id")?
                .into(),
            model_digest: hex32(&d["model_digest"], "device.model_digest")?,
            limits: limits(&d["limits"])?,
            request_timeout_ms: d["request_timeout_ms"]
                .as_u64()
                .ok_or("settings: device.request_timeout_ms")?,
        };
        let c = &v["cloud"];
        let models = c["models"]
            .as_array()
            .ok_or("settings: cloud.models")?
            .iter()
            .map(|m| {
                Ok(ModelEntry {
                    model_id: m["model_id"].as_str().ok_or("settings: model_id")?.into(),
                    model_digest: hex32(&m["model_digest"], "model_digest")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let cloud = CloudConfig {
            versions: u16_list(&c["versions"], "cloud.versions")?,
            param_sets: u16_list(&c["param_sets"], "cloud.param_sets")?,
            models,
            limits: limits(&c["limits"])?,
        };
        let key_blob = hexutil::decode(v["register_key"]["key_blob"].as_str().unwrap_or("-"))
            .ok_or("settings: register_key.key_blob")?;
        let mut requests = Vec::new();
        for (name, r) in v["requests"].as_object().ok_or("settings: no requests")? {
            let bytes = hexutil::decode(r.as_str().unwrap_or("-"))
                .ok_or(format!("settings: request {name}: bad hex"))?;
            match decode_frame(&bytes, &device.limits) {
                Ok((Message::InferRequest(m), _)) => requests.push((name.clone(), m)),
                other => return Err(format!("settings: request {name}: {other:?}")),
            }
        }
        Ok(Settings {
            device,
            cloud,
            channel_binding: hex32(&v["channel_binding"], "channel_binding")?,
            peer_identity: hex32(&v["peer_identity"], "peer_identity")?,
            key_blob,
            requests,
        })
    }
}

fn code_name(c: ErrorCode) -> String {
    format!("{c:?}")
}

fn code_from(name: &str) -> Option<ErrorCode> {
    ErrorCode::ALL.into_iter().find(|c| code_name(*c) == name)
}

fn device_event(e: &DeviceEvent) -> String {
    match e {
        DeviceEvent::Connected(n) => format!("Connected(v{},p{})", n.version, n.param_set),
        DeviceEvent::KeyAccepted { .. } => "KeyAccepted".into(),
        DeviceEvent::Response {
            request_id,
            cloud_eval_us: Some(us),
            ..
        } => format!("Response({request_id},eval_us={us})"),
        DeviceEvent::Response { request_id, .. } => format!("Response({request_id})"),
        DeviceEvent::RequestFailed { request_id, code } => {
            format!("RequestFailed({request_id},{code:?})")
        }
        DeviceEvent::Closed { code, by_peer } => format!("Closed({code:?},peer={by_peer})"),
    }
}

fn cloud_event(e: &CloudEvent) -> String {
    match e {
        CloudEvent::Connected(n) => format!("Connected(v{},p{})", n.version, n.param_set),
        CloudEvent::KeyRegistered { .. } => "KeyRegistered".into(),
        CloudEvent::Request { request, .. } => format!("Request({})", request.request_id),
        CloudEvent::Closed { code, by_peer } => format!("Closed({code:?},peer={by_peer})"),
    }
}

enum Role {
    Device(Box<DeviceSession>),
    Cloud(Box<CloudSession>),
}

fn echo(r: &InferRequest) -> ResponsePayload {
    match &r.payload {
        RequestPayload::Encrypted(e) | RequestPayload::NoisedEncrypted { enc: e, .. } => {
            ResponsePayload::Encrypted(e.clone())
        }
        RequestPayload::Noised(n) => {
            let w = (n.values.len() / usize::from(r.batch.max(1))).max(1);
            ResponsePayload::Plain(
                n.values
                    .chunks(w)
                    .map(|row| row.iter().map(|v| i64::from(*v)).sum())
                    .collect(),
            )
        }
    }
}

fn res(r: Result<(), Error>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => code_name(e.code()),
    }
}

/// Runs `steps` for `role` ("device" or "cloud") under `settings` and returns
/// one record per step plus the final state. Errors in the step list itself are `Err`.
pub fn execute(
    role: &str,
    steps: &[Value],
    settings: &Settings,
) -> Result<(Vec<Value>, Value), String> {
    let mut s = match role {
        "device" => Role::Device(Box::new(
            DeviceSession::new(settings.device.clone(), settings.channel_binding, 0)
                .map_err(|e| e.to_string())?,
        )),
        "cloud" => Role::Cloud(Box::new(
            CloudSession::new(
                settings.cloud.clone(),
                settings.peer_identity,
                settings.channel_binding,
                0,
            )
            .map_err(|e| e.to_string())?,
        )),
        r => return Err(format!("unknown role {r}")),
    };
    let mut records = Vec::new();
    let mut requests: Vec<InferRequest> = Vec::new();
    // The device's hello is emitted at construction: record it as step "start".
    let mut out = Vec::new();
    let mut events = Vec::new();
    drain(&mut s, &mut out, &mut events, &mut requests);
    records.push(json!({"op": "start", "out": out, "events": events, "result": "ok"}));
    for step in steps {
        let op = step["op"].as_str().ok_or("step without op")?;
        let now = step["now"].as_u64().unwrap_or(0);
        let result = match (&mut s, op) {
            (_, "input") => {
                let bytes = hexutil::decode(step["hex"].as_str().ok_or("input without hex")?)
                    .ok_or("bad hex")?;
                match &mut s {
                    Role::Device(d) => res(d.handle_input(&bytes, now)),
                    Role::Cloud(c) => res(c.handle_input(&bytes, now)),
                }
            }
            (Role::Device(d), "timeout") => {
                d.handle_timeout(now);
                "ok".into()
            }
            (Role::Cloud(c), "timeout") => {
                c.handle_timeout(now);
                "ok".into()
            }
            (Role::Device(d), "close") | (Role::Device(d), "close_local") => {
                d.close(code_from(step["code"].as_str().unwrap_or("")).ok_or("bad code")?);
                "ok".into()
            }
            (Role::Cloud(c), "close") => {
                c.close(code_from(step["code"].as_str().unwrap_or("")).ok_or("bad code")?);
                "ok".into()
            }
            (Role::Cloud(c), "respond_echo") => {
                let id = step["request_id"].as_u64().ok_or("no request_id")?;
                let r = requests
                    .iter()
                    .find(|r| r.request_id == id)
                    .ok_or("respond_echo: no such request")?;
                // TDM-MSG-14: the evaluation time the cloud application reports (0 = none).
                let us = step["cloud_eval_us"].as_u64().unwrap_or(0);
                let us = u32::try_from(us).map_err(|_| "cloud_eval_us above u32")?;
                res(c.send_response_timed(id, echo(r), us, now))
            }
            (Role::Cloud(c), "respond_error") => {
                // The cloud application refuses one request (e.g. a layer id the model does not
                // serve: InvalidRequest, TDM-REQ-8); the session continues (TDM-REQ-6).
                let id = step["request_id"].as_u64().ok_or("no request_id")?;
                let code = code_from(step["code"].as_str().unwrap_or("")).ok_or("bad code")?;
                res(c.send_request_error(id, code, now))
            }
            (Role::Cloud(c), "allow_key") => {
                let k = hexutil::decode(step["key_id"].as_str().unwrap_or(""))
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
                    .ok_or("bad key_id")?;
                res(c.allow_key(k))
            }
            (Role::Device(d), "register_key") => res(d.register_key(
                key_id_of(&settings.key_blob),
                OutputMode::Packed,
                settings.key_blob.clone(),
                now,
            )),
            (Role::Device(d), "send") => {
                let name = step["sample"].as_str().ok_or("send without sample")?;
                let r = settings
                    .requests
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or(format!("no request {name} in settings"))?
                    .1
                    .clone();
                match d.send_request(r.layer_id, r.batch, r.payload, now) {
                    Ok(_) => "ok".into(),
                    Err(e) => code_name(e.code()),
                }
            }
            (_, op) => return Err(format!("op {op} not valid for role {role}")),
        };
        let mut out = Vec::new();
        let mut events = Vec::new();
        drain(&mut s, &mut out, &mut events, &mut requests);
        let mut rec = step.clone();
        rec["out"] = json!(out);
        rec["events"] = json!(events);
        rec["result"] = json!(result);
        records.push(rec);
    }
    let fin = match &s {
        Role::Device(d) => json!({"state": format!("{:?}", d.state()),
            "error": d.error().map(|e| code_name(e.code()))}),
        Role::Cloud(c) => json!({"state": format!("{:?}", c.state()),
            "error": c.error().map(|e| code_name(e.code()))}),
    };
    Ok((records, fin))
}

fn drain(
    s: &mut Role,
    out: &mut Vec<String>,
    events: &mut Vec<String>,
    reqs: &mut Vec<InferRequest>,
) {
    match s {
        Role::Device(d) => {
            while let Some(f) = d.poll_transmit() {
                out.push(hexutil::encode(&f));
            }
            while let Some(e) = d.poll_event() {
                events.push(device_event(&e));
            }
        }
        Role::Cloud(c) => {
            while let Some(f) = c.poll_transmit() {
                out.push(hexutil::encode(&f));
            }
            while let Some(e) = c.poll_event() {
                if let CloudEvent::Request { request, .. } = &e {
                    reqs.push(request.clone());
                }
                // TDM-KEY-8: the transcript's cloud application accepts every registration
                // as soon as it is reported (a runtime does so once the key is stored), so the
                // KeyAck follows in the same step.
                if let CloudEvent::KeyRegistered { key_id, .. } = &e {
                    let _ = c.accept_key(*key_id, 0);
                }
                events.push(cloud_event(&e));
            }
            while let Some(f) = c.poll_transmit() {
                out.push(hexutil::encode(&f));
            }
        }
    }
}
