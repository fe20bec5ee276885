//! `parallm quantize` and `parallm prune`. Quantize: every type round-trips through the loader and the
//! model still runs; the KL divergence from the f32 base grows as the bits
//! shrink; the files llama.cpp was measured on (`tests/golden/quantize.json`,
//! made by `tests/support/quantize_golden.sh`) are byte for byte what the
//! command writes now; mixed precision by `--keep`. Prune: every row keeps
//! exactly its share (N of every M) under magnitude and Wanda, Wanda's
//! perplexity is below magnitude's at the same sparsity, dropped blocks
//! leave a model that runs;
//! bad input named, with no file left behind.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use framework::GgufFile;
use sha2::{Digest, Sha256};

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    // Under the target directory, and only this run's: earlier runs' files
    // (over a gigabyte) are removed first, never reused.
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quantize");
        let _ = std::fs::remove_dir_all(&root);
        let d = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// The reference model's weights dequantized to f32 (made once).
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let model = common::model_path();
        let out = dir().join("f32.gguf");
        let out = out.to_str().unwrap().to_string();
        common::cli_ok(&["quantize", model.to_str().unwrap(), &out, "--type", "f32"]);
        out
    })
}

/// `base()` in type `t` (made once; tests share the files).
fn quantized(t: &str) -> String {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let out = dir().join(format!("{t}.gguf"));
    let out = out.to_str().unwrap().to_string();
    if !Path::new(&out).exists() {
        common::cli_ok(&["quantize", base(), &out, "--type", t]);
    }
    out
}

fn sha256(path: &str) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

/// The model in `path` loads and generates (coarse ones may end early).
fn generates(path: &str, what: &str) {
    let text = common::cli_ok(&[
        "generate",
        "The capital of France is",
        "--model",
        path,
        "--max-tokens",
        "3",
    ]);
    assert!(
        text.contains("prompt tokens: 5, generated tokens: "),
        "{what}: {text}"
    );
}

#[test]
fn every_type_round_trips_through_the_loader_and_runs() {
    let f32 = GgufFile::open(base()).unwrap();
    let q = "blk.3.ffn_down.weight";
    let want = common::tensor_values(&f32, q);
    let rms = (want.iter().map(|x| x * x).sum::<f32>() / want.len() as f32).sqrt();
    // (type, stored type of blk.3.ffn_down (rows of 1536), worst relative RMS error)
    for (t, stored, tol) in [
        ("f16", "F16", 0.001),
        ("bf16", "BF16", 0.005),
        ("q8_0", "Q8_0", 0.02),
        ("q5_1", "Q5_1", 0.06),
        ("q5_0", "Q5_0", 0.06),
        ("q4_1", "Q4_1", 0.12),
        ("q4_0", "Q4_0", 0.12),
        ("q6_k", "Q6K", 0.04),
        ("q5_k_s", "Q5K", 0.06),
        ("q5_k_m", "Q5K", 0.06),
        ("q4_k_s", "Q4K", 0.12),
        ("q4_k_m", "Q4K", 0.12),
        // The Q3_K and Q2_K mixes give ffn_down more bits (llama-quantize's
        // `q3_k` is its Q3_K_M).
        ("q3_k_l", "Q5K", 0.06),
        ("q3_k", "Q4K", 0.12),
        ("q3_k_s", "Q3K", 0.3),
        ("q2_k", "Q3K", 0.3),
    ] {
        let path = quantized(t);
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(file.stored_type(q).as_deref(), Some(stored), "{t}");
        assert_eq!(
            file.stored_type("blk.3.attn_norm.weight").as_deref(),
            Some("F32"),
            "{t}"
        );
        let got = common::tensor_values(&file, q);
        let err = (want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / want.len() as f32)
            .sqrt()
            / rms;
        println!("{t}: relative RMS error of {q}: {err:.5}");
        assert!(err < tol, "{t}: {err}");
        generates(&path, t);
        // Only the types other tests read stay on disk.
        if !["q8_0", "q6_k", "q4_k_m", "q4_0"].contains(&t) {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn kl_divergence_from_the_base_grows_as_the_bits_shrink() {
    let kld = dir().join("base.kld");
    let kld = kld.to_str().unwrap();
    let run = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "--model",
            model,
            "-f",
            "/usr/share/common-licenses/GPL-3",
            "--ctx",
            "128",
            "--chunks",
            "6",
            "--kl-divergence-base",
            kld,
            "--json",
            "-",
        ];
        args.extend_from_slice(extra);
        let out = common::cli_ok(&args);
        let json = &out[out.find('{').unwrap()..out.rfind('}').unwrap() + 1];
        serde_json::from_str::<serde_json::Value>(json).unwrap()
    };
    // The base runs on its f32 weights as they are (perplexity's default,
    // `native`; said here too, as `auto` would make them q8_0).
    run(base(), &["--weights", "f32"]);
    let mean = |t: &str| {
        let r = run(&quantized(t), &["--kl-divergence"]);
        let k = r["kld"]["mean_kld"].as_f64().unwrap();
        println!("{t}: mean KLD {k:.6}, PPL {}", r["ppl"]);
        k
    };
    let (q8, q6, q4k, q4) = (mean("q8_0"), mean("q6_k"), mean("q4_k_m"), mean("q4_0"));
    assert!(
        0.0 < q8 && q8 < q6 && q6 < q4k && q4k < q4,
        "{q8} {q6} {q4k} {q4}"
    );
}

#[test]
fn the_files_llama_cpp_was_measured_on_are_the_ones_written_now() {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quantize.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        golden["base_sha256"].as_str(),
        Some(sha256(base()).as_str()),
        "the f32 base differs from the golden's"
    );
    for f in golden["files"].as_array().unwrap() {
        let t = f["type"].as_str().unwrap();
        assert_eq!(
            f["parallm_sha256"].as_str(),
            Some(sha256(&quantized(t)).as_str()),
            "{t}: the bytes llama.cpp ran differ from what quantize writes now"
        );
        // What llama.cpp measured on them (recorded by the script).
        let ours = f["llama_ppl_parallm_file"].as_f64().unwrap();
        let theirs = f["llama_ppl_llama_quantize_file"].as_f64().unwrap();
        println!("{t}: llama-perplexity {ours} on ours, {theirs} on llama-quantize's");
        if t == "q8_0" {
            assert!(
                (ours / theirs - 1.0).abs() < 0.005,
                "{t}: {ours} against {theirs}"
            );
        }
    }
}

