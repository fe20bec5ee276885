//! The merge stage: assembles each step's node outputs and decides what every
//! task does next; the one place where tasks end.
//!
//! [`Collector`] is the bookkeeping, a plain struct: for every dispatched step
//! it knows (from [`Expect`]) which nodes have work, gathers one
//! [`NodeReport`] from each, and says when the step is complete.
//!
//! [`MergerActor`] runs on its own thread. It owns the [`Merge`] — for the
//! LLM engine: sampling, stop conditions, detokenizing and streaming — so that
//! work never delays scheduling. When every node of a step succeeded it hands
//! their outputs to the merge and sends the verdict to the scheduler; when any
//! failed it reports the failure instead, and the merge state of every task is
//! left untouched, so recomputed tasks continue exactly where they were.
//! Registrations ([`Register`]) and ends ([`EndTask`]) of tasks arrive here
//! from the queue and the scheduler.
//!
//! A panic in the [`Merge`] is caught: the merge's state can no longer be
//! trusted, so the merger reports it to the scheduler, which stops the
//! pipeline; the merger then ends every task still registered with an error
//! naming the panic ([`Merge::end_all`]) and stops the actor system.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::node::panic_text;
use crate::scheduler::{Fault, StepDone};
use crate::traits::{End, Merge, NodeError, NodeId, StepId, TaskId};

/// A step was dispatched: which nodes have work, and what the merger needs.
pub struct Expect<S> {
    /// The replica.
    pub replica: usize,
    /// The step.
    pub step: StepId,
    /// Indices of the nodes with work, in node order.
    pub nodes: Vec<usize>,
    /// Nodes that failed the step before it ran (the plan gave work to a node
    /// the replica does not have): the step completes as failed with them.
    pub failed: Failures,
    /// The policy's description of the step.
    pub info: S,
}

impl<S: Send + 'static> Message for Expect<S> {
    type Result = ();
}

/// One node's result for one step.
pub struct NodeReport<O> {
    /// The reporting node.
    pub node: NodeId,
    /// The step.
    pub step: StepId,
    /// The node's output or failure.
    pub result: Result<O, NodeError>,
    /// Time the node spent.
    pub elapsed: Duration,
}

impl<O: Send + 'static> Message for NodeReport<O> {
    type Result = ();
}

/// A task was submitted; the merger takes the requester's part.
pub struct Register<R>(pub TaskId, pub R);

impl<R: Send + 'static> Message for Register<R> {
    type Result = ();
}

/// Ends a task for a reason other than finishing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndTask(pub TaskId, pub End);

/// The pipeline stops, because user code panicked or on purpose (a
/// [`crate::Halter`], passed on by the sealed queue behind the
/// registrations of every task it accepted): the merger ends every task
/// still registered with `why`, then stops `system`.
pub(crate) struct Halt {
    pub(crate) why: String,
    pub(crate) system: System,
}

impl Message for Halt {
    type Result = ();
}

/// Answered once every message sent to the merger before it was handled:
/// a shutdown that drained waits for it, so that the ends the scheduler
/// sent last (a cancellation, a task failed for good) reach their
/// requesters before the actors stop.
pub(crate) struct Flush;

impl Message for Flush {
    type Result = ();
}

impl<M: Merge> Handler<Flush> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Self::Context) {}
}

struct Pending<S, O> {
    replica: usize,
    info: Option<S>,
    expected: Vec<usize>,
    outputs: Vec<(usize, O)>,
    failures: Failures,
    got: usize,
    compute: Duration,
}

/// The nodes that failed a step, and why.
pub type Failures = Vec<(NodeId, NodeError)>;

/// A step whose nodes have all reported.
pub struct Complete<S, O> {
    /// The replica.
    pub replica: usize,
    /// The step.
    pub step: StepId,
    /// The policy's description of it.
    pub info: S,
    /// Every node's output in node order, or the failures.
    pub result: Result<Vec<(usize, O)>, Failures>,
    /// The slowest node's compute time.
    pub compute: Duration,
}

