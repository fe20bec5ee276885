//! Which compute pool a forward pass runs on.
//!
//! Each compute node owns a [`Pool`] sized from the configuration
//! (`threads_per_node`), so tensor-parallel shards on different cores do not
//! oversubscribe them. A node runs its step inside [`run_in`] on its own
//! thread, which becomes the pool's caller: it computes its share of every
//! parallel region while the pool's helpers, spinning between regions, take
//! the rest (see [`kernels::cpu::pool`]). The kernels find the pool through
//! [`with_current`]. Outside any node — the single-shard reference loops,
//! benchmarks, tests — a process-wide pool of [`crate::compute_threads`]
//! threads is used.
//!
//! candle's own CPU ops (used only for formats parallm has no kernel of its
//! own for) keep their rayon threading on rayon's global pool.

use std::sync::Arc;

pub use kernels::cpu::pool::Pool;

use crate::error::{Error, Result};

/// The compute pool of slot `slot` of `slots` pools of `threads` threads
/// each on this machine (a node's, numbered across the whole engine). With
/// `PARALLM_PIN=1` its threads are pinned, one per CPU, to the slot's share
/// of the CPUs this process may use when all the slots fit; otherwise (and
/// by default) they float. The caller of each region is the thread that
/// runs the step; the helpers are named `{name}-{i}`.
///
/// # Errors
/// If the threads cannot be started, or `PARALLM_SPIN_US` is malformed.
pub fn node_pool(name: &str, threads: usize, slot: usize, slots: usize) -> Result<Arc<Pool>> {
    let threads = threads.max(1);
    let cpus = if kernels::cpu::pool::pin_requested() {
        kernels::cpu::pool::allowed_cpus()
    } else {
        Vec::new()
    };
    let share = if slots.saturating_mul(threads) <= cpus.len() {
        &cpus[slot * threads..(slot + 1) * threads]
    } else {
        &[]
    };
    Pool::pinned(name, threads, share)
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("cannot start {threads} compute threads: {e}")))
}

/// Runs `f` on this thread with `pool` as the current pool of the kernels;
/// when it returns, the pool's helpers are told to rest until the next call.
pub fn run_in<R>(pool: &Arc<Pool>, f: impl FnOnce() -> R) -> R {
    let r = kernels::cpu::pool::enter(pool, f);
    pool.rest();
    r
}

/// Calls `f` with the current pool: the node's inside [`run_in`], else the
/// process-wide one.
pub fn with_current<R>(f: impl FnOnce(&Pool) -> R) -> R {
    kernels::cpu::pool::with_current(f)
}
