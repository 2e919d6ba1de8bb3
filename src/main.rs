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
    /// End-to-end demo: throw-away PKI, in-process cloud, the digits test split through every
    /// protection mode, then a summary.
    Demo {
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
        /// `--model minilm`: private semantic search with all-MiniLM-L6-v2 instead.
        #[command(flatten)]
        minilm: cli::demo_minilm::MiniLmDemoArgs,
    },
    /// Evaluations of real models (issue 8).
    Eval {
        #[command(subcommand)]
        what: cli::eval::EvalCommand,
    },
    /// The cloud server.
    Cloud {
        #[command(subcommand)]
        what: cli::runtime::CloudCommand,
    },
    /// The device runtime.
    Device {
        #[command(subcommand)]
        what: cli::runtime::DeviceCommand,
    },
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        what: cli::runtime::PkiCommand,
    },
    /// Signed model bundles.
    Model {
        #[command(subcommand)]
        what: cli::runtime::ModelCommand,
    },
    /// What the per-request planner would choose on a given link (`specs/planner.md`).
    Plan(cli::plan::PlanArgs),
    /// Trains a bundle's early-exit head by distillation, calibrates τ on held-out training
    /// rows and re-signs the bundle (`specs/planner.md` §7).
    ExitHead(cli::early_exit::TrainArgs),
    /// Embeds a text with a sentence encoder bundle, every linear layer computed by the cloud
    /// under encryption (a loopback cloud in this process unless `--cloud` is given); prints
    /// JSON.
    Embed(cli::sentence::EmbedArgs),
    /// Accuracy versus ε of a model whose split activation is noised (writes an SVG plot).
    PrivacyCurve {
        /// `digits` or `breast_cancer`.
        #[arg(long, default_value = "digits")]
        dataset: String,
        /// Output SVG file.
        #[arg(long, default_value = "privacy-curve.svg")]
        out: PathBuf,
        /// One JSON object per point on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Trains the noise-trained bottleneck variants (one per ε, discrete Laplace) into a
    /// bundle's signed `[privacy]` section and re-signs it (issue 11, specs/dp.md §6.2).
    PrivacyTrain {
        /// `digits` or `breast_cancer`.
        #[arg(long)]
        dataset: String,
        /// Bundle directory (re-signed in place).
        #[arg(long)]
        bundle: PathBuf,
        /// ε per release of each variant, comma-separated, increasing.
        #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
        epsilons: Vec<f64>,
        /// Integer grid s of the release (the normalised bottleneck has norm 1).
        #[arg(long, default_value_t = 64.0)]
        grid: f64,
        /// Signing key file (64 hex digits). Required: there is no default signer (the
        /// committed `models/dev-signing-key.txt` works and prints a warning).
        #[arg(long)]
        key: PathBuf,
        /// Verifying key the bundle must verify under before it is re-signed (default: the
        /// verifying key of `--key`).
        #[arg(long)]
        pubkey: Option<PathBuf>,
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
        /// Most secrets one mask may be shared by in batch plans (1 = single-secret).
        #[arg(long, default_value_t = tandem::he::limits::MAX_BODIES)]
        max_bodies: usize,
        /// Link rate (kbit/s) the batch planner weighs bytes at.
        #[arg(long, default_value_t = 25_000)]
        link: u32,
    },
    /// N concurrent devices against an in-process cloud for T seconds: throughput, latency
    /// percentiles, peak RSS.
    Load(cli::runtime::LoadArgs),
    /// Accuracy, offload rate, mean latency and energy of the early-exit cascade vs τ.
    EarlyExit(cli::early_exit::BenchArgs),
    /// One encrypted sentence embedding per `--tokens` value over loopback mTLS: end-to-end,
    /// cloud and device seconds, round trips, bytes, key upload, encrypted multiply-adds.
    Sentence(Box<cli::sentence::BenchArgs>),
    /// The planner against fixed strategies and the oracle on shaped loopback links that
    /// follow the link traces (`data/traces`, `specs/planner.md` §6).
    Traces(cli::traces::TracesArgs),
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
                max_bodies,
                link,
            } => cli::bench::matmul(shape.as_deref(), runs, threads, json, max_bodies, link),
            BenchCommand::Dp { json } => cli::dp::bench_dp(json),
            BenchCommand::Load(args) => cli::runtime::bench_load(args),
            BenchCommand::Traces(args) => cli::traces::run(args),
            BenchCommand::EarlyExit(args) => cli::early_exit::bench(args),
            BenchCommand::Sentence(args) => cli::sentence::bench(*args),
        },
        Command::Demo { json, minilm } => match minilm.model.as_deref() {
            None | Some("digits") => cli::demo::run(json),
            Some(_) => cli::demo_minilm::run(&minilm, json),
        },
        Command::Eval { what } => cli::eval::run(what),
        Command::Cloud { what } => cli::runtime::cloud(what),
        Command::Device { what } => cli::runtime::device(what),
        Command::Pki { what } => cli::runtime::pki(what),
        Command::Model { what } => cli::runtime::model(what),
        Command::Plan(args) => cli::plan::run(args),
        Command::ExitHead(args) => cli::early_exit::train(args),
        Command::Embed(args) => cli::sentence::embed(args),
        Command::PrivacyTrain {
            dataset,
            bundle,
            epsilons,
            grid,
            key,
            pubkey,
        } => cli::privacy_train::run(&dataset, &bundle, &epsilons, grid, &key, pubkey.as_deref()),
        Command::PrivacyCurve { dataset, out, json } => {
            cli::dp::privacy_curve(&dataset, &out, json)
        }
    }
}
