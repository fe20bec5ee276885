//! Hugging Face model directories against HF transformers.
//!
//! The directories are tiny random-weight models (Llama, Qwen2, Qwen3, Phi-3,
//! GPT-2, Gemma 2, Gemma 3) in f16, bf16 and f32, one of them in two shards, written byte for byte the same on every machine by
//! `tests/support/hf_models.py` (numpy, no torch; cached in
//! `$PARALLM_HOME/models/hf`). `tests/golden/hf.json` holds what HF
//! transformers computed from them in float32 (the 16-bit weights widened
//! exactly; `tests/support/hf_golden.py`). parallm runs the 16-bit weights on
//! its half kernels with f32 activations, so only summation order separates
//! the two: the argmax at every position, the last position's top-10 logits
//! within [`TOLERANCE`], 16 greedy tokens, and the tokenizer's ids, at tp = 1
//! with the files' own types and at tp = 2 widened to f32.
//!
//! Then the directories a user gets wrong: each is refused with an error that
//! names the file and what is wrong in it.

mod common;

use std::path::{Path, PathBuf};

use common::{check_top10, greedy_before_tie, ids, on_group, top_k};
use parallm::framework::{GgufFile, LlamaShard, ModelConfig, ShardSpec, Tokenizer, WeightFormat};
use serde_json::Value;

/// The top-10 logits' tolerance (measured: at most 7.7e-6 apart).
const TOLERANCE: f32 = 1e-3;

/// Greedy tokens must agree up to the first step where transformers' top two
/// logits are closer than this (none of the golden cases has one).
const NEAR_TIE: f32 = 2e-4;

fn open(name: &str) -> GgufFile {
    GgufFile::open(common::hf_models_dir().join(name)).expect("the directory opens")
}

/// Runs every case of model `name` at width `tp` in `format`; returns the
/// largest top-10 logit difference met.
fn check(name: &str, tp: usize, format: WeightFormat) -> f32 {
    check_file(&open(name), name, tp, format)
}

