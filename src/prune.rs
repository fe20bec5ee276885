//! `parallm prune IN OUT`: zero the least important weights of every
//! block's weight matrices (`--method magnitude` or `wanda`), or remove whole
//! blocks (`--method layers --drop K`).
//!
//! Both zeroing methods work per output row, as Wanda and SparseGPT count:
//! `--sparsity S` zeroes the `round(S · row)` weights of lowest score in
//! each row (ties to the lower index), and a pattern `N:M` keeps the N of
//! highest score in every M consecutive weights of a row. Magnitude's score
//! is `|W_ij|`; Wanda's (Sun et al. 2023, "A Simple and Effective Pruning
//! Approach for Large Language Models") is `|W_ij| · ‖X_j‖₂`, the norm of
//! input column j over the calibration text's tokens, collected through
//! the engine from `--calib` ([`crate::calibrate`]) or read from an
//! importance matrix (`--imatrix`, whose Σx² is the norm squared). Only the
//! matrices of the blocks are pruned (not the embeddings or the output
//! head). The file keeps each tensor's type unless `--type` names one (then
//! chosen per tensor as `quantize` does); zeros survive every symmetric
//! block type, while offset types (Q4_1, Q5_1, and the K formats with
//! minimums) store them only approximately, so a pruned matrix of such a
//! type is stored in the symmetric type of its width ([`zero_keeping`])
//! unless `--type` says otherwise.
//!
//! Dropping blocks follows ShortGPT (Men et al. 2024): a block whose output
//! hidden state is most like its input changes least, so the K blocks of
//! highest mean cosine similarity between input and output over the
//! calibration text (`--calib`, windows of `--ctx` tokens) are removed. The
//! similarities are measured by running the model one block per pipeline
//! stage, so every block's input and output rows are seen; the last block
//! is never dropped (its output goes only to the final norm and head, which
//! a stage hands back as logits). The remaining blocks are renumbered and
//! `{arch}.block_count` rewritten, with any per-block metadata array cut to
//! match.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use framework::model::{PagedItem, StageInput, StageOutput};
use framework::{GgufFile, LlamaShard, LogitsWanted, ShardSpec, WeightFormat};

use crate::calibrate::{self, Imatrix};
use crate::quantize::{self, Edit, Job, Target};
use crate::CliResult;

/// Which weights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The smallest |w| of each row of the blocks' matrices.
    Magnitude,
    /// The smallest |w| · ‖x‖ (Wanda), with input norms from `--calib` or
    /// `--imatrix`.
    Wanda,
    /// Whole blocks (with `--drop`).
    Layers,
}

/// How a row's pruned weights are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Anywhere in the row.
    Unstructured,
    /// `keep` of every `group` consecutive weights stay.
    NofM {
        /// Weights kept per group.
        keep: usize,
        /// Group size.
        group: usize,
    },
}

impl std::str::FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "unstructured" {
            return Ok(Self::Unstructured);
        }
        let bad =
            || format!("--pattern {s}: expected unstructured or N:M (2:4, 4:8) with 0 < N < M");
        let (n, m) = s.split_once(':').ok_or_else(bad)?;
        let (keep, group): (usize, usize) =
            (n.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if keep == 0 || keep >= group {
            return Err(bad());
        }
        Ok(Self::NofM { keep, group })
    }
}

/// What `parallm prune` was asked for.
pub struct PrunePlan {
    /// Magnitude or layers.
    pub method: Method,
    /// Share of each row zeroed (magnitude).
    pub sparsity: Option<f64>,
    /// Where the zeros go (magnitude).
    pub pattern: Pattern,
    /// Blocks removed (layers).
    pub drop: Option<usize>,
    /// Calibration text (layers, wanda).
    pub calib: Option<PathBuf>,
    /// An importance matrix holding the input norms (wanda).
    pub imatrix: Option<PathBuf>,
    /// Tokens per calibration window.
    pub ctx: usize,
    /// Calibration windows at most.
    pub windows: usize,
    /// The output's type (default: each tensor's own).
    pub target: Option<Target>,
    /// Requantize to fewer bits.
    pub allow_requantize: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Threads.
    pub threads: usize,
}

/// Prunes `input` into `output`; returns a line on what was done.
pub fn prune(input: &Path, output: &Path, plan: &PrunePlan) -> CliResult<String> {
    if plan.windows == 0 {
        return Err("--windows must be at least 1".into());
    }
    let file = quantize::open_gguf(input)?;
    let arch = file.get_str("general.architecture")?.to_string();
    let layers = file.get_usize(&format!("{arch}.block_count"))?;
    match plan.method {
        Method::Magnitude | Method::Wanda => zero_weights(&file, input, output, plan, layers),
        Method::Layers => drop_layers(&file, input, output, plan, (&arch, layers)),
    }
}

