//! Runs the `tandem` CLI's DP commands (the very file `src/cli/dp.rs`) without building the
//! whole workspace: `cargo run -p tandem-dp --example dp_cli -- bench [--json]` or
//! `… -- privacy-curve digits OUT.svg [--json]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../src/cli/dp.rs"]
mod dp;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => dp::bench_dp(args.iter().any(|a| a == "--json")),
        Some("privacy-curve") => {
            let ds = args.get(1).map_or("digits", String::as_str);
            let out = args.get(2).map_or("privacy-curve.svg", String::as_str);
            dp::privacy_curve(
                ds,
                std::path::Path::new(out),
                args.iter().any(|a| a == "--json"),
            )
        }
        _ => anyhow::bail!("usage: dp_cli bench [--json] | privacy-curve DATASET OUT.svg [--json]"),
    }
}
