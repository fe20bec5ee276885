//! Compute nodes in other processes, with the ranks of the job as threads of
//! this test (the `Loopback` transport; `cluster/tests/mpi.rs` and
//! `tests/cluster_mpi.rs` run real processes under `mpirun`): rank 0 builds
//! the engine, whose nodes on other ranks are proxies, and every other rank
//! serves its nodes. Every layout gives exactly the greedy tokens of the
//! same layout in one process (f32 weights), with a draft model's node too
//! (its drafts crossing ranks), and leaves no KV block, no message and no
//! abort hook behind; a node that fails on another rank (a draft node, or
//! one in a replica held wholly by another rank, whose step planned before
//! the rebuild rank 0 refuses) is rebuilt there and changes no token. Rank
//! 0 starts only once every other rank agrees on the job (a rank that runs
//! another model or settings, or cannot serve, fails the start, named) and
//! its nodes have loaded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cluster::{ClusterSpec, Layout, Loopback, Mode, Placement, Transport};
use common::{model_path, run, wait_idle};
use parallm::actors::llm::{Cluster, FaultInjection, ModelSource};
use parallm::framework::speculative::Speculation;
use parallm::framework::WeightFormat;
use parallm::{Engine, EngineBuilder};

const NEW_TOKENS: usize = 12;

fn builder(tp: usize, pp: usize, dp: usize) -> EngineBuilder {
    Engine::builder()
        .model_path(model_path())
        .weights(WeightFormat::F32)
        .tp(tp)
        .pp(pp)
        .dp(dp)
}

/// `b` with a draft model: the reference model in its file's own (Q4_1)
/// weights, drafting up to 4 tokens for the f32 target at any load.
fn with_draft(b: EngineBuilder) -> EngineBuilder {
    b.speculative(Speculation::draft(4))
        .speculate_max_running(usize::MAX)
        .draft_model(ModelSource::Gguf(model_path()), WeightFormat::Auto)
}

/// The placement of layout `(tp, pp, dp)` (with a draft node per replica
/// if `draft`) on `ranks` ranks by `mode`.
fn plan(
    ranks: usize,
    mode: Mode,
    (tp, pp, dp): (usize, usize, usize),
    draft: bool,
) -> Arc<Placement> {
    let spec = ClusterSpec {
        ranks,
        mode,
        ..ClusterSpec::default()
    };
    let layout = Layout { dp, tp, pp, draft };
    Arc::new(Placement::plan(&spec, layout, ranks).expect("placement"))
}

/// Runs `prompts` on a job of `ranks` ranks (threads) placed by `mode`,
/// each replica with a draft model's node if `draft`; `fault` is injected
/// on the ranks other than 0 (where the nodes it names run). Returns the
/// tokens.
fn across(
    (tp, pp, dp): (usize, usize, usize),
    ranks: usize,
    mode: Mode,
    prompts: &[Vec<u32>],
    fault: Option<FaultInjection>,
    draft: bool,
) -> Vec<Vec<u32>> {
    let builder = move |tp, pp, dp| {
        let b = builder(tp, pp, dp);
        if draft {
            with_draft(b)
        } else {
            b
        }
    };
    let placement = plan(ranks, mode, (tp, pp, dp), draft);
    assert_eq!(placement.ranks(), ranks);
    let world = Loopback::world(ranks);
    let others: Vec<_> = (1..ranks)
        .map(|r| {
            let cluster = Cluster {
                transport: world[r].clone(),
                placement: placement.clone(),
            };
            std::thread::spawn(move || {
                let mut b = builder(tp, pp, dp).cluster(cluster);
                if let Some(f) = fault {
                    b = b.fault(f);
                }
                b.serve_nodes()
            })
        })
        .collect();
    let engine = builder(tp, pp, dp)
        .cluster(Cluster {
            transport: world[0].clone(),
            placement: placement.clone(),
        })
        .build()
        .expect("rank 0's engine");
    let got = run(&engine, prompts, NEW_TOKENS);
    let s = wait_idle(&engine);
    assert_eq!(s.policy.kv_used, 0, "{s:?}");
    if draft {
        assert!(s.policy.accepted > 0, "no draft accepted: {s:?}");
    }
    if let Some(f) = fault {
        // The proxy reported the remote failure and was restarted.
        let nodes = engine.stats().nodes;
        let (_, c) = nodes
            .iter()
            .find(|(id, _)| id.replica == f.replica && id.index == f.node)
            .expect("the failing node's counters");
        assert!(c.failures >= 1 && c.restarts >= 1, "{c:?}");
    }
    assert!(engine.shutdown_timeout(Duration::from_secs(60)));
    for (r, h) in others.into_iter().enumerate() {
        h.join()
            .expect("a rank's thread")
            .unwrap_or_else(|e| panic!("rank {}: {e}", r + 1));
    }
    for t in &world {
        assert_eq!(t.mailbox().pending(), 0, "rank {}: messages left", t.rank());
        assert_eq!(
            t.mailbox().hooks(),
            0,
            "rank {}: abort hooks left",
            t.rank()
        );
    }
    got
}

