//! A Hugging Face directory's tokenizer as GGUF metadata: the `tokenizer.*`
//! keys (and `general.name`) that llama.cpp's `convert_hf_to_gguf.py` writes
//! from `tokenizer.json`, `tokenizer_config.json` and `config.json` (read for
//! the facts, written here), for `parallm quantize DIR OUT.gguf`.
//!
//! Two kinds of `tokenizer.json` are expressed, whatever the family (the
//! converter's choice per family is by the files it finds; here it is by
//! what `tokenizer.json` is):
//! - byte-level BPE (a `ByteLevel` pre-tokenizer: GPT-2, Llama 3, Qwen2/3,
//!   SmolLM) → `tokenizer.ggml.model = gpt2`, as `_set_vocab_gpt2` writes
//!   it: the tokens by id with the added ones (a gap is `[PAD{i}]`,
//!   unused), their types (control for a special added token or one that
//!   looks special, user-defined for another added token, normal), the
//!   merges as `"a b"`, and `tokenizer.ggml.pre` named by the
//!   pre-tokenizer's structure (its `Split` regex or `Digits`, which
//!   llama.cpp's names stand for), else as `get_vocab_base_pre` names it —
//!   the SHA-256 of the ids `tokenizer.json` gives llama.cpp's check text —
//!   among the names parallm's GGUF tokenizer reads (structure first: two
//!   pre-tokenizers can give one vocabulary the same check ids);
//! - SentencePiece-style BPE (`byte_fallback`, spaces spelled `▁` by the
//!   normalizer or a `Metaspace`: Llama 2, Mistral, Gemma) →
//!   `tokenizer.ggml.model = llama` as `_set_vocab_llama_hf` writes it (pre
//!   `default`, `<0xXX>` tokens typed byte, special tokens control), with one
//!   difference: that function scores every token -1000, which leaves
//!   llama.cpp's SentencePiece merging without an order, so each token made
//!   by a merge scores minus that merge's rank (the order `tokenizer.json`'s
//!   merges were made in from the SentencePiece scores), and
//!   `add_space_prefix` is written as `tokenizer.json` prepends `▁`.
//!
//! BOS and EOS are the directory tokenizer's ([`Tokenizer::from_gguf`] on
//! the directory), and whether it adds them is what its post-processor does;
//! unknown, separator, padding and mask ids are `gguf.SpecialVocab`'s (the
//! `tokenizer_config.json` token's added-token id, else `config.json`'s
//! id); the chat template is `tokenizer_config.json`'s (a list of named ones
//! as the converter writes them) or `chat_template.jinja`.
//!
//! Refused, with an error naming `tokenizer.json` and why: Unigram and
//! WordPiece models, a pre-tokenizer or normalizer GGUF has no name for,
//! merges taken whole (`ignore_merges`) where llama.cpp would not (or the
//! reverse), and a `Metaspace` that prefixes `▁` only at the start of a text
//! (llama.cpp's also adds it after each special token).
//!
//! What is true of it: the metadata returned builds a tokenizer
//! ([`Tokenizer::from_gguf`] on a GGUF file holding it) that encodes a set
//! of check texts (llama.cpp's pre-tokenizer text, accents, emoji, digits,
//! whitespace runs, special tokens between words) to the same ids as the
//! directory's own, and decodes those ids to the same text; else it is an
//! error, and nothing is returned.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::{
    Tokenizer, GPT4O_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, TEKKEN_PATTERN, TOKEN_BYTE,
    TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, WHOLE_WORD_PRES,
};

