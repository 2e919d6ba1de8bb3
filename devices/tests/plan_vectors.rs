//! TDM-PAR-HE-5: the layer plans both parties derive from public inputs are pinned by
//! `specs/vectors/he/plans.json`. Device and cloud never exchange a plan: each derives it from
//! the shape, the batch, the signed bounds, the link rate and `max_bodies`
//! (`PreparedLayer::plan_int8_batch_bounded`, the call both runtimes make). A build whose
//! planner gives a different layout for any of these inputs fails here, so a layout change
//! cannot ship silently under an existing parameter-set id (the rule in
//! `specs/parameters.md`, TDM-PAR-HE-5).
//!
//! Regenerate after a deliberate planner change that comes with a new parameter-set id:
//! `TANDEM_WRITE_PLAN_VECTORS=1 cargo test --release -p tandem-device --test plan_vectors`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use tandem_he::{
    key_shape_for_plans, LayerPlan, LinkModel, OutputMode, ParameterSet, PreparedLayer,
    WeightBounds,
};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../specs/vectors/he/plans.json"
);

/// The inputs of one vector: everything `plan_int8_batch_bounded` takes.
#[derive(Clone, Copy)]
struct Input {
    param_set: u16,
    mode: OutputMode,
    n_in: usize,
    n_out: usize,
    batch: usize,
    bounds: WeightBounds,
    link_kbit_s: u32,
    max_bodies: usize,
}

/// The grid the vectors cover: both parameter sets and modes, the v1 MLP's cloud layer, the
/// issue-9 transformer shapes (MiniLM's widths), a one-row product, entry and signed row
/// bounds, the default and a slow link, one and two bodies per mask, and one refused batch.
fn grid() -> Vec<Input> {
    let entries = WeightBounds::entries(127, 1000);
    // Signed row bounds of the kind a MiniLM bundle carries (max row L1, max row Σw²).
    let rows = WeightBounds {
        max_abs_weight: 127,
        max_row_l1: Some(6_000),
        max_row_sq: Some(200_000),
        max_abs_bias: 30_000,
    };
    let shapes: [(usize, usize, usize); 8] = [
        (32, 16, 1),
        (1024, 1024, 1),
        (768, 768, 8),
        (384, 384, 16),
        (384, 1152, 16),
        (384, 1536, 16),
        (1536, 384, 16),
        (384, 1536, 64),
    ];
    let mut out = Vec::new();
    for param_set in [1u16, 2] {
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            for &(n_in, n_out, batch) in &shapes {
                for (bounds, link_kbit_s, max_bodies) in
                    [(entries, 25_000, 1), (rows, 25_000, 1), (entries, 1_000, 2)]
                {
                    out.push(Input {
                        param_set,
                        mode,
                        n_in,
                        n_out,
                        batch,
                        bounds,
                        link_kbit_s,
                        max_bodies,
                    });
                }
            }
        }
    }
    // One refusal: a batch over `tandem_he::limits::MAX_BATCH` (64) is a Shape error on
    // both sides.
    out.push(Input {
        batch: 65,
        ..out[0]
    });
    out
}

fn mode_name(m: OutputMode) -> &'static str {
    match m {
        OutputMode::NoKey => "nokey",
        OutputMode::Packed => "packed",
    }
}

fn input_json(i: &Input) -> Value {
    json!({
        "param_set": i.param_set,
        "mode": mode_name(i.mode),
        "n_in": i.n_in,
        "n_out": i.n_out,
        "batch": i.batch,
        "max_abs_weight": i.bounds.max_abs_weight,
        "max_row_l1": i.bounds.max_row_l1,
        "max_row_sq": i.bounds.max_row_sq,
        "max_abs_bias": i.bounds.max_abs_bias,
        "link_kbit_s": i.link_kbit_s,
        "max_bodies": i.max_bodies,
    })
}