#[test]
fn keep_holds_chosen_tensors_at_their_own_type() {
    let out = dir().join("mixed.gguf");
    let out = out.to_str().unwrap();
    common::cli_ok(&[
        "quantize",
        base(),
        out,
        "--type",
        "q4_0",
        "--keep",
        "f16:token_embd,blk.0,blk.N-1",
        // A K mix's block type, falling back where rows are not whole
        // super-blocks (576 columns), as llama-quantize does.
        "--keep",
        "q5_k:blk.1",
    ]);
    let f = GgufFile::open(out).unwrap();
    for (name, t) in [
        ("blk.1.ffn_down.weight", "Q5K"),
        ("blk.1.ffn_up.weight", "Q5_1"),
        ("blk.10.ffn_down.weight", "Q4_0"),
        ("token_embd.weight", "F16"),
        ("blk.0.attn_q.weight", "F16"),
        ("blk.29.ffn_up.weight", "F16"),
        ("blk.2.attn_q.weight", "Q4_0"),
        ("blk.0.attn_norm.weight", "F32"),
    ] {
        assert_eq!(f.stored_type(name).as_deref(), Some(t), "{name}");
    }
}

fn refused(args: &[&str], needle: &str) {
    let out = common::cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

#[test]
fn bad_input_is_named_and_leaves_no_file() {
    let d = dir().join("bad");
    std::fs::create_dir_all(&d).unwrap();
    let out = d.join("out.gguf");
    let out = out.to_str().unwrap();
    let model = common::model_path();
    let model = model.to_str().unwrap();
    refused(
        &["quantize", model, out, "--type", "q4_0"],
        "--allow-requantize",
    );
    refused(
        &["quantize", base(), out, "--type", "q9_9"],
        "--type q9_9 is not one of",
    );
    refused(
        &["quantize", base(), out, "--type", "q4_0", "--keep", "f16"],
        "--keep f16",
    );
    refused(
        &["quantize", "/nonexistent.gguf", out, "--type", "q4_0"],
        "/nonexistent.gguf",
    );
    let bytes = std::fs::read(base()).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &["quantize", cut.to_str().unwrap(), out, "--type", "q8_0"],
        "cut.gguf",
    );
    std::fs::remove_file(&cut).unwrap();
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        0,
        "no file left behind"
    );
    // Requantizing to more bits needs no flag; to fewer, the flag.
    common::cli_ok(&["quantize", model, out, "--type", "q8_0"]);
    common::cli_ok(&[
        "quantize",
        model,
        out,
        "--type",
        "q4_0",
        "--allow-requantize",
    ]);
}

