//! Beam search as a pure state machine.
//!
//! [`BeamSearch`] never touches the model: each step the caller passes the
//! log-probabilities of every live beam's next token, and gets back the new
//! beams as `(parent, token)` pairs. The caller forks the KV caches accordingly
//! (beam `i` of the next step continues beam `parent` of this one) and runs the
//! next forward on them. A beam that emits EOS, or reaches `max_tokens`, is
//! moved to the finished hypotheses, and so is one that the caller's test
//! says ended (a stop string, [`BeamSearch::step_until`]). Scores are `sum log p / len^length_penalty`
//! (Wu et al. 2016, without the +5 smoothing, as in HF transformers).
//!
//! Search ends when `width` hypotheses are finished and no live beam can beat
//! the worst of them, or when every beam reached `max_tokens`.

/// One hypothesis: its tokens (after the prompt) and its scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Beam {
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities.
    pub logprob: f32,
    /// Length-normalised score used for ranking.
    pub score: f32,
    /// Whether it ended with EOS (rather than the length limit).
    pub ended_with_eos: bool,
    /// Whether the caller's test ended it (a stop string in its text).
    pub stopped: bool,
}

impl Beam {
    /// Whether it ended by itself (EOS or a stop string) rather than being
    /// cut by the length limit or the end of the search.
    pub fn ended(&self) -> bool {
        self.ended_with_eos || self.stopped
    }
}

/// A new live beam after a step: it extends live beam `parent` by `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    /// Index of the parent among the previous step's live beams.
    pub parent: usize,
    /// The token appended.
    pub token: u32,
}

/// The state of one beam search.
#[derive(Debug, Clone)]
pub struct BeamSearch {
    width: usize,
    length_penalty: f32,
    max_tokens: usize,
    eos: Vec<u32>,
    live: Vec<Beam>,
    finished: Vec<Beam>,
}

impl BeamSearch {
    /// A search with `width` beams; it starts with one empty live beam.
    pub fn new(width: usize, length_penalty: f32, max_tokens: usize, eos: Vec<u32>) -> Self {
        let width = width.max(1);
        Self {
            width,
            length_penalty,
            max_tokens,
            eos,
            live: vec![Beam {
                tokens: Vec::new(),
                logprob: 0.0,
                score: 0.0,
                ended_with_eos: false,
                stopped: false,
            }],
            finished: Vec::new(),
        }
    }

    fn score(&self, logprob: f32, len: usize) -> f32 {
        logprob / (len.max(1) as f32).powf(self.length_penalty)
    }

    /// The live beams, in the order the caller's caches must be in.
    pub fn live(&self) -> &[Beam] {
        &self.live
    }

    /// Whether the search is over.
    pub fn is_done(&self) -> bool {
        if self.live.is_empty() {
            return true;
        }
        if self.finished.len() < self.width {
            return false;
        }
        let worst = self
            .finished
            .iter()
            .map(|b| b.score)
            .fold(f32::INFINITY, f32::min);
        // The best a live beam can still reach, for a non-negative length penalty,
        // is its current sum over the longest allowed length (log-probs only fall).
        let best_live = self
            .live
            .iter()
            .map(|b| {
                let len = if self.length_penalty > 0.0 {
                    self.max_tokens
                } else {
                    b.tokens.len() + 1
                };
                self.score(b.logprob, len)
            })
            .fold(f32::NEG_INFINITY, f32::max);
        best_live <= worst
    }

    /// Advances one step. `logprobs[i]` is the next-token log-distribution of
    /// live beam `i`. Returns the forks that make up the new live beams.
    pub fn step(&mut self, logprobs: &[Vec<f32>]) -> Vec<Fork> {
        self.step_until(logprobs, |_| false)
    }

