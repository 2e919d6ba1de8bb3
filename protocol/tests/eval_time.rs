//! Protocol version 2: the cloud's evaluation time in InferResponse (TDM-MSG-14, TDM-EVAL-1),
//! and how a version-1 peer is served (TDM-VER-3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tandem_protocol::*;

fn device(versions: &[u16]) -> DeviceSession {
    let mut cfg = samples::device_config();
    cfg.versions = versions.to_vec();
    DeviceSession::new(cfg, samples::CHANNEL_BINDING, 0).unwrap()
}

fn cloud(versions: &[u16]) -> CloudSession {
    let mut cfg = samples::cloud_config();
    cfg.versions = versions.to_vec();
    CloudSession::new(cfg, samples::PEER_IDENTITY, samples::CHANNEL_BINDING, 0).unwrap()
}

/// Connects the two sessions, sends one noised request for `layer`, lets the cloud answer it
/// with `send_response_timed(.., eval_us, ..)`, and returns the negotiated version, the
/// response frame as sent and the device's `Response` event.
fn one_request(
    d: &mut DeviceSession,
    c: &mut CloudSession,
    eval_us: u32,
) -> (u16, Vec<u8>, DeviceEvent) {
    let hello = d.poll_transmit().unwrap();
    c.handle_input(&hello, 1).unwrap();
    let shello = c.poll_transmit().unwrap();
    d.handle_input(&shello, 2).unwrap();
    let version = d.negotiated().unwrap().version;
    assert_eq!(c.negotiated().unwrap().version, version);
    let payload = RequestPayload::Noised(NoisedBlock {
        dp: samples::dp_gaussian(),
        values: vec![1, 2, 3, 4],
    });
    let id = d.send_request(3, 2, payload, 3).unwrap();
    c.handle_input(&d.poll_transmit().unwrap(), 4).unwrap();
    while c.poll_event().is_some() {}
    c.send_response_timed(id, ResponsePayload::Plain(vec![3, 7]), eval_us, 5)
        .unwrap();
    let resp = c.poll_transmit().unwrap();
    d.handle_input(&resp, 6).unwrap();
    let ev = std::iter::from_fn(|| d.poll_event())
        .find(|e| matches!(e, DeviceEvent::Response { .. }))
        .unwrap();
    (version, resp, ev)
}

#[test]
fn version_2_carries_the_cloud_eval_time_to_the_device() {
    // TDM-VER-1, TDM-VER-3: both sides support 2 and 1, so 2 is chosen; TDM-MSG-14,
    // TDM-EVAL-1: the value the cloud passes reaches the device unchanged.
    let (mut d, mut c) = (device(&SUPPORTED_VERSIONS), cloud(&SUPPORTED_VERSIONS));
    let (version, frame, ev) = one_request(&mut d, &mut c, 123_456);
    assert_eq!(version, 2);
    // request id 8, layer id 4, then cloud_eval_us (u32, big-endian), then the kind byte.
    assert_eq!(frame[6 + 12..6 + 16], 123_456u32.to_be_bytes());
    assert_eq!(frame[6 + 16], 1);
    match ev {
        DeviceEvent::Response {
            layer_id,
            cloud_eval_us,
            payload,
            ..
        } => {
            assert_eq!(layer_id, 3);
            assert_eq!(cloud_eval_us, Some(123_456));
            assert_eq!(payload, ResponsePayload::Plain(vec![3, 7]));
        }
        e => panic!("{e:?}"),
    }
    // send_response (no measurement) reports 0 = "not measured".
    let payload = RequestPayload::Noised(NoisedBlock {
        dp: samples::dp_gaussian(),
        values: vec![1],
    });
    let id = d.send_request(0, 1, payload, 7).unwrap();
    c.handle_input(&d.poll_transmit().unwrap(), 8).unwrap();
    c.send_response(id, ResponsePayload::Plain(vec![1]), 9)
        .unwrap();
    d.handle_input(&c.poll_transmit().unwrap(), 10).unwrap();
    assert!(std::iter::from_fn(|| d.poll_event()).any(|e| matches!(
        e,
        DeviceEvent::Response {
            cloud_eval_us: Some(0),
            ..
        }
    )));
}

