//! Starting and driving a pipeline: the four stages wired together on an actix
//! system that runs on its own threads, behind a handle any thread can use.
//!
//! [`Pipeline::start`] spawns the control thread (queue and scheduler live
//! there), one arbiter thread for the merger and one per compute node, builds
//! every node's worker on its own thread, and returns once all are ready — or
//! with the first node's error. [`Pipeline::shutdown`] stops admitting, waits
//! for admitted tasks to finish, then stops every thread.
//!
//! A pipeline also stops by itself when user code that the kit cannot
//! recover from panics (the [`Policy`] or the [`Merge`], see
//! [`crate::traits`]): every task still registered ends with an error naming
//! the panic, [`Pipeline::submit`] answers [`SubmitError::Halted`],
//! [`Pipeline::fault`] says why, and [`Pipeline::shutdown`] returns at once.
//!
//! The handle reads the pipeline's figures without messaging any actor: the
//! scheduler publishes them after every message it handles, the queue keeps
//! the count of tasks it accepted that the scheduler has not yet taken in, and
//! each node writes its own counters. Reading them never blocks on a busy
//! actor.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::merger::{Flush, MergerActor};
use crate::node::panic_text;
use crate::node::{NodeActor, NodeCounters, NodeStats};
use crate::queue::{Cancel, Close, QueueActor, QueueLinks, Seal, Submit};
use crate::scheduler::{FaultFlag, SchedulerActor, SchedulerLinks, SchedulerState, SchedulerStats};
use crate::traits::{
    Merge, NodeId, NodeWorker, Policy, SubmitError, Supervision, TaskId, WorkerFactory,
};

/// Metric names the kit records under, given by the instance (`None`: not
/// recorded). The kit defines no names of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KitMetrics {
    /// Gauge of tasks waiting in the queue (label `stage="queue"`).
    pub queue_waiting: Option<&'static str>,
    /// Counter of node restarts (label `node="r{replica}.n{index}"`).
    pub node_restarts: Option<&'static str>,
}

/// The shape of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Tasks the queue holds before it answers `Overloaded`.
    pub queue_capacity: usize,
    /// Data-parallel replicas.
    pub replicas: usize,
    /// Compute nodes per replica.
    pub nodes_per_replica: usize,
    /// Steps a replica may have in flight at once.
    pub max_steps_in_flight: usize,
    /// Retry limits.
    pub supervision: Supervision,
    /// Where the kit records its metrics.
    pub metrics: KitMetrics,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            replicas: 1,
            nodes_per_replica: 1,
            max_steps_in_flight: 1,
            supervision: Supervision::default(),
            metrics: KitMetrics::default(),
        }
    }
}

/// Cancels tasks of a pipeline from anywhere (cheap to clone).
#[derive(Clone)]
pub struct Canceller(Recipient<Cancel>);

impl Canceller {
    /// Cancels `task` wherever it is; it ends as cancelled unless it already
    /// ended.
    pub fn cancel(&self, task: TaskId) {
        self.0.do_send(Cancel(task));
    }
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Canceller")
    }
}

/// Stops a pipeline at once from any thread (cheap to clone): what its
/// owner does when the pipeline cannot go on, a node lost for good. No task
/// is waited for: every task it holds ends with
/// [`End::Failed`](crate::End::Failed) through the merge's
/// [`Merge::end_all`] (so that what the merge counts of failed tasks counts
/// them), the stages stop, and later submissions fail with
/// [`SubmitError::Stopped`].
#[derive(Clone)]
pub struct Halter {
    system: System,
    /// The queue's seal, which passes the halt on to the merger behind the
    /// registrations of every task the queue accepted: the merger ends
    /// them all, then stops the actor system.
    seal: Recipient<Seal>,
    /// Set once a halt was asked for: submissions are refused from then on.
    stopping: Arc<AtomicBool>,
}

