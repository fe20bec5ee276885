//! `parallm quantize DIR OUT.gguf`: a Hugging Face directory written as a
//! GGUF file, its tokenizer in GGUF's keys (`framework::hf::gguf_metadata`).
//!
//! For each tiny directory of `tests/hf_models.rs` (every family the
//! directory reader knows): the GGUF file's tokenizer encodes texts of every
//! kind (accents, emoji, digits, whitespace runs, a chat-template render) to
//! the directory's ids and decodes them to the same text; the f32 file's
//! logits are the directory's exactly (the same values, widened the same
//! way); every `config.json` key the reader maps is kept; the q8_0 file
//! loads and generates. A SentencePiece-style `tokenizer.json` (byte
//! fallback, `▁` for spaces: Llama 2's legacy layout and Gemma's) becomes a
//! `llama` vocabulary that tokenizes as it does. A `tokenizer.json` GGUF
//! cannot express is refused with an error naming it, and no file is left.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;
use common::prefill_and_greedy;
use parallm::framework::chat::{ChatMessage, ChatTemplate};
use parallm::framework::collective::SingleCollective;
use parallm::framework::{GgufFile, LlamaShard, ShardSpec, Tokenizer, WeightFormat};
use serde_json::{json, Value as Json};

/// This run's scratch directory, under the target directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf_quantize");
        let _ = std::fs::remove_dir_all(&root);
        let d = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

/// `parallm quantize DIR OUT --type T`; the output's path.
fn quantize(dir: &Path, out_name: &str, t: &str) -> PathBuf {
    let out = scratch().join(out_name);
    common::cli_ok(&[
        "quantize",
        dir.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
        "--type",
        t,
    ]);
    out
}

/// Texts of every kind, and `tokenizer`'s chat template rendered.
fn texts(tokenizer: &Tokenizer) -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello world, this is a test.",
        "Café crème brûlée, naïve Zürich; ¿Qué tal? Ærøskøbing, Ελληνικά, Привет",
        "emoji \u{1f980}\u{1f680} \u{1f44d}\u{1f3fd} \u{1f1eb}\u{1f1f7} 你好，世界",
        "1 22 333 4444 55555 3.14159 2024-06-01 0x1F",
        "a  b   c\t\td\n\n\ne    f\r\n  ",
        " leading space",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(source) = tokenizer.chat_template() {
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let template =
            ChatTemplate::new(source, &text(tokenizer.bos()), &text(Some(tokenizer.eos())))
                .expect("the template compiles");
        let messages = [
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "What is 2 + 2? Réponds en français."),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And   3\t+ 3?"),
        ];
        texts.push(
            template
                .render(&messages, true)
                .expect("the template renders"),
        );
    }
    texts
}

/// `gguf` tokenizes and decodes every text as `dir` does, with and without
/// the special tokens the model adds.
fn same_tokenizer(dir: &Tokenizer, gguf: &Tokenizer, what: &str) {
    assert_eq!(dir.bos(), gguf.bos(), "{what}: BOS");
    assert_eq!(dir.eos(), gguf.eos(), "{what}: EOS");
    assert_eq!(dir.adds_bos(), gguf.adds_bos(), "{what}: adds BOS");
    assert_eq!(
        dir.chat_template(),
        gguf.chat_template(),
        "{what}: template"
    );
    let all = texts(dir);
    assert!(all.len() == 7, "{what}: the chat template renders");
    for text in all {
        for special in [true, false] {
            let want = dir.encode_with(&text, special).expect("encodes");
            let got = gguf.encode_with(&text, special).expect("encodes");
            assert_eq!(got, want, "{what}: ids of {text:?}");
        }
        let ids = dir.encode(&text).expect("encodes");
        assert_eq!(
            gguf.decode(&ids),
            dir.decode(&ids),
            "{what}: text of {text:?}"
        );
    }
}

/// The logits of every position of a short prompt, and 4 greedy tokens.
fn logits(file: &GgufFile, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let m = LlamaShard::load(file, ShardSpec::SINGLE, WeightFormat::F32).expect("loads");
    prefill_and_greedy(&m, prompt, 4, &SingleCollective)
}

/// The pre-tokenizer name each tiny directory's `tokenizer.json` gets, by
/// its structure: Qwen2's regex, GPT-2's byte-level alone (whose ids of the
/// converter's check text hash as SmolLM's do, this vocabulary merging no
/// digits), else SmolLM's digits.
fn expected_pre(name: &str) -> &'static str {
    match name.split('-').next() {
        Some("qwen2" | "qwen3") => "qwen2",
        Some("gpt2") => "gpt-2",
        _ => "smollm",
    }
}

