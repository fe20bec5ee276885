//! The general kit: the traits a pipeline is built from, and the messages the
//! four actors exchange.
//!
//! A pipeline is queue → scheduler → compute nodes → merger:
//!
//! * a [`Task`] is what users submit; the [`QueueActor`](crate::QueueActor)
//!   holds it until the scheduler has room;
//! * a [`Policy`] is the scheduler's brain: it takes tasks in, and for each
//!   replica cuts the next step into one piece of `Work` that every node of the
//!   replica receives (with its own `Links` to its peers);
//! * a [`NodeWorker`] runs on its own thread and turns the step's work into an
//!   `Output`;
//! * a [`Merge`] receives every node's output of a step and decides, for each
//!   task, what happens next (the `Verdict` the policy applies). Iterative tasks
//!   go round again; one-shot tasks finish at their first merge.
//!
//! The LLM engine ([`crate::llm`]) is one instance of these traits; the
//! map-reduce example is another.

use std::time::Duration;

/// A task's id, unique within a pipeline.
pub type TaskId = u64;

/// A unit of work users submit.
pub trait Task: Send + Unpin + 'static {
    /// The task's id.
    fn id(&self) -> TaskId;
    /// Higher runs first; equal priorities run first-come-first-served.
    fn priority(&self) -> i32 {
        0
    }
    /// Ends the task because it was cancelled while queued.
    fn cancelled(self);
    /// Ends the task because it could not run (`reason` says why).
    fn failed(self, reason: String);
}

/// A node's place: its replica and its index among the replica's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// How a task ended other than by its merger finishing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The user cancelled it.
    Cancelled,
    /// It failed for good.
    Failed(String),
}

/// Figures a policy reports for monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyStats {
    /// Tasks in steps (running).
    pub running: usize,
    /// Tasks admitted but waiting for room (new or preempted).
    pub waiting: usize,
    /// Cache blocks in use, over all replicas.
    pub kv_used: usize,
    /// Cache blocks in all.
    pub kv_total: usize,
    /// Preemptions so far.
    pub preemptions: u64,
}

/// The scheduler's policy: admission, step planning and applying verdicts.
pub trait Policy: Send + Unpin + 'static {
    /// What users submit.
    type Task: Task;
    /// One step's plan for one replica, shared by its nodes.
    type Work: Send + Sync + 'static;
    /// A node's connections to its peers for one step.
    type Links: Send + Unpin + 'static;
    /// What the merger needs to know about an admitted task.
    type Registration: Send + Unpin + 'static;
    /// The merger's decisions for one step.
    type Verdict: Send + Unpin + 'static;

    /// Number of replicas.
    fn replicas(&self) -> usize;
    /// How many more tasks the policy wants now.
    fn room(&self) -> usize;
    /// How loaded `replica` is (new tasks go to the least loaded).
    fn load(&self, replica: usize) -> usize;
    /// Takes `task` into `replica`; returns the merger's part of it.
    fn admit(&mut self, replica: usize, task: Self::Task) -> Self::Registration;
    /// The next step of `replica`, if it has work.
    fn next_step(&mut self, replica: usize) -> Option<Self::Work>;
    /// Fresh links for the nodes of `replica` (in node order) for one step.
    fn links(&self, replica: usize) -> Vec<Self::Links>;
    /// Applies the merger's verdict on `replica`'s step.
    fn completed(&mut self, replica: usize, verdict: Self::Verdict);
    /// `replica`'s step failed; its nodes' state is lost. Returns the tasks that
    /// were in the step (each is retried until it has failed too often).
    fn failed(&mut self, replica: usize) -> Vec<TaskId>;
    /// Cancels `task`; `true` if the policy held it.
    fn cancel(&mut self, task: TaskId) -> bool;
    /// Whether the policy still holds `task`.
    fn contains(&self, task: TaskId) -> bool;
    /// Forgets `task` at once (it failed for good).
    fn drop_task(&mut self, task: TaskId);
    /// Whether no task is held.
    fn is_idle(&self) -> bool;
    /// Monitoring figures.
    fn stats(&self) -> PolicyStats;
}

/// One compute node's work, run on the node's own thread.
pub trait NodeWorker: Sized + Unpin + 'static {
    /// The step's plan.
    type Work: Send + Sync + 'static;
    /// Connections to peers.
    type Links: Send + Unpin + 'static;
    /// What the node hands to the merger.
    type Output: Send + Unpin + 'static;

    /// Runs the node's part of one step.
    fn run(&mut self, work: &Self::Work, links: &Self::Links) -> Result<Self::Output, NodeError>;
    /// Called when this node fails mid-step, so that peers blocked on it return.
    fn abort(links: &Self::Links);
}

/// Builds a node's worker (at start, and again on every restart).
pub type WorkerFactory<W> = std::sync::Arc<dyn Fn(NodeId) -> Result<W, String> + Send + Sync>;

/// Assembles a step's node outputs into per-task results.
pub trait Merge: Send + Unpin + 'static {
    /// The step's plan.
    type Work: Send + Sync + 'static;
    /// A node's output.
    type Output: Send + Unpin + 'static;
    /// An admitted task's merger part.
    type Registration: Send + Unpin + 'static;
    /// Decisions for the policy.
    type Verdict: Send + Unpin + 'static;

    /// A task was admitted.
    fn register(&mut self, reg: Self::Registration);
    /// Every node of a replica finished `work`; `outputs` are in node order.
    fn merge(&mut self, work: &Self::Work, outputs: Vec<Self::Output>) -> Self::Verdict;
    /// Ends `task` for a reason other than finishing.
    fn end(&mut self, task: TaskId, end: End);
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
}
