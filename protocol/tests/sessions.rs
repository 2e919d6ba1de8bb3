//! Session scenario tests over the in-memory pair harness, one or more per
//! fault knob, plus raw-frame tests of a misbehaving peer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::pair::*;
use proptest::prelude::*;
use tandem_protocol::*;

const STEPS: usize = 10_000;

fn frame(m: Message) -> Vec<u8> {
    m.encode().unwrap()
}

/// A cloud session after a valid ClientHello, as a malicious device would see it.
fn raw_cloud() -> CloudSession {
    let mut c = CloudSession::new(
        samples::cloud_config(),
        samples::PEER_IDENTITY,
        samples::CHANNEL_BINDING,
        0,
    )
    .unwrap();
    c.handle_input(&frame(Message::ClientHello(samples::client_hello())), 1)
        .unwrap();
    assert!(matches!(c.poll_transmit(), Some(b) if b[1] == 2));
    assert!(matches!(c.poll_event(), Some(CloudEvent::Connected(_))));
    c
}

/// A device session after a valid ServerHello.
fn raw_device() -> DeviceSession {
    let mut d = DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0).unwrap();
    assert!(d.poll_transmit().is_some());
    d.handle_input(&frame(Message::ServerHello(samples::server_hello())), 1)
        .unwrap();
    assert!(matches!(d.poll_event(), Some(DeviceEvent::Connected(_))));
    d
}

fn close_code(bytes: &[u8]) -> ErrorCode {
    match decode_frame(bytes, &Limits::default()).unwrap().0 {
        Message::Close(c) => c.code,
        m => panic!("expected Close, got {m:?}"),
    }
}

fn full_flow(p: &mut Pair) -> Vec<u64> {
    p.connect();
    p.device
        .register_key(
            samples::key_id(),
            OutputMode::Packed,
            samples::key_blob(),
            p.now,
        )
        .unwrap();
    p.drive(STEPS);
    let a = p
        .device
        .send_request(0, 1, enc_payload(OutputMode::Packed), p.now)
        .unwrap();
    let b = p
        .device
        .send_request(1, 2, noised_payload(), p.now)
        .unwrap();
    let c = p
        .device
        .send_request(
            2,
            1,
            RequestPayload::NoisedEncrypted {
                dp: samples::dp_laplace(),
                enc: samples::encrypted(1, OutputMode::NoKey),
            },
            p.now,
        )
        .unwrap();
    p.drive(STEPS);
    vec![a, b, c]
}

#[test]
fn handshake_negotiates() {
    // TDM-SES-1, TDM-VER-1, TDM-PAR-1, TDM-LIM-1: hello exchange, both sides agree.
    // TDM-BIND-1: both sessions were given the channel binding at construction.
    let mut d = samples::device_config();
    d.limits.max_in_flight = 2;
    let mut p = Pair::with(
        d,
        cloud_cfg(),
        samples::CHANNEL_BINDING,
        samples::CHANNEL_BINDING,
    );
    p.connect();
    let nd = p.device.negotiated().unwrap().clone();
    let nc = p.cloud.negotiated().unwrap().clone();
    assert_eq!(nd, nc);
    assert_eq!(nd.version, PROTOCOL_VERSION);
    assert_eq!(nd.param_set, samples::PARAM_SET);
    assert_eq!(nd.limits.max_in_flight, 2);
    p.check_invariants();
}

#[test]
fn full_flow_all_protection_modes() {
    // TDM-REQ-1, TDM-REQ-3, TDM-KEY-4, TDM-MSG-8: all three protection modes answered.
    let mut p = Pair::new();
    let ids = full_flow(&mut p);
    assert_eq!(ids, vec![1, 2, 3]);
    let r = p.responses();
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].1, ResponsePayload::Plain(vec![6, 15]));
    assert!(p
        .device_events
        .iter()
        .any(|e| matches!(e, DeviceEvent::KeyAccepted { .. })));
    assert!(p.cloud_events.iter().any(|e| matches!(
        e,
        CloudEvent::KeyRegistered { peer, .. } if *peer == samples::PEER_IDENTITY
    )));
    // TDM-CLOSE-1: a normal close reaches the peer as NoError.
    p.device.close(ErrorCode::NoError);
    p.drive(STEPS);
    assert!(p.cloud.is_closed() && p.device.is_closed());
    assert!(p.cloud.error().is_none());
    assert!(p.cloud_events.contains(&CloudEvent::Closed {
        code: ErrorCode::NoError,
        by_peer: true
    }));
    p.check_invariants();
}