    /// [`BeamSearch::step`], where a candidate whose tokens `ends` says
    /// ended (its text holds a stop string) becomes a finished hypothesis,
    /// as one ending with EOS does. `ends` sees each candidate that ranks
    /// high enough to be kept, EOS candidates aside.
    pub fn step_until(
        &mut self,
        logprobs: &[Vec<f32>],
        ends: impl Fn(&[u32]) -> bool,
    ) -> Vec<Fork> {
        assert_eq!(
            logprobs.len(),
            self.live.len(),
            "one distribution per live beam"
        );
        // The best 2·width continuations of each beam are enough: at most
        // `width` of them can end at EOS, so `width` live ones remain (with
        // the caller's test more may end, and fewer stay live).
        let per_beam = 2 * self.width;
        let mut cands: Vec<(f32, usize, u32)> = Vec::new();
        for (i, lp) in logprobs.iter().enumerate() {
            let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
            let k = per_beam.min(idx.len());
            idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
            for &t in &idx[..k] {
                cands.push((self.live[i].logprob + lp[t as usize], i, t));
            }
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut next = Vec::with_capacity(self.width);
        let mut forks = Vec::with_capacity(self.width);
        for (logprob, parent, token) in cands {
            if next.len() == self.width {
                break;
            }
            let mut tokens = self.live[parent].tokens.clone();
            tokens.push(token);
            let is_eos = self.eos.contains(&token);
            let stopped = !is_eos && ends(&tokens);
            let beam = Beam {
                score: self.score(logprob, tokens.len()),
                tokens,
                logprob,
                ended_with_eos: is_eos,
                stopped,
            };
            if beam.ended() || beam.tokens.len() >= self.max_tokens {
                // An ending candidate ranked above the last live beam becomes a
                // finished hypothesis; it does not take a live beam's place.
                self.finished.push(beam);
            } else {
                forks.push(Fork { parent, token });
                next.push(beam);
            }
        }
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.live = next;
        forks
    }

    /// The best `width` hypotheses, best first (live beams count when too few finished).
    pub fn into_results(mut self) -> Vec<Beam> {
        self.finished.extend(self.live);
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.finished.truncate(self.width);
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(v: &[f32]) -> Vec<f32> {
        crate::sampling::log_softmax(v)
    }

    #[test]
    fn width_one_follows_argmax() {
        let mut b = BeamSearch::new(1, 1.0, 3, vec![0]);
        let f = b.step(&[lp(&[0.0, 1.0, 3.0])]);
        assert_eq!(
            f,
            vec![Fork {
                parent: 0,
                token: 2
            }]
        );
        let f = b.step(&[lp(&[0.0, 5.0, 3.0])]);
        assert_eq!(
            f,
            vec![Fork {
                parent: 0,
                token: 1
            }]
        );
        b.step(&[lp(&[0.0, 5.0, 3.0])]);
        assert!(b.is_done());
        assert_eq!(b.into_results()[0].tokens, vec![2, 1, 1]);
    }

    #[test]
    fn results_are_sorted_and_eos_finishes() {
        let mut b = BeamSearch::new(2, 1.0, 4, vec![0]);
        let f = b.step(&[lp(&[2.0, 1.9, 1.0])]);
        // EOS (token 0) was the best: it finishes, and two live beams remain.
        assert_eq!(f.len(), 2);
        assert_eq!(b.live().len(), 2);
        while !b.is_done() {
            let n = b.live().len();
            b.step(&vec![lp(&[0.0, 1.0, 0.5]); n]);
        }
        let r = b.into_results();
        assert_eq!(r.len(), 2);
        assert!(r[0].score >= r[1].score);
    }

    #[test]
    fn a_candidate_the_caller_ends_finishes_like_eos() {
        // Token 2 is the best every step; a "stop string" is two 2s in a row.
        let mut b = BeamSearch::new(1, 1.0, 10, vec![0]);
        let ends = |t: &[u32]| t.ends_with(&[2, 2]);
        assert_eq!(b.step_until(&[lp(&[0.0, 1.0, 3.0])], ends).len(), 1);
        // [2, 2] finishes; the runner-up [2, 1] stays live but cannot beat it.
        b.step_until(&[lp(&[0.0, 1.0, 3.0])], ends);
        assert!(b.is_done());
        let r = b.into_results();
        assert_eq!(r[0].tokens, vec![2, 2]);
        assert!(r[0].stopped && !r[0].ended_with_eos && r[0].ended());
    }
}
