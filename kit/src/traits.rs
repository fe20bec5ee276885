//! The traits a pipeline is built from, and the small types they share.
//!
//! A pipeline is queue → scheduler → compute nodes → merger:
//!
//! * a [`Task`] is the scheduling part of what users submit; its requester's
//!   part (a [`Merge::Registration`]: where results go) goes to the merger at
//!   submission, so the merger alone ends tasks;
//! * a [`Policy`] is the scheduler's brain: it takes tasks in, and for each
//!   replica cuts the next step into a [`Plan`]: one piece of work per node that
//!   has any (a node may get nothing), each with its own links to its peers,
//!   and the step's description for the merger;
//! * a [`NodeWorker`] runs on its own thread and turns its node's work into an
//!   `Output`;
//! * a [`Merge`] receives the outputs of the nodes that worked on a step and
//!   decides, for each task, what happens next (the `Verdict` the policy
//!   applies). Iterative tasks go round again; one-shot tasks finish at their
//!   first merge. It is also the one place where a task ends without
//!   finishing ([`Merge::end`]): cancelled, or failed.
//!
//! **Invariant:** every submitted task ends exactly once, through the merger:
//! finished by its own merge, or ended by [`Merge::end`] or [`Merge::end_all`]
//! (or, if the pipeline stops first, by dropping its registration).
//!
//! **When user code fails:** a [`NodeWorker`] that errs or panics fails its
//! step, is rebuilt, and the step's tasks are retried (see [`Supervision`]).
//! A [`Policy`] or [`Merge`] method that panics leaves state the kit cannot
//! trust, so the pipeline stops: every task still registered ends with
//! [`End::Failed`] naming the panic (through [`Merge::end_all`]), later
//! submissions are refused with [`SubmitError::Halted`], and
//! [`crate::Pipeline::shutdown`] returns at once. A [`Plan`] that gives work
//! to a node its replica does not have fails its step (retried like a node
//! failure), naming the node and the replica's node count.

use std::time::Duration;

/// A task's id, unique within a pipeline.
pub type TaskId = u64;

/// A step's number, unique within a pipeline.
pub type StepId = u64;

/// The scheduling part of a unit of work users submit.
pub trait Task: Send + Unpin + 'static {
    /// The task's id.
    fn id(&self) -> TaskId;
    /// Higher runs first; equal priorities run first-come-first-served.
    fn priority(&self) -> i32 {
        0
    }
    /// Whether its requester has gone, so that it need not run: the queue and
    /// the scheduler drop such a task (ending it as cancelled) before it is
    /// batched.
    fn abandoned(&self) -> bool {
        false
    }
    /// The flag [`Task::abandoned`] reads, if it is one that the requester
    /// sets when it goes: the scheduler keeps watching it after admission
    /// and cancels the task before its next step once it is set (a
    /// cancellation message may arrive only after that step was planned).
    fn abandon_flag(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }
    /// Whether the queue takes it even when full, without counting it
    /// against its capacity, and hands it to the scheduler at once, whatever
    /// the scheduler's demand: a control task such as a health probe, which
    /// must not be refused or held for the very load it checks, and takes no
    /// requester's place.
    fn exempt_from_capacity(&self) -> bool {
        false
    }
}

/// A node's place: its replica and its index among the replica's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// The data-parallel replica.
    pub replica: usize,
    /// The node's index within its replica.
    pub index: usize,
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "replica {} node {}", self.replica, self.index)
    }
}

impl NodeId {
    /// The node's metric label, `r{replica}.n{index}`.
    pub fn label(&self) -> String {
        format!("r{}.n{}", self.replica, self.index)
    }
}

/// Why a node's step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The node itself failed (an error or a panic); it is restarted.
    #[error("{0}")]
    Failed(String),
    /// A peer failed and the step was aborted; this node is healthy.
    #[error("aborted: {0}")]
    Aborted(String),
}

/// How a task ended other than by its merge finishing it. An error (`Send +
/// Sync`), so that `pending.wait()?` works in a function returning
/// `Result<_, Box<dyn Error>>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum End {
    /// The user cancelled it (or its requester went away).
    #[error("the task was cancelled")]
    Cancelled,
    /// It failed for good; the text says why.
    #[error("{0}")]
    Failed(String),
}

