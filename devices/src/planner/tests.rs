#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use super::*;
use proptest::prelude::*;

/// Sizes in the ratio the digits bundle's 32→16 cloud layer has under the default parameters
/// (no-key moves ~13× the bytes of packed, and saves the cloud its key switches).
fn model(cloud_packed_ms: f64, cloud_nokey_ms: f64) -> ModelCosts {
    ModelCosts {
        local_macs: 64 * 32 + 32 * 16 + 16 * 10,
        local_accuracy: 0.95,
        splits: vec![SplitCosts {
            depth: 1,
            device_prefix_macs: 64 * 32,
            device_suffix_macs: 16 * 10,
            offload_accuracy: 0.97,
            modes: vec![
                ModeCosts {
                    mode: OutputMode::Packed,
                    upload_bytes: 20_000,
                    download_bytes: 6_000,
                    key_bytes: 500_000,
                    key_registered: true,
                    cloud_ms: cloud_packed_ms,
                    encrypt_ms: 1.0,
                    decrypt_ms: 0.5,
                },
                ModeCosts {
                    mode: OutputMode::NoKey,
                    upload_bytes: 20_000,
                    download_bytes: 320_000,
                    key_bytes: 0,
                    key_registered: true,
                    cloud_ms: cloud_nokey_ms,
                    encrypt_ms: 1.0,
                    decrypt_ms: 2.0,
                },
            ],
            clear_upload_bytes: 200,
            clear_download_bytes: 100,
            clear_cloud_ms: 0.05,
            noise_ms: 0.2,
        }],
    }
}

fn inputs(link: LinkEstimate) -> PlanInputs {
    PlanInputs {
        model: model(30.0, 3.0),
        device: DeviceProfile {
            ns_per_mac: 1.0,
            radio: Radio::Wifi,
        },
        link,
        policy: AppPolicy {
            allow_local: true,
            allow_encrypted: true,
            noised: vec![],
            noised_encrypted: vec![],
            output_modes: vec![OutputMode::Packed, OutputMode::NoKey],
            accuracy_floor: 0.0,
            latency_target_ms: None,
        },
        remaining_rho: 1.0,
        objective: Objective::Latency,
        exit: None,
    }
}

fn link(mbit: f64, rtt_ms: f64) -> LinkEstimate {
    LinkEstimate {
        bandwidth_bps: mbit * 1e6,
        rtt_ms,
    }
}

#[test]
fn no_link_picks_local() {
    let mut inp = inputs(LinkEstimate::NONE);
    inp.policy.allow_local = true;
    let p = plan(&inp);
    assert_eq!(
        p.choice().map(|c| c.protection),
        Some(PlanProtection::Local)
    );
    // Every offload candidate is refused for want of a link.
    assert!(p
        .candidates
        .iter()
        .filter(|c| c.split.is_some())
        .all(|c| c.refused == Some(Refusal::NoLink)));
}

#[test]
fn no_link_and_no_local_plans_nothing() {
    let mut inp = inputs(LinkEstimate::NONE);
    inp.policy.allow_local = false;
    assert_eq!(plan(&inp).chosen, None);
}

#[test]
fn fast_link_slow_cloud_picks_nokey() {
    let mut inp = inputs(link(1000.0, 1.0));
    inp.policy.allow_local = false;
    inp.model = model(200.0, 20.0);
    let c = plan(&inp).choice().cloned();
    let c = c.expect("a choice");
    assert_eq!(c.protection, PlanProtection::Encrypted);
    assert_eq!(c.mode, Some(OutputMode::NoKey));
}

#[test]
fn slow_link_picks_packed() {
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.allow_local = false;
    let c = plan(&inp).choice().cloned().expect("a choice");
    assert_eq!(c.protection, PlanProtection::Encrypted);
    assert_eq!(c.mode, Some(OutputMode::Packed));
}

