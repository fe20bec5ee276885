//! The LLM scheduling policy: one [`BatchScheduler`] per data-parallel
//! replica, and the per-step wiring of each replica's nodes.
//!
//! A replica has `pp` pipeline stages of `tp` tensor-parallel ranks; node
//! `stage · tp + rank`. With a draft model (speculative decoding), node
//! `tp · pp` holds it whole: every step it computes the draft model's keys
//! and values for the step's tokens, makes the drafts the plan left places
//! for, and sends them to every other node of the replica, which wait for
//! them before running such a step. Each step is one [`LlmStep`] (the [`StepPlan`] and the
//! samplers of its requests) shared by every node of
//! the replica, with fresh [`NodeLinks`] per node: one collective per stage,
//! one channel from each rank of a stage to the same rank of the next, and one
//! abort signal for the whole replica. Because links never outlive a step, a
//! failed step leaves nothing stale behind.
//!
//! A replica's requests are spread over `lanes` (vLLM's virtual engines):
//! each lane is a [`BatchScheduler`] over its own share of the KV blocks with
//! one step in flight, so a replica has up to `lanes` steps in flight on
//! disjoint requests, and pipeline stages work on different steps at once. A
//! request's tokens come back before its lane plans it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use cluster::transport::{
    bytes_f32, bytes_token_lists, f32_bytes, token_lists_bytes, Address, Transport,
};
use cluster::wire::{self, Link};
use cluster::{AbortHook, Placement, TransportCollective};
use crossbeam::channel::{Receiver, Sender};
use framework::batching::{BatchConfig, BatchScheduler, GroupOutcome, StepPlan};
use framework::collective::{Collective, SingleCollective, ThreadCollective};
use framework::kv::PrefixStats;
use framework::metrics as m;
use framework::GroupId;

use kit::{NodeError, NodeTask, Plan, Policy, StepId, TaskId};

use crate::llm::step::{LlmStep, ScoreSpec, SharedSampler};
use crate::llm::task::{LlmTask, Traffic};

/// Tensor- and pipeline-parallel degrees of one replica, and whether it
/// has a draft model's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaShape {
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Whether node `tp · pp` runs a draft model (speculative decoding).
    pub draft: bool,
}

impl ReplicaShape {
    /// A replica of `pp` stages of `tp` ranks, without a draft model.
    pub fn new(tp: usize, pp: usize) -> Self {
        Self {
            tp,
            pp,
            draft: false,
        }
    }

    /// Nodes per replica (the target model's, and the draft model's).
    pub fn nodes(&self) -> usize {
        self.targets() + usize::from(self.draft)
    }

    /// The target model's nodes per replica.
    pub fn targets(&self) -> usize {
        self.tp * self.pp
    }

    /// Whether node `index` is the draft model's.
    pub fn is_draft(&self, index: usize) -> bool {
        self.draft && index == self.targets()
    }

    /// `(stage, rank)` of the target node `index`.
    pub fn place(&self, index: usize) -> (usize, usize) {
        (index / self.tp, index % self.tp)
    }
}

/// The draft model's drafts of one step, per item of its plan (empty for
/// items whose drafts, if any, are not the model's).
pub type ModelDrafts = Arc<Vec<Vec<u32>>>;

/// The job's processes as the engine sees them (compute nodes in other
/// processes, over MPI): the transport to the other ranks and where each
/// node runs. Every rank builds the same links for a step from it.
#[derive(Clone)]
pub struct Cluster {
    /// Messages to and from the other ranks.
    pub transport: Arc<dyn Transport>,
    /// Which rank hosts each node.
    pub placement: Arc<Placement>,
}

impl Cluster {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// The rank hosting node `index` of `replica`.
    pub fn rank_of(&self, replica: usize, index: usize) -> usize {
        self.placement.rank_of(replica, index)
    }

    /// Whether node `index` of `replica` runs in this process.
    pub fn hosts(&self, replica: usize, index: usize) -> bool {
        self.rank_of(replica, index) == self.rank()
    }

    /// The address of a rank's hello to rank 0 (`to_rank0`), or of rank
    /// 0's answer ([`cluster::wire::Message::Hello`], `Welcome`): one per
    /// rank pair, apart from every node's.
    pub fn greeting(to_rank0: bool) -> Address {
        let (from, to) = if to_rank0 {
            (u32::MAX - 1, u32::MAX)
        } else {
            (u32::MAX, u32::MAX - 1)
        };
        Address {
            stream: 0,
            from,
            to,
        }
    }

    /// The control address of node `gid` (its number in the job,
    /// `replica · nodes + index`): to it from rank 0, or from it to rank 0.
    pub fn control(gid: usize, to_node: bool) -> Address {
        let gid = gid as u32;
        if to_node {
            Address {
                stream: 0,
                from: u32::MAX,
                to: gid,
            }
        } else {
            Address {
                stream: 0,
                from: gid,
                to: u32::MAX,
            }
        }
    }
}

