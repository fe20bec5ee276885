//! Every model family against llama.cpp on the same GGUF file.
//!
//! The files are tiny random-weight models written by llama.cpp's own GGUF
//! writer (the `gguf` package; `tests/support/family_models.py`, cached in
//! `$PARALLM_HOME/models/families`); `tests/golden/families.json` holds what
//! llama.cpp computed from them (`tests/support/family_golden.py`). For each
//! family, at tp = 1 and tp = 2 with f32 weights: the argmax at every prompt
//! position, the last position's top-10 logits within the f32 tolerance of
//! `shared/golden` (0.05), and 16 greedy tokens; with quantized weights (Q8_0,
//! Q4_0 copies) on the quantized kernels, and with f16 or bf16 weights on the
//! half kernels (llama.cpp rounds the activations to f16 or bf16 for those
//! matmuls, parallm keeps them f32: measured within 7.4e-3 and 5.3e-2),
//! `tests/golden.rs`'s tolerances against llama.cpp; and each model's tokenizer
//! (byte-level BPE with the gpt-2, llama-bpe, qwen2, smollm, tekken and gpt-4o pre-tokenizers, and
//! SentencePiece, also under a Phi-3 name, whose special tokens drop the
//! whitespace after them) against llama.cpp's tokens.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{
    check_top10, greedy_before_tie, ids, on_group, prefill_and_greedy, top_k, write_models,
};
use parallm::framework::collective::SingleCollective;
use parallm::framework::family::{NormKind, Positions};
use parallm::framework::{GgufFile, LlamaShard, ModelConfig, ShardSpec, Tokenizer, WeightFormat};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The top-10 logits' tolerance: `shared/golden`'s for f32 weights.
const TOLERANCE: f32 = 0.05;

/// With quantized weights both engines round activations to 8-bit blocks,
/// independently: `tests/golden.rs`'s tolerances against llama.cpp (top-10
/// within 0.75, the argmax at 80% of positions).
const QUANT_TOLERANCE: f32 = 0.75;

/// With quantized weights, greedy tokens must agree up to the first step
/// where llama.cpp's top two logits are closer than this: the two engines'
/// logits differ by up to 0.15 on these models (0.14 at most on the last
/// prompt positions), so a gap under twice that may fall either way.
const NEAR_TIE: f32 = 0.3;

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/families.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("the golden file is JSON")
    })
}

