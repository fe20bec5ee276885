//! parallm's kernels: the hot loops, one module per device.
//!
//! [`cpu`] holds Rust kernels with SIMD paths (AVX-512, AVX2+FMA) chosen at run
//! time and a portable scalar path every SIMD path is tested against. The CUDA
//! half arrives with the CUDA backend. Nothing here knows about models or
//! actors: kernels take plain slices and shapes.

pub mod cpu;
