//! The LLM compute node's worker: one [`Shard`] (a tensor-parallel rank of a
//! pipeline stage's layer range, with its paged KV cache, on whichever
//! backend the engine chose; the worker never names it).
//!
//! Per step it applies the plan's block copies, then runs each micro-batch in
//! order: the first stage embeds tokens, later stages wait for the previous
//! stage's hidden rows, and every stage but the last hands its output on at
//! once — so stage `s` works on micro-batch `m + 1` while stage `s + 1` works
//! on `m`. The last stage's logits are gathered to its rank 0 only, which
//! chooses each item's next token there (a draw with the request's sampler, or
//! a beam's log-probability row) and returns the picks, not the logits.
//!
//! **The draft node** (speculative decoding with a draft model) holds the
//! whole draft model and a KV pool with the same block ids as the target's,
//! so every block table of the plan is valid for it too. Each step it
//! computes the draft model's keys and values for every item's known tokens
//! (so its cache always covers what the target's does, cached prefixes
//! included), then, for the items whose drafts are the model's, draws them
//! greedily one position at a time (each drafted token but the last is fed
//! back), and sends them to the target's nodes, which fill the plan's
//! placeholders with them. The last draft's keys and values are written by
//! the next step, which feeds the token before its first again
//! (`StepItem::draft_prev`) in the same pass; positions past what the
//! target keeps are written again by a later step. (A request that ends
//! right after a step whose drafts were all kept leaves that one position
//! unwritten in the draft's pool; a later request that reuses its block
//! through the prefix cache drafts from a stale key there: its drafts may be
//! worse, never its output.)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use framework::batching::{StepItem, StepPlan};
use framework::collective::{SingleCollective, TimedCollective};
use framework::metrics as m;
use framework::model::{LogitsWanted, PagedItem, StageInput, StageOutput};
use framework::Error;
pub use framework::Shard;

use cluster::wire::Hosted;
use kit::{NodeError, NodeId, NodeWorker};

use crate::llm::policy::{ModelDrafts, NodeLinks, ReplicaShape};
use crate::llm::step::{LlmStep, Picks};

/// Makes a chosen node fail at a chosen step (for tests of supervision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInjection {
    /// Replica of the failing node.
    pub replica: usize,
    /// Index of the failing node within its replica.
    pub node: usize,
    /// The first step at which it fails, counted per lane of the replica
    /// (each lane numbers its own steps, so with two lanes the fault fires
    /// on whichever lane reaches it first).
    pub step: u64,
    /// How many times it fails in all (`u32::MAX`: every step from then on).
    pub times: u32,
    /// Panic instead of returning an error.
    pub panic: bool,
}

/// A fault plan and how often it has fired (shared across restarts).
#[derive(Debug)]
pub struct FaultState {
    spec: FaultInjection,
    fired: AtomicU32,
}

impl FaultState {
    /// A plan that has not fired yet.
    pub fn new(spec: FaultInjection) -> Arc<Self> {
        Arc::new(Self {
            spec,
            fired: AtomicU32::new(0),
        })
    }

    /// Times it fired.
    pub fn fired(&self) -> u32 {
        self.fired.load(Ordering::SeqCst)
    }

    fn check(&self, node: NodeId, step: u64) -> Result<(), NodeError> {
        let s = &self.spec;
        if node.replica != s.replica || node.index != s.node || step < s.step {
            return Ok(());
        }
        let fired = self.fired.fetch_add(1, Ordering::SeqCst);
        if fired >= s.times {
            self.fired.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        if s.panic {
            panic!("injected fault at {node}, step {step}");
        }
        Err(NodeError::Failed(format!(
            "injected fault at {node}, step {step}"
        )))
    }
}

/// One compute node's state.
pub struct LlmWorker {
    id: NodeId,
    stage: usize,
    shape: ReplicaShape,
    shard: Shard,
    threads: Arc<framework::threads::Pool>,
    fault: Option<Arc<FaultState>>,
}

impl LlmWorker {
    /// A worker for node `id` of a replica of `shape`, holding `shard` (with
    /// its KV cache), and its own compute `threads`. The replica's draft
    /// node ([`ReplicaShape::is_draft`]) holds the whole draft model.
    pub fn new(
        id: NodeId,
        shape: ReplicaShape,
        shard: Shard,
        threads: Arc<framework::threads::Pool>,
        fault: Option<Arc<FaultState>>,
    ) -> Self {
        let (stage, _) = shape.place(id.index);
        Self {
            id,
            stage,
            shape,
            shard,
            threads,
            fault,
        }
    }
}

fn node_error(e: Error) -> NodeError {
    match e {
        Error::Aborted(m) => NodeError::Aborted(m),
        other => NodeError::Failed(other.to_string()),
    }
}

impl NodeWorker for LlmWorker {
    type Work = Arc<LlmStep>;
    type Links = NodeLinks;
    type Output = Option<Picks>;

