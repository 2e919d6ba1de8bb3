//! A DeviceSession (with requests in flight) fed an arbitrary byte stream.
//! Invariants: at most one Close emitted, Closed is terminal, responses only
//! for requests in flight (TDM-REQ-5), in-flight never above the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_protocol::*;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut d = DeviceSession::new(samples::device_config(), samples::CHANNEL_BINDING, 0).unwrap();
    let hello = Message::ServerHello(samples::server_hello())
        .encode()
        .unwrap();
    let _ = d.poll_transmit();
    if split & 0x80 != 0 {
        d.handle_input(&hello, 0).unwrap();
        let _ = d.register_key(
            samples::key_id(),
            OutputMode::Packed,
            samples::key_blob(),
            0,
        );
        for (_, m) in samples::messages() {
            if let Message::InferRequest(r) = m {
                let _ = d.send_request(r.layer_id, r.batch, r.payload, 0);
            }
        }
    }
    let chunk = usize::from(split % 32) + 1;
    let mut closes = 0;
    let mut answered = std::collections::BTreeSet::new();
    for (i, piece) in rest.chunks(chunk).enumerate() {
        let was_closed = d.is_closed();
        let r = d.handle_input(piece, i as u64);
        if was_closed {
            assert!(r.is_err() && d.is_closed());
        }
        while let Some(f) = d.poll_transmit() {
            if f.get(1) == Some(&8) {
                closes += 1;
            }
        }
        while let Some(ev) = d.poll_event() {
            if let DeviceEvent::Response { request_id, .. }
            | DeviceEvent::RequestFailed { request_id, .. } = ev
            {
                assert!(answered.insert(request_id), "answered twice");
            }
        }
        assert!(closes <= 1);
        assert!(d.in_flight() <= usize::from(samples::limits().max_in_flight));
    }
});
