//! What one engine step carries: to the nodes, the batch plan and how each
//! sequence's next token is chosen; back from the last stage's rank 0, the
//! chosen tokens.
//!
//! A sampling request's [`Sampler`] exists once, shared by the policy (which
//! hands it to the steps the request is in), the last stage's rank 0 (which
//! draws with it where the logits are) and the merger (which accepts the drawn
//! token once the step is merged). A draw reads the sampler without changing
//! it, so a recomputed step draws the same token; only the merger moves it on,
//! and a sequence is in at most one step at a time, so the lock is never
//! contended.
//!
//! An item that carries drafted tokens (speculative decoding, see
//! [`framework::speculative`]) gets the logits of its last `drafts + 1`
//! rows, and its draws run through them in order with a copy of the
//! sampler that accepts each draw on the way: a draw equal to the next
//! draft keeps it and goes on, the first that differs (or the one after the
//! last draft) ends the item's picks. The draws are the ones plain decoding
//! makes one step at a time, so speculation changes how many steps a
//! request takes, never its tokens.
//!
//! Where the drafts are the draft model's, the plan holds only their places;
//! the last stage verifies the drafts the draft node sent for the step.
//!
//! A guided request's draw reads its grammar's mask of the next token
//! ([`framework::guide`]), computed while the step ran; such a request does
//! not speculate. The merger moves the grammar on with the sampler.
//!
//! An item that scores its prompt ([`framework::scoring`]) gets the logits
//! of its rows from its first scored position on; each scored row becomes
//! the [`PromptScore`] of the prompt token after it, computed there, so
//! only the scores (and, when asked for, 16-bit rows) travel to the merger.

use std::sync::{Arc, Mutex, MutexGuard};

use framework::batching::StepPlan;
use framework::guide::Constraint;
use framework::sampling::{log_softmax, Draw, Sampler};
use framework::scoring::{score, PromptScore};
use framework::Logits;

/// A sampling request's sampler, shared by the policy, the nodes and the
/// merger, with its grammar when the request is guided.
#[derive(Debug, Clone)]
pub struct SharedSampler(Arc<Mutex<Sampler>>, Option<(Arc<Constraint>, u32)>);

impl SharedSampler {
    /// Shares `sampler`.
    pub fn new(sampler: Sampler) -> Self {
        Self(Arc::new(Mutex::new(sampler)), None)
    }

    /// Shares `sampler`, its draws held to `constraint` (`eos` ends the
    /// sequence where the grammar allows nothing more).
    pub fn guided(sampler: Sampler, constraint: Arc<Constraint>, eos: u32) -> Self {
        Self(Arc::new(Mutex::new(sampler)), Some((constraint, eos)))
    }

    /// The grammar, for a guided request.
    pub fn constraint(&self) -> Option<&Arc<Constraint>> {
        self.1.as_ref().map(|(c, _)| c)
    }

    /// Moves the sampler (and the grammar) past the drawn `token`; an
    /// error when the grammar does not allow it.
    pub fn accept(&self, token: u32) -> framework::Result<()> {
        self.lock().accept(token);
        match &self.1 {
            Some((c, _)) => c.accept(token),
            None => Ok(()),
        }
    }

