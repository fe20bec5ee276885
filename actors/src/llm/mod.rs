//! The LLM engine as an instance of the kit: [`LlmPolicy`] (continuous batching
//! per replica), [`LlmWorker`] (a shard of a pipeline stage with its KV pool;
//! the last stage's rank 0 draws the tokens, see [`step`]), [`LlmMerger`]
//! (accepted tokens, beams, stops, streaming), and the [`Engine`] handle.

pub mod engine;
pub mod merge;
pub mod policy;
pub mod remote;
pub mod step;
pub mod task;
pub mod worker;

pub use engine::{
    refusal_reason, Compute, DraftModel, Engine, EngineBuilder, EngineConfig, EngineError,
    EngineStats, MemoryPlan, ModelSource, DEFAULT_SPECULATE_MAX_RUNNING,
};
pub use merge::LlmMerger;
pub use merge::{Choices, Decoding, Registration};
pub use policy::{Cluster, LlmPolicy, LlmStats, ModelDrafts, NodeLinks, ReplicaShape};
pub use step::{LlmStep, Pick, Picks, SharedSampler};
pub use task::{BeamOutput, BeamParams, Event, EventStream, Prompt, Request, Traffic, Usage};
pub use worker::{FaultInjection, LlmWorker, Shard};