/// The text `get_vocab_base_pre` tokenizes to tell pre-tokenizers apart.
pub(crate) const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// `get_vocab_base_pre`'s hashes for the pre-tokenizers parallm's GGUF
/// tokenizer reads, and the model each was taken from.
const PRE_HASHES: [(&str, &str); 8] = [
    // openai-community/gpt2
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
    // evilfreelancer/ruGPT3XL
    (
        "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
        "gpt-2",
    ),
    // meta-llama/Meta-Llama-3-8B
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    // Qwen/Qwen1.5-7B
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    // Qwen/Qwen3-Embedding-0.6B
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ),
    // deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    (
        "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5",
        "deepseek-r1-qwen",
    ),
    // mistralai/Mistral-Nemo-Base-2407
    (
        "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e",
        "tekken",
    ),
    // HuggingFaceTB/SmolLM-135M
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
];

/// The score of a SentencePiece token no merge makes (the converter's
/// placeholder is -1000; below every merge's here, so such a token joins
/// last if pieces ever spell it).
const UNMERGED_SCORE: f32 = -1e9;

/// What `tokenizer.json` holds, as GGUF can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Byte-level BPE (`gpt2`).
    ByteLevel,
    /// SentencePiece-style BPE (`llama`), with or without a `▁` before the
    /// text and after each special token.
    SentencePiece { space_prefix: bool },
}

