//! Compute nodes in other processes (ranks of an MPI job).
//!
//! On rank 0 every node stands in the pipeline as an [`LlmNode`]: a local
//! [`LlmWorker`], or a [`RemoteNode`] proxy for a node another rank hosts.
//! The proxy sends the step's plan to that rank (a versioned
//! [`cluster::wire`] message on the node's control address) and waits for
//! its outcome; where the node is the last stage's rank 0, the outcome
//! carries the logits, and the proxy chooses the tokens here with the
//! requests' samplers, which never leave rank 0. Every other rank runs
//! [`serve_nodes`]: a thread per node it hosts, each running the steps rank
//! 0 sends it, with the step's links built by [`wire_step`] exactly as rank
//! 0 builds them (links between processes over the transport, links within
//! one over channels and in-memory collectives, shared by that rank's nodes
//! of the step).
//!
//! Before any node is built, every other rank greets rank 0 with the
//! settings all ranks must agree on (its model file's contents, the
//! layout and placement, the sizes of a node's buffers), and rank 0
//! refuses the job, naming the rank and what differs, unless all agree
//! ([`hello`], [`welcome`]): so no rank computes with another model or
//! waits for a node another rank does not think it hosts. Each node
//! another rank hosts then tells rank 0 once it has loaded, or why it
//! could not (an error, a panic while building, a thread that could not
//! start), and rank 0's engine starts only once all have ([`wait_loaded`]).
//!
//! A node that fails on another rank reports the failure; its proxy returns
//! it, the node actor on rank 0 is restarted as any node is, and its factory
//! tells the rank to rebuild the node (dropping its KV cache) before the
//! replica recomputes. Aborting a step's links reaches every process that
//! hosts one of the replica's nodes, and there aborts the step's links
//! within the process as well (their [`ReplicaAbort`] hooks the step's
//! streams): so a node waiting on a peer of its own process whose part
//! rank 0 refused (planned before that peer was rebuilt) returns too. The
//! draft model's node may run anywhere: its drafts travel to the target's
//! nodes as messages, and the last stage's rank 0 hands back the drafts its
//! logits verify with them.
//!
//! [`ReplicaAbort`]: crate::llm::policy::ReplicaAbort
//!
//! A rank that is lost (the transport failed: it died, or its heartbeat
//! stopped) is not recovered: rank 0's engine stops for good (see
//! `Engine::stopped`), a proxy waiting for it returns at its next look at
//! the transport, and a node loop here ends with the transport's error, so
//! its rank aborts the job.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::wire::{self, Failure, Message, RunStep, StepDone};
use cluster::Address;
use kit::{NodeError, NodeId, NodeWorker};

use crate::llm::policy::{wire_step, Cluster, NodeLinks, ReplicaShape};
use crate::llm::step::{LlmStep, Picks};
use crate::llm::worker::LlmWorker;

/// A node as rank 0's pipeline holds it.
pub enum LlmNode {
    /// A node of this process.
    Local(Box<LlmWorker>),
    /// A node another rank hosts.
    Remote(RemoteNode),
}

impl NodeWorker for LlmNode {
    type Work = Arc<LlmStep>;
    type Links = NodeLinks;
    type Output = Option<Picks>;

    fn run(&mut self, step: &Arc<LlmStep>, links: &NodeLinks) -> Result<Option<Picks>, NodeError> {
        match self {
            LlmNode::Local(w) => w.run(step, links),
            LlmNode::Remote(r) => r.run(step, links),
        }
    }

    fn abort(links: &NodeLinks) {
        links.abort.abort();
    }
}

/// Rank 0's stand-in for a node another rank hosts.
pub struct RemoteNode {
    id: NodeId,
    shape: ReplicaShape,
    cluster: Cluster,
}

/// How often a wait for another rank's message looks at the transport's health.
const POLL: Duration = Duration::from_millis(100);

/// The node's number in the job: its control address.
fn gid(shape: ReplicaShape, id: NodeId) -> usize {
    id.replica * shape.nodes() + id.index
}

