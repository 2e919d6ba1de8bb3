//! The evaluation-key blob (kinds 3 and 6, `specs/he-formats.md`): encoding, and decoding
//! with its limit-first checks (split from wire.rs: pure move).

use super::{multi_extra, open, put_header, KEY_FIXED, KIND_EVAL_KEY, KIND_EVAL_KEY_MULTI};
use crate::error::HeError;
use crate::keys::{automorphism_for_stride, EvaluationKey};
use crate::params::ParameterSet;

/// Wire length of an evaluation key with `count` automorphisms and `bodies` bodies (secrets)
/// per level.
pub fn eval_key_len(params: &ParameterSet, count: usize, bodies: usize) -> usize {
    KEY_FIXED
        + multi_extra(bodies)
        + 2 * count
        + count * params.ks_levels as usize * params.poly_size * key_coeff_bytes(params) * bodies
}

/// Bytes per key-body coefficient: a u64 modulo 2^64 (set 1), or three u32 residues modulo
/// p_0, p_1, p_2 (set 2, `Modulus::Rns3`; prime-major per body on the wire as in memory).
fn key_coeff_bytes(params: &ParameterSet) -> usize {
    match params.modulus {
        crate::params::Modulus::Pow2_64 => 8,
        crate::params::Modulus::Rns3 => 12,
    }
}

impl EvaluationKey {
    /// Encodes to bytes (bodies at full 64-bit width: rounding them would add key-switch noise).
    pub fn to_bytes(&self) -> Vec<u8> {
        let p = &self.params;
        let mut out = Vec::with_capacity(eval_key_len(p, self.automorphisms.len(), self.secrets));
        put_header(
            &mut out,
            (KIND_EVAL_KEY, KIND_EVAL_KEY_MULTI),
            self.secrets,
            p.id,
            &self.key_id,
        );
        out.extend_from_slice(&self.mask_seed.to_le_bytes());
        out.push(p.ks_base_log as u8);
        out.push(p.ks_levels as u8);
        out.push(self.automorphisms.len() as u8);
        for &g in &self.automorphisms {
            out.extend_from_slice(&(g as u16).to_le_bytes());
        }
        let rns = p.modulus == crate::params::Modulus::Rns3;
        for levels in &self.bodies {
            for body in levels {
                for &v in body {
                    if rns {
                        out.extend_from_slice(&(v as u32).to_le_bytes());
                    } else {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// Decodes an evaluation key under `params`, with a byte limit.
    pub fn from_bytes(bytes: &[u8], limit: usize, params: &ParameterSet) -> Result<Self, HeError> {
        const WHAT: &str = "evaluation key";
        let (mut r, key_id, secrets) = open(
            bytes,
            limit,
            (KIND_EVAL_KEY, KIND_EVAL_KEY_MULTI),
            params,
            WHAT,
        )?;
        let mask_seed = u128::from_le_bytes(r.array::<16>()?);
        if r.u8()? as u32 != params.ks_base_log || r.u8()? as u32 != params.ks_levels {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "gadget differs from the parameter set",
            });
        }
        let count = r.u8()? as usize;
        if count == 0 || count > params.log2_poly_size() as usize {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "automorphism count out of range",
            });
        }
        if bytes.len() != eval_key_len(params, count, secrets) {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "length does not match the header",
            });
        }
        let n = params.poly_size;
        let mut automorphisms = Vec::with_capacity(count);
        // Keys cover strides 2^l₀, 2^(l₀+1), …, 2^(l₀+count−1) in that order, with
        // 1 ≤ l₀ ≤ max_key_first_level(N) (the smaller strides are powers of the first).
        let mut first = 0u32;
        for k in 0..count {
            let g = r.u16()? as usize;
            if k == 0 {
                first = crate::keys::stride_level(n, g).unwrap_or(0);
                if first == 0
                    || first > crate::keys::max_key_first_level(n)
                    || first as usize + count - 1 > params.log2_poly_size() as usize
                {
                    return Err(HeError::Malformed {
                        what: WHAT,
                        reason: "unexpected first automorphism",
                    });
                }
            }
            if g != automorphism_for_stride(n, 1 << (first as usize + k)) {
                return Err(HeError::Malformed {
                    what: WHAT,
                    reason: "unexpected automorphism",
                });
            }
            automorphisms.push(g);
        }
        let mut bodies = Vec::with_capacity(count);
        for _ in 0..count {
            let mut levels = Vec::with_capacity(params.ks_levels as usize);
            for _ in 0..params.ks_levels {
                if params.modulus == crate::params::Modulus::Rns3 {
                    let primes = crate::rns::Rns3::get().p;
                    let raw = r.take(n * 12 * secrets)?;
                    let mut level = Vec::with_capacity(3 * n * secrets);
                    for (k, c) in raw.chunks_exact(4).enumerate() {
                        let v = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                        // Residue vectors of N values, primes 0, 1, 2 in turn, per body.
                        if v >= primes[(k / n) % 3] {
                            return Err(HeError::Malformed {
                                what: WHAT,
                                reason: "key residue not below its prime",
                            });
                        }
                        level.push(v);
                    }
                    levels.push(level);
                    continue;
                }
                let raw = r.take(n * 8 * secrets)?;
                levels.push(
                    raw.chunks_exact(8)
                        .map(|c| {
                            u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                );
            }
            bodies.push(levels);
        }
        Ok(Self {
            params: *params,
            key_id,
            mask_seed,
            secrets,
            automorphisms,
            bodies,
        })
    }
}
