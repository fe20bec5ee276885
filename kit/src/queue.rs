//! The queue stage: bounded admission and ordering.
//!
//! [`QueueState`] is the logic, a plain struct: higher priorities leave first,
//! equal priorities in arrival order; a full queue refuses a task at once with
//! [`SubmitError::Overloaded`] (a task [exempt from the
//! capacity](crate::Task::exempt_from_capacity) is taken anyway, counts
//! against no one, and leaves at once whatever the scheduler's demand); it
//! never blocks and never drops a task it accepted;
//! tasks whose requester is gone are taken out before they leave.
//!
//! [`QueueActor`] is its shell on the pipeline's control thread: it hands the
//! requester's part of every accepted task to the merger, feeds the scheduler
//! as much as it asks for (`Demand`), ends cancelled queued tasks through the
//! merger and forwards other cancellations to the scheduler. Once the
//! pipeline stopped after a panic of user code, it refuses every submission
//! with [`SubmitError::Halted`].
//!
//! **Invariant:** every task the queue accepted is either handed to the
//! scheduler or ended through the merger (cancelled, abandoned, or failed at
//! shutdown) — exactly once.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

use actix::prelude::*;

use crate::merger::{EndTask, Halt, Register};
use crate::pipeline::KitMetrics;
use crate::scheduler::{Admit, CancelTask, FaultFlag};
use crate::traits::{End, SubmitError, Task, TaskId};

struct Entry<T> {
    priority: i32,
    seq: u64,
    task: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority && self.seq == other.seq
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority first, then the earlier arrival.
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// The queue's logic: a bounded priority queue with the scheduler's demand.
pub struct QueueState<T: Task> {
    capacity: usize,
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
    demand: usize,
    closed: bool,
}

/// What leaves the queue at once: tasks for the scheduler, and abandoned
/// tasks to end as cancelled.
pub struct Released<T> {
    /// Tasks for the scheduler, best first.
    pub admit: Vec<T>,
    /// Tasks whose requester has gone.
    pub abandoned: Vec<TaskId>,
}

impl<T: Task> QueueState<T> {
    /// An empty queue of `capacity` tasks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            heap: BinaryHeap::new(),
            next_seq: 0,
            demand: 0,
            closed: false,
        }
    }

    /// Tasks waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no task waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Accepts `task`, or refuses it at once (full, or closed).
    pub fn push(&mut self, task: T) -> Result<(), SubmitError> {
        if self.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if self.heap.len() >= self.capacity
            && !task.exempt_from_capacity()
            && self
                .heap
                .iter()
                .filter(|e| !e.task.exempt_from_capacity())
                .count()
                >= self.capacity
        {
            return Err(SubmitError::Overloaded {
                capacity: self.capacity,
            });
        }
        self.heap.push(Entry {
            priority: task.priority(),
            seq: self.next_seq,
            task,
        });
        self.next_seq += 1;
        Ok(())
    }

    /// Removes `id` if it waits here; `true` if it did.
    pub fn remove(&mut self, id: TaskId) -> bool {
        let before = self.heap.len();
        self.heap.retain(|e| e.task.id() != id);
        self.heap.len() != before
    }

    /// The scheduler can take `n` tasks now (replacing any earlier demand).
    pub fn set_demand(&mut self, n: usize) {
        self.demand = n;
    }

    /// Takes out abandoned tasks, then the tasks exempt from the capacity
    /// (whatever the demand), then as many others as the demand allows,
    /// best first.
    pub fn release(&mut self) -> Released<T> {
        let mut abandoned = Vec::new();
        if self.heap.iter().any(|e| e.task.abandoned()) {
            let (gone, keep): (Vec<_>, Vec<_>) =
                self.heap.drain().partition(|e| e.task.abandoned());
            self.heap = keep.into_iter().collect();
            abandoned = gone.into_iter().map(|e| e.task.id()).collect();
        }
        let mut admit = Vec::new();
        if self.heap.iter().any(|e| e.task.exempt_from_capacity()) {
            let (exempt, keep): (Vec<_>, Vec<_>) = self
                .heap
                .drain()
                .partition(|e| e.task.exempt_from_capacity());
            self.heap = keep.into_iter().collect();
            let mut exempt: BinaryHeap<_> = exempt.into_iter().collect();
            while let Some(e) = exempt.pop() {
                admit.push(e.task);
            }
        }
        while self.demand > 0 {
            let Some(e) = self.heap.pop() else { break };
            admit.push(e.task);
            self.demand -= 1;
        }
        Released { admit, abandoned }
    }

    /// Stops accepting; tasks already queued still leave.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Takes every waiting task out (the pipeline is stopping).
    pub fn drain(&mut self) -> Vec<T> {
        self.heap.drain().map(|e| e.task).collect()
    }
}

