//! Independent check of `vectors/he/kat.json` from the text of `specs/he-formats.md` alone:
//! key id (TDM-HE-2), mask stream (TDM-HE-4, AES-128-CTR), input and output blob layouts
//! (TDM-HE-5..7) decrypted with the vector's secret, evaluation key (TDM-HE-8), and the
//! shared-mask kinds 4, 5, 6: secrets 1.. derived from the seed, each body decrypted with its
//! own secret; and parameter set 2 (`params2`: keys as residues modulo Q = p₀·p₁·p₂, checked
//! with schoolbook products modulo each prime). No `tandem-he` code is used.
// Coefficient loops index polynomials of length N by position on purpose (like the spec text).
#![allow(clippy::needless_range_loop)]

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Block};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::hexutil;

/// The mask stream of TDM-HE-4.
struct MaskStream {
    aes: Aes128,
    counter: u128,
    buf: [u8; 16],
    used: usize,
}

impl MaskStream {
    fn new(seed_bytes: &[u8; 16]) -> Self {
        MaskStream {
            aes: Aes128::new(&Block::from(*seed_bytes)),
            counter: 0,
            buf: [0; 16],
            used: 16,
        }
    }
    fn byte(&mut self) -> u8 {
        if self.used == 16 {
            let mut b = Block::from(self.counter.to_le_bytes());
            self.aes.encrypt_block(&mut b);
            self.buf = b.into();
            self.counter = self.counter.wrapping_add(1);
            self.used = 0;
        }
        let v = self.buf[self.used];
        self.used += 1;
        v
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }
    fn poly(&mut self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.next_u64()).collect()
    }
}

/// LSB-first b-bit stream.
struct Bits<'a> {
    bytes: &'a [u8],
    bit: usize,
}

impl Bits<'_> {
    fn get(&mut self, b: u32) -> Result<u64, String> {
        let mut v = 0u64;
        for k in 0..b as usize {
            let pos = self.bit + k;
            let byte = self.bytes.get(pos / 8).ok_or("bit stream truncated")?;
            v |= u64::from((byte >> (pos % 8)) & 1) << k;
        }
        self.bit += b as usize;
        Ok(v)
    }
    /// Exact length and zero padding.
    fn finish(&self) -> Result<(), String> {
        if self.bit.div_ceil(8) != self.bytes.len() {
            return Err("bit stream length differs".into());
        }
        let tail = self.bit % 8;
        if tail != 0 && self.bytes.last().is_some_and(|b| b >> tail != 0) {
            return Err("non-zero padding bits".into());
        }
        Ok(())
    }
}

fn lift(v: u64, b: u32) -> u64 {
    if b >= 64 {
        v
    } else {
        v << (64 - b)
    }
}

/// Negacyclic `a·s` modulo (X^N + 1, 2^64), `s` binary.
fn mul_binary(a: &[u64], s: &[u64]) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, _) in s.iter().enumerate().filter(|(_, c)| **c == 1) {
        for (t, &v) in a.iter().enumerate() {
            let k = t + i;
            match out.get_mut(k) {
                Some(o) => *o = o.wrapping_add(v),
                None => {
                    if let Some(o) = out.get_mut(k - n) {
                        *o = o.wrapping_sub(v);
                    }
                }
            }
        }
    }
    out
}

fn get_u(v: &Value, k: &str) -> Result<usize, String> {
    v[k].as_u64().map(|x| x as usize).ok_or(format!("no {k}"))
}

fn blob(v: &Value, k: &str) -> Result<Vec<u8>, String> {
    hexutil::decode(v[k].as_str().ok_or(format!("no {k}"))?).ok_or(format!("bad hex in {k}"))
}

/// The common header of he-formats.md: magic, version 1, `kind`, parameter set `pid`, key id.
fn header(b: &[u8], kind: u8, pid: u16, key_id: &[u8]) -> Result<(), String> {
    let ok = b.get(..4) == Some(b"TDHE")
        && b.get(4) == Some(&1)
        && b.get(5) == Some(&kind)
        && b.get(6..8) == Some(&pid.to_le_bytes()[..])
        && b.get(8..40) == Some(key_id);
    if ok {
        Ok(())
    } else {
        Err(format!("kind {kind} header differs"))
    }
}

