//! Noise-trained variants in the signed bundle (issue 11, `specs/dp.md` §6.2), over real
//! mutual TLS on loopback: the device releases with the variant trained for the requested ε
//! (TDM-DPVAR-1) and refuses an ε the bundle was not trained for unless the app overrides
//! it (TDM-DPVAR-2).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceError, DeviceOptions, Protection};
use tandem_dp::DpError;
use tandem_model::{read_verifying_key, Bundle, Limits, TestSet, VerifyingKey};
use tandem_tls::{client_config, server_config, DevPki};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

/// Any loopback port, chosen when the cloud binds (a probed-and-closed port could be taken
/// by another test's bind while the cloud prepares its models).
fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_cloud(pki: &DevPki, store: &Path, model: &Path) -> Cloud {
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(any_addr(), tls, vk(), store.to_path_buf());
    o.models = vec![model.to_path_buf()];
    Cloud::start(o).await.unwrap()
}

fn dev_opts(pki: &DevPki, addr: SocketAddr, model: &Path, dir: &Path) -> DeviceOptions {
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut o = DeviceOptions::new(addr, tls, model.to_path_buf(), vk(), dir.join("ledger.bin"));
    o.dp.budget_rho = Some(1e9);
    o
}

fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A bundle trained for ε = 8 only refuses a release at ε = 4 (typed, before anything is
/// charged or sent) and releases at ε = 8; with `allow_untrained_epsilon` the ε = 4 release
/// goes out with the ε = 8 variant's layers, charged at ε = 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_trained_for_eps_8_refuses_eps_4_unless_overridden() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("digits-eps8");
    copy_bundle(&repo().join("models/digits"), &model);
    tandem_model::retain_variants(&model, &[8.0], &tandem_model::dev_signing_key()).unwrap();
    let b = Bundle::load(&model, &vk(), &Limits::default()).unwrap();
    let eps: Vec<f64> = b.variants().iter().map(|v| v.epsilon()).collect();
    assert_eq!(eps, [8.0]);

    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb"), &model).await;
    let x = TestSet::load(&model.join("test.json")).unwrap().x[0].clone();
    let mut dev = Device::connect(dev_opts(&pki, cloud.local_addr(), &model, tmp.path()))
        .await
        .unwrap();
    for p in [
        Protection::Noised { epsilon: 4.0 },
        Protection::NoisedEncrypted { epsilon: 4.0 },
    ] {
        match dev.infer(&x, p).await {
            Err(DeviceError::Dp(DpError::UntrainedEpsilon { requested, trained })) => {
                assert_eq!(requested, 4.0);
                assert_eq!(trained, [8.0]);
            }
            other => panic!("{p:?}: expected UntrainedEpsilon, got {other:?}"),
        }
    }
    assert_eq!(dev.ledger_records(), 0, "nothing charged");
    assert_eq!(cloud.metrics().requests(), 0, "nothing sent");
    let r = dev
        .infer(&x, Protection::Noised { epsilon: 8.0 })
        .await
        .unwrap();
    assert_eq!(r.epsilon_spent, 8.0);
    assert_eq!(dev.ledger_records(), 1);
    dev.close().await;

    let mut o = dev_opts(&pki, cloud.local_addr(), &model, tmp.path());
    o.dp.allow_untrained_epsilon = true;
    let mut dev = Device::connect(o).await.unwrap();
    // The override never covers an ε that is no ε at all: typed, before any charge or send.
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        match dev.infer(&x, Protection::Noised { epsilon: bad }).await {
            Err(DeviceError::Dp(DpError::InvalidParameter(m))) => {
                assert!(m.contains("epsilon must be finite and > 0"), "{m}");
            }
            other => panic!("epsilon {bad}: expected InvalidParameter, got {other:?}"),
        }
    }
    assert_eq!(dev.ledger_records(), 1, "invalid epsilon: nothing charged");
    assert_eq!(
        dev.variant_index(Protection::Noised { epsilon: 4.0 })
            .unwrap(),
        Some(0)
    );
    let r = dev
        .infer(&x, Protection::Noised { epsilon: 4.0 })
        .await
        .unwrap();
    assert_eq!(r.epsilon_spent, 4.0);
    assert_eq!(dev.ledger_records(), 2);
    dev.close().await;
    cloud.shutdown().await;
}

