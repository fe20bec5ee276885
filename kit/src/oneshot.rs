//! The short path for one-shot pipelines: say how to split a task, what a node
//! computes, and how to merge the parts.
//!
//! [`OneShot::start`] takes three functions and builds the full pipeline
//! around them — a bounded queue, a scheduler that cuts every task into one
//! step of per-node parts (several tasks in flight at once), compute nodes on
//! their own threads that are restarted when they fail (the task is split and
//! run again, up to `max_retries` times), and a merger that hands each answer
//! to its [`Pending`]. Dropping a [`Pending`] cancels its task.
//!
//! The user's functions fail one task at a time: a `split` that panics or
//! returns more parts than there are nodes, and a `merge` that panics, end
//! that task with [`End::Failed`] naming what happened (neither is retried:
//! they see only the input), and the pipeline goes on with the others; a
//! `compute` that errs or panics fails the run, which is retried.
//!
//! ```
//! use kit::{OneShot, OneShotConfig};
//!
//! // The mean of 0..n, summed on 4 nodes.
//! let pool = OneShot::start(
//!     OneShotConfig { nodes: 4, ..OneShotConfig::default() },
//!     |n: &u64, nodes| (0..nodes as u64).map(|k| (k * n / 4)..((k + 1) * n / 4)).collect(),
//!     |_node, part: &std::ops::Range<u64>| Ok(part.clone().sum::<u64>()),
//!     |n, sums: Vec<u64>| sums.iter().sum::<u64>() as f64 / *n as f64,
//! )
//! .unwrap();
//! let means = pool.map([10u64, 100]).unwrap();
//! assert_eq!(means, vec![Ok(4.5), Ok(49.5)]);
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::node::panic_text;
use crate::pipeline::{Canceller, KitMetrics, Pipeline, PipelineConfig};
use crate::scheduler::SchedulerStats;
use crate::traits::{
    End, Merge, NodeError, NodeId, NodeTask, NodeWorker, Plan, Policy, StepId, SubmitError,
    Supervision, Task, TaskId,
};

/// The shape of a one-shot pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneShotConfig {
    /// Compute nodes, each on its own thread.
    pub nodes: usize,
    /// Tasks the queue holds before it answers `Overloaded`.
    pub queue_capacity: usize,
    /// Tasks running at once (each one step over the nodes).
    pub tasks_in_flight: usize,
    /// Failed runs a task survives before it ends with an error.
    pub max_retries: u32,
    /// Pause after a failure before the nodes run again.
    pub backoff: Duration,
    /// Where the kit records its metrics.
    pub metrics: KitMetrics,
}

impl Default for OneShotConfig {
    fn default() -> Self {
        Self {
            nodes: 4,
            queue_capacity: 1024,
            tasks_in_flight: 2,
            max_retries: 3,
            backoff: Duration::from_millis(10),
            metrics: KitMetrics::default(),
        }
    }
}

/// A submitted task's answer, to wait for. Dropping it unanswered cancels the
/// task.
///
/// The answer is given once: after [`Pending::try_wait`] or
/// [`Pending::wait_timeout`] returned it, every later call answers
/// `Err(End::Failed("already answered"))`.
pub struct Pending<O> {
    id: TaskId,
    /// `None` once the answer was taken.
    rx: Option<Receiver<Result<O, End>>>,
    gone: Arc<AtomicBool>,
    canceller: Canceller,
}

/// The answer of a task whose registration was dropped unanswered.
fn stopped<O>() -> Result<O, End> {
    Err(End::Failed("the pipeline stopped".into()))
}

/// The answer of a [`Pending`] asked again.
fn already_answered<O>() -> Result<O, End> {
    Err(End::Failed("already answered".into()))
}

impl<O> Pending<O> {
    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Waits for the answer: the merged result, or how the task ended.
    pub fn wait(mut self) -> Result<O, End> {
        match self.rx.take() {
            Some(rx) => rx.recv().unwrap_or_else(|_| stopped()),
            None => already_answered(),
        }
    }

    /// Waits at most `timeout` for the answer; `None` if it has not come
    /// yet (the task goes on: wait again, or drop this to cancel it).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<O, End>> {
        let Some(rx) = self.rx.as_ref() else {
            return Some(already_answered());
        };
        let answer = match rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => stopped(),
        };
        self.rx = None;
        Some(answer)
    }

    /// The answer if it has come, without waiting; `None` if not yet.
    pub fn try_wait(&mut self) -> Option<Result<O, End>> {
        let Some(rx) = self.rx.as_ref() else {
            return Some(already_answered());
        };
        let answer = match rx.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => stopped(),
        };
        self.rx = None;
        Some(answer)
    }
}

