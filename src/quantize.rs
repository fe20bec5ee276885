//! `parallm quantize IN OUT --type T`: a GGUF file's weights in another
//! numeric type, as a GGUF file that llama.cpp loads.
//!
//! Which tensor gets which type follows llama.cpp's `llama-quantize` (read
//! for the facts, written here): only weight matrices are quantized (not
//! norms, biases or 1-D tensors); the output projection, or the token
//! embeddings where they are tied to it, get Q6_K under any block type but
//! Q8_0; the Q4_K/Q5_K `_M` mixes give `attn_v` and `ffn_down` Q6_K in the
//! layers `use_more_bits` picks (the first and last eighth, and every third
//! between) and a fused `attn_qkv` one step more; the Q2_K and Q3_K mixes
//! give `attn_v`, `ffn_down` and `attn_output` more bits ([`Target`]); a row length that the
//! chosen type's blocks do not divide falls back (Q4_K → Q5_0, Q5_K →
//! Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0, and F16 if even 32 does not
//! divide it). `--keep TYPE:NAMES` holds chosen tensors at a type of their
//! own (the mixed-precision recipe).
//!
//! The blocks are candle's quantizers (`QTensor::quantize`, the GGML
//! reference layouts), or with `--imatrix` (an importance matrix,
//! [`crate::calibrate`]) the importance-weighted ones of
//! [`crate::weighted`] for the tensors it has an entry for and types that
//! use one (as llama-quantize does), over tensors in parallel; the file is candle's GGUF
//! writer's, written to a temporary name and renamed when whole. A source
//! that is already quantized is only requantized to a type of fewer bits
//! per weight with `--allow-requantize`.

use std::path::Path;

use crate::calibrate::Imatrix;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use framework::GgufFile;
use indicatif::{ProgressBar, ProgressStyle};

use crate::files::AtomicFile;
use crate::CliResult;

/// What `--type` names: one block type for every weight matrix, or one of
/// llama.cpp's mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every weight matrix in this type (with llama.cpp's output rule).
    Plain(GgmlDType),
    /// Q4_K_S: Q4_K, with Q5_K for the first `attn_v` and `ffn_down`s.
    Q4KS,
    /// Q4_K_M: Q4_K, with Q6_K for `attn_v` and `ffn_down` where
    /// `use_more_bits`.
    Q4KM,
    /// Q5_K_S: Q5_K throughout.
    Q5KS,
    /// Q5_K_M: Q5_K, with Q6_K for `attn_v` and `ffn_down` where
    /// `use_more_bits`.
    Q5KM,
    /// Q2_K: Q2_K, with Q3_K for `ffn_down` and `attn_output`, and Q3_K for
    /// `attn_v` (Q4_K where 4 or more query heads share a KV head).
    Q2K,
    /// Q3_K_S: Q3_K throughout.
    Q3KS,
    /// Q3_K_M: Q3_K, with Q4_K for `attn_output`, a fused `attn_qkv` and
    /// `attn_v` (Q5_K in the first two blocks), and for `ffn_down` (Q5_K in
    /// the first sixteenth).
    Q3KM,
    /// Q3_K_L: Q3_K, with Q5_K for `attn_v`, `ffn_down` and `attn_output`,
    /// and Q4_K for a fused `attn_qkv`.
    Q3KL,
}

/// The names `--type` takes, and what each is.
pub const TYPES: &[(&str, Target)] = &[
    ("f32", Target::Plain(GgmlDType::F32)),
    ("f16", Target::Plain(GgmlDType::F16)),
    ("bf16", Target::Plain(GgmlDType::BF16)),
    ("q8_0", Target::Plain(GgmlDType::Q8_0)),
    ("q5_1", Target::Plain(GgmlDType::Q5_1)),
    ("q5_0", Target::Plain(GgmlDType::Q5_0)),
    ("q4_1", Target::Plain(GgmlDType::Q4_1)),
    ("q4_0", Target::Plain(GgmlDType::Q4_0)),
    ("q6_k", Target::Plain(GgmlDType::Q6K)),
    ("q5_k_m", Target::Q5KM),
    ("q5_k_s", Target::Q5KS),
    ("q4_k_m", Target::Q4KM),
    ("q4_k_s", Target::Q4KS),
    ("q3_k_l", Target::Q3KL),
    ("q3_k_m", Target::Q3KM),
    ("q3_k_s", Target::Q3KS),
    // llama-quantize's alias.
    ("q3_k", Target::Q3KM),
    ("q2_k", Target::Q2K),
];

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let want = s.to_ascii_lowercase();
        TYPES
            .iter()
            .find(|(n, _)| *n == want)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
                format!("--type {s} is not one of {}", names.join(", "))
            })
    }
}

