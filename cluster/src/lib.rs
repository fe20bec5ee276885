//! parallm across processes and hosts.
//!
//! This crate owns what a job of several processes (MPI ranks) needs beyond
//! one process's engine:
//! * [`placement`]: which rank hosts each compute node and on which host each
//!   rank runs, from the `[cluster]` settings; bad clusters are refused naming
//!   the key.
//! * [`launch`]: the `mpirun` command and hostfile `parallm launch` runs (or,
//!   with `--dry-run`, prints).
//! * [`transport`]: byte messages between ranks under stream addresses, with
//!   aborts and failure; [`transport::Loopback`] runs ranks as threads.
//! * [`collective`]: [`collective::TransportCollective`], a tensor-parallel
//!   group over a transport that sums in rank order, so results are bit for
//!   bit those of the in-process collective.
//! * [`wire`]: the versioned control messages between ranks (postcard), and
//!   the stream each link of a step uses.
//! * `mpi` (feature `mpi`, off by default): the MPI transport, host names,
//!   and the broadcast that carries the NCCL unique id.
//!
//! Without the `mpi` feature everything here builds with Rust alone; the
//! placement, launcher, transports and collectives are tested in-process.

pub mod collective;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod placement;
pub mod transport;
pub mod wire;

use std::sync::Arc;

pub use collective::TransportCollective;
pub use launch::LaunchPlan;
pub use placement::{ClusterSpec, Layout, Mode, Placement, PlacementError};
pub use transport::{AbortHook, Address, Loopback, Transport};

/// Each rank's index among the ranks on its host (`hosts`: every rank's
/// host, in rank order): the GPU ordinal a rank takes, counted from the
/// host's first device.
pub fn local_ranks(hosts: &[String]) -> Vec<usize> {
    hosts
        .iter()
        .enumerate()
        .map(|(r, h)| hosts[..r].iter().filter(|o| *o == h).count())
        .collect()
}

/// Rank `root`'s `bytes` on every rank of `ranks` over `transport` (every
/// listed rank calls it; `bytes` is read on the root only). This is how
/// the NCCL unique id rank 0 creates reaches the ranks of a GPU group: as
/// its bytes, on a stream of its own.
pub fn broadcast_bytes(
    transport: &Arc<dyn Transport>,
    stream: u64,
    root: usize,
    ranks: &[usize],
    bytes: &[u8],
) -> framework::Result<Vec<u8>> {
    let me = transport.rank();
    let at = |to: usize| Address {
        stream,
        from: root as u32,
        to: to as u32,
    };
    if me == root {
        for &r in ranks.iter().filter(|&&r| r != root) {
            transport.send(r, at(r), bytes)?;
        }
        Ok(bytes.to_vec())
    } else {
        transport.recv(root, at(me), None)
    }
}

/// Rank-dependent values (magnitudes from 1e-3 to 1e3) whose sum in f32
/// depends on the order of addition: what the collectives' checks sum, so
/// that a sum in another order shows. For tests and `parallm-mpi-check`.
#[doc(hidden)]
pub fn order_sensitive_values(rank: usize, len: usize, round: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = ((i * 7919 + rank * 104_729 + round * 31) % 1000) as f32;
            (x - 500.0) * 10f32.powi((rank as i32 + i as i32) % 7 - 3)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_count_from_zero_on_each_host() {
        let hosts: Vec<String> = ["a", "b", "a", "a", "b"].map(String::from).into();
        assert_eq!(local_ranks(&hosts), [0, 0, 1, 2, 1]);
    }

    #[test]
    fn a_unique_id_reaches_every_rank_as_its_bytes() {
        // An NCCL unique id is 128 opaque bytes.
        let id: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(37)).collect();
        let world = Loopback::world(3);
        let handles: Vec<_> = world
            .into_iter()
            .map(|t| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let t: Arc<dyn Transport> = t;
                    let mine = if t.rank() == 0 { id } else { Vec::new() };
                    broadcast_bytes(&t, 9, 0, &[0, 1, 2], &mine).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), id);
        }
    }
}