fn in_one_process((tp, pp, dp): (usize, usize, usize), prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let e = builder(tp, pp, dp).build().expect("engine");
    let got = run(&e, prompts, NEW_TOKENS);
    assert!(e.shutdown_timeout(Duration::from_secs(60)));
    got
}

/// Each `(layout, ranks, mode)` of `cases` (with a draft model's node if
/// `draft`) gives, over the golden prompts, the greedy tokens of the same
/// layout without drafts in one process.
fn each_gives_the_tokens_of_one_process(
    cases: &[((usize, usize, usize), usize, Mode)],
    draft: bool,
) {
    let prompts = common::golden_prompts();
    for &(layout, ranks, mode) in cases {
        let want = in_one_process(layout, &prompts);
        let got = across(layout, ranks, mode, &prompts, None, draft);
        assert_eq!(
            got, want,
            "(tp, pp, dp) = {layout:?} over {ranks} ranks, {mode:?}, draft {draft}"
        );
    }
}

#[test]
fn every_layout_across_ranks_gives_the_tokens_of_one_process() {
    let cases = [
        // tp=2 across 2 ranks: the all-reduces cross.
        ((2, 1, 1), 2, Mode::Spread),
        // pp=2 across 2 ranks: the hidden rows cross.
        ((1, 2, 1), 2, Mode::ByHost),
        // tp=3 in each rank × pp=2 across 2 ranks.
        ((3, 2, 1), 2, Mode::ByHost),
        // dp=2 across 2 ranks: a replica per rank.
        ((1, 1, 2), 2, Mode::ByHost),
        // Both crossing at once, over 3 ranks: tp=2 × pp=2 spread.
        ((2, 2, 1), 3, Mode::Spread),
    ];
    each_gives_the_tokens_of_one_process(&cases, false);
}

#[test]
fn a_draft_node_across_ranks_gives_the_tokens_of_one_process() {
    // The drafts cross from the draft node's rank to the target's nodes on
    // other ranks, and the tokens are those of the same layout's plain
    // greedy decoding in one process.
    let cases = [
        // pp=2 by host: the draft node joins the last stage on rank 1, and
        // stage 0 on rank 0 waits for its drafts.
        ((1, 2, 1), 2, Mode::ByHost),
        // tp=2 spread: the draft node on rank 0, tensor rank 1 on rank 1.
        ((2, 1, 1), 2, Mode::Spread),
        // dp=2 by host: each replica with its draft node on a rank of its own.
        ((1, 1, 2), 2, Mode::ByHost),
        // tp=2 × pp=2 spread over 3 ranks: drafts to two ranks.
        ((2, 2, 1), 3, Mode::Spread),
    ];
    each_gives_the_tokens_of_one_process(&cases, true);
}

