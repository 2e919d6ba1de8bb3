//! `import_bert_with_plan` refuses out-of-range signed knobs before it writes anything: a
//! careless `tandem model import-bert --max-bodies 9 --out <dir>` leaves no half-written
//! directory behind and does not replace the `tokenizer.json` of a bundle already there
//! (which would break that bundle's digest). Tiny synthetic BERT, no MiniLM needed.
#![cfg(feature = "import")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tandem_model::SigningKey;
use tandem_ops::import::{import_bert_with_plan, PlanKnobs};

mod common;
use common::tiny::{layout, write_model_dir};

fn checkpoint() -> Vec<u8> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = layout(true)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| (0.3 * ((k * 31 + i) as f32).sin()).to_le_bytes())
                .collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn refused_knobs_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, &checkpoint());
    let key = SigningKey::from_bytes(&[3u8; 32]);
    // An existing bundle directory: its files must survive a refused import untouched.
    let existing = tmp.path().join("existing");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("tokenizer.json"), b"{\"old\": true}").unwrap();
    let bad = [
        PlanKnobs {
            link_kbit_s: Some(1_000),
            max_bodies: Some(9),
        },
        PlanKnobs {
            link_kbit_s: Some(1_000),
            max_bodies: Some(0),
        },
        PlanKnobs {
            link_kbit_s: Some(0),
            max_bodies: Some(4),
        },
    ];
    for knobs in bad {
        let fresh = tmp.path().join("fresh");
        for out in [&fresh, &existing] {
            assert!(
                import_bert_with_plan(&src, out, "tiny", 4, knobs, &key).is_err(),
                "{knobs:?} accepted"
            );
        }
        assert!(
            !fresh.exists(),
            "{knobs:?}: a refused import created {fresh:?}"
        );
        assert_eq!(
            std::fs::read(existing.join("tokenizer.json")).unwrap(),
            b"{\"old\": true}",
            "{knobs:?}: a refused import replaced the tokenizer of the bundle there"
        );
    }
    // The same source with valid knobs imports (the refusals above were the knobs').
    let good = tmp.path().join("good");
    import_bert_with_plan(
        &src,
        &good,
        "tiny",
        4,
        PlanKnobs {
            link_kbit_s: Some(1_000),
            max_bodies: Some(4),
        },
        &key,
    )
    .unwrap();
    assert!(good.join("manifest.sig").exists() && good.join("tokenizer.json").exists());
}