/// The metadata a GGUF file written from the Hugging Face directory `file`
/// holds besides the keys [`GgufFile::open`] maps from `config.json`:
/// `general.name` (the directory's name) and the tokenizer's `tokenizer.*`
/// keys. Empty for a GGUF file.
pub fn gguf_metadata(file: &GgufFile) -> Result<Vec<(String, Value)>> {
    let Some(hf) = file.hf() else {
        return Ok(Vec::new());
    };
    let path = hf.dir().join("tokenizer.json");
    // The directory's own tokenizer: what the GGUF one must equal.
    let own = Tokenizer::from_gguf(file)?;
    let err = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
    let json: Json =
        serde_json::from_str(&text).map_err(|e| err(format!("does not parse: {e}")))?;
    let mut inner =
        tokenizers::Tokenizer::from_str(&text).map_err(|e| err(format!("does not parse: {e}")))?;
    inner.with_padding(None);
    inner
        .with_truncation(None)
        .map_err(|e| err(format!("cannot turn truncation off: {e}")))?;

    let arch = file.get_str("general.architecture")?;
    let n_vocab = file.get_usize(&format!("{arch}.vocab_size"))?;
    let kind = kind(&json).map_err(err)?;
    let by_id = tokens_by_id(&inner, n_vocab).map_err(err)?;
    let added: HashMap<u32, tokenizers::AddedToken> =
        inner.get_added_tokens_decoder().into_iter().collect();

    let mut name = hf
        .dir()
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    // llama.cpp (and parallm) strip the whitespace after the special tokens
    // of a model whose name says Phi-3; a directory so named whose
    // tokenizer.json does not is written under a name that does not say it.
    let strips = added
        .values()
        .filter(|t| t.special)
        .all(|t| t.rstrip || crate::tokenizer::PHI3_UNSTRIPPED.contains(&t.content.as_str()));
    if crate::tokenizer::names_phi3(&name) && !strips {
        name = name
            .to_ascii_lowercase()
            .replace("phi-3", "phi 3")
            .replace("phi3", "phi 3");
    }
    let mut meta: Vec<(String, Value)> = vec![("general.name".into(), Value::String(name))];
    let mut put = |k: &str, v: Value| meta.push((k.to_string(), v));
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let ints = |v: Vec<i64>| Value::Array(v.into_iter().map(|t| Value::I32(t as i32)).collect());
    let merges = merges(&json).map_err(err)?;
    match kind {
        Kind::ByteLevel => {
            let pre = pre_name(&json, &inner).map_err(err)?;
            let (tokens, types): (Vec<String>, Vec<i64>) = by_id
                .into_iter()
                .enumerate()
                .map(|(i, t)| bpe_token(i, t, &added))
                .unzip();
            put("tokenizer.ggml.model", Value::String("gpt2".into()));
            put("tokenizer.ggml.pre", Value::String(pre.into()));
            put("tokenizer.ggml.tokens", strings(tokens));
            put("tokenizer.ggml.token_type", ints(types));
            let merges = merges
                .into_iter()
                .map(|(a, b)| format!("{a} {b}"))
                .collect();
            put("tokenizer.ggml.merges", strings(merges));
        }
        Kind::SentencePiece { space_prefix } => {
            let special = named_special_ids(&json, hf);
            let made_by = merge_ranks(&merges);
            let mut tokens = Vec::with_capacity(n_vocab);
            let mut scores = Vec::with_capacity(n_vocab);
            let mut types = Vec::with_capacity(n_vocab);
            for (i, t) in by_id.into_iter().enumerate() {
                let (t, score, kind) = spm_token(i, t, &added, &special, &made_by);
                tokens.push(t);
                scores.push(Value::F32(score));
                types.push(kind);
            }
            put("tokenizer.ggml.model", Value::String("llama".into()));
            put("tokenizer.ggml.pre", Value::String("default".into()));
            put("tokenizer.ggml.tokens", strings(tokens));
            put("tokenizer.ggml.scores", Value::Array(scores));
            put("tokenizer.ggml.token_type", ints(types));
            put("tokenizer.ggml.add_space_prefix", Value::Bool(space_prefix));
        }
    }
    let id = |v: u32| Value::U32(v);
    if let Some(bos) = own.bos() {
        put("tokenizer.ggml.bos_token_id", id(bos));
    }
    put("tokenizer.ggml.eos_token_id", id(own.eos()));
    for (typ, key) in [
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("sep", "tokenizer.ggml.seperator_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
        ("mask", "tokenizer.ggml.mask_token_id"),
    ] {
        if let Some(v) = special_id(&json, hf, typ).filter(|&v| (v as usize) < n_vocab) {
            put(key, id(v));
        }
    }
    // What the post-processor does, written whatever the converter would
    // leave to llama.cpp's default.
    put("tokenizer.ggml.add_bos_token", Value::Bool(own.adds_bos()));
    put("tokenizer.ggml.add_eos_token", Value::Bool(own.adds_eos()));
    for (k, v) in chat_templates(hf, &own) {
        put(&k, v);
    }
    check(&meta, &own, &path)?;
    Ok(meta)
}

/// The kind of `tokenizer.json`'s model, or why GGUF cannot hold it.
fn kind(json: &Json) -> std::result::Result<Kind, String> {
    let model = &json["model"];
    let ty = model["type"].as_str().unwrap_or("(none)");
    match ty {
        "BPE" => {}
        "Unigram" => {
            return Err("holds a Unigram model: GGUF's SentencePiece vocabulary (`llama`) merges pieces by score, which does not give Unigram's best segmentation, and llama.cpp's converter reads such a vocabulary only from tokenizer.model".into())
        }
        other => {
            return Err(format!(
                "holds a {other} model; byte-level BPE (GGUF `gpt2`) and SentencePiece-style BPE (GGUF `llama`) are written"
            ))
        }
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model[key].as_str().is_some_and(|s| !s.is_empty()) {
            return Err(format!(
                "its BPE model has a {key}, which GGUF's BPE vocabularies do not"
            ));
        }
    }
    if model["dropout"].as_f64().is_some_and(|d| d > 0.0) {
        return Err("its BPE model has dropout, which GGUF's BPE vocabularies do not".into());
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return spm_space_prefix(json).map(|space_prefix| Kind::SentencePiece { space_prefix });
    }
    let pre = parts(&json["pre_tokenizer"], "pretokenizers");
    if !pre.iter().any(|p| p["type"] == "ByteLevel") {
        return Err("its BPE model is neither byte-level (no ByteLevel pre-tokenizer) nor SentencePiece-style (no byte_fallback)".into());
    }
    if pre
        .iter()
        .any(|p| p["type"] == "ByteLevel" && p["add_prefix_space"].as_bool().unwrap_or(true))
    {
        return Err("its ByteLevel pre-tokenizer adds a space before the text (add_prefix_space), which a GGUF BPE vocabulary does not".into());
    }
    // NFC leaves the composed text llama.cpp reads as it is (Qwen2's);
    // nothing else is applied by a GGUF BPE tokenizer.
    for n in parts(&json["normalizer"], "normalizers") {
        if n["type"] != "NFC" {
            return Err(format!(
                "its normalizer {} has no equivalent in a GGUF BPE vocabulary",
                compact(n)
            ));
        }
    }
    Ok(Kind::ByteLevel)
}

/// The items of a `Sequence` (under `list`), the one item of anything else,
/// none for `null`.
fn parts<'a>(json: &'a Json, list: &str) -> Vec<&'a Json> {
    match (json["type"].as_str(), json[list].as_array()) {
        (Some("Sequence"), Some(items)) => items.iter().collect(),
        _ if json.is_null() => Vec::new(),
        _ => vec![json],
    }
}

