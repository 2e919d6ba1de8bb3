//! `tandem embed --cloud` against a live `tandem cloud serve` that serves only parameter set 1
//! (a cloud.toml with `param_sets = [1]`, or a cloud from before set 2), both the built binary,
//! over mTLS: the device meets it on set 1 and the embedding equals the loopback cloud's under
//! the default set 2 (both exact). Before, `embed` offered only the default set and failed with
//! "session closed by the cloud (UnsupportedParameters)". A tiny synthetic BERT always runs.
//! And `tandem demo` negotiates the default set 2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

#[path = "../devices/ops/tests/common/tiny.rs"]
#[allow(dead_code)]
mod tiny;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// The tiny checkpoint in the safetensors format (8-byte little-endian header length, JSON
/// header of dtype / shape / data offsets, then the little-endian f32 data).
fn checkpoint() -> Vec<u8> {
    let mut header = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    for (k, (name, shape)) in tiny::layout(false).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            data.extend((0.3 * ((k * 31 + i) as f32).sin()).to_le_bytes());
        }
        header.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    let mut h = format!("{{{}}}", header.join(",")).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

struct Cloud(Child);
impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem cloud serve` of `bundle` (packed only) with `param_sets = [1]`; its port.
fn start_cloud(dir: &Path, bundle: &Path) -> (Cloud, u16) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(
        dir.join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\npki_dir = {:?}\nmodels = [{{ path = {:?}, output_modes = [\"packed\"] }}]\nverifying_key = {:?}\nkey_store = {:?}\nparam_sets = [1]\nmax_batch = 64\n",
            dir.join("pki"),
            bundle,
            root.join("models/dev-verifying-key.txt"),
            dir.join("keys.redb"),
        ),
    )
    .unwrap();
    serve(dir)
}

/// `tandem cloud serve --config dir/cloud.toml`; its port.
fn serve(dir: &Path) -> (Cloud, u16) {
    let mut child = bin()
        .args(["cloud", "serve", "--config"])
        .arg(dir.join("cloud.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for r in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let cloud = Cloud(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("tandem cloud listening on") {
                let port = line
                    .rsplit(':')
                    .next()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no port in {line:?}"));
                return (cloud, port);
            }
        }
    }
    panic!("tandem cloud serve did not start");
}

fn embedding(out: &std::process::Output) -> Vec<f64> {
    let v = common::json_lines(out).pop().expect("a JSON line");
    v["embedding"]
        .as_array()
        .unwrap_or_else(|| panic!("no embedding in {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn embed_meets_a_set1_only_cloud_on_set1() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tiny-st");
    tiny::write_model_dir(&src, &checkpoint());
    let bundle = tmp.path().join("bundle");
    common::run_ok(&[
        "model".as_ref(),
        "import-bert".as_ref(),
        src.as_os_str(),
        "--out".as_ref(),
        bundle.as_os_str(),
    ]);
    let pki = tmp.path().join("pki");
    common::run_ok(&["pki".as_ref(), "init".as_ref(), pki.as_os_str()]);
    let (_cloud, port) = start_cloud(tmp.path(), &bundle);
    let text = "hello private clouds";
    let remote = common::run_ok(&[
        "embed".as_ref(),
        "--model".as_ref(),
        bundle.as_os_str(),
        "--cloud".as_ref(),
        format!("127.0.0.1:{port}").as_ref(),
        "--pki".as_ref(),
        pki.as_os_str(),
        text.as_ref(),
    ]);
    let loopback = common::run_ok(&[
        "embed".as_ref(),
        "--model".as_ref(),
        bundle.as_os_str(),
        text.as_ref(),
    ]);
    let (a, b) = (embedding(&remote), embedding(&loopback));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "set 1 (remote) and set 2 (loopback) are both exact");
}

/// `tandem demo` (digits, its own loopback cloud and device, both with their default parameter
/// sets) runs under the default set 2; before, both defaults listed set 1 first and the demo
/// negotiated set 1. Encrypted predictions still equal the plaintext ones.
#[test]
fn demo_runs_the_default_parameter_set() {
    let out = common::run_ok(&["demo", "--json"]);
    let v = common::json_lines(&out).pop().expect("a JSON line");
    assert_eq!(
        v["param_set"].as_str(),
        Some(tandem::he::DEFAULT_PARAMETERS.name),
        "{v}"
    );
    assert_eq!(
        tandem::he::DEFAULT_PARAMETERS.name,
        "PARAMS_V2_N4096_Q90RNS_TUNIFORM4_SEC132_2M64"
    );
    let enc = v["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == "encrypted")
        .unwrap_or_else(|| panic!("no encrypted mode in {v}"));
    assert_eq!(enc["predictions_match_plaintext"], true, "{enc}");
}

/// `tandem device infer` against a default `tandem cloud serve` (digits): by default the
/// session runs set 2; `param_sets = [1]` in device.toml pins the device to set 1 (before, the
/// device.toml had no such key: `deny_unknown_fields` refused it). Same class either way.
#[test]
fn device_infer_reports_and_pins_the_parameter_set() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pki = tmp.path().join("pki");
    common::run_ok(&["pki".as_ref(), "init".as_ref(), pki.as_os_str()]);
    std::fs::write(
        tmp.path().join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\npki_dir = {:?}\nmodels = [{:?}]\nverifying_key = {:?}\nkey_store = {:?}\n",
            pki,
            root.join("models/digits"),
            root.join("models/dev-verifying-key.txt"),
            tmp.path().join("keys.redb"),
        ),
    )
    .unwrap();
    let (_cloud, port) = serve(tmp.path());
    let x = common::digits_exit_rows().1.x[0].clone();
    let input = tmp.path().join("x.json");
    std::fs::write(&input, serde_json::to_string(&x).unwrap()).unwrap();
    let mut seen = Vec::new();
    for (i, sets) in ["", "param_sets = [1]\n"].iter().enumerate() {
        let conf = tmp.path().join(format!("device{i}.toml"));
        std::fs::write(
            &conf,
            format!(
                "cloud = \"127.0.0.1:{port}\"\npki_dir = {:?}\ndevice = \"device-1\"\nmodel = {:?}\nverifying_key = {:?}\nstate_dir = {:?}\nprotection = \"encrypted\"\n{sets}",
                pki,
                root.join("models/digits"),
                root.join("models/dev-verifying-key.txt"),
                tmp.path().join("state"),
            ),
        )
        .unwrap();
        let out = common::run_ok(&[
            "device".as_ref(),
            "infer".as_ref(),
            "--config".as_ref(),
            conf.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
        ]);
        let v = common::json_lines(&out).pop().expect("a JSON line");
        seen.push((v["param_set"].as_u64(), v["class"].as_u64()));
    }
    assert_eq!(seen[0].0, Some(2), "{seen:?}");
    assert_eq!(seen[1].0, Some(1), "{seen:?}");
    assert_eq!(seen[0].1, seen[1].1);
}
