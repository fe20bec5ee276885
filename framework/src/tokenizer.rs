//! The tokenizer, built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two vocabulary models, as `tokenizer.ggml.model` names them:
//! * `gpt2` — the `tokenizers` crate: a byte-level BPE over the file's tokens
//!   and merges, preceded by the pre-tokenizer that `tokenizer.ggml.pre`
//!   names (as llama.cpp interprets those names), with the file's control and
//!   user-defined tokens added so that `<|im_start|>` in the text is one token.
//! * `llama` — SentencePiece (`crate::spm`): scores, `▁` for spaces, byte
//!   fallback, `add_space_prefix` (before the text and after each special
//!   token, as llama.cpp does), control, user-defined and unknown tokens
//!   matched whole first (longest first).
//!
//! `add_bos_token` / `add_eos_token` are read for both (defaults: llama.cpp's,
//! BOS for SentencePiece only).
//!
//! The vocabulary's metadata is checked before it is used: one
//! `tokenizer.ggml.token_type` per token, each one of llama.cpp's types
//! (a short array would leave the special tokens at its end to be split as
//! text), one score per token, and every special token id (BOS, EOS, EOT,
//! unknown, padding) inside the vocabulary.
//!
//! A Hugging Face directory's `tokenizer.json` is read by the `tokenizers`
//! crate as it is, normalizer, pre-tokenizer and added tokens included; its
//! post-processor is asked once whether it adds BOS or EOS, and
//! `tokenizer_config.json` (and `config.json`, `generation_config.json`)
//! give the special tokens, the stop tokens and the chat template; an id
//! those files give outside `tokenizer.json`'s vocabulary is refused.
//!
//! Decoding is ours: each token id maps to its raw bytes once, at load, and
//! [`StreamDecoder`] turns a stream of ids into text that never contains a
//! broken UTF-8 sequence: bytes of an incomplete character wait for the next token.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hf::HfModel;
use crate::spm::{self, Spm};

/// Llama 3's pre-tokenization pattern (`tokenizer.ggml.pre = llama-bpe`).
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenization pattern (`tokenizer.ggml.pre = qwen2`): Llama 3's
/// with every digit split alone.
pub(crate) const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tekken's pre-tokenization pattern (`tokenizer.ggml.pre = tekken`, Mistral
/// Nemo and later), as its `tokenizer.json` writes it: letters split at
/// case changes, every digit alone, `/` kept with the newlines after
/// punctuation.
pub(crate) const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's pre-tokenization pattern (`tokenizer.ggml.pre = gpt-4o`, Phi-4
/// and Phi-4-mini; `llama4`), as its `tokenizer.json` writes it: Tekken's
/// case-change split with English contractions attached and digits in runs
/// of up to three.
pub(crate) const GPT4O_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizers after which llama.cpp takes a word that is itself a token
/// whole, without merging (`ignore_merges`), and adds BOS unless the file
/// says otherwise (Llama 3's pattern under its several names, and Tekken).
pub(crate) const WHOLE_WORD_PRES: [&str; 6] = [
    "llama-bpe",
    "llama3",
    "llama-v3",
    "falcon3",
    "pixtral",
    "tekken",
];

/// GGUF token types (llama.cpp's `llama_token_type`; its 0, `UNDEFINED`,
/// is read as a normal token, as llama.cpp reads it).
pub(crate) const TOKEN_NORMAL: i64 = 1;
pub(crate) const TOKEN_UNKNOWN: i64 = 2;
pub(crate) const TOKEN_CONTROL: i64 = 3;
pub(crate) const TOKEN_USER_DEFINED: i64 = 4;
pub(crate) const TOKEN_UNUSED: i64 = 5;
pub(crate) const TOKEN_BYTE: i64 = 6;

/// How a text becomes tokens.
enum Model {
    /// Byte-level BPE through the `tokenizers` crate.
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece.
    Spm(Box<SpmModel>),
}