    /// The sampler. A panic elsewhere while it was held cannot leave it half
    /// changed (its one mutation, `accept`, cannot panic), so a poisoned lock
    /// is taken as it is.
    pub fn lock(&self) -> MutexGuard<'_, Sampler> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One step of one replica lane: the plan every node of the replica runs,
/// and how the next token of each item that wants logits is chosen.
#[derive(Debug)]
pub struct LlmStep {
    /// The batch.
    pub plan: StepPlan,
    /// For each item of `plan`: its request's sampler, or `None` where the
    /// item wants no logits or belongs to a beam search (whose rows come back
    /// whole).
    pub samplers: Vec<Option<SharedSampler>>,
    /// For each item of `plan`: what its request wants of its scored rows,
    /// where it has any ([`framework::batching::StepItem::scored`]).
    pub scoring: Vec<Option<Arc<ScoreSpec>>>,
}

/// What a request that scores its prompt wants of each scored position.
#[derive(Debug)]
pub struct ScoreSpec {
    /// The whole prompt (a row's target is the token after its position).
    pub prompt: Vec<u32>,
    /// Alternatives per position.
    pub top: usize,
    /// Whether the whole distribution comes back.
    pub rows: bool,
}

/// How an item's next token was chosen on the last stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// Drawn by the item's sampler: one draw, or with drafts, the drafts
    /// it verified and the draw after them.
    Tokens(Vec<Draw>),
    /// A beam's row of log-probabilities over the vocabulary (the merger's
    /// beam search chooses).
    Row(Vec<f32>),
    /// Scores of prompt tokens, and the item's draw when it has one.
    Scored(Vec<PromptScore>, Option<Box<Pick>>),
    /// The item's logits held a NaN or an infinity, so nothing could be
    /// drawn or scored: why (the request fails with it).
    NonFinite(String),
}

/// What the last stage's rank 0 returns: for each item of the step, its
/// pick, where it wanted logits.
pub type Picks = Vec<Option<Pick>>;

impl LlmStep {
    /// Chooses the next token of every item among `first..` whose logits
    /// `logits` (a micro-batch's, item rows relative to `first`) holds, into
    /// `picks`: draws for sampled items, log-probability rows for beams. The
    /// items are independent, so they are chosen in parallel on the calling
    /// thread's compute pool. `model_drafts` holds, per item, the draft
    /// model's drafts where the plan holds only their places.
    pub fn pick(
        &self,
        first: usize,
        logits: &Logits,
        picks: &mut Picks,
        model_drafts: Option<&[Vec<u32>]>,
    ) {
        type Chosen<'l> = (usize, Vec<&'l [f32]>, Option<Pick>);
        let mut chosen: Vec<Chosen<'_>> = (0..logits.item_rows.len())
            .filter(|&i| !logits.item_rows[i].is_empty())
            .map(|i| (first + i, logits.rows_of(i).collect(), None))
            .collect();
        let choose = |_: usize, (item, rows, pick): &mut Chosen<'_>| {
            let Some(it) = self.plan.items.get(*item) else {
                return;
            };
            // The rows run from the first scored position (or the drawn
            // rows' first) to the item's last.
            let first = it.start + it.tokens.len() - rows.len();
            // NaN draws token 0 by argmax and makes every probability NaN:
            // a damaged model (or an overflow) must fail, not talk.
            let bad = rows
                .iter()
                .enumerate()
                .filter(|(_, row)| !framework::sampling::all_finite(row))
                .find_map(|(r, row)| {
                    row.iter()
                        .position(|x| !x.is_finite())
                        .map(|t| (first + r, t, row[t]))
                });
            if let Some((position, token, value)) = bad {
                *pick = Some(Pick::NonFinite(format!(
                    "the model computed a non-finite logit ({value} for token {token} at position {position}): its weights hold NaN or infinite values, or its activations overflowed"
                )));
                return;
            }
            let scores: Vec<PromptScore> = match self.scoring.get(*item).and_then(Option::as_ref) {
                Some(spec) => it
                    .scored
                    .clone()
                    .filter_map(|p| {
                        let target = *spec.prompt.get(p + 1)?;
                        let row = rows.get(p.checked_sub(first)?)?;
                        Some(score(row, p + 1, target, spec.top, spec.rows))
                    })
                    .collect(),
                None => Vec::new(),
            };
            let drawn = if it.logits {
                &rows[rows.len().saturating_sub(it.drafts + 1)..]
            } else {
                &[][..]
            };
            let draw = match (
                self.samplers.get(*item).and_then(Option::as_ref),
                drawn.last(),
            ) {
                (_, None) => None,
                (Some(sampler), Some(last)) if sampler.1.is_some() => {
                    // Guided: one row (no drafts), masked by the grammar.
                    let mut row = last.to_vec();
                    if let Some((c, eos)) = &sampler.1 {
                        c.apply(&mut row, *eos);
                    }
                    Some(Pick::Tokens(vec![sampler.lock().draw(&row)]))
                }
                (Some(sampler), _) => {
                    let drafts = match model_drafts.and_then(|d| d.get(*item)) {
                        Some(d) if it.model_drafts => d.as_slice(),
                        _ => it.drafted(),
                    };
                    Some(Pick::Tokens(verify(&sampler.lock(), drawn, drafts)))
                }
                (None, Some(row)) => Some(Pick::Row(log_softmax(row))),
            };
            *pick = if scores.is_empty() {
                draw
            } else {
                Some(Pick::Scored(scores, draw.map(Box::new)))
            };
        };
        // One item (batch-1 decode) runs on this thread without a hand-out.
        framework::threads::with_current(|pool| pool.for_each_mut(&mut chosen, choose));
        if picks.len() < self.plan.items.len() {
            picks.resize(self.plan.items.len(), None);
        }
        for (item, _, pick) in chosen {
            picks[item] = pick;
        }
    }
}

