//! The execute stage: one compute node per shard, each on its own OS thread.
//!
//! A [`NodeActor`] owns its [`NodeWorker`] (for the LLM engine: a weight shard
//! and its KV blocks). It gets one [`RunStep`] for each step it has work in
//! and sends one [`NodeReport`] to the merger. Per-layer traffic between
//! peers goes through the step's links (collectives, channels), never through
//! actor mailboxes.
//!
//! Supervision: a step that errors or panics is caught; the node aborts the
//! step's links so its peers return, reports the failure, and stops. Its actix
//! [`Supervisor`] restarts it at once, and [`Supervised::restarting`] rebuilds
//! the worker from its factory — the worker is rebuilt before the node's next
//! message is handled. A worker that cannot be rebuilt (its factory errs or
//! panics) fails every step it is given, with the reason, until a rebuild
//! succeeds. A panic in [`NodeWorker::abort`] is caught and logged.
//!
//! A step's message dropped before its node ran it (the node's arbiter
//! stopped with it queued: the pipeline halted or shut down) aborts the
//! step's links as a failure would, so no peer waits for the node's part
//! for ever; a peer in another process hears of it only so.
//!
//! [`NodeCounters`] live in a [`NodeStats`] table shared with the pipeline
//! handle: each node writes only its own row, the handle reads them all.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::merger::NodeReport;
use crate::pipeline::KitMetrics;
use crate::traits::{NodeError, NodeId, NodeWorker, StepId, WorkerFactory};

/// One step for one node.
pub struct RunStep<W, L> {
    /// The node it is for.
    pub node: NodeId,
    /// The step (unique within the pipeline).
    pub step: StepId,
    /// How many times the replica had recovered from a failed step when
    /// this one was planned. A node that failed at epoch `e` was rebuilt
    /// with fresh state, so it refuses every step of an epoch up to `e`
    /// (planned on state it no longer has) until the scheduler's recovery
    /// replans from scratch.
    pub epoch: u64,
    /// The node's work.
    pub work: W,
    /// The node's links for the step.
    pub links: L,
    /// Aborts `links` if the message is dropped before its node ran it (its
    /// arbiter stopped with the message still queued, as when the pipeline
    /// halts), so that peers waiting on the node's part return: a peer in
    /// another process learns of it only so. The node takes it as it runs
    /// the step.
    pub(crate) unrun: Option<fn(&L)>,
}

impl<W, L> Drop for RunStep<W, L> {
    fn drop(&mut self) {
        if let Some(abort) = self.unrun.take() {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| abort(&self.links))) {
                tracing::error!(node = %self.node, "abort panicked: {}", panic_text(p));
            }
        }
    }
}

impl<W: Send + 'static, L: Send + 'static> Message for RunStep<W, L> {
    type Result = ();
}

/// Per-node counters, shared with the pipeline handle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeCounters {
    /// Steps run successfully.
    pub steps: u64,
    /// Steps that failed on this node.
    pub failures: u64,
    /// Restarts (each rebuilds the worker).
    pub restarts: u64,
    /// Seconds spent running steps.
    pub busy_seconds: f64,
}

/// Every node's counters, one row per node (replicas in order, each
/// replica's nodes in order).
#[derive(Debug)]
pub struct NodeStats {
    nodes_per_replica: usize,
    rows: Mutex<Vec<NodeCounters>>,
}

impl NodeStats {
    /// Zeroed counters for `replicas × nodes_per_replica` nodes.
    pub fn new(replicas: usize, nodes_per_replica: usize) -> Arc<Self> {
        Arc::new(Self {
            nodes_per_replica,
            rows: Mutex::new(vec![NodeCounters::default(); replicas * nodes_per_replica]),
        })
    }

    fn update(&self, id: NodeId, f: impl FnOnce(&mut NodeCounters)) {
        let i = id.replica * self.nodes_per_replica + id.index;
        if let Ok(mut rows) = self.rows.lock() {
            if let Some(row) = rows.get_mut(i) {
                f(row);
            }
        }
    }

    /// Every node's counters, in node order.
    pub fn snapshot(&self) -> Vec<(NodeId, NodeCounters)> {
        let rows = self.rows.lock().map(|r| r.clone()).unwrap_or_default();
        let n = self.nodes_per_replica.max(1);
        rows.into_iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    NodeId {
                        replica: i / n,
                        index: i % n,
                    },
                    c,
                )
            })
            .collect()
    }
}

/// A compute node.
pub struct NodeActor<W: NodeWorker> {
    id: NodeId,
    factory: WorkerFactory<W>,
    worker: Result<W, String>,
    merger: Recipient<NodeReport<W::Output>>,
    stats: Arc<NodeStats>,
    metrics: KitMetrics,
    /// The first epoch whose steps this node's current worker can run: one
    /// past the epoch of its last failure.
    fresh_from: u64,
    /// Why it last failed (named in the steps it then refuses).
    last_failure: String,
}

