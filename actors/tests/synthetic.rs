//! The engine on a tiny synthetic model: every parallel layout, cancellation,
//! overload, preemption and fault recovery, compared with the plain forward.

mod common;

use std::time::Duration;

use actors::llm::{Engine, Event, FaultInjection, Request};
use common::{finished_tokens, run_all};
use framework::collective::SingleCollective;
use framework::scoring::PromptScoring;
use framework::{BatchItem, LlamaShard, LogitsWanted, ModelConfig, ShardSpec, WeightFormat};

fn solo(prompt: &[u32], n: usize) -> Vec<u32> {
    let c = ModelConfig::synthetic("tiny").unwrap();
    let m = LlamaShard::synthetic(c, 7, ShardSpec::SINGLE, WeightFormat::F32).unwrap();
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..n {
        let l = m
            .forward(
                &mut [BatchItem {
                    tokens: &next,
                    cache: &mut cache,
                    logits: LogitsWanted::Last,
                }],
                &SingleCollective,
            )
            .unwrap();
        let t = framework::sampling::argmax(l.last(0).unwrap()) as u32;
        out.push(t);
        next = vec![t];
    }
    out
}

fn prompts() -> Vec<Vec<u32>> {
    (0..12u32)
        .map(|i| (0..(3 + i * 5)).map(|k| (k * 31 + i * 7) % 256).collect())
        .collect()
}

fn engine(tp: usize, pp: usize, dp: usize) -> actors::llm::EngineBuilder {
    Engine::builder()
        .synthetic("tiny", 7)
        .weights(WeightFormat::F32)
        .tp(tp)
        .pp(pp)
        .dp(dp)
}

#[test]
fn every_layout_matches_the_plain_forward() {
    let want: Vec<_> = prompts().iter().map(|p| solo(p, 6)).collect();
    for (tp, pp, dp) in [
        (1, 1, 1),
        (2, 1, 1),
        (1, 2, 1),
        (2, 2, 1),
        (1, 1, 2),
        (2, 2, 2),
    ] {
        let e = engine(tp, pp, dp).build().unwrap();
        let got = run_all(&e, prompts(), 6);
        assert_eq!(got, want, "tp={tp} pp={pp} dp={dp}");
        let s = common::idle_stats(&e).scheduler;
        assert_eq!(s.policy.kv_used, 0, "all blocks freed");
        assert!(e.shutdown_timeout(Duration::from_secs(10)));
    }
}

#[test]
fn prefix_caching_reuses_shared_prompts_and_changes_no_token() {
    let shared: Vec<u32> = (0..40u32).map(|k| (k * 13 + 5) % 256).collect();
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| shared.iter().copied().chain([i + 1, 2 * i + 7]).collect())
        .collect();
    let want: Vec<_> = prompts.iter().map(|p| solo(p, 8)).collect();
    for (tp, pp, dp, caching) in [
        (1, 1, 1, true),
        (2, 2, 1, true),
        (1, 1, 2, true),
        (1, 1, 1, false),
    ] {
        let e = engine(tp, pp, dp)
            .block_size(4)
            .prefix_caching(caching)
            .build()
            .unwrap();
        // The first request alone fills the cache (and has left the
        // scheduler, so that it weighs on no replica's load), then the
        // others come.
        let mut got = run_all(&e, prompts[..1].to_vec(), 8);
        common::idle_stats(&e);
        got.extend(run_all(&e, prompts[1..].to_vec(), 8));
        let layout = format!("tp={tp} pp={pp} dp={dp} caching={caching}");
        assert_eq!(got, want, "{layout}");
        let s = common::idle_stats(&e).scheduler;
        let prefix = s.policy.prefix;
        if caching {
            // 42 tokens: 10 full blocks before the last token, for each of the
            // 5 later requests, which cache-aware routing sends to the replica
            // (and lane) that computed them.
            assert_eq!(prefix.hit_tokens, 5 * 40, "{layout}: {prefix:?}");
            assert_eq!(prefix.queried_tokens, 6 * 42, "{layout}: {prefix:?}");
        } else {
            assert_eq!(prefix, Default::default(), "{layout}");
        }
        assert_eq!(s.policy.kv_used, 0, "{layout}: every block freed");
        assert!(e.shutdown_timeout(Duration::from_secs(10)));
    }
}