/// The zeros in each row of a tensor (`dims` as the loader reads them).
fn zeros_per_row(file: &GgufFile, name: &str) -> Vec<usize> {
    let (_, dims) = file.tensor_info(name).unwrap();
    let v = common::tensor_values(file, name);
    v.chunks(*dims.last().unwrap())
        .map(|r| r.iter().filter(|x| **x == 0.0).count())
        .collect()
}

/// Every row of tensors `names` of `f` holds half zeros: exactly half where
/// the source row (`before`: its zeros) held none and `exact`, at least half
/// otherwise; and with `group`, at least half of every group of that many.
fn half_of_each_row_is_zero(
    f: &GgufFile,
    (names, before): (&[&str], &[Vec<usize>]),
    group: Option<usize>,
    exact: bool,
    what: &str,
) {
    for (n, was) in names.iter().zip(before) {
        let (_, dims) = f.tensor_info(n).unwrap();
        let row = *dims.last().unwrap();
        let v = common::tensor_values(f, n);
        for (r, (values, &had)) in v.chunks(row).zip(was).enumerate() {
            let zeros = values.iter().filter(|x| **x == 0.0).count();
            if had == 0 && exact {
                assert_eq!(zeros, row / 2, "{what} {n} row {r}");
            } else {
                assert!(zeros >= row / 2, "{what} {n} row {r}");
            }
            for g in values.chunks(group.unwrap_or(row)) {
                let z = g.iter().filter(|x| **x == 0.0).count();
                assert!(z >= g.len() / 2, "{what} {n} row {r}: {g:?}");
            }
        }
    }
}

#[test]
fn magnitude_pruning_keeps_exactly_the_share_of_every_row() {
    let source = GgufFile::open(base()).unwrap();
    let names = [
        "blk.0.attn_q.weight",
        "blk.7.ffn_down.weight",
        "blk.29.ffn_up.weight",
    ];
    let before: Vec<Vec<usize>> = names.iter().map(|n| zeros_per_row(&source, n)).collect();
    for (args, tag) in [
        (&["--sparsity", "0.5"][..], "half"),
        (&["--pattern", "2:4"][..], "2of4"),
        (&["--pattern", "4:8", "--type", "q8_0"][..], "4of8"),
    ] {
        let out = dir().join(format!("pruned-{tag}.gguf"));
        let out = out.to_str().unwrap();
        let mut all = vec!["prune", base(), out, "--method", "magnitude"];
        all.extend_from_slice(args);
        common::cli_ok(&all);
        let f = GgufFile::open(out).unwrap();
        // Q8_0 may round more small weights to 0.
        let group = [("2of4", 4), ("4of8", 8)]
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, g)| *g);
        half_of_each_row_is_zero(&f, (&names, &before), group, tag != "4of8", tag);
        // Norms and the embeddings are not pruned.
        assert_eq!(
            zeros_per_row(&f, "token_embd.weight")[..8],
            zeros_per_row(&source, "token_embd.weight")[..8]
        );
        generates(out, "pruned");
        std::fs::remove_file(out).unwrap();
    }
}

