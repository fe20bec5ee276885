//! `parallm perplexity` against llama.cpp's `llama-perplexity` on the same
//! model and text (`tests/golden/perplexity.json`, made by
//! `tests/support/perplexity_golden.sh`), at several layouts; the KL
//! divergence of a model from itself and from coarser weights; and bad
//! input, which must fail with a clear message and leave no file behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn parallm(args: &[&str]) -> Output {
    let model = common::model_path();
    Command::new(env!("CARGO_BIN_EXE_parallm"))
        .arg("perplexity")
        .arg("--model")
        .arg(model)
        .args(args)
        .output()
        .expect("binary runs")
}

fn golden() -> serde_json::Value {
    common::repo_golden("perplexity.json")
}

fn text() -> &'static str {
    common::gpl3_text("perplexity.json")
}

/// Runs and returns the JSON report.
fn report(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-f", text(), "--json", "-"];
    all.extend_from_slice(args);
    let out = parallm(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    // With `--json -` the summary goes to stderr and stdout is the JSON.
    assert!(stderr.contains("Final estimate: PPL = "), "{stderr}");
    serde_json::from_str(&stdout).expect("stdout is the report's JSON alone")
}

#[test]
fn perplexity_is_within_half_a_percent_of_llama_cpp_at_every_layout() {
    let g = &golden()["runs"][0];
    let want = g["ppl"].as_f64().unwrap();
    assert_eq!(g["ctx"], 512);
    for layout in [&[][..], &["--tp", "3"], &["--pp", "2"]] {
        let r = report(&[&["--ctx", "512"][..], layout].concat());
        assert_eq!(r["chunks"], g["chunks"], "{layout:?}");
        assert_eq!(r["scored_tokens"], 14 * 255, "{layout:?}");
        let got = r["ppl"].as_f64().unwrap();
        let off = got / want - 1.0;
        println!(
            "{layout:?}: PPL {got:.4} ± {:.4}, llama.cpp {want:.4}: {:+.3}%",
            r["ppl_error"].as_f64().unwrap(),
            100.0 * off
        );
        assert!(off.abs() < 0.005, "{layout:?}: {got} against {want}");
        let err = r["ppl_error"].as_f64().unwrap() / g["ppl_error"].as_f64().unwrap();
        assert!((err - 1.0).abs() < 0.02, "{layout:?}: error ratio {err}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parallm-ppl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn kl_divergence_is_zero_against_itself_and_grows_with_coarser_weights() {
    let dir = scratch("kld");
    let base = dir.join("base.kld");
    let base = base.to_str().unwrap();
    let short = ["--ctx", "128", "--chunks", "6"];
    let saved = report(
        &[
            &short[..],
            &["--weights", "f32", "--kl-divergence-base", base],
        ]
        .concat(),
    );
    assert!(saved["kld"].is_null());
    assert_eq!(files(&dir), ["base.kld"], "only the finished file");
    let kld = |weights: &str| {
        let r = report(
            &[
                &short[..],
                &[
                    "--weights",
                    weights,
                    "--kl-divergence-base",
                    base,
                    "--kl-divergence",
                ],
            ]
            .concat(),
        );
        let k = r["kld"].clone();
        println!(
            "{weights}: mean KLD {}, same top {}, PPL ratio {}",
            k["mean_kld"], k["same_top"], k["ppl_ratio"]
        );
        (
            k["mean_kld"].as_f64().unwrap(),
            k["same_top"].as_f64().unwrap(),
            k["ppl_ratio"].as_f64().unwrap(),
        )
    };
    assert_eq!(kld("f32"), (0.0, 1.0, 1.0), "a model against itself");
    let (bf16, _, _) = kld("bf16");
    let (q8, q8_top, _) = kld("q8_0");
    assert!(0.0 < bf16 && bf16 < q8, "bf16 {bf16}, q8_0 {q8}");
    assert!(q8_top < 1.0 && q8_top > 0.8, "{q8_top}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn assert_refused(args: &[&str], needle: &str) {
    let out = parallm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("error:") && stderr.contains(needle),
        "{needle:?} not in {stderr}"
    );
}

#[test]
fn bad_input_is_named_and_leaves_no_file() {
    let dir = scratch("bad");
    let base = dir.join("base.kld");
    let json = dir.join("out.json");
    let (base, json) = (base.to_str().unwrap(), json.to_str().unwrap());
    let text = text();
    // The text holds 7639 tokens: not two windows of 4096.
    assert_refused(
        &[
            "-f",
            text,
            "--ctx",
            "4096",
            "--kl-divergence-base",
            base,
            "--json",
            json,
        ],
        "need at least 8192",
    );
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));
    assert_refused(&["-f", &format!("{text}.missing")], "cannot read");
    assert_refused(&["-f", text, "--ctx", "2"], "--ctx is 2");
    // A base made with another window size, then one that is no base file.
    let out = parallm(&[
        "-f",
        text,
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--kl-divergence-base",
        base,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let against = |ctx: &str, base: &str, needle: &str| {
        let args = [
            "-f",
            text,
            "--ctx",
            ctx,
            "--chunks",
            "2",
            "--kl-divergence-base",
            base,
        ];
        assert_refused(&[&args[..], &["--kl-divergence"]].concat(), needle);
    };
    against("128", base, "was made with --ctx 64");
    against("64", json, "cannot open the base file");
    against("64", text, "is not a base file");
    assert_eq!(files(&dir), ["base.kld"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