impl Halter {
    /// Stops the pipeline now, ending every task it holds with
    /// `End::Failed(why)`. A pipeline that cannot be told so any more (its
    /// merger is gone) is stopped all the same.
    pub fn halt(&self, why: impl Into<String>) {
        self.stopping.store(true, Ordering::Release);
        let seal = Seal {
            why: why.into(),
            system: self.system.clone(),
        };
        // Queued behind whatever the mailbox holds, however far past its
        // capacity; a mailbox already closed (the system is stopping)
        // drops it, and the system is stopped here instead.
        self.seal.do_send(seal);
        if !self.seal.connected() {
            self.system.stop();
        }
    }

    /// Whether a halt was asked for.
    fn asked(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for Halter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Halter")
    }
}

/// A running pipeline for policy `P` whose tasks register `R` with the merger.
pub struct Pipeline<P: Policy, R: Send + 'static> {
    queue: Addr<QueueActor<P::Task, R>>,
    thread: Option<JoinHandle<()>>,
    nodes: Arc<NodeStats>,
    queued: Arc<AtomicUsize>,
    published: Arc<Mutex<SchedulerStats<P::Stats>>>,
    fault: FaultFlag,
    /// Its stop through the merger ([`Pipeline::stop_now`]).
    halter: Halter,
    /// What tasks still held when the pipeline is dropped end with.
    drop_reason: String,
    /// The merger's flush, which a drained shutdown waits for.
    flush: Recipient<Flush>,
}

/// How long stopping waits for the merger to end the tasks it holds
/// (through [`Merge::end_all`]) before it stops the actor system anyway.
const HALT_WAIT: Duration = Duration::from_secs(2);

type Started<P, R> = (
    Addr<QueueActor<<P as Policy>::Task, R>>,
    System,
    Recipient<Flush>,
);

