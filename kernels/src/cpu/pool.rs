//! The compute pool a node's step runs on: threads that spin between the
//! parallel regions of a step instead of sleeping.
//!
//! A [`Pool`] of `threads` threads is the calling thread plus `threads - 1`
//! helpers that live as long as the pool. [`Pool::run`] hands out one
//! region: `tasks` indices, claimed one at a time from a shared countdown by
//! the caller and the helpers alike, so a helper that arrives late finds the
//! work already done rather than holding the step up. A region allocates
//! nothing and boxes nothing; the closure is lent to the helpers by
//! reference for the region's duration.
//!
//! What is true of it:
//! * Between regions, helpers spin (with `pause`) on the countdown. They park
//!   on a condition variable only after [`spin`](Pool::with_spin) time has
//!   passed without work, at once after [`Pool::rest`] (the step ended), and
//!   always while more pool threads are awake in the process than it has
//!   CPUs (spinning would then hold a CPU that another pool's thread needs).
//!   The caller wakes parked helpers when it publishes work, and starts on
//!   the work itself meanwhile.
//! * [`Pool::run`] returns only when every task of its region has finished,
//!   so nothing a task borrowed outlives it. A task's panic is carried to the
//!   caller and resumed there once the region is complete.
//! * A region started from inside a task (a nested region), or while another
//!   thread is running a region on the same pool, runs serially on the
//!   calling thread: same results, no deadlock.
//! * A node's pool may be [pinned](Pool::pinned): each thread to its own
//!   CPU, the caller's thread when it [`enter`]s, where the OS allows
//!   (`PARALLM_PIN=1`; off by default, see [`PIN_ENV`]).
//! * [`with_current`] gives the kernels the pool of the node whose step is
//!   running on this thread ([`enter`]), else a process-wide one.
//!
//! Every task runs inside `crate::cpu::busy::task`, so profiles count the
//! threads' busy time.

use std::any::Any;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks, unless `PARALLM_SPIN_US`
/// says otherwise.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// Environment variable: an idle helper's spin time in microseconds.
pub const SPIN_ENV: &str = "PARALLM_SPIN_US";

/// Environment variable: `1` pins each node's compute threads to CPUs of
/// their own. Off by default: on the 2-vCPU Xeon VM it was measured to cost
/// 10–13% of batch-1 decode speed (docs/benchmarks.md).
pub const PIN_ENV: &str = "PARALLM_PIN";

/// Whether `PARALLM_PIN` asks for pinned node pools.
pub fn pin_requested() -> bool {
    std::env::var(PIN_ENV).is_ok_and(|v| v.trim() == "1")
}