/// [`check`] on `file`, against golden model `name`'s cases.
fn check_file(file: &GgufFile, name: &str, tp: usize, format: WeightFormat) -> f32 {
    let tokenizer = Tokenizer::from_gguf(file).expect("tokenizer.json reads");
    let shards: Vec<LlamaShard> = ShardSpec::group(tp)
        .into_iter()
        .map(|spec| LlamaShard::load(file, spec, format).expect("the shard loads"))
        .collect();
    let mut worst = 0f32;
    for case in common::hf_golden()["models"][name]["cases"]
        .as_array()
        .expect("cases")
    {
        let prompt = ids(&case["tokens"]);
        let what = format!("{name} tp={tp} {format} on {:?}", case["prompt"]);
        let text = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            tokenizer.encode(text).expect("encodes"),
            prompt,
            "{what}: tokens"
        );
        let want_greedy = ids(&case["greedy"]);
        let results = on_group(&shards, &prompt, want_greedy.len());
        for (rank, (rows, greedy)) in results.iter().enumerate() {
            let argmax: Vec<u32> = rows.iter().map(|r| top_k(r, 1)[0] as u32).collect();
            assert_eq!(
                argmax,
                ids(&case["argmax"]),
                "{what} rank {rank}: argmax per position"
            );
            let last = &rows[prompt.len() - 1];
            let at = format!("{what} rank {rank}");
            worst = worst.max(check_top10(last, case, TOLERANCE, "transformers", &at));
            let n = greedy_before_tie(case, NEAR_TIE);
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
fn each_directory_matches_transformers_at_tp1_and_tp2() {
    let names = common::hf_names();
    assert!(names.len() >= 8, "golden models: {names:?}");
    for name in &names {
        let native = check(name, 1, WeightFormat::Native);
        let widened = check(name, 2, WeightFormat::F32);
        println!("{name}: top-10 within {native:.2e} (own type, tp=1), {widened:.2e} (f32, tp=2)");
    }
}

#[test]
fn directories_read_as_their_families() {
    for (name, arch, bos) in [
        ("llama-f16", "llama", true),
        ("llama-bf16", "llama", true),
        ("qwen2-bf16", "qwen2", false),
        ("qwen3-f16", "qwen3", false),
        ("phi3-f32", "phi3", false),
        ("gpt2-f16", "gpt2", false),
        ("gemma2-bf16", "gemma2", false),
        ("gemma3-f16", "gemma3", false),
    ] {
        let file = open(name);
        let config = ModelConfig::from_gguf(&file).expect("config.json reads");
        assert_eq!(config.arch.name(), arch, "{name}");
        // Llama 3's rope scaling becomes per-frequency factors.
        assert_eq!(
            config.rope.freq_factors.is_some(),
            arch == "llama",
            "{name}"
        );
        // GPT-2's own configuration names: n_inner, n_positions.
        if arch == "gpt2" {
            assert_eq!((config.ffn, config.context, config.hidden), (256, 512, 64));
        }
        // Gemma 2's query_pre_attn_scalar; Gemma 3's layer_types.
        if arch == "gemma2" {
            assert_eq!(config.attn_scale, 1.0 / 24f32.sqrt());
        }
        if arch == "gemma3" {
            let windowed = config.sliding.as_ref().map(|s| s.layers.clone());
            assert_eq!(
                windowed,
                Some(vec![true, true, true, true, true, false, true])
            );
        }
        let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
        assert_eq!(
            tok.bos().is_some() && bos,
            tok.encode("a").unwrap()[0] == 0,
            "{name}"
        );
        // eos_token of tokenizer_config.json, then generation_config.json's list.
        assert_eq!(tok.eos(), 2, "{name}");
        assert_eq!(tok.stop_tokens(), &[2, 0], "{name}");
        assert!(
            tok.chat_template().is_some_and(|t| t.contains("im_start")),
            "{name}"
        );
    }
}

/// A copy of golden directory `name` in a fresh temporary directory, with
/// `edit` applied to it.
fn broken_copy(name: &str, case: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::hf_models_dir().join(name);
    let dst = std::env::temp_dir().join(format!("parallm-hf-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("temp dir");
    for entry in std::fs::read_dir(&src).expect("model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    edit(&dst);
    dst
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).expect("json")).expect("write");
}

/// The error of loading `dir` whole (model and tokenizer), as a user's
/// `--model DIR` does.
fn load_error(dir: &Path) -> String {
    let err = GgufFile::open(dir).and_then(|file| {
        ModelConfig::from_gguf(&file)?;
        Tokenizer::from_gguf(&file)?;
        LlamaShard::load(&file, ShardSpec::SINGLE, WeightFormat::Native).map(|_| ())
    });
    let _ = std::fs::remove_dir_all(dir);
    err.expect_err("the directory is refused").to_string()
}

#[test]
fn bad_directories_are_refused_naming_the_file_and_the_fault() {
    // A shape that disagrees with config.json.
    let dir = broken_copy("llama-f16", "shape", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["intermediate_size"] = 256.into()
        })
    });
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight in model.safetensors")
            && err.contains("[128, 64]")
            && err.contains("[256, 64]"),
        "{err}"
    );

    // A tensor missing: the index leaves the second shard out.
    let dir = broken_copy("llama-bf16", "missing", |d| {
        edit_json(&d.join("model.safetensors.index.json"), |i| {
            let map = i["weight_map"].as_object_mut().expect("weight_map");
            map.retain(|_, f| f.as_str() == Some("model-00001-of-00002.safetensors"));
        })
    });
    let err = load_error(&dir);
    assert!(
        err.contains("model.") && err.contains("is missing"),
        "{err}"
    );
    assert!(err.contains(&*dir.to_string_lossy()), "{err}");

    // A truncated shard.
    let dir = broken_copy("qwen2-bf16", "truncated", |d| {
        let f = d.join("model.safetensors");
        let len = std::fs::metadata(&f).expect("stat").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_len(len - 100))
            .expect("truncate");
    });
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not a readable safetensors file"),
        "{err}"
    );

    // A tokenizer.json that does not parse.
    let dir = broken_copy("qwen3-f16", "tokenizer", |d| {
        std::fs::write(d.join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\"").expect("write")
    });
    let err = load_error(&dir);
    assert!(
        err.contains("tokenizer.json") && err.contains("does not parse"),
        "{err}"
    );

    // An architecture this engine does not run.
    let dir = broken_copy("qwen3-f16", "arch", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
        })
    });
    let err = load_error(&dir);
    assert!(
        err.contains("config.json")
            && err.contains("GPTNeoXForCausalLM")
            && err.contains("Qwen3ForCausalLM"),
        "{err}"
    );

    // A directory that is no model at all.
    let dir = broken_copy("qwen3-f16", "empty", |d| {
        std::fs::remove_file(d.join("config.json")).expect("rm")
    });
    let err = load_error(&dir);
    assert!(err.contains("without config.json"), "{err}");
}

