//! A parallel map-reduce on parallm's kit, the short path: the user says how to
//! split a task, what a node computes and how to merge the parts; the kit's
//! queue, scheduler, compute nodes (each on its own thread, restarted when it
//! fails) and merger do the rest.
//!
//! A task is "the mean of exp(-x²) for x in [a, b) over N samples" (the
//! midpoint rule: x_i = a + (i + 0.5)(b - a)/N). It is split into one equal
//! slice of 0..N per node; each node sums f(x_i) over its slice; the merge
//! adds the partial sums in node order and divides by N. The program also
//! computes every answer serially, prints both with their difference, and exits
//! with status 1 if any pair differs by more than 1e-9 relative.
//!
//! `--inject-fault` makes node 2 fail the first part it runs: the node is
//! restarted and the task is run again, so the answers are unchanged.
//!
//! Run: `cargo run --release --example map_reduce [-- --inject-fault]`

use std::ops::Range;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parallm::kit::{NodeId, OneShot, OneShotConfig};

/// Compute nodes.
const NODES: usize = 4;
/// Samples per task.
const SAMPLES: u64 = 1_000_000;
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

fn main() {
    let inject_fault = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--inject-fault") => true,
        Some(other) => {
            eprintln!("error: unknown argument {other:?}\nusage: map_reduce [--inject-fault]");
            exit(2);
        }
    };
    let fault = AtomicBool::new(inject_fault);

    let pool = OneShot::start(
        OneShotConfig {
            nodes: NODES,
            ..OneShotConfig::default()
        },
        // Split: an equal slice of 0..n per node.
        |p: &Problem, nodes| -> Vec<(Problem, Range<u64>)> {
            let k = nodes as u64;
            (0..k)
                .map(|i| (*p, i * p.n / k..(i + 1) * p.n / k))
                .collect()
        },
        // Compute, on the node's thread: the slice's sum.
        move |node: NodeId, (p, slice): &(Problem, Range<u64>)| {
            if node.index == 2 && fault.swap(false, Ordering::SeqCst) {
                return Err(format!("injected fault at {node}"));
            }
            Ok(slice.clone().map(|i| p.sample(i)).sum::<f64>())
        },
        // Merge: partial sums in node order, so every run adds the same way.
        |p: &Problem, sums: Vec<f64>| sums.iter().sum::<f64>() / p.n as f64,
    )
    .expect("the pipeline starts");

    let problems = [(0.0, 1.0), (-1.0, 1.0), (0.0, 3.0), (-2.0, 0.5), (1.0, 2.0)]
        .map(|(a, b)| Problem { a, b, n: SAMPLES });
    let t0 = Instant::now();
    let parallel = pool.map(problems).expect("the pipeline runs");
    let parallel_time = t0.elapsed();
    while !pool.stats().idle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = pool.stats();
    let restarts: u64 = pool.node_stats().iter().map(|(_, c)| c.restarts).sum();
    let drained = pool.shutdown(Duration::from_secs(10));

    let t1 = Instant::now();
    let serial: Vec<f64> = problems.iter().map(Problem::serial_mean).collect();
    let serial_time = t1.elapsed();

    println!("mean of exp(-x²) over {SAMPLES} midpoints, {NODES} nodes:");
    let mut ok = drained;
    for (id, ((p, answer), want)) in problems.iter().zip(parallel).zip(serial).enumerate() {
        let (a, b) = (p.a, p.b);
        match answer {
            Ok(got) => {
                let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
                ok &= rel <= TOLERANCE;
                let verdict = if rel <= TOLERANCE { "ok" } else { "MISMATCH" };
                println!(
                    "task {id} [{a}, {b}): parallel = {got:.15}, serial = {want:.15}, \
                     relative difference = {rel:.1e} {verdict}"
                );
            }
            Err(e) => {
                ok = false;
                println!("task {id} [{a}, {b}): FAILED: {e:?}");
            }
        }
    }
    println!(
        "parallel: {:.1} ms for {} tasks; serial: {:.1} ms",
        parallel_time.as_secs_f64() * 1e3,
        problems.len(),
        serial_time.as_secs_f64() * 1e3
    );
    println!(
        "steps: {} ({} failed), node restarts: {restarts}",
        stats.steps, stats.failed_steps
    );
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