/// The file type of the result: `--type`'s, or the source's.
fn file_type(meta: &mut Vec<(String, Value)>, file: &GgufFile, target: Option<Target>) {
    if let Some(t) = target {
        meta.push(("general.file_type".into(), Value::U32(t.file_type())));
    } else if let Ok(Some(ft)) = file.opt_usize("general.file_type") {
        meta.push(("general.file_type".into(), Value::U32(ft as u32)));
    }
    meta.push(("general.quantization_version".into(), Value::U32(2)));
}

/// The type a tensor is stored as under `--type` (`None`: its own),
/// refusing to requantize to fewer bits without the flag.
fn stored_as(
    input: &Path,
    plan: &PrunePlan,
    (name, dims, from): (&str, &[usize], candle_core::quantized::GgmlDType),
    shape: quantize::Shape,
) -> CliResult<Option<candle_core::quantized::GgmlDType>> {
    let to = plan
        .target
        .and_then(|t| quantize::choose(name, dims, t, shape));
    if let Some(to) = to {
        quantize::refuse_requantize(input, name, from, to, plan.allow_requantize)?;
    }
    Ok(to)
}

/// The zeros `pattern` and `sparsity` put in one row: the weights of
/// lowest `|w| · scale[j]` (`|w|` without a scale).
fn prune_row(row: &mut [f32], scale: Option<&[f32]>, pattern: Pattern, sparsity: f64) {
    let score: Vec<f32> = match scale {
        Some(s) => row.iter().zip(s).map(|(w, s)| w.abs() * s).collect(),
        None => row.iter().map(|w| w.abs()).collect(),
    };
    let lowest = |from: usize, len: usize, k: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (from..from + len).collect();
        idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    };
    let gone: Vec<usize> = match pattern {
        Pattern::Unstructured => {
            let k = (sparsity * row.len() as f64).round() as usize;
            lowest(0, row.len(), k)
        }
        Pattern::NofM { keep, group } => (0..row.len())
            .step_by(group)
            .flat_map(|g| lowest(g, group.min(row.len() - g), group - keep))
            .collect(),
    };
    for i in gone {
        row[i] = 0.0;
    }
}

/// Whether `name` is a block's weight matrix (what magnitude pruning touches).
fn prunable(name: &str, dims: &[usize], layers: usize) -> bool {
    name.starts_with("blk.")
        && quantize::choose(
            name,
            dims,
            Target::Plain(candle_core::quantized::GgmlDType::F32),
            quantize::Shape {
                layers,
                tied: false,
                gqa: 1,
            },
        )
        .is_some()
}

