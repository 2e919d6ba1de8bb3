//! One writer per ledger: an exclusive OS lock held while a ledger is open, so the privacy
//! budget can never be overdrawn by concurrency (issue 12, item 2: two `tandem device infer`
//! processes on one state directory released 8 times under a budget of 4, then every later
//! run failed with "ledger corrupted"). Requirement TDM-LEDG-2 (`specs/dp.md` §5).
//!
//! The two-process tests re-execute this test binary as children (`TANDEM_DP_LOCK_CHILD`),
//! like `ledger_crash.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_dp::{Accountant, DpError, Ledger, Policy};

const ENV: &str = "TANDEM_DP_LOCK_CHILD";
const ENV_MODE: &str = "TANDEM_DP_LOCK_MODE";
/// ρ per release and the budget: 4 releases fit (the scenario).
const RHO: f64 = 0.25;
const BUDGET: f64 = 1.0 + 1e-9;
const NOW: u64 = 1_000;
const DEVICE: &[u8] = b"device-1";

/// Tests in this binary run on parallel threads. Between `fork` and `exec`, a child spawned by
/// one test holds a copy of every descriptor open in the parent, including a ledger another
/// test just opened, and with it that ledger's `flock` (locks belong to the open file
/// description). A test that reopens a ledger its threads have just closed then sees
/// `LedgerInUse` for that instant (seen once in CI). Tests that spawn children and tests that
/// reopen therefore take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn policy() -> Policy {
    Policy::new(BUDGET, 86_400).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-dp-lock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ledger.bin")
}

/// Releases one process or thread may make: opens the ledger (retrying while another holder
/// has it, for at most `patience`), then charges until the budget refuses.
fn open_and_spend(path: &Path, patience: Duration, mut on_release: impl FnMut(u64)) -> u64 {
    let start = Instant::now();
    let (mut acct, _) = loop {
        match Accountant::open(path, policy()) {
            Ok(a) => break a,
            Err(DpError::LedgerInUse { .. }) if start.elapsed() < patience => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("open failed: {e}"),
        }
    };
    let mut released = 0;
    loop {
        match acct.charge(DEVICE, NOW, RHO) {
            Ok(receipt) => {
                released += 1;
                on_release(receipt.seq());
            }
            Err(DpError::BudgetExceeded { .. }) => return released,
            Err(e) => panic!("charge failed: {e}"),
        }
    }
}

/// Releases the budget allows, measured by one sequential writer on a fresh ledger.
fn allowed_sequentially() -> u64 {
    let p = tmp("reference");
    let n = open_and_spend(&p, Duration::ZERO, |_| {});
    let _ = std::fs::remove_dir_all(p.parent().unwrap());
    n
}

#[test]
fn second_open_is_refused_with_ledger_in_use_naming_the_path() {
    let _serial = serial();
    let p = tmp("second");
    let (first, _) = Accountant::open(&p, policy()).unwrap();
    for _ in 0..2 {
        match Accountant::open(&p, policy()) {
            Err(e @ DpError::LedgerInUse { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&p.display().to_string()), "{msg}");
                assert!(msg.contains("in use"), "{msg}");
            }
            other => panic!("second open must be refused, got {other:?}"),
        }
        match Ledger::open(&p, |_| {}) {
            Err(DpError::LedgerInUse { path }) => assert_eq!(path, p),
            other => panic!("second Ledger::open must be refused, got {other:?}"),
        }
    }
    // The refused opens neither read nor wrote anything: the holder keeps charging.
    let mut first = first;
    let _ = first.charge(DEVICE, NOW, RHO).unwrap();
    drop(first);
    let (again, report) = Accountant::open(&p, policy()).unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(again.records(), 1);
}

#[test]
fn threads_racing_on_one_ledger_never_exceed_the_budget() {
    let _serial = serial();
    let allowed = allowed_sequentially();
    assert_eq!(
        allowed, 4,
        "the scenario of the issue: a budget of 4 releases"
    );
    for round in 0..5 {
        let p = Arc::new(tmp(&format!("race{round}")));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let p = Arc::clone(&p);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait(); // all open at once
                    open_and_spend(&p, Duration::from_secs(60), |_| {})
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(
            total <= allowed,
            "round {round}: {total} releases under a budget of {allowed}"
        );
        assert_eq!(total, allowed, "round {round}: the budget is used exactly");
        let (a, report) = Accountant::open(&p, policy()).expect("ledger reopens");
        assert_eq!(report.records, allowed);
        assert_eq!(report.torn_bytes, 0);
        assert!(a.spent(DEVICE, NOW) <= BUDGET);
    }
}

/// Child mode (a no-op in a normal run): `spend` charges until the budget refuses and prints
/// `RELEASED <seq>` after each durable charge; `hold` opens, prints `OPEN` and holds the ledger until killed.
/// (libtest prints `test lock_child ... ` before the first line, so lines are matched by
/// their end, not their start.)
#[test]
fn lock_child() {
    let Some(path) = std::env::var_os(ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let out = std::io::stdout();
    match std::env::var(ENV_MODE).as_deref() {
        Ok("hold") => {
            let (_acct, _) = Accountant::open(&path, policy()).unwrap();
            writeln!(out.lock(), "OPEN").unwrap();
            out.lock().flush().unwrap();
            // Hold until killed; stdin closing (the parent died) also ends the child.
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        }
        _ => {
            let _ = open_and_spend(&path, Duration::from_secs(60), |seq| {
                let mut lock = out.lock();
                writeln!(lock, "RELEASED {seq}").unwrap();
                lock.flush().unwrap();
            });
        }
    }
}

fn child(path: &Path, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["lock_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(ENV, path)
        .env(ENV_MODE, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn two_processes_on_one_ledger_never_exceed_the_budget() {
    let _serial = serial();
    let allowed = allowed_sequentially();
    for round in 0..3 {
        let p = tmp(&format!("procs{round}"));
        let children: Vec<_> = (0..2).map(|_| child(&p, "spend")).collect();
        let mut released = 0u64;
        for mut c in children {
            let stdout = c.stdout.take().unwrap();
            released += BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .filter(|l| l.contains("RELEASED "))
                .count() as u64;
            assert!(c.wait().unwrap().success());
        }
        assert!(
            released <= allowed,
            "round {round}: {released} releases by two processes under a budget of {allowed}"
        );
        assert_eq!(released, allowed);
        let (_, report) = Ledger::open(&p, |_| {}).expect("no 'ledger corrupted' afterwards");
        assert_eq!(report.records, allowed);
    }
}

#[test]
fn lock_of_a_killed_process_is_released_by_the_os() {
    let _serial = serial();
    let p = tmp("killed");
    let mut holder = child(&p, "hold");
    let opened = BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.ends_with("OPEN"));
    assert!(opened, "the holder did not open the ledger");
    match Accountant::open(&p, policy()) {
        Err(DpError::LedgerInUse { path }) => assert_eq!(path, p),
        other => panic!("a ledger held by another process must be refused, got {other:?}"),
    }
    holder.kill().unwrap(); // SIGKILL: no chance to clean up
    let _ = holder.wait();
    let (_, report) = Accountant::open(&p, policy()).expect("no stale lock after SIGKILL");
    assert_eq!(report.records, 0);
}
