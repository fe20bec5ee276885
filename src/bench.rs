//! `parallm bench latency`: prefill and decode speed of one model shard.
//!
//! Measures, after one warm-up run, the median over `runs` of:
//! prefill tok/s for a `prompt_tokens` prompt; decode tok/s for `decode_tokens`
//! tokens at batch 1 (from a one-token context, as llama-bench's tg does); and
//! decode tok/s at each batch size in `batches` (each sequence first prefilled
//! with `batch_prompt_tokens`, untimed, then `batch_steps` timed decode steps).
//! Token ids are seeded random, so a synthetic model needs no tokenizer.

use std::time::Instant;

use framework::collective::SingleCollective;
use framework::sampling::{argmax, Rng};
use framework::{BatchItem, LlamaShard, LogitsWanted, SeqKvCache};

/// What to measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyPlan {
    /// Prompt length for the prefill measurement.
    pub prompt_tokens: usize,
    /// Tokens decoded at batch 1.
    pub decode_tokens: usize,
    /// Batch sizes for batched decode.
    pub batches: Vec<usize>,
    /// Prompt length of each sequence before batched decode.
    pub batch_prompt_tokens: usize,
    /// Timed decode steps at each batch size.
    pub batch_steps: usize,
    /// Timed runs (after one warm-up).
    pub runs: usize,
}

impl Default for LatencyPlan {
    fn default() -> Self {
        Self {
            prompt_tokens: 512,
            decode_tokens: 128,
            batches: vec![4, 16, 64],
            batch_prompt_tokens: 128,
            batch_steps: 32,
            runs: 5,
        }
    }
}

impl LatencyPlan {
    /// About the most any measurement holds in memory on `model`: its
    /// sequences' f32 KV caches at their full length (a cache's vectors may
    /// hold up to twice that while they grow) and the activations of the
    /// forward that prefills them. `None` when it does not fit in 64 bits.
    pub fn peak_bytes(&self, model: &framework::ModelConfig) -> Option<u64> {
        let u = |v: usize| v as u64;
        let kv_per_position = u(model.n_layers)
            .checked_mul(2 * u(model.n_kv_heads))?
            .checked_mul(u(model.head_dim))?
            .checked_mul(4 * 2)?;
        let row_bytes = 4
            * (4 * u(model.hidden)
                + (u(model.n_heads) + 2 * u(model.n_kv_heads)) * u(model.head_dim)
                + 2 * u(model.ffn));
        let logits_bytes = 4 * u(model.vocab);
        // `sequences` caches of `positions` each, prefilled by one forward
        // of `sequences · prompt` rows (logits for each sequence's last).
        let measurement = |sequences: u64, prompt: u64, positions: u64| -> Option<u64> {
            let kv = kv_per_position
                .checked_mul(positions)?
                .checked_mul(sequences)?;
            let rows = sequences.checked_mul(prompt)?;
            kv.checked_add(rows.checked_mul(row_bytes)?)?
                .checked_add(sequences.checked_mul(logits_bytes)?)
        };
        let single = measurement(1, u(self.prompt_tokens), u(self.prompt_tokens) + 1)?
            .max(measurement(1, 1, u(self.decode_tokens) + 1)?);
        let batched = u(self.batches.iter().copied().max().unwrap_or(1));
        let positions = u(self.batch_prompt_tokens)
            .checked_add(u(self.batch_steps))?
            .checked_add(1)?;
        Some(single.max(measurement(
            batched,
            u(self.batch_prompt_tokens),
            positions,
        )?))
    }
}

/// Measured medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyReport {
    /// Prefill tokens per second.
    pub prefill_tok_s: f64,
    /// Batch-1 decode tokens per second.
    pub decode_tok_s: f64,
    /// `(batch, tokens per second over all sequences)`.
    pub batch_decode_tok_s: Vec<(usize, f64)>,
}

