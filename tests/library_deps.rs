//! The `parallm` library's dependency tree holds none of the benchmarks'
//! crates: plotting, fonts, PNG and the HTTP client belong to the `parallm`
//! binary's package (`parallm-cli`), so a program that embeds the library
//! never builds them.
//!
//! Asks `cargo tree --offline` (the cargo running this test; everything it
//! needs is in `Cargo.lock` and the local registry cache after the build).

use std::path::Path;
use std::process::Command;

/// Crates only the benchmarks of the binary may pull in.
const BENCH_ONLY: &[&str] = &[
    "plotters",
    "plotters-backend",
    "plotters-bitmap",
    "ab_glyph",
    "ab_glyph_rasterizer",
    "png",
    "ttf-noto-sans",
    "awc",
];

/// The names of every crate in `cargo tree -p PACKAGE -e normal`.
fn normal_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
        ])
        .arg(package)
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn library_does_not_depend_on_benchmark_crates() {
    let deps = normal_dependencies("parallm");
    assert!(
        deps.iter().any(|d| d == "parallm-actors"),
        "cargo tree did not list the library's own dependencies: {deps:?}"
    );
    let leaked: Vec<&str> = BENCH_ONLY
        .iter()
        .copied()
        .filter(|name| deps.iter().any(|d| d == name))
        .collect();
    assert!(
        leaked.is_empty(),
        "the parallm library depends on {leaked:?}; those belong to the binary's benchmarks (parallm-cli)"
    );
}

#[test]
fn binary_still_has_its_benchmark_crates() {
    // The check above means something only if the names are right: the
    // binary's package does pull these in.
    let deps = normal_dependencies("parallm-cli");
    for name in ["plotters", "ab_glyph", "ttf-noto-sans", "awc"] {
        assert!(
            deps.iter().any(|d| d == name),
            "parallm-cli no longer lists {name}; update BENCH_ONLY in tests/library_deps.rs"
        );
    }
}

#[test]
fn the_default_build_needs_no_mpi() {
    // MPI is the `mpi` feature's: without it, neither the library nor the
    // binary links rsmpi (which needs OpenMPI and libclang to build).
    for package in ["parallm", "parallm-cli"] {
        let deps = normal_dependencies(package);
        assert!(
            deps.iter().any(|d| d == "parallm-cluster"),
            "{package} should depend on parallm-cluster: {deps:?}"
        );
        for mpi in ["mpi", "mpi-sys"] {
            assert!(
                !deps.iter().any(|d| d == mpi),
                "{package}'s default build depends on {mpi}"
            );
        }
    }
}
