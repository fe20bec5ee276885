//! Speculative decoding through the engine: n-gram drafts and a draft
//! model's drafts change no output (greedy or seeded sampling, alone or
//! among 64 concurrent requests, at several layouts), the sampled
//! distribution is the model's with either (a chi-square test on the
//! small-vocabulary synthetic model), and bad settings are refused naming
//! the field.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use common::{golden, ids, model_path, run_requests, sixty_four_prompts, wait_idle};
use parallm::actors::llm::{FaultInjection, ModelSource};
use parallm::framework::speculative::Speculation;
use parallm::framework::SamplingParams;
use parallm::framework::WeightFormat;
use parallm::{BeamParams, Engine, EngineBuilder, Request};

/// A draft model with the reference model's vocabulary: its Q4_0
/// requantization (made once per test process by `parallm quantize`),
/// different enough from the model that some drafts are rejected.
fn draft_copy() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("parallm-draft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let out = dir.join("draft-q4_0.gguf");
        let model = model_path();
        common::cli_ok(&[
            "quantize",
            model.to_str().expect("utf-8 path"),
            out.to_str().expect("utf-8 path"),
            "--type",
            "q4_0",
            "--allow-requantize",
        ]);
        out
    })
}

/// Prompts that ask the model to copy a passage (the drafts' best case).
fn copy_prompts() -> Vec<Vec<u32>> {
    let tok = common::tokenizer();
    let passages = [
        "The old lighthouse stood on the rocky point for more than a century, and sailors trusted its beam.",
        "Parallel inference splits a model across devices and serves many requests at once.",
        "fn main() { let x = 1; let y = x + 2; println!(\"{}\", y); }",
    ];
    passages
        .iter()
        .map(|p| {
            tok.encode(&format!(
                "Repeat exactly: {p}\nRepeated: {p}\nRepeat exactly: {p}\nRepeated:"
            ))
            .expect("tokenizes")
        })
        .collect()
}

/// The golden prompts, the copy prompts and the 64 mixed prompts, greedy,
/// then a seeded sampled copy of every fifth (with `frequency_penalty`),
/// each for `n` tokens.
fn mixed_requests(n: usize, frequency_penalty: f32) -> Vec<Request> {
    let mut prompts: Vec<Vec<u32>> = golden()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ids(&c["prompt_tokens"]))
        .collect();
    prompts.extend(copy_prompts());
    prompts.extend(sixty_four_prompts());
    let mut reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request::greedy_tokens(p.clone(), n))
        .collect();
    for (i, p) in prompts.iter().enumerate().step_by(5) {
        let mut r = Request::greedy_tokens(p.clone(), n);
        r.params = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            frequency_penalty,
            seed: Some(i as u64),
            max_tokens: n,
            ..SamplingParams::default()
        };
        reqs.push(r);
    }
    reqs
}

