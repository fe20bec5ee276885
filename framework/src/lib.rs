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
//! tokens ([`sampling`], [`beam`], [`generate`]) and drafting them for
//! speculative decoding ([`speculative`]), and the activation statistics that
//! calibrate quantization and pruning ([`activations`]).
//!
//! **Invariant:** nothing here depends on actix or HTTP. Every state machine is
//! plain, synchronous and tested without an actor system. User input (files,
//! requests) produces an [`Error`], never a panic.

pub mod activations;
pub mod backend;
pub mod batching;
pub mod beam;
pub mod chat;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod encoder;
pub mod error;
pub mod family;
pub mod generate;
pub mod gguf;
pub mod guide;
pub mod hf;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod profile;
pub mod reasoning;
pub mod sampling;
pub mod scoring;
pub mod shard;
pub mod speculative;
pub(crate) mod spm;
pub mod threads;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use backend::{BackendKind, Shard, ShardSource, StageGroup};
pub use batching::GroupId;
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use model::{
    BatchItem, LlamaShard, Logits, LogitsWanted, PagedItem, SeqKvCache, StageInput, StageOutput,
};
pub use sampling::{FinishReason, SamplingParams};
pub use shard::ShardSpec;
pub use tokenizer::Tokenizer;
pub use weights::WeightFormat;

/// The machine's physical memory in bytes (`MemTotal` of `/proc/meminfo`),
/// or `None` where it cannot be read.
pub fn machine_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` in the largest binary unit that keeps it at least 1 (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Threads the CPU backend's matmuls use (`CANDLE_NUM_THREADS`, `RAYON_NUM_THREADS`,
/// else every core).
pub fn compute_threads() -> usize {
    candle_core::utils::get_num_threads()
}