fn failure(e: NodeError) -> Failure {
    match e {
        NodeError::Aborted(m) => Failure::Aborted(m),
        other => Failure::Failed(other.to_string()),
    }
}

impl RemoteNode {
    /// The proxy of node `id`, which `cluster` places on another rank.
    pub fn new(id: NodeId, shape: ReplicaShape, cluster: Cluster) -> Self {
        Self { id, shape, cluster }
    }

    fn rank(&self) -> usize {
        self.cluster.rank_of(self.id.replica, self.id.index)
    }

    fn send(&self, message: &Message) -> Result<(), NodeError> {
        self.cluster
            .transport
            .send(
                self.rank(),
                Cluster::control(gid(self.shape, self.id), true),
                &wire::encode(message),
            )
            .map_err(|e| NodeError::Failed(format!("rank {}: {e}", self.rank())))
    }

    fn run(&mut self, step: &Arc<LlmStep>, links: &NodeLinks) -> Result<Option<Picks>, NodeError> {
        self.send(&Message::RunStep(RunStep {
            replica: self.id.replica as u32,
            index: self.id.index as u32,
            step: links.step,
            plan: step.plan.clone(),
        }))?;
        let from = Cluster::control(gid(self.shape, self.id), false);
        let rank = self.rank();
        let done = match recv_watching(&self.cluster, rank, from) {
            Ok(Message::StepDone(d)) if d.step == step.plan.id => d,
            Ok(other) => {
                return Err(NodeError::Failed(format!(
                    "rank {rank} answered a step with {other:?}"
                )))
            }
            Err(NoMessage::Unreadable(e)) => {
                return Err(NodeError::Failed(format!("rank {rank}: {e}")))
            }
            Err(NoMessage::Lost(reason)) => {
                return Err(NodeError::Failed(format!("rank {rank} is lost: {reason}")))
            }
        };
        let hosted = match done.outcome {
            Ok(h) => h,
            Err(Failure::Aborted(m)) => return Err(NodeError::Aborted(m)),
            Err(Failure::Failed(m)) => {
                return Err(NodeError::Failed(format!("on rank {}: {m}", self.rank())))
            }
        };
        let (stage, rank) = self.shape.place(self.id.index);
        if stage + 1 != self.shape.pp || rank != 0 {
            return Ok(None);
        }
        let mut picks = Picks::new();
        let drafts = (!hosted.drafts.is_empty()).then_some(&hosted.drafts[..]);
        for (first, l) in &hosted.logits {
            step.pick(*first as usize, l, &mut picks, drafts);
        }
        Ok(Some(picks))
    }
}

/// Wraps a worker factory of this process's nodes into rank 0's: nodes
/// another rank hosts become proxies, and a proxy made again (the node
/// actor restarted after a failure) first tells its rank to rebuild the
/// node.
pub fn node_factory(
    local: impl Fn(NodeId) -> Result<LlmWorker, String> + Send + Sync + 'static,
    shape: ReplicaShape,
    cluster: Option<Cluster>,
) -> kit::WorkerFactory<LlmNode> {
    let made: Mutex<HashSet<NodeId>> = Mutex::new(HashSet::new());
    Arc::new(move |id: NodeId| {
        let Some(c) = cluster.as_ref().filter(|c| !c.hosts(id.replica, id.index)) else {
            return local(id).map(|w| LlmNode::Local(Box::new(w)));
        };
        let node = RemoteNode::new(id, shape, c.clone());
        let again = !made
            .lock()
            .map_err(|_| "the proxy registry is poisoned".to_string())?
            .insert(id);
        if again {
            node.send(&Message::Restart {
                replica: id.replica as u32,
                index: id.index as u32,
            })
            .map_err(|e| e.to_string())?;
        }
        Ok(LlmNode::Remote(node))
    })
}

/// Tells every node other ranks host that the job is over.
pub fn shut_down_remote_nodes(cluster: &Cluster, shape: ReplicaShape, dp: usize) {
    for replica in 0..dp {
        for index in 0..shape.nodes() {
            let id = NodeId { replica, index };
            if !cluster.hosts(replica, index) {
                let _ = cluster.transport.send(
                    cluster.rank_of(replica, index),
                    Cluster::control(gid(shape, id), true),
                    &wire::encode(&Message::Shutdown),
                );
            }
        }
    }
}