/// Draws through `rows` (one per position, the last `drafts.len() + 1` of
/// an item) while each draw equals the next draft: the kept drafts, then the
/// first draw that differs or follows the last draft.
fn verify(sampler: &Sampler, rows: &[&[f32]], drafts: &[u32]) -> Vec<Draw> {
    let mut draws = Vec::with_capacity(rows.len());
    let mut moved: Option<Sampler> = None;
    for (i, row) in rows.iter().enumerate() {
        let draw = moved.as_ref().unwrap_or(sampler).draw(row);
        let token = draw.token;
        draws.push(draw);
        if drafts.get(i) != Some(&token) {
            break;
        }
        moved.get_or_insert_with(|| sampler.clone()).accept(token);
    }
    draws
}

#[cfg(test)]
mod tests {
    use super::*;
    use framework::batching::StepItem;
    use framework::SamplingParams;

    fn item(group: u64, logits: bool) -> StepItem {
        StepItem {
            group,
            seq: Default::default(),
            tokens: vec![1],
            start: 0,
            table: vec![0],
            logits,
            drafts: 0,
            model_drafts: false,
            draft_prev: None,
            scored: 0..0,
        }
    }

    #[test]
    fn sampled_items_get_draws_beams_get_rows_and_others_nothing() {
        let sampled = SharedSampler::new(Sampler::new(SamplingParams::greedy(4), &[]));
        let step = LlmStep {
            plan: StepPlan {
                items: vec![item(1, true), item(2, false), item(3, true)],
                ..Default::default()
            },
            samplers: vec![Some(sampled.clone()), None, None],
            scoring: vec![None, None, None],
        };
        // A micro-batch of items 1 and 2 (item 1 wants no logits), then one of
        // item 0.
        let mut picks = Picks::new();
        let second = Logits {
            vocab: 3,
            data: vec![0.0, 0.0, 5.0],
            item_rows: vec![0..0, 0..1],
        };
        step.pick(1, &second, &mut picks, None);
        let first = Logits {
            vocab: 3,
            data: vec![0.0, 4.0, 1.0],
            item_rows: std::iter::once(0..1).collect(),
        };
        step.pick(0, &first, &mut picks, None);
        assert_eq!(picks.len(), 3);
        match &picks[0] {
            Some(Pick::Tokens(d)) => assert_eq!(d[0].token, 1),
            other => panic!("item 0: {other:?}"),
        }
        assert_eq!(picks[1], None);
        match &picks[2] {
            Some(Pick::Row(r)) => assert_eq!(r, &log_softmax(&[0.0, 0.0, 5.0])),
            other => panic!("item 2: {other:?}"),
        }
        // Drawing changed nothing: only the merger accepts.
        assert_eq!(sampled.lock().draw(&[0.0, 4.0, 1.0]).token, 1);
    }