#[test]
fn split_at_every_byte() {
    // TDM-FRAME-8: frames split at any byte boundary are reassembled.
    let mut reference = Pair::new();
    full_flow(&mut reference);
    let max_len = reference.d2c.bytes.max(reference.c2d.bytes);
    for k in 0..200.min(max_len) {
        let mut p = Pair::new();
        p.d2c.faults.split_at = Some(k);
        p.c2d.faults.split_at = Some(k);
        full_flow(&mut p);
        assert_eq!(p.responses(), reference.responses(), "split at {k}");
        p.check_invariants();
    }
    // And byte-by-byte delivery.
    let mut p = Pair::new();
    p.d2c.faults.chunk = Some(1);
    p.c2d.faults.chunk = Some(1);
    full_flow(&mut p);
    assert_eq!(p.responses(), reference.responses());
    p.check_invariants();
}

#[test]
fn drop_client_hello_times_out() {
    // TDM-TIME-1: a handshake that never completes closes with IdleTimeout.
    let mut p = Pair::new();
    p.d2c.faults.drop = Some(0);
    p.run_to_close(STEPS);
    assert!(p.device.is_closed() && p.cloud.is_closed());
    assert_eq!(p.device.error(), Some(&Error::Timeout));
    assert_eq!(p.cloud.error(), Some(&Error::Timeout));
    p.check_invariants();
}

#[test]
fn drop_response_request_timeout() {
    // TDM-TIME-3: the device gives up on requests after request_timeout_ms.
    let mut d = device_cfg();
    d.request_timeout_ms = 20_000; // below the 30 s idle timeout of the cloud
    let mut p = Pair::with(
        d,
        cloud_cfg(),
        samples::CHANNEL_BINDING,
        samples::CHANNEL_BINDING,
    );
    p.c2d.faults.drop = Some(1); // frame 0 is the ServerHello, frame 1 the response
    p.connect();
    let t0 = p.now;
    p.device.send_request(0, 1, noised_payload(), t0).unwrap();
    p.drive(STEPS);
    assert_eq!(p.device.in_flight(), 1);
    let deadline = p.device.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + 20_000);
    p.advance(deadline - p.now - 1, STEPS);
    assert!(!p.device.is_closed());
    p.advance(1, STEPS);
    assert_eq!(p.device.error(), Some(&Error::Timeout));
    // The Close(IdleTimeout) reached the cloud.
    assert_eq!(
        p.cloud.error(),
        Some(&Error::PeerClosed(ErrorCode::IdleTimeout))
    );
    p.check_invariants();
}

#[test]
fn truncated_frame_then_more_bytes_fails_cleanly() {
    // TDM-FRAME-7: a truncated frame followed by other bytes is malformed;
    // the receiver closes with one coarse code (TDM-ERR-3).
    for cut in [1, 5, 6, 7, 20] {
        let mut p = Pair::new();
        p.d2c.faults.truncate = Some((1, cut));
        p.connect();
        p.device
            .send_request(0, 1, noised_payload(), p.now)
            .unwrap();
        p.device
            .send_request(0, 1, noised_payload(), p.now)
            .unwrap();
        p.run_to_close(STEPS);
        assert!(p.cloud.is_closed(), "cut {cut}");
        assert!(p.device.is_closed(), "cut {cut}");
        p.check_invariants();
    }
}

