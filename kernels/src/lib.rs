//! parallm's kernels: the hot loops, one module per device.
//!
//! [`cpu`] holds Rust kernels with SIMD paths (AVX-512, AVX2+FMA) chosen at run
//! time and a portable scalar path every SIMD path is tested against.
//! Nothing here knows about models or
//! actors: kernels take plain slices and shapes.
//!
//! [`cuda`] holds the CUDA C kernels (compiled at run time with NVRTC), the
//! [`cuda::Device`] interface a GPU stream or its host emulation implements,
//! and typed launch wrappers.

pub mod cpu;
pub mod cuda;
#[cfg(test)]
mod test_rng;
