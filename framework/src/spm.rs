//! SentencePiece tokenization of GGUF `llama` vocabularies (Llama 2,
//! TinyLlama, Mistral, Phi-3, Gemma), as llama.cpp's `llm_tokenizer_spm`
//! does it.
//!
//! A text is cut into its UTF-8 characters; the adjacent pair whose joined
//! text is a token with the highest score is merged, ties to the leftmost,
//! until no pair joins into a token. Each remaining piece is its token, or,
//! when a single character has none, one `<0xXX>` byte token per byte (byte
//! fallback). Spaces are spelled `▁` in the vocabulary; the caller adds the
//! leading space (`add_space_prefix`) and splits out special tokens first
//! (`crate::tokenizer`).
//!
//! What is true of it: every merge makes a token, so a piece of more than one
//! character is always a token, and only single characters fall back to
//! bytes; the result equals llama.cpp's token for token (`tests/families.rs`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};

/// The space marker of SentencePiece vocabularies (U+2581).
pub(crate) const SPACE: char = '\u{2581}';

/// A SentencePiece vocabulary: every token's text and score.
pub(crate) struct Spm {
    by_text: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The token of each byte: `<0xXX>`, else the byte itself as a token.
    bytes: [Option<u32>; 256],
}

/// A candidate merge of two adjacent pieces.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the joined text, to tell a stale candidate from a live one.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// The heap's top is the highest score, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// One piece of the text being merged: a byte range and its neighbours.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// The vocabulary of `tokens` with their `scores` (one each).
    pub(crate) fn new(tokens: &[&str], scores: &[f32]) -> Result<Self> {
        if scores.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        // llama.cpp's map: a text spelled twice is its last token.
        let by_text: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = by_text.get(&hex).copied().or_else(|| {
                std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| by_text.get(s).copied())
            });
        }
        Ok(Self {
            by_text,
            scores: scores.to_vec(),
            bytes,
        })
    }

    /// Appends the tokens of `text` (spaces already spelled `▁`) to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut pieces: Vec<Piece> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = pieces.len();
            pieces.push(Piece {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (start + c.len_utf8() < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        let joined = |pieces: &[Piece], l: usize, r: usize| -> Option<Bigram> {
            let (a, b) = (pieces[l], pieces[r]);
            let s = &text[a.start..a.start + a.len + b.len];
            self.by_text.get(s).map(|&id| Bigram {
                score: self.scores[id as usize],
                left: l,
                right: r,
                size: s.len(),
            })
        };
        for i in 1..pieces.len() {
            queue.extend(joined(&pieces, i - 1, i));
        }
        while let Some(bg) = queue.pop() {
            let (l, r) = (pieces[bg.left], pieces[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            pieces[bg.left].len += r.len;
            pieces[bg.right].len = 0;
            pieces[bg.left].next = r.next;
            if let Some(n) = r.next {
                pieces[n].prev = Some(bg.left);
            }
            if let Some(p) = pieces[bg.left].prev {
                queue.extend(joined(&pieces, p, bg.left));
            }
            if let Some(n) = pieces[bg.left].next {
                queue.extend(joined(&pieces, bg.left, n));
            }
        }
        let mut at = (!pieces.is_empty()).then_some(0);
        while let Some(i) = at {
            let p = pieces[i];
            let s = &text[p.start..p.start + p.len];
            match self.by_text.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for &b in s.as_bytes() {
                        let id = self.bytes[b as usize].ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "the vocabulary has no token for byte 0x{b:02X} (no <0x{b:02X}>), needed for {s:?}"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            at = p.next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Spm {
        let mut tokens = vec!["<unk>", "<s>", "</s>"];
        let bytes: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(bytes.iter().map(String::as_str));
        tokens.extend(["▁", "a", "b", "c", "ab", "bc", "abc", "▁a", "▁ab"]);
        let mut scores = vec![0.0; tokens.len()];
        let n = tokens.len();
        // "bc" outscores "ab": "abc" merges as a + bc, then a|bc → abc.
        for (t, s) in [
            ("ab", -5.0),
            ("bc", -1.0),
            ("abc", -3.0),
            ("▁a", -2.0),
            ("▁ab", -4.0),
        ] {
            let i = tokens.iter().position(|x| *x == t).unwrap();
            scores[i] = s;
        }
        assert_eq!(scores.len(), n);
        Spm::new(&tokens, &scores).unwrap()
    }

    fn ids(spm: &Spm, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        spm.encode(text, &mut out).unwrap();
        out
    }

    #[test]
    fn the_best_scored_pair_merges_first_and_bytes_fill_in() {
        let spm = vocab();
        let id = |t: &str| spm.by_text[t];
        assert_eq!(ids(&spm, "abc"), vec![id("abc")]);
        // ▁a (-2) beats ab (-5); then ▁a|b is ▁ab (-4), and bc is taken
        // only where its pair is still there.
        assert_eq!(ids(&spm, "▁abc"), vec![id("▁a"), id("bc")]);
        // "é" has no token: its two bytes.
        assert_eq!(ids(&spm, "é"), vec![id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(ids(&spm, ""), Vec::<u32>::new());
    }

    #[test]
    fn a_byte_without_a_token_is_an_error() {
        let spm = Spm::new(&["a"], &[0.0]).unwrap();
        let mut out = Vec::new();
        let err = spm.encode("ä", &mut out).unwrap_err().to_string();
        assert!(err.contains("0xC3"), "{err}");
    }

    #[test]
    fn every_byte_of_random_text_comes_back_from_its_tokens() {
        // A random vocabulary of pieces cut from random text, plus the byte
        // tokens; random texts (multi-byte characters, spaces as ▁) must
        // encode to tokens whose texts, bytes for byte tokens, are the text.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet: Vec<char> = "ab▁cdé東京😀z".chars().collect();
        let random_text = |n: usize, next: &mut dyn FnMut() -> u64| -> String {
            (0..n)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect()
        };
        for round in 0..50 {
            let mut tokens: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
            for _ in 0..40 {
                let len = 1 + (next() % 4) as usize;
                let piece = random_text(len, &mut next);
                if !tokens.contains(&piece) {
                    tokens.push(piece);
                }
            }
            let scores: Vec<f32> = (0..tokens.len())
                .map(|_| (next() % 1000) as f32 / -10.0)
                .collect();
            let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let spm = Spm::new(&refs, &scores).unwrap();
            for _ in 0..20 {
                let len = (next() % 30) as usize;
                let text = random_text(len, &mut next);
                let ids = {
                    let mut out = Vec::new();
                    spm.encode(&text, &mut out).unwrap();
                    out
                };
                let bytes: Vec<u8> = ids
                    .iter()
                    .flat_map(|&id| {
                        let t = &tokens[id as usize];
                        match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                            Some(h) if id < 256 => vec![u8::from_str_radix(h, 16).unwrap()],
                            _ => t.as_bytes().to_vec(),
                        }
                    })
                    .collect();
                assert_eq!(bytes, text.as_bytes(), "round {round}: {text:?} → {ids:?}");
            }
        }
    }
}