#[test]
fn a_node_failing_on_another_rank_is_rebuilt_and_changes_no_token() {
    let prompts = common::golden_prompts();
    let layout = (2, 2, 1);
    let want = in_one_process(layout, &prompts);
    // Node 3 (stage 1, tp rank 1) runs on rank 1 under spread over 2 ranks;
    // it fails at its fourth step, once with an error and once panicking.
    for panic in [false, true] {
        let fault = FaultInjection {
            replica: 0,
            node: 3,
            step: 3,
            times: 1,
            panic,
        };
        let got = across(layout, 2, Mode::Spread, &prompts, Some(fault), false);
        assert_eq!(got, want, "panic = {panic}");
    }
}

#[test]
fn a_node_failing_in_a_replica_held_by_another_rank_is_rebuilt_and_changes_no_token() {
    // dp=2 × pp=2 × tp=2 by host on 2 ranks: replica 1 is all on rank 1,
    // whose links are all within that process. Its node 3 (stage 1, tensor
    // rank 1) fails at its fourth step; the other lane's step, planned
    // before the rebuild, is refused on rank 0, and node 2, waiting on rank
    // 1 for node 3 to sum with, must hear of it.
    let prompts = common::golden_prompts();
    let layout = (2, 2, 2);
    let want = in_one_process(layout, &prompts);
    let fault = FaultInjection {
        replica: 1,
        node: 3,
        step: 3,
        times: 1,
        panic: false,
    };
    let got = across(layout, 2, Mode::ByHost, &prompts, Some(fault), false);
    assert_eq!(got, want);
}

#[test]
fn a_draft_node_failing_on_another_rank_is_rebuilt_and_changes_no_token() {
    // pp=2 by host puts the draft model's node on rank 1 with the last
    // stage; it fails at its fourth step, and the first stage, on rank 0,
    // waiting for its drafts, is aborted with it.
    let prompts = common::golden_prompts();
    let layout = (1, 2, 1);
    let want = in_one_process(layout, &prompts);
    let fault = FaultInjection {
        replica: 0,
        node: 2,
        step: 3,
        times: 1,
        panic: false,
    };
    let got = across(layout, 2, Mode::ByHost, &prompts, Some(fault), true);
    assert_eq!(got, want, "a failing draft node");
}

/// Starts a pp=2 job of two ranks, rank 0 built by `rank0` and rank 1 by
/// `rank1`, expecting the start to fail: returns rank 0's error and rank
/// 1's, having checked that no message is left behind.
fn refused_start(rank0: EngineBuilder, rank1: EngineBuilder) -> (String, String) {
    let placement = plan(2, Mode::ByHost, (1, 2, 1), false);
    let world = Loopback::world(2);
    let cluster = |rank: usize| Cluster {
        transport: world[rank].clone(),
        placement: placement.clone(),
    };
    let rank1 = {
        let cluster = cluster(1);
        std::thread::spawn(move || rank1.cluster(cluster).serve_nodes())
    };
    let Err(e) = rank0.cluster(cluster(0)).build().map(drop) else {
        panic!("rank 0 started");
    };
    let Err(theirs) = rank1.join().expect("rank 1's thread") else {
        panic!("rank 1 served");
    };
    for t in &world {
        assert_eq!(t.mailbox().pending(), 0, "rank {}: messages left", t.rank());
    }
    eprintln!("rank 0: {e}\nrank 1: {theirs}");
    (e.to_string(), theirs.to_string())
}

/// Rank 0 takes requests only once every rank can serve its nodes, and a
/// rank that cannot (its model file is missing there) fails rank 0's start
/// with an error naming the rank, its nodes and why.
#[test]
fn a_node_that_cannot_load_on_another_rank_fails_the_start_naming_it() {
    let missing = std::env::temp_dir().join("parallm-no-such-model.gguf");
    let (e, _) = refused_start(builder(1, 2, 1), builder(1, 2, 1).model_path(missing));
    assert!(
        e.contains("rank 1 cannot serve its nodes (r0n1)")
            && e.contains("parallm-no-such-model.gguf: no such file"),
        "{e}"
    );
}

