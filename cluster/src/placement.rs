//! Placement: which rank (process) hosts each compute node, and on which host
//! each rank runs.
//!
//! A job has `ranks` processes; rank 0 runs the queue, the scheduler and the
//! merger (and the HTTP server), and every rank, rank 0 included, hosts the
//! compute nodes the placement gives it. Nodes are named as the engine names
//! them: `(replica, index)`, index `stage · tp + rank` for the target model
//! and `tp · pp` for a replica's draft node.
//!
//! Two policies:
//! * [`Mode::ByHost`] (the default) keeps each stage's tensor-parallel group
//!   in one rank (its ranks are threads, its all-reduces stay in memory) and
//!   spreads the stage groups — replica by replica, stage by stage — over the
//!   ranks in contiguous, balanced blocks, so pipeline stages and replicas go
//!   to different ranks and hosts (the vLLM/Megatron advice: tensor parallel
//!   within a host, pipeline parallel across hosts). A draft node joins its
//!   replica's last stage.
//! * [`Mode::Spread`] puts node after node on rank after rank, round-robin,
//!   whatever the hosts: on one machine it puts peers in different processes,
//!   so tests exercise every cross-process path.
//!
//! What holds for every placement [`Placement::plan`] returns: every rank
//! hosts at least one node (a rank with nothing to do is a configuration
//! mistake, refused as "more ranks than the layout needs"), and no
//! tensor-parallel group spans two hosts unless
//! [`ClusterSpec::allow_cross_host_tp`] says so. Errors name the
//! configuration key at fault.

use std::fmt;

/// How nodes are spread over ranks (`cluster.placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Tensor-parallel groups within a rank; stage groups spread over ranks.
    #[default]
    ByHost,
    /// Node after node on rank after rank.
    Spread,
}

impl Mode {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ByHost => "by-host",
            Mode::Spread => "spread",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = PlacementError;
    fn from_str(s: &str) -> Result<Self, PlacementError> {
        match s {
            "by-host" => Ok(Mode::ByHost),
            "spread" => Ok(Mode::Spread),
            other => Err(PlacementError::new(
                "cluster.placement",
                format!("is '{other}', must be by-host or spread"),
            )),
        }
    }
}

/// A configuration the placement refuses, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct PlacementError {
    /// The configuration key at fault (`cluster.ranks`, …).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl PlacementError {
    /// An error about `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// The `[cluster]` settings: the hosts, the ranks and the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Host names, in order; rank `r` runs on `hosts[r / ranks_per_host]`.
    /// Empty: the hosts MPI reports at run time (one host without MPI).
    pub hosts: Vec<String>,
    /// Ranks (processes) per host.
    pub ranks_per_host: usize,
    /// Ranks in all; 0: `hosts × ranks_per_host` when hosts are given, else
    /// as many as were launched (1 without MPI).
    pub ranks: usize,
    /// The placement policy.
    pub mode: Mode,
    /// Whether a tensor-parallel group may span hosts.
    pub allow_cross_host_tp: bool,
    /// How long a rank may stay silent (no message, no heartbeat) before
    /// the ranks that depend on it count it lost and end the job.
    pub heartbeat_timeout: std::time::Duration,
}

/// The heartbeat timeout unless the config sets one.
pub const HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A heartbeat timeout of `secs` seconds, or why it is refused (0: the
/// job would count every rank lost at once).
pub fn heartbeat_timeout(secs: u64) -> Result<std::time::Duration, &'static str> {
    match secs {
        0 => Err("must be at least 1 (heartbeats go every 0.2 s)"),
        s => Ok(std::time::Duration::from_secs(s)),
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            ranks_per_host: 1,
            ranks: 0,
            mode: Mode::ByHost,
            allow_cross_host_tp: false,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
        }
    }
}

impl ClusterSpec {
    /// The number of ranks, given how many were launched (`launched`: MPI's
    /// world size, or 1).
    pub fn ranks_for(&self, launched: usize) -> usize {
        if self.ranks > 0 {
            self.ranks
        } else if !self.hosts.is_empty() {
            self.hosts.len() * self.ranks_per_host.max(1)
        } else {
            launched.max(1)
        }
    }
}

/// The parallel layout to place: `dp` replicas of `pp` stages of `tp` ranks,
/// each with a draft node or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Whether each replica has a draft model's node.
    pub draft: bool,
}

impl Layout {
    /// Nodes per replica.
    pub fn nodes_per_replica(&self) -> usize {
        self.tp * self.pp + usize::from(self.draft)
    }

