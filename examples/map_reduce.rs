//! A parallel map-reduce on parallm's actors: the generic kit without the LLM.
//!
//! The same queue → scheduler → compute nodes → merger pipeline that runs the
//! LLM engine runs here with four small pieces of our own:
//!
//! * [`MeanTask`] — "estimate the mean of exp(-x²) for x in [a, b) over N
//!   samples" (the midpoint rule: x_i = a + (i + 0.5)(b - a)/N), with a channel
//!   to answer on;
//! * [`MeanPolicy`] — cuts each task into one step whose [`Chunks`] give every
//!   node an equal slice of the index range 0..N; one step per replica at a
//!   time, the others wait in a FIFO;
//! * [`PartialSum`] — a node's worker: sums f(x_i) over its slice, on the
//!   node's own thread;
//! * [`MeanMerge`] — adds the partial sums in node order, divides by N and
//!   answers the requester. The task is one-shot: it ends at its first merge.
//!
//! Several tasks are submitted at once; they flow through the queue and run one
//! after another on the four nodes. The program also computes every answer
//! serially, prints both with their difference, and exits with status 1 if any
//! pair differs by more than 1e-9 relative.
//!
//! `--inject-fault` makes node 2 fail the first step it runs: the node is
//! restarted, the policy hands the step's task back ([`Policy::failed`]) and it
//! is retried, so the answers are unchanged.
//!
//! Run: `cargo run --release --example map_reduce [-- --inject-fault]`

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parallm::actors::{
    End, Merge, NodeError, NodeId, NodeWorker, Pipeline, PipelineConfig, Policy, PolicyStats,
    SchedulerStats, Supervision, Task, TaskId, WorkerFactory,
};

/// Compute nodes (each a `PartialSum` on its own thread).
const NODES: usize = 4;
/// Samples per task.
const SAMPLES: u64 = 1_000_000;
/// Tasks the policy holds at once (running and waiting), per replica.
const HELD_PER_REPLICA: usize = 8;
/// Largest relative difference between the parallel and serial answers.
const TOLERANCE: f64 = 1e-9;

/// "The mean of exp(-x²) for x uniform in [a, b)", estimated on `n` midpoints.
#[derive(Debug, Clone, Copy)]
struct Problem {
    a: f64,
    b: f64,
    n: u64,
}

impl Problem {
    /// f(x_i) = exp(-x_i²) at the `i`-th midpoint x_i = a + (i + 0.5)(b - a)/n.
    fn sample(&self, i: u64) -> f64 {
        let x = self.a + (i as f64 + 0.5) * (self.b - self.a) / self.n as f64;
        (-x * x).exp()
    }

    /// The reference: one thread, indices in order.
    fn serial_mean(&self) -> f64 {
        (0..self.n).map(|i| self.sample(i)).sum::<f64>() / self.n as f64
    }
}

/// A task's answer, or why there is none.
type Answer = Result<f64, String>;

/// What users submit: a problem and where to answer.
struct MeanTask {
    id: TaskId,
    problem: Problem,
    reply: Sender<(TaskId, Answer)>,
}

impl Task for MeanTask {
    fn id(&self) -> TaskId {
        self.id
    }
    fn cancelled(self) {
        let _ = self.reply.send((self.id, Err("cancelled".into())));
    }
    fn failed(self, reason: String) {
        let _ = self.reply.send((self.id, Err(reason)));
    }
}

/// The merger's part of an admitted task (the policy keeps its `Problem`).
struct Registration {
    id: TaskId,
    n: u64,
    reply: Sender<(TaskId, Answer)>,
}

/// One step: a task's sample range cut into one slice per node.
struct Chunks {
    task: TaskId,
    problem: Problem,
    /// `ranges[node]`: the indices that node sums.
    ranges: Vec<Range<u64>>,
}

/// One replica's tasks.
#[derive(Default)]
struct Replica {
    waiting: VecDeque<(TaskId, Problem)>,
    /// The task of the step in flight; `true` once it was cancelled.
    running: Option<(TaskId, Problem, bool)>,
}

impl Replica {
    fn held(&self) -> usize {
        self.waiting.len() + usize::from(self.running.is_some())
    }
}

/// Admission and step planning.
struct MeanPolicy {
    nodes: usize,
    replicas: Vec<Replica>,
}

impl MeanPolicy {
    fn new(replicas: usize, nodes: usize) -> Self {
        Self {
            nodes,
            replicas: (0..replicas).map(|_| Replica::default()).collect(),
        }
    }
}

impl Policy for MeanPolicy {
    type Task = MeanTask;
    type Work = Chunks;
    type Links = ();
    type Registration = Registration;
    type Verdict = TaskId;