/// A SentencePiece vocabulary and how texts are prepared for it.
struct SpmModel {
    spm: Spm,
    /// The tokens matched whole before the rest (control, user-defined,
    /// unknown), longest text first.
    special: Vec<(String, u32)>,
    /// The special tokens that eat the whitespace after them
    /// ([`rstrip_tokens`]), sorted.
    rstrip: Vec<u32>,
    add_space_prefix: bool,
}

/// A piece of a text: plain text, or a special token matched whole.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// A tokenizer for one model.
pub struct Tokenizer {
    model: Model,
    /// Every token's text as the vocabulary spells it.
    texts: Vec<String>,
    token_bytes: Vec<Vec<u8>>,
    /// The most input bytes one token stands for (its text's UTF-8 length
    /// bounds it: a byte-level symbol is at least one byte).
    max_token_len: usize,
    bos: Option<u32>,
    eos: u32,
    stop_tokens: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
    /// Whether decoding drops one leading space (the one a SentencePiece
    /// vocabulary's space prefix put there).
    strip_space: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// GPT-2's byte ↔ printable-character map: bytes that are printable Latin-1
/// stand for themselves, the others are shifted to U+0100 and up.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF file (or of a Hugging Face directory
    /// opened as one).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        if let Some(hf) = file.hf() {
            return Self::from_hf(hf);
        }
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let kind = file.get_str("tokenizer.ggml.model")?;
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let types = token_types(file, tokens.len())?;
        let sentencepiece = match kind {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(Error::Unsupported {
                    path: file.path().to_path_buf(),
                    what: "tokenizer model",
                    found: other.to_string(),
                    supported: "gpt2 (byte-level BPE), llama (SentencePiece)",
                })
            }
        };
        let model = if sentencepiece {
            Self::spm_model(file, &tokens, &types)?
        } else {
            Model::Bpe(Box::new(Self::bpe_model(file, &tokens, &types)?))
        };
        let token_bytes = if sentencepiece {
            spm_token_bytes(&tokens, &types)
        } else {
            bpe_token_bytes(&tokens, &types)
        };

        // A special token id outside the vocabulary is an error, not ignored.
        let id = |key: &str| -> Result<Option<u32>> {
            match file.opt_usize(key)? {
                None => Ok(None),
                Some(v) if v < tokens.len() => Ok(Some(v as u32)),
                Some(v) => Err(err(format!(
                    "{key} is {v}, outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            }
        };
        let eos = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| err("no valid tokenizer.ggml.eos_token_id".into()))?;
        let mut stop_tokens = vec![eos];
        if let Some(eot) = id("tokenizer.ggml.eot_token_id")? {
            if eot != eos {
                stop_tokens.push(eot);
            }
        }
        let bos = id("tokenizer.ggml.bos_token_id")?;
        // Not used here: one outside the vocabulary is ignored with a
        // warning, as llama.cpp does (real files carry such ids).
        for key in [
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            if let Err(e) = id(key) {
                tracing::warn!("{e}; it is not used, so it is ignored");
            }
        }
        let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let add_bos = file
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(sentencepiece || WHOLE_WORD_PRES.contains(&pre));
        if add_bos && bos.is_none() {
            return Err(err(
                "add_bos_token is set but there is no bos_token_id".into()
            ));
        }
        let max_token_len = tokens.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        let strip_space = matches!(&model, Model::Spm(m) if m.add_space_prefix);
        Ok(Self {
            model,
            texts: tokens.iter().map(|t| t.to_string()).collect(),
            token_bytes,
            max_token_len,
            bos,
            eos,
            stop_tokens,
            add_bos,
            add_eos: file
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_string),
            strip_space,
        })
    }

    /// The tokenizer of a Hugging Face directory: `tokenizer.json` and the
    /// special tokens of its configuration files.
    fn from_hf(hf: &HfModel) -> Result<Self> {
        let path = hf.dir().join("tokenizer.json");
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
        if !path.exists() {
            return Err(err("is missing".into()));
        }
        crate::gguf::regular_file(&path)?;
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| err(format!("does not parse: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| err(format!("cannot turn truncation off: {e}")))?;
        let vocab = inner.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if n == 0 {
            return Err(err("has an empty vocabulary".into()));
        }
        let mut tokens = vec![String::new(); n];
        for (t, &id) in &vocab {
            tokens[id as usize] = t.clone();
        }
        // SentencePiece-style vocabularies (byte fallback, `▁` for spaces)
        // spell tokens as llama.cpp's `llama` model does; the rest are
        // byte-level.
        let sentencepiece = match inner.get_model() {
            tokenizers::ModelWrapper::BPE(bpe) => bpe.byte_fallback,
            tokenizers::ModelWrapper::Unigram(_) => true,
            _ => false,
        };
        let mut types = vec![TOKEN_NORMAL; n];
        if sentencepiece {
            for (i, t) in tokens.iter().enumerate() {
                if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                    types[i] = TOKEN_BYTE;
                }
            }
        }
        for (id, added) in inner.get_added_tokens_decoder() {
            if let Some(t) = types.get_mut(id as usize) {
                *t = if added.special {
                    TOKEN_CONTROL
                } else {
                    TOKEN_USER_DEFINED
                };
            }
        }
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let token_bytes = if sentencepiece {
            spm_token_bytes(&refs, &types)
        } else {
            bpe_token_bytes(&refs, &types)
        };

        // Special tokens: by text in tokenizer_config.json, else by id in
        // config.json; stop tokens also from generation_config.json.
        let by_text = |key: &str| -> Result<Option<u32>> {
            let text = match hf.tokenizer_config.get(key) {
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(serde_json::Value::Object(o)) => {
                    match o.get("content").and_then(|c| c.as_str()) {
                        Some(s) => s,
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
            inner.token_to_id(text).map(Some).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: {key} {text:?} is not a token of tokenizer.json",
                    hf.dir().join("tokenizer_config.json").display()
                ))
            })
        };
        // A token id (or a list of them) of a configuration file: each must
        // be a token of tokenizer.json, as a GGUF file's must.
        let ids_in = |json: &serde_json::Value, file: &str, key: &str| -> Result<Vec<u32>> {
            let bad = |what: String| {
                Error::Tokenizer(format!("{}: {key} {what}", hf.dir().join(file).display()))
            };
            let listed: Vec<&serde_json::Value> = match json.get(key) {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(serde_json::Value::Array(a)) => a.iter().collect(),
                Some(v) => vec![v],
            };
            listed
                .into_iter()
                .map(|v| match v.as_u64() {
                    Some(id) if (id as usize) < n => Ok(id as u32),
                    Some(id) => Err(bad(format!(
                        "is {id}, outside the vocabulary of {n} tokens (tokenizer.json)"
                    ))),
                    None => Err(bad(format!("holds {v}, not a token id"))),
                })
                .collect()
        };
        let config_eos = ids_in(&hf.config, "config.json", "eos_token_id")?;
        let eos = match by_text("eos_token")? {
            Some(id) => id,
            None => *config_eos.first().ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no EOS token (eos_token in tokenizer_config.json, or eos_token_id in config.json)",
                    hf.dir().display()
                ))
            })?,
        };
        let mut stop_tokens = vec![eos];
        for id in config_eos.into_iter().chain(ids_in(
            &hf.generation_config,
            "generation_config.json",
            "eos_token_id",
        )?) {
            if !stop_tokens.contains(&id) {
                stop_tokens.push(id);
            }
        }
        // config.json's id only where tokenizer_config.json names no BOS
        // (a stale one there is never used, so it is not checked).
        let bos = match by_text("bos_token")? {
            Some(id) => Some(id),
            None => ids_in(&hf.config, "config.json", "bos_token_id")?
                .first()
                .copied(),
        };
        // What the post-processor adds is asked, not guessed: encode uses
        // the plain encoding and adds the same itself.
        let probe = |specials: bool| -> Result<Vec<u32>> {
            inner
                .encode("a", specials)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| err(format!("cannot encode: {e}")))
        };
        let (with, plain) = (probe(true)?, probe(false)?);
        let add_bos =
            bos.is_some() && with.first() == bos.as_ref() && plain.first() != bos.as_ref();
        let add_eos = with.len() > plain.len() && with.last() == Some(&eos);
        let chat_template = match hf.tokenizer_config.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => {
                let jinja = hf.dir().join("chat_template.jinja");
                match jinja.exists() {
                    true => {
                        crate::gguf::regular_file(&jinja)?;
                        Some(std::fs::read_to_string(&jinja).map_err(|e| {
                            Error::Tokenizer(format!("{}: cannot read: {e}", jinja.display()))
                        })?)
                    }
                    false => None,
                }
            }
        };
        let max_token_len = tokens.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        let strip_space = decoder_strips_space(&inner);
        Ok(Self {
            model: Model::Bpe(Box::new(inner)),
            texts: tokens,
            token_bytes,
            max_token_len,
            bos,
            eos,
            stop_tokens,
            add_bos,
            add_eos,
            chat_template,
            strip_space,
        })
    }

    /// The SentencePiece model of `file`'s vocabulary.
    fn spm_model(file: &GgufFile, tokens: &[&str], types: &[i64]) -> Result<Model> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let scores = file
            .opt_f32_array("tokenizer.ggml.scores")?
            .ok_or_else(|| err("a SentencePiece vocabulary needs tokenizer.ggml.scores".into()))?;
        let spm = Spm::new(tokens, &scores).map_err(|e| err(e.to_string()))?;
        let mut special: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !t.is_empty()
                    && matches!(
                        types.get(*i),
                        Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED) | Some(&TOKEN_UNKNOWN)
                    )
            })
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut rstrip = rstrip_tokens(file, tokens, &special)?;
        rstrip.sort_unstable();
        Ok(Model::Spm(Box::new(SpmModel {
            spm,
            special,
            rstrip,
            add_space_prefix: file
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true),
        })))
    }

    /// The byte-level BPE of `file`'s vocabulary and merges.
    fn bpe_model(file: &GgufFile, tokens: &[&str], types: &[i64]) -> Result<tokenizers::Tokenizer> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let pre = file.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge '{m}' is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(WHOLE_WORD_PRES.contains(&pre))
            .build()
            .map_err(|e| err(format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let isolate = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| err(format!("bad pre-tokenizer pattern: {e}")))
        };
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, use_regex));
        let pre_tokenizer = match pre {
            "default" | "gpt2" | "gpt-2" | "phi-2" => byte_level(true),
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(r"\p{N}")?,
                byte_level(true),
            ])),
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    isolate(LLAMA3_PATTERN)?,
                    byte_level(false),
                ]))
            }
            "qwen2" | "deepseek-r1-qwen" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(QWEN2_PATTERN)?,
                byte_level(false),
            ])),
            "tekken" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(TEKKEN_PATTERN)?,
                byte_level(false),
            ])),
            "gpt-4o" | "llama4" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(GPT4O_PATTERN)?,
                byte_level(false),
            ])),
            other => {
                return Err(Error::Unsupported {
                    path: file.path().to_path_buf(),
                    what: "pre-tokenizer (tokenizer.ggml.pre)",
                    found: other.to_string(),
                    supported: "default, gpt2 (gpt-2, phi-2), smollm, llama-bpe (llama3, llama-v3, falcon3, pixtral), qwen2 (deepseek-r1-qwen), tekken, gpt-4o (llama4)",
                })
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));

        // Control and user-defined tokens are matched as a whole in the input.
        let listed: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(
                    types.get(*i),
                    Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED)
                )
            })
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let rstrip = rstrip_tokens(file, tokens, &listed)?;
        let special: Vec<AddedToken> = listed
            .into_iter()
            .map(|(t, id)| AddedToken::from(t, true).rstrip(rstrip.contains(&id)))
            .collect();
        inner.add_special_tokens(&special);
        Ok(inner)
    }

    /// Token ids of `text`; BOS is prepended and EOS appended when the
    /// model asks for them. Special tokens in the text are matched whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with BOS and EOS added as the model asks only
    /// when `add_special` is set (Hugging Face's `add_special_tokens`).
    /// Special tokens in the text are matched whole either way.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos && add_special {
            ids.extend(self.bos);
        }
        match &self.model {
            Model::Bpe(inner) => {
                let enc = inner
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Model::Spm(m) => {
                let SpmModel {
                    spm,
                    special,
                    rstrip,
                    add_space_prefix,
                } = &**m;
                let mut after_special = true;
                let mut strip = false;
                let mut piece = String::new();
                for fragment in split_special(text, special) {
                    match fragment {
                        Fragment::Token(id) => {
                            ids.push(id);
                            after_special = true;
                            strip = rstrip.binary_search(&id).is_ok();
                        }
                        Fragment::Text(t) => {
                            // C's isspace, as llama.cpp strips.
                            let t = if std::mem::take(&mut strip) {
                                t.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
                            } else {
                                t
                            };
                            if t.is_empty() {
                                continue;
                            }
                            piece.clear();
                            if *add_space_prefix && after_special {
                                piece.push(spm::SPACE);
                            }
                            piece.extend(t.chars().map(|c| if c == ' ' { spm::SPACE } else { c }));
                            spm.encode(&piece, &mut ids)?;
                            after_special = false;
                        }
                    }
                }
            }
        }
        if self.add_eos && add_special {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// Token ids of `text` when they are at most `limit`, without tokenizing
    /// all of a text that cannot fit: a text longer than `limit` tokens of
    /// the longest token is refused by its length alone, and one whose first
    /// `8 × limit` bytes already give more than `limit` tokens (plus a slack
    /// for the cut) is refused after tokenizing only those. The error says
    /// how many tokens the text has at least.
    pub fn encode_within(&self, text: &str, limit: usize) -> Result<Vec<u32>> {
        let too_long = |at_least: usize| Error::PromptTooLong {
            bytes: text.len(),
            at_least,
            context: limit,
        };
        let at_least = text.len().div_ceil(self.max_token_len);
        if at_least > limit {
            return Err(too_long(at_least));
        }
        let prefix_len = limit.saturating_mul(8);
        if text.len() > prefix_len {
            let mut cut = prefix_len;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            const SLACK: usize = 64;
            let n = self.encode(&text[..cut])?.len();
            if n > limit + SLACK {
                return Err(too_long(n - SLACK));
            }
        }
        self.encode(text)
    }

    /// `ids` of a rendered chat, encoded with the special tokens the
    /// tokenizer adds when `added`, as a generation prompt: one BOS, where
    /// a template that writes BOS itself (`{{ bos_token }}…`, as Llama 3's,
    /// Mistral's and Gemma's begin) got a second one from a tokenizer that
    /// adds it ([`Tokenizer::adds_bos`]; llama.cpp keeps one too), and no
    /// EOS appended by a tokenizer that adds it: the prompt ends with the
    /// assistant's turn opener, where the model writes next (transformers
    /// and vLLM add neither to a chat).
    pub fn chat_specials(&self, mut ids: Vec<u32>, added: bool) -> Vec<u32> {
        if !added {
            return ids;
        }
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
            }
        }
        if self.add_eos && ids.last() == Some(&self.eos) {
            ids.pop();
        }
        ids
    }

    /// The raw bytes a token stands for (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Text of a whole token sequence (invalid UTF-8 replaced). A
    /// SentencePiece vocabulary that adds a space prefix loses it again here,
    /// as llama.cpp's detokenizer does (and a `tokenizer.json` whose decoder
    /// strips it: `Strip`, or `Metaspace` with a prefix).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&t| self.token_bytes(t).iter().copied())
            .collect();
        if self.strip_space && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether [`Tokenizer::encode`] prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether [`Tokenizer::encode`] appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Tokens that end generation (EOS, and end-of-turn where distinct).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The model's chat template source, if it ships one (or the one
    /// [`Tokenizer::set_chat_template`] put in its place).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the model's chat template with `source` (a deployment's
    /// own, for a file that ships none or a wrong one).
    pub fn set_chat_template(&mut self, source: String) {
        self.chat_template = Some(source);
    }

    /// A token's text as the vocabulary spells it (for special tokens).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.texts.get(id as usize).cloned()
    }

    /// How `other`'s vocabulary differs from this one's (the first
    /// difference: the size, a token's bytes, BOS or EOS), or `None` when
    /// every id means the same token in both (a draft model must share the
    /// target's vocabulary).
    pub fn vocabulary_difference(&self, other: &Tokenizer) -> Option<String> {
        if self.token_bytes.len() != other.token_bytes.len() {
            return Some(format!(
                "{} tokens against {}",
                other.token_bytes.len(),
                self.token_bytes.len()
            ));
        }
        if let Some(id) = (0..self.token_bytes.len()).find(|&i| {
            self.token_bytes[i] != other.token_bytes[i] || self.texts.get(i) != other.texts.get(i)
        }) {
            return Some(format!(
                "token {id} is {:?}, not {:?}",
                other.texts.get(id).map_or("", String::as_str),
                self.texts.get(id).map_or("", String::as_str)
            ));
        }
        if (self.bos, self.eos) != (other.bos, other.eos) {
            return Some(format!(
                "BOS/EOS are {:?}/{}, not {:?}/{}",
                other.bos, other.eos, self.bos, self.eos
            ));
        }
        None
    }
}