    #[test]
    fn scored_rows_score_the_next_prompt_token_and_the_last_row_draws() {
        let greedy = SharedSampler::new(Sampler::new(SamplingParams::greedy(4), &[]));
        let prompt = vec![0, 1, 2, 3, 0];
        // The chunk of positions 1..5 scores rows 2 and 3; row 4 draws.
        let it = StepItem {
            tokens: vec![1, 2, 3, 0],
            start: 1,
            scored: 2..4,
            ..item(1, true)
        };
        assert_eq!(it.logits_rows(), 3);
        let step = LlmStep {
            plan: StepPlan {
                items: vec![it],
                ..Default::default()
            },
            samplers: vec![Some(greedy)],
            scoring: vec![Some(Arc::new(ScoreSpec {
                prompt,
                top: 1,
                rows: true,
            }))],
        };
        let rows = vec![0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0, 0.0, 9.0, 0.0, 0.0];
        let logits = Logits {
            vocab: 4,
            data: rows.clone(),
            item_rows: std::iter::once(0..3).collect(),
        };
        let mut picks = Picks::new();
        step.pick(0, &logits, &mut picks, None);
        let Some(Pick::Scored(scores, Some(draw))) = &picks[0] else {
            panic!("{:?}", picks[0]);
        };
        assert_eq!(
            scores
                .iter()
                .map(|s| (s.position, s.token))
                .collect::<Vec<_>>(),
            [(3, 3), (4, 0)]
        );
        assert!((scores[0].logprob - log_softmax(&rows[0..4])[3]).abs() < 1e-6);
        assert!((scores[1].logprob - log_softmax(&rows[4..8])[0]).abs() < 1e-6);
        assert_eq!(scores[0].top[0].0, 3);
        assert_eq!(scores[1].row.as_ref().map(|r| r.best), Some(0));
        assert!(matches!(&**draw, Pick::Tokens(d) if d[0].token == 1));
    }

    #[test]
    fn drafts_are_kept_while_the_draws_match_them() {
        let rows: Vec<Vec<f32>> = vec![
            vec![0.0, 5.0, 0.0, 0.0],
            vec![0.0, 0.0, 5.0, 0.0],
            vec![0.0, 0.0, 0.0, 5.0],
        ];
        let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let greedy = Sampler::new(SamplingParams::greedy(8), &[]);
        let tokens = |d: Vec<Draw>| d.into_iter().map(|d| d.token).collect::<Vec<_>>();
        // Both drafts match: kept, plus the draw after them.
        assert_eq!(tokens(verify(&greedy, &rows, &[1, 2])), [1, 2, 3]);
        // The second differs: the first is kept, the second replaced.
        assert_eq!(tokens(verify(&greedy, &rows, &[1, 0])), [1, 2]);
        assert_eq!(tokens(verify(&greedy, &rows[..1], &[])), [1]);

        // Sampled: the draws are those of a sampler that accepts each token
        // in turn (the stream position and the penalties move on).
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            frequency_penalty: 1.5,
            ..SamplingParams::greedy(8)
        };
        let flat: Vec<Vec<f32>> = (0..6).map(|_| vec![0.5, 0.4, 0.3, 0.2]).collect();
        let flat: Vec<&[f32]> = flat.iter().map(Vec::as_slice).collect();
        let mut plain = Sampler::new(params.clone(), &[]);
        let want: Vec<u32> = flat
            .iter()
            .map(|row| {
                let t = plain.draw(row).token;
                plain.accept(t);
                t
            })
            .collect();
        let speculating = Sampler::new(params, &[]);
        let got = tokens(verify(&speculating, &flat, &want[..5]));
        assert_eq!(got, want, "every draft is the draw itself");
    }
}
