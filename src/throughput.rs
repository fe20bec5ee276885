//! `parallm bench throughput`: many concurrent requests through the engine.
//!
//! For each concurrency `n`, `n` requests are submitted at once and every
//! token event is timestamped as it arrives. The prompts are a [`Dataset`]:
//! seeded random tokens, lengths spread evenly over
//! `min_prompt..=max_prompt`, exactly `output_tokens` generated each
//! (end-of-sequence is ignored); or input copying, chat requests to repeat
//! or correct a passage (up to `output_tokens` each, ending where the model
//! ends; the measurements of a run take the passages in turn, so
//! `--concurrency 1,1,1,1` measures four of them one at a time). Reported per
//! `n`:
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
//!   same mean context on one shard in the calling thread;
//! * with speculative decoding, the drafted tokens and the share accepted.
//!
//! With `guided`, that many of each measurement's requests are held to
//! [`guided_schema`] (their grammar masks computed beside the forward).

use std::time::{Duration, Instant};

use actors::llm::{Engine, Event, Prompt, Request};
use framework::chat::ChatMessage;
use framework::collective::SingleCollective;
use framework::guide::Guide;
use framework::sampling::{Rng, SamplingParams};
use framework::{BatchItem, LlamaShard, LogitsWanted};

use crate::bench::median;

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
    /// Which prompts.
    pub dataset: Dataset,
    /// Requests of each measurement guided by [`guided_schema`].
    pub guided: usize,
}

/// The JSON schema of `--guided` requests: a list of at least 64 records
/// (a free string, a bounded integer, an enum), too long for any request to
/// complete within a benchmark's output tokens, so guided requests generate
/// as many tokens as unguided ones.
pub fn guided_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "minItems": 64,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "role": {"enum": ["admin", "user", "guest"]}
            },
            "required": ["name", "age", "role"],
            "additionalProperties": false
        }
    })
}

/// The prompts of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// Seeded random tokens of the planned lengths; end-of-sequence ignored.
    Random,
    /// Chat requests to repeat a passage or correct its spelling (the model
    /// copies its input: the case n-gram speculation is for).
    Copy,
}

/// The input-copying dataset's passages (with a few spelling mistakes, for
/// the correcting requests).
const PASSAGES: [&str; 6] = [
    "The old lighthouse stood on the rocky point for more than a century. Sailors trusted its beam to guide them past the reef, and the keeper climbed the spiral stairs every evening to light the lamp. When the great storm swept the coast, he stayed at his post all night, and not a single ship was lost.",
    "An actor is a small unit of computation that owns its state and talks to other actors only by messages. Because no two actors share memory, a system built from them needs no locks: each actor handles one message at a time, and the runtime spreads thousands of them over a few threads.",
    "fn mean(xs: &[f64]) -> Option<f64> {\n    if xs.is_empty() {\n        return None;\n    }\n    let sum: f64 = xs.iter().sum();\n    Some(sum / xs.len() as f64)\n}",
    "To make the bread, mix four cups of flour with a spoon of salt and a packet of yeast. Add two cups of warm water and knead the dough for ten minutes, until it is smooth. Let it rise for an hour, shape it into a loaf, and bake it at two hundred degrees for fourty minutes.",
    "The city council met on Tuesday to discuss the new bicycle lanes. Residents spoke for and against the plan for almost three hours. In the end the council voted seven to two to build the first lane along the river next spring, and to review the results after one year.",
    "{\"name\": \"Ada Lovelace\", \"born\": 1815, \"field\": \"mathematics\", \"known_for\": [\"the first published algorithm\", \"notes on the Analytical Engine\"], \"country\": \"England\"}",
];

/// The requests the input-copying dataset makes of a passage.
const COPY_TASKS: [&str; 2] = [
    "Repeat the following text exactly, and write nothing else.",
    "Correct any spelling mistakes in the following text. Write out the whole corrected text and nothing else.",
];

/// Request `j` of the input-copying dataset.
fn copy_prompt(j: usize) -> Prompt {
    let passage = PASSAGES[j % PASSAGES.len()];
    let task = COPY_TASKS[(j / PASSAGES.len()) % COPY_TASKS.len()];
    Prompt::Chat(vec![ChatMessage::new(
        "user",
        format!("{task}\n\n{passage}"),
    )])
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
    /// Tokens drafted by speculative decoding.
    pub drafted: u64,
    /// Of those, accepted.
    pub accepted: u64,
}

/// The `n` prompts of a measurement; `first` counts the requests of the
/// measurements before it (the copy dataset goes on with the next passage).
fn prompts(n: usize, first: usize, plan: &ThroughputPlan, vocab: usize) -> Vec<Prompt> {
    if plan.dataset == Dataset::Copy {
        return (first..first + n).map(copy_prompt).collect();
    }
    let mut rng = Rng::new(0x7457 + n as u64);
    (0..n)
        .map(|i| {
            let span = plan.max_prompt - plan.min_prompt;
            let len = plan.min_prompt + if n > 1 { span * i / (n - 1) } else { span / 2 };
            Prompt::Tokens(
                (0..len)
                    .map(|_| (rng.next_u64() % vocab as u64) as u32)
                    .collect(),
            )
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
    if plan.dataset == Dataset::Copy && engine.tokenizer().is_none() {
        return Err("the copy dataset is text: it needs a model with a tokenizer".into());
    }
    let vocab = engine.model_config().vocab;
    // Warm-up: one short request.
    let mut warm = engine.generate(Request::greedy_tokens(vec![1, 2, 3], 4))?;
    while warm.next_blocking().is_some_and(|e| !e.is_terminal()) {}

    let mut rows = Vec::new();
    let mut first = 0;
    for &n in &plan.concurrency {
        progress(&format!("{n} concurrent requests"));
        let ps = prompts(n, first, plan, vocab);
        first += n;
        let before = engine.stats().scheduler;
        let t0 = Instant::now();
        let mut streams = Vec::with_capacity(n);
        let mut prompt_tokens = 0;
        for p in &ps {
            let mut req = Request::greedy(String::new(), plan.output_tokens);
            req.prompt = p.clone();
            prompt_tokens += engine.tokenize(p)?.len();
            req.params = SamplingParams {
                ignore_eos: plan.dataset == Dataset::Random,
                temperature: plan.temperature,
                top_p: plan.top_p,
                top_k: plan.top_k,
                seed: Some(rows.len() as u64),
                ..SamplingParams::greedy(plan.output_tokens)
            };
            if streams.len() < plan.guided {
                req.guide = Some(Guide::JsonSchema(guided_schema()));
            }
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
                let mean_ctx = prompt_tokens / n.max(1) + plan.output_tokens / 2;
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
            drafted: after.policy.drafted - before.policy.drafted,
            accepted: after.policy.accepted - before.policy.accepted,
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
