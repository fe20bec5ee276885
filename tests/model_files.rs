//! Malformed model files are refused at open with an error that names the
//! file, the tensor and the fault: never a panic, an abort or an allocation
//! sized by the file's claims.

#[path = "support/gguf.rs"]
mod gguf;

use framework::gguf::GgufFile;
use gguf::{Meta, Tensor};

const F32: u32 = 0;
const Q4_0: u32 = 2;

fn open(meta: &[(&str, Meta)], tensors: &[Tensor], data: usize) -> Result<GgufFile, String> {
    GgufFile::from_bytes("case.gguf", gguf::gguf(meta, tensors, data)).map_err(|e| e.to_string())
}

fn refused(meta: &[(&str, Meta)], tensors: &[Tensor], data: usize, want: &[&str]) {
    let err = open(meta, tensors, data).expect_err("a malformed file was accepted");
    assert!(err.contains("case.gguf"), "{err}");
    for w in want {
        assert!(err.contains(w), "{err:?} does not say {w:?}");
    }
}

#[test]
fn a_well_formed_table_opens() {
    let t = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[32], Q4_0, 32),
        Tensor::new("c", &[8], F32, 64),
    ];
    let file = open(&[], &t, 96).expect("valid");
    assert!(file.has_tensor("b"));
}

#[test]
fn overlapping_tensors_are_refused() {
    let t = [
        Tensor::new("a", &[16], F32, 0),
        Tensor::new("b", &[8], F32, 32),
    ];
    refused(&[], &t, 96, &["tensor 'a'", "overlaps tensor 'b'"]);
    let same = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[8], F32, 0),
    ];
    refused(&[], &same, 64, &["overlaps"]);
}

#[test]
fn misaligned_tensors_are_refused() {
    let t = [Tensor::new("a", &[8], F32, 4)];
    refused(&[], &t, 64, &["tensor 'a'", "offset 4", "alignment 32"]);
    let aligned_64 = [("general.alignment", Meta::U32(64))];
    let t = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("b", &[8], F32, 32),
    ];
    refused(&aligned_64, &t, 128, &["offset 32", "alignment 64"]);
}

#[test]
fn a_type_that_disagrees_with_the_data_size_is_refused() {
    // Written as 64 bytes of f32, declared as 18 bytes of Q4_0.
    let t = [
        Tensor::new("a", &[32], Q4_0, 0),
        Tensor::new("b", &[8], F32, 64),
    ];
    refused(&[], &t, 96, &["tensor 'a'", "Q4_0 disagrees"]);
    // Declared f32 where only a Q4_0's bytes were written.
    let t = [Tensor::new("a", &[1024], F32, 0)];
    refused(&[], &t, 576, &["tensor 'a'", "truncated"]);
    // Not a whole number of blocks.
    let t = [Tensor::new("a", &[33], Q4_0, 0)];
    refused(&[], &t, 64, &["not a whole number of Q4_0 blocks"]);
}

#[test]
fn bad_alignments_repeats_zero_and_huge_dimensions_are_refused() {
    let t = [Tensor::new("a", &[8], F32, 0)];
    refused(
        &[("general.alignment", Meta::U32(0))],
        &t,
        32,
        &["alignment"],
    );
    refused(
        &[("general.alignment", Meta::U32(24))],
        &t,
        32,
        &["general.alignment", "power of two"],
    );
    let twice = [
        Tensor::new("a", &[8], F32, 0),
        Tensor::new("a", &[8], F32, 32),
    ];
    refused(&[], &twice, 64, &["repeated"]);
    refused(
        &[],
        &[Tensor::new("a", &[8, 0], F32, 0)],
        32,
        &["zero dimension"],
    );
    let huge = [Tensor::new("a", &[1 << 40, 1 << 40], F32, 0)];
    refused(&[], &huge, 32, &["tensor 'a'", "overflows"]);
    let big = [Tensor::new("a", &[1 << 30, 1 << 20], F32, 0)];
    refused(&[], &big, 32, &["tensor 'a'", "truncated"]);
}

