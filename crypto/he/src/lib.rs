//! Encrypted linear layers.
