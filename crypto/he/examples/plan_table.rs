//! The batch planner's view of a shape (int8, packed mode, public bounds): every chunk
//! candidate with its bytes, key switches and modelled cost, and the one chosen at a link rate.
//!
//! ```sh
//! cargo run --release -p tandem-he --example plan_table -- [--link KBIT_PER_S] 16x384@384x1536 ...
//! cargo run --release -p tandem-he --example plan_table -- --link 5000 minilm   # 6 layers of all-MiniLM-L6-v2, 16 tokens
//! cargo run --release -p tandem-he --example plan_table -- --link 2000 --bounds minilm  # with MiniLM's row bounds
//! cargo run --release -p tandem-he --example plan_table -- --link 2000 --max-bodies 4 minilm  # shared masks, r ≤ 4
//! RAYON_NUM_THREADS=2 cargo run --release -p tandem-he --example plan_table -- --link 2000 --time 2 minilm
//! ```
//! `--time T` evaluates the chosen plan of each shape (for `minilm`: each MiniLM shape) under its chosen plan (random int8 weights and
//! inputs, T threads: 1 sequential, more through rayon's global pool, whose size
//! `RAYON_NUM_THREADS` sets) and prints the fastest of 3 server times.
use std::sync::Arc;
use std::time::Instant;
use tandem_he::{
    plan_cost_on, Client, Context, EvalOptions, HeError, LayerPlan, LinkModel, OutputMode,
    PlanOptions, PreparedEvaluationKey, PreparedLayer, WeightBounds, DEFAULT_PARAMETERS,
};

fn values(n: usize, seed: u64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 255) as i64 - 127
        })
        .collect()
}