/// A JSON value on one line, cut to a readable length.
fn compact(json: &Json) -> String {
    let s = json.to_string();
    match s.char_indices().nth(160) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s,
    }
}

/// Whether a SentencePiece-style `tokenizer.json` puts `▁` before the
/// text (GGUF's `add_space_prefix`: before the text and after each special
/// token), or why its spaces cannot be said in GGUF.
fn spm_space_prefix(json: &Json) -> std::result::Result<bool, String> {
    let (mut prepend, mut replace) = (false, false);
    for n in parts(&json["normalizer"], "normalizers") {
        match n["type"].as_str() {
            Some("Prepend") if n["prepend"] == "\u{2581}" => prepend = true,
            Some("Replace") if n["pattern"]["String"] == " " && n["content"] == "\u{2581}" => {
                replace = true
            }
            _ => {
                return Err(format!(
                    "its normalizer {} has no equivalent in a GGUF SentencePiece vocabulary",
                    compact(n)
                ))
            }
        }
    }
    let mut metaspace = None;
    for p in parts(&json["pre_tokenizer"], "pretokenizers") {
        if p["type"] != "Metaspace" || p["replacement"] != "\u{2581}" {
            return Err(format!(
                "its pre-tokenizer {} has no equivalent in a GGUF SentencePiece vocabulary",
                compact(p)
            ));
        }
        if p["split"].as_bool().unwrap_or(true) {
            return Err("its Metaspace pre-tokenizer splits the text at every space (split), which GGUF's SentencePiece merging does not".into());
        }
        let scheme = match p["prepend_scheme"].as_str() {
            Some(s) => s.to_string(),
            None if p["add_prefix_space"].as_bool().unwrap_or(true) => "always".into(),
            None => "never".into(),
        };
        metaspace = Some(scheme);
    }
    let metaspace_prefix = match metaspace.as_deref() {
        None | Some("never") => false,
        Some("always") => true,
        Some("first") => return Err("its Metaspace pre-tokenizer puts ▁ only before the start of a text (prepend_scheme \"first\"); GGUF's add_space_prefix also puts it after each special token, as llama.cpp does".into()),
        Some(other) => return Err(format!("its Metaspace pre-tokenizer has prepend_scheme {other:?}")),
    };
    if !replace && metaspace.is_none() {
        return Err("its byte_fallback BPE spells spaces as they are; a GGUF SentencePiece vocabulary spells them ▁".into());
    }
    if prepend && metaspace_prefix {
        return Err(
            "it puts ▁ before the text twice (a Prepend normalizer and a Metaspace pre-tokenizer)"
                .into(),
        );
    }
    Ok(prepend || metaspace_prefix)
}

/// Every token's text by id, `n_vocab` of them (`config.json`'s size;
/// `None` where no token has that id).
fn tokens_by_id(
    inner: &tokenizers::Tokenizer,
    n_vocab: usize,
) -> std::result::Result<Vec<Option<String>>, String> {
    let mut by_id = vec![None; n_vocab];
    for (t, id) in inner.get_vocab(true) {
        let slot = by_id.get_mut(id as usize).ok_or_else(|| {
            format!("has token {t:?} with id {id}, outside config.json's vocab_size of {n_vocab}")
        })?;
        *slot = Some(t);
    }
    Ok(by_id)
}