    /// `(stage, tensor rank)` of node `index`; the draft node counts as the
    /// last stage's (rank 0).
    fn stage_of(&self, index: usize) -> usize {
        if index >= self.tp * self.pp {
            self.pp - 1
        } else {
            index / self.tp
        }
    }
}

/// Where each node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    layout: Layout,
    mode: Mode,
    /// `[replica][index]` → rank.
    node_rank: Vec<Vec<usize>>,
    /// rank → host name (`None`: not known before MPI reports it).
    hosts: Vec<Option<String>>,
    allow_cross_host_tp: bool,
}

impl Placement {
    /// Places `layout` on the ranks `spec` gives (`launched`: how many
    /// processes were started, 1 without MPI), or says which key makes it
    /// impossible.
    pub fn plan(
        spec: &ClusterSpec,
        layout: Layout,
        launched: usize,
    ) -> Result<Self, PlacementError> {
        if spec.ranks_per_host == 0 {
            return Err(PlacementError::new(
                "cluster.ranks_per_host",
                "must be at least 1",
            ));
        }
        if layout.dp == 0 || layout.tp == 0 || layout.pp == 0 {
            return Err(PlacementError::new(
                "parallel",
                "tp, pp and dp must be at least 1",
            ));
        }
        if let Some(h) = spec.hosts.iter().find(|h| h.trim().is_empty()) {
            return Err(PlacementError::new(
                "cluster.hosts",
                format!("holds an empty host name ('{h}')"),
            ));
        }
        let ranks = spec.ranks_for(launched);
        let capacity = spec.hosts.len() * spec.ranks_per_host;
        if !spec.hosts.is_empty() && ranks > capacity {
            return Err(PlacementError::new(
                "cluster.ranks",
                format!(
                    "is {ranks}, but cluster.hosts ({}) × cluster.ranks_per_host ({}) hold {capacity}",
                    spec.hosts.len(),
                    spec.ranks_per_host
                ),
            ));
        }
        let per_replica = layout.nodes_per_replica();
        let node_rank: Vec<Vec<usize>> = match spec.mode {
            Mode::ByHost => {
                let groups = layout.dp * layout.pp;
                if ranks > groups {
                    return Err(PlacementError::new(
                        "cluster.ranks",
                        format!(
                            "is {ranks}, more ranks than the layout needs: by-host keeps each tensor-parallel group in one rank, and dp ({}) × pp ({}) gives {groups} stage group(s) to place; use at most {groups} ranks, or cluster.placement = \"spread\"",
                            layout.dp, layout.pp
                        ),
                    ));
                }
                (0..layout.dp)
                    .map(|r| {
                        (0..per_replica)
                            .map(|i| {
                                let group = r * layout.pp + layout.stage_of(i);
                                group * ranks / groups
                            })
                            .collect()
                    })
                    .collect()
            }
            Mode::Spread => {
                let nodes = layout.dp * per_replica;
                if ranks > nodes {
                    return Err(PlacementError::new(
                        "cluster.ranks",
                        format!(
                            "is {ranks}, more ranks than the layout needs: the layout has {nodes} node(s) to spread"
                        ),
                    ));
                }
                (0..layout.dp)
                    .map(|r| {
                        (0..per_replica)
                            .map(|i| (r * per_replica + i) % ranks)
                            .collect()
                    })
                    .collect()
            }
        };
        let hosts = (0..ranks)
            .map(|r| {
                spec.hosts
                    .get(r / spec.ranks_per_host)
                    .map(|h| h.trim().to_string())
            })
            .collect();
        let placement = Self {
            layout,
            mode: spec.mode,
            node_rank,
            hosts,
            allow_cross_host_tp: spec.allow_cross_host_tp,
        };
        placement.check_tp_hosts()?;
        Ok(placement)
    }

    /// The same placement with each rank's host as MPI reports it (the
    /// processor name of every rank, in rank order). Where the
    /// configuration names hosts, each must match; then the tensor-parallel
    /// groups are checked against the real hosts.
    pub fn with_reported_hosts(mut self, reported: &[String]) -> Result<Self, PlacementError> {
        if reported.len() != self.hosts.len() {
            return Err(PlacementError::new(
                "cluster.ranks",
                format!(
                    "places nodes on {} rank(s), but {} were launched",
                    self.hosts.len(),
                    reported.len()
                ),
            ));
        }
        for (rank, (want, got)) in self.hosts.iter().zip(reported).enumerate() {
            if let Some(want) = want {
                if !same_host(want, got) {
                    return Err(PlacementError::new(
                        "cluster.hosts",
                        format!("puts rank {rank} on '{want}', but it runs on '{got}'"),
                    ));
                }
            }
        }
        self.hosts = reported.iter().cloned().map(Some).collect();
        self.check_tp_hosts()?;
        Ok(self)
    }

