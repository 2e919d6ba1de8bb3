//! `tandem bench matmul`: the encrypted linear layer on the fixed shapes, with a plaintext
//! baseline measured in the same run.

use anyhow::{bail, Context as _};
use ndarray::Array2;
use std::sync::Arc;
use std::time::Instant;
use tandem::he::{
    Client, Context, EncryptedInput, EncryptedOutput, EvalOptions, LinkModel, OutputMode,
    PlanOptions, PreparedEvaluationKey, PreparedLayer, DEFAULT_PARAMETERS,
};

/// The shapes the anchor (concrete-ml-extensions) was measured on, then the transformer
/// shapes of all-MiniLM-L6-v2 (QKV fused, O, FFN up, FFN down; 16 and 128 tokens):
/// (batch, in, out).
pub const SHAPES: [(usize, usize, usize); 10] = [
    (1, 64, 10),
    (1, 784, 128),
    (1, 1024, 1024),
    (8, 768, 768),
    (1, 4096, 4096),
    (16, 384, 1152),
    (16, 384, 384),
    (16, 384, 1536),
    (16, 1536, 384),
    (128, 384, 1536),
];

/// Parses `BxI@IxO`.
pub fn parse_shape(s: &str) -> anyhow::Result<(usize, usize, usize)> {
    let (lhs, rhs) = s
        .split_once('@')
        .context("shape must look like 1x1024@1024x1024")?;
    let (b, i) = lhs.split_once('x').context("left side must be BxI")?;
    let (i2, o) = rhs.split_once('x').context("right side must be IxO")?;
    let (b, i, i2, o): (usize, usize, usize, usize) =
        (b.parse()?, i.parse()?, i2.parse()?, o.parse()?);
    if i != i2 || b == 0 || i == 0 || o == 0 {
        bail!("inner dimensions must agree and be non-zero");
    }
    Ok((b, i, o))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Deterministic int8-range values (xorshift), so every run measures the same layer.
fn int8_values(n: usize, seed: u64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 256) as i64 - 128
        })
        .collect()
}