impl<W: NodeWorker> NodeActor<W> {
    /// A node whose worker was built (or failed to build) as `worker`.
    pub(crate) fn new(
        id: NodeId,
        factory: WorkerFactory<W>,
        worker: Result<W, String>,
        merger: Recipient<NodeReport<W::Output>>,
        (stats, metrics): (Arc<NodeStats>, KitMetrics),
    ) -> Self {
        Self {
            id,
            factory,
            worker,
            merger,
            stats,
            metrics,
            fresh_from: 0,
            last_failure: String::new(),
        }
    }
}

impl<W: NodeWorker> Actor for NodeActor<W> {
    type Context = Context<Self>;
}

impl<W: NodeWorker> Supervised for NodeActor<W> {
    fn restarting(&mut self, _: &mut Self::Context) {
        // Drop the old worker (and its memory) before building the new one.
        self.worker = Err("restarting".into());
        self.worker = catch_unwind(AssertUnwindSafe(|| (self.factory)(self.id)))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(p))));
        if let Err(e) = &self.worker {
            tracing::error!(node = %self.id, "restart failed: {e}");
        }
        self.stats.update(self.id, |c| c.restarts += 1);
        if let Some(name) = self.metrics.node_restarts {
            metrics::counter!(name, "node" => self.id.label()).increment(1);
        }
    }
}

