//! The tokenizer, built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Encoding uses the `tokenizers` crate: a byte-level BPE over the file's tokens
//! and merges, preceded by the pre-tokenizer that `tokenizer.ggml.pre` names
//! (as llama.cpp interprets those names), with the file's control and
//! user-defined tokens added so that `<|im_start|>` in the text is one token.
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

/// Llama 3's pre-tokenization pattern (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenization pattern (`tokenizer.ggml.pre = qwen2`): Llama 3's
/// with every digit split alone.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A tokenizer for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    /// The most input bytes one token stands for (its text's UTF-8 length
    /// bounds it: a byte-level symbol is at least one byte).
    max_token_len: usize,
    bos: Option<u32>,
    eos: u32,
    stop_tokens: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
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
    /// Builds the tokenizer of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Unsupported {
                path: file.path().to_path_buf(),
                what: "tokenizer model",
                found: model.to_string(),
                supported: "gpt2 (byte-level BPE)",
            });
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let types = file.opt_int_array("tokenizer.ggml.token_type")?;
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
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(r"\p{N}")?,
                byte_level(true),
            ])),
            "llama-bpe" | "llama3" | "llama-v3" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    isolate(LLAMA3_PATTERN)?,
                    byte_level(false),
                ]))
            }
            "qwen2" | "deepseek-r1-qwen" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                isolate(QWEN2_PATTERN)?,
                byte_level(false),
            ])),
            other => {
                return Err(Error::Unsupported {
                    path: file.path().to_path_buf(),
                    what: "pre-tokenizer (tokenizer.ggml.pre)",
                    found: other.to_string(),
                    supported: "default, gpt2, smollm, llama-bpe, qwen2",
                })
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));

        // Control and user-defined tokens are matched as a whole in the input.
        let types = types.unwrap_or_default();
        let special: Vec<AddedToken> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(
                    types.get(*i),
                    Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED)
                )
            })
            .map(|(_, t)| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);

        let char_to_byte: HashMap<char, u8> = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let token_bytes = tokens
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
            .collect();

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
        let max_token_len = tokens.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        Ok(Self {
            inner,
            token_bytes,
            max_token_len,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos,
            stop_tokens,
            add_bos: file
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_string),
        })
    }

    /// Token ids of `text`; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
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

    /// The raw bytes a token stands for (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Text of a whole token sequence (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&t| self.token_bytes(t).iter().copied())
            .collect();
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

    /// End-of-sequence token.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Tokens that end generation (EOS, and end-of-turn where distinct).
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The model's chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A token's text as the vocabulary spells it (for special tokens).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
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