#[test]
fn each_family_becomes_a_gguf_with_its_tokenizer_and_logits() {
    let names = common::hf_names();
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        let dir_path = common::hf_models_dir().join(name);
        let dir = GgufFile::open(&dir_path).expect("the directory opens");
        let out = quantize(&dir_path, &format!("{name}-f32.gguf"), "f32");
        let gguf = GgufFile::open(&out).expect("the GGUF file opens");

        // Every key the directory maps is kept; general.name is its name.
        for (k, v) in dir.metadata_entries() {
            assert_eq!(
                format!("{:?}", gguf.metadata(k)),
                format!("{:?}", Some(v)),
                "{name}: {k}"
            );
        }
        // (A name saying Phi-3 would make llama.cpp drop the whitespace
        // after special tokens, which this tokenizer.json does not.)
        let want = name.replace("phi3", "phi 3");
        assert_eq!(gguf.get_str("general.name").ok(), Some(want.as_str()));
        assert_eq!(gguf.get_usize("general.file_type").ok(), Some(0));
        assert_eq!(gguf.get_str("tokenizer.ggml.model").ok(), Some("gpt2"));
        assert_eq!(
            gguf.get_str("tokenizer.ggml.pre").ok(),
            Some(expected_pre(name)),
            "{name}"
        );
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens").expect("tokens");
        assert_eq!(tokens.len(), 49152, "{name}");
        assert_eq!((tokens[1], tokens[3575]), ("<|im_start|>", "Ġcapital"));
        let types = gguf
            .opt_int_array("tokenizer.ggml.token_type")
            .expect("types")
            .expect("types");
        assert_eq!((types[1], types[3575]), (3, 1), "{name}: control, normal");
        assert!(
            gguf.get_str_array("tokenizer.ggml.merges")
                .is_ok_and(|m| m.len() > 40_000 && m[0].split(' ').count() == 2),
            "{name}: merges"
        );

        let (want, got) = (
            Tokenizer::from_gguf(&dir).expect("tokenizer.json reads"),
            Tokenizer::from_gguf(&gguf).expect("the GGUF tokenizer builds"),
        );
        same_tokenizer(&want, &got, name);

        // The same tensors, so the same logits.
        let prompt = want.encode("The capital of France is").expect("encodes");
        let (a, b) = (logits(&dir, &prompt), logits(&gguf, &prompt));
        let worst =
            a.0.iter()
                .flatten()
                .zip(b.0.iter().flatten())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("{name}: f32 GGUF logits within {worst:e} of the directory's");
        assert!(worst <= 1e-6, "{name}: logits {worst}");
        assert_eq!(a.1, b.1, "{name}: greedy tokens");
        drop(gguf);
        std::fs::remove_file(&out).expect("remove");
    }
}

#[test]
fn each_family_quantized_to_q8_0_loads_and_generates() {
    for name in common::hf_names() {
        let out = quantize(
            &common::hf_models_dir().join(&name),
            &format!("{name}-q8_0.gguf"),
            "q8_0",
        );
        let file = GgufFile::open(&out).expect("opens");
        assert_eq!(file.get_usize("general.file_type").ok(), Some(7));
        // Rows of 64 and 128: every weight matrix in Q8_0 blocks.
        assert_eq!(
            file.stored_type("blk.0.ffn_down.weight").as_deref(),
            Some("Q8_0"),
            "{name}"
        );
        // Norms in f32 whatever the directory's type, as llama.cpp's
        // converter writes them.
        assert_eq!(
            file.stored_type("blk.0.attn_norm.weight").as_deref(),
            Some("F32"),
            "{name}"
        );
        drop(file);
        let text = common::cli_ok(&[
            "generate",
            "The capital of France is",
            "--model",
            out.to_str().expect("utf-8"),
            "--max-tokens",
            "4",
        ]);
        assert!(text.contains("generated tokens: "), "{name}: {text}");
        std::fs::remove_file(&out).expect("remove");
    }
    // The K mixes and f16 too, on two families.
    for (name, t) in [("llama-bf16", "q4_k_m"), ("gemma3-f16", "f16")] {
        let out = quantize(
            &common::hf_models_dir().join(name),
            &format!("{name}-{t}.gguf"),
            t,
        );
        let text = common::cli_ok(&[
            "generate",
            "Hello",
            "--model",
            out.to_str().expect("utf-8"),
            "--max-tokens",
            "2",
        ]);
        assert!(text.contains("generated tokens: "), "{name} {t}: {text}");
        std::fs::remove_file(&out).expect("remove");
    }
}

/// A copy of tiny directory `name` in the scratch directory, `edit`ed.
fn copy_of(name: &str, case: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::hf_models_dir().join(name);
    let dst = scratch().join(format!("dir-{case}"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("dir");
    for entry in std::fs::read_dir(&src).expect("model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    edit(&dst);
    dst
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Json)) {
    let mut v: Json =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).expect("json")).expect("write");
}