/// The message a panic carried (its payload as text).
pub fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl<W: NodeWorker> Handler<RunStep<W::Work, W::Links>> for NodeActor<W> {
    type Result = ();

    fn handle(&mut self, mut msg: RunStep<W::Work, W::Links>, ctx: &mut Self::Context) {
        // Run now: the node itself aborts the links if the step fails.
        msg.unrun = None;
        let t0 = Instant::now();
        let result = match &mut self.worker {
            // Planned before this node's restart, on state the restart lost:
            // running it would compute on the fresh worker's empty state and
            // succeed with wrong results.
            Ok(_) if W::stateful() && msg.epoch < self.fresh_from => {
                Err(NodeError::Aborted(format!(
                    "{} restarted after this step was planned (it had failed: {})",
                    self.id, self.last_failure
                )))
            }
            Ok(w) => catch_unwind(AssertUnwindSafe(|| w.run(&msg.work, &msg.links)))
                .unwrap_or_else(|p| Err(NodeError::Failed(format!("panicked: {}", panic_text(p))))),
            Err(e) => Err(NodeError::Failed(format!("the node's worker is down: {e}"))),
        };
        let elapsed: Duration = t0.elapsed();
        let failed = matches!(result, Err(NodeError::Failed(_)));
        if result.is_err() {
            // Peers waiting on this node's part of the step return.
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| W::abort(&msg.links))) {
                tracing::error!(node = %self.id, "abort panicked: {}", panic_text(p));
            }
        }
        if let Err(NodeError::Failed(why)) = &result {
            self.fresh_from = self.fresh_from.max(msg.epoch + 1);
            self.last_failure = why.clone();
        }
        self.stats.update(self.id, |c| {
            c.busy_seconds += elapsed.as_secs_f64();
            if failed {
                c.failures += 1;
            } else if result.is_ok() {
                c.steps += 1;
            }
        });
        self.merger.do_send(NodeReport {
            node: msg.node,
            step: msg.step,
            result,
            elapsed,
        });
        if failed {
            // The supervisor restarts the node, rebuilding its worker.
            ctx.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam::channel::{unbounded, Sender};

    /// Counts the steps it ran since it was built; fails on work `true`.
    struct Counter(u64);

    impl NodeWorker for Counter {
        type Work = bool;
        type Links = ();
        type Output = u64;

        fn run(&mut self, fail: &bool, _: &()) -> Result<u64, NodeError> {
            if *fail {
                return Err(NodeError::Failed("injected".into()));
            }
            self.0 += 1;
            Ok(self.0)
        }
        fn abort(_: &()) {}
    }

    /// The same, declared stateless.
    struct Stateless(Counter);

    impl NodeWorker for Stateless {
        type Work = bool;
        type Links = ();
        type Output = u64;

        fn run(&mut self, fail: &bool, l: &()) -> Result<u64, NodeError> {
            self.0.run(fail, l)
        }
        fn abort(_: &()) {}
        fn stateful() -> bool {
            false
        }
    }

    struct Reports(Sender<(StepId, Result<u64, NodeError>)>);

    impl Actor for Reports {
        type Context = Context<Self>;
    }

    impl Handler<NodeReport<u64>> for Reports {
        type Result = ();
        fn handle(&mut self, r: NodeReport<u64>, _: &mut Self::Context) {
            let _ = self.0.send((r.step, r.result));
        }
    }

    /// Runs steps `(epoch, fail)` in order on one node built by `make`.
    fn run_steps<W: NodeWorker<Work = bool, Links = (), Output = u64>>(
        make: fn() -> W,
        steps: &[(u64, bool)],
    ) -> Vec<Result<u64, NodeError>> {
        let (tx, rx) = unbounded();
        let steps = steps.to_vec();
        let n = steps.len();
        let mut got = System::new().block_on(async move {
            let merger = Reports(tx).start().recipient();
            let id = NodeId {
                replica: 0,
                index: 0,
            };
            let factory: WorkerFactory<W> = Arc::new(move |_| Ok(make()));
            let stats = (NodeStats::new(1, 1), KitMetrics::default());
            let node =
                Supervisor::start(move |_| NodeActor::new(id, factory, Ok(make()), merger, stats));
            for (step, (epoch, fail)) in steps.into_iter().enumerate() {
                node.do_send(RunStep {
                    node: id,
                    step: step as StepId,
                    epoch,
                    work: fail,
                    links: (),
                    unrun: None,
                });
            }
            let mut got = Vec::new();
            for _ in 0..5000 {
                got.extend(rx.try_iter());
                if got.len() == n {
                    break;
                }
                actix::clock::sleep(Duration::from_millis(1)).await;
            }
            got
        });
        assert_eq!(got.len(), n, "every step reported");
        got.sort_by_key(|(s, _)| *s);
        got.into_iter().map(|(_, r)| r).collect()
    }

    #[test]
    fn a_restarted_stateful_node_refuses_steps_planned_before_it_failed() {
        // Step 2 was planned (epoch 0) on the state the failure lost; the
        // scheduler's recovery replans in epoch 1, on the fresh worker.
        let got = run_steps(
            || Counter(0),
            &[(0, false), (0, true), (0, false), (1, false)],
        );
        assert_eq!(got[0], Ok(1));
        assert!(matches!(&got[1], Err(NodeError::Failed(e)) if e == "injected"));
        assert!(
            matches!(&got[2], Err(NodeError::Aborted(e)) if e.contains("restarted after this step was planned")),
            "{:?}",
            got[2]
        );
        assert_eq!(got[3], Ok(1), "the rebuilt worker starts afresh");
    }

    #[test]
    fn a_stateless_node_runs_every_step_after_a_restart() {
        let got = run_steps(
            || Stateless(Counter(0)),
            &[(0, false), (0, true), (0, false)],
        );
        assert_eq!(got[0], Ok(1));
        assert!(matches!(got[1], Err(NodeError::Failed(_))));
        assert_eq!(got[2], Ok(1));
    }

    /// Fails on work `true`; its links count the aborts they got.
    struct Aborts;

    impl NodeWorker for Aborts {
        type Work = bool;
        type Links = Arc<std::sync::atomic::AtomicUsize>;
        type Output = u64;

        fn run(&mut self, fail: &bool, _: &Self::Links) -> Result<u64, NodeError> {
            match fail {
                true => Err(NodeError::Failed("injected".into())),
                false => Ok(0),
            }
        }
        fn abort(links: &Self::Links) {
            links.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn aborts(links: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
        links.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_step_dropped_before_its_node_ran_it_aborts_its_links_once() {
        let links = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let id = NodeId {
            replica: 0,
            index: 0,
        };
        drop(RunStep {
            node: id,
            step: 0,
            epoch: 0,
            work: false,
            links: links.clone(),
            unrun: Some(Aborts::abort as fn(&_)),
        });
        assert_eq!(aborts(&links), 1, "peers waiting on its part must return");
    }

    #[test]
    fn a_step_its_node_ran_is_aborted_only_if_it_failed() {
        let (ok, failed) = (Arc::default(), Arc::default());
        let (tx, rx) = unbounded();
        let steps = [(false, Arc::clone(&ok)), (true, Arc::clone(&failed))];
        let reported = System::new().block_on(async move {
            let merger = Reports(tx).start().recipient();
            let id = NodeId {
                replica: 0,
                index: 0,
            };
            let factory: WorkerFactory<Aborts> = Arc::new(|_| Ok(Aborts));
            let stats = (NodeStats::new(1, 1), KitMetrics::default());
            let node =
                Supervisor::start(move |_| NodeActor::new(id, factory, Ok(Aborts), merger, stats));
            for (step, (fail, links)) in steps.into_iter().enumerate() {
                node.do_send(RunStep {
                    node: id,
                    step: step as StepId,
                    epoch: 0,
                    work: fail,
                    links,
                    unrun: Some(Aborts::abort as fn(&_)),
                });
            }
            let mut got = 0;
            for _ in 0..5000 {
                got += rx.try_iter().count();
                if got == 2 {
                    break;
                }
                actix::clock::sleep(Duration::from_millis(1)).await;
            }
            got
        });
        assert_eq!(reported, 2, "both steps reported");
        assert_eq!(aborts(&ok), 0, "a step that ran to the end is not aborted");
        assert_eq!(
            aborts(&failed),
            1,
            "a failed step is aborted once, by its node"
        );
    }
}
