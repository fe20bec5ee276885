//! parallm's LLM engine: one instance of the general kit ([`kit`], its own
//! crate) for Llama-family inference with tensor, pipeline and data
//! parallelism, and the [`Engine`](llm::Engine) handle users call.
//!
//! The kit's four actors (queue, scheduler, compute nodes, merger) run the
//! engine's pieces from [`llm`]: [`llm::LlmPolicy`] plans each replica's steps
//! by continuous batching, [`llm::LlmWorker`] runs a node's shard,
//! [`llm::LlmMerger`] samples, stops and streams.
//!
//! **Invariants:** every admitted request ends with exactly one terminal
//! event; a node gets one control message per step; framework state machines
//! do the deciding, actors only move messages and own state.

pub mod embed;
pub mod llm;

pub use kit;
pub use kit::{End, NodeCounters, NodeError, NodeId, SubmitError, Supervision, TaskId};

/// The scheduler's figures for the engine's policy.
pub type SchedulerStats = kit::SchedulerStats<llm::LlmStats>;
