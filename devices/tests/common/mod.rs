//! Set-up shared by the integration tests of `tandem-device`: loopback ports, the MiniLM skip
//! rule, and a loopback cloud serving a freshly signed encoder bundle over mutual TLS.
//! Each test keeps its own assertions; only set-up lives here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_cloud::{Cloud, ModelPolicy, ServerOptions};
use tandem_device::{DeviceOptions, RemoteLayers};
use tandem_he::{Context, OutputMode};
use tandem_model::{read_verifying_key, Bundle, Limits, Part, SigningKey, TestSet, VerifyingKey};
use tandem_ops::import::import_bert;
use tandem_ops::{BundleEncoder, BundleLinears};
use tandem_tls::{client_config, server_config, DevPki};

/// The repository root (bundles under `models/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The development verifying key the committed bundles are signed with.
pub fn dev_vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

/// Options of a loopback cloud (`127.0.0.1:0`) with `pki`'s server credentials, the
/// development verifying key, its key store in `dir`, serving the bundle directories `models`.
pub fn server_options(pki: &DevPki, dir: &Path, models: Vec<PathBuf>) -> ServerOptions {
    let mut o = ServerOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        server_config(pki.server_credentials()).unwrap(),
        dev_vk(),
        dir.join("keys.redb"),
    );
    o.models = models;
    o
}

/// Options of a device (`device-1` of `pki`) for the bundle `model` (development key) against
/// the cloud `c`, its privacy ledger at `ledger`.
pub fn device_options(pki: &DevPki, c: &Cloud, model: PathBuf, ledger: PathBuf) -> DeviceOptions {
    DeviceOptions::new(
        c.local_addr(),
        client_config(pki.client_credentials("device-1").unwrap()).unwrap(),
        model,
        dev_vk(),
        ledger,
    )
}

/// Any loopback port, chosen by the OS when the cloud binds (read it back with
/// `Cloud::local_addr`). A port probed free and closed before `Cloud::start` binds it (after
/// preparing the models, which takes seconds for an encoder) can be taken by another test's
/// bind in between.
pub fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The MiniLM skip rule and the tiny synthetic model of `tandem-ops`' tests (one copy for
/// both test directories).
#[path = "../../ops/tests/common/mod.rs"]
mod ops_common;
#[allow(unused_imports)]
pub use ops_common::{model_dir, tiny};

/// A sentence-transformers model imported as a signed encoder bundle (id `id`, `batch` tokens
/// per request, signing key from `seed`) in a temporary directory, and a loopback cloud
/// serving it over mTLS with a throwaway development PKI. The cloud shuts down on drop.
pub struct EncoderCloud {
    pub tmp: tempfile::TempDir,
    pub bundle: PathBuf,
    pub vk: VerifyingKey,
    pub pki: DevPki,
    pub rt: tokio::runtime::Runtime,
    cloud: Option<Cloud>,
}

impl EncoderCloud {
    /// `model` may lie inside `tmp`. `policy`: the bundle's serving policy (`None`: the
    /// cloud's default for a model given without one).
    pub fn start(
        tmp: tempfile::TempDir,
        model: &Path,
        id: &str,
        batch: usize,
        seed: u8,
        policy: Option<ModelPolicy>,
    ) -> EncoderCloud {
        let bundle = tmp.path().join("bundle");
        let key = SigningKey::from_bytes(&[seed; 32]);
        import_bert(model, &bundle, id, batch, &key).unwrap();
        let vk = key.verifying_key();
        let pki = DevPki::generate(1).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut o = ServerOptions::new(
            any_addr(),
            server_config(pki.server_credentials()).unwrap(),
            vk,
            tmp.path().join("keys.redb"),
        )
        .with_model(bundle.clone());
        if let Some(p) = policy {
            o = o.with_policy(bundle.clone(), p);
        }
        let cloud = rt.block_on(Cloud::start(o)).unwrap();
        EncoderCloud {
            tmp,
            bundle,
            vk,
            pki,
            rt,
            cloud: Some(cloud),
        }
    }

    /// The running cloud.
    pub fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().unwrap()
    }

    /// The device's mTLS client configuration (`device-1` of the PKI).
    pub fn tls(&self) -> Arc<tandem_tls::rustls::ClientConfig> {
        client_config(self.pki.client_credentials("device-1").unwrap()).unwrap()
    }

    /// The bundle's `part`, verified.
    pub fn load(&self, part: Part) -> Bundle {
        Bundle::load_part(&self.bundle, &self.vk, &Limits::default(), part).unwrap()
    }

    /// A packed-mode [`RemoteLayers`] session to the cloud for `bundle` (default parameter
    /// set, 60 s I/O timeout), its HE context, and `bundle`'s encoder with every offloaded
    /// linear encrypted through that session. No key is uploaded yet.
    pub fn remote_encoder(
        &self,
        bundle: &Bundle,
    ) -> (Arc<RemoteLayers>, Arc<Context>, BundleEncoder) {
        let remote = Arc::new(
            RemoteLayers::connect(
                self.cloud().local_addr(),
                "localhost",
                self.tls(),
                bundle,
                OutputMode::Packed,
                &[tandem_he::DEFAULT_PARAMETERS.id],
                Duration::from_secs(60),
            )
            .unwrap(),
        );
        let ctx = Arc::new(Context::new(remote.params()));
        let encoder = BundleEncoder::from_bundle(
            bundle,
            BundleLinears::Encrypted {
                ctx: ctx.clone(),
                mode: OutputMode::Packed,
                cloud: remote.clone(),
            },
        )
        .unwrap();
        (remote, ctx, encoder)
    }

    /// Stops the cloud (idempotent).
    pub fn shutdown(&mut self) {
        if let Some(c) = self.cloud.take() {
            self.rt.block_on(c.shutdown());
        }
    }
}

impl Drop for EncoderCloud {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The committed `models/digits` bundle (development key): its directory, the bundle, its
/// exit head's τ and its test set.
pub fn digits() -> (PathBuf, Bundle, f64, TestSet) {
    let dir = repo().join("models/digits");
    let full = Bundle::load(&dir, &dev_vk(), &Limits::default()).unwrap();
    let tau = full
        .exit_head()
        .expect("digits carries an exit head")
        .threshold();
    let test = TestSet::load(&dir.join("test.json")).unwrap();
    (dir, full, tau, test)
}

/// `test`'s rows split by `full`'s exit-head confidence: (below `tau`, at or above it).
pub fn by_confidence<'a>(
    full: &Bundle,
    tau: f64,
    test: &'a TestSet,
) -> (Vec<&'a Vec<f32>>, Vec<&'a Vec<f32>>) {
    test.x
        .iter()
        .partition(|x| full.exit_confidence(x).unwrap().unwrap().confidence < tau)
}