/// A rank whose job differs from rank 0's (here its model, weight format
/// and KV blocks: a host's own configuration file or model file) is refused
/// before any node is built, on both ranks, with an error naming the rank
/// and each setting that differs, both values given.
#[test]
fn a_rank_that_runs_another_job_fails_the_start_naming_what_differs() {
    let (e, theirs) = refused_start(
        builder(1, 2, 1).kv_blocks(96),
        builder(1, 2, 1)
            .synthetic("135m", 7)
            .weights(WeightFormat::Auto)
            .kv_blocks(64),
    );
    for want in [
        "rank 1 does not run rank 0's job: its model is `synthetic 135m, seed 7` where rank 0's is `",
        " bytes, sampled SHA-256 ",
        "its weight format is `Auto` where rank 0's is `F32`",
        "its KV blocks is `64` where rank 0's is `96`",
    ] {
        assert!(e.contains(want), "{e:?} does not say {want:?}");
    }
    assert!(!e.contains("layout"), "{e}");
    assert!(
        theirs.contains("rank 0 refused the job: rank 1 does not run rank 0's job"),
        "{theirs}"
    );
}

/// A transport that fails (a rank died or stopped answering: the heartbeat
/// or the launcher says so) stops rank 0's engine for good: every request
/// it holds ends at once with an error naming why, and it takes no more.
#[test]
fn a_lost_rank_ends_every_request_with_its_reason() {
    let placement = plan(2, Mode::Spread, (1, 2, 1), false);
    let world = Loopback::world(2);
    let rank1 = {
        let cluster = Cluster {
            transport: world[1].clone(),
            placement: placement.clone(),
        };
        std::thread::spawn(move || builder(1, 2, 1).cluster(cluster).serve_nodes())
    };
    let engine = builder(1, 2, 1)
        .cluster(Cluster {
            transport: world[0].clone(),
            placement,
        })
        .build()
        .expect("rank 0's engine");
    let mut streams: Vec<_> = common::golden_prompts()
        .into_iter()
        .map(|p| {
            let mut req = parallm::actors::llm::Request::greedy_tokens(p, 4000);
            req.params.ignore_eos = true;
            engine.generate(req).expect("accepted")
        })
        .collect();
    // Every request is under way before the rank is lost.
    for s in &mut streams {
        assert!(matches!(
            s.next_blocking(),
            Some(parallm::actors::llm::Event::Token { .. })
        ));
    }
    assert!(engine.stopped().is_none());
    let t0 = std::time::Instant::now();
    world[0]
        .mailbox()
        .fail("rank 1 has not answered for 3.0 s (test)");
    for (i, s) in streams.iter_mut().enumerate() {
        let end = loop {
            match s.next_blocking() {
                Some(parallm::actors::llm::Event::Token { .. }) => {}
                other => break other,
            }
        };
        match end {
            Some(parallm::actors::llm::Event::Failed { error }) => assert!(
                error.contains("MPI job cannot go on") && error.contains("rank 1 has not answered"),
                "request {i}: {error}"
            ),
            other => panic!("request {i} ended with {other:?}"),
        }
    }
    // Ended by the failure, not by finishing (room for a busy machine).
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(engine.stopped().is_some_and(|w| w.contains("rank 1")));
    assert!(engine
        .generate(parallm::actors::llm::Request::greedy_tokens(vec![1, 2], 4))
        .is_err());
    // Rank 1's node loop ends when its own transport fails.
    world[1].mailbox().fail("rank 0 has gone (test)");
    let e = rank1.join().expect("rank 1's thread").unwrap_err();
    assert!(e.to_string().contains("rank 0 has gone"), "{e}");
    drop(engine);
}