#[test]
fn a_tensor_type_this_build_cannot_read_is_named() {
    for (id, name) in [(16, "IQ2_XXS"), (21, "IQ3_S"), (99, "not a GGML type")] {
        let t = [Tensor::new("a", &[256], id, 0)];
        refused(
            &[],
            &t,
            256,
            &[
                "unsupported tensor type",
                &format!("'{id} ({name})'"),
                "Q6_K",
                "IQ4_XS",
            ],
        );
    }
}

#[test]
fn iq4_tensors_are_checked_like_the_others() {
    // IQ4_XS: 136 bytes per 256 weights. A size that is not whole blocks, a
    // tensor running past the data, and two that overlap are each named.
    let t = [Tensor::new("a", &[300], 23, 0)];
    refused(&[], &t, 512, &["tensor 'a'", "IQ4_XS blocks of 256"]);
    let t = [Tensor::new("a", &[512], 23, 0)];
    refused(&[], &t, 200, &["tensor 'a'", "truncated", "IQ4_XS"]);
    let t = [
        Tensor::new("a", &[64], 20, 0),
        Tensor::new("b", &[32], 20, 32),
    ];
    refused(
        &[],
        &t,
        96,
        &["tensor 'a'", "overlaps tensor 'b'", "IQ4_NL"],
    );
    // Well-formed: readable, as Q8_0 blocks.
    let t = [Tensor::new("a", &[256], 23, 0)];
    let file = open(&[], &t, 160).expect("a well-formed IQ4_XS tensor");
    assert_eq!(file.stored_type("a").as_deref(), Some("IQ4_XS"));
    let q = file.tensor("a", &[256]).expect("read as Q8_0");
    assert_eq!(format!("{:?}", q.dtype()), "Q8_0");
}

/// The config of `meta` (no tensors), or its error.
fn config_of(meta: &[(&str, Meta)]) -> Result<framework::ModelConfig, String> {
    let file = open(meta, &[], 0).expect("a well-formed file");
    framework::ModelConfig::from_gguf(&file).map_err(|e| e.to_string())
}

/// `tiny_llama_meta` with its architecture and keys renamed to `arch`, and
/// `extra` keys added (replacing those of the same name: a repeated key is
/// refused).
fn family_meta(arch: &str, extra: Vec<(&'static str, Meta)>) -> Vec<(String, Meta)> {
    let mut meta: Vec<(String, Meta)> = gguf::tiny_llama_meta(8, 64)
        .into_iter()
        .map(|(k, v)| match k {
            "general.architecture" => (k.to_string(), Meta::Str(arch.into())),
            _ => (k.replacen("llama.", &format!("{arch}."), 1), v),
        })
        .collect();
    for (k, v) in extra {
        match meta.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v,
            None => meta.push((k.to_string(), v)),
        }
    }
    meta
}

fn borrowed(meta: &[(String, Meta)]) -> Vec<(&str, Meta)> {
    meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

#[test]
fn an_architecture_or_rope_scaling_this_build_cannot_run_is_named() {
    let err = config_of(&borrowed(&family_meta("mamba", vec![]))).expect_err("mamba");
    for want in [
        "case.gguf",
        "unsupported architecture",
        "'mamba'",
        "llama, qwen2, qwen3, phi3, gemma2, gemma3, gpt2",
    ] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    let longrope = family_meta(
        "qwen2",
        vec![("qwen2.rope.scaling.type", Meta::Str("longrope".into()))],
    );
    let err = config_of(&borrowed(&longrope)).expect_err("longrope");
    for want in ["case.gguf", "rope scaling", "'longrope'", "linear, yarn"] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    let value_width = family_meta(
        "qwen3",
        vec![
            ("qwen3.attention.key_length", Meta::U32(16)),
            ("qwen3.attention.value_length", Meta::U32(32)),
        ],
    );
    let err = config_of(&borrowed(&value_width)).expect_err("values wider than keys");
    assert!(
        err.contains("value head width") && err.contains("32 (keys 16)"),
        "{err}"
    );
    // A rotated width that is odd or wider than the head is named, with
    // its key (a partial one, even and narrower, is run).
    for (dims, ok) in [(8, true), (7, false), (18, false)] {
        let partial = family_meta("phi3", vec![("phi3.rope.dimension_count", Meta::U32(dims))]);
        match config_of(&borrowed(&partial)) {
            Ok(c) => assert!(ok && c.rope.rot_dims == Some(8), "{dims}"),
            Err(err) => assert!(
                !ok && err.contains("phi3.rope.dimension_count")
                    && err.contains(&format!("is {dims}"))
                    && err.contains("head width 16"),
                "{dims}: {err}"
            ),
        }
    }
    // Each family reads its own keys.
    for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"] {
        let c = config_of(&borrowed(&family_meta(arch, vec![]))).expect(arch);
        assert_eq!((c.arch.name(), c.n_layers, c.head_dim), (arch, 1, 16));
    }
    // A sliding window shorter than the context becomes the context.
    let windowed = family_meta(
        "phi3",
        vec![("phi3.attention.sliding_window", Meta::U32(48))],
    );
    assert_eq!(
        config_of(&borrowed(&windowed)).expect("windowed").context,
        48
    );
}