#[test]
fn kv_exhaustion_preempts_and_still_completes() {
    // Short prompts all fit at once; their growth does not. Whether the
    // requests overlap enough to preempt depends on how fast this thread
    // submits them against how fast the engine finishes them, so the run is
    // repeated (each one checked whole) until one has preempted.
    let prompts: Vec<Vec<u32>> = (0..12u32).map(|i| vec![i + 1, 2 * i + 3, 5]).collect();
    let want: Vec<_> = prompts.iter().map(|p| solo(p, 20)).collect();
    let mut preempted = None;
    for attempt in 1..=5 {
        let e = engine(1, 1, 1).block_size(4).kv_blocks(24).build().unwrap();
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| e.generate(Request::greedy_tokens(p.clone(), 20)).unwrap())
            .collect();
        let got: Vec<_> = streams
            .into_iter()
            .map(|s| finished_tokens(s.collect_blocking()))
            .collect();
        assert_eq!(got, want, "attempt {attempt}");
        let s = common::idle_stats(&e).scheduler;
        assert_eq!(s.policy.kv_used, 0, "attempt {attempt}");
        if s.policy.preemptions > 0 {
            preempted = Some(attempt);
            break;
        }
        println!("attempt {attempt}: the requests did not overlap enough to preempt: {s:?}");
    }
    assert!(preempted.is_some(), "no attempt preempted");
}

#[test]
fn injected_faults_lose_nothing() {
    let want: Vec<_> = prompts().iter().map(|p| solo(p, 6)).collect();
    for panic in [false, true] {
        let e = engine(2, 2, 1)
            .fault(FaultInjection {
                replica: 0,
                node: 3,
                step: 2,
                times: 2,
                panic,
            })
            .build()
            .unwrap();
        let got = run_all(&e, prompts(), 6);
        assert_eq!(got, want, "panic={panic}");
        let st = common::idle_stats(&e);
        // The two injected failures, and any step planned before a restart
        // that the restarted node refused.
        assert!(st.scheduler.failed_steps >= 2, "{:?}", st.scheduler);
        assert_eq!(st.nodes[3].1.restarts, 2, "{:?}", st.nodes);
    }
}

#[test]
fn new_requests_avoid_a_replica_whose_steps_fail() {
    // Replica 1's only node fails at every step after the start-up probe,
    // and no request is retried: each one routed there fails.
    let e = engine(1, 1, 2)
        .max_retries(0)
        .fault(FaultInjection {
            replica: 1,
            node: 0,
            step: 1,
            times: u32::MAX,
            panic: false,
        })
        .build()
        .unwrap();
    let outcomes = |n: usize| -> Vec<bool> {
        let streams: Vec<_> = (0..n)
            .map(|i| {
                e.generate(Request::greedy_tokens(vec![1, 2, 3 + i as u32], 4))
                    .unwrap()
            })
            .collect();
        streams
            .into_iter()
            .map(|s| matches!(s.collect_blocking().last(), Some(Event::Finished { .. })))
            .collect()
    };
    // Two at once: the second goes to replica 1, and fails there, unless
    // the first ended before the second was routed (a busy machine can
    // pause this thread that long); then both went to the idle replica 0.
    let mut reached = None;
    for attempt in 0..20 {
        let pair = outcomes(2);
        let failed = pair.iter().filter(|ok| !**ok).count();
        assert!(failed <= 1, "attempt {attempt}: {pair:?}");
        if failed == 1 {
            reached = Some(attempt);
            break;
        }
        println!("attempt {attempt}: the first request ended before the second was routed");
    }
    assert!(reached.is_some(), "no request reached replica 1");
    // Then every new request goes to replica 0, whatever the load.
    let later = outcomes(8);
    assert!(later.iter().all(|ok| *ok), "{later:?}");
}

/// Seeded sampling of every prompt (the draws happen on the last stage's
/// rank 0); the tokens of each.
fn sampled_all(e: &Engine) -> Vec<Vec<u32>> {
    let streams: Vec<_> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = Request::greedy_tokens(p, 8);
            r.params.temperature = 1.0;
            r.params.top_p = 0.95;
            r.params.seed = Some(100 + i as u64);
            e.generate(r).unwrap()
        })
        .collect();
    streams
        .into_iter()
        .map(|s| finished_tokens(s.collect_blocking()))
        .collect()
}

