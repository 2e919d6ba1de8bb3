//! Parameter-set negotiation between a real cloud and a real device over mutual TLS on
//! loopback, now that set 2 (RNS modulus) is `tandem_he::DEFAULT_PARAMETERS` and set 1 is still
//! served (TDM-PAR-1, TDM-PAR-2, TDM-PAR-3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tandem_cloud::{Cloud, ServerOptions};
use tandem_device::{Device, DeviceError, DeviceOptions, Protection};
use tandem_he::{
    PARAMS_V1_N4096_Q64_TUNIFORM4_SEC132_2M64 as SET1,
    PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64 as SET2,
};
use tandem_model::{read_verifying_key, TestSet, VerifyingKey};
use tandem_protocol::ErrorCode;
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

fn digits() -> PathBuf {
    repo().join("models/digits")
}

/// A loopback cloud serving digits with the parameter sets `sets` (empty: the default).
async fn start_cloud(pki: &DevPki, store: &Path, sets: &[u16]) -> Cloud {
    let tls = server_config(pki.server_credentials()).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut o = ServerOptions::new(addr, tls, vk(), store.to_path_buf());
    o.models = vec![digits()];
    o.param_sets = sets.to_vec();
    Cloud::start(o).await.unwrap()
}

/// Device options (state in `dir`); `sets`: `None` keeps the default offer.
fn dev_opts(pki: &DevPki, addr: SocketAddr, dir: &Path, sets: Option<&[u16]>) -> DeviceOptions {
    let tls = client_config(pki.client_credentials("device-1").unwrap()).unwrap();
    let mut o = DeviceOptions::new(addr, tls, digits(), vk(), dir.join("ledger.bin"));
    o.dp.budget_rho = Some(1e6);
    o.state_dir = Some(dir.join("state"));
    if let Some(s) = sets {
        o.param_sets = s.to_vec();
    }
    o
}

fn samples(n: usize) -> Vec<Vec<f32>> {
    TestSet::load(&digits().join("test.json"))
        .unwrap()
        .x
        .into_iter()
        .take(n)
        .collect()
}

/// Encrypted logits of `xs` through `dev`.
async fn logits(dev: &mut Device, xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for x in xs {
        out.push(dev.infer(x, Protection::Encrypted).await.unwrap().logits);
    }
    out
}

/// A cloud and a device left at their defaults negotiate the default parameter set (set 2):
/// before, both listed `ALL_PARAMETER_SETS` = [1, 2] as their preference order, so every
/// default session — `tandem demo`, `tandem device infer`, `tandem cloud serve` — ran set 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_negotiate_the_default_parameter_set() {
    assert_eq!(tandem_he::DEFAULT_PARAMETERS, SET2);
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb"), &[]).await;
    let o = dev_opts(&pki, cloud.local_addr(), tmp.path(), None);
    assert_eq!(o.param_sets.first(), Some(&SET2.id), "device offer order");
    let mut dev = Device::connect(o).await.unwrap();
    let xs = samples(3);
    let got = logits(&mut dev, &xs).await;
    assert_eq!(dev.parameter_set(), SET2);
    dev.close().await;
    // The same inputs under set 1 (a device offering only set 1 to the same cloud): exact
    // both ways, so the logits are identical.
    let o = dev_opts(&pki, cloud.local_addr(), tmp.path(), Some(&[SET1.id]));
    let mut dev = Device::connect(o).await.unwrap();
    let old = logits(&mut dev, &xs).await;
    assert_eq!(dev.parameter_set(), SET1);
    assert_eq!(got, old);
    dev.close().await;
    cloud.shutdown().await;
}