/// A task's closure, its lifetime erased for the duration of one region.
type Job = *const (dyn Fn(usize) + Sync + 'static);

/// What the caller and the helpers share.
struct Shared {
    /// Tasks of the current region not yet claimed; a claim takes index
    /// `remaining - 1`.
    remaining: AtomicUsize,
    /// Tasks of the current region finished.
    done: AtomicUsize,
    /// The current region's closure: written by the caller only while no
    /// task is claimed or running, read by a thread only after it claimed a
    /// task of the region.
    job: UnsafeCell<Job>,
    /// The first panic of the current region.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Set by [`Pool::rest`]: idle helpers park without spinning.
    resting: AtomicBool,
    /// Helpers parked or about to park.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    spin: Duration,
}

// SAFETY: `job` is the only field that is not Sync by itself. It is written
// by the caller of `run` between regions, when no task is claimed or running
// (every claim of the previous region finished, which `done` shows with
// Acquire/Release ordering), and read by a thread only after it claimed a
// task of the current region with an Acquire compare-exchange on
// `remaining`, which the caller's Release store of `remaining` published
// after writing `job`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// Pool threads in the process that are not parked: helpers spinning or
/// working, and callers inside a region.
static AWAKE: AtomicUsize = AtomicUsize::new(0);

/// Whether more pool threads are awake than the process has CPUs: then a
/// spinning thread would hold a CPU another pool's thread needs, so idle
/// helpers park at once and callers yield while they wait.
fn oversubscribed() -> bool {
    static CPUS: OnceLock<usize> = OnceLock::new();
    let cpus = *CPUS.get_or_init(|| {
        let n = allowed_cpus().len();
        if n > 0 {
            n
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    });
    AWAKE.load(Ordering::Relaxed) > cpus
}

thread_local! {
    /// Whether this thread is running a task of some pool's region.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// The pool of the step running on this thread (see [`enter`]).
    static CURRENT: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
}

/// A compute pool: the calling thread plus `threads - 1` spinning helpers.
pub struct Pool {
    shared: Arc<Shared>,
    /// Held by the thread running a region.
    region: Mutex<()>,
    helpers: Vec<JoinHandle<()>>,
    threads: usize,
    /// The CPU the calling thread is pinned to on [`enter`], if pinned.
    caller_cpu: Option<usize>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .field("spin", &self.shared.spin)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` threads (at least one): the caller of each
    /// region and `threads - 1` helpers named `{name}-{i}`, which spin for
    /// `PARALLM_SPIN_US` (default [`DEFAULT_SPIN`]) before parking.
    ///
    /// # Errors
    /// If a helper thread cannot be started, or `PARALLM_SPIN_US` is not a
    /// number of microseconds.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        Self::pinned(name, threads, &[])
    }

    /// [`Pool::new`] with an explicit idle spin time.
    ///
    /// # Errors
    /// If a helper thread cannot be started.
    pub fn with_spin(name: &str, threads: usize, spin: Duration) -> std::io::Result<Self> {
        Self::build(name, threads, spin, None)
    }

    /// [`Pool::new`] with its threads pinned, one each, to `cpus[0..threads]`
    /// (the caller's thread when it [`enter`]s the pool, then the helpers),
    /// where the OS allows. With fewer CPUs than threads nothing is pinned.
    ///
    /// # Errors
    /// As [`Pool::new`].
    pub fn pinned(name: &str, threads: usize, cpus: &[usize]) -> std::io::Result<Self> {
        let spin = spin_setting(std::env::var(SPIN_ENV).ok().as_deref())?;
        let threads = threads.max(1);
        let cpus = (cpus.len() >= threads).then(|| &cpus[..threads]);
        Self::build(name, threads, spin, cpus)
    }

    fn build(
        name: &str,
        threads: usize,
        spin: Duration,
        cpus: Option<&[usize]>,
    ) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            remaining: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(std::ptr::null::<fn(usize)>() as Job),
            panic: Mutex::new(None),
            resting: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            spin,
        });
        let mut pool = Self {
            shared: shared.clone(),
            region: Mutex::new(()),
            helpers: Vec::with_capacity(threads - 1),
            threads,
            caller_cpu: cpus.map(|c| c[0]),
        };
        for i in 1..threads {
            let shared = shared.clone();
            let cpu = cpus.map(|c| c[i]);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    helper(&shared)
                })?;
            // On an early return `pool` is dropped, which stops the helpers
            // started so far.
            pool.helpers.push(handle);
        }
        Ok(pool)
    }

    /// Threads that compute a region, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0)`, …, `f(tasks - 1)` on the caller and the helpers, and
    /// returns when all have finished. Tasks may run in any order and on any
    /// of the threads. A panic in a task is resumed here, after the others
    /// finished.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        let serial = || {
            for i in 0..tasks {
                crate::cpu::busy::task(|| f(i));
            }
        };
        if tasks == 1 || self.threads == 1 || IN_TASK.with(Cell::get) {
            return serial();
        }
        // A region's panic is resumed after its guard is dropped, so the
        // lock is never poisoned; were it, the pool would still be sound.
        let region = match self.region.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return serial(),
        };
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. No thread dereferences the
        // pointer after this region ends: threads claim tasks only while
        // `remaining > 0`, and this function returns only once every claimed
        // task has finished (`done == tasks`) and nothing is left to claim.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no task is claimed or running (the previous region ended
        // with `remaining == 0` and `done` equal to its tasks, and we hold
        // `region`), so no other thread reads `job` now; see `Shared`.
        unsafe { *s.job.get() = job };
        s.done.store(0, Ordering::Relaxed);
        s.resting.store(false, Ordering::Relaxed);
        AWAKE.fetch_add(1, Ordering::Relaxed);
        s.remaining.store(tasks, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s);
        // Wait for the helpers' last tasks. A helper the OS took off its
        // core may need this core back, so after a while stop spinning.
        let start = Instant::now();
        let patience = if oversubscribed() {
            Duration::ZERO
        } else {
            s.spin.max(Duration::from_micros(50))
        };
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < tasks {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() >= patience {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        AWAKE.fetch_sub(1, Ordering::Relaxed);
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(region);
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }

    /// `f(i, &mut items[i])` for every item, as one region.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
        let base = SendPtr(items.as_mut_ptr());
        self.run(items.len(), &|i| {
            // SAFETY: `run` calls each index below `items.len()` exactly
            // once, so every `&mut` made here is to a distinct element, and
            // all of them end before `run` returns, while `items` is borrowed.
            let item = unsafe { &mut *base.get().add(i) };
            f(i, item)
        });
    }

    /// `f(c, chunk)` for the chunks of `chunk` elements of `data` (the last
    /// one shorter), as one region.
    ///
    /// # Panics
    /// If `chunk == 0`.
    pub fn chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(chunk > 0, "chunks of zero elements");
        let len = data.len();
        let base = SendPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|c| {
            let start = c * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunk `c` is elements `start..start + n` of `data`,
            // disjoint from every other chunk; `run` calls each `c` once and
            // returns before the borrow of `data` ends.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(c, part)
        });
    }

    /// Tells the helpers that no region follows soon (a step ended): they
    /// park as soon as they are idle instead of spinning.
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::Relaxed);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            // A helper never panics (tasks are caught); nothing to report.
            let _ = h.join();
        }
    }
}

