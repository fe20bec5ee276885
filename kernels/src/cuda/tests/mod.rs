//! Tests of the CUDA kernels on the host emulation ([`EmuDevice`]), against
//! plain Rust references. One file per kernel family.

use std::sync::Arc;

use super::device::{DevBuf, Device};
use super::EmuDevice;

mod attention;
mod elementwise;
mod quant;
mod sampling;
mod smoke;

/// The emulated device, or `None` where no C++ compiler exists and
/// `PARALLM_SKIP_EMULATION=1` asks to skip (without it, no compiler fails the
/// test: [`super::emu::available_for_tests`]). A compiler that rejects the
/// kernels fails the test. With `PARALLM_CUDA_TESTS=gpu`, GPU 0 instead: the
/// same tests on the hardware (run there with `--test-threads 1`).
pub(crate) fn emu() -> Option<Arc<dyn Device>> {
    if std::env::var("PARALLM_CUDA_TESTS").as_deref() == Ok("gpu") {
        return match super::CudaDevice::new(0) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => panic!("PARALLM_CUDA_TESTS=gpu: {e}"),
        };
    }
    if !super::emu::available_for_tests() {
        return None;
    }
    match EmuDevice::new() {
        Ok(d) => Some(Arc::new(d)),
        Err(e) => panic!("{e}"),
    }
}

/// Uploads `data`.
pub(crate) fn buf<T: super::device::Pod>(dev: &Arc<dyn Device>, data: &[T]) -> DevBuf {
    DevBuf::from_slice(dev, data).expect("upload")
}
