//! The schedule stage: placement, dispatch of per-node work with several steps
//! in flight, and supervision of failed steps.
//!
//! [`SchedulerState`] is the logic, a plain struct driven by the actor and by
//! tests alike. It puts each admitted task on the least-loaded replica and
//! keeps every replica busy: whenever a replica has fewer than
//! `max_steps_in_flight` steps running it asks the [`Policy`] for the next
//! one, whose [`Plan`] gives work only to the nodes that take part.
//!
//! When a step fails (a node errored or panicked), the failed node restarts
//! itself with its worker rebuilt (see [`crate::node`]). The replica stops
//! taking new steps until every step it has in flight has come back (the ones
//! that succeeded are applied), then the policy requeues its tasks to be
//! recomputed, and each task of a failed step is charged one retry; a task
//! over [`Supervision::max_retries`] ends with an error. After a short
//! backoff the replica runs again. A task's final error names the failures
//! of the steps that held it (when the policy tells which, see
//! [`Policy::tasks_in`]), never another task's.
//!
//! [`SchedulerActor`] is the shell: it sends each dispatched step's
//! description to the merger ([`Expect`]) and one [`RunStep`] to each node
//! with work — the only message a node gets per step — and publishes its
//! figures to the pipeline handle after every message. A plan giving work to
//! a node the replica does not have is not run: the step fails at once,
//! naming the node. A panic in the policy (or in a task's methods) is caught:
//! the policy can no longer be trusted, so the scheduler stops the pipeline
//! ([`Fault`]): it refuses further submissions, has the merger end every task
//! still registered with an error naming the panic, and ignores everything
//! after. The merger reports its own merge's panics the same way.
//!
//! **Invariant:** a replica has at most `max_steps_in_flight` steps in
//! flight, and none while it recovers from a failure.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::merger::{EndTask, Expect, Failures, Halt};
use crate::node::{panic_text, RunStep};
use crate::queue::Demand;
use crate::traits::{End, NodeError, NodeId, Plan, Policy, StepId, Supervision, TaskId};

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
    /// The step.
    pub step: StepId,
    /// The verdict, or the nodes that failed.
    pub result: Result<V, crate::merger::Failures>,
    /// The slowest node's compute time.
    pub compute: Duration,
    /// Time spent merging.
    pub merge: Duration,
}

impl<V: Send + 'static> Message for StepDone<V> {
    type Result = ();
}

/// User code panicked (the text says where and why): the pipeline stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fault(pub String);

/// The scheduler's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerStats<S> {
    /// The policy's figures.
    pub policy: S,
    /// Whether nothing is held or in flight (the queue included, when read
    /// through [`crate::Pipeline::stats`]).
    pub idle: bool,
    /// Tasks waiting in the queue.
    pub queued: usize,
    /// Steps completed.
    pub steps: u64,
    /// Steps that failed.
    pub failed_steps: u64,
    /// Steps in flight now, over all replicas.
    pub in_flight: usize,
    /// Sum of step wall times, dispatch to merged.
    pub step_seconds: f64,
    /// Sum of the slowest node's compute time per step.
    pub compute_seconds: f64,
    /// Sum of merge times.
    pub merge_seconds: f64,
}

/// One dispatched step: what the actor sends out.
pub struct Dispatch<P: Policy> {
    /// The replica.
    pub replica: usize,
    /// The step's number.
    pub step: StepId,
    /// The replica's recoveries before the step was planned (see
    /// [`RunStep::epoch`]).
    pub epoch: u64,
    /// The policy's plan.
    pub plan: Plan<P::Step, P::Work, P::Links>,
}

#[derive(Debug, Default)]
struct Replica {
    /// Steps in flight and when each was dispatched.
    in_flight: Vec<(StepId, Instant)>,
    /// Failed steps awaiting recovery.
    failed: Vec<FailedStep>,
    /// Waiting out the backoff after a failure.
    paused: bool,
    /// Recoveries from failed steps so far: steps planned before the last
    /// one assume node state that a restart may have lost.
    epoch: u64,
}

/// A failed step awaiting its replica's recovery.
#[derive(Debug)]
struct FailedStep {
    step: StepId,
    /// Its failed nodes and why (its aborted ones, if no node of it failed).
    why: String,
    /// The tasks it held, if the policy says ([`Policy::tasks_in`]).
    tasks: Option<Vec<TaskId>>,
}