fn zero_weights(
    file: &GgufFile,
    input: &Path,
    output: &Path,
    plan: &PrunePlan,
    layers: usize,
) -> CliResult<String> {
    let wanda = plan.method == Method::Wanda;
    if plan.drop.is_some() {
        return Err("--drop goes with --method layers".into());
    }
    if !wanda && (plan.calib.is_some() || plan.imatrix.is_some()) {
        return Err("--calib and --imatrix go with --method wanda or layers".into());
    }
    let sparsity = match (plan.pattern, plan.sparsity) {
        (Pattern::Unstructured, None) => {
            return Err("--method magnitude needs --sparsity (or an N:M --pattern)".into())
        }
        (Pattern::Unstructured, Some(s)) => s,
        (Pattern::NofM { keep, group }, s) => {
            let implied = 1.0 - keep as f64 / group as f64;
            if s.is_some_and(|s| (s - implied).abs() > 1e-9) {
                return Err(format!("--sparsity {} contradicts --pattern {keep}:{group}, which zeroes {implied} of each row", s.unwrap_or(0.0)).into());
            }
            implied
        }
    };
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(format!("--sparsity is {sparsity}, must be in (0, 1)").into());
    }
    let names = file.tensor_names();
    if let Pattern::NofM { group, .. } = plan.pattern {
        for &name in &names {
            let (_, dims) = file.tensor_info(name)?;
            let row = *dims.last().unwrap_or(&1);
            if prunable(name, &dims, layers) && row % group != 0 {
                return Err(format!(
                    "--pattern groups of {group} do not divide the rows of {name} ({row} weights)"
                )
                .into());
            }
        }
    }
    let norms = if wanda {
        Some(input_norms(input, plan)?)
    } else {
        None
    };
    let shape = quantize::Shape::of(file, layers)?;
    let mut jobs = Vec::with_capacity(names.len());
    let (mut pruned, mut resymmetrized) = (0, 0);
    for name in names {
        let (from, dims) = file.tensor_info(name)?;
        let row = *dims.last().unwrap_or(&1);
        let to = match stored_as(input, plan, (name, &dims, from), shape)? {
            // Kept in its own type, it would lose its zeros.
            None if prunable(name, &dims, layers) => {
                let to = zero_keeping(from).filter(|t| row % t.block_size() == 0);
                resymmetrized += to.is_some() as usize;
                to
            }
            to => to,
        };
        let edit: Option<Edit> = if prunable(name, &dims, layers) {
            let scale = match &norms {
                Some(m) => Some(
                    m.norms(name, row)?
                        .ok_or_else(|| format!("the calibration recorded no input for {name}"))?,
                ),
                None => None,
            };
            pruned += 1;
            let pattern = plan.pattern;
            Some(Box::new(move |v: &mut [f32]| {
                for r in v.chunks_mut(row) {
                    prune_row(r, scale.as_deref(), pattern, sparsity);
                }
            }))
        } else {
            None
        };
        jobs.push(Job::keep_name(name, (dims, from), to, edit));
    }
    let mut meta = quantize::base_metadata(file)?;
    file_type(&mut meta, file, plan.target);
    let r = quantize::rewrite(file, &jobs, &meta, output, (plan.progress, plan.threads))?;
    Ok(format!(
        "{}: {pruned} matrices pruned by {} to {:.1}% zeros ({}), {} bytes{}",
        output.display(),
        if wanda { "|w|·‖x‖" } else { "|w|" },
        100.0 * sparsity,
        match plan.pattern {
            Pattern::Unstructured => "unstructured".to_string(),
            Pattern::NofM { keep, group } => format!("{keep}:{group}"),
        },
        r.bytes,
        match resymmetrized {
            0 => String::new(),
            n => format!(
                "; {n} of them stored in a symmetric type (Q4_1 and Q4_K as Q4_0, Q5_1 and Q5_K as Q5_0, Q2_K as Q3_K), whose blocks keep zeros exact"
            ),
        }
    ))
}

/// The symmetric block type standing in for offset type `t` in a pruned
/// matrix: a block with a minimum (`d·q + m`) holds 0 only where `m` is a
/// multiple of `d`, so pruned weights would come back as small non-zeros;
/// `d·q` blocks hold 0 exactly. `None` for a type that keeps zeros.
pub fn zero_keeping(
    t: candle_core::quantized::GgmlDType,
) -> Option<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType as T;
    match t {
        T::Q4_1 | T::Q4K => Some(T::Q4_0),
        T::Q5_1 | T::Q5K => Some(T::Q5_0),
        T::Q2K => Some(T::Q3K),
        _ => None,
    }
}

/// Wanda's input norms: from `--imatrix`, or collected from `--calib`
/// through an engine running `input`.
fn input_norms(input: &Path, plan: &PrunePlan) -> CliResult<Imatrix> {
    match (&plan.imatrix, &plan.calib) {
        (Some(_), Some(_)) => Err("give --calib or --imatrix, not both".into()),
        (None, None) => Err("--method wanda needs --calib TEXT (or --imatrix FILE)".into()),
        (Some(path), None) => Imatrix::read(path),
        (None, Some(calib)) => {
            let text = calibrate::read_text(calib)?;
            let engine = parallm::Engine::builder()
                .model_path(input)
                // The model's activations as stored, not requantized.
                .weights(framework::WeightFormat::Native)
                .prefix_caching(false)
                .collect_activations(true)
                .build()?;
            let cal = calibrate::collect(
                &engine,
                &text,
                (plan.ctx, Some(plan.windows)),
                plan.progress,
            )
            .map_err(|e| format!("--calib {}: {e}", calib.display()));
            engine.shutdown();
            let cal = cal?;
            let file = quantize::open_gguf(input)?;
            Imatrix::from_calibration(&file, &cal)
        }
    }
}

