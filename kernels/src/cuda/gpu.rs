//! [`CudaDevice`]: a [`Device`] on one GPU through cudarc's driver API, with
//! cuBLAS for the GEMMs.
//!
//! Each `CudaDevice` is one non-blocking stream in the device's primary
//! context, a cuBLAS handle bound to that stream, and the kernel module loaded
//! from the PTX compiled for the device's architecture. Several `CudaDevice`s
//! may share a GPU (one per compute node); their memory is mutually
//! addressable because they share the primary context. Every call makes the
//! context current on the calling thread first, so a node may move between
//! threads.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys as drv_sys};

use super::device::{DevPtr, Device, Gemm, LaunchCfg};
use super::probe::Lib;
use super::{call_err, nvrtc, Error, Result};

/// Number of CUDA devices, after checking that the driver can be opened.
pub fn device_count() -> Result<usize> {
    Lib::Driver.require()?;
    drv::init().map_err(|e| call_err("cuInit", e))?;
    let n = drv::device::get_count().map_err(|e| call_err("cuDeviceGetCount", e))?;
    Ok(n.max(0) as usize)
}

/// Starts (`on`) or stops the collection of a kernel profiler launched
/// with its collection off at start (Nsight Compute's
/// `--profile-from-start off`), around the work queued in between. Needs a
/// context current on the calling thread: call it on the thread that last
/// used a [`CudaDevice`]. Without a profiler attached it does nothing.
pub fn profiler(on: bool) -> Result<()> {
    Lib::Driver.require()?;
    // SAFETY: no arguments; the driver checks for a current context and
    // returns an error without one.
    let (r, call) = unsafe {
        if on {
            (drv_sys::cuProfilerStart(), "cuProfilerStart")
        } else {
            (drv_sys::cuProfilerStop(), "cuProfilerStop")
        }
    };
    r.result().map_err(|e| call_err(call, e))
}

/// One stream on one GPU.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    arch: String,
    ctx: drv_sys::CUcontext,
    stream: drv_sys::CUstream,
    blas: blas_sys::cublasHandle_t,
    module: drv_sys::CUmodule,
    functions: Mutex<HashMap<String, usize>>,
}

// SAFETY: the driver's context, stream, module and cuBLAS handles may be used
// from any thread once the context is current there (every method makes it
// so); cuBLAS handles are not safe for concurrent use, and `&self` methods
// that use the handle are serialized by the caller owning the device's stream
// (one compute node), which the Device contract states.
unsafe impl Send for CudaDevice {}
// SAFETY: see above; the function table is behind a Mutex.
unsafe impl Sync for CudaDevice {}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({} {}, {})",
            self.ordinal, self.name, self.arch
        )
    }
}