impl PartialEq for Cluster {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.transport, &other.transport) && self.placement == other.placement
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("rank", &self.rank())
            .field("ranks", &self.placement.ranks())
            .finish()
    }
}

/// A step's streams between processes, and the ranks hosting the
/// replica's nodes (where an abort must reach).
struct RemoteStreams {
    transport: Arc<dyn Transport>,
    streams: Vec<u64>,
    ranks: Vec<usize>,
}

/// Aborts a replica's step: every collective of it and every wait on a
/// pipeline channel returns an error, in this process and, for the links
/// that cross processes, in every process that hosts one of the
/// replica's nodes.
pub struct ReplicaAbort {
    collectives: Vec<Arc<dyn Collective>>,
    /// The step's links between processes.
    remote: Option<RemoteStreams>,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl ReplicaAbort {
    fn new(collectives: Vec<Arc<dyn Collective>>) -> Self {
        let (tx, rx) = crossbeam::channel::bounded(0);
        Self {
            collectives,
            remote: None,
            tx: Mutex::new(Some(tx)),
            rx,
        }
    }

    /// Aborts the step (once: later calls do nothing).
    pub fn abort(&self) {
        // A poisoned lock still holds the sender (taking it cannot panic).
        let mut tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        if tx.take().is_none() {
            return;
        }
        drop(tx);
        for c in &self.collectives {
            c.abort();
        }
        if let Some(r) = &self.remote {
            for &s in &r.streams {
                r.transport.abort(s, &r.ranks);
            }
        }
    }

    /// Whether the step was aborted here.
    pub fn is_aborted(&self) -> bool {
        self.tx.lock().map(|tx| tx.is_none()).unwrap_or(true)
    }
}

/// A stream of the step aborted by another process (a peer failed there,
/// or rank 0 refused a node's part of the step) aborts the step's links in
/// this one too: the channels and collectives within the process, which a
/// node may be waiting on for a node whose part never comes.
impl AbortHook for ReplicaAbort {
    fn stream_aborted(&self) {
        self.abort();
    }
}

impl Drop for ReplicaAbort {
    fn drop(&mut self) {
        if let Some(r) = &self.remote {
            for &s in &r.streams {
                r.transport.mailbox().forget_hooks(s);
            }
        }
    }
}

/// What travels on a link between nodes, and its bytes between processes.
pub trait Payload: Sized + Send {
    /// The value as a message.
    fn to_bytes(&self) -> Vec<u8>;
    /// The value a message holds.
    fn from_bytes(bytes: &[u8]) -> framework::Result<Self>;
}

impl Payload for Vec<f32> {
    fn to_bytes(&self) -> Vec<u8> {
        f32_bytes(self)
    }

    fn from_bytes(bytes: &[u8]) -> framework::Result<Self> {
        bytes_f32(bytes)
    }
}

impl Payload for ModelDrafts {
    fn to_bytes(&self) -> Vec<u8> {
        token_lists_bytes(self)
    }