/// A cloud serving only set 1 and a device preferring set 2 agree on set 1 (the device loaded
/// set-2 keys first and switches); the reverse with no common set is a typed refusal. A state
/// directory whose set-2 key cache holds the set-1 key (a careless copy) is rebuilt, not
/// uploaded under the wrong set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_set_clouds_and_foreign_key_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let xs = samples(2);
    let only1 = start_cloud(&pki, &tmp.path().join("k1.redb"), &[SET1.id]).await;
    let o = dev_opts(
        &pki,
        only1.local_addr(),
        tmp.path(),
        Some(&[SET2.id, SET1.id]),
    );
    let mut dev = Device::connect(o).await.unwrap();
    let want = logits(&mut dev, &xs).await;
    assert_eq!(dev.parameter_set(), SET1);
    assert_eq!(dev.key_uploads(), 1);
    dev.close().await;
    only1.shutdown().await;

    // A device offering only set 1 to a cloud serving only set 2: refused, typed.
    let only2 = start_cloud(&pki, &tmp.path().join("k2.redb"), &[SET2.id]).await;
    let o = dev_opts(&pki, only2.local_addr(), tmp.path(), Some(&[SET1.id]));
    match Device::connect(o).await {
        Err(DeviceError::Closed(ErrorCode::UnsupportedParameters)) => {}
        Err(e) => panic!("expected Closed(UnsupportedParameters), got {e}"),
        Ok(_) => panic!("expected Closed(UnsupportedParameters), got a device"),
    }

    // Overwrite every cached set-2 key with a cached set-1 key of the same seed.
    let dir = tmp.path().join("state");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let p1 = names
        .iter()
        .find(|n| n.starts_with("eval-key-p1-"))
        .expect("a cached set-1 key");
    let set1_blob = std::fs::read(dir.join(p1)).unwrap();
    let mut poisoned = 0;
    for n in names.iter().filter(|n| n.starts_with("eval-key-p2-")) {
        std::fs::write(dir.join(n), &set1_blob).unwrap();
        poisoned += 1;
    }
    assert!(poisoned > 0, "the device cached its set-2 key: {names:?}");
    let o = dev_opts(&pki, only2.local_addr(), tmp.path(), None);
    let mut dev = Device::connect(o).await.unwrap();
    let got = logits(&mut dev, &xs).await;
    assert_eq!(dev.parameter_set(), SET2);
    assert_eq!(got, want);
    for n in names.iter().filter(|n| n.starts_with("eval-key-p2-")) {
        assert_ne!(
            std::fs::read(dir.join(n)).unwrap(),
            set1_blob,
            "{n} rebuilt"
        );
    }
    dev.close().await;
    only2.shutdown().await;
}

/// A set-2 key cache whose first residue equals its prime (a flipped file, or a careless edit)
/// is rebuilt from the seed, never uploaded: the cloud would close the session on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_set2_key_cache_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(1).unwrap();
    let xs = samples(1);
    let cloud = start_cloud(&pki, &tmp.path().join("keys.redb"), &[SET2.id]).await;
    let o = dev_opts(&pki, cloud.local_addr(), tmp.path(), Some(&[SET2.id]));
    let mut dev = Device::connect(o.clone()).await.unwrap();
    let want = logits(&mut dev, &xs).await;
    dev.close().await;
    let dir = tmp.path().join("state");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("eval-key-p2-"))
        })
        .expect("a cached set-2 key");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    // Fixed fields end at 59 (kind 3) or 60 (kind 6), then 2 bytes per automorphism.
    let h = if bad[5] == 6 { 60 } else { 59 };
    let body = h + 2 * usize::from(bad[h - 1]);
    bad[body..body + 4].copy_from_slice(&0x3F5A_0001u32.to_le_bytes());
    std::fs::write(&file, &bad).unwrap();
    let mut dev = Device::connect(o).await.unwrap();
    let got = logits(&mut dev, &xs).await;
    assert_eq!(got, want);
    let rebuilt = std::fs::read(&file).unwrap();
    assert_ne!(rebuilt, bad, "rebuilt from the seed");
    assert_eq!(rebuilt.len(), good.len());
    dev.close().await;
    cloud.shutdown().await;
}
