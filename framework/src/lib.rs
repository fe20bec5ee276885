//! parallm's framework: everything that is not an actor.
//!
//! This crate owns the model side of parallm — reading GGUF files
//! ([`gguf`]), the model's shape ([`config`]), the tokenizer and chat template
//! ([`tokenizer`], [`chat`]), the shard-aware Llama forward pass ([`model`]; its
//! layer loop written once over the CPU and CUDA backends in [`backend`] and
//! [`cuda`]) with its weight handling ([`weights`]) and plain operations
//! ([`ops`]), how shards are
//! cut ([`shard`]) and combined ([`collective`]), the paged KV cache ([`kv`]) and
//! the continuous-batching policy ([`batching`]) the actors run, and choosing
//! tokens ([`sampling`], [`beam`], [`generate`]).
//!
//! **Invariant:** nothing here depends on actix or HTTP. Every state machine is
//! plain, synchronous and tested without an actor system. User input (files,
//! requests) produces an [`Error`], never a panic.

pub mod backend;
pub mod batching;
pub mod beam;
pub mod chat;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod sampling;
pub mod shard;
pub mod threads;
pub mod tokenizer;
pub mod weights;

pub use backend::{BackendKind, Shard, ShardSource, StageGroup};
pub use batching::GroupId;
pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use model::{
    BatchItem, LlamaShard, Logits, LogitsWanted, PagedItem, SeqKvCache, StageInput, StageOutput,
};
pub use sampling::{FinishReason, SamplingParams};
pub use shard::ShardSpec;
pub use tokenizer::Tokenizer;
pub use weights::WeightFormat;

/// Threads the CPU backend's matmuls use (`CANDLE_NUM_THREADS`, `RAYON_NUM_THREADS`,
/// else every core).
pub fn compute_threads() -> usize {
    candle_core::utils::get_num_threads()
}