/// The median of `xs` (the mean of the middle two for an even count; 0
/// for none): every benchmark's summary of its timed runs.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// One forward of `rows` sequences (each with its tokens); returns each's last logits argmax.
fn forward_batch(
    model: &LlamaShard,
    caches: &mut [SeqKvCache],
    tokens: &[Vec<u32>],
) -> framework::Result<Vec<u32>> {
    let mut items: Vec<BatchItem<'_>> = caches
        .iter_mut()
        .zip(tokens)
        .map(|(cache, t)| BatchItem {
            tokens: t,
            cache,
            logits: LogitsWanted::Last,
        })
        .collect();
    let logits = model.forward(&mut items, &SingleCollective)?;
    Ok((0..tokens.len())
        .map(|i| logits.last(i).map(argmax).unwrap_or(0) as u32)
        .collect())
}

/// Runs the plan, calling `progress` with a line before each measurement.
/// Where a batch-1 decode step's time goes, from `--profile`.
#[derive(Debug, Clone)]
pub struct DecodeProfile {
    /// The ops of the steps.
    pub ops: framework::profile::StepProfile,
    /// Time picking the next token (argmax), per step.
    pub sampling: std::time::Duration,
    /// Wall time of a whole step (forward and pick), per step.
    pub step: std::time::Duration,
}

/// The profile as a Markdown table: for each kind of op, the pick, and what
/// is outside both (the forward's own setup, the loop), µs per step and
/// share of the step; for ops with parallel kernels also how many threads
/// were busy on average (the rest of the pool waited or handed work out).
pub fn profile_table(p: &DecodeProfile, depth: usize, steps: usize, rows: usize) -> String {
    use framework::profile::Op;
    let step = p.step.as_secs_f64() * 1e6;
    let share = |us: f64| if step > 0.0 { 100.0 * us / step } else { 0.0 };
    let what = match rows {
        1 => format!("batch-1 decode step ({steps} steps after {depth} tokens)"),
        r => {
            format!("verifying step, {r} rows of one sequence ({steps} steps after {depth} tokens)")
        }
    };
    let mut out =
        format!("\n| {what} | µs per step | share | threads busy |\n|---|---:|---:|---:|\n");
    let mut accounted = 0.0;
    for op in Op::ALL {
        let us = p.ops.per_step(op).as_secs_f64() * 1e6;
        let busy = p.ops.busy_per_step(op).as_secs_f64() * 1e6;
        accounted += us;
        let threads = if busy > 0.0 && us > 0.0 {
            format!("{:.2}", busy / us)
        } else {
            "-".into()
        };
        out += &format!(
            "| {} | {us:.1} | {:.1}% | {threads} |\n",
            op.name(),
            share(us)
        );
    }
    let pick = p.sampling.as_secs_f64() * 1e6;
    accounted += pick;
    out += &format!(
        "| picking the token (argmax) | {pick:.1} | {:.1}% | - |\n",
        share(pick)
    );
    let rest = (step - accounted).max(0.0);
    out += &format!(
        "| outside the ops (forward setup, loop) | {rest:.1} | {:.1}% | - |\n",
        share(rest)
    );
    out += &format!("| **whole step** | **{step:.1}** | 100% | |\n");
    out
}

/// Profiles `steps` batch-1 decode steps after a `depth`-token prompt, each
/// feeding `rows` tokens whose logits are all wanted (with `rows > 1`, the
/// shape of a speculative decoding step that verifies `rows - 1` drafts).
pub fn profile_decode(
    model: &LlamaShard,
    depth: usize,
    steps: usize,
    rows: usize,
) -> framework::Result<DecodeProfile> {
    let vocab = model.config().vocab;
    let mut rng = Rng::new(0x9f0f);
    let mut cache = model.new_cache();
    let prompt = random_tokens(&mut rng, depth.max(1), vocab);
    let mut next = forward_batch(
        model,
        std::slice::from_mut(&mut cache),
        std::slice::from_ref(&prompt),
    )?;
    model.take_profile();
    model.set_profiling(true);
    let mut sampling = std::time::Duration::ZERO;
    let t = Instant::now();
    for _ in 0..steps {
        let fed = next.repeat(rows.max(1));
        let mut items = [BatchItem {
            tokens: &fed,
            cache: &mut cache,
            logits: LogitsWanted::Tail(fed.len()),
        }];
        let logits = model.forward(&mut items, &SingleCollective)?;
        let s = Instant::now();
        next = vec![logits.rows_of(0).map(argmax).last().unwrap_or(0) as u32];
        sampling += s.elapsed();
    }
    let wall = t.elapsed();
    model.set_profiling(false);
    let n = steps.max(1) as u32;
    Ok(DecodeProfile {
        ops: model.take_profile(),
        sampling: sampling / n,
        step: wall / n,
    })
}