#[test]
fn truncated_last_frame_waits_then_times_out() {
    // TDM-TIME-1 / TDM-TIME-2: a partial frame never completes; idle timeout closes.
    let mut p = Pair::new();
    p.d2c.faults.truncate = Some((1, 10));
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert_eq!(p.cloud.buffered(), 10);
    p.run_to_close(STEPS);
    assert!(p.cloud.is_closed() && p.device.is_closed());
    p.check_invariants();
}

#[test]
fn reorder_requests_is_replay() {
    // TDM-REQ-2: request ids must strictly increase; out of order is fatal.
    let mut p = Pair::new();
    p.d2c.faults.reorder = Some(1);
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::DuplicateRequestId(1)));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::ProtocolViolation))
    );
    p.check_invariants();
}

#[test]
fn reorder_key_after_request_gives_unknown_key() {
    // TDM-KEY-5: a request under an unregistered key fails alone; the session goes on.
    let mut p = Pair::new();
    p.d2c.faults.reorder = Some(1);
    p.connect();
    p.device
        .register_key(
            samples::key_id(),
            OutputMode::Packed,
            samples::key_blob(),
            p.now,
        )
        .unwrap();
    let id = p
        .device
        .send_request(0, 1, enc_payload(OutputMode::Packed), p.now)
        .unwrap();
    p.drive(STEPS);
    assert!(p.device_events.contains(&DeviceEvent::RequestFailed {
        request_id: id,
        code: ErrorCode::UnknownKey
    }));
    assert!(p.device_events.contains(&DeviceEvent::KeyAccepted {
        key_id: samples::key_id()
    }));
    let id2 = p
        .device
        .send_request(0, 1, enc_payload(OutputMode::Packed), p.now)
        .unwrap();
    p.drive(STEPS);
    assert!(p.responses().iter().any(|(r, _)| *r == id2));
    assert!(!p.device.is_closed());
    p.check_invariants();
}

#[test]
fn duplicate_request_frame_is_replay() {
    // TDM-REQ-2: a replayed request frame closes the session.
    let mut p = Pair::new();
    p.d2c.faults.duplicate = Some(1);
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::DuplicateRequestId(1)));
    assert!(p.device.is_closed());
    // Exactly one answer reached the device at most.
    p.check_invariants();
}

#[test]
fn duplicate_hello_is_violation() {
    // TDM-SES-2: a second ClientHello is a protocol violation.
    let mut p = Pair::new();
    p.d2c.faults.duplicate = Some(0);
    p.drive(STEPS);
    assert!(matches!(
        p.cloud.error(),
        Some(Error::UnexpectedMessage { .. })
    ));
    assert!(p.device.is_closed());
    p.check_invariants();
}

#[test]
fn duplicate_response_is_violation() {
    // TDM-REQ-5: a response for a request no longer in flight is fatal.
    let mut p = Pair::new();
    p.c2d.faults.duplicate = Some(1);
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert_eq!(p.responses().len(), 1);
    assert_eq!(p.device.error(), Some(&Error::UnknownRequestId(1)));
    assert_eq!(
        p.cloud.error(),
        Some(&Error::PeerClosed(ErrorCode::ProtocolViolation))
    );
    p.check_invariants();
}

#[test]
fn delay_within_timeouts_works() {
    // TDM-TIME-2: the cloud's idle timer is suspended while it owes responses.
    let mut p = Pair::new();
    p.d2c.faults.delay_ms = 10_000;
    p.c2d.faults.delay_ms = 10_000;
    full_flow(&mut p);
    assert_eq!(p.responses().len(), 3);
    p.check_invariants();

    let mut p = Pair::new();
    p.app = CloudApp::Silent;
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert_eq!(p.cloud.in_flight(), 1);
    assert_eq!(p.cloud.poll_timeout(), None);
    p.advance(40_000, STEPS);
    assert!(!p.cloud.is_closed());
}

#[test]
fn delay_one_frame_beyond_idle_timeout() {
    // TDM-TIME-2: no traffic for idle_timeout_ms closes with IdleTimeout.
    let mut p = Pair::new();
    p.connect();
    let t = p.cloud.poll_timeout().unwrap();
    p.advance(t - p.now, STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::Timeout));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::IdleTimeout))
    );
    p.check_invariants();
}

