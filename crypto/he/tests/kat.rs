//! Known-answer vectors for the HE blobs of `specs/he-formats.md`, with fixed seeds.
//!
//! The blobs are built here from the text of the spec (secret from a fixed seed, masks from
//! the AES-CTR stream of TDM-HE-4, fixed-seed noise, explicit rounding), then the engine must
//! accept them and compute with them exactly, and its outputs are decoded again by the spec's
//! slot rule. The `multibody` section does the same for the shared-mask kinds 4, 5, 6
//! (secrets 1.. derived from the seed as the spec says, r = 2 and 4, b₁ = 2, full and short
//! blocks, a kind-6 key with 2 bodies that a packed r = 2 layer evaluates with). The `params2`
//! section pins parameter set 2 (RNS modulus Q = p₀·p₁·p₂, he-formats.md § Parameter set 2):
//! kind-3 and kind-6 keys as residues modulo the three primes, built with this file's own
//! mod-p arithmetic, and packed layers (r = 1 and 2) that decrypt exactly through them.
//! The result is written to `specs/vectors/he/kat.json`; this test fails if the
//! committed file differs. Regenerate after an intended format change with
//! `TANDEM_WRITE_HE_KAT=1 cargo test --release -p tandem-he --test kat`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_range_loop
)]

use std::fmt::Write as _;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tandem_he::{
    Client, Context, EncryptedInput, EncryptedOutput, EvalOptions, EvaluationKey, LayerPlan,
    OutputMode, ParameterSet, PlanOptions, PreparedEvaluationKey, PreparedLayer,
    PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64, PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64,
};
use tfhe::core_crypto::commons::math::random::{RandomGenerator, Seed};
use tfhe::core_crypto::prelude::{
    allocate_and_generate_new_binary_glwe_secret_key, DefaultRandomGenerator, GlweDimension,
    PolynomialSize, SecretRandomGenerator, TUniform,
};

const SK_SEED: u128 = 0x7A4D_4845_4B41_5400_0000_0000_0000_0001;
const MASK_SEED: u128 = 0x0011_2233_4455_6677_8899_AABB_CCDD_EEFF;
const KEY_MASK_SEED: u128 = 0x0F1E_2D3C_4B5A_6978_8796_A5B4_C3D2_E1F0;
const NOISE_SEED: u128 = 42;
/// Shared-mask (kinds 4, 5, 6) vectors: their own mask, key-mask and noise seeds, so the
/// single-secret entries above stay byte-identical.
const MB_MASK_SEED: u128 = 0x4D42_4D41_534B_0000_0000_0000_0000_0004;
const MB_KEY_MASK_SEED: u128 = 0x4D42_4B45_5900_0000_0000_0000_0000_0006;
const MB_NOISE_SEED: u128 = 43;
/// `tandem_he::limits::MAX_BODIES`: secrets 0 .. 8 of a seed.
const MAX_BODIES: usize = 8;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Negacyclic product `a·s` modulo (X^N + 1, 2^64) for a binary `s` (reference, no NTT).
fn mul_binary(a: &[u64], s: &[u64]) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, _) in s.iter().enumerate().filter(|(_, &c)| c == 1) {
        for (t, &v) in a.iter().enumerate() {
            let k = t + i;
            if k < n {
                out[k] = out[k].wrapping_add(v);
            } else {
                out[k - n] = out[k - n].wrapping_sub(v);
            }
        }
    }
    out
}

fn round_bits(v: u64, b: u32) -> u64 {
    if b >= 64 {
        return v;
    }
    let sh = 64 - b;
    ((v >> sh).wrapping_add((v >> (sh - 1)) & 1)) & ((1u64 << b) - 1)
}

fn lift(v: u64, b: u32) -> u64 {
    if b >= 64 {
        v
    } else {
        v << (64 - b)
    }
}

/// LSB-first b-bit stream reader (he-formats.md, notation).
struct Bits<'a> {
    bytes: &'a [u8],
    bit: usize,
}

impl Bits<'_> {
    fn get(&mut self, b: u32) -> u64 {
        let mut v = 0u64;
        for k in 0..b as usize {
            let pos = self.bit + k;
            let bit = (self.bytes[pos / 8] >> (pos % 8)) & 1;
            v |= u64::from(bit) << k;
        }
        self.bit += b as usize;
        v
    }
}

/// The secret of `SK_SEED` the way the device derives it (tfhe's secret generator).
fn secret(n: usize) -> Vec<u64> {
    let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(SK_SEED));
    let key = allocate_and_generate_new_binary_glwe_secret_key::<u64, _>(
        GlweDimension(1),
        PolynomialSize(n),
        &mut gen,
    );
    key.as_ref().to_vec()
}

/// TDM-HE-2.
fn he_key_id(s: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tandem-he key id v1");
    h.update(1u16.to_le_bytes());
    for &c in s {
        h.update([c as u8]);
    }
    h.finalize().into()
}

/// Output slot of output `j` (he-formats.md, output batch): `(ciphertext, coefficient)`.
fn slot(plan: &LayerPlan, j: usize) -> (usize, usize) {
    let n = plan.params.poly_size;
    let r_rows = n / (plan.chunk * plan.batch_rows.max(1));
    let blocks = plan.n_out.div_ceil(r_rows);
    let (beta, r) = (j / r_rows, j % r_rows);
    match plan.mode {
        OutputMode::NoKey => (beta, r * plan.chunk),
        OutputMode::Packed => {
            let g = blocks.min(plan.chunk);
            let stride = plan.chunk / g.next_power_of_two();
            (beta / g, r * plan.chunk + (beta % g) * stride)
        }
    }
}

/// The kind-2 output header after the key id (he-formats.md): batch rows, ciphertexts k, mask
/// bits b, body bits b' and n_out (checked against `plan`).
fn output_header(blob: &[u8], plan: &LayerPlan) -> (usize, usize, u32, u32, usize) {
    let batch = u16::from_le_bytes([blob[41], blob[42]]) as usize;
    let k = u16::from_le_bytes([blob[43], blob[44]]) as usize;
    let (b, bb) = (u32::from(blob[45]), u32::from(blob[46]));
    let n_out = u32::from_le_bytes(blob[47..51].try_into().unwrap()) as usize;
    assert_eq!(n_out, plan.n_out);
    (batch, k, b, bb, n_out)
}

/// Outputs per ciphertext with `rows` rows per polynomial: `rows` (no key) or `rows` times the
/// packed slots per row (he-formats.md).
fn outputs_per_ciphertext(plan: &LayerPlan, rows: usize) -> usize {
    match plan.mode {
        OutputMode::NoKey => rows,
        OutputMode::Packed => rows * plan.n_out.div_ceil(rows).min(plan.chunk),
    }
}

