//! Untrusted bytes and mismatched keys give typed errors, never panics or wrong results.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::sync::Arc;
use tandem_he::*;

fn small_layer(mode: OutputMode) -> PreparedLayer {
    let f = fixture();
    let w = values(64 * 10, 5, -128, 127);
    PreparedLayer::prepare(
        f.ctx.clone(),
        mode,
        64,
        10,
        &w,
        &[3; 10],
        128,
        PlanOptions::default(),
    )
    .unwrap()
}

#[test]
fn ciphertext_under_another_key_is_refused() {
    let f = fixture();
    let layer = small_layer(OutputMode::Packed);
    let mut other = Client::new(f.ctx.clone());
    let ct = other.encrypt(layer.plan(), &[vec![1; 64]]).unwrap();
    // The packing key belongs to the fixture's client, the ciphertext to `other`.
    let e = layer
        .eval(&ct, Some(&f.prepared_key), EvalOptions::default())
        .unwrap_err();
    assert_eq!(e, HeError::KeyIdMismatch);
    // A result for one key is refused by a client holding another.
    let own = f
        .client
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .encrypt(layer.plan(), &[vec![1; 64]])
        .unwrap();
    let out = layer
        .eval(&own, Some(&f.prepared_key), EvalOptions::default())
        .unwrap();
    assert_eq!(
        other.decrypt(layer.plan(), &out).unwrap_err(),
        HeError::KeyIdMismatch
    );
    let bytes = out.to_bytes();
    assert_eq!(
        EncryptedOutput::from_bytes(&bytes, bytes.len(), layer.plan(), &other.key_id())
            .unwrap_err(),
        HeError::KeyIdMismatch
    );
}

#[test]
fn packed_mode_without_key_is_refused() {
    let f = fixture();
    let layer = small_layer(OutputMode::Packed);
    let ct = f
        .client
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .encrypt(layer.plan(), &[vec![1; 64]])
        .unwrap();
    assert!(matches!(
        layer.eval(&ct, None, EvalOptions::default()),
        Err(HeError::MissingEvaluationKey(_))
    ));
}

#[test]
fn out_of_range_inputs_and_wrong_shapes_are_refused() {
    let f = fixture();
    let layer = small_layer(OutputMode::NoKey);
    let mut c = f.client.lock().unwrap_or_else(|e| e.into_inner());
    assert!(matches!(
        c.encrypt(layer.plan(), &[vec![129; 64]]),
        Err(HeError::OutOfRange(_))
    ));
    assert!(matches!(
        c.encrypt(layer.plan(), &[vec![1; 63]]),
        Err(HeError::Shape(_))
    ));
    assert!(matches!(
        c.encrypt(layer.plan(), &[]),
        Err(HeError::Shape(_))
    ));
    assert!(matches!(
        PreparedLayer::prepare(
            f.ctx.clone(),
            OutputMode::NoKey,
            4,
            4,
            &[1; 15],
            &[0; 4],
            128,
            PlanOptions::default()
        ),
        Err(HeError::Shape(_))
    ));
}

/// Every strict prefix, every extension and every single-byte mutation of the header region,
/// plus sampled body mutations, decode to a typed error or (for body bits) a valid value.
fn hammer<T>(bytes: &[u8], decode: impl Fn(&[u8], usize) -> Result<T, HeError>) -> usize {
    let mut cases = 0;
    assert!(decode(bytes, bytes.len()).is_ok());
    // Limit checked first.
    assert!(matches!(
        decode(bytes, bytes.len() - 1),
        Err(HeError::TooLarge { .. })
    ));
    let step = (bytes.len() / 997).max(1);
    for cut in (0..bytes.len()).filter(|&c| c < 128 || c % step == 0) {
        assert!(
            decode(&bytes[..cut], usize::MAX).is_err(),
            "prefix {cut} accepted"
        );
        cases += 1;
    }
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert!(decode(&longer, usize::MAX).is_err());
    for i in 0..bytes.len().min(128) {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut m = bytes.to_vec();
            m[i] ^= flip;
            let _ = decode(&m, usize::MAX); // must not panic
            cases += 1;
        }
    }
    cases
}

#[test]
fn truncated_extended_and_mutated_blobs_never_panic() {
    let f = fixture();
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        let layer = small_layer(mode);
        let plan = *layer.plan();
        let mut c = f.client.lock().unwrap_or_else(|e| e.into_inner());
        let ct = c.encrypt(&plan, &[vec![7; 64], vec![-7; 64]]).unwrap();
        let bytes = ct.to_bytes();
        hammer(&bytes, |b, l| EncryptedInput::from_bytes(b, l, &plan));
        let key = (mode == OutputMode::Packed).then_some(&f.prepared_key);
        let out = layer
            .eval(&ct, key, EvalOptions::default())
            .unwrap()
            .to_bytes();
        let kid = c.key_id();
        hammer(&out, |b, l| EncryptedOutput::from_bytes(b, l, &plan, &kid));
    }
    let key_bytes = f.eval_key.to_bytes();
    assert!(
        key_bytes.len() <= 2 << 20,
        "evaluation key {} bytes",
        key_bytes.len()
    );
    hammer(&key_bytes, |b, l| {
        EvaluationKey::from_bytes(b, l, &DEFAULT_PARAMETERS)
    });
    let decoded =
        EvaluationKey::from_bytes(&key_bytes, key_bytes.len(), &DEFAULT_PARAMETERS).unwrap();
    assert_eq!(decoded, f.eval_key);
}