#[test]
fn request_error_is_not_fatal() {
    // TDM-REQ-6: RequestError fails one request; the session continues.
    let mut p = Pair::new();
    p.app = CloudApp::Reject;
    p.connect();
    p.device
        .send_request(0, 1, noised_payload(), p.now)
        .unwrap();
    p.drive(STEPS);
    assert!(p.device_events.iter().any(|e| matches!(
        e,
        DeviceEvent::RequestFailed {
            code: ErrorCode::InvalidRequest,
            ..
        }
    )));
    assert!(!p.device.is_closed() && !p.cloud.is_closed());
    p.check_invariants();
}

#[test]
fn in_flight_limit_local_and_remote() {
    // TDM-REQ-4: the device refuses to exceed max_in_flight; a cloud closes a
    // peer that does.
    let mut p = Pair::new();
    p.app = CloudApp::Silent;
    p.connect();
    for _ in 0..4 {
        p.device
            .send_request(0, 1, noised_payload(), p.now)
            .unwrap();
    }
    assert_eq!(
        p.device.send_request(0, 1, noised_payload(), p.now),
        Err(Error::InFlightLimit)
    );
    assert!(!p.device.is_closed());

    let mut c = raw_cloud();
    let mut last = Ok(());
    for id in 1..=5u64 {
        let m = Message::InferRequest(InferRequest {
            request_id: id,
            layer_id: 0,
            batch: 1,
            payload: RequestPayload::Noised(NoisedBlock {
                dp: samples::dp_gaussian(),
                values: vec![1],
            }),
        });
        last = c.handle_input(&frame(m), 2);
    }
    assert_eq!(last, Err(Error::InFlightLimit));
    while let Some(b) = c.poll_transmit() {
        assert_eq!(close_code(&b), ErrorCode::LimitExceeded);
    }
}

#[test]
fn channel_binding_mismatch() {
    // TDM-BIND-2: a hello with another connection's channel binding is refused.
    let mut p = Pair::with(device_cfg(), cloud_cfg(), [1; 32], [2; 32]);
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::ChannelBindingMismatch));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::ChannelBindingMismatch))
    );
    // TDM-BIND-3: a KeyRegister with a wrong binding is refused.
    let mut c = raw_cloud();
    let m = Message::KeyRegister(KeyRegister {
        key_id: samples::key_id(),
        param_set: 1,
        output_mode: OutputMode::Packed,
        channel_binding: [9; 32],
        key_blob: samples::key_blob(),
    });
    assert_eq!(
        c.handle_input(&frame(m), 2),
        Err(Error::ChannelBindingMismatch)
    );
}

#[test]
fn negotiation_failures() {
    // TDM-VER-1: no common version.
    let mut d = device_cfg();
    d.versions = vec![7];
    let mut p = Pair::with(
        d,
        cloud_cfg(),
        samples::CHANNEL_BINDING,
        samples::CHANNEL_BINDING,
    );
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::NoCommonVersion));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::UnsupportedVersion))
    );
    // TDM-MOD-1: unknown model digest.
    let mut d = device_cfg();
    d.model_digest = [0; 32];
    let mut p = Pair::with(
        d,
        cloud_cfg(),
        samples::CHANNEL_BINDING,
        samples::CHANNEL_BINDING,
    );
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::UnknownModel));
    // TDM-PAR-1: no common parameter set.
    let mut d = device_cfg();
    d.param_sets = vec![9];
    let mut p = Pair::with(
        d,
        cloud_cfg(),
        samples::CHANNEL_BINDING,
        samples::CHANNEL_BINDING,
    );
    p.drive(STEPS);
    assert_eq!(p.cloud.error(), Some(&Error::ParameterSetMismatch));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::UnsupportedParameters))
    );
}