    fn from_bytes(bytes: &[u8]) -> framework::Result<Self> {
        bytes_token_lists(bytes).map(Arc::new)
    }
}

/// Where a node's input on a link comes from: a node in this process, or
/// in another. Hidden rows from the previous stage by default.
pub enum Inbox<T = Vec<f32>> {
    /// A channel from a node of this process.
    Local(Receiver<T>),
    /// Messages from `rank` at `address`.
    Remote {
        /// The transport.
        transport: Arc<dyn Transport>,
        /// The sending rank.
        rank: usize,
        /// The link's address.
        address: Address,
    },
}

impl<T: Payload> Inbox<T> {
    /// The next value, unless the step is aborted (`abort` here, or its
    /// stream on the transport); `sender` names the other end for the
    /// error when it is gone.
    fn take(&self, abort: &ReplicaAbort, sender: &str) -> Result<T, NodeError> {
        match self {
            Inbox::Local(rx) => crossbeam::select! {
                recv(rx) -> m => m.map_err(|_| NodeError::Aborted(format!("{sender} is gone"))),
                recv(abort.rx) -> _ => Err(NodeError::Aborted("a peer failed".into())),
            },
            Inbox::Remote {
                transport,
                rank,
                address,
            } => {
                let bytes = transport
                    .recv(*rank, *address, None)
                    .map_err(|e| NodeError::Aborted(e.to_string()))?;
                T::from_bytes(&bytes).map_err(|e| NodeError::Failed(e.to_string()))
            }
        }
    }
}

/// Where a node's output on a link goes: a node in this process, or in
/// another. Hidden rows to the next stage by default.
pub enum Outbox<T = Vec<f32>> {
    /// A channel to a node of this process.
    Local(Sender<T>),
    /// Messages to `rank` at `address`.
    Remote {
        /// The transport.
        transport: Arc<dyn Transport>,
        /// The receiving rank.
        rank: usize,
        /// The link's address.
        address: Address,
    },
}

impl<T: Payload> Outbox<T> {
    /// Sends `value`; `receiver` names the other end for the error when it
    /// is gone.
    fn put(&self, value: T, receiver: &str) -> Result<(), NodeError> {
        match self {
            Outbox::Local(tx) => tx
                .send(value)
                .map_err(|_| NodeError::Aborted(format!("{receiver} is gone"))),
            Outbox::Remote {
                transport,
                rank,
                address,
            } => transport
                .send(*rank, *address, &value.to_bytes())
                .map_err(|e| NodeError::Aborted(e.to_string())),
        }
    }
}

/// One node's connections for one step.
pub struct NodeLinks {
    /// The node's tensor-parallel group.
    pub collective: Arc<dyn Collective>,
    /// Hidden rows from the previous stage (absent on the first).
    pub prev: Option<Inbox>,
    /// Hidden rows to the next stage (absent on the last).
    pub next: Option<Outbox>,
    /// A target node's: the draft model's drafts (absent without one, and
    /// on a rank that does not host the node).
    pub drafts_in: Option<Inbox<ModelDrafts>>,
    /// The draft node's: one outbox per target node (empty on a rank that
    /// does not host the draft node).
    pub drafts_out: Vec<Outbox<ModelDrafts>>,
    /// The replica's abort signal.
    pub abort: Arc<ReplicaAbort>,
    /// The step (the kit's id, unique in the job).
    pub step: u64,
}

impl NodeLinks {
    /// The previous stage's next micro-batch, unless the step is aborted.
    pub fn recv(&self) -> Result<Vec<f32>, NodeError> {
        self.prev
            .as_ref()
            .ok_or_else(|| NodeError::Failed("the first stage has no previous stage".into()))?
            .take(&self.abort, "the previous stage")
    }

    /// The draft model's drafts for this step, unless the step is aborted.
    pub fn recv_drafts(&self) -> Result<ModelDrafts, NodeError> {
        self.drafts_in
            .as_ref()
            .ok_or_else(|| NodeError::Failed("the step has drafts but no draft node".into()))?
            .take(&self.abort, "the draft node")
    }

    /// Sends the step's drafts to every target node (the draft node's).
    pub fn send_drafts(&self, drafts: ModelDrafts) -> Result<(), NodeError> {
        for out in &self.drafts_out {
            out.put(drafts.clone(), "a target node")?;
        }
        Ok(())
    }