/// Whether a `tokenizer.json` decoder drops the leading space of a decoded
/// text: a `Strip` of at least one leading space, or a `Metaspace` that
/// prepends one when encoding (alone or within a `Sequence`).
fn decoder_strips_space(inner: &tokenizers::Tokenizer) -> bool {
    let Some(json) = inner
        .get_decoder()
        .and_then(|d| serde_json::to_value(d).ok())
    else {
        return false;
    };
    let parts = match json.get("decoders").and_then(|d| d.as_array()) {
        Some(list) => list.iter().collect(),
        None => vec![&json],
    };
    parts
        .iter()
        .any(|d| match d.get("type").and_then(|t| t.as_str()) {
            Some("Strip") => {
                d.get("content").and_then(|c| c.as_str()) == Some(" ")
                    && d.get("start").and_then(|s| s.as_u64()).unwrap_or(0) > 0
            }
            Some("Metaspace") => match d.get("prepend_scheme").and_then(|p| p.as_str()) {
                Some(scheme) => scheme != "never",
                None => d
                    .get("add_prefix_space")
                    .and_then(|a| a.as_bool())
                    .unwrap_or(true),
            },
            _ => false,
        })
}

/// `text` cut around every occurrence of a special token, trying the tokens
/// in `special`'s order (longest first) over what earlier ones left, as
/// llama.cpp's partition does. Empty texts are left out.
/// The special tokens (of `special`) after which whitespace is dropped
/// from the text: llama.cpp gives every special token of a model whose
/// `general.name` names Phi-3 ("phi-3", "phi3", any case) this, as
/// Phi-3's own tokenizer does, and then also `</s>`, but not `<unk>`, `<s>`
/// or `<|endoftext|>`. Empty for every other model.
fn rstrip_tokens(file: &GgufFile, tokens: &[&str], special: &[(String, u32)]) -> Result<Vec<u32>> {
    if !names_phi3(file.opt_str("general.name")?.unwrap_or_default()) {
        return Ok(Vec::new());
    }
    let find = |t: &str| tokens.iter().position(|x| *x == t).map(|i| i as u32);
    let keep: Vec<u32> = PHI3_UNSTRIPPED.iter().filter_map(|t| find(t)).collect();
    Ok(special
        .iter()
        .map(|(_, id)| *id)
        .chain(find("</s>"))
        .filter(|id| !keep.contains(id))
        .collect())
}