/// What a plan fixes on the wire and in key registration (not the server's private
/// evaluation order, e.g. hoisted levels, nor the float failure estimate).
fn plan_json(p: &LayerPlan, batch: usize) -> Value {
    let (first_level, max_chunk, bodies) = key_shape_for_plans(std::slice::from_ref(p));
    json!({
        "chunk": p.chunk,
        "batch_rows": p.batch_rows,
        "bodies": p.bodies(),
        "max_abs_input": p.max_abs_input,
        "delta_in_log2": p.delta_in_log2,
        "delta_out_log2": p.delta_out_log2,
        "upload_bits": p.upload_bits,
        "download_bits": p.download_bits,
        "body_bits": p.body_bits,
        "key_first_level": p.key_first_level,
        "upload_bytes": p.upload_bytes(batch),
        "download_bytes": p.download_bytes(batch),
        "out_ciphertexts": p.out_ciphertexts(),
        "key_shape": [first_level, max_chunk, bodies],
    })
}

fn derive(i: &Input) -> Value {
    let params = ParameterSet::from_id(i.param_set).unwrap();
    match PreparedLayer::plan_int8_batch_bounded(
        params,
        i.mode,
        i.n_in,
        i.n_out,
        i.bounds,
        i.batch,
        LinkModel {
            kbit_per_s: i.link_kbit_s,
        },
        i.max_bodies,
    ) {
        Ok(p) => plan_json(&p, i.batch),
        // A refusal is pinned too (by its variant name): both parties must refuse alike.
        Err(e) => json!({ "error": format!("{e:?}").split(['(', ' ', '{']).next().unwrap_or("") }),
    }
}

fn id(i: &Input) -> String {
    format!(
        "p{}-{}-{}x{}@{}x{}-{}-l{}-r{}",
        i.param_set,
        mode_name(i.mode),
        i.batch,
        i.n_in,
        i.n_in,
        i.n_out,
        if i.bounds.max_row_l1.is_some() {
            "rows"
        } else {
            "entries"
        },
        i.link_kbit_s,
        i.max_bodies
    )
}

fn generate() -> Value {
    let vectors: Vec<Value> = grid()
        .iter()
        .map(|i| json!({ "id": id(i), "input": input_json(i), "plan": derive(i) }))
        .collect();
    json!({
        "kind": "tandem layer plans",
        "version": 1,
        "rule": "TDM-PAR-HE-5: PreparedLayer::plan_int8_batch_bounded(input) must give `plan`",
        "vectors": vectors,
    })
}

#[test]
fn plans_match_the_pinned_vectors() {
    let fresh = generate();
    if std::env::var_os("TANDEM_WRITE_PLAN_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&fresh).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
        eprintln!("wrote {PATH}");
        return;
    }
    let pinned: Value = serde_json::from_str(
        &std::fs::read_to_string(PATH).expect("specs/vectors/he/plans.json is readable"),
    )
    .unwrap();
    let pinned = pinned["vectors"].as_array().expect("a vectors array");
    let fresh = fresh["vectors"].as_array().unwrap();
    assert_eq!(pinned.len(), fresh.len(), "vector count");
    let mut differ = Vec::new();
    for (p, f) in pinned.iter().zip(fresh) {
        assert_eq!(p["id"], f["id"], "vector order");
        assert_eq!(p["input"], f["input"], "{}: input", p["id"]);
        if p["plan"] != f["plan"] {
            differ.push(format!(
                "{}:\n  pinned {}\n  now    {}",
                p["id"], p["plan"], f["plan"]
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} plans differ from specs/vectors/he/plans.json (TDM-PAR-HE-5: a layout \
         change needs a new parameter-set id):\n{}",
        differ.len(),
        pinned.len(),
        differ.join("\n")
    );
    // The grid is not vacuous: all but the one refused input plan.
    let planned = pinned
        .iter()
        .filter(|v| v["plan"]["chunk"].is_u64())
        .count();
    assert_eq!(planned, pinned.len() - 1, "plans in the pinned vectors");
}