/// Decodes an output blob by the text of he-formats.md alone and decrypts it with `s`.
fn spec_decrypt_output(blob: &[u8], plan: &LayerPlan, s: &[u64]) -> Vec<Vec<i64>> {
    let n = plan.params.poly_size;
    assert_eq!(&blob[..4], b"TDHE");
    assert_eq!((blob[4], blob[5]), (1, 2));
    let (batch, k, b, bb, n_out) = output_header(blob, plan);
    let per = outputs_per_ciphertext(plan, n / plan.chunk);
    let mut bits = Bits {
        bytes: &blob[51..],
        bit: 0,
    };
    let d = plan.delta_out_log2;
    let mut rows = Vec::new();
    for _ in 0..batch {
        let mut y = vec![0i64; n_out];
        for ct in 0..k {
            let a: Vec<u64> = (0..n).map(|_| lift(bits.get(b), b)).collect();
            let a_s = mul_binary(&a, s);
            for j in ct * per..((ct + 1) * per).min(n_out) {
                let (c, pos) = slot(plan, j);
                assert_eq!(c, ct);
                let phase = lift(bits.get(bb), bb).wrapping_sub(a_s[pos]);
                y[j] = (phase.wrapping_add(1u64 << (d - 1)) as i64) >> d;
            }
        }
        rows.push(y);
    }
    assert_eq!(bits.bit.div_ceil(8), blob.len() - 51, "exact length");
    rows
}

fn u64_list(v: &[u64]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("\"{x:016x}\"")).collect();
    format!("[{}]", items.join(", "))
}

fn i64_list(v: &[i64]) -> String {
    let items: Vec<String> = v.iter().map(i64::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn i64_rows(v: &[Vec<i64>]) -> String {
    let rows: Vec<String> = v.iter().map(|r| i64_list(r)).collect();
    format!("[{}]", rows.join(", "))
}

struct Case {
    id: &'static str,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    chunk: Option<usize>,
    x: Vec<Vec<i64>>,
}

#[test]
fn he_known_answer_vectors() {
    let params = PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64;
    let n = params.poly_size;
    let ctx = Arc::new(Context::new(params));
    let s = secret(n);
    let client = Client::from_seed(ctx.clone(), SK_SEED);
    // TDM-HE-2: the key id of the derived secret is the engine's key id.
    let key_id = he_key_id(&s);
    assert_eq!(key_id, client.key_id(), "secret derivation differs");
    let mut s_bits = vec![0u8; n / 8];
    for (i, &c) in s.iter().enumerate() {
        s_bits[i / 8] |= (c as u8) << (i % 8);
    }
    let mut masks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MASK_SEED));
    let mut first = vec![0u64; 4];
    masks.fill_slice_with_random_uniform(&mut first);
    let mut noise = RandomGenerator::<DefaultRandomGenerator>::new(Seed(NOISE_SEED));

    // Evaluation key for chunk 2 (A = 1), built from TDM-HE-8's text.
    let (base_log, levels) = (params.ks_base_log, params.ks_levels);
    let g = 2 * n / 2 + 1;
    let mut kblob = Vec::new();
    kblob.extend_from_slice(b"TDHE");
    kblob.extend_from_slice(&[1, 3]);
    kblob.extend_from_slice(&params.id.to_le_bytes());
    kblob.extend_from_slice(&key_id);
    kblob.extend_from_slice(&KEY_MASK_SEED.to_le_bytes());
    kblob.extend_from_slice(&[base_log as u8, levels as u8, 1]);
    kblob.extend_from_slice(&(g as u16).to_le_bytes());
    let mut kmasks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(KEY_MASK_SEED));
    let mut tau = vec![0u64; n];
    for (i, &c) in s.iter().enumerate() {
        let e = (i * g) % (2 * n);
        if e < n {
            tau[e] = tau[e].wrapping_add(c);
        } else {
            tau[e - n] = tau[e - n].wrapping_sub(c);
        }
    }
    for j in 0..levels {
        let mut a = vec![0u64; n];
        kmasks.fill_slice_with_random_uniform(&mut a);
        let mut e = vec![0u64; n];
        noise.fill_slice_with_random_from_distribution(&mut e, TUniform::<u64>::new(4));
        let gadget = 1u64 << (64 - (j + 1) * base_log);
        let a_s = mul_binary(&a, &s);
        for i in 0..n {
            let body = a_s[i]
                .wrapping_add(e[i])
                .wrapping_add(tau[i].wrapping_mul(gadget));
            kblob.extend_from_slice(&body.to_le_bytes());
        }
    }
    assert_eq!(kblob.len(), 59 + 2 + 8 * levels as usize * n);
    let ek = EvaluationKey::from_bytes(&kblob, kblob.len(), &params).expect("engine decodes key");
    let pek = PreparedEvaluationKey::prepare(&ek, &ctx).expect("engine prepares key");

    let cases = [
        Case {
            id: "he/nokey_6x3_batch2",
            mode: OutputMode::NoKey,
            n_in: 6,
            n_out: 3,
            chunk: None,
            x: vec![vec![1, -2, 3, -4, 127, -128], vec![0, 5, -7, 100, -100, 9]],
        },
        Case {
            id: "he/packed_4x3_chunk2",
            mode: OutputMode::Packed,
            n_in: 4,
            n_out: 3,
            chunk: Some(2),
            x: vec![vec![7, -8, 9, -10]],
        },
    ];
    let mut json = String::from("{\n  \"kind\": \"he-kat\",\n");
    let _ = writeln!(
        json,
        "  \"params\": {{\"id\": {}, \"poly_size\": {n}, \"ks_base_log\": {base_log}, \"ks_levels\": {levels}}},",
        params.id
    );
    let _ = writeln!(json, "  \"secret_key_seed\": \"{SK_SEED:032x}\",");
    let _ = writeln!(json, "  \"secret_key_bits\": \"{}\",", hex(&s_bits));
    let _ = writeln!(json, "  \"he_key_id\": \"{}\",", hex(&key_id));
    let _ = writeln!(
        json,
        "  \"mask_stream\": {{\"seed\": \"{}\", \"first_values\": {}}},",
        hex(&MASK_SEED.to_le_bytes()),
        u64_list(&first)
    );
    let _ = writeln!(
        json,
        "  \"evaluation_key\": {{\"id\": \"he/eval_key_a1\", \"blob_sha256\": \"{}\", \"blob\": \"{}\"}},",
        hex(&Sha256::digest(&kblob)),
        hex(&kblob)
    );
    json.push_str("  \"vectors\": [\n");
    let mut masks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MASK_SEED));
    for (ci, case) in cases.iter().enumerate() {
        let (weights, bias, layer) = kat_layer(
            &ctx,
            case.mode,
            case.n_in,
            case.n_out,
            PlanOptions {
                chunk: case.chunk,
                ..PlanOptions::default()
            },
        );
        let plan = *layer.plan();
        // The input blob, from the text: plaintexts, masks from the stream, noise, rounding.
        let chunks = case.n_in.div_ceil(plan.chunk);
        let mut bodies = Vec::new();
        for x in &case.x {
            for c in 0..chunks {
                let mut m = vec![0u64; n];
                for (i, &v) in x.iter().skip(c * plan.chunk).take(plan.chunk).enumerate() {
                    m[i] = (v as u64).wrapping_shl(plan.delta_in_log2);
                }
                let mut a = vec![0u64; n];
                masks.fill_slice_with_random_uniform(&mut a);
                let mut e = vec![0u64; n];
                noise.fill_slice_with_random_from_distribution(&mut e, TUniform::<u64>::new(4));
                let a_s = mul_binary(&a, &s);
                bodies.push(
                    (0..n)
                        .map(|i| {
                            round_bits(
                                a_s[i].wrapping_add(m[i]).wrapping_add(e[i]),
                                plan.upload_bits,
                            )
                        })
                        .collect::<Vec<u64>>(),
                );
            }
        }
        // Every case restarts the mask stream at the same seed, as a blob does.
        masks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MASK_SEED));
        let input = EncryptedInput {
            params_id: params.id,
            key_id,
            mask_seed: MASK_SEED,
            batch: case.x.len(),
            secrets: 1,
            chunks,
            bits: plan.upload_bits,
            bodies,
        };
        let in_blob = input.to_bytes();
        let decoded = EncryptedInput::from_bytes(&in_blob, in_blob.len(), &plan).expect("decode");
        assert_eq!(decoded, input);
        let key = (case.mode == OutputMode::Packed).then_some(&pek);
        let out = layer
            .eval(&decoded, key, EvalOptions::default())
            .expect("eval");
        let out_blob = out.to_bytes();
        let want = affine(&weights, &bias, &case.x, case.n_in, case.n_out);
        // The engine decrypts its own output exactly, and so does the spec's slot rule.
        assert_decrypts_to(
            case.id,
            client.decrypt(&plan, &out).expect("decrypt"),
            || spec_decrypt_output(&out_blob, &plan, &s),
            &want,
        );
        let _ = write!(
            json,
            "    {{\"id\": \"{}\", \"plan\": {{\"mode\": \"{}\", \"n_in\": {}, \"n_out\": {}, \"chunk\": {}, \"delta_in_log2\": {}, \"delta_out_log2\": {}, \"upload_bits\": {}, \"download_bits\": {}, \"body_bits\": {}}},\n     \"weights\": {}, \"bias\": {}, \"x\": {}, \"y\": {},\n     \"input_blob\": \"{}\",\n     \"output_blob\": \"{}\"}}{}\n",
            case.id,
            case.mode.name(),
            plan.n_in,
            plan.n_out,
            plan.chunk,
            plan.delta_in_log2,
            plan.delta_out_log2,
            plan.upload_bits,
            plan.download_bits,
            plan.body_bits,
            i64_list(&weights),
            i64_list(&bias),
            i64_rows(&case.x),
            i64_rows(&want),
            hex(&in_blob),
            hex(&out_blob),
            if ci + 1 < cases.len() { "," } else { "" }
        );
    }
    json.push_str("  ],\n");
    multibody_section(&ctx, &client, &mut json);
    // The multibody object gets a comma: params2 follows it (every earlier byte unchanged).
    json.truncate(json.len() - 1);
    json.push_str(",\n");
    params2_section(&mut json);
    json.push_str("}\n");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../specs/vectors/he/kat.json");
    if std::env::var_os("TANDEM_WRITE_HE_KAT").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &json).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == json,
        "specs/vectors/he/kat.json differs from what the engine produces; if the format change \
         is intended, regenerate with TANDEM_WRITE_HE_KAT=1 cargo test --release -p tandem-he --test kat \
         and update specs/he-formats.md"
    );
}

