//! The CUDA backend without a GPU to run on: the kernels compile for
//! Hopper with NVRTC, and asking for a GPU that is not there is a clear error.
//! (The kernels' numerics and the backend's forward pass are tested on the
//! host emulation in `kernels` and `framework`; GPU runs are in
//! `docs/benchmarks.md`.)

use std::path::Path;
use std::process::Command;

fn parallm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_parallm"))
}

/// Every kernel compiles to PTX for sm_90 with NVRTC 13.0, installed from
/// the Python package by `tests/support/nvrtc.sh` (no GPU, no toolkit).
#[test]
fn every_kernel_compiles_for_sm_90_with_nvrtc() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/nvrtc.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run nvrtc.sh");
    assert!(
        out.status.success(),
        "nvrtc.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lib_dir = stdout
        .lines()
        .last()
        .expect("nvrtc.sh prints the library directory");
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{lib_dir}:{old}"),
        _ => lib_dir.to_string(),
    };
    let out = parallm()
        .args(["cuda", "--compile", "compute_90"])
        .env("LD_LIBRARY_PATH", ld)
        .output()
        .expect("run parallm cuda");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "parallm cuda --compile failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("nvrtc: yes"), "{text}");
    let n = kernels::cuda::nvrtc::kernel_names().len();
    assert!(
        text.contains(&format!("compiled {n} kernels for compute_90")),
        "{text}"
    );
    eprintln!("{text}");
}

/// A CUDA engine on a GPU that is not there refuses to start and says which
/// library or device is missing; nothing panics. Without CUDA (CI) that is a
/// missing library; on a machine with GPUs, ordinal 4096 is past the last, so
/// the test runs, and means the same, everywhere.
#[test]
fn a_cuda_device_that_is_not_there_is_a_clear_error() {
    let out = parallm()
        .args([
            "bench",
            "throughput",
            "--synthetic",
            "tiny",
            "--device",
            "cuda:4096",
            "--concurrency",
            "1",
            "--prompt-tokens",
            "4",
            "--output-tokens",
            "2",
        ])
        .output()
        .expect("run parallm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("is not available")
            || err.contains("no CUDA device")
            || err.contains("reports no devices"),
        "{err}"
    );
}

/// `parallm cuda --decode` on the host emulation (the command a GPU run uses,
/// checked here without one): the report's table and the profile of a
/// batch-2 decode step; bad sizes are refused naming the flags.
#[test]
fn cuda_decode_reports_and_profiles_on_the_emulation() {
    let out = parallm()
        .args([
            "cuda",
            "--decode",
            "tiny32",
            "--emulated",
            "--depth",
            "6",
            "--steps",
            "2",
            "--batch",
            "2",
        ])
        .output()
        .expect("run parallm cuda --decode");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        text.contains("| tiny32 | emulated CUDA device (host) |"),
        "{text}"
    );
    assert!(
        text.contains("batch-2 decode step (2 steps after 6 tokens)"),
        "{text}"
    );
    for op in [
        "attention (+ KV write)",
        "matmul gate+up (fused)",
        "**whole step**",
    ] {
        assert!(text.contains(op), "no {op} row:\n{text}");
    }
    let out = parallm()
        .args(["cuda", "--decode", "tiny32", "--emulated", "--batch", "0"])
        .output()
        .expect("run parallm cuda --decode");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--batch must be at least 1"), "{err}");
}