/// `model.merges` as pairs: `"a b"` strings, or `[a, b]` lists (a space in
/// one spelled U+0120 + 256 as the converter does, GGUF's merges being
/// space-separated).
fn merges(json: &Json) -> std::result::Result<Vec<(String, String)>, String> {
    let Some(list) = json["model"]["merges"].as_array() else {
        return Ok(Vec::new());
    };
    let bad = |m: &Json| format!("holds the merge {}, not two tokens", compact(m));
    list.iter()
        .map(|m| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(m)),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => {
                    let spell = |s: &str| s.replace(' ', "\u{120}");
                    Ok((spell(a), spell(b)))
                }
                _ => Err(bad(m)),
            },
            _ => Err(bad(m)),
        })
        .collect()
}

/// The converter's `does_token_look_special`: added tokens that some
/// models forget to mark special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Token `i` of a byte-level BPE vocabulary and its type, as
/// `get_vocab_base` lists it.
fn bpe_token(
    i: usize,
    t: Option<String>,
    added: &HashMap<u32, tokenizers::AddedToken>,
) -> (String, i64) {
    let Some(t) = t else {
        return (format!("[PAD{i}]"), TOKEN_UNUSED);
    };
    match added.get(&(i as u32)) {
        Some(a) if a.special || looks_special(&t) => (t, TOKEN_CONTROL),
        Some(_) => (t.replace('\u{2581}', " "), TOKEN_USER_DEFINED),
        None => (t, TOKEN_NORMAL),
    }
}

/// Token `i` of a SentencePiece-style vocabulary, its score and type:
/// `<0xXX>` is a byte; a special added token, or one `tokenizer_config.json`
/// names (`special`), is control; another added token is user-defined
/// (its `▁` spelled as spaces); a token a merge makes scores minus that
/// merge's rank.
fn spm_token(
    i: usize,
    t: Option<String>,
    added: &HashMap<u32, tokenizers::AddedToken>,
    special: &[u32],
    made_by: &HashMap<String, usize>,
) -> (String, f32, i64) {
    let Some(t) = t else {
        return (format!("[PAD{i}]"), -1000.0, TOKEN_UNUSED);
    };
    let byte = t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit());
    let id = i as u32;
    match added.get(&id) {
        Some(a) if a.special || looks_special(&t) => (t, -1000.0, TOKEN_CONTROL),
        Some(_) => (t.replace('\u{2581}', " "), -1000.0, TOKEN_USER_DEFINED),
        None if byte => (t, 0.0, TOKEN_BYTE),
        None if special.contains(&id) => (t, 0.0, TOKEN_CONTROL),
        None => {
            let score = made_by
                .get(&t)
                .map_or(UNMERGED_SCORE, |&rank| -(rank as f32));
            (t, score, TOKEN_NORMAL)
        }
    }
}

/// Each token a merge makes, and the rank of the first merge that makes it.
fn merge_ranks(merges: &[(String, String)]) -> HashMap<String, usize> {
    let mut made_by = HashMap::with_capacity(merges.len());
    for (rank, (a, b)) in merges.iter().enumerate() {
        made_by.entry(format!("{a}{b}")).or_insert(rank);
    }
    made_by
}

/// The text `tokenizer_config.json` gives special token `typ` (`bos`,
/// `unk`, …): a string, or an object's `content`.
fn config_token<'a>(config: &'a Json, typ: &str) -> Option<&'a str> {
    let entry = &config[format!("{typ}_token")];
    entry.as_str().or_else(|| entry["content"].as_str())
}