/// Runs the benchmark; prints one JSON object per (shape, mode) with `--json`. Batch plans
/// share each mask among up to `max_bodies` secrets (1 = single-secret; the planner chooses
/// r ≤ it by its cost model, bytes weighed at `link_kbit_s`).
pub fn matmul(
    shape: Option<&str>,
    runs: usize,
    threads: usize,
    json: bool,
    max_bodies: usize,
    link_kbit_s: u32,
) -> anyhow::Result<()> {
    let shapes = match shape {
        Some(s) => vec![parse_shape(s)?],
        None => SHAPES.to_vec(),
    };
    let runs = runs.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()?;
    let opts = EvalOptions {
        parallel: threads > 1,
    };
    let ctx = Arc::new(Context::new(DEFAULT_PARAMETERS));
    if !json {
        println!(
            "{:<20} {:<7} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10} {:>10} {:>7} {:>9}",
            "shape",
            "mode",
            "keygen_ms",
            "key_bytes",
            "enc_ms",
            "server_ms",
            "dec_ms",
            "up_bytes",
            "down_bytes",
            "err",
            "plain_ms"
        );
    }
    for (batch, n_in, n_out) in shapes {
        let w = int8_values(n_in * n_out, 1);
        let bias: Vec<i64> = int8_values(n_out, 2).iter().map(|v| v * 64).collect();
        let xs: Vec<Vec<i64>> = (0..batch)
            .map(|r| int8_values(n_in, 3 + r as u64))
            .collect();
        let reference: Vec<Vec<i64>> = xs
            .iter()
            .map(|x| {
                (0..n_out)
                    .map(|o| {
                        w[o * n_in..(o + 1) * n_in]
                            .iter()
                            .zip(x)
                            .map(|(a, b)| a * b)
                            .sum::<i64>()
                            + bias[o]
                    })
                    .collect()
            })
            .collect();
        let plaintext_ms = plaintext_baseline(&w, &xs, n_in, n_out, runs);
        for mode in [OutputMode::NoKey, OutputMode::Packed] {
            let t = Instant::now();
            // Requests carry at most MAX_BATCH rows: larger batches go as several requests.
            let per_request = batch.min(tandem::he::limits::MAX_BATCH);
            let layer = PreparedLayer::prepare_with_link(
                ctx.clone(),
                mode,
                n_in,
                n_out,
                &w,
                &bias,
                128,
                PlanOptions {
                    chunk: None,
                    batch: (per_request > 1).then_some(per_request),
                    max_bodies,
                },
                LinkModel {
                    kbit_per_s: link_kbit_s,
                },
            )?;
            let prepare_ms = ms(t);
            let plan = *layer.plan();
            let (mut keygen, mut enc, mut server, mut dec) = (vec![], vec![], vec![], vec![]);
            let (mut up, mut down, mut key_bytes, mut max_err) = (0, 0, 0, 0i64);
            for _ in 0..runs {
                let t = Instant::now();
                let mut client = Client::new(ctx.clone());
                let eval_key = match mode {
                    OutputMode::Packed => Some(client.evaluation_key_for_plans(&[plan])?),
                    OutputMode::NoKey => None,
                };
                keygen.push(ms(t));
                let key_blob = eval_key.as_ref().map(|k| k.to_bytes());
                key_bytes = key_blob.as_ref().map_or(0, Vec::len);
                // Key expansion happens once per device on the server, not per request.
                let prepared_key = match &key_blob {
                    Some(b) => Some(PreparedEvaluationKey::prepare(
                        &tandem::he::EvaluationKey::from_bytes(b, b.len(), &DEFAULT_PARAMETERS)?,
                        &ctx,
                    )?),
                    None => None,
                };
                let (mut t_enc, mut t_server, mut t_dec) = (0.0, 0.0, 0.0);
                let mut ys = Vec::with_capacity(batch);
                (up, down) = (0, 0);
                for rows in xs.chunks(per_request) {
                    let t = Instant::now();
                    let upload = client.encrypt(&plan, rows)?.to_bytes();
                    t_enc += ms(t);
                    up += upload.len();
                    let t = Instant::now();
                    let download = pool.install(|| -> anyhow::Result<Vec<u8>> {
                        let ct = EncryptedInput::from_bytes(&upload, upload.len(), &plan)?;
                        Ok(layer.eval(&ct, prepared_key.as_ref(), opts)?.to_bytes())
                    })?;
                    t_server += ms(t);
                    down += download.len();
                    let t = Instant::now();
                    let out = EncryptedOutput::from_bytes(
                        &download,
                        download.len(),
                        &plan,
                        &client.key_id(),
                    )?;
                    ys.extend(client.decrypt(&plan, &out)?);
                    t_dec += ms(t);
                }
                enc.push(t_enc);
                server.push(t_server);
                dec.push(t_dec);
                for (y, r) in ys.iter().zip(&reference) {
                    for (a, b) in y.iter().zip(r) {
                        max_err = max_err.max((a - b).abs());
                    }
                }
            }
            let server_ms = median(server);
            let row = serde_json::json!({
                "shape": format!("{batch}x{n_in}@{n_in}x{n_out}"),
                "mode": mode.name(),
                "threads": threads,
                "runs": runs,
                "params": DEFAULT_PARAMETERS.name,
                "chunk": plan.chunk,
                "batch_rows": plan.batch_rows,
                "bodies": plan.bodies,
                "link_kbit_s": link_kbit_s,
                "key_switches": xs.chunks(per_request).map(|r| plan.key_switches_for(r.len())).sum::<usize>(),
                "ct_products": xs.chunks(per_request).map(|r| plan.ct_products_for(r.len())).sum::<usize>(),
                "keygen_ms": median(keygen),
                "eval_key_bytes": key_bytes,
                "prepare_ms": prepare_ms,
                "encrypt_ms": median(enc),
                "server_ms": server_ms,
                "decrypt_ms": median(dec),
                "upload_bytes": up,
                "download_bytes": down,
                "max_abs_err": max_err,
                "log2_p_fail": plan.log2_p_fail,
                "plaintext_ms": plaintext_ms,
                "server_over_plaintext": server_ms / plaintext_ms,
            });
            if json {
                println!("{row}");
            } else {
                println!(
                    "{:<20} {:<7} {:>9.1} {:>10} {:>9.2} {:>10.2} {:>9.2} {:>10} {:>10} {:>7} {:>9.3}",
                    row["shape"].as_str().unwrap_or(""), mode.name(), row["keygen_ms"].as_f64().unwrap_or(0.0), key_bytes,
                    row["encrypt_ms"].as_f64().unwrap_or(0.0), server_ms, row["decrypt_ms"].as_f64().unwrap_or(0.0),
                    up, down, max_err, plaintext_ms
                );
            }
        }
    }
    Ok(())
}

