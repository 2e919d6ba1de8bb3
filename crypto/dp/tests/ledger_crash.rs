//! Kill -9 test: the ledger never counts fewer charges than releases that left the process.
//!
//! The test binary re-executes itself as a child (`TANDEM_DP_CRASH_CHILD=<ledger path>`),
//! which loops: charge (write-ahead, fsync) → print `RELEASED <seq>` to stdout → flush. The
//! parent reads those lines, sends SIGKILL (`Child::kill`) after a random delay, restarts the
//! child on the same ledger, and after each round checks
//! `records in ledger ≥ RELEASED lines seen` — and that the ledger reopens (a crash is never
//! reported as corruption).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tandem_dp::{Accountant, Ledger, Policy, SecureBits};

const ENV: &str = "TANDEM_DP_CRASH_CHILD";
const ROUNDS: usize = 25;

#[test]
fn crash_child() {
    // Child mode only; a no-op in a normal test run.
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let (mut acct, _) = Accountant::open(path.as_ref(), Policy::new(1e12, 3600).unwrap()).unwrap();
    let out = std::io::stdout();
    for i in 0u64.. {
        let receipt = acct.charge(b"device-under-test", i, 0.01).unwrap();
        // Only now may the release leave the process.
        let mut lock = out.lock();
        writeln!(lock, "RELEASED {}", receipt.seq()).unwrap();
        lock.flush().unwrap();
    }
}

#[test]
fn sigkill_never_undercounts() {
    let dir = std::env::temp_dir().join(format!("tandem-dp-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = dir.join("ledger.bin");
    let exe = std::env::current_exe().unwrap();
    let mut rng = SecureBits::new().unwrap();
    let mut seen_total = 0u64;
    let mut torn_total = 0u64;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ENV, &ledger)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<u64>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prefixes the first line with `test crash_child ... `.
                if let Some((_, seq)) = line.split_once("RELEASED ") {
                    let _ = tx.send(seq.trim().parse().unwrap());
                }
            }
        });
        // Random kill point: 5–120 ms after the child's first release.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child made no release");
        let delay = 5 + rng.uniform_below_u64(116).unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL on Unix
        let _ = child.wait();
        reader.join().unwrap();
        let mut seen = 1u64;
        let mut max_seq = first;
        while let Ok(s) = rx.try_recv() {
            seen += 1;
            max_seq = max_seq.max(s);
        }
        seen_total += seen;
        let (l, report) = Ledger::open(&ledger, |_| {}).expect("ledger must reopen after SIGKILL");
        torn_total += report.torn_bytes;
        assert!(
            l.len() >= seen_total && l.len() > max_seq,
            "round {round}: ledger has {} records, {seen_total} releases seen (max seq {max_seq})",
            l.len()
        );
        eprintln!(
            "round {round}: killed after {delay} ms, releases seen {seen_total}, ledger {}",
            l.len()
        );
    }
    eprintln!("{ROUNDS} kills, {seen_total} releases seen, torn bytes discarded {torn_total}");
    let _ = std::fs::remove_dir_all(&dir);
}