    fn check_tp_hosts(&self) -> Result<(), PlacementError> {
        if self.allow_cross_host_tp {
            return Ok(());
        }
        let l = self.layout;
        for replica in 0..l.dp {
            for stage in 0..l.pp {
                let mut hosts: Vec<&str> = (0..l.tp)
                    .filter_map(|t| self.hosts[self.rank_of(replica, stage * l.tp + t)].as_deref())
                    .collect();
                hosts.sort_unstable();
                hosts.dedup();
                if hosts.len() > 1 {
                    return Err(PlacementError::new(
                        "cluster.placement",
                        format!(
                            "splits the tensor-parallel group of replica {replica}, stage {stage} across hosts {}; every layer would all-reduce over the network. Set cluster.allow_cross_host_tp = true to allow it, or place it within a host",
                            hosts.join(" and ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The layout placed.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The policy used.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.hosts.len()
    }

    /// The rank that hosts node `index` of `replica`.
    pub fn rank_of(&self, replica: usize, index: usize) -> usize {
        self.node_rank[replica][index]
    }

    /// Rank `rank`'s host, where known.
    pub fn host_of(&self, rank: usize) -> Option<&str> {
        self.hosts.get(rank).and_then(|h| h.as_deref())
    }

    /// The nodes `(replica, index)` rank `rank` hosts.
    pub fn nodes_on(&self, rank: usize) -> Vec<(usize, usize)> {
        self.node_rank
            .iter()
            .enumerate()
            .flat_map(|(r, nodes)| {
                nodes
                    .iter()
                    .enumerate()
                    .filter(move |(_, &k)| k == rank)
                    .map(move |(i, _)| (r, i))
            })
            .collect()
    }

    /// Whether every node runs in rank 0 (a one-process job).
    pub fn is_local(&self) -> bool {
        self.hosts.len() == 1
    }
}

fn same_host(a: &str, b: &str) -> bool {
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_ascii_lowercase();
    a.eq_ignore_ascii_case(b) || short(a) == short(b)
}

impl fmt::Display for Placement {
    /// One line per node: replica, node (stage and tensor rank, or draft),
    /// rank and host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.layout;
        writeln!(
            f,
            "placement {} over {} rank(s): dp={} × pp={} × tp={}{}",
            self.mode.as_str(),
            self.ranks(),
            l.dp,
            l.pp,
            l.tp,
            if l.draft {
                " + a draft node per replica"
            } else {
                ""
            }
        )?;
        for (replica, nodes) in self.node_rank.iter().enumerate() {
            for (index, &rank) in nodes.iter().enumerate() {
                let role = if index >= l.tp * l.pp {
                    "draft".to_string()
                } else {
                    format!("stage {} tp {}", index / l.tp, index % l.tp)
                };
                writeln!(
                    f,
                    "  replica {replica} node {index} ({role}): rank {rank} on {}",
                    self.host_of(rank).unwrap_or("(the host MPI reports)")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dp: usize, tp: usize, pp: usize) -> Layout {
        Layout {
            dp,
            tp,
            pp,
            draft: false,
        }
    }

    fn spec(mode: Mode, ranks: usize) -> ClusterSpec {
        ClusterSpec {
            mode,
            ranks,
            ..ClusterSpec::default()
        }
    }

    fn ranks(p: &Placement) -> Vec<Vec<usize>> {
        p.node_rank.clone()
    }

    #[test]
    fn the_default_is_one_rank_holding_every_node() {
        let p = Placement::plan(&ClusterSpec::default(), layout(2, 3, 2), 1).unwrap();
        assert!(p.is_local());
        assert_eq!(p.nodes_on(0).len(), 12);
    }

    #[test]
    fn by_host_keeps_tensor_groups_together_and_spreads_stages_and_replicas() {
        // tp=3 × pp=2 on 2 ranks: a stage per rank.
        let p = Placement::plan(&spec(Mode::ByHost, 2), layout(1, 3, 2), 2).unwrap();
        assert_eq!(ranks(&p), [vec![0, 0, 0, 1, 1, 1]]);
        // dp=2 on 2 ranks: a replica per rank.
        let p = Placement::plan(&spec(Mode::ByHost, 2), layout(2, 1, 1), 2).unwrap();
        assert_eq!(ranks(&p), [vec![0], vec![1]]);
        // dp=2 × pp=2 on 2 ranks: whole replicas per rank; on 4, a stage each.
        let p = Placement::plan(&spec(Mode::ByHost, 2), layout(2, 1, 2), 2).unwrap();
        assert_eq!(ranks(&p), [vec![0, 0], vec![1, 1]]);
        let p = Placement::plan(&spec(Mode::ByHost, 4), layout(2, 1, 2), 4).unwrap();
        assert_eq!(ranks(&p), [vec![0, 1], vec![2, 3]]);
        // A draft node joins its replica's last stage.
        let l = Layout {
            draft: true,
            ..layout(1, 2, 2)
        };
        let p = Placement::plan(&spec(Mode::ByHost, 2), l, 2).unwrap();
        assert_eq!(ranks(&p), [vec![0, 0, 1, 1, 1]]);
    }

    #[test]
    fn spread_puts_node_after_node_on_rank_after_rank() {
        let p = Placement::plan(&spec(Mode::Spread, 2), layout(1, 2, 1), 2).unwrap();
        assert_eq!(ranks(&p), [vec![0, 1]]);
        let p = Placement::plan(&spec(Mode::Spread, 3), layout(2, 1, 2), 3).unwrap();
        assert_eq!(ranks(&p), [vec![0, 1], vec![2, 0]]);
        assert_eq!(p.nodes_on(0), [(0, 0), (1, 1)]);
    }

    #[test]
    fn ranks_default_to_the_hosts_or_to_what_was_launched() {
        let s = ClusterSpec {
            hosts: vec!["a".into(), "b".into()],
            ranks_per_host: 2,
            ..ClusterSpec::default()
        };
        assert_eq!(s.ranks_for(1), 4);
        assert_eq!(ClusterSpec::default().ranks_for(3), 3);
        assert_eq!(spec(Mode::Spread, 2).ranks_for(5), 2);
    }

    #[test]
    fn bad_clusters_are_refused_naming_the_key() {
        let e = Placement::plan(&spec(Mode::ByHost, 3), layout(1, 4, 2), 3).unwrap_err();
        assert_eq!(e.field, "cluster.ranks");
        assert!(e.reason.contains("more ranks than the layout needs"), "{e}");
        let e = Placement::plan(&spec(Mode::Spread, 5), layout(1, 2, 2), 5).unwrap_err();
        assert_eq!(e.field, "cluster.ranks");
        // A tensor group across two hosts.
        let two_hosts = ClusterSpec {
            hosts: vec!["a".into(), "b".into()],
            mode: Mode::Spread,
            ..ClusterSpec::default()
        };
        let e = Placement::plan(&two_hosts, layout(1, 2, 1), 1).unwrap_err();
        assert_eq!(e.field, "cluster.placement");
        assert!(e.reason.contains("allow_cross_host_tp"), "{e}");
        let allowed = ClusterSpec {
            allow_cross_host_tp: true,
            ..two_hosts.clone()
        };
        assert!(Placement::plan(&allowed, layout(1, 2, 1), 1).is_ok());
        // More ranks than the hosts hold.
        let e = Placement::plan(
            &ClusterSpec {
                ranks: 3,
                ..two_hosts
            },
            layout(1, 1, 4),
            1,
        )
        .unwrap_err();
        assert_eq!(e.field, "cluster.ranks");
        let e = "round-robin".parse::<Mode>().unwrap_err();
        assert_eq!(e.field, "cluster.placement");
    }

    #[test]
    fn reported_hosts_must_match_the_configured_ones_and_keep_tp_within_one() {
        let p = Placement::plan(&spec(Mode::Spread, 2), layout(1, 2, 1), 2).unwrap();
        // Both ranks on one host: fine.
        let same = p.clone().with_reported_hosts(&["vm".into(), "vm".into()]);
        assert!(same.is_ok());
        // On two hosts, the tp group is split.
        let e = p
            .clone()
            .with_reported_hosts(&["a".into(), "b".into()])
            .unwrap_err();
        assert_eq!(e.field, "cluster.placement");
        let e = p.with_reported_hosts(&["a".into()]).unwrap_err();
        assert_eq!(e.field, "cluster.ranks");
        let named = ClusterSpec {
            hosts: vec!["node-a.example".into()],
            ranks_per_host: 2,
            ..spec(Mode::ByHost, 0)
        };
        let p = Placement::plan(&named, layout(1, 1, 2), 2).unwrap();
        assert!(p
            .clone()
            .with_reported_hosts(&["node-a".into(), "NODE-A".into()])
            .is_ok());
        let e = p
            .with_reported_hosts(&["node-a".into(), "node-b".into()])
            .unwrap_err();
        assert_eq!(e.field, "cluster.hosts");
    }
}
