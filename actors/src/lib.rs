//! parallm's actors: the queue → schedule → execute → merge pipeline on actix,
//! and the LLM [`Engine`](llm::Engine) built from it.
//!
//! The generic kit ([`kit`]) names the pieces a pipeline is made of — tasks, a
//! scheduling policy, node workers and a merge — and the four actors run any
//! instance of them:
//!
//! * [`QueueActor`] — bounded admission, priorities, cancellation;
//! * [`SchedulerActor`] — one step per replica at a time, least-loaded
//!   placement, supervision of failed steps;
//! * [`NodeActor`] — one per shard on its own thread, restarted by its actix
//!   supervisor when it fails;
//! * [`MergerActor`] — gathers a step's outputs and applies the merge.
//!
//! [`Pipeline`] starts and drives them. [`llm`] instantiates the kit for
//! Llama-family inference with tensor, pipeline and data parallelism.
//!
//! **Invariants:** every admitted task ends with exactly one terminal event;
//! a node gets one control message per step; framework state machines do the
//! deciding, actors only move messages and own state.

pub mod kit;
pub mod llm;
pub mod merger;
pub mod node;
pub mod pipeline;
pub mod queue;
pub mod scheduler;

pub use kit::{
    End, Merge, NodeError, NodeId, NodeWorker, Policy, PolicyStats, SubmitError, Supervision, Task,
    TaskId, WorkerFactory,
};
pub use merger::MergerActor;
pub use node::{NodeActor, NodeCounters};
pub use pipeline::{Pipeline, PipelineConfig};
pub use queue::QueueActor;
pub use scheduler::{SchedulerActor, SchedulerStats};
