//! Choosing the next token from logits, per sequence.
//!
//! [`SamplingParams`] is the raw request; [`SamplingParams::validate`] checks
//! every field and names the bad one. A [`Sampler`] owns one sequence's random
//! state (seeded, so the same seed gives the same text) and applies, in order:
//! repetition penalty (over prompt and output, as in CTRL/HF), presence and
//! frequency penalties (over the output, as in OpenAI's API), then either argmax
//! (temperature 0) or temperature → top-k → softmax → top-p → min-p → a draw.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

/// A small, seedable, portable PRNG (SplitMix64): the same seed gives the same
/// stream on every platform and build.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator seeded with `seed` after `n` draws: the stream is a
    /// counter, so any point of it is reached in one step.
    pub fn at(seed: u64, n: u64) -> Self {
        Self(seed.wrapping_add(n.wrapping_mul(Self::GAMMA)))
    }

    const GAMMA: u64 = 0x9E3779B97F4A7C15;

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// How to pick tokens for one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of seen tokens by this (1 = off).
    pub repetition_penalty: f32,
    /// Subtract this from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtract this × the count of each token already generated.
    pub frequency_penalty: f32,
    /// Seed for the draw; `None` picks one from the clock.
    pub seed: Option<u64>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Strings that end generation; the text is cut before them.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many of the
    /// most likely alternatives (`None` = no log-probabilities; at most
    /// [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Added to the logits of these token ids before every draw (OpenAI's
    /// `logit_bias`: -100 bans a token, 100 all but forces it); each bias in
    /// [-100, 100], at most [`MAX_LOGIT_BIAS`] entries. The engine checks the
    /// ids against the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// The most entries [`SamplingParams::logit_bias`] may have.