impl<O> Drop for Pending<O> {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.gone.store(true, Ordering::Release);
            self.canceller.cancel(self.id);
        }
    }
}

/// A task on its way: its input, shared by the policy and the merger.
pub struct OneShotTask<I> {
    id: TaskId,
    input: Arc<I>,
    gone: Arc<AtomicBool>,
}

impl<I: Send + Sync + 'static> Task for OneShotTask<I> {
    fn id(&self) -> TaskId {
        self.id
    }
    fn abandoned(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.gone.clone())
    }
}

type SplitFn<I, P> = Box<dyn Fn(&I, usize) -> Vec<P> + Send>;
type ComputeFn<P, R> = Arc<dyn Fn(NodeId, &P) -> Result<R, String> + Send + Sync>;
type MergeFn<I, R, O> = Box<dyn Fn(&I, Vec<R>) -> O + Send>;

/// A task's step, as the merger gets it: the task, its input, and why it
/// cannot run if `split` failed (the step then has no node work, and the
/// merge ends the task with that error).
pub struct OneShotStep<I> {
    id: TaskId,
    input: Arc<I>,
    refused: Option<String>,
}

/// The policy: one step per task, its parts on nodes `0..parts`.
pub struct OneShotPolicy<I, P> {
    split: SplitFn<I, P>,
    nodes: usize,
    max_held: usize,
    waiting: VecDeque<(TaskId, Arc<I>)>,
    busy: HashMap<StepId, (TaskId, Arc<I>)>,
    /// Tasks cancelled while their step ran: ended already, so a failure of
    /// that step does not run them again.
    cancelled: HashSet<TaskId>,
}

impl<I: Send + Sync + 'static, P: Send + 'static> Policy for OneShotPolicy<I, P> {
    type Task = OneShotTask<I>;
    type Work = P;
    type Links = ();
    type Step = OneShotStep<I>;
    type Verdict = ();
    type Stats = OneShotStats;

    fn replicas(&self) -> usize {
        1
    }
    fn room(&self) -> usize {
        self.max_held
            .saturating_sub(self.waiting.len() + self.busy.len())
    }
    fn load(&self, _: usize) -> usize {
        self.waiting.len() + self.busy.len()
    }
    fn admit(&mut self, _: usize, task: OneShotTask<I>) {
        self.waiting.push_back((task.id, task.input));
    }
    fn next_step(&mut self, _: usize, step: StepId) -> Option<Plan<Self::Step, P, ()>> {
        let (id, input) = self.waiting.pop_front()?;
        let nodes = self.nodes;
        // The user's split fails this task alone: its step runs on no node
        // and the merge ends it with the reason.
        let parts = match catch_unwind(AssertUnwindSafe(|| (self.split)(&input, nodes))) {
            Ok(parts) if parts.len() > nodes => Err(format!(
                "split returned {} parts for {nodes} nodes (at most one part per node)",
                parts.len()
            )),
            Ok(parts) => Ok(parts),
            Err(p) => Err(format!("split panicked: {}", panic_text(p))),
        };
        let (nodes, refused) = match parts {
            Ok(parts) => {
                let nodes = parts
                    .into_iter()
                    .enumerate()
                    .map(|(node, work)| NodeTask {
                        node,
                        work,
                        links: (),
                    })
                    .collect();
                (nodes, None)
            }
            Err(why) => (Vec::new(), Some(why)),
        };
        self.busy.insert(step, (id, input.clone()));
        Some(Plan {
            step: OneShotStep { id, input, refused },
            nodes,
        })
    }
    fn completed(&mut self, _: usize, step: StepId, _: ()) {
        if let Some((id, _)) = self.busy.remove(&step) {
            self.cancelled.remove(&id);
        }
    }
    fn failed(&mut self, _: usize, steps: &[StepId]) -> Vec<TaskId> {
        let mut again: Vec<_> = steps
            .iter()
            .filter_map(|s| self.busy.remove(s))
            .filter(|(id, _)| !self.cancelled.remove(id))
            .collect();
        again.sort_by_key(|(id, _)| *id);
        let ids = again.iter().map(|(id, _)| *id).collect();
        for t in again.into_iter().rev() {
            self.waiting.push_front(t);
        }
        ids
    }
    fn tasks_in(&self, _: usize, step: StepId) -> Option<Vec<TaskId>> {
        Some(
            self.busy
                .get(&step)
                .map(|(id, _)| vec![*id])
                .unwrap_or_default(),
        )
    }
    fn cancel(&mut self, task: TaskId) -> bool {
        let held = self.contains(task);
        // A running task's step finishes; its answer is dropped by the
        // merger, and it is not run again if the step fails.
        if self.busy.values().any(|(id, _)| *id == task) {
            self.cancelled.insert(task);
        }
        self.waiting.retain(|(id, _)| *id != task);
        held
    }
    fn contains(&self, task: TaskId) -> bool {
        self.waiting.iter().any(|(id, _)| *id == task)
            || self.busy.values().any(|(id, _)| *id == task)
    }
    fn drop_task(&mut self, task: TaskId) {
        self.waiting.retain(|(id, _)| *id != task);
        self.busy.retain(|_, (id, _)| *id != task);
        self.cancelled.remove(&task);
    }
    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.busy.is_empty()
    }
    fn stats(&self) -> OneShotStats {
        OneShotStats {
            waiting: self.waiting.len(),
            running: self.busy.len(),
        }
    }
}

