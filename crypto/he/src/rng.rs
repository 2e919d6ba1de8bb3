//! Randomness: seeded mask streams (reproducible by the server) and secret noise.

use tfhe::core_crypto::commons::math::random::{RandomGenerator, Seed};
use tfhe::core_crypto::prelude::{new_seeder, DefaultRandomGenerator, TUniform};

/// A mask stream: uniform u64s from tfhe's AES-CTR CSPRNG keyed by a public 128-bit seed.
pub struct MaskGenerator(RandomGenerator<DefaultRandomGenerator>);

impl MaskGenerator {
    /// Fills `out` with the next uniform values of the stream.
    pub fn fill(&mut self, out: &mut [u64]) {
        self.0.fill_slice_with_random_uniform(out);
    }
}

/// The mask stream for `seed`.
pub fn mask_generator(seed: u128) -> MaskGenerator {
    MaskGenerator(RandomGenerator::new(Seed(seed)))
}

/// A fresh 128-bit seed from the operating system (tfhe's seeder: rdseed or /dev/random).
pub fn fresh_seed() -> u128 {
    new_seeder().seed().0
}

/// Secret noise, seeded from the operating system.
pub struct NoiseSource(RandomGenerator<DefaultRandomGenerator>);

impl Default for NoiseSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NoiseSource {
    /// A noise source with a fresh OS seed.
    pub fn new() -> Self {
        Self(RandomGenerator::new(Seed(fresh_seed())))
    }

    /// `n` samples of TUniform(2^bound_log2) as values modulo 2^64.
    pub fn tuniform(&mut self, n: usize, bound_log2: u32) -> Vec<u64> {
        let mut out = vec![0u64; n];
        self.0
            .fill_slice_with_random_from_distribution(&mut out, TUniform::<u64>::new(bound_log2));
        out
    }
}