#[test]
fn a_recomputed_step_draws_what_the_failed_one_would_have() {
    let clean = sampled_all(&engine(2, 2, 1).build().unwrap());
    // Not all greedy: the draws are random, seeded per request.
    let greedy = run_all(&engine(2, 2, 1).build().unwrap(), prompts(), 8);
    assert_ne!(clean, greedy);
    // Node 2 is the last stage's rank 0, where the draws happen.
    for node in [2, 3] {
        let e = engine(2, 2, 1)
            .fault(FaultInjection {
                replica: 0,
                node,
                step: 3,
                times: 2,
                panic: false,
            })
            .build()
            .unwrap();
        // A step of the other lane queued behind the failed one must not run
        // on the restarted node's empty KV cache (it is refused and
        // recomputed), or its draws would differ.
        assert_eq!(sampled_all(&e), clean, "fault at node {node}");
        let st = common::idle_stats(&e);
        assert!(st.scheduler.failed_steps >= 2, "{:?}", st.scheduler);
        assert_eq!(st.nodes[node].1.restarts, 2, "{:?}", st.nodes);
    }
}

#[test]
fn a_task_that_keeps_failing_ends_with_an_error() {
    let e = engine(1, 2, 1)
        .max_retries(2)
        .fault(FaultInjection {
            replica: 0,
            node: 0,
            step: 0,
            times: u32::MAX,
            panic: false,
        })
        .build()
        .unwrap();
    // Two requests, one in each of the replica's two lanes, whose steps
    // fail together.
    let streams: Vec<_> = [vec![1, 2, 3], vec![4, 5, 6, 7]]
        .into_iter()
        .map(|p| e.generate(Request::greedy_tokens(p, 4)).unwrap())
        .collect();
    for s in streams {
        let events = s.collect_blocking();
        assert_eq!(events.len(), 1);
        match &events[0] {
            Event::Failed { error } => {
                assert!(error.contains("injected fault"), "{error}");
                // The policy says which step held the task, so its error
                // names only its own step's failures.
                assert!(!error.contains("does not say"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn higher_priority_leaves_the_queue_first() {
    let e = engine(1, 1, 1).max_running(1).build().unwrap();
    // A long request holds the only running slot while the others queue; it
    // is cancelled once they are queued.
    let mut first = e
        .generate(Request::greedy_tokens(vec![1, 2, 3], 8000))
        .unwrap();
    assert!(matches!(first.next_blocking(), Some(Event::Token { .. })));
    // If the low one ran first, the short high one would wait for all its
    // tokens, and the low one would finish rather than be cancelled.
    let mut low = Request::greedy_tokens(vec![4, 5], 8000);
    low.priority = 0;
    let mut high = Request::greedy_tokens(vec![6, 7], 2);
    high.priority = 5;
    let low = e.generate(low).unwrap();
    let high = e.generate(high).unwrap();
    e.cancel(first.id());
    assert_eq!(
        first.collect_blocking().last(),
        Some(&Event::Cancelled),
        "the slot was held until the others were queued"
    );
    assert_eq!(finished_tokens(high.collect_blocking()).len(), 2);
    e.cancel(low.id());
    let low = low.collect_blocking();
    assert_eq!(
        low.last(),
        Some(&Event::Cancelled),
        "the low-priority request ran first: {} events",
        low.len()
    );
}

#[test]
fn shutdown_drains_admitted_requests() {
    let e = engine(1, 2, 1).build().unwrap();
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| e.generate(Request::greedy_tokens(p, 8)).unwrap())
        .collect();
    assert!(
        e.shutdown_timeout(Duration::from_secs(30)),
        "drained in time"
    );
    for s in streams {
        assert_eq!(finished_tokens(s.collect_blocking()).len(), 8);
    }
}

/// A library user who drops a stream mid-generation cancels its request: the
/// request stops within a step or two of the drop (it asked for far more
/// tokens) and its KV blocks are freed.
#[test]
fn dropping_a_stream_cancels_its_request() {
    // A model slow enough that 1000 tokens take seconds.
    let e = Engine::builder().synthetic("135m", 7).build().unwrap();
    let mut s = e
        .generate(Request::greedy_tokens(vec![1, 2, 3], 1000))
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(s.next_blocking(), Some(Event::Token { .. })));
    }
    assert!(e.stats().scheduler.policy.kv_used > 0);
    drop(s);
    // Read after the drop: steps that ran while this thread was paused
    // before it are no concern of the cancellation's.
    let at_drop = e.stats().scheduler.steps;
    let st = common::idle_stats(&e).scheduler;
    assert!(st.idle, "the request still runs: {st:?}");
    assert_eq!(st.policy.kv_used, 0, "{st:?}");
    // At most the step in flight and one dispatched before the cancellation
    // arrived (the stats query may pass the cancellation on its way).
    assert!(
        st.steps - at_drop <= 3,
        "{} steps after the drop",
        st.steps - at_drop
    );
    e.shutdown();
}

/// Every position's log-softmax of the plain forward over `prompt`.
fn solo_logprobs(prompt: &[u32]) -> Vec<Vec<f32>> {
    let c = ModelConfig::synthetic("tiny").unwrap();
    let m = LlamaShard::synthetic(c, 7, ShardSpec::SINGLE, WeightFormat::F32).unwrap();
    let mut cache = m.new_cache();
    let l = m
        .forward(
            &mut [BatchItem {
                tokens: prompt,
                cache: &mut cache,
                logits: LogitsWanted::All,
            }],
            &SingleCollective,
        )
        .unwrap();
    (0..prompt.len())
        .map(|i| framework::sampling::log_softmax(l.rows_of(0).nth(i).unwrap()))
        .collect()
}

#[test]
fn prompt_scores_equal_the_plain_forward_at_every_layout_and_in_chunks() {
    let prompts = prompts();
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| solo_logprobs(p)).collect();
    let gen: Vec<_> = prompts.iter().map(|p| solo(p, 3)).collect();
    for (tp, pp, dp) in [(1, 1, 1), (2, 2, 1), (1, 1, 2)] {
        // Small steps: long prompts are scored over several chunks.
        let e = engine(tp, pp, dp).max_batch_tokens(16).build().unwrap();
        let streams: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // Half of them score from token 5 and generate 3 tokens; the
                // others score every token and generate nothing.
                let (first, n) = if i % 2 == 0 { (5, 3) } else { (1, 0) };
                let mut r = Request::score_tokens(
                    p.clone(),
                    PromptScoring {
                        first,
                        top: 2,
                        rows: false,
                    },
                );
                r.params.max_tokens = n;
                (first, e.generate(r).unwrap())
            })
            .collect();
        for (i, (first, s)) in streams.into_iter().enumerate() {
            let events = s.collect_blocking();
            let scores: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    Event::PromptScores(s) => Some(s.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            let p = &prompts[i];
            let layout = format!("tp={tp} pp={pp} dp={dp} prompt {i}");
            let positions: Vec<usize> = scores.iter().map(|s| s.position).collect();
            assert_eq!(
                positions,
                (first.max(1)..p.len()).collect::<Vec<_>>(),
                "{layout}"
            );
            for s in &scores {
                let row = &want[i][s.position - 1];
                assert_eq!(s.token, p[s.position], "{layout}");
                assert!(
                    (s.logprob - row[s.token as usize]).abs() < 1e-3,
                    "{layout} position {}: {} against {}",
                    s.position,
                    s.logprob,
                    row[s.token as usize]
                );
                assert_eq!(s.top.len(), 2);
                assert_eq!(
                    s.top[0].0,
                    framework::sampling::argmax(row) as u32,
                    "{layout}"
                );
            }
            let tokens = finished_tokens(events);
            if i % 2 == 0 {
                assert_eq!(tokens, gen[i], "{layout}: scoring changes no token");
            } else {
                assert!(tokens.is_empty(), "{layout}");
            }
        }
        assert_eq!(common::idle_stats(&e).scheduler.policy.kv_used, 0);
    }
}

#[test]
fn a_request_the_kv_pool_cannot_hold_is_refused_naming_the_field_at_fault() {
    // 24 blocks of 4: 96 positions.
    let e = engine(1, 1, 1).block_size(4).kv_blocks(24).build().unwrap();
    let refused = |prompt_len: u32, max_tokens: usize| match e.generate(Request::greedy_tokens(
        (1..=prompt_len).collect(),
        max_tokens,
    )) {
        Err(actors::llm::EngineError::Invalid(framework::Error::InvalidRequest {
            field,
            reason,
        })) => (field, reason),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted {prompt_len} + {max_tokens}"),
    };
    let (field, reason) = refused(100, 4);
    assert_eq!(field, "prompt", "{reason}");
    assert!(
        reason.contains("is too long") && reason.contains("holds 96"),
        "{reason}"
    );
    let (field, reason) = refused(10, 200);
    assert_eq!(field, "max_tokens", "{reason}");
    assert!(
        reason.contains("is too large") && reason.contains("holds 96"),
        "{reason}"
    );
    // What fits is served.
    let got = run_all(&e, vec![(1..=10).collect()], 4);
    assert_eq!(got[0].len(), 4);
}
