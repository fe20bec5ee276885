//! CPU kernels.
//!
//! * [`skinny`] — f32 `y = x·Wᵀ` for few activation rows against a large weight
//!   matrix (batched decode), register-tiled and split across rayon threads.
//! * [`quant`] — GGML/GGUF block-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K,
//!   Q6_K) against 8-bit quantized activations: dequantization, activation
//!   quantization, dot products and gemv/gemm on a caller-provided rayon pool.

pub mod quant;
pub mod skinny;