/// The vectors' `n_out`×`n_in` weights (entry i is `37·i mod 255 − 127`), biases
/// `1000·r − 500` and the layer prepared from them with `opts` (plaintext bound 128).
fn kat_layer(
    ctx: &Arc<Context>,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    opts: PlanOptions,
) -> (Vec<i64>, Vec<i64>, PreparedLayer) {
    let weights: Vec<i64> = (0..n_in * n_out)
        .map(|i| (i as i64 * 37 % 255) - 127)
        .collect();
    let bias: Vec<i64> = (0..n_out as i64).map(|r| 1000 * r - 500).collect();
    let layer = PreparedLayer::prepare(ctx.clone(), mode, n_in, n_out, &weights, &bias, 128, opts)
        .expect("layer");
    (weights, bias, layer)
}

/// `W·x + b` for each row x: `weights` is `n_out`×`n_in` row-major, the plaintext answer.
fn affine(
    weights: &[i64],
    bias: &[i64],
    xs: &[Vec<i64>],
    n_in: usize,
    n_out: usize,
) -> Vec<Vec<i64>> {
    xs.iter()
        .map(|x| {
            (0..n_out)
                .map(|o| (0..n_in).map(|i| weights[o * n_in + i] * x[i]).sum::<i64>() + bias[o])
                .collect()
        })
        .collect()
}

/// Vector `id`: the engine's decryption equals `want`, then so does the spec's (`spec`).
fn assert_decrypts_to(
    id: &str,
    engine: Vec<Vec<i64>>,
    spec: impl FnOnce() -> Vec<Vec<i64>>,
    want: &[Vec<i64>],
) {
    assert_eq!(engine, want, "{id}");
    assert_eq!(spec(), want, "{id}");
}

/// Secrets 0 .. `count` of `SK_SEED` as the device derives them: one tfhe secret generator,
/// secret 0 first, then secret 1, … from the same stream.
fn secrets(n: usize, count: usize) -> Vec<Vec<u64>> {
    let mut gen = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(SK_SEED));
    (0..count)
        .map(|_| {
            allocate_and_generate_new_binary_glwe_secret_key::<u64, _>(
                GlweDimension(1),
                PolynomialSize(n),
                &mut gen,
            )
            .as_ref()
            .to_vec()
        })
        .collect()
}

/// The derivation as he-formats.md states it: coefficient k of secret i is bit 0 of byte
/// i·N + k of the TDM-HE-4 AES-CTR stream keyed by the seed.
fn spec_secrets(n: usize, count: usize) -> Vec<Vec<u64>> {
    let mut gen = RandomGenerator::<DefaultRandomGenerator>::new(Seed(SK_SEED));
    let mut bytes = vec![0u8; n * count];
    gen.fill_slice_with_random_uniform(&mut bytes);
    bytes
        .chunks(n)
        .map(|c| c.iter().map(|&b| u64::from(b & 1)).collect())
        .collect()
}

fn bits_hex(s: &[u64]) -> String {
    let mut out = vec![0u8; s.len() / 8];
    for (i, &c) in s.iter().enumerate() {
        out[i / 8] |= (c as u8) << (i % 8);
    }
    hex(&out)
}

/// `τ_g(s)(X) = s(X^g) mod X^N + 1`.
fn automorphism(s: &[u64], g: usize) -> Vec<u64> {
    let n = s.len();
    let mut tau = vec![0u64; n];
    for (i, &c) in s.iter().enumerate() {
        let e = (i * g) % (2 * n);
        if e < n {
            tau[e] = tau[e].wrapping_add(c);
        } else {
            tau[e - n] = tau[e - n].wrapping_sub(c);
        }
    }
    tau
}

/// LSB-first bit-stream writer appending to a byte vector (he-formats.md, notation).
struct BitW {
    out: Vec<u8>,
    bit: usize,
}

impl BitW {
    fn put(&mut self, v: u64, b: u32) {
        for k in 0..b as usize {
            if self.bit.is_multiple_of(8) {
                self.out.push(0);
            }
            if (v >> k) & 1 == 1 {
                *self.out.last_mut().unwrap() |= 1 << (self.bit % 8);
            }
            self.bit += 1;
        }
    }
}

fn noise_poly(noise: &mut RandomGenerator<DefaultRandomGenerator>, n: usize) -> Vec<u64> {
    let mut e = vec![0u64; n];
    noise.fill_slice_with_random_from_distribution(&mut e, TUniform::<u64>::new(4));
    e
}