/// The idle spin time a `PARALLM_SPIN_US` value gives (unset: the default).
fn spin_setting(value: Option<&str>) -> std::io::Result<Duration> {
    let Some(v) = value else {
        return Ok(DEFAULT_SPIN);
    };
    v.trim()
        .parse::<u64>()
        .map(Duration::from_micros)
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{SPIN_ENV}={v:?} is not a whole number of microseconds"),
            )
        })
}

/// A raw pointer the region's tasks share (each uses a disjoint part).
struct SendPtr<T>(*mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointer is used only by `for_each_mut` / `chunks_mut`, whose
// tasks touch disjoint elements of a `T: Send` slice.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Claims and runs tasks of the current region until none is left.
fn work(s: &Shared) {
    let mut r = s.remaining.load(Ordering::Acquire);
    while r > 0 {
        match s
            .remaining
            .compare_exchange_weak(r, r - 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: we claimed task `r - 1` of the current region, so
                // its caller is inside `run` (it waits for this task) and
                // `job` holds its closure; see `Shared`.
                let f = unsafe { &**s.job.get() };
                let was = IN_TASK.with(|t| t.replace(true));
                let result = catch_unwind(AssertUnwindSafe(|| crate::cpu::busy::task(|| f(r - 1))));
                IN_TASK.with(|t| t.set(was));
                if let Err(p) = result {
                    let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(p);
                }
                s.done.fetch_add(1, Ordering::Release);
                r = s.remaining.load(Ordering::Acquire);
            }
            Err(now) => r = now,
        }
    }
}

/// A helper thread: spin for work, run it, park when idle long enough.
fn helper(s: &Shared) {
    AWAKE.fetch_add(1, Ordering::Relaxed);
    helper_loop(s);
    AWAKE.fetch_sub(1, Ordering::Relaxed);
}