/// Tells rank 0 that node `id`, hosted here, has loaded, or why it could
/// not ([`Message::Loaded`]).
fn send_loaded(
    cluster: &Cluster,
    shape: ReplicaShape,
    id: NodeId,
    error: Option<String>,
) -> Result<(), String> {
    let loaded = Message::Loaded {
        replica: id.replica as u32,
        index: id.index as u32,
        error,
    };
    cluster
        .transport
        .send(
            0,
            Cluster::control(gid(shape, id), false),
            &wire::encode(&loaded),
        )
        .map_err(|e| e.to_string())
}

/// The settings every rank of a job must agree on, by name
/// ([`Message::Hello`]).
pub type Settings = Vec<(String, String)>;

/// Why no message came from a rank.
enum NoMessage {
    /// The transport failed (the rank died, or its heartbeat stopped).
    Lost(String),
    /// What came is not a message of this build.
    Unreadable(String),
}

/// The next message from rank `from` on `address`, looking at the
/// transport's health every [`POLL`] while it waits.
fn recv_watching(cluster: &Cluster, from: usize, address: Address) -> Result<Message, NoMessage> {
    loop {
        match cluster.transport.recv(from, address, Some(POLL)) {
            Ok(bytes) => {
                return wire::decode(&bytes).map_err(|e| NoMessage::Unreadable(e.to_string()))
            }
            // A timeout: look whether the rank is still there.
            Err(_) => {
                if let Some(reason) = cluster.transport.mailbox().failure() {
                    return Err(NoMessage::Lost(reason));
                }
            }
        }
    }
}

/// The next greeting from rank `from` (to rank 0 if `to_rank0`).
fn recv_greeting(cluster: &Cluster, from: usize, to_rank0: bool) -> Result<Message, String> {
    recv_watching(cluster, from, Cluster::greeting(to_rank0)).map_err(|e| match e {
        NoMessage::Lost(reason) => format!("rank {from} is lost while the job starts: {reason}"),
        NoMessage::Unreadable(e) => format!("rank {from}: {e}"),
    })
}

/// On a rank other than 0, before it builds its nodes: tells rank 0 this
/// rank's settings (or why it cannot serve its nodes), and waits for rank
/// 0's answer. Fails with why the job cannot start: rank 0 refused it (a
/// rank's settings differ from rank 0's, or a rank cannot serve), or rank
/// 0 is lost.
pub fn hello(cluster: &Cluster, settings: Result<Settings, String>) -> Result<(), String> {
    let hello = Message::Hello { settings };
    cluster
        .transport
        .send(0, Cluster::greeting(true), &wire::encode(&hello))
        .map_err(|e| e.to_string())?;
    match recv_greeting(cluster, 0, false)? {
        Message::Welcome { refused: None } => Ok(()),
        Message::Welcome { refused: Some(why) } => Err(format!("rank 0 refused the job: {why}")),
        other => Err(format!("rank 0 answered the hello with {other:?}")),
    }
}

/// On rank 0, before it builds its nodes: takes every other rank's hello
/// and answers each, refusing the job if any rank cannot serve its nodes,
/// or runs another job than `mine` (this rank's settings, or why it cannot
/// start): another model's contents, layout, placement or buffer sizes.
/// The error names the rank and each setting that differs, with both
/// values.
pub fn welcome(cluster: &Cluster, mine: Result<&Settings, String>) -> Result<(), String> {
    let mut refused = mine
        .as_ref()
        .err()
        .map(|e| format!("rank 0 cannot start: {e}"));
    for rank in 1..cluster.placement.ranks() {
        let why = match recv_greeting(cluster, rank, true) {
            Ok(Message::Hello {
                settings: Ok(theirs),
            }) => match &mine {
                Ok(mine) => differences(rank, mine, &theirs),
                Err(_) => None,
            },
            Ok(Message::Hello { settings: Err(e) }) => {
                let nodes: Vec<String> = cluster
                    .placement
                    .nodes_on(rank)
                    .iter()
                    .map(|(r, i)| format!("r{r}n{i}"))
                    .collect();
                Some(format!(
                    "rank {rank} cannot serve its nodes ({}): {e}",
                    nodes.join(", ")
                ))
            }
            Ok(other) => Some(format!("rank {rank} greeted with {other:?}")),
            Err(lost) => {
                // No answer can reach a lost rank; tell the others.
                refused.get_or_insert(lost);
                continue;
            }
        };
        if let Some(why) = why {
            refused.get_or_insert(why);
        }
    }
    let answer = wire::encode(&Message::Welcome {
        refused: refused.clone(),
    });
    for rank in 1..cluster.placement.ranks() {
        let _ = cluster
            .transport
            .send(rank, Cluster::greeting(false), &answer);
    }
    refused.map_or(Ok(()), Err)
}