impl Target {
    /// llama.cpp's `general.file_type` for it.
    pub fn file_type(self) -> u32 {
        match self {
            Target::Plain(t) => match t {
                GgmlDType::F32 => 0,
                GgmlDType::F16 => 1,
                GgmlDType::Q4_0 => 2,
                GgmlDType::Q4_1 => 3,
                GgmlDType::Q8_0 => 7,
                GgmlDType::Q5_0 => 8,
                GgmlDType::Q5_1 => 9,
                GgmlDType::Q2K => 10,
                GgmlDType::Q3K => 12,
                GgmlDType::Q6K => 18,
                GgmlDType::BF16 => 32,
                _ => 0,
            },
            Target::Q4KS => 14,
            Target::Q4KM => 15,
            Target::Q5KS => 16,
            Target::Q5KM => 17,
            Target::Q2K => 10,
            Target::Q3KS => 11,
            Target::Q3KM => 12,
            Target::Q3KL => 13,
        }
    }

    /// The block type of ordinary weight matrices.
    fn base(self) -> GgmlDType {
        match self {
            Target::Plain(t) => t,
            Target::Q4KS | Target::Q4KM => GgmlDType::Q4K,
            Target::Q5KS | Target::Q5KM => GgmlDType::Q5K,
            Target::Q2K => GgmlDType::Q2K,
            Target::Q3KS | Target::Q3KM | Target::Q3KL => GgmlDType::Q3K,
        }
    }
}

/// Bits per weight of a block type.
fn bits(t: GgmlDType) -> f64 {
    8.0 * t.type_size() as f64 / t.block_size() as f64
}

pub fn is_quantized(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// `--keep TYPE:NAME,NAME…`: tensors whose names start with one of the
/// prefixes (`blk.N-1` is the last block) stay in TYPE.
#[derive(Debug, Clone)]
pub struct Keep {
    dtype: GgmlDType,
    prefixes: Vec<String>,
}

impl std::str::FromStr for Keep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (t, names) = s.split_once(':').ok_or_else(|| {
            format!("--keep {s}: expected TYPE:NAME[,NAME…], e.g. f16:token_embd,output")
        })?;
        // The K mixes' own block types count as single types here.
        let dtype = match (t.to_ascii_lowercase().as_str(), t.parse::<Target>()) {
            ("q2_k", _) => GgmlDType::Q2K,
            ("q3_k", _) => GgmlDType::Q3K,
            ("q4_k", _) => GgmlDType::Q4K,
            ("q5_k", _) => GgmlDType::Q5K,
            (_, Ok(Target::Plain(d))) => d,
            _ => {
                let mut names: Vec<&str> = TYPES
                    .iter()
                    .filter(|(_, t)| matches!(t, Target::Plain(_)))
                    .map(|(n, _)| *n)
                    .collect();
                names.extend(["q2_k", "q3_k", "q4_k", "q5_k"]);
                return Err(format!(
                    "--keep {s}: {t} is not a single block type (one of {})",
                    names.join(", ")
                ));
            }
        };
        let prefixes: Vec<String> = names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        if prefixes.is_empty() {
            return Err(format!("--keep {s}: no tensor names after the type"));
        }
        Ok(Self { dtype, prefixes })
    }
}

/// What `parallm quantize` was asked for.
pub struct QuantizePlan {
    /// The type or mix.
    pub target: Target,
    /// Tensors held at other types.
    pub keep: Vec<Keep>,
    /// Requantize already quantized weights to fewer bits.
    pub allow_requantize: bool,
    /// An importance matrix weighting each column's quantization error.
    pub imatrix: Option<std::path::PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Worker threads.
    pub threads: usize,
}