/// A one-shot pipeline's task counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OneShotStats {
    /// Tasks admitted and waiting to run (new or retried).
    pub waiting: usize,
    /// Tasks running.
    pub running: usize,
}

/// A node: runs the compute function on its part.
pub struct OneShotWorker<P, R> {
    id: NodeId,
    compute: ComputeFn<P, R>,
}

impl<P: Send + 'static, R: Send + 'static> NodeWorker for OneShotWorker<P, R> {
    type Work = P;
    type Links = ();
    type Output = R;

    fn run(&mut self, part: &P, _: &()) -> Result<R, NodeError> {
        (self.compute)(self.id, part).map_err(NodeError::Failed)
    }
    fn abort(_: &()) {}
    /// A part is computed from its input alone.
    fn stateful() -> bool {
        false
    }
}

/// The merge: answers each task's [`Pending`].
pub struct OneShotMerge<I, R, O> {
    merge: MergeFn<I, R, O>,
    replies: HashMap<TaskId, Sender<Result<O, End>>>,
}

impl<I: Send + Sync + 'static, R: Send + 'static, O: Send + 'static> Merge
    for OneShotMerge<I, R, O>
{
    type Step = OneShotStep<I>;
    type Output = R;
    type Registration = Sender<Result<O, End>>;
    type Verdict = ();

    fn register(&mut self, task: TaskId, reply: Sender<Result<O, End>>) {
        self.replies.insert(task, reply);
    }
    fn merge(&mut self, step: &OneShotStep<I>, outputs: Vec<(usize, R)>) {
        let Some(reply) = self.replies.remove(&step.id) else {
            return;
        };
        let answer = match &step.refused {
            Some(why) => Err(End::Failed(why.clone())),
            None => {
                let parts = outputs.into_iter().map(|(_, r)| r).collect();
                // The user's merge fails this task alone.
                catch_unwind(AssertUnwindSafe(|| (self.merge)(&step.input, parts)))
                    .map_err(|p| End::Failed(format!("merge panicked: {}", panic_text(p))))
            }
        };
        let _ = reply.send(answer);
    }
    fn end(&mut self, task: TaskId, end: End) {
        if let Some(reply) = self.replies.remove(&task) {
            let _ = reply.send(Err(end));
        }
    }
    fn end_all(&mut self, end: End) {
        for (_, reply) in self.replies.drain() {
            let _ = reply.send(Err(end.clone()));
        }
    }
}

/// A running one-shot pipeline taking inputs `I`, cutting them into parts
/// `P`, and answering `O`.
pub struct OneShot<I: Send + Sync + 'static, P: Send + 'static, O: Send + 'static> {
    pipeline: Pipeline<OneShotPolicy<I, P>, Sender<Result<O, End>>>,
    next_id: AtomicU64,
    queue_capacity: usize,
    _types: PhantomData<fn(I) -> O>,
}

