//! Which CUDA libraries this process can open.
//!
//! cudarc opens each library on first use and panics if it cannot; these
//! probes try the same file names first (cudarc's own candidate list), so a
//! missing library becomes an [`Error::Missing`] instead. Results are cached:
//! the dynamic loader's search path does not change within a process.

use std::sync::OnceLock;

use super::{Error, Result};

/// A CUDA library parallm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lib {
    /// The driver (`libcuda`): devices, memory, streams, kernel launches.
    Driver,
    /// The run-time compiler (`libnvrtc`): kernel sources to PTX. Needs no GPU.
    Nvrtc,
    /// cuBLAS: the GEMMs.
    Cublas,
    /// NCCL: all-reduce between GPUs.
    Nccl,
}

impl Lib {
    /// Every library.
    pub const ALL: [Lib; 4] = [Lib::Driver, Lib::Nvrtc, Lib::Cublas, Lib::Nccl];

    fn stem(self) -> &'static str {
        match self {
            Lib::Driver => "cuda",
            Lib::Nvrtc => "nvrtc",
            Lib::Cublas => "cublas",
            Lib::Nccl => "nccl",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Lib::Driver => "the CUDA driver (libcuda)",
            Lib::Nvrtc => "NVRTC (libnvrtc)",
            Lib::Cublas => "cuBLAS (libcublas)",
            Lib::Nccl => "NCCL (libnccl)",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Lib::Driver => "install the NVIDIA driver; a machine without a GPU cannot run the CUDA backend",
            Lib::Nvrtc => "install the CUDA toolkit or the nvidia-cuda-nvrtc Python package and put its lib directory on LD_LIBRARY_PATH",
            Lib::Cublas => "install the CUDA toolkit or the nvidia-cublas Python package and put its lib directory on LD_LIBRARY_PATH",
            Lib::Nccl => "install NCCL and put the directory holding libnccl.so on LD_LIBRARY_PATH (pip's nvidia-nccl ships only libnccl.so.2: add a libnccl.so link to it)",
        }
    }

    /// The file names tried, in order.
    pub fn candidates(self) -> Vec<String> {
        let mut names = cudarc::get_lib_name_candidates(self.stem());
        if self == Lib::Driver {
            names.extend(cudarc::get_lib_name_candidates("nvcuda"));
        }
        names
    }

    /// Whether the library can be opened.
    pub fn present(self) -> bool {
        static FOUND: [OnceLock<bool>; 4] = [const { OnceLock::new() }; 4];
        *FOUND[self as usize].get_or_init(|| {
            self.candidates().iter().any(|name| {
                // SAFETY: opening a CUDA library runs its initializers, the
                // same ones cudarc would run when it opens it itself.
                unsafe { libloading::Library::new(name) }.is_ok()
            })
        })
    }

    /// `Ok` if the library can be opened, else an error naming it, the file
    /// names tried and what to do.
    pub fn require(self) -> Result<()> {
        if self.present() {
            Ok(())
        } else {
            Err(Error::Missing {
                library: self.describe(),
                tried: self.candidates().join(", "),
                hint: self.hint(),
            })
        }
    }
}

/// A one-line summary of what is present, for logs and skip messages.
pub fn summary() -> String {
    Lib::ALL
        .iter()
        .map(|l| format!("{}: {}", l.stem(), if l.present() { "yes" } else { "no" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why GPU work cannot run here, or `None` if a GPU is usable: the driver,
/// NVRTC and cuBLAS open and the driver reports at least one device.
pub fn gpu_unavailable() -> Option<String> {
    for lib in [Lib::Driver, Lib::Nvrtc, Lib::Cublas] {
        if let Err(e) = lib.require() {
            return Some(e.to_string());
        }
    }
    match super::gpu::device_count() {
        Ok(0) => Some("the CUDA driver reports no devices".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}