#[test]
fn device_checks_server_hello() {
    type Case = (fn(&mut ServerHello), Error);
    let bad: [Case; 4] = [
        // TDM-VER-2
        (|h| h.version = 9, Error::NoCommonVersion),
        // TDM-PAR-2
        (|h| h.param_set = 9, Error::ParameterSetMismatch),
        // TDM-MOD-2
        (|h| h.model_digest = [0; 32], Error::UnknownModel),
        // TDM-LIM-1: the cloud may not raise limits.
        (
            |h| h.limits.max_in_flight = 100,
            Error::NegotiationViolation { field: "limits" },
        ),
    ];
    for (f, want) in bad {
        let mut d =
            DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0).unwrap();
        d.poll_transmit();
        let mut h = samples::server_hello();
        f(&mut h);
        assert_eq!(
            d.handle_input(&frame(Message::ServerHello(h)), 1),
            Err(want)
        );
        assert!(d.is_closed());
    }
}

#[test]
fn sticky_errors_and_closed_state() {
    // TDM-ERR-3, TDM-SES-3: one Close is sent, the error is returned again,
    // nothing is processed after close.
    let mut c = raw_cloud();
    let e = c.handle_input(&[1, 0x42, 0, 0, 0, 0], 2).unwrap_err();
    assert_eq!(e, Error::UnknownMessageType(0x42));
    let out: Vec<_> = std::iter::from_fn(|| c.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(close_code(&out[0]), ErrorCode::MalformedMessage);
    let valid = frame(Message::Close(Close {
        code: ErrorCode::NoError,
    }));
    assert_eq!(c.handle_input(&valid, 3), Err(e.clone()));
    c.handle_timeout(u64::MAX);
    c.close(ErrorCode::InternalError);
    assert!(c.poll_transmit().is_none());
    assert_eq!(c.error(), Some(&e));
    assert_eq!(c.poll_timeout(), None);
    assert!(matches!(c.poll_event(), Some(CloudEvent::Closed { .. })));
    assert!(c.poll_event().is_none());
}

#[test]
fn peer_close_gets_no_reply() {
    // TDM-CLOSE-2: nothing is sent after receiving Close; later bytes are ignored.
    let mut c = raw_cloud();
    let mut bytes = frame(Message::Close(Close {
        code: ErrorCode::Busy,
    }));
    bytes.extend_from_slice(&[0xff; 10]);
    assert_eq!(
        c.handle_input(&bytes, 2),
        Err(Error::PeerClosed(ErrorCode::Busy))
    );
    assert!(c.poll_transmit().is_none());
}

#[test]
fn oversized_frame_refused_from_header() {
    // TDM-FRAME-3, TDM-LIM-3: an oversized header is refused before buffering the body.
    let mut c = CloudSession::new(
        samples::cloud_config(),
        samples::PEER_IDENTITY,
        samples::CHANNEL_BINDING,
        0,
    )
    .unwrap();
    let mut hdr = vec![1u8, 1];
    hdr.extend_from_slice(&1025u32.to_be_bytes());
    assert!(matches!(
        c.handle_input(&hdr, 1),
        Err(Error::LengthLimit { .. })
    ));
    let mut c = raw_cloud();
    for len in [samples::limits().max_frame_len + 1, u32::MAX] {
        let mut c2 = raw_cloud();
        let mut hdr = vec![1u8, 5];
        hdr.extend_from_slice(&len.to_be_bytes());
        assert!(matches!(
            c2.handle_input(&hdr, 1),
            Err(Error::LengthLimit { .. })
        ));
        assert_eq!(c2.buffered(), FRAME_HEADER_LEN);
        assert_eq!(
            close_code(&c2.poll_transmit().unwrap()),
            ErrorCode::LimitExceeded
        );
    }
    // A frame within the limit is buffered only up to its length.
    let mut hdr = vec![1u8, 5];
    hdr.extend_from_slice(&100u32.to_be_bytes());
    c.handle_input(&hdr, 2).unwrap();
    assert_eq!(c.buffered(), 6);
}

#[test]
fn key_registration_checks() {
    // TDM-KEY-3: the key id must be the SHA-256 of a non-empty blob.
    let mut c = raw_cloud();
    let m = Message::KeyRegister(KeyRegister {
        key_id: [0; 32],
        param_set: 1,
        output_mode: OutputMode::Packed,
        channel_binding: samples::CHANNEL_BINDING,
        key_blob: samples::key_blob(),
    });
    assert_eq!(c.handle_input(&frame(m), 2), Err(Error::KeyIdMismatch));
    // TDM-PAR-3: keys use the negotiated parameter set.
    let mut c = raw_cloud();
    let m = Message::KeyRegister(KeyRegister {
        key_id: samples::key_id(),
        param_set: 2,
        output_mode: OutputMode::Packed,
        channel_binding: samples::CHANNEL_BINDING,
        key_blob: samples::key_blob(),
    });
    assert_eq!(
        c.handle_input(&frame(m), 2),
        Err(Error::ParameterSetMismatch)
    );
    // TDM-KEY-6: at most MAX_KEYS_PER_SESSION keys.
    let mut c = raw_cloud();
    let mut res = Ok(());
    for i in 0..=limits::MAX_KEYS_PER_SESSION {
        let m = Message::KeyRegister(KeyRegister {
            key_id: [i as u8; 32],
            param_set: 1,
            output_mode: OutputMode::NoKey,
            channel_binding: samples::CHANNEL_BINDING,
            key_blob: vec![],
        });
        res = c.handle_input(&frame(m), 2);
    }
    assert!(matches!(res, Err(Error::LengthLimit { field: "keys", .. })));
    // Device side: local key id check is not fatal.
    let mut d = raw_device();
    assert_eq!(
        d.register_key([0; 32], OutputMode::Packed, samples::key_blob(), 2),
        Err(Error::KeyIdMismatch)
    );
    assert!(!d.is_closed());
    // TDM-KEY-5: an unsolicited KeyAck is a violation.
    assert!(d
        .handle_input(&frame(Message::KeyAck(KeyAck { key_id: [3; 32] })), 3)
        .is_err());
}

fn key_register(i: u8) -> Vec<u8> {
    frame(Message::KeyRegister(KeyRegister {
        key_id: [i; 32],
        param_set: 1,
        output_mode: OutputMode::NoKey,
        channel_binding: samples::CHANNEL_BINDING,
        key_blob: vec![],
    }))
}

fn key_acks(c: &mut CloudSession) -> Vec<[u8; 32]> {
    let mut acks = Vec::new();
    while let Some(f) = c.poll_transmit() {
        if let Message::KeyAck(a) = decode_frame(&f, &Limits::default()).unwrap().0 {
            acks.push(a.key_id);
        }
    }
    acks
}

#[test]
fn key_ack_only_after_runtime_accepts() {
    // TDM-KEY-8: receipt of a KeyRegister sends nothing; accept_key sends the KeyAck.
    let mut c = raw_cloud();
    let _ = key_acks(&mut c);
    c.handle_input(&key_register(7), 2).unwrap();
    assert!(key_acks(&mut c).is_empty(), "no KeyAck on receipt");
    assert_eq!(c.pending_keys(), 1);
    assert!(matches!(
        c.poll_event(),
        Some(CloudEvent::KeyRegistered { key_id, .. }) if key_id == [7; 32]
    ));
    // Accepting a key that is not pending is a local, non-fatal error.
    assert!(c.accept_key([8; 32], 3).is_err());
    assert!(!c.is_closed());
    c.accept_key([7; 32], 3).unwrap();
    assert_eq!(key_acks(&mut c), vec![[7; 32]]);
    assert_eq!(c.pending_keys(), 0);
    assert!(
        c.accept_key([7; 32], 3).is_err(),
        "one KeyAck per registration"
    );
}

#[test]
fn refused_key_closes_with_the_runtime_code() {
    // TDM-KEY-8: a refused registration closes the session with the given code, no KeyAck.
    let mut p = Pair::new();
    p.refuse_keys = Some(ErrorCode::InvalidRequest);
    p.connect();
    p.device
        .register_key(
            samples::key_id(),
            OutputMode::Packed,
            samples::key_blob(),
            p.now,
        )
        .unwrap();
    p.drive(STEPS);
    assert!(p.cloud.is_closed() && p.device.is_closed());
    assert!(!p
        .device_events
        .iter()
        .any(|e| matches!(e, DeviceEvent::KeyAccepted { .. })));
    assert_eq!(
        p.device.error(),
        Some(&Error::PeerClosed(ErrorCode::InvalidRequest))
    );
    p.check_invariants();
}

#[test]
fn stored_keys_do_not_count_against_the_session_limit() {
    // TDM-KEY-6 / TDM-KEY-7: a device with many stored keys can still register new ones.
    let mut c = raw_cloud();
    for i in 0..=(limits::MAX_KEYS_PER_SESSION as u8 + 4) {
        c.allow_key([200u8.wrapping_add(i); 32]).unwrap();
    }
    for i in 0..limits::MAX_KEYS_PER_SESSION as u8 {
        c.handle_input(&key_register(i), 2).unwrap();
        c.accept_key([i; 32], 2).unwrap();
    }
    assert!(!c.is_closed());
    // The 17th registration in one session is still refused.
    assert!(matches!(
        c.handle_input(&key_register(100), 3),
        Err(Error::LengthLimit { field: "keys", .. })
    ));
    // The stored-key set itself is bounded.
    let mut c = raw_cloud();
    for i in 0..session::MAX_STORED_KEYS_PER_SESSION {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64).to_be_bytes());
        c.allow_key(k).unwrap();
    }
    assert!(c.allow_key([0xff; 32]).is_err());
}