/// A held task's failed steps so far.
#[derive(Debug, Default)]
struct Retries {
    count: u32,
    /// Why, once per distinct reason.
    why: Vec<String>,
}

/// What a completed or failed step leads to.
#[derive(Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// Tasks that failed for good.
    pub ended: Vec<(TaskId, End)>,
    /// The replica recovered from a failure and must wait out the backoff
    /// before [`SchedulerState::resume`].
    pub backoff: bool,
}

/// The scheduler's logic.
pub struct SchedulerState<P: Policy> {
    policy: P,
    supervision: Supervision,
    max_in_flight: usize,
    replicas: Vec<Replica>,
    next_step: StepId,
    retries: HashMap<TaskId, Retries>,
    stats: SchedulerStats<P::Stats>,
    /// The abandon flags of admitted tasks whose requester may still go.
    watched: HashMap<TaskId, Arc<AtomicBool>>,
}

impl<P: Policy> SchedulerState<P> {
    /// A scheduler running up to `max_in_flight` steps per replica.
    pub fn new(policy: P, supervision: Supervision, max_in_flight: usize) -> Self {
        let replicas = (0..policy.replicas()).map(|_| Replica::default()).collect();
        Self {
            policy,
            supervision,
            max_in_flight: max_in_flight.max(1),
            replicas,
            next_step: 0,
            retries: HashMap::new(),
            stats: SchedulerStats::default(),
            watched: HashMap::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// How many more tasks the policy wants.
    pub fn room(&self) -> usize {
        self.policy.room()
    }

    /// Takes tasks in, each on the replica the policy routes it to (by
    /// default the least loaded). Returns the tasks
    /// whose requester has gone: they are not admitted and end as cancelled.
    pub fn admit(&mut self, tasks: Vec<P::Task>) -> Vec<TaskId> {
        let mut gone = Vec::new();
        for task in tasks {
            if crate::Task::abandoned(&task) {
                gone.push(crate::Task::id(&task));
                continue;
            }
            if let Some(flag) = crate::Task::abandon_flag(&task) {
                self.watched.insert(crate::Task::id(&task), flag);
            }
            let replica = self.policy.route(&task);
            self.policy.admit(replica, task);
        }
        gone
    }

    /// Cancels the admitted tasks whose requester has gone since, before
    /// the next step is planned; returns those that must be ended now (the
    /// others are in a step and end when it completes). A flag no one else
    /// holds any more belongs to a task that ended and was let go: it is
    /// forgotten.
    pub fn sweep_abandoned(&mut self) -> Vec<TaskId> {
        let mut gone = Vec::new();
        self.watched.retain(|id, flag| {
            if flag.load(Ordering::Acquire) {
                gone.push(*id);
                false
            } else {
                Arc::strong_count(flag) > 1
            }
        });
        gone.retain(|&id| self.policy.cancel(id));
        gone
    }

    /// Cancels a task the policy may hold; `true` if it must be ended.
    pub fn cancel(&mut self, task: TaskId) -> bool {
        self.policy.cancel(task)
    }

    /// Plans every step that can start now.
    pub fn dispatch(&mut self) -> Vec<Dispatch<P>> {
        let mut out = Vec::new();
        for r in 0..self.replicas.len() {
            loop {
                let rep = &self.replicas[r];
                if rep.paused || !rep.failed.is_empty() || rep.in_flight.len() >= self.max_in_flight
                {
                    break;
                }
                let step = self.next_step;
                let Some(plan) = self.policy.next_step(r, step) else {
                    break;
                };
                self.next_step += 1;
                self.replicas[r].in_flight.push((step, Instant::now()));
                out.push(Dispatch {
                    replica: r,
                    step,
                    epoch: self.replicas[r].epoch,
                    plan,
                });
            }
        }
        out
    }

    /// The merger's report on a step.
    pub fn step_done(&mut self, done: StepDone<P::Verdict>) -> StepOutcome {
        let r = done.replica;
        let Some(rep) = self.replicas.get_mut(r) else {
            return StepOutcome::default();
        };
        if let Some(i) = rep.in_flight.iter().position(|(s, _)| *s == done.step) {
            let (_, t0) = rep.in_flight.swap_remove(i);
            self.stats.step_seconds += t0.elapsed().as_secs_f64();
        }
        self.stats.compute_seconds += done.compute.as_secs_f64();
        self.stats.merge_seconds += done.merge.as_secs_f64();
        match done.result {
            Ok(verdict) => {
                self.stats.steps += 1;
                self.policy.completed(r, done.step, verdict);
            }
            Err(failures) => {
                self.stats.failed_steps += 1;
                let named = |failed_only: bool| {
                    failures
                        .iter()
                        .filter(|(_, e)| !failed_only || matches!(e, NodeError::Failed(_)))
                        .map(|(n, e)| format!("{n}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                // The nodes that failed; a step whose nodes were all
                // aborted (for another step's failure) says why they were.
                let mut why = named(true);
                if why.is_empty() {
                    why = named(false);
                }
                tracing::warn!(replica = r, step = done.step, "step failed: {why}");
                let tasks = self.policy.tasks_in(r, done.step);
                self.replicas[r].failed.push(FailedStep {
                    step: done.step,
                    why,
                    tasks,
                });
            }
        }
        let mut outcome = StepOutcome::default();
        let rep = &mut self.replicas[r];
        if !rep.failed.is_empty() && rep.in_flight.is_empty() {
            let failed = std::mem::take(&mut rep.failed);
            rep.paused = true;
            rep.epoch += 1;
            outcome.backoff = true;
            let steps: Vec<StepId> = failed.iter().map(|f| f.step).collect();
            for task in self.policy.failed(r, &steps) {
                let why = why_failed(r, &failed, task);
                let retries = self.retries.entry(task).or_default();
                retries.count += 1;
                if !retries.why.contains(&why) {
                    retries.why.push(why);
                }
                if retries.count > self.supervision.max_retries {
                    let why = retries.why.join("; ");
                    self.policy.drop_task(task);
                    self.retries.remove(&task);
                    outcome.ended.push((
                        task,
                        End::Failed(format!(
                            "the task failed {} times: {why}",
                            self.supervision.max_retries + 1
                        )),
                    ));
                }
            }
        }
        if !self.retries.is_empty() {
            let policy = &self.policy;
            self.retries.retain(|t, _| policy.contains(*t));
        }
        outcome
    }

    /// The backoff after a failure is over: `replica` runs again.
    pub fn resume(&mut self, replica: usize) {
        if let Some(rep) = self.replicas.get_mut(replica) {
            rep.paused = false;
        }
    }

    /// The scheduler's figures (without the queue).
    pub fn stats(&self) -> SchedulerStats<P::Stats> {
        let mut s = self.stats.clone();
        s.policy = self.policy.stats();
        s.in_flight = self.replicas.iter().map(|r| r.in_flight.len()).sum();
        s.idle = self.policy.is_idle() && s.in_flight == 0;
        s
    }
}

/// Why `task` failed in its replica `r`'s recovery from `failed`: the
/// failures of the steps that held it, or, where the policy does not say
/// which steps held it, those of every such step, saying so.
fn why_failed(r: usize, failed: &[FailedStep], task: TaskId) -> String {
    let own: Vec<&str> = failed
        .iter()
        .filter(|f| f.tasks.as_ref().is_some_and(|t| t.contains(&task)))
        .map(|f| f.why.as_str())
        .collect();
    if !own.is_empty() {
        return own.join("; ");
    }
    let mut unknown: Vec<&str> = failed
        .iter()
        .filter(|f| f.tasks.is_none())
        .map(|f| f.why.as_str())
        .collect();
    if unknown.is_empty() {
        // The policy named tasks for every step, but not this one.
        unknown = failed.iter().map(|f| f.why.as_str()).collect();
    }
    if unknown.len() == 1 {
        return unknown.join("");
    }
    format!(
        "failures of replica {r}'s failed steps (the policy does not say which held the task): {}",
        unknown.join("; ")
    )
}

/// The figures the scheduler publishes and the queue's count of tasks not yet
/// taken in, shared with the pipeline handle.
pub(crate) type Published<S> = (Arc<Mutex<SchedulerStats<S>>>, Arc<AtomicUsize>);

/// Why the pipeline stopped by itself (user code panicked), once it has;
/// shared by the scheduler, which sets it, the queue and the handle.
pub(crate) type FaultFlag = Arc<OnceLock<String>>;

/// Every replica's nodes, `[replica][index]`.
pub type ReplicaNodes<P> = Vec<Vec<Recipient<RunStep<<P as Policy>::Work, <P as Policy>::Links>>>>;

/// Where a scheduler sends what it decides.
pub(crate) struct SchedulerLinks<P: Policy> {
    pub(crate) nodes: ReplicaNodes<P>,
    pub(crate) expect: Recipient<Expect<P::Step>>,
    pub(crate) end: Recipient<EndTask>,
    pub(crate) halt: Recipient<Halt>,
    pub(crate) queue: Recipient<Demand>,
    /// Aborts a node's links ([`NodeWorker::abort`](crate::NodeWorker::abort)),
    /// for a step whose message is dropped before the node ran it.
    pub(crate) abort: fn(&P::Links),
}

/// The schedule stage.
pub struct SchedulerActor<P: Policy> {
    state: SchedulerState<P>,
    links: SchedulerLinks<P>,
    /// The last demand sent: the room, and the tasks taken in by then.
    demand: Option<(usize, u64)>,
    /// Tasks taken in from the queue so far.
    taken: u64,
    /// The figures, read by the pipeline handle.
    published: Arc<Mutex<SchedulerStats<P::Stats>>>,
    /// Tasks the queue accepted that are not yet taken in (counted down here).
    queued: Arc<AtomicUsize>,
    /// Why the pipeline stopped, set here when user code panicked.
    fault: FaultFlag,
    /// The pipeline is stopping after a panic: messages are ignored.
    halted: bool,
}

impl<P: Policy> SchedulerActor<P> {
    pub(crate) fn new(
        state: SchedulerState<P>,
        links: SchedulerLinks<P>,
        (published, queued): Published<P::Stats>,
        fault: FaultFlag,
    ) -> Self {
        Self {
            state,
            links,
            demand: None,
            taken: 0,
            published,
            queued,
            fault,
            halted: false,
        }
    }

    /// Runs `f` unless the pipeline is stopping; a panic in it (the policy's
    /// or a task's) stops the pipeline.
    fn guarded(&mut self, ctx: &mut Context<Self>, f: impl FnOnce(&mut Self, &mut Context<Self>)) {
        if self.halted {
            return;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(self, ctx))) {
            self.halt(format!("the policy panicked: {}", panic_text(p)));
        }
    }

    /// Stops the pipeline because user code panicked (`why`): the queue
    /// refuses submissions from now on, the merger ends every task still
    /// registered and stops the actor system, and this actor ignores what
    /// still arrives.
    fn halt(&mut self, why: String) {
        if self.halted {
            return;
        }
        self.halted = true;
        let why = self.fault.get_or_init(|| why).clone();
        tracing::error!("the pipeline stops: {why}");
        if let Ok(mut s) = self.published.lock() {
            // Every task held is ended by the merger.
            s.in_flight = 0;
            s.idle = true;
        }
        self.links.halt.do_send(Halt {
            why: format!("the pipeline stopped: {why}"),
            system: System::current(),
        });
    }

    /// Sends out every step that can start, asks the queue for what the
    /// policy has room for, and publishes the figures.
    fn dispatch(&mut self) {
        let gone = self.state.sweep_abandoned();
        self.end(gone.into_iter().map(|t| (t, End::Cancelled)).collect());
        for d in self.state.dispatch() {
            let row = self
                .links
                .nodes
                .get(d.replica)
                .map_or(&[][..], Vec::as_slice);
            let missing: Failures = d
                .plan
                .nodes
                .iter()
                .filter(|t| t.node >= row.len())
                .map(|t| {
                    let node = NodeId {
                        replica: d.replica,
                        index: t.node,
                    };
                    let why = format!(
                        "no such node: the policy planned work for node {}, but replica {} has {} nodes",
                        t.node,
                        d.replica,
                        row.len()
                    );
                    (node, NodeError::Failed(why))
                })
                .collect();
            if !missing.is_empty() {
                // None of the step runs (its nodes' links may wait on the
                // missing one): it fails at once, like a node failure.
                self.links.expect.do_send(Expect {
                    replica: d.replica,
                    step: d.step,
                    nodes: Vec::new(),
                    failed: missing,
                    info: d.plan.step,
                });
                continue;
            }
            self.links.expect.do_send(Expect {
                replica: d.replica,
                step: d.step,
                nodes: d.plan.nodes.iter().map(|t| t.node).collect(),
                failed: Vec::new(),
                info: d.plan.step,
            });
            for t in d.plan.nodes {
                if let Some(node) = row.get(t.node) {
                    node.do_send(RunStep {
                        node: NodeId {
                            replica: d.replica,
                            index: t.node,
                        },
                        step: d.step,
                        epoch: d.epoch,
                        work: t.work,
                        links: t.links,
                        unrun: Some(self.links.abort),
                    });
                }
            }
        }
        let demand = (self.state.room(), self.taken);
        if self.demand != Some(demand) {
            self.links.queue.do_send(Demand {
                room: demand.0,
                taken: demand.1,
            });
            self.demand = Some(demand);
        }
        // Computed before locking: a panicking policy must not poison it.
        let stats = self.state.stats();
        if let Ok(mut s) = self.published.lock() {
            *s = stats;
        }
    }

    fn end(&self, ended: Vec<(TaskId, End)>) {
        for (task, end) in ended {
            self.links.end.do_send(EndTask(task, end));
        }
    }
}

impl<P: Policy> Actor for SchedulerActor<P> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.guarded(ctx, |act, _| act.dispatch());
    }
}

impl<P: Policy> Handler<Admit<P::Task>> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: Admit<P::Task>, ctx: &mut Self::Context) {
        let n = msg.0.len();
        self.taken += n as u64;
        self.guarded(ctx, |act, _| {
            let gone = act.state.admit(msg.0);
            act.end(gone.into_iter().map(|t| (t, End::Cancelled)).collect());
            act.dispatch();
        });
        // Taken in and published (or, if the pipeline stopped, dropped and
        // ended by the merger): the handle never sees these tasks nowhere.
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

impl<P: Policy> Handler<CancelTask> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: CancelTask, ctx: &mut Self::Context) {
        self.guarded(ctx, |act, _| {
            if act.state.cancel(msg.0) {
                act.end(vec![(msg.0, End::Cancelled)]);
            }
            act.dispatch();
        });
    }
}

