//! `tandem eval embeddings` and `tandem demo --model minilm` on small corpora (TDM issue 8),
//! run as the built binary.
//!
//! Needs all-MiniLM-L6-v2 from `scripts/fetch-minilm.sh`: without it each test prints
//! `SKIPPED: …` and checks nothing; with `TANDEM_MINILM_DIR` set (as `.ci/run` does) a missing
//! model is a failure, not a skip. Each test runs the encrypted path on a few sentences only
//! (about 2 s of cloud time each).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{model_dir, repo};

fn tandem(args: &[&str], model: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_MINILM_DIR", model)
        .current_dir(repo())
        .output()
        .unwrap()
}

/// The last stdout line, parsed as JSON.
fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing or not a number in {v}"))
}

/// The first `n` lines of the committed corpus in a temporary file.
fn corpus_slice(dir: &tempfile::TempDir, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("data/minilm-corpus.txt")).unwrap();
    let path = dir.path().join("corpus.txt");
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn eval_embeddings_json_on_a_corpus_slice() {
    let Some(model) = model_dir("tandem eval embeddings") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // 24 sentences, every 12th encrypted (indices 0 and 12; the reference holds every 4th
    // corpus sentence, so 6 of them are compared with PyTorch).
    let corpus = corpus_slice(&tmp, 24);
    let out = tandem(
        &[
            "eval",
            "embeddings",
            "--model",
            model.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--encrypt-every",
            "12",
            "--json",
        ],
        &model,
    );
    let v = last_json(&out);
    eprintln!("{v}");
    assert_eq!(v["sentences"], 24);
    assert_eq!(v["encrypted_sentences"], 2);
    assert_eq!(v["reference_sentences"], 6);
    assert_eq!(v["encrypted_equals_integer_path"], true);
    assert_eq!(v["encrypted_mismatches"], 0);
    assert_eq!(v["k"], 10);
    // The float path is PyTorch's to rounding; the int8 path is close to float but not equal
    // (a run that fell back to float would show cosine 1).
    assert!(f(&v, "float_vs_reference_min_cosine") >= 0.9999);
    let (mean, min) = (
        f(&v, "encrypted_vs_float_mean_cosine"),
        f(&v, "encrypted_vs_float_min_cosine"),
    );
    assert!(min <= mean && mean < 0.99999, "mean {mean}, min {min}");
    assert!(mean >= 0.99 && min >= 0.97, "mean {mean}, min {min}");
    let overlap = f(&v, "top10_overlap");
    assert!((0.8..=1.0).contains(&overlap), "top-10 overlap {overlap}");
    // Every linear layer of both sentences went through the cloud: 24 requests each (fused
    // Q/K/V, sentences shorter than 64 tokens), with blobs both ways and a key.
    assert_eq!(v["requests"], 48);
    assert!(f(&v, "bytes_up") > 0.0 && f(&v, "bytes_down") > 0.0);
    assert!(f(&v, "key_upload_bytes") > 0.0);
}