#[test]
fn preloaded_key_is_usable() {
    // TDM-KEY-7: keys from the store are accepted without re-registration.
    let mut p = Pair::new();
    p.cloud.allow_key(samples::key_id()).unwrap();
    p.connect();
    let id = p
        .device
        .send_request(0, 1, enc_payload(OutputMode::NoKey), p.now)
        .unwrap();
    p.drive(STEPS);
    assert!(p.responses().iter().any(|(r, _)| *r == id));
}

#[test]
fn ciphertext_param_set_must_match() {
    // TDM-PAR-3: a ciphertext under a non-negotiated parameter set is fatal at
    // the cloud and refused locally at the device.
    let mut c = raw_cloud();
    c.allow_key(samples::key_id()).unwrap();
    let mut enc = samples::encrypted(1, OutputMode::NoKey);
    enc.param_set = 2;
    let m = Message::InferRequest(InferRequest {
        request_id: 1,
        layer_id: 0,
        batch: 1,
        payload: RequestPayload::Encrypted(enc.clone()),
    });
    assert_eq!(
        c.handle_input(&frame(m), 2),
        Err(Error::ParameterSetMismatch)
    );
    let mut d = raw_device();
    assert_eq!(
        d.send_request(0, 1, RequestPayload::Encrypted(enc), 2),
        Err(Error::ParameterSetMismatch)
    );
}

