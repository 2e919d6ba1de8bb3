//! HE output decoder (what the device runs on cloud bytes): never a panic; an accepted blob
//! re-encodes to the same bytes and decrypts without error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex, OnceLock};
use tandem_he::{
    Client, Context, EncryptedOutput, LayerPlan, OutputMode, PlanOptions, PreparedLayer,
    DEFAULT_PARAMETERS,
};

struct State {
    client: Mutex<Client>,
    plans: Vec<LayerPlan>,
}

fn state() -> &'static State {
    static S: OnceLock<State> = OnceLock::new();
    S.get_or_init(|| {
        let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
        let mut plans = Vec::new();
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            // The last one shares masks (2 bodies per mask; blob kind 5).
            for (chunk, batch, max_bodies) in [(16, None, 1), (16, Some(3), 1), (2048, Some(4), 2)]
            {
                let opts = PlanOptions {
                    chunk: Some(chunk),
                    batch,
                    max_bodies,
                };
                if let Ok(p) = PreparedLayer::plan_public(
                    DEFAULT_PARAMETERS,
                    mode,
                    40,
                    12,
                    128,
                    127,
                    100,
                    opts,
                ) {
                    plans.push(p);
                }
            }
        }
        // A fixed key id: the fuzzer can find it in the corpus seeds.
        State {
            client: Mutex::new(Client::from_seed(ctx, 1)),
            plans,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = state();
    let client = s.client.lock().unwrap_or_else(|e| e.into_inner());
    for plan in &s.plans {
        if let Ok(out) = EncryptedOutput::from_bytes(data, 1 << 20, plan, &client.key_id()) {
            assert_eq!(out.to_bytes(), data, "re-encode differs");
            assert!(client.decrypt(plan, &out).is_ok());
        }
    }
});
