//! The short path end to end: answers equal a serial computation, a failing
//! node is restarted and its task retried, a dropped answer cancels its task,
//! a full queue refuses at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kit::{End, NodeId, OneShot, OneShotConfig, SubmitError};

fn config(nodes: usize) -> OneShotConfig {
    OneShotConfig {
        nodes,
        backoff: Duration::from_millis(1),
        ..OneShotConfig::default()
    }
}

/// Cuts `0..n` into `nodes` contiguous ranges.
fn ranges(n: &u64, nodes: usize) -> Vec<std::ops::Range<u64>> {
    let k = nodes as u64;
    (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
}

#[test]
fn answers_equal_the_serial_sums_and_a_failed_node_is_retried() {
    let failures = Arc::new(AtomicU32::new(0));
    let f = failures.clone();
    let pool = OneShot::start(
        config(3),
        ranges,
        move |node: NodeId, r: &std::ops::Range<u64>| {
            // Node 1 panics on its first part, then errs on its second.
            if node.index == 1 {
                match f.fetch_add(1, Ordering::SeqCst) {
                    0 => panic!("injected"),
                    1 => return Err("injected error".into()),
                    _ => {}
                }
            }
            Ok(r.clone().map(|x| x * x).sum::<u64>())
        },
        |_, parts: Vec<u64>| parts.iter().sum::<u64>(),
    )
    .unwrap();
    let inputs: Vec<u64> = (1..40).map(|i| i * 37).collect();
    let got = pool.map(inputs.clone()).unwrap();
    let want: Vec<Result<u64, End>> = inputs
        .iter()
        .map(|&n| Ok((0..n).map(|x| x * x).sum()))
        .collect();
    assert_eq!(got, want);
    let restarts: u64 = pool.node_stats().iter().map(|(_, c)| c.restarts).sum();
    assert_eq!(restarts, 2, "{:?}", pool.node_stats());
    assert!(pool.shutdown(Duration::from_secs(5)));
}

#[test]
fn a_task_failing_every_time_ends_with_an_error() {
    let pool = OneShot::start(
        OneShotConfig {
            max_retries: 2,
            ..config(2)
        },
        ranges,
        |node: NodeId, _: &std::ops::Range<u64>| {
            if node.index == 0 {
                Err("always".to_string())
            } else {
                Ok(0u64)
            }
        },
        |_, parts: Vec<u64>| parts.len(),
    )
    .unwrap();
    match pool.submit(10).unwrap().wait() {
        Err(End::Failed(why)) => {
            assert!(why.contains("3 times") && why.contains("always"), "{why}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(pool.shutdown(Duration::from_secs(5)));
}

#[test]
fn dropping_an_answer_cancels_its_task_and_a_full_queue_refuses() {
    let (gate_tx, gate_rx) = crossbeam::channel::unbounded::<()>();
    let pool = OneShot::start(
        OneShotConfig {
            queue_capacity: 2,
            tasks_in_flight: 1,
            ..config(1)
        },
        |n: &u64, _| vec![*n],
        move |_, n: &u64| {
            // The first task waits for the test's go.
            if *n == 0 {
                gate_rx.recv().map_err(|e| e.to_string())?;
            }
            Ok(*n)
        },
        |_, parts: Vec<u64>| parts[0],
    )
    .unwrap();
    // Rebound after the pool, so that a failing assertion drops it first and
    // the waiting node returns.
    let gate_tx = gate_tx;
    let first = pool.submit(0).unwrap();
    // Wait until the first task runs, so the queue fills up behind it.
    while pool.stats().in_flight == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The policy holds one more (twice the tasks in flight), the queue two:
    // the next is refused.
    let held: Vec<_> = (1..=3).map(|n| pool.submit(n).unwrap()).collect();
    assert_eq!(
        pool.submit(5).err(),
        Some(SubmitError::Overloaded { capacity: 2 })
    );
    let dropped = held.into_iter().map(|p| (p.id(), p)).collect::<Vec<_>>();
    let (ids, pendings): (Vec<_>, Vec<_>) = dropped.into_iter().unzip();
    drop(pendings);
    gate_tx.send(()).unwrap();
    assert_eq!(first.wait(), Ok(0));
    // Every dropped task ended without running: the pipeline goes idle with
    // one step done.
    while !pool.stats().idle {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pool.stats().steps, 1, "{:?}", pool.stats());
    assert!(pool.shutdown(Duration::from_secs(5)));
    assert_eq!(ids.len(), 3);
}