#[test]
fn response_must_match_request() {
    // TDM-REQ-7: kind, key id and layer of a response match the request.
    let mut p = Pair::new();
    p.app = CloudApp::Silent;
    p.cloud.allow_key(samples::key_id()).unwrap();
    p.connect();
    let id = p
        .device
        .send_request(4, 1, enc_payload(OutputMode::NoKey), p.now)
        .unwrap();
    p.drive(STEPS);
    // Cloud side refuses locally, without closing.
    assert_eq!(
        p.cloud
            .send_response(id, ResponsePayload::Plain(vec![1]), p.now),
        Err(Error::ResponseMismatch(id))
    );
    assert_eq!(
        p.cloud
            .send_response(99, ResponsePayload::Plain(vec![1]), p.now),
        Err(Error::UnknownRequestId(99))
    );
    assert!(!p.cloud.is_closed());
    // Device side: a mismatching response is fatal.
    let bad = Message::InferResponse(InferResponse {
        request_id: id,
        layer_id: 4,
        cloud_eval_us: Some(1),
        payload: ResponsePayload::Plain(vec![1]),
    });
    assert_eq!(
        p.device.handle_input(&frame(bad), p.now),
        Err(Error::ResponseMismatch(id))
    );
    let mut d = raw_device();
    let id = d
        .send_request(4, 1, enc_payload(OutputMode::NoKey), 2)
        .unwrap();
    let mut e = samples::encrypted(1, OutputMode::NoKey);
    e.key_id = [0; 32];
    let bad = Message::InferResponse(InferResponse {
        request_id: id,
        layer_id: 4,
        cloud_eval_us: Some(1),
        payload: ResponsePayload::Encrypted(e),
    });
    assert_eq!(
        d.handle_input(&frame(bad), 3),
        Err(Error::ResponseMismatch(id))
    );
}