#[test]
fn a_tokenizer_gguf_cannot_express_is_refused_and_no_file_is_left() {
    type Case = (&'static str, fn(&mut Json), &'static str);
    let cases: [Case; 3] = [
        // A Split regex that is none of llama.cpp's pre-tokenizers.
        (
            "regex",
            |t| {
                t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] =
                    json!(r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+")
            },
            "pre-tokenizer",
        ),
        // A Unigram model.
        (
            "unigram",
            |t| {
                let mut by_id: Vec<(u64, String)> = t["model"]["vocab"]
                    .as_object()
                    .expect("vocab")
                    .iter()
                    .map(|(k, v)| (v.as_u64().expect("id"), k.clone()))
                    .collect();
                by_id.sort();
                let vocab: Vec<Json> = by_id
                    .into_iter()
                    .map(|(id, k)| json!([k, -(id as f64) / 1000.0]))
                    .collect();
                t["model"] = json!({"type": "Unigram", "unk_id": 0, "vocab": vocab});
            },
            "Unigram",
        ),
        // Merges taken whole where llama.cpp's qwen2 does not.
        (
            "ignore-merges",
            |t| t["model"]["ignore_merges"] = json!(true),
            "ignore_merges",
        ),
    ];
    for (case, edit, says) in cases {
        let dir = copy_of("qwen3-f16", case, |d| {
            edit_json(&d.join("tokenizer.json"), edit)
        });
        let out_dir = scratch().join(format!("out-{case}"));
        std::fs::create_dir_all(&out_dir).expect("dir");
        let out = out_dir.join("model.gguf");
        let r = common::cli(&[
            "quantize",
            dir.to_str().expect("utf-8"),
            out.to_str().expect("utf-8"),
            "--type",
            "q8_0",
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{case}: quantized");
        assert!(
            err.contains(&*dir.join("tokenizer.json").to_string_lossy()) && err.contains(says),
            "{case}: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&out_dir).expect("dir").collect();
        assert!(left.is_empty(), "{case}: {left:?} left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A SentencePiece-style BPE `tokenizer.json` as transformers converts one
/// from `tokenizer.model`: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, the
/// characters and `merges` learned pieces of a small text (each scored by
/// when it was learned), and every merge that makes a piece of two pieces,
/// in the pieces' order; spaces spelled `▁`, with a `▁` before the text
/// (Llama 2's legacy normalizer) or not (Gemma's).
fn sentencepiece_json(space_prefix: bool, merges: usize) -> Json {
    const TEXT: &str = "the quick brown fox jumps over the lazy dog. the dog sleeps; \
        the fox runs over there and then the other fox thinks that these are the \
        three brothers of the north. café crème, naïve théâtre: très bien! 1234 5678 90";
    let words: Vec<Vec<String>> = TEXT
        .split(' ')
        .map(|w| {
            std::iter::once("\u{2581}".to_string())
                .chain(w.chars().map(String::from))
                .collect()
        })
        .collect();
    let mut vocab: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    vocab.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    let mut chars: Vec<String> = words.iter().flatten().cloned().collect();
    chars.sort();
    chars.dedup();
    vocab.extend(chars);
    // Learn pieces: the most frequent adjacent pair (ties to the smallest).
    let mut words = words;
    for _ in 0..merges {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        let Some(((a, b), _)) = counts
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)))
        else {
            break;
        };
        let joined = format!("{a}{b}");
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        if !vocab.contains(&joined) {
            vocab.push(joined);
        }
    }
    let id: std::collections::HashMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merge_list = Vec::new();
    for piece in &vocab[259..] {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*id.get(&piece[..at])?, *id.get(&piece[at..])?)))
            .collect();
        local.sort();
        merge_list.extend(local.into_iter().map(|(l, r)| json!([vocab[l], vocab[r]])));
    }
    let special = |i: usize| {
        json!({"id": i, "content": vocab[i], "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if space_prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0), special(1), special(2)],
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i)))
                      .collect::<serde_json::Map<_, _>>(),
                  "merges": merge_list},
    })
}