/// Renames the tensors of safetensors file `path` by `rename` and appends
/// `extra` (name, dtype, shape, bytes), rewriting its header.
fn rewrite_safetensors(
    path: &Path,
    rename: impl Fn(&str) -> String,
    extra: (&str, &str, &[usize], Vec<u8>),
) {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut data = bytes[8 + n..].to_vec();
    let mut out = serde_json::Map::new();
    for (k, v) in header {
        let k = if k == "__metadata__" { k } else { rename(&k) };
        out.insert(k, v);
    }
    let (name, dtype, shape, extra_bytes) = extra;
    out.insert(
        name.into(),
        serde_json::json!({"dtype": dtype, "shape": shape,
            "data_offsets": [data.len(), data.len() + extra_bytes.len()]}),
    );
    data.extend_from_slice(&extra_bytes);
    let mut head = serde_json::to_vec(&out).expect("json");
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&head);
    file.extend_from_slice(&data);
    std::fs::write(path, file).expect("write");
}

/// gemma3-f16 as transformers 5 saves a Gemma3ForConditionalGeneration:
/// the text model's configuration in text_config (after `edit_text`), its
/// weights under model.language_model., and a vision tower (ignored).
fn multimodal_gemma3(case: &str, edit_text: impl FnOnce(&mut Value)) -> PathBuf {
    broken_copy("gemma3-f16", case, |d| {
        edit_json(&d.join("config.json"), |c| {
            let mut text = c.clone();
            edit_text(&mut text);
            *c = serde_json::json!({
                "architectures": ["Gemma3ForConditionalGeneration"],
                "model_type": "gemma3",
                "text_config": text,
                "vision_config": {"hidden_size": 8},
            });
        });
        rewrite_safetensors(
            &d.join("model.safetensors"),
            |k| k.replacen("model.", "model.language_model.", 1),
            (
                "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
                "F16",
                &[4, 8],
                vec![0u8; 64],
            ),
        );
    })
}

#[test]
fn a_multimodal_gemma3_runs_its_text_model() {
    let dir = multimodal_gemma3("multimodal", |_| {});
    let file = GgufFile::open(&dir).expect("opens");
    let worst = check_file(&file, "gemma3-f16", 1, WeightFormat::Native);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(worst <= TOLERANCE);
}

#[test]
fn a_multimodal_gemma3s_errors_name_the_key_where_it_is() {
    let dir = multimodal_gemma3("multimodal-bad", |t| {
        t["num_key_value_heads"] = Value::from("x");
    });
    let err = load_error(&dir);
    assert!(err.contains("text_config.num_key_value_heads"), "{err}");
}

#[test]
fn configurations_saved_by_transformers_5_read_the_same() {
    // transformers 5 writes the rope settings as rope_parameters (Gemma 3:
    // one set per layer type) and rope_theta as null.
    let llama = broken_copy("llama-f16", "llama-v5", |d| {
        edit_json(&d.join("config.json"), |c| {
            let mut params = c["rope_scaling"].clone();
            params["rope_theta"] = c["rope_theta"].clone();
            c["rope_parameters"] = params;
            c["rope_scaling"] = Value::Null;
            c["rope_theta"] = Value::Null;
        })
    });
    let gemma = broken_copy("gemma3-f16", "gemma3-v5", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["rope_parameters"] = serde_json::json!({
                "full_attention": {"rope_type": "linear", "factor": 8.0,
                                   "rope_theta": c["rope_theta"].clone()},
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": c["rope_local_base_freq"].clone()},
            });
            let o = c.as_object_mut().expect("object");
            for k in ["rope_scaling", "rope_theta", "rope_local_base_freq"] {
                o.insert(k.into(), Value::Null);
            }
        })
    });
    for (dir, name) in [(llama, "llama-f16"), (gemma, "gemma3-f16")] {
        let file = GgufFile::open(&dir).expect("opens");
        let worst = check_file(&file, name, 1, WeightFormat::Native);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(worst <= TOLERANCE, "{name}");
    }
}

