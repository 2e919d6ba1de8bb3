//! Hostile and careless uses of keys that start at a stride level l₀ > 1 (composed strides,
//! `specs/parameters.md` § "Smaller keys"): every stride of a small-chunk plan composed from
//! the key's one automorphism, multi-body keys from l₀ > 1, and blobs whose automorphism list
//! is not what the format allows (typed errors, never a panic).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::sync::Arc;
use tandem_he::*;

const P2: ParameterSet = PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64;

fn ctx2() -> Arc<Context> {
    static C: std::sync::OnceLock<Arc<Context>> = std::sync::OnceLock::new();
    C.get_or_init(|| Arc::new(Context::new(P2))).clone()
}

fn layer(
    chunk: Option<usize>,
    rows: usize,
    bodies: usize,
    n_in: usize,
    n_out: usize,
    seed: u64,
) -> (PreparedLayer, Vec<i64>, Vec<i64>) {
    let w = values(n_in * n_out, seed, -127, 127);
    let bias = values(n_out, seed + 1, -1000, 1000);
    let opts = PlanOptions {
        chunk,
        batch: Some(rows),
        max_bodies: bodies,
    };
    let l = PreparedLayer::prepare(
        ctx2(),
        OutputMode::Packed,
        n_in,
        n_out,
        &w,
        &bias,
        128,
        opts,
    )
    .unwrap();
    (l, w, bias)
}

fn check(l: &PreparedLayer, w: &[i64], bias: &[i64], client: &mut Client, key: &EvaluationKey) {
    let plan = *l.plan();
    let rows = plan.batch_rows.max(1) * plan.bodies();
    let xs: Vec<Vec<i64>> = (0..rows)
        .map(|k| values(plan.n_in, 90 + k as u64, -128, 127))
        .collect();
    let blob = key.to_bytes();
    let back = EvaluationKey::from_bytes(&blob, blob.len(), &ctx2().params()).unwrap();
    assert_eq!(&back, key);
    let prepared = PreparedEvaluationKey::prepare(&back, &ctx2()).unwrap();
    assert!(prepared.covers(&plan), "{plan:?} {key:?}");
    let ct = client.encrypt(&plan, &xs).unwrap();
    let out = l
        .eval(&ct, Some(&prepared), EvalOptions::default())
        .unwrap();
    let want: Vec<Vec<i64>> = xs
        .iter()
        .map(|x| reference(w, bias, x, plan.n_in, plan.n_out))
        .collect();
    assert_eq!(
        client.decrypt(&plan, &out).unwrap(),
        want,
        "{plan:?} {key:?}"
    );
}

/// A key holding only stride 2^6's automorphism (count 1, l₀ = 6 = the largest allowed) on a
/// plan whose chunk is smaller than 2^6: every stride of the packing tree and trace is
/// composed from it. Exact.
#[test]
fn a_key_above_every_stride_of_a_small_chunk_plan_is_exact() {
    let (l, w, bias) = layer(Some(16), 4, 1, 64, 48, 301);
    let plan = *l.plan();
    assert!(plan.chunk < 64, "{plan:?}");
    if plan.key_first_level < 6 {
        eprintln!("plan accepts l0 <= {} only: {plan:?}", plan.key_first_level);
        return;
    }
    let mut client = Client::from_seed(ctx2(), 0x5eed_1001);
    let key = client.evaluation_key_from(6, 64, 1).unwrap();
    assert_eq!(key.automorphisms().len(), 1);
    assert_eq!(key.first_level(), 6);
    check(&l, &w, &bias, &mut client, &key);
}

/// A multi-body key (kind 6) starting at l₀ > 1 is exact on a shared-mask plan.
#[test]
fn a_multibody_key_from_a_larger_stride_is_exact() {
    let (l, w, bias) = layer(None, 8, 1, 128, 96, 311);
    // The same layout with two bodies per mask (a shared-mask plan, kind-6 key).
    let plan = LayerPlan {
        bodies: 2,
        ..*l.plan()
    };
    let l = PreparedLayer::prepare_with_plan(ctx2(), plan, &w, &bias).unwrap();
    let plan = *l.plan();
    assert!(plan.bodies() == 2 && plan.key_first_level > 1, "{plan:?}");
    let mut client = Client::from_seed(ctx2(), 0x5eed_1002);
    let first = plan.key_first_level.min(plan.chunk.trailing_zeros());
    let key = client
        .evaluation_key_from(first, plan.chunk, plan.bodies())
        .unwrap();
    assert!(key.first_level() > 1 && key.bodies() >= 2);
    check(&l, &w, &bias, &mut client, &key);
}

