//! # Tandem
//!
//! Private device–cloud collaborative inference: the facade that apps link.
//!
//! An app depends on `tandem` with `default-features = false` (the default feature `cli`
//! builds the `tandem` command-line tool and pulls its dependencies: clap, the cloud runtime,
//! the dev PKI, dataset and plotting tools). What it gets:
//!
//! * the device runtime at the top level: [`Device`], [`DeviceOptions`], [`Protection`],
//!   [`DeviceError`], … (crate [`device`]);
//! * sentence embeddings from an encoder bundle (e.g. all-MiniLM-L6-v2 imported with
//!   `tandem model import-bert`), every linear layer computed by the cloud under encryption:
//!   [`SentenceDevice`] (same [`DeviceOptions`]; blocking calls, see the second example);
//! * the signed model bundles ([`model`]), mutual TLS set-up ([`tls`]), the wire protocol
//!   types ([`protocol`]), HE ([`he`]) and DP ([`dp`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::{Path, PathBuf};
//! use tandem::{Device, DeviceOptions, Protection};
//!
//! let pki = Path::new("/etc/tandem/pki");
//! let tls = tandem::tls::client_config_from_files(&tandem::tls::ClientFiles::from_pki_dir(pki, "device-1")?)?;
//! let key = tandem::model::read_verifying_key(Path::new("/etc/tandem/model-signer.pub"))?;
//! let mut opts = DeviceOptions::new(
//!     "203.0.113.7:7443".parse()?,
//!     tls,
//!     PathBuf::from("/var/lib/app/models/digits"),
//!     key,
//!     PathBuf::from("/var/lib/app/tandem/ledger.bin"),
//! );
//! opts.state_dir = Some(PathBuf::from("/var/lib/app/tandem"));
//! let mut device = Device::connect(opts).await?;
//! let r = device.infer(&[0.0; 64], Protection::Encrypted).await?;
//! println!("class {}", r.class);
//! device.close().await;
//! # Ok(()) }
//! ```
//!
//! Embedding sentences (a blocking API: from async code, call it in
//! `tokio::task::spawn_blocking`):
//!
//! ```no_run
//! # fn run(opts: tandem::DeviceOptions) -> Result<(), tandem::DeviceError> {
//! use tandem::SentenceDevice;
//!
//! // opts as above, with bundle_dir = an encoder bundle
//! let mut device = SentenceDevice::connect(&opts)?;
//! let v: Vec<f32> = device.embed("Where is the nearest pharmacy?")?; // [hidden], unit norm
//! device.set_pipeline(4); // up to 4 sentences in flight on the one session
//! let batch = device.embed_batch(&["first sentence", "second sentence"])?; // input order
//! let st = device.stats(); // bytes, round trips, cloud-reported evaluation seconds
//! println!("{} dims, {} sentences, {} B up", v.len(), batch.len(), st.bytes_up);
//! device.close();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

/// The device runtime (everything below is re-exported at the top level too).
pub use tandem_device as device;
pub use tandem_device::{
    Device, DeviceError, DeviceOptions, DpOptions, Inference, Protection, RemoteStats, RetryPolicy,
    SentenceDevice, SentenceStats, Timings, MAX_ABS_INPUT,
};
/// Differential privacy on activations and the privacy ledger.
pub use tandem_dp as dp;
/// Exact encrypted × clear linear layers (GLWE).
pub use tandem_he as he;
pub use tandem_he::OutputMode;
/// Signed model bundles (manifest + safetensors + Ed25519).
pub use tandem_model as model;
pub use tandem_model::{read_verifying_key, ModelError, VerifyingKey};
/// The sans-IO wire protocol.
pub use tandem_protocol as protocol;
pub use tandem_protocol::ErrorCode;
/// Mutual TLS 1.3 configuration (rustls, ring).
pub use tandem_tls as tls;
