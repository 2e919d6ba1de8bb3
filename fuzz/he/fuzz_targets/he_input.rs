//! HE input-batch decoder (what the cloud runs on device bytes): limit first, then header and
//! counts, never a panic; an accepted blob re-encodes to the same bytes and evaluates.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tandem_he::{
    Context, EncryptedInput, EvalOptions, LayerPlan, OutputMode, PlanOptions, PreparedLayer,
    DEFAULT_PARAMETERS,
};

struct State {
    layers: Vec<PreparedLayer>,
}

fn state() -> &'static State {
    static S: OnceLock<State> = OnceLock::new();
    S.get_or_init(|| {
        let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
        let (n_in, n_out) = (40, 12);
        let w: Vec<i64> = (0..n_in * n_out).map(|i| (i as i64 % 255) - 127).collect();
        let b = vec![5; n_out];
        let mut layers = Vec::new();
        // v1 layout (one row per polynomial), the batch layout (several rows) and shared
        // masks (chunk 2048: 2 rows per polynomial, 2 bodies per mask; blob kind 4).
        for (chunk, batch, max_bodies) in [(16, None, 1), (16, Some(4), 1), (2048, Some(4), 2)] {
            let opts = PlanOptions {
                chunk: Some(chunk),
                batch,
                max_bodies,
            };
            if let Ok(l) = PreparedLayer::prepare(
                ctx.clone(),
                OutputMode::NoKey,
                n_in,
                n_out,
                &w,
                &b,
                128,
                opts,
            ) {
                layers.push(l);
            }
        }
        State { layers }
    })
}

fuzz_target!(|data: &[u8]| {
    for layer in &state().layers {
        let plan: &LayerPlan = layer.plan();
        if let Ok(ct) = EncryptedInput::from_bytes(data, 1 << 20, plan) {
            assert_eq!(ct.to_bytes(), data, "re-encode differs");
            assert!(layer.eval(&ct, None, EvalOptions::default()).is_ok());
        }
        // The limit is checked before anything else.
        if !data.is_empty() {
            assert!(EncryptedInput::from_bytes(data, data.len() - 1, plan).is_err());
        }
    }
});
