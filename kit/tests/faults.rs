//! User code that fails: a one-shot `split` or `merge` that panics, or a
//! `split` with too many parts, fails its task alone; a policy or merge that
//! panics stops the pipeline cleanly (every task ends naming the panic, later
//! submissions are refused, shutdown returns at once); a plan naming a node
//! the replica lacks fails its task instead of hanging; a task's error names
//! only its own failures. No test waits without a deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use kit::{
    End, Merge, NodeError, NodeId, NodeTask, NodeWorker, OneShot, OneShotConfig, Pending, Pipeline,
    PipelineConfig, Plan, Policy, StepId, SubmitError, Supervision, Task, TaskId, WorkerFactory,
};

/// Long enough for any answer; a broken pipeline fails the test after it.
const DEADLINE: Duration = Duration::from_secs(20);

fn config(nodes: usize) -> OneShotConfig {
    OneShotConfig {
        nodes,
        backoff: Duration::from_millis(1),
        ..OneShotConfig::default()
    }
}

/// The answer, or a test failure once the deadline passed.
fn answer<O>(p: &mut Pending<O>) -> Result<O, End> {
    p.wait_timeout(DEADLINE)
        .unwrap_or_else(|| panic!("task {} got no answer within {DEADLINE:?}", p.id()))
}

