//! Limits applied to untrusted certificate, key and CRL input. All in one place.

/// Largest PEM file (certificate chain, key, CA bundle or CRL) that the loaders read, in bytes.
/// A CRL listing tens of thousands of revoked devices still fits.
pub const MAX_PEM_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Largest number of certificates accepted in one chain or CA bundle file.
pub const MAX_CERTIFICATES_PER_FILE: usize = 64;

/// Largest number of CRLs accepted in one file.
pub const MAX_CRLS_PER_FILE: usize = 64;

/// Longest subject common name kept for logs, in characters; longer names are truncated.
pub const MAX_LOGGED_COMMON_NAME: usize = 128;

/// Longest device name accepted by the development PKI (also a file name).
pub const MAX_DEVICE_NAME_LEN: usize = 64;

/// Largest number of devices `pki::init` / `DevPki::generate` will create in one call.
pub const MAX_DEV_PKI_DEVICES: usize = 100_000;

/// How far in the future a CRL's `thisUpdate` may be (clock difference between this machine
/// and the CA), in seconds. A CRL dated later is refused at load time.
pub const CRL_CLOCK_SKEW_SECS: i64 = 300;
