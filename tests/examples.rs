//! The examples, run as programs: the map-reduce on the actor kit agrees with
//! its serial computation (also through an injected node failure), and the
//! embedded engine finishes all 100 requests on the synthetic model.
//!
//! `cargo test` builds the examples before it runs the tests; with a target
//! filter (`cargo test --test examples`) it does not, so build them first with
//! `cargo build --examples` (same profile). A missing or stale binary fails the
//! test with that advice rather than skipping it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>/examples/<name>`, found from this test's own path
/// (`target/<profile>/deps/examples-<hash>`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let advice = format!(
        "build it with `cargo build --examples{}` (plain `cargo test` builds it too)",
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        }
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("example binary {} not found ({e}); {advice}", bin.display()));
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.rs"));
    if let Ok(changed) = std::fs::metadata(&source).and_then(|m| m.modified()) {
        assert!(
            built >= changed,
            "example binary {} is older than {}; {advice}",
            bin.display(),
            source.display()
        );
    }
    bin
}

fn run(name: &str, args: &[&str]) -> (String, String) {
    let bin = example(name);
    let out: Output = Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{name} panicked: {stderr}");
    (stdout, stderr)
}

/// The number after `key` in `line`, up to the next comma or space.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
        + key.len()..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("bad number after {key:?} in {line:?}: {e}"))
}

fn check_map_reduce(args: &[&str]) -> String {
    let (stdout, _) = run("map_reduce", args);
    let tasks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("task ")).collect();
    assert_eq!(tasks.len(), 5, "five task lines:\n{stdout}");
    for line in tasks {
        let parallel = number_after(line, "parallel = ");
        let serial = number_after(line, "serial = ");
        assert!(
            (parallel - serial).abs() <= 1e-9 * serial.abs(),
            "answers differ: {line}"
        );
        assert!(line.ends_with(" ok"), "{line}");
    }
    // [0, 1): (√π / 2) · erf(1).
    let first = stdout
        .lines()
        .find(|l| l.starts_with("task 0 "))
        .unwrap_or_default();
    assert!(
        (number_after(first, "serial = ") - 0.746_824_132_812_427).abs() < 1e-12,
        "{first}"
    );
    assert!(stdout.contains("all 5 answers match"), "{stdout}");
    stdout
}

#[test]
fn map_reduce_matches_the_serial_answer() {
    let stdout = check_map_reduce(&[]);
    assert!(
        stdout.contains("steps: 5 (0 failed), node restarts: 0"),
        "{stdout}"
    );
}

#[test]
fn map_reduce_survives_a_node_failure() {
    let stdout = check_map_reduce(&["--inject-fault"]);
    assert!(
        stdout.contains("steps: 5 (1 failed), node restarts: 1"),
        "{stdout}"
    );
}

#[test]
fn doc_pipeline_ranks_as_the_serial_computation() {
    let (stdout, _) = run("doc_pipeline", &[]);
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(": pipeline "))
        .collect();
    assert_eq!(lines.len(), 5, "five rankings:\n{stdout}");
    assert!(lines.iter().all(|l| l.ends_with(" ok")), "{stdout}");
    assert!(
        stdout.contains("all 5 rankings match the serial computation (5 steps)"),
        "{stdout}"
    );
    // The query about failed nodes finds the sentence about restarts.
    assert!(
        stdout.contains("best: \"A failed node is restarted"),
        "{stdout}"
    );
}

#[test]
fn embed_engine_finishes_every_request_on_the_synthetic_model() {
    let (stdout, _) = run("embed_engine", &["--synthetic"]);
    let mut seen: Vec<usize> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("done #"))
        .map(|rest| {
            let index = rest.split_whitespace().next().unwrap_or_default();
            index
                .parse()
                .unwrap_or_else(|e| panic!("bad request index {index:?}: {e}"))
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..100).collect::<Vec<_>>(),
        "one line per request:\n{stdout}"
    );
    assert!(
        stdout.contains("100/100 finished: 742 prompt + 1600 completion tokens"),
        "{stdout}"
    );
}