/// The id of special token `typ` as `gguf.SpecialVocab` finds it: the
/// added token whose text `tokenizer_config.json` gives, else
/// `config.json`'s `{typ}_token_id` (or its `text_config`'s).
fn special_id(json: &Json, hf: &super::HfModel, typ: &str) -> Option<u32> {
    let by_text = config_token(&hf.tokenizer_config, typ).and_then(|text| {
        json["added_tokens"]
            .as_array()?
            .iter()
            .find(|a| a["content"] == text)?["id"]
            .as_u64()
    });
    let key = format!("{typ}_token_id");
    by_text
        .or_else(|| hf.config[&key].as_u64())
        .or_else(|| hf.config["text_config"][&key].as_u64())
        .and_then(|v| u32::try_from(v).ok())
}

/// The ids of the special tokens `tokenizer_config.json` names (BOS, EOS,
/// unknown, padding), which `_set_vocab_llama_hf` types as control.
fn named_special_ids(json: &Json, hf: &super::HfModel) -> Vec<u32> {
    ["bos", "eos", "unk", "pad"]
        .iter()
        .filter_map(|typ| special_id(json, hf, typ))
        .collect()
}

/// `tokenizer.ggml.pre` for a byte-level BPE: the name of the
/// pre-tokenizer's structure where parallm knows it, else llama.cpp's name
/// for the hash of the ids `tokenizer.json` gives its check text (with the
/// special tokens its post-processor adds, as `tokenizer.encode` does); and
/// the merges must be taken as llama.cpp takes them under that name.
///
/// Structure comes first because the hash can name a pre-tokenizer that
/// splits differently: a vocabulary that merges no digits gives GPT-2's
/// byte-level split the same ids of the check text as SmolLM's digits-first
/// one, yet `"a   3"` splits apart under the two.
fn pre_name(
    json: &Json,
    inner: &tokenizers::Tokenizer,
) -> std::result::Result<&'static str, String> {
    let ids = inner
        .encode(CHKTXT, true)
        .map_err(|e| format!("cannot encode: {e}"))?;
    let hash = chk_hash(ids.get_ids());
    let by_hash = PRE_HASHES
        .iter()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| *name);
    let name = match pre_by_structure(json).or(by_hash) {
        Some(name) => name,
        None => {
            return Err(format!(
                "its pre-tokenizer {} is none that a GGUF name parallm reads stands for (gpt-2: ByteLevel; smollm: Digits then ByteLevel; llama-bpe, qwen2, tekken, gpt-4o: their Split regex then ByteLevel), and its ids of llama.cpp's check text hash to {hash}, which llama.cpp's converter knows for none of them",
                compact(&json["pre_tokenizer"])
            ))
        }
    };
    let whole = json["model"]["ignore_merges"].as_bool().unwrap_or(false);
    if whole != WHOLE_WORD_PRES.contains(&name) {
        return Err(format!(
            "its BPE model has ignore_merges {whole}, but llama.cpp's pre-tokenizer {name} (which it matches) {} a word that is a token whole",
            if whole { "does not take" } else { "takes" }
        ));
    }
    Ok(name)
}