/// The error of loading one shard of an `arch` file holding `tensors`
/// (f32, names and dims as GGUF lists them) and no others.
fn load_error(
    arch: &str,
    extra: Vec<(&'static str, Meta)>,
    tensors: &[(&str, Vec<u64>)],
) -> String {
    let meta = family_meta(arch, extra);
    let mut table = Vec::new();
    let mut offset = 0;
    for (name, dims) in tensors {
        table.push(Tensor::new(name, dims, F32, offset));
        offset += dims.iter().product::<u64>() * 4;
    }
    let file = GgufFile::from_bytes(
        "case.gguf",
        gguf::gguf(&borrowed(&meta), &table, offset as usize),
    )
    .expect("a well-formed file");
    framework::LlamaShard::load(
        &file,
        framework::ShardSpec::SINGLE,
        framework::WeightFormat::F32,
    )
    .expect_err("a tensor is missing")
    .to_string()
}

#[test]
fn a_family_tensor_that_is_missing_is_named() {
    let (h, ffn, vocab) = (64u64, 128u64, 8u64);
    // A qwen2 file without its q/k/v biases: the shard's load names the tensor.
    let mut tensors = vec![
        ("token_embd.weight".to_string(), vec![h, vocab]),
        ("output_norm.weight".to_string(), vec![h]),
    ];
    for (name, dims) in [
        ("attn_norm.weight", vec![h]),
        ("attn_q.weight", vec![h, h]),
        ("attn_k.weight", vec![h, h]),
        ("attn_v.weight", vec![h, h]),
        ("attn_output.weight", vec![h, h]),
        ("ffn_norm.weight", vec![h]),
        ("ffn_gate.weight", vec![h, ffn]),
        ("ffn_up.weight", vec![h, ffn]),
        ("ffn_down.weight", vec![ffn, h]),
    ] {
        tensors.push((format!("blk.0.{name}"), dims));
    }
    let named: Vec<(&str, Vec<u64>)> = tensors
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    let err = load_error("qwen2", vec![], &named);
    assert!(
        err.contains("case.gguf") && err.contains("blk.0.attn_q.bias"),
        "{err}"
    );

    // A gpt2 file whose fused q|k|v has no bias: the fused bias is named.
    let err = load_error(
        "gpt2",
        vec![("gpt2.attention.layer_norm_epsilon", Meta::F32(1e-5))],
        &[
            ("token_embd.weight", vec![h, vocab]),
            ("position_embd.weight", vec![h, 64]),
            ("output_norm.weight", vec![h]),
            ("output_norm.bias", vec![h]),
            ("blk.0.attn_norm.weight", vec![h]),
            ("blk.0.attn_norm.bias", vec![h]),
            ("blk.0.attn_qkv.weight", vec![h, 3 * h]),
        ],
    );
    assert!(
        err.contains("case.gguf") && err.contains("blk.0.attn_qkv.bias"),
        "{err}"
    );
}

/// A model's fingerprint (what the ranks of a job compare, so that none
/// runs another model than rank 0's) is the same for two copies of one
/// file, and differs when its metadata, its first tensor byte or its last
/// byte differ: for a file read whole (small) and one read in chunks.
#[test]
fn a_fingerprint_tells_copies_alike_and_other_contents_apart() {
    let fingerprint = |b: Vec<u8>| {
        GgufFile::from_bytes("case.gguf", b)
            .and_then(|f| f.fingerprint())
            .expect("fingerprint")
    };
    for elems in [64u64, 4 << 20] {
        let data = elems as usize * 4;
        let t = [Tensor::new("w", &[elems], F32, 0)];
        let named = |name: &str| gguf::gguf(&[("general.name", Meta::Str(name.into()))], &t, data);
        let bytes = named("a");
        let first = fingerprint(bytes.clone());
        assert_eq!(first, fingerprint(bytes.clone()), "{elems} weights");
        assert!(
            first.starts_with(&format!("{} bytes, sampled SHA-256 ", bytes.len())),
            "{first}"
        );
        assert_ne!(first, fingerprint(named("b")), "{elems} weights");
        let mut other = bytes.clone();
        other[bytes.len() - data] ^= 1;
        assert_ne!(first, fingerprint(other), "{elems} weights");
        let mut other = bytes.clone();
        other[bytes.len() - 1] ^= 1;
        assert_ne!(first, fingerprint(other), "{elems} weights");
    }
}

/// The tokenizer of `meta` (no tensors), or its error.
fn tokenizer_of(meta: &[(&str, Meta)]) -> Result<framework::Tokenizer, String> {
    let file = open(meta, &[], 0).expect("a well-formed file");
    framework::Tokenizer::from_gguf(&file).map_err(|e| e.to_string())
}

/// `tiny_llama_meta` (8 tokens) with `extra` keys added.
fn with_tokenizer_keys(extra: Vec<(&'static str, Meta)>) -> Vec<(&'static str, Meta)> {
    let mut meta = gguf::tiny_llama_meta(8, 64);
    meta.extend(extra);
    meta
}

/// Regression (audit): a `token_type` array shorter than the vocabulary,
/// or holding a value that is no llama.cpp token type, was read as far as
/// it went, and the special tokens it left out were split as text.
#[test]
fn token_types_must_cover_the_vocabulary_with_known_types() {
    let short = with_tokenizer_keys(vec![("tokenizer.ggml.token_type", Meta::I32s(vec![3, 3]))]);
    let err = tokenizer_of(&short).expect_err("2 types for 8 tokens");
    for want in [
        "case.gguf",
        "tokenizer.ggml.token_type",
        "2 types for 8 tokens",
    ] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    for bad in [99, -1, 7] {
        let mut types = vec![1; 8];
        types[5] = bad;
        let meta = with_tokenizer_keys(vec![("tokenizer.ggml.token_type", Meta::I32s(types))]);
        let err = tokenizer_of(&meta).expect_err("an unknown token type");
        for want in [
            "case.gguf",
            "tokenizer.ggml.token_type",
            &format!("token 5 the type {bad}"),
        ] {
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
    }
    // Every type llama.cpp defines (0 its "undefined") is read, and a
    // control token is matched whole.
    let meta = with_tokenizer_keys(vec![(
        "tokenizer.ggml.token_type",
        Meta::I32s(vec![3, 3, 1, 2, 4, 5, 6, 0]),
    )]);
    let tok = tokenizer_of(&meta).expect("every known type");
    assert_eq!(tok.encode_with("t1", false).expect("encodes"), vec![1]);
}

/// A BOS id outside the vocabulary is refused (as EOS and EOT are); an
/// unknown or padding id, which nothing uses, is ignored with a warning,
/// as llama.cpp does (real files carry such ids).
#[test]
fn special_token_ids_outside_the_vocabulary_are_refused_where_used() {
    for key in [
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
    ] {
        let mut meta = gguf::tiny_llama_meta(8, 64);
        meta.retain(|(k, _)| *k != key);
        meta.push((key, Meta::U32(8)));
        tokenizer_of(&meta).unwrap_or_else(|e| panic!("{key} 8: {e}"));
    }
    for key in ["tokenizer.ggml.bos_token_id"] {
        let mut meta = gguf::tiny_llama_meta(8, 64);
        meta.retain(|(k, _)| *k != key);
        meta.push((key, Meta::U32(8)));
        let err = tokenizer_of(&meta).expect_err(key);
        for want in ["case.gguf", key, "is 8", "vocabulary of 8 tokens"] {
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
        let mut meta = gguf::tiny_llama_meta(8, 64);
        meta.retain(|(k, _)| *k != key);
        meta.push((key, Meta::U32(7)));
        tokenizer_of(&meta).unwrap_or_else(|e| panic!("{key} 7: {e}"));
    }
}

/// Regression (audit): `llama.block_count = 1` in a file with the tensors
/// of two blocks ran one layer without a word (llama.cpp refuses it).
#[test]
fn a_block_count_below_the_blocks_in_the_file_is_refused() {
    let t = [
        Tensor::new("blk.0.attn_norm.weight", &[64], F32, 0),
        Tensor::new("blk.1.attn_norm.weight", &[64], F32, 256),
        Tensor::new("blk.1.ffn_norm.weight", &[64], F32, 512),
    ];
    let meta = gguf::tiny_llama_meta(8, 64);
    let file = open(&meta, &t, 768).expect("a well-formed file");
    let err = framework::ModelConfig::from_gguf(&file)
        .expect_err("one block counted, two stored")
        .to_string();
    for want in [
        "case.gguf",
        "llama.block_count",
        "is 1",
        "block 1",
        "blk.1.attn_norm.weight",
    ] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    // The tensors of block 0 alone are what a count of 1 means.
    let file = open(&meta, &t[..1], 256).expect("a well-formed file");
    framework::ModelConfig::from_gguf(&file).expect("one block, counted");
}

/// Regression (audit): a metadata key written twice was accepted, the last
/// value winning (a repeated tensor name was already refused).
#[test]
fn a_repeated_metadata_key_is_refused() {
    let t = [Tensor::new("a", &[8], F32, 0)];
    let twice = [
        ("general.name", Meta::Str("first".into())),
        ("general.name", Meta::Str("second".into())),
    ];
    refused(&twice, &t, 32, &["metadata key 'general.name' is repeated"]);
    // Even when its value is the alignment candle's reader divides by.
    let twice = [
        ("general.alignment", Meta::U32(32)),
        ("general.alignment", Meta::U32(64)),
    ];
    refused(&twice, &t, 32, &["'general.alignment' is repeated"]);
}

/// Regression (audit): `general.alignment = 0` reached candle's reader,
/// which panicked dividing by it; the panic was caught, but the default
/// hook had already printed "thread 'main' panicked" to the user. It is
/// refused by the scan before that reader runs.
#[test]
fn an_alignment_of_zero_is_refused_before_candle_divides_by_it() {
    let t = [Tensor::new("a", &[8], F32, 0)];
    let hook = std::panic::take_hook();
    let panicked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = panicked.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("alignment-0") {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        hook(info);
    }));
    let err = std::thread::Builder::new()
        .name("alignment-0".into())
        .spawn(move || open(&[("general.alignment", Meta::U32(0))], &t, 32))
        .expect("thread")
        .join()
        .expect("no panic escapes")
        .expect_err("alignment 0");
    let _ = std::panic::take_hook();
    assert!(
        err.contains("case.gguf") && err.contains("general.alignment is 0, must be a power of two"),
        "{err}"
    );
    assert!(
        !panicked.load(std::sync::atomic::Ordering::SeqCst),
        "candle's reader panicked"
    );
}

/// Regression (audit): a FIFO given as the model hung the open until
/// something wrote to it. Anything but a regular file is refused by name.
#[cfg(unix)]
#[test]
fn a_model_path_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("f.gguf");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo");
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&fifo, &link).expect("symlink");
    for path in [fifo, link, std::path::PathBuf::from("/dev/null")] {
        let (tx, rx) = std::sync::mpsc::channel();
        let shown = path.display().to_string();
        std::thread::spawn(move || {
            let _ = tx.send(GgufFile::open(&path).map(|_| ()).map_err(|e| e.to_string()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("opening {shown} blocked"))
            .expect_err("not a regular file");
        let kind = if shown == "/dev/null" {
            "a character device"
        } else {
            "a FIFO"
        };
        assert!(
            err.contains(&shown) && err.contains(kind) && err.contains("not a regular file"),
            "{err}"
        );
    }
}
