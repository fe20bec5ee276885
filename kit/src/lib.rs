//! parallm's kit: a queue → schedule → execute → merge pipeline on actix, for
//! any kind of task. It knows no model: the LLM engine (`parallm-actors`) is
//! one instance of it, the examples' map-reduce and document pipeline others.
//!
//! Two ways in:
//!
//! * the short path, [`OneShot`]: the user says how to split a task, what a
//!   node computes and how to merge the parts, and gets queueing, admission,
//!   scheduling, supervision with retries, cancellation and metrics;
//! * the full path, for iterative or heterogeneous pipelines: implement
//!   [`Policy`], [`NodeWorker`] and [`Merge`] and start a [`Pipeline`].
//!
//! The actors, each a thin shell around a plain state struct that tests drive
//! without an actor system:
//!
//! | actor | state | thread | takes |
//! |---|---|---|---|
//! | [`QueueActor`] | [`QueueState`]: bounded, priorities, abandoned tasks dropped | control | `Submit`, `Cancel`, `Demand`, `Close` |
//! | [`SchedulerActor`] | [`SchedulerState`]: placement, per-node work, several steps in flight, retries | control | `Admit`, `CancelTask`, `StepDone`, `Fault` |
//! | [`NodeActor`] | the user's [`NodeWorker`] | its own arbiter, restarted by its supervisor | `RunStep` |
//! | [`MergerActor`] | [`Collector`] and the user's [`Merge`] | its own arbiter | `Expect`, `NodeReport`, `Register`, `EndTask`, `Halt` |
//!
//! **When user code fails:**
//!
//! | where | what happens |
//! |---|---|
//! | [`NodeWorker::run`] errs or panics | the step fails; the node is rebuilt from its [`WorkerFactory`] and the step's tasks run again, each up to [`Supervision::max_retries`] times, then end with [`End::Failed`] naming the failures of the steps that held them |
//! | the [`WorkerFactory`] errs or panics | at start, [`Pipeline::start`] fails with it; at a restart, the node fails its steps with it until a rebuild succeeds |
//! | a [`Plan`] names a node the replica lacks | the step is not run and fails like a node failure, naming the node and the replica's node count |
//! | a [`Policy`] or [`Merge`] method panics | their state is unknown: the pipeline stops — every task still registered ends with [`End::Failed`] naming the panic (through [`Merge::end_all`]), submissions are refused with [`SubmitError::Halted`], [`Pipeline::shutdown`] returns at once |
//! | [`OneShot`]'s `split` panics or returns more parts than nodes, its `merge` panics | that task ends with [`End::Failed`] saying so; the others go on |
//! | [`OneShot`]'s `compute` errs or panics | as a node's `run`: retried |
//!
//! **Invariants:** every submitted task ends exactly once, through the
//! merger; a node gets one control message per step it has work in; the kit
//! depends on actix, crossbeam, metrics and the standard library only (no
//! model, tensor, GPU or HTTP crate; `tests/independent.rs` checks it).

pub mod merger;
pub mod node;
pub mod oneshot;
pub mod pipeline;
pub mod queue;
pub mod scheduler;
pub mod traits;

pub use merger::{Collector, MergerActor};
pub use node::{panic_text, NodeActor, NodeCounters, NodeStats};
pub use oneshot::{OneShot, OneShotConfig, Pending};
pub use pipeline::{Canceller, Halter, KitMetrics, Pipeline, PipelineConfig};
pub use queue::{QueueActor, QueueState};
pub use scheduler::{SchedulerActor, SchedulerState, SchedulerStats};
pub use traits::{
    End, Merge, NodeError, NodeId, NodeTask, NodeWorker, Plan, Policy, StepId, SubmitError,
    Supervision, Task, TaskId, WorkerFactory,
};
