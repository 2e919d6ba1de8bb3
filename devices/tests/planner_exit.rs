//! `Protection::Auto` through the bundle's signed exit head, over real mutual TLS on loopback
//! (issue 10: "answering locally is a candidate only when the early-exit head is confident";
//! TDM-PLAN-6, TDM-EXIT-1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use tandem_cloud::Cloud;
use tandem_device::planner::{AutoPolicy, PlanProtection, Refusal};
use tandem_device::{Answer, Device, EarlyExit, Protection};
use tandem_tls::DevPki;

mod common;

/// With early exit on, `answer(x, Auto)` answers on the device — nothing reaches the cloud —
/// exactly for the inputs whose exit-head confidence is at least the signed τ, and offloads
/// (encrypted, the plaintext reference's class) the others; `last_plan` says which happened
/// and why. With early exit off, Auto never answers locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_locally_only_when_the_exit_head_is_confident() {
    let (dir, full, tau, test) = common::digits();
    let (below, above) = common::by_confidence(&full, tau, &test);
    assert!(below.len() >= 3 && above.len() >= 3);
    // Interleaved, so the device's learnt state (local time, stage times) changes between
    // both kinds of request.
    let rows: Vec<&Vec<f32>> = below
        .iter()
        .zip(&above)
        .take(3)
        .flat_map(|(b, a)| [*b, *a])
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let o = common::server_options(&pki, tmp.path(), vec![dir.clone()]);
    let cloud = Cloud::start(o).await.unwrap();
    let ledger = tmp.path().join("ledger.bin");
    let mut dev = Device::connect(common::device_options(&pki, &cloud, dir.clone(), ledger))
        .await
        .unwrap();

    // Off (the default): a confident input is still offloaded, and the plan says the head
    // was not consulted.
    let before = cloud.metrics().requests();
    let a = dev.answer(above[0], Protection::Auto).await.unwrap();
    assert!(!a.is_local());
    assert_eq!(cloud.metrics().requests(), before + 1);
    let p = dev.last_plan().unwrap();
    assert_eq!(p.candidates[0].refused, Some(Refusal::Policy));
    assert!(p.explain().contains("early exit: not evaluated"));

    dev.set_early_exit(EarlyExit::On);
    // What Auto would do for a confident input, before doing it: local is the choice.
    let p = dev.plan_for(above[0], None).unwrap();
    assert!(p.answers_locally(), "{}", p.explain());
    assert_eq!(dev.local_answer_ms(), None, "not measured yet");

    let (mut local, mut offloaded) = (0, 0);
    for x in &rows {
        let verdict = full.exit_confidence(x).unwrap().unwrap();
        let before = cloud.metrics().requests();
        let a = dev.answer(x, Protection::Auto).await.unwrap();
        let p = dev.last_plan().unwrap().clone();
        match &a {
            Answer::Local {
                class, confidence, ..
            } => {
                local += 1;
                assert!(*confidence >= tau);
                assert_eq!(*class, verdict.class);
                assert_eq!(cloud.metrics().requests(), before, "nothing sent");
                assert!(p.answers_locally());
                assert!(p.explain().contains("answered on the device, nothing sent"));
            }
            Answer::Offloaded {
                confidence,
                inference,
            } => {
                offloaded += 1;
                assert!(confidence.unwrap() < tau);
                assert_eq!(inference.class, full.predict_plain(x).unwrap().class);
                assert_eq!(inference.epsilon_spent, 0.0);
                assert_eq!(cloud.metrics().requests(), before + 1);
                assert_eq!(p.candidates[0].refused, Some(Refusal::NotConfident));
                assert_eq!(
                    p.choice().unwrap().protection,
                    PlanProtection::Encrypted,
                    "{}",
                    p.explain()
                );
                assert!(p.explain().contains("not confident"));
            }
        }
        assert_eq!(
            a.is_local(),
            verdict.exit,
            "local exactly when confidence >= tau"
        );
    }
    assert_eq!((local, offloaded), (3, 3));
    // The local candidate is now priced with the device's own measured local answers.
    let ms = dev.local_answer_ms().expect("measured");
    assert!(ms > 0.0 && ms.is_finite());
    let p = dev.plan_for(above[1], None).unwrap();
    assert_eq!(p.candidates[0].latency_ms, ms);

    // The app accepts the device model's accuracy: the head answers even an unconfident
    // input, with early exit off; `infer(x, Auto)` (which cannot answer locally) still
    // offloads.
    dev.set_early_exit(EarlyExit::Off);
    dev.set_auto_policy(AutoPolicy {
        accept_local_accuracy: Some(0.9),
        ..AutoPolicy::default()
    });
    let before = cloud.metrics().requests();
    let a = dev.answer(below[0], Protection::Auto).await.unwrap();
    assert!(a.is_local(), "{}", dev.last_plan().unwrap().explain());
    assert_eq!(
        a.class(),
        full.exit_confidence(below[0]).unwrap().unwrap().class
    );
    assert_eq!(cloud.metrics().requests(), before, "nothing sent");
    assert_eq!(dev.last_plan().unwrap().candidates[0].accuracy, 0.9);
    let r = dev.infer(below[0], Protection::Auto).await.unwrap();
    assert_eq!(r.class, full.predict_plain(below[0]).unwrap().class);
    assert_eq!(cloud.metrics().requests(), before + 1);
    assert_eq!(dev.ledger_records(), 0);
    dev.close().await;
    cloud.shutdown().await;
}