/// How rank `rank`'s settings differ from rank 0's, named, if they do.
fn differences(rank: usize, mine: &Settings, theirs: &Settings) -> Option<String> {
    let value = |s: &Settings, key: &str| {
        s.iter()
            .find(|(k, _)| k == key)
            .map_or("nothing".to_string(), |(_, v)| format!("`{v}`"))
    };
    let mut keys: Vec<&str> = mine.iter().map(|(k, _)| k.as_str()).collect();
    keys.extend(theirs.iter().map(|(k, _)| k.as_str()));
    let mut seen = HashSet::new();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| seen.insert(*k))
        .filter(|k| value(mine, k) != value(theirs, k))
        .map(|k| {
            format!(
                "its {k} is {} where rank 0's is {}",
                value(theirs, k),
                value(mine, k)
            )
        })
        .collect();
    (!differ.is_empty()).then(|| {
        format!(
            "rank {rank} does not run rank 0's job: {} (every rank must run the same model file and settings)",
            differ.join("; ")
        )
    })
}

/// Waits (rank 0) until every node another rank hosts has loaded: each
/// rank says so once per node ([`Message::Loaded`]). Fails naming the first
/// node that could not load and why, or a rank lost meanwhile (the
/// transport failed: it died, or its heartbeat stopped).
pub fn wait_loaded(cluster: &Cluster, shape: ReplicaShape, dp: usize) -> Result<(), String> {
    for replica in 0..dp {
        for index in (0..shape.nodes()).filter(|&i| !cluster.hosts(replica, i)) {
            let id = NodeId { replica, index };
            let rank = cluster.rank_of(replica, index);
            let from = Cluster::control(gid(shape, id), false);
            let node = format!("node r{replica}n{index} on rank {rank}");
            match recv_watching(cluster, rank, from) {
                Ok(Message::Loaded { error: None, .. }) => {}
                Ok(Message::Loaded { error: Some(e), .. }) => {
                    return Err(format!("{node} could not load: {e}"))
                }
                Ok(other) => return Err(format!("{node} sent {other:?} before it loaded")),
                Err(NoMessage::Unreadable(e)) => return Err(format!("{node}: {e}")),
                Err(NoMessage::Lost(reason)) => {
                    return Err(format!("{node} is lost while it loads: {reason}"))
                }
            }
        }
    }
    Ok(())
}

/// The links of one step for this rank's nodes of a replica, built once
/// and taken by each node.
type StepLinks = HashMap<(usize, u64), (Vec<Option<NodeLinks>>, usize)>;

