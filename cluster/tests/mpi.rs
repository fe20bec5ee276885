//! The MPI transport under `mpirun` (feature `mpi`; `.ci/run` installs
//! OpenMPI with tests/support/install-openmpi.sh and runs these): every
//! rank of `parallm-mpi-check check` compares the transport's all-reduces
//! and gathers bit for bit with the in-process collective's, over TCP on
//! loopback (`--mca btl tcp,self`, the network path) and over shared
//! memory, with groups that span processes and groups with several ranks
//! in one process, checks that an abort reaches every rank, and broadcasts
//! a 128-byte id.

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// Runs the check on `np` ranks over `btl`, failing after `limit`.
    fn check(np: usize, btl: &str, limit: Duration) {
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
            .arg("check")
            // The CI machine runs as root; OpenMPI refuses that unless told.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mpirun (tests/support/install-openmpi.sh installs it)");
        let started = Instant::now();
        while child.try_wait().expect("wait for mpirun").is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("{np} ranks over {btl}: no answer within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("mpirun's output");
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
