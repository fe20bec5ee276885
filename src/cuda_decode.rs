//! `parallm cuda --decode SHAPE`: decode of one CUDA shard with synthetic
//! weights (batch 1, or `--batch` sequences), the engine left out.
//!
//! It measures, on one GPU (or the host emulation, to check the command
//! without one):
//! * the device's copy bandwidth (bytes read + written per second), and
//!   from it the batch-1 bandwidth limit: that rate over the weight bytes a
//!   decode step reads (every weight on the device but the embedding table,
//!   of which a step reads one row per token; the head's matrix, a copy of
//!   the table where the two are tied, is read whole);
//! * the bare decode rate: `--steps` steps, each feeding the last step's
//!   argmax, after a `--depth`-token prompt, timed as a whole (launches,
//!   the logits' download and the host's argmax included);
//! * where a step goes: the same number of steps again with every op timed
//!   ([`framework::profile`]; the device is waited on around each op, so
//!   the sum is a little above the bare step).

use std::time::{Duration, Instant};

use framework::cuda::{CudaOptions, CudaShard, DeviceHandle, Dtype};
use framework::sampling::argmax;
use framework::{
    LogitsWanted, ModelConfig, PagedItem, ShardSource, ShardSpec, StageInput, StageOutput,
    WeightFormat,
};

use crate::bench::{profile_table, DecodeProfile};

/// Positions per KV block.
const BLOCK: usize = 16;

/// What to measure.
pub struct DecodePlan {
    /// The synthetic shape (`ModelConfig::synthetic`).
    pub shape: String,
    /// GPU ordinal, or `None` for the host emulation.
    pub device: Option<usize>,
    /// Weights and activations.
    pub dtype: Dtype,
    /// Prompt tokens before the decode steps.
    pub depth: usize,
    /// Decode steps timed, and as many profiled.
    pub steps: usize,
    /// Sequences decoded together (rows of each decode step).
    pub batch: usize,
    /// Runs one more decode step between `cuProfilerStart` and
    /// `cuProfilerStop`, for a kernel profiler.
    pub kernel_trace: bool,
}

/// What was measured.
#[derive(Debug, serde::Serialize)]
pub struct DecodeReport {
    /// The shape's name.
    pub shape: String,
    /// The device's description.
    pub device: String,
    /// Seconds to build the weights on the host and load them.
    pub load_s: f64,
    /// Weight bytes on the device.
    pub weight_bytes: usize,
    /// Weight bytes a decode step reads: all but the embedding table.
    pub read_bytes: usize,
    /// Copy bandwidth, bytes read + written per second, in GB/s.
    pub copy_rw_gbps: f64,
    /// `copy_rw_gbps` over `read_bytes`: decode steps per second if a step
    /// only read its weights once at copy speed.
    pub limit_tok_s: f64,
    /// Prompt tokens before the decode steps.
    pub depth: usize,
    /// Decode steps timed.
    pub steps: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// The prompts' prefill (one step of every sequence), ms.
    pub prefill_ms: f64,
    /// Mean bare decode step, ms.
    pub step_ms: f64,
    /// Bare decode tokens per second (all sequences).
    pub decode_tok_s: f64,
    /// Decode steps per second over `limit_tok_s`.
    pub fraction_of_limit: f64,
    /// `read_bytes` per second of the bare steps, GB/s.
    pub weight_gbps: f64,
}

/// One step of every sequence `i` feeding `tokens[i]` from position
/// `start` over its block table `tables[i]`; each one's last-row argmax.
fn step(
    shard: &mut CudaShard,
    tables: &[Vec<u32>],
    tokens: &[Vec<u32>],
    start: usize,
) -> framework::Result<Vec<u32>> {
    let items: Vec<PagedItem<'_>> = tables
        .iter()
        .zip(tokens)
        .map(|(table, tokens)| PagedItem {
            tokens,
            start,
            table,
            logits: LogitsWanted::Last,
        })
        .collect();
    match shard.forward_paged(
        &items,
        StageInput::Tokens,
        &framework::collective::SingleCollective,
    )? {
        StageOutput::Logits(l) => Ok((0..items.len())
            .map(|i| l.last(i).map(argmax).unwrap_or(0) as u32)
            .collect()),
        other => Err(framework::Error::Cuda(format!(
            "a whole-model shard returned {} instead of logits",
            match other {
                StageOutput::Hidden(_) => "hidden rows",
                _ => "nothing",
            }
        ))),
    }
}

/// Each sequence's next input: its last argmax.
fn feed(next: &[u32]) -> Vec<Vec<u32>> {
    next.iter().map(|&t| vec![t]).collect()
}

