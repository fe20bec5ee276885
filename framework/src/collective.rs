//! Collectives: how tensor-parallel shards combine their partial results.
//!
//! The forward pass calls [`Collective::all_reduce_sum`] twice per layer (after
//! the row-parallel attention output and FFN down projections) plus once for the
//! vocab-parallel embedding, and gathers the vocab-parallel logits once: to
//! rank 0 only in the engine's steps ([`Collective::gather_cols_to_root`]),
//! to every rank otherwise ([`Collective::all_gather_cols`]). The layer loop
//! sums device buffers through its backend
//! ([`crate::backend::Backend::all_reduce`]): the CPU backend calls this host
//! collective; the CUDA backend sums on the device (NCCL, or a
//! same-GPU sum that uses this collective only for its barriers).
//! Implementations:
//!
//! * [`SingleCollective`]: world size 1; every operation is the identity. The
//!   unsharded model runs the same code as the sharded one through it.
//! * [`ThreadCollective`]: ranks are threads of one process. Each rank publishes
//!   its buffer into its own slot; after a barrier every rank sums the slots in
//!   rank order, so all ranks get bit-identical results and the sum does not depend
//!   on thread timing. Every rank must call the same operations in the same order.
//!   A rank that fails calls [`Collective::abort`]: every peer waiting in (or
//!   later entering) an operation of that group gets an error instead of
//!   waiting forever. An aborted group stays aborted; the next step uses a new one.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

/// Communication among the tensor-parallel ranks of one model replica.
pub trait Collective: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Makes every current and future operation of the group fail, so that peers
    /// of a failed rank return instead of waiting for it.
    fn abort(&self) {}
    /// Returns once every rank has called it (or fails if the group aborted).
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [])
    }
    /// Gathers column blocks: `local` is `rows × local_cols` (this rank's columns
    /// `col_offset..col_offset+local_cols` of a `rows × total_cols` matrix); returns
    /// the whole matrix on every rank.
    fn all_gather_cols(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Vec<f32>> {
        let mut full = vec![0f32; rows * total_cols];
        place_cols(&mut full, local, rows, col_offset, total_cols);
        // Ranks own disjoint columns, so a sum places every block exactly once.
        self.all_reduce_sum(&mut full)?;
        Ok(full)
    }
    /// Gathers column blocks as [`Collective::all_gather_cols`] does, but to
    /// rank 0 only: it gets `Some` of the whole matrix, every other rank
    /// `None`. Every rank must call it.
    fn gather_cols_to_root(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Option<Vec<f32>>> {
        let full = self.all_gather_cols(local, rows, col_offset, total_cols)?;
        Ok((self.rank() == 0).then_some(full))
    }
}

/// Writes `local` (`rows × local.len()/rows`) into columns `col_offset..` of
/// `full` (`rows × total_cols`). The block must fit: `col_offset` plus its
/// columns at most `total_cols`, and `full` that large.
pub fn place_cols(
    full: &mut [f32],
    local: &[f32],
    rows: usize,
    col_offset: usize,
    total_cols: usize,
) {
    let local_cols = local.len().checked_div(rows).unwrap_or(0);
    for r in 0..rows {
        full[r * total_cols + col_offset..][..local_cols]
            .copy_from_slice(&local[r * local_cols..][..local_cols]);
    }
}

/// A collective that counts the time its operations take (waiting for peers
/// included): the per-step collective metric of a node, and the
/// collectives' row of a step profile. Every operation is forwarded to the
/// inner collective's own implementation, so a direct gather stays direct.
pub struct TimedCollective<'a> {
    inner: &'a dyn Collective,
    nanos: std::sync::atomic::AtomicU64,
}

