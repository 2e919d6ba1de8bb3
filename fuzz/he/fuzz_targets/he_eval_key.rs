//! HE evaluation-key decoder and expansion (what the cloud runs on device bytes), under every
//! parameter set (set 1: u64 bodies; set 2: u32 residues checked below their primes): never a
//! panic; an accepted key re-encodes to the same bytes and expands.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tandem_he::{Context, EvaluationKey, PreparedEvaluationKey, ALL_PARAMETER_SETS};

fn contexts() -> &'static Vec<Context> {
    static C: OnceLock<Vec<Context>> = OnceLock::new();
    C.get_or_init(|| ALL_PARAMETER_SETS.iter().map(|&p| Context::new(p)).collect())
}

fuzz_target!(|data: &[u8]| {
    for (params, ctx) in ALL_PARAMETER_SETS.iter().zip(contexts()) {
        if let Ok(key) = EvaluationKey::from_bytes(data, 2 << 20, params) {
            assert_eq!(key.to_bytes(), data, "re-encode differs");
            assert!(PreparedEvaluationKey::prepare(&key, ctx).is_ok());
        }
        if !data.is_empty() {
            assert!(EvaluationKey::from_bytes(data, data.len() - 1, params).is_err());
        }
    }
});
