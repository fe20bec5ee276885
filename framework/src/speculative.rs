//! Speculative decoding's settings and its n-gram (prompt-lookup) drafter.
//!
//! A sequence that speculates appends up to `num_speculative_tokens` drafted
//! tokens to its step's row; the target model computes every position in
//! that one step, and the last stage keeps the longest run of drafts that the
//! sequence's own sampler draws itself, plus the one token it draws after
//! them (see `LlmStep::pick` in the actors crate). Because the drafter is
//! deterministic (its proposal is a point mass), "draw `t ~ p`, keep the
//! draft `d` if `t == d`, else emit `t` and stop" *is* the rejection rule of
//! Leviathan et al. and Chen et al.: the draft survives with probability
//! `p(d)`, and on rejection `t` follows `p` without `d`, renormalised,
//! which is `max(0, p − q)` for `q` the point mass at `d`. With the
//! sampler's seeded stream read at the same positions, speculation emits
//! the very tokens plain decoding would.
//!
//! **The n-gram drafter** ([`ngram_draft`]) matches the last `n` tokens of
//! the sequence (prompt and output), for `n` from `ngram_max` down to
//! `ngram_min`, against its earlier tokens, and proposes what followed the
//! most recent match.
//!
//! **A draft model** ([`SpecMethod::Draft`]) is a smaller model with the
//! target's vocabulary, run by a node of its own in each replica. Its
//! drafts are its greedy continuation, which is again a point mass, so the
//! same rule keeps the target's distribution. The scheduler plans the
//! drafted positions ([`crate::batching::StepItem::model_drafts`]); the
//! draft node fills them in during the step, before the target's nodes run
//! them.

use crate::error::{Error, Result};

/// The most drafted tokens a step may carry per sequence.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// The longest n-gram matched.
pub const MAX_NGRAM: usize = 16;

/// Where drafted tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecMethod {
    /// No speculation: one token per step.
    #[default]
    None,
    /// Prompt lookup: the tokens that followed the latest earlier occurrence
    /// of the sequence's last n-gram.
    Ngram,
    /// The greedy continuation of the engine's draft model.
    Draft,
}

impl SpecMethod {
    /// The name used in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecMethod::None => "none",
            SpecMethod::Ngram => "ngram",
            SpecMethod::Draft => "draft",
        }
    }
}

impl std::str::FromStr for SpecMethod {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(SpecMethod::None),
            "ngram" => Ok(SpecMethod::Ngram),
            "draft" => Ok(SpecMethod::Draft),
            other => Err(Error::invalid(
                "speculative.method",
                format!("is {other:?}, must be \"none\", \"ngram\" or \"draft\""),
            )),
        }
    }
}

/// How one request (or a server, by default) speculates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Speculation {
    /// Where drafts come from.
    pub method: SpecMethod,
    /// Drafted tokens per step, at most (1 to [`MAX_SPECULATIVE_TOKENS`]).
    pub num_speculative_tokens: usize,
    /// Shortest n-gram matched (at least 1).
    pub ngram_min: usize,
    /// Longest n-gram matched (at most [`MAX_NGRAM`]).
    pub ngram_max: usize,
}

impl Default for Speculation {
    fn default() -> Self {
        Self {
            method: SpecMethod::None,
            num_speculative_tokens: 4,
            ngram_min: 2,
            ngram_max: 4,
        }
    }
}

impl Speculation {
    /// n-gram speculation of `k` tokens with the default n-gram sizes.
    pub fn ngram(k: usize) -> Self {
        Self {
            method: SpecMethod::Ngram,
            num_speculative_tokens: k,
            ..Self::default()
        }
    }

    /// Speculation of `k` tokens by the engine's draft model.
    pub fn draft(k: usize) -> Self {
        Self {
            method: SpecMethod::Draft,
            num_speculative_tokens: k,
            ..Self::default()
        }
    }

    /// Whether this drafts at all.
    pub fn enabled(&self) -> bool {
        self.method != SpecMethod::None
    }

    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let k = self.num_speculative_tokens;
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            return Err(Error::invalid(
                "speculative.num_speculative_tokens",
                format!("is {k}, must be in [1, {MAX_SPECULATIVE_TOKENS}]"),
            ));
        }
        if !(1..=MAX_NGRAM).contains(&self.ngram_min) {
            return Err(Error::invalid(
                "speculative.ngram_min",
                format!("is {}, must be in [1, {MAX_NGRAM}]", self.ngram_min),
            ));
        }
        if !(self.ngram_min..=MAX_NGRAM).contains(&self.ngram_max) {
            return Err(Error::invalid(
                "speculative.ngram_max",
                format!(
                    "is {}, must be in [ngram_min = {}, {MAX_NGRAM}]",
                    self.ngram_max, self.ngram_min
                ),
            ));
        }
        Ok(())
    }
}

/// Up to `k` tokens to follow `tokens`: for `n` from `max` down to `min`,
/// the tokens that followed the latest earlier occurrence of the last `n`
/// tokens. Empty when no n-gram recurs.
pub fn ngram_draft(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || min == 0 {
        return Vec::new();
    }
    for n in (min..=max.min(len.saturating_sub(1))).rev() {
        let tail = &tokens[len - n..];
        // Latest start `s < len - n` with tokens[s..s + n] == tail.
        let found = (0..len - n).rev().find(|&s| &tokens[s..s + n] == tail);
        if let Some(s) = found {
            let from = s + n;
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_is_continued() {
        // "1 2 3" recurs; its latest earlier occurrence is followed by 9 9.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 7, 2, 3];
        assert_eq!(ngram_draft(&t, 1, 3, 4), [9, 9, 7, 2]);
        // With n = 3 only "7 2 3" is tried, which does not recur.
        assert_eq!(ngram_draft(&t, 3, 3, 4), Vec::<u32>::new());
        // The draft stops at the end of the sequence.
        let t = [5, 6, 5];
        assert_eq!(ngram_draft(&t, 1, 2, 4), [6, 5]);
        assert!(ngram_draft(&[1, 2, 3], 1, 3, 4).is_empty());
        assert!(ngram_draft(&[], 1, 3, 4).is_empty());
        assert!(ngram_draft(&[4, 4], 1, 3, 0).is_empty());
    }

    #[test]
    fn settings_are_checked() {
        assert!(Speculation::ngram(4).validate().is_ok());
        let bad = |s: Speculation, field: &str| {
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        bad(Speculation::ngram(0), "num_speculative_tokens");
        bad(Speculation::ngram(17), "num_speculative_tokens");
        bad(
            Speculation {
                ngram_min: 0,
                ..Speculation::ngram(2)
            },
            "ngram_min",
        );
        bad(
            Speculation {
                ngram_min: 3,
                ngram_max: 2,
                ..Speculation::ngram(2)
            },
            "ngram_max",
        );
        assert!("lookahead".parse::<SpecMethod>().is_err());
        assert_eq!("draft".parse::<SpecMethod>().unwrap(), SpecMethod::Draft);
        assert_eq!("ngram".parse::<SpecMethod>().unwrap(), SpecMethod::Ngram);
    }
}
