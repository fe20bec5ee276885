//! `parallm-mpi-check check|bench`, run under `mpirun` (feature `mpi`).
//!
//! `check`: every rank runs tensor-parallel groups over the MPI transport —
//! one group rank per process, and groups with several ranks in one process
//! — and compares every all-reduce and gather, bit for bit, with the sums
//! the in-process collective makes of the same contributions; then aborts a
//! group from one rank and checks that every other rank's wait fails; then
//! broadcasts a 128-byte id (the NCCL unique id's size) both with
//! `MPI_Bcast` and over the transport. Prints `rank R: ok` per rank and
//! exits non-zero on the first difference.
//!
//! `stall-at-start`, `stall-mid-message`, `stall-at-finish` and
//! `stall-after-finish` (2 ranks): rank 1 stops itself (`SIGSTOP`) — before
//! the ranks exchange their host names, halfway through sending rank 0 a
//! 1 GiB message, just before MPI's last barrier, or just after it (before
//! `MPI_Finalize`) — and rank 0, watching heartbeats with a 1 s timeout,
//! must notice and end the job rather than wait for it forever. Rank 0
//! prints `rank 0: caught: …` in the first two cases; the others print the
//! error of leaving the job on stderr.
//!
//! `bench [--iters N]`: per-layer all-reduce time (two all-reduces of
//! `rows × 576` floats, the reference model's hidden size) over the
//! transport (gather, then a rank-ordered sum), with `MPI_Allreduce`, and,
//! on rank 0, with the in-process thread collective for as many threads as
//! there are ranks; medians, in microseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::mpi::Mpi;
use cluster::order_sensitive_values as values;
use cluster::{Transport, TransportCollective};
use framework::collective::{Collective, ThreadCollective};

const HIDDEN: usize = 576;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "check".into());
    let iters = std::env::args()
        .skip_while(|a| a != "--iters")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200usize);
    let mpi = match Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(when) = mode.strip_prefix("stall-") {
        stall(mpi, when);
    }
    let result = match mode.as_str() {
        "check" => check(&mpi),
        "bench" => {
            bench(&mpi, iters);
            Ok(())
        }
        other => Err(format!("unknown mode '{other}' (check or bench)")),
    };
    match result {
        Ok(()) => {
            if mode == "check" {
                println!("rank {}: ok", mpi.rank());
            }
            drop(mpi);
        }
        Err(e) => {
            eprintln!("rank {}: FAILED: {e}", mpi.rank());
            std::process::exit(1);
        }
    }
}

/// How long rank 0 lets rank 1 be silent in the `stall-` modes.
const STALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The `stall-` modes: rank 1 stops itself at `when` (`at-start`,
/// `mid-message`, `at-finish` or `after-finish`); rank 0 must end the job.
fn stall(mpi: Mpi, when: &str) -> ! {
    if mpi.size() != 2
        || !matches!(
            when,
            "at-start" | "mid-message" | "at-finish" | "after-finish"
        )
    {
        eprintln!("error: stall-at-start, stall-mid-message, stall-at-finish or stall-after-finish, on 2 ranks");
        std::process::exit(2);
    }
    let t = mpi.transport();
    t.watch(STALL_TIMEOUT);
    let stop_myself = || {
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
    };
    if when == "at-start" {
        if mpi.rank() == 1 {
            stop_myself();
        }
        match mpi.hosts() {
            Ok(h) => println!("rank {}: the hosts arrived: {h:?}", mpi.rank()),
            Err(e) => println!("rank {}: caught: {e}", mpi.rank()),
        }
        mpi.abort(1);
    }
    mpi.barrier();
    let address = cluster::Address {
        stream: 300,
        from: 1,
        to: 0,
    };
    match (when, mpi.rank()) {
        ("mid-message", 1) => {
            // Over TCP a GiB takes far longer than the pause: rank 0 has
            // matched the message and is receiving it when this rank stops.
            if let Err(e) = t.send(0, address, &vec![7u8; 1 << 30]) {
                eprintln!("rank 1: FAILED: {e}");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(20));
            stop_myself();
        }
        ("mid-message", _) => {
            match t.recv(1, address, Some(Duration::from_secs(120))) {
                Ok(m) => println!("rank 0: the whole message arrived ({} bytes)", m.len()),
                Err(e) => println!("rank 0: caught: {e}"),
            }
            mpi.abort(1);
        }
        ("after-finish", 1) => {
            mpi.finish_with(stop_myself);
            std::process::exit(0);
        }
        ("at-finish", 1) => stop_myself(),
        _ => {}
    }
    // Rank 0 at finish (and a rank 1 let go on): leaving the job, which
    // ends it with an error if the peer is silent.
    mpi.finish();
    std::process::exit(0);
}

/// What the in-process collective gives for these contributions: a
/// thread per group rank, summing in rank order.
fn thread_reference(n: usize, len: usize, round: usize) -> Vec<u32> {
    let handles: Vec<_> = ThreadCollective::group(n)
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let mut buf = values(c.rank(), len, round);
                c.all_reduce_sum(&mut buf).map(|()| buf)
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(Ok(buf)) = h.join() {
            out = buf.iter().map(|x| x.to_bits()).collect();
        }
    }
    out
}