fn failed<O: std::fmt::Debug>(r: Result<O, End>) -> String {
    match r {
        Err(End::Failed(why)) => why,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A one-shot pool summing `n` copies of 1 over its nodes.
fn ones(
    nodes: usize,
    split: impl Fn(&u64, usize) -> Vec<u64> + Send + 'static,
    merge: impl Fn(&u64, Vec<u64>) -> u64 + Send + 'static,
) -> OneShot<u64, u64, u64> {
    OneShot::start(config(nodes), split, |_, part: &u64| Ok(*part), merge).unwrap()
}

fn even(n: &u64, nodes: usize) -> Vec<u64> {
    let k = nodes as u64;
    (0..k).map(|i| (i + 1) * n / k - i * n / k).collect()
}

#[test]
fn a_panicking_split_fails_its_task_alone() {
    let pool = ones(
        2,
        |n, nodes| {
            assert!(*n != 3, "split cannot cut {n}");
            even(n, nodes)
        },
        |_, parts| parts.iter().sum(),
    );
    let mut pending: Vec<_> = (1..=6).map(|n| pool.submit(n).unwrap()).collect();
    for (n, p) in (1..=6).zip(&mut pending) {
        if n == 3 {
            let why = failed(answer(p));
            assert!(why.contains("split panicked: split cannot cut 3"), "{why}");
        } else {
            assert_eq!(answer(p), Ok(n));
        }
    }
    assert_eq!(pool.submit(10).unwrap().wait(), Ok(10), "it goes on");
    assert!(pool.shutdown(DEADLINE));
}

#[test]
fn a_split_with_more_parts_than_nodes_fails_its_task() {
    let pool = ones(
        2,
        |n, _| vec![1; *n as usize],
        |_, parts| parts.iter().sum(),
    );
    assert_eq!(answer(&mut pool.submit(2).unwrap()), Ok(2));
    let why = failed(answer(&mut pool.submit(3).unwrap()));
    assert!(why.contains("split returned 3 parts for 2 nodes"), "{why}");
    assert!(pool.shutdown(DEADLINE));
}

#[test]
fn a_panicking_one_shot_merge_fails_its_task_alone() {
    let pool = ones(2, even, |n, parts| {
        assert!(*n != 3, "merge cannot add up {n}");
        parts.iter().sum()
    });
    let mut pending: Vec<_> = (1..=6).map(|n| pool.submit(n).unwrap()).collect();
    for (n, p) in (1..=6).zip(&mut pending) {
        if n == 3 {
            let why = failed(answer(p));
            assert!(
                why.contains("merge panicked: merge cannot add up 3"),
                "{why}"
            );
        } else {
            assert_eq!(answer(p), Ok(n));
        }
    }
    // Nothing is left hanging: the pipeline goes idle.
    let t0 = Instant::now();
    while !pool.stats().idle {
        assert!(t0.elapsed() < DEADLINE, "{:?}", pool.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(pool.shutdown(DEADLINE));
}

#[test]
fn a_task_s_error_names_only_its_own_failures() {
    // One node, two tasks in flight: jobs 2 and 5 fail in the same rounds.
    let pool = OneShot::start(
        OneShotConfig {
            max_retries: 2,
            tasks_in_flight: 2,
            ..config(1)
        },
        |n: &u64, _| vec![*n],
        |_, n: &u64| match n {
            2 | 5 => Err(format!("fails on job {n}")),
            _ => Ok(*n),
        },
        |_, parts: Vec<u64>| parts[0],
    )
    .unwrap();
    let mut pending: Vec<_> = [2, 5, 1]
        .into_iter()
        .map(|n| pool.submit(n).unwrap())
        .collect();
    let two = failed(answer(&mut pending[0]));
    let five = failed(answer(&mut pending[1]));
    assert!(
        two.contains("3 times") && two.contains("fails on job 2") && !two.contains("job 5"),
        "{two}"
    );
    assert!(
        five.contains("fails on job 5") && !five.contains("job 2"),
        "{five}"
    );
    assert_eq!(answer(&mut pending[2]), Ok(1));
    assert!(pool.shutdown(DEADLINE));
}

#[test]
fn an_answer_is_an_error_and_can_be_waited_for_with_a_timeout(
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (gate_tx, gate_rx) = crossbeam::channel::unbounded::<()>();
    let pool = OneShot::start(
        config(1),
        |n: &u64, _| vec![*n],
        move |_, n: &u64| {
            if *n == 0 {
                gate_rx.recv().map_err(|e| e.to_string())?;
            }
            Ok(*n)
        },
        |_, parts: Vec<u64>| parts[0],
    )?;
    let gate_tx = gate_tx;
    let mut p = pool.submit(0)?;
    assert_eq!(p.try_wait(), None);
    assert_eq!(p.wait_timeout(Duration::from_millis(20)), None);
    gate_tx.send(())?;
    assert_eq!(answer(&mut p), Ok(0));
    assert_eq!(
        p.try_wait(),
        Some(Err(End::Failed("already answered".into())))
    );
    assert_eq!(pool.submit(7)?.wait()?, 7);
    assert_eq!(End::Cancelled.to_string(), "the task was cancelled");
    assert_eq!(End::Failed("why".into()).to_string(), "why");
    assert!(pool.shutdown(DEADLINE));
    Ok(())
}

// The full path, with a policy and a merge that misbehave on chosen jobs.

/// A job: `n` is its work, and picks how the policy and merge treat it.
struct Job {
    id: TaskId,
    n: u64,
}

impl Task for Job {
    fn id(&self) -> TaskId {
        self.id
    }
}

/// What goes wrong, and on which job.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// The policy panics planning this job.
    policy_panics_on: Option<u64>,
    /// The merge panics merging this job.
    merge_panics_on: Option<u64>,
    /// The policy plans this job's work on node 5 (of 2).
    bad_node_on: Option<u64>,
    /// The policy takes a second planning this job (the control thread,
    /// and the queue on it, answer nothing meanwhile).
    policy_stalls_on: Option<u64>,
}

/// One step per job, on node 0.
struct Jobs {
    faults: Faults,
    waiting: VecDeque<Job>,
    busy: HashMap<StepId, Job>,
}

impl Policy for Jobs {
    type Task = Job;
    type Work = u64;
    type Links = ();
    type Step = (TaskId, u64);
    type Verdict = ();
    type Stats = usize;

    fn replicas(&self) -> usize {
        1
    }
    fn room(&self) -> usize {
        4usize.saturating_sub(self.waiting.len() + self.busy.len())
    }
    fn load(&self, _: usize) -> usize {
        self.waiting.len() + self.busy.len()
    }
    fn admit(&mut self, _: usize, task: Job) {
        self.waiting.push_back(task);
    }
    fn next_step(&mut self, _: usize, step: StepId) -> Option<Plan<(TaskId, u64), u64, ()>> {
        let job = self.waiting.pop_front()?;
        let n = job.n;
        assert!(
            Some(n) != self.faults.policy_panics_on,
            "the policy trips on {n}"
        );
        if Some(n) == self.faults.policy_stalls_on {
            std::thread::sleep(Duration::from_secs(1));
        }
        let node = if Some(n) == self.faults.bad_node_on {
            5
        } else {
            0
        };
        let id = job.id;
        self.busy.insert(step, job);
        Some(Plan {
            step: (id, n),
            nodes: vec![NodeTask {
                node,
                work: n,
                links: (),
            }],
        })
    }
    fn completed(&mut self, _: usize, step: StepId, _: ()) {
        self.busy.remove(&step);
    }
    fn failed(&mut self, _: usize, steps: &[StepId]) -> Vec<TaskId> {
        let mut ids = Vec::new();
        for s in steps {
            if let Some(job) = self.busy.remove(s) {
                ids.push(job.id);
                self.waiting.push_front(job);
            }
        }
        ids
    }
    fn cancel(&mut self, task: TaskId) -> bool {
        let held = self.contains(task);
        self.waiting.retain(|j| j.id != task);
        held
    }
    fn contains(&self, task: TaskId) -> bool {
        self.waiting
            .iter()
            .chain(self.busy.values())
            .any(|j| j.id == task)
    }
    fn drop_task(&mut self, task: TaskId) {
        self.waiting.retain(|j| j.id != task);
        self.busy.retain(|_, j| j.id != task);
    }
    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.busy.is_empty()
    }
    fn stats(&self) -> usize {
        self.busy.len()
    }
}

/// Multiplies its work by 10.
struct Times10;

impl NodeWorker for Times10 {
    type Work = u64;
    type Links = ();
    type Output = u64;

    fn run(&mut self, n: &u64, _: &()) -> Result<u64, NodeError> {
        // Work from 1000 on takes that many milliseconds more.
        if let Some(ms) = n.checked_sub(1000) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(n * 10)
    }
    fn abort(_: &()) {}
}

type Reply = Sender<Result<u64, End>>;

struct Replies {
    faults: Faults,
    replies: HashMap<TaskId, Reply>,
}

impl Merge for Replies {
    type Step = (TaskId, u64);
    type Output = u64;
    type Registration = Reply;
    type Verdict = ();

    fn register(&mut self, task: TaskId, reply: Reply) {
        self.replies.insert(task, reply);
    }
    fn merge(&mut self, &(id, n): &(TaskId, u64), outputs: Vec<(usize, u64)>) {
        assert!(
            Some(n) != self.faults.merge_panics_on,
            "the merge trips on {n}"
        );
        if let Some(reply) = self.replies.remove(&id) {
            let _ = reply.send(Ok(outputs.iter().map(|(_, o)| o).sum()));
        }
    }
    fn end(&mut self, task: TaskId, end: End) {
        if let Some(reply) = self.replies.remove(&task) {
            let _ = reply.send(Err(end));
        }
    }
    fn end_all(&mut self, end: End) {
        for (_, reply) in self.replies.drain() {
            let _ = reply.send(Err(end.clone()));
        }
    }
}

fn start(faults: Faults) -> Pipeline<Jobs, Reply> {
    let factory: WorkerFactory<Times10> = Arc::new(|_: NodeId| Ok(Times10));
    Pipeline::start(
        Jobs {
            faults,
            waiting: VecDeque::new(),
            busy: HashMap::new(),
        },
        Replies {
            faults,
            replies: HashMap::new(),
        },
        factory,
        PipelineConfig {
            nodes_per_replica: 2,
            supervision: Supervision {
                max_retries: 2,
                backoff: Duration::from_millis(1),
            },
            ..PipelineConfig::default()
        },
    )
    .unwrap()
}

fn submit(p: &Pipeline<Jobs, Reply>, id: TaskId, n: u64) -> Receiver<Result<u64, End>> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    p.submit(Job { id, n }, tx).unwrap();
    rx
}

fn reply(rx: &Receiver<Result<u64, End>>) -> Result<u64, End> {
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|e| panic!("no answer within {DEADLINE:?}: {e}"))
}