pub fn latency(
    model: &LlamaShard,
    plan: &LatencyPlan,
    mut progress: impl FnMut(&str),
) -> framework::Result<LatencyReport> {
    let vocab = model.config().vocab;
    let mut rng = Rng::new(0x5eed);
    let runs = plan.runs.max(1);

    progress(&format!("prefill {} tokens", plan.prompt_tokens));
    let prompt = random_tokens(&mut rng, plan.prompt_tokens, vocab);
    let mut samples = Vec::new();
    for run in 0..=runs {
        let mut cache = model.new_cache();
        let t = Instant::now();
        forward_batch(
            model,
            std::slice::from_mut(&mut cache),
            std::slice::from_ref(&prompt),
        )?;
        if run > 0 {
            samples.push(plan.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let prefill_tok_s = median(samples);

    progress(&format!("decode {} tokens at batch 1", plan.decode_tokens));
    let mut samples = Vec::new();
    for run in 0..=runs {
        let mut cache = model.new_cache();
        let mut next = vec![random_tokens(&mut rng, 1, vocab)];
        let t = Instant::now();
        for _ in 0..plan.decode_tokens {
            let out = forward_batch(model, std::slice::from_mut(&mut cache), &next)?;
            next = vec![out];
        }
        if run > 0 {
            samples.push(plan.decode_tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let decode_tok_s = median(samples);

    let mut batch_decode_tok_s = Vec::new();
    for &b in &plan.batches {
        progress(&format!(
            "decode {} steps at batch {b} after {}-token prompts",
            plan.batch_steps, plan.batch_prompt_tokens
        ));
        let mut samples = Vec::new();
        for run in 0..=runs {
            let mut caches: Vec<SeqKvCache> = (0..b).map(|_| model.new_cache()).collect();
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|_| random_tokens(&mut rng, plan.batch_prompt_tokens, vocab))
                .collect();
            let first = forward_batch(model, &mut caches, &prompts)?;
            let mut next: Vec<Vec<u32>> = first.into_iter().map(|t| vec![t]).collect();
            let t = Instant::now();
            for _ in 0..plan.batch_steps {
                next = forward_batch(model, &mut caches, &next)?
                    .into_iter()
                    .map(|t| vec![t])
                    .collect();
            }
            if run > 0 {
                samples.push((b * plan.batch_steps) as f64 / t.elapsed().as_secs_f64());
            }
        }
        batch_decode_tok_s.push((b, median(samples)));
    }
    Ok(LatencyReport {
        prefill_tok_s,
        decode_tok_s,
        batch_decode_tok_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_bytes_is_the_largest_measurement() {
        let model = framework::ModelConfig::synthetic("135m").unwrap();
        let plan = LatencyPlan::default();
        let per_position = (model.n_layers * 2 * model.n_kv_heads * model.head_dim * 8) as u64;
        let row = 4
            * (4 * model.hidden
                + (model.n_heads + 2 * model.n_kv_heads) * model.head_dim
                + 2 * model.ffn) as u64;
        let logits = 4 * model.vocab as u64;
        // Batch 64 of 128-token prompts, 32 steps on: 64 caches of 161
        // positions and 8192 prefill rows outweigh one 512-token prompt.
        assert_eq!(
            plan.peak_bytes(&model),
            Some(64 * 161 * per_position + 64 * 128 * row + 64 * logits)
        );
        let single = LatencyPlan {
            batches: vec![1],
            ..plan.clone()
        };
        assert_eq!(
            single.peak_bytes(&model),
            Some(513 * per_position + 512 * row + logits)
        );
        let huge = LatencyPlan {
            batches: vec![usize::MAX / 2],
            ..plan
        };
        assert_eq!(huge.peak_bytes(&model), None);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
