//! Model manifest parser (`tandem_model::Manifest`): TOML text from an untrusted bundle.
//! Beyond "no panic" (from toml, serde or our checks): a manifest that parses and validates
//! serialises to a canonical form that parses to the same canonical form and still validates,
//! and its cloud layer index is defined (for an `[encoder]` manifest: its cloud layers are the
//! linear layers, by index).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_model::{Limits, Manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(m) = Manifest::from_toml(text) else {
        return;
    };
    let limits = Limits::default();
    if m.validate(&limits).is_err() {
        return;
    }
    let canonical = m.to_toml().expect("a valid manifest serialises");
    let again = Manifest::from_toml(&canonical).expect("the canonical form parses");
    again
        .validate(&limits)
        .expect("the canonical form validates");
    assert_eq!(
        again.to_toml().expect("serialises"),
        canonical,
        "canonical form is stable"
    );
    if let Some(e) = &again.encoder {
        // An encoder's cloud layers are its linear layers, by index (TDM-REQ-9).
        assert!(again.layers.is_empty() && !e.linears.is_empty());
        assert_eq!(
            again.cloud_indices(),
            (0..e.linears.len()).collect::<Vec<_>>()
        );
        return;
    }
    let i = again
        .cloud_index()
        .expect("a valid manifest has one cloud layer");
    assert!(i > 0 && i < again.layers.len());
});