/// Whether a model named `name` gets Phi-3's stripping ([`rstrip_tokens`]).
pub(crate) fn names_phi3(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("phi-3") || name.contains("phi3")
}

/// The special tokens a model named for Phi-3 does not strip after.
pub(crate) const PHI3_UNSTRIPPED: [&str; 3] = ["<unk>", "<s>", "<|endoftext|>"];

/// `tokenizer.ggml.token_type` of `file`, checked: one type per token of
/// its `n_tokens`, each one of llama.cpp's (0 undefined to 6 byte). A short
/// array would leave the special tokens at its end to be split as text.
/// Empty when the file has none (every token is then normal).
fn token_types(file: &GgufFile, n_tokens: usize) -> Result<Vec<i64>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let err = |reason: String| Error::Metadata {
        path: file.path().to_path_buf(),
        key: KEY.into(),
        reason,
    };
    let Some(types) = file.opt_int_array(KEY)? else {
        return Ok(Vec::new());
    };
    if types.len() != n_tokens {
        return Err(err(format!(
            "has {} types for {n_tokens} tokens (tokenizer.ggml.tokens): one per token is needed",
            types.len()
        )));
    }
    if let Some((i, t)) = types
        .iter()
        .enumerate()
        .find(|(_, t)| !(0..=TOKEN_BYTE).contains(*t))
    {
        return Err(err(format!(
            "gives token {i} the type {t}, not one of llama.cpp's token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte; 0 undefined)"
        )));
    }
    Ok(types)
}

