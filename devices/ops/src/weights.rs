//! Reading checkpoint files: bounded reads, safetensors parsing, typed tensor extraction.
//!
//! A damaged, truncated or foreign file gives an [`OpsError`] naming the file and the tensor;
//! nothing here panics or allocates beyond the size limit of the file kind.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use safetensors::{Dtype, SafeTensors};

use crate::OpsError;

/// Default size limit for a checkpoint (`model.safetensors`): 1 GiB.
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;
/// Size limit for a JSON configuration file: 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Size limit for `tokenizer.json`: 32 MiB.
pub const MAX_TOKENIZER_BYTES: u64 = 32 << 20;

/// Reads a whole file, refusing it (before allocating) if it is larger than `limit` bytes.
///
/// # Errors
/// [`OpsError::Io`] if it cannot be read, [`OpsError::FileTooLarge`] above `limit`.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, OpsError> {
    let io = |source| OpsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > limit {
        return Err(OpsError::FileTooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let read = bytes.len() as u64;
    if read > limit {
        return Err(OpsError::FileTooLarge {
            path: path.to_path_buf(),
            size: read,
            limit,
        });
    }
    Ok(bytes)
}

/// The bytes of a safetensors checkpoint, with the path used in error messages.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Checkpoint {
    /// Reads `path` with the [`MAX_CHECKPOINT_BYTES`] limit.
    ///
    /// # Errors
    /// See [`read_limited`].
    pub fn open(path: &Path) -> Result<Self, OpsError> {
        Self::open_with_limit(path, MAX_CHECKPOINT_BYTES)
    }

    /// Reads `path`, refusing files above `limit` bytes.
    ///
    /// # Errors
    /// See [`read_limited`].
    pub fn open_with_limit(path: &Path, limit: u64) -> Result<Self, OpsError> {
        Ok(Self {
            path: path.to_path_buf(),
            bytes: read_limited(path, limit)?,
        })
    }

    /// Wraps bytes already in memory; `path` only names them in errors.
    #[must_use]
    pub fn from_bytes(path: PathBuf, bytes: Vec<u8>) -> Self {
        Self { path, bytes }
    }

    /// The path errors name.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the safetensors header (offsets, dtypes, shapes are validated by the parser).
    ///
    /// # Errors
    /// [`OpsError::SafeTensors`] for a damaged or foreign file.
    pub fn tensors(&self) -> Result<Tensors<'_>, OpsError> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|source| OpsError::SafeTensors {
            path: self.path.clone(),
            source,
        })?;
        Ok(Tensors {
            path: &self.path,
            st,
        })
    }
}

/// Parsed view of a checkpoint, handing out `f32` tensors of a required shape.
pub struct Tensors<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
}

impl std::fmt::Debug for Tensors<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensors")
            .field("path", &self.path)
            .field("tensors", &self.st.len())
            .finish()
    }
}

impl Tensors<'_> {
    /// Names of the tensors in the file, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        let mut names = self.st.names();
        names.sort_unstable();
        names
    }

    /// The tensor `name` as a `[rows, cols]` matrix.
    ///
    /// # Errors
    /// [`OpsError::MissingTensor`], [`OpsError::TensorDtype`] (not F32),
    /// [`OpsError::TensorShape`], [`OpsError::NonFinite`].
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>, OpsError> {
        let data = self.f32s(name, &[rows, cols])?;
        let found = vec![data.len()];
        Array2::from_shape_vec((rows, cols), data)
            .map_err(|_| self.shape_error(name, &[rows, cols], found))
    }

    /// The tensor `name` as a `[len]` vector.
    ///
    /// # Errors
    /// As [`Tensors::matrix`].
    pub fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>, OpsError> {
        Ok(Array1::from_vec(self.f32s(name, &[len])?))
    }

    fn shape_error(&self, name: &str, expected: &[usize], found: Vec<usize>) -> OpsError {
        OpsError::TensorShape {
            path: self.path.to_path_buf(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found,
        }
    }

    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, OpsError> {
        let view = self.st.tensor(name).map_err(|_| OpsError::MissingTensor {
            path: self.path.to_path_buf(),
            tensor: name.to_string(),
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(OpsError::TensorDtype {
                path: self.path.to_path_buf(),
                tensor: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != shape {
            return Err(OpsError::TensorShape {
                path: self.path.to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view.data();
        let n: usize = shape.iter().product();
        if data.len() != n.saturating_mul(4) {
            // The parser checks this already; a disagreement means a damaged header.
            return Err(self.shape_error(name, shape, vec![data.len() / 4]));
        }
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(OpsError::NonFinite {
                path: self.path.to_path_buf(),
                tensor: name.to_string(),
            });
        }
        Ok(values)
    }
}