/// Submits a task and the requester's part of it.
pub struct Submit<T, R>(pub T, pub R);

impl<T: Task, R: Send + 'static> Message for Submit<T, R> {
    type Result = Result<(), SubmitError>;
}

/// Cancels a task wherever it is.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel(pub TaskId);

/// The scheduler can take up to `room` tasks now, counting the `taken` it
/// has taken in so far (tasks sent and not yet taken in are still on their
/// way, and come out of the room).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Demand {
    pub(crate) room: usize,
    pub(crate) taken: u64,
}

/// Stop admitting; tasks already queued still run.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

/// The pipeline stops on purpose ([`crate::Halter::halt`]): the queue
/// refuses every submission from then on and passes the halt to the merger,
/// behind the registrations of every task it accepted, so that the
/// merger's [`crate::Merge::end_all`] ends each of them.
pub(crate) struct Seal {
    pub(crate) why: String,
    pub(crate) system: System,
}

impl Message for Seal {
    type Result = ();
}

/// The queue stage.
pub struct QueueActor<T: Task, R: Send + 'static> {
    state: QueueState<T>,
    admit: Recipient<Admit<T>>,
    cancel: Recipient<CancelTask>,
    register: Recipient<Register<R>>,
    end: Recipient<EndTask>,
    halt: Recipient<Halt>,
    /// Sealed by a halt: every submission is refused.
    sealed: bool,
    /// Tasks accepted and not yet taken in by the scheduler (which counts
    /// them down), read by the pipeline handle.
    queued: Arc<AtomicUsize>,
    /// Why the pipeline stopped by itself, once it has.
    fault: FaultFlag,
    metrics: KitMetrics,
    /// Tasks sent to the scheduler so far.
    sent: u64,
}

/// Where a queue sends what leaves it.
pub(crate) struct QueueLinks<T: Task, R: Send + 'static> {
    pub(crate) admit: Recipient<Admit<T>>,
    pub(crate) cancel: Recipient<CancelTask>,
    pub(crate) register: Recipient<Register<R>>,
    pub(crate) end: Recipient<EndTask>,
    pub(crate) halt: Recipient<Halt>,
}

impl<T: Task, R: Send + 'static> QueueActor<T, R> {
    /// A queue of `capacity` tasks; `queued` counts the tasks it accepted
    /// that the scheduler has not taken in yet; once `fault` is set, it
    /// refuses every task.
    pub(crate) fn new(
        capacity: usize,
        links: QueueLinks<T, R>,
        (queued, fault): (Arc<AtomicUsize>, FaultFlag),
        metrics: KitMetrics,
    ) -> Self {
        Self {
            state: QueueState::new(capacity),
            admit: links.admit,
            cancel: links.cancel,
            register: links.register,
            end: links.end,
            halt: links.halt,
            sealed: false,
            queued,
            fault,
            metrics,
            sent: 0,
        }
    }

    fn feed(&mut self) {
        let out = self.state.release();
        self.queued
            .fetch_sub(out.abandoned.len(), AtomicOrdering::AcqRel);
        for id in out.abandoned {
            self.end.do_send(EndTask(id, End::Cancelled));
        }
        if !out.admit.is_empty() {
            self.sent += out.admit.len() as u64;
            self.admit.do_send(Admit(out.admit));
        }
        self.publish();
    }

    /// Sets the queue's gauge.
    fn publish(&self) {
        if let Some(name) = self.metrics.queue_waiting {
            metrics::gauge!(name, "stage" => "queue").set(self.state.len() as f64);
        }
    }
}

impl<T: Task, R: Send + 'static> Actor for QueueActor<T, R> {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        for task in self.state.drain() {
            self.queued.fetch_sub(1, AtomicOrdering::AcqRel);
            self.end.do_send(EndTask(
                task.id(),
                End::Failed("the pipeline stopped before the task ran".into()),
            ));
        }
        self.publish();
    }
}

impl<T: Task, R: Send + 'static> Handler<Submit<T, R>> for QueueActor<T, R> {
    type Result = Result<(), SubmitError>;

    fn handle(&mut self, msg: Submit<T, R>, _: &mut Self::Context) -> Self::Result {
        let Submit(task, reg) = msg;
        if let Some(why) = self.fault.get() {
            return Err(SubmitError::Halted(why.clone()));
        }
        if self.sealed {
            return Err(SubmitError::Stopped);
        }
        let id = task.id();
        self.state.push(task)?;
        self.queued.fetch_add(1, AtomicOrdering::AcqRel);
        // The merger hears of the task before any step can carry it.
        self.register.do_send(Register(id, reg));
        self.feed();
        Ok(())
    }
}