impl<'a> TimedCollective<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn Collective) -> Self {
        Self {
            inner,
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Time spent in the collective so far.
    pub fn spent(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.nanos.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Seconds spent in the collective so far.
    pub fn seconds(&self) -> f64 {
        self.spent().as_secs_f64()
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let out = f();
        self.nanos.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        out
    }
}

impl Collective for TimedCollective<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.timed(|| self.inner.all_reduce_sum(buf))
    }
    fn abort(&self) {
        self.inner.abort()
    }
    fn barrier(&self) -> Result<()> {
        self.timed(|| self.inner.barrier())
    }
    fn all_gather_cols(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Vec<f32>> {
        self.timed(|| {
            self.inner
                .all_gather_cols(local, rows, col_offset, total_cols)
        })
    }
    fn gather_cols_to_root(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Option<Vec<f32>>> {
        self.timed(|| {
            self.inner
                .gather_cols_to_root(local, rows, col_offset, total_cols)
        })
    }
}

/// The collective of a world of one: nothing to combine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleCollective;

impl Collective for SingleCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// A barrier whose waiters can be released with an error.
struct AbortableBarrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

impl AbortableBarrier {
    fn new(n: usize) -> Self {
        Self {
            n,
            state: Mutex::new(BarrierState::default()),
            cv: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<()> {
        let mut s = self.state.lock().map_err(|_| poisoned())?;
        if s.aborted {
            return Err(aborted());
        }
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let generation = s.generation;
        while s.generation == generation && !s.aborted {
            s = self.cv.wait(s).map_err(|_| poisoned())?;
        }
        if s.generation == generation {
            return Err(aborted());
        }
        Ok(())
    }

    fn abort(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.aborted = true;
        }
        self.cv.notify_all();
    }
}

struct ThreadGroup {
    barrier: AbortableBarrier,
    slots: Vec<Mutex<Vec<f32>>>,
    /// Each rank's first column in a gather to the root.
    col_offsets: Vec<Mutex<usize>>,
}

/// One rank's handle on an in-process group of threads.
#[derive(Clone)]
pub struct ThreadCollective {
    rank: usize,
    group: Arc<ThreadGroup>,
}

impl std::fmt::Debug for ThreadCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.group.slots.len())
            .finish()
    }
}

impl ThreadCollective {
    /// Handles for every rank of a new group of `world_size` threads.
    pub fn group(world_size: usize) -> Vec<ThreadCollective> {
        let group = Arc::new(ThreadGroup {
            barrier: AbortableBarrier::new(world_size),
            slots: (0..world_size).map(|_| Mutex::new(Vec::new())).collect(),
            col_offsets: (0..world_size).map(|_| Mutex::new(0)).collect(),
        });
        (0..world_size)
            .map(|rank| ThreadCollective {
                rank,
                group: group.clone(),
            })
            .collect()
    }
}

fn poisoned() -> Error {
    Error::Collective("a peer rank panicked during an all-reduce".into())
}

