//! `parallm imatrix`: the importance matrix of the reference model on the
//! GPL-3 text against llama.cpp's `llama-imatrix` on the same model and
//! text (`tests/golden/imatrix.json`, made by
//! `tests/support/imatrix_golden.sh`); the same statistics at every
//! tensor- and pipeline-parallel layout (each rank records its columns);
//! and bad input, named, with no file left behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use framework::GgufFile;

const TEXT: &str = "/usr/share/common-licenses/GPL-3";

fn golden() -> serde_json::Value {
    common::repo_golden("imatrix.json")
}

fn text() -> &'static str {
    common::gpl3_text("imatrix.json")
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("calibration")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `parallm imatrix` with `args`, written to `out`.
fn imatrix(out: &Path, args: &[&str]) {
    let model = common::model_path();
    let mut all = vec![
        "imatrix",
        "--model",
        model.to_str().unwrap(),
        "-f",
        text(),
        "-o",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let o = common::cli(&all);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Σx² and rows per weight tensor of an importance-matrix file.
fn entries(path: &Path) -> BTreeMap<String, (Vec<f32>, f32)> {
    let f = GgufFile::open(path).unwrap();
    assert_eq!(f.get_str("general.type").unwrap(), "imatrix");
    let read = |name: &str| common::tensor_values(&f, name);
    f.tensor_names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".in_sum2"))
        .map(|w| {
            (
                w.to_string(),
                (
                    read(&format!("{w}.in_sum2")),
                    read(&format!("{w}.counts"))[0],
                ),
            )
        })
        .collect()
}

