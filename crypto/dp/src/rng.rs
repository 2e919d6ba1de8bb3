//! Buffered secure random bits for the exact samplers.
//!
//! Bytes come from [`opendp::traits::samplers::fill_bytes`], which with opendp's
//! `use-openssl` feature is OpenSSL's `RAND_priv_bytes` (a CSPRNG seeded from the OS).
//! Calling it once per sampled bit costs ~0.9 µs per call, so we draw 4 KiB at a time and
//! hand out bits from the buffer. The buffer is zeroed when refilled-over and on drop, and it
//! is discarded if the process id changes (a `fork` must never replay the parent's bits).

use crate::error::{DpError, Result};
use dashu::base::BitTest;
use dashu::integer::UBig;

/// Size of the buffer refilled from OpenSSL.
pub const BUFFER_BYTES: usize = 4096;

/// A buffered source of uniformly random bits backed by opendp's secure `fill_bytes`.
pub struct SecureBits {
    buf: Box<[u8; BUFFER_BYTES]>,
    pos: usize,
    reservoir: u64,
    reservoir_bits: u32,
    pid: u32,
}

impl std::fmt::Debug for SecureBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecureBits { .. }")
    }
}

impl SecureBits {
    /// Creates a source and fills its first buffer.
    pub fn new() -> Result<Self> {
        let mut s = SecureBits {
            buf: Box::new([0u8; BUFFER_BYTES]),
            pos: BUFFER_BYTES,
            reservoir: 0,
            reservoir_bits: 0,
            pid: std::process::id(),
        };
        s.refill()?;
        Ok(s)
    }

    fn refill(&mut self) -> Result<()> {
        opendp::traits::samplers::fill_bytes(&mut self.buf[..])
            .map_err(|e| DpError::Entropy(format!("{:?}", e.variant)))?;
        self.pos = 0;
        Ok(())
    }

    /// Discards all buffered bits if the process was forked since they were drawn.
    ///
    /// Called at the start of every batch operation (cheap: one `getpid`).
    pub fn check_fork(&mut self) -> Result<()> {
        let pid = std::process::id();
        if pid != self.pid {
            self.wipe();
            self.pid = pid;
            self.refill()?;
        }
        Ok(())
    }

    fn wipe(&mut self) {
        self.buf.fill(0);
        self.reservoir = 0;
        self.reservoir_bits = 0;
        self.pos = BUFFER_BYTES;
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == BUFFER_BYTES {
                self.refill()?;
            }
            let n = (out.len() - done).min(BUFFER_BYTES - self.pos);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.buf[self.pos..self.pos + n].fill(0);
            self.pos += n;
            done += n;
        }
        Ok(())
    }

    /// A uniformly random `u64`.
    pub fn next_u64(&mut self) -> Result<u64> {
        if self.pos + 8 > BUFFER_BYTES {
            self.refill()?;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        self.buf[self.pos..self.pos + 8].fill(0);
        self.pos += 8;
        Ok(u64::from_le_bytes(b))
    }

    /// `k` uniformly random bits (`k ≤ 64`) as the low bits of a `u64`.
    pub fn bits(&mut self, k: u32) -> Result<u64> {
        if k == 0 {
            return Ok(0);
        }
        if k >= 64 {
            return self.next_u64();
        }
        if self.reservoir_bits < k {
            // Leftover bits are discarded: they are independent of everything drawn later,
            // so dropping them does not bias anything.
            self.reservoir = self.next_u64()?;
            self.reservoir_bits = 64;
        }
        let v = self.reservoir & ((1u64 << k) - 1);
        self.reservoir >>= k;
        self.reservoir_bits -= k;
        Ok(v)
    }

    /// One fair coin.
    pub fn coin(&mut self) -> Result<bool> {
        Ok(self.bits(1)? == 1)
    }

    /// Uniform on `{0, …, d−1}` by rejection from the smallest power of two ≥ d (`d ≥ 1`).
    pub fn uniform_below_u64(&mut self, d: u64) -> Result<u64> {
        if d <= 1 {
            return Ok(0);
        }
        let k = 64 - (d - 1).leading_zeros();
        loop {
            let v = self.bits(k)?;
            if v < d {
                return Ok(v);
            }
        }
    }

    /// Uniform on `{0, …, d−1}` for a 128-bit bound (`d ≥ 1`).
    pub fn uniform_below_u128(&mut self, d: u128) -> Result<u128> {
        if let Ok(d64) = u64::try_from(d) {
            return Ok(u128::from(self.uniform_below_u64(d64)?));
        }
        let k = 128 - (d - 1).leading_zeros(); // > 64 here
        loop {
            let hi = u128::from(self.bits(k - 64)?);
            let lo = u128::from(self.next_u64()?);
            let v = (hi << 64) | lo;
            if v < d {
                return Ok(v);
            }
        }
    }

    /// Uniform on `{0, …, d−1}` for an arbitrary-precision bound (`d ≥ 1`).
    pub fn uniform_below_big(&mut self, d: &UBig) -> Result<UBig> {
        if *d <= UBig::ONE {
            return Ok(UBig::ZERO);
        }
        let dm1 = d - UBig::ONE;
        let bits = dm1.bit_len();
        let nbytes = bits.div_ceil(8);
        let top_mask: u8 = if bits.is_multiple_of(8) {
            0xff
        } else {
            (1u8 << (bits % 8)) - 1
        };
        let mut bytes = vec![0u8; nbytes];
        loop {
            self.fill(&mut bytes)?;
            if let Some(last) = bytes.last_mut() {
                *last &= top_mask;
            }
            let v = UBig::from_le_bytes(&bytes);
            if v < *d {
                bytes.fill(0);
                return Ok(v);
            }
        }
    }
}

impl Drop for SecureBits {
    fn drop(&mut self) {
        self.wipe();
    }
}
