//! CUDA kernels: CUDA C sources compiled at run time with NVRTC, the devices
//! they run on, and typed launch wrappers.
//!
//! * [`probe`] — which of CUDA's libraries (driver, NVRTC, cuBLAS, NCCL) this
//!   process can open. cudarc opens them lazily and *panics* when one is
//!   missing, so every entry point here probes first and turns absence into
//!   an [`Error::Missing`] naming the library and the file names looked for.
//! * [`nvrtc`] — the kernel sources (`cu/*.cu`, one program) compiled to PTX
//!   for a device architecture, once per process and architecture.
//! * [`device`] — the [`Device`] trait the CUDA backend computes through:
//!   memory, copies, kernel launches by name, and GEMMs. Every operation on
//!   one `Device` value is ordered on one stream.
//! * [`gpu`] — [`CudaDevice`], a `Device` on a real GPU (cudarc's driver API,
//!   cuBLAS for GEMMs).
//! * [`emu`] — [`EmuDevice`], a `Device` in host memory that runs the *same*
//!   kernel sources compiled as C++ by the host compiler, one fiber per CUDA
//!   thread (barriers for `__syncthreads` and warp shuffles). It lets the
//!   kernels and the whole backend be tested on machines with no GPU.
//! * [`nccl`] — an NCCL communicator for all-reduce between GPUs.
//! * [`ops`] — typed wrappers, one per kernel: shapes checked, launch
//!   configuration chosen, arguments passed in the kernel's order.
//!
//! **Invariant:** nothing else in parallm touches CUDA except this module and
//! the CUDA backend in `framework`, and nothing here panics because a CUDA
//! library or device is absent.

pub mod device;
pub mod emu;
pub mod gpu;
pub mod nccl;
pub mod nvrtc;
pub mod ops;
pub mod probe;

pub use device::{DevBuf, DevPtr, Device, Dtype, Gemm, LaunchCfg};
pub use emu::EmuDevice;
pub use gpu::CudaDevice;

/// Errors of the CUDA layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CUDA library could not be opened.
    #[error("{library} is not available: none of {tried} could be opened ({hint})")]
    Missing {
        /// The library ("the CUDA driver", "NVRTC", …).
        library: &'static str,
        /// The file names tried, comma-separated.
        tried: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// No GPU with the requested ordinal.
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// NVRTC rejected the kernel sources (the log says why).
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile {
        /// The target architecture.
        arch: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A call into CUDA failed.
    #[error("CUDA {call}: {reason}")]
    Call {
        /// The operation.
        call: &'static str,
        /// The library's error.
        reason: String,
    },
    /// A kernel or GEMM was given shapes it cannot take.
    #[error("kernel {kernel}: {reason}")]
    Shape {
        /// The kernel.
        kernel: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The host emulation could not be built or run.
    #[error("CUDA emulation: {0}")]
    Emulation(String),
}

/// Result alias of the CUDA layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn call_err(call: &'static str, e: impl std::fmt::Debug) -> Error {
    Error::Call {
        call,
        reason: format!("{e:?}"),
    }
}

#[cfg(test)]
mod tests;
