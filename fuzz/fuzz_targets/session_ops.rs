//! Operation-sequence fuzzing of a device/cloud pair (quinn-proto style):
//! an arbitrary Vec<Op> of local operations, partial deliveries, drops,
//! duplicates, raw injections and time jumps. Invariants: Closed is terminal
//! (TDM-SES-3), each side emits at most one Close (TDM-ERR-3), no request is
//! answered twice (TDM-REQ-3), in-flight bounded (TDM-REQ-4), a response carries
//! `cloud_eval_us` exactly when the session negotiated version 2 (TDM-VER-3, TDM-MSG-14).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeSet, VecDeque};
use tandem_protocol::*;

#[derive(Arbitrary, Debug)]
enum Op {
    Send(u8),
    RegisterKey,
    AllowKey,
    Respond(u8),
    Fail(u8),
    DeliverToCloud(u16),
    DeliverToDevice(u16),
    DropToCloud,
    DuplicateToCloud,
    DuplicateToDevice,
    Inject { to_cloud: bool, bytes: Vec<u8> },
    Advance(u32),
    CloseDevice(u8),
    CloseCloud(u8),
}

#[derive(Default)]
struct Side {
    closed: bool,
    closes: usize,
    buf: VecDeque<u8>,
    frames: Vec<Vec<u8>>,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut now = 0u64;
    let mut d = DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0).unwrap();
    let mut c = CloudSession::new(
        samples::cloud_config(),
        samples::PEER_IDENTITY,
        samples::CHANNEL_BINDING,
        0,
    )
    .unwrap();
    let (mut ds, mut cs) = (Side::default(), Side::default()); // ds: bytes to device
    let mut pending: Vec<InferRequest> = Vec::new();
    let mut answered = BTreeSet::new();
    let reqs: Vec<InferRequest> = samples::messages()
        .into_iter()
        .filter_map(|(_, m)| {
            if let Message::InferRequest(r) = m {
                Some(r)
            } else {
                None
            }
        })
        .collect();
    for op in ops.into_iter().take(200) {
        match op {
            Op::Send(i) => {
                let r = &reqs[usize::from(i) % reqs.len()];
                let _ = d.send_request(r.layer_id, r.batch, r.payload.clone(), now);
            }
            Op::RegisterKey => {
                let _ = d.register_key(
                    samples::key_id(),
                    OutputMode::Packed,
                    samples::key_blob(),
                    now,
                );
            }
            Op::AllowKey => {
                let _ = c.allow_key(samples::key_id());
            }
            Op::Respond(i) | Op::Fail(i) if !pending.is_empty() => {
                let r = pending.remove(usize::from(i) % pending.len());
                let _ = match op {
                    Op::Respond(_) => {
                        let p = match r.payload {
                            RequestPayload::Encrypted(e)
                            | RequestPayload::NoisedEncrypted { enc: e, .. } => {
                                ResponsePayload::Encrypted(e)
                            }
                            RequestPayload::Noised(_) => ResponsePayload::Plain(vec![1]),
                        };
                        // TDM-EVAL-1: an evaluation time derived from the op (0 = not measured).
                        let us = u32::from(i).wrapping_mul(0x0101_0101);
                        c.send_response_timed(r.request_id, p, us, now)
                    }
                    _ => c.send_request_error(r.request_id, ErrorCode::Busy, now),
                };
            }
            Op::Respond(_) | Op::Fail(_) => {}
            Op::DeliverToCloud(n) => {
                let chunk: Vec<u8> = cs.buf.drain(..usize::from(n).min(cs.buf.len())).collect();
                let was = c.is_closed();
                let r = c.handle_input(&chunk, now);
                if was {
                    assert!(r.is_err() && c.is_closed());
                }
            }
            Op::DeliverToDevice(n) => {
                let chunk: Vec<u8> = ds.buf.drain(..usize::from(n).min(ds.buf.len())).collect();
                let was = d.is_closed();
                let r = d.handle_input(&chunk, now);
                if was {
                    assert!(r.is_err() && d.is_closed());
                }
            }
            Op::DropToCloud => cs.buf.clear(),
            Op::DuplicateToCloud => {
                if let Some(f) = cs.frames.last() {
                    cs.buf.extend(f.iter().copied());
                }
            }
            Op::DuplicateToDevice => {
                if let Some(f) = ds.frames.last() {
                    ds.buf.extend(f.iter().copied());
                }
            }
            Op::Inject { to_cloud, bytes } => {
                if to_cloud {
                    cs.buf.extend(bytes)
                } else {
                    ds.buf.extend(bytes)
                }
            }
            Op::Advance(ms) => {
                now = now.saturating_add(u64::from(ms));
                d.handle_timeout(now);
                c.handle_timeout(now);
            }
            Op::CloseDevice(code) => {
                d.close(ErrorCode::ALL[usize::from(code) % ErrorCode::ALL.len()])
            }
            Op::CloseCloud(code) => {
                c.close(ErrorCode::ALL[usize::from(code) % ErrorCode::ALL.len()])
            }
        }
        // Drain outputs into the links, check invariants.
        while let Some(f) = d.poll_transmit() {
            if f.get(1) == Some(&8) {
                cs.closes += 1;
            }
            cs.buf.extend(f.iter().copied());
            cs.frames.push(f);
        }
        while let Some(f) = c.poll_transmit() {
            if f.get(1) == Some(&8) {
                ds.closes += 1;
            }
            ds.buf.extend(f.iter().copied());
            ds.frames.push(f);
        }
        while let Some(e) = c.poll_event() {
            if let CloudEvent::Request { request, .. } = e {
                pending.push(request);
            }
        }
        while let Some(e) = d.poll_event() {
            if let DeviceEvent::Response { cloud_eval_us, .. } = &e {
                let v2 = d.negotiated().is_some_and(|n| n.version == 2);
                assert_eq!(cloud_eval_us.is_some(), v2, "layout of another version");
            }
            if let DeviceEvent::Response { request_id, .. }
            | DeviceEvent::RequestFailed { request_id, .. } = e
            {
                assert!(answered.insert(request_id), "answered twice");
            }
        }
        assert!(cs.closes <= 1 && ds.closes <= 1, "more than one Close");
        if ds.closed {
            assert!(d.is_closed());
        }
        if cs.closed {
            assert!(c.is_closed());
        }
        ds.closed = d.is_closed();
        cs.closed = c.is_closed();
        assert!(d.in_flight() <= usize::from(samples::limits().max_in_flight));
        assert!(c.in_flight() <= usize::from(samples::limits().max_in_flight));
        if c.is_closed() {
            pending.clear();
        }
    }
});