/// The SHA-256 (hex) of `ids` written as Python writes a list (`[1, 2]`),
/// as `get_vocab_base_pre` hashes them.
pub(crate) fn chk_hash(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let digest = Sha256::digest(format!("[{}]", list.join(", ")).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The GGUF pre-tokenizer name whose structure `tokenizer.json`'s
/// pre-tokenizer has, if any.
fn pre_by_structure(json: &Json) -> Option<&'static str> {
    let pre = parts(&json["pre_tokenizer"], "pretokenizers");
    let byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    match pre.as_slice() {
        [b] if byte_level(b, true) => Some("gpt-2"),
        [d, b]
            if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b]
            if s["type"] == "Split"
                && s["behavior"] == "Isolated"
                && s["invert"] != true
                && byte_level(b, false) =>
        {
            match s["pattern"]["Regex"].as_str()? {
                LLAMA3_PATTERN => Some("llama-bpe"),
                QWEN2_PATTERN => Some("qwen2"),
                TEKKEN_PATTERN => Some("tekken"),
                GPT4O_PATTERN => Some("gpt-4o"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The chat template keys: `tokenizer_config.json`'s list of named
/// templates as the converter writes one (the default as
/// `tokenizer.chat_template`, the others as `tokenizer.chat_template.NAME`
/// and their names as `tokenizer.chat_templates`), else the directory
/// tokenizer's one template.
fn chat_templates(hf: &super::HfModel, own: &Tokenizer) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let Some(list) = hf.tokenizer_config["chat_template"].as_array() else {
        if let Some(t) = own.chat_template() {
            out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
        }
        return out;
    };
    let mut names = Vec::new();
    let mut default = None;
    for choice in list {
        let (Some(name), Some(template)) = (choice["name"].as_str(), choice["template"].as_str())
        else {
            continue;
        };
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if name == "default" {
            default = Some(template);
        } else if !name.is_empty() {
            out.push((
                format!("tokenizer.chat_template.{name}"),
                Value::String(template.into()),
            ));
            names.push(Value::String(name));
        }
    }
    if !names.is_empty() {
        out.push(("tokenizer.chat_templates".into(), Value::Array(names)));
    }
    if let Some(t) = default {
        out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    out
}

/// The texts the GGUF tokenizer must tokenize as the directory's does:
/// llama.cpp's check text, a few of other kinds, and two special tokens of
/// the directory's between words.
fn check_texts(own: &Tokenizer) -> Vec<String> {
    let mut texts: Vec<String> = [
        CHKTXT,
        "Hello world",
        "Héllo wörld, ça va? Ñandú, naïve café, Zürich — São Paulo",
        "emoji \u{1f980}\u{1f44d}\u{1f3fd} and \u{4f60}\u{597d} \u{1f1eb}\u{1f1f7}",
        "0 7 42 123 4567 89012 3.14159 1e-5 2024-06-01",
        "  two  spaces,\ttab\t\tand\n\nnewlines\n   \n end  ",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let special: Vec<String> = [own.bos(), Some(own.eos())]
        .into_iter()
        .flatten()
        .filter_map(|id| own.token_text(id))
        .filter(|t| !t.is_empty())
        .collect();
    if let [first, .., last] = special.as_slice() {
        texts.push(format!("{first}Hi there{last}\n{first} again {last} x"));
    }
    texts
}

/// Checks that the tokenizer of `meta` tokenizes and decodes the check
/// texts as `own` (the directory's) does.
fn check(meta: &[(String, Value)], own: &Tokenizer, path: &Path) -> Result<()> {
    let err = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
    let entries: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut bytes = Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut bytes, &entries, &[])
        .map_err(|e| err(format!("cannot write its GGUF vocabulary: {e}")))?;
    let file = GgufFile::from_bytes(path.with_extension("gguf"), bytes.into_inner())?;
    let gguf = Tokenizer::from_gguf(&file)?;
    for text in check_texts(own) {
        let (want, got) = (own.encode(&text)?, gguf.encode(&text)?);
        if want != got {
            let at = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
            let from = at.saturating_sub(2);
            let show = |ids: &[u32]| {
                let end = (at + 4).min(ids.len());
                format!("{:?}", &ids[from.min(end)..end])
            };
            return Err(err(format!(
                "its GGUF vocabulary would tokenize {text:?} differently: from token {from}, {} where tokenizer.json gives {}",
                show(&got),
                show(&want)
            )));
        }
        let (want, got) = (own.decode(&want), gguf.decode(&want));
        if want != got {
            return Err(err(format!(
                "its GGUF vocabulary would decode {text:?} as {got:?}, tokenizer.json as {want:?}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_text_is_the_converters() {
        // The SHA-256 of the converter's chktxt, as Python encodes it.
        let digest = Sha256::digest(CHKTXT.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
        assert_eq!(CHKTXT.chars().count(), 350);
        // Python's str() of a list.
        assert_eq!(chk_hash(&[]), format!("{:x}", Sha256::digest(b"[]")));
        assert_eq!(
            chk_hash(&[1, 22]),
            format!("{:x}", Sha256::digest(b"[1, 22]"))
        );
    }

    #[test]
    fn pre_tokenizers_are_named_by_structure() {
        let pre = |p: Json| serde_json::json!({ "pre_tokenizer": p });
        let byte_level = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": regex});
        let split = |pattern: &str| {
            serde_json::json!({"type": "Split", "pattern": {"Regex": pattern},
                               "behavior": "Isolated", "invert": false})
        };
        let seq =
            |items: Vec<Json>| serde_json::json!({"type": "Sequence", "pretokenizers": items});
        assert_eq!(pre_by_structure(&pre(byte_level(true))), Some("gpt-2"));
        assert_eq!(
            pre_by_structure(&pre(seq(vec![byte_level(true)]))),
            Some("gpt-2")
        );
        assert_eq!(
            pre_by_structure(&pre(seq(vec![
                serde_json::json!({"type": "Digits", "individual_digits": true}),
                byte_level(true)
            ]))),
            Some("smollm")
        );
        for (pattern, name) in [
            (LLAMA3_PATTERN, "llama-bpe"),
            (QWEN2_PATTERN, "qwen2"),
            (TEKKEN_PATTERN, "tekken"),
            (GPT4O_PATTERN, "gpt-4o"),
        ] {
            assert_eq!(
                pre_by_structure(&pre(seq(vec![split(pattern), byte_level(false)]))),
                Some(name)
            );
        }
        assert_eq!(
            pre_by_structure(&pre(seq(vec![split(r"\s+"), byte_level(false)]))),
            None
        );
        assert_eq!(
            pre_by_structure(&pre(serde_json::json!({"type": "Whitespace"}))),
            None
        );
    }

    #[test]
    fn sentencepiece_spaces_are_read_from_the_normalizer_or_metaspace() {
        let tj = |normalizer: Json, pre: Json| serde_json::json!({"normalizer": normalizer, "pre_tokenizer": pre});
        let replace = serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let prepend = serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"});
        let legacy = serde_json::json!({"type": "Sequence", "normalizers": [prepend, replace]});
        let metaspace = |scheme: &str| {
            serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}",
                               "prepend_scheme": scheme, "split": false})
        };
        // Llama 2 (legacy), Gemma, Llama 2 re-saved with a Metaspace.
        assert_eq!(spm_space_prefix(&tj(legacy, Json::Null)), Ok(true));
        assert_eq!(
            spm_space_prefix(&tj(replace.clone(), Json::Null)),
            Ok(false)
        );
        assert_eq!(
            spm_space_prefix(&tj(Json::Null, metaspace("always"))),
            Ok(true)
        );
        assert_eq!(
            spm_space_prefix(&tj(Json::Null, metaspace("never"))),
            Ok(false)
        );
        assert!(spm_space_prefix(&tj(Json::Null, metaspace("first")))
            .is_err_and(|e| e.contains("first")));
        assert!(spm_space_prefix(&tj(Json::Null, Json::Null)).is_err_and(|e| e.contains("spaces")));
        assert!(
            spm_space_prefix(&tj(serde_json::json!({"type": "Lowercase"}), Json::Null))
                .is_err_and(|e| e.contains("Lowercase"))
        );
    }

    #[test]
    fn tokens_that_look_special_are_control() {
        for t in [
            "<|im_start|>",
            "<pad>",
            "<unused12>",
            "<\u{ff5c}begin\u{ff5c}>",
        ] {
            assert!(looks_special(t), "{t}");
        }
        for t in ["<think>", "hello", "<|im_start"] {
            assert!(!looks_special(t), "{t}");
        }
    }
}