fn aborted() -> Error {
    Error::Aborted("a peer rank failed during a collective".into())
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.slots.len()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let g = &self.group;
        if g.slots.len() == 1 {
            return Ok(());
        }
        {
            let mut slot = g.slots[self.rank].lock().map_err(|_| poisoned())?;
            slot.clear();
            slot.extend_from_slice(buf);
        }
        g.barrier.wait()?;
        buf.fill(0.0);
        for (r, slot) in g.slots.iter().enumerate() {
            let slot = slot.lock().map_err(|_| poisoned())?;
            if slot.len() != buf.len() {
                return Err(Error::Collective(format!(
                    "rank {r} contributed {} values, rank {} expected {}",
                    slot.len(),
                    self.rank,
                    buf.len()
                )));
            }
            for (b, s) in buf.iter_mut().zip(slot.iter()) {
                *b += s;
            }
        }
        // Nobody may overwrite a slot before every rank has read all of them.
        g.barrier.wait()
    }

    fn gather_cols_to_root(
        &self,
        local: &[f32],
        rows: usize,
        col_offset: usize,
        total_cols: usize,
    ) -> Result<Option<Vec<f32>>> {
        let g = &self.group;
        if g.slots.len() == 1 {
            return SingleCollective.gather_cols_to_root(local, rows, col_offset, total_cols);
        }
        if self.rank != 0 {
            {
                let mut slot = g.slots[self.rank].lock().map_err(|_| poisoned())?;
                slot.clear();
                slot.extend_from_slice(local);
                *g.col_offsets[self.rank].lock().map_err(|_| poisoned())? = col_offset;
            }
            g.barrier.wait()?;
            // The root reads the slots before anyone writes them again.
            g.barrier.wait()?;
            return Ok(None);
        }
        let mut full = vec![0f32; rows * total_cols];
        place_cols(&mut full, local, rows, col_offset, total_cols);
        g.barrier.wait()?;
        for r in 1..g.slots.len() {
            let slot = g.slots[r].lock().map_err(|_| poisoned())?;
            let offset = *g.col_offsets[r].lock().map_err(|_| poisoned())?;
            let cols = slot.len().checked_div(rows).unwrap_or(0);
            if slot.len() != rows * cols || offset + cols > total_cols {
                return Err(Error::Collective(format!(
                    "rank {r} contributed {} values at column {offset}; {rows} rows of at most {total_cols} columns expected",
                    slot.len()
                )));
            }
            place_cols(&mut full, &slot, rows, offset, total_cols);
        }
        g.barrier.wait()?;
        Ok(Some(full))
    }

    fn abort(&self) {
        self.group.barrier.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_releases_waiting_peers() {
        let handles = ThreadCollective::group(3);
        std::thread::scope(|s| {
            let waiters: Vec<_> = handles[..2]
                .iter()
                .map(|h| s.spawn(move || h.all_reduce_sum(&mut [1.0])))
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(20));
            handles[2].abort();
            for w in waiters {
                assert!(w.join().unwrap().is_err());
            }
        });
        assert!(
            handles[2].all_reduce_sum(&mut [1.0]).is_err(),
            "stays aborted"
        );
    }

    #[test]
    fn gather_to_root_places_uneven_blocks_on_rank_zero_only() {
        // Columns 0..2 on rank 0, 2..3 on rank 1, 3..6 on rank 2; two rows.
        let blocks = [(0usize, 2usize), (2, 1), (3, 3)];
        let handles = ThreadCollective::group(3);
        let got: Vec<Vec<Option<Vec<f32>>>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .iter()
                .map(|h| {
                    s.spawn(move || {
                        let (offset, cols) = blocks[h.rank()];
                        // Twice, so a slot is reused.
                        (0..2)
                            .map(|round| {
                                let local: Vec<f32> = (0..2 * cols)
                                    .map(|i| {
                                        let (r, c) = (i / cols, i % cols);
                                        (round * 100 + r * 10 + offset + c) as f32
                                    })
                                    .collect();
                                h.gather_cols_to_root(&local, 2, offset, 6).unwrap()
                            })
                            .collect()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (rank, rounds) in got.iter().enumerate() {
            for (round, full) in rounds.iter().enumerate() {
                if rank == 0 {
                    let want: Vec<f32> = (0..12)
                        .map(|i| (round * 100 + (i / 6) * 10 + i % 6) as f32)
                        .collect();
                    assert_eq!(full.as_deref(), Some(&want[..]), "round {round}");
                } else {
                    assert!(full.is_none(), "rank {rank} round {round}");
                }
            }
        }
        assert_eq!(
            SingleCollective
                .gather_cols_to_root(&[1.0, 2.0], 1, 0, 2)
                .unwrap(),
            Some(vec![1.0, 2.0])
        );
    }

    #[test]
    fn thread_group_sums_in_rank_order() {
        let handles = ThreadCollective::group(3);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .iter()
                .map(|h| {
                    s.spawn(move || {
                        let mut v = vec![h.rank() as f32 + 1.0; 5];
                        h.all_reduce_sum(&mut v).unwrap();
                        let full = h.all_gather_cols(&[h.rank() as f32; 2], 2, h.rank(), 3);
                        (v, full.unwrap())
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| {
                    let (v, full) = j.join().unwrap();
                    assert_eq!(full, vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
                    v
                })
                .collect()
        });
        for v in results {
            assert_eq!(v, vec![6.0; 5]);
        }
    }
}