#[test]
fn ngram_speculation_changes_no_output_at_any_layout() {
    // The golden prompts, copy prompts and the 64 mixed prompts, greedy, and
    // a seeded sampled copy of some, all at once. The file's quantized
    // weights make a row's result independent of the rows beside it, so
    // every output must equal the one without speculation exactly. At
    // tp=1 and pp=2 (two stages, steps in flight) every request; at tp=3
    // and dp=2 the golden and copy prompts, every third of the 64 and
    // every sampled one, still at once (about half the work).
    //
    // Pipeline stages and replicas change no arithmetic (a stage runs the
    // layers tp=1 runs, a replica the whole model), so the outputs without
    // speculation are computed once at tp=1 and stand for pp=2's and
    // dp=2's; `every_parallel_layout_gives_the_greedy_tokens_of_tp1` in
    // tests/engine.rs checks that premise. tp=3 sums its shards in another
    // order, so it gets plain outputs of its own.
    let all = mixed_requests(24, 0.3);
    let few = golden()["cases"].as_array().map_or(0, Vec::len) + copy_prompts().len();
    let some: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(i, r)| *i < few || i % 3 == 0 || r.params.temperature > 0.0)
        .map(|(i, _)| i)
        .collect();
    let outputs = |(tp, pp, dp): (usize, usize, usize), spec: Speculation| {
        let layout = format!("tp={tp} pp={pp} dp={dp}");
        let reqs: Vec<Request> = match tp * dp {
            1 => all.clone(),
            _ => some.iter().map(|&i| all[i].clone()).collect(),
        };
        let e = Engine::builder()
            .model_path(model_path())
            .tp(tp)
            .pp(pp)
            .dp(dp)
            .speculative(spec)
            .speculate_max_running(usize::MAX)
            .build()
            .expect("engine");
        // The copy prompts alone (batch 1), then everything at once.
        let mut got = Vec::new();
        for p in copy_prompts() {
            got.extend(run_requests(&e, &[Request::greedy_tokens(p, 48)]));
        }
        got.extend(run_requests(&e, &reqs));
        let s = wait_idle(&e);
        assert_eq!(s.policy.kv_used, 0, "{layout}: {s:?}");
        assert!(e.shutdown_timeout(Duration::from_secs(30)));
        (got, s.policy)
    };
    let (tp1, none) = outputs((1, 1, 1), Speculation::default());
    assert_eq!((none.drafted, none.accepted), (0, 0));
    let copies = copy_prompts().len();
    for layout in [(1, 1, 1), (3, 1, 1), (1, 2, 1), (1, 1, 2)] {
        let plain = match layout {
            (3, ..) => {
                let (plain, none) = outputs(layout, Speculation::default());
                assert_eq!((none.drafted, none.accepted), (0, 0), "{layout:?}");
                plain
            }
            (1, _, 1) => tp1.clone(),
            _ => tp1[..copies]
                .iter()
                .cloned()
                .chain(some.iter().map(|&i| tp1[copies + i].clone()))
                .collect(),
        };
        let (spec, stats) = outputs(layout, Speculation::ngram(4));
        assert!(
            stats.drafted > 100 && stats.accepted > stats.drafted / 10,
            "{layout:?}: {stats:?}"
        );
        assert_eq!(plain.len(), spec.len(), "{layout:?}");
        for (i, (a, b)) in plain.iter().zip(&spec).enumerate() {
            assert_eq!(a, b, "{layout:?}: request {i}");
        }
    }
}

#[test]
fn draft_model_speculation_changes_no_output() {
    // The golden prompts, copy prompts and the 64 mixed prompts, greedy,
    // and a seeded sampled copy of some, all at once, drafted by a Q4_0
    // copy of the model: every output equals the plain one. One replica
    // alone; then, on the golden and copy prompts only, tensor-parallel
    // ranks that all wait for the draft node, and two replicas of two
    // stages in two lanes, each replica with a draft node of its own.
    let reqs = mixed_requests(16, 0.0);
    let few = golden()["cases"].as_array().map_or(0, Vec::len) + copy_prompts().len();
    // As in the n-gram test, two stages in two replicas change no
    // arithmetic: tp=1's outputs without speculation stand for theirs.
    let draft = ModelSource::Gguf(draft_copy().clone());
    let copies = copy_prompts().len();
    let mut tp1 = Vec::new();
    for (tp, pp, dp) in [(1, 1, 1), (3, 1, 1), (1, 2, 2)] {
        let layout = format!("tp={tp} pp={pp} dp={dp}");
        let reqs = if tp * pp * dp == 1 {
            &reqs[..]
        } else {
            &reqs[..few]
        };
        let outputs = |spec: Speculation| {
            let mut b = Engine::builder()
                .model_path(model_path())
                .tp(tp)
                .pp(pp)
                .dp(dp)
                .speculative(spec)
                .speculate_max_running(usize::MAX);
            if spec.enabled() {
                b = b.draft_model(draft.clone(), WeightFormat::Auto);
            }
            let e = b.build().expect("engine");
            let mut got = Vec::new();
            for p in copy_prompts() {
                got.extend(run_requests(&e, &[Request::greedy_tokens(p, 32)]));
            }
            got.extend(run_requests(&e, reqs));
            let s = wait_idle(&e);
            assert_eq!(s.policy.kv_used, 0, "{layout}: {s:?}");
            assert!(e.shutdown_timeout(Duration::from_secs(30)));
            (got, s.policy)
        };
        let plain = match (tp, pp, dp) {
            (1, 1, 1) => {
                tp1 = outputs(Speculation::default()).0;
                tp1.clone()
            }
            (3, ..) => outputs(Speculation::default()).0,
            _ => tp1[..copies + few].to_vec(),
        };
        let (spec, stats) = outputs(Speculation::draft(4));
        eprintln!(
            "{layout}: {} drafted, {} accepted ({:.0}%)",
            stats.drafted,
            stats.accepted,
            100.0 * stats.accepted as f64 / stats.drafted.max(1) as f64
        );
        assert!(
            stats.drafted > 100 && stats.accepted > stats.drafted / 5,
            "{layout}: {stats:?}"
        );
        assert!(
            stats.accepted < stats.drafted,
            "some drafts must be rejected: {stats:?}"
        );
        assert_eq!(plain.len(), spec.len(), "{layout}");
        for (i, (a, b)) in plain.iter().zip(&spec).enumerate() {
            assert_eq!(a, b, "{layout}: request {i}");
        }
    }
}

