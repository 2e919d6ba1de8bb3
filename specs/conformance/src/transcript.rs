//! Session transcripts: a role (device or cloud) driven by a list of steps;
//! each step records the frames the session emits, its events and result.
//! The generator runs the steps to record expectations; the runner runs them
//! again and compares byte for byte.

use serde_json::{json, Value};
use tandem_protocol::*;

use crate::hexutil;

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

/// Runs `steps` for `role` ("device" or "cloud") and returns one record per
/// step plus the final state. Errors in the step list itself are `Err`.
pub fn execute(role: &str, steps: &[Value]) -> Result<(Vec<Value>, Value), String> {
    let mut s = match role {
        "device" => Role::Device(Box::new(
            DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0)
                .map_err(|e| e.to_string())?,
        )),
        "cloud" => Role::Cloud(Box::new(
            CloudSession::new(
                samples::cloud_config(),
                samples::PEER_IDENTITY,
                samples::CHANNEL_BINDING,
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
                res(c.send_response(id, echo(r), now))
            }
            (Role::Cloud(c), "allow_key") => {
                let k = hexutil::decode(step["key_id"].as_str().unwrap_or(""))
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
                    .ok_or("bad key_id")?;
                res(c.allow_key(k))
            }
            (Role::Device(d), "register_key") => res(d.register_key(
                samples::key_id(),
                OutputMode::Packed,
                samples::key_blob(),
                now,
            )),
            (Role::Device(d), "send") => {
                let name = step["sample"].as_str().ok_or("send without sample")?;
                let m = samples::messages()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .ok_or("unknown sample")?
                    .1;
                let Message::InferRequest(r) = m else {
                    return Err("sample is not a request".into());
                };
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