/// Noised inference over mTLS on the whole digits test split at ε = 8 uses the ε = 8 variant
/// (the variant's cloud layer id) and reaches the accuracy the signed manifest records for it
/// (measured by `tandem privacy-train` through the same pipeline, 5 noise draws): within 0.12.
/// The top-level split with Gaussian noise, what the device released before, scores
/// ≈ 0.12–0.19 here. A few NoisedEncrypted inferences on the same variant go through the
/// HE-served variant layer.
///
/// The noise comes from the OS, so the accuracy varies from run to run: over 300 runs
/// (2026-12-01) its mean was 0.7794 and its standard deviation 0.0162, against a recorded
/// 0.7637 (itself a 5-draw estimate, ≈ 1 point under the mean). The band was 0.08: 4.0
/// standard deviations above the mean, a false failure about once in 28 000 runs. At 0.12 it
/// is 6.4 above and 8.4 below (< 1e-10 per run, normal tails), still far from the 0.12–0.19
/// of the wrong release path. Re-derive it if the bundle is retrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noised_inference_uses_the_trained_variant_and_its_accuracy() {
    let model = repo().join("models/digits");
    let tmp = tempfile::tempdir().unwrap();
    let b = Bundle::load(&model, &vk(), &Limits::default()).unwrap();
    let v = b.variant_for(8.0).expect("digits has an ε = 8 variant");
    let recorded = b
        .privacy()
        .unwrap()
        .variants
        .iter()
        .find(|s| s.epsilon == 8.0)
        .and_then(|s| s.test_accuracy)
        .unwrap();
    assert!(
        v.layer_id() >= b.layers().len(),
        "variant ids follow the top-level layers"
    );

    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb"), &model).await;
    let test = TestSet::load(&model.join("test.json")).unwrap();
    let mut dev = Device::connect(dev_opts(&pki, cloud.local_addr(), &model, tmp.path()))
        .await
        .unwrap();
    let p = Protection::Noised { epsilon: 8.0 };
    let i = dev.variant_index(p).unwrap().unwrap();
    assert_eq!(b.variants()[i].layer_id(), v.layer_id());
    let mut ok = 0usize;
    for (x, &y) in test.x.iter().zip(&test.y) {
        let r = dev.infer(x, p).await.unwrap();
        ok += usize::from(r.class == y);
    }
    let acc = ok as f64 / test.y.len() as f64;
    eprintln!("noised ε = 8 over mTLS: accuracy {acc:.4}, recorded {recorded:.4}");
    assert!(
        (acc - recorded).abs() <= 0.12,
        "accuracy over mTLS {acc} vs recorded {recorded}"
    );
    assert!(acc >= 0.65, "accuracy {acc}");
    for x in test.x.iter().take(3) {
        let r = dev
            .infer(x, Protection::NoisedEncrypted { epsilon: 8.0 })
            .await
            .unwrap();
        assert!(r.class < 10);
        assert!(r.key_upload_bytes > 0 || r.bytes_up > 0);
    }
    dev.close().await;
    cloud.shutdown().await;
}

/// The default budget (`DpOptions::default`: ε = 8 per device per day at δ = 1e-5,
/// `specs/dp.md` §5.1) allows one ε = 8 discrete Laplace release (the ledger's pure track:
/// Σε = 8; the zCDP track alone, ρ = 32 against ρ ≈ 1.23, would refuse it) and refuses a
/// second one before anything is sent. The device reports ε spent = 8, not the ≈ 70 that
/// the zCDP conversion of ρ = 32 gives (TDM-LEDG-5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_budget_is_one_eps_8_release_a_day() {
    let model = repo().join("models/digits");
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb"), &model).await;
    let x = TestSet::load(&model.join("test.json")).unwrap().x[0].clone();
    let mut o = dev_opts(&pki, cloud.local_addr(), &model, tmp.path());
    o.dp = tandem_device::DpOptions::default();
    assert_eq!(o.dp.budget_epsilon, 8.0);
    let mut dev = Device::connect(o).await.unwrap();
    let p = Protection::Noised { epsilon: 8.0 };
    dev.infer(&x, p).await.unwrap();
    let spent = dev.epsilon_spent_total().unwrap();
    assert!((7.99..=8.0 + 1e-9).contains(&spent), "ε spent {spent}");
    match dev.infer(&x, p).await {
        Err(DeviceError::BudgetExceeded {
            requested_epsilon,
            budget_epsilon,
            ..
        }) => {
            assert_eq!(requested_epsilon, 8.0);
            assert_eq!(budget_epsilon, Some(8.0));
        }
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
    assert_eq!(dev.ledger_records(), 1);
    assert_eq!(
        cloud.metrics().requests(),
        1,
        "the refused release was not sent"
    );
    dev.close().await;
    cloud.shutdown().await;
}
