//! The MPI job this process is a rank of, if it was started by `mpirun` or
//! `srun` (more than one rank in the launcher's environment).
//!
//! [`Job::start`] initializes MPI (feature `mpi`; without it, a launch of
//! several ranks is refused, saying how to build it) and learns every
//! rank's host, watching the ranks' heartbeats with the default timeout
//! from then on (a rank stopped at start-up ends the job). [`cluster()`]
//! gives the engine its [`Cluster`] for a layout: the placement of its
//! nodes on the job's ranks, checked against the hosts MPI reports. Rank 0
//! builds the engine and runs the command; the other ranks serve their
//! nodes ([`serves_nodes`]) and print nothing.
//! When the command fails on any rank, [`Job::fail`] aborts the whole job
//! (`MPI_Abort`), so no rank waits for a peer that has gone. The first
//! [`cluster()`] sets the transport's heartbeat watch to the configured
//! timeout: a peer silent that long fails the transport, which ends the
//! command on every rank that depends on it. Leaving the job
//! ([`Job::finish`]) waits for a stopped rank no longer than that timeout.
//! Every rank ignores SIGUSR1, which the launcher forwards to all of them:
//! rank 0's server takes it as a drain (`parallm::serve`).

use std::sync::{Arc, OnceLock};

use parallm::actors::llm::Cluster;

/// This process's view of its job.
struct Context {
    transport: Arc<dyn cluster::Transport>,
    hosts: Vec<String>,
}

static CONTEXT: OnceLock<Context> = OnceLock::new();

/// The job, held by `main` until the command is over.
pub struct Job {
    #[cfg(feature = "mpi")]
    mpi: Option<cluster::mpi::Mpi>,
}

impl Job {
    /// Joins the job the launcher started, if any.
    pub fn start() -> Result<Self, String> {
        let launched = parallm::config::launched_ranks();
        if launched <= 1 {
            return Ok(Self {
                #[cfg(feature = "mpi")]
                mpi: None,
            });
        }
        #[cfg(feature = "mpi")]
        {
            // The launcher forwards SIGUSR1 to every rank (`mpirun` does,
            // and so does `srun`): rank 0's server drains on it, installing
            // its own handler, and no rank may die of it, as its default
            // action would have it.
            // SAFETY: SIG_IGN runs no code in the process; `signal` only
            // changes the disposition, before any thread of ours waits on it.
            unsafe {
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
            }
            let mpi = cluster::mpi::Mpi::init().map_err(|e| e.to_string())?;
            let transport: Arc<dyn cluster::Transport> = mpi.transport();
            // Until the command's configuration names its timeout, the
            // default one watches the ranks, so a rank stopped at start-up
            // ends the job instead of holding the host exchange forever.
            transport.watch(cluster::placement::HEARTBEAT_TIMEOUT);
            let hosts = match mpi.hosts() {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: rank {}: {e}", mpi.rank());
                    mpi.abort(1);
                }
            };
            let _ = CONTEXT.set(Context { transport, hosts });
            Ok(Self { mpi: Some(mpi) })
        }
        #[cfg(not(feature = "mpi"))]
        Err(format!(
            "started as one of {launched} ranks, but this parallm was built without MPI; build it with `cargo build --release --features mpi` (tests/support/install-openmpi.sh installs OpenMPI)"
        ))
    }

    /// Leaves the job after the command succeeded: MPI is finalized once
    /// every rank has (a barrier first).
    pub fn finish(self) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = self.mpi {
            mpi.finish();
        }
    }

    /// Ends the job after a failed command: every rank stops, non-zero.
    pub fn fail(self) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = self.mpi {
            mpi.abort(1);
        }
    }
}

/// This process's rank (0 outside a job).
pub fn rank() -> usize {
    CONTEXT.get().map_or(0, |c| c.transport.rank())
}

/// Whether this process only serves compute nodes (a rank other than 0).
pub fn serves_nodes() -> bool {
    rank() != 0
}

/// The cluster for `layout` placed as `spec` says, inside a job; `None`
/// outside one.
pub fn cluster(
    layout: cluster::Layout,
    spec: &cluster::ClusterSpec,
) -> Result<Option<Cluster>, String> {
    let Some(c) = CONTEXT.get() else {
        return Ok(None);
    };
    let placement = cluster::Placement::plan(spec, layout, c.hosts.len())
        .and_then(|p| p.with_reported_hosts(&c.hosts))
        .map_err(|e| e.to_string())?;
    c.transport.watch(spec.heartbeat_timeout);
    Ok(Some(Cluster {
        transport: c.transport.clone(),
        placement: Arc::new(placement),
    }))
}