#[test]
fn a_phi3_longrope_directory_reads_as_llama_cpp_converts_it() {
    // Phi-3.5-mini's and Phi-4-mini's shape on the tiny Phi-3: LongRoPE over
    // a partial rotary embedding (0.75 of 32 dims), an original context of
    // 64 below the 512 it runs with.
    let long: Vec<f64> = (0..12)
        .map(|i| 1.0 + 19.0 * (i as f64 / 11.0).powi(3))
        .collect();
    let short: Vec<f64> = (0..12).map(|i| 1.0 + 0.2 * (i as f64 / 11.0)).collect();
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let longrope = |nested: bool, given: Option<f64>| {
        let (long, short) = (long.clone(), short.clone());
        move |d: &Path| {
            edit_json(&d.join("config.json"), |c| {
                c["max_position_embeddings"] = 512.into();
                c["partial_rotary_factor"] = 0.75.into();
                let mut params = serde_json::json!({"long_factor": long, "short_factor": short});
                if let Some(a) = given {
                    params["attention_factor"] = a.into();
                }
                if nested {
                    // transformers 5: everything in rope_parameters.
                    c.as_object_mut()
                        .expect("object")
                        .remove("original_max_position_embeddings");
                    params["rope_type"] = "longrope".into();
                    params["original_max_position_embeddings"] = 64.into();
                    params["rope_theta"] = 10_000.0.into();
                    c["rope_parameters"] = params;
                } else {
                    c["original_max_position_embeddings"] = 64.into();
                    params["type"] = "longrope".into();
                    c["rope_scaling"] = params;
                }
            });
        }
    };
    for (case, nested, given) in [
        ("longrope", false, None),
        ("longrope-v5", true, None),
        ("longrope-given", false, Some(1.5)),
    ] {
        let dir = broken_copy("phi3-f32", case, longrope(nested, given));
        let file = GgufFile::open(&dir).expect("opens");
        let c = ModelConfig::from_gguf(&file).expect("reads");
        // What llama.cpp's converter writes: sqrt(1 + ln 8 / ln 64), unless
        // the configuration gives the factor.
        let want = given.unwrap_or((1.0 + 8f64.ln() / 64f64.ln()).sqrt()) as f32;
        assert_eq!(
            (c.rope.rot_dims, c.rope.attn_factor),
            (Some(24), want),
            "{case}"
        );
        assert_eq!(
            c.rope.freq_factors,
            Some(f32s(&long)),
            "{case}: the long factors"
        );
        let capped = ModelConfig::from_gguf_capped(&file, Some(64)).expect("reads");
        assert_eq!(
            capped.rope.freq_factors,
            Some(f32s(&short)),
            "{case}: the short factors"
        );
        // And it runs.
        let shard =
            LlamaShard::load(&file, ShardSpec::SINGLE, WeightFormat::Native).expect("loads");
        let (rows, _) = common::prefill_and_greedy(
            &shard,
            &[1, 2, 3],
            1,
            &parallm::framework::collective::SingleCollective,
        );
        assert!(rows.iter().flatten().all(|x| x.is_finite()), "{case}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Factors of the wrong length, and no original context, are named.
    let dir = broken_copy("phi3-f32", "longrope-short-list", |d| {
        longrope(false, None)(d);
        edit_json(&d.join("config.json"), |c| {
            c["rope_scaling"]["long_factor"] = serde_json::json!([1.0, 2.0]);
        });
    });
    let err = load_error(&dir);
    for want in [
        "config.json",
        "rope_scaling.long_factor",
        "has 2 values",
        "24 rotated dimensions",
        "12",
    ] {
        assert!(err.contains(want), "{err} does not say {want}");
    }
    let dir = broken_copy("phi3-f32", "longrope-no-orig", |d| {
        longrope(false, None)(d);
        edit_json(&d.join("config.json"), |c| {
            c.as_object_mut()
                .expect("object")
                .remove("original_max_position_embeddings");
        });
    });
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("original_max_position_embeddings"),
        "{err}"
    );
}

/// A directory's fingerprint (what the ranks of a job compare, so that
/// none runs another model than rank 0's) is the same for a copy of it and
/// differs when one weight byte does.
#[test]
fn a_directory_fingerprint_follows_its_contents() {
    let name = &common::hf_names()[0];
    let fingerprint = |dir: &Path| {
        GgufFile::open(dir)
            .and_then(|f| f.fingerprint())
            .expect("fingerprint")
    };
    let original = fingerprint(&common::hf_models_dir().join(name));
    let copy = broken_copy(name, "fingerprint-copy", |_| {});
    assert_eq!(fingerprint(&copy), original, "{name}");
    let edited = broken_copy(name, "fingerprint-edit", |dir| {
        let weights = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .expect("a safetensors file");
        let mut bytes = std::fs::read(&weights).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&weights, bytes).expect("write");
    });
    assert_ne!(fingerprint(&edited), original, "{name}");
    for dir in [copy, edited] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Regressions (audit): configuration values that disagree with the
/// weights or with what the family runs were used, or ignored, without a
/// word. Each is refused naming config.json (or generation_config.json),
/// the key, and the value or tensor at fault.
#[test]
fn configurations_the_weights_or_the_family_contradict_are_refused() {
    let expect = |name: &str, case: &str, edit: &dyn Fn(&mut Value), want: &[&str]| {
        let dir = broken_copy(name, case, |d| edit_json(&d.join("config.json"), edit));
        let err = load_error(&dir);
        for w in want {
            assert!(err.contains(w), "{case}: {err:?} does not say {w:?}");
        }
    };
    // Special token ids outside tokenizer.json's vocabulary (an int or a
    // list), in config.json or generation_config.json.
    expect(
        "llama-f16",
        "eos-int",
        &|c| c["eos_token_id"] = 1_000_000.into(),
        &[
            "config.json",
            "eos_token_id",
            "is 1000000",
            "outside the vocabulary",
        ],
    );
    // config.json's BOS id counts (and is checked) only where
    // tokenizer_config.json names no BOS by its text.
    let dir = broken_copy("llama-f16", "bos", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["bos_token_id"] = serde_json::json!([0, 1_000_000])
        });
        edit_json(&d.join("tokenizer_config.json"), |t| {
            if let Some(o) = t.as_object_mut() {
                o.remove("bos_token");
            }
        });
    });
    let err = load_error(&dir);
    for w in ["config.json", "bos_token_id", "is 1000000"] {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }
    let dir = broken_copy("llama-f16", "bos-stale", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["bos_token_id"] = serde_json::json!(1_000_000)
        })
    });
    let file = GgufFile::open(&dir).expect("opens");
    Tokenizer::from_gguf(&file).expect("a stale, unused config.json BOS id is not refused");
    let _ = std::fs::remove_dir_all(&dir);
    let dir = broken_copy("llama-f16", "eos-generation", |d| {
        edit_json(&d.join("generation_config.json"), |g| {
            g["eos_token_id"] = serde_json::json!([2, 1_000_000])
        })
    });
    let err = load_error(&dir);
    for w in ["generation_config.json", "eos_token_id", "is 1000000"] {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }

    // Fewer layers counted than stored: the second would be left out.
    expect(
        "llama-f16",
        "layers",
        &|c| c["num_hidden_layers"] = 1.into(),
        &[
            "config.json",
            "num_hidden_layers",
            "is 1",
            "model.layers.1.",
            "in model.safetensors",
        ],
    );
    expect(
        "gpt2-f16",
        "gpt2-layers",
        &|c| c["n_layer"] = 1.into(),
        &["config.json", "'n_layer'", "h.1."],
    );

    // An activation the family does not run, under the key transformers
    // reads for it.
    for (name, key, value, runs) in [
        ("llama-f16", "hidden_act", "gelu", "SiLU"),
        ("qwen3-f16", "hidden_act", "bogus", "SiLU"),
        ("gemma2-bf16", "hidden_activation", "silu", "tanh"),
        ("gpt2-f16", "activation_function", "relu", "tanh"),
    ] {
        expect(
            name,
            &format!("act-{name}"),
            &|c| c[key] = value.into(),
            &["config.json", &format!("'{key}'"), value, runs],
        );
    }
    // Their aliases read.
    for (name, key, value) in [
        ("llama-f16", "hidden_act", "swish"),
        ("gemma2-bf16", "hidden_activation", "gelu_new"),
        ("gpt2-f16", "activation_function", "gelu_pytorch_tanh"),
        // Exact GELU, run as its approximation as llama.cpp does.
        ("gpt2-f16", "activation_function", "gelu"),
        ("gemma2-bf16", "hidden_activation", "gelu"),
    ] {
        let dir = broken_copy(name, &format!("alias-{name}"), |d| {
            edit_json(&d.join("config.json"), |c| c[key] = value.into())
        });
        let file = GgufFile::open(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        file.unwrap_or_else(|e| panic!("{name} {key} {value}: {e}"));
    }

    // Biases the configuration turns on: missing, or not run.
    expect(
        "llama-f16",
        "attention-bias",
        &|c| c["attention_bias"] = true.into(),
        &[
            "config.json",
            "'attention_bias'",
            "model.layers.0.self_attn.q_proj.bias is missing",
        ],
    );
    expect(
        "llama-f16",
        "mlp-bias",
        &|c| c["mlp_bias"] = true.into(),
        &[
            "config.json",
            "'mlp_bias'",
            "model.layers.0.mlp.gate_proj.bias is missing",
        ],
    );
    let dir = broken_copy("llama-f16", "attention-bias-stored", |d| {
        edit_json(&d.join("config.json"), |c| {
            c["attention_bias"] = true.into()
        });
        for m in ["q", "k", "v", "o"] {
            let name = format!("model.layers.0.self_attn.{m}_proj.bias");
            rewrite_safetensors(
                &d.join("model.safetensors"),
                |k| k.to_string(),
                (&name, "F16", &[4], vec![0u8; 8]),
            );
        }
    });
    let err = load_error(&dir);
    for w in [
        "'attention_bias'",
        "model.layers.0.self_attn.o_proj.bias",
        "a llama block does not run",
    ] {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }

    // Rope settings named by their key, not by the tensor computed from them.
    expect(
        "llama-f16",
        "theta",
        &|c| c["rope_theta"] = (-1.0).into(),
        &["config.json", "'rope_theta'", "is -1", "greater than 0"],
    );
    expect(
        "llama-f16",
        "factor",
        &|c| c["rope_scaling"]["factor"] = 0.into(),
        &["config.json", "'rope_scaling.factor'", "is 0"],
    );
    expect(
        "llama-f16",
        "low-freq",
        &|c| c["rope_scaling"]["low_freq_factor"] = (-2.0).into(),
        &["'rope_scaling.low_freq_factor'", "is -2"],
    );
    expect(
        "gemma3-f16",
        "linear-factor",
        &|c| {
            let mut p = c["rope_scaling"].clone();
            p["factor"] = (-8.0).into();
            c["rope_parameters"] = p;
            c["rope_scaling"] = Value::Null;
        },
        &["'rope_parameters.factor'", "is -8"],
    );
}