    fn run(&mut self, step: &Arc<LlmStep>, links: &NodeLinks) -> Result<Option<Picks>, NodeError> {
        if let Some(f) = &self.fault {
            f.check(self.id, step.plan.id)?;
        }
        let threads = self.threads.clone();
        if self.shape.is_draft(self.id.index) {
            return framework::threads::run_in(&threads, || self.run_draft(step, links));
        }
        framework::threads::run_in(&threads, || self.run_step(step, links, None))
    }

    fn abort(links: &NodeLinks) {
        links.abort.abort();
    }
}

impl LlmWorker {
    /// One step for rank 0 of the job, on a node that runs in another
    /// process: as [`NodeWorker::run`], except that the last stage's rank 0
    /// returns its logits, micro-batch by micro-batch (each with its first
    /// item), for rank 0 to choose the tokens with the requests' samplers
    /// (the draft model's node returns none: its drafts go to the target's
    /// nodes).
    pub fn run_hosted(&mut self, step: &LlmStep, links: &NodeLinks) -> Result<Hosted, NodeError> {
        if let Some(f) = &self.fault {
            f.check(self.id, step.plan.id)?;
        }
        let threads = self.threads.clone();
        if self.shape.is_draft(self.id.index) {
            // Its drafts go to the target's nodes over the step's links.
            framework::threads::run_in(&threads, || self.run_draft(step, links))?;
            return Ok(Hosted::default());
        }
        let mut hosted = Hosted::default();
        framework::threads::run_in(&threads, || self.run_step(step, links, Some(&mut hosted)))?;
        Ok(hosted)
    }