/// Fastest of 3 server evaluations of a random int8 layer under `plan` (ms).
fn time_eval(plan: LayerPlan, batch: usize, threads: usize) -> Result<f64, HeError> {
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    let w = values(plan.n_in * plan.n_out, 1);
    let layer = PreparedLayer::prepare_with_plan(ctx.clone(), plan, &w, &vec![0; plan.n_out])?;
    let mut client = Client::new(ctx.clone());
    let key = client.evaluation_key_for(plan.chunk, plan.bodies)?;
    let key = PreparedEvaluationKey::prepare(&key, &ctx)?;
    let xs: Vec<Vec<i64>> = (0..batch)
        .map(|r| values(plan.n_in, 2 + r as u64))
        .collect();
    let ct = client.encrypt(&plan, &xs)?;
    let opts = EvalOptions {
        parallel: threads > 1,
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let out = layer.eval(&ct, Some(&key), opts)?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    Ok(best)
}

fn parse(s: &str) -> Option<(usize, usize, usize)> {
    let (l, r) = s.split_once('@')?;
    let (b, n) = l.split_once('x')?;
    let (_, m) = r.split_once('x')?;
    Some((b.parse().ok()?, n.parse().ok()?, m.parse().ok()?))
}

fn chosen(b: usize, n: usize, m: usize, link: LinkModel, r: usize) -> Option<LayerPlan> {
    chosen_bounded(b, n, m, link, WeightBounds::entries(127, 0), r)
}

fn chosen_bounded(
    b: usize,
    n: usize,
    m: usize,
    link: LinkModel,
    bounds: WeightBounds,
    max_bodies: usize,
) -> Option<LayerPlan> {
    PreparedLayer::plan_int8_batch_bounded(
        DEFAULT_PARAMETERS,
        OutputMode::Packed,
        n,
        m,
        bounds,
        b,
        link,
        max_bodies,
    )
    .ok()
}

/// Row bounds of all-MiniLM-L6-v2's int8 weights (per-channel symmetric quantisation,
/// round(w·127/max|w_row|)), max over the 6 layers per kind: (max row L1, max row Σw²).
const MINILM_ROW_BOUNDS: [(u64, u64); 4] = [
    (17_216, 1_135_958), // Q/K/V (fused)
    (15_503, 976_755),   // attention output
    (16_790, 1_083_622), // FFN up
    (51_553, 2_712_473), // FFN down
];

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut link = LinkModel::default();
    if let Some(i) = args.iter().position(|a| a == "--link") {
        if let Some(v) = args.get(i + 1).and_then(|v| v.parse().ok()) {
            link = LinkModel { kbit_per_s: v };
        }
        args.drain(i..(i + 2).min(args.len()));
    }
    let mut max_bodies = 1;
    if let Some(i) = args.iter().position(|a| a == "--max-bodies") {
        if let Some(v) = args.get(i + 1).and_then(|v| v.parse().ok()) {
            max_bodies = v;
        }
        args.drain(i..(i + 2).min(args.len()));
    }
    let bounded = args.iter().any(|a| a == "--bounds");
    args.retain(|a| a != "--bounds");
    let mut time = None;
    if let Some(i) = args.iter().position(|a| a == "--time") {
        time = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        args.drain(i..(i + 2).min(args.len()));
    }
    for s in args {
        if s == "minilm" {
            // Per transformer layer: fused Q/K/V, attention output, FFN up, FFN down; 6 layers.
            let shapes = [
                (16, 384, 1152),
                (16, 384, 384),
                (16, 384, 1536),
                (16, 1536, 384),
            ];
            let (mut up, mut down, mut ks, mut ms) = (0, 0, 0, 0.0);
            // One packing key per device covers every layer: the largest chunk and r chosen.
            let (mut key_chunk, mut key_bodies) = (2, 1);
            for ((b, n, m), (l1, sq)) in shapes.into_iter().zip(MINILM_ROW_BOUNDS) {
                let bounds = if bounded {
                    WeightBounds {
                        max_row_l1: Some(l1),
                        max_row_sq: Some(sq),
                        ..WeightBounds::entries(127, 0)
                    }
                } else {
                    WeightBounds::entries(127, 0)
                };
                let Some(p) = chosen_bounded(b, n, m, link, bounds, max_bodies) else {
                    println!("{b}x{n}@{n}x{m}: no plan");
                    return;
                };
                let t = match time.map(|threads| time_eval(p, b, threads)).transpose() {
                    Ok(t) => t,
                    Err(e) => {
                        println!("{b}x{n}@{n}x{m}: {e}");
                        return;
                    }
                };
                (key_chunk, key_bodies) = (key_chunk.max(p.chunk), key_bodies.max(p.bodies));
                println!(
                    "{b}x{n}@{n}x{m} chunk {} b1 {} bodies {} up {} down {} ks {} ks_bodies {}{}",
                    p.chunk,
                    p.batch_rows,
                    p.bodies,
                    p.upload_bytes(b),
                    p.download_bytes(b),
                    p.key_switches_for(b),
                    p.key_switch_bodies_for(b),
                    t.map_or(String::new(), |t| format!(" server {t:.1} ms"))
                );
                ms += 6.0 * t.unwrap_or(0.0);
                up += 6 * p.upload_bytes(b);
                down += 6 * p.download_bytes(b);
                ks += 6 * p.key_switches_for(b);
            }
            let key_bytes = LayerPlan {
                chunk: key_chunk,
                bodies: key_bodies,
                ..PreparedLayer::plan_int8(DEFAULT_PARAMETERS, OutputMode::Packed, 8, 8, 0)
                    .unwrap_or_else(|e| unreachable!("{e}"))
            }
            .eval_key_bytes();
            println!(
                "minilm 16 tokens at {} kbit/s, max bodies {max_bodies}: up {up} down {down} total {} key switches {ks} eval key {key_bytes} bytes (chunk {key_chunk}, {key_bodies} bodies){}",
                link.kbit_per_s,
                up + down,
                time.map_or(String::new(), |t| format!(
                    " server {ms:.0} ms ({t} threads)"
                ))
            );
            continue;
        }
        let Some((b, n, m)) = parse(&s) else {
            eprintln!("shape {s}: expected BxN@NxM");
            continue;
        };
        let best = chosen(b, n, m, link, max_bodies);
        if let (Some(threads), Some(p)) = (time, best) {
            match time_eval(p, b, threads) {
                Ok(t) => println!("{s} chunk {} server {t:.1} ms ({threads} threads)", p.chunk),
                Err(e) => println!("{s}: {e}"),
            }
            continue;
        }
        let mut c = 2;
        let mut r = 1;
        let top = if max_bodies > 1 {
            DEFAULT_PARAMETERS.poly_size
        } else {
            n.next_power_of_two().min(DEFAULT_PARAMETERS.poly_size)
        };
        while c <= top {
            let p = PreparedLayer::plan_public(
                DEFAULT_PARAMETERS,
                OutputMode::Packed,
                n,
                m,
                128,
                127,
                0,
                PlanOptions {
                    chunk: Some(c),
                    batch: (b > 1).then_some(b),
                    max_bodies: r,
                },
            );
            let next = match &p {
                Ok(p) if p.bodies == r && r < max_bodies => (c, r * 2),
                _ => (c * 2, 1),
            };
            match p {
                Ok(p) if p.bodies < r => {}
                Ok(p) => println!(
                    "{s} chunk {c:5} b1 {:3} r {} up {:8} down {:8} ks {:5} prod {:5} bits {}/{}/{} cost {:.1}{}",
                    p.batch_rows,
                    p.bodies,
                    p.upload_bytes(b),
                    p.download_bytes(b),
                    p.key_switches_for(b),
                    p.ct_products_for(b),
                    p.upload_bits,
                    p.download_bits,
                    p.body_bits,
                    plan_cost_on(&p, b, link),
                    if best == Some(p) { "  <= chosen" } else { "" }
                ),
                Err(e) => println!("{s} chunk {c:5} r {r}: {e}"),
            }
            (c, r) = next;
        }
    }
}