fn split_special<'a>(text: &'a str, special: &[(String, u32)]) -> Vec<Fragment<'a>> {
    let mut fragments = vec![Fragment::Text(text)];
    for (t, id) in special {
        if !text.contains(t.as_str()) {
            continue;
        }
        let mut next = Vec::with_capacity(fragments.len());
        for f in fragments {
            match f {
                Fragment::Text(s) if s.contains(t.as_str()) => {
                    let mut rest = s;
                    while let Some(at) = rest.find(t.as_str()) {
                        if at > 0 {
                            next.push(Fragment::Text(&rest[..at]));
                        }
                        next.push(Fragment::Token(*id));
                        rest = &rest[at + t.len()..];
                    }
                    if !rest.is_empty() {
                        next.push(Fragment::Text(rest));
                    }
                }
                other => next.push(other),
            }
        }
        fragments = next;
    }
    fragments.retain(|f| !matches!(f, Fragment::Text("")));
    fragments
}

/// What each token of a byte-level BPE vocabulary stands for: its
/// characters mapped back to bytes; a control token stands for nothing, a
/// user-defined one for its text.
fn bpe_token_bytes(tokens: &[&str], types: &[i64]) -> Vec<Vec<u8>> {
    let char_to_byte: HashMap<char, u8> = byte_to_char_table()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match types.get(i) {
            Some(&TOKEN_CONTROL) => Vec::new(),
            Some(&TOKEN_USER_DEFINED) => t.as_bytes().to_vec(),
            _ => t
                .chars()
                .map(|c| char_to_byte.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| t.as_bytes().to_vec()),
        })
        .collect()
}

