//! The early-exit cascade on the device over real mutual TLS on loopback (issue 10,
//! `specs/planner.md` §7).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use tandem_cloud::Cloud;
use tandem_device::{Answer, Device, EarlyExit, Protection};
use tandem_tls::DevPki;

mod common;

/// TDM-EXIT-1, TDM-EXIT-2: with early exit on, the device answers from the signed head
/// exactly when its confidence is at least the signed τ — nothing reaches the cloud — and
/// otherwise offloads, getting the full model's (plaintext-exact) answer; with it off (the
/// default) every input is offloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_answers_locally_only_at_or_above_tau() {
    let (dir, full, tau, test) = common::digits();
    // Every test row below τ and as many above it: both branches are exercised.
    let (below, above) = common::by_confidence(&full, tau, &test);
    assert!(!below.is_empty() && !above.is_empty());
    let rows: Vec<&Vec<f32>> = below
        .iter()
        .copied()
        .chain(above.iter().copied().take(below.len()))
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let o = common::server_options(&pki, tmp.path(), vec![dir.clone()]);
    let cloud = Cloud::start(o).await.unwrap();
    let dopts = common::device_options(&pki, &cloud, dir.clone(), tmp.path().join("ledger.bin"));
    let mut dev = Device::connect(dopts).await.unwrap();
    assert_eq!(dev.early_exit(), EarlyExit::Off, "off by default");
    assert_eq!(dev.exit_threshold(), Some(tau));

    // Off: every input goes to the cloud, whatever the head says.
    for x in rows.iter().take(4) {
        let before = cloud.metrics().requests();
        let a = dev.answer(x, Protection::Encrypted).await.unwrap();
        assert!(
            matches!(
                a,
                Answer::Offloaded {
                    confidence: None,
                    ..
                }
            ),
            "{a:?}"
        );
        assert_eq!(cloud.metrics().requests(), before + 1);
    }

    dev.set_early_exit(EarlyExit::On);
    let (mut local, mut offloaded) = (0, 0);
    for x in &rows {
        let verdict = dev.exit_confidence(x).unwrap().unwrap();
        let before = cloud.metrics().requests();
        let a = dev.answer(x, Protection::Encrypted).await.unwrap();
        match &a {
            Answer::Local {
                class, confidence, ..
            } => {
                local += 1;
                assert!(*confidence >= tau);
                assert_eq!(*class, verdict.class);
                assert_eq!(cloud.metrics().requests(), before, "nothing sent");
            }
            Answer::Offloaded {
                confidence,
                inference,
            } => {
                offloaded += 1;
                assert!(confidence.unwrap() < tau);
                assert_eq!(inference.class, full.predict_plain(x).unwrap().class);
                assert_eq!(cloud.metrics().requests(), before + 1);
            }
        }
        assert_eq!(a.is_local(), verdict.exit);
    }
    assert_eq!(offloaded, below.len());
    assert_eq!(local, rows.len() - below.len());
    assert_eq!(
        dev.ledger_records(),
        0,
        "encrypted offloads and local answers charge nothing"
    );
    dev.close().await;
    cloud.shutdown().await;
}
