//! Continuous (iteration-level) batching for one model replica, as a plain
//! state machine: which sequences run in the next step, with how many tokens,
//! in which KV blocks.
//!
//! Follows Orca's iteration-level scheduling (Yu et al. 2022) and vLLM's block
//! manager (Kwon et al. 2023):
//!
//! * Work is grouped by request ([`GroupId`]); a group holds one sequence, or
//!   the live beams of a beam search. A group is the unit of admission and of
//!   preemption.
//! * Each step first serves running groups, oldest first (a decoding sequence
//!   adds one token; a prompt still being prefilled adds a chunk), then admits
//!   waiting groups (preempted ones ahead of new ones) while the step's token
//!   budget (`max_batch_tokens`), the running-group cap (`max_running`) and the
//!   free KV blocks allow. Long prompts are prefilled in chunks of what the
//!   budget leaves, so running decodes are never starved.
//! * When a running group needs a KV block and none is free, the newest running
//!   groups not yet in this step are preempted: their blocks are freed and they
//!   wait to be recomputed from their tokens (prompt and generated so far).
//! * With prefix caching (`BatchConfig::prefix_caching`, see
//!   [`crate::kv`]), a group taken from the waiting queue starts each of its
//!   sequences at the longest cached prefix of its tokens (new requests and
//!   preempted ones alike), and every full block a completed step computed is
//!   registered for later sequences. A waiting group whose first uncached
//!   block is one the step being planned computes for another group waits a
//!   step, and then reuses it (SGLang's in-batch prefix sharing, by waiting).
//!   A failed step ([`BatchScheduler::reset`])
//!   forgets the cache with the nodes' contents.
//! * A group asks for logits only in a step that brings every one of its
//!   sequences up to date, so a beam search always sees all its beams at once.
//!   A chunk that does not finish the group stops one token short of the end.
//! * A group that speculates ([`BatchScheduler::add_speculative`]) appends up
//!   to `num_speculative_tokens` drafted tokens ([`crate::speculative`]) to
//!   a row that wants logits, as far as the step's token budget, its free KV
//!   blocks (speculation never preempts) and the request's `max_tokens`
//!   allow, and only while at most `speculate_max_running` groups run. The
//!   merger answers with the tokens it accepted ([`GroupOutcome::Accepted`]):
//!   the drafts kept stay computed, and the KV blocks written only for
//!   rejected drafts are given back. Drafted positions are never registered
//!   in the prefix cache before they are accepted.
//! * A group that scores its prompt ([`BatchScheduler::score_prompt`]: prompt
//!   log-probabilities, perplexity) asks for the logits of every prompt
//!   position from a chosen one on, in each chunk that covers them
//!   ([`StepItem::scored`]), never drafts, and reuses a cached prefix only
//!   below those positions. Positions a completed step scored are not scored
//!   again when the group is preempted and recomputed.
//!
//! **Invariants:** at most one step is in flight; a sequence's KV blocks are
//! freed exactly once (on finish, cancel, preemption or reset); a group is in
//! exactly one of waiting, running, or gone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;

use crate::kv::{KvManager, KvUsage, SeqKey};
use crate::model::LogitsWanted;
use crate::speculative::{ngram_draft, SpecMethod, Speculation};

/// A request's id: the unit of admission, preemption and cancellation.
pub type GroupId = u64;

/// The token a plan holds where the draft model's drafts will be
/// ([`StepItem::model_drafts`]); never computed as such.
pub const DRAFT_PLACEHOLDER: u32 = 0;

/// Limits of one replica's batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Tokens (rows) per step, prefill chunks and decodes together.
    pub max_batch_tokens: usize,
    /// Groups running at once.
    pub max_running: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// KV blocks of the replica.
    pub kv_blocks: usize,
    /// Micro-batches each step is cut into (the pipeline depth, so that every
    /// stage has work while later stages finish earlier micro-batches).
    pub micro_batches: usize,
    /// Whether full KV blocks are cached and reused across sequences by their
    /// tokens (automatic prefix caching).
    pub prefix_caching: bool,
    /// Speculating groups draft only while at most this many groups run
    /// (under load, verifying drafts costs compute that batching already
    /// uses well).
    pub speculate_max_running: usize,
}

impl BatchConfig {
    /// Positions the KV cache holds in all.
    pub fn kv_positions(&self) -> usize {
        self.block_size * self.kv_blocks
    }
}

/// One sequence's rows in a step.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepItem {
    /// The request.
    pub group: GroupId,
    /// The sequence (its KV block table's key).
    pub seq: SeqKey,
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// Position of the first new token.
    pub start: usize,
    /// The sequence's block table.
    pub table: Vec<u32>,
    /// Whether the last new token's logits are wanted.
    pub logits: bool,
    /// Of `tokens`, how many at the end are drafts to verify (speculative
    /// decoding): the logits of the last `drafts + 1` tokens are wanted.
    pub drafts: usize,
    /// Whether the drafts are the draft model's, to be made during the
    /// step: `tokens` then ends in `drafts` placeholders
    /// ([`DRAFT_PLACEHOLDER`]) that the replica's draft node replaces
    /// before the target's nodes compute them.
    pub model_drafts: bool,
    /// For a request that speculates with the draft model: the token at
    /// position `start - 1`, which the draft node computes again (the
    /// previous step's last draft, kept or not, whose keys and values it
    /// had no reason to write before it knew it was kept).
    pub draft_prev: Option<u32>,
    /// Positions whose logits score the prompt (the row at position `p`
    /// gives the log-probability of prompt token `p + 1`); empty unless the
    /// group scores its prompt. Every row from the first of them to the
    /// item's end is computed.
    pub scored: Range<usize>,
}

impl StepItem {
    /// The drafted tokens at the end of `tokens`.
    pub fn drafted(&self) -> &[u32] {
        &self.tokens[self.tokens.len() - self.drafts..]
    }

    /// How many rows at the end of the item get logits: from the first
    /// scored position on, or the last `drafts + 1` where it draws.
    pub fn logits_rows(&self) -> usize {
        let end = self.start + self.tokens.len();
        let scored = if self.scored.is_empty() {
            0
        } else {
            end - self.scored.start
        };
        let drawn = if self.logits { self.drafts + 1 } else { 0 };
        scored.max(drawn)
    }

