//! `parallm bench throughput`: many concurrent requests through the engine.
//!
//! For each concurrency `n`, `n` requests are submitted at once (prompts of
//! seeded random tokens, lengths spread evenly over `min_prompt..=max_prompt`,
//! exactly `output_tokens` generated each: end-of-sequence is ignored) and every
//! token event is timestamped as it arrives. Reported per `n`:
//!
//! * output tok/s: all generated tokens over the wall time from submission to
//!   the last finish;
//! * decode tok/s: tokens generated after every request has its first token,
//!   over that window (what `llama-batched-bench` calls S_TG);
//! * TTFT and TPOT medians over requests;
//! * the engine's mean step time split into the slowest node's compute and
//!   the rest (actors, scheduling, merging);
//! * the decode step time (`n / decode tok/s`) and — with `bare` — the median
//!   time of a bare batched decode forward of the same `n` sequences at the
//!   same mean context on one shard in the calling thread.

use std::time::{Duration, Instant};

use actors::llm::{Engine, Event, Request};
use framework::collective::SingleCollective;
use framework::sampling::{Rng, SamplingParams};
use framework::{BatchItem, LlamaShard, LogitsWanted};

/// What to measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputPlan {
    /// Concurrent requests per measurement.
    pub concurrency: Vec<usize>,
    /// Shortest prompt.
    pub min_prompt: usize,
    /// Longest prompt.
    pub max_prompt: usize,
    /// Tokens generated per request.
    pub output_tokens: usize,
    /// Timed decode steps of the bare forward.
    pub bare_steps: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus sampling mass (1: off).
    pub top_p: f32,
    /// Top-k cut (0: off).
    pub top_k: usize,
}