/// Regression (audit): a FIFO in a directory's place of a file hung the
/// open. Each file a directory is read from is refused unless regular.
#[cfg(unix)]
#[test]
fn directory_files_that_are_not_regular_are_refused_without_blocking() {
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = broken_copy("qwen3-f16", &format!("fifo-{file}"), |d| {
            std::fs::remove_file(d.join(file)).expect("rm");
            let status = std::process::Command::new("mkfifo")
                .arg(d.join(file))
                .status()
                .expect("mkfifo runs");
            assert!(status.success(), "mkfifo");
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(load_error(&dir));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("reading {file} as a FIFO blocked"));
        assert!(
            err.contains(file) && err.contains("a FIFO") && err.contains("not a regular file"),
            "{err}"
        );
    }
}

#[test]
fn a_chat_prompt_ends_without_the_eos_a_tokenizer_appends() {
    // llama-bf16's post-processor made to append EOS (`<|im_end|>`, id 2)
    // as well as its BOS (`<|endoftext|>`, id 0).
    let dir = broken_copy("llama-bf16", "adds-eos", |d| {
        edit_json(&d.join("tokenizer.json"), |t| {
            let special = |id: &str| serde_json::json!({"SpecialToken": {"id": id, "type_id": 0}});
            let seq = serde_json::json!({"Sequence": {"id": "A", "type_id": 0}});
            t["post_processor"]["single"] =
                serde_json::json!([special("<|endoftext|>"), seq, special("<|im_end|>")]);
            t["post_processor"]["special_tokens"]["<|im_end|>"] = serde_json::json!(
                {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}
            );
        })
    });
    let engine = parallm::Engine::builder()
        .model_path(&dir)
        .build()
        .expect("engine");
    let tok = engine.tokenizer().expect("tokenizer");
    assert!(tok.adds_eos() && tok.eos() == 2);
    let text = engine
        .tokenize(&parallm::Prompt::Text("Hello".into()))
        .expect("text");
    assert_eq!(text.last(), Some(&2), "a text keeps the EOS: {text:?}");
    let chat = engine
        .tokenize(&parallm::Prompt::Chat(vec![
            parallm::framework::chat::ChatMessage::new("user", "Hello"),
        ]))
        .expect("chat");
    engine.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    // The prompt ends with the assistant's opener, where the model writes;
    // BOS stays.
    assert_eq!(chat.first(), Some(&0), "{chat:?}");
    assert_ne!(chat.last(), Some(&2), "{chat:?}");
}