/// The chi-square statistic's 1% critical value with `df` degrees of
/// freedom (Wilson and Hilferty's cube-root normal approximation).
fn chi_square_critical_1pct(df: usize) -> f64 {
    let d = df as f64;
    let z = 2.326_348; // the normal's 99th percentile
    let c = 2.0 / (9.0 * d);
    d * (1.0 - c + z * c.sqrt()).powi(3)
}

#[test]
fn sampled_tokens_keep_the_models_distribution() {
    // Single tokens match too: more drafts to accept or reject.
    let ngram = Speculation {
        ngram_min: 1,
        ngram_max: 3,
        ..Speculation::ngram(3)
    };
    same_distribution(ngram, None);
}

#[test]
fn sampled_tokens_keep_the_models_distribution_with_a_draft_model() {
    // The draft is the target's synthetic weights loaded a second time, on
    // a node of its own: its greedy drafts are the target's most likely
    // tokens (a point mass, as the rejection rule needs), kept only where
    // the sampled draw agrees. (An unrelated random model's drafts would
    // almost never be kept, and test nothing.)
    let draft = ModelSource::Synthetic {
        name: "tiny".into(),
        seed: 3,
    };
    same_distribution(Speculation::draft(3), Some(draft));
}

/// The tiny synthetic model (256 tokens), a repetitive prompt so that
/// n-gram drafts exist, and top-k 4 so that drafts are often accepted. Two
/// independent samples (disjoint seeds), with and without `spec`: the
/// token at the 6th generated position must follow the same distribution
/// (two-sample chi-square test at p > 0.01).
fn same_distribution(spec: Speculation, draft: Option<ModelSource>) {
    const N: u64 = 3000;
    let prompt: Vec<u32> = [5, 6, 7, 8].repeat(4);
    let request = |seed: u64| {
        let mut r = Request::greedy_tokens(prompt.clone(), 6);
        r.params = SamplingParams {
            temperature: 1.0,
            top_k: 4,
            seed: Some(seed),
            max_tokens: 6,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        r
    };
    let sample = |spec: Speculation, seeds: std::ops::Range<u64>| {
        let mut b = EngineBuilder::default()
            .synthetic("tiny", 3)
            .max_running(256)
            .speculative(spec)
            .speculate_max_running(usize::MAX);
        if let (true, Some(d)) = (spec.enabled(), &draft) {
            b = b.draft_model(d.clone(), WeightFormat::Auto);
        }
        let e = b.build().expect("engine");
        let reqs: Vec<Request> = seeds.map(request).collect();
        let mut out = Vec::new();
        for chunk in reqs.chunks(500) {
            out.extend(run_requests(&e, chunk));
        }
        let s = wait_idle(&e).policy;
        assert!(e.shutdown_timeout(Duration::from_secs(30)));
        (out, s)
    };
    let (plain, _) = sample(Speculation::default(), 0..N);
    let (spec_out, stats) = sample(spec, N..2 * N);
    assert!(
        stats.accepted > N / 5,
        "drafts must often be accepted for the test to mean anything: {stats:?}"
    );
    // Same seeds, same tokens: speculation draws what plain decoding draws.
    let (again, _) = sample(spec, 0..200);
    assert_eq!(again[..], plain[..200]);

    let count = |outs: &[Vec<u32>]| {
        let mut c = std::collections::BTreeMap::<u32, f64>::new();
        for o in outs {
            *c.entry(o[5]).or_default() += 1.0;
        }
        c
    };
    let (a, b) = (count(&plain), count(&spec_out));
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut rare = (0.0, 0.0);
    for t in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let cell = (
            a.get(t).copied().unwrap_or(0.0),
            b.get(t).copied().unwrap_or(0.0),
        );
        // Cells expected below 5 in either sample are pooled.
        if cell.0 + cell.1 < 10.0 {
            rare = (rare.0 + cell.0, rare.1 + cell.1);
        } else {
            cells.push(cell);
        }
    }
    if rare.0 + rare.1 > 0.0 {
        cells.push(rare);
    }
    assert!(cells.len() >= 3, "too few outcomes to test: {cells:?}");
    let (na, nb) = (N as f64, N as f64);
    let chi2: f64 = cells
        .iter()
        .map(|&(x, y)| {
            let pooled = (x + y) / (na + nb);
            let (ea, eb) = (pooled * na, pooled * nb);
            (x - ea).powi(2) / ea + (y - eb).powi(2) / eb
        })
        .sum();
    let critical = chi_square_critical_1pct(cells.len() - 1);
    eprintln!(
        "chi-square {chi2:.2} over {} cells (1% critical value {critical:.2}); {stats:?}",
        cells.len()
    );
    assert!(
        chi2 < critical,
        "chi-square {chi2:.1} over {} cells exceeds the 1% critical value {critical:.1}",
        cells.len()
    );
}