/// Runs the nodes `cluster` places on this rank (not rank 0) until rank 0
/// ends the job: one thread per node, each building its worker with
/// `local` and running the steps rank 0 sends it.
pub fn serve_nodes(
    local: impl Fn(NodeId) -> Result<LlmWorker, String> + Send + Sync + 'static,
    shape: ReplicaShape,
    cluster: Cluster,
) -> Result<(), String> {
    let me = cluster.rank();
    let hosted = cluster.placement.nodes_on(me);
    if hosted.is_empty() {
        return Err(format!("the placement gives rank {me} no node"));
    }
    let local = Arc::new(local);
    let registry: Arc<Mutex<StepLinks>> = Arc::default();
    let threads: Vec<_> = hosted
        .iter()
        .map(|&(replica, index)| {
            let per_replica = hosted.iter().filter(|(r, _)| *r == replica).count();
            let (local, registry, mine) = (local.clone(), registry.clone(), cluster.clone());
            std::thread::Builder::new()
                .name(format!("rank{me}-r{replica}n{index}"))
                .spawn(move || {
                    let id = NodeId { replica, index };
                    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        node_loop(id, shape, &mine, &*local, &registry, per_replica)
                    }))
                    .unwrap_or_else(|p| Err(format!("the node panicked: {}", kit::panic_text(p))));
                    if let Err(e) = &ended {
                        // Rank 0 would wait for ever on this node's part of
                        // its next step, and this rank's other nodes on rank
                        // 0: fail the transport here, so they end too and
                        // the rank ends the job naming why.
                        mine.transport
                            .mailbox()
                            .fail(format!("node r{replica}n{index} on rank {me} ended: {e}"));
                    }
                    ended
                })
                .map_err(|e| {
                    let e = format!("cannot start node r{replica}n{index}: {e}");
                    // Rank 0 waits for this node: tell it the node is lost.
                    let id = NodeId { replica, index };
                    let _ = send_loaded(&cluster, shape, id, Some(e.clone()));
                    e
                })
        })
        .collect::<Result<_, _>>()?;
    let mut first_error = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert_with(|| "a node thread panicked".into());
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Builds node `id`'s worker with `local`; a panic while building is a
/// load failure like any other (so rank 0 hears of it and no thread dies
/// silently).
fn load(
    local: &(dyn Fn(NodeId) -> Result<LlmWorker, String> + Send + Sync),
    id: NodeId,
) -> Result<LlmWorker, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| local(id))).unwrap_or_else(|p| {
        Err(format!(
            "the node panicked while loading: {}",
            kit::panic_text(p)
        ))
    })
}