/// Gathers node reports into complete steps.
pub struct Collector<S, O> {
    /// Boxed, so that the collector is `Unpin` whatever `S` and `O` are.
    pending: HashMap<StepId, Box<Pending<S, O>>>,
}

impl<S, O> Default for Collector<S, O> {
    fn default() -> Self {
        Self {
            pending: HashMap::new(),
        }
    }
}

impl<S, O> Collector<S, O> {
    fn entry(&mut self, step: StepId, replica: usize) -> &mut Pending<S, O> {
        self.pending.entry(step).or_insert_with(|| {
            Box::new(Pending {
                replica,
                info: None,
                expected: Vec::new(),
                outputs: Vec::new(),
                failures: Vec::new(),
                got: 0,
                compute: Duration::ZERO,
            })
        })
    }

    /// A step was dispatched to `nodes`.
    pub fn expect(&mut self, e: Expect<S>) -> Option<Complete<S, O>> {
        let p = self.entry(e.step, e.replica);
        p.info = Some(e.info);
        p.expected = e.nodes;
        p.failures.extend(e.failed);
        self.take_if_complete(e.step)
    }

    /// A node reported.
    pub fn report(&mut self, r: NodeReport<O>) -> Option<Complete<S, O>> {
        let p = self.entry(r.step, r.node.replica);
        p.got += 1;
        p.compute = p.compute.max(r.elapsed);
        match r.result {
            Ok(o) => p.outputs.push((r.node.index, o)),
            Err(e) => p.failures.push((r.node, e)),
        }
        self.take_if_complete(r.step)
    }

    /// Steps still waiting for reports.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn take_if_complete(&mut self, step: StepId) -> Option<Complete<S, O>> {
        let p = self.pending.get(&step)?;
        if p.info.is_none() || p.got < p.expected.len() {
            return None;
        }
        let mut p = self.pending.remove(&step)?;
        let info = p.info.take()?;
        let result = if p.failures.is_empty() {
            p.outputs.sort_by_key(|(i, _)| *i);
            Ok(p.outputs)
        } else {
            Err(p.failures)
        };
        Some(Complete {
            replica: p.replica,
            step,
            info,
            result,
            compute: p.compute,
        })
    }
}

/// The merge stage.
pub struct MergerActor<M: Merge> {
    merge: M,
    collector: Collector<M::Step, M::Output>,
    done: Recipient<StepDone<M::Verdict>>,
    /// Where a panic of the merge is reported (the scheduler).
    fault: Recipient<Fault>,
    /// The merge panicked, or the pipeline is stopping after a panic: steps
    /// are no longer merged.
    faulted: bool,
}

impl<M: Merge> MergerActor<M> {
    /// A merger reporting steps to `done` and its merge's panics to `fault`.
    pub(crate) fn new(
        merge: M,
        done: Recipient<StepDone<M::Verdict>>,
        fault: Recipient<Fault>,
    ) -> Self {
        Self {
            merge,
            collector: Collector::default(),
            done,
            fault,
            faulted: false,
        }
    }

    /// Runs `f` on the merge, catching a panic: `None` if it panicked (the
    /// first panic is reported to the scheduler, which stops the pipeline).
    fn guarded<T>(&mut self, method: &str, f: impl FnOnce(&mut M) -> T) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(|| f(&mut self.merge))) {
            Ok(v) => Some(v),
            Err(p) => {
                let why = format!("Merge::{method} panicked: {}", panic_text(p));
                tracing::error!("{why}");
                if !self.faulted {
                    self.faulted = true;
                    self.fault.do_send(Fault(why));
                }
                None
            }
        }
    }

    fn finish(&mut self, c: Option<Complete<M::Step, M::Output>>) {
        let Some(c) = c else { return };
        if self.faulted {
            return;
        }
        let t0 = Instant::now();
        let result = match c.result {
            Ok(outputs) => match self.guarded("merge", |m| m.merge(&c.info, outputs)) {
                Some(verdict) => Ok(verdict),
                // The pipeline stops; no verdict to apply.
                None => return,
            },
            Err(failures) => Err(failures),
        };
        self.done.do_send(StepDone {
            replica: c.replica,
            step: c.step,
            result,
            compute: c.compute,
            merge: t0.elapsed(),
        });
    }
}

