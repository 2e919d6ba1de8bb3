//! Shared fixtures: one context and one client (with a full packing key) for all tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex, OnceLock};
use tandem_he::*;

/// Shared engine state for all tests of one binary.
pub struct Fixture {
    /// The parameter-set context.
    pub ctx: Arc<Context>,
    /// A client with a fixed-seed key.
    pub client: Mutex<Client>,
    /// Its full packing key.
    pub eval_key: EvaluationKey,
    /// The packing key as the server holds it.
    pub prepared_key: PreparedEvaluationKey,
}

/// The fixture, built once per test binary (the default parameter set, one-body key).
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| fixture_of(DEFAULT_PARAMETERS, 1))
}

/// A fixture under `params` with a full packing key for `bodies` secrets per mask.
pub fn fixture_of(params: ParameterSet, bodies: usize) -> Fixture {
    let ctx = Arc::new(Context::new(params));
    let client = Client::from_seed(ctx.clone(), FIXTURE_SEED);
    let eval_key = client.evaluation_key_for(params.poly_size, bodies).unwrap();
    let prepared_key = PreparedEvaluationKey::prepare(&eval_key, &ctx).unwrap();
    Fixture {
        ctx,
        client: Mutex::new(client),
        eval_key,
        prepared_key,
    }
}

const FIXTURE_SEED: u128 = 0x7a6e_d3a0_0000_0000_0000_0000_0000_0001;

/// Plain integer reference: y = W·x + b.
pub fn reference(w: &[i64], b: &[i64], x: &[i64], n_in: usize, n_out: usize) -> Vec<i64> {
    (0..n_out)
        .map(|r| {
            w[r * n_in..(r + 1) * n_in]
                .iter()
                .zip(x)
                .map(|(a, c)| a * c)
                .sum::<i64>()
                + b[r]
        })
        .collect()
}

/// Deterministic pseudo-random values in [lo, hi].
pub fn values(n: usize, seed: u64, lo: i64, hi: i64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (s % (hi - lo + 1) as u64) as i64
        })
        .collect()
}

/// Encrypts, evaluates (through the wire format both ways) and decrypts.
pub fn run(layer: &PreparedLayer, xs: &[Vec<i64>]) -> Vec<Vec<i64>> {
    run_in(fixture(), layer, xs)
}

/// [`run`] with the client and key of fixture `f`.
pub fn run_in(f: &Fixture, layer: &PreparedLayer, xs: &[Vec<i64>]) -> Vec<Vec<i64>> {
    let plan = *layer.plan();
    let mut client = f.client.lock().unwrap_or_else(|e| e.into_inner());
    let ct = client.encrypt(&plan, xs).unwrap();
    let bytes = ct.to_bytes();
    assert_eq!(bytes.len(), plan.upload_bytes(xs.len()));
    let ct = EncryptedInput::from_bytes(&bytes, bytes.len(), &plan).unwrap();
    let key = (plan.mode == OutputMode::Packed).then_some(&f.prepared_key);
    let out = layer.eval(&ct, key, EvalOptions::default()).unwrap();
    let bytes = out.to_bytes();
    assert_eq!(bytes.len(), plan.download_bytes(xs.len()), "{plan:?}");
    let out = EncryptedOutput::from_bytes(&bytes, bytes.len(), &plan, &client.key_id()).unwrap();
    client.decrypt(&plan, &out).unwrap()
}