/// Issue 10: answering locally is a candidate only when the exit head is confident (or the app
/// accepts the device model's accuracy); below τ it is refused with its own reason, and the
/// explanation says which happened.
#[test]
fn exit_head_makes_local_a_candidate_only_when_confident() {
    let mut inp = inputs(link(10.0, 50.0));
    inp.policy.allow_local = false;
    let verdict = |confidence| ExitVerdict {
        confidence,
        threshold: 0.9,
        local_ms: Some(0.02),
    };
    inp.exit = Some(verdict(0.95));
    let p = plan(&inp);
    assert!(p.answers_locally(), "{}", p.explain());
    assert_eq!(p.candidates[0].latency_ms, 0.02, "the measured local time");
    assert!(p.explain().contains(">= tau 0.9000"));
    assert!(p.explain().contains("answered on the device"));
    // Exactly τ is confident (TDM-EXIT-1: confidence >= τ).
    inp.exit = Some(verdict(0.9));
    assert!(plan(&inp).answers_locally());

    inp.exit = Some(verdict(0.89));
    let p = plan(&inp);
    assert!(!p.answers_locally());
    assert_eq!(p.candidates[0].refused, Some(Refusal::NotConfident));
    assert_eq!(
        p.choice().map(|c| c.protection),
        Some(PlanProtection::Encrypted)
    );
    assert!(p.explain().contains("< tau 0.9000"));
    assert!(p.explain().contains("(offloaded)"));
    assert!(p.explain().contains("refused: exit head below tau:"));

    // The app accepting the device model's accuracy admits local whatever the head says.
    inp.policy.allow_local = true;
    assert!(plan(&inp).answers_locally());
    // Without a verdict and without the app's acceptance: refused by policy.
    inp.policy.allow_local = false;
    inp.exit = None;
    assert_eq!(plan(&inp).candidates[0].refused, Some(Refusal::Policy));
}

/// TDM-PLAN-2: every candidate that encrypts, decrypts or samples noise pays the device CPU's
/// energy for that time (`energy::cpu_mj`), on top of multiply-adds and radio.
#[test]
fn encryption_and_noise_cpu_energy_is_in_every_candidate() {
    let mut inp = inputs(link(10.0, 50.0));
    inp.policy.noised = vec![NoiseOption {
        epsilon: 4.0,
        rho: 0.1,
        accuracy: 0.9,
    }];
    inp.policy.noised_encrypted = inp.policy.noised.clone();
    let with = plan(&inp);
    let mut free = inp.clone();
    for s in &mut free.model.splits {
        s.noise_ms = 0.0;
        for m in &mut s.modes {
            m.encrypt_ms = 0.0;
            m.decrypt_ms = 0.0;
        }
    }
    let without = plan(&free);
    let split = &inp.model.splits[0];
    for (a, b) in with.candidates.iter().zip(&without.candidates) {
        let m = split.modes.iter().find(|m| Some(m.mode) == a.mode);
        let cpu_ms = match a.protection {
            PlanProtection::Local => 0.0,
            PlanProtection::Encrypted => m.map_or(0.0, |m| m.encrypt_ms + m.decrypt_ms),
            PlanProtection::NoisedEncrypted { .. } => {
                split.noise_ms + m.map_or(0.0, |m| m.encrypt_ms + m.decrypt_ms)
            }
            PlanProtection::Noised { .. } => split.noise_ms,
        };
        let extra = a.energy_mj - b.energy_mj;
        let want = crate::energy::cpu_mj(cpu_ms);
        assert!(
            (extra - want).abs() < 1e-9,
            "{}: {extra} mJ extra, want {want}",
            a.name()
        );
        if a.protection != PlanProtection::Local {
            assert!(extra > 0.0, "{}", a.name());
        }
    }
}

/// The real sizes of a 784→128 int8 layer under the default parameters (the exact wire
/// lengths the runtime sends), cloud time from `tandem_he::plan_cost` without its byte term.
fn real_model(cloud_scale: f64) -> ModelCosts {
    let mut m = model(0.0, 0.0);
    m.splits[0].modes = [OutputMode::Packed, OutputMode::NoKey]
        .into_iter()
        .map(|mode| {
            let p = crate::cloud_plan(tandem_he::DEFAULT_PARAMETERS, mode, 784, 128, 1000)
                .expect("plan");
            let bytes = (p.upload_bytes(1) + p.download_bytes(1)) as f64;
            let cloud = tandem_he::plan_cost(&p, 1) - bytes * tandem_he::COST_BYTE_MS;
            ModeCosts::from_plan(&p, true, cloud * cloud_scale, 1.0, 1.0)
        })
        .collect();
    m
}