/// Runs the plan; `progress` gets a line before each phase. Returns the
/// report and the per-op profile.
pub fn run(
    plan: &DecodePlan,
    progress: impl Fn(&str),
) -> framework::Result<(DecodeReport, DecodeProfile)> {
    for (flag, v) in [
        ("--depth", plan.depth),
        ("--steps", plan.steps),
        ("--batch", plan.batch),
    ] {
        if v == 0 {
            return Err(framework::Error::Config(format!(
                "{flag} must be at least 1"
            )));
        }
    }
    let config = ModelConfig::synthetic(&plan.shape)?;
    let positions = plan.depth + 2 * plan.steps + 4;
    if positions > config.context {
        return Err(framework::Error::Config(format!(
            "--depth {} and --steps {} need {positions} positions, more than the model's context of {}",
            plan.depth, plan.steps, config.context
        )));
    }
    let dev = match plan.device {
        Some(n) => DeviceHandle::gpu(n)?,
        None => DeviceHandle::emulated()?,
    };
    let device = dev.name();
    progress(&format!("copy bandwidth on {device}"));
    let copy_bytes = if plan.device.is_some() {
        1 << 30
    } else {
        1 << 24
    };
    let copy_rw = dev.copy_bandwidth(copy_bytes, 10)?;
    let per_seq = positions.div_ceil(BLOCK);
    let blocks = per_seq * plan.batch;
    progress(&format!(
        "synthetic {} weights ({} layers), {:?}",
        plan.shape, config.n_layers, plan.dtype
    ));
    let t = Instant::now();
    let mut shard = CudaShard::load(
        ShardSource {
            file: None,
            layers: 0..config.n_layers,
            config: config.clone(),
            seed: 0,
            spec: ShardSpec::SINGLE,
            format: WeightFormat::Auto,
            kv: (BLOCK, blocks),
            max_batch_tokens: plan.depth * plan.batch,
            node: 0,
        },
        dev,
        CudaOptions {
            dtype: plan.dtype,
            quantized: false,
        },
        None,
    )?;
    let load_s = t.elapsed().as_secs_f64();
    let weight_bytes = shard.weight_bytes();
    let tables: Vec<Vec<u32>> = (0..plan.batch)
        .map(|b| ((b * per_seq) as u32..((b + 1) * per_seq) as u32).collect())
        .collect();

    progress(&format!(
        "prefill of {} × {} tokens",
        plan.batch, plan.depth
    ));
    let prompts: Vec<Vec<u32>> = (0..plan.batch)
        .map(|b| {
            (0..plan.depth)
                .map(|i| ((i + 31 * b) * 7919 % config.vocab) as u32)
                .collect()
        })
        .collect();
    // One untimed prefill compiles and loads everything; the timed one
    // overwrites the same positions.
    step(&mut shard, &tables, &prompts, 0)?;
    let t = Instant::now();
    let mut next = step(&mut shard, &tables, &prompts, 0)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut pos = plan.depth;
    for _ in 0..3 {
        next = step(&mut shard, &tables, &feed(&next), pos)?;
        pos += 1;
    }

    progress(&format!("{} decode steps", plan.steps));
    let t = Instant::now();
    for _ in 0..plan.steps {
        next = step(&mut shard, &tables, &feed(&next), pos)?;
        pos += 1;
    }
    let step_s = t.elapsed().as_secs_f64() / plan.steps as f64;

    progress(&format!("{} profiled decode steps", plan.steps));
    shard.take_profile();
    shard.set_profiling(true);
    let t = Instant::now();
    for _ in 0..plan.steps {
        next = step(&mut shard, &tables, &feed(&next), pos)?;
        pos += 1;
    }
    let wall = t.elapsed();
    shard.set_profiling(false);
    let n = plan.steps as u32;
    let profile = DecodeProfile {
        ops: shard.take_profile(),
        // The argmax runs inside `step`, on the downloaded logits: it is
        // part of "outside the ops".
        sampling: Duration::ZERO,
        step: wall / n,
    };

    if plan.kernel_trace && plan.device.is_some() {
        // One more step between the profiler's start and stop, for a
        // kernel profiler started with `--profile-from-start off`.
        progress("one decode step for the kernel profiler");
        let profiler = |on| {
            kernels::cuda::gpu::profiler(on).map_err(|e| framework::Error::Cuda(e.to_string()))
        };
        profiler(true)?;
        let r = step(&mut shard, &tables, &feed(&next), pos);
        profiler(false)?;
        r?;
    }

    // The embedding table (the backend's dtype, 2 bytes a value) is read a
    // row per token.
    let read_bytes = weight_bytes.saturating_sub(config.vocab * config.hidden * 2);
    let limit_tok_s = copy_rw / read_bytes.max(1) as f64;
    let decode_tok_s = plan.batch as f64 / step_s.max(f64::MIN_POSITIVE);
    Ok((
        DecodeReport {
            shape: plan.shape.clone(),
            device,
            load_s,
            weight_bytes,
            read_bytes,
            copy_rw_gbps: copy_rw / 1e9,
            limit_tok_s,
            depth: plan.depth,
            steps: plan.steps,
            batch: plan.batch,
            prefill_ms,
            step_ms: step_s * 1e3,
            decode_tok_s,
            fraction_of_limit: 1.0 / step_s.max(f64::MIN_POSITIVE) / limit_tok_s,
            weight_gbps: read_bytes as f64 / step_s.max(f64::MIN_POSITIVE) / 1e9,
        },
        profile,
    ))
}

/// The report as a Markdown table, then the profile's.
pub fn table(r: &DecodeReport, p: &DecodeProfile) -> String {
    let profile = profile_table(p, r.depth, r.steps, 1);
    let profile = match r.batch {
        1 => profile,
        b => profile.replace("batch-1 decode step", &format!("batch-{b} decode step")),
    };
    format!(
        "| shape | device | weights (read a step) | copy GB/s (r+w) | limit steps/s | batch | prefill ms | decode step ms | decode tok/s | steps of the limit | weights GB/s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} ({}) | {:.0} | {:.1} | {} | {:.2} | {:.3} | {:.1} | {:.1}% | {:.1} |\n{}",
        r.shape,
        r.device,
        framework::human_bytes(r.weight_bytes as u64),
        framework::human_bytes(r.read_bytes as u64),
        r.copy_rw_gbps,
        r.limit_tok_s,
        r.batch,
        r.prefill_ms,
        r.step_ms,
        r.decode_tok_s,
        100.0 * r.fraction_of_limit,
        r.weight_gbps,
        profile
    )
}