impl<I: Send + Sync + 'static, P: Send + 'static, O: Send + 'static> OneShot<I, P, O> {
    /// Starts the pipeline: `split(input, nodes)` cuts a task into at most
    /// `nodes` parts (part `k` runs on node `k`; more parts, or a panic, fail
    /// the task); `compute(node, part)` runs on the node's thread (an `Err`
    /// or a panic fails the run, which is retried); `merge(input, results)`
    /// gets the parts' results in node order (a panic fails the task).
    pub fn start<R: Send + 'static>(
        cfg: OneShotConfig,
        split: impl Fn(&I, usize) -> Vec<P> + Send + 'static,
        compute: impl Fn(NodeId, &P) -> Result<R, String> + Send + Sync + 'static,
        merge: impl Fn(&I, Vec<R>) -> O + Send + 'static,
    ) -> Result<Self, String> {
        if cfg.nodes == 0 || cfg.tasks_in_flight == 0 {
            return Err(format!(
                "a one-shot pipeline needs at least one node and one task in flight: {cfg:?}"
            ));
        }
        let compute: ComputeFn<P, R> = Arc::new(compute);
        let policy = OneShotPolicy {
            split: Box::new(split),
            nodes: cfg.nodes,
            max_held: 2 * cfg.tasks_in_flight,
            waiting: VecDeque::new(),
            busy: HashMap::new(),
            cancelled: HashSet::new(),
        };
        let merge = OneShotMerge {
            merge: Box::new(merge),
            replies: HashMap::new(),
        };
        let factory = Arc::new(move |id: NodeId| {
            Ok(OneShotWorker {
                id,
                compute: compute.clone(),
            })
        });
        let pipeline = Pipeline::start(
            policy,
            merge,
            factory,
            PipelineConfig {
                queue_capacity: cfg.queue_capacity,
                replicas: 1,
                nodes_per_replica: cfg.nodes,
                max_steps_in_flight: cfg.tasks_in_flight,
                supervision: Supervision {
                    max_retries: cfg.max_retries,
                    backoff: cfg.backoff,
                },
                metrics: cfg.metrics,
            },
        )?;
        Ok(Self {
            pipeline,
            next_id: AtomicU64::new(1),
            queue_capacity: cfg.queue_capacity,
            _types: PhantomData,
        })
    }

    /// Submits a task; answers at once (`Overloaded` when the queue is full).
    pub fn submit(&self, input: I) -> Result<Pending<O>, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam::channel::bounded(1);
        let gone = Arc::new(AtomicBool::new(false));
        let task = OneShotTask {
            id,
            input: Arc::new(input),
            gone: gone.clone(),
        };
        self.pipeline.submit(task, tx)?;
        Ok(Pending {
            id,
            rx: Some(rx),
            gone,
            canceller: self.pipeline.canceller(),
        })
    }

    /// Runs every input and returns their answers in order (like a pool's
    /// `map`), keeping at most the queue's capacity submitted at once.
    /// Refused if the pipeline is stopping, or if other submitters fill the
    /// queue meanwhile.
    pub fn map(
        &self,
        inputs: impl IntoIterator<Item = I>,
    ) -> Result<Vec<Result<O, End>>, SubmitError> {
        let mut answers = Vec::new();
        let mut pending = VecDeque::new();
        for input in inputs {
            if pending.len() >= self.queue_capacity {
                answers.extend(pending.pop_front().map(Pending::wait));
            }
            pending.push_back(self.submit(input)?);
        }
        answers.extend(pending.into_iter().map(Pending::wait));
        Ok(answers)
    }

    /// Cancels a task wherever it is.
    pub fn cancel(&self, task: TaskId) {
        self.pipeline.cancel(task);
    }

    /// The pipeline's figures.
    pub fn stats(&self) -> SchedulerStats<OneShotStats> {
        self.pipeline.stats()
    }

    /// Every node's counters (steps, failures, restarts).
    pub fn node_stats(&self) -> Vec<(NodeId, crate::NodeCounters)> {
        self.pipeline.node_stats()
    }

    /// Lets every submitted task finish (waiting at most `timeout`), then
    /// stops; returns whether all finished.
    pub fn shutdown(self, timeout: Duration) -> bool {
        self.pipeline.shutdown(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: TaskId) -> OneShotTask<u32> {
        OneShotTask {
            id,
            input: Arc::new(7),
            gone: Arc::default(),
        }
    }

    #[test]
    fn a_task_cancelled_while_its_step_runs_is_not_run_again_when_the_step_fails() {
        let mut p = OneShotPolicy::<u32, u32> {
            split: Box::new(|i, _| vec![*i]),
            nodes: 1,
            max_held: 4,
            waiting: VecDeque::new(),
            busy: HashMap::new(),
            cancelled: HashSet::new(),
        };
        p.admit(0, task(1));
        p.admit(0, task(2));
        assert!(p.next_step(0, 10).is_some());
        assert!(p.cancel(1), "held, running");
        // Its step fails: task 1 ended already and is not retried.
        assert_eq!(p.failed(0, &[10]), Vec::<TaskId>::new());
        assert!(!p.contains(1));
        // Task 2 runs, fails, and is retried as before.
        assert!(p.next_step(0, 11).is_some());
        assert_eq!(p.failed(0, &[11]), vec![2]);
        assert!(p.contains(2) && p.cancelled.is_empty());
    }
}