/// What was written.
#[derive(Debug)]
pub struct QuantizeReport {
    /// Tensors written, and how many were quantized to each type.
    pub tensors: usize,
    /// Per type: tensors and weights.
    pub types: Vec<(String, usize, usize)>,
    /// Bytes of the output file.
    pub bytes: u64,
}

/// llama.cpp's choice of layers that get more bits.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The block `blk.N.` a tensor belongs to.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// What of a model the choice of types depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Its blocks.
    pub layers: usize,
    /// Whether the output projection is the token embeddings.
    pub tied: bool,
    /// Query heads per KV head.
    pub gqa: usize,
}

impl Shape {
    /// `file`'s shape, its blocks counted as `layers`.
    pub fn of(file: &GgufFile, layers: usize) -> CliResult<Shape> {
        let arch = file.get_str("general.architecture")?.to_string();
        // Head counts given per layer (arrays) leave the ratio at 1.
        let heads = file.get_usize(&format!("{arch}.attention.head_count"));
        let kv_heads = file.opt_usize(&format!("{arch}.attention.head_count_kv"));
        let gqa = match (heads, kv_heads) {
            (Ok(h), Ok(Some(kv))) if kv > 0 => h / kv,
            _ => 1,
        };
        Ok(Shape {
            layers,
            tied: !file.tensor_names().contains(&"output.weight"),
            gqa,
        })
    }
}

/// The type of tensor `name` (`dims` as GgufFile reads them, the row last)
/// under `target`, before `--keep`; `None` when it is not quantized.
pub fn choose(name: &str, dims: &[usize], target: Target, shape: Shape) -> Option<GgmlDType> {
    let Shape { layers, tied, gqa } = shape;
    let quantizable = dims.len() >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight";
    if !quantizable {
        return None;
    }
    let base = target.base();
    let row = *dims.last()?;
    let layer = layer_of(name).unwrap_or(0);
    let more = use_more_bits(layer, layers);
    let mut t = base;
    if !is_quantized(base) {
        return Some(base);
    }
    if name == "output.weight" || (tied && name == "token_embd.weight") {
        t = if row % 256 != 0 || base == GgmlDType::Q8_0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q6K
        };
    } else if name.contains("attn_v.weight") {
        match target {
            Target::Q2K if gqa >= 4 => t = GgmlDType::Q4K,
            Target::Q2K => t = GgmlDType::Q3K,
            Target::Q3KM if layer < 2 => t = GgmlDType::Q5K,
            Target::Q3KM => t = GgmlDType::Q4K,
            Target::Q3KL => t = GgmlDType::Q5K,
            Target::Q4KM | Target::Q5KM if more => t = GgmlDType::Q6K,
            Target::Q4KS if layer < 4 => t = GgmlDType::Q5K,
            _ => {}
        }
    } else if name.contains("ffn_down") {
        match target {
            Target::Q2K => t = GgmlDType::Q3K,
            Target::Q3KM if layer < layers / 16 => t = GgmlDType::Q5K,
            Target::Q3KM => t = GgmlDType::Q4K,
            Target::Q3KL => t = GgmlDType::Q5K,
            Target::Q4KM | Target::Q5KM if more => t = GgmlDType::Q6K,
            Target::Q4KS if layer < layers / 8 => t = GgmlDType::Q5K,
            _ => {}
        }
    } else if name.contains("attn_output.weight") {
        match target {
            Target::Q2K => t = GgmlDType::Q3K,
            Target::Q3KM => t = GgmlDType::Q4K,
            Target::Q3KL => t = GgmlDType::Q5K,
            _ => {}
        }
    } else if name.contains("attn_qkv.weight") {
        match target {
            Target::Q3KM | Target::Q3KL => t = GgmlDType::Q4K,
            Target::Q4KM => t = GgmlDType::Q5K,
            Target::Q5KM => t = GgmlDType::Q6K,
            _ => {}
        }
    }
    Some(fit_row(t, row))
}

/// `t`, or llama.cpp's fallback when its blocks do not divide a row.
fn fit_row(t: GgmlDType, row: usize) -> GgmlDType {
    if row.is_multiple_of(t.block_size()) {
        return t;
    }
    let fallback = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        other => other,
    };
    if row.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// Whether `--keep` holds `name`, and at which type.