#[test]
fn eval_embeddings_runs_from_an_imported_bundle() {
    let Some(model) = model_dir("tandem eval embeddings --model <bundle>") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("minilm");
    let out = tandem(
        &[
            "model",
            "import-bert",
            model.to_str().unwrap(),
            "--out",
            bundle.to_str().unwrap(),
        ],
        &model,
    );
    assert!(
        out.status.success(),
        "import-bert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let corpus = corpus_slice(&tmp, 12);
    let out = tandem(
        &[
            "eval",
            "embeddings",
            "--model",
            bundle.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--encrypt-every",
            "11",
            "--json",
        ],
        &model,
    );
    let v = last_json(&out);
    eprintln!("{v}");
    assert_eq!(v["model"], bundle.to_str().unwrap());
    assert_eq!(v["float_model"], model.to_str().unwrap());
    assert_eq!(v["sentences"], 12);
    assert_eq!(v["encrypted_sentences"], 2);
    assert_eq!(v["encrypted_equals_integer_path"], true);
    // The bundle's planned batch (16 tokens per request).
    assert_eq!(v["plan_batch"], 16);
    assert!(f(&v, "float_vs_reference_min_cosine") >= 0.9999);
    let (mean, min) = (
        f(&v, "encrypted_vs_float_mean_cosine"),
        f(&v, "encrypted_vs_float_min_cosine"),
    );
    assert!(
        mean >= 0.99 && min >= 0.97 && mean < 0.99999,
        "mean {mean}, min {min}"
    );
    // At least one request per cloud layer per encrypted sentence.
    assert!(v["requests"].as_u64().unwrap() >= 48, "{v}");

    // A bundle signed with another key than the one given is refused, naming the bundle.
    let other = tmp.path().join("other-key.txt");
    // The Ed25519 base point: a valid public key nobody signed this bundle with.
    std::fs::write(&other, format!("58{}\n", "66".repeat(31))).unwrap();
    let out = tandem(
        &[
            "eval",
            "embeddings",
            "--model",
            bundle.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
            "--verifying-key",
            other.to_str().unwrap(),
            "--json",
        ],
        &model,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(bundle.to_str().unwrap()), "{err}");
    assert!(!err.contains("not a valid Ed25519"), "{err}");
}

#[test]
fn eval_embeddings_refuses_a_missing_model_and_a_tiny_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("no-model");
    std::fs::create_dir(&empty).unwrap();
    // `--model minilm` with TANDEM_MINILM_DIR pointing at an empty directory: the message says
    // how to fetch the model.
    let out = tandem(
        &["eval", "embeddings", "--model", "minilm", "--json"],
        &empty,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scripts/fetch-minilm.sh"), "{err}");
    assert!(err.contains(empty.to_str().unwrap()), "{err}");

    let Some(model) = model_dir("the tiny-corpus refusal") else {
        return;
    };
    let corpus = corpus_slice(&tmp, 5);
    let out = tandem(
        &[
            "eval",
            "embeddings",
            "--corpus",
            corpus.to_str().unwrap(),
            "--json",
        ],
        &model,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than k sentences"), "{err}");
}

const TINY_CORPUS: &str =
    "The subprocess module lets you spawn new processes and wait for them to complete.\n\
     Shutil copies files together with their permission bits and modification times.\n\
     The tkinter grid geometry manager places widgets in rows and columns of a window.\n\
     An HTTPError is raised when the server answers a request with an error status.\n\
     Dictionaries map hashable keys to arbitrary values.\n\
     The random module generates pseudo-random numbers for simulations.\n";

/// Runs the demo on the tiny corpus with `queries`; checks the JSON and returns it.
fn demo(model: &Path, cloud: &str, queries: &[(&str, u64)]) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, TINY_CORPUS).unwrap();
    let mut args = vec![
        "demo",
        "--model",
        "minilm",
        "--cloud",
        cloud,
        "--corpus",
        corpus.to_str().unwrap(),
        "--top",
        "2",
        "--json",
    ];
    for (q, _) in queries {
        args.extend(["--query", q]);
    }
    let v = last_json(&tandem(&args, model));
    eprintln!("{v}");
    assert_eq!(v["corpus_sentences"], 6);
    assert!(f(&v, "key_upload_bytes") > 0.0);
    let got = v["queries"].as_array().unwrap();
    assert_eq!(got.len(), queries.len());
    // The right document comes first for each query, under encryption as in float.
    for (q, (_, want)) in got.iter().zip(queries) {
        assert_eq!(q["hits"].as_array().unwrap().len(), 2);
        assert_eq!(q["hits"][0]["index"], *want, "{q}");
        assert_eq!(q["float_hits"][0]["index"], *want, "{q}");
        let c = f(q, "cosine_vs_float");
        assert!((0.97..0.99999).contains(&c), "cosine to float {c}");
        // One request per cloud layer (fused Q/K/V: 24), ciphertexts both ways.
        assert_eq!(q["requests"], 24);
        // Ciphertexts, not activations (7 tokens × 384 int8 values would be 2.7 KB).
        assert!(f(q, "bytes_up") > 1e5 && f(q, "bytes_down") > 1e5, "{q}");
        assert!(f(q, "latency_s") > 0.0);
    }
    v
}

#[test]
fn demo_minilm_searches_a_tiny_corpus_over_loopback_mtls() {
    let Some(model) = model_dir("tandem demo --model minilm (mTLS)") else {
        return;
    };
    let v = demo(
        &model,
        "mtls",
        &[
            ("How do I run another program and wait for it?", 0),
            ("putting buttons in a grid", 2),
        ],
    );
    assert_eq!(v["path"], "encrypted-loopback-mtls");
}

#[test]
fn demo_minilm_searches_a_tiny_corpus_in_process() {
    let Some(model) = model_dir("tandem demo --model minilm (in-process)") else {
        return;
    };
    let v = demo(
        &model,
        "in-process",
        &[("what if the server returns an error page?", 3)],
    );
    assert_eq!(v["path"], "encrypted-in-process");
}

/// A bundle imported with `--batch 32` is served by `tandem embed`'s loopback cloud: a
/// 36-token sentence goes as two requests per layer (32 + 4 rows) and equals the embedding of
/// the default 16-row bundle (the plans change, the integer pipeline does not). Before, the
/// loopback cloud kept the default `max_batch = 16` and refused the 32-row requests.
#[test]
fn embed_serves_a_bundle_imported_with_a_larger_batch() {
    let Some(model) = model_dir("tandem embed --model <bundle --batch 32>") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm \
                mat near the old red barn and the farmer walks home slowly through the green \
                fields of wheat";
    let mut embeddings = Vec::new();
    for batch in ["32", "16"] {
        let bundle = tmp.path().join(format!("minilm-{batch}"));
        let src = model.to_str().unwrap();
        let out = tandem(
            &[
                "model",
                "import-bert",
                src,
                "--out",
                bundle.to_str().unwrap(),
                "--batch",
                batch,
            ],
            &model,
        );
        assert!(
            out.status.success(),
            "import-bert --batch {batch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = last_json(&tandem(
            &["embed", "--model", bundle.to_str().unwrap(), text],
            &model,
        ));
        let tokens = f(&v, "tokens") as usize;
        assert!(
            tokens > 32,
            "{tokens} tokens: the sentence must need two requests"
        );
        let per_layer = tokens.div_ceil(batch.parse::<usize>().unwrap());
        assert_eq!(
            f(&v, "round_trips") as usize,
            24 * per_layer,
            "--batch {batch}"
        );
        embeddings.push(v["embedding"].clone());
    }
    assert_eq!(embeddings[0], embeddings[1]);
}
