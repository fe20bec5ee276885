//! The `[cluster]` configuration through the `parallm` binary: the
//! placement `config show` prints, the `mpirun` command `launch --dry-run`
//! prints for a 2-host config, and bad clusters refused before any rank
//! starts, naming the key. (The MPI transport itself is tested under
//! `mpirun` in `cluster/tests/mpi.rs`, with the `mpi` feature.)

use std::path::PathBuf;
use std::process::{Command, Output};

fn parallm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(args)
        // Outside mpirun, whatever the test runner's environment says.
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("PMI_SIZE")
        .env_remove("PMIX_SIZE")
        .env_remove("SLURM_STEP_NUM_TASKS")
        .output()
        .expect("run parallm")
}

fn config(name: &str, body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, body).expect("write config");
    (dir, path)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn launch_dry_run_prints_the_mpirun_command_for_two_hosts() {
    let (_dir, path) = config(
        "job.toml",
        r#"
[parallel]
tp = 2
pp = 2
[cluster]
hosts = ["localhost", "127.0.0.1"]
ranks_per_host = 1
mpirun_args = ["--mca", "btl_tcp_if_include", "lo"]
"#,
    );
    let p = path.display().to_string();
    let out = parallm(&["launch", "--config", &p, "--dry-run"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let hostfile = path.with_extension("hosts");
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_parallm"));
    let want = format!(
        "mpirun -np 2 --hostfile {} --map-by ppr:1:node --bind-to none --mca btl_tcp_if_include lo {} serve --config {p}",
        hostfile.display(),
        std::path::absolute(exe).unwrap().display()
    );
    assert!(
        stdout.lines().any(|l| l == want),
        "want the line\n{want}\nin\n{stdout}"
    );
    // Tensor-parallel groups stay on a host; the stages go to one each.
    assert!(
        stdout.contains("replica 0 node 1 (stage 0 tp 1): rank 0 on localhost"),
        "{stdout}"
    );
    assert!(
        stdout.contains("replica 0 node 3 (stage 1 tp 1): rank 1 on 127.0.0.1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("localhost slots=1\n127.0.0.1 slots=1\n"),
        "{stdout}"
    );
    // A dry run writes nothing.
    assert!(!hostfile.exists());

    // The overrides given to launch reach the ranks, API keys unprinted.
    let out = parallm(&[
        "launch",
        "--config",
        &p,
        "--dry-run",
        "--dp",
        "1",
        "--port",
        "18107",
        "--set",
        "server.host=0.0.0.0",
        "--api-key",
        "s3cret",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "serve --config {p} --port 18107 --dp 1 --api-key '****' --set server.host=0.0.0.0\n"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"), "{stdout}");
    // Given through --set, as well; and a relative model path goes whole.
    let out = parallm(&[
        "launch",
        "--config",
        &p,
        "--dry-run",
        "--set",
        "server.api_keys=s3cret",
        "--set",
        "model.path=Cargo.toml",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stdout.contains("s3cret") && stdout.contains("server.api_keys=****"),
        "{stdout}"
    );
    let abs = std::path::absolute("Cargo.toml").unwrap();
    assert!(
        stdout.contains(&format!("model.path={}", abs.display())),
        "{stdout}"
    );

    // What each rank runs can be given after `--`.
    let out = parallm(&[
        "launch",
        "--config",
        &p,
        "--dry-run",
        "--",
        "generate",
        "Hello there",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.trim_end().ends_with("generate 'Hello there'"),
        "{stdout}"
    );
}

#[test]
fn config_show_prints_where_each_node_runs() {
    let out = parallm(&[
        "config",
        "show",
        "--tp",
        "2",
        "--dp",
        "2",
        "--placement",
        "spread",
        "--set",
        "cluster.ranks=3",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("# placement spread over 3 rank(s): dp=2 × pp=1 × tp=2"),
        "{stdout}"
    );
    for line in [
        "replica 0 node 0 (stage 0 tp 0): rank 0",
        "replica 0 node 1 (stage 0 tp 1): rank 1",
        "replica 1 node 0 (stage 0 tp 0): rank 2",
        "replica 1 node 1 (stage 0 tp 1): rank 0",
    ] {
        assert!(stdout.contains(line), "{line} in\n{stdout}");
    }
}

#[test]
fn the_rank_count_is_the_slurm_job_steps_not_the_allocations() {
    let show = |var: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_parallm"))
            .args(["config", "show", "--pp", "2"])
            .env_remove("OMPI_COMM_WORLD_SIZE")
            .env_remove("PMI_SIZE")
            .env_remove("PMIX_SIZE")
            .env_remove("SLURM_NTASKS")
            .env_remove("SLURM_STEP_NUM_TASKS")
            .env(var, "2")
            .output()
            .expect("run parallm");
        let (stdout, stderr) = text(&out);
        (out.status.success(), stdout + &stderr)
    };
    // A batch script of a 2-task allocation is one process.
    let (ok, alone) = show("SLURM_NTASKS");
    assert!(ok && alone.contains("over 1 rank(s)"), "{alone}");
    // srun's tasks are the job's ranks: a build with MPI joins them, one
    // without says it cannot.
    let (ok, step) = show("SLURM_STEP_NUM_TASKS");
    assert!(
        if ok {
            step.contains("over 2 rank(s)")
        } else {
            step.contains("started as one of 2 ranks")
        },
        "{step}"
    );
}

#[test]
fn bad_clusters_are_refused_before_any_rank_starts_naming_the_key() {
    let cases = [
        // More ranks than the layout needs.
        ("[parallel]\npp = 2\n[cluster]\nranks = 3\n", "cluster.ranks", "more ranks than the layout needs"),
        // A tensor-parallel group across two hosts.
        (
            "[parallel]\ntp = 2\n[cluster]\nhosts = [\"localhost\", \"127.0.0.1\"]\nplacement = \"spread\"\n",
            "cluster.placement",
            "allow_cross_host_tp",
        ),
        // An unknown host.
        (
            "[parallel]\npp = 2\n[cluster]\nhosts = [\"localhost\", \"no-such-host.invalid\"]\n",
            "cluster.hosts",
            "unknown host",
        ),
        ("[cluster]\nplacement = \"round-robin\"\n", "cluster.placement", "by-host or spread"),
        ("[cluster]\nranks_per_host = 0\n", "cluster.ranks_per_host", "at least 1"),
        ("[cluster]\nheartbeat_timeout_secs = 0\n", "cluster.heartbeat_timeout_secs", "at least 1"),
    ];
    for (body, key, reason) in cases {
        let (_dir, path) = config("bad.toml", body);
        let out = parallm(&[
            "launch",
            "--config",
            &path.display().to_string(),
            "--dry-run",
        ]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{body}: accepted:\n{stdout}");
        assert!(
            stderr.contains(key) && stderr.contains(reason),
            "{body}: want {key} and '{reason}' in: {stderr}"
        );
        assert!(
            !stdout.contains("mpirun"),
            "{body}: printed a command:\n{stdout}"
        );
    }
    // Crossing hosts is allowed when asked for.
    let (_dir, path) = config(
        "ok.toml",
        "[parallel]\ntp = 2\n[cluster]\nhosts = [\"localhost\", \"127.0.0.1\"]\nplacement = \"spread\"\nallow_cross_host_tp = true\n",
    );
    let out = parallm(&[
        "launch",
        "--config",
        &path.display().to_string(),
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
}

/// `parallm ARGS` fails, and its error holds every one of `words`.
fn refused(args: &[&str], words: &[&str]) {
    let out = parallm(args);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(
        words.iter().all(|w| stderr.contains(w)),
        "{args:?}: {stderr}"
    );
}

#[test]
fn a_heartbeat_timeout_of_zero_is_refused_naming_the_flag() {
    refused(
        &[
            "bench",
            "throughput",
            "--synthetic",
            "tiny",
            "--heartbeat-timeout-secs",
            "0",
        ],
        &["--heartbeat-timeout-secs", "at least 1"],
    );
}

#[test]
fn serve_outside_mpirun_refuses_a_placement_over_several_ranks() {
    refused(
        &[
            "serve",
            "--pp",
            "2",
            "--set",
            "cluster.ranks=2",
            "--port",
            "0",
        ],
        &["cluster.ranks", "mpirun"],
    );
}