/// Median time of an ndarray f32 matmul of the same shape.
fn plaintext_baseline(w: &[i64], xs: &[Vec<i64>], n_in: usize, n_out: usize, runs: usize) -> f64 {
    let wm = Array2::from_shape_fn((n_in, n_out), |(i, o)| w[o * n_in + i] as f32);
    let xm = Array2::from_shape_fn((xs.len(), n_in), |(r, i)| xs[r][i] as f32);
    let mut times = Vec::with_capacity(runs.max(5));
    let mut sink = 0f32;
    for _ in 0..runs.max(5) {
        let t = Instant::now();
        let y = xm.dot(&wm);
        sink += y[[0, 0]];
        times.push(ms(t));
    }
    std::hint::black_box(sink);
    median(times)
}

/// `tandem cloud serve` in a child process, for `tandem bench load --cloud-process`: the load
/// figure then measures a cloud that shares no address space (nor allocator) with the devices.
pub struct CloudProcess {
    child: std::process::Child,
    /// Where the child listens.
    pub addr: std::net::SocketAddr,
    /// Its `/healthz` + `/metrics` address.
    pub metrics: std::net::SocketAddr,
}

impl CloudProcess {
    /// Writes `pki` and a `cloud.toml` under `dir`, starts this executable's `cloud serve`
    /// and waits (≤ 60 s) for it to listen. `postgres`: the shared key store's connection
    /// string (`None`: `dir/keys.redb`).
    pub fn spawn(
        pki: &tandem_tls::DevPki,
        model_dir: &std::path::Path,
        verifying_key: &std::path::Path,
        dir: &std::path::Path,
        max_connections: usize,
        postgres: Option<&str>,
    ) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let pki_dir = dir.join("pki");
        pki.write(&pki_dir)?;
        // Port 0 for both: the child binds them and prints what it bound (no port probed here
        // and released before the child binds it, which a parallel process could take).
        let (addr, metrics) = ("127.0.0.1:0", "127.0.0.1:0");
        let key_store = match postgres {
            Some(url) => format!("{{ postgres = {url:?}, pool_size = 8 }}"),
            None => format!("{:?}", dir.join("keys.redb").display().to_string()),
        };
        let toml = format!(
            "listen = \"{addr}\"\npki_dir = {:?}\nmodels = [{:?}]\nverifying_key = {:?}\nkey_store = {key_store}\nmax_connections = {max_connections}\nmetrics_listen = \"{metrics}\"\n",
            pki_dir.display().to_string(),
            model_dir.display().to_string(),
            verifying_key.display().to_string(),
        );
        let config = dir.join("cloud.toml");
        std::fs::write(&config, toml)?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["cloud", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting `tandem cloud serve`")?;
        let stderr = child.stderr.take().context("child stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // "tandem cloud listening on ADDR", then "… /metrics on http://ADDR". Until then
            // every other line is kept: if the child exits first, they say why.
            let mut listen = None;
            let mut said = Vec::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let last = line.rsplit([' ', '/']).next().unwrap_or("");
                if line.contains("listening on") {
                    listen = last.parse::<std::net::SocketAddr>().ok();
                } else if line.contains("/metrics on") {
                    let metrics = last.parse::<std::net::SocketAddr>().ok();
                    if let (Some(a), Some(m)) = (listen, metrics) {
                        let _ = tx.send(Ok((a, m)));
                    }
                } else if listen.is_none() && said.len() < 40 {
                    said.push(line);
                }
            }
            // End of its stderr: it exited (or closed it) before listening.
            let _ = tx.send(Err(said.join("\n")));
        });
        let (addr, metrics) = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(Ok(bound)) => bound,
            Ok(Err(said)) => {
                let _ = child.kill();
                let status = child.wait().map_or("unknown".into(), |s| s.to_string());
                bail!(
                    "`tandem cloud serve --config {}` exited before listening ({status}):\n{said}",
                    config.display()
                );
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`tandem cloud serve` did not start listening within 60 s");
            }
        };
        Ok(CloudProcess {
            child,
            addr,
            metrics,
        })
    }

    /// Peak resident set of the child so far (VmHWM), in KiB.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Stops the child (this process started it; it is ended by its own id).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for CloudProcess {
    /// A bench that fails after the spawn (a device that cannot connect, a refused input)
    /// must not leave `tandem cloud serve` running: the child is ended by its own id.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy started by `tandem bench load --haproxy` from `cloud/deploy/haproxy.cfg` with its
