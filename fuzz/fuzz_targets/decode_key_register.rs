//! KeyRegister body decoder: accepted bodies are consumed exactly (TDM-FRAME-6) and
//! re-encode to the same bytes (TDM-MSG-1).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_protocol::{samples, Limits, Message, MessageType};

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::default(), samples::limits()] {
        if let Ok(msg) = Message::decode_body(MessageType::KeyRegister, data, &limits) {
            assert_eq!(msg.msg_type(), MessageType::KeyRegister);
            assert_eq!(msg.encode_body().unwrap(), data, "re-encode differs");
            let mut longer = data.to_vec();
            longer.push(0);
            assert!(Message::decode_body(MessageType::KeyRegister, &longer, &limits).is_err());
        }
    }
});