/// What each token of a SentencePiece vocabulary stands for, as llama.cpp's
/// `token_to_piece` renders it: `▁` as a space, a `<0xXX>` byte token as its
/// byte, a control token as nothing, the unknown token as `▅`.
fn spm_token_bytes(tokens: &[&str], types: &[i64]) -> Vec<Vec<u8>> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match types.get(i) {
            Some(&TOKEN_CONTROL) => Vec::new(),
            Some(&TOKEN_UNKNOWN) => "\u{2585}".as_bytes().to_vec(),
            Some(&TOKEN_USER_DEFINED) => t.as_bytes().to_vec(),
            Some(&TOKEN_BYTE) => t
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map_or_else(|| t.as_bytes().to_vec(), |b| vec![b]),
            _ => t.replace(spm::SPACE, " ").into_bytes(),
        })
        .collect()
}

/// Incremental detokenizer: feed ids, get text that is always valid UTF-8.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token's bytes; returns every complete character now available.
    /// Invalid sequences become U+FFFD; an incomplete tail waits.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still pending, as text (at the end of a sequence).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_never_splits_characters() {
        let text = "héllo → 世界 🦀";
        let bytes = text.as_bytes();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for b in bytes {
            let piece = d.push(std::slice::from_ref(b));
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&[b'a', 0xff, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char_table();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
