//! The kit is a crate of its own: its dependency tree names no model, tensor,
//! tokenizer, GPU or HTTP crate.

use std::process::Command;

#[test]
fn the_kit_depends_on_no_model_gpu_or_http_crate() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "parallm-kit",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tree.contains("actix"),
        "the tree lists the kit's dependencies:\n{tree}"
    );
    for banned in [
        "candle-core",
        "tokenizers",
        "cudarc",
        "actix-web",
        "plotters",
        "parallm-framework",
        "dashmap",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{banned} "))),
            "the kit depends on {banned}:\n{tree}"
        );
    }
}