/// A group rank's results: per round, the all-reduce's bits, then the
/// gather's (empty off the root).
type RankResults = (usize, Vec<Vec<u32>>);

/// Runs group ranks hosted here (`members[r] == this rank`) as threads.
fn run_group(
    t: &Arc<dyn Transport>,
    stream: u64,
    members: &[usize],
) -> Result<Vec<RankResults>, String> {
    let members: Arc<[usize]> = members.into();
    let mine: Vec<usize> = (0..members.len())
        .filter(|&r| members[r] == t.rank())
        .collect();
    let handles: Vec<_> =
        mine.into_iter()
            .map(|r| {
                let c = TransportCollective::new(
                    t.clone(),
                    stream,
                    members.clone(),
                    r,
                    Some(Duration::from_secs(60)),
                );
                std::thread::spawn(move || -> Result<RankResults, String> {
                    let n = c.world_size();
                    let mut out = Vec::new();
                    for round in 0..4 {
                        let len = 1000 + round * 577;
                        let mut buf = values(r, len, round);
                        c.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                        out.push(buf.iter().map(|x| x.to_bits()).collect());
                        let local = values(r, 3 * 5, round + 9);
                        let gathered = c
                            .gather_cols_to_root(&local, 3, r * 5, n * 5)
                            .map_err(|e| e.to_string())?;
                        // Other ranks get no gather: an empty entry.
                        out.push(gathered.map_or_else(Vec::new, |full| {
                            full.iter().map(|x| x.to_bits()).collect()
                        }));
                    }
                    Ok((r, out))
                })
            })
            .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| "a group rank panicked".to_string())?)
        .collect()
}