fn node_loop(
    id: NodeId,
    shape: ReplicaShape,
    cluster: &Cluster,
    local: &(dyn Fn(NodeId) -> Result<LlmWorker, String> + Send + Sync),
    registry: &Mutex<StepLinks>,
    per_replica: usize,
) -> Result<(), String> {
    let gid = gid(shape, id);
    let mut worker = load(local, id);
    if let Err(e) = &worker {
        tracing::error!("node r{}n{} could not load: {e}", id.replica, id.index);
    }
    send_loaded(cluster, shape, id, worker.as_ref().err().cloned())?;
    loop {
        let bytes = cluster
            .transport
            .recv(0, Cluster::control(gid, true), None)
            .map_err(|e| e.to_string())?;
        match wire::decode(&bytes) {
            Ok(Message::RunStep(run)) => {
                let links = {
                    let mut map = registry.lock().map_err(|_| "step links poisoned")?;
                    // An aborted step's links that a node will never take
                    // (rank 0 refused its part): one that comes after all
                    // gets fresh links, aborted at once by the streams.
                    map.retain(|_, (links, _)| {
                        !links.iter().flatten().any(|l| l.abort.is_aborted())
                    });
                    let key = (id.replica, run.step);
                    let entry = map.entry(key).or_insert_with(|| {
                        let links = wire_step(shape, id.replica, run.step, Some(cluster));
                        (links.into_iter().map(Some).collect(), per_replica)
                    });
                    let links = entry.0.get_mut(id.index).and_then(Option::take);
                    entry.1 = entry.1.saturating_sub(1);
                    if entry.1 == 0 {
                        map.remove(&key);
                    }
                    links.ok_or("a step's links taken twice")?
                };
                let n = run.plan.items.len();
                let step = LlmStep {
                    plan: run.plan,
                    samplers: vec![None; n],
                    scoring: vec![None; n],
                };
                let outcome = match &mut worker {
                    Ok(w) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        w.run_hosted(&step, &links)
                    }))
                    .unwrap_or_else(|_| Err(NodeError::Failed("the node panicked".into()))),
                    Err(e) => Err(NodeError::Failed(format!("the node could not load: {e}"))),
                };
                if outcome.is_err() {
                    links.abort.abort();
                }
                let done = Message::StepDone(StepDone {
                    replica: id.replica as u32,
                    index: id.index as u32,
                    step: step.plan.id,
                    outcome: outcome.map_err(failure),
                });
                cluster
                    .transport
                    .send(0, Cluster::control(gid, false), &wire::encode(&done))
                    .map_err(|e| e.to_string())?;
            }
            Ok(Message::Restart { .. }) => {
                // Drop the old worker (its pool and KV) before loading anew.
                drop(std::mem::replace(&mut worker, Err("restarting".into())));
                worker = load(local, id);
            }
            Ok(Message::Shutdown) => return Ok(()),
            Ok(other) => tracing::warn!("node r{}n{}: unexpected {other:?}", id.replica, id.index),
            Err(e) => return Err(format!("rank 0 sent an unreadable message: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::{ClusterSpec, Layout, Loopback, Mode, Placement, Transport};

    /// A node whose build panics on another rank (not a load error it
    /// returns) is reported to rank 0 as a node that could not load, with
    /// the panic's message, and its rank still ends when rank 0 ends the
    /// job.
    /// One replica of `tp` × `pp` nodes placed by host on a job of two
    /// ranks as threads: its placement, the ranks' transports, its shape.
    fn two_ranks(tp: usize, pp: usize) -> (Arc<Placement>, Vec<Arc<Loopback>>, ReplicaShape) {
        let spec = ClusterSpec {
            ranks: 2,
            mode: Mode::ByHost,
            ..ClusterSpec::default()
        };
        let layout = Layout {
            dp: 1,
            tp,
            pp,
            draft: false,
        };
        let placement = Arc::new(Placement::plan(&spec, layout, 2).expect("placement"));
        (placement, Loopback::world(2), ReplicaShape::new(tp, pp))
    }

    #[test]
    fn a_node_that_panics_while_loading_fails_rank_0s_wait_naming_why() {
        let (placement, world, shape) = two_ranks(1, 2);
        let rank1 = Cluster {
            transport: world[1].clone(),
            placement: placement.clone(),
        };
        let served = std::thread::spawn(move || {
            serve_nodes(|_| panic!("no memory for the weights"), shape, rank1)
        });
        let rank0 = Cluster {
            transport: world[0].clone(),
            placement,
        };
        let e = wait_loaded(&rank0, shape, 1).expect_err("a node that panicked loaded");
        assert_eq!(
            e,
            "node r0n1 on rank 1 could not load: \
             the node panicked while loading: no memory for the weights"
        );
        shut_down_remote_nodes(&rank0, shape, 1);
        assert_eq!(served.join().expect("rank 1's thread"), Ok(()));
        for t in &world {
            assert_eq!(t.mailbox().pending(), 0, "rank {}: messages left", t.rank());
        }
    }

    /// A node of another rank whose loop ends with an error (here, rank 0
    /// sent it what no build reads) ends that rank's other nodes too, so
    /// the rank ends the job rather than leave rank 0 waiting for ever on
    /// the node that is gone.
    #[test]
    fn a_node_loop_that_ends_with_an_error_ends_its_ranks_other_nodes() {
        let (placement, world, shape) = two_ranks(2, 2);
        assert_eq!(placement.nodes_on(1), vec![(0, 2), (0, 3)]);
        let rank1 = Cluster {
            transport: world[1].clone(),
            placement,
        };
        let (tx, served) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(serve_nodes(|_| Err("no weights here".into()), shape, rank1));
        });
        world[0]
            .send(1, Cluster::control(2, true), b"not a message")
            .expect("send");
        let e = served
            .recv_timeout(Duration::from_secs(20))
            .expect("rank 1 still serves its other node")
            .expect_err("a node's loop failed");
        assert!(e.contains("unreadable message"), "{e}");
        let failure = world[1].mailbox().failure().unwrap_or_default();
        assert!(
            failure.contains("node r0n2 on rank 1 ended: rank 0 sent an unreadable message"),
            "{failure}"
        );
    }
}
