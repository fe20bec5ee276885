//! Scoring a prompt: each prompt token's log-probability under the model
//! given the tokens before it, the best alternatives, and optionally the
//! whole distribution, kept in 16 bits a value, for comparing two models
//! (KL divergence, top-1 agreement, the change in the probability of the
//! right token).
//!
//! The row of logits at prompt position `p` scores prompt token `p + 1`.
//! The log-probabilities are exact (a log-sum-exp accumulated in f64); a
//! kept row ([`LogprobRow`]) quantizes log-probabilities to 16 bits over
//! the [`LogprobRow::RANGE`] nats below the best, which is what a
//! comparison needs: two equal rows quantize equally, so a model compared
//! with itself has a KL divergence of exactly 0.

use crate::sampling::{argmax, log_softmax};

/// What a request asks of its prompt's scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptScoring {
    /// The first prompt token scored (index into the prompt; token 0 has no
    /// score, so 0 means 1).
    pub first: usize,
    /// Alternatives per position, best first (at most
    /// [`crate::sampling::MAX_LOGPROBS`]).
    pub top: usize,
    /// Whether each position's whole distribution comes back
    /// ([`PromptScore::row`]).
    pub rows: bool,
}

impl PromptScoring {
    /// Checks the limits.
    pub fn validate(&self) -> crate::Result<()> {
        let max = crate::sampling::MAX_LOGPROBS;
        if self.top > max {
            return Err(crate::Error::invalid(
                "prompt_logprobs",
                format!(
                    "asks for {} alternatives, at most {max} are allowed",
                    self.top
                ),
            ));
        }
        Ok(())
    }

    /// The first prompt position whose row is scored.
    pub fn first_row(&self) -> usize {
        self.first.max(1) - 1
    }
}

/// One scored prompt token.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptScore {
    /// Its index in the prompt (at least 1: the first token has no score).
    pub position: usize,
    /// The token.
    pub token: u32,
    /// Its log-probability given the tokens before it.
    pub logprob: f32,
    /// The most likely tokens at its position and their log-probabilities,
    /// best first (as many as asked for).
    pub top: Vec<(u32, f32)>,
    /// The whole distribution, when asked for.
    pub row: Option<LogprobRow>,
}

/// A distribution over the vocabulary in 16 bits a token: log-probability
/// `lo + q[i] * scale`, clamped below at `lo` (at most [`Self::RANGE`]
/// below the best).
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobRow {
    /// The most likely token (from the exact logits).
    pub best: u32,
    /// The lowest log-probability kept.
    pub lo: f32,
    /// Nats per step of `q`.
    pub scale: f32,
    /// The quantized log-probabilities.
    pub q: Vec<u16>,
}

impl LogprobRow {
    /// Nats below the best token's log-probability that are kept apart
    /// (lower ones are clamped to it: their probabilities are below e^-24
    /// of the best's).
    pub const RANGE: f32 = 24.0;

    /// The row of the log-probabilities `lp` (a log-softmax), whose best
    /// token is `best`.
    pub fn quantize(lp: &[f32], best: u32) -> Self {
        let hi = lp.get(best as usize).copied().unwrap_or(0.0);
        let min = lp.iter().copied().fold(f32::INFINITY, f32::min);
        let lo = min.max(hi - Self::RANGE);
        let scale = ((hi - lo) / 65535.0).max(f32::MIN_POSITIVE);
        let q = lp
            .iter()
            .map(|&x| ((x.max(lo) - lo) / scale).round().min(65535.0) as u16)
            .collect();
        Self { best, lo, scale, q }
    }

    /// The log-probabilities the row holds, renormalized (so that the
    /// probabilities sum to 1 after the rounding and the clamp).
    pub fn logprobs(&self) -> Vec<f64> {
        let lp: Vec<f64> = self
            .q
            .iter()
            .map(|&q| self.lo as f64 + q as f64 * self.scale as f64)
            .collect();
        let max = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = lp.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
        lp.into_iter().map(|x| x - lse).collect()
    }
}

/// Scores prompt token `token` at index `position` from the logits `row` of
/// the position before it, with the `top` best alternatives and, if
/// `keep_row`, the whole distribution.
pub fn score(row: &[f32], position: usize, token: u32, top: usize, keep_row: bool) -> PromptScore {
    let lp = log_softmax(row);
    PromptScore {
        position,
        token,
        logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: crate::sampling::top_of(&lp, top),
        row: keep_row.then(|| LogprobRow::quantize(&lp, argmax(row) as u32)),
    }
}

/// How one position's distribution under a model compares with a base's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    /// KL(base ‖ model), in nats.
    pub kld: f64,
    /// Whether both put the same token first.
    pub same_top: bool,
}

/// Compares `model`'s row with `base`'s.
pub fn divergence(base: &LogprobRow, model: &LogprobRow) -> Divergence {
    let (b, m) = (base.logprobs(), model.logprobs());
    let kld = b
        .iter()
        .zip(&m)
        .map(|(&pb, &pm)| pb.exp() * (pb - pm))
        .sum::<f64>()
        .max(0.0);
    Divergence {
        kld,
        same_top: base.best == model.best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 97.0)
            .collect()
    }

    #[test]
    fn scores_equal_the_plain_log_softmax() {
        let r = row(500, 3);
        let lp = log_softmax(&r);
        let s = score(&r, 5, 17, 3, false);
        assert!((s.logprob - lp[17]).abs() < 1e-5);
        assert_eq!(s.top.len(), 3);
        assert_eq!(s.top[0].0, argmax(&r) as u32);
        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(s.row.is_none());
    }

    #[test]
    fn a_kept_row_holds_the_distribution_to_within_its_step() {
        let r = row(1000, 9);
        let s = score(&r, 1, 0, 0, true);
        let kept = s.row.unwrap();
        let (lp, best) = (log_softmax(&r), argmax(&r) as u32);
        assert_eq!(kept.best, best);
        let back = kept.logprobs();
        for (a, b) in lp.iter().zip(&back) {
            if *a > lp[best as usize] - LogprobRow::RANGE {
                assert!((*a as f64 - b).abs() < 2.0 * kept.scale as f64, "{a} {b}");
            }
        }
    }

    #[test]
    fn divergence_is_zero_for_equal_rows_and_grows_with_the_difference() {
        let r = row(800, 1);
        let base = score(&r, 1, 0, 0, true).row.unwrap();
        let same = divergence(&base, &score(&r, 1, 0, 0, true).row.unwrap());
        assert_eq!(same.kld, 0.0);
        assert!(same.same_top);
        let near: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 3) as f32 * 0.01)
            .collect();
        let far: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, x)| x + (i % 3) as f32 * 0.5)
            .collect();
        let d_near = divergence(&base, &score(&near, 1, 0, 0, true).row.unwrap()).kld;
        let d_far = divergence(&base, &score(&far, 1, 0, 0, true).row.unwrap()).kld;
        assert!(0.0 < d_near && d_near < d_far, "{d_near} {d_far}");
    }
}
