//! `Protection::Auto` and `Device::plan` over real mutual TLS on loopback (issue 10,
//! TDM-PLAN-6): the policy and the ledger's budget are never violated, and a budget about to
//! run out switches noised plans to encrypted ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::planner::{AutoPolicy, NoiseOption, PlanProtection, Refusal};
use tandem_device::{Device, DeviceError, DeviceOptions, Protection};
use tandem_model::{read_verifying_key, TestSet, VerifyingKey};
use tandem_tls::{client_config, server_config, DevPki};

/// Two cloud layers, no `[privacy]` section: every DP release uses the top-level split's
/// Gaussian mechanism, and one inference is two releases.
const MODEL: &str = "models/digits2";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vk() -> VerifyingKey {
    read_verifying_key(&repo().join("models/dev-verifying-key.txt")).unwrap()
}

async fn cloud(pki: &DevPki, dir: &Path) -> Cloud {
    cloud_for(pki, dir, MODEL).await
}

async fn cloud_for(pki: &DevPki, dir: &Path, model: &str) -> Cloud {
    let tls = server_config(pki.server_credentials()).unwrap();
    let mut o = ServerOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        vk(),
        dir.join("keys.redb"),
    );
    o.models = vec![repo().join(model)];
    Cloud::start(o).await.unwrap()
}

fn opts(pki: &DevPki, c: &Cloud, ledger: &Path, budget_rho: f64) -> DeviceOptions {
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut o = DeviceOptions::new(
        c.local_addr(),
        tls,
        repo().join(MODEL),
        vk(),
        ledger.to_path_buf(),
    );
    o.dp.budget_rho = Some(budget_rho);
    o
}

fn noised_policy() -> AutoPolicy {
    AutoPolicy {
        noised: vec![NoiseOption {
            epsilon: 4.0,
            rho: 0.0,
            accuracy: 0.9,
        }],
        ..AutoPolicy::default()
    }
}

/// TDM-PLAN-6: Auto releases noised while the budget pays for it, then switches to encrypted
/// (never a `BudgetExceeded`, never a charge the ledger refuses); `Device::plan` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_switches_noised_to_encrypted_before_the_budget_runs_out() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let c = cloud(&pki, tmp.path()).await;
    let x = TestSet::load(&repo().join(MODEL).join("test.json"))
        .unwrap()
        .x;

    // ρ of one inference at ε = 4 (both layers' releases), as the device itself prices it.
    let mut probe = Device::connect(opts(&pki, &c, &tmp.path().join("probe.bin"), 1e6))
        .await
        .unwrap();
    probe.set_auto_policy(noised_policy());
    let p = probe.plan(None).unwrap();
    let noised = p
        .candidates
        .iter()
        .find(|c| matches!(c.protection, PlanProtection::Noised { .. }))
        .unwrap();
    let rho = noised.rho;
    assert!(rho > 0.0 && rho.is_finite());
    // With the budget untouched the cheap clear release wins on any link.
    assert!(matches!(
        p.choice().unwrap().protection,
        PlanProtection::Noised { .. }
    ));
    probe.close().await;

    // A budget for two inferences and a half.
    let mut dev = Device::connect(opts(&pki, &c, &tmp.path().join("ledger.bin"), 2.5 * rho))
        .await
        .unwrap();
    dev.set_auto_policy(noised_policy());
    let mut spent = Vec::new();
    for xi in x.iter().take(4) {
        let r = dev.infer(xi, Protection::Auto).await.unwrap();
        spent.push(r.epsilon_spent);
    }
    // One release of ε = 4 per cloud layer, two cloud layers.
    assert_eq!(
        spent,
        vec![8.0, 8.0, 0.0, 0.0],
        "noised twice, then encrypted"
    );
    assert_eq!(dev.ledger_records(), 4);
    let p = dev.plan(None).unwrap();
    let noised = p
        .candidates
        .iter()
        .find(|c| matches!(c.protection, PlanProtection::Noised { .. }))
        .unwrap();
    assert_eq!(noised.refused, Some(Refusal::Budget));
    assert_eq!(p.choice().unwrap().protection, PlanProtection::Encrypted);
    assert!(p.explain().contains("refused: budget"));
    dev.close().await;
    c.shutdown().await;
}

/// TDM-PLAN-6: a policy that allows nothing the device can do is a typed refusal before
/// anything is charged or sent; a policy without DP releases never charges the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_respects_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let c = cloud(&pki, tmp.path()).await;
    let x = TestSet::load(&repo().join(MODEL).join("test.json"))
        .unwrap()
        .x;
    let mut dev = Device::connect(opts(&pki, &c, &tmp.path().join("ledger.bin"), 1e6))
        .await
        .unwrap();
    // Default policy: encrypted only.
    let r = dev.infer(&x[0], Protection::Auto).await.unwrap();
    assert_eq!(r.epsilon_spent, 0.0);
    assert!(
        r.bytes_up > 10_000,
        "an encrypted request ({} B)",
        r.bytes_up
    );
    dev.set_auto_policy(AutoPolicy {
        allow_encrypted: false,
        ..AutoPolicy::default()
    });
    let before = dev.connects();
    match dev.infer(&x[1], Protection::Auto).await {
        Err(DeviceError::NoFeasiblePlan(why)) => assert!(why.contains("refused: policy")),
        other => panic!("expected NoFeasiblePlan, got {other:?}"),
    }
    assert_eq!(dev.ledger_records(), 0);
    assert_eq!(dev.connects(), before);
    dev.close().await;
    c.shutdown().await;
}

/// TDM-PLAN-6 with a bundle of noise-trained variants (`models/digits`, `[privacy]`, discrete
/// Laplace): a release is priced as the variant's mechanism charges it (ρ = ε²/2), not as the
/// top-level split's Gaussian, and an ε without a variant (which the device would refuse) is
/// not offered at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_prices_the_variant_a_release_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let c = cloud_for(&pki, tmp.path(), "models/digits").await;
    let mut o = opts(&pki, &c, &tmp.path().join("ledger.bin"), 1e6);
    o.bundle_dir = repo().join("models/digits");
    let mut dev = Device::connect(o).await.unwrap();
    let opt = |epsilon| NoiseOption {
        epsilon,
        rho: 0.0,
        accuracy: 0.9,
    };
    dev.set_auto_policy(AutoPolicy {
        noised: vec![opt(4.0), opt(3.0)],
        ..AutoPolicy::default()
    });
    let p = dev.plan(None).unwrap();
    let noised: Vec<_> = p
        .candidates
        .iter()
        .filter_map(|c| match c.protection {
            PlanProtection::Noised { epsilon } => Some((epsilon, c.rho)),
            _ => None,
        })
        .collect();
    assert_eq!(noised.len(), 1, "ε = 3 has no variant: {noised:?}");
    assert_eq!(noised[0].0, 4.0);
    assert!(
        (noised[0].1 - 8.0).abs() < 1e-3,
        "ρ = ε²/2 ≈ 8 (the sampler's scale makes it a hair less), got {}",
        noised[0].1
    );
    let x = TestSet::load(&repo().join("models/digits/test.json"))
        .unwrap()
        .x;
    let r = dev.infer(&x[0], Protection::Auto).await.unwrap();
    assert_eq!(r.epsilon_spent, 4.0);
    dev.close().await;
    c.shutdown().await;
}