/// Submits jobs 1..=6, the faulty one among them, and checks that the
/// pipeline stopped cleanly naming `panic`.
fn stops_cleanly(p: Pipeline<Jobs, Reply>, panic: &str) {
    let mut rxs = Vec::new();
    for n in 1..=6 {
        let (tx, rx) = crossbeam::channel::bounded(1);
        match p.submit(Job { id: n, n }, tx) {
            Ok(()) => rxs.push(rx),
            // Jobs after the faulty one may come after the pipeline stopped.
            Err(SubmitError::Halted(why)) if n > 3 => assert!(why.contains(panic), "{why}"),
            Err(e) => panic!("job {n} refused: {e}"),
        }
    }
    let mut failures = 0;
    for rx in &rxs {
        match reply(rx) {
            Ok(_) => {}
            Err(End::Failed(why)) => {
                assert!(why.contains(panic), "{why}");
                failures += 1;
            }
            Err(End::Cancelled) => panic!("cancelled"),
        }
    }
    assert!(failures >= 1, "the faulty job failed");
    assert!(
        p.fault().is_some_and(|f| f.contains(panic)),
        "{:?}",
        p.fault()
    );
    let (tx, _rx) = crossbeam::channel::bounded(1);
    match p.submit(Job { id: 99, n: 1 }, tx) {
        Err(SubmitError::Halted(why)) => assert!(why.contains(panic), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let t0 = Instant::now();
    assert!(!p.shutdown(DEADLINE), "a stopped pipeline did not drain");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn stopping_now_ends_every_held_task_through_the_merge_and_is_no_fault() {
    let p = start(Faults::default());
    // One job runs (for 5 s), the others wait behind it on node 0.
    let rxs: Vec<_> = (1..=3).map(|id| submit(&p, id, 6000)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    p.stop_now("cut short on purpose");
    for rx in &rxs {
        match reply(rx) {
            Err(End::Failed(why)) => assert_eq!(why, "cut short on purpose"),
            other => panic!("{other:?}"),
        }
    }
    // Well before the running job could have ended.
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(p.fault(), None);
    let (tx, _rx) = crossbeam::channel::bounded(1);
    assert_eq!(p.submit(Job { id: 9, n: 1 }, tx), Err(SubmitError::Stopped));
}

/// `rx`'s answer is the failure `why`, sent by the merge (a dropped
/// registration would be a closed channel instead).
fn failed_with(rx: &Receiver<Result<u64, End>>, why: &str) {
    match reply(rx) {
        Err(End::Failed(w)) => assert_eq!(w, why),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_shutdown_out_of_time_a_drop_and_a_halter_end_held_tasks_through_the_merge() {
    // Jobs of 3000 take 2 s each on node 0.
    let p = start(Faults::default());
    let rxs: Vec<_> = (1..=2).map(|id| submit(&p, id, 3000)).collect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!p.shutdown_or_fail(Duration::from_millis(50), "out of time"));
    for rx in &rxs {
        failed_with(rx, "out of time");
    }

    let mut p = start(Faults::default());
    p.set_drop_reason("dropped");
    let rx = submit(&p, 1, 3000);
    std::thread::sleep(Duration::from_millis(100));
    drop(p);
    failed_with(&rx, "dropped");

    // From another thread, as an MPI job's watcher does.
    let p = start(Faults::default());
    let rx = submit(&p, 1, 3000);
    let halter = p.halter();
    std::thread::spawn(move || halter.halt("a rank was lost"))
        .join()
        .expect("halter thread");
    failed_with(&rx, "a rank was lost");
    let (tx, _rx) = crossbeam::channel::bounded(1);
    assert_eq!(p.submit(Job { id: 9, n: 1 }, tx), Err(SubmitError::Stopped));
}

#[test]
fn a_halt_behind_a_full_queue_mailbox_still_ends_every_task_through_the_merge() {
    // Job 1's planning stalls the control thread; 40 submissions pile up
    // at the queue's mailbox, past its capacity of 16, and the halt comes
    // behind them. Every task the queue took must still end through the merge
    // (an answer, or the halt's reason), never with its reply dropped.
    let p = Arc::new(start(Faults {
        policy_stalls_on: Some(1),
        ..Faults::default()
    }));
    let first = submit(&p, 1, 1);
    let submitters: Vec<_> = (2..42)
        .map(|id| {
            let p = p.clone();
            std::thread::spawn(move || {
                let (tx, rx) = crossbeam::channel::bounded(1);
                p.submit(Job { id, n: 1500 }, tx).map(|()| rx)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    p.halter().halt("a rank was lost");
    let mut failed = 0;
    let mut replies = vec![first];
    for s in submitters {
        match s.join().expect("a submitter") {
            Ok(rx) => replies.push(rx),
            Err(e) => assert_eq!(e, SubmitError::Stopped, "{e}"),
        }
    }
    for rx in &replies {
        match reply(rx) {
            Ok(_) => {}
            Err(End::Failed(w)) if w == "a rank was lost" => failed += 1,
            other => panic!("{other:?}"),
        }
    }
    // How many the queue took before the halt depends on the machine's
    // pace; the halt's reason reached at least those still held.
    assert!(failed >= 1, "none of {} failed", replies.len());
}

#[test]
fn a_panicking_policy_stops_the_pipeline_cleanly() {
    let p = start(Faults {
        policy_panics_on: Some(3),
        ..Faults::default()
    });
    stops_cleanly(p, "the policy panicked: the policy trips on 3");
}

#[test]
fn a_panicking_merge_stops_the_pipeline_cleanly() {
    let p = start(Faults {
        merge_panics_on: Some(3),
        ..Faults::default()
    });
    stops_cleanly(p, "Merge::merge panicked: the merge trips on 3");
}

#[test]
fn a_plan_naming_a_missing_node_fails_its_task() {
    let p = start(Faults {
        bad_node_on: Some(3),
        ..Faults::default()
    });
    let rxs: Vec<_> = (1..=6).map(|n| submit(&p, n, n)).collect();
    for (n, rx) in (1..=6).zip(&rxs) {
        if n == 3 {
            let why = failed(reply(rx));
            assert!(
                why.contains("3 times") && why.contains("node 5") && why.contains("has 2 nodes"),
                "{why}"
            );
        } else {
            assert_eq!(reply(rx), Ok(n * 10));
        }
    }
    assert_eq!(p.fault(), None);
    assert!(p.shutdown(DEADLINE));
}
