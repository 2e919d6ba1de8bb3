//! Shared, immutable per-parameter-set state: the transform plan and the automorphism tables.

use crate::keys::automorphism_for_stride;
use crate::ntt::{Ntt, NttPoly};
use crate::params::ParameterSet;
use std::collections::HashMap;

/// Per-parameter-set context shared (read-only) by clients, layers and evaluations.
pub struct Context {
    params: ParameterSet,
    pub(crate) ntt: Ntt,
    /// For each packing shift k: NTT(N·X^k), for [`Ntt::mul_assign_normalize`] (whose N⁻¹
    /// cancels the N: the product is exactly the shift by X^k).
    pub(crate) monomials: HashMap<usize, NttPoly>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("params", &self.params.name)
            .finish()
    }
}

impl Context {
    /// Builds the context: one transform plan and every automorphism a packing tree can use.
    pub fn new(params: ParameterSet) -> Self {
        let n = params.poly_size;
        // ALL_PARAMETER_SETS only holds ring sizes tfhe-ntt supports (checked by a test).
        let Some(mut ntt) = Ntt::new(n) else {
            unreachable!("unsupported ring size in a frozen parameter set")
        };
        let mut monomials = HashMap::new();
        let mut stride = 2;
        while stride <= n {
            ntt.register_automorphism(automorphism_for_stride(n, stride));
            let k = stride / 2;
            let mut scaled = vec![0i64; n];
            // N ≤ 2^16 < every prime: a small value for fwd_small.
            scaled[k] = n as i64;
            let mut f = ntt.zero();
            ntt.fwd_small(&scaled, &mut f);
            monomials.insert(k, f);
            stride *= 2;
        }
        Self {
            params,
            ntt,
            monomials,
        }
    }

    /// The parameter set.
    pub fn params(&self) -> ParameterSet {
        self.params
    }

    /// Primes of the server's NTT-domain ciphertexts for an int8 layer: 3 (residues modulo Q)
    /// for parameter set 2, 4 for set 1 (TDM-PAR-HE-4).
    pub(crate) fn int8_primes(&self) -> usize {
        match self.params.modulus {
            crate::params::Modulus::Rns3 => crate::ntt::PRIMES_RNS,
            crate::params::Modulus::Pow2_64 => crate::ntt::PRIMES_INT8,
        }
    }
}