/// One node's part of a step.
#[derive(Debug)]
pub struct NodeTask<W, L> {
    /// The node's index within its replica.
    pub node: usize,
    /// What it computes.
    pub work: W,
    /// Its connections to its peers for this step.
    pub links: L,
}

/// One step of one replica, cut into per-node work.
#[derive(Debug)]
pub struct Plan<S, W, L> {
    /// What the merger needs to know of the step.
    pub step: S,
    /// Work for the nodes that take part, at most one entry per node; nodes
    /// not listed get nothing this step. A plan naming a node index the
    /// replica does not have is not run: the step fails, naming the index.
    pub nodes: Vec<NodeTask<W, L>>,
}

/// The scheduler's policy: admission, step planning and applying verdicts.
///
/// The scheduler asks for a replica's next step whenever fewer than
/// `max_steps_in_flight` of its steps are running; a policy returns `None`
/// when nothing can start now (for example because every runnable task is in
/// a step in flight).
///
/// A policy must not panic: a panic in any of its methods (or in a
/// [`Task`]'s, called by the scheduler) leaves it in a state the scheduler
/// cannot trust, so the pipeline stops, every task still registered ends
/// with an error naming the panic, and later submissions are refused with
/// [`SubmitError::Halted`]. A policy that runs user code which may panic for
/// one task (as [`crate::OneShot`]'s `split`) catches it itself and fails
/// that task alone, for example with a plan of no nodes whose step tells the
/// merge to end it.
pub trait Policy: Send + Unpin + 'static {
    /// The scheduling part of what users submit.
    type Task: Task;
    /// One node's work for one step.
    type Work: Send + 'static;
    /// One node's connections to its peers for one step.
    type Links: Send + 'static;
    /// What the merger needs to know of a step.
    type Step: Send + 'static;
    /// The merger's decisions for one step.
    type Verdict: Send + 'static;
    /// Figures for monitoring.
    type Stats: Clone + Default + std::fmt::Debug + PartialEq + Send + Unpin + 'static;

    /// Number of replicas.
    fn replicas(&self) -> usize;
    /// How many more tasks the policy wants now.
    fn room(&self) -> usize;
    /// How loaded `replica` is (new tasks go to the least loaded, unless
    /// [`Policy::route`] says otherwise).
    fn load(&self, replica: usize) -> usize;
    /// The replica `task` goes to; by default the least loaded.
    fn route(&self, task: &Self::Task) -> usize {
        let _ = task;
        (0..self.replicas())
            .min_by_key(|&r| self.load(r))
            .unwrap_or(0)
    }
    /// Takes `task` into `replica`.
    fn admit(&mut self, replica: usize, task: Self::Task);
    /// The next step of `replica` (numbered `step`), if one can start now.
    fn next_step(
        &mut self,
        replica: usize,
        step: StepId,
    ) -> Option<Plan<Self::Step, Self::Work, Self::Links>>;
    /// Applies the merger's verdict on `replica`'s step `step`.
    fn completed(&mut self, replica: usize, step: StepId, verdict: Self::Verdict);
    /// `steps` of `replica` failed and its nodes' state is lost; no step of
    /// it is in flight any more (those that succeeded meanwhile were applied
    /// with [`Policy::completed`] first). Returns the tasks that were in the
    /// failed steps and are still held (each is retried until it has failed
    /// too often).
    fn failed(&mut self, replica: usize, steps: &[StepId]) -> Vec<TaskId>;
    /// The tasks that `replica`'s step `step`, in flight, holds, if the
    /// policy can tell. The scheduler asks when the step fails, so that a
    /// task failing for good is told only its own steps' failures. By default
    /// `None`: such a task's error then names every failure of its replica's
    /// failed steps, and says that the policy did not tell which held it.
    fn tasks_in(&self, replica: usize, step: StepId) -> Option<Vec<TaskId>> {
        let _ = (replica, step);
        None
    }
    /// Cancels `task`; `true` if the policy held it. The scheduler then ends it
    /// through the merger (a verdict for it from a step still in flight is
    /// ignored by the merger).
    fn cancel(&mut self, task: TaskId) -> bool;
    /// Whether the policy still holds `task`.
    fn contains(&self, task: TaskId) -> bool;
    /// Forgets `task` at once (it failed for good).
    fn drop_task(&mut self, task: TaskId);
    /// Whether no task is held.
    fn is_idle(&self) -> bool;
    /// Monitoring figures.
    fn stats(&self) -> Self::Stats;
}

