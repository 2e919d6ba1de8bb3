//! Frame decoder: consumed + rest = input; accepted frames re-encode to the
//! exact bytes consumed (TDM-MSG-1, TDM-FRAME-1); every strict prefix of an
//! accepted frame is rejected (TDM-FRAME-7).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_protocol::{decode_frame, samples, Limits};

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::default(), samples::limits()] {
        if let Ok((msg, used)) = decode_frame(data, &limits) {
            assert!(used <= data.len());
            let (head, rest) = data.split_at(used);
            assert_eq!(head.len() + rest.len(), data.len());
            assert_eq!(msg.encode().unwrap(), head, "re-encode differs");
            assert!(decode_frame(&head[..used - 1], &limits).is_err());
        }
    }
});
