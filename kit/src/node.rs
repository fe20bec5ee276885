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
//! message is handled. A worker that cannot be rebuilt fails every step it is
//! given, with the reason, until a rebuild succeeds.
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
    /// The node's work.
    pub work: W,
    /// The node's links for the step.
    pub links: L,
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
        self.worker = (self.factory)(self.id);
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

    fn handle(&mut self, msg: RunStep<W::Work, W::Links>, ctx: &mut Self::Context) {
        let t0 = Instant::now();
        let result = match &mut self.worker {
            Ok(w) => catch_unwind(AssertUnwindSafe(|| w.run(&msg.work, &msg.links)))
                .unwrap_or_else(|p| Err(NodeError::Failed(format!("panicked: {}", panic_text(p))))),
            Err(e) => Err(NodeError::Failed(format!("the node's worker is down: {e}"))),
        };
        let elapsed: Duration = t0.elapsed();
        let failed = matches!(result, Err(NodeError::Failed(_)));
        if failed {
            W::abort(&msg.links);
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