/// A kind-6 evaluation key with one automorphism (A = 1) and r = `ss.len()` bodies, from the
/// text of he-formats.md (§ Shared masks, TDM-HE-8).
fn spec_multi_key(
    params: &ParameterSet,
    key_id: &[u8; 32],
    ss: &[Vec<u64>],
    noise: &mut RandomGenerator<DefaultRandomGenerator>,
) -> Vec<u8> {
    let n = params.poly_size;
    let (base_log, levels) = (params.ks_base_log, params.ks_levels as usize);
    let g = 2 * n / 2 + 1;
    let mut b = Vec::new();
    b.extend_from_slice(b"TDHE");
    b.extend_from_slice(&[1, 6]);
    b.extend_from_slice(&params.id.to_le_bytes());
    b.extend_from_slice(key_id);
    b.push(ss.len() as u8);
    b.extend_from_slice(&MB_KEY_MASK_SEED.to_le_bytes());
    b.extend_from_slice(&[base_log as u8, levels as u8, 1]);
    b.extend_from_slice(&(g as u16).to_le_bytes());
    let mut kmasks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MB_KEY_MASK_SEED));
    let taus: Vec<Vec<u64>> = ss.iter().map(|s| automorphism(s, g)).collect();
    for j in 0..levels {
        let mut a = vec![0u64; n];
        kmasks.fill_slice_with_random_uniform(&mut a);
        let gadget = 1u64 << (64 - (j as u32 + 1) * base_log);
        for (s, tau) in ss.iter().zip(&taus) {
            let e = noise_poly(noise, n);
            let a_s = mul_binary(&a, s);
            for i in 0..n {
                let body = a_s[i]
                    .wrapping_add(e[i])
                    .wrapping_add(tau[i].wrapping_mul(gadget));
                b.extend_from_slice(&body.to_le_bytes());
            }
        }
    }
    assert_eq!(b.len(), 60 + 2 + 8 * levels * n * ss.len());
    b
}

/// A kind-4 input blob from the text of he-formats.md (§ Shared masks): blocks of r·b₁ rows,
/// one mask per (block, chunk) in stream order β·C + c, body i under secret i carrying rows
/// i·b₁ …, bodies in order (β, i, c), a short block with only the bodies its rows need.
fn spec_multi_input(
    plan: &LayerPlan,
    key_id: &[u8; 32],
    ss: &[Vec<u64>],
    xs: &[Vec<i64>],
    noise: &mut RandomGenerator<DefaultRandomGenerator>,
) -> Vec<u8> {
    let n = plan.params.poly_size;
    let (b1, r) = (plan.batch_rows, plan.bodies);
    let rr = n / (plan.chunk * b1);
    let chunks = plan.n_in.div_ceil(plan.chunk);
    let mut out = Vec::new();
    out.extend_from_slice(b"TDHE");
    // r = 1 (a batch plan with b₁ rows and one secret) is kind 1, without the r byte.
    out.extend_from_slice(&[1, if r > 1 { 4 } else { 1 }]);
    out.extend_from_slice(&plan.params.id.to_le_bytes());
    out.extend_from_slice(key_id);
    if r > 1 {
        out.push(r as u8);
    }
    out.extend_from_slice(&MB_MASK_SEED.to_le_bytes());
    out.extend_from_slice(&(xs.len() as u16).to_le_bytes());
    out.extend_from_slice(&(chunks as u16).to_le_bytes());
    out.push(plan.upload_bits as u8);
    let mut w = BitW {
        bit: out.len() * 8,
        out,
    };
    let mut masks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MB_MASK_SEED));
    for block in xs.chunks(r * b1) {
        let parts: Vec<&[Vec<i64>]> = block.chunks(b1).collect();
        let mut bodies = vec![Vec::new(); parts.len() * chunks];
        for c in 0..chunks {
            let mut a = vec![0u64; n];
            masks.fill_slice_with_random_uniform(&mut a);
            for (i, rows) in parts.iter().enumerate() {
                let mut m = vec![0u64; n];
                for (k, x) in rows.iter().enumerate() {
                    for (t, &v) in x.iter().skip(c * plan.chunk).take(plan.chunk).enumerate() {
                        m[k * plan.chunk * rr + t] = (v as u64).wrapping_shl(plan.delta_in_log2);
                    }
                }
                let e = noise_poly(noise, n);
                let a_s = mul_binary(&a, &ss[i]);
                bodies[i * chunks + c] = (0..n)
                    .map(|t| {
                        round_bits(
                            a_s[t].wrapping_add(m[t]).wrapping_add(e[t]),
                            plan.upload_bits,
                        )
                    })
                    .collect::<Vec<u64>>();
            }
        }
        for body in &bodies {
            for &v in body {
                w.put(v, plan.upload_bits);
            }
        }
    }
    let len = 61
        + usize::from(r > 1)
        + (xs.len().div_ceil(b1) * chunks * n * plan.upload_bits as usize).div_ceil(8);
    assert_eq!(w.out.len(), len, "input length of he-formats.md");
    w.out
}

/// Decodes a kind-5 output blob (kind 2 when r = 1) by the text of he-formats.md and decrypts
/// row ρ of each block with secret ⌊ρ/b₁⌋.
fn spec_decrypt_output_multi(blob: &[u8], plan: &LayerPlan, ss: &[Vec<u64>]) -> Vec<Vec<i64>> {
    let n = plan.params.poly_size;
    let (b1, r) = (plan.batch_rows, plan.bodies);
    let at = 40 + usize::from(r > 1);
    assert_eq!(&blob[..4], b"TDHE");
    assert_eq!((blob[4], blob[5]), (1, if r > 1 { 5 } else { 2 }));
    if r > 1 {
        assert_eq!(usize::from(blob[40]), r);
    }
    // Past the r byte, the kind-2 offsets.
    let blob = &blob[at - 40..];
    assert_eq!(blob[40], u8::from(plan.mode == OutputMode::Packed));
    let (batch, k, b, bb, n_out) = output_header(blob, plan);
    let rr = n / (plan.chunk * b1);
    let per = outputs_per_ciphertext(plan, rr);
    let mut bits = Bits {
        bytes: &blob[51..],
        bit: 0,
    };
    let d = plan.delta_out_log2;
    let mut out = Vec::new();
    for beta in 0..batch.div_ceil(r * b1) {
        let rows = (r * b1).min(batch - beta * r * b1);
        let mut ys = vec![vec![0i64; n_out]; rows];
        for ct in 0..k {
            let a: Vec<u64> = (0..n).map(|_| lift(bits.get(b), b)).collect();
            let a_s: Vec<Vec<u64>> = ss[..rows.div_ceil(b1)]
                .iter()
                .map(|s| mul_binary(&a, s))
                .collect();
            for (rho, y) in ys.iter_mut().enumerate() {
                for j in ct * per..((ct + 1) * per).min(n_out) {
                    let (c, pos) = slot(plan, j);
                    assert_eq!(c, ct);
                    let pos = pos + (rho % b1) * plan.chunk * rr;
                    let phase = lift(bits.get(bb), bb).wrapping_sub(a_s[rho / b1][pos]);
                    y[j] = (phase.wrapping_add(1u64 << (d - 1)) as i64) >> d;
                }
            }
        }
        out.extend(ys);
    }
    assert_eq!(bits.bit.div_ceil(8), blob.len() - 51, "exact length");
    let want = 51
        + (batch.div_ceil(r * b1) * k * n * b as usize + batch * n_out * bb as usize).div_ceil(8);
    assert_eq!(blob.len(), want, "output length of he-formats.md");
    out
}