#[test]
fn real_he_sizes_give_the_obvious_plans() {
    let packed = real_model(1.0).splits[0].modes[0];
    let nokey = real_model(1.0).splits[0].modes[1];
    // No-key moves many more bytes and saves the cloud its key switches.
    assert!(
        nokey.download_bytes > 4 * packed.download_bytes,
        "{nokey:?} {packed:?}"
    );
    assert!(nokey.cloud_ms < packed.cloud_ms);
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.allow_local = false;
    inp.model = real_model(1.0);
    assert_eq!(
        plan(&inp).choice().and_then(|c| c.mode),
        Some(OutputMode::Packed)
    );
    inp.link = link(10_000.0, 0.5);
    inp.model = real_model(20.0);
    assert_eq!(
        plan(&inp).choice().and_then(|c| c.mode),
        Some(OutputMode::NoKey)
    );
}

#[test]
fn unregistered_key_is_charged_once() {
    let mut inp = inputs(link(2.0, 80.0));
    inp.policy.allow_local = false;
    let registered = plan(&inp);
    inp.model.splits[0].modes[0].key_registered = false;
    let fresh = plan(&inp);
    let packed = |p: &Plan| {
        p.candidates
            .iter()
            .find(|c| c.mode == Some(OutputMode::Packed))
            .cloned()
            .expect("packed candidate")
    };
    let (a, b) = (packed(&registered), packed(&fresh));
    assert_eq!(b.bytes_up, a.bytes_up + 500_000);
    // 500 kB over 2 Mbit/s = 2000 ms, plus one round trip.
    assert!((b.latency_ms - a.latency_ms - 2080.0).abs() < 1e-6);
    // With the key to upload, no-key wins on this link.
    assert_eq!(fresh.choice().and_then(|c| c.mode), Some(OutputMode::NoKey));
}

#[test]
fn local_only_when_app_accepts_it() {
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.allow_local = false;
    let p = plan(&inp);
    assert_ne!(
        p.choice().map(|c| c.protection),
        Some(PlanProtection::Local)
    );
    inp.policy.allow_local = true;
    assert_eq!(
        plan(&inp).choice().map(|c| c.protection),
        Some(PlanProtection::Local)
    );
    // An accuracy floor above the local model's rules it out again.
    inp.policy.accuracy_floor = 0.96;
    let p = plan(&inp);
    assert_eq!(p.candidates[0].refused, Some(Refusal::Accuracy));
    assert_ne!(
        p.choice().map(|c| c.protection),
        Some(PlanProtection::Local)
    );
}

/// A link report an app's monitor got wrong (NaN, infinite, zero, negative, or so extreme the
/// transfer time overflows) is no link: offloads are refused with `NoLink`, local wins when
/// allowed, nothing is planned otherwise; never a NaN latency chosen.
#[test]
fn absurd_link_reports_are_no_link() {
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    for (bw, rtt) in [
        (nan, 50.0),
        (10e6, nan),
        (inf, 50.0),
        (10e6, inf),
        (0.0, 50.0),
        (-1e6, 50.0),
        (10e6, -5.0),
        (1e-300, 50.0),
        (10e6, f64::MAX),
    ] {
        let l = LinkEstimate {
            bandwidth_bps: bw,
            rtt_ms: rtt,
        };
        let mut inp = inputs(l);
        let p = plan(&inp);
        assert_eq!(
            p.choice().map(|c| c.protection),
            Some(PlanProtection::Local),
            "{bw} bit/s, {rtt} ms"
        );
        for c in p.candidates.iter().filter(|c| c.split.is_some()) {
            assert_eq!(
                c.refused,
                Some(Refusal::NoLink),
                "{bw} bit/s, {rtt} ms: {}",
                p.explain()
            );
        }
        inp.policy.allow_local = false;
        assert_eq!(plan(&inp).chosen, None, "{bw} bit/s, {rtt} ms");
    }
}

/// Was: a NaN accuracy floor compared false everywhere, so it was no floor and the local
/// candidate won; it now fails closed (every candidate refused for accuracy, no plan).
#[test]
fn a_nan_accuracy_floor_refuses_every_candidate() {
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.accuracy_floor = f64::NAN;
    let p = plan(&inp);
    assert!(p
        .candidates
        .iter()
        .all(|c| c.refused == Some(Refusal::Accuracy)));
    assert_eq!(p.chosen, None);
}