/// The directory of the tiny models, written by the support script when one
/// is missing or is not the file the golden outputs came from (a cache
/// written by an earlier version of the script).
fn models_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = parallm::fetch::parallm_home().join("models/families");
        let models = golden()["models"].as_object().expect("models");
        let current = models.iter().all(|(name, m)| {
            std::fs::read(dir.join(format!("{name}.gguf")))
                .is_ok_and(|bytes| Some(sha256(&bytes).as_str()) == m["sha256"].as_str())
        });
        if !current {
            write_models("family_models.py", &dir);
        }
        dir
    })
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The model `name`, checked to be the file the golden outputs came from.
fn open(name: &str) -> GgufFile {
    let path = models_dir().join(format!("{name}.gguf"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let digest = sha256(&bytes);
    let want = golden()["models"][name]["sha256"].as_str().expect("sha256");
    assert_eq!(
        digest,
        want,
        "{} is not the file llama.cpp's outputs came from, even as rewritten (another gguf package version?)",
        path.display()
    );
    GgufFile::open(&path).expect("the model opens")
}

fn cases(name: &str) -> &'static [Value] {
    golden()["models"][name]["cases"].as_array().expect("cases")
}

/// Runs every case of model `name` at tensor-parallel width `tp` (every rank
/// checked) and returns the largest top-10 logit difference met.
fn check(name: &str, tp: usize) -> f32 {
    let file = open(name);
    // Quantized and f16/bf16 files run on their own kernels (activations
    // f32 in parallm's half kernels; llama.cpp rounds them to f16 or bf16).
    let quantized = name.ends_with("_0") || name.ends_with("f16");
    let format = if quantized {
        WeightFormat::Native
    } else {
        WeightFormat::F32
    };
    let shards: Vec<LlamaShard> = ShardSpec::group(tp)
        .into_iter()
        .map(|spec| LlamaShard::load(&file, spec, format).expect("the shard loads"))
        .collect();
    let mut worst = 0f32;
    for case in cases(name) {
        let prompt = ids(&case["tokens"]);
        let want_greedy = ids(&case["greedy"]);
        let results = on_group(&shards, &prompt, want_greedy.len());
        let what = format!("{name} tp={tp} on {:?}", case["prompt"]);
        for (rank, (rows, greedy)) in results.iter().enumerate() {
            let argmax: Vec<u32> = rows.iter().map(|r| top_k(r, 1)[0] as u32).collect();
            let want_argmax = ids(&case["argmax"]);
            if quantized {
                let same = argmax
                    .iter()
                    .zip(&want_argmax)
                    .filter(|(a, b)| a == b)
                    .count();
                assert!(
                    5 * same >= 4 * argmax.len(),
                    "{what} rank {rank}: argmax at {same} of {} positions",
                    argmax.len()
                );
            } else {
                assert_eq!(
                    argmax, want_argmax,
                    "{what} rank {rank}: argmax per position"
                );
            }
            let tolerance = if quantized {
                QUANT_TOLERANCE
            } else {
                TOLERANCE
            };
            let last = &rows[prompt.len() - 1];
            let at = format!("{what} rank {rank}");
            worst = worst.max(check_top10(last, case, tolerance, "llama.cpp", &at));
            let n = if quantized {
                greedy_before_tie(case, NEAR_TIE)
            } else {
                want_greedy.len()
            };
            assert_eq!(
                greedy[..n],
                want_greedy[..n],
                "{what} rank {rank}: greedy tokens"
            );
        }
    }
    worst
}

#[test]
fn each_family_matches_llama_cpp_at_tp1_and_tp2() {
    let names: Vec<String> = golden()["models"]
        .as_object()
        .expect("models")
        .keys()
        .cloned()
        .collect();
    assert!(
        names.len() >= 21,
        "the golden file names the families: {names:?}"
    );
    for name in &names {
        for tp in [1, 2] {
            let worst = check(name, tp);
            println!("{name} tp={tp}: top-10 logits within {worst:.2e} of llama.cpp");
        }
    }
}

/// f16 and bf16 weights run natively equal the same weights widened to f32
/// on load, to summation order: the half kernels round nothing but the
/// weights, which both runs share.
#[test]
fn half_weights_compute_what_their_widened_f32_copies_compute() {
    for name in ["llama-r3-f16", "qwen2-bf16"] {
        let file = open(name);
        let prompt = ids(&cases(name)[1]["tokens"]);
        let logits = |format| {
            let m = LlamaShard::load(&file, ShardSpec::SINGLE, format).expect("loads");
            prefill_and_greedy(&m, &prompt, 4, &SingleCollective)
        };
        let (native, native_greedy) = logits(WeightFormat::Native);
        let (wide, wide_greedy) = logits(WeightFormat::F32);
        let worst = native
            .iter()
            .flatten()
            .zip(wide.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name}: native half weights within {worst:.2e} of f32 copies");
        assert!(worst <= 2e-4, "{name}: {worst}");
        assert_eq!(native_greedy, wide_greedy, "{name}");
    }
}

#[test]
fn the_tiny_models_read_as_their_families() {
    let families = [
        ("llama-r3", "llama"),
        ("llama-lin", "llama"),
        ("qwen2", "qwen2"),
        ("qwen3", "qwen3"),
        ("phi3", "phi3"),
        ("llama-spm", "llama"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3"),
        ("qwen2-yarn", "qwen2"),
        ("gpt2", "gpt2"),
        ("llama-tekken", "llama"),
        ("phi3-long", "phi3"),
        ("phi3-short", "phi3"),
        ("phi3-spm", "phi3"),
        ("llama-gpt4o", "llama"),
    ];
    for (name, arch) in families {
        let file = open(name);
        let c = ModelConfig::from_gguf(&file).expect("the config reads");
        assert_eq!(c.arch.name(), arch, "{name}");
        match name {
            "llama-r3" => assert_eq!(c.rope.freq_factors.as_ref().map(Vec::len), Some(8)),
            "llama-lin" => assert_eq!(c.rope.freq_scale, 0.5),
            "qwen3" => assert_eq!((c.head_dim, c.hidden / c.n_heads), (32, 16)),
            "phi3-long" | "phi3-short" => {
                // LongRoPE over 24 of 32 dims: the long factors (up to 20)
                // when the context run exceeds the original one.
                assert_eq!(
                    (c.rope.rot_dims, c.rope.attn_factor),
                    (Some(24), 1.224_744_9)
                );
                let last = |c: &ModelConfig| {
                    *c.rope
                        .freq_factors
                        .as_ref()
                        .expect("factors")
                        .last()
                        .expect("12")
                };
                let long = name == "phi3-long";
                assert_eq!(last(&c), if long { 20.0 } else { 1.2 }, "{name}");
                // Run within its original context, the long model takes
                // the short factors, as llama.cpp does with such an n_ctx.
                if long {
                    let capped = ModelConfig::from_gguf_capped(&file, Some(64)).expect("reads");
                    assert_eq!((capped.context, last(&capped)), (64, 1.2));
                }
            }
            "qwen2-yarn" => {
                let y = c.rope.yarn.expect("YaRN");
                assert_eq!((y.orig_context, c.rope.freq_scale), (16, 0.25));
            }
            "gpt2" => {
                let f = c.family();
                assert_eq!(f.positions, Positions::Learned);
                assert_eq!(
                    (f.norm, f.gated_ffn, c.norm_eps),
                    (NormKind::Layer, false, 1e-5)
                );
            }
            "gemma2" => {
                let s = c.sliding.as_ref().expect("windowed layers");
                assert_eq!((s.window, s.layers.clone()), (8, vec![true, false, true]));
                assert_eq!((c.attn_softcap, c.final_softcap), (5.0, 10.0));
            }
            "gemma3" => {
                let s = c.sliding.as_ref().expect("windowed layers");
                let layers = vec![true, true, true, true, true, false, true];
                assert_eq!((s.window, s.layers.clone()), (6, layers));
                assert_eq!((s.rope.base, s.rope.freq_scale), (10_000.0, 1.0));
                assert_eq!((c.rope.base, c.rope.freq_scale), (1e6, 0.125));
            }
            _ => {}
        }
        // The tokenizer reads too, and splits the prompts as llama.cpp did
        // (BOS where the vocabulary asks for it); text without control
        // tokens decodes back to itself.
        let tok = Tokenizer::from_gguf(&file).expect("the tokenizer builds");
        for case in cases(name) {
            let text = case["prompt"].as_str().expect("prompt");
            let got = tok.encode(text).expect("encodes");
            assert_eq!(got, ids(&case["tokens"]), "{name}: {text:?}");
            if !text.contains("<|") {
                assert_eq!(tok.decode(&got), text, "{name}: decoding {got:?}");
            }
        }
    }
}

#[test]
fn a_chat_whose_template_writes_bos_keeps_one() {
    // llama-spm's tokenizer adds BOS (`<s>`) to what it encodes; a chat
    // template beginning `{{ bos_token }}` writes another.
    let tok = Tokenizer::from_gguf(&open("llama-spm")).expect("tokenizer");
    assert!(tok.adds_bos());
    let bos = tok.bos().expect("bos");
    let doubled = tok.encode("<s>Hello there").expect("encode");
    assert_eq!(&doubled[..2], &[bos, bos], "{doubled:?}");
    let chat = tok.chat_specials(doubled.clone(), true);
    assert_eq!(chat[0], bos);
    assert_eq!(&chat[1..], &doubled[2..]);
    // A template that writes none keeps the tokenizer's one.
    let once = tok.encode("Hello there").expect("encode");
    assert_eq!(tok.chat_specials(once.clone(), true), once);
    assert_eq!(chat, once);
    // Encoded without the special tokens, nothing changes.
    assert_eq!(tok.chat_specials(doubled.clone(), false), doubled);
}

#[test]
fn a_draft_with_a_shorter_context_caps_the_served_context() {
    use parallm::actors::llm::ModelSource;
    use parallm::{Engine, Event, Request};
    // The tiny gpt2 model has the reference model's vocabulary and 512
    // positions: as a draft it caps the target's 8192, since the draft node
    // holds every sequence's keys and values.
    open("gpt2");
    let draft = models_dir().join("gpt2.gguf");
    let e = Engine::builder()
        .model_path(common::model_path())
        .draft_model(ModelSource::Gguf(draft), WeightFormat::Auto)
        .build()
        .expect("engine");
    assert_eq!(e.model_config().context, 512);
    let prompt: Vec<u32> = (0..500).map(|i| 100 + i % 300).collect();
    // Past the draft's context: refused at once, naming the context.
    let err = e
        .generate(Request::greedy_tokens(prompt.clone(), 20))
        .expect_err("beyond the context");
    assert!(err.to_string().contains("context of 512"), "{err}");
    // Up to it, requests run whether they speculate or not.
    let mut plain = Request::greedy_tokens(prompt, 12);
    plain.params.ignore_eos = true;
    let mut drafted = plain.clone();
    drafted.speculative = Some(parallm::framework::speculative::Speculation::draft(4));
    for req in [plain, drafted] {
        let events = e.generate(req).expect("admitted").collect_blocking();
        match events.last() {
            Some(Event::Finished { tokens, .. }) => assert_eq!(tokens.len(), 12),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn dropping_blocks_of_a_gemma_model_is_refused_since_their_attention_goes_by_index() {
    for name in ["gemma2", "gemma3"] {
        open(name);
        let model = models_dir().join(format!("{name}.gguf"));
        let out = tempfile::tempdir().expect("temp dir");
        let written = out.path().join("dropped.gguf");
        let result = common::cli(&[
            "prune",
            model.to_str().expect("path"),
            written.to_str().expect("path"),
            "--method",
            "layers",
            "--drop",
            "1",
            "--calib",
            "/usr/share/common-licenses/GPL-3",
        ]);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot drop blocks of a {name} model")),
            "{stderr}"
        );
        assert!(!written.exists(), "{name}: an output was written");
    }
}
