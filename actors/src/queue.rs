//! The queue stage: bounded admission and ordering.
//!
//! [`QueueActor`] holds submitted tasks until the scheduler asks for them
//! (with a `Demand` message). Higher priorities leave first, equal priorities in
//! arrival order. A full queue refuses a submission at once with
//! [`SubmitError::Overloaded`]; it never blocks and never drops a task it
//! accepted. A cancelled task still queued ends here; otherwise the
//! cancellation goes on to the scheduler.
//!
//! **Invariant:** every task the queue accepted is either handed to the
//! scheduler or ended here (cancelled, or failed at shutdown) — exactly once.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use actix::prelude::*;

use crate::kit::{SubmitError, Task, TaskId};
use crate::scheduler::{Admit, CancelTask};

/// Submits a task.
pub struct Submit<T>(pub T);

impl<T: Task> Message for Submit<T> {
    type Result = Result<(), SubmitError>;
}

/// Cancels a task wherever it is.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel(pub TaskId);

/// The scheduler can take up to this many tasks now.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Demand(pub usize);

/// Stop admitting; tasks already queued still run.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close;

/// Tasks waiting in the queue.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct QueueLen;

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

/// The queue stage.
pub struct QueueActor<T: Task> {
    capacity: usize,
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
    demand: usize,
    closed: bool,
    admit: Recipient<Admit<T>>,
    cancel: Recipient<CancelTask>,
}

impl<T: Task> QueueActor<T> {
    /// A queue of `capacity` tasks feeding the scheduler behind `admit` and `cancel`.
    pub fn new(capacity: usize, admit: Recipient<Admit<T>>, cancel: Recipient<CancelTask>) -> Self {
        Self {
            capacity,
            heap: BinaryHeap::new(),
            next_seq: 0,
            demand: 0,
            closed: false,
            admit,
            cancel,
        }
    }

    fn feed(&mut self) {
        let mut out = Vec::new();
        while self.demand > 0 {
            let Some(e) = self.heap.pop() else { break };
            out.push(e.task);
            self.demand -= 1;
        }
        if !out.is_empty() {
            self.admit.do_send(Admit(out));
        }
        self.publish();
    }

    /// Sets the waiting-in-queue gauge.
    fn publish(&self) {
        metrics::gauge!(framework::metrics::REQUESTS_WAITING, "stage" => "queue")
            .set(self.heap.len() as f64);
    }
}

impl<T: Task> Actor for QueueActor<T> {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        for e in self.heap.drain() {
            e.task
                .failed("the pipeline stopped before the task ran".into());
        }
    }
}

impl<T: Task> Handler<Submit<T>> for QueueActor<T> {
    type Result = Result<(), SubmitError>;

    fn handle(&mut self, msg: Submit<T>, _: &mut Self::Context) -> Self::Result {
        if self.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if self.heap.len() >= self.capacity {
            return Err(SubmitError::Overloaded {
                capacity: self.capacity,
            });
        }
        let task = msg.0;
        self.heap.push(Entry {
            priority: task.priority(),
            seq: self.next_seq,
            task,
        });
        self.next_seq += 1;
        self.feed();
        Ok(())
    }
}

impl<T: Task> Handler<Cancel> for QueueActor<T> {
    type Result = ();

    fn handle(&mut self, msg: Cancel, _: &mut Self::Context) {
        let id = msg.0;
        if self.heap.iter().any(|e| e.task.id() == id) {
            let (gone, keep): (Vec<_>, Vec<_>) = self.heap.drain().partition(|e| e.task.id() == id);
            self.heap = keep.into_iter().collect();
            for e in gone {
                e.task.cancelled();
            }
            self.publish();
        } else {
            self.cancel.do_send(CancelTask(id));
        }
    }
}

impl<T: Task> Handler<Demand> for QueueActor<T> {
    type Result = ();

    fn handle(&mut self, msg: Demand, _: &mut Self::Context) {
        self.demand = msg.0;
        self.feed();
    }
}

impl<T: Task> Handler<Close> for QueueActor<T> {
    type Result = ();

    fn handle(&mut self, _: Close, _: &mut Self::Context) {
        self.closed = true;
    }
}

impl<T: Task> Handler<QueueLen> for QueueActor<T> {
    type Result = usize;

    fn handle(&mut self, _: QueueLen, _: &mut Self::Context) -> usize {
        self.heap.len()
    }
}