    fn replicas(&self) -> usize {
        self.replicas.len()
    }

    fn room(&self) -> usize {
        let held: usize = self.replicas.iter().map(Replica::held).sum();
        (HELD_PER_REPLICA * self.replicas.len()).saturating_sub(held)
    }

    fn load(&self, replica: usize) -> usize {
        self.replicas[replica].held()
    }

    fn admit(&mut self, replica: usize, t: MeanTask) -> Registration {
        self.replicas[replica].waiting.push_back((t.id, t.problem));
        let (id, n, reply) = (t.id, t.problem.n, t.reply);
        Registration { id, n, reply }
    }

    fn next_step(&mut self, replica: usize) -> Option<Chunks> {
        let r = &mut self.replicas[replica];
        if r.running.is_some() {
            return None;
        }
        let (task, problem) = r.waiting.pop_front()?;
        r.running = Some((task, problem, false));
        // Node k gets indices [k·n/nodes, (k+1)·n/nodes): equal up to one.
        let (n, nodes) = (u128::from(problem.n), self.nodes as u128);
        let cut = |k: u128| (n * k / nodes) as u64;
        let ranges = (0..nodes).map(|k| cut(k)..cut(k + 1)).collect();
        Some(Chunks {
            task,
            problem,
            ranges,
        })
    }

    fn links(&self, _replica: usize) -> Vec<()> {
        vec![(); self.nodes]
    }

    fn completed(&mut self, replica: usize, verdict: TaskId) {
        let r = &mut self.replicas[replica];
        debug_assert_eq!(r.running.map(|(id, ..)| id), Some(verdict));
        r.running = None;
    }

    fn failed(&mut self, replica: usize) -> Vec<TaskId> {
        let r = &mut self.replicas[replica];
        match r.running.take() {
            // Back to the front: it runs again as soon as the replica does.
            Some((id, problem, false)) => {
                r.waiting.push_front((id, problem));
                vec![id]
            }
            // Cancelled while in flight: it has ended already.
            Some((.., true)) | None => Vec::new(),
        }
    }

    fn cancel(&mut self, task: TaskId) -> bool {
        for r in &mut self.replicas {
            if let Some(at) = r.waiting.iter().position(|&(id, _)| id == task) {
                r.waiting.remove(at);
                return true;
            }
            if let Some((id, _, cancelled)) = &mut r.running {
                if *id == task && !*cancelled {
                    // The step runs on; the merger finds no registration.
                    *cancelled = true;
                    return true;
                }
            }
        }
        false
    }

    fn contains(&self, task: TaskId) -> bool {
        self.replicas.iter().any(|r| {
            r.waiting.iter().any(|&(id, _)| id == task)
                || r.running.is_some_and(|(id, ..)| id == task)
        })
    }

    fn drop_task(&mut self, task: TaskId) {
        for r in &mut self.replicas {
            r.waiting.retain(|&(id, _)| id != task);
            if r.running.is_some_and(|(id, ..)| id == task) {
                r.running = None;
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.replicas.iter().all(|r| r.held() == 0)
    }

    fn stats(&self) -> PolicyStats {
        PolicyStats {
            running: self.replicas.iter().filter(|r| r.running.is_some()).count(),
            waiting: self.replicas.iter().map(|r| r.waiting.len()).sum(),
            ..PolicyStats::default()
        }
    }
}

/// A node's worker: the sum of the samples in its slice of the step.
struct PartialSum {
    index: usize,
    /// Set: fail the next step (shared across restarts, so it fires once).
    fault: Option<Arc<AtomicBool>>,
}

impl NodeWorker for PartialSum {
    type Work = Chunks;
    type Links = ();
    type Output = f64;

    fn run(&mut self, w: &Chunks, _: &()) -> Result<f64, NodeError> {
        if self
            .fault
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::SeqCst))
        {
            return Err(NodeError::Failed(format!(
                "injected fault on node {}",
                self.index
            )));
        }
        let range = w.ranges.get(self.index).cloned().ok_or_else(|| {
            NodeError::Failed(format!("the step has no slice for node {}", self.index))
        })?;
        Ok(range.map(|i| w.problem.sample(i)).sum())
    }

    fn abort(_: &()) {
        // No peer traffic, so nothing can be blocked on this node.
    }
}

/// Adds the partial sums and answers the requester.
#[derive(Default)]
struct MeanMerge {
    open: HashMap<TaskId, Registration>,
}

impl Merge for MeanMerge {
    type Work = Chunks;
    type Output = f64;
    type Registration = Registration;
    type Verdict = TaskId;