    /// Hands a micro-batch's hidden rows to the next stage.
    pub fn send(&self, hidden: Vec<f32>) -> Result<(), NodeError> {
        self.next
            .as_ref()
            .ok_or_else(|| NodeError::Failed("the last stage has no next stage".into()))?
            .put(hidden, "the next stage")
    }
}

/// Builds fresh links for every node of a replica, all in this process.
pub fn wire(shape: ReplicaShape) -> Vec<NodeLinks> {
    wire_step(shape, 0, 0, None)
}

/// Builds fresh links for every node of `replica` for step `step`. With a
/// cluster, a link whose ends run in different processes goes over its
/// transport — a tensor-parallel group spanning processes sums through a
/// [`TransportCollective`] on every member (in rank order, so bit for bit
/// as in one process), hidden rows between stages and drafts from the
/// draft node go as messages — and
/// every rank builds the same links for the same step; the links of nodes
/// that run elsewhere are only placeholders (their abort still reaches
/// every process).
pub fn wire_step(
    shape: ReplicaShape,
    replica: usize,
    step: u64,
    cluster: Option<&Cluster>,
) -> Vec<NodeLinks> {
    let host = |index: usize| cluster.map_or(0, |c| c.rank_of(replica, index));
    let here = cluster.map_or(0, Cluster::rank);
    let mut spanning: Vec<u64> = Vec::new();
    let groups: Vec<Vec<Arc<dyn Collective>>> = (0..shape.pp)
        .map(|stage| {
            let members: Vec<usize> = (0..shape.tp).map(|r| host(stage * shape.tp + r)).collect();
            match cluster {
                Some(c) if members.iter().any(|&m| m != members[0]) => {
                    let stream = wire::stream(
                        replica,
                        step,
                        Link::Collective {
                            stage: stage as u16,
                        },
                    );
                    spanning.push(stream);
                    let members: Arc<[usize]> = members.into();
                    (0..shape.tp)
                        .map(|r| {
                            Arc::new(TransportCollective::new(
                                c.transport.clone(),
                                stream,
                                members.clone(),
                                r,
                                None,
                            )) as Arc<dyn Collective>
                        })
                        .collect()
                }
                _ if shape.tp == 1 => vec![Arc::new(SingleCollective) as Arc<dyn Collective>],
                _ => ThreadCollective::group(shape.tp)
                    .into_iter()
                    .map(|c| Arc::new(c) as Arc<dyn Collective>)
                    .collect(),
            }
        })
        .collect();
    // channels[s][r]: stage s rank r → stage s+1 rank r.
    let mut senders: Vec<Vec<Option<Outbox>>> = Vec::new();
    let mut receivers: Vec<Vec<Option<Inbox>>> = vec![(0..shape.tp).map(|_| None).collect()];
    for stage in 0..shape.pp.saturating_sub(1) {
        let stream = wire::stream(
            replica,
            step,
            Link::Pipeline {
                stage: stage as u16,
            },
        );
        let (s, r): (Vec<_>, Vec<_>) = (0..shape.tp)
            .map(|rank| {
                let (from, to) = (stage * shape.tp + rank, (stage + 1) * shape.tp + rank);
                let address = Address {
                    stream,
                    from: rank as u32,
                    to: rank as u32,
                };
                link_ends(
                    cluster,
                    (host(from), host(to), here),
                    address,
                    &mut spanning,
                    crossbeam::channel::unbounded,
                )
            })
            .unzip();
        senders.push(s);
        receivers.push(r);
    }
    senders.push((0..shape.tp).map(|_| None).collect());
    // The drafts, from the draft node to each target node: over the
    // transport where the two run in different processes.
    let draft_node = shape.targets();
    let drafts_stream = wire::stream(replica, step, Link::Drafts);
    let (mut drafts_out, mut drafts_in): (Vec<_>, Vec<_>) = (0..shape.targets())
        .filter(|_| shape.draft)
        .map(|target| {
            let address = Address {
                stream: drafts_stream,
                from: draft_node as u32,
                to: target as u32,
            };
            link_ends(
                cluster,
                (host(draft_node), host(target), here),
                address,
                &mut spanning,
                || crossbeam::channel::bounded(1),
            )
        })
        .unzip();
    // A replica with a node outside rank 0 has a stream for the step as a
    // whole, so that rank 0 refusing one of those nodes' parts aborts the
    // links within that node's process too.
    if cluster.is_some() && (0..shape.nodes()).any(|i| host(i) != 0) {
        spanning.push(wire::stream(replica, step, Link::Step));
    }
    let mut abort = ReplicaAbort::new(groups.iter().flatten().cloned().collect());
    if let (Some(c), false) = (cluster, spanning.is_empty()) {
        let mut ranks: Vec<usize> = (0..shape.nodes()).map(host).collect();
        ranks.sort_unstable();
        ranks.dedup();
        abort.remote = Some(RemoteStreams {
            transport: c.transport.clone(),
            streams: spanning,
            ranks,
        });
    }
    let abort = Arc::new(abort);
    if let Some(r) = &abort.remote {
        let hook = Arc::downgrade(&abort);
        for &s in &r.streams {
            r.transport.mailbox().on_abort(s, hook.clone());
        }
    }
    let mut links = Vec::with_capacity(shape.nodes());
    for (stage, group) in groups.into_iter().enumerate() {
        for (rank, collective) in group.into_iter().enumerate() {
            let node = stage * shape.tp + rank;
            links.push(NodeLinks {
                collective,
                prev: receivers[stage][rank].take(),
                next: senders[stage][rank].take(),
                drafts_in: drafts_in.get_mut(node).and_then(Option::take),
                drafts_out: Vec::new(),
                abort: abort.clone(),
                step,
            });
        }
    }
    if shape.draft {
        links.push(NodeLinks {
            collective: Arc::new(SingleCollective),
            prev: None,
            next: None,
            drafts_in: None,
            drafts_out: drafts_out.iter_mut().filter_map(Option::take).collect(),
            abort,
            step,
        });
    }
    links
}

/// The two ends of a link from a node on rank `from` to one on rank `to`,
/// as rank `here` holds them (`None` for an end another rank holds):
/// messages under `address` on the cluster's transport where the ranks
/// differ (its stream is then added to `spanning`), else a channel that
/// `local` makes.
fn link_ends<T>(
    cluster: Option<&Cluster>,
    (from, to, here): (usize, usize, usize),
    address: Address,
    spanning: &mut Vec<u64>,
    local: impl FnOnce() -> (Sender<T>, Receiver<T>),
) -> (Option<Outbox<T>>, Option<Inbox<T>>) {
    match cluster {
        Some(c) if from != to => {
            if !spanning.contains(&address.stream) {
                spanning.push(address.stream);
            }
            (
                (from == here).then(|| Outbox::Remote {
                    transport: c.transport.clone(),
                    rank: to,
                    address,
                }),
                (to == here).then(|| Inbox::Remote {
                    transport: c.transport.clone(),
                    rank: from,
                    address,
                }),
            )
        }
        _ => {
            let (tx, rx) = local();
            (Some(Outbox::Local(tx)), Some(Inbox::Local(rx)))
        }
    }
}

/// One lane of a replica: a batch scheduler over its own share of the KV
/// blocks (ids from `offset`), with at most one step in flight.
struct Lane {
    sched: BatchScheduler,
    offset: u32,
    in_flight: Option<StepId>,
}

/// The engine's policy.
pub struct LlmPolicy {
    shape: ReplicaShape,
    /// `[replica][lane]`.
    lanes: Vec<Vec<Lane>>,
    /// Which replica and lane holds each task.
    owner: HashMap<TaskId, (usize, usize)>,
    /// Admitted tasks not yet in a step, and when they were accepted.
    unscheduled: HashMap<TaskId, Instant>,
    /// The samplers of the admitted sampling tasks (handed to their steps).
    samplers: HashMap<TaskId, SharedSampler>,
    /// What the admitted tasks that score their prompt want (handed to
    /// their steps).
    scoring: HashMap<TaskId, Arc<ScoreSpec>>,
    /// Preemptions already counted in the metric, per replica.
    preemptions_seen: Vec<u64>,
    /// Prefix-cache counters already counted in the metrics, per replica.
    prefix_seen: Vec<PrefixStats>,
    /// Speculative tokens (drafted, accepted) counted in metrics, per replica.
    spec_seen: Vec<(u64, u64)>,
    /// How many more requests than the least loaded replica (or lane) the
    /// one holding a request's longest cached prefix may hold and still get it.
    route_margin: usize,
    /// Whether new requests go where their prefix is cached (else to the
    /// least loaded replica and lane).
    cache_aware: bool,
    /// Requests admitted to each replica so far.
    routed: Vec<u64>,
    /// Per replica: its last step failed (none succeeded since). New
    /// requests go to such a replica only when every replica is in that
    /// state, as each one it got would likely fail too; a later step that
    /// succeeds there (a retried request's, or a health probe's, pinned to
    /// it) restores it.
    failing: Vec<bool>,
    /// The job's other processes, where nodes run there.
    cluster: Option<Cluster>,
}

/// Among `(index, load, cached positions)` candidates: the one holding the
/// longest cached prefix (the less loaded of equals), unless its load exceeds
/// the least loaded one's by more than `margin`; else the least loaded (the
/// first of equals).
fn prefer_cached(cands: &[(usize, usize, usize)], margin: usize) -> usize {
    let Some(&(least, min_load, _)) = cands.iter().min_by_key(|c| c.1) else {
        return 0;
    };
    let best = cands
        .iter()
        .filter(|c| c.2 > 0)
        .max_by_key(|c| (c.2, std::cmp::Reverse(c.1)));
    match best {
        Some(&(i, load, _)) if load <= min_load + margin => i,
        _ => least,
    }
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
        let p: u64 = self.lanes[replica]
            .iter()
            .map(|l| l.sched.stats().preemptions)
            .sum();
        let seen = &mut self.preemptions_seen[replica];
        if p > *seen {
            metrics::counter!(m::PREEMPTIONS).increment(p - *seen);
            *seen = p;
        }
        let spec = self.lanes[replica]
            .iter()
            .map(|l| (l.sched.stats().drafted, l.sched.stats().accepted))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let seen = &mut self.spec_seen[replica];
        if spec.0 > seen.0 {
            metrics::counter!(m::SPEC_DRAFTED_TOKENS).increment(spec.0 - seen.0);
            metrics::counter!(m::SPEC_ACCEPTED_TOKENS).increment(spec.1 - seen.1);
            *seen = spec;
        }
        let now = self.lanes[replica]
            .iter()
            .map(|l| l.sched.prefix_stats())
            .fold(PrefixStats::default(), add_prefix);
        let seen = &mut self.prefix_seen[replica];
        for (name, new, old) in [
            (
                m::PREFIX_CACHE_QUERIES,
                now.queried_tokens,
                seen.queried_tokens,
            ),
            (m::PREFIX_CACHE_HITS, now.hit_tokens, seen.hit_tokens),
            (m::PREFIX_CACHE_EVICTIONS, now.evictions, seen.evictions),
        ] {
            if new > old {
                metrics::counter!(name).increment(new - old);
            }
        }
        *seen = now;
        publish_gauges(&self.stats());
    }