#[test]
fn wrong_direction_messages_rejected() {
    // TDM-SES-2: messages for the other role, or before the handshake, are violations.
    let mut c = raw_cloud();
    assert!(matches!(
        c.handle_input(&frame(Message::ServerHello(samples::server_hello())), 2),
        Err(Error::UnexpectedMessage { .. })
    ));
    let mut c = CloudSession::new(
        samples::cloud_config(),
        samples::PEER_IDENTITY,
        samples::CHANNEL_BINDING,
        0,
    )
    .unwrap();
    let (_, req) = samples::messages()
        .into_iter()
        .find(|(n, _)| *n == "request_noised_laplace")
        .unwrap();
    assert!(matches!(
        c.handle_input(&frame(req.clone()), 1),
        Err(Error::UnexpectedMessage { .. })
    ));
    let mut d = raw_device();
    assert!(matches!(
        d.handle_input(&frame(req), 2),
        Err(Error::UnexpectedMessage { .. })
    ));
    // Local API before the handshake.
    let mut d = DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0).unwrap();
    assert_eq!(
        d.send_request(0, 1, noised_payload(), 0),
        Err(Error::NotReady)
    );
}

#[derive(Debug, Clone)]
struct RandomFaults {
    d2c: Faults,
    c2d: Faults,
}

fn arb_faults() -> impl Strategy<Value = Faults> {
    (
        proptest::option::weighted(0.2, 0usize..8),
        proptest::option::weighted(0.2, (0usize..8, 0usize..40)),
        proptest::option::weighted(0.2, 0usize..8),
        proptest::option::weighted(0.2, 0usize..8),
        proptest::option::weighted(0.3, 0usize..60),
        proptest::option::weighted(0.2, 1usize..9),
        0u64..20_000,
    )
        .prop_map(
            |(drop, truncate, duplicate, reorder, split_at, chunk, delay_ms)| Faults {
                drop,
                truncate,
                duplicate,
                reorder,
                split_at,
                chunk,
                delay_ms,
                delay_one: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any combination of faults: no panic, no livelock, invariants hold, and
    /// both sessions end closed after timers run out.
    #[test]
    fn random_faults_keep_invariants(
        d2c in arb_faults(),
        c2d in arb_faults(),
        n_req in 0usize..6,
    ) {
        let f = RandomFaults { d2c, c2d };
        let mut p = Pair::new();
        p.d2c.faults = f.d2c;
        p.c2d.faults = f.c2d;
        p.drive(STEPS);
        if p.device.state() == SessionState::Ready {
            let _ = p.device.register_key(samples::key_id(), OutputMode::Packed, samples::key_blob(), p.now);
            for i in 0..n_req {
                let pl = if i % 2 == 0 { noised_payload() } else { enc_payload(OutputMode::Packed) };
                let _ = p.device.send_request(0, if i % 2 == 0 { 2 } else { 1 }, pl, p.now);
            }
        }
        p.drive(STEPS);
        p.check_invariants();
        p.run_to_close(STEPS);
        p.check_invariants();
        prop_assert!(p.device.is_closed() && p.cloud.is_closed());
    }
}
