//! NCCL communicators for all-reduce between the GPUs of one process.
//!
//! [`NcclGroup::new`] creates one communicator per device (`ncclCommInitAll`);
//! rank `r` then sums f32 buffers with its peers on its own stream. NCCL refuses
//! two ranks on one device, so shards that share a GPU use the backend's
//! device-memory collective instead.

use std::ffi::c_void;

use cudarc::nccl::{result as nc, sys as nc_sys};

use super::device::DevPtr;
use super::gpu::CudaDevice;
use super::probe::Lib;
use super::{call_err, Error, Result};

/// One communicator per rank, rank `r` on `devices[r]`.
pub struct NcclGroup {
    comms: Vec<usize>,
    devices: Vec<usize>,
}

// SAFETY: NCCL communicators may be used from any thread; each rank's
// communicator is used by one node at a time (its own stream).
unsafe impl Send for NcclGroup {}
// SAFETY: as above.
unsafe impl Sync for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup(devices {:?})", self.devices)
    }
}

impl NcclGroup {
    /// Communicators for `devices` (distinct GPU ordinals), one rank each.
    pub fn new(devices: &[usize]) -> Result<Self> {
        Lib::Nccl.require()?;
        let mut sorted = devices.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != devices.len() {
            return Err(Error::Shape {
                kernel: "nccl",
                reason: format!("devices {devices:?} repeat a GPU; NCCL takes one rank per GPU"),
            });
        }
        let list: Vec<i32> = devices.iter().map(|&d| d as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device in `list`.
        unsafe { nc::comm_init_all(comms.as_mut_ptr(), list.len() as i32, list.as_ptr()) }
            .map_err(|e| call_err("ncclCommInitAll", e))?;
        Ok(Self {
            comms: comms.into_iter().map(|c| c as usize).collect(),
            devices: devices.to_vec(),
        })
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.comms.len()
    }

    /// Sums `n` f32 values at `buf` over all ranks, in place, on `dev`'s
    /// stream. Every rank must call it with the same `n`.
    ///
    /// # Safety
    /// `buf` holds `n` f32 on `dev`, which is rank `rank`'s device.
    pub unsafe fn all_reduce_sum_f32(
        &self,
        rank: usize,
        dev: &CudaDevice,
        buf: DevPtr,
        n: usize,
    ) -> Result<()> {
        let comm = *self.comms.get(rank).ok_or(Error::Shape {
            kernel: "nccl",
            reason: format!("rank {rank} of {}", self.comms.len()),
        })? as nc_sys::ncclComm_t;
        dev.bind()?;
        // SAFETY: the caller guarantees `buf`; in-place all-reduce is allowed.
        unsafe {
            nc::all_reduce(
                buf as *const c_void,
                buf as *mut c_void,
                n,
                nc_sys::ncclDataType_t::ncclFloat32,
                nc_sys::ncclRedOp_t::ncclSum,
                comm,
                dev.raw_stream() as nc_sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| call_err("ncclAllReduce", e))
    }

    /// Makes every pending and later operation of the group fail (a peer
    /// failed).
    pub fn abort(&self) {
        for &c in &self.comms {
            // SAFETY: each communicator is valid until Drop.
            let _ = unsafe { nc::comm_abort(c as nc_sys::ncclComm_t) };
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: destroyed once, here.
            let _ = unsafe { nc::comm_destroy(c as nc_sys::ncclComm_t) };
        }
    }
}