fn kept(keep: &[Keep], name: &str, layers: usize) -> Option<GgmlDType> {
    keep.iter().find_map(|k| {
        k.prefixes
            .iter()
            .any(|p| names_tensor(p, name, layers))
            .then_some(k.dtype)
    })
}

/// Whether `--keep`'s name `prefix` names tensor `name` (`blk.N-1`: the
/// last block).
fn names_tensor(prefix: &str, name: &str, layers: usize) -> bool {
    let last = format!("blk.{}", layers.saturating_sub(1));
    let p = if prefix == "blk.N-1" {
        last.as_str()
    } else {
        prefix
    };
    name == p || name.starts_with(&format!("{p}."))
}

/// Refuses a `--keep` name that names no tensor of the file (a typo would
/// otherwise keep nothing, silently).
fn check_keep_names(keep: &[Keep], names: &[&str], layers: usize) -> CliResult {
    // A model whose output matrix is its embedding has no `output`: a
    // keep list written for other models may name it.
    let tied = !names.contains(&"output.weight");
    for k in keep {
        for p in &k.prefixes {
            if p == "output" && tied {
                continue;
            }
            if !names.iter().any(|n| names_tensor(p, n, layers)) {
                return Err(format!(
                    "--keep: '{p}' names no tensor of the model (names look like token_embd, output, blk.0.attn_q, blk.N-1)"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Opens a model to rewrite: a GGUF file, or a Hugging Face directory read
/// as the GGUF file llama.cpp's converter would write from it (its
/// tokenizer's metadata comes from [`base_metadata`]).
pub fn open_gguf(input: &Path) -> CliResult<GgufFile> {
    Ok(GgufFile::open(input)?)
}

/// Changes a tensor's values in place (row-major, rows of `dims.last()`).
pub type Edit = Box<dyn Fn(&mut [f32]) + Send + Sync>;

/// One tensor of the file to write.
pub struct Job {
    /// Its name in the new file.
    pub name: String,
    /// The tensor of the source file it is made from.
    pub source: String,
    /// Its dims as the loader reads them (the row last).
    pub dims: Vec<usize>,
    /// Its type in the source.
    pub from: GgmlDType,
    /// Its type in the new file (`None`: as in the source).
    pub to: Option<GgmlDType>,
    /// A change to its values before they are stored.
    pub edit: Option<Edit>,
    /// Per input column, how much its quantization error weighs (an
    /// importance matrix's mean x²); `None`: every column alike.
    pub importance: Option<Vec<f32>>,
}

impl Job {
    /// Tensor `name` under its own name, stored as `to`, edited by `edit`.
    pub fn keep_name(
        name: &str,
        (dims, from): (Vec<usize>, GgmlDType),
        to: Option<GgmlDType>,
        edit: Option<Edit>,
    ) -> Self {
        Self {
            name: name.to_string(),
            source: name.to_string(),
            dims,
            from,
            to,
            edit,
            importance: None,
        }
    }
}

/// The source file's metadata without the keys a rewrite sets, as owned
/// pairs to add to. A Hugging Face directory's also holds what a GGUF file
/// written from it needs besides its `config.json` keys: `general.name` and
/// the tokenizer in GGUF's keys ([`framework::hf::gguf_metadata`]; an error
/// naming `tokenizer.json` when GGUF cannot say it).
pub fn base_metadata(file: &GgufFile) -> CliResult<Vec<(String, Value)>> {
    let mut meta: Vec<(String, Value)> = file
        .metadata_entries()
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                *k,
                "general.alignment" | "general.file_type" | "general.quantization_version"
            )
        })
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    if file.hf().is_some() {
        meta.extend(framework::hf::gguf_metadata(file)?);
        // The general keys first, as the converter writes them.
        meta.sort_by_key(|(k, _)| !k.starts_with("general."));
    }
    Ok(meta)
}

/// Writes `jobs` (in order) with `meta` to `output`, the tensors converted
/// on `threads` threads.
pub fn rewrite(
    file: &GgufFile,
    jobs: &[Job],
    meta: &[(String, Value)],
    output: &Path,
    (progress, threads): (bool, usize),
) -> CliResult<QuantizeReport> {
    let bar = if progress {
        let b = ProgressBar::new(jobs.len() as u64);
        if let Ok(s) = ProgressStyle::with_template("{bar:40} {pos}/{len} tensors, {elapsed} {msg}")
        {
            b.set_style(s);
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<QTensor>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let failed: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else {
                    break;
                };
                if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                match convert(file, job) {
                    Ok(q) => {
                        if let Ok(mut d) = done.lock() {
                            d[i] = Some(q);
                        }
                        bar.inc(1);
                    }
                    Err(e) => {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e.into());
    }
    let tensors: Vec<QTensor> = done
        .into_inner()
        .map_err(|_| "a converting thread panicked")?
        .into_iter()
        .collect::<Option<_>>()
        .ok_or("a tensor was not converted")?;
    // The writer aligns data at 32 bytes, GGUF's default.
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let named: Vec<(&str, &QTensor)> = jobs
        .iter()
        .map(|j| j.name.as_str())
        .zip(tensors.iter())
        .collect();
    let mut out = AtomicFile::create(output)?;
    candle_core::quantized::gguf_file::write(out.file(), &meta, &named)
        .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    out.commit()?;
    let mut types: Vec<(String, usize, usize)> = Vec::new();
    for q in &tensors {
        let name = format!("{:?}", q.dtype());
        let n = q.shape().elem_count();
        match types.iter_mut().find(|(t, _, _)| *t == name) {
            Some(e) => {
                e.1 += 1;
                e.2 += n;
            }
            None => types.push((name, 1, n)),
        }
    }
    Ok(QuantizeReport {
        tensors: tensors.len(),
        types,
        bytes: std::fs::metadata(output)?.len(),
    })
}

/// Quantizes `input` into `output`.
pub fn quantize(input: &Path, output: &Path, plan: &QuantizePlan) -> CliResult<QuantizeReport> {
    let file = open_gguf(input)?;
    let arch = file.get_str("general.architecture")?.to_string();
    let layers = file.get_usize(&format!("{arch}.block_count"))?;
    let names = file.tensor_names();
    let shape = Shape::of(&file, layers)?;
    // Each tensor's source and chosen type.
    let imatrix = match &plan.imatrix {
        Some(path) => Some(Imatrix::read(path)?),
        None => None,
    };
    check_keep_names(&plan.keep, &names, layers)?;
    let (mut weighted, mut would_weigh) = (0, 0);
    let mut jobs = Vec::with_capacity(names.len());
    for name in names {
        let (from, dims) = file.tensor_info(name)?;
        // `--keep` applies to what would be quantized (weight matrices;
        // norms stay f32).
        let to = choose(name, &dims, plan.target, shape)
            .map(|t| {
                kept(&plan.keep, name, layers).map_or(t, |k| fit_row(k, *dims.last().unwrap_or(&1)))
            })
            .or_else(|| {
                // From a Hugging Face directory, as llama.cpp's converter
                // writes them: norms, other 1-D tensors, and the position
                // and token-type embeddings and expert gates in f32.
                let one_d = dims.len() < 2
                    || name.ends_with("_norm.weight")
                    || name.contains("ffn_gate_inp.weight")
                    || name == "position_embd.weight"
                    || name == "token_types.weight";
                (file.hf().is_some() && one_d && from != GgmlDType::F32).then_some(GgmlDType::F32)
            });
        if let Some(to) = to {
            refuse_requantize(input, name, from, to, plan.allow_requantize)?;
        }
        let row = *dims.last().unwrap_or(&1);
        let importance = match (&imatrix, to) {
            (Some(m), Some(t)) if crate::weighted::uses_weights(t) => {
                would_weigh += 1;
                m.mean_sq(name, row)?
            }
            _ => None,
        };
        weighted += importance.is_some() as usize;
        let mut job = Job::keep_name(name, (dims, from), to, None);
        job.importance = importance;
        jobs.push(job);
    }
    match (&plan.imatrix, weighted, would_weigh) {
        // Q8_0 and the float types round each weight alone.
        (Some(path), _, 0) => eprintln!(
            "note: --imatrix {} is not used: this type quantizes without importance weights",
            path.display()
        ),
        (Some(path), 0, _) => {
            return Err(format!(
                "--imatrix {}: it holds no entry for any of the {would_weigh} tensors this type quantizes with weights (is it another model's?)",
                path.display()
            )
            .into())
        }
        _ => {}
    }
    let mut meta = base_metadata(&file)?;
    meta.push((
        "general.file_type".into(),
        Value::U32(plan.target.file_type()),
    ));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    if let (Some(m), Some(path)) = (&imatrix, &plan.imatrix) {
        // As gguf_set_val does: a key the source has keeps its place.
        for (k, v) in m.quantize_metadata(path) {
            match meta.iter_mut().find(|(key, _)| *key == k) {
                Some(slot) => slot.1 = v,
                None => meta.push((k, v)),
            }
        }
    }
    rewrite(&file, &jobs, &meta, output, (plan.progress, plan.threads))
}

/// Refuses to store `name` (held as `from`) as a quantized type of fewer
/// bits, unless `allow`.
pub fn refuse_requantize(
    input: &Path,
    name: &str,
    from: GgmlDType,
    to: GgmlDType,
    allow: bool,
) -> CliResult {
    if is_quantized(from) && is_quantized(to) && bits(to) < bits(from) && !allow {
        return Err(format!(
            "{} holds {name} as {from:?} already; requantizing it to {to:?} ({:.2} bits a weight, fewer than {:.2}) loses more than quantizing the original would. Quantize the f16/bf16/f32 file instead, or pass --allow-requantize",
            input.display(),
            bits(to),
            bits(from)
        )
        .into());
    }
    Ok(())
}

/// One tensor in its new type, its values edited first where the job says.
fn convert(file: &GgufFile, job: &Job) -> Result<QTensor, String> {
    let name = &job.source;
    let q = file.tensor(name, &job.dims).map_err(|e| e.to_string())?;
    let to = job.to.unwrap_or(job.from);
    if to == job.from && job.edit.is_none() {
        return Ok(q);
    }
    let f = q
        .dequantize(&Device::Cpu)
        .map_err(|e| format!("{name}: cannot read as f32: {e}"))?;
    let f = match &job.edit {
        None => f,
        Some(edit) => {
            let mut v: Vec<f32> = f
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| format!("{name}: cannot read as f32: {e}"))?;
            edit(&mut v);
            candle_core::Tensor::from_vec(v, job.dims.as_slice(), &Device::Cpu)
                .map_err(|e| format!("{name}: {e}"))?
        }
    };
    match &job.importance {
        Some(w) => {
            let v: Vec<f32> = f
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| format!("{name}: cannot read as f32: {e}"))?;
            let bytes = crate::weighted::quantize_weighted(to, &v, w)
                .map_err(|e| format!("{name}: {e}"))?;
            candle_core::quantized::ggml_file::qtensor_from_ggml(
                to,
                &bytes,
                job.dims.clone(),
                &Device::Cpu,
            )
            .map_err(|e| format!("{name}: cannot store as {to:?}: {e}"))
        }
        None => {
            QTensor::quantize(&f, to).map_err(|e| format!("{name}: cannot store as {to:?}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_go_to_the_first_and_last_eighth_and_every_third_between() {
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        // n/8 = 3, 7n/8 = 26: 0..3, 26..30, and 3 + 2, 3 + 5, …
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn types_follow_llama_cpps_rules() {
        use GgmlDType::*;
        let (q4km, q8, q4, f16) = (
            Target::Q4KM,
            Target::Plain(Q8_0),
            Target::Plain(Q4_0),
            Target::Plain(F16),
        );
        let wide = [49152, 1024];
        type Case<'a> = (&'a str, &'a [usize], Target, bool, Option<GgmlDType>);
        let cases: [Case<'_>; 12] = [
            // Tied embeddings 576 wide: Q6_K does not fit, Q8_0.
            ("token_embd.weight", &[49152, 576], q4km, true, Some(Q8_0)),
            ("token_embd.weight", &wide, q4km, true, Some(Q6K)),
            ("output.weight", &wide, q8, false, Some(Q8_0)),
            ("output.weight", &wide, q4, false, Some(Q6K)),
            // Q4_K rows of 576 fall back to Q5_0; ffn_down rows of 1536 fit.
            ("blk.4.attn_q.weight", &[576, 576], q4km, true, Some(Q5_0)),
            ("blk.4.ffn_down.weight", &[576, 1536], q4km, true, Some(Q4K)),
            ("blk.5.ffn_down.weight", &[576, 1536], q4km, true, Some(Q6K)),
            ("blk.0.attn_v.weight", &[192, 1024], q4km, true, Some(Q6K)),
            ("blk.4.attn_v.weight", &[192, 1024], q4km, true, Some(Q4K)),
            // Norms and 1-D tensors are never quantized.
            ("blk.0.attn_norm.weight", &[576], q4km, true, None),
            ("blk.0.attn_q.bias", &[576], q4km, true, None),
            ("token_embd.weight", &[49152, 576], f16, true, Some(F16)),
        ];
        for (name, dims, target, tied, want) in cases {
            let shape = Shape {
                layers: 30,
                tied,
                gqa: 3,
            };
            assert_eq!(choose(name, dims, target, shape), want, "{name} {target:?}");
        }
        // The Q2_K and Q3_K mixes, on rows of whole super-blocks.
        let row = [1024, 1024];
        let shape = |gqa| Shape {
            layers: 32,
            tied: false,
            gqa,
        };
        for (name, target, gqa, want) in [
            ("blk.7.attn_q.weight", Target::Q2K, 1, Q2K),
            ("blk.7.attn_v.weight", Target::Q2K, 1, Q3K),
            ("blk.7.attn_v.weight", Target::Q2K, 4, Q4K),
            ("blk.7.ffn_down.weight", Target::Q2K, 1, Q3K),
            ("blk.7.attn_output.weight", Target::Q2K, 1, Q3K),
            ("blk.7.ffn_up.weight", Target::Q2K, 1, Q2K),
            ("blk.7.attn_v.weight", Target::Q3KS, 1, Q3K),
            ("blk.7.ffn_down.weight", Target::Q3KS, 1, Q3K),
            ("blk.1.attn_v.weight", Target::Q3KM, 1, Q5K),
            ("blk.2.attn_v.weight", Target::Q3KM, 1, Q4K),
            ("blk.1.ffn_down.weight", Target::Q3KM, 1, Q5K),
            ("blk.2.ffn_down.weight", Target::Q3KM, 1, Q4K),
            ("blk.2.attn_output.weight", Target::Q3KM, 1, Q4K),
            ("blk.2.attn_qkv.weight", Target::Q3KM, 1, Q4K),
            ("blk.2.ffn_gate.weight", Target::Q3KM, 1, Q3K),
            ("blk.9.attn_v.weight", Target::Q3KL, 1, Q5K),
            ("blk.9.ffn_down.weight", Target::Q3KL, 1, Q5K),
            ("blk.9.attn_output.weight", Target::Q3KL, 1, Q5K),
            ("blk.9.attn_k.weight", Target::Q3KL, 1, Q3K),
            ("output.weight", Target::Q2K, 1, Q6K),
        ] {
            assert_eq!(
                choose(name, &row, target, shape(gqa)),
                Some(want),
                "{name} {target:?} gqa {gqa}"
            );
        }
        assert_eq!("q3_k".parse::<Target>(), Ok(Target::Q3KM));
        assert_eq!(Target::Q3KM.file_type(), 12);
        // A row no block divides is kept in f16.
        assert_eq!(fit_row(Q4_0, 100), F16);
    }

    #[test]
    fn keep_parses_and_names_the_last_block() {
        let k: Keep = "f16:token_embd,blk.0,blk.N-1".parse().unwrap();
        let keep = [k];
        assert_eq!(kept(&keep, "token_embd.weight", 30), Some(GgmlDType::F16));
        assert_eq!(
            kept(&keep, "blk.29.ffn_up.weight", 30),
            Some(GgmlDType::F16)
        );
        assert_eq!(kept(&keep, "blk.0.attn_q.weight", 30), Some(GgmlDType::F16));
        assert_eq!(kept(&keep, "blk.10.attn_q.weight", 30), None);
        assert!("q4_k_m:output".parse::<Keep>().is_err());
        // The mixes' block types are single types here, as before the
        // Q2_K and Q3_K mixes.
        for (t, want) in [("q2_k", GgmlDType::Q2K), ("q3_k", GgmlDType::Q3K)] {
            let k: Keep = format!("{t}:blk.0").parse().unwrap();
            assert_eq!(k.dtype, want);
        }
        assert!("f16".parse::<Keep>().is_err());
        assert!("q9_9".parse::<Target>().unwrap_err().contains("q4_k_m"));
    }
}
