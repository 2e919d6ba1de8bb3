//! HE evaluation-key decoder and expansion (what the cloud runs on device bytes): never a
//! panic; an accepted key re-encodes to the same bytes and expands.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tandem_he::{Context, EvaluationKey, PreparedEvaluationKey, DEFAULT_PARAMETERS};

fn ctx() -> &'static Context {
    static C: OnceLock<Context> = OnceLock::new();
    C.get_or_init(|| Context::new(DEFAULT_PARAMETERS))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = EvaluationKey::from_bytes(data, 2 << 20, &DEFAULT_PARAMETERS) {
        assert_eq!(key.to_bytes(), data, "re-encode differs");
        assert!(PreparedEvaluationKey::prepare(&key, ctx()).is_ok());
    }
    if !data.is_empty() {
        assert!(EvaluationKey::from_bytes(data, data.len() - 1, &DEFAULT_PARAMETERS).is_err());
    }
});