fn rows_of(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .map(|r| {
            r.iter()
                .map(|row| {
                    row.as_array()
                        .map(|x| x.iter().filter_map(Value::as_i64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn le16(b: &[u8], at: usize) -> Result<usize, String> {
    b.get(at..at + 2)
        .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
        .ok_or("short blob".into())
}

/// TDM-HE-2: SHA-256("tandem-he key id v1" ‖ param id (u16 LE) ‖ secret coefficients).
fn key_id_of(pid: u16, s: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tandem-he key id v1");
    h.update(pid.to_le_bytes());
    for &c in s {
        h.update([c as u8]);
    }
    h.finalize().into()
}

/// Secrets 0 .. `count` of a device seed (he-formats.md, TDM-HE-2 and § Shared masks):
/// coefficient k of secret i is bit 0 of byte i·N + k of the TDM-HE-4 stream keyed by the seed.
fn derive_secrets(seed: &[u8; 16], n: usize, count: usize) -> Vec<Vec<u64>> {
    let mut m = MaskStream::new(seed);
    (0..count)
        .map(|_| (0..n).map(|_| u64::from(m.byte() & 1)).collect())
        .collect()
}

fn bits_of(b: &[u8], n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| b.get(i / 8).map_or(0, |b| u64::from((b >> (i % 8)) & 1)))
        .collect()
}

/// The body count r of a blob of single-secret kind `kind` (r = 1, fields from offset 40) or
/// shared-mask kind `kind + 3` (r in 2..=8 at offset 40, fields from 41). Returns `(r, offset)`.
fn open(
    b: &[u8],
    kind: u8,
    multi: bool,
    pid: u16,
    key_id: &[u8],
) -> Result<(usize, usize), String> {
    if !multi {
        header(b, kind, pid, key_id)?;
        return Ok((1, 40));
    }
    header(b, kind + 3, pid, key_id)?;
    let r = usize::from(*b.get(40).ok_or("short blob")?);
    if !(2..=8).contains(&r) {
        return Err(format!("body count {r} outside 2..=8"));
    }
    Ok((r, 41))
}

/// Decrypts one layer vector's input and output blobs (kinds 1/2, or 4/5 for a plan with
/// `bodies` ≥ 2) and compares them with its `x` and `y`. `ss` holds the device's secrets
/// (at least the plan's r); `pid` is the parameter set of the blobs' headers (the layouts are
/// the same in sets 1 and 2: the device works modulo 2^64 in both).
fn layer(v: &Value, ss: &[Vec<u64>], pid: u16, key_id: &[u8], n: usize) -> Result<(), String> {
    let p = &v["plan"];
    let (n_in, n_out, chunk) = (get_u(p, "n_in")?, get_u(p, "n_out")?, get_u(p, "chunk")?);
    // Vectors written before shared masks carry neither field: b₁ = 1, r = 1.
    let b1 = p
        .get("batch_rows")
        .map_or(Ok(1), |_| get_u(p, "batch_rows"))?;
    let r_plan = p.get("bodies").map_or(Ok(1), |_| get_u(p, "bodies"))?;
    if !chunk.is_power_of_two() || chunk > n || b1 == 0 || b1 * chunk > n || r_plan == 0 {
        return Err("plan out of range".into());
    }
    let multi = r_plan > 1;
    let (d_in, d_out) = (
        get_u(p, "delta_in_log2")? as u32,
        get_u(p, "delta_out_log2")? as u32,
    );
    let (ub, db, bb) = (
        get_u(p, "upload_bits")? as u32,
        get_u(p, "download_bits")? as u32,
        get_u(p, "body_bits")? as u32,
    );
    if d_in == 0 || d_out == 0 || d_in > 63 || d_out > 63 {
        return Err("scaling factors out of range".into());
    }
    let packed = p["mode"] == "packed";
    // Weight rows per block R = ⌊N/(chunk·b₁)⌋; row k of a body at X^(k·chunk·R).
    let rr = n / (chunk * b1);
    let row_off = chunk * rr;
    // Input batch (kind 1 / 4): decrypt every body and read the inputs back.
    let ib = blob(v, "input_blob")?;
    let (r, at) = open(&ib, 1, multi, pid, key_id)?;
    if r != r_plan || ss.len() < r {
        return Err(format!(
            "input blob has {r} bodies per mask, the plan {r_plan}"
        ));
    }
    if ib.len() < at + 21 {
        return Err("input blob shorter than its fixed part".into());
    }
    let seed: [u8; 16] = ib
        .get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or("seed")?;
    let (batch, chunks, bits) = (
        le16(&ib, at + 16)?,
        le16(&ib, at + 18)?,
        u32::from(ib[at + 20]),
    );
    if chunks != n_in.div_ceil(chunk) || bits != ub || !(1..=64).contains(&batch) {
        return Err("input layout differs from the plan".into());
    }
    // TDM-HE-6 (+ one byte for kind 4).
    let want_len = at + 21 + (batch.div_ceil(b1) * chunks * n * bits as usize).div_ceil(8);
    if ib.len() != want_len {
        return Err(format!("input blob length {} != {want_len}", ib.len()));
    }
    let mut masks = MaskStream::new(&seed);
    let mut br = Bits {
        bytes: &ib[at + 21..],
        bit: 0,
    };
    let block_rows = r * b1;
    let mut xs = vec![vec![0i64; n_in]; batch];
    for beta in 0..batch.div_ceil(block_rows) {
        let present = block_rows.min(batch - beta * block_rows);
        // One mask per (block, chunk), stream order β·C + c.
        let a: Vec<Vec<u64>> = (0..chunks).map(|_| masks.poly(n)).collect();
        // Bodies in order (β, i, c); a short block has ⌈B_β/b₁⌉ of them.
        for i in 0..present.div_ceil(b1) {
            for (c, a_c) in a.iter().enumerate() {
                let a_s = mul_binary(a_c, &ss[i]);
                for t in 0..n {
                    let phase = lift(br.get(bits)?, bits).wrapping_sub(a_s[t]);
                    let m = (phase.wrapping_add(1u64 << (d_in - 1)) as i64) >> d_in;
                    let (k, off) = (t / row_off, t % row_off);
                    let row = beta * block_rows + i * b1 + k;
                    let slot = (k < b1 && off < chunk && row < batch)
                        .then(|| xs.get_mut(row).and_then(|x| x.get_mut(c * chunk + off)))
                        .flatten();
                    match slot {
                        Some(xi) => *xi = m,
                        None if m != 0 => {
                            return Err(format!(
                                "block {beta} body {i} chunk {c}: coefficient {t} is not 0"
                            ))
                        }
                        None => {}
                    }
                }
            }
        }
    }
    br.finish()?;
    if xs != rows_of(&v["x"]) {
        return Err(format!("inputs decrypt to {xs:?}"));
    }
    // Output batch (kind 2 / 5).
    let ob = blob(v, "output_blob")?;
    let (r, at) = open(&ob, 2, multi, pid, key_id)?;
    if r != r_plan {
        return Err(format!(
            "output blob has {r} bodies per mask, the plan {r_plan}"
        ));
    }
    if ob.len() < at + 11 {
        return Err("output blob shorter than its fixed part".into());
    }
    let (batch, k, bits) = (
        le16(&ob, at + 1)?,
        le16(&ob, at + 3)?,
        u32::from(ob[at + 5]),
    );
    let body_bits = u32::from(ob[at + 6]);
    let no = ob
        .get(at + 7..at + 11)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
    if no != Some(n_out) || bits != db || body_bits != bb || ob[at] != u8::from(packed) {
        return Err("output header differs from the plan".into());
    }
    let blocks = n_out.div_ceil(rr);
    let g = blocks.min(chunk);
    let per = if packed { rr * g } else { rr };
    let want_k = if packed { blocks.div_ceil(g) } else { blocks };
    if k != want_k || !(1..=64).contains(&batch) {
        return Err(format!("output blob has K = {k}, the plan {want_k}"));
    }
    // TDM-HE-7 with ⌈B/(r·b₁)⌉ blocks (+ one byte for kind 5).
    let payload = batch.div_ceil(block_rows) * k * n * bits as usize + batch * n_out * bb as usize;
    let want_len = at + 11 + payload.div_ceil(8);
    if ob.len() != want_len {
        return Err(format!("output blob length {} != {want_len}", ob.len()));
    }
    let slot = |j: usize| {
        let (beta, r) = (j / rr, j % rr);
        if packed {
            r * chunk + (beta % g) * (chunk / g.next_power_of_two())
        } else {
            r * chunk
        }
    };
    let mut br = Bits {
        bytes: &ob[at + 11..],
        bit: 0,
    };
    let mut ys = Vec::new();
    for beta in 0..batch.div_ceil(block_rows) {
        let present = block_rows.min(batch - beta * block_rows);
        let mut y = vec![vec![0i64; n_out]; present];
        for ct in 0..k {
            let a: Vec<u64> = (0..n)
                .map(|_| br.get(bits).map(|v| lift(v, bits)))
                .collect::<Result<_, _>>()?;
            let a_s: Vec<Vec<u64>> = ss[..present.div_ceil(b1)]
                .iter()
                .map(|s| mul_binary(&a, s))
                .collect();
            // Row ρ of the block: body ⌊ρ/b₁⌋, slot_j + (ρ mod b₁)·chunk·R.
            for (rho, yr) in y.iter_mut().enumerate() {
                for (j, yj) in yr
                    .iter_mut()
                    .enumerate()
                    .take(((ct + 1) * per).min(n_out))
                    .skip(ct * per)
                {
                    let pos = slot(j) + (rho % b1) * row_off;
                    let a_s_j = a_s[rho / b1].get(pos).ok_or("slot outside N")?;
                    let phase = lift(br.get(body_bits)?, body_bits).wrapping_sub(*a_s_j);
                    *yj = (phase.wrapping_add(1u64 << (d_out - 1)) as i64) >> d_out;
                }
            }
        }
        ys.extend(y);
    }
    br.finish()?;
    if ys != rows_of(&v["y"]) {
        return Err(format!("outputs decrypt to {ys:?}"));
    }
    Ok(())
}

/// An evaluation key (kind 3, or kind 6 with `multi`): header, counts, length, and every
/// body minus `a·s_i` minus `τ_g(s_i)·2^(64−(j+1)·base_log)` within the noise bound.
fn eval_key(
    v: &Value,
    ss: &[Vec<u64>],
    key_id: &[u8],
    n: usize,
    base_log: u32,
    levels: usize,
    multi: bool,
) -> Result<(), String> {
    let b = blob(v, "blob")?;
    let (r, at) = open(&b, 3, multi, 1, key_id)?;
    if multi && v["bodies"].as_u64() != Some(r as u64) {
        return Err(format!(
            "key blob has {r} bodies, the vector says {}",
            v["bodies"]
        ));
    }
    if ss.len() < r {
        return Err("more bodies than secrets".into());
    }
    let seed: [u8; 16] = b
        .get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or("seed")?;
    let a_count = usize::from(*b.get(at + 18).ok_or("short")?);
    if usize::from(b[at + 16]) != base_log as usize || usize::from(b[at + 17]) != levels {
        return Err("gadget differs".into());
    }
    if !(1..=12).contains(&a_count) {
        return Err(format!("automorphism count {a_count}"));
    }
    // TDM-HE-8 (+ one byte for kind 6).
    let want_len = at + 19 + 2 * a_count + 8 * a_count * levels * n * r;
    if b.len() != want_len {
        return Err(format!("evaluation key length {} != {want_len}", b.len()));
    }
    let mut masks = MaskStream::new(&seed);
    let mut pos = at + 19 + 2 * a_count;
    for l in 1..=a_count {
        let g = le16(&b, at + 19 + 2 * (l - 1))?;
        if g != 2 * n / (1 << l) + 1 {
            return Err(format!("automorphism {l} is {g}"));
        }
        let taus: Vec<Vec<u64>> = ss[..r]
            .iter()
            .map(|s| {
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
            })
            .collect();
        for j in 0..levels {
            // One mask per level, shared by the r bodies (s_0 first).
            let a = masks.poly(n);
            let gadget = 1u64 << (64 - (j as u32 + 1) * base_log);
            for (si, (s, tau)) in ss.iter().zip(&taus).enumerate() {
                let a_s = mul_binary(&a, s);
                for i in 0..n {
                    let body = b
                        .get(pos..pos + 8)
                        .map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
                        .ok_or("short")?;
                    pos += 8;
                    let e = body
                        .wrapping_sub(a_s[i])
                        .wrapping_sub(tau[i].wrapping_mul(gadget))
                        as i64;
                    if e.unsigned_abs() > 16 {
                        return Err(format!(
                            "key {l} level {j} body {si} coefficient {i}: noise {e} outside TUniform(2^4)"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs every check; one `(id, result)` per check.
pub fn check(doc: &Value) -> Vec<(String, Result<(), String>)> {
    let mut out = check_set1(doc);
    if !doc["params2"].is_null() {
        out.extend(check_params2(doc));
    }
    out
}

/// The parameter-set-1 entries (top level and `multibody`).
fn check_set1(doc: &Value) -> Vec<(String, Result<(), String>)> {
    let mut out = Vec::new();
    let p = &doc["params"];
    let (Ok(n), Ok(base_log), Ok(levels)) = (
        get_u(p, "poly_size"),
        get_u(p, "ks_base_log"),
        get_u(p, "ks_levels"),
    ) else {
        return vec![("he/params".into(), Err("bad params".into()))];
    };
    let bits = blob(doc, "secret_key_bits").unwrap_or_default();
    let s = bits_of(&bits, n);
    let key_id = blob(doc, "he_key_id").unwrap_or_default();
    // TDM-HE-2.
    let kid = key_id_of(1, &s);
    out.push((
        "he/key_id".into(),
        if bits.len() * 8 == n && kid[..] == key_id[..] {
            Ok(())
        } else {
            Err("key id differs".into())
        },
    ));
    // TDM-HE-4.
    let ms = &doc["mask_stream"];
    let r = (|| {
        let seed: [u8; 16] = blob(ms, "seed")?
            .try_into()
            .map_err(|_| "seed is not 16 bytes")?;
        let mut m = MaskStream::new(&seed);
        for (i, want) in ms["first_values"]
            .as_array()
            .ok_or("no first_values")?
            .iter()
            .enumerate()
        {
            let got = format!("{:016x}", m.next_u64());
            if Some(got.as_str()) != want.as_str() {
                return Err(format!("mask value {i}: {got}"));
            }
        }
        Ok(())
    })();
    out.push(("he/mask_stream".into(), r));
    let ek = &doc["evaluation_key"];
    let single = std::slice::from_ref(&s);
    out.push((
        ek["id"].as_str().unwrap_or("he/eval_key").into(),
        eval_key(ek, single, &key_id, n, base_log as u32, levels, false),
    ));
    for v in doc["vectors"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push((
            v["id"].as_str().unwrap_or("he/?").into(),
            layer(v, single, 1, &key_id, n),
        ));
    }
    // Shared masks (kinds 4, 5, 6): secrets 0 .. 8 derived from the device seed as the spec
    // says; secret 0 must be the vector's secret, 1 .. 7 the listed ones.
    let mb = &doc["multibody"];
    if mb.is_null() {
        return out;
    }
    let derived = doc["secret_key_seed"]
        .as_str()
        .and_then(|h| u128::from_str_radix(h, 16).ok())
        .map(|seed| derive_secrets(&seed.to_le_bytes(), n, 8));
    let listed: Vec<Vec<u64>> = mb["secret_key_bits"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|h| bits_of(&h.as_str().and_then(hexutil::decode).unwrap_or_default(), n))
        .collect();
    let ss = match derived {
        Some(d) if d[0] == s && d[1..] == listed[..] => {
            out.push(("he/secret_derivation".into(), Ok(())));
            d
        }
        _ => {
            out.push((
                "he/secret_derivation".into(),
                Err("secrets derived from secret_key_seed differ from the listed bits".into()),
            ));
            // Go on with the listed secrets so the blobs are still checked.
            std::iter::once(s).chain(listed).collect()
        }
    };
    let ek = &mb["evaluation_key"];
    out.push((
        ek["id"].as_str().unwrap_or("he/multibody_eval_key").into(),
        eval_key(ek, &ss, &key_id, n, base_log as u32, levels, true),
    ));
    for v in mb["vectors"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push((
            v["id"].as_str().unwrap_or("he/?").into(),
            layer(v, &ss, 1, &key_id, n),
        ));
    }
    out
}

/// Parameter set 2's primes, by value as he-formats.md (§ Parameter set 2) names them.
const P2_PRIMES: [u64; 3] = [1_062_862_849, 1_063_059_457, 1_064_697_857];

/// The set-2 residue sampling rule (he-formats.md § Parameter set 2): u64 words of the TDM-HE-4
/// stream in groups of 64; from each word v the candidates `v & (2^30 − 1)`, then
/// `(v >> 32) & (2^30 − 1)`, kept when < p, until N are kept; the rest of the last group is
/// dropped.
fn rns_residues(m: &mut MaskStream, p: u64, n: usize) -> Vec<u64> {
    const LOW30: u64 = (1 << 30) - 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for _ in 0..64 {
            let v = m.next_u64();
            for c in [v & LOW30, (v >> 32) & LOW30] {
                if c < p && out.len() < n {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Negacyclic `a·s` modulo (X^N + 1, p), `s` binary, residues `a` < p < 2^30 (schoolbook; a
/// coefficient sums at most N values < 2^30, no overflow).
fn mul_binary_mod(a: &[u64], s: &[u64], p: u64) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, _) in s.iter().enumerate().filter(|(_, c)| **c == 1) {
        for (t, &v) in a.iter().enumerate() {
            let k = t + i;
            match out.get_mut(k) {
                Some(o) => *o += v,
                None => {
                    if let Some(o) = out.get_mut(k - n) {
                        *o += p - v;
                    }
                }
            }
        }
    }
    out.iter().map(|v| v % p).collect()
}

/// A set-2 evaluation key (kind 3, or kind 6 with `multi`; he-formats.md § Parameter set 2):
/// header, gadget (30, 2), counts, length `59 (+1) + 2A + 12·A·2·N·r`, every residue below
/// its prime, and for every automorphism, level j and secret i: body − A_j·s_i −
/// (Q/p_j)·τ_g(s_i) is, modulo each p_k, the same integer e with |e| ≤ 16.
fn eval_key_rns(
    v: &Value,
    ss: &[Vec<u64>],
    key_id: &[u8],
    n: usize,
    multi: bool,
) -> Result<(), String> {
    let b = blob(v, "blob")?;
    let (r, at) = open(&b, 3, multi, 2, key_id)?;
    if multi && v["bodies"].as_u64() != Some(r as u64) {
        return Err(format!(
            "key blob has {r} bodies, the vector says {}",
            v["bodies"]
        ));
    }
    if ss.len() < r {
        return Err("more bodies than secrets".into());
    }
    let seed: [u8; 16] = b
        .get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or("seed")?;
    let a_count = usize::from(*b.get(at + 18).ok_or("short")?);
    if (b[at + 16], b[at + 17]) != (30, 2) {
        return Err("gadget differs from set 2's (base log 30, L = 2)".into());
    }
    if !(1..=12).contains(&a_count) {
        return Err(format!("automorphism count {a_count}"));
    }
    let want_len = at + 19 + 2 * a_count + 12 * a_count * 2 * n * r;
    if b.len() != want_len {
        return Err(format!("evaluation key length {} != {want_len}", b.len()));
    }
    // (Q/p_j) mod p_k.
    let gadget = |j: usize, k: usize| -> u64 {
        let q_over: u128 = (0..3)
            .filter(|&i| i != j)
            .map(|i| u128::from(P2_PRIMES[i]))
            .product();
        (q_over % u128::from(P2_PRIMES[k])) as u64
    };
    let mut masks = MaskStream::new(&seed);
    let mut pos = at + 19 + 2 * a_count;
    for l in 1..=a_count {
        let g = le16(&b, at + 19 + 2 * (l - 1))?;
        if g != 2 * n / (1 << l) + 1 {
            return Err(format!("automorphism {l} is {g}"));
        }
        for j in 0..2 {
            // One mask per level (residues modulo p_0, p_1, p_2 in turn), shared by the bodies.
            let a: Vec<Vec<u64>> = P2_PRIMES
                .iter()
                .map(|&p| rns_residues(&mut masks, p, n))
                .collect();
            for (si, s) in ss[..r].iter().enumerate() {
                // τ_g(s) has coefficients in {−1, 0, 1}.
                let mut tau = vec![0i64; n];
                for (i, &c) in s.iter().enumerate() {
                    let e = (i * g) % (2 * n);
                    if e < n {
                        tau[e] += c as i64;
                    } else {
                        tau[e - n] -= c as i64;
                    }
                }
                let mut noise = vec![0i64; n];
                for (k, &p) in P2_PRIMES.iter().enumerate() {
                    let a_s = mul_binary_mod(&a[k], s, p);
                    let gk = gadget(j, k);
                    for i in 0..n {
                        let body = b
                            .get(pos..pos + 4)
                            .map(|x| u64::from(u32::from_le_bytes(x.try_into().unwrap_or([0; 4]))))
                            .ok_or("short")?;
                        pos += 4;
                        if body >= p {
                            return Err(format!(
                                "key {l} level {j} body {si} prime {k} coefficient {i}: residue {body} not below {p}"
                            ));
                        }
                        let t = tau[i].rem_euclid(p as i64) as u64;
                        let d = (body + 2 * p - a_s[i] - t * gk % p) % p;
                        let e = if d > p / 2 {
                            d as i64 - p as i64
                        } else {
                            d as i64
                        };
                        if e.abs() > 16 || (k > 0 && e != noise[i]) {
                            return Err(format!(
                                "key {l} level {j} body {si} prime {k} coefficient {i}: noise {e} is not one small integer modulo Q"
                            ));
                        }
                        noise[i] = e;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The `params2` entries: parameter set 2 (he-formats.md § Parameter set 2), under the
/// top-level device seed. Its primes (from the spec, compared with the file's), key id
/// (TDM-HE-2 with param id 2), the kind-3 and kind-6 keys as residues modulo Q, and the layer
/// vectors decrypted modulo 2^64 exactly as in set 1 (the device's blobs are unchanged).
fn check_params2(doc: &Value) -> Vec<(String, Result<(), String>)> {
    let mut out = Vec::new();
    let p2 = &doc["params2"];
    let pp = &p2["params"];
    let n = match (get_u(pp, "poly_size"), get_u(pp, "id")) {
        (Ok(n), Ok(2)) if n.is_power_of_two() && (64..=4096).contains(&n) => n,
        _ => return vec![("he/p2_params".into(), Err("bad params2.params".into()))],
    };
    let listed: Vec<u64> = pp["primes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    // Each prime splits X^N + 1 (p ≡ 1 mod 2N) and is a prime below 2^30.
    let prime_ok = |p: u64| {
        p < 1 << 30
            && p % (2 * n as u64) == 1
            && (2..)
                .take_while(|d| d * d <= p)
                .all(|d| !p.is_multiple_of(d))
    };
    out.push((
        "he/p2_params".into(),
        if listed[..] != P2_PRIMES[..] {
            Err(format!("primes {listed:?}, the spec names {P2_PRIMES:?}"))
        } else if !P2_PRIMES.iter().all(|&p| prime_ok(p)) {
            Err("a named modulus is not an NTT prime for this N".into())
        } else if (get_u(pp, "ks_base_log"), get_u(pp, "ks_levels")) != (Ok(30), Ok(2)) {
            Err("gadget differs from set 2's".into())
        } else {
            Ok(())
        },
    ));
    let Some(seed) = doc["secret_key_seed"]
        .as_str()
        .and_then(|h| u128::from_str_radix(h, 16).ok())
    else {
        out.push(("he/p2_key_id".into(), Err("no secret_key_seed".into())));
        return out;
    };
    let ss = derive_secrets(&seed.to_le_bytes(), n, 8);
    let key_id = blob(p2, "he_key_id").unwrap_or_default();
    out.push((
        "he/p2_key_id".into(),
        if key_id_of(2, &ss[0])[..] == key_id[..] {
            Ok(())
        } else {
            Err("key id (param id 2) of the seed's secret differs".into())
        },
    ));
    for (k, multi) in [
        ("evaluation_key", false),
        ("multibody_evaluation_key", true),
    ] {
        let ek = &p2[k];
        if ek.is_null() {
            continue;
        }
        out.push((
            ek["id"].as_str().unwrap_or("he/p2_eval_key").into(),
            eval_key_rns(ek, &ss, &key_id, n, multi),
        ));
    }
    for v in p2["vectors"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push((
            v["id"].as_str().unwrap_or("he/?").into(),
            layer(v, &ss, 2, &key_id, n),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn committed() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../vectors/he/kat.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn results(doc: &Value) -> std::collections::HashMap<String, Result<(), String>> {
        check_params2(doc).into_iter().collect()
    }

    /// Sets 4 bytes of `params2.<key>.blob` at byte offset `at` (u32 LE).
    fn set_u32(doc: &mut Value, key: &str, at: usize, v: u32) {
        let field = &mut doc["params2"][key]["blob"];
        let mut b = hexutil::decode(field.as_str().unwrap()).unwrap();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        *field = Value::String(hexutil::encode(&b));
    }

    const IDS: [&str; 6] = [
        "he/p2_params",
        "he/p2_key_id",
        "he/p2_eval_key_a2",
        "he/p2_multibody_eval_key_a1_r2",
        "he/p2_packed_8x3_chunk4_batch2",
        "he/p2_multibody_packed_2x3_r2_b2_batch3",
    ];

    #[test]
    fn params2_vectors_pass_from_the_spec() {
        let r = results(&committed());
        for id in IDS {
            assert_eq!(r.get(id), Some(&Ok(())), "{id}");
        }
        assert_eq!(r.len(), IDS.len());
    }

    #[test]
    fn params2_damage_is_caught() {
        let doc = committed();
        let n = 4096;
        // kind 3: bodies start at 59 + 2A = 63; a residue equal to p_1 (first coefficient of
        // prime 1's vector).
        let mut bad = doc.clone();
        set_u32(&mut bad, "evaluation_key", 63 + 4 * n, P2_PRIMES[1] as u32);
        let r = results(&bad);
        let e = r["he/p2_eval_key_a2"].clone().unwrap_err();
        assert!(e.contains("not below"), "{e}");
        assert_eq!(r["he/p2_multibody_eval_key_a1_r2"], Ok(()));
        // kind 6 (bodies at 62): secret 1's prime-2 residue of level 0 moved by 1000 (still
        // below p_2) — the noise is no longer one small integer modulo Q.
        let mut bad = doc.clone();
        let at = 62 + 4 * (3 * n + 2 * n + 5);
        let b = hexutil::decode(
            bad["params2"]["multibody_evaluation_key"]["blob"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let v = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        set_u32(
            &mut bad,
            "multibody_evaluation_key",
            at,
            ((u64::from(v) + 1000) % P2_PRIMES[2]) as u32,
        );
        let r = results(&bad);
        let e = r["he/p2_multibody_eval_key_a1_r2"].clone().unwrap_err();
        assert!(e.contains("body 1 prime 2"), "{e}");
        assert_eq!(r["he/p2_eval_key_a2"], Ok(()));
        // A prime other than the spec's, and a key id hashed with param id 1.
        let mut bad = doc.clone();
        bad["params2"]["params"]["primes"][0] = Value::from(1_062_862_849u64 + 8192);
        bad["params2"]["he_key_id"] = Value::String(doc["he_key_id"].as_str().unwrap().into());
        let r = results(&bad);
        assert!(r["he/p2_params"].is_err());
        assert!(r["he/p2_key_id"].is_err());
        // A layer vector's input blob labelled parameter set 1.
        let mut bad = doc;
        let field = &mut bad["params2"]["vectors"][0]["input_blob"];
        let mut b = hexutil::decode(field.as_str().unwrap()).unwrap();
        b[6] = 1;
        *field = Value::String(hexutil::encode(&b));
        let r = results(&bad);
        assert!(r["he/p2_packed_8x3_chunk4_batch2"].is_err());
        assert_eq!(r["he/p2_multibody_packed_2x3_r2_b2_batch3"], Ok(()));
    }
}