#[test]
fn budget_running_out_switches_noised_to_encrypted_or_local() {
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.allow_local = false;
    inp.policy.noised = vec![NoiseOption {
        epsilon: 2.0,
        rho: 0.1,
        accuracy: 0.96,
    }];
    inp.remaining_rho = 0.25;
    // Noised is far cheaper on a slow link: chosen while the budget lasts.
    let mut chosen = Vec::new();
    for _ in 0..5 {
        let p = plan(&inp);
        let c = p.choice().cloned().expect("a choice");
        assert!(c.rho <= inp.remaining_rho, "overdraw: {c:?}");
        inp.remaining_rho -= c.rho;
        chosen.push(c.protection);
    }
    let noised = PlanProtection::Noised { epsilon: 2.0 };
    assert_eq!(&chosen[..2], &[noised, noised]);
    assert!(chosen[2..].iter().all(|p| *p == PlanProtection::Encrypted));
    assert!(inp.remaining_rho >= 0.0);
    // With local accepted, the exhausted budget falls back to local on this link.
    inp.policy.allow_local = true;
    assert_eq!(
        plan(&inp).choice().map(|c| c.protection),
        Some(PlanProtection::Local)
    );
}

#[test]
fn unknown_budget_pays_nothing() {
    let mut inp = inputs(link(1.0, 80.0));
    inp.policy.noised = vec![NoiseOption {
        epsilon: 1.0,
        rho: 0.01,
        accuracy: 0.97,
    }];
    inp.policy.allow_local = false;
    inp.remaining_rho = f64::NAN;
    let p = plan(&inp);
    let noised = p
        .candidates
        .iter()
        .find(|c| matches!(c.protection, PlanProtection::Noised { .. }))
        .expect("noised candidate");
    assert_eq!(noised.refused, Some(Refusal::Budget));
    assert_eq!(
        p.choice().map(|c| c.protection),
        Some(PlanProtection::Encrypted)
    );
}

#[test]
fn latency_target_and_energy_objective() {
    let mut inp = inputs(link(10.0, 20.0));
    inp.policy.allow_local = false;
    inp.objective = Objective::Energy;
    let p = plan(&inp);
    let c = p.choice().cloned().expect("a choice");
    let min_energy = p
        .candidates
        .iter()
        .filter(|c| c.refused.is_none())
        .map(|c| c.energy_mj)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(c.energy_mj, min_energy);
    // A target nobody meets: the fastest feasible one, reported as missing it.
    inp.policy.latency_target_ms = Some(0.001);
    let p = plan(&inp);
    let c = p.choice().cloned().expect("a choice");
    assert!(!c.meets_target);
    let min_latency = p
        .candidates
        .iter()
        .filter(|c| c.refused.is_none())
        .map(|c| c.latency_ms)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(c.latency_ms, min_latency);
}

#[test]
fn explain_lists_every_candidate_and_marks_the_choice() {
    let mut inp = inputs(link(2.0, 80.0));
    inp.policy.noised = vec![NoiseOption {
        epsilon: 1.0,
        rho: 0.05,
        accuracy: 0.9,
    }];
    let p = plan(&inp);
    let text = p.explain();
    for c in &p.candidates {
        assert!(text.contains(&c.name()), "{} missing", c.name());
    }
    let marked: Vec<&str> = text.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(marked.len(), 1);
    assert!(marked[0].contains(&p.choice().expect("choice").name()));
}

#[test]
fn ewma_link_estimator() {
    let mut e = LinkEstimator::new(0.5);
    let fb = link(2.0, 80.0);
    assert_eq!(e.estimate(fb), fb);
    e.observe_rtt(0.1);
    e.observe_rtt(0.05);
    assert!((e.estimate(fb).rtt_ms - 75.0).abs() < 1e-9);
    // 1 MB in 75 ms RTT + 800 ms payload = 10 Mbit/s.
    e.observe_transfer(1_000_000, 0.875);
    assert!((e.estimate(fb).bandwidth_bps - 10e6).abs() < 1e-3);
    // Garbage is ignored.
    let before = e;
    e.observe_transfer(100, f64::NAN);
    e.observe_transfer(0, 1.0);
    e.observe_rtt(-1.0);
    e.observe_rtt(f64::INFINITY);
    assert_eq!(e, before);
    // Converges to a new steady link.
    for _ in 0..60 {
        e.observe_transfer(250_000, 0.075 + 1.0);
    }
    assert!((e.estimate(fb).bandwidth_bps - 2e6).abs() < 1.0);
}