/// Decrypts a kind-4 input blob (kind 1 when r = 1) by the text of he-formats.md: every body
/// with its own secret; every coefficient outside the input positions must decrypt to 0.
fn spec_decrypt_input_multi(blob: &[u8], plan: &LayerPlan, ss: &[Vec<u64>]) -> Vec<Vec<i64>> {
    let n = plan.params.poly_size;
    let (b1, r) = (plan.batch_rows, plan.bodies);
    let at = 40 + usize::from(r > 1);
    assert_eq!((blob[4], blob[5]), (1, if r > 1 { 4 } else { 1 }));
    let seed = u128::from_le_bytes(blob[at..at + 16].try_into().unwrap());
    let batch = u16::from_le_bytes([blob[at + 16], blob[at + 17]]) as usize;
    let chunks = u16::from_le_bytes([blob[at + 18], blob[at + 19]]) as usize;
    let bits_w = u32::from(blob[at + 20]);
    assert_eq!(
        (chunks, bits_w),
        (plan.n_in.div_ceil(plan.chunk), plan.upload_bits)
    );
    let row_off = plan.chunk * (n / (plan.chunk * b1));
    let mut masks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
    let mut bits = Bits {
        bytes: &blob[at + 21..],
        bit: 0,
    };
    let d = plan.delta_in_log2;
    let mut xs = vec![vec![0i64; plan.n_in]; batch];
    for beta in 0..batch.div_ceil(r * b1) {
        let present = (r * b1).min(batch - beta * r * b1);
        let a: Vec<Vec<u64>> = (0..chunks)
            .map(|_| {
                let mut a = vec![0u64; n];
                masks.fill_slice_with_random_uniform(&mut a);
                a
            })
            .collect();
        for i in 0..present.div_ceil(b1) {
            for (c, a_c) in a.iter().enumerate() {
                let a_s = mul_binary(a_c, &ss[i]);
                for t in 0..n {
                    let phase = lift(bits.get(bits_w), bits_w).wrapping_sub(a_s[t]);
                    let m = (phase.wrapping_add(1u64 << (d - 1)) as i64) >> d;
                    let (k, off) = (t / row_off, t % row_off);
                    let row = beta * r * b1 + i * b1 + k;
                    let col = c * plan.chunk + off;
                    if k < b1 && off < plan.chunk && row < batch && col < plan.n_in {
                        xs[row][col] = m;
                    } else {
                        assert_eq!(m, 0, "block {beta} body {i} chunk {c} coefficient {t}");
                    }
                }
            }
        }
    }
    assert_eq!(bits.bit.div_ceil(8), blob.len() - at - 21, "exact length");
    xs
}

struct MbCase {
    id: &'static str,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    opts: PlanOptions,
    /// `(b₁, r)` set on the planner's plan (the planner fills a polynomial with rows before
    /// it shares masks, so a small-key packed plan with r = 2 is built by hand).
    force: Option<(usize, usize)>,
    want: (usize, usize),
    x: Vec<Vec<i64>>,
}

/// The `multibody` section of kat.json: secrets 1.. of the seed, a kind-6 key (A = 1, r = 2)
/// and kind-4/5 layer vectors with r = 2 and 4, full and short blocks, b₁ = 2.
fn multibody_section(ctx: &Arc<Context>, client: &Client, json: &mut String) {
    let params = ctx.params();
    let n = params.poly_size;
    let ss = secrets(n, MAX_BODIES);
    assert_eq!(
        ss,
        spec_secrets(n, MAX_BODIES),
        "he-formats.md secret derivation"
    );
    assert_eq!(he_key_id(&ss[0]), client.key_id());
    let key_id = client.key_id();
    let mut device = Client::from_seed(ctx.clone(), SK_SEED);
    let mut noise = RandomGenerator::<DefaultRandomGenerator>::new(Seed(MB_NOISE_SEED));
    let kblob = spec_multi_key(&params, &key_id, &ss[..2], &mut noise);
    let ek = EvaluationKey::from_bytes(&kblob, kblob.len(), &params).expect("engine decodes key");
    assert_eq!(ek.bodies(), 2);
    assert_eq!(ek.to_bytes(), kblob, "engine re-encodes the kind-6 key");
    let pek = PreparedEvaluationKey::prepare(&ek, ctx).expect("engine prepares key");
    let rows = |count: usize, seed: i64| -> Vec<Vec<i64>> {
        (0..count as i64)
            .map(|k| {
                (0..6)
                    .map(|i| ((k * 53 + i * 29 + seed) % 255) - 127)
                    .collect()
            })
            .collect()
    };
    let cases = [
        MbCase {
            id: "he/multibody_nokey_6x2_r2_b2_batch5",
            mode: OutputMode::NoKey,
            n_in: 6,
            n_out: 2,
            opts: PlanOptions {
                chunk: Some(2048),
                batch: Some(5),
                max_bodies: 2,
            },
            force: None,
            want: (2, 2),
            x: rows(5, 11),
        },
        MbCase {
            id: "he/multibody_packed_2x3_r2_b2_batch5",
            mode: OutputMode::Packed,
            n_in: 2,
            n_out: 3,
            opts: PlanOptions {
                chunk: Some(2),
                ..PlanOptions::default()
            },
            force: Some((2, 2)),
            want: (2, 2),
            x: rows(5, 77),
        },
        MbCase {
            id: "he/multibody_nokey_3x1_r4_b2_batch5",
            mode: OutputMode::NoKey,
            n_in: 3,
            n_out: 1,
            opts: PlanOptions {
                chunk: Some(2048),
                batch: Some(8),
                max_bodies: 4,
            },
            force: None,
            want: (2, 4),
            x: rows(5, 5),
        },
        // r = 1 with b₁ = 2 (kinds 1 and 2): the batch layout whose slot rule R = N/(chunk·b₁)
        // the shared-mask kinds inherit.
        MbCase {
            id: "he/batch_nokey_6x2_r1_b2_batch3",
            mode: OutputMode::NoKey,
            n_in: 6,
            n_out: 2,
            opts: PlanOptions {
                chunk: Some(2048),
                batch: Some(3),
                max_bodies: 1,
            },
            force: None,
            want: (2, 1),
            x: rows(3, 101),
        },
    ];
    let more: Vec<String> = ss[1..]
        .iter()
        .map(|s| format!("\"{}\"", bits_hex(s)))
        .collect();
    json.push_str("  \"multibody\": {\n");
    let _ = writeln!(json, "    \"secret_key_bits\": [{}],", more.join(", "));
    let _ = writeln!(
        json,
        "    \"evaluation_key\": {{\"id\": \"he/multibody_eval_key_a1_r2\", \"bodies\": 2, \"blob_sha256\": \"{}\", \"blob\": \"{}\"}},",
        hex(&Sha256::digest(&kblob)),
        hex(&kblob)
    );
    json.push_str("    \"vectors\": [\n");
    for (ci, case) in cases.iter().enumerate() {
        let x: Vec<Vec<i64>> = case.x.iter().map(|r| r[..case.n_in].to_vec()).collect();
        let (weights, bias, planned) = kat_layer(ctx, case.mode, case.n_in, case.n_out, case.opts);
        let layer = match case.force {
            None => planned,
            Some((b1, r)) => {
                let plan = LayerPlan {
                    batch_rows: b1,
                    bodies: r,
                    ..*planned.plan()
                };
                PreparedLayer::prepare_with_plan(ctx.clone(), plan, &weights, &bias)
                    .expect("layer with a set plan")
            }
        };
        let plan = *layer.plan();
        assert_eq!((plan.batch_rows, plan.bodies), case.want, "{}", case.id);
        let r = plan.bodies;
        let in_blob = spec_multi_input(&plan, &key_id, &ss[..r], &x, &mut noise);
        assert_eq!(spec_decrypt_input_multi(&in_blob, &plan, &ss[..r]), x);
        let input = EncryptedInput::from_bytes(&in_blob, in_blob.len(), &plan).expect("decode");
        assert_eq!(
            input.to_bytes(),
            in_blob,
            "engine re-encodes the kind-4 blob"
        );
        // The engine's own encryption (fresh seeds, not stored) follows the same layout.
        let own = device.encrypt(&plan, &x).expect("encrypt").to_bytes();
        assert_eq!(own.len(), in_blob.len(), "{}", case.id);
        assert_eq!(
            spec_decrypt_input_multi(&own, &plan, &ss[..r]),
            x,
            "{}",
            case.id
        );
        let key = (case.mode == OutputMode::Packed).then_some(&pek);
        let out = layer
            .eval(&input, key, EvalOptions::default())
            .expect("eval");
        let out_blob = out.to_bytes();
        assert_eq!(out_blob[5], if r > 1 { 5 } else { 2 }, "{}: kind", case.id);
        let want = affine(&weights, &bias, &x, case.n_in, case.n_out);
        let decoded =
            EncryptedOutput::from_bytes(&out_blob, out_blob.len(), &plan, &key_id).expect("out");
        assert_decrypts_to(
            case.id,
            client.decrypt(&plan, &decoded).expect("decrypt"),
            || spec_decrypt_output_multi(&out_blob, &plan, &ss[..r]),
            &want,
        );
        let _ = write!(
            json,
            "      {{\"id\": \"{}\", \"plan\": {{\"mode\": \"{}\", \"n_in\": {}, \"n_out\": {}, \"chunk\": {}, \"batch_rows\": {}, \"bodies\": {}, \"delta_in_log2\": {}, \"delta_out_log2\": {}, \"upload_bits\": {}, \"download_bits\": {}, \"body_bits\": {}}},\n       \"weights\": {}, \"bias\": {}, \"x\": {}, \"y\": {},\n       \"input_blob\": \"{}\",\n       \"output_blob\": \"{}\"}}{}\n",
            case.id,
            case.mode.name(),
            plan.n_in,
            plan.n_out,
            plan.chunk,
            plan.batch_rows,
            plan.bodies,
            plan.delta_in_log2,
            plan.delta_out_log2,
            plan.upload_bits,
            plan.download_bits,
            plan.body_bits,
            i64_list(&weights),
            i64_list(&bias),
            i64_rows(&x),
            i64_rows(&want),
            hex(&in_blob),
            hex(&out_blob),
            if ci + 1 < cases.len() { "," } else { "" }
        );
    }
    json.push_str("    ]\n  }\n");
}

