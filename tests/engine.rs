//! The engine on the reference model: every parallel layout against tp=1,
//! 64 concurrent requests against their solo runs, cancellation, overload,
//! KV exhaustion and node failure.

mod common;

use std::time::Duration;

use common::{finished, model, model_path, run, sixty_four_prompts, wait_idle};
use parallm::actors::llm::FaultInjection;
use parallm::actors::llm::Traffic;
use parallm::actors::SubmitError;
use parallm::framework::collective::SingleCollective;
use parallm::framework::{BatchItem, LogitsWanted, SamplingParams, WeightFormat};
use parallm::{Engine, EngineBuilder, EngineError, Event, Request};

const NEW_TOKENS: usize = 12;

fn builder() -> EngineBuilder {
    Engine::builder()
        .model_path(model_path())
        .weights(WeightFormat::F32)
}

/// A solo greedy run on the whole model: the tokens, and at each step the gap
/// between the top two logits.
fn solo(prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let m = model(WeightFormat::F32);
    let eos = common::tokenizer().stop_tokens().to_vec();
    let mut cache = m.new_cache();
    let (mut out, mut gaps) = (Vec::new(), Vec::new());
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
            .expect("forward");
        let row = l.last(0).expect("logits");
        let top = common::top_k(row, 2);
        gaps.push(row[top[0]] - row[top[1]]);
        let t = top[0] as u32;
        if eos.contains(&t) {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    (out, gaps)
}

/// Checks `got` against solo runs: equal, or diverging only at a near-tie.
fn assert_matches_solo(prompts: &[Vec<u32>], got: &[Vec<u32>], n: usize) -> usize {
    let mut diverged = 0;
    for (i, (p, g)) in prompts.iter().zip(got).enumerate() {
        let (want, gaps) = solo(p, n);
        if *g == want {
            continue;
        }
        let k = g
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(g.len().min(want.len()));
        assert!(
            gaps[k] < 1e-3,
            "request {i} diverges from its solo run at step {k}, where the solo run's top-2 gap is {} (not a near-tie)\n got  {g:?}\n want {want:?}",
            gaps[k]
        );
        diverged += 1;
    }
    diverged
}

#[test]
fn every_parallel_layout_gives_the_greedy_tokens_of_tp1() {
    let prompts = common::golden_prompts();
    let reference = {
        let e = builder().build().expect("tp=1 engine");
        run(&e, &prompts, NEW_TOKENS)
    };
    assert_matches_solo(&prompts, &reference, NEW_TOKENS);
    for (tp, pp, dp) in [
        (3, 1, 1),
        (2, 1, 1),
        (1, 2, 1),
        (1, 3, 1),
        (3, 2, 1),
        (1, 1, 2),
    ] {
        let e = builder().tp(tp).pp(pp).dp(dp).build().expect("engine");
        let got = run(&e, &prompts, NEW_TOKENS);
        assert_eq!(got, reference, "tp={tp} pp={pp} dp={dp}");
        let s = wait_idle(&e);
        assert_eq!(s.policy.kv_used, 0, "tp={tp} pp={pp} dp={dp}: {s:?}");
        assert!(e.shutdown_timeout(Duration::from_secs(30)));
    }
}

#[test]
fn sixty_four_concurrent_requests_match_their_solo_runs() {
    let prompts = sixty_four_prompts();
    let lens: Vec<_> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().max() > lens.iter().min(), "mixed lengths");
    let e = builder().build().expect("engine");
    let got = run(&e, &prompts, 16);
    let diverged = assert_matches_solo(&prompts, &got, 16);
    eprintln!(
        "prompts of {}..={} tokens; {diverged} of 64 outputs diverged from their solo runs, each at a near-tie",
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0)
    );
    assert_eq!(wait_idle(&e).policy.kv_used, 0);
}

