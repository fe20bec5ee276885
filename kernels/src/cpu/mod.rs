//! CPU kernels.
//!
//! * [`skinny`] — f32 `y = x·Wᵀ` for few activation rows against a large weight
//!   matrix (batched decode), register-tiled and split across the current
//!   compute pool's threads.
//! * [`half_mm`] — the same product with f16 or bf16 weights widened in
//!   registers (F16C, AVX-512), f32 sums.
//! * [`quant`] — GGML/GGUF block-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0, Q4_K, Q6_K) against 8-bit quantized activations: dequantization, activation
//!   quantization, dot products and gemv/gemm on a caller-provided pool.
//! * [`attn`] — causal grouped-query attention against a flat or paged KV cache
//!   (f32 or f16), each KV head's keys and values read once for all the query
//!   heads that share it; plus the scalar reference.
//! * [`ops`] — RMSNorm, `silu(gate)·up` and rotary embeddings (llama.cpp's
//!   adjacent-pair convention), AVX2 paths beside scalar references.
//! * [`pool`] — the compute pool a step runs on: the calling thread plus
//!   helpers that spin between parallel regions, one region per hand-out.
//! * [`prefetch`] — software prefetch of the weight stream a fixed distance
//!   ahead (`PARALLM_PREFETCH`), which batch-1 decode's bandwidth rests on.
//! * [`busy`] — thread-time inside the parallel regions, for profiles.
//! * [`features`] — which instruction sets the dispatchers may use
//!   (`PARALLM_CPU_FEATURES` turns any off) and the report of the paths taken.

pub mod attn;
pub mod busy;
pub mod features;
pub mod half_mm;
pub mod ops;
mod out;
pub mod pool;
pub mod prefetch;
pub mod quant;
pub mod skinny;

/// Checks every environment variable the CPU kernels read
/// (`PARALLM_CPU_FEATURES`, `PARALLM_PREFETCH`), for programs to refuse a
/// bad value before they start.
pub fn check_env() -> Result<(), String> {
    features::check_env()?;
    prefetch::check_env()
}