pub const MAX_LOGIT_BIAS: usize = 1024;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 128,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens`.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the first bad one and its range.
    pub fn validate(&self) -> Result<()> {
        let finite = |field, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(field, "must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(Error::invalid(
                "temperature",
                format!("is {}, must be in [0, 100]", self.temperature),
            ));
        }
        finite("top_p", self.top_p)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("is {}, must be in (0, 1]", self.top_p),
            ));
        }
        finite("min_p", self.min_p)?;
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid(
                "min_p",
                format!("is {}, must be in [0, 1]", self.min_p),
            ));
        }
        finite("repetition_penalty", self.repetition_penalty)?;
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!("is {}, must be in (0, 10]", self.repetition_penalty),
            ));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            finite(field, v)?;
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid(field, format!("is {v}, must be in [-2, 2]")));
            }
        }
        if self.max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(Error::invalid(
                "logprobs",
                format!("is {n}, must be in [0, {MAX_LOGPROBS}]"),
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(Error::invalid(
                "logit_bias",
                format!(
                    "has {} entries, at most {MAX_LOGIT_BIAS} are allowed",
                    self.logit_bias.len()
                ),
            ));
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(b)))
        {
            return Err(Error::invalid(
                "logit_bias",
                format!("gives token {t} the bias {b}; a bias must be in [-100, 100]"),
            ));
        }
        Ok(())
    }
}

/// Whether every value is finite (no NaN, no infinity). Branch-free over
/// 16 independent lanes, so that it vectorizes: `x · 0` is 0 for a finite
/// `x` and NaN otherwise, and a NaN stays in its lane's sum.
pub fn all_finite(xs: &[f32]) -> bool {
    let mut lanes = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x * 0.0;
        }
    }
    lanes.iter().chain(tail).all(|x| (x * 0.0) == 0.0)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `log(softmax(xs))`, computed stably.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = xs
        .iter()
        .map(|x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    xs.iter().map(|x| x - lse).collect()
}

/// A generated token's log-probability under the model (before penalties
/// and temperature) and the `top` most likely tokens with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// The log-probability of `token` and the `top` best alternatives in `logits`.
    pub fn from_logits(logits: &[f32], token: u32, top: usize) -> Self {
        let lp = log_softmax(logits);
        Self {
            logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
            top: top_of(&lp, top),
        }
    }
}

/// The `top` largest values of `lp` with their indices, largest first (the
/// lower index first on ties), leaving out −∞ (fewer than `top` when fewer
/// are finite).
pub fn top_of(lp: &[f32], top: usize) -> Vec<(u32, f32)> {
    if top == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if top < idx.len() {
        idx.select_nth_unstable_by(top - 1, by);
        idx.truncate(top);
    }
    idx.sort_by(by);
    // A token the draw could never give (masked by a grammar or a bias:
    // −∞) is no alternative; OpenAI's log-probabilities are finite.
    idx.into_iter()
        .map(|i| (i, lp[i as usize]))
        .filter(|(_, l)| *l > f32::NEG_INFINITY)
        .collect()
}

/// A drawn token and, if the request asked for it, its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// The token.
    pub token: u32,
    /// Its log-probability and the top alternatives.
    pub logprob: Option<TokenLogprob>,
}

/// One sequence's sampler: its parameters, seed and token counts.
///
/// A draw is a function of the sampler's state and the logits alone: the
/// `n`-th accepted token's draw reads the random stream at `n`, so drawing
/// again (a recomputed step, or a draw on another thread) gives the same
/// token until [`Sampler::accept`] moves the sequence on.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    /// Tokens accepted so far (the position in the random stream).
    accepted: u64,
    /// Tokens of prompt and output (for the repetition penalty).
    seen: HashSet<u32>,
    /// Counts of output tokens (presence / frequency penalties).
    generated: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Self {
            seed,
            accepted: 0,
            seen: prompt.iter().copied().collect(),
            generated: HashMap::new(),
            params,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records a token that was appended to the sequence.
    pub fn accept(&mut self, token: u32) {
        self.accepted += 1;
        self.seen.insert(token);
        *self.generated.entry(token).or_default() += 1;
    }

    /// Draws the next token from a logits row (left as it is), with its
    /// log-probability and top alternatives where the parameters ask for
    /// them (taken from the raw logits).
    pub fn draw(&self, logits: &[f32]) -> Draw {
        let p = &self.params;
        // Plain greedy changes no logit: the row is not copied.
        let plain_greedy = p.temperature == 0.0
            && p.repetition_penalty == 1.0
            && p.presence_penalty == 0.0
            && p.frequency_penalty == 0.0
            && p.logit_bias.is_empty();
        let token = if plain_greedy {
            argmax(logits) as u32
        } else {
            self.sample(&mut logits.to_vec())
        };
        let logprob = self
            .params
            .logprobs
            .map(|top| TokenLogprob::from_logits(logits, token, top));
        Draw { token, logprob }
    }

    /// Picks the next token from `logits` (modified in place by the
    /// penalties); the same state and logits always pick the same token.
    pub fn sample(&self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let r = Rng::at(self.seed, self.accepted).next_f32();
        pick(logits, p, r)
    }
}

/// Orders candidates by logit, highest first; ties by the lower token id.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Chooses a token from `logits` under `p`'s temperature, top-k, top-p and
/// min-p, with the uniform draw `r` in [0, 1).
///
/// The kept candidates are the `top_k` highest, then the shortest run of
/// the highest whose probability reaches `top_p`, then those at least
/// `min_p` times the best; `r` walks the kept ones highest first. Only the
/// candidates in the probability bands that hold the nucleus are sorted (one
/// pass over the vocabulary sums each band's mass), so a typical step costs
/// two passes over the vocabulary and a sort of the nucleus, not of it all. Where the cuts keep
/// every candidate, nothing is sorted and the walk takes them in an order of
/// their own (the same distribution).
fn pick(logits: &[f32], p: &SamplingParams, r: f32) -> u32 {
    let kept = kept(logits, p);
    let mass: f32 = kept.iter().map(|c| c.1).sum();
    let mut r = r * mass;
    for c in &kept {
        if r < c.1 {
            return c.0;
        }
        r -= c.1;
    }
    kept.last().map_or(0, |c| c.0)
}

/// The candidates the cuts of `p` keep, with unnormalised probabilities:
/// highest first where a cut removed any, else in an order of their own.
fn kept(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / p.temperature))
        .collect();
    if cand.is_empty() {
        return cand;
    }
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_logit);
        cand.truncate(p.top_k);
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    // Unnormalised probabilities, the total in token order, and each
    // candidate's band: how far below the best it is, in steps of 1/BANDS of
    // a nat (the last band takes the rest). Bands order the candidates
    // coarsely: everything in a band is more likely than anything below it.
    const BANDS: usize = 64;
    const PER_NAT: f32 = 2.0;
    let mut band_mass = [0f32; BANDS];
    let mut bands = Vec::with_capacity(if p.top_p < 1.0 { cand.len() } else { 0 });
    let mut total = 0f32;
    for c in cand.iter_mut() {
        let d = max - c.1;
        c.1 = (-d).exp();
        total += c.1;
        if p.top_p < 1.0 {
            let b = ((d * PER_NAT) as usize).min(BANDS - 1);
            band_mass[b] += c.1;
            bands.push(b as u8);
        }
    }
    let n = cand.len();
    // How many of the highest candidates the cuts keep, and how many of them
    // are sorted so far.
    let mut keep = n;
    let mut sorted = 0;
    if p.top_p < 1.0 {
        let want = p.top_p * total;
        // The band where the running mass reaches top_p (with a margin for
        // the rounding of two summation orders): the nucleus lies in it and
        // the bands above. Only those candidates are sorted.
        let mut acc = 0.0;
        let last = band_mass
            .iter()
            .position(|m| {
                acc += m;
                acc >= want * (1.0 + 1e-4)
            })
            .map_or(BANDS - 1, |b| (b + 1).min(BANDS - 1));
        let mut front = 0;
        for (i, &b) in bands.iter().enumerate() {
            if b as usize <= last {
                cand.swap(front, i);
                front += 1;
            }
        }
        cand[..front].sort_unstable_by(by_logit);
        sorted = front;
        let mut acc = 0.0;
        keep = cand[..front]
            .iter()
            .position(|c| {
                acc += c.1;
                acc >= want
            })
            .map_or(n, |i| i + 1);
        if keep == n && front < n {
            // Rounding left the nucleus short of its mass: sort the rest too.
            cand.sort_unstable_by(by_logit);
            sorted = n;
            let mut acc = 0.0;
            keep = cand
                .iter()
                .position(|c| {
                    acc += c.1;
                    acc >= want
                })
                .map_or(n, |i| i + 1);
        }
    }
    if p.min_p > 0.0 {
        // The best candidate's unnormalised probability is exp(0) = 1.
        let floor = p.min_p;
        let above = cand.iter().filter(|c| c.1 >= floor).count().max(1);
        keep = keep.min(above);
    }
    if keep < n && sorted < keep {
        cand.select_nth_unstable_by(keep - 1, by_logit);
        cand[..keep].sort_unstable_by(by_logit);
    }
    cand.truncate(keep);
    cand
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Where the first of `stops` (validated non-empty) begins in `text`.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Finds stop strings in streamed text without ever emitting part of one.
///
/// [`StopMatcher::push`] takes newly decoded text and returns what may be shown
/// now: text that cannot be the start of a stop string. When a stop string
/// completes, everything before it is returned and the matcher reports it hit.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    hit: bool,
}

impl StopMatcher {
    /// A matcher for `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            hit: false,
        }
    }

    /// Whether a stop string was seen.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// Adds `text`; returns the part that is safe to emit.
    pub fn push(&mut self, text: &str) -> String {
        if self.hit {
            return String::new();
        }
        self.held.push_str(text);
        if let Some(at) = first_stop(&self.held, &self.stops) {
            self.hit = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                if i < keep_from && s.starts_with(&self.held[i..]) {
                    keep_from = i;
                    break;
                }
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        out
    }

    /// Whatever is still held back (at the end of a sequence that did not stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_a_nan_or_an_infinity_anywhere() {
        let mut xs: Vec<f32> = (0..100).map(|i| i as f32 - 50.0).collect();
        assert!(all_finite(&xs));
        assert!(all_finite(&[]));
        for at in [0, 15, 16, 63, 96, 99] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let keep = xs[at];
                xs[at] = bad;
                assert!(!all_finite(&xs), "{bad} at {at}");
                xs[at] = keep;
            }
        }
        assert!(all_finite(&[f32::MAX, f32::MIN, -0.0]));
    }

    #[test]
    fn top_of_leaves_out_tokens_that_cannot_be_drawn() {
        let lp = [-1.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        assert_eq!(top_of(&lp, 3), vec![(2, 0.0), (0, -1.0)]);
        assert_eq!(top_of(&lp, 1), vec![(2, 0.0)]);
    }

    /// The cuts as the sampler made them before `pick`: everything sorted.
    /// Returns the kept candidates, highest first, with probabilities.
    fn kept_by_full_sort(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(by_logit);
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let total: f32 = cand.iter().map(|c| (c.1 - max).exp()).sum();
        let probs: Vec<(u32, f32)> = cand
            .iter()
            .map(|c| (c.0, (c.1 - max).exp() / total))
            .collect();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            if let Some(i) = probs.iter().position(|q| {
                acc += q.1;
                acc >= p.top_p
            }) {
                keep = i + 1;
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * p.min_p;
            keep = keep.min(probs.iter().take_while(|q| q.1 >= floor).count().max(1));
        }
        probs[..keep].to_vec()
    }

    #[test]
    fn logit_bias_moves_greedy_and_sampled_picks_and_is_bounded() {
        let logits = vec![0.0, 5.0, 1.0, 4.9];
        let sampler = |bias: Vec<(u32, f32)>, temperature: f32| {
            let p = SamplingParams {
                temperature,
                seed: Some(3),
                logit_bias: bias,
                ..SamplingParams::default()
            };
            Sampler::new(p, &[])
        };
        assert_eq!(sampler(vec![], 0.0).sample(&mut logits.clone()), 1);
        assert_eq!(
            sampler(vec![(1, -100.0)], 0.0).sample(&mut logits.clone()),
            3
        );
        assert_eq!(
            sampler(vec![(0, 100.0)], 0.0).sample(&mut logits.clone()),
            0
        );
        // Banned under sampling too, whatever the draw.
        for seed in 0..50 {
            let mut s = sampler(vec![(1, -100.0), (3, -100.0)], 1.0);
            s.seed = seed;
            let t = s.sample(&mut logits.clone());
            assert!(t == 0 || t == 2, "seed {seed} drew {t}");
        }
        // Ids beyond the row are ignored here (the engine refuses them).
        assert_eq!(
            sampler(vec![(99, 100.0)], 0.0).sample(&mut logits.clone()),
            1
        );
        for bad in [101.0, -100.5, f32::NAN] {
            let p = SamplingParams {
                logit_bias: vec![(1, bad)],
                ..SamplingParams::greedy(1)
            };
            assert!(p.validate().is_err(), "{bad}");
        }
        let p = SamplingParams {
            logit_bias: vec![(1, 1.0); MAX_LOGIT_BIAS + 1],
            ..SamplingParams::greedy(1)
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn partial_selection_keeps_what_a_full_sort_keeps() {
        let mut rng = Rng::new(5);
        for case in 0..200 {
            let n = 1 + (rng.next_f32() * 3000.0) as usize;
            let spread = 1.0 + rng.next_f32() * 12.0;
            let logits: Vec<f32> = (0..n).map(|_| rng.next_f32() * spread).collect();
            let p = SamplingParams {
                temperature: 0.3 + rng.next_f32(),
                top_k: if case % 3 == 0 {
                    1 + (rng.next_f32() * 100.0) as usize
                } else {
                    0
                },
                top_p: if case % 2 == 0 {
                    0.5 + rng.next_f32() * 0.5
                } else {
                    1.0
                },
                min_p: if case % 5 == 0 {
                    rng.next_f32() * 0.3
                } else {
                    0.0
                },
                ..SamplingParams::default()
            };
            let want = kept_by_full_sort(&logits, &p);
            let got = kept(&logits, &p);
            let ids = |v: &[(u32, f32)]| v.iter().map(|c| c.0).collect::<Vec<_>>();
            let candidates = if p.top_k > 0 { p.top_k.min(n) } else { n };
            if got.len() == candidates && want.len() == candidates {
                // Where the cuts keep everything, the order is another: the
                // same set.
                let (mut a, mut b) = (ids(&got), ids(&want));
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "case {case}: {p:?}");
                continue;
            }
            // The same ranking; the nucleus may end one token apart only where
            // its mass meets top_p within rounding (another summation order).
            let m = got.len().min(want.len());
            assert_eq!(ids(&got[..m]), ids(&want[..m]), "case {case}: {p:?}");
            if got.len() != want.len() {
                assert_eq!(got.len().abs_diff(want.len()), 1, "case {case}: {p:?}");
                let at: f32 = want[..m].iter().map(|q| q.1).sum();
                assert!((at - p.top_p).abs() < 1e-4, "case {case}: {at} vs {p:?}");
            }
            // Draws walk the kept tokens highest first.
            let mass: f32 = got.iter().map(|c| c.1).sum();
            assert_eq!(pick(&logits, &p, 0.0), got[0].0);
            assert_eq!(pick(&logits, &p, (got[0].1 / 2.0) / mass), got[0].0);
        }
    }

    #[test]
    fn the_stream_reached_at_once_is_the_stream_drawn_in_order() {
        let mut rng = Rng::new(77);
        for n in 0..100 {
            assert_eq!(Rng::at(77, n).next_u64(), rng.next_u64(), "draw {n}");
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let s = Sampler::new(SamplingParams::greedy(4), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..20)
                .map(|_| {
                    let t = s.sample(&mut logits.clone());
                    // Drawing again before accepting changes nothing.
                    assert_eq!(s.sample(&mut logits.clone()), t);
                    s.accept(t);
                    t
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let other = SamplingParams {
            seed: Some(12),
            ..params.clone()
        };
        assert_ne!(draw(&params), draw(&other));
    }

    #[test]
    fn top_k_one_and_min_p_one_are_greedy() {
        let logits = [0.5f32, 2.0, 1.9, -1.0];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 1.0,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.01,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params, &[]);
            for _ in 0..10 {
                assert_eq!(s.sample(&mut logits.clone()), 1);
                s.accept(1);
            }
        }
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(4)
        };
        let s = Sampler::new(params, &[1]);
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
        let params = SamplingParams {
            frequency_penalty: 1.5,
            ..SamplingParams::greedy(4)
        };
        let mut s = Sampler::new(params, &[]);
        s.accept(1);
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("`top_p`"));
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`temperature`"));
        assert!(SamplingParams {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn stop_matcher_holds_back_prefixes() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), "abc ");
        assert_eq!(m.push("N"), "");
        assert_eq!(m.push("X"), "ENX");
        assert_eq!(m.push("yyEN"), "yy");
        assert_eq!(m.push("D tail"), "");
        assert!(m.hit());
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("héllo\n"), "héllo");
        assert_eq!(m.flush(), "\n");
    }
}