fn helper_loop(s: &Shared) {
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) == 0 {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64)
                && (s.resting.load(Ordering::Relaxed)
                    || idle.elapsed() >= s.spin
                    || oversubscribed())
            {
                park(s);
                if s.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                break;
            }
            std::hint::spin_loop();
        }
        work(s);
    }
}

/// Sleeps until the caller publishes work or the pool shuts down.
fn park(s: &Shared) {
    AWAKE.fetch_sub(1, Ordering::Relaxed);
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    while s.remaining.load(Ordering::SeqCst) == 0 && !s.shutdown.load(Ordering::SeqCst) {
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    drop(g);
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
    AWAKE.fetch_add(1, Ordering::Relaxed);
}

/// The process-wide pool used outside any node: [`candle_core::utils::get_num_threads`]
/// threads.
fn global() -> &'static Pool {
    static GLOBAL: OnceLock<Pool> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let threads = candle_core::utils::get_num_threads();
        Pool::new("parallm-compute", threads)
            .or_else(|_| Pool::with_spin("parallm-compute", threads, DEFAULT_SPIN))
            .or_else(|_| Pool::with_spin("parallm-compute", 1, DEFAULT_SPIN))
            .unwrap_or_else(|e| panic!("cannot start even one compute thread: {e}"))
    })
}

/// The CPUs this process may run on, in order (empty where unknown).
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain bits; sched_getaffinity writes at most
        // the size it is given into it.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Vec::new();
            }
            set
        };
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE, inside the set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }
    #[cfg(not(target_os = "linux"))]
    Vec::new()
}