    fn register(&mut self, reg: Registration) {
        self.open.insert(reg.id, reg);
    }

    fn merge(&mut self, w: &Chunks, partials: Vec<f64>) -> TaskId {
        // In node order, so the sum is the same on every run.
        let sum: f64 = partials.iter().sum();
        if let Some(reg) = self.open.remove(&w.task) {
            let _ = reg.reply.send((reg.id, Ok(sum / reg.n as f64)));
        }
        w.task
    }

    fn end(&mut self, task: TaskId, end: End) {
        if let Some(reg) = self.open.remove(&task) {
            let why = match end {
                End::Cancelled => "cancelled".to_string(),
                End::Failed(e) => e,
            };
            let _ = reg.reply.send((task, Err(why)));
        }
    }
}

/// The scheduler's figures once it is idle: a requester hears its answer from
/// the merger a moment before the scheduler applies the last verdict.
fn idle_stats(p: &Pipeline<MeanPolicy>) -> Option<SchedulerStats> {
    let t0 = Instant::now();
    loop {
        let s = p.stats()?;
        if s.idle || t0.elapsed() > Duration::from_secs(5) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    let mut inject_fault = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--inject-fault" => inject_fault = true,
            other => {
                eprintln!("error: unknown argument {other:?}\nusage: map_reduce [--inject-fault]");
                exit(2);
            }
        }
    }
    let fault = Arc::new(AtomicBool::new(inject_fault));
    let factory: WorkerFactory<PartialSum> = Arc::new(move |id: NodeId| {
        Ok(PartialSum {
            index: id.index,
            fault: (id.index == 2).then(|| fault.clone()),
        })
    });
    let cfg = PipelineConfig {
        queue_capacity: 64,
        replicas: 1,
        nodes_per_replica: NODES,
        supervision: Supervision::default(),
    };
    let pipeline = Pipeline::start(
        MeanPolicy::new(cfg.replicas, NODES),
        MeanMerge::default(),
        factory,
        cfg,
    )
    .expect("the pipeline starts");

    let problems = [(0.0, 1.0), (-1.0, 1.0), (0.0, 3.0), (-2.0, 0.5), (1.0, 2.0)]
        .map(|(a, b)| Problem { a, b, n: SAMPLES });
    // Submit them all at once; answers come back on one channel as they end.
    let (tx, rx) = channel();
    let t0 = Instant::now();
    for (id, &problem) in (0..).zip(&problems) {
        let reply = tx.clone();
        let task = MeanTask { id, problem, reply };
        pipeline.submit(task).expect("the queue has room");
    }
    drop(tx);
    let mut parallel: Vec<Answer> = vec![Err("no answer".into()); problems.len()];
    for _ in 0..problems.len() {
        let (id, answer) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every task answers within a minute");
        parallel[id as usize] = answer;
    }
    let parallel_time = t0.elapsed();
    let stats = idle_stats(&pipeline);
    let restarts: u64 = pipeline.node_stats().iter().map(|(_, c)| c.restarts).sum();
    let drained = pipeline.shutdown(Duration::from_secs(10));

    let t1 = Instant::now();
    let serial: Vec<f64> = problems.iter().map(Problem::serial_mean).collect();
    let serial_time = t1.elapsed();

    println!("mean of exp(-x²) over {SAMPLES} midpoints, {NODES} nodes:");
    let mut ok = drained;
    for (id, (p, answer)) in problems.iter().zip(parallel).enumerate() {
        let (a, b, want) = (p.a, p.b, serial[id]);
        match answer {
            Ok(got) => {
                let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
                let verdict = if rel <= TOLERANCE { "ok" } else { "MISMATCH" };
                ok &= rel <= TOLERANCE;
                println!(
                    "task {id} [{a}, {b}): parallel = {got:.15}, serial = {want:.15}, \
                     relative difference = {rel:.1e} {verdict}"
                );
            }
            Err(e) => {
                ok = false;
                println!("task {id} [{a}, {b}): FAILED: {e}");
            }
        }
    }
    println!(
        "parallel: {:.1} ms for {} tasks; serial: {:.1} ms",
        parallel_time.as_secs_f64() * 1e3,
        problems.len(),
        serial_time.as_secs_f64() * 1e3
    );
    if let Some(s) = stats {
        println!(
            "steps: {} ({} failed), node restarts: {restarts}",
            s.steps, s.failed_steps
        );
    }
    if !drained {
        eprintln!("error: the pipeline did not drain at shutdown");
    }
    if !ok {
        eprintln!("error: the parallel and serial answers differ");
        exit(1);
    }
    println!(
        "all {} answers match the serial computation",
        problems.len()
    );
}