    /// Forgets tasks of `replica` its lanes no longer hold.
    fn forget_ended(&mut self, replica: usize) {
        let lanes = &self.lanes[replica];
        self.owner
            .retain(|id, (r, l)| *r != replica || lanes[*l].sched.contains(*id));
        let owner = &self.owner;
        self.unscheduled.retain(|id, _| owner.contains_key(id));
        self.samplers.retain(|id, _| owner.contains_key(id));
        self.scoring.retain(|id, _| owner.contains_key(id));
    }

    /// Forgets a task that ended or left.
    fn forget(&mut self, task: TaskId) -> Option<(usize, usize)> {
        self.unscheduled.remove(&task);
        self.samplers.remove(&task);
        self.scoring.remove(&task);
        self.owner.remove(&task)
    }
}

/// The policy's figures, over all replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmStats {
    /// Requests in steps (running).
    pub running: usize,
    /// Requests admitted but waiting for room (new or preempted).
    pub waiting: usize,
    /// KV blocks in use.
    pub kv_used: usize,
    /// KV blocks in all.
    pub kv_total: usize,
    /// Preemptions so far.
    pub preemptions: u64,
    /// The prefix caches' counters.
    pub prefix: PrefixStats,
    /// Tokens drafted by speculative decoding (in steps whose request went
    /// on).
    pub drafted: u64,
    /// Of those, accepted.
    pub accepted: u64,
    /// Requests admitted to each replica so far.
    pub routed: Vec<u64>,
}

