//! The launcher: the `mpirun` (OpenMPI) command line and hostfile that start
//! a job's ranks as its `[cluster]` section places them.
//!
//! Nothing here starts a process: [`LaunchPlan::new`] only builds the
//! command, so `parallm launch --dry-run` prints exactly what `parallm
//! launch` runs. Hosts are checked to resolve before anything is written
//! ([`check_hosts`]), so a typo fails here rather than in `mpirun`.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use crate::placement::{ClusterSpec, PlacementError};

/// What `parallm launch` writes and runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The hostfile to write, and its contents (`None` on one host).
    pub hostfile: Option<(PathBuf, String)>,
    /// The command line: `mpirun`, its options, then the program and its
    /// arguments.
    pub argv: Vec<String>,
}

impl LaunchPlan {
    /// The plan for `ranks` ranks of `spec`, each running `program` with
    /// `args`; `mpirun` is the launcher's program, `extra` its further
    /// options (`cluster.mpirun_args`), `hostfile` where to write the host
    /// list.
    pub fn new(
        spec: &ClusterSpec,
        ranks: usize,
        mpirun: &str,
        extra: &[String],
        hostfile: &Path,
        program: &Path,
        args: &[String],
    ) -> Self {
        let mut argv = vec![mpirun.to_string(), "-np".into(), ranks.to_string()];
        let hostfile = if spec.hosts.is_empty() {
            // One host: every rank here, however many cores it has.
            argv.push("--oversubscribe".into());
            None
        } else {
            let body: String = spec
                .hosts
                .iter()
                .map(|h| format!("{} slots={}\n", h.trim(), spec.ranks_per_host))
                .collect();
            argv.extend([
                "--hostfile".into(),
                hostfile.display().to_string(),
                "--map-by".into(),
                format!("ppr:{}:node", spec.ranks_per_host),
            ]);
            Some((hostfile.to_path_buf(), body))
        };
        // Each rank's compute pools pin their own threads.
        argv.extend(["--bind-to".into(), "none".into()]);
        argv.extend(extra.iter().cloned());
        argv.push(program.display().to_string());
        argv.extend(args.iter().cloned());
        Self { hostfile, argv }
    }

    /// The command as one shell line, each word quoted where it needs it.
    pub fn command_line(&self) -> String {
        self.argv
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn shell_quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Refuses a host of `spec` that does not resolve, naming `cluster.hosts`.
pub fn check_hosts(spec: &ClusterSpec) -> Result<(), PlacementError> {
    for host in &spec.hosts {
        let host = host.trim();
        let resolves = (host, 0u16)
            .to_socket_addrs()
            .map(|mut a| a.next().is_some())
            .unwrap_or(false);
        if !resolves {
            return Err(PlacementError::new(
                "cluster.hosts",
                format!("names '{host}', an unknown host (it does not resolve)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hosts_get_a_hostfile_and_a_mapping() {
        let spec = ClusterSpec {
            hosts: vec!["gpu-a".into(), "gpu-b".into()],
            ranks_per_host: 2,
            ..ClusterSpec::default()
        };
        let plan = LaunchPlan::new(
            &spec,
            4,
            "mpirun",
            &["--mca".into(), "btl_tcp_if_include".into(), "eth0".into()],
            Path::new("/tmp/job.hosts"),
            Path::new("/usr/bin/parallm"),
            &["serve".into(), "--config".into(), "/etc/job.toml".into()],
        );
        assert_eq!(
            plan.hostfile,
            Some((
                PathBuf::from("/tmp/job.hosts"),
                "gpu-a slots=2\ngpu-b slots=2\n".into()
            ))
        );
        assert_eq!(
            plan.command_line(),
            "mpirun -np 4 --hostfile /tmp/job.hosts --map-by ppr:2:node --bind-to none --mca btl_tcp_if_include eth0 /usr/bin/parallm serve --config /etc/job.toml"
        );
    }

    #[test]
    fn one_host_needs_no_hostfile_and_words_are_quoted() {
        let plan = LaunchPlan::new(
            &ClusterSpec::default(),
            2,
            "mpirun",
            &[],
            Path::new("unused"),
            Path::new("parallm"),
            &["generate".into(), "it's a prompt".into()],
        );
        assert_eq!(plan.hostfile, None);
        assert_eq!(
            plan.command_line(),
            "mpirun -np 2 --oversubscribe --bind-to none parallm generate 'it'\\''s a prompt'"
        );
    }

    #[test]
    fn unknown_hosts_are_refused() {
        let spec = ClusterSpec {
            hosts: vec!["localhost".into(), "no-such-host.invalid".into()],
            ..ClusterSpec::default()
        };
        let e = check_hosts(&spec).unwrap_err();
        assert_eq!(e.field, "cluster.hosts");
        assert!(e.reason.contains("no-such-host.invalid"), "{e}");
    }
}