/// Parameter set 2's primes as he-formats.md names them by value (§ Parameter set 2): the first
/// three of tfhe-ntt's 30-bit NTT primes, Q = p₀·p₁·p₂ ≈ 2^89.96.
const P2_PRIMES: [u64; 3] = [1_062_862_849, 1_063_059_457, 1_064_697_857];
/// Set-2 vectors: their own key-mask and noise seeds.
const P2_KEY_MASK_SEED: u128 = 0x5032_4B45_5900_0000_0000_0000_0000_0003;
const P2_MB_KEY_MASK_SEED: u128 = 0x5032_4B45_5900_0000_0000_0000_0000_0006;
const P2_NOISE_SEED: u128 = 44;

/// `Q/p_j mod p_i` (the RNS gadget of level j seen modulo prime i).
fn gadget_mod(j: usize, i: usize) -> u64 {
    let q_over = P2_PRIMES
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != j)
        .fold(1u128, |acc, (_, &p)| acc * u128::from(p));
    (q_over % u128::from(P2_PRIMES[i])) as u64
}

/// N residues uniform modulo `p` by he-formats.md's sampling rule: the mask stream's u64
/// words 64 at a time; from each word v the candidates `v & (2^30 − 1)`, then
/// `(v >> 32) & (2^30 − 1)`, kept when < p; the unused words of the last group of 64 are
/// dropped (the next residue vector starts a fresh group).
fn rns_uniform(stream: &mut RandomGenerator<DefaultRandomGenerator>, p: u64, n: usize) -> Vec<u64> {
    const LOW30: u64 = (1 << 30) - 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut words = [0u64; 64];
        stream.fill_slice_with_random_uniform(&mut words);
        for v in words {
            for c in [v & LOW30, (v >> 32) & LOW30] {
                if c < p && out.len() < n {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Negacyclic `a·s` modulo (X^N + 1, p) for a binary `s` and residues `a` < p < 2^30
/// (schoolbook: at most N additions of values < 2^30 per coefficient, no overflow).
fn mul_binary_mod(a: &[u64], s: &[u64], p: u64) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, _) in s.iter().enumerate().filter(|(_, &c)| c == 1) {
        for (t, &v) in a.iter().enumerate() {
            let k = t + i;
            if k < n {
                out[k] += v;
            } else {
                out[k - n] += p - v;
            }
        }
    }
    out.iter().map(|&v| v % p).collect()
}

/// A set-2 evaluation key (kind 3 when `ss.len()` = 1, else kind 6 with r = `ss.len()`
/// bodies) for chunks up to 2^`a_count`, from the text of he-formats.md (§ Parameter set 2):
/// level j of automorphism g_l has the mask A_j uniform modulo Q (three residue vectors drawn
/// by the sampling rule, prime 0 first) and the bodies A_j·s_i + e_i + (Q/p_j)·τ_g(s_i) mod Q
/// written as three u32 LE residue vectors each, secret 0 first.
fn spec_rns_key(
    params: &ParameterSet,
    key_id: &[u8; 32],
    seed: u128,
    a_count: usize,
    ss: &[Vec<u64>],
    noise: &mut RandomGenerator<DefaultRandomGenerator>,
) -> Vec<u8> {
    let n = params.poly_size;
    let r = ss.len();
    let mut b = Vec::new();
    b.extend_from_slice(b"TDHE");
    b.extend_from_slice(&[1, if r > 1 { 6 } else { 3 }]);
    b.extend_from_slice(&params.id.to_le_bytes());
    b.extend_from_slice(key_id);
    if r > 1 {
        b.push(r as u8);
    }
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&[30, 2, a_count as u8]);
    let gs: Vec<usize> = (1..=a_count).map(|l| 2 * n / (1 << l) + 1).collect();
    for &g in &gs {
        b.extend_from_slice(&(g as u16).to_le_bytes());
    }
    let mut kmasks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
    for &g in &gs {
        let taus: Vec<Vec<u64>> = ss.iter().map(|s| automorphism(s, g)).collect();
        for j in 0..2 {
            let a: Vec<Vec<u64>> = P2_PRIMES
                .iter()
                .map(|&p| rns_uniform(&mut kmasks, p, n))
                .collect();
            for (s, tau) in ss.iter().zip(&taus) {
                // One noise polynomial per body, the same integers modulo every prime.
                let e = noise_poly(noise, n);
                for (i, &p) in P2_PRIMES.iter().enumerate() {
                    let a_s = mul_binary_mod(&a[i], s, p);
                    let gj = gadget_mod(j, i);
                    for t in 0..n {
                        let e_t = (e[t] as i64).rem_euclid(p as i64) as u64;
                        let tau_t = (tau[t] as i64).rem_euclid(p as i64) as u64;
                        let v = (a_s[t] + e_t + tau_t * gj % p) % p;
                        b.extend_from_slice(&(v as u32).to_le_bytes());
                    }
                }
            }
        }
    }
    let want = 59 + usize::from(r > 1) + 2 * a_count + 12 * a_count * 2 * n * r;
    assert_eq!(b.len(), want, "set-2 key length of he-formats.md");
    b
}

/// Checks any set-2 evaluation key blob (the engine's own included) by the text of
/// he-formats.md: header, counts, length, every residue below its prime, and every body
/// minus A_j·s_i minus (Q/p_j)·τ_g(s_i) the same noise integer |e| ≤ 16 modulo each prime.
/// Returns (A, r).
fn spec_check_rns_key(blob: &[u8], params: &ParameterSet, ss: &[Vec<u64>]) -> (usize, usize) {
    let n = params.poly_size;
    assert_eq!(&blob[..5], b"TDHE\x01");
    assert_eq!(u16::from_le_bytes([blob[6], blob[7]]), params.id);
    let (r, at) = match blob[5] {
        3 => (1, 40),
        6 => (usize::from(blob[40]), 41),
        k => panic!("kind {k}"),
    };
    let seed = u128::from_le_bytes(blob[at..at + 16].try_into().unwrap());
    assert_eq!((blob[at + 16], blob[at + 17]), (30, 2), "gadget of set 2");
    let a_count = usize::from(blob[at + 18]);
    assert_eq!(blob.len(), at + 19 + 2 * a_count + 12 * a_count * 2 * n * r);
    let mut pos = at + 19 + 2 * a_count;
    let mut kmasks = RandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
    for l in 1..=a_count {
        let off = at + 19 + 2 * (l - 1);
        let g = usize::from(u16::from_le_bytes([blob[off], blob[off + 1]]));
        assert_eq!(g, 2 * n / (1 << l) + 1);
        for j in 0..2 {
            let a: Vec<Vec<u64>> = P2_PRIMES
                .iter()
                .map(|&p| rns_uniform(&mut kmasks, p, n))
                .collect();
            for s in &ss[..r] {
                let tau = automorphism(s, g);
                let mut e = vec![i64::MAX; n];
                for (i, &p) in P2_PRIMES.iter().enumerate() {
                    let a_s = mul_binary_mod(&a[i], s, p);
                    let gj = gadget_mod(j, i);
                    for t in 0..n {
                        let v =
                            u64::from(u32::from_le_bytes(blob[pos..pos + 4].try_into().unwrap()));
                        pos += 4;
                        assert!(v < p, "residue {v} not below p_{i}");
                        let tau_t = (tau[t] as i64).rem_euclid(p as i64) as u64;
                        let d = (v + 2 * p - a_s[t] - tau_t * gj % p) % p;
                        let d = if d > p / 2 {
                            d as i64 - p as i64
                        } else {
                            d as i64
                        };
                        assert!(
                            d.abs() <= 16,
                            "automorphism {l} level {j} coefficient {t}: {d}"
                        );
                        if i == 0 {
                            e[t] = d;
                        } else {
                            assert_eq!(e[t], d, "noise differs between primes");
                        }
                    }
                }
            }
        }
    }
    (a_count, r)
}

/// One layer vector of kat.json (the `multibody` section's shape: batch_rows and bodies given).
#[allow(clippy::too_many_arguments)]
fn layer_json(
    id: &str,
    plan: &LayerPlan,
    weights: &[i64],
    bias: &[i64],
    x: &[Vec<i64>],
    y: &[Vec<i64>],
    in_blob: &[u8],
    out_blob: &[u8],
) -> String {
    format!(
        "      {{\"id\": \"{id}\", \"plan\": {{\"mode\": \"{}\", \"n_in\": {}, \"n_out\": {}, \"chunk\": {}, \"batch_rows\": {}, \"bodies\": {}, \"delta_in_log2\": {}, \"delta_out_log2\": {}, \"upload_bits\": {}, \"download_bits\": {}, \"body_bits\": {}}},\n       \"weights\": {}, \"bias\": {}, \"x\": {}, \"y\": {},\n       \"input_blob\": \"{}\",\n       \"output_blob\": \"{}\"}}",
        plan.mode.name(),
        plan.n_in,
        plan.n_out,
        plan.chunk,
        plan.batch_rows,
        plan.bodies,
        plan.delta_in_log2,
        plan.delta_out_log2,
        plan.upload_bits,
        plan.download_bits,
        plan.body_bits,
        i64_list(weights),
        i64_list(bias),
        i64_rows(x),
        i64_rows(y),
        hex(in_blob),
        hex(out_blob),
    )
}

/// The `params2` section of kat.json: parameter set 2 (RNS modulus Q, he-formats.md
/// § Parameter set 2). The same device seed (so the same secrets; the key id hashes param id
/// 2), a kind-3 key for chunks ≤ 4 and a kind-6 key with 2 bodies built from the spec text
/// with this file's own modular arithmetic, and two packed layers (one secret, and r = 2)
/// whose inputs (from the spec text, modulo 2^64 as in set 1) go through the engine's set-2
/// evaluation with those keys and decrypt exactly. The engine's own keys (fresh seeds, not
/// stored) are checked against the same spec text.
fn params2_section(json: &mut String) {
    let params = PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64;
    let n = params.poly_size;
    // The primes the spec names are tfhe-ntt's first three Plan32 primes.
    let plan32 = tfhe_ntt::native64::Plan32::try_new(64).unwrap();
    assert_eq!(
        P2_PRIMES,
        [
            u64::from(plan32.ntt_0().modulus()),
            u64::from(plan32.ntt_1().modulus()),
            u64::from(plan32.ntt_2().modulus()),
        ],
        "he-formats.md's primes"
    );
    let ctx = Arc::new(Context::new(params));
    let ss = secrets(n, 2);
    let mut device = Client::from_seed(ctx.clone(), SK_SEED);
    let key_id = device.key_id();
    // TDM-HE-2 with param id 2.
    let mut h = Sha256::new();
    h.update(b"tandem-he key id v1");
    h.update(2u16.to_le_bytes());
    for &c in &ss[0] {
        h.update([c as u8]);
    }
    assert_eq!(<[u8; 32]>::from(h.finalize()), key_id, "set-2 key id");
    let mut noise = RandomGenerator::<DefaultRandomGenerator>::new(Seed(P2_NOISE_SEED));

    let kblob = spec_rns_key(&params, &key_id, P2_KEY_MASK_SEED, 2, &ss[..1], &mut noise);
    assert_eq!(spec_check_rns_key(&kblob, &params, &ss), (2, 1));
    let ek = EvaluationKey::from_bytes(&kblob, kblob.len(), &params).expect("engine decodes key");
    assert_eq!(ek.max_chunk(), 4);
    assert_eq!(
        ek.to_bytes(),
        kblob,
        "engine re-encodes the set-2 kind-3 key"
    );
    let pek = PreparedEvaluationKey::prepare(&ek, &ctx).expect("engine prepares key");
    let mblob = spec_rns_key(&params, &key_id, P2_MB_KEY_MASK_SEED, 1, &ss, &mut noise);
    assert_eq!(spec_check_rns_key(&mblob, &params, &ss), (1, 2));
    let mek = EvaluationKey::from_bytes(&mblob, mblob.len(), &params).expect("engine decodes key");
    assert_eq!(mek.bodies(), 2);
    assert_eq!(
        mek.to_bytes(),
        mblob,
        "engine re-encodes the set-2 kind-6 key"
    );
    let mpek = PreparedEvaluationKey::prepare(&mek, &ctx).expect("engine prepares key");

    // A residue equal to its prime is refused (he-formats.md: residue < p_i), in each prime's
    // vector: the last coefficient of prime 0, the first of prime 1 and of prime 2.
    let body0 = 59 + 2 * 2;
    for (i, at) in [
        (0, body0 + 4 * (n - 1)),
        (1, body0 + 4 * n),
        (2, body0 + 8 * n),
    ] {
        let mut bad = kblob.clone();
        bad[at..at + 4].copy_from_slice(&(P2_PRIMES[i] as u32).to_le_bytes());
        assert!(
            EvaluationKey::from_bytes(&bad, bad.len(), &params).is_err(),
            "residue p_{i} accepted"
        );
        bad[at..at + 4].copy_from_slice(&(P2_PRIMES[i] as u32 - 1).to_le_bytes());
        EvaluationKey::from_bytes(&bad, bad.len(), &params).expect("residue p_i − 1 is in range");
    }

    // The engine's own set-2 keys follow the same text (their seeds are fresh, so they are
    // checked, not stored).
    let own = device.evaluation_key(4).expect("engine key").to_bytes();
    assert_eq!(own.len(), kblob.len());
    assert_eq!(spec_check_rns_key(&own, &params, &ss), (2, 1));
    let own = device
        .evaluation_key_for(2, 2)
        .expect("engine key")
        .to_bytes();
    assert_eq!(own.len(), mblob.len());
    assert_eq!(spec_check_rns_key(&own, &params, &ss), (1, 2));

    let mut vectors = Vec::new();
    // One secret: packed 8 → 3, chunk 4 (two chunks, two key-switching strides), two rows.
    {
        let id = "he/p2_packed_8x3_chunk4_batch2";
        let x = vec![
            vec![1, -2, 3, -4, 127, -128, 5, 0],
            vec![-1, 64, -99, 100, 0, 17, -128, 127],
        ];
        let (weights, bias, layer) = kat_layer(
            &ctx,
            OutputMode::Packed,
            8,
            3,
            PlanOptions {
                chunk: Some(4),
                ..PlanOptions::default()
            },
        );
        let plan = *layer.plan();
        assert_eq!((plan.params.id, plan.chunk, plan.bodies), (2, 4, 1));
        let in_blob = spec_multi_input(&plan, &key_id, &ss[..1], &x, &mut noise);
        assert_eq!(spec_decrypt_input_multi(&in_blob, &plan, &ss[..1]), x);
        let input = EncryptedInput::from_bytes(&in_blob, in_blob.len(), &plan).expect("decode");
        // The device's own set-2 encryption (fresh seeds) is the set-1 layout modulo 2^64.
        let own = device.encrypt(&plan, &x).expect("encrypt").to_bytes();
        assert_eq!(spec_decrypt_input_multi(&own, &plan, &ss[..1]), x, "{id}");
        let out = layer
            .eval(&input, Some(&pek), EvalOptions::default())
            .expect("eval");
        let out_blob = out.to_bytes();
        let want = affine(&weights, &bias, &x, 8, 3);
        assert_decrypts_to(
            id,
            device.decrypt(&plan, &out).expect("decrypt"),
            || spec_decrypt_output_multi(&out_blob, &plan, &ss[..1]),
            &want,
        );
        vectors.push(layer_json(
            id, &plan, &weights, &bias, &x, &want, &in_blob, &out_blob,
        ));
    }
    // Two bodies per mask (kinds 4, 5 with the kind-6 key): packed 2 → 3, chunk 2, b₁ = 2.
    {
        let id = "he/p2_multibody_packed_2x3_r2_b2_batch3";
        let x = vec![vec![7, -8], vec![-128, 127], vec![3, 99]];
        let (weights, bias, planned) = kat_layer(
            &ctx,
            OutputMode::Packed,
            2,
            3,
            PlanOptions {
                chunk: Some(2),
                ..PlanOptions::default()
            },
        );
        let plan = LayerPlan {
            batch_rows: 2,
            bodies: 2,
            ..*planned.plan()
        };
        let layer = PreparedLayer::prepare_with_plan(ctx.clone(), plan, &weights, &bias)
            .expect("layer with a set plan");
        let plan = *layer.plan();
        let in_blob = spec_multi_input(&plan, &key_id, &ss, &x, &mut noise);
        assert_eq!(spec_decrypt_input_multi(&in_blob, &plan, &ss), x);
        let input = EncryptedInput::from_bytes(&in_blob, in_blob.len(), &plan).expect("decode");
        // The device's own set-2 encryption (fresh seeds) is the set-1 layout modulo 2^64.
        let own = device.encrypt(&plan, &x).expect("encrypt").to_bytes();
        assert_eq!(spec_decrypt_input_multi(&own, &plan, &ss), x, "{id}");
        let out = layer
            .eval(&input, Some(&mpek), EvalOptions::default())
            .expect("eval");
        let out_blob = out.to_bytes();
        let want = affine(&weights, &bias, &x, 2, 3);
        assert_decrypts_to(
            id,
            device.decrypt(&plan, &out).expect("decrypt"),
            || spec_decrypt_output_multi(&out_blob, &plan, &ss),
            &want,
        );
        vectors.push(layer_json(
            id, &plan, &weights, &bias, &x, &want, &in_blob, &out_blob,
        ));
    }

    json.push_str("  \"params2\": {\n");
    let _ = writeln!(
        json,
        "    \"params\": {{\"id\": {}, \"poly_size\": {n}, \"ks_base_log\": {}, \"ks_levels\": {}, \"primes\": [{}, {}, {}]}},",
        params.id, params.ks_base_log, params.ks_levels, P2_PRIMES[0], P2_PRIMES[1], P2_PRIMES[2]
    );
    let _ = writeln!(json, "    \"he_key_id\": \"{}\",", hex(&key_id));
    let _ = writeln!(
        json,
        "    \"evaluation_key\": {{\"id\": \"he/p2_eval_key_a2\", \"blob_sha256\": \"{}\", \"blob\": \"{}\"}},",
        hex(&Sha256::digest(&kblob)),
        hex(&kblob)
    );
    let _ = writeln!(
        json,
        "    \"multibody_evaluation_key\": {{\"id\": \"he/p2_multibody_eval_key_a1_r2\", \"bodies\": 2, \"blob_sha256\": \"{}\", \"blob\": \"{}\"}},",
        hex(&Sha256::digest(&mblob)),
        hex(&mblob)
    );
    json.push_str("    \"vectors\": [\n");
    json.push_str(&vectors.join(",\n"));
    json.push_str("\n    ]\n  }\n");
}