fn check(mpi: &Mpi) -> Result<(), String> {
    let t: Arc<dyn Transport> = mpi.transport();
    let n = mpi.size();
    let hosts = mpi.hosts().map_err(|e| e.to_string())?;
    if hosts.len() != n || hosts.iter().any(String::is_empty) {
        return Err(format!("hosts {hosts:?}"));
    }
    // One group rank per process; two per process; and a mixed group.
    let layouts: Vec<Vec<usize>> = vec![
        (0..n).collect(),
        (0..2 * n).map(|r| r / 2).collect(),
        (0..n + 1).map(|r| r.min(n - 1)).collect(),
    ];
    for (g, members) in layouts.iter().enumerate() {
        let got = run_group(&t, 100 + g as u64, members)?;
        let size = members.len();
        for (r, results) in got {
            for (round, result) in results.chunks(2).enumerate() {
                let len = 1000 + round * 577;
                let want = thread_reference(size, len, round);
                if result[0] != want {
                    return Err(format!(
                        "group {members:?}, rank {r}, round {round}: the all-reduce differs from the thread collective's"
                    ));
                }
                if r == 0 {
                    let mut full = vec![0f32; 3 * size * 5];
                    for src in 0..size {
                        let local = values(src, 15, round + 9);
                        for row in 0..3 {
                            full[row * size * 5 + src * 5..][..5]
                                .copy_from_slice(&local[row * 5..][..5]);
                        }
                    }
                    let want: Vec<u32> = full.iter().map(|x| x.to_bits()).collect();
                    if result.get(1) != Some(&want) {
                        return Err(format!(
                            "group {members:?}, round {round}: the gather differs"
                        ));
                    }
                }
            }
        }
    }
    // An abort from the last rank fails every other rank's wait.
    let members: Arc<[usize]> = (0..n).collect::<Vec<_>>().into();
    let c = TransportCollective::new(t.clone(), 200, members, mpi.rank(), None);
    if mpi.rank() + 1 == n {
        c.abort();
    } else {
        let mut buf = vec![1.0f32; 64];
        match c.all_reduce_sum(&mut buf) {
            Err(framework::Error::Aborted(_)) => {}
            other => return Err(format!("an aborted group's all-reduce returned {other:?}")),
        }
    }
    // The NCCL id's way: MPI_Bcast, and the transport's broadcast.
    let id: Vec<u8> = (0..128u8)
        .map(|b| b.wrapping_mul(59).wrapping_add(7))
        .collect();
    let mut buf = if mpi.rank() == 0 {
        id.clone()
    } else {
        vec![0; 128]
    };
    mpi.broadcast(0, &mut buf);
    if buf != id {
        return Err("MPI_Bcast delivered other bytes".into());
    }
    let ranks: Vec<usize> = (0..n).collect();
    let got = cluster::broadcast_bytes(&t, 300, 0, &ranks, if mpi.rank() == 0 { &id } else { &[] })
        .map_err(|e| e.to_string())?;
    if got != id {
        return Err("the transport's broadcast delivered other bytes".into());
    }
    mpi.barrier();
    let left = t.mailbox().pending();
    if left != 0 {
        return Err(format!("{left} message(s) left untaken"));
    }
    Ok(())
}

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn bench(mpi: &Mpi, iters: usize) {
    let t: Arc<dyn Transport> = mpi.transport();
    let n = mpi.size();
    let members: Arc<[usize]> = (0..n).collect::<Vec<_>>().into();
    if mpi.rank() == 0 {
        println!("rows\ttransport (gather + ordered sum) µs/layer\tMPI_Allreduce µs/layer\tthreads in one process µs/layer");
    }
    for (k, rows) in [1usize, 16, 64].into_iter().enumerate() {
        let len = rows * HIDDEN;
        let c = TransportCollective::new(
            t.clone(),
            1000 + k as u64,
            members.clone(),
            mpi.rank(),
            None,
        );
        let mut buf = values(mpi.rank(), len, 0);
        let mut ours = Vec::with_capacity(iters);
        let mut native = Vec::with_capacity(iters);
        for _ in 0..iters {
            mpi.barrier();
            let s = Instant::now();
            for _ in 0..2 {
                let _ = c.all_reduce_sum(&mut buf);
            }
            ours.push(s.elapsed());
            mpi.barrier();
            let s = Instant::now();
            for _ in 0..2 {
                mpi.native_all_reduce(&mut buf);
            }
            native.push(s.elapsed());
            // Keep the values finite.
            buf.iter_mut().for_each(|x| *x *= 1.0 / n as f32);
        }
        let threads = if mpi.rank() == 0 {
            thread_layer_us(n, len, iters)
        } else {
            0.0
        };
        if mpi.rank() == 0 {
            println!(
                "{rows}\t{:.1}\t{:.1}\t{:.1}",
                median_us(ours),
                median_us(native),
                threads
            );
        }
    }
}

/// Median per-layer time of the in-process collective with `n` threads.
fn thread_layer_us(n: usize, len: usize, iters: usize) -> f64 {
    let handles: Vec<_> = ThreadCollective::group(n)
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let mut buf = values(c.rank(), len, 0);
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let _ = c.barrier();
                    let s = Instant::now();
                    for _ in 0..2 {
                        let _ = c.all_reduce_sum(&mut buf);
                    }
                    times.push(s.elapsed());
                    buf.iter_mut().for_each(|x| *x *= 1.0 / n as f32);
                }
                times
            })
        })
        .collect();
    let mut first = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if let Ok(t) = h.join() {
            if i == 0 {
                first = t;
            }
        }
    }
    if first.is_empty() {
        return f64::NAN;
    }
    median_us(first)
}