impl CudaDevice {
    /// A new stream on GPU `ordinal`, with the kernels compiled for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        Lib::Nvrtc.require()?;
        Lib::Cublas.require()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let dev = drv::device::get(ordinal as i32).map_err(|e| call_err("cuDeviceGet", e))?;
        let name = drv::device::get_name(dev).map_err(|e| call_err("cuDeviceGetName", e))?;
        use drv_sys::CUdevice_attribute as A;
        // SAFETY: `dev` is a valid device handle.
        let (major, minor) = unsafe {
            (
                drv::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                drv::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            )
        };
        let major = major.map_err(|e| call_err("cuDeviceGetAttribute", e))?;
        let minor = minor.map_err(|e| call_err("cuDeviceGetAttribute", e))?;
        let arch = nvrtc::arch_for(major, minor);
        let ptx = nvrtc::ptx(&arch)?;
        // SAFETY: retaining the primary context of a valid device; it is
        // released in Drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(|e| call_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: `ctx` was just retained.
        unsafe { drv::ctx::set_current(ctx) }.map_err(|e| call_err("cuCtxSetCurrent", e))?;
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| call_err("cuStreamCreate", e))?;
        let image = CString::new(ptx.as_str()).map_err(|e| call_err("PTX", e))?;
        // SAFETY: `image` is NUL-terminated PTX text; the context is current.
        let module = unsafe { drv::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| call_err("cuModuleLoadData", e))?;
        let blas = blas::create_handle().map_err(|e| call_err("cublasCreate", e))?;
        // SAFETY: both handles are valid; cuBLAS's stream type is the driver's
        // CUstream under another name.
        unsafe { blas::set_stream(blas, stream as blas_sys::cudaStream_t) }
            .map_err(|e| call_err("cublasSetStream", e))?;
        Ok(Self {
            ordinal,
            name,
            arch,
            ctx,
            stream,
            blas,
            module,
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The architecture the kernels were compiled for (`compute_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The raw stream (for NCCL calls on the same stream).
    pub fn raw_stream(&self) -> drv_sys::CUstream {
        self.stream
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for the life of self.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(|e| call_err("cuCtxSetCurrent", e))
    }

    fn function(&self, name: &str) -> Result<drv_sys::CUfunction> {
        let mut table = self
            .functions
            .lock()
            .map_err(|_| call_err("kernel table", "lock poisoned"))?;
        if let Some(&f) = table.get(name) {
            return Ok(f as drv_sys::CUfunction);
        }
        let cname = CString::new(name).map_err(|e| call_err("kernel name", e))?;
        // SAFETY: the module stays loaded for the life of self.
        let f =
            unsafe { drv::module::get_function(self.module, cname) }.map_err(|e| Error::Call {
                call: "cuModuleGetFunction",
                reason: format!("{name}: {e:?}"),
            })?;
        table.insert(name.to_string(), f as usize);
        Ok(f)
    }

    /// Free and total device memory, bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv::mem_get_info().map_err(|e| call_err("cuMemGetInfo", e))
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        format!("{} (cuda:{})", self.name, self.ordinal)
    }

    fn alloc_raw(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        // SAFETY: the stream is valid; the memory is zeroed before use below.
        let ptr = unsafe { drv::malloc_async(self.stream, bytes) }
            .map_err(|e| call_err("cuMemAllocAsync", e))?;
        self.zero(ptr, bytes)?;
        Ok(ptr)
    }

    unsafe fn free_raw(&self, ptr: DevPtr) {
        if self.bind().is_ok() {
            // SAFETY: the caller guarantees `ptr` came from alloc_raw and is
            // no longer used; freeing is ordered after the stream's work.
            let _ = unsafe { drv::free_async(ptr, self.stream) };
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller owns `dst` for `src.len()` bytes. The copy from
        // pageable memory is staged before the call returns, and we also wait
        // for it so `src` may be dropped at once.
        unsafe {
            drv::memcpy_htod_async(dst, src, self.stream)
                .map_err(|e| call_err("cuMemcpyHtoDAsync", e))?;
            drv::stream::synchronize(self.stream).map_err(|e| call_err("cuStreamSynchronize", e))
        }
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` holds at least `dst.len()` bytes (caller); the stream
        // is synchronized before `dst` is read.
        unsafe {
            drv::memcpy_dtoh_async(dst, src, self.stream)
                .map_err(|e| call_err("cuMemcpyDtoHAsync", e))?;
            drv::stream::synchronize(self.stream).map_err(|e| call_err("cuStreamSynchronize", e))
        }
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges are device memory of at least `bytes` (caller).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream) }
            .map_err(|e| call_err("cuMemcpyDtoDAsync", e))
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least `bytes` (caller).
        unsafe { drv::memset_d8_async(dst, 0, bytes, self.stream) }
            .map_err(|e| call_err("cuMemsetD8Async", e))
    }

    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        // SAFETY: the caller guarantees the parameters match the kernel.
        unsafe { drv::launch_kernel(f, cfg.grid, cfg.block, cfg.shared, self.stream, params) }
            .map_err(|e| Error::Call {
                call: "cuLaunchKernel",
                reason: format!("{name} {cfg:?}: {e:?}"),
            })
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.bind()?;
        g.check()?;
        use blas_sys::cudaDataType_t as T;
        let ab = match g.dtype {
            super::Dtype::F16 => T::CUDA_R_16F,
            super::Dtype::Bf16 => T::CUDA_R_16BF,
        };
        let c_type = if g.c_f32 { T::CUDA_R_32F } else { ab };
        let alpha = 1f32;
        let beta = if g.accumulate { 1f32 } else { 0f32 };
        // Row-major C (m×n) = A (m×k) · Bᵀ is column-major Cᵀ (n×m) =
        // op(B)ᵀ… : cuBLAS sees B as a k×n column-major matrix (transposed)
        // and A as k×m column-major (not transposed).
        // SAFETY: pointers and sizes were checked by the caller's shapes;
        // alpha/beta are host scalars of the compute type (f32).
        unsafe {
            blas::gemm_ex(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                g.b as *const c_void,
                ab,
                g.k as i32,
                g.a as *const c_void,
                ab,
                g.lda as i32,
                (&beta as *const f32).cast(),
                g.c as *mut c_void,
                c_type,
                g.n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| call_err("cublasGemmEx", e))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream is valid.
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(|e| call_err("cuStreamSynchronize", e))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: each handle was created in `new` and is destroyed once; the
        // stream is drained first.
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            let _ = blas::destroy_handle(self.blas);
            let _ = drv::module::unload(self.module);
            let _ = drv::stream::destroy(self.stream);
            if let Ok(dev) = drv::device::get(self.ordinal as i32) {
                let _ = drv::primary_ctx::release(dev);
            }
        }
    }
}
