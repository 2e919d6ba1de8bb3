//! The cloud's reported evaluation time (protocol version 2, issue 10) over real mutual TLS on
//! loopback: the cloud measures each layer's evaluation and reports it in the response
//! (TDM-MSG-14, TDM-EVAL-1); the device keeps a per-layer average and prices cloud time in its
//! planner from it, for nothing else (TDM-EVAL-2).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::time::Duration;

use tandem_cloud::Cloud;
use tandem_device::planner::{AutoPolicy, LinkEstimate, Plan, PlanProtection};
use tandem_device::{Device, Protection};
use tandem_model::TestSet;
use tandem_tls::DevPki;

mod common;
use common::repo;

/// Four layers: device, cloud (manifest index 1), cloud (index 2), device.
const MODEL: &str = "models/digits2";
const CLOUD_LAYERS: [u32; 2] = [1, 2];

async fn cloud(pki: &DevPki, dir: &Path, eval_delay: Duration) -> Cloud {
    let mut o = common::server_options(pki, dir, vec![repo().join(MODEL)]);
    o.fault_eval_delay = eval_delay;
    Cloud::start(o).await.unwrap()
}

async fn device(pki: &DevPki, c: &Cloud, ledger: &Path) -> Device {
    let mut o = common::device_options(pki, c, repo().join(MODEL), ledger.to_path_buf());
    o.dp.budget_rho = Some(1e6);
    Device::connect(o).await.unwrap()
}

fn inputs() -> Vec<Vec<f32>> {
    TestSet::load(&repo().join(MODEL).join("test.json"))
        .unwrap()
        .x
}

fn encrypted(p: &Plan) -> &tandem_device::planner::Candidate {
    p.candidates
        .iter()
        .find(|c| c.protection == PlanProtection::Encrypted)
        .unwrap()
}

fn reported_sum(dev: &Device) -> f64 {
    CLOUD_LAYERS
        .iter()
        .map(|l| dev.cloud_eval_ms(*l).unwrap())
        .sum()
}

/// TDM-MSG-14, TDM-EVAL-1: after an encrypted inference the device has a positive report for
/// each cloud layer and none for any other layer id; the reports fit inside the request's own
/// round trips; noised (cleartext) evaluations are averaged apart from encrypted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_reports_each_layers_evaluation_time() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let c = cloud(&pki, tmp.path(), Duration::ZERO).await;
    let x = inputs();
    let mut dev = device(&pki, &c, &tmp.path().join("ledger.bin")).await;
    for l in 0..4 {
        assert_eq!(dev.cloud_eval_ms(l), None, "nothing reported yet");
    }
    let r = dev.infer(&x[0], Protection::Encrypted).await.unwrap();
    for l in CLOUD_LAYERS {
        let ms = dev.cloud_eval_ms(l).unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "layer {l}: {ms}");
    }
    for l in [0, 3, 4, u32::MAX] {
        assert_eq!(dev.cloud_eval_ms(l), None, "layer {l} is not a cloud layer");
    }
    // The cloud's evaluations happen inside the device's round trips.
    assert!(
        reported_sum(&dev) <= r.timings.network_ms,
        "reported {} ms, round trips {} ms",
        reported_sum(&dev),
        r.timings.network_ms
    );
    for xi in &x[1..3] {
        dev.infer(xi, Protection::Encrypted).await.unwrap();
    }
    let before: Vec<_> = CLOUD_LAYERS.iter().map(|l| dev.cloud_eval_ms(*l)).collect();
    assert!(before.iter().all(|m| m.is_some_and(|v| v > 0.0)));
    // A noised request's cleartext evaluation is reported too, but is not an encrypted time.
    let r = dev
        .infer(&x[3], Protection::Noised { epsilon: 4.0 })
        .await
        .unwrap();
    assert!(r.epsilon_spent > 0.0);
    let after: Vec<_> = CLOUD_LAYERS.iter().map(|l| dev.cloud_eval_ms(*l)).collect();
    assert_eq!(before, after);
    dev.close().await;
    c.shutdown().await;
}

/// TDM-EVAL-2: the planner prices the encrypted candidate's cloud time one for one from the
/// reported averages. A cloud whose evaluations take 200 ms each (test hook, inside its timed
/// window) looks fast to the cost model before it has reported anything — the plan meets a
/// 150 ms target — and misses the target once its reports are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_prices_cloud_time_from_the_reports() {
    const DELAY_MS: f64 = 200.0;
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let c = cloud(&pki, tmp.path(), Duration::from_millis(DELAY_MS as u64)).await;
    let x = inputs();
    let mut dev = device(&pki, &c, &tmp.path().join("ledger.bin")).await;
    dev.set_auto_policy(AutoPolicy {
        latency_target_ms: Some(150.0),
        ..AutoPolicy::default()
    });
    let link = LinkEstimate {
        bandwidth_bps: 100e6,
        rtt_ms: 1.0,
    };
    let modelled = dev.plan(Some(link)).unwrap();
    assert!(
        encrypted(&modelled).meets_target,
        "the cost model alone predicts a fast cloud:\n{}",
        modelled.explain()
    );

    for xi in &x[..2] {
        dev.infer(xi, Protection::Encrypted).await.unwrap();
    }
    for l in CLOUD_LAYERS {
        let ms = dev.cloud_eval_ms(l).unwrap();
        assert!(ms >= DELAY_MS, "layer {l}: reported {ms} ms");
    }
    let a = dev.plan(Some(link)).unwrap();
    let ea = reported_sum(&dev);
    let ca = encrypted(&a);
    assert!(ca.latency_ms >= ea, "{} < {ea}", ca.latency_ms);
    assert!(!ca.meets_target, "{}", a.explain());
    assert!(
        a.explain().contains("misses latency target"),
        "{}",
        a.explain()
    );
    // Still the only feasible plan: the device offloads (lowest latency) and says why.
    assert_eq!(a.choice().unwrap().protection, PlanProtection::Encrypted);

    // One more report moves the averages; the predicted latency moves by exactly as much.
    dev.infer(&x[2], Protection::Encrypted).await.unwrap();
    let b = dev.plan(Some(link)).unwrap();
    let eb = reported_sum(&dev);
    let cb = encrypted(&b);
    assert!(
        ((ca.latency_ms - ea) - (cb.latency_ms - eb)).abs() < 1e-6,
        "latency {} -> {}, reported {ea} -> {eb}",
        ca.latency_ms,
        cb.latency_ms
    );

    // Protection::Auto plans with the same figures.
    dev.infer(&x[3], Protection::Auto).await.unwrap();
    let last = dev.last_plan().unwrap();
    assert!(encrypted(last).latency_ms >= reported_sum(&dev).min(eb));
    assert!(!encrypted(last).meets_target, "{}", last.explain());
    dev.close().await;
    c.shutdown().await;
}