/// One concurrency's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputRow {
    /// Concurrent requests.
    pub concurrency: usize,
    /// Tokens generated in all.
    pub output_tokens: usize,
    /// Submission to last finish, seconds.
    pub wall_s: f64,
    /// Output tokens per second over the wall time.
    pub output_tok_s: f64,
    /// Tokens per second once every request decodes.
    pub decode_tok_s: f64,
    /// Median time to first token, ms.
    pub ttft_median_ms: f64,
    /// Median time per output token after the first, ms.
    pub tpot_median_ms: f64,
    /// Engine steps run.
    pub steps: u64,
    /// Mean step wall time (dispatch to merged), ms.
    pub step_ms: f64,
    /// Mean slowest-node compute per step, ms.
    pub node_compute_ms: f64,
    /// Share of step time outside node compute (actors, scheduling, merge), %.
    pub engine_overhead_pct: f64,
    /// Median bare batched decode forward of the same batch, ms (if measured).
    pub bare_step_ms: Option<f64>,
    /// Mean step time once every request decodes (`concurrency / decode_tok_s`), ms.
    pub decode_step_ms: f64,
    /// The decode step against the bare step, % above it (if measured).
    pub decode_vs_bare_pct: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn prompts(n: usize, plan: &ThroughputPlan, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(0x7457 + n as u64);
    (0..n)
        .map(|i| {
            let span = plan.max_prompt - plan.min_prompt;
            let len = plan.min_prompt + if n > 1 { span * i / (n - 1) } else { span / 2 };
            (0..len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect()
}

/// Runs the plan on `engine`; `bare` is a whole-model shard for the bare
/// forward comparison.
pub fn throughput(
    engine: &Engine,
    bare: Option<&LlamaShard>,
    plan: &ThroughputPlan,
    mut progress: impl FnMut(&str),
) -> Result<Vec<ThroughputRow>, Box<dyn std::error::Error + Send + Sync>> {
    if plan.min_prompt == 0 || plan.min_prompt > plan.max_prompt || plan.output_tokens == 0 {
        return Err("prompt lengths must satisfy 1 <= min <= max, and output tokens >= 1".into());
    }
    let vocab = engine.model_config().vocab;
    // Warm-up: one short request.
    let mut warm = engine.generate(Request::greedy_tokens(vec![1, 2, 3], 4))?;
    while warm.next_blocking().is_some_and(|e| !e.is_terminal()) {}

    let mut rows = Vec::new();
    for &n in &plan.concurrency {
        progress(&format!("{n} concurrent requests"));
        let ps = prompts(n, plan, vocab);
        let before = engine.stats().scheduler;
        let t0 = Instant::now();
        let mut streams = Vec::with_capacity(n);
        for p in &ps {
            let mut req = Request::greedy_tokens(p.clone(), plan.output_tokens);
            req.params = SamplingParams {
                ignore_eos: true,
                temperature: plan.temperature,
                top_p: plan.top_p,
                top_k: plan.top_k,
                seed: Some(rows.len() as u64),
                ..SamplingParams::greedy(plan.output_tokens)
            };
            streams.push(engine.generate(req)?);
        }
        let times: Vec<Vec<Duration>> = std::thread::scope(|s| {
            let joins: Vec<_> = streams
                .into_iter()
                .map(|mut st| {
                    s.spawn(move || {
                        let mut ts = Vec::new();
                        while let Some(e) = st.next_blocking() {
                            match e {
                                Event::Token { .. } => ts.push(t0.elapsed()),
                                Event::Finished { .. } => break,
                                other => return Err(format!("request ended with {other:?}")),
                            }
                        }
                        Ok(ts)
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| {
                    j.join()
                        .map_err(|_| "a reader thread panicked".to_string())?
                })
                .collect::<Result<Vec<_>, String>>()
        })?;
        let wall = t0.elapsed().as_secs_f64();
        let after = engine.stats().scheduler;
        let total: usize = times.iter().map(Vec::len).sum();
        let window_start = times
            .iter()
            .filter_map(|t| t.first())
            .max()
            .copied()
            .unwrap_or_default();
        let last = times
            .iter()
            .filter_map(|t| t.last())
            .max()
            .copied()
            .unwrap_or_default();
        let in_window = times
            .iter()
            .flat_map(|t| t.iter())
            .filter(|&&t| t > window_start)
            .count();
        let window = (last - window_start).as_secs_f64();
        let ttft = median(
            times
                .iter()
                .filter_map(|t| t.first())
                .map(|d| d.as_secs_f64() * 1e3)
                .collect(),
        );
        let tpot = median(
            times
                .iter()
                .filter(|t| t.len() > 1)
                .map(|t| (t[t.len() - 1] - t[0]).as_secs_f64() * 1e3 / (t.len() - 1) as f64)
                .collect(),
        );
        let steps = after.steps - before.steps;
        let step_s = after.step_seconds - before.step_seconds;
        let compute_s = after.compute_seconds - before.compute_seconds;
        let per = |x: f64| {
            if steps > 0 {
                x * 1e3 / steps as f64
            } else {
                0.0
            }
        };
        let bare_step_ms = match bare {
            Some(m) => {
                progress(&format!("bare forward of {n} sequences"));
                let mean_ctx =
                    ps.iter().map(Vec::len).sum::<usize>() / n.max(1) + plan.output_tokens / 2;
                Some(bare_decode_ms(m, n, mean_ctx, plan.bare_steps)?)
            }
            None => None,
        };
        let decode_tok_s = if window > 0.0 {
            in_window as f64 / window
        } else {
            0.0
        };
        let decode_step_ms = if decode_tok_s > 0.0 {
            n as f64 / decode_tok_s * 1e3
        } else {
            0.0
        };
        rows.push(ThroughputRow {
            concurrency: n,
            output_tokens: total,
            wall_s: wall,
            output_tok_s: total as f64 / wall,
            decode_tok_s,
            ttft_median_ms: ttft,
            tpot_median_ms: tpot,
            steps,
            step_ms: per(step_s),
            node_compute_ms: per(compute_s),
            engine_overhead_pct: if step_s > 0.0 {
                (step_s - compute_s) / step_s * 100.0
            } else {
                0.0
            },
            decode_step_ms,
            decode_vs_bare_pct: bare_step_ms.map(|b| (decode_step_ms / b - 1.0) * 100.0),
            bare_step_ms,
        });
    }
    Ok(rows)
}

/// Median ms of a batched decode forward of `n` sequences with `ctx` cached
/// positions each, on one shard in this thread.
fn bare_decode_ms(
    model: &LlamaShard,
    n: usize,
    ctx: usize,
    steps: usize,
) -> framework::Result<f64> {
    let vocab = model.config().vocab as u64;
    let mut rng = Rng::new(0xba2e);
    let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
    for c in caches.iter_mut() {
        let p: Vec<u32> = (0..ctx).map(|_| (rng.next_u64() % vocab) as u32).collect();
        model.forward(
            &mut [BatchItem {
                tokens: &p,
                cache: c,
                logits: LogitsWanted::None,
            }],
            &SingleCollective,
        )?;
    }
    let mut samples = Vec::new();
    for step in 0..=steps.max(1) {
        let toks: Vec<[u32; 1]> = (0..n).map(|_| [(rng.next_u64() % vocab) as u32]).collect();
        let mut items: Vec<_> = caches
            .iter_mut()
            .zip(&toks)
            .map(|(c, t)| BatchItem {
                tokens: t,
                cache: c,
                logits: LogitsWanted::Last,
            })
            .collect();
        let t = Instant::now();
        model.forward(&mut items, &SingleCollective)?;
        if step > 0 {
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(samples))
}
