//! CPU kernels.
//!
//! * [`skinny`] — f32 `y = x·Wᵀ` for few activation rows against a large weight
//!   matrix (batched decode), register-tiled and split across rayon threads.

pub mod skinny;
