//! The `tandem` command-line tool.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod cli;

/// Private device–cloud collaborative inference.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Accuracy versus ε of a model whose split activation is noised (writes an SVG plot).
    PrivacyCurve {
        /// `digits` or `breast_cancer`.
        #[arg(long, default_value = "digits")]
        dataset: String,
        /// Output SVG file.
        #[arg(long, default_value = "privacy-curve.svg")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Encrypted × clear matrix products on the fixed shapes, both output modes.
    Matmul {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only this shape, e.g. `1x1024@1024x1024`.
        #[arg(long)]
        shape: Option<String>,
        /// Runs per measurement (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Server threads (1 = single-threaded evaluation).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Discrete noise for 1024 activations.
    Dp {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { what } => match what {
            BenchCommand::Matmul {
                json,
                shape,
                runs,
                threads,
            } => cli::bench::matmul(shape.as_deref(), runs, threads, json),
            BenchCommand::Dp { json } => cli::dp::bench_dp(json),
        },
        Command::PrivacyCurve { dataset, out } => cli::dp::privacy_curve(&dataset, &out),
    }
}
