//! Independent check of `vectors/he/kat.json` from the text of `specs/he-formats.md` alone:
//! key id (TDM-HE-2), mask stream (TDM-HE-4, AES-128-CTR), input and output blob layouts
//! (TDM-HE-5..7) decrypted with the vector's secret, evaluation key (TDM-HE-8). No
//! `tandem-he` code is used.
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

fn header(b: &[u8], kind: u8, key_id: &[u8]) -> Result<(), String> {
    let ok = b.get(..4) == Some(b"TDHE")
        && b.get(4) == Some(&1)
        && b.get(5) == Some(&kind)
        && b.get(6..8) == Some(&1u16.to_le_bytes()[..])
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

/// Decrypts one layer vector's input and output blobs; returns `(x, y)`.
fn layer(v: &Value, s: &[u64], key_id: &[u8], n: usize) -> Result<(), String> {
    let p = &v["plan"];
    let (n_in, n_out, chunk) = (get_u(p, "n_in")?, get_u(p, "n_out")?, get_u(p, "chunk")?);
    let (d_in, d_out) = (
        get_u(p, "delta_in_log2")? as u32,
        get_u(p, "delta_out_log2")? as u32,
    );
    let (ub, db, bb) = (
        get_u(p, "upload_bits")? as u32,
        get_u(p, "download_bits")? as u32,
        get_u(p, "body_bits")? as u32,
    );
    let packed = p["mode"] == "packed";
    // Input batch (kind 1): decrypt every chunk and read the inputs back.
    let ib = blob(v, "input_blob")?;
    header(&ib, 1, key_id)?;
    if ib.len() < 61 {
        return Err("input blob shorter than its fixed part".into());
    }
    let seed: [u8; 16] = ib
        .get(40..56)
        .and_then(|s| s.try_into().ok())
        .ok_or("seed")?;
    let (batch, chunks, bits) = (le16(&ib, 56)?, le16(&ib, 58)?, u32::from(ib[60]));
    if chunks != n_in.div_ceil(chunk) || bits != ub {
        return Err("input layout differs from the plan".into());
    }
    let mut masks = MaskStream::new(&seed);
    let mut br = Bits {
        bytes: &ib[61..],
        bit: 0,
    };
    let mut xs = Vec::new();
    for _ in 0..batch {
        let mut x = vec![0i64; n_in];
        for c in 0..chunks {
            let a = masks.poly(n);
            let a_s = mul_binary(&a, s);
            for i in 0..n {
                let phase = lift(br.get(bits)?, bits).wrapping_sub(a_s[i]);
                let m = (phase.wrapping_add(1u64 << (d_in - 1)) as i64) >> d_in;
                match x.get_mut(c * chunk + i).filter(|_| i < chunk) {
                    Some(xi) => *xi = m,
                    None if m != 0 => return Err(format!("coefficient {i} of chunk {c} is not 0")),
                    None => {}
                }
            }
        }
        xs.push(x);
    }
    br.finish()?;
    if xs != rows_of(&v["x"]) {
        return Err(format!("inputs decrypt to {xs:?}"));
    }
    // Output batch (kind 2).
    let ob = blob(v, "output_blob")?;
    header(&ob, 2, key_id)?;
    if ob.len() < 51 {
        return Err("output blob shorter than its fixed part".into());
    }
    let (batch, k, bits) = (le16(&ob, 41)?, le16(&ob, 43)?, u32::from(ob[45]));
    let body_bits = u32::from(ob[46]);
    let no = ob
        .get(47..51)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
    if no != Some(n_out) || bits != db || body_bits != bb || ob[40] != u8::from(packed) {
        return Err("output header differs from the plan".into());
    }
    let rows = n / chunk;
    let blocks = n_out.div_ceil(rows);
    let g = blocks.min(chunk);
    let per = if packed { rows * g } else { rows };
    let slot = |j: usize| {
        let (beta, r) = (j / rows, j % rows);
        if packed {
            r * chunk + (beta % g) * (chunk / g.next_power_of_two())
        } else {
            r * chunk
        }
    };
    let mut br = Bits {
        bytes: &ob[51..],
        bit: 0,
    };
    let mut ys = Vec::new();
    for _ in 0..batch {
        let mut y = vec![0i64; n_out];
        for ct in 0..k {
            let a: Vec<u64> = (0..n)
                .map(|_| br.get(bits).map(|v| lift(v, bits)))
                .collect::<Result<_, _>>()?;
            let a_s = mul_binary(&a, s);
            for (j, yj) in y
                .iter_mut()
                .enumerate()
                .take(((ct + 1) * per).min(n_out))
                .skip(ct * per)
            {
                let phase = lift(br.get(body_bits)?, body_bits).wrapping_sub(a_s[slot(j)]);
                *yj = (phase.wrapping_add(1u64 << (d_out - 1)) as i64) >> d_out;
            }
        }
        ys.push(y);
    }
    br.finish()?;
    if ys != rows_of(&v["y"]) {
        return Err(format!("outputs decrypt to {ys:?}"));
    }
    Ok(())
}

fn eval_key(
    v: &Value,
    s: &[u64],
    key_id: &[u8],
    n: usize,
    base_log: u32,
    levels: usize,
) -> Result<(), String> {
    let b = blob(v, "blob")?;
    header(&b, 3, key_id)?;
    let seed: [u8; 16] = b
        .get(40..56)
        .and_then(|s| s.try_into().ok())
        .ok_or("seed")?;
    let a_count = usize::from(*b.get(58).ok_or("short")?);
    if usize::from(b[56]) != base_log as usize || usize::from(b[57]) != levels {
        return Err("gadget differs".into());
    }
    if b.len() != 59 + 2 * a_count + 8 * a_count * levels * n {
        return Err("evaluation key length".into());
    }
    let mut masks = MaskStream::new(&seed);
    let mut at = 59 + 2 * a_count;
    for l in 1..=a_count {
        let g = le16(&b, 59 + 2 * (l - 1))?;
        if g != 2 * n / (1 << l) + 1 {
            return Err(format!("automorphism {l} is {g}"));
        }
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
            let a = masks.poly(n);
            let a_s = mul_binary(&a, s);
            let gadget = 1u64 << (64 - (j as u32 + 1) * base_log);
            for i in 0..n {
                let body = b
                    .get(at..at + 8)
                    .map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
                    .ok_or("short")?;
                at += 8;
                let e = body
                    .wrapping_sub(a_s[i])
                    .wrapping_sub(tau[i].wrapping_mul(gadget)) as i64;
                if e.unsigned_abs() > 16 {
                    return Err(format!(
                        "key {l} level {j} coefficient {i}: noise {e} outside TUniform(2^4)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs every check; one `(id, result)` per check.
pub fn check(doc: &Value) -> Vec<(String, Result<(), String>)> {
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
    let s: Vec<u64> = (0..n)
        .map(|i| bits.get(i / 8).map_or(0, |b| u64::from((b >> (i % 8)) & 1)))
        .collect();
    let key_id = blob(doc, "he_key_id").unwrap_or_default();
    // TDM-HE-2.
    let mut h = Sha256::new();
    h.update(b"tandem-he key id v1");
    h.update(1u16.to_le_bytes());
    for &c in &s {
        h.update([c as u8]);
    }
    let kid: [u8; 32] = h.finalize().into();
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
    out.push((
        ek["id"].as_str().unwrap_or("he/eval_key").into(),
        eval_key(ek, &s, &key_id, n, base_log as u32, levels),
    ));
    for v in doc["vectors"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push((
            v["id"].as_str().unwrap_or("he/?").into(),
            layer(v, &s, &key_id, n),
        ));
    }
    out
}
