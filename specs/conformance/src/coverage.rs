//! Requirement coverage (`tandem-conformance coverage`): requirement IDs
//! defined in `specs/protocol.md` versus citations in code and tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn ids_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text.get(i..).and_then(|s| s.find("TDM-")) {
        let start = i + pos;
        let mut j = start + 4;
        while b.get(j).is_some_and(u8::is_ascii_uppercase) {
            j += 1;
        }
        if j > start + 4 && b.get(j) == Some(&b'-') {
            let mut k = j + 1;
            while b.get(k).is_some_and(u8::is_ascii_digit) {
                k += 1;
            }
            if k > j + 1 {
                if let Some(id) = text.get(start..k) {
                    out.insert(id.to_string());
                }
            }
            i = k;
        } else {
            i = j;
        }
    }
    out
}

fn defined(spec: &str) -> BTreeSet<String> {
    // A definition is a list item starting with `- **TDM-...**`.
    spec.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- **"))
        .filter_map(|l| l.split("**").next())
        .filter(|id| id.starts_with("TDM-"))
        .map(str::to_string)
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            if p.file_name()
                .is_some_and(|n| n == "target" || n == "corpus" || n == "artifacts")
            {
                continue;
            }
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn cited(root: &Path, dirs: &[&str]) -> BTreeMap<String, usize> {
    let mut files = Vec::new();
    for d in dirs {
        walk(&root.join(d), &mut files);
    }
    let mut m = BTreeMap::new();
    for f in files {
        if let Ok(t) = std::fs::read_to_string(&f) {
            for id in ids_in(&t) {
                *m.entry(id).or_insert(0) += 1;
            }
        }
    }
    m
}

/// Prints the coverage report; returns `true` if every requirement is cited
/// in both code and tests.
pub fn report(root: &Path) -> Result<bool, String> {
    let spec_path = root.join("specs/protocol.md");
    let spec =
        std::fs::read_to_string(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let reqs = defined(&spec);
    // Requirements on the runtimes (key store, layer ids, admission) are implemented in cloud/ and
    // devices/, so their sources and tests count as well.
    let code = cited(root, &["protocol/src", "cloud/src", "devices/src"]);
    let tests = cited(
        root,
        &[
            "protocol/tests",
            "cloud/tests",
            "devices/tests",
            "specs/conformance/tests",
            "fuzz/fuzz_targets",
        ],
    );
    let (mut c, mut e) = (0, 0);
    for id in &reqs {
        let in_code = code.contains_key(id);
        let in_tests = tests.contains_key(id);
        c += usize::from(in_code);
        e += usize::from(in_tests);
        println!(
            "{id:<14} code: {:<3} tests: {:<3}{}",
            code.get(id).copied().unwrap_or(0),
            tests.get(id).copied().unwrap_or(0),
            if in_code && in_tests {
                ""
            } else {
                "  <-- uncited"
            }
        );
    }
    for id in code.keys().chain(tests.keys()).collect::<BTreeSet<_>>() {
        if !reqs.contains(id) {
            println!("warning: {id} is cited but not defined in protocol.md");
        }
    }
    let none = reqs
        .iter()
        .filter(|id| !code.contains_key(*id) && !tests.contains_key(*id))
        .count();
    println!("not cited at all: {none}");
    println!(
        "requirements: {}, cited in code: {c}, cited in tests: {e}",
        reqs.len()
    );
    Ok(c == reqs.len() && e == reqs.len())
}