#[test]
fn pruning_an_offset_type_stores_its_matrices_where_zeros_stay_zeros() {
    // The reference model's Q4_1 blocks (d·q + m) cannot hold an exact 0:
    // its pruned matrices are written as Q4_0, so half of every row is zero.
    let source = common::gguf();
    let names = ["blk.0.attn_q.weight", "blk.29.ffn_up.weight"];
    let before: Vec<Vec<usize>> = names.iter().map(|n| zeros_per_row(source, n)).collect();
    let out = dir().join("pruned-q4_1.gguf");
    let out = out.to_str().unwrap();
    let model = common::model_path();
    let line = common::cli_ok(&[
        "prune",
        model.to_str().unwrap(),
        out,
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
    ]);
    assert!(line.contains("stored in a symmetric type"), "{line}");
    let f = GgufFile::open(out).unwrap();
    for n in names {
        assert_eq!(f.tensor_info(n).unwrap().0, GgmlDType::Q4_0, "{n}");
    }
    half_of_each_row_is_zero(&f, (&names, &before), None, false, "Q4_1 source");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn wanda_keeps_exactly_the_share_and_beats_magnitude() {
    let source = GgufFile::open(base()).unwrap();
    let names = ["blk.3.attn_v.weight", "blk.20.ffn_down.weight"];
    let before: Vec<Vec<usize>> = names.iter().map(|n| zeros_per_row(&source, n)).collect();
    let mut figures = Vec::new();
    for (pattern, tag) in [("unstructured", "50%"), ("2:4", "2:4")] {
        let mut ppls = Vec::new();
        for method in ["wanda", "magnitude"] {
            let out = dir().join(format!("{method}-{}.gguf", tag.replace([':', '%'], "")));
            let out = out.to_str().unwrap();
            let mut args = vec!["prune", base(), out, "--method", method];
            args.extend(["--pattern", pattern]);
            if pattern == "unstructured" {
                args.extend(["--sparsity", "0.5"]);
            }
            if method == "wanda" {
                args.extend(["--calib", "/usr/share/common-licenses/GPL-3"]);
                args.extend(["--ctx", "256", "--windows", "4"]);
            }
            let line = common::cli_ok(&args);
            let f = GgufFile::open(out).unwrap();
            let group = (pattern == "2:4").then_some(4);
            let what = format!("{method} {tag}");
            half_of_each_row_is_zero(&f, (&names, &before), group, true, &what);
            if method == "wanda" {
                assert!(line.contains("|w|·‖x‖"), "{line}");
            }
            ppls.push(common::perplexity(out, 256, 6));
            std::fs::remove_file(out).unwrap();
        }
        figures.push(format!(
            "{tag}: wanda {:.2}, magnitude {:.2}",
            ppls[0], ppls[1]
        ));
        assert!(
            ppls[0] < ppls[1],
            "{tag}: wanda {} against magnitude {}",
            ppls[0],
            ppls[1]
        );
    }
    println!("PPL (ctx 256, 6 windows) {}", figures.join("; "));
}

#[test]
fn dropping_blocks_leaves_a_shorter_model_that_runs() {
    let model = common::model_path();
    let out = dir().join("drop2.gguf");
    let out = out.to_str().unwrap();
    let line = common::cli_ok(&[
        "prune",
        model.to_str().unwrap(),
        out,
        "--method",
        "layers",
        "--drop",
        "2",
        "--calib",
        "/usr/share/common-licenses/GPL-3",
        "--windows",
        "2",
    ]);
    assert!(line.contains("28 of 30 left"), "{line}");
    let f = GgufFile::open(out).unwrap();
    assert_eq!(f.get_usize("llama.block_count").unwrap(), 28);
    assert!(f.has_tensor("blk.27.ffn_down.weight") && !f.has_tensor("blk.28.ffn_down.weight"));
    // The last block is never dropped: it is the new last one, unchanged.
    let src = GgufFile::open(&model).unwrap();
    assert_eq!(
        common::tensor_values(&f, "blk.27.attn_q.weight"),
        common::tensor_values(&src, "blk.29.attn_q.weight")
    );
    generates(out, "pruned");
}

#[test]
fn bad_prune_arguments_are_named_and_leave_no_file() {
    let d = dir().join("bad-prune");
    std::fs::create_dir_all(&d).unwrap();
    let out = d.join("out.gguf");
    let out = out.to_str().unwrap();
    let b = base();
    for (args, needle) in [
        (&["--sparsity", "1.5"][..], "must be in (0, 1)"),
        (&["--sparsity", "0"][..], "must be in (0, 1)"),
        (&[][..], "needs --sparsity"),
        (&["--pattern", "2:5"][..], "do not divide the rows"),
        (&["--pattern", "5:4"][..], "--pattern 5:4"),
        (
            &["--pattern", "2:4", "--sparsity", "0.3"][..],
            "contradicts",
        ),
    ] {
        let mut all = vec!["prune", b, out, "--method", "magnitude"];
        all.extend_from_slice(args);
        refused(&all, needle);
    }
    refused(
        &["prune", b, out, "--method", "layers", "--drop", "2"],
        "needs --calib",
    );
    refused(
        &["prune", b, out, "--method", "wanda", "--sparsity", "0.5"],
        "--method wanda needs --calib",
    );
    // With a calibration text, so that each is refused for what it names.
    for (args, needle) in [
        (&["wanda", "--sparsity", "1.5"][..], "must be in (0, 1)"),
        (
            &["magnitude", "--sparsity", "0.5"][..],
            "go with --method wanda or layers",
        ),
        (&["layers", "--drop", "30"][..], "must be in [1, 29]"),
        (
            &["layers", "--drop", "2", "--windows", "0"][..],
            "--windows must be at least 1",
        ),
    ] {
        let mut all = vec!["prune", b, out, "--method"];
        all.extend_from_slice(args);
        all.extend(["--calib", "/usr/share/common-licenses/GPL-3"]);
        refused(&all, needle);
    }
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        0,
        "no file left behind"
    );
}
