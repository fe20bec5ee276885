//! The MPI transport under `mpirun` (feature `mpi`; `.ci/run` installs
//! OpenMPI with tests/support/install-openmpi.sh and runs these): every
//! rank of `parallm-mpi-check check` compares the transport's all-reduces
//! and gathers bit for bit with the in-process collective's, over TCP on
//! loopback (`--mca btl tcp,self`, the network path) and over shared
//! memory, with groups that span processes and groups with several ranks
//! in one process, checks that an abort reaches every rank, and broadcasts
//! a 128-byte id. The `stall-` runs check that a rank that stops answering
//! at start-up, halfway through a large message, or at MPI's last barrier
//! or just after it, ends the job instead of leaving rank 0 waiting
//! forever.

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// `parallm-mpi-check MODE` on `np` ranks over `btl`, to its end; `None`
    /// if it still ran after `limit` (then it is killed, every rank too).
    fn run(np: usize, btl: &str, mode: &str, limit: Duration) -> Option<Output> {
        let mark = format!("{mode}-{np}-{btl}-{}", std::process::id());
        let mut child = Command::new("mpirun")
            .args([
                "--oversubscribe",
                "-np",
                &np.to_string(),
                "--mca",
                "btl",
                btl,
            ])
            .arg(env!("CARGO_BIN_EXE_parallm-mpi-check"))
            .arg(mode)
            // The CI machine runs as root; OpenMPI refuses that unless told.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("PARALLM_TEST_MPI", &mark)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mpirun (tests/support/install-openmpi.sh installs it)");
        let started = Instant::now();
        while child.try_wait().expect("wait for mpirun").is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                kill_marked(&mark);
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("mpirun's output");
        kill_marked(&mark);
        Some(out)
    }

    /// Runs the check on `np` ranks over `btl`, failing after `limit`.
    fn check(np: usize, btl: &str, limit: Duration) {
        let Some(out) = run(np, btl, "check", limit) else {
            panic!("{np} ranks over {btl}: no answer within {limit:?}");
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{np} ranks over {btl}:\n{stdout}\n{stderr}"
        );
        for rank in 0..np {
            assert!(
                stdout.contains(&format!("rank {rank}: ok")),
                "rank {rank} over {btl}:\n{stdout}\n{stderr}"
            );
        }
    }

    /// Runs `parallm-mpi-check stall-WHEN` on 2 ranks over TCP (where a
    /// large message travels in fragments); the job must end, non-zero,
    /// within `limit`. Its stdout and stderr.
    fn stall(when: &str, limit: Duration) -> (String, String) {
        let Some(out) = run(2, "tcp,self", &format!("stall-{when}"), limit) else {
            panic!(
                "stall-{when}: the job still ran after {limit:?}; rank 0 waits for a stopped rank"
            );
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "stall-{when}: the job exited 0\n{stdout}\n{stderr}"
        );
        (stdout, stderr)
    }

    /// SIGKILLs what is left of a job: processes whose environment holds
    /// `PARALLM_TEST_MPI=mark` (a stopped rank, if mpirun left it).
    fn kill_marked(mark: &str) {
        let want = format!("PARALLM_TEST_MPI={mark}");
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }

    #[test]
    fn a_rank_that_stops_halfway_through_a_message_is_caught_by_the_heartbeat() {
        let (stdout, stderr) = stall("mid-message", Duration::from_secs(60));
        assert!(
            stdout.contains("rank 0: caught:") && stdout.contains("rank 1 has not answered"),
            "rank 0 did not name the silent rank:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn a_rank_that_stops_before_the_last_barrier_ends_the_job() {
        let (stdout, stderr) = stall("at-finish", Duration::from_secs(60));
        assert!(
            stderr.contains("the MPI job cannot finish: rank 1 has not answered"),
            "rank 0 did not name the silent rank:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn a_rank_that_stops_before_the_host_exchange_ends_the_job() {
        let (stdout, stderr) = stall("at-start", Duration::from_secs(60));
        assert!(
            stdout.contains("rank 0: caught:")
                && stdout.contains(
                    "the ranks could not exchange their host names: rank 1 has not answered"
                ),
            "rank 0 did not name the silent rank:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn a_rank_that_stops_after_the_last_barrier_ends_the_job() {
        let (stdout, stderr) = stall("after-finish", Duration::from_secs(60));
        assert!(
            stderr.contains("the MPI job cannot finish: MPI_Finalize waited"),
            "rank 0 did not say why it could not finish:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn the_transport_sums_as_the_thread_collective_does_over_tcp() {
        check(2, "tcp,self", Duration::from_secs(120));
        check(3, "tcp,self", Duration::from_secs(120));
    }

    #[test]
    fn the_transport_sums_as_the_thread_collective_does_over_shared_memory() {
        check(2, "vader,self", Duration::from_secs(120));
    }
}

#[cfg(not(feature = "mpi"))]
#[test]
#[ignore = "needs the mpi feature and OpenMPI: bash tests/support/install-openmpi.sh && cargo test --release -p parallm-cluster --features mpi"]
fn the_mpi_transport_needs_the_mpi_feature() {}
