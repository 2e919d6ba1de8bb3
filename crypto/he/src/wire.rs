//! Compact byte formats for ciphertexts and keys (normative text: `specs/he-formats.md`).
//!
//! Every decoder takes a caller-given byte limit and checks it first, then checks the header
//! (magic, version, kind, parameter set, key id) and the counts against what the receiver
//! expects, computes the exact length those counts imply, and only then allocates.

use crate::error::HeError;
use crate::keys::KeyId;
use crate::limits::{MAX_BATCH, MAX_BODIES};
use crate::params::ParameterSet;
use crate::plan::{LayerPlan, OutputMode};

/// Magic bytes opening every blob.
pub const MAGIC: [u8; 4] = *b"TDHE";
/// Format version.
pub const VERSION: u8 = 1;
const KIND_INPUT: u8 = 1;
const KIND_OUTPUT: u8 = 2;
const KIND_EVAL_KEY: u8 = 3;
/// Multi-body kinds (r ≥ 2 bodies per shared mask, TDM-PAR-HE-1): the single-secret layout
/// with one byte r after the header.
const KIND_INPUT_MULTI: u8 = 4;
const KIND_OUTPUT_MULTI: u8 = 5;
const KIND_EVAL_KEY_MULTI: u8 = 6;
/// magic, version, kind, parameter set id (u16 LE), key id.
const HEADER_LEN: usize = 4 + 1 + 1 + 2 + 32;
const INPUT_FIXED: usize = HEADER_LEN + 16 + 2 + 2 + 1;
const OUTPUT_FIXED: usize = HEADER_LEN + 1 + 2 + 2 + 1 + 1 + 4;
const KEY_FIXED: usize = HEADER_LEN + 16 + 1 + 1 + 1;

/// An encrypted batch of input vectors: seeded GLWE ciphertexts (bodies only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedInput {
    /// Parameter set id.
    pub params_id: u16,
    /// Key the ciphertexts are encrypted under.
    pub key_id: KeyId,
    /// Seed of the mask stream (masks for block 0 chunk 0, block 0 chunk 1, …; one per batch
    /// block and chunk, shared by the block's bodies).
    pub mask_seed: u128,
    /// Number of input vectors.
    pub batch: usize,
    /// Bodies per shared mask (the plan's r = `bodies`; 1 = the single-secret format).
    pub secrets: usize,
    /// Ciphertexts per batch block (`plan.batch_rows` rows; one row in the v1 layout).
    pub chunks: usize,
    /// Bits kept of each body coefficient.
    pub bits: u32,
    /// `bodies[(block·r + i) * chunks + c]`: body i (batch rows i·b₁ .. (i+1)·b₁ of batch
    /// block `block`, secret i) of chunk c, N values of `bits` bits; a short last block has
    /// only the bodies its rows need.
    pub bodies: Vec<Vec<u64>>,
}

/// One returned ciphertext: the full (switched) mask and the output slots of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputCiphertext {
    /// N values of the output's `bits` bits.
    pub mask: Vec<u64>,
    /// One value of the output's `body_bits` bits per output carried, row-major over the block's rows present
    /// (`rows × plan.outputs_in_ciphertext(ct)`).
    pub body: Vec<u64>,
}

/// A layer's encrypted result for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedOutput {
    /// Parameter set id.
    pub params_id: u16,
    /// Key the result decrypts under.
    pub key_id: KeyId,
    /// How outputs are laid out.
    pub mode: OutputMode,
    /// Bits per mask coefficient (the plan's `download_bits`).
    pub bits: u32,
    /// Bits per body value (the plan's `body_bits`).
    pub body_bits: u32,
    /// Outputs per batch row.
    pub n_out: usize,
    /// Number of batch rows (input vectors) the result is for.
    pub batch: usize,
    /// Bodies per shared mask (the plan's r = `bodies`; 1 = the single-secret format).
    pub secrets: usize,
    /// Per batch block (`plan.block_rows()` = r·b₁ rows; one row in the v1 layout), the
    /// returned ciphertexts.
    pub rows: Vec<Vec<OutputCiphertext>>,
}

fn bit_bytes(values: usize, bits: u32) -> usize {
    (values * bits as usize).div_ceil(8)
}

/// Header bytes a blob with `r` bodies per mask adds to the single-secret layout.
fn multi_extra(r: usize) -> usize {
    usize::from(r > 1)
}

