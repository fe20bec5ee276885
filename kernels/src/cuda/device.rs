//! The device interface the CUDA backend computes through.
//!
//! A [`Device`] is one stream on one GPU (or the host emulation of one): every
//! operation on it runs in the order it was issued. Memory is addressed by
//! [`DevPtr`] (a device address; in the emulation, a host address) and owned by
//! [`DevBuf`], which frees it on drop. Kernels are launched by name with
//! `cuLaunchKernel`'s convention: an array of pointers to the arguments.

use std::ffi::c_void;
use std::sync::Arc;

use super::{Error, Result};

/// A device address.
pub type DevPtr = u64;

/// The element type of weights and activations on the device. Both are 16-bit
/// (stored as `u16`); kernels accumulate in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// The suffix of this type's kernel names (`rms_norm_f16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Rounds `x` to this type (round to nearest even), as its bits.
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            Dtype::F16 => half::f16::from_f32(x).to_bits(),
            Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }

    /// The value of `bits` in this type.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Dtype::F16 => half::f16::from_bits(bits).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(format!("unknown dtype '{other}' (f16, bf16)")),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

/// A kernel's grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchCfg {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub shared: u32,
}

impl LaunchCfg {
    /// `grid` blocks (1-D) of `block` threads, no dynamic shared memory.
    pub fn linear(grid: u32, block: u32) -> Self {
        Self {
            grid: (grid, 1, 1),
            block: (block, 1, 1),
            shared: 0,
        }
    }
}

/// A matrix product `C = A·Bᵀ (+ C)` with row-major operands:
/// `A` is `m × k` (row stride `lda`), `B` is `n × k` (weights, row stride `k`),
/// `C` is `m × n` (row stride `n`). A and B are `dtype`; C is `dtype` or f32.
/// Accumulation is f32.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    /// Activations.
    pub a: DevPtr,
    /// Row stride of `a`, in elements.
    pub lda: usize,
    /// Weights.
    pub b: DevPtr,
    /// Output.
    pub c: DevPtr,
    /// Rows of A and C.
    pub m: usize,
    /// Rows of B, columns of C.
    pub n: usize,
    /// The shared dimension.
    pub k: usize,
    /// Type of A and B.
    pub dtype: Dtype,
    /// Whether C is f32 (else `dtype`).
    pub c_f32: bool,
    /// Whether to add into C instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// Checks the shapes: every dimension positive and `lda ≥ k`.
    pub fn check(&self) -> Result<()> {
        if self.m == 0 || self.n == 0 || self.k == 0 || self.lda < self.k {
            return Err(Error::Shape {
                kernel: "gemm",
                reason: format!(
                    "m={} n={} k={} lda={}: dimensions must be positive and lda ≥ k",
                    self.m, self.n, self.k, self.lda
                ),
            });
        }
        let max = i32::MAX as usize;
        if self.m > max || self.n > max || self.k > max || self.lda > max {
            return Err(Error::Shape {
                kernel: "gemm",
                reason: "a dimension exceeds cuBLAS's 32-bit range".into(),
            });
        }
        Ok(())
    }
}

/// One stream on one device.
pub trait Device: Send + Sync {
    /// A short description ("NVIDIA H100 80GB HBM3 (0)", "emulated").
    fn name(&self) -> String;
    /// Allocates `bytes` of device memory, zero-filled.
    fn alloc_raw(&self, bytes: usize) -> Result<DevPtr>;
    /// Frees memory from [`Device::alloc_raw`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_raw` on this device and is not used afterwards.
    unsafe fn free_raw(&self, ptr: DevPtr);
    /// Copies `src` to device address `dst` (ordered on the stream; returns
    /// when `src` may be reused).
    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies `dst.len()` bytes from device address `src` (waits for the
    /// stream's earlier work).
    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Copies `bytes` between device addresses, on the stream.
    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Sets `bytes` at `dst` to zero, on the stream.
    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()>;
    /// Launches kernel `name` (from the compiled sources) on the stream.
    ///
    /// # Safety
    /// `params` must point to the kernel's arguments, in order and of the
    /// kernel's types, and every device address among them must be valid for
    /// what the kernel reads and writes.
    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()>;
    /// Runs a matrix product on the stream.
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Waits until everything issued so far has finished.
    fn synchronize(&self) -> Result<()>;
}

/// Device memory owned by a [`Device`], freed on drop.
pub struct DevBuf {
    ptr: DevPtr,
    bytes: usize,
    device: Arc<dyn Device>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DevBuf {
    /// `bytes` of zeroed memory on `device`.
    pub fn zeroed(device: &Arc<dyn Device>, bytes: usize) -> Result<Self> {
        // A zero-byte allocation still gets a distinct, valid address.
        let ptr = device.alloc_raw(bytes.max(1))?;
        Ok(Self {
            ptr,
            bytes,
            device: device.clone(),
        })
    }

    /// A copy of `data` on `device`.
    pub fn from_bytes(device: &Arc<dyn Device>, data: &[u8]) -> Result<Self> {
        let buf = Self::zeroed(device, data.len())?;
        device.upload(buf.ptr, data)?;
        Ok(buf)
    }

    /// A copy of `data` (any plain numeric type) on `device`.
    pub fn from_slice<T: Pod>(device: &Arc<dyn Device>, data: &[T]) -> Result<Self> {
        Self::from_bytes(device, as_bytes(data))
    }

    /// The device address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> DevPtr {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Overwrites the start of the buffer with `data`.
    pub fn write<T: Pod>(&self, data: &[T]) -> Result<()> {
        let b = as_bytes(data);
        if b.len() > self.bytes {
            return Err(Error::Shape {
                kernel: "upload",
                reason: format!("{} bytes into a {}-byte buffer", b.len(), self.bytes),
            });
        }
        self.device.upload(self.ptr, b)
    }

    /// Reads `len` elements from the start of the buffer.
    pub fn read<T: Pod>(&self, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        let bytes = std::mem::size_of_val(out.as_slice());
        if bytes > self.bytes {
            return Err(Error::Shape {
                kernel: "download",
                reason: format!("{bytes} bytes from a {}-byte buffer", self.bytes),
            });
        }
        self.device.download(self.ptr, as_bytes_mut(&mut out))?;
        Ok(out)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: the address came from this device's alloc_raw and DevBuf is
        // its only owner.
        unsafe { self.device.free_raw(self.ptr) }
    }
}

/// Plain numeric types that may be copied to and from device memory as bytes.
///
/// # Safety
/// Implementors have no padding and every bit pattern is a valid value.
pub unsafe trait Pod: Copy + Default + 'static {}
// SAFETY: primitive numbers: no padding, every bit pattern valid.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for i32 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}

/// The bytes of a slice of plain numbers.
pub fn as_bytes<T: Pod>(data: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding), so its memory is initialized bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
}

/// The bytes of a mutable slice of plain numbers.
pub fn as_bytes_mut<T: Pod>(data: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod: any bytes written form valid values.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), std::mem::size_of_val(data)) }
}