fn arb_protection_policy() -> impl Strategy<Value = (AppPolicy, f64)> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec((0.1f64..8.0, 0.0f64..1.0, 0.5f64..1.0), 0..3),
        proptest::collection::vec((0.1f64..8.0, 0.0f64..1.0, 0.5f64..1.0), 0..3),
        any::<bool>(),
        any::<bool>(),
        0.0f64..1.0,
        proptest::option::of(0.1f64..5000.0),
        0.0f64..1.5,
    )
        .prop_map(|(local, enc, n, ne, packed, nokey, floor, target, rho)| {
            let opt = |v: Vec<(f64, f64, f64)>| {
                v.into_iter()
                    .map(|(epsilon, rho, accuracy)| NoiseOption {
                        epsilon,
                        rho,
                        accuracy,
                    })
                    .collect()
            };
            let mut output_modes = Vec::new();
            if packed {
                output_modes.push(OutputMode::Packed);
            }
            if nokey {
                output_modes.push(OutputMode::NoKey);
            }
            (
                AppPolicy {
                    allow_local: local,
                    allow_encrypted: enc,
                    noised: opt(n),
                    noised_encrypted: opt(ne),
                    output_modes,
                    accuracy_floor: floor,
                    latency_target_ms: target,
                },
                rho,
            )
        })
}

proptest! {
    #[test]
    fn never_picks_forbidden_or_unpayable(
        (policy, remaining_rho) in arb_protection_policy(),
        mbit in prop_oneof![Just(0.0), 0.01f64..2000.0],
        rtt in 0.0f64..500.0,
        cloud in 0.0f64..500.0,
        energy in any::<bool>(),
        registered in any::<bool>(),
    ) {
        let mut inp = inputs(link(mbit, rtt));
        inp.model = model(cloud, cloud / 10.0);
        for m in &mut inp.model.splits[0].modes {
            m.key_registered = registered;
        }
        inp.policy = policy.clone();
        inp.remaining_rho = remaining_rho;
        inp.objective = if energy { Objective::Energy } else { Objective::Latency };
        let p = plan(&inp);
        prop_assert_eq!(&plan(&inp), &p, "deterministic");
        if let Some(c) = p.choice() {
            prop_assert!(c.refused.is_none());
            prop_assert!(c.rho <= remaining_rho, "overdraw");
            prop_assert!(c.accuracy >= policy.accuracy_floor);
            match c.protection {
                PlanProtection::Local => prop_assert!(policy.allow_local),
                PlanProtection::Encrypted => prop_assert!(policy.allow_encrypted),
                PlanProtection::Noised { epsilon } => {
                    prop_assert!(policy.noised.iter().any(|n| n.epsilon == epsilon));
                }
                PlanProtection::NoisedEncrypted { epsilon } => {
                    prop_assert!(policy.noised_encrypted.iter().any(|n| n.epsilon == epsilon));
                }
            }
            if let Some(m) = c.mode {
                prop_assert!(policy.output_modes.contains(&m));
            }
            if c.split.is_some() {
                prop_assert!(mbit > 0.0, "offload without a link");
            }
        } else {
            prop_assert!(p.candidates.iter().all(|c| c.refused.is_some()));
        }
    }
}

proptest! {
    /// Over a run of requests that each pay what the plan charges, the total never exceeds the
    /// starting budget, and once the budget cannot pay a noised release none is planned.
    #[test]
    fn a_run_of_requests_never_overdraws(
        budget in 0.0f64..2.0,
        rhos in proptest::collection::vec(0.01f64..0.7, 1..4),
        mbit in 0.05f64..50.0,
        local in any::<bool>(),
    ) {
        let mut inp = inputs(link(mbit, 80.0));
        inp.policy.allow_local = local;
        inp.policy.noised = rhos
            .iter()
            .enumerate()
            .map(|(i, &rho)| NoiseOption { epsilon: 1.0 + i as f64, rho, accuracy: 0.96 })
            .collect();
        inp.policy.noised_encrypted = inp.policy.noised.clone();
        inp.remaining_rho = budget;
        let mut spent = 0.0;
        for _ in 0..50 {
            let p = plan(&inp);
            let Some(c) = p.choice() else { break };
            prop_assert!(c.rho <= inp.remaining_rho);
            if c.rho > 0.0 {
                prop_assert!(c.protection.epsilon() > 0.0);
            }
            spent += c.rho;
            inp.remaining_rho -= c.rho;
        }
        prop_assert!(spent <= budget + 1e-9, "spent {spent} of {budget}");
        let cheapest = rhos.iter().copied().fold(f64::INFINITY, f64::min);
        if inp.remaining_rho < cheapest {
            let c = plan(&inp).choice().cloned();
            prop_assert!(c.is_some_and(|c| c.rho == 0.0));
        }
    }
}
