//! The schedule stage: continuous batching and dispatch, and supervision of
//! failed steps.
//!
//! [`SchedulerActor`] takes tasks from the queue when its [`Policy`] has room,
//! puts each on the least-loaded replica, and keeps every replica busy: as soon
//! as a replica's step is merged it plans the next one and sends each node of
//! the replica one [`RunStep`] — the only message a node gets per step.
//!
//! When a step fails (a node errored or panicked), the failed node restarts
//! itself with its shard reloaded (see [`crate::node`]), the policy requeues the
//! replica's tasks to be recomputed, and each task of the failed step is
//! charged one retry; a task over [`Supervision::max_retries`] ends with an
//! error event. A replica never has two steps in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::kit::{End, NodeError, NodeId, Policy, PolicyStats, Supervision, TaskId};
use crate::merger::{EndTask, Register};
use crate::node::RunStep;
use crate::queue::{Demand, QueueActor};

/// Tasks leaving the queue for the scheduler.
pub struct Admit<T>(pub Vec<T>);

impl<T: Send + 'static> Message for Admit<T> {
    type Result = ();
}

/// Cancels a task the queue no longer holds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelTask(pub TaskId);

/// The merger's report on one step.
pub struct StepDone<V> {
    /// The replica.
    pub replica: usize,
    /// The verdict, or the nodes that failed.
    pub result: Result<V, Vec<(NodeId, NodeError)>>,
    /// The slowest node's compute time.
    pub compute: Duration,
    /// Time spent merging.
    pub merge: Duration,
}

impl<V: Send + 'static> Message for StepDone<V> {
    type Result = ();
}

/// Asks for the scheduler's figures.
#[derive(Message)]
#[rtype(result = "SchedulerStats")]
pub struct Stats;

/// The scheduler's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    /// The policy's figures.
    pub policy: PolicyStats,
    /// Whether nothing is held or in flight.
    pub idle: bool,
    /// Steps completed.
    pub steps: u64,
    /// Steps that failed.
    pub failed_steps: u64,
    /// Sum of step wall times, dispatch to merged.
    pub step_seconds: f64,
    /// Sum of the slowest node's compute time per step.
    pub compute_seconds: f64,
    /// Sum of merge times.
    pub merge_seconds: f64,
}

/// Every replica's nodes, `[replica][index]`.
pub type ReplicaNodes<P> = Vec<Vec<Recipient<RunStep<<P as Policy>::Work, <P as Policy>::Links>>>>;

/// The schedule stage.
pub struct SchedulerActor<P: Policy> {
    policy: P,
    supervision: Supervision,
    queue: Option<Addr<QueueActor<P::Task>>>,
    register: Recipient<Register<P::Registration>>,
    end: Recipient<EndTask>,
    nodes: ReplicaNodes<P>,
    in_flight: Vec<Option<Instant>>,
    paused: Vec<bool>,
    next_step: u64,
    retries: HashMap<TaskId, u32>,
    demand: Option<usize>,
    stats: SchedulerStats,
}

impl<P: Policy> SchedulerActor<P> {
    /// A scheduler over `nodes[replica][index]`. The queue is attached with
    /// [`SchedulerActor::attach_queue`] before it starts.
    pub fn new(
        policy: P,
        supervision: Supervision,
        register: Recipient<Register<P::Registration>>,
        end: Recipient<EndTask>,
        nodes: ReplicaNodes<P>,
    ) -> Self {
        let replicas = nodes.len();
        Self {
            policy,
            supervision,
            queue: None,
            register,
            end,
            nodes,
            in_flight: vec![None; replicas],
            paused: vec![false; replicas],
            next_step: 0,
            retries: HashMap::new(),
            demand: None,
            stats: SchedulerStats::default(),
        }
    }

    /// Sets the queue that feeds this scheduler.
    pub fn attach_queue(&mut self, queue: Addr<QueueActor<P::Task>>) {
        self.queue = Some(queue);
    }

    fn dispatch(&mut self) {
        for r in 0..self.nodes.len() {
            if self.in_flight[r].is_some() || self.paused[r] {
                continue;
            }
            let Some(work) = self.policy.next_step(r) else {
                continue;
            };
            let work = Arc::new(work);
            let links = self.policy.links(r);
            let step = self.next_step;
            self.next_step += 1;
            for (index, (node, links)) in self.nodes[r].iter().zip(links).enumerate() {
                node.do_send(RunStep {
                    node: NodeId { replica: r, index },
                    step,
                    work: work.clone(),
                    links,
                });
            }
            self.in_flight[r] = Some(Instant::now());
        }
        let room = self.policy.room();
        if self.demand != Some(room) {
            if let Some(q) = &self.queue {
                q.do_send(Demand(room));
            }
            self.demand = Some(room);
        }
    }
}

impl<P: Policy> Actor for SchedulerActor<P> {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.dispatch();
    }
}

impl<P: Policy> Handler<Admit<P::Task>> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: Admit<P::Task>, _: &mut Self::Context) {
        for task in msg.0 {
            let replica = (0..self.policy.replicas())
                .min_by_key(|&r| self.policy.load(r))
                .unwrap_or(0);
            let reg = self.policy.admit(replica, task);
            self.register.do_send(Register(reg));
        }
        // The queue's demand was used up by what it sent.
        self.demand = None;
        self.dispatch();
    }
}

impl<P: Policy> Handler<CancelTask> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: CancelTask, _: &mut Self::Context) {
        if self.policy.cancel(msg.0) {
            self.end.do_send(EndTask(msg.0, End::Cancelled));
        }
        self.dispatch();
    }
}

impl<P: Policy> Handler<StepDone<P::Verdict>> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: StepDone<P::Verdict>, ctx: &mut Self::Context) {
        let r = msg.replica;
        if let Some(t0) = self.in_flight[r].take() {
            self.stats.step_seconds += t0.elapsed().as_secs_f64();
        }
        self.stats.compute_seconds += msg.compute.as_secs_f64();
        self.stats.merge_seconds += msg.merge.as_secs_f64();
        match msg.result {
            Ok(verdict) => {
                self.stats.steps += 1;
                self.policy.completed(r, verdict);
                if !self.retries.is_empty() {
                    let policy = &self.policy;
                    self.retries.retain(|t, _| policy.contains(*t));
                }
                self.dispatch();
            }
            Err(failures) => {
                self.stats.failed_steps += 1;
                let why = failures
                    .iter()
                    .filter(|(_, e)| matches!(e, NodeError::Failed(_)))
                    .map(|(n, e)| format!("{n}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(replica = r, "step failed, recomputing its tasks: {why}");
                for task in self.policy.failed(r) {
                    let n = self.retries.entry(task).or_default();
                    *n += 1;
                    if *n > self.supervision.max_retries {
                        self.policy.drop_task(task);
                        self.retries.remove(&task);
                        self.end.do_send(EndTask(
                            task,
                            End::Failed(format!(
                                "the task failed {} times: {why}",
                                self.supervision.max_retries + 1
                            )),
                        ));
                    }
                }
                // Give the restarted node a moment before the replica runs again.
                self.paused[r] = true;
                ctx.run_later(self.supervision.backoff, move |act, _| {
                    act.paused[r] = false;
                    act.dispatch();
                });
            }
        }
    }
}

impl<P: Policy> Handler<Stats> for SchedulerActor<P> {
    type Result = MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Self::Context) -> Self::Result {
        let mut s = self.stats;
        s.policy = self.policy.stats();
        s.idle = self.policy.is_idle() && self.in_flight.iter().all(Option::is_none);
        MessageResult(s)
    }
}