    /// The logits the forward computes for this item.
    pub fn logits_wanted(&self) -> LogitsWanted {
        match (self.logits_rows(), self.logits && self.scored.is_empty()) {
            (0, _) => LogitsWanted::None,
            (1, true) => LogitsWanted::Last,
            (n, _) => LogitsWanted::Tail(n),
        }
    }
}

/// One step for the replica's compute nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepPlan {
    /// Step number within the replica, from 0.
    pub id: u64,
    /// The rows, grouped by sequence.
    pub items: Vec<StepItem>,
    /// KV blocks to copy `(src, dst)` before computing (copy-on-write).
    pub copies: Vec<(u32, u32)>,
    /// Item ranges, one per micro-batch, in order.
    pub micro_batches: Vec<Range<usize>>,
}

impl StepPlan {
    /// Rows in the step.
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.tokens.len()).sum()
    }
}

/// What the merger decided for a group whose logits the step returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    /// The group goes on: each `(parent, token)` makes one sequence that
    /// continues `parent` with `token` (one entry for ordinary decoding; beam
    /// search may fork a parent several times or drop it).
    Continue(Vec<(SeqKey, u32)>),
    /// A single-sequence group goes on with these tokens appended: the
    /// leading drafts its step verified, then the token drawn after them
    /// (so all but the last are kept drafts).
    Accepted(Vec<u32>),
    /// The group is done; its blocks are freed.
    Finished,
}

#[derive(Debug, Clone)]
struct Seq {
    key: SeqKey,
    tokens: Vec<u32>,
    computed: usize,
    /// Tokens drafted after `tokens` in the step in flight (their KV is
    /// being written past `computed`).
    drafts: Vec<u32>,
}

