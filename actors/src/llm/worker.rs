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

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use framework::batching::StepPlan;
use framework::collective::TimedCollective;
use framework::metrics as m;
use framework::model::{PagedItem, StageInput, StageOutput};
use framework::Error;
pub use framework::Shard;

use kit::{NodeError, NodeId, NodeWorker};

use crate::llm::policy::{NodeLinks, ReplicaShape};
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
    /// its KV cache), and its own compute `threads`.
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
        framework::threads::run_in(&threads, || self.run_step(step, links))
    }

    fn abort(links: &NodeLinks) {
        links.abort.abort();
    }
}

impl LlmWorker {
    /// One step on this node's compute threads.
    fn run_step(&mut self, step: &LlmStep, links: &NodeLinks) -> Result<Option<Picks>, NodeError> {
        let plan = &step.plan;
        for &(src, dst) in &plan.copies {
            self.shard.copy_block(src, dst).map_err(node_error)?;
        }
        let started = std::time::Instant::now();
        let collective = TimedCollective::new(&*links.collective);
        let last = self.stage + 1 == self.shape.pp;
        let mut out: Option<Picks> = None;
        for mb in &plan.micro_batches {
            let items: Vec<PagedItem<'_>> = plan.items[mb.clone()]
                .iter()
                .map(|i| PagedItem {
                    tokens: &i.tokens,
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
                StageOutput::Logits(l) if last => {
                    step.pick(mb.start, &l, out.get_or_insert_with(Picks::new));
                }
                StageOutput::Logits(_) | StageOutput::OnRoot => {}
            }
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