/// Offsets in a key blob: header then mask seed, gadget (2 bytes), count, automorphisms.
fn count_offset(blob: &[u8], params: &ParameterSet, count: usize, bodies: usize) -> usize {
    // The automorphism list ends where the bodies begin.
    let bodies_len = count * params.ks_levels as usize * params.poly_size * 12 * bodies;
    blob.len() - bodies_len - 2 * count - 1
}

/// Hostile automorphism lists: a first automorphism that is no stride's, one of stride 1,
/// a first level above 6, l₀ with a count past log2 N, a gap: refused with a typed error.
#[test]
fn hostile_automorphism_lists_are_refused() {
    let client = Client::from_seed(ctx2(), 0x5eed_1003);
    let p = ctx2().params();
    let n = p.poly_size;
    let key = client.evaluation_key_from(6, 64, 1).unwrap();
    let blob = key.to_bytes();
    let at = count_offset(&blob, &p, 1, 1);
    assert_eq!(blob[at], 1);
    let g6 = u16::from_le_bytes([blob[at + 1], blob[at + 2]]) as usize;
    assert_eq!(g6, 2 * n / 64 + 1);
    let with_first = |g: usize| {
        let mut b = blob.clone();
        b[at + 1..at + 3].copy_from_slice(&(g as u16).to_le_bytes());
        b
    };
    for g in [0, 1, 2, 3, 5, 2 * n / 128 + 1, 2 * n + 1, g6 + 2, 65535] {
        let b = with_first(g);
        assert!(
            matches!(
                EvaluationKey::from_bytes(&b, b.len(), &p),
                Err(HeError::Malformed { .. })
            ),
            "first automorphism {g} accepted"
        );
    }
    // A count that runs past log2 N from l0 = 6: 8 automorphisms from 2^6 reach 2^13 > N.
    let big = client.evaluation_key_from(5, n, 1).unwrap();
    let bb = big.to_bytes();
    let at = count_offset(&bb, &p, 8, 1);
    assert_eq!(bb[at], 8);
    let mut b = bb.clone();
    for k in 0..8 {
        let g = 2 * n / (64usize << k).min(2 * n) + 1;
        b[at + 1 + 2 * k..at + 3 + 2 * k].copy_from_slice(&(g as u16).to_le_bytes());
    }
    assert!(matches!(
        EvaluationKey::from_bytes(&b, b.len(), &p),
        Err(HeError::Malformed { .. })
    ));
    // A gap (2^5, 2^7, ...) is refused.
    let mut b = bb.clone();
    b[at + 3..at + 5].copy_from_slice(&((2 * n / 128 + 1) as u16).to_le_bytes());
    assert!(matches!(
        EvaluationKey::from_bytes(&b, b.len(), &p),
        Err(HeError::Malformed { .. })
    ));
}

/// A key whose first level is small but whose largest chunk is below the plan's is not
/// accepted by `covers` and the evaluation refuses it with a typed error.
#[test]
fn a_key_too_small_for_the_chunk_is_refused_not_panicking() {
    let (l, _, _) = layer(Some(256), 4, 1, 256, 32, 321);
    let plan = *l.plan();
    let mut client = Client::from_seed(ctx2(), 0x5eed_1004);
    let key = client.evaluation_key_from(1, plan.chunk / 2, 1).unwrap();
    let prepared = PreparedEvaluationKey::prepare(&key, &ctx2()).unwrap();
    assert!(!prepared.covers(&plan));
    let xs = vec![values(plan.n_in, 5, -128, 127)];
    let ct = client.encrypt(&plan, &xs).unwrap();
    assert!(matches!(
        l.eval(&ct, Some(&prepared), EvalOptions::default()),
        Err(HeError::MissingEvaluationKey(_))
    ));
}
