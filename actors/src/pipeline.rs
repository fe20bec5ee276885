//! Starting and driving a pipeline: the four stages wired together on an actix
//! system that runs on its own threads, behind a handle any thread can use.
//!
//! [`Pipeline::start`] spawns the actor system's thread (queue, scheduler and
//! merger live there) and one arbiter thread per compute node, builds every
//! node's worker on its own thread, and returns once all are ready — or with
//! the first node's error. [`Pipeline::shutdown`] stops admitting, waits for
//! admitted tasks to finish, then stops every thread.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;

use crate::kit::{
    Merge, NodeId, NodeWorker, Policy, SubmitError, Supervision, TaskId, WorkerFactory,
};
use crate::merger::MergerActor;
use crate::node::{NodeActor, NodeCounters, NodeStats};
use crate::queue::{Cancel, Close, QueueActor, QueueLen, Submit};
use crate::scheduler::{SchedulerActor, SchedulerStats, Stats};

/// The shape of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Tasks the queue holds before it answers `Overloaded`.
    pub queue_capacity: usize,
    /// Data-parallel replicas.
    pub replicas: usize,
    /// Compute nodes per replica.
    pub nodes_per_replica: usize,
    /// Retry limits.
    pub supervision: Supervision,
}

/// A running pipeline.
pub struct Pipeline<P: Policy> {
    queue: Addr<QueueActor<P::Task>>,
    scheduler: Addr<SchedulerActor<P>>,
    system: System,
    thread: Option<JoinHandle<()>>,
    nodes: NodeStats,
}

type Started<P> = (
    Addr<QueueActor<<P as Policy>::Task>>,
    Addr<SchedulerActor<P>>,
    System,
);

impl<P: Policy> Pipeline<P> {
    /// Starts the stages and builds every node's worker with `factory`.
    pub fn start<W, M>(
        policy: P,
        merge: M,
        factory: WorkerFactory<W>,
        cfg: PipelineConfig,
    ) -> Result<Self, String>
    where
        W: NodeWorker<Work = P::Work, Links = P::Links>,
        M: Merge<
            Work = P::Work,
            Output = W::Output,
            Registration = P::Registration,
            Verdict = P::Verdict,
        >,
    {
        if cfg.replicas == 0 || cfg.nodes_per_replica == 0 || cfg.queue_capacity == 0 {
            return Err(format!(
                "a pipeline needs at least one replica, node and queue slot: {cfg:?}"
            ));
        }
        let nodes: NodeStats = Arc::new(DashMap::new());
        let node_stats = nodes.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Started<P>>();
        let (ready_tx, ready_rx) = crossbeam::channel::unbounded::<(NodeId, Option<String>)>();
        let thread = std::thread::Builder::new()
            .name("parallm-actors".into())
            .spawn(move || {
                let sys = System::new();
                let arbiters = sys.block_on(async move {
                    let sched_ctx: Context<SchedulerActor<P>> = Context::new();
                    let sched = sched_ctx.address();
                    let merger =
                        MergerActor::new(merge, cfg.nodes_per_replica, sched.clone().recipient())
                            .start();
                    let mut arbiters = Vec::new();
                    let mut addrs = Vec::new();
                    for replica in 0..cfg.replicas {
                        let mut row = Vec::new();
                        for index in 0..cfg.nodes_per_replica {
                            let id = NodeId { replica, index };
                            let arbiter = Arbiter::new();
                            let (f, m, st, rt) = (
                                factory.clone(),
                                merger.clone().recipient(),
                                node_stats.clone(),
                                ready_tx.clone(),
                            );
                            let addr = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                                let worker = f(id);
                                let _ = rt.send((id, worker.as_ref().err().cloned()));
                                NodeActor::new(id, f, worker, m, st)
                            });
                            row.push(addr.recipient());
                            arbiters.push(arbiter);
                        }
                        addrs.push(row);
                    }
                    let mut scheduler = SchedulerActor::new(
                        policy,
                        cfg.supervision,
                        merger.clone().recipient(),
                        merger.recipient(),
                        addrs,
                    );
                    let queue = QueueActor::new(
                        cfg.queue_capacity,
                        sched.clone().recipient(),
                        sched.clone().recipient(),
                    )
                    .start();
                    scheduler.attach_queue(queue.clone());
                    sched_ctx.run(scheduler);
                    let _ = tx.send((queue, sched, System::current()));
                    arbiters
                });
                let _ = sys.run();
                for a in arbiters {
                    a.stop();
                    let _ = a.join();
                }
            })
            .map_err(|e| format!("cannot spawn the actor thread: {e}"))?;
        let Ok((queue, scheduler, system)) = rx.recv() else {
            let _ = thread.join();
            return Err("the actor system failed to start".into());
        };
        let mut pipeline = Self {
            queue,
            scheduler,
            system,
            thread: Some(thread),
            nodes,
        };
        let mut errors = Vec::new();
        for _ in 0..cfg.replicas * cfg.nodes_per_replica {
            match ready_rx.recv() {
                Ok((_, None)) => {}
                Ok((id, Some(e))) => errors.push(format!("{id}: {e}")),
                Err(_) => {
                    errors.push("a node thread ended before its worker was built".into());
                    break;
                }
            }
        }
        if !errors.is_empty() {
            pipeline.stop();
            return Err(errors.join("; "));
        }
        Ok(pipeline)
    }

    /// Submits a task; answers at once (`Overloaded` when the queue is full).
    pub fn submit(&self, task: P::Task) -> Result<(), SubmitError> {
        futures::executor::block_on(self.submit_async(task))
    }

    /// Submits a task from async code.
    pub async fn submit_async(&self, task: P::Task) -> Result<(), SubmitError> {
        self.queue
            .send(Submit(task))
            .await
            .map_err(|_| SubmitError::Stopped)?
    }

    /// Cancels a task wherever it is; its requester gets a cancelled event
    /// (unless it already ended).
    pub fn cancel(&self, task: TaskId) {
        self.queue.do_send(Cancel(task));
    }

    /// The scheduler's figures, with the queue's length added to `waiting`.
    pub fn stats(&self) -> Option<SchedulerStats> {
        futures::executor::block_on(async {
            let queued = self.queue.send(QueueLen).await.ok()?;
            let mut s = self.scheduler.send(Stats).await.ok()?;
            s.policy.waiting += queued;
            s.idle &= queued == 0;
            Some(s)
        })
    }

    /// Every node's counters, in node order.
    pub fn node_stats(&self) -> Vec<(NodeId, NodeCounters)> {
        let mut v: Vec<_> = self.nodes.iter().map(|e| (*e.key(), *e.value())).collect();
        v.sort_by_key(|(id, _)| (id.replica, id.index));
        v
    }

    /// Stops admitting, waits up to `timeout` for admitted tasks to finish, then
    /// stops every thread. Returns whether everything finished in time; tasks
    /// still held then end with an error event.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        self.queue.do_send(Close);
        let t0 = Instant::now();
        let drained = loop {
            match self.stats() {
                Some(s) if s.idle => break true,
                None => break false,
                Some(_) if t0.elapsed() >= timeout => break false,
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        self.stop();
        drained
    }

    fn stop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<P: Policy> Drop for Pipeline<P> {
    fn drop(&mut self) {
        self.stop();
    }
}