impl Seq {
    fn new(key: SeqKey, tokens: Vec<u32>) -> Self {
        Self {
            key,
            tokens,
            computed: 0,
            drafts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    seqs: Vec<Seq>,
    /// Admission order; lower is older. Expedited groups' orders are below
    /// [`FIRST_ORDER`], every other group's at or above it.
    order: u64,
    /// How the group speculates, and the tokens its sequence may hold at
    /// most (prompt plus `max_tokens`).
    spec: Option<(Speculation, usize)>,
    /// Which prompt positions it scores, if it does.
    score: Option<Scoring>,
}

/// The prompt positions a group scores: rows `from..end` (`end` is the last
/// prompt position, whose row predicts the first generated token), of which
/// those below `done` were scored by completed steps.
#[derive(Debug, Clone, Copy)]
struct Scoring {
    from: usize,
    end: usize,
    done: usize,
}

impl Scoring {
    /// The positions a chunk of `range` scores.
    fn within(&self, range: Range<usize>) -> Range<usize> {
        let a = range.start.max(self.from).max(self.done);
        let b = range.end.min(self.end);
        if a < b {
            a..b
        } else {
            0..0
        }
    }

    /// The first position a cached prefix may not cover (its rows must be
    /// computed).
    fn needed_from(&self) -> usize {
        self.from.max(self.done)
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Groups preempted so far.
    pub preemptions: u64,
    /// Steps planned so far.
    pub steps: u64,
    /// Tokens drafted in steps whose request went on (speculative decoding).
    pub drafted: u64,
    /// Of those, accepted.
    pub accepted: u64,
}

/// The first admission order of a group that is not expedited: the orders
/// below it are expedited groups' ([`BatchScheduler::expedite`]), which count
/// as older than all others.
const FIRST_ORDER: u64 = 1 << 62;

/// The batching state of one replica.
#[derive(Debug)]
pub struct BatchScheduler {
    cfg: BatchConfig,
    kv: KvManager,
    groups: HashMap<GroupId, Group>,
    waiting: VecDeque<GroupId>,
    running: Vec<GroupId>,
    in_flight: Option<HashSet<GroupId>>,
    cancelled: HashSet<GroupId>,
    next_key: SeqKey,
    next_order: u64,
    /// The next expedited group's order (below [`FIRST_ORDER`]).
    next_expedited: u64,
    stats: BatchStats,
}

impl BatchScheduler {
    /// An empty scheduler.
    pub fn new(cfg: BatchConfig) -> Self {
        let kv = if cfg.prefix_caching {
            KvManager::with_prefix_cache(cfg.block_size, cfg.kv_blocks)
        } else {
            KvManager::new(cfg.block_size, cfg.kv_blocks)
        };
        Self {
            cfg,
            kv,
            groups: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: None,
            cancelled: HashSet::new(),
            next_key: 0,
            next_order: FIRST_ORDER,
            next_expedited: 0,
            stats: BatchStats::default(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// KV block usage.
    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    /// Counters.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Positions of `tokens` this scheduler's prefix cache holds now (see
    /// [`KvManager::cached_prefix`]).
    pub fn cached_prefix(&self, tokens: &[u32]) -> usize {
        self.kv.cached_prefix(tokens)
    }

    /// The prefix cache's counters (zeros without prefix caching).
    pub fn prefix_stats(&self) -> crate::kv::PrefixStats {
        self.kv.prefix_stats()
    }

    /// Groups waiting (new or preempted).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Groups running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Groups held in any state.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether no group is held.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a step is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether `group` is held.
    pub fn contains(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    /// Adds a request with its prompt; it waits behind earlier ones.
    pub fn add(&mut self, group: GroupId, prompt: Vec<u32>) {
        let key = self.new_key();
        let order = self.next_order;
        self.next_order += 1;
        self.groups.insert(
            group,
            Group {
                seqs: vec![Seq::new(key, prompt)],
                order,
                spec: None,
                score: None,
            },
        );
        self.waiting.push_back(group);
    }

    /// Puts waiting group `g` (a health probe: one short sequence) before
    /// every other: it counts as older than all of them, so it is admitted
    /// first (past `max_running`), its tokens are set aside before the
    /// running groups' chunks take a step's budget, and it is never
    /// preempted for another's blocks. Neither a long prefill nor a backlog
    /// waiting for KV room then holds it for more than the step in flight,
    /// unless the running groups hold every block: it takes the first one
    /// freed and makes none of them preempt. A group already admitted is
    /// left as it is.
    pub fn expedite(&mut self, g: GroupId) {
        let Some(at) = self.waiting.iter().position(|&w| w == g) else {
            return;
        };
        if let Some(group) = self.groups.get_mut(&g) {
            group.order = self.next_expedited;
            self.next_expedited += 1;
        }
        self.waiting.remove(at);
        // Behind the expedited groups already waiting.
        self.wait_in_order(g);
    }

    /// Puts `g` among the waiting groups by its order (age).
    fn wait_in_order(&mut self, g: GroupId) {
        let Some(order) = self.groups.get(&g).map(|group| group.order) else {
            return;
        };
        let at = self
            .waiting
            .iter()
            .position(|w| self.groups.get(w).is_none_or(|o| o.order > order))
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, g);
    }

    /// Adds a single-sequence request that drafts tokens as `spec` says
    /// (nothing when it is off), for at most `max_tokens` new tokens.
    pub fn add_speculative(
        &mut self,
        group: GroupId,
        prompt: Vec<u32>,
        spec: Speculation,
        max_tokens: usize,
    ) {
        let limit = prompt.len() + max_tokens;
        self.add(group, prompt);
        if spec.enabled() {
            if let Some(g) = self.groups.get_mut(&group) {
                g.spec = Some((spec, limit));
            }
        }
    }

    /// Makes single-sequence group `g`, not yet planned, return the logits
    /// of its prompt positions from `from` on (the row at position `p`
    /// scores prompt token `p + 1`), in the steps that compute them; it then
    /// drafts nothing.
    pub fn score_prompt(&mut self, g: GroupId, from: usize) {
        if let Some(group) = self.groups.get_mut(&g) {
            if let [s] = &group.seqs[..] {
                let end = s.tokens.len().saturating_sub(1);
                group.score = Some(Scoring { from, end, done: 0 });
                group.spec = None;
            }
        }
    }

    /// The tokens group `g` drafts after its sequence, at most `room`.
    fn draft(&self, g: GroupId, room: usize) -> Vec<u32> {
        let group = &self.groups[&g];
        let (Some((spec, limit)), [s]) = (group.spec, &group.seqs[..]) else {
            return Vec::new();
        };
        if self.running.len() > self.cfg.speculate_max_running {
            return Vec::new();
        }
        // Every drafted token accepted, plus the one drawn after them, must
        // fit in `max_tokens`.
        let k = spec
            .num_speculative_tokens
            .min(room)
            .min(limit.saturating_sub(s.tokens.len() + 1));
        match spec.method {
            SpecMethod::None => Vec::new(),
            SpecMethod::Ngram => ngram_draft(&s.tokens, spec.ngram_min, spec.ngram_max, k),
            SpecMethod::Draft => vec![DRAFT_PLACEHOLDER; k],
        }
    }

    fn new_key(&mut self) -> SeqKey {
        self.next_key += 1;
        self.next_key
    }

    /// Plans the next step, or `None` when there is nothing to run (or a step is
    /// already in flight).
    pub fn plan(&mut self) -> Option<StepPlan> {
        if self.in_flight.is_some() {
            return None;
        }
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = StepPlan {
            id: self.stats.steps,
            ..StepPlan::default()
        };
        let mut planned = HashSet::new();
        // Hashes of the full blocks this step's items complete: a waiting
        // group whose next block is among them waits a step and then finds
        // it cached, instead of computing the same prefix beside it.
        let mut pending = HashSet::new();

        // Expedited groups (health probes) waiting to be admitted: their
        // tokens are set aside before the running groups' chunks take the
        // budget, and they are admitted once the running groups have the
        // blocks this step needs (so a probe never makes one preempt).
        let reserved: usize = self
            .waiting
            .iter()
            .take_while(|g| self.groups[*g].order < FIRST_ORDER)
            .map(|g| {
                self.groups[g]
                    .seqs
                    .iter()
                    .map(|s| s.tokens.len())
                    .sum::<usize>()
            })
            .sum::<usize>()
            .min(budget);
        budget -= reserved;
        // Running groups, oldest first.
        let mut order = self.running.clone();
        order.sort_by_key(|g| self.groups[g].order);
        for g in order {
            if budget == 0 {
                break;
            }
            // A group preempted for an older one's blocks is no longer running.
            if self.running.contains(&g) {
                let from = plan.items.len();
                if let Fit::Planned = self.fit(g, &mut budget, &mut plan, &planned) {
                    planned.insert(g);
                    self.note_pending(&plan.items[from..], &mut pending);
                }
            }
        }
        budget += reserved;
        // Then waiting groups, in order (expedited ones first), while they
        // fit without preempting.
        while let Some(&g) = self.waiting.front() {
            if !self.admit_front(g, &mut budget, &mut plan, &mut planned, &mut pending) {
                break;
            }
        }
        if plan.items.is_empty() {
            return None;
        }
        plan.micro_batches = split_micro_batches(&plan.items, self.cfg.micro_batches);
        self.stats.steps += 1;
        self.in_flight = Some(planned);
        Some(plan)
    }

    /// Admits `g`, the first waiting group, and plans it, if the budget and
    /// `max_running` leave room and it fits without preempting; whether it
    /// did.
    fn admit_front(
        &mut self,
        g: GroupId,
        budget: &mut usize,
        plan: &mut StepPlan,
        planned: &mut HashSet<GroupId>,
        pending: &mut HashSet<u64>,
    ) -> bool {
        // An expedited group runs past `max_running`: it is one short
        // sequence, and a full running set must not hold a health probe.
        let expedited = self.groups[&g].order < FIRST_ORDER;
        if *budget == 0 || (self.running.len() >= self.cfg.max_running && !expedited) {
            return false;
        }
        self.reuse_prefixes(g);
        if self.next_block_pending(g, pending) || !self.fits_without_preempting(g, *budget) {
            // Give the cached blocks back (they stay cached).
            self.release_blocks(g);
            return false;
        }
        for s in &self.groups[&g].seqs {
            self.kv.count_admission(s.tokens.len(), s.computed);
        }
        self.waiting.pop_front();
        self.running.push(g);
        let from = plan.items.len();
        if let Fit::Planned = self.fit(g, budget, plan, planned) {
            planned.insert(g);
            self.note_pending(&plan.items[from..], pending);
        }
        true
    }

    /// Adds the hashes of the full blocks `items` complete to `pending` (if
    /// some group waits to be admitted).
    fn note_pending(&self, items: &[StepItem], pending: &mut HashSet<u64>) {
        if self.waiting.is_empty() {
            return;
        }
        for item in items {
            let Some(s) = self.groups[&item.group]
                .seqs
                .iter()
                .find(|s| s.key == item.seq)
            else {
                continue;
            };
            let upto = item.start + item.tokens.len() - item.drafts;
            pending.extend(self.kv.next_hashes(s.key, &s.tokens[..upto], upto));
        }
    }

    /// Whether the first block of waiting group `g` past its cached prefix
    /// is one this step computes for another group (it is cheaper to wait a
    /// step and reuse it).
    fn next_block_pending(&self, g: GroupId, pending: &HashSet<u64>) -> bool {
        if pending.is_empty() {
            return false;
        }
        self.groups[&g].seqs.iter().any(|s| {
            let upto = (s.computed + self.cfg.block_size).min(s.tokens.len().saturating_sub(1));
            self.kv
                .next_hashes(s.key, &s.tokens, upto)
                .first()
                .is_some_and(|h| pending.contains(h))
        })
    }

    /// Starts each sequence of waiting group `g` at its longest cached
    /// prefix (`computed` = the positions reused).
    fn reuse_prefixes(&mut self, g: GroupId) {
        if let Some(group) = self.groups.get_mut(&g) {
            for s in &mut group.seqs {
                // Rows a scoring group still needs are computed, not reused:
                // the lookup leaves at least the last token it is given.
                let upto = group.score.map_or(s.tokens.len(), |sc| {
                    (sc.needed_from() + 1).min(s.tokens.len())
                });
                s.computed = self.kv.lookup(s.key, &s.tokens[..upto]);
            }
        }
    }

    /// Frees the blocks of `g`'s sequences, which start over from position 0.
    fn release_blocks(&mut self, g: GroupId) {
        if let Some(group) = self.groups.get_mut(&g) {
            for s in &mut group.seqs {
                self.kv.release(s.key);
                s.computed = 0;
                s.drafts.clear();
            }
        }
    }

    fn chunks(&self, g: GroupId, budget: usize) -> (Vec<usize>, bool) {
        let group = &self.groups[&g];
        let remaining: Vec<usize> = group
            .seqs
            .iter()
            .map(|s| s.tokens.len() - s.computed)
            .collect();
        if remaining.iter().sum::<usize>() <= budget {
            return (remaining, true);
        }
        let mut left = budget;
        let chunks = remaining
            .iter()
            .map(|&r| {
                let n = r.saturating_sub(1).min(left);
                left -= n;
                n
            })
            .collect();
        (chunks, false)
    }

    fn fits_without_preempting(&self, g: GroupId, budget: usize) -> bool {
        let (chunks, _) = self.chunks(g, budget);
        let group = &self.groups[&g];
        let need: usize = group
            .seqs
            .iter()
            .zip(&chunks)
            .map(|(s, &n)| self.kv.blocks_needed(s.key, s.computed + n))
            .sum();
        chunks.iter().any(|&n| n > 0) && need <= self.kv.free_blocks()
    }

    /// Plans group `g` into the step, preempting newer unplanned groups for KV
    /// blocks if needed.
    fn fit(
        &mut self,
        g: GroupId,
        budget: &mut usize,
        plan: &mut StepPlan,
        planned: &HashSet<GroupId>,
    ) -> Fit {
        let (chunks, complete) = self.chunks(g, *budget);
        if chunks.iter().all(|&n| n == 0) {
            return Fit::Skipped;
        }
        let mut drafts = if complete {
            self.draft(g, *budget - chunks.iter().sum::<usize>())
        } else {
            Vec::new()
        };
        loop {
            let group = &self.groups[&g];
            let need: usize = group
                .seqs
                .iter()
                .zip(&chunks)
                .map(|(s, &n)| self.kv.blocks_needed(s.key, s.computed + n + drafts.len()))
                .sum();
            if need <= self.kv.free_blocks() {
                break;
            }
            // Speculation never preempts: drop the drafts first.
            if !drafts.is_empty() {
                drafts.clear();
                continue;
            }
            // The newest running group that is neither planned nor `g` itself.
            let victim = self
                .running
                .iter()
                .copied()
                .filter(|v| *v != g && !planned.contains(v))
                .max_by_key(|v| self.groups[v].order);
            match victim {
                Some(v) => self.preempt(v),
                None => {
                    self.preempt(g);
                    return Fit::Preempted;
                }
            }
        }
        let group = self.groups.get_mut(&g).expect("planned groups exist");
        let by_model = group
            .spec
            .is_some_and(|(spec, _)| spec.method == SpecMethod::Draft);
        for (s, &n) in group.seqs.iter_mut().zip(&chunks) {
            if n == 0 {
                continue;
            }
            // Drafts are only ever made for a single-sequence group.
            s.drafts = std::mem::take(&mut drafts);
            let d = s.drafts.len();
            self.kv
                .grow(s.key, s.computed + n + d, &mut plan.copies)
                .expect("checked against the free count");
            let mut tokens = s.tokens[s.computed..s.computed + n].to_vec();
            tokens.extend_from_slice(&s.drafts);
            let scored = group
                .score
                .map_or(0..0, |sc| sc.within(s.computed..s.computed + n));
            plan.items.push(StepItem {
                group: g,
                seq: s.key,
                tokens,
                start: s.computed,
                table: self.kv.table(s.key).to_vec(),
                logits: complete,
                drafts: d,
                model_drafts: by_model && d > 0,
                draft_prev: if by_model && s.computed > 0 {
                    s.tokens.get(s.computed - 1).copied()
                } else {
                    None
                },
                scored,
            });
            s.computed += n;
            *budget -= n + d;
        }
        Fit::Planned
    }

    /// Frees `g`'s blocks and puts it back at the head of the waiting groups
    /// (ordered by age), to be recomputed from its tokens.
    fn preempt(&mut self, g: GroupId) {
        self.running.retain(|&r| r != g);
        self.release_blocks(g);
        if self.groups.contains_key(&g) {
            self.wait_in_order(g);
            self.stats.preemptions += 1;
        }
    }

    /// Applies the outcome of the in-flight step: for each group whose logits it
    /// returned, what the merger decided. Returns the groups that ended (finished
    /// or cancelled while in flight); their blocks are freed.
    pub fn complete(&mut self, outcomes: Vec<(GroupId, GroupOutcome)>) -> Vec<GroupId> {
        // The step's keys and values are written: cache its full blocks
        // (before finished groups release theirs, so that a conversation's
        // next turn finds this one's).
        let stepped = self.in_flight.take().unwrap_or_default();
        for g in &stepped {
            if let Some(group) = self.groups.get_mut(g) {
                for s in &group.seqs {
                    self.kv.register(s.key, &s.tokens[..s.computed]);
                    // Its rows below `computed` are scored and delivered.
                    if let Some(sc) = &mut group.score {
                        sc.done = sc.done.max(s.computed.min(sc.end));
                    }
                }
            }
        }
        let mut ended = Vec::new();
        for (g, outcome) in outcomes {
            if !self.groups.contains_key(&g) {
                continue;
            }
            match outcome {
                GroupOutcome::Finished => {
                    self.remove(g);
                    ended.push(g);
                }
                GroupOutcome::Continue(next) => self.advance(g, next),
                GroupOutcome::Accepted(tokens) => self.accept(g, tokens),
            }
        }
        // Drafts no outcome accepted are rejected: their blocks go back.
        for g in &stepped {
            if let Some(group) = self.groups.get_mut(g) {
                for s in &mut group.seqs {
                    if !std::mem::take(&mut s.drafts).is_empty() {
                        self.kv.truncate(s.key, s.computed);
                    }
                }
            }
        }
        for g in std::mem::take(&mut self.cancelled) {
            if self.remove(g) {
                ended.push(g);
            }
        }
        ended
    }

    /// Appends `tokens` to single-sequence group `g`: its leading drafts
    /// (verified by the step: all of `tokens` but the last) stay computed,
    /// the KV written for the rest is dropped. The count, not the tokens,
    /// says which drafts were kept, since a draft model's drafts are made
    /// on the nodes and the plan holds only their places.
    fn accept(&mut self, g: GroupId, tokens: Vec<u32>) {
        let Some(group) = self.groups.get_mut(&g) else {
            return;
        };
        let [s] = &mut group.seqs[..] else {
            return;
        };
        let drafts = std::mem::take(&mut s.drafts);
        let kept = tokens.len().saturating_sub(1).min(drafts.len());
        s.tokens.extend_from_slice(&tokens);
        s.computed += kept;
        if !drafts.is_empty() {
            self.kv.truncate(s.key, s.computed);
            self.stats.drafted += drafts.len() as u64;
            self.stats.accepted += kept as u64;
        }
    }

    fn advance(&mut self, g: GroupId, next: Vec<(SeqKey, u32)>) {
        let mut uses: HashMap<SeqKey, usize> = HashMap::new();
        for (p, _) in &next {
            *uses.entry(*p).or_default() += 1;
        }
        let Some(group) = self.groups.get_mut(&g) else {
            return;
        };
        for s in &mut group.seqs {
            if !std::mem::take(&mut s.drafts).is_empty() {
                self.kv.truncate(s.key, s.computed);
            }
        }
        let old: HashMap<SeqKey, Seq> = group.seqs.drain(..).map(|s| (s.key, s)).collect();
        let mut seqs = Vec::with_capacity(next.len());
        for (parent, token) in next {
            let Some(p) = old.get(&parent) else { continue };
            let left = uses.get_mut(&parent).expect("counted above");
            *left -= 1;
            // The last child takes over the parent's blocks; earlier ones share them.
            let key = if *left == 0 {
                parent
            } else {
                self.next_key += 1;
                self.kv.fork(parent, self.next_key);
                self.next_key
            };
            let mut tokens = p.tokens.clone();
            tokens.push(token);
            seqs.push(Seq {
                computed: p.computed,
                ..Seq::new(key, tokens)
            });
        }
        for key in old.keys() {
            if !uses.contains_key(key) {
                self.kv.release(*key);
            }
        }
        if seqs.is_empty() {
            self.remove(g);
            return;
        }
        if let Some(group) = self.groups.get_mut(&g) {
            group.seqs = seqs;
        }
    }

    fn remove(&mut self, g: GroupId) -> bool {
        let Some(group) = self.groups.remove(&g) else {
            return false;
        };
        for s in group.seqs {
            self.kv.release(s.key);
        }
        self.running.retain(|&r| r != g);
        self.waiting.retain(|&w| w != g);
        true
    }

    /// Cancels `g`. Returns `true` if it ended now (its blocks are free), `false`
    /// if it is in the in-flight step and ends when that step completes, or if
    /// it is unknown (check [`BatchScheduler::contains`]).
    pub fn cancel(&mut self, g: GroupId) -> bool {
        if self.in_flight.as_ref().is_some_and(|f| f.contains(&g)) {
            self.cancelled.insert(g);
            return false;
        }
        self.remove(g)
    }

    /// Ends `g` at once whatever its state, freeing its blocks (for a request that
    /// failed for good). Any outcome of an in-flight step for it is ignored.
    pub fn drop_group(&mut self, g: GroupId) -> bool {
        self.remove(g)
    }

    /// The in-flight step failed and the nodes' KV contents are lost: every
    /// group's blocks are freed and every group waits to be recomputed, in age
    /// order. Returns the groups that were in the failed step.
    pub fn reset(&mut self) -> Vec<GroupId> {
        let failed: Vec<GroupId> = self
            .in_flight
            .take()
            .map(|f| f.into_iter().collect())
            .unwrap_or_default();
        for g in std::mem::take(&mut self.cancelled) {
            self.remove(g);
        }
        let mut all: Vec<GroupId> = self.groups.keys().copied().collect();
        all.sort_by_key(|g| self.groups[g].order);
        for &g in &all {
            self.release_blocks(g);
        }
        self.kv.clear_cache();
        self.running.clear();
        self.waiting = all.into();
        failed
    }
}

enum Fit {
    Planned,
    Skipped,
    Preempted,
}

/// Cuts items into at most `parts` contiguous ranges of about equal token counts.
fn split_micro_batches(items: &[StepItem], parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, items.len().max(1));
    let total: usize = items.iter().map(|i| i.tokens.len()).sum();
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut acc) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        acc += item.tokens.len();
        let left_items = items.len() - (i + 1);
        let left_parts = parts - out.len() - 1;
        if left_parts > 0 && (acc * parts >= total * (out.len() + 1) || left_items == left_parts) {
            out.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < items.len() {
        out.push(start..items.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_batch_tokens: usize, kv_blocks: usize) -> BatchConfig {
        BatchConfig {
            max_batch_tokens,
            max_running: 8,
            block_size: 4,
            kv_blocks,
            micro_batches: 1,
            prefix_caching: false,
            speculate_max_running: 8,
        }
    }

    /// A scheduler with prefix caching, 16 blocks of 4, 64 tokens a step.
    fn caching() -> BatchScheduler {
        BatchScheduler::new(BatchConfig {
            prefix_caching: true,
            ..cfg(64, 16)
        })
    }

    #[test]
    fn a_request_waits_a_step_for_the_prefix_another_computes() {
        let mut s = caching();
        s.add(1, (0..10).collect());
        s.add(2, (0..9).chain([40]).collect());
        s.add(3, vec![7; 6]);
        // Group 2's first block is being computed by group 1: it waits (and
        // so does group 3 behind it, in arrival order).
        let p = s.plan().unwrap();
        assert_eq!(p.items.iter().map(|i| i.group).collect::<Vec<_>>(), [1]);
        s.complete(cont(&p, 5));
        let p = s.plan().unwrap();
        let item = p.items.iter().find(|i| i.group == 2).unwrap();
        assert_eq!((item.start, item.tokens.len()), (8, 2));
        assert!(p.items.iter().any(|i| i.group == 3));
    }

    #[test]
    fn a_later_request_starts_after_the_cached_prefix() {
        let mut s = caching();
        s.add(1, (0..10).collect());
        let p = s.plan().unwrap();
        assert_eq!((p.items[0].start, p.items[0].tokens.len()), (0, 10));
        let first = p.items[0].table.clone();
        s.complete(vec![(1, GroupOutcome::Finished)]);
        assert_eq!(s.kv_usage().used, 0, "cached blocks are idle, not used");
        // Its two full blocks (positions 0..8) come from the cache.
        s.add(2, (0..9).chain([50, 51]).collect());
        let p = s.plan().unwrap();
        assert_eq!((p.items[0].start, p.items[0].tokens.len()), (8, 3));
        assert_eq!(p.items[0].table[..2], first[..2]);
        assert!(p.items[0].logits);
        assert_eq!(s.prefix_stats().queried_tokens, 21);
        assert_eq!(s.prefix_stats().hit_tokens, 8);
        // A request that shares only the first block reuses only it, even
        // while request 2 holds the blocks.
        s.complete(cont(&p, 5));
        s.add(3, (0..4).chain([70; 6]).collect());
        let p = s.plan().unwrap();
        let item = p.items.iter().find(|i| i.group == 3).unwrap();
        assert_eq!((item.start, item.table[0]), (4, first[0]));
        // A failed step loses the nodes' contents, and with them the cache.
        s.reset();
        let p = s.plan().unwrap();
        assert!(p.items.iter().all(|i| i.start == 0), "{p:?}");
    }

    /// n-gram speculation of `k` tokens that matches single tokens too.
    fn ngram1(k: usize) -> Speculation {
        Speculation {
            ngram_min: 1,
            ..Speculation::ngram(k)
        }
    }

    fn cont(plan: &StepPlan, token: u32) -> Vec<(GroupId, GroupOutcome)> {
        plan.items
            .iter()
            .filter(|i| i.logits)
            .map(|i| (i.group, GroupOutcome::Continue(vec![(i.seq, token)])))
            .collect()
    }

    #[test]
    fn drafts_ride_the_decode_and_rejected_ones_give_their_blocks_back() {
        let mut s = BatchScheduler::new(BatchConfig {
            prefix_caching: true,
            ..cfg(64, 16)
        });
        // "1 2 3 4 5 6 1 2": the bigram "1 2" recurs, followed by 3 4 5 6.
        let prompt = vec![1, 2, 3, 4, 5, 6, 1, 2];
        s.add_speculative(9, prompt.clone(), ngram1(3), 20);
        // The prompt's step drafts after its last token already.
        let p = s.plan().unwrap();
        let item = &p.items[0];
        assert_eq!((item.start, item.drafts), (0, 3));
        assert_eq!(item.tokens[8..], [3, 4, 5]);
        assert_eq!(item.drafted(), [3, 4, 5]);
        assert_eq!(p.tokens(), 11, "the drafts count against the budget");
        assert_eq!(s.kv_usage().used, 3, "11 positions in blocks of 4");
        // The model kept 3 and 4, then drew 7 instead of 5.
        s.complete(vec![(9, GroupOutcome::Accepted(vec![3, 4, 7]))]);
        assert_eq!(s.kv_usage().used, 3, "positions 0..10 are computed");
        assert_eq!((s.stats().drafted, s.stats().accepted), (3, 2));
        assert_eq!(s.prefix_stats().queried_tokens, 8);
        // The next step starts at the drawn token, position 10 (the drafts
        // 3 4 are computed): "4 7" does not recur, "7" neither: no drafts.
        let p = s.plan().unwrap();
        let item = &p.items[0];
        assert_eq!(
            (item.start, item.tokens.clone(), item.drafts),
            (10, vec![7], 0)
        );
        s.complete(vec![(9, GroupOutcome::Accepted(vec![1]))]);
        // "7 1" no, "1": latest earlier "1" at 6, followed by 2 3 4.
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].tokens, [1, 2, 3, 4]);
        // All rejected: the block holding only drafted positions goes back.
        let used = s.kv_usage().used;
        s.complete(vec![(9, GroupOutcome::Accepted(vec![5]))]);
        assert_eq!(s.kv_usage().used, used - 1);
        // Only blocks of accepted tokens were cached: 1 2 3 4 | 5 6 1 2 | 3 4 7 1.
        s.complete(vec![]);
        let _ = s.plan().unwrap();
        s.complete(vec![(9, GroupOutcome::Finished)]);
        assert_eq!(s.kv_usage().used, 0);
        assert_eq!(
            s.cached_prefix(&[1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 7, 1, 9]),
            12
        );
        assert_eq!(s.cached_prefix(&[1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 9]), 8);
    }

    #[test]
    fn drafts_stop_at_max_tokens_and_under_load() {
        let mut s = BatchScheduler::new(BatchConfig {
            speculate_max_running: 1,
            ..cfg(64, 32)
        });
        // 2 new tokens at most: one draft and the draw after it.
        s.add_speculative(1, vec![5, 6, 5], ngram1(4), 2);
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].drafted(), [6]);
        s.complete(vec![(1, GroupOutcome::Accepted(vec![8]))]);
        // One more token at most: no room for a draft.
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].drafts, 0);
        s.complete(vec![(1, GroupOutcome::Finished)]);
        // Two running groups exceed speculate_max_running: no drafts.
        s.add_speculative(2, vec![5, 6, 5], ngram1(4), 9);
        s.add_speculative(3, vec![5, 6, 5], ngram1(4), 9);
        // Group 2 was admitted alone and drafted; then both run.
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].drafts, 2);
        s.complete(vec![
            (2, GroupOutcome::Accepted(vec![6, 5, 6])),
            (3, GroupOutcome::Accepted(vec![6])),
        ]);
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].start, 5, "the two kept drafts are computed");
        assert!(p.items.iter().all(|i| i.drafts == 0), "{p:?}");
        // A request without speculation never drafts.
        let mut s = BatchScheduler::new(cfg(64, 32));
        s.add(4, vec![5, 6, 5]);
        assert_eq!(s.plan().unwrap().items[0].drafts, 0);
    }

    #[test]
    fn drafts_never_preempt() {
        // 3 blocks of 4: the prompt of 7 takes 2; 4 drafts would need a
        // third block that another group holds.
        let mut s = BatchScheduler::new(cfg(64, 3));
        s.add(1, vec![9; 2]);
        let p = s.plan().unwrap();
        s.complete(cont(&p, 9));
        s.add_speculative(2, vec![1, 2, 1, 2, 1, 2, 1], ngram1(4), 8);
        let p = s.plan().unwrap();
        let item = p.items.iter().find(|i| i.group == 2).unwrap();
        assert_eq!(item.drafts, 0);
        assert_eq!(s.stats().preemptions, 0);
    }

    #[test]
    fn long_prompts_are_chunked_behind_running_decodes() {
        let mut s = BatchScheduler::new(cfg(8, 64));
        s.add(1, vec![1; 3]);
        let p = s.plan().unwrap();
        assert_eq!(p.tokens(), 3);
        assert!(p.items[0].logits);
        s.complete(cont(&p, 7));
        s.add(2, vec![2; 20]);
        let p = s.plan().unwrap();
        // The decode first (1 token), then 7 tokens of the long prompt, no logits.
        assert_eq!(p.items.len(), 2);
        assert_eq!((p.items[0].group, p.items[0].tokens.clone()), (1, vec![7]));
        assert_eq!((p.items[1].group, p.items[1].tokens.len()), (2, 7));
        assert!(!p.items[1].logits);
        s.complete(cont(&p, 8));
        let p = s.plan().unwrap();
        assert_eq!(p.items[1].start, 7);
        assert_eq!(p.items[1].tokens.len(), 7);
        s.complete(cont(&p, 9));
        let p = s.plan().unwrap();
        assert_eq!(p.items[1].tokens.len(), 6, "the rest of the prompt");
        assert!(p.items[1].logits);
    }

    #[test]
    fn kv_exhaustion_preempts_the_newest_and_recomputes_it() {
        // 4 blocks of 4 positions; two prompts of 6 take 2 blocks each.
        let mut s = BatchScheduler::new(cfg(64, 4));
        s.add(1, vec![1; 6]);
        s.add(2, vec![2; 6]);
        let p = s.plan().unwrap();
        assert_eq!(p.items.len(), 2);
        s.complete(cont(&p, 5));
        // Both now need positions 6, then 7: still fits (blocks hold 8).
        for _ in 0..2 {
            let p = s.plan().unwrap();
            assert_eq!(p.items.len(), 2);
            s.complete(cont(&p, 5));
        }
        // Position 8 needs a third block each: the newer group is preempted.
        let p = s.plan().unwrap();
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.items[0].group, 1);
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(s.waiting(), 1);
        s.complete(vec![(1, GroupOutcome::Finished)]);
        // Group 2 comes back with all of its 8 tokens to recompute.
        let p = s.plan().unwrap();
        assert_eq!(
            (p.items[0].group, p.items[0].start, p.items[0].tokens.len()),
            (2, 0, 9)
        );
        assert_eq!(p.items[0].tokens[6..], [5, 5, 5]);
        s.complete(vec![(2, GroupOutcome::Finished)]);
        assert_eq!(s.kv_usage().used, 0);
        assert!(s.is_empty());
    }

    #[test]
    fn a_scored_prompt_gets_the_rows_of_every_chunk_from_its_first_position() {
        let mut s = BatchScheduler::new(cfg(6, 16));
        s.add(1, (0..10).collect());
        s.score_prompt(1, 4);
        // Chunk 0..6 (one short of the end would be 9): rows 4 and 5.
        let p = s.plan().unwrap();
        let i = &p.items[0];
        assert_eq!((i.start, i.tokens.len(), i.logits), (0, 6, false));
        assert_eq!(i.scored, 4..6);
        assert_eq!(i.logits_wanted(), LogitsWanted::Tail(2));
        assert!(s.complete(Vec::new()).is_empty());
        // The rest: rows 6..9 score prompt tokens 7..10; row 9 draws.
        let p = s.plan().unwrap();
        let i = &p.items[0];
        assert_eq!((i.start, i.tokens.len(), i.logits), (6, 4, true));
        assert_eq!(i.scored, 6..9);
        assert_eq!(i.logits_wanted(), LogitsWanted::Tail(4));
        s.complete(cont(&p, 3));
        // Decoding scores nothing more.
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].scored, 0..0);
        assert_eq!(p.items[0].logits_wanted(), LogitsWanted::Last);
    }

    #[test]
    fn a_preempted_scored_prompt_is_not_scored_twice_and_reuses_only_unscored_rows() {
        let mut s = caching();
        let prompt: Vec<u32> = (0..20).collect();
        // Another request leaves the prompt's blocks cached.
        s.add(1, prompt.clone());
        let p = s.plan().unwrap();
        s.complete(vec![(1, GroupOutcome::Finished)]);
        assert_eq!(p.items[0].logits_wanted(), LogitsWanted::Last);
        // Scoring from row 10: blocks up to position 8 are reused (the rows
        // from 10 on are computed).
        s.add(2, prompt.clone());
        s.score_prompt(2, 10);
        let p = s.plan().unwrap();
        let i = &p.items[0];
        assert_eq!((i.start, i.scored.clone()), (8, 10..19));
        assert_eq!(i.logits_wanted(), LogitsWanted::Tail(10));
        s.complete(cont(&p, 7));
        // Recomputed from scratch (as after a preemption), it scores nothing.
        s.preempt(2);
        let p = s.plan().unwrap();
        let i = &p.items[0];
        assert_eq!(i.scored, 0..0);
        assert_eq!(i.logits_wanted(), LogitsWanted::Last);
        assert_eq!(i.start + i.tokens.len(), 21);
    }

    #[test]
    fn cancel_in_flight_frees_after_the_step() {
        let mut s = BatchScheduler::new(cfg(64, 16));
        s.add(1, vec![1; 5]);
        let p = s.plan().unwrap();
        assert!(!s.cancel(1));
        assert!(s.kv_usage().used > 0);
        let ended = s.complete(cont(&p, 3));
        assert_eq!(ended, vec![1]);
        assert_eq!(s.kv_usage().used, 0);
        s.add(2, vec![1; 5]);
        assert!(s.cancel(2), "a waiting group ends at once");
        assert!(s.is_empty());
    }

    #[test]
    fn an_expedited_group_goes_before_a_long_prefill_and_a_backlog() {
        // 8 tokens a step, 6 blocks of 4, one running group: group 1's
        // 20-token prompt takes three steps of chunks, and group 2 waits for
        // KV room and a running place behind it.
        let mut s = BatchScheduler::new(BatchConfig {
            max_running: 1,
            ..cfg(8, 6)
        });
        s.add(1, vec![1; 20]);
        s.add(2, vec![2; 12]);
        let p = s.plan().unwrap();
        assert_eq!(p.items.len(), 1, "group 2 does not fit yet");
        s.complete(cont(&p, 9));
        s.add(3, vec![3]);
        s.expedite(3);
        let p = s.plan().unwrap();
        let planned: Vec<_> = p.items.iter().map(|i| (i.group, i.tokens.len())).collect();
        // Its token set aside: the prefill's chunk takes the rest.
        assert_eq!(planned, vec![(1, 7), (3, 1)], "the probe runs, whole");
        s.complete(cont(&p, 9));
        // Running, it is planned first, and its blocks and group 1's take
        // all six: no group is preempted.
        let p = s.plan().unwrap();
        assert_eq!(p.items[0].group, 3);
        assert!(p.items.iter().any(|i| i.group == 3 && i.logits));
        s.complete(vec![(3, GroupOutcome::Finished)]);
        assert!(!s.contains(3));
        assert_eq!(s.stats().preemptions, 0);
    }

    #[test]
    fn an_expedited_group_makes_no_running_group_preempt() {
        // 4 blocks of 4: two running groups of 4 tokens hold one block each;
        // their next tokens need a second block each, so none is left for a
        // probe, which waits for the first block freed.
        let mut s = BatchScheduler::new(cfg(64, 4));
        s.add(1, vec![1; 4]);
        s.add(2, vec![2; 4]);
        let p = s.plan().unwrap();
        s.complete(cont(&p, 9));
        s.add(3, vec![3]);
        s.expedite(3);
        let p = s.plan().unwrap();
        assert!(p.items.iter().all(|i| i.group != 3), "no block for it yet");
        assert_eq!(s.stats().preemptions, 0);
        s.complete(vec![
            (1, GroupOutcome::Finished),
            (2, GroupOutcome::Continue(vec![(p.items[1].seq, 9)])),
        ]);
        let p = s.plan().unwrap();
        assert!(
            p.items.iter().any(|i| i.group == 3),
            "it takes the block freed"
        );
        assert_eq!(s.stats().preemptions, 0);
    }

    #[test]
    fn beams_fork_and_share_blocks() {
        let mut s = BatchScheduler::new(cfg(64, 16));
        s.add(1, vec![1; 6]);
        let p = s.plan().unwrap();
        let parent = p.items[0].seq;
        s.complete(vec![(
            1,
            GroupOutcome::Continue(vec![(parent, 10), (parent, 11)]),
        )]);
        assert_eq!(
            s.kv_usage().used,
            2,
            "the children share the prompt's blocks"
        );
        let p = s.plan().unwrap();
        assert_eq!(p.items.len(), 2);
        assert!(p.items.iter().all(|i| i.logits && i.start == 6));
        assert_eq!(
            p.copies.len(),
            1,
            "the shared half-full block is copied once"
        );
        let keys: Vec<_> = p.items.iter().map(|i| i.seq).collect();
        s.complete(vec![(1, GroupOutcome::Continue(vec![(keys[1], 12)]))]);
        s.complete(vec![]);
        s.complete(vec![(1, GroupOutcome::Finished)]);
        assert_eq!(s.kv_usage().used, 0);
    }

    #[test]
    fn reset_requeues_everything_in_age_order() {
        let mut s = BatchScheduler::new(cfg(64, 16));
        s.add(1, vec![1; 3]);
        s.add(2, vec![2; 3]);
        let p = s.plan().unwrap();
        s.complete(cont(&p, 4));
        s.add(3, vec![3; 3]);
        s.plan().unwrap();
        let mut failed = s.reset();
        failed.sort();
        assert_eq!(failed, vec![1, 2, 3]);
        assert_eq!(s.kv_usage().used, 0);
        let p = s.plan().unwrap();
        let order: Vec<_> = p.items.iter().map(|i| (i.group, i.tokens.len())).collect();
        assert_eq!(order, vec![(1, 4), (2, 4), (3, 3)]);
    }

    #[test]
    fn micro_batches_balance_tokens() {
        let item = |n| StepItem {
            group: 0,
            seq: 0,
            tokens: vec![0; n],
            start: 0,
            table: vec![],
            logits: true,
            drafts: 0,
            model_drafts: false,
            draft_prev: None,
            scored: 0..0,
        };
        let items: Vec<_> = [1, 1, 1, 1, 1, 1].into_iter().map(item).collect();
        assert_eq!(split_micro_batches(&items, 3), vec![0..2, 2..4, 4..6]);
        let items: Vec<_> = [10, 1, 1].into_iter().map(item).collect();
        assert_eq!(split_micro_batches(&items, 2), vec![0..1, 1..3]);
        let items: Vec<_> = [1].into_iter().map(item).collect();
        assert_eq!(split_micro_batches(&items, 4), vec![0..1]);
    }
}
