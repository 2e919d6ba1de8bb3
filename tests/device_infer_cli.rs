//! `tandem device infer` against a live `tandem cloud serve` over mTLS (both the built binary):
//! with `early_exit = true` in device.toml a row the signed exit head is confident about is
//! answered on the device (nothing sent, no ε), an unsure row goes to the cloud under encryption,
//! and with early exit off every row goes to the cloud; the cloud's answers equal the plaintext
//! integer path's class.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

struct Cloud(Child);
impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_cloud(dir: &Path, root: &Path) -> (Cloud, u16) {
    let pki = dir.join("pki");
    common::run_ok(&["pki".as_ref(), "init".as_ref(), pki.as_os_str()]);
    // Port 0: the cloud prints the address it bound.
    std::fs::write(
        dir.join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\npki_dir = {:?}\nmodels = [{:?}]\nverifying_key = {:?}\nkey_store = {:?}\n",
            dir.join("pki"),
            root.join("models/digits"),
            root.join("models/dev-verifying-key.txt"),
            dir.join("keys.redb"),
        ),
    )
    .unwrap();
    let mut child = bin()
        .args(["cloud", "serve", "--config"])
        .arg(dir.join("cloud.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for r in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
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
            if line.contains("listening") {
                let port = line
                    .split("127.0.0.1:")
                    .nth(1)
                    .and_then(|s| {
                        s.chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                            .parse()
                            .ok()
                    })
                    .unwrap_or_else(|| panic!("no port in {line:?}"));
                return (cloud, port);
            }
        }
    }
    panic!("tandem cloud serve did not start");
}

fn infer(
    dir: &Path,
    root: &Path,
    port: u16,
    early_exit: bool,
    rows: &[Vec<f32>],
) -> Vec<serde_json::Value> {
    std::fs::write(
        dir.join("device.toml"),
        format!(
            "cloud = \"127.0.0.1:{port}\"\npki_dir = {:?}\ndevice = \"device-1\"\nmodel = {:?}\nverifying_key = {:?}\nstate_dir = {:?}\nprotection = \"encrypted\"\nearly_exit = {early_exit}\n",
            dir.join("pki"),
            root.join("models/digits"),
            root.join("models/dev-verifying-key.txt"),
            dir.join("state"),
        ),
    )
    .unwrap();
    std::fs::write(dir.join("rows.json"), serde_json::to_string(rows).unwrap()).unwrap();
    let (config, input) = (dir.join("device.toml"), dir.join("rows.json"));
    let out = common::run_ok(&[
        "device".as_ref(),
        "infer".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn device_infer_answers_confident_rows_on_the_device_only_with_early_exit_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (bundle, test, confident, unsure) = common::digits_exit_rows();
    let rows = vec![test.x[confident].clone(), test.x[unsure].clone()];

    let (_cloud, port) = start_cloud(dir.path(), root);
    let on = infer(dir.path(), root, port, true, &rows);
    assert_eq!(on.len(), 2);
    assert_eq!(on[0]["answered_on"], "device", "{on:?}");
    assert_eq!(on[0]["bytes_up"], 0);
    assert_eq!(on[0]["epsilon_spent"], 0.0);
    assert!(on[0]["exit_confidence"].as_f64().unwrap() > 0.0);
    assert_eq!(on[1]["answered_on"], "cloud", "{on:?}");
    assert!(on[1]["bytes_up"].as_u64().unwrap() > 0);
    assert!(on[1]["exit_confidence"].as_f64().is_some());

    let off = infer(dir.path(), root, port, false, &rows);
    for (k, line) in off.iter().enumerate() {
        assert_eq!(line["answered_on"], "cloud", "{off:?}");
        assert!(line["exit_confidence"].is_null(), "{off:?}");
        // Encrypted = the plaintext integer path.
        let plain = bundle.predict_plain(&rows[k]).unwrap().class;
        assert_eq!(line["class"].as_u64().unwrap() as usize, plain, "{off:?}");
    }
    assert_eq!(on[1]["class"], off[1]["class"]);
}