/// Mean cosine similarity of each block's input and output rows over the
/// calibration windows (`None` for the last block, which is not measured).
fn block_similarity(
    file: &GgufFile,
    plan: &PrunePlan,
    layers: usize,
) -> CliResult<Vec<Option<f64>>> {
    let calib = plan
        .calib
        .as_ref()
        .ok_or("--method layers needs --calib TEXT")?;
    let text = std::fs::read_to_string(calib)
        .map_err(|e| format!("cannot read {}: {e}", calib.display()))?;
    let tok = framework::Tokenizer::from_gguf(file)?;
    let tokens = tok.encode(&text)?;
    let ctx = plan.ctx;
    if ctx < 2 || tokens.len() < ctx {
        return Err(format!(
            "--calib {} is {} tokens; it needs at least one window of --ctx {ctx}",
            calib.display(),
            tokens.len()
        )
        .into());
    }
    let windows: Vec<&[u32]> = tokens.chunks_exact(ctx).take(plan.windows).collect();
    // The first block's input is the token's embedding row (a scale, as
    // Gemma's, changes no cosine).
    let (_, edims) = file.tensor_info("token_embd.weight")?;
    let embd: Vec<f32> = file
        .tensor("token_embd.weight", &edims)?
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| format!("token_embd.weight: {e}"))?;
    let hidden = match edims[..] {
        [_, h] if h > 0 => h,
        _ => {
            return Err(
                format!("token_embd.weight has shape {edims:?}, expected [vocab, hidden]").into(),
            )
        }
    };
    let stages: Vec<LlamaShard> = (0..layers - 1)
        .map(|l| LlamaShard::load_stage(file, ShardSpec::SINGLE, l..l + 1, WeightFormat::Native))
        .collect::<Result<_, _>>()?;
    let block = 16;
    let blocks = ctx.div_ceil(block);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut sums = vec![0.0f64; layers - 1];
    let mut rows = 0usize;
    for w in &windows {
        let mut x: Vec<f32> = Vec::with_capacity(w.len() * hidden);
        for &t in w.iter() {
            let row = embd
                .get(t as usize * hidden..(t as usize + 1) * hidden)
                .ok_or_else(|| format!("token {t} has no row in token_embd.weight"))?;
            x.extend_from_slice(row);
        }
        for (l, stage) in stages.iter().enumerate() {
            let mut pool = stage.new_pool(block, blocks);
            let item = [PagedItem {
                tokens: w,
                start: 0,
                table: &table,
                logits: LogitsWanted::None,
            }];
            let input = if l == 0 {
                StageInput::Tokens
            } else {
                StageInput::Hidden(x.clone())
            };
            let StageOutput::Hidden(y) = stage.forward_paged(
                &item,
                input,
                &mut pool,
                &framework::collective::SingleCollective,
            )?
            else {
                return Err(format!("block {l} did not hand back hidden rows").into());
            };
            for (a, b) in x.chunks_exact(hidden).zip(y.chunks_exact(hidden)) {
                sums[l] += cosine(a, b);
            }
            x = y;
        }
        rows += w.len();
    }
    let mut out: Vec<Option<f64>> = sums.into_iter().map(|s| Some(s / rows as f64)).collect();
    out.push(None);
    Ok(out)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// The `drop` blocks of highest similarity (the last never), in order.
fn chosen_blocks(similarity: &[Option<f64>], drop: usize) -> Vec<usize> {
    let mut cands: Vec<(usize, f64)> = similarity
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect();
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out: Vec<usize> = cands.into_iter().take(drop).map(|(i, _)| i).collect();
    out.sort_unstable();
    out
}