impl<P: Policy, R: Send + 'static> Pipeline<P, R> {
    /// Starts the stages and builds every node's worker with `factory`.
    pub fn start<W, M>(
        policy: P,
        merge: M,
        factory: WorkerFactory<W>,
        cfg: PipelineConfig,
    ) -> Result<Self, String>
    where
        W: NodeWorker<Work = P::Work, Links = P::Links>,
        M: Merge<Step = P::Step, Output = W::Output, Registration = R, Verdict = P::Verdict>,
    {
        if cfg.replicas == 0 || cfg.nodes_per_replica == 0 || cfg.queue_capacity == 0 {
            return Err(format!(
                "a pipeline needs at least one replica, node and queue slot: {cfg:?}"
            ));
        }
        if policy.replicas() != cfg.replicas {
            return Err(format!(
                "the policy has {} replicas, the pipeline {}",
                policy.replicas(),
                cfg.replicas
            ));
        }
        let nodes = NodeStats::new(cfg.replicas, cfg.nodes_per_replica);
        let queued = Arc::new(AtomicUsize::new(0));
        let published = Arc::new(Mutex::new(SchedulerStats::default()));
        let fault = FaultFlag::default();
        let (node_stats, queue_len, sched_stats, fault_flag) = (
            nodes.clone(),
            queued.clone(),
            published.clone(),
            fault.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel::<Started<P, R>>();
        let (ready_tx, ready_rx) = crossbeam::channel::unbounded::<(NodeId, Option<String>)>();
        let thread = std::thread::Builder::new()
            .name("parallm-control".into())
            .spawn(move || {
                let sys = System::new();
                let arbiters = sys.block_on(async move {
                    let sched_ctx: Context<SchedulerActor<P>> = Context::new();
                    let sched = sched_ctx.address();
                    let merger_arbiter = Arbiter::new();
                    let (done, faults) = (sched.clone().recipient(), sched.clone().recipient());
                    let merger = MergerActor::start_in_arbiter(&merger_arbiter.handle(), |_| {
                        MergerActor::new(merge, done, faults)
                    });
                    let mut arbiters = vec![merger_arbiter];
                    let mut addrs = Vec::new();
                    for replica in 0..cfg.replicas {
                        let mut row = Vec::new();
                        for index in 0..cfg.nodes_per_replica {
                            let id = NodeId { replica, index };
                            let arbiter = Arbiter::new();
                            let (f, m, st, rt) = (
                                factory.clone(),
                                merger.clone().recipient(),
                                node_stats.clone(),
                                ready_tx.clone(),
                            );
                            let addr = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                                let worker = catch_unwind(AssertUnwindSafe(|| f(id)))
                                    .unwrap_or_else(|p| {
                                        Err(format!("panicked: {}", panic_text(p)))
                                    });
                                let _ = rt.send((id, worker.as_ref().err().cloned()));
                                NodeActor::new(id, f, worker, m, (st, cfg.metrics))
                            });
                            row.push(addr.recipient());
                            arbiters.push(arbiter);
                        }
                        addrs.push(row);
                    }
                    let queue = QueueActor::new(
                        cfg.queue_capacity,
                        QueueLinks {
                            admit: sched.clone().recipient(),
                            cancel: sched.clone().recipient(),
                            register: merger.clone().recipient(),
                            end: merger.clone().recipient(),
                            halt: merger.clone().recipient(),
                        },
                        (queue_len.clone(), fault_flag.clone()),
                        cfg.metrics,
                    )
                    .start();
                    let scheduler = SchedulerActor::new(
                        SchedulerState::new(policy, cfg.supervision, cfg.max_steps_in_flight),
                        SchedulerLinks {
                            nodes: addrs,
                            expect: merger.clone().recipient(),
                            end: merger.clone().recipient(),
                            halt: merger.clone().recipient(),
                            queue: queue.clone().recipient(),
                            abort: W::abort,
                        },
                        (sched_stats, queue_len),
                        fault_flag,
                    );
                    sched_ctx.run(scheduler);
                    let _ = tx.send((queue, System::current(), merger.recipient()));
                    arbiters
                });
                let _ = sys.run();
                for a in arbiters {
                    a.stop();
                    let _ = a.join();
                }
            })
            .map_err(|e| format!("cannot spawn the control thread: {e}"))?;
        let Ok((queue, system, flush)) = rx.recv() else {
            let _ = thread.join();
            return Err("the actor system failed to start".into());
        };
        let mut pipeline = Self {
            halter: Halter {
                system,
                seal: queue.clone().recipient(),
                stopping: Arc::new(AtomicBool::new(false)),
            },
            queue,
            flush,
            drop_reason: "the pipeline was dropped before the task finished".into(),
            thread: Some(thread),
            nodes,
            queued,
            published,
            fault,
        };
        let mut errors = Vec::new();
        for _ in 0..cfg.replicas * cfg.nodes_per_replica {
            match ready_rx.recv() {
                Ok((_, None)) => {}
                Ok((id, Some(e))) => errors.push(format!("{id}: {e}")),
                Err(_) => {
                    errors.push("a node thread ended before its worker was built".into());
                    break;
                }
            }
        }
        if !errors.is_empty() {
            pipeline.stop();
            return Err(errors.join("; "));
        }
        Ok(pipeline)
    }

    /// Submits a task and the requester's part of it; answers at once
    /// (`Overloaded` when the queue is full, `Halted` once user code's panic
    /// stopped the pipeline). Blocks the calling thread until the queue
    /// answered: not for the pipeline's own threads.
    pub fn submit(&self, task: P::Task, reg: R) -> Result<(), SubmitError> {
        block_on(self.submit_async(task, reg))
    }

    /// Submits a task from async code.
    pub async fn submit_async(&self, task: P::Task, reg: R) -> Result<(), SubmitError> {
        if let Some(why) = self.fault() {
            return Err(SubmitError::Halted(why));
        }
        if self.halter.asked() {
            return Err(SubmitError::Stopped);
        }
        self.queue.send(Submit(task, reg)).await.map_err(|_| {
            self.fault()
                .map_or(SubmitError::Stopped, SubmitError::Halted)
        })?
    }

    /// Why the pipeline stopped by itself, if it did: the panic of user code
    /// (the policy's or the merge's) that it could not recover from.
    pub fn fault(&self) -> Option<String> {
        self.fault.get().cloned()
    }

    /// Cancels a task wherever it is; it ends as cancelled (unless it already
    /// ended).
    pub fn cancel(&self, task: TaskId) {
        self.queue.do_send(Cancel(task));
    }

    /// A handle that cancels tasks of this pipeline.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.queue.clone().recipient())
    }

    /// A handle that stops this pipeline at once.
    pub fn halter(&self) -> Halter {
        self.halter.clone()
    }

    /// What each task still held ends with when the pipeline is dropped
    /// (by default, that the pipeline was dropped before it finished).
    pub fn set_drop_reason(&mut self, why: impl Into<String>) {
        self.drop_reason = why.into();
    }

    /// Stops the pipeline at once, on purpose: every task it holds, queued
    /// or running, ends with [`End::Failed`](crate::End::Failed) carrying `why`, through the
    /// merge's [`Merge::end_all`] (so that what the merge counts of failed
    /// tasks counts them), and it takes no more. Unlike a panic of user
    /// code, this leaves [`Pipeline::fault`] unset. A pipeline that cannot
    /// be told so any more is stopped all the same.
    pub fn stop_now(&self, why: impl Into<String>) {
        self.halter.halt(why);
    }

    /// The scheduler's latest figures, with the queue's tasks in `queued`;
    /// never waits for an actor.
    pub fn stats(&self) -> SchedulerStats<P::Stats> {
        let queued = self.queued.load(Ordering::Acquire);
        let mut s = self.published.lock().map(|s| s.clone()).unwrap_or_default();
        s.queued = queued;
        s.idle &= queued == 0;
        s
    }

    /// Every node's counters, in node order.
    pub fn node_stats(&self) -> Vec<(NodeId, NodeCounters)> {
        self.nodes.snapshot()
    }

    /// Stops admitting, waits up to `timeout` for admitted tasks to finish, then
    /// stops every thread. Returns whether everything finished in time; tasks
    /// still held then end with an error through [`Merge::end_all`], saying
    /// the pipeline shut down before they finished. A pipeline that already
    /// stopped by itself (see [`Pipeline::fault`]) or was halted returns
    /// `false` at once.
    pub fn shutdown(self, timeout: Duration) -> bool {
        let why = format!(
            "the pipeline shut down before the task finished (its shutdown waited {timeout:?})"
        );
        self.shutdown_or_fail(timeout, why)
    }

    /// Like [`Pipeline::shutdown`], the tasks still held at the deadline
    /// ending with `End::Failed(why)`.
    pub fn shutdown_or_fail(mut self, timeout: Duration, why: impl Into<String>) -> bool {
        self.queue.do_send(Close);
        let t0 = Instant::now();
        let drained = loop {
            if self.fault.get().is_none() && self.stats().idle {
                break true;
            }
            // Stopped by itself: once its tasks were ended, the actor system
            // is stopped and the control thread ends.
            if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                break false;
            }
            if t0.elapsed() >= timeout {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if drained {
            // The last ends the scheduler sent reach the merge first.
            let _ = block_on(self.flush.send(Flush));
        } else {
            self.end_held(why.into());
        }
        self.stop();
        drained
    }

    /// Ends every task still held with `End::Failed(why)` through the merge,
    /// unless the pipeline stopped or was halted already.
    fn end_held(&self, why: String) {
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        if running && !self.halter.asked() {
            self.halter.halt(why);
        }
    }

    /// Stops every thread: after a halt, once the merger has ended the
    /// tasks it held and stopped the actor system (or after [`HALT_WAIT`]).
    fn stop(&mut self) {
        if self.halter.asked() {
            let t0 = Instant::now();
            while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && t0.elapsed() < HALT_WAIT
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.halter.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<P: Policy, R: Send + 'static> Drop for Pipeline<P, R> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let why = std::mem::take(&mut self.drop_reason);
            self.end_held(why);
        }
        self.stop();
    }
}

/// Runs a future to completion on the calling thread (which parks while it
/// waits).
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