#[test]
fn bad_speculative_settings_are_refused_naming_the_field() {
    let e = EngineBuilder::default()
        .synthetic("tiny", 0)
        .build()
        .expect("engine");
    let refused = |r: Request, field: &str| {
        let err = e.generate(r).expect_err("refused").to_string();
        assert!(err.contains(field), "{err}");
    };
    let mut r = Request::greedy_tokens(vec![1, 2, 3], 4);
    r.speculative = Some(Speculation::ngram(0));
    refused(r.clone(), "num_speculative_tokens");
    r.speculative = Some(Speculation::ngram(17));
    refused(r.clone(), "num_speculative_tokens");
    r.speculative = Some(Speculation {
        ngram_min: 4,
        ngram_max: 2,
        ..Speculation::ngram(3)
    });
    refused(r.clone(), "ngram_max");
    r.speculative = Some(Speculation::ngram(3));
    r.beam = Some(BeamParams {
        width: 2,
        length_penalty: 1.0,
    });
    refused(r, "speculative");
    e.shutdown();
    let err = match EngineBuilder::default()
        .synthetic("tiny", 0)
        .speculative(Speculation::ngram(99))
        .build()
    {
        Ok(_) => panic!("an engine that drafts 99 tokens must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("num_speculative_tokens"), "{err}");
}

#[test]
fn bad_draft_model_settings_are_refused_naming_the_field() {
    let start_err = |b: EngineBuilder| match b.build() {
        Ok(_) => panic!("the engine must be refused"),
        Err(e) => e.to_string(),
    };
    // Draft speculation without a draft model.
    let err = start_err(
        EngineBuilder::default()
            .synthetic("tiny", 0)
            .speculative(Speculation::draft(4)),
    );
    assert!(err.contains("speculative.method"), "{err}");
    // A draft whose vocabulary differs: another size, or a tokenizer
    // against synthetic ids, or the same size with other tokens.
    let other = |name: &str| ModelSource::Synthetic {
        name: name.into(),
        seed: 0,
    };
    let err = start_err(
        EngineBuilder::default()
            .synthetic("tiny", 0)
            .draft_model(other("135m"), WeightFormat::Auto),
    );
    assert!(
        err.contains("draft_model") && err.contains("vocabulary"),
        "{err}"
    );
    let err = start_err(
        Engine::builder()
            .model_path(model_path())
            .draft_model(other("135m"), WeightFormat::Auto),
    );
    assert!(
        err.contains("draft_model") && err.contains("tokenizer"),
        "{err}"
    );

    // Requests: draft speculation on an engine without a draft model, and
    // draft speculation with beam search.
    let e = EngineBuilder::default()
        .synthetic("tiny", 0)
        .build()
        .expect("engine");
    let mut r = Request::greedy_tokens(vec![1, 2, 3], 4);
    r.speculative = Some(Speculation::draft(3));
    let err = e.generate(r).expect_err("refused").to_string();
    assert!(
        err.contains("speculative.method") && err.contains("no draft model"),
        "{err}"
    );
    e.shutdown();
    let e = EngineBuilder::default()
        .synthetic("tiny", 0)
        .draft_model(other("tiny"), WeightFormat::Auto)
        .build()
        .expect("engine");
    let mut r = Request::greedy_tokens(vec![1, 2, 3], 4);
    r.speculative = Some(Speculation::draft(3));
    r.beam = Some(BeamParams {
        width: 2,
        length_penalty: 1.0,
    });
    let err = e.generate(r).expect_err("refused").to_string();
    assert!(err.contains("speculative"), "{err}");
    e.shutdown();
}

#[test]
fn a_draft_node_failure_loses_no_request_and_changes_no_output() {
    // The tiny synthetic model drafting for itself; the draft node (node
    // tp·pp = 2 of a tp=2 replica) fails at step 3, once by an error and
    // once by a panic. Its replica recomputes (the draft's keys and values
    // are lost with the others'), every request completes, and the tokens
    // are plain decoding's.
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..8 + i).map(|t| (t * 7 + i) % 200 + 1).collect())
        .collect();
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request::greedy_tokens(p.clone(), 12))
        .collect();
    let engine = |spec: Speculation, fault: Option<FaultInjection>| {
        let mut b = EngineBuilder::default()
            .synthetic("tiny", 5)
            .tp(2)
            .speculative(spec)
            .speculate_max_running(usize::MAX);
        if spec.enabled() {
            let draft = ModelSource::Synthetic {
                name: "tiny".into(),
                seed: 5,
            };
            b = b.draft_model(draft, WeightFormat::Auto);
        }
        if let Some(f) = fault {
            b = b.fault(f);
        }
        b.build().expect("engine")
    };
    let plain = {
        let e = engine(Speculation::default(), None);
        let out = run_requests(&e, &reqs);
        e.shutdown();
        out
    };
    for panic in [false, true] {
        let fault = FaultInjection {
            replica: 0,
            node: 2,
            step: 3,
            times: 1,
            panic,
        };
        let e = engine(Speculation::draft(3), Some(fault));
        let got = run_requests(&e, &reqs);
        let st = e.stats();
        assert!(st.scheduler.failed_steps >= 1, "panic={panic}");
        assert_eq!(st.nodes[2].1.restarts, 1, "the draft node was restarted");
        let s = wait_idle(&e);
        assert_eq!(s.policy.kv_used, 0);
        assert!(s.policy.accepted > 0, "{:?}", s.policy);
        assert_eq!(got, plain, "panic={panic}");
        e.shutdown();
    }
}