fn drop_layers(
    file: &GgufFile,
    input: &Path,
    output: &Path,
    plan: &PrunePlan,
    (arch, layers): (&str, usize),
) -> CliResult<String> {
    if plan.sparsity.is_some() || plan.pattern != Pattern::Unstructured {
        return Err("--sparsity and --pattern go with --method magnitude or wanda".into());
    }
    if plan.imatrix.is_some() {
        return Err("--imatrix goes with --method wanda".into());
    }
    // Gemma 2 and 3 choose each block's attention window (and Gemma 3 its
    // rope base) by the block's index: renumbering the blocks kept would
    // change what they compute.
    if matches!(arch, "gemma2" | "gemma3") {
        return Err(format!(
            "--method layers cannot drop blocks of a {arch} model: its blocks alternate local and global attention by their index, so the blocks kept would change their attention once renumbered (prune --method wanda or magnitude instead)"
        )
        .into());
    }
    let drop = plan.drop.ok_or("--method layers needs --drop K")?;
    if drop == 0 || drop >= layers {
        return Err(format!(
            "--drop is {drop}; the model has {layers} blocks, so it must be in [1, {}]",
            layers - 1
        )
        .into());
    }
    let similarity = block_similarity(file, plan, layers)?;
    let gone = chosen_blocks(&similarity, drop);
    if gone.len() < drop {
        return Err(format!(
            "--drop {drop}: only {} blocks can be dropped (the last is kept)",
            gone.len()
        )
        .into());
    }
    // Old block index → new one.
    let renumber: Vec<Option<usize>> = {
        let mut next = 0;
        (0..layers)
            .map(|l| {
                (!gone.contains(&l)).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect()
    };
    let names = file.tensor_names();
    let shape = quantize::Shape::of(file, layers)?;
    let mut jobs = Vec::new();
    for name in names {
        let new_name = match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, rest)) => match l
                .parse::<usize>()
                .ok()
                .and_then(|l| renumber.get(l).copied().flatten())
            {
                Some(n) => format!("blk.{n}.{rest}"),
                None => continue,
            },
            None => name.to_string(),
        };
        let (from, dims) = file.tensor_info(name)?;
        let to = stored_as(input, plan, (name, &dims, from), shape)?;
        jobs.push(Job {
            name: new_name,
            source: name.to_string(),
            dims,
            from,
            to,
            edit: None,
            importance: None,
        });
    }
    let block_count = format!("{arch}.block_count");
    let mut meta: Vec<(String, Value)> = quantize::base_metadata(file)?
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                _ if k == block_count => Value::U32((layers - drop) as u32),
                // Per-block arrays lose the dropped blocks' entries.
                Value::Array(a) if k.starts_with(&format!("{arch}.")) && a.len() == layers => {
                    Value::Array(
                        a.into_iter()
                            .enumerate()
                            .filter(|(i, _)| renumber[*i].is_some())
                            .map(|(_, v)| v)
                            .collect(),
                    )
                }
                v => v,
            };
            (k, v)
        })
        .collect();
    file_type(&mut meta, file, plan.target);
    let r = quantize::rewrite(file, &jobs, &meta, output, (plan.progress, plan.threads))?;
    let sims: Vec<String> = gone
        .iter()
        .map(|&l| format!("{l} ({:.4})", similarity[l].unwrap_or(0.0)))
        .collect();
    Ok(format!(
        "{}: blocks {} dropped (cosine of input and output), {} of {layers} left, {} bytes",
        output.display(),
        sims.join(", "),
        layers - drop,
        r.bytes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_exactly_their_share_and_patterns_their_n_of_m() {
        let row: Vec<f32> = (0..16).map(|i| ((i * 7 % 16) as f32 - 7.5) * 0.1).collect();
        let mut half = row.clone();
        prune_row(&mut half, None, Pattern::Unstructured, 0.5);
        assert_eq!(half.iter().filter(|x| **x == 0.0).count(), 8);
        // The kept ones are the largest.
        let min_kept = half
            .iter()
            .filter(|x| **x != 0.0)
            .map(|x| x.abs())
            .fold(f32::MAX, f32::min);
        let max_gone = row
            .iter()
            .zip(&half)
            .filter(|(_, h)| **h == 0.0)
            .map(|(x, _)| x.abs())
            .fold(0.0, f32::max);
        assert!(min_kept >= max_gone);
        let mut two_of_four = row.clone();
        prune_row(&mut two_of_four, None, "2:4".parse().unwrap(), 0.5);
        for g in two_of_four.chunks(4) {
            assert_eq!(g.iter().filter(|x| **x == 0.0).count(), 2, "{g:?}");
        }
        assert!("4:4".parse::<Pattern>().is_err());
        assert!("0:4".parse::<Pattern>().is_err());
        assert!("x".parse::<Pattern>().is_err());
    }

    #[test]
    fn wanda_weighs_each_weight_by_its_input_norm() {
        // Column 0's input is small, column 1's large: the larger weight of
        // column 0 goes, not the smaller one of column 1.
        let mut row = vec![0.5, 0.2, 1.0, 1.0];
        prune_row(
            &mut row,
            Some(&[0.1, 10.0, 1.0, 1.0]),
            Pattern::Unstructured,
            0.25,
        );
        assert_eq!(row, [0.0, 0.2, 1.0, 1.0]);
        let mut row = vec![0.5, 0.2, 1.0, 1.0];
        prune_row(&mut row, None, Pattern::Unstructured, 0.25);
        assert_eq!(row, [0.5, 0.0, 1.0, 1.0]);
        // N:M groups are scored the same way, each on its own.
        let mut row = vec![0.5, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.4];
        let scale = [0.1, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        prune_row(&mut row, Some(&scale), "2:4".parse().unwrap(), 0.5);
        assert_eq!(row, [0.0, 0.2, 0.0, 0.4, 0.5, 0.0, 0.0, 0.4]);
    }

    #[test]
    fn the_most_similar_blocks_go_and_never_the_last() {
        let s = [Some(0.5), Some(0.9), Some(0.7), Some(0.95), None];
        assert_eq!(chosen_blocks(&s, 2), [1, 3]);
        assert_eq!(chosen_blocks(&s, 9), [0, 1, 2, 3]);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
    }
}
