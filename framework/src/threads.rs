//! Which thread pool a forward pass computes on.
//!
//! Each compute node owns a rayon pool sized from the configuration
//! (`threads_per_node`), so tensor-parallel shards on different cores do not
//! oversubscribe them. A node runs its forward inside [`run_in`]; the
//! kernels then find that pool through [`with_current`] (the quantized GEMM
//! takes the pool explicitly) or through rayon's own notion of the current
//! pool (the f32 GEMM's parallel iterators). Outside any node — the
//! single-shard reference loops, benchmarks, tests — a process-wide pool of
//! [`crate::compute_threads`] threads is used.
//!
//! The current pool is a thread-local set for the duration of [`run_in`] on
//! the pool thread that runs the closure, and restored afterwards.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use rayon::ThreadPool;

use crate::error::{Error, Result};

thread_local! {
    static CURRENT: RefCell<Option<Arc<ThreadPool>>> = const { RefCell::new(None) };
}

/// A pool of `threads` compute threads named `{name}-{i}`.
pub fn pool(name: &str, threads: usize) -> Result<Arc<ThreadPool>> {
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("cannot start {threads} compute threads: {e}")))
}

/// Runs `f` on `pool`, with `pool` as the current pool of the kernels.
pub fn run_in<R: Send>(pool: &Arc<ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let previous = CURRENT.with(|c| c.replace(Some(pool.clone())));
        let result = f();
        CURRENT.with(|c| *c.borrow_mut() = previous);
        result
    })
}

/// The process-wide pool used outside any node.
fn global() -> &'static ThreadPool {
    static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(crate::compute_threads())
            .thread_name(|i| format!("parallm-compute-{i}"))
            .build()
            .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .unwrap_or_else(|e| panic!("cannot start even one compute thread: {e}"))
    })
}

/// Calls `f` with the current pool: the node's inside [`run_in`], else the
/// process-wide one.
pub fn with_current<R>(f: impl FnOnce(&ThreadPool) -> R) -> R {
    let current = CURRENT.with(|c| c.borrow().clone());
    match current {
        Some(pool) => f(&pool),
        None => f(global()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_in_makes_the_pool_current_and_restores_it() {
        let p = pool("test", 2).expect("pool");
        let inside = run_in(&p, || with_current(|c| c.current_num_threads()));
        assert_eq!(inside, 2);
        assert!(CURRENT.with(|c| c.borrow().is_none()));
        let nested = run_in(&p, || {
            let q = pool("inner", 1).expect("pool");
            let n = run_in(&q, || with_current(|c| c.current_num_threads()));
            (n, with_current(|c| c.current_num_threads()))
        });
        assert_eq!(nested, (1, 2));
    }
}
