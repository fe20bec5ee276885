//! Thread-time spent inside the kernels' parallel regions, for profiles.
//!
//! With counting on, every task a parallel kernel hands to a worker (a
//! chunk of a quantized or f32 matmul, a group of attention rows) adds its
//! wall time to one process-wide counter. An op's wall time × its threads,
//! less that busy time, is what the region spent handing work out and
//! waiting. Off by default: one relaxed load per task. The counter is
//! shared by every pool in the process, so it means something only while
//! one node computes (`parallm bench latency --profile`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: AtomicU64 = AtomicU64::new(0);

/// Turns counting on or off.
pub fn set_counting(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Thread-time counted so far.
pub fn busy() -> Duration {
    Duration::from_nanos(NANOS.load(Ordering::Relaxed))
}

/// Runs one task of a parallel region, counting its time when counting is on.
#[inline]
pub(crate) fn task<T>(f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let out = f();
    NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_count_only_while_counting() {
        let before = busy();
        task(|| std::thread::sleep(Duration::from_millis(2)));
        set_counting(true);
        task(|| std::thread::sleep(Duration::from_millis(2)));
        set_counting(false);
        // Other tests' kernels may add to the process-wide counter while it
        // is on, so only the lower bound is certain.
        let counted = busy() - before;
        assert!(counted >= Duration::from_millis(2), "{counted:?}");
    }
}