impl<T: Task, R: Send + 'static> Handler<Seal> for QueueActor<T, R> {
    type Result = ();

    fn handle(&mut self, msg: Seal, _: &mut Self::Context) {
        self.sealed = true;
        let halt = Halt {
            why: msg.why,
            system: msg.system.clone(),
        };
        // Behind every registration sent, however far past its capacity
        // the merger's mailbox is; without a merger, the system stops here.
        self.halt.do_send(halt);
        if !self.halt.connected() {
            msg.system.stop();
        }
    }
}

impl<T: Task, R: Send + 'static> Handler<Cancel> for QueueActor<T, R> {
    type Result = ();

    fn handle(&mut self, msg: Cancel, _: &mut Self::Context) {
        if self.state.remove(msg.0) {
            self.queued.fetch_sub(1, AtomicOrdering::AcqRel);
            self.end.do_send(EndTask(msg.0, End::Cancelled));
            self.publish();
        } else {
            self.cancel.do_send(CancelTask(msg.0));
        }
    }
}

impl<T: Task, R: Send + 'static> Handler<Demand> for QueueActor<T, R> {
    type Result = ();

    fn handle(&mut self, msg: Demand, _: &mut Self::Context) {
        let on_the_way = self.sent.saturating_sub(msg.taken) as usize;
        self.state.set_demand(msg.room.saturating_sub(on_the_way));
        self.feed();
    }
}

impl<T: Task, R: Send + 'static> Handler<Close> for QueueActor<T, R> {
    type Result = ();

    fn handle(&mut self, _: Close, _: &mut Self::Context) {
        self.state.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct T {
        id: TaskId,
        priority: i32,
        gone: Arc<AtomicBool>,
        exempt: bool,
    }

    impl Task for T {
        fn id(&self) -> TaskId {
            self.id
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn abandoned(&self) -> bool {
            self.gone.load(AtomicOrdering::Relaxed)
        }
        fn exempt_from_capacity(&self) -> bool {
            self.exempt
        }
    }

    fn t(id: TaskId, priority: i32) -> T {
        T {
            id,
            priority,
            gone: Arc::default(),
            exempt: false,
        }
    }

    fn ids(v: &[T]) -> Vec<TaskId> {
        v.iter().map(|t| t.id).collect()
    }

    #[test]
    fn priority_then_arrival_order_within_the_demand() {
        let mut q = QueueState::new(8);
        for (id, p) in [(1, 0), (2, 5), (3, 0), (4, 5)] {
            q.push(t(id, p)).unwrap();
        }
        assert!(q.release().admit.is_empty(), "no demand, nothing leaves");
        q.set_demand(3);
        assert_eq!(ids(&q.release().admit), vec![2, 4, 1]);
        q.set_demand(5);
        assert_eq!(ids(&q.release().admit), vec![3]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_closed_one_always() {
        let mut q = QueueState::new(2);
        q.push(t(1, 0)).unwrap();
        q.push(t(2, 0)).unwrap();
        assert_eq!(
            q.push(t(3, 0)),
            Err(SubmitError::Overloaded { capacity: 2 })
        );
        assert!(q.remove(1));
        assert!(!q.remove(1), "removed once");
        q.close();
        assert_eq!(q.push(t(4, 0)), Err(SubmitError::ShuttingDown));
        assert_eq!(ids(&q.drain()), vec![2]);
    }

    #[test]
    fn an_exempt_task_is_taken_by_a_full_queue_and_takes_no_place() {
        let probe = |id| T {
            exempt: true,
            ..t(id, i32::MAX)
        };
        let mut q = QueueState::new(1);
        q.push(probe(1)).unwrap();
        q.push(t(2, 0)).unwrap();
        assert_eq!(
            q.push(t(3, 0)),
            Err(SubmitError::Overloaded { capacity: 1 })
        );
        q.push(probe(4)).unwrap();
        // They leave without demand; the others wait for it.
        assert_eq!(ids(&q.release().admit), vec![1, 4]);
        assert_eq!(
            q.push(t(5, 0)),
            Err(SubmitError::Overloaded { capacity: 1 })
        );
        q.set_demand(2);
        assert_eq!(ids(&q.release().admit), vec![2]);
    }

    #[test]
    fn abandoned_tasks_never_reach_the_scheduler() {
        let mut q = QueueState::new(8);
        let a = t(1, 0);
        let gone = a.gone.clone();
        q.push(a).unwrap();
        q.push(t(2, 0)).unwrap();
        gone.store(true, AtomicOrdering::Relaxed);
        q.set_demand(8);
        let out = q.release();
        assert_eq!(out.abandoned, vec![1]);
        assert_eq!(ids(&out.admit), vec![2]);
    }
}