impl<P: Policy> Handler<StepDone<P::Verdict>> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: StepDone<P::Verdict>, ctx: &mut Self::Context) {
        self.guarded(ctx, |act, ctx| {
            let r = msg.replica;
            let outcome = act.state.step_done(msg);
            act.end(outcome.ended);
            if outcome.backoff {
                // Give the restarted node a moment before the replica runs again.
                ctx.run_later(act.state.supervision.backoff, move |act, ctx| {
                    act.guarded(ctx, |act, _| {
                        act.state.resume(r);
                        act.dispatch();
                    });
                });
            }
            act.dispatch();
        });
    }
}

impl<P: Policy> Handler<Fault> for SchedulerActor<P> {
    type Result = ();

    fn handle(&mut self, msg: Fault, _: &mut Self::Context) {
        self.halt(msg.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traits::NodeTask;
    use std::collections::VecDeque;

    /// A policy whose tasks each take `steps` steps of one node, one step in
    /// flight per task.
    #[derive(Default)]
    struct Steps {
        waiting: VecDeque<(TaskId, u32)>,
        busy: HashMap<StepId, (TaskId, u32)>,
        held: usize,
    }

    impl crate::Task for (TaskId, u32) {
        fn id(&self) -> TaskId {
            self.0
        }
    }

    impl Policy for Steps {
        type Task = (TaskId, u32);
        type Work = TaskId;
        type Links = ();
        type Step = TaskId;
        type Verdict = ();
        type Stats = usize;

        fn replicas(&self) -> usize {
            1
        }
        fn room(&self) -> usize {
            8usize.saturating_sub(self.held)
        }
        fn load(&self, _: usize) -> usize {
            self.held
        }
        fn admit(&mut self, _: usize, task: (TaskId, u32)) {
            self.held += 1;
            self.waiting.push_back(task);
        }
        fn next_step(&mut self, _: usize, step: StepId) -> Option<Plan<TaskId, TaskId, ()>> {
            let (id, left) = self.waiting.pop_front()?;
            self.busy.insert(step, (id, left));
            Some(Plan {
                step: id,
                nodes: vec![NodeTask {
                    node: 0,
                    work: id,
                    links: (),
                }],
            })
        }
        fn completed(&mut self, _: usize, step: StepId, _: ()) {
            if let Some((id, left)) = self.busy.remove(&step) {
                if left > 1 {
                    self.waiting.push_back((id, left - 1));
                } else {
                    self.held -= 1;
                }
            }
        }
        fn failed(&mut self, _: usize, steps: &[StepId]) -> Vec<TaskId> {
            let mut out = Vec::new();
            for s in steps {
                if let Some(t) = self.busy.remove(s) {
                    out.push(t.0);
                    self.waiting.push_front(t);
                }
            }
            out
        }
        fn tasks_in(&self, _: usize, step: StepId) -> Option<Vec<TaskId>> {
            Some(self.busy.get(&step).map(|t| vec![t.0]).unwrap_or_default())
        }
        fn cancel(&mut self, task: TaskId) -> bool {
            let before = self.waiting.len();
            self.waiting.retain(|t| t.0 != task);
            let gone = self.waiting.len() != before;
            self.held -= gone as usize;
            gone
        }
        fn contains(&self, task: TaskId) -> bool {
            self.waiting
                .iter()
                .chain(self.busy.values())
                .any(|t| t.0 == task)
        }
        fn drop_task(&mut self, task: TaskId) {
            if self.cancel(task) {
                return;
            }
            self.busy.retain(|_, t| t.0 != task);
            self.held -= 1;
        }
        fn is_idle(&self) -> bool {
            self.held == 0
        }
        fn stats(&self) -> usize {
            self.held
        }
    }

    fn done(step: StepId, ok: bool) -> StepDone<()> {
        StepDone {
            replica: 0,
            step,
            result: if ok {
                Ok(())
            } else {
                Err(vec![(
                    NodeId {
                        replica: 0,
                        index: 0,
                    },
                    NodeError::Failed("boom".into()),
                )])
            },
            compute: Duration::ZERO,
            merge: Duration::ZERO,
        }
    }

    fn failed(step: StepId, node: usize, why: &str) -> StepDone<()> {
        StepDone {
            result: Err(vec![(
                NodeId {
                    replica: 0,
                    index: node,
                },
                NodeError::Failed(why.into()),
            )]),
            ..done(step, true)
        }
    }

    fn steps(d: &[Dispatch<Steps>]) -> Vec<(StepId, TaskId)> {
        d.iter().map(|d| (d.step, d.plan.step)).collect()
    }

    #[test]
    fn up_to_max_in_flight_steps_per_replica() {
        let mut s = SchedulerState::new(Steps::default(), Supervision::default(), 2);
        s.admit(vec![(1, 2), (2, 1), (3, 1)]);
        assert_eq!(steps(&s.dispatch()), vec![(0, 1), (1, 2)]);
        assert!(s.dispatch().is_empty(), "two steps are in flight");
        assert_eq!(s.stats().in_flight, 2);
        s.step_done(done(1, true));
        assert_eq!(steps(&s.dispatch()), vec![(2, 3)]);
        s.step_done(done(0, true));
        assert_eq!(steps(&s.dispatch()), vec![(3, 1)], "task 1's second step");
        s.step_done(done(2, true));
        s.step_done(done(3, true));
        assert!(s.stats().idle);
        assert_eq!(s.stats().steps, 4);
    }

    #[test]
    fn a_failure_waits_for_the_replica_to_drain_then_retries_then_gives_up() {
        let sup = Supervision {
            max_retries: 1,
            backoff: Duration::ZERO,
        };
        let mut s = SchedulerState::new(Steps::default(), sup, 2);
        s.admit(vec![(1, 1), (2, 1)]);
        assert_eq!(s.dispatch().len(), 2);
        let out = s.step_done(done(0, false));
        assert!(!out.backoff, "step 1 is still in flight");
        assert!(s.dispatch().is_empty(), "no new step while recovering");
        let out = s.step_done(done(1, true));
        assert!(out.backoff && out.ended.is_empty());
        assert!(s.dispatch().is_empty(), "paused for the backoff");
        s.resume(0);
        assert_eq!(steps(&s.dispatch()), vec![(2, 1)], "task 1 retried");
        let out = s.step_done(done(2, false));
        assert_eq!(out.ended.len(), 1, "over max_retries: {out:?}");
        assert_eq!(out.ended[0].0, 1);
        assert!(matches!(&out.ended[0].1, End::Failed(w) if w.contains("boom")));
        s.resume(0);
        assert!(s.stats().idle);
        assert_eq!(s.stats().failed_steps, 2);
    }

    #[test]
    fn a_failed_task_is_told_only_the_failures_of_its_own_steps() {
        let sup = Supervision {
            max_retries: 1,
            backoff: Duration::ZERO,
        };
        let mut s = SchedulerState::new(Steps::default(), sup, 2);
        s.admit(vec![(1, 1), (2, 1)]);
        for round in 0..2 {
            let d = steps(&s.dispatch());
            assert_eq!(d.len(), 2, "round {round}");
            let mut out = StepOutcome::default();
            for (step, task) in d {
                out = s.step_done(match task {
                    1 => failed(step, 0, &format!("job 1 fails ({round})")),
                    _ => failed(step, 1, "job 2 fails"),
                });
            }
            assert!(out.backoff);
            s.resume(0);
            if round == 0 {
                assert!(out.ended.is_empty(), "{out:?}");
                continue;
            }
            let why: HashMap<TaskId, String> = out
                .ended
                .into_iter()
                .map(|(t, e)| match e {
                    End::Failed(w) => (t, w),
                    End::Cancelled => (t, "cancelled".into()),
                })
                .collect();
            assert_eq!(
                why[&1],
                "the task failed 2 times: replica 0 node 0: job 1 fails (0); \
                 replica 0 node 0: job 1 fails (1)"
            );
            assert_eq!(
                why[&2],
                "the task failed 2 times: replica 0 node 1: job 2 fails"
            );
        }
        assert!(s.stats().idle);
    }

    #[test]
    fn without_the_policy_s_word_a_failure_names_every_failed_step_and_says_so() {
        let step = |step, why: &str, tasks| FailedStep {
            step,
            why: why.into(),
            tasks,
        };
        let steps = [
            step(0, "a", None),
            step(1, "b", None),
            step(2, "c", Some(vec![7])),
        ];
        assert_eq!(why_failed(0, &steps, 7), "c");
        let why = why_failed(0, &steps, 8);
        assert!(
            why.contains("does not say which held the task") && why.ends_with(": a; b"),
            "{why}"
        );
        assert_eq!(
            why_failed(0, &steps[..1], 8),
            "a",
            "one step: it held the task"
        );
    }

    #[test]
    fn abandoned_tasks_are_not_admitted() {
        struct Gone;
        impl crate::Task for Gone {
            fn id(&self) -> TaskId {
                9
            }
            fn abandoned(&self) -> bool {
                true
            }
        }
        struct P;
        impl Policy for P {
            type Task = Gone;
            type Work = ();
            type Links = ();
            type Step = ();
            type Verdict = ();
            type Stats = ();
            fn replicas(&self) -> usize {
                1
            }
            fn room(&self) -> usize {
                1
            }
            fn load(&self, _: usize) -> usize {
                0
            }
            fn admit(&mut self, _: usize, _: Gone) {
                panic!("an abandoned task was admitted")
            }
            fn next_step(&mut self, _: usize, _: StepId) -> Option<Plan<(), (), ()>> {
                None
            }
            fn completed(&mut self, _: usize, _: StepId, _: ()) {}
            fn failed(&mut self, _: usize, _: &[StepId]) -> Vec<TaskId> {
                Vec::new()
            }
            fn cancel(&mut self, _: TaskId) -> bool {
                false
            }
            fn contains(&self, _: TaskId) -> bool {
                false
            }
            fn drop_task(&mut self, _: TaskId) {}
            fn is_idle(&self) -> bool {
                true
            }
            fn stats(&self) {}
        }
        let mut s = SchedulerState::new(P, Supervision::default(), 1);
        assert_eq!(s.admit(vec![Gone]), vec![9]);
    }
}