/// Wire length of an input batch for `plan`.
pub fn input_len(plan: &LayerPlan, batch: usize) -> usize {
    INPUT_FIXED
        + multi_extra(plan.bodies())
        + bit_bytes(
            plan.input_bodies(batch) * plan.in_chunks() * plan.params.poly_size,
            plan.upload_bits,
        )
}

/// Bits of an output batch's payload: the masks at `download_bits`, the bodies at
/// `body_bits` (u128: no overflow for any counts a u16 batch and u32 n_out allow).
fn output_payload_bits(plan: &LayerPlan, batch: usize) -> u128 {
    let masks =
        (plan.batch_blocks(batch) * plan.out_ciphertexts()) as u128 * plan.params.poly_size as u128;
    let bodies = batch as u128 * plan.n_out as u128;
    masks * u128::from(plan.download_bits) + bodies * u128::from(plan.body_bits)
}

/// Wire length of an output batch for `plan`.
pub fn output_len(plan: &LayerPlan, batch: usize) -> usize {
    usize::try_from(output_payload_bits(plan, batch).div_ceil(8)).map_or(usize::MAX, |b| {
        b.saturating_add(OUTPUT_FIXED + multi_extra(plan.bodies()))
    })
}

struct BitWriter {
    out: Vec<u8>,
    acc: u128,
    nbits: u32,
}

impl BitWriter {
    fn new(out: Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            nbits: 0,
        }
    }
    fn put(&mut self, v: u64, bits: u32) {
        let v = if bits >= 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        };
        self.acc |= (v as u128) << self.nbits;
        self.nbits += bits;
        while self.nbits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.nbits -= 8;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Reads fixed-width values from a slice whose length the caller has already checked.
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    acc: u128,
    nbits: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            acc: 0,
            nbits: 0,
        }
    }
    fn get(&mut self, bits: u32) -> Result<u64, HeError> {
        while self.nbits < bits {
            let Some(&b) = self.bytes.get(self.pos) else {
                return Err(HeError::Malformed {
                    what: "bit stream",
                    reason: "truncated",
                });
            };
            self.acc |= (b as u128) << self.nbits;
            self.pos += 1;
            self.nbits += 8;
        }
        let v = if bits >= 64 {
            self.acc as u64
        } else {
            (self.acc as u64) & ((1u64 << bits) - 1)
        };
        self.acc >>= bits;
        self.nbits -= bits;
        Ok(v)
    }
    /// Padding bits of the final byte must be zero, so every value has one encoding.
    fn finish(self) -> Result<(), HeError> {
        if self.pos != self.bytes.len() || self.acc != 0 {
            return Err(HeError::Malformed {
                what: "bit stream",
                reason: "trailing or non-zero padding bits",
            });
        }
        Ok(())
    }
}

/// A bounded cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeError> {
        if self.bytes.len() < n {
            return Err(HeError::Malformed {
                what: self.what,
                reason: "truncated",
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, HeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, HeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn array<const K: usize>(&mut self) -> Result<[u8; K], HeError> {
        let mut out = [0u8; K];
        out.copy_from_slice(self.take(K)?);
        Ok(out)
    }
}

/// Header; `kinds` = (single-secret kind, multi-body kind): r > 1 takes the second and
/// writes r after the header.
fn put_header(out: &mut Vec<u8>, kinds: (u8, u8), r: usize, params_id: u16, key_id: &KeyId) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(if r > 1 { kinds.1 } else { kinds.0 });
    out.extend_from_slice(&params_id.to_le_bytes());
    out.extend_from_slice(key_id);
    if r > 1 {
        out.push(r as u8);
    }
}

/// Opens a blob: limit first, then magic, version, kind and parameter set.
/// Opens a blob of the single-secret kind `kinds.0` or the multi-body kind `kinds.1`; returns
/// the body count r (1 for the first, 2..=[`MAX_BODIES`] read after the header for the
/// second, checked before anything is allocated).
fn open<'a>(
    bytes: &'a [u8],
    limit: usize,
    kinds: (u8, u8),
    params: &ParameterSet,
    what: &'static str,
) -> Result<(Reader<'a>, KeyId, usize), HeError> {
    if bytes.len() > limit {
        return Err(HeError::TooLarge {
            what,
            len: bytes.len(),
            limit,
        });
    }
    let mut r = Reader { bytes, what };
    if r.array::<4>()? != MAGIC {
        return Err(HeError::Malformed {
            what,
            reason: "bad magic",
        });
    }
    if r.u8()? != VERSION {
        return Err(HeError::Malformed {
            what,
            reason: "unsupported version",
        });
    }
    let kind = r.u8()?;
    if kind != kinds.0 && kind != kinds.1 {
        return Err(HeError::Malformed {
            what,
            reason: "wrong kind",
        });
    }
    let pid = r.u16()?;
    if pid != params.id {
        return Err(HeError::ParameterMismatch {
            expected: params.id,
            got: pid,
        });
    }
    let key_id = r.array::<32>()?;
    let bodies = if kind == kinds.1 {
        let b = usize::from(r.u8()?);
        if !(2..=MAX_BODIES).contains(&b) {
            return Err(HeError::Malformed {
                what,
                reason: "body count out of range",
            });
        }
        b
    } else {
        1
    };
    Ok((r, key_id, bodies))
}