#[test]
fn a_sentencepiece_style_tokenizer_json_becomes_a_llama_vocabulary() {
    const LLAMA2_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n{% endif %}{% endfor %}";
    for space_prefix in [true, false] {
        let case = if space_prefix { "llama2" } else { "gemma" };
        let dir = copy_of("llama-f16", &format!("spm-{case}"), |d| {
            let t = sentencepiece_json(space_prefix, 120);
            std::fs::write(d.join("tokenizer.json"), t.to_string()).expect("write");
            edit_json(&d.join("tokenizer_config.json"), |c| {
                c["bos_token"] = json!("<s>");
                c["eos_token"] = json!("</s>");
                c["unk_token"] = json!("<unk>");
                c["chat_template"] = json!(LLAMA2_TEMPLATE);
            });
        });
        let out = quantize(&dir, &format!("spm-{case}.gguf"), "f32");
        let gguf = GgufFile::open(&out).expect("opens");
        assert_eq!(gguf.get_str("tokenizer.ggml.model").ok(), Some("llama"));
        assert_eq!(gguf.get_str("tokenizer.ggml.pre").ok(), Some("default"));
        assert_eq!(
            gguf.opt_bool("tokenizer.ggml.add_space_prefix")
                .ok()
                .flatten(),
            Some(space_prefix)
        );
        assert_eq!(
            gguf.get_usize("tokenizer.ggml.unknown_token_id").ok(),
            Some(0)
        );
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens").expect("tokens");
        let types = gguf
            .opt_int_array("tokenizer.ggml.token_type")
            .expect("types")
            .expect("types");
        let scores = gguf
            .opt_f32_array("tokenizer.ggml.scores")
            .expect("scores")
            .expect("scores");
        // config.json's 49152 ids, the ones tokenizer.json lacks padded.
        assert_eq!(
            (tokens.len(), types.len(), scores.len()),
            (49152, 49152, 49152)
        );
        assert_eq!((tokens[1], types[1]), ("<s>", 3));
        assert_eq!((tokens[3 + 0x41], types[3 + 0x41]), ("<0x41>", 6));
        assert_eq!((tokens[49151], types[49151]), ("[PAD49151]", 5));
        // Pieces learned later score lower.
        let th = tokens.iter().position(|t| *t == "▁th").expect("▁th");
        let the = tokens.iter().position(|t| *t == "▁the").expect("▁the");
        assert!(th < the && scores[th] > scores[the], "{th} {the}");

        let dir = GgufFile::open(&dir).expect("opens");
        let (want, got) = (
            Tokenizer::from_gguf(&dir).expect("tokenizer.json reads"),
            Tokenizer::from_gguf(&gguf).expect("the GGUF tokenizer builds"),
        );
        same_tokenizer(&want, &got, case);
        // A text of the pieces learned: several pieces, not characters.
        let ids = got.encode_with("the other fox", false).expect("encodes");
        assert!(ids.len() <= 8, "{case}: {ids:?}");
        assert_eq!(got.decode(&ids), "the other fox");
        drop(gguf);
        std::fs::remove_file(&out).expect("remove");
    }
}

#[test]
fn a_sentencepiece_tokenizer_that_prefixes_only_the_text_start_is_refused() {
    // transformers' non-legacy Llama layout: a Metaspace that puts ▁ before
    // the text only, where llama.cpp also puts one after special tokens.
    let dir = copy_of("llama-f16", "spm-first", |d| {
        let mut t = sentencepiece_json(false, 40);
        t["normalizer"] = Json::Null;
        t["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "\u{2581}",
                                    "prepend_scheme": "first", "split": false});
        std::fs::write(d.join("tokenizer.json"), t.to_string()).expect("write");
        edit_json(&d.join("tokenizer_config.json"), |c| {
            c["bos_token"] = json!("<s>");
            c["eos_token"] = json!("</s>");
        });
    });
    let out = scratch().join("spm-first.gguf");
    let r = common::cli(&[
        "quantize",
        dir.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
        "--type",
        "f16",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("tokenizer.json") && err.contains("prepend_scheme \"first\""),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn the_metadata_values_are_gguf_types_llama_cpp_reads() {
    // Ids as u32, types as i32, flags as bool, as the converter writes them.
    let dir = GgufFile::open(common::hf_models_dir().join("llama-bf16")).expect("opens");
    let meta = parallm::framework::hf::gguf_metadata(&dir).expect("metadata");
    let get = |k: &str| {
        meta.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    assert!(matches!(get("tokenizer.ggml.bos_token_id"), Value::U32(0)));
    assert!(matches!(get("tokenizer.ggml.eos_token_id"), Value::U32(2)));
    assert!(matches!(
        get("tokenizer.ggml.unknown_token_id"),
        Value::U32(0)
    ));
    assert!(matches!(
        get("tokenizer.ggml.add_bos_token"),
        Value::Bool(true)
    ));
    assert!(matches!(
        get("tokenizer.ggml.add_eos_token"),
        Value::Bool(false)
    ));
    assert!(
        matches!(get("tokenizer.ggml.token_type"), Value::Array(a) if matches!(a[0], Value::I32(3)))
    );
    assert!(matches!(get("tokenizer.chat_template"), Value::String(t) if t.contains("im_start")));
}
