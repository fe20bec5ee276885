//! The `parallm` binary: the README's main command, and bad inputs that must
//! each end with a clear message and a non-zero exit, never a panic.

mod common;
#[path = "support/gguf.rs"]
mod gguf;

use std::path::Path;
use std::process::{Command, Output};

fn parallm(args: &[&str]) -> Output {
    // The tests fetch the model through the library before the binary runs.
    common::model_path();
    Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(stderr.contains("error:"), "no error line: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn generate_continues_the_prompt_and_reports_speed() {
    let out = parallm(&["generate", "The capital of France is", "--max-tokens", "8"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with(" Paris."), "{stdout}");
    for key in [
        "prompt tokens: 5",
        "generated tokens: 8",
        "prefill:",
        "decode:",
    ] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
}

#[test]
fn parallel_flags_give_the_same_text() {
    let base = [
        "generate",
        "Once upon a time",
        "--max-tokens",
        "10",
        "--weights",
        "f32",
    ];
    let one = parallm(&base);
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let mut args = base.to_vec();
    args.extend(["--tp", "3", "--pp", "2", "--dp", "2"]);
    let many = parallm(&args);
    let stderr = String::from_utf8_lossy(&many.stderr);
    assert!(many.status.success(), "{stderr}");
    assert!(stderr.contains("tp=3 pp=2 dp=2"), "{stderr}");
    assert_eq!(many.stdout, one.stdout);
    let bad = parallm(&["generate", "Hi", "--tp", "4"]);
    assert_clean_failure(&bad, "tp");
}

#[test]
fn speculative_flags_give_the_same_text_and_bad_ones_are_named() {
    let base = [
        "generate",
        "--chat",
        "Repeat exactly: the red fox runs over the green hill. Repeated:",
        "--max-tokens",
        "24",
    ];
    let plain = parallm(&base);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let mut args = base.to_vec();
    args.extend(["--speculative", "ngram", "--num-speculative-tokens", "6"]);
    let spec = parallm(&args);
    assert!(
        spec.status.success(),
        "{}",
        String::from_utf8_lossy(&spec.stderr)
    );
    assert_eq!(spec.stdout, plain.stdout);
    // The model as its own draft (the same vocabulary, by construction).
    let model = common::model_path();
    let mut args = base.to_vec();
    args.extend(["--speculative", "draft", "--draft-model"]);
    args.push(model.to_str().expect("utf-8 path"));
    let drafted = parallm(&args);
    assert!(
        drafted.status.success(),
        "{}",
        String::from_utf8_lossy(&drafted.stderr)
    );
    assert_eq!(drafted.stdout, plain.stdout);
    let bad = parallm(&["generate", "Hi", "--speculative", "draft"]);
    assert_clean_failure(&bad, "speculative.method");
    let bad = parallm(&[
        "generate",
        "Hi",
        "--speculative",
        "ngram",
        "--num-speculative-tokens",
        "0",
    ]);
    assert_clean_failure(&bad, "num_speculative_tokens");
}

#[test]
fn chat_and_beam_options_work() {
    // f32: with quantized weights the first answer token is a near-tie ("The" vs "L").
    let out = parallm(&[
        "generate",
        "What is the capital of France?",
        "--chat",
        "--max-tokens",
        "12",
        "--weights",
        "f32",
        // The reference model's template reads no such variable.
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    // A template of our own that reads the variable given: the chat's
    // prompt is the plain text it renders, so the greedy text is that
    // text's.
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("t.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ tail }}",
    )
    .expect("write");
    let chat = parallm(&[
        "generate",
        "The capital of France",
        "--chat",
        "--chat-template-file",
        template.to_str().expect("utf-8"),
        "--chat-template-kwargs",
        r#"{"tail": " is"}"#,
        "--max-tokens",
        "6",
    ]);
    let plain = parallm(&["generate", "The capital of France is", "--max-tokens", "6"]);
    for out in [&chat, &plain] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&chat.stdout),
        String::from_utf8_lossy(&plain.stdout)
    );
    let missing = dir.path().join("missing.jinja");
    let out = parallm(&[
        "generate",
        "Hi",
        "--chat",
        "--chat-template-file",
        missing.to_str().expect("utf-8"),
    ]);
    assert_clean_failure(&out, "--chat-template-file");
    for (kwargs, why) in [
        ("[1]", "must be a JSON object"),
        (r#"{"bos_token": "x"}"#, "may not hold `bos_token`"),
    ] {
        let out = parallm(&["generate", "Hi", "--chat", "--chat-template-kwargs", kwargs]);
        assert_clean_failure(&out, "--chat-template-kwargs");
        assert_clean_failure(&out, why);
    }
    let out = parallm(&[
        "generate",
        "The capital of France is",
        "--beam",
        "3",
        "--max-tokens",
        "6",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("beam ")).count(),
        3,
        "{stderr}"
    );
}

#[test]
fn nonexistent_model_path() {
    let out = parallm(&["generate", "hi", "--model", "/nonexistent/model.gguf"]);
    assert_clean_failure(&out, "/nonexistent/model.gguf: no such file");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(common::model_path()).unwrap();
    for cut in [bytes.len() / 2, 3_000_000, 100] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let out = parallm(&["generate", "hi", "--model", path.to_str().unwrap()]);
        assert_clean_failure(&out, "truncated.gguf");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("truncated"), "cut at {cut}: {stderr}");
    }
}

/// The reference model with the u32 value of metadata `key` replaced by `value`.
fn patched_model(path: &Path, key: &str, value: u32) {
    let mut bytes = std::fs::read(common::model_path()).unwrap();
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{key} is in the reference model"));
    let ty = at + needle.len();
    assert_eq!(bytes[ty..ty + 4], 4u32.to_le_bytes(), "{key} is a u32");
    bytes[ty + 4..ty + 8].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn out_of_range_special_tokens_and_huge_contexts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patched.gguf");
    for (key, value, want) in [
        (
            "tokenizer.ggml.bos_token_id",
            999_999,
            "tokenizer.ggml.bos_token_id is 999999, outside the vocabulary of 49152 tokens",
        ),
        (
            "llama.context_length",
            1 << 31,
            "context 2147483648 is beyond the 1048576 positions",
        ),
    ] {
        patched_model(&path, key, value);
        assert_generate_and_serve_refuse(&path, want);
    }
}

#[test]
fn generate_checks_its_flags_and_fits_its_default_to_the_context() {
    // Negative penalties are values, not flags.
    let out = parallm(&[
        "generate",
        "Hi",
        "--max-tokens",
        "2",
        "--presence-penalty",
        "-1",
        "--frequency-penalty",
        "-0.5",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A beam search's time is given whole, not as a decode rate of 0.
    let out = parallm(&["generate", "Hi", "--max-tokens", "3", "--beam", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("beam search: ") && !stderr.contains("decode:"),
        "{stderr}"
    );
    // Flags that would do nothing are refused.
    let out = parallm(&["generate", "Hi", "--length-penalty", "0.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--beam"));
    let draft = common::model_path();
    let out = parallm(&["generate", "Hi", "--draft-model", draft.to_str().unwrap()]);
    assert_clean_failure(&out, "--draft-model goes with --speculative draft");
    // Unasked, the number of tokens shrinks to what the context leaves.
    let prompt = "word ".repeat(60);
    let out = parallm(&["generate", &prompt, "--max-model-len", "64"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Asked for, it is refused as before, naming the context.
    let out = parallm(&[
        "generate",
        &prompt,
        "--max-model-len",
        "64",
        "--max-tokens",
        "128",
    ]);
    assert_clean_failure(&out, "context of 64 tokens");
}

#[test]
fn a_model_computing_nan_fails_its_requests_instead_of_talking() {
    use candle_core::quantized::gguf_file::Content;
    // The reference model whose final norm is all NaN, so every logit is:
    // argmax of NaNs was token 0, and sampling drew from NaN probabilities.
    let mut bytes = std::fs::read(common::model_path()).unwrap();
    let content = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let info = &content.tensor_infos["output_norm.weight"];
    assert_eq!(info.ggml_dtype, candle_core::quantized::GgmlDType::F32);
    let at = (content.tensor_data_offset + info.offset) as usize;
    let n = info.shape.elem_count();
    for x in bytes[at..at + 4 * n].chunks_exact_mut(4) {
        x.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.gguf");
    std::fs::write(&path, bytes).unwrap();
    let file = path.to_str().unwrap();
    for extra in [
        &["--temperature", "0"][..],
        &["--temperature", "1", "--seed", "1"],
        &["--beam", "2"],
    ] {
        let mut args = vec![
            "generate",
            "Once upon a time",
            "--max-tokens",
            "4",
            "--model",
            file,
        ];
        args.extend_from_slice(extra);
        let out = parallm(&args);
        assert_clean_failure(&out, "non-finite logit (NaN");
    }
}

/// `generate` and `serve` both stop on the model file at `path` with `want`
/// in the message (`serve` with the loader's own), naming the file.
fn assert_generate_and_serve_refuse(path: &Path, want: &str) {
    let file = path.to_str().unwrap();
    let out = parallm(&["generate", "hi", "--model", file]);
    assert_clean_failure(&out, want);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap();
    assert_clean_failure(&out, name);
    let out = parallm(&["serve", "--port", "0", "--model", file]);
    assert_clean_failure(&out, want);
}

#[test]
fn malformed_shapes_and_tensor_tables_stop_generate_and_serve() {
    use gguf::{Meta, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let with = |key: &'static str, value: Meta| {
        let mut meta = gguf::tiny_llama_meta(32, 64);
        meta.retain(|(k, _)| *k != key);
        meta.push((key, value));
        meta
    };
    let f32s = |name: &str, n: u64, offset: u64| Tensor::new(name, &[n], 0, offset);
    let ok_table = [f32s("a", 8, 0)];
    type Case<'a> = (Vec<(&'a str, Meta)>, Vec<Tensor>, &'a str);
    let cases: Vec<Case> = vec![
        (
            with("llama.attention.head_count", Meta::U32(0)),
            ok_table.to_vec(),
            "n_heads must be greater than 0",
        ),
        // A zero width is named before a rope tensor's shape is checked
        // against it.
        (
            with("llama.embedding_length", Meta::U32(0)),
            vec![f32s("rope_freqs.weight", 8, 0)],
            "hidden must be greater than 0",
        ),
        (
            with("llama.rope.freq_base", Meta::F32(f32::NAN)),
            ok_table.to_vec(),
            "rope_base must be a finite number",
        ),
        (
            with("llama.attention.layer_norm_rms_epsilon", Meta::F32(-1e-5)),
            ok_table.to_vec(),
            "norm_eps must be a finite number greater than 0",
        ),
        (
            with("tokenizer.ggml.bos_token_id", Meta::U32(4096)),
            ok_table.to_vec(),
            "tokenizer.ggml.bos_token_id is 4096, outside the vocabulary of 32 tokens",
        ),
        (
            gguf::tiny_llama_meta(32, 64),
            vec![f32s("a", 16, 0), f32s("b", 8, 32)],
            "overlaps tensor 'b'",
        ),
        (
            gguf::tiny_llama_meta(32, 64),
            vec![f32s("a", 8, 8)],
            "not a multiple of the alignment 32",
        ),
        (
            gguf::tiny_llama_meta(32, 64),
            vec![Tensor::new("a", &[32], 2, 0), f32s("b", 8, 64)],
            "its type Q4_0 disagrees with the size of the data",
        ),
    ];
    for (meta, tensors, want) in cases {
        std::fs::write(&path, gguf::gguf(&meta, &tensors, 96)).unwrap();
        assert_generate_and_serve_refuse(&path, want);
    }
}

#[test]
fn a_huge_trained_context_runs_capped_to_max_model_len() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.gguf");
    for context in [1u32 << 24, 1 << 31, u32::MAX] {
        patched_model(&path, "llama.context_length", context);
        let out = parallm(&[
            "generate",
            "The capital of France is",
            "--max-tokens",
            "4",
            "--max-model-len",
            "4096",
            "--model",
            path.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "trained for {context} positions; running it with 4096"
            )),
            "{stderr}"
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(" Paris"));
    }
}

#[test]
fn config_check_and_serve_refuse_what_the_machine_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.toml");
    std::fs::write(&file, "[scheduler]\nkv_memory_mib = 100000000\n").unwrap();
    let want = "scheduler.kv_memory_mib': is 100000000 MiB per replica: 95.4 TiB of KV cache for 1 replica(s), more than this machine's";
    let out = parallm(&["config", "check", file.to_str().unwrap()]);
    assert_clean_failure(&out, want);
    let out = parallm(&["serve", "--port", "0", "--config", file.to_str().unwrap()]);
    assert_clean_failure(&out, want);
    // A configuration that fits is sized against the model.
    std::fs::write(
        &file,
        "[scheduler]\nkv_memory_mib = 256\n[parallel]\ndp = 2\n",
    )
    .unwrap();
    let out = parallm(&["config", "check", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("valid; with ") && stdout.contains("KV cache 511.9 MiB (2 replica(s))"),
        "{stdout}"
    );
    // A draft model's node and the embedding models' weights count too:
    // here the reference model is its own draft, and served pooled.
    let model = common::model_path();
    let model = model.to_str().expect("utf-8 path");
    let weights = |stdout: &str| {
        stdout
            .split("weights about ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no weights in {stdout}"))
    };
    let alone = weights(&stdout);
    let with_draft = dir.path().join("draft.toml");
    std::fs::write(
        &with_draft,
        format!(
            "[scheduler]\nkv_memory_mib = 256\n[parallel]\ndp = 2\n\
             [speculative]\nmethod = \"draft\"\ndraft_model = \"{model}\"\n\
             [[models]]\nname = \"e\"\npath = \"{model}\"\ntask = \"embed\"\n"
        ),
    )
    .unwrap();
    let out = parallm(&["config", "check", with_draft.to_str().unwrap()]);
    let drafted = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{drafted}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(weights(&drafted), alone, "{drafted}");
    assert!(
        drafted.contains("and the embedding models' weights about "),
        "{drafted}"
    );
    // The file may come with --config too, as serve takes it; not both.
    let path = file.to_str().unwrap();
    let out = parallm(&["config", "check", "--config", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = parallm(&["config", "check", path, "--config", path]);
    assert_clean_failure(&out, "config check takes one file");
    // Without a file: the defaults with the environment and flags on top.
    let out = parallm(&["config", "check", "--set", "parallel.dp=2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("the configuration (defaults, environment and flags): valid"),
        "{stdout}"
    );
}

/// A minimal GGUF v3 file with string metadata and no tensors.
fn write_gguf(path: &Path, metadata: &[(&str, &str)]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_gguf(
        &path,
        &[
            ("general.architecture", "mamba"),
            ("tokenizer.ggml.model", "gpt2"),
        ],
    );
    let out = parallm(&["generate", "hi", "--model", path.to_str().unwrap()]);
    assert_clean_failure(&out, "unsupported architecture 'mamba'");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "these are not the weights you are looking for").unwrap();
    let out = parallm(&["generate", "hi", "--model", path.to_str().unwrap()]);
    assert_clean_failure(&out, "notes.gguf");
}

#[test]
fn empty_prompt() {
    let out = parallm(&["generate", ""]);
    assert_clean_failure(&out, "`prompt` must not be empty");
}

#[test]
fn prompt_longer_than_the_context() {
    let prompt = "hello ".repeat(9000);
    let out = parallm(&["generate", &prompt, "--max-tokens", "4"]);
    assert_clean_failure(&out, "context of 8192 tokens");
}

#[test]
fn bad_sampling_parameter_names_the_field() {
    let out = parallm(&["generate", "hi", "--top-p", "1.5"]);
    assert_clean_failure(&out, "`top_p`");
}

/// A short `bench latency` on the tiny synthetic model with `var=value`.
fn tiny_latency_bench(var: &str, value: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parallm"))
        .env(var, value)
        .args(["bench", "latency", "--synthetic", "tiny", "--runs", "1"])
        .args([
            "--prompt-tokens",
            "8",
            "--decode-tokens",
            "2",
            "--batches",
            "2",
        ])
        .args(["--batch-prompt-tokens", "4", "--batch-steps", "1"])
        .output()
        .unwrap()
}

#[test]
fn cpu_features_can_be_turned_off_and_a_bad_value_is_refused() {
    let bench = |features: &str| tiny_latency_bench("PARALLM_CPU_FEATURES", features);
    let out = bench("scalar");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "kernels: quantized scalar, f32 matmul scalar, attention scalar, elementwise scalar"
        ),
        "{stdout}"
    );
    let out = bench("-avx512");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernels = stdout
        .lines()
        .find_map(|l| l.split_once("kernels:").map(|(_, k)| k))
        .unwrap_or_default();
    assert!(!kernels.contains("avx512"), "{kernels}");
    let out = bench("-sse9");
    assert_clean_failure(&out, "PARALLM_CPU_FEATURES: unknown feature 'sse9'");
}

#[test]
fn the_weight_prefetch_is_reported_and_a_bad_distance_is_refused() {
    let bench = |distance: &str| tiny_latency_bench("PARALLM_PREFETCH", distance);
    for (distance, shown) in [
        ("0", "weight prefetch off"),
        ("4096", "weight prefetch 4096 B ahead"),
    ] {
        let out = bench(distance);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(shown), "{stdout}");
    }
    assert_clean_failure(
        &bench("far"),
        "PARALLM_PREFETCH: 'far' is not a prefetch distance",
    );
}

#[test]
fn bench_latency_refuses_batches_beyond_memory() {
    // 10^9 sequences could never be held: refused before anything is
    // allocated, instead of the OOM killer ending the run.
    let out = parallm(&[
        "bench",
        "latency",
        "--synthetic",
        "tiny",
        "--batches",
        "2,1000000000",
    ]);
    assert_clean_failure(&out, "--batches up to 1000000000 of 128-token prompts");
}

#[test]
fn bench_latency_runs_on_a_synthetic_model() {
    let out = Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args([
            "bench",
            "latency",
            "--synthetic",
            "tiny",
            "--runs",
            "1",
            "--prompt-tokens",
            "16",
        ])
        .args([
            "--decode-tokens",
            "4",
            "--batches",
            "2",
            "--batch-prompt-tokens",
            "4",
            "--batch-steps",
            "2",
            "--profile",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| prefill 16 |") && stdout.contains("| decode batch 2 |"),
        "{stdout}"
    );
    // --profile: every kind of op, each with its time, adding up to the step.
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("| batch-1 decode step"))
        .skip(2)
        .collect();
    assert_eq!(rows.len(), 15, "{stdout}");
    let us = |row: &str| -> f64 {
        row.split('|')
            .nth(2)
            .map(|c| c.trim().trim_matches('*'))
            .and_then(|c| c.parse().ok())
            .unwrap_or(-1.0)
    };
    let parts: f64 = rows[..14].iter().map(|r| us(r)).sum();
    let whole = us(rows[14]);
    assert!(rows.iter().all(|r| us(r) >= 0.0), "{stdout}");
    assert!(
        us(rows[6]) > 0.0 && us(rows[4]) > 0.0,
        "no matmul or attention time: {stdout}"
    );
    assert!(
        (parts - whole).abs() <= 0.02 * whole + 1.0,
        "{parts} vs {whole}: {stdout}"
    );
}
