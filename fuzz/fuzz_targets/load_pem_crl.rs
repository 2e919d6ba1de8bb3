//! tandem-tls PEM / certificate / key / CRL loaders on untrusted file contents, and the CRL
//! policy (`effective_crls`) on the certificates and CRLs found in the same input.
//!
//! Invariants beyond "no panic": every error names the file; the CRL policy keeps at most one
//! CRL per issuer, each one of the input CRLs, and its outcome does not depend on the order of
//! the CRLs (the fault of issue 12 item 1 was order-dependence).
#![no_main]
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tandem_tls::{effective_crls, parse_certificates, parse_crls, parse_private_key};

/// A fixed "now" (2026-12-02), shortly after the seed CRLs were made, so runs are repeatable.
const NOW_UNIX: u64 = 1_796_200_000;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input.pem");
    let named = |e: &tandem_tls::Error| {
        let msg = e.to_string();
        assert!(
            msg.contains("fuzz-input.pem"),
            "error does not name the file: {msg}"
        );
    };
    let certs = parse_certificates(path, data);
    let key = parse_private_key(path, data);
    let crls = parse_crls(path, data);
    for e in [
        certs.as_ref().err(),
        key.as_ref().err(),
        crls.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        named(e);
    }
    let (Ok(cas), Ok(crls)) = (certs, crls) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX);
    let labelled: Vec<_> = crls
        .iter()
        .map(|c| (path.to_path_buf(), c.clone()))
        .collect();
    let mut reversed = labelled.clone();
    reversed.reverse();
    let mut rotated = labelled.clone();
    rotated.rotate_left(1);
    let forward = effective_crls(&labelled, &cas, now);
    if let Err(e) = &forward {
        named(e);
    }
    for other in [&reversed, &rotated] {
        let again = effective_crls(other, &cas, now);
        match (&forward, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "CRL selection depends on order"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("CRL policy depends on order: {a:?} vs {b:?}"),
        }
    }
    if let Ok(kept) = forward {
        assert!(kept.len() <= crls.len());
        assert!(kept.iter().all(|k| crls.contains(k)));
    }
});