/// frontend moved to a free loopback port and one `server` line per replica (ended by its own
/// id when dropped).
pub struct Balancer {
    child: std::process::Child,
    /// Where devices connect.
    pub addr: std::net::SocketAddr,
}

impl Balancer {
    /// Starts `bin` in the foreground and waits (≤ 10 s) for it to listen, then for its health
    /// checks to mark the replicas up.
    pub fn spawn(
        bin: &std::path::Path,
        sample: &std::path::Path,
        dir: &std::path::Path,
        replicas: &[(std::net::SocketAddr, std::net::SocketAddr)],
    ) -> anyhow::Result<Self> {
        let fe = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let text = std::fs::read_to_string(sample)
            .with_context(|| format!("reading {}", sample.display()))?;
        let mut out = String::new();
        let mut servers_written = false;
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("bind 127.0.0.1:") {
                out.push_str(&format!("    bind 127.0.0.1:{fe}\n"));
            } else if t.starts_with("server ") {
                if !servers_written {
                    for (i, (tls, health)) in replicas.iter().enumerate() {
                        out.push_str(&format!(
                            "    server replica-{i} {tls} port {}\n",
                            health.port()
                        ));
                    }
                    servers_written = true;
                }
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, out)?;
        let child = std::process::Command::new(bin)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{fe}").parse()?;
        let mut b = Balancer { child, addr };
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if t.elapsed() > std::time::Duration::from_secs(10) {
                let _ = b.child.kill();
                bail!("haproxy did not listen on {addr} within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(1200));
        Ok(b)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over plain HTTP/1.1 on loopback; the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Adds `tandem_keystore_seconds_{sum,count}{op=...}` of one replica's `/metrics` to
/// `acc` as (op, seconds, count).
pub fn add_store_latency(body: &str, acc: &mut Vec<(String, f64, u64)>) {
    for line in body.lines() {
        let (sum, rest) = if let Some(r) = line.strip_prefix("tandem_keystore_seconds_sum{op=\"") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("tandem_keystore_seconds_count{op=\"") {
            (false, r)
        } else {
            continue;
        };
        let Some((op, v)) = rest.split_once("\"} ") else {
            continue;
        };
        let Ok(v) = v.trim().parse::<f64>() else {
            continue;
        };
        let i = match acc.iter().position(|(o, _, _)| o == op) {
            Some(i) => i,
            None => {
                acc.push((op.to_string(), 0.0, 0));
                acc.len() - 1
            }
        };
        if sum {
            acc[i].1 += v;
        } else {
            acc[i].2 += v as u64;
        }
    }
}