impl<M: Merge> Actor for MergerActor<M> {
    type Context = Context<Self>;
}

impl<M: Merge> Handler<Expect<M::Step>> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: Expect<M::Step>, _: &mut Self::Context) {
        let c = self.collector.expect(msg);
        self.finish(c);
    }
}

impl<M: Merge> Handler<NodeReport<M::Output>> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: NodeReport<M::Output>, _: &mut Self::Context) {
        let c = self.collector.report(msg);
        self.finish(c);
    }
}

impl<M: Merge> Handler<Register<M::Registration>> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: Register<M::Registration>, _: &mut Self::Context) {
        self.guarded("register", |m| m.register(msg.0, msg.1));
    }
}

impl<M: Merge> Handler<EndTask> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: EndTask, _: &mut Self::Context) {
        self.guarded("end", |m| m.end(msg.0, msg.1));
    }
}

impl<M: Merge> Handler<Halt> for MergerActor<M> {
    type Result = ();

    fn handle(&mut self, msg: Halt, _: &mut Self::Context) {
        self.faulted = true;
        let end = End::Failed(msg.why);
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.merge.end_all(end))) {
            // What it had not ended yet is dropped with it.
            tracing::error!("Merge::end_all panicked: {}", panic_text(p));
        }
        msg.system.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(index: usize, step: StepId, ok: bool) -> NodeReport<usize> {
        NodeReport {
            node: NodeId { replica: 0, index },
            step,
            result: if ok {
                Ok(index * 10)
            } else {
                Err(NodeError::Failed("x".into()))
            },
            elapsed: Duration::from_millis(index as u64),
        }
    }

    fn expect(step: StepId, nodes: Vec<usize>) -> Expect<&'static str> {
        Expect {
            replica: 0,
            step,
            nodes,
            failed: Vec::new(),
            info: "s",
        }
    }

    #[test]
    fn a_step_completes_when_every_node_with_work_reported() {
        let mut c = Collector::default();
        assert!(c.expect(expect(7, vec![0, 2])).is_none());
        assert!(c.report(report(2, 7, true)).is_none());
        let done = c.report(report(0, 7, true)).expect("both reported");
        assert_eq!(done.result.ok(), Some(vec![(0, 0), (2, 20)]));
        assert_eq!(done.compute, Duration::from_millis(2));
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn steps_interleave_and_a_failure_is_reported_whole() {
        let mut c = Collector::default();
        c.expect(expect(1, vec![0, 1]));
        c.expect(expect(2, vec![1]));
        assert!(c.report(report(0, 1, false)).is_none());
        assert!(c.report(report(1, 2, true)).is_some(), "step 2 is separate");
        let done = c.report(report(1, 1, true)).expect("complete");
        assert_eq!(done.result.err().map(|f| f.len()), Some(1));
    }

    #[test]
    fn a_step_failed_at_dispatch_completes_as_failed_without_reports() {
        let mut c: Collector<&str, usize> = Collector::default();
        let bad = NodeId {
            replica: 0,
            index: 7,
        };
        let e = Expect {
            failed: vec![(bad, NodeError::Failed("no such node".into()))],
            ..expect(5, vec![])
        };
        let done = c.expect(e).expect("nothing to wait for");
        assert_eq!(done.result.err().map(|f| f[0].0), Some(bad));
    }

    #[test]
    fn a_step_without_work_completes_at_once_and_early_reports_wait() {
        let mut c: Collector<&str, usize> = Collector::default();
        assert!(c.expect(expect(3, vec![])).is_some());
        assert!(c.report(report(0, 4, true)).is_none(), "not expected yet");
        assert!(c.expect(expect(4, vec![0])).is_some());
    }
}
