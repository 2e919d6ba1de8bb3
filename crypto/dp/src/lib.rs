//! Differential privacy for device activations (work in progress).
