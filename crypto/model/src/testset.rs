//! The exported test split a demo evaluates (`test.json` next to a bundle).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::read_limited;
use crate::error::{io_err, ModelError, Result};

/// Largest test-set file accepted.
const MAX_TEST_SET_BYTES: u64 = 32 * 1024 * 1024;

/// A labelled test split with raw (un-standardised) features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestSet {
    /// Dataset name.
    pub dataset: String,
    /// How the split was made (seed and proportions).
    pub split: String,
    /// Row indices of the test examples in the original data file (0-based, data rows only).
    pub indices: Vec<usize>,
    /// Raw feature vectors.
    pub x: Vec<Vec<f32>>,
    /// Labels.
    pub y: Vec<usize>,
}

impl TestSet {
    /// Reads and checks a `test.json` file.
    pub fn load(path: &Path) -> Result<TestSet> {
        let bytes = read_limited(path, MAX_TEST_SET_BYTES)?;
        let err = |reason: String| ModelError::TestSet {
            path: path.to_path_buf(),
            reason,
        };
        let t: TestSet = serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
        if t.x.len() != t.y.len() || t.indices.len() != t.y.len() || t.y.is_empty() {
            return Err(err(
                "x, y and indices must have the same non-zero length".into()
            ));
        }
        let w = t.x.first().map_or(0, Vec::len);
        if t.x
            .iter()
            .any(|r| r.len() != w || r.iter().any(|v| !v.is_finite()))
        {
            return Err(err("ragged or non-finite feature rows".into()));
        }
        Ok(t)
    }

    /// Writes the test set as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| ModelError::TestSet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(io_err(path))
    }
}
