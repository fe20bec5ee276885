//! The LLM scheduling policy: one [`BatchScheduler`] per data-parallel
//! replica, and the per-step wiring of each replica's nodes.
//!
//! A replica has `pp` pipeline stages of `tp` tensor-parallel ranks; node
//! `stage · tp + rank`. Each step gets fresh [`NodeLinks`]: one collective per
//! stage, one channel from each rank of a stage to the same rank of the next,
//! and one abort signal for the whole replica. Because links never outlive a
//! step, a failed step leaves nothing stale behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam::channel::{Receiver, Sender};
use framework::batching::{BatchConfig, BatchScheduler, GroupOutcome, StepPlan};
use framework::collective::{Collective, SingleCollective, ThreadCollective};
use framework::metrics as m;
use framework::GroupId;

use crate::kit::{NodeError, Policy, PolicyStats, TaskId};
use crate::llm::merge::Registration;
use crate::llm::task::LlmTask;

/// Tensor- and pipeline-parallel degrees of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaShape {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
}

impl ReplicaShape {
    /// Nodes per replica.
    pub fn nodes(&self) -> usize {
        self.tp * self.pp
    }

    /// `(stage, rank)` of node `index`.
    pub fn place(&self, index: usize) -> (usize, usize) {
        (index / self.tp, index % self.tp)
    }
}