    /// One step on this node's compute threads. The last stage's logits
    /// are chosen from here, or, with `collect`, handed over as they are,
    /// with the draft model's drafts they verify.
    fn run_step(
        &mut self,
        step: &LlmStep,
        links: &NodeLinks,
        mut collect: Option<&mut Hosted>,
    ) -> Result<Option<Picks>, NodeError> {
        let plan = &step.plan;
        for &(src, dst) in &plan.copies {
            self.shard.copy_block(src, dst).map_err(node_error)?;
        }
        let started = std::time::Instant::now();
        // The draft model's drafts, where the plan holds their places.
        let drafted = if plan.items.iter().any(|i| i.model_drafts) {
            Some(links.recv_drafts()?)
        } else {
            None
        };
        let filled = fill_drafts(plan, drafted.as_ref())?;
        let collective = TimedCollective::new(&*links.collective);
        let last = self.stage + 1 == self.shape.pp;
        let mut out: Option<Picks> = None;
        for mb in &plan.micro_batches {
            let items: Vec<PagedItem<'_>> = plan.items[mb.clone()]
                .iter()
                .enumerate()
                .map(|(k, i)| PagedItem {
                    tokens: filled
                        .get(mb.start + k)
                        .and_then(Option::as_deref)
                        .unwrap_or(&i.tokens),
                    start: i.start,
                    table: &i.table,
                    logits: i.logits_wanted(),
                })
                .collect();
            let input = if self.stage == 0 {
                StageInput::Tokens
            } else {
                StageInput::Hidden(links.recv()?)
            };
            let output = self.shard.forward_paged(&items, input, &collective);
            match output.map_err(node_error)? {
                StageOutput::Hidden(h) => links.send(h)?,
                StageOutput::Logits(l) if last => match collect.as_deref_mut() {
                    Some(c) => c.logits.push((mb.start as u32, l)),
                    None => {
                        let picks = out.get_or_insert_with(Picks::new);
                        step.pick(mb.start, &l, picks, drafted.as_deref().map(Vec::as_slice));
                    }
                },
                StageOutput::Logits(_) | StageOutput::OnRoot => {}
            }
        }
        if let (Some(c), Some(d), true) = (collect, &drafted, last) {
            c.drafts = d.to_vec();
        }
        let node = m::node_label(self.id.replica, self.id.index);
        let phase = step_phase(plan);
        metrics::histogram!(m::NODE_STEP_DURATION, "node" => node.clone(), "phase" => phase)
            .record(started.elapsed().as_secs_f64());
        if self.shape.tp > 1 {
            metrics::histogram!(m::NODE_ALL_REDUCE_DURATION, "node" => node)
                .record(collective.seconds());
        }
        Ok(out)
    }
}

impl LlmWorker {
    /// The draft node's step: the draft model's keys and values for every
    /// item's known tokens, then its greedy drafts where the plan holds
    /// their places, sent to the target's nodes.
    fn run_draft(&mut self, step: &LlmStep, links: &NodeLinks) -> Result<Option<Picks>, NodeError> {
        let plan = &step.plan;
        for &(src, dst) in &plan.copies {
            self.shard.copy_block(src, dst).map_err(node_error)?;
        }
        let started = std::time::Instant::now();
        let items = &plan.items;
        let known = |i: &StepItem| -> usize {
            if i.model_drafts {
                i.tokens.len() - i.drafts
            } else {
                i.tokens.len()
            }
        };
        let mut drafts: Vec<Vec<u32>> = items
            .iter()
            .map(|i| Vec::with_capacity(if i.model_drafts { i.drafts } else { 0 }))
            .collect();
        // Every item's known tokens (prompt chunks, decodes, n-gram drafts),
        // after the token before them where the draft model's requests may
        // lack it; the last row of each model-drafted item gives its first
        // draft.
        let fed: Vec<Vec<u32>> = items
            .iter()
            .map(|i| match i.draft_prev {
                Some(prev) if i.start > 0 => {
                    let mut t = Vec::with_capacity(known(i) + 1);
                    t.push(prev);
                    t.extend_from_slice(&i.tokens[..known(i)]);
                    t
                }
                _ => i.tokens[..known(i)].to_vec(),
            })
            .collect();
        let first: Vec<PagedItem<'_>> = items
            .iter()
            .zip(&fed)
            .map(|(i, t)| PagedItem {
                tokens: t,
                start: i.start + known(i) - t.len(),
                table: &i.table,
                logits: if i.model_drafts {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        let all: Vec<usize> = (0..items.len()).collect();
        self.draft_forward(&first, &all, &mut drafts)?;
        let picked: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].model_drafts)
            .collect();
        // Then one position at a time: feed draft `j - 1`, draw draft `j`.
        let rounds = items
            .iter()
            .filter(|i| i.model_drafts)
            .map(|i| i.drafts)
            .max();
        for j in 1..rounds.unwrap_or(0) {
            let fed: Vec<usize> = picked
                .iter()
                .copied()
                .filter(|&i| items[i].drafts > j)
                .collect();
            let tokens: Vec<[u32; 1]> = fed.iter().map(|&i| [drafts[i][j - 1]]).collect();
            let batch: Vec<PagedItem<'_>> = fed
                .iter()
                .zip(&tokens)
                .map(|(&i, t)| PagedItem {
                    tokens: t,
                    start: items[i].start + known(&items[i]) + j - 1,
                    table: &items[i].table,
                    logits: LogitsWanted::Last,
                })
                .collect();
            self.draft_forward(&batch, &fed, &mut drafts)?;
        }
        if rounds.is_some() {
            links.send_drafts(Arc::new(drafts))?;
        }
        let node = m::node_label(self.id.replica, self.id.index);
        metrics::histogram!(m::NODE_STEP_DURATION, "node" => node, "phase" => "draft")
            .record(started.elapsed().as_secs_f64());
        Ok(None)
    }

    /// Runs `batch` through the whole draft model; the greedy token of each
    /// batch item that asked for logits is appended to the drafts of its
    /// plan item (`of[k]` is batch item `k`'s).
    fn draft_forward(
        &mut self,
        batch: &[PagedItem<'_>],
        of: &[usize],
        drafts: &mut [Vec<u32>],
    ) -> Result<(), NodeError> {
        if batch.is_empty() {
            return Ok(());
        }
        let out = self
            .shard
            .forward_paged(batch, StageInput::Tokens, &SingleCollective)
            .map_err(node_error)?;
        let StageOutput::Logits(logits) = out else {
            return Err(NodeError::Failed(
                "the draft model's node returned no logits".into(),
            ));
        };
        for (k, &i) in of.iter().enumerate() {
            if let Some(row) = logits.last(k) {
                drafts[i].push(framework::sampling::argmax(row) as u32);
            }
        }
        Ok(())
    }
}

/// Each item's tokens with the draft model's drafts in the places the plan
/// holds for them (`None` where the plan's tokens are complete; nothing at
/// all in a step without such drafts).
fn fill_drafts(
    plan: &StepPlan,
    drafted: Option<&ModelDrafts>,
) -> Result<Vec<Option<Vec<u32>>>, NodeError> {
    let Some(drafted) = drafted else {
        return Ok(Vec::new());
    };
    plan.items
        .iter()
        .enumerate()
        .map(|(k, i)| {
            if !i.model_drafts {
                return Ok(None);
            }
            let d = drafted
                .get(k)
                .filter(|d| d.len() == i.drafts)
                .ok_or_else(|| {
                    NodeError::Failed(format!(
                        "the draft node sent no {} drafts for item {k}",
                        i.drafts
                    ))
                })?;
            let mut t = i.tokens[..i.tokens.len() - i.drafts].to_vec();
            t.extend_from_slice(d);
            Ok(Some(t))
        })
        .collect()
}

/// `prefill` when no item decodes a single token (with its drafts, if it
/// speculates), `decode` when all do, `mixed` otherwise.
fn step_phase(plan: &StepPlan) -> &'static str {
    let decodes = plan
        .items
        .iter()
        .filter(|i| i.tokens.len() == 1 + i.drafts)
        .count();
    if decodes == plan.items.len() {
        "decode"
    } else if decodes == 0 {
        "prefill"
    } else {
        "mixed"
    }
}