#[test]
fn decoding_a_valid_input_with_a_mismatched_plan_is_refused() {
    let f = fixture();
    let a = small_layer(OutputMode::NoKey);
    let w = values(128 * 10, 5, -128, 127);
    let b = PreparedLayer::prepare(
        Arc::clone(&f.ctx),
        OutputMode::NoKey,
        128,
        10,
        &w,
        &[0; 10],
        128,
        PlanOptions {
            chunk: Some(16),
            ..Default::default()
        },
    )
    .unwrap();
    let ct = f
        .client
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .encrypt(a.plan(), &[vec![1; 64]])
        .unwrap();
    let bytes = ct.to_bytes();
    assert!(EncryptedInput::from_bytes(&bytes, bytes.len(), b.plan()).is_err());
    assert!(b.eval(&ct, None, EvalOptions::default()).is_err());
}

#[test]
fn invalid_forced_chunks_are_refused_not_panicking() {
    let f = fixture();
    let w = values(16 * 4, 5, -128, 127);
    for chunk in [0usize, 3, 8192] {
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let r = PreparedLayer::prepare(
                f.ctx.clone(),
                mode,
                16,
                4,
                &w,
                &[0; 4],
                128,
                PlanOptions {
                    chunk: Some(chunk),
                    ..Default::default()
                },
            );
            assert!(matches!(r, Err(HeError::Shape(_))), "chunk {chunk}");
            let p = PreparedLayer::plan_public(
                DEFAULT_PARAMETERS,
                mode,
                16,
                4,
                128,
                127,
                100,
                PlanOptions {
                    chunk: Some(chunk),
                    ..Default::default()
                },
            );
            assert!(matches!(p, Err(HeError::Shape(_))), "chunk {chunk}");
        }
    }
}

/// TDM-HE-7: the output blob carries the mask width and the (narrower) body width; a blob whose
/// body width differs from the plan's is refused, even when its length is made to match, and
/// an output decoded at the plan's widths decrypts exactly.
#[test]
fn output_body_width_is_checked_against_the_plan() {
    let f = fixture();
    for mode in [OutputMode::NoKey, OutputMode::Packed] {
        let layer = small_layer(mode);
        let plan = *layer.plan();
        assert!(
            plan.body_bits < plan.download_bits,
            "body {} mask {}",
            plan.body_bits,
            plan.download_bits
        );
        let mut c = f.client.lock().unwrap_or_else(|e| e.into_inner());
        let ct = c.encrypt(&plan, &[vec![5; 64]]).unwrap();
        let key = (mode == OutputMode::Packed).then_some(&f.prepared_key);
        let out = layer.eval(&ct, key, EvalOptions::default()).unwrap();
        let bytes = out.to_bytes();
        let kid = c.key_id();
        // Byte 46 is the body width (he-formats.md, output batch).
        assert_eq!(u32::from(bytes[46]), plan.body_bits);
        let decoded = EncryptedOutput::from_bytes(&bytes, bytes.len(), &plan, &kid).unwrap();
        assert_eq!(decoded, out);
        for wrong in [plan.body_bits - 1, plan.body_bits + 1, plan.download_bits] {
            let mut other = out.clone();
            other.body_bits = wrong;
            let m = other.to_bytes();
            assert!(
                matches!(
                    EncryptedOutput::from_bytes(&m, m.len(), &plan, &kid),
                    Err(HeError::Malformed { .. })
                ),
                "body width {wrong} accepted"
            );
            assert!(c.decrypt(&plan, &other).is_err());
        }
    }
}

/// Parameter set 2 sends key bodies as u32 residues: a residue at or above its prime (which
/// no honest key holds) is a typed refusal, and the same bytes are no set-1 key either.
#[test]
fn set2_key_residue_not_below_its_prime_is_refused() {
    let ctx = Arc::new(Context::new(PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64));
    let client = Client::from_seed(ctx.clone(), 11);
    let key = client.evaluation_key(4).unwrap();
    let bytes = key.to_bytes();
    let p = &PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64;
    let decoded = EvaluationKey::from_bytes(&bytes, bytes.len(), p).unwrap();
    assert_eq!(decoded, key);
    assert!(PreparedEvaluationKey::prepare(&decoded, &ctx).is_ok());
    // The last 4 bytes are a residue modulo p_2 (< 2^30): 0xFFFF_FFFF is above every prime.
    let mut bad = bytes.clone();
    let at = bad.len() - 4;
    bad[at..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        EvaluationKey::from_bytes(&bad, bad.len(), p),
        Err(HeError::Malformed { .. })
    ));
    // 2^30 is above every one of the three primes too (each is below 2^30).
    bad[at..].copy_from_slice(&(1u32 << 30).to_le_bytes());
    assert!(EvaluationKey::from_bytes(&bad, bad.len(), p).is_err());
    assert!(EvaluationKey::from_bytes(
        &bytes,
        bytes.len(),
        &PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64
    )
    .is_err());
}