/// The sum of two prefix caches' counters.
fn add_prefix(a: PrefixStats, b: PrefixStats) -> PrefixStats {
    PrefixStats {
        queried_tokens: a.queried_tokens + b.queried_tokens,
        hit_tokens: a.hit_tokens + b.hit_tokens,
        evictions: a.evictions + b.evictions,
    }
}

/// Sets the occupancy gauges (running, waiting in the scheduler, KV blocks)
/// from the policy's figures.
pub fn publish_gauges(s: &LlmStats) {
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
    if s.prefix.queried_tokens > 0 {
        metrics::gauge!(m::PREFIX_CACHE_HIT_RATIO)
            .set(s.prefix.hit_tokens as f64 / s.prefix.queried_tokens as f64);
    }
    if s.drafted > 0 {
        metrics::gauge!(m::SPEC_ACCEPTANCE_RATE).set(s.accepted as f64 / s.drafted as f64);
    }
}

impl LlmPolicy {
    /// `dp` replicas of `shape`, each batching under `cfg` in `lanes` lanes.
    ///
    /// A replica's lanes split its KV blocks and running cap evenly and each
    /// has one step in flight, so up to `lanes` steps of one replica run at
    /// once on disjoint requests (pipeline stages work on different steps).
    /// Each lane's block ids are offset into the nodes' one pool.
    pub fn new(shape: ReplicaShape, dp: usize, cfg: BatchConfig, lanes: usize) -> Self {
        let lanes = lanes.max(1);
        let lane_cfg = BatchConfig {
            kv_blocks: cfg.kv_blocks / lanes,
            max_running: cfg.max_running.div_ceil(lanes),
            ..cfg
        };
        let make = |_| {
            (0..lanes)
                .map(|l| Lane {
                    sched: BatchScheduler::new(lane_cfg.clone()),
                    offset: (l * lane_cfg.kv_blocks) as u32,
                    in_flight: None,
                })
                .collect()
        };
        Self {
            shape,
            lanes: (0..dp).map(make).collect(),
            owner: HashMap::new(),
            unscheduled: HashMap::new(),
            samplers: HashMap::new(),
            scoring: HashMap::new(),
            preemptions_seen: vec![0; dp],
            failing: vec![false; dp],
            prefix_seen: vec![PrefixStats::default(); dp],
            spec_seen: vec![(0, 0); dp],
            route_margin: DEFAULT_ROUTE_MARGIN,
            cache_aware: true,
            routed: vec![0; dp],
            cluster: None,
        }
    }
}

/// The default of [`LlmPolicy::with_route_margin`].
pub const DEFAULT_ROUTE_MARGIN: usize = 4;

impl LlmPolicy {
    /// Routes a new request to the replica (and lane) holding its longest
    /// cached prefix unless that one holds more than `margin` requests above
    /// the least loaded; else to the least loaded.
    pub fn with_route_margin(mut self, margin: usize) -> Self {
        self.route_margin = margin;
        self
    }

    /// Turns cache-aware routing off (`false`: every new request goes to
    /// the least loaded replica and lane) or on (the default).
    pub fn with_cache_aware_routing(mut self, on: bool) -> Self {
        self.cache_aware = on;
        self
    }

