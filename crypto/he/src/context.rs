//! Shared, immutable per-parameter-set state: the transform plan and the automorphism tables.

use crate::keys::automorphism_for_stride;
use crate::ntt::{Ntt, NttPoly};
use crate::params::ParameterSet;
use std::collections::HashMap;

/// Per-parameter-set context shared (read-only) by clients, layers and evaluations.
pub struct Context {
    params: ParameterSet,
    pub(crate) ntt: Ntt,
    /// For each packing shift k: (NTT(X^k), NTT(−X^k)).
    pub(crate) monomials: HashMap<usize, (NttPoly, NttPoly)>,
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
            let mut pos = vec![0i64; n];
            pos[k] = 1;
            let neg: Vec<i64> = pos.iter().map(|v| -v).collect();
            let (mut fp, mut fneg) = (ntt.zero(), ntt.zero());
            ntt.fwd_small(&pos, &mut fp);
            ntt.fwd_small(&neg, &mut fneg);
            monomials.insert(k, (fp, fneg));
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
}