#[test]
fn a_version_1_peer_gets_the_version_1_layout() {
    // TDM-VER-3: a v1-only device and a v2 cloud negotiate 1, and the cloud's response has no
    // cloud_eval_us (its body is 4 bytes shorter and decodes under the v1 layout only).
    let (mut d, mut c) = (device(&[1]), cloud(&SUPPORTED_VERSIONS));
    let (version, frame, ev) = one_request(&mut d, &mut c, 99);
    assert_eq!(version, 1);
    assert_eq!(frame[6 + 12], 1, "the kind byte follows the layer id");
    let l = samples::limits();
    let (m, _) = decode_frame_version(&frame, &l, 1).unwrap();
    assert!(matches!(
        m,
        Message::InferResponse(InferResponse {
            cloud_eval_us: None,
            ..
        })
    ));
    assert!(decode_frame_version(&frame, &l, 2).is_err());
    assert!(matches!(
        ev,
        DeviceEvent::Response {
            cloud_eval_us: None,
            ..
        }
    ));
    // A v2 device and a v1-only cloud also settle on 1.
    let (mut d, mut c) = (device(&SUPPORTED_VERSIONS), cloud(&[1]));
    let (version, frame, _) = one_request(&mut d, &mut c, 99);
    assert_eq!(version, 1);
    assert_eq!(frame[6 + 12], 1);
}

#[test]
fn a_layout_that_does_not_match_the_session_version_is_malformed() {
    // TDM-VER-3, TDM-FRAME-6: a v2 device receiving a v1-layout response (4 bytes short) and a
    // v1 device receiving a v2-layout response (4 trailing bytes) both close MalformedMessage.
    for (versions, eval) in [(vec![2u16, 1], None), (vec![1u16], Some(5u32))] {
        let mut d = device(&versions);
        let mut cfg_c = samples::cloud_config();
        cfg_c.versions = versions.clone();
        let mut c =
            CloudSession::new(cfg_c, samples::PEER_IDENTITY, samples::CHANNEL_BINDING, 0).unwrap();
        c.handle_input(&d.poll_transmit().unwrap(), 1).unwrap();
        d.handle_input(&c.poll_transmit().unwrap(), 2).unwrap();
        let payload = RequestPayload::Noised(NoisedBlock {
            dp: samples::dp_gaussian(),
            values: vec![1],
        });
        let id = d.send_request(0, 1, payload, 3).unwrap();
        let wrong = Message::InferResponse(InferResponse {
            request_id: id,
            layer_id: 0,
            cloud_eval_us: eval,
            payload: ResponsePayload::Plain(vec![1]),
        })
        .encode()
        .unwrap();
        let e = d.handle_input(&wrong, 4).unwrap_err();
        assert_eq!(e.code(), ErrorCode::MalformedMessage, "{versions:?}: {e}");
        assert!(d.is_closed());
    }
}

#[test]
fn eval_time_saturates_and_round_trips_at_the_extremes() {
    // TDM-MSG-14: u32 microseconds; 0 (not measured) and u32::MAX (saturated) both travel.
    for us in [0u32, 1, u32::MAX] {
        let m = Message::InferResponse(InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(us),
            payload: ResponsePayload::Plain(vec![1]),
        });
        assert_eq!(m.wire_version(), 2);
        let b = m.encode_checked(&samples::limits()).unwrap();
        assert_eq!(decode_frame(&b, &samples::limits()).unwrap().0, m);
    }
}

#[test]
fn the_reported_time_never_decides_whether_a_result_is_accepted() {
    // TDM-EVAL-2: advisory only. Whatever the cloud reports (0 = not measured, 1, a saturated
    // u32::MAX), the device session accepts the response, delivers the same payload, and its
    // timeout is the same afterwards.
    let mut seen = Vec::new();
    for us in [0u32, 1, u32::MAX] {
        let (mut d, mut c) = (device(&SUPPORTED_VERSIONS), cloud(&SUPPORTED_VERSIONS));
        let (_, _, ev) = one_request(&mut d, &mut c, us);
        assert!(!d.is_closed());
        assert_eq!(d.in_flight(), 0);
        match ev {
            DeviceEvent::Response {
                cloud_eval_us,
                payload,
                ..
            } => {
                assert_eq!(cloud_eval_us, Some(us));
                seen.push((payload, d.poll_timeout()));
            }
            e => panic!("{e:?}"),
        }
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
}