#[test]
fn the_importance_matrix_matches_llama_cpp() {
    let g = golden();
    let dir = scratch("golden");
    let out = dir.join("imatrix.gguf");
    imatrix(&out, &["--ctx", "512"]);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_usize("imatrix.chunk_count").unwrap(), 14);
    assert_eq!(f.get_usize("imatrix.chunk_size").unwrap(), 512);
    let ours = entries(&out);
    let want = g["entries"].as_object().unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the same weight tensors"
    );
    let mut worst_sum = 0.0f64;
    for (name, w) in want {
        let (sums, count) = &ours[name];
        assert_eq!(sums.len() as u64, w["columns"].as_u64().unwrap(), "{name}");
        assert_eq!(*count as f64, w["count"].as_f64().unwrap(), "{name}: rows");
        // The models' arithmetic differs (the kernels' accumulation), so the
        // sums agree to within a few per cent, not bit for bit.
        let total: f64 = sums.iter().map(|&v| v as f64).sum();
        let off = total / w["sum"].as_f64().unwrap() - 1.0;
        worst_sum = worst_sum.max(off.abs());
        assert!(off.abs() < 0.02, "{name}: Σ {total} is {off:+.4} off");
        for t in w["top"].as_array().unwrap() {
            let (col, v) = (t[0].as_u64().unwrap() as usize, t[1].as_f64().unwrap());
            let rel = sums[col] as f64 / v - 1.0;
            assert!(
                rel.abs() < 0.05,
                "{name} column {col}: {} against {v}",
                sums[col]
            );
        }
    }
    println!(
        "{} tensors; largest difference of a tensor's Σx²: {:.3}%",
        want.len(),
        100.0 * worst_sum
    );
    // The matrix weights quantization: Q4_0 with it is closer to the model
    // on the text (llama-quantize's keys say which matrix it was).
    let model = common::model_path();
    let m = model.to_str().unwrap();
    let mut ppls = Vec::new();
    for (tag, extra) in [
        ("plain", &[][..]),
        ("imatrix", &["--imatrix", out.to_str().unwrap()][..]),
    ] {
        let q = dir.join(format!("q4_0-{tag}.gguf"));
        let q = q.to_str().unwrap();
        let mut args = vec!["quantize", m, q, "--type", "q4_0", "--allow-requantize"];
        args.extend_from_slice(extra);
        let o = common::cli(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let f = GgufFile::open(q).unwrap();
        assert_eq!(
            f.opt_usize("quantize.imatrix.entries_count").unwrap(),
            (tag == "imatrix").then_some(210),
            "{tag}"
        );
        ppls.push(common::perplexity(q, 256, 6));
    }
    println!(
        "Q4_0 PPL (ctx 256, 6 windows): plain {:.3}, with the matrix {:.3}",
        ppls[0], ppls[1]
    );
    assert!(ppls[1] < ppls[0], "{ppls:?}");
    // Q8_0 rounds each weight alone: the matrix is noted as unused.
    let q = dir.join("q8_0-imatrix.gguf");
    let o = common::cli(&[
        "quantize",
        m,
        q.to_str().unwrap(),
        "--type",
        "q8_0",
        "--imatrix",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("is not used"), "{stderr}");
}

#[test]
fn every_layout_records_the_same_statistics() {
    let dir = scratch("layouts");
    let base = dir.join("tp1.gguf");
    // f32 weights: the exact numerics, so layouts differ only in the order
    // tensor-parallel partial sums add.
    let common_args = ["--ctx", "256", "--chunks", "3", "--weights", "f32"];
    imatrix(&base, &common_args);
    let want = entries(&base);
    for (layout, tag) in [
        (&["--tp", "3"][..], "tp3"),
        (&["--pp", "2"][..], "pp2"),
        (&["--tp", "2", "--pp", "2", "--dp", "2"][..], "tp2pp2dp2"),
    ] {
        let out = dir.join(format!("{tag}.gguf"));
        imatrix(&out, &[&common_args[..], layout].concat());
        let got = entries(&out);
        assert_eq!(got.len(), want.len(), "{tag}");
        let mut worst = (0.0f32, 0.0f64);
        for (name, (w, wc)) in &want {
            let (g, gc) = &got[name];
            assert_eq!(gc, wc, "{tag} {name}: rows");
            // A column in the wrong place would be off by its whole value.
            let diff = common::max_rel_diff(g, w);
            let (sg, sw): (f64, f64) = (
                g.iter().map(|&v| v as f64).sum(),
                w.iter().map(|&v| v as f64).sum(),
            );
            let total = (sg / sw - 1.0).abs();
            worst = (worst.0.max(diff), worst.1.max(total));
            assert!(diff < 1e-4, "{tag} {name}: a column is {diff} off");
            assert!(total < 1e-4, "{tag} {name}: Σ is {total} off");
        }
        println!(
            "{tag}: largest column difference {:.1e}, of a tensor's Σ {:.1e}",
            worst.0, worst.1
        );
    }
}

#[test]
fn bad_input_is_named_and_leaves_no_file() {
    let dir = scratch("bad");
    let out = dir.join("m.gguf");
    let o = out.to_str().unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "Too short to calibrate on.").unwrap();
    let model = common::model_path();
    let m = model.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "imatrix",
                "--model",
                m,
                "-f",
                short.to_str().unwrap(),
                "-o",
                o,
            ],
            "windows of --ctx 512 need at least 1024",
        ),
        (
            vec!["imatrix", "--model", m, "-f", "/no/such/text", "-o", o],
            "cannot read /no/such/text",
        ),
        (
            vec!["imatrix", "--model", m, "-f", TEXT, "-o", o, "--ctx", "2"],
            "--ctx is 2",
        ),
    ] {
        let r = common::cli(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // A model file given as the importance matrix is refused by name.
    let base = scratch("bad-quantize");
    let q = base.join("q.gguf");
    let r = common::cli(&[
        "quantize",
        m,
        q.to_str().unwrap(),
        "--type",
        "q4_k_m",
        "--imatrix",
        m,
        "--allow-requantize",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(stderr.contains("not a GGUF importance matrix"), "{stderr}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the text");
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), 0);
}