impl EncryptedInput {
    /// Encodes to bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let values = self.bodies.iter().map(Vec::len).sum::<usize>();
        let mut out = Vec::with_capacity(INPUT_FIXED + 1 + bit_bytes(values, self.bits));
        put_header(
            &mut out,
            (KIND_INPUT, KIND_INPUT_MULTI),
            self.secrets,
            self.params_id,
            &self.key_id,
        );
        out.extend_from_slice(&self.mask_seed.to_le_bytes());
        out.extend_from_slice(&(self.batch as u16).to_le_bytes());
        out.extend_from_slice(&(self.chunks as u16).to_le_bytes());
        out.push(self.bits as u8);
        let mut w = BitWriter::new(out);
        for body in &self.bodies {
            for &v in body {
                w.put(v, self.bits);
            }
        }
        w.finish()
    }

    /// Decodes an input batch for `plan`, refusing anything but the exact expected shape.
    pub fn from_bytes(bytes: &[u8], limit: usize, plan: &LayerPlan) -> Result<Self, HeError> {
        const WHAT: &str = "encrypted input";
        let (mut r, key_id, secrets) = open(
            bytes,
            limit,
            (KIND_INPUT, KIND_INPUT_MULTI),
            &plan.params,
            WHAT,
        )?;
        let mask_seed = u128::from_le_bytes(r.array::<16>()?);
        let batch = r.u16()? as usize;
        let chunks = r.u16()? as usize;
        let bits = r.u8()? as u32;
        if batch == 0 || batch > MAX_BATCH {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "batch out of range",
            });
        }
        if chunks != plan.in_chunks() || bits != plan.upload_bits || secrets != plan.bodies() {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "layout differs from the layer plan",
            });
        }
        if bytes.len() != input_len(plan, batch) {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "length does not match the header",
            });
        }
        let n = plan.params.poly_size;
        let mut br = BitReader::new(r.bytes);
        let count = plan.input_bodies(batch) * chunks;
        let mut bodies = Vec::with_capacity(count);
        for _ in 0..count {
            let mut body = Vec::with_capacity(n);
            for _ in 0..n {
                body.push(br.get(bits)?);
            }
            bodies.push(body);
        }
        br.finish()?;
        Ok(Self {
            params_id: plan.params.id,
            key_id,
            mask_seed,
            batch,
            secrets,
            chunks,
            bits,
            bodies,
        })
    }

    /// Structural check against a plan (for values built in memory rather than decoded).
    pub fn check_against(&self, plan: &LayerPlan) -> Result<(), HeError> {
        let n = plan.params.poly_size;
        if self.params_id != plan.params.id {
            return Err(HeError::ParameterMismatch {
                expected: plan.params.id,
                got: self.params_id,
            });
        }
        if self.batch == 0
            || self.batch > MAX_BATCH
            || self.chunks != plan.in_chunks()
            || self.bits != plan.upload_bits
            || self.secrets != plan.bodies()
            || self.bodies.len() != plan.input_bodies(self.batch) * self.chunks
            || self.bodies.iter().any(|b| b.len() != n)
        {
            return Err(HeError::Malformed {
                what: "encrypted input",
                reason: "layout differs from the layer plan",
            });
        }
        Ok(())
    }
}