/// Pins the calling thread to `cpu`; false where the OS refuses (or is not
/// Linux), which leaves the thread where it was.
fn pin_to(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET sets a bit
        // below CPU_SETSIZE; sched_setaffinity reads the set it is given.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

thread_local! {
    /// The CPU this thread was pinned to by [`enter`].
    static PINNED: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` on this thread with `pool` as the current pool of the kernels
/// (restored afterwards), so that this thread is the pool's caller. A
/// pinned pool pins this thread to its first CPU (once).
pub fn enter<R>(pool: &Arc<Pool>, f: impl FnOnce() -> R) -> R {
    if let Some(cpu) = pool.caller_cpu {
        if PINNED.with(Cell::get) != Some(cpu) && pin_to(cpu) {
            PINNED.with(|p| p.set(Some(cpu)));
        }
    }
    struct Restore(Option<Arc<Pool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(pool.clone()))));
    f()
}

/// Calls `f` with the current pool: the one [`enter`]ed on this thread, else
/// the process-wide one.
pub fn with_current<R>(f: impl FnOnce(&Pool) -> R) -> R {
    let current = CURRENT.with(|c| c.borrow().clone());
    match current {
        Some(pool) => f(&pool),
        None => f(global()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_per_region() {
        for spin in [Duration::ZERO, Duration::from_micros(200)] {
            let pool = Pool::with_spin("t", 3, spin).expect("pool");
            for tasks in [1, 2, 3, 7, 64] {
                for _ in 0..200 {
                    let hits: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
                    pool.run(tasks, &|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                }
            }
        }
    }

    #[test]
    fn helpers_take_part() {
        let pool = Pool::with_spin("t", 2, Duration::from_millis(50)).expect("pool");
        let main = std::thread::current().id();
        let other = AtomicU64::new(0);
        for _ in 0..100 {
            pool.run(8, &|_| {
                std::thread::sleep(Duration::from_micros(200));
                if std::thread::current().id() != main {
                    other.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        assert!(
            other.load(Ordering::Relaxed) > 0,
            "no task ran on the helper"
        );
    }

    #[test]
    fn parked_helpers_wake_for_work() {
        let pool = Pool::with_spin("t", 4, Duration::ZERO).expect("pool");
        pool.rest();
        std::thread::sleep(Duration::from_millis(5));
        let mut out = vec![0usize; 1000];
        pool.chunks_mut(&mut out, 7, |c, part| part.iter_mut().for_each(|x| *x = c));
        assert!(out.iter().enumerate().all(|(i, &x)| x == i / 7));
        let mut items: Vec<usize> = (0..50).collect();
        pool.for_each_mut(&mut items, |i, x| *x += i);
        assert!(items.iter().enumerate().all(|(i, &x)| x == 2 * i));
    }

    #[test]
    fn nested_and_concurrent_regions_run_serially() {
        let pool = Arc::new(Pool::with_spin("t", 2, Duration::from_micros(100)).expect("pool"));
        let sum = AtomicU64::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|j| {
                sum.fetch_add(j as u64 + 1, Ordering::Relaxed);
            })
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4 * 6);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    let n = AtomicU64::new(0);
                    for _ in 0..100 {
                        pool.run(5, &|i| {
                            n.fetch_add(i as u64, Ordering::Relaxed);
                        });
                    }
                    n.load(Ordering::Relaxed)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), 100 * 10);
        }
    }

    #[test]
    fn a_task_panic_reaches_the_caller_after_the_region() {
        let pool = Pool::with_spin("t", 2, Duration::from_micros(100)).expect("pool");
        let finished = AtomicU64::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(6, &|i| {
                if i == 3 {
                    panic!("task 3 fails");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        let p = r.expect_err("the panic is resumed");
        assert_eq!(p.downcast_ref::<&str>(), Some(&"task 3 fails"));
        assert_eq!(finished.load(Ordering::Relaxed), 5);
        assert!(
            !pool.region.is_poisoned(),
            "the next region runs in parallel"
        );
        // The pool still works.
        let n = AtomicU64::new(0);
        pool.run(4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn enter_makes_the_pool_current_and_restores_it() {
        let p = Arc::new(Pool::with_spin("t", 2, Duration::ZERO).expect("pool"));
        assert_eq!(enter(&p, || with_current(Pool::threads)), 2);
        assert!(CURRENT.with(|c| c.borrow().is_none()));
        let nested = enter(&p, || {
            let q = Arc::new(Pool::with_spin("u", 1, Duration::ZERO).expect("pool"));
            (
                enter(&q, || with_current(Pool::threads)),
                with_current(Pool::threads),
            )
        });
        assert_eq!(nested, (1, 2));
    }

    #[test]
    fn pinned_pools_compute_and_pin_their_caller() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "sched_getaffinity reports no CPU");
        let threads = cpus.len().min(2);
        let pool = Arc::new(Pool::pinned("t", threads, &cpus).expect("pool"));
        // In a thread of its own: pinning is for good.
        let sum = std::thread::spawn(move || {
            enter(&pool, || {
                let n = AtomicU64::new(0);
                with_current(|p| {
                    p.run(16, &|i| {
                        n.fetch_add(i as u64, Ordering::Relaxed);
                    })
                });
                (n.load(Ordering::Relaxed), allowed_cpus())
            })
        })
        .join()
        .expect("thread");
        assert_eq!(sum.0, 120);
        assert_eq!(
            sum.1,
            vec![cpus[0]],
            "the caller runs on the pool's first CPU"
        );
        // More threads than CPUs: nothing is pinned, the pool still works.
        let wide = Pool::pinned("w", cpus.len() + 1, &cpus).expect("pool");
        assert_eq!(wide.caller_cpu, None);
    }

    #[test]
    fn a_bad_spin_setting_is_named() {
        let e = spin_setting(Some("soon")).expect_err("refused");
        assert!(e.to_string().contains(SPIN_ENV), "{e}");
        assert_eq!(
            spin_setting(Some(" 50 ")).ok(),
            Some(Duration::from_micros(50))
        );
        assert_eq!(spin_setting(None).ok(), Some(DEFAULT_SPIN));
    }
}
