//! The execute stage: one compute node per shard, each on its own OS thread.
//!
//! A [`NodeActor`] owns its [`NodeWorker`] (for the LLM engine: a weight shard
//! and its KV blocks). It gets one [`RunStep`] per step and sends one
//! [`NodeReport`] to the merger. Per-layer traffic between peers goes through the
//! step's links (collectives, channels), never through actor mailboxes.
//!
//! Supervision: a step that errors or panics is caught; the node aborts the
//! step's links so its peers return, reports the failure, and stops. Its actix
//! [`Supervisor`] restarts it at once, and [`Supervised::restarting`] rebuilds
//! the worker from its factory — the shard is reloaded before the node's next
//! message is handled. A worker that cannot be rebuilt fails every step it is
//! given, with the reason, until a rebuild succeeds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;

use crate::kit::{NodeError, NodeId, NodeWorker, WorkerFactory};
use crate::merger::NodeReport;

/// One step for one node.
pub struct RunStep<W, L> {
    /// The node it is for.
    pub node: NodeId,
    /// The dispatch number (unique within the pipeline).
    pub step: u64,
    /// The plan, shared by the replica's nodes.
    pub work: Arc<W>,
    /// This node's links for the step.
    pub links: L,
}

impl<W: Send + Sync + 'static, L: Send + 'static> Message for RunStep<W, L> {
    type Result = ();
}

/// Per-node counters, shared with the pipeline handle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeCounters {
    /// Steps run successfully.
    pub steps: u64,
    /// Steps that failed on this node.
    pub failures: u64,
    /// Restarts (each reloads the worker).
    pub restarts: u64,
    /// Seconds spent running steps.
    pub busy_seconds: f64,
}

/// Counters of every node.
pub type NodeStats = Arc<DashMap<NodeId, NodeCounters>>;

/// A compute node.
pub struct NodeActor<W: NodeWorker> {
    id: NodeId,
    factory: WorkerFactory<W>,
    worker: Result<W, String>,
    merger: Recipient<NodeReport<W::Work, W::Output>>,
    stats: NodeStats,
}

impl<W: NodeWorker> NodeActor<W> {
    /// A node whose worker was built (or failed to build) as `worker`.
    pub fn new(
        id: NodeId,
        factory: WorkerFactory<W>,
        worker: Result<W, String>,
        merger: Recipient<NodeReport<W::Work, W::Output>>,
        stats: NodeStats,
    ) -> Self {
        stats.entry(id).or_default();
        Self {
            id,
            factory,
            worker,
            merger,
            stats,
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
        self.stats.entry(self.id).or_default().restarts += 1;
        let node = framework::metrics::node_label(self.id.replica, self.id.index);
        metrics::counter!(framework::metrics::NODE_RESTARTS, "node" => node).increment(1);
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
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
        {
            let mut c = self.stats.entry(self.id).or_default();
            c.busy_seconds += elapsed.as_secs_f64();
            if failed {
                c.failures += 1;
            } else if result.is_ok() {
                c.steps += 1;
            }
        }
        self.merger.do_send(NodeReport {
            node: msg.node,
            step: msg.step,
            work: msg.work,
            result,
            elapsed,
        });
        if failed {
            // The supervisor restarts the node, rebuilding its worker.
            ctx.stop();
        }
    }
}