#[test]
fn prefix_caching_changes_no_output_at_any_layout() {
    // 64 requests at once: three shared prefixes of different lengths, each
    // with its own question. The quantized weights (the file's own) make a
    // row's result independent of the batch it is computed in, so caching on
    // and off must agree exactly, whichever rows each step happens to hold.
    // Pipeline stages and replicas change no arithmetic, so tp=1's outputs
    // with caching off stand for pp=2's and dp=2's (the premise
    // `every_parallel_layout_gives_the_greedy_tokens_of_tp1` checks); tp=3
    // sums its shards in another order and gets its own.
    let tok = common::tokenizer();
    let prompts: Vec<Vec<u32>> = common::shared_prefix_texts(64)
        .iter()
        .map(|t| tok.encode(t).expect("tokenizes"))
        .collect();
    let mut tp1_off = None;
    for (tp, pp, dp) in [(1, 1, 1), (3, 1, 1), (1, 2, 1), (1, 1, 2)] {
        let layout = format!("tp={tp} pp={pp} dp={dp}");
        let outputs = |caching: bool| {
            let e = Engine::builder()
                .model_path(model_path())
                .tp(tp)
                .pp(pp)
                .dp(dp)
                .prefix_caching(caching)
                .build()
                .expect("engine");
            // One request of each family first, then all 64.
            let mut got = run(&e, &prompts[..3], 4);
            wait_idle(&e);
            got.extend(run(&e, &prompts, 8));
            let s = wait_idle(&e);
            assert_eq!(s.policy.kv_used, 0, "{layout}: {s:?}");
            assert!(e.shutdown_timeout(Duration::from_secs(30)));
            (got, s.policy.prefix)
        };
        let (on, prefix) = outputs(true);
        if tp == 1 && (pp, dp) != (1, 1) {
            assert_eq!(Some(&on), tp1_off.as_ref(), "{layout} against tp=1");
        } else {
            let (off, none) = outputs(false);
            assert_eq!(on, off, "{layout}");
            assert_eq!(none, Default::default(), "{layout}");
            if tp == 1 {
                tp1_off = Some(off);
            }
        }
        assert!(prefix.hit_tokens >= 60 * 16, "{layout}: {prefix:?}");
    }
}

#[test]
fn cache_aware_routing_hits_more_than_least_loaded_and_stays_balanced() {
    // dp=2, two families of long shared prefixes. A first wave of one
    // request each puts family 0 on replica 0 and family 1 on replica 1
    // (both routings send two requests arriving together to different
    // replicas). Then waves of 8 requests, 4 of family 0 followed by 4 of
    // family 1, one wave after another. A replica's KV blocks hold one
    // family's prefix and four running requests, not both families':
    // least-loaded routing alternates replicas and sends both families to
    // both, whose caches then evict each other's prefixes; cache-aware
    // routing keeps each family on its replica, 4 requests each.
    let tok = common::tokenizer();
    let families = [
        "You are a careful assistant for a library. Answer questions about opening hours, loans and fines. ".repeat(12),
        "The following is a transcript of a meeting about the city budget, road repairs and the new park. ".repeat(12),
    ];
    let prompt = |f: usize, i: usize| {
        tok.encode(&format!("{}Question {i}: what now?", families[f]))
            .expect("tokenizes")
    };
    let prefix_len = tok.encode(&families[0]).expect("tokenizes").len();
    assert!(prefix_len > 200, "{prefix_len}");
    let run_waves = |cache_aware: bool| {
        let mut attempt = 1;
        let (e, mut outputs) = loop {
            let e = Engine::builder()
                .model_path(model_path())
                .dp(2)
                .kv_blocks(28)
                .cache_aware_routing(cache_aware)
                .build()
                .expect("engine");
            let first = run(&e, &[prompt(0, 0), prompt(1, 1)], 4);
            // Unless the first ended before the second was routed (a busy
            // machine can pause this thread that long): then both went to
            // one replica, which now holds both families.
            let routed = wait_idle(&e).policy.routed;
            if routed.iter().all(|&n| n == 1) {
                break (e, first);
            }
            eprintln!("attempt {attempt}: the first wave went to one replica: {routed:?}");
            assert!(attempt < 5, "the first wave never split");
            assert!(e.shutdown_timeout(Duration::from_secs(30)));
            attempt += 1;
        };
        for wave in 1..6 {
            let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(i / 4, wave * 8 + i)).collect();
            outputs.extend(run(&e, &prompts, 4));
            wait_idle(&e);
        }
        let s = wait_idle(&e).policy;
        assert_eq!(s.kv_used, 0, "{s:?}");
        assert!(e.shutdown_timeout(Duration::from_secs(30)));
        (outputs, s)
    };
    let (aware_out, aware) = run_waves(true);
    let (least_out, least) = run_waves(false);
    assert_eq!(aware_out, least_out, "routing changes no token");
    let ratio = |s: &parallm::actors::llm::LlmStats| {
        s.prefix.hit_tokens as f64 / s.prefix.queried_tokens as f64
    };
    eprintln!(
        "hit ratio: cache-aware {:.3} ({:?} requests per replica), least loaded {:.3} ({:?})",
        ratio(&aware),
        aware.routed,
        ratio(&least),
        least.routed
    );
    assert!(ratio(&aware) > ratio(&least), "{aware:?} against {least:?}");
    let (lo, hi) = (
        *aware.routed.iter().min().expect("two replicas"),
        *aware.routed.iter().max().expect("two replicas"),
    );
    assert_eq!(lo + hi, 42);
    assert!(hi as f64 <= 1.5 * lo as f64, "{:?}", aware.routed);
}