/// Aborts a replica's step: every collective of it and every wait on a
/// pipeline channel returns an error.
pub struct ReplicaAbort {
    collectives: Vec<Arc<dyn Collective>>,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl ReplicaAbort {
    fn new(collectives: Vec<Arc<dyn Collective>>) -> Self {
        let (tx, rx) = crossbeam::channel::bounded(0);
        Self {
            collectives,
            tx: Mutex::new(Some(tx)),
            rx,
        }
    }

    /// Aborts the step.
    pub fn abort(&self) {
        for c in &self.collectives {
            c.abort();
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

/// One node's connections for one step.
pub struct NodeLinks {
    /// The node's tensor-parallel group.
    pub collective: Arc<dyn Collective>,
    /// Hidden rows from the previous stage (absent on the first).
    pub prev: Option<Receiver<Vec<f32>>>,
    /// Hidden rows to the next stage (absent on the last).
    pub next: Option<Sender<Vec<f32>>>,
    /// The replica's abort signal.
    pub abort: Arc<ReplicaAbort>,
}

impl NodeLinks {
    /// The previous stage's next micro-batch, unless the step is aborted.
    pub fn recv(&self) -> Result<Vec<f32>, NodeError> {
        let prev = self
            .prev
            .as_ref()
            .ok_or_else(|| NodeError::Failed("the first stage has no previous stage".into()))?;
        crossbeam::select! {
            recv(prev) -> m => m.map_err(|_| NodeError::Aborted("the previous stage is gone".into())),
            recv(self.abort.rx) -> _ => Err(NodeError::Aborted("a peer failed".into())),
        }
    }

    /// Hands a micro-batch's hidden rows to the next stage.
    pub fn send(&self, hidden: Vec<f32>) -> Result<(), NodeError> {
        let next = self
            .next
            .as_ref()
            .ok_or_else(|| NodeError::Failed("the last stage has no next stage".into()))?;
        next.send(hidden)
            .map_err(|_| NodeError::Aborted("the next stage is gone".into()))
    }
}

/// Builds fresh links for every node of a replica.
pub fn wire(shape: ReplicaShape) -> Vec<NodeLinks> {
    let groups: Vec<Vec<Arc<dyn Collective>>> = (0..shape.pp)
        .map(|_| {
            if shape.tp == 1 {
                vec![Arc::new(SingleCollective) as Arc<dyn Collective>]
            } else {
                ThreadCollective::group(shape.tp)
                    .into_iter()
                    .map(|c| Arc::new(c) as Arc<dyn Collective>)
                    .collect()
            }
        })
        .collect();
    let abort = Arc::new(ReplicaAbort::new(
        groups.iter().flatten().cloned().collect(),
    ));
    // channels[s][r]: stage s rank r → stage s+1 rank r.
    let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> = Vec::new();
    let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> =
        vec![(0..shape.tp).map(|_| None).collect()];
    for _ in 0..shape.pp.saturating_sub(1) {
        let (s, r): (Vec<_>, Vec<_>) = (0..shape.tp)
            .map(|_| {
                let (s, r) = crossbeam::channel::unbounded();
                (Some(s), Some(r))
            })
            .unzip();
        senders.push(s);
        receivers.push(r);
    }
    senders.push((0..shape.tp).map(|_| None).collect());
    let mut links = Vec::with_capacity(shape.nodes());
    for (stage, group) in groups.into_iter().enumerate() {
        for (rank, collective) in group.into_iter().enumerate() {
            links.push(NodeLinks {
                collective,
                prev: receivers[stage][rank].take(),
                next: senders[stage][rank].take(),
                abort: abort.clone(),
            });
        }
    }
    links
}

/// The engine's policy.
pub struct LlmPolicy {
    shape: ReplicaShape,
    replicas: Vec<BatchScheduler>,
    owner: HashMap<TaskId, usize>,
    /// Admitted tasks not yet in a step, and when they were accepted.
    unscheduled: HashMap<TaskId, Instant>,
    /// Preemptions already counted in the metric, per replica.
    preemptions_seen: Vec<u64>,
}

impl LlmPolicy {
    /// Records the step's metrics: queue times of groups in their first step,
    /// batch size and tokens, new preemptions, and the occupancy gauges.
    fn observe(&mut self, replica: usize, plan: Option<&StepPlan>) {
        if let Some(plan) = plan {
            let mut tokens = 0;
            for item in &plan.items {
                tokens += item.tokens.len();
                if let Some(t) = self.unscheduled.remove(&item.group) {
                    metrics::histogram!(m::REQUEST_QUEUE_TIME).record(t.elapsed().as_secs_f64());
                }
            }
            metrics::histogram!(m::BATCH_SIZE).record(plan.items.len() as f64);
            metrics::histogram!(m::BATCH_TOKENS).record(tokens as f64);
        }
        let p = self.replicas[replica].stats().preemptions;
        let seen = &mut self.preemptions_seen[replica];
        if p > *seen {
            metrics::counter!(m::PREEMPTIONS).increment(p - *seen);
            *seen = p;
        }
        publish_gauges(&self.stats());
    }
}

/// Sets the occupancy gauges (running, waiting in the scheduler, KV blocks)
/// from the policy's figures.
pub fn publish_gauges(s: &PolicyStats) {
    metrics::gauge!(m::REQUESTS_RUNNING).set(s.running as f64);
    metrics::gauge!(m::REQUESTS_WAITING, "stage" => "scheduler").set(s.waiting as f64);
    metrics::gauge!(m::KV_BLOCKS_USED).set(s.kv_used as f64);
    metrics::gauge!(m::KV_BLOCKS_TOTAL).set(s.kv_total as f64);
    let ratio = if s.kv_total == 0 {
        0.0
    } else {
        s.kv_used as f64 / s.kv_total as f64
    };
    metrics::gauge!(m::KV_USAGE_RATIO).set(ratio);
}

impl LlmPolicy {
    /// `dp` replicas of `shape`, each batching under `cfg`.
    pub fn new(shape: ReplicaShape, dp: usize, cfg: BatchConfig) -> Self {
        Self {
            shape,
            replicas: (0..dp).map(|_| BatchScheduler::new(cfg.clone())).collect(),
            owner: HashMap::new(),
            unscheduled: HashMap::new(),
            preemptions_seen: vec![0; dp],
        }
    }
}

impl Policy for LlmPolicy {
    type Task = LlmTask;
    type Work = StepPlan;
    type Links = NodeLinks;
    type Registration = Registration;
    type Verdict = Vec<(GroupId, GroupOutcome)>;

    fn replicas(&self) -> usize {
        self.replicas.len()
    }

    fn room(&self) -> usize {
        // Enough admitted work to fill every replica's running set.
        let cap: usize = self.replicas.iter().map(|r| r.config().max_running).sum();
        cap.saturating_sub(self.owner.len())
    }

    fn load(&self, replica: usize) -> usize {
        self.replicas[replica].len()
    }

    fn admit(&mut self, replica: usize, task: LlmTask) -> Registration {
        self.replicas[replica].add(task.id, task.prompt.clone());
        self.owner.insert(task.id, replica);
        self.unscheduled.insert(task.id, task.arrived);
        Registration::from_task(task)
    }

    fn next_step(&mut self, replica: usize) -> Option<StepPlan> {
        let plan = self.replicas[replica].plan();
        self.observe(replica, plan.as_ref());
        plan
    }

    fn links(&self, _replica: usize) -> Vec<NodeLinks> {
        wire(self.shape)
    }

    fn completed(&mut self, replica: usize, verdict: Self::Verdict) {
        for g in self.replicas[replica].complete(verdict) {
            self.owner.remove(&g);
            self.unscheduled.remove(&g);
        }
        self.observe(replica, None);
    }

    fn failed(&mut self, replica: usize) -> Vec<TaskId> {
        let sched = &mut self.replicas[replica];
        let failed = sched.reset();
        // Groups cancelled during the failed step ended in the reset.
        let sched = &self.replicas[replica];
        self.owner
            .retain(|id, r| *r != replica || sched.contains(*id));
        let owner = &self.owner;
        self.unscheduled.retain(|id, _| owner.contains_key(id));
        failed.into_iter().filter(|g| sched.contains(*g)).collect()
    }

    fn contains(&self, task: TaskId) -> bool {
        self.owner.contains_key(&task)
    }

    fn cancel(&mut self, task: TaskId) -> bool {
        let Some(&r) = self.owner.get(&task) else {
            return false;
        };
        if self.replicas[r].cancel(task) {
            self.owner.remove(&task);
            self.unscheduled.remove(&task);
        }
        self.observe(r, None);
        true
    }

    fn drop_task(&mut self, task: TaskId) {
        self.unscheduled.remove(&task);
        if let Some(r) = self.owner.remove(&task) {
            self.replicas[r].drop_group(task);
            self.observe(r, None);
        }
    }

    fn is_idle(&self) -> bool {
        self.replicas.iter().all(BatchScheduler::is_empty)
    }

    fn stats(&self) -> PolicyStats {
        let mut s = PolicyStats::default();
        for r in &self.replicas {
            let u = r.kv_usage();
            s.running += r.running();
            s.waiting += r.waiting();
            s.kv_used += u.used;
            s.kv_total += u.total;
            s.preemptions += r.stats().preemptions;
        }
        s
    }
}
