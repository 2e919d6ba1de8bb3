//! A CloudSession fed an arbitrary byte stream in arbitrary chunks.
//! Invariants: never more than one Close emitted (TDM-ERR-3), no transition
//! out of Closed (TDM-SES-3), sticky error, buffer bounded (TDM-FRAME-3).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_protocol::*;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut c = CloudSession::new(
        samples::cloud_config(),
        samples::PEER_IDENTITY,
        samples::CHANNEL_BINDING,
        0,
    )
    .unwrap();
    c.allow_key(samples::key_id()).unwrap();
    let chunk = usize::from(split % 64) + 1;
    let mut closes = 0;
    let mut sticky: Option<Error> = None;
    for (i, piece) in rest.chunks(chunk).enumerate() {
        let was_closed = c.is_closed();
        let r = c.handle_input(piece, i as u64);
        if was_closed {
            assert!(r.is_err());
            assert!(c.is_closed());
        }
        if let (Some(s), Err(e)) = (&sticky, &r) {
            assert_eq!(s, e, "sticky error changed");
        }
        if c.is_closed() && sticky.is_none() {
            sticky = Some(r.clone().err().unwrap_or(Error::Closed));
        }
        while let Some(f) = c.poll_transmit() {
            if f.get(1) == Some(&8) {
                closes += 1;
            }
        }
        while let Some(ev) = c.poll_event() {
            // Answer requests so in-flight does not saturate.
            if let CloudEvent::Request { request, .. } = ev {
                let _ = c.send_request_error(request.request_id, ErrorCode::Busy, i as u64);
            }
        }
        assert!(closes <= 1);
        assert!(c.buffered() <= FRAME_HEADER_LEN + samples::limits().max_frame_len as usize);
    }
});
