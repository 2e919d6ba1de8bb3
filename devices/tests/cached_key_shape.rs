//! The evaluation key cached in the state dir under parameter set 2 (composed strides): a
//! device upgraded from a build that cached a full key (every stride from 2, over
//! `MAX_PLAN_KEY_BYTES`) rebuilds it as the smaller key its plans accept, and a cached key of
//! the right shape is reused byte for byte.
#![allow(clippy::unwrap_used)]

use tandem_device::{state, HeState, LayerShape};
use tandem_he::{
    key_shape_for_plans, EvaluationKey, OutputMode, MAX_PLAN_KEY_BYTES,
    PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64 as P2,
};

#[test]
fn an_old_full_key_in_the_cache_is_rebuilt_as_the_smaller_key_and_then_reused() {
    let dir = tempfile::tempdir().unwrap();
    let shape = LayerShape {
        n_in: 4096,
        n_out: 64,
        bias_bound: 1000,
    };
    let he = HeState::load(P2, OutputMode::Packed, shape, Some(dir.path())).unwrap();
    let (first, max_chunk, bodies) = key_shape_for_plans(&he.plans);
    let key = EvaluationKey::from_bytes(&he.key_blob, he.key_blob.len(), &P2).unwrap();
    assert_eq!(key.first_level(), first);
    // The premise: a full key for this plan is over the budget, the plan's own is not.
    let full = he
        .client
        .evaluation_key_for(max_chunk, bodies)
        .unwrap()
        .to_bytes();
    if first == 1 || full.len() <= MAX_PLAN_KEY_BYTES {
        eprintln!("plan needs no smaller key: {:?}", he.plan);
        return;
    }
    assert!(he.key_blob.len() <= MAX_PLAN_KEY_BYTES);
    // A cache written by an older build: the full key, valid for this seed and chunk.
    let path = state::eval_key_path(dir.path(), P2.id, max_chunk);
    assert!(path.exists());
    std::fs::write(&path, &full).unwrap();
    let again = HeState::load(P2, OutputMode::Packed, shape, Some(dir.path())).unwrap();
    assert_ne!(again.key_blob, full, "the full key was reused");
    assert!(again.key_blob.len() <= MAX_PLAN_KEY_BYTES);
    let k = EvaluationKey::from_bytes(&again.key_blob, again.key_blob.len(), &P2).unwrap();
    assert_eq!(k.first_level(), first);
    assert_eq!(std::fs::read(&path).unwrap(), again.key_blob);
    // The rebuilt key is reused as is.
    let third = HeState::load(P2, OutputMode::Packed, shape, Some(dir.path())).unwrap();
    assert_eq!(third.key_blob, again.key_blob);
    // A smaller key the plans still accept (another model's, same chunk) is within budget:
    // reused as is, not rebuilt on every switch between models.
    let accepted = he.plan.key_first_level.min(max_chunk.trailing_zeros());
    eprintln!("key first level {first}, accepted {accepted}, chunk {max_chunk}");
    if first < accepted {
        let other = he
            .client
            .evaluation_key_from(accepted, max_chunk, bodies)
            .unwrap()
            .to_bytes();
        std::fs::write(&path, &other).unwrap();
        let fourth = HeState::load(P2, OutputMode::Packed, shape, Some(dir.path())).unwrap();
        assert_eq!(fourth.key_blob, other);
    }
}