impl EncryptedOutput {
    /// Encodes to bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(
            &mut out,
            (KIND_OUTPUT, KIND_OUTPUT_MULTI),
            self.secrets,
            self.params_id,
            &self.key_id,
        );
        out.push(self.mode.to_u8());
        out.extend_from_slice(&(self.batch as u16).to_le_bytes());
        out.extend_from_slice(&(self.rows.first().map_or(0, Vec::len) as u16).to_le_bytes());
        out.push(self.bits as u8);
        out.push(self.body_bits as u8);
        out.extend_from_slice(&(self.n_out as u32).to_le_bytes());
        let mut w = BitWriter::new(out);
        for row in &self.rows {
            for ct in row {
                for &v in &ct.mask {
                    w.put(v, self.bits);
                }
                for &v in &ct.body {
                    w.put(v, self.body_bits);
                }
            }
        }
        w.finish()
    }

    /// Decodes a layer output for `plan`, checking it belongs to `key_id`.
    pub fn from_bytes(
        bytes: &[u8],
        limit: usize,
        plan: &LayerPlan,
        key_id: &KeyId,
    ) -> Result<Self, HeError> {
        const WHAT: &str = "encrypted output";
        let (mut r, kid, secrets) = open(
            bytes,
            limit,
            (KIND_OUTPUT, KIND_OUTPUT_MULTI),
            &plan.params,
            WHAT,
        )?;
        if &kid != key_id {
            return Err(HeError::KeyIdMismatch);
        }
        let mode = OutputMode::from_u8(r.u8()?)?;
        let batch = r.u16()? as usize;
        let cts = r.u16()? as usize;
        let bits = r.u8()? as u32;
        let body_bits = r.u8()? as u32;
        let n_out = r.u32()? as usize;
        if mode != plan.mode
            || cts != plan.out_ciphertexts()
            || bits != plan.download_bits
            || body_bits != plan.body_bits
            || n_out != plan.n_out
            || secrets != plan.bodies()
        {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "layout differs from the layer plan",
            });
        }
        if batch == 0 || batch > MAX_BATCH {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "batch out of range",
            });
        }
        if bytes.len() != output_len(plan, batch) {
            return Err(HeError::Malformed {
                what: WHAT,
                reason: "length does not match the header",
            });
        }
        let n = plan.params.poly_size;
        let mut br = BitReader::new(r.bytes);
        let blocks = plan.batch_blocks(batch);
        let mut rows = Vec::with_capacity(blocks);
        for block in 0..blocks {
            let mut row = Vec::with_capacity(cts);
            for ci in 0..cts {
                let mut mask = Vec::with_capacity(n);
                for _ in 0..n {
                    mask.push(br.get(bits)?);
                }
                let count = plan.outputs_in_ciphertext(ci) * plan.rows_in_block(batch, block);
                let mut body = Vec::with_capacity(count);
                for _ in 0..count {
                    body.push(br.get(body_bits)?);
                }
                row.push(OutputCiphertext { mask, body });
            }
            rows.push(row);
        }
        br.finish()?;
        Ok(Self {
            params_id: plan.params.id,
            key_id: kid,
            mode,
            bits,
            body_bits,
            n_out,
            batch,
            secrets,
            rows,
        })
    }

    /// Structural check against a plan and the expected key.
    pub fn check_against(&self, plan: &LayerPlan, key_id: &KeyId) -> Result<(), HeError> {
        if self.params_id != plan.params.id {
            return Err(HeError::ParameterMismatch {
                expected: plan.params.id,
                got: self.params_id,
            });
        }
        if &self.key_id != key_id {
            return Err(HeError::KeyIdMismatch);
        }
        let n = plan.params.poly_size;
        let ok = self.mode == plan.mode
            && self.bits == plan.download_bits
            && self.body_bits == plan.body_bits
            && self.n_out == plan.n_out
            && self.secrets == plan.bodies()
            && self.bits >= 1
            && self.body_bits >= 1
            && plan.delta_out_log2 >= 1
            && (1..=MAX_BATCH).contains(&self.batch)
            && self.rows.len() == plan.batch_blocks(self.batch)
            && self.rows.iter().enumerate().all(|(block, row)| {
                let present = plan.rows_in_block(self.batch, block);
                row.len() == plan.out_ciphertexts()
                    && row.iter().enumerate().all(|(i, ct)| {
                        ct.mask.len() == n
                            && ct.body.len() == plan.outputs_in_ciphertext(i) * present
                    })
            });
        if !ok {
            return Err(HeError::Malformed {
                what: "encrypted output",
                reason: "layout differs from the layer plan",
            });
        }
        Ok(())
    }
}

mod key;
pub use key::eval_key_len;