/// One compute node's work, run on the node's own thread.
pub trait NodeWorker: Sized + Unpin + 'static {
    /// The node's work for one step.
    type Work: Send + 'static;
    /// Connections to peers.
    type Links: Send + 'static;
    /// What the node hands to the merger.
    type Output: Send + 'static;

    /// Runs the node's part of one step. An `Err` or a panic fails the step:
    /// the node is rebuilt from its [`WorkerFactory`], and the step's tasks
    /// run again, each up to [`Supervision::max_retries`] times.
    fn run(&mut self, work: &Self::Work, links: &Self::Links) -> Result<Self::Output, NodeError>;
    /// Called when this node fails mid-step, or when its part of a step is
    /// dropped without being run (its arbiter stopped with it queued), so
    /// that peers blocked on it return (a panic here is caught and logged).
    /// It may run on any thread, more than once for the same links, and
    /// must not block.
    fn abort(links: &Self::Links);
    /// Whether the worker keeps state from step to step that later steps
    /// build on (the LLM's KV cache). A restart rebuilds the worker without
    /// it, so a stateful node refuses the steps planned before its restart
    /// (see [`crate::node::RunStep::epoch`]); a stateless one runs them.
    fn stateful() -> bool {
        true
    }
}

/// Builds a node's worker (at start, and again on every restart). An `Err`
/// or a panic at start makes [`crate::Pipeline::start`] fail with it; at a
/// restart, the node fails every step it is given, with the reason, until a
/// later rebuild succeeds.
pub type WorkerFactory<W> = std::sync::Arc<dyn Fn(NodeId) -> Result<W, String> + Send + Sync>;

/// Assembles a step's node outputs into per-task results, and is the one place
/// where tasks end.
///
/// A merge must not panic: a panic in any of its methods leaves it in a
/// state the merger cannot trust, so the pipeline stops as for a
/// [`Policy`]'s panic (every task still registered ends through
/// [`Merge::end_all`] with an error naming it). A merge that runs user code
/// which may panic for one task (as [`crate::OneShot`]'s `merge`) catches it
/// itself and ends that task alone.
pub trait Merge: Send + Unpin + 'static {
    /// What the merger knows of a step.
    type Step: Send + 'static;
    /// A node's output.
    type Output: Send + 'static;
    /// The requester's part of a submitted task (where its results go).
    type Registration: Send + 'static;
    /// Decisions for the policy.
    type Verdict: Send + 'static;

    /// A task was submitted (the queue accepted it).
    fn register(&mut self, task: TaskId, reg: Self::Registration);
    /// Every node that had work in `step` finished it; `outputs` are
    /// `(node index, output)` in node order.
    fn merge(&mut self, step: &Self::Step, outputs: Vec<(usize, Self::Output)>) -> Self::Verdict;
    /// Ends `task` for a reason other than finishing (a no-op if it already
    /// ended).
    fn end(&mut self, task: TaskId, end: End);
    /// The pipeline stops (user code panicked, a [`crate::Halter`] halted
    /// it, or it was shut down or dropped with tasks still held): ends every
    /// task still registered as `end`. By default it does nothing, and the
    /// registrations are dropped with the merge (so requesters learn that
    /// the pipeline stopped, not why).
    fn end_all(&mut self, end: End) {
        let _ = end;
    }
}

/// Supervision and retry limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supervision {
    /// How many failed steps a task survives before it ends with an error.
    pub max_retries: u32,
    /// Pause before rerunning a replica whose step failed.
    pub backoff: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            max_retries: 3,
            backoff: Duration::from_millis(10),
        }
    }
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again later.
    #[error("overloaded: the queue holds its capacity of {capacity} tasks")]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The pipeline is shutting down.
    #[error("the pipeline is shutting down and admits no new tasks")]
    ShuttingDown,
    /// The actor system is gone.
    #[error("the pipeline has stopped")]
    Stopped,
    /// The pipeline stopped by itself because user code panicked; the text
    /// names the panic.
    #[error("the pipeline has stopped: {0}")]
    Halted(String),
}
