//! The merge stage: assembles each step's node outputs and decides what every
//! task does next.
//!
//! [`MergerActor`] collects one [`NodeReport`] from every node of a replica for
//! a step. When all succeeded it hands the outputs to its [`Merge`] (for the
//! LLM engine: sample, stop, detokenize, stream) and sends the verdict to the
//! scheduler; when any failed it reports the failure instead, and the merge
//! state of every task is left untouched, so recomputed tasks continue exactly
//! where they were.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::kit::{End, Merge, NodeError, NodeId, TaskId};
use crate::scheduler::StepDone;

/// One node's result for one step.
pub struct NodeReport<W, O> {
    /// The reporting node.
    pub node: NodeId,
    /// The dispatch number.
    pub step: u64,
    /// The step's plan.
    pub work: Arc<W>,
    /// The node's output or failure.
    pub result: Result<O, NodeError>,
    /// Time the node spent.
    pub elapsed: Duration,
}

impl<W: Send + Sync + 'static, O: Send + 'static> Message for NodeReport<W, O> {
    type Result = ();
}

/// A task was admitted; the merger takes its part.
pub struct Register<R>(pub R);

impl<R: Send + 'static> Message for Register<R> {
    type Result = ();
}

/// Ends a task for a reason other than finishing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndTask(pub TaskId, pub End);

struct Pending<M: Merge> {
    work: Arc<M::Work>,
    outputs: Vec<Option<M::Output>>,
    failures: Vec<(NodeId, NodeError)>,
    got: usize,
    compute: Duration,
}

/// The merge stage.
pub struct MergerActor<M: Merge> {
    merge: M,
    nodes_per_replica: usize,
    pending: HashMap<u64, Pending<M>>,
    done: Recipient<StepDone<M::Verdict>>,
}

impl<M: Merge> MergerActor<M> {
    /// A merger expecting `nodes_per_replica` reports per step.
    pub fn new(merge: M, nodes_per_replica: usize, done: Recipient<StepDone<M::Verdict>>) -> Self {
        Self {
            merge,
            nodes_per_replica,
            pending: HashMap::new(),
            done,
        }
    }
}

impl<M: Merge> Actor for MergerActor<M> {
    type Context = Context<Self>;
}

impl<M: Merge> Handler<NodeReport<M::Work, M::Output>> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: NodeReport<M::Work, M::Output>, _: &mut Self::Context) {
        let n = self.nodes_per_replica;
        let p = self.pending.entry(msg.step).or_insert_with(|| Pending {
            work: msg.work.clone(),
            outputs: (0..n).map(|_| None).collect(),
            failures: Vec::new(),
            got: 0,
            compute: Duration::ZERO,
        });
        p.got += 1;
        p.compute = p.compute.max(msg.elapsed);
        match msg.result {
            Ok(o) => p.outputs[msg.node.index] = Some(o),
            Err(e) => p.failures.push((msg.node, e)),
        }
        if p.got < n {
            return;
        }
        let p = self.pending.remove(&msg.step).expect("just updated");
        let t0 = Instant::now();
        let result = if p.failures.is_empty() {
            let outputs = p.outputs.into_iter().flatten().collect();
            Ok(self.merge.merge(&p.work, outputs))
        } else {
            Err(p.failures)
        };
        self.done.do_send(StepDone {
            replica: msg.node.replica,
            result,
            compute: p.compute,
            merge: t0.elapsed(),
        });
    }
}

impl<M: Merge> Handler<Register<M::Registration>> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: Register<M::Registration>, _: &mut Self::Context) {
        self.merge.register(msg.0);
    }
}

impl<M: Merge> Handler<EndTask> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: EndTask, _: &mut Self::Context) {
        self.merge.end(msg.0, msg.1);
    }
}