    /// Wires steps across the cluster's processes.
    pub fn with_cluster(mut self, cluster: Option<Cluster>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Positions of `prompt` cached in `lane`, as routing sees them (none
    /// when routing is not cache-aware). Only computed blocks count: also
    /// counting the prefixes of requests routed but not yet computed (as
    /// SGLang's router does) sent bursts of one family to one replica, whose
    /// requests then waited for the first one's prefix while the other
    /// replica idled (median TTFT 25-40% higher, docs/benchmarks.md).
    fn cached_for_routing(&self, lane: &Lane, prompt: &[u32]) -> usize {
        if self.cache_aware {
            lane.sched.cached_prefix(prompt)
        } else {
            0
        }
    }
}

/// Moves a lane's block ids into the nodes' pool: `+ offset`.
fn offset_blocks(plan: &mut StepPlan, offset: u32) {
    if offset == 0 {
        return;
    }
    for item in &mut plan.items {
        item.table.iter_mut().for_each(|b| *b += offset);
    }
    for (src, dst) in &mut plan.copies {
        *src += offset;
        *dst += offset;
    }
}

impl Policy for LlmPolicy {
    type Task = LlmTask;
    type Work = Arc<LlmStep>;
    type Links = NodeLinks;
    type Step = Arc<LlmStep>;
    type Verdict = Vec<(GroupId, GroupOutcome)>;
    type Stats = LlmStats;

    fn replicas(&self) -> usize {
        self.lanes.len()
    }

    fn room(&self) -> usize {
        // Enough admitted work to fill every lane's running set.
        let cap: usize = self
            .lanes
            .iter()
            .flatten()
            .map(|l| l.sched.config().max_running)
            .sum();
        cap.saturating_sub(self.owner.len())
    }

    fn load(&self, replica: usize) -> usize {
        self.lanes[replica].iter().map(|l| l.sched.len()).sum()
    }

    fn route(&self, task: &LlmTask) -> usize {
        if let Traffic::Probe { replica } = task.traffic {
            if replica < self.lanes.len() {
                return replica;
            }
        }
        // Replicas whose last step failed get nothing while another did not.
        let healthy = self.failing.iter().any(|f| !f);
        let cands: Vec<_> = (0..self.lanes.len())
            .filter(|&r| !(healthy && self.failing[r]))
            .map(|r| {
                let cached = self.lanes[r]
                    .iter()
                    .map(|l| self.cached_for_routing(l, &task.prompt))
                    .max()
                    .unwrap_or(0);
                (r, self.load(r), cached)
            })
            .collect();
        prefer_cached(&cands, self.route_margin)
    }

    fn admit(&mut self, replica: usize, task: LlmTask) {
        let cands: Vec<_> = self.lanes[replica]
            .iter()
            .enumerate()
            .map(|(l, lane)| {
                (
                    l,
                    lane.sched.len(),
                    self.cached_for_routing(lane, &task.prompt),
                )
            })
            .collect();
        let lane = prefer_cached(&cands, self.route_margin);
        let routed = self
            .routed
            .get_mut(replica)
            .filter(|_| task.traffic == Traffic::Request);
        if let Some(n) = routed {
            *n += 1;
            metrics::counter!(m::REQUESTS_ROUTED, "replica" => replica.to_string()).increment(1);
        }
        if let Some(sc) = task.scoring {
            let spec = ScoreSpec {
                prompt: task.prompt.clone(),
                top: sc.top,
                rows: sc.rows,
            };
            self.scoring.insert(task.id, Arc::new(spec));
        }
        let sched = &mut self.lanes[replica][lane].sched;
        sched.add_speculative(task.id, task.prompt, task.speculative, task.max_tokens);
        // A probe must not wait behind a long prefill or a backlog: the
        // server's health hangs on it.
        if matches!(task.traffic, Traffic::Probe { .. }) {
            sched.expedite(task.id);
        }
        if let Some(sc) = task.scoring {
            sched.score_prompt(task.id, sc.first_row());
        }
        self.owner.insert(task.id, (replica, lane));
        if let Some(s) = task.sampler {
            self.samplers.insert(task.id, s);
        }
        if task.traffic == Traffic::Request {
            self.unscheduled.insert(task.id, task.arrived);
        }
    }

    fn next_step(
        &mut self,
        replica: usize,
        step: StepId,
    ) -> Option<Plan<Arc<LlmStep>, Arc<LlmStep>, NodeLinks>> {
        let mut planned = None;
        for lane in self.lanes[replica].iter_mut() {
            if lane.in_flight.is_some() {
                continue;
            }
            if let Some(mut plan) = lane.sched.plan() {
                offset_blocks(&mut plan, lane.offset);
                lane.in_flight = Some(step);
                planned = Some(plan);
                break;
            }
        }
        self.observe(replica, planned.as_ref());
        let plan = planned?;
        let samplers = plan
            .items
            .iter()
            .map(|i| {
                i.logits
                    .then(|| self.samplers.get(&i.group).cloned())
                    .flatten()
            })
            .collect();
        let scoring = plan
            .items
            .iter()
            .map(|i| {
                (!i.scored.is_empty())
                    .then(|| self.scoring.get(&i.group).cloned())
                    .flatten()
            })
            .collect();
        let plan = Arc::new(LlmStep {
            plan,
            samplers,
            scoring,
        });
        // Every node of the replica runs the whole plan: its stage's layers on
        // its rank's shard, micro-batch by micro-batch.
        let nodes = wire_step(self.shape, replica, step, self.cluster.as_ref())
            .into_iter()
            .enumerate()
            .map(|(node, links)| NodeTask {
                node,
                work: plan.clone(),
                links,
            })
            .collect();
        Some(Plan { step: plan, nodes })
    }

    fn completed(&mut self, replica: usize, step: StepId, verdict: Self::Verdict) {
        self.failing[replica] = false;
        let lanes = &mut self.lanes[replica];
        let ended = match lanes.iter_mut().find(|l| l.in_flight == Some(step)) {
            Some(lane) => {
                lane.in_flight = None;
                lane.sched.complete(verdict)
            }
            None => Vec::new(),
        };
        for g in ended {
            self.forget(g);
        }
        self.observe(replica, None);
    }

    fn failed(&mut self, replica: usize, steps: &[StepId]) -> Vec<TaskId> {
        self.failing[replica] = true;
        // A restarted node lost its whole pool: every lane recomputes.
        let mut failed = Vec::new();
        for lane in self.lanes[replica].iter_mut() {
            let in_step = lane.in_flight.take().is_some_and(|s| steps.contains(&s));
            let groups = lane.sched.reset();
            if in_step {
                // Groups cancelled during the failed step ended in the reset.
                failed.extend(groups.into_iter().filter(|g| lane.sched.contains(*g)));
            }
        }
        self.forget_ended(replica);
        self.observe(replica, None);
        failed
    }

    fn tasks_in(&self, replica: usize, step: StepId) -> Option<Vec<TaskId>> {
        // A failed step costs its whole lane its KV (see `failed`): the
        // tasks it holds are the lane's, in the step or waiting in it.
        let lane = self.lanes[replica]
            .iter()
            .position(|l| l.in_flight == Some(step))?;
        Some(
            self.owner
                .iter()
                .filter(|(_, &at)| at == (replica, lane))
                .map(|(&task, _)| task)
                .collect(),
        )
    }

    fn contains(&self, task: TaskId) -> bool {
        self.owner.contains_key(&task)
    }

    fn cancel(&mut self, task: TaskId) -> bool {
        let Some(&(r, l)) = self.owner.get(&task) else {
            return false;
        };
        if self.lanes[r][l].sched.cancel(task) {
            self.forget(task);
        }
        self.observe(r, None);
        true
    }

    fn drop_task(&mut self, task: TaskId) {
        if let Some((r, l)) = self.forget(task) {
            self.lanes[r][l].sched.drop_group(task);
            self.observe(r, None);
        }
    }

    fn is_idle(&self) -> bool {
        self.lanes.iter().flatten().all(|l| l.sched.is_empty())
    }

    fn stats(&self) -> LlmStats {
        let mut s = LlmStats::default();
        for l in self.lanes.iter().flatten() {
            let u = l.sched.kv_usage();
            s.running += l.sched.running();
            s.waiting += l.sched.waiting();
            s.kv_used += u.used;
            s.kv_total += u.total;
            s.preemptions += l.sched.stats().preemptions;
            s.prefix = add_prefix(s.prefix, l.sched.prefix_stats());
            s.drafted += l.sched.stats().drafted;
            s.accepted += l.sched.stats().accepted;
        }
        s.routed = self.routed.clone();
        s
    }
}

#[cfg(test)]
mod route_tests {
    use super::prefer_cached;

    #[test]
    fn the_longest_cached_prefix_wins_within_the_margin() {
        // (candidates as (index, load, cached positions), margin 4, pick)
        type Candidates<'a> = &'a [(usize, usize, usize)];
        let cases: [(Candidates, usize, &str); 5] = [
            (&[(0, 3, 0), (1, 1, 0)], 1, "least loaded"),
            (&[(0, 3, 32), (1, 1, 0)], 0, "cached, within the margin"),
            (&[(0, 6, 32), (1, 1, 16)], 1, "beyond the margin"),
            (&[(0, 6, 32), (1, 1, 0)], 1, "beyond it, least loaded"),
            (&[(0, 2, 16), (1, 1, 16)], 1, "equals: the less loaded"),
        ];
        for (cands, want, why) in cases {
            assert_eq!(prefer_cached(cands, 4), want, "{why}");
        }
        assert_eq!(prefer_cached(&[], 4), 0);
    }
}
