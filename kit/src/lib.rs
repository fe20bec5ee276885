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
//! | [`SchedulerActor`] | [`SchedulerState`]: placement, per-node work, several steps in flight, retries | control | `Admit`, `CancelTask`, `StepDone` |
//! | [`NodeActor`] | the user's [`NodeWorker`] | its own arbiter, restarted by its supervisor | `RunStep` |
//! | [`MergerActor`] | [`Collector`] and the user's [`Merge`] | its own arbiter | `Expect`, `NodeReport`, `Register`, `EndTask` |
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
