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

use std::sync::{Arc, Mutex, MutexGuard};

use framework::batching::StepPlan;
use framework::sampling::{log_softmax, Draw, Sampler};
use framework::Logits;

/// A sampling request's sampler, shared by the policy, the nodes and the merger.
#[derive(Debug, Clone)]
pub struct SharedSampler(Arc<Mutex<Sampler>>);

impl SharedSampler {
    /// Shares `sampler`.
    pub fn new(sampler: Sampler) -> Self {
        Self(Arc::new(Mutex::new(sampler)))
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
}

/// How an item's next token was chosen on the last stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// Drawn by the item's sampler.
    Token(Draw),
    /// A beam's row of log-probabilities over the vocabulary (the merger's
    /// beam search chooses).
    Row(Vec<f32>),
}

/// What the last stage's rank 0 returns: for each item of the step, its
/// pick, where it wanted logits.
pub type Picks = Vec<Option<Pick>>;

impl LlmStep {
    /// Chooses the next token of every item among `first..` whose logits
    /// `logits` (a micro-batch's, item rows relative to `first`) holds, into
    /// `picks`: draws for sampled items, log-probability rows for beams. The
    /// items are independent, so they are chosen in parallel on the calling
    /// thread's compute pool.
    pub fn pick(&self, first: usize, logits: &Logits, picks: &mut Picks) {
        let mut chosen: Vec<(usize, &[f32], Option<Pick>)> = (0..logits.item_rows.len())
            .filter_map(|i| Some((first + i, logits.last(i)?, None)))
            .collect();
        let choose = |_: usize, (item, row, pick): &mut (usize, &[f32], Option<Pick>)| {
            *pick = Some(match self.samplers.get(*item).and_then(Option::as_ref) {
                Some(sampler) => Pick::Token(sampler.lock().draw(row)),
                None => Pick::Row(log_softmax(row)),
            });
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
        };
        // A micro-batch of items 1 and 2 (item 1 wants no logits), then one of
        // item 0.
        let mut picks = Picks::new();
        let second = Logits {
            vocab: 3,
            data: vec![0.0, 0.0, 5.0],
            item_rows: vec![0..0, 0..1],
        };
        step.pick(1, &second, &mut picks);
        let first = Logits {
            vocab: 3,
            data: vec![0.0, 4.0, 1.0],
            item_rows: std::iter::once(0..1).collect(),
        };
        step.pick(0, &first, &mut picks);
        assert_eq!(picks.len(), 3);
        match &picks[0] {
            Some(Pick::Token(d)) => assert_eq!(d.token, 1),
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
}