#[test]
fn cancelling_frees_kv_blocks() {
    let e = Engine::builder()
        .model_path(model_path())
        .max_running(1)
        .build()
        .expect("engine");
    let mut running = e
        .generate(Request::greedy("Once upon a time", 400))
        .expect("admitted");
    let waiting = e
        .generate(Request::greedy("A second request", 400))
        .expect("admitted");
    // Wait until the first is decoding, then cancel both.
    let mut tokens = 0;
    while tokens < 3 {
        match running.next_blocking() {
            Some(Event::Token { .. }) => tokens += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(e.stats().scheduler.policy.kv_used > 0);
    e.cancel(running.id());
    e.cancel(waiting.id());
    let rest: Vec<_> = std::iter::from_fn(|| running.next_blocking()).collect();
    assert_eq!(rest.last(), Some(&Event::Cancelled));
    assert_eq!(rest.iter().filter(|e| e.is_terminal()).count(), 1);
    assert_eq!(waiting.collect_blocking(), vec![Event::Cancelled]);
    let s = wait_idle(&e);
    assert!(s.idle);
    assert_eq!(s.policy.kv_used, 0, "{s:?}");
}

/// The server's health probe is not held by the load it checks: with one
/// running place taken by a long prefill and a request waiting behind it,
/// a probe submitted during the prefill finishes before either of them.
#[test]
fn a_health_probe_goes_before_a_long_prefill_and_a_backlog() {
    let e = Engine::builder()
        .model_path(model_path())
        .max_running(1)
        .max_batch_tokens(32)
        .build()
        .expect("engine");
    // 1600 prompt tokens: 50 steps of 32, seconds on these machines.
    let prompt: Vec<u32> = (0..1600).map(|i| 100 + (i % 500)).collect();
    let mut long = e
        .generate(Request::greedy_tokens(prompt, 1))
        .expect("admitted");
    let mut waiting = e
        .generate(Request::greedy("A second request", 2))
        .expect("admitted");
    while e.stats().scheduler.policy.kv_used == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut probe = Request::greedy_tokens(vec![1], 1);
    probe.priority = i32::MAX;
    probe.traffic = Traffic::Probe { replica: 0 };
    let probe = e.generate(probe).expect("admitted");
    finished(&probe.collect_blocking());
    // Neither has sent an event yet (the long one's only token comes at the
    // end of its prefill).
    use futures::FutureExt;
    assert_eq!(
        long.next().now_or_never(),
        None,
        "the probe waited for the prefill"
    );
    assert_eq!(waiting.next().now_or_never(), None);
    finished(&long.collect_blocking());
    finished(&waiting.collect_blocking());
}

/// A submission that finds the queue full is refused by `generate` itself
/// (it does not wait for room). How fast is a benchmark's business, not this
/// test's.
#[test]
fn a_full_queue_answers_overloaded_at_once() {
    let e = Engine::builder()
        .model_path(model_path())
        .max_running(1)
        .queue_capacity(2)
        .build()
        .expect("engine");
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        match e.generate(Request::greedy(format!("Count to {i}:"), 24)) {
            Ok(s) => accepted.push(s),
            Err(EngineError::Submit(SubmitError::Overloaded { capacity })) => {
                assert_eq!(capacity, 2);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(
        refused > 0,
        "eight requests into one running slot and two queue slots"
    );
    assert!(accepted.len() >= 3);
    for s in accepted {
        finished(&s.collect_blocking());
    }
}

#[test]
fn kv_exhaustion_preempts_and_every_request_completes_correctly() {
    let tok = common::tokenizer();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            tok.encode(&format!("Story {i}: the robot"))
                .expect("tokenizes")
        })
        .collect();
    // The requests must overlap to preempt: a busy machine can pause this
    // thread between submissions until the first ones have finished.
    let mut preempted = false;
    for attempt in 1..=5 {
        // 16 blocks of 8 positions: all eight prompts fit, their 24 new
        // tokens do not.
        let e = builder()
            .block_size(8)
            .kv_blocks(16)
            .build()
            .expect("engine");
        let got = run(&e, &prompts, 24);
        assert_matches_solo(&prompts, &got, 24);
        let s = wait_idle(&e);
        assert_eq!(s.policy.kv_used, 0, "attempt {attempt}");
        if s.policy.preemptions > 0 {
            preempted = true;
            break;
        }
        eprintln!("attempt {attempt}: the requests did not overlap enough to preempt: {s:?}");
    }
    assert!(preempted, "no attempt preempted");
}

#[test]
fn a_node_failure_mid_run_loses_no_request() {
    let prompts = common::golden_prompts();
    for panic in [false, true] {
        let e = builder()
            .tp(3)
            .fault(FaultInjection {
                replica: 0,
                node: 1,
                step: 4,
                times: 1,
                panic,
            })
            .build()
            .expect("engine");
        let got = run(&e, &prompts, NEW_TOKENS);
        assert_matches_solo(&prompts, &got, NEW_TOKENS);
        let st = e.stats();
        // The injected failure, and any step planned before the restart
        // that the restarted node refused.
        assert!(st.scheduler.failed_steps >= 1, "panic={panic}");
        assert_eq!(st.nodes[1].1.restarts, 1, "the failed node was restarted");
        assert_eq!(wait_idle(&e).policy.kv_used, 0);
    }
}

#[test]
fn sampling_parameters_are_validated_before_admission() {
    let e = Engine::builder()
        .model_path(model_path())
        .build()
        .expect("engine");
    let mut req = Request::greedy("Hello", 8);
    req.params = SamplingParams {
        top_p: 1.5,
        ..SamplingParams::greedy(8)
    };
    let err = e.generate(req).expect_err("top_p out of range");
    assert!(err.to_string().contains("top_p"), "{err}");
    let err = e
        .generate(Request::greedy("Hello", 1 << 20))
        .expect_err("too long");
    assert!(err.to_string().contains("context"), "{err}");
}

#[test]
fn beam_search_through_the_engine_equals_the_reference_loop() {
    use parallm::framework::generate::beam_search;
    use parallm::BeamParams;
    let tok = common::tokenizer();
    let prompt = tok.encode("The best way to learn is").expect("tokenizes");
    let want = beam_search(model(WeightFormat::F32), tok, &prompt, 3, 1.0, 10).expect("beams");
    let e = builder().tp(3).build().expect("engine");
    let mut req = Request::greedy_tokens(prompt, 10);
    req.beam = Some(BeamParams {
        width: 3,
        length_penalty: 1.0,
    });
    let events = e.generate(req).expect("admitted").collect_blocking();
    match events.as_slice() {
        [Event::Finished { beams, text, .. }] => {
            let got: Vec<_> = beams.iter().map(|b| &b.tokens).collect();
            let exp: Vec<_> = want.iter().map(|b| &b.tokens).collect();
            assert_eq!(got, exp);
            assert_eq!(text, &want[0].text);
        }
        other => panic!("expected one finished event, got {other:?}"),
    }
    assert_eq!(wait_idle(&e).policy.kv_used, 0);
}

#[test]
fn beam_search_ends_each_beam_at_a_stop_string() {
    use parallm::framework::FinishReason;
    use parallm::BeamParams;
    let e = builder().build().expect("engine");
    let beam = |stop: Vec<String>| {
        let mut req = Request::greedy("The best way to learn is", 12);
        req.params.stop = stop;
        req.beam = Some(BeamParams {
            width: 3,
            length_penalty: 1.0,
        });
        match e
            .generate(req)
            .expect("admitted")
            .collect_blocking()
            .as_slice()
        {
            [Event::Finished {
                beams,
                text,
                reason,
                ..
            }] => (beams.clone(), text.clone(), *reason),
            other => panic!("expected one finished event, got {other:?}"),
        }
    };
    // Without a stop string, the best beam runs to the length limit; its
    // last word then ends it there (beams that meet a stop string early
    // score too low to be kept, so a late one is the test).
    let (free, text, reason) = beam(Vec::new());
    assert_eq!(reason, FinishReason::Length, "{text:?}");
    let stop = text.split_whitespace().last().expect("words").to_string();
    let (beams, best, reason) = beam(vec![stop.clone()]);
    assert_eq!(beams.len(), free.len());
    assert_ne!(beams, free, "the stop string changed nothing");
    let tok = common::tokenizer();
    for b in &beams {
        let full = tok.decode(&b.tokens);
        assert!(!b.text.contains(&stop), "{stop:?} in {:?}", b.text);
        match b.finish_reason {
            // Cut right before the stop string (or ended by EOS).
            FinishReason::Stop => assert!(
                full == b.text || full.starts_with(&format!("{}{stop}", b.text)),
                "{full:?} cut to {:?}",
                b.text
            ),
            _ => assert_eq!((b.tokens.len(), &full), (12, &b.text)),
        }
    }
    assert!(
        beams.iter().any(|b| b.finish_reason == FinishReason::Stop),
        "{stop:?}: {beams:?}"
    );
    assert_eq!(
        (best, reason),
        (beams[0].text.clone(), beams[0].finish_reason)
    );
    // Beams and their stop strings leave no block in use.
    assert_eq!(wait_idle(&e).policy.kv_used, 0);
}

#[test]
fn a_request_without_its_own_limit_fits_the_context() {
    let e = builder().max_model_len(Some(64)).build().expect("engine");
    let prompt: Vec<u32> = common::tokenizer()
        .encode(&"one two three four ".repeat(15))
        .expect("tokenizes");
    assert!(prompt.len() > 48 && prompt.len() < 64, "{}", prompt.len());
    let room = 64 - prompt.len();
    // Asked for: refused, naming the numbers.
    let err = e
        .generate(Request::greedy_tokens(prompt.clone(), 256))
        .expect_err("too long");
    assert!(err.to_string().contains("context of 64"), "{err}");
    // A ceiling only: lowered to the room the context leaves.
    let mut req = Request::greedy_tokens(prompt.clone(), 256);
    req.params.ignore_eos = true;
    req.fit_max_tokens = true;
    let events = e.generate(req).expect("admitted").collect_blocking();
    match events.last() {
        Some(Event::Finished { tokens, reason, .. }) => {
            assert_eq!(tokens.len(), room);
            assert_eq!(*reason, parallm::framework::FinishReason::Length);
        }
        other => panic!("{other:?}"),
    }
    // A prompt that leaves no room is refused all the same.
    let full: Vec<u32> = prompt.iter().cycle().take(64).copied().collect();
    let mut req = Request::greedy_tokens(full, 256);
    req.fit_max_tokens = true;
    let err = e.generate(req).expect_err("no room");
    assert!(err.to_string().contains("prompt is 64 tokens"), "{err}");
}

#[test]
fn requests_the_engine_cannot_run_are_refused_at_once() {
    use parallm::BeamParams;
    let e = builder().max_batch_tokens(8).build().expect("engine");
    let refused = |req: Request, field: &str| {
        let err = e.generate(req).expect_err("refused").to_string();
        assert!(err.contains(field), "{err}");
    };
    // Every beam decodes in one step: more beams than a step's tokens
    // would wait forever.
    let mut wide = Request::greedy("Hi", 3);
    wide.beam = Some(BeamParams {
        width: 9,
        length_penalty: 1.0,
    });
    refused(wide.clone(), "beam_width");
    wide.beam = Some(BeamParams {
        width: 2,
        length_penalty: f32::NAN,
    });
    refused(wide.clone(), "length_penalty");
    wide.beam = Some(BeamParams {
        width: 2,
        length_penalty: 1.0,
    });
    wide.params.logprobs = Some(1);
    refused(wide, "logprobs");
    // A length so large that prompt + length wraps around.
    refused(Request::greedy("Hi", usize::MAX), "context");
    // Within a step's tokens, a beam search runs.
    let mut fits = Request::greedy("Hi", 3);
    fits.beam = Some(BeamParams {
        width: 8,
        length_penalty: 1.0,
    });
    let events = e.generate(fits).expect("admitted").collect_blocking();
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{events:?}"
    );

    // What does not fit a replica's KV cache is refused naming the field
    // at fault: the prompt, the beams that copy it, or the length.
    let small = builder().kv_blocks(4).build().expect("engine");
    let refused = |req: Request, field: &str, says: &str| {
        let err = small.generate(req).expect_err("refused").to_string();
        assert!(err.contains(&format!("`{field}` {says}")), "{err}");
    };
    refused(
        Request::greedy_tokens(vec![5; 70], 1),
        "prompt",
        "is too long",
    );
    refused(
        Request::greedy_tokens(vec![5; 20], 50),
        "max_tokens",
        "is too large",
    );
    let mut beams = Request::greedy_tokens(vec![5; 20], 2);
    beams.beam = Some(BeamParams {
        width: 4,
        length_penalty: 1.0,
    });
    refused(beams.clone(), "beam_width", "is too large");
    beams.fit_max_tokens = true;
    refused(
        beams,
        "beam_width",
        "is too large: 20 prompt tokens plus at least 1 new token",
    );
}
