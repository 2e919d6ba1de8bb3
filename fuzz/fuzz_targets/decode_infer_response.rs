//! InferResponse body decoder, under both body layouts (TDM-VER-3: version 1 without, version 2
//! with `cloud_eval_us`, TDM-MSG-14): accepted bodies are consumed exactly (TDM-FRAME-6) and
//! re-encode to the same bytes (TDM-MSG-1).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_protocol::{samples, Limits, Message, MessageType};

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::default(), samples::limits()] {
        for version in [1u16, 2] {
            let ty = MessageType::InferResponse;
            if let Ok(msg) = Message::decode_body_version(ty, data, &limits, version) {
                assert_eq!(msg.msg_type(), ty);
                assert_eq!(msg.wire_version(), version, "layout not the one decoded");
                assert_eq!(msg.encode_body().unwrap(), data, "re-encode differs");
                let mut longer = data.to_vec();
                longer.push(0);
                assert!(Message::decode_body_version(ty, &longer, &limits, version).is_err());
            }
        }
    }
});
