//! Calibration through the engine: the activation statistics of a text
//! ([`framework::activations`]), and the importance-matrix files that hold
//! them (`parallm imatrix`, read by `quantize --imatrix` and `prune
//! --method wanda --imatrix`).
//!
//! A calibration run is a perplexity run ([`crate::perplexity`]: windows of
//! `ctx` tokens batched through every node and replica) on an engine built
//! with `collect_activations` and prefix caching off, so every window's
//! every token passes every matrix once. Its result per block matrix is the
//! sum of x² per input column and the rows summed.
//!
//! The file is llama.cpp's GGUF importance matrix (`general.type =
//! imatrix`): per weight tensor `NAME`, an f32 tensor `NAME.in_sum2` of one
//! row per expert (here one) holding Σx², and `NAME.counts` holding the rows;
//! `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size` say
//! what it was computed on. llama.cpp's `llama-quantize --imatrix` reads
//! ours, and ours reads its. Tensors sharing an input (q, k and v; gate and
//! up) get the same values, as llama.cpp records them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use framework::activations::{InputSums, MatInput};
use framework::GgufFile;
use parallm::Engine;

use crate::files::AtomicFile;
use crate::perplexity::{self, KldMode, PerplexityPlan};
use crate::CliResult;

/// What a calibration run measured.
pub struct Calibration {
    /// Σx² and rows per layer and input.
    pub sums: BTreeMap<(usize, MatInput), InputSums>,
    /// Windows run.
    pub chunks: usize,
    /// Tokens per window.
    pub ctx: usize,
}

/// Runs `text` through `engine` (built with `collect_activations`) in
/// windows of `ctx` tokens, at most `chunks` of them.
pub fn collect(
    engine: &Engine,
    text: &str,
    (ctx, chunks): (usize, Option<usize>),
    progress: bool,
) -> CliResult<Calibration> {
    if engine.activation_stats().is_none() {
        return Err("the calibration engine does not collect activations".into());
    }
    let plan = PerplexityPlan {
        ctx,
        chunks,
        kld: KldMode::Off,
        json: None,
        progress,
    };
    let report = perplexity::perplexity(engine, text, &plan)?;
    let sums = engine
        .activation_stats()
        .ok_or("the calibration engine does not collect activations")?;
    if sums.is_empty() {
        return Err("the calibration run recorded no activation".into());
    }
    Ok(Calibration {
        sums,
        chunks: report.chunks,
        ctx,
    })
}

/// Reads a calibration text, naming the file in errors.
pub fn read_text(path: &Path) -> CliResult<String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?)
}

/// An importance matrix: Σx² and rows per weight tensor.
#[derive(Debug, Default)]
pub struct Imatrix {
    entries: HashMap<String, (Vec<f32>, f32)>,
    /// Windows it was computed over.
    pub chunks: usize,
    /// The texts it was computed on.
    pub datasets: Vec<String>,
}

impl Imatrix {
    /// One entry per weight matrix of `model` whose input was recorded.
    pub fn from_calibration(model: &GgufFile, cal: &Calibration) -> CliResult<Self> {
        let mut entries = HashMap::new();
        for name in model.tensor_names() {
            let Some(key) = MatInput::of_tensor(name) else {
                continue;
            };
            let Some(s) = cal.sums.get(&key) else {
                continue;
            };
            let (_, dims) = model.tensor_info(name)?;
            let row = dims.last().copied().unwrap_or(0);
            if row != s.sum_sq.len() {
                return Err(format!(
                    "{name} has rows of {row} weights but its input was recorded {} wide",
                    s.sum_sq.len()
                )
                .into());
            }
            let sums = s.sum_sq.iter().map(|&v| v as f32).collect();
            entries.insert(name.to_string(), (sums, s.rows as f32));
        }
        if entries.is_empty() {
            return Err("no weight matrix of the model had its input recorded".into());
        }
        Ok(Self {
            entries,
            chunks: cal.chunks,
            datasets: Vec::new(),
        })
    }

    /// Reads a GGUF importance matrix (ours or llama.cpp's).
    pub fn read(path: &Path) -> CliResult<Self> {
        let file =
            GgufFile::open(path).map_err(|e| format!("--imatrix {}: {e}", path.display()))?;
        if file.opt_str("general.type")? != Some("imatrix") {
            return Err(format!(
                "--imatrix {} is not a GGUF importance matrix (general.type is not \"imatrix\"; the legacy .dat format is not read)",
                path.display()
            )
            .into());
        }
        let values = |name: &str| -> CliResult<Vec<f32>> {
            let (_, dims) = file.tensor_info(name)?;
            Ok(file
                .tensor(name, &dims)?
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(|e| format!("--imatrix {}: {name}: {e}", path.display()))?)
        };
        let mut entries = HashMap::new();
        for name in file.tensor_names() {
            let Some(weight) = name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = values(name)?;
            let counts = values(&format!("{weight}.counts"))?;
            // One matrix (no experts): one count.
            let [count] = counts[..] else {
                return Err(format!(
                    "--imatrix {}: {weight} has {} counts; only single-expert matrices are read",
                    path.display(),
                    counts.len()
                )
                .into());
            };
            if sums.iter().any(|v| !v.is_finite() || *v < 0.0) || !count.is_finite() || count < 0.0
            {
                return Err(format!(
                    "--imatrix {}: {weight} holds a negative or non-finite value",
                    path.display()
                )
                .into());
            }
            entries.insert(weight.to_string(), (sums, count));
        }
        if entries.is_empty() {
            return Err(format!("--imatrix {} holds no entry", path.display()).into());
        }
        let chunks = file.opt_usize("imatrix.chunk_count")?.unwrap_or(0);
        let datasets = match file.metadata("imatrix.datasets") {
            Some(_) => file
                .get_str_array("imatrix.datasets")?
                .into_iter()
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            entries,
            chunks,
            datasets,
        })
    }

    /// The keys llama-quantize adds to a file quantized with this matrix
    /// read from `path` (strings cut to its 127 bytes).
    pub fn quantize_metadata(&self, path: &Path) -> Vec<(String, Value)> {
        let cut = |s: &str| {
            let mut end = s.len().min(127);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            Value::String(s[..end].to_string())
        };
        let mut meta = vec![(
            "quantize.imatrix.file".to_string(),
            cut(&path.display().to_string()),
        )];
        if let Some(d) = self.datasets.first() {
            meta.push(("quantize.imatrix.dataset".into(), cut(d)));
        }
        meta.push((
            "quantize.imatrix.entries_count".into(),
            Value::U32(self.entries.len() as u32),
        ));
        if self.chunks > 0 {
            meta.push((
                "quantize.imatrix.chunks_count".into(),
                Value::U32(self.chunks as u32),
            ));
        }
        meta
    }

    /// Writes the file (whole or not at all); `dataset` names the text.
    pub fn write(&self, path: &Path, dataset: &str, chunk_size: usize) -> CliResult {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(2 * names.len());
        for name in names {
            let (sums, count) = &self.entries[name];
            let t = |v: Vec<f32>, cols: usize| {
                Tensor::from_vec(v, (1, cols), &Device::Cpu)
                    .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
                    .map_err(|e| format!("{name}: {e}"))
            };
            tensors.push((format!("{name}.in_sum2"), t(sums.clone(), sums.len())?));
            tensors.push((format!("{name}.counts"), t(vec![*count], 1)?));
        }
        let meta: Vec<(&str, Value)> = vec![
            ("general.type", Value::String("imatrix".into())),
            (
                "imatrix.datasets",
                Value::Array(vec![Value::String(dataset.into())]),
            ),
            ("imatrix.chunk_count", Value::U32(self.chunks as u32)),
            ("imatrix.chunk_size", Value::U32(chunk_size as u32)),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let named: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = AtomicFile::create(path)?;
        candle_core::quantized::gguf_file::write(out.file(), &meta, &named)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        out.commit()
    }

    /// Weight tensors with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The mean of x² per input column of tensor `name` (llama.cpp's
    /// quantization weights), checked to be `cols` wide.
    pub fn mean_sq(&self, name: &str, cols: usize) -> CliResult<Option<Vec<f32>>> {
        self.checked(name, cols)
            .map(|e| e.map(|(s, c)| s.iter().map(|v| v / c.max(1.0)).collect()))
    }

    /// Wanda's input norms `‖X_j‖₂ = sqrt(Σx²)` per column of tensor `name`.
    pub fn norms(&self, name: &str, cols: usize) -> CliResult<Option<Vec<f32>>> {
        self.checked(name, cols)
            .map(|e| e.map(|(s, _)| s.iter().map(|v| v.sqrt()).collect()))
    }

    fn checked(&self, name: &str, cols: usize) -> CliResult<Option<(&Vec<f32>, f32)>> {
        match self.entries.get(name) {
            None => Ok(None),
            Some((s, _)) if s.len() != cols => Err(format!(
                "the importance matrix's {name} is {} columns wide, the tensor's rows {cols}",
                s.len()
            )
            .into()),
            Some((s, c)) => Ok(Some((s, *c))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_imatrix_file_reads_back_what_was_written() {
        let mut m = Imatrix::default();
        m.entries
            .insert("blk.0.attn_q.weight".into(), (vec![4.0, 9.0, 0.0], 2.0));
        m.chunks = 3;
        let dir = std::env::temp_dir().join(format!("imatrix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        m.write(&path, "text", 512).unwrap();
        let back = Imatrix::read(&path).unwrap();
        assert_eq!(back.chunks, 3);
        assert_eq!(
            back.mean_sq("blk.0.attn_q.weight", 3).unwrap(),
            Some(vec![2.0, 4.5, 0.0])
        );
        assert_eq!(
            back.norms("blk.0.attn_q.weight", 3).unwrap(),
            Some(vec![2.0, 3.0, 0.0])
        );
        assert!(back.mean_sq("blk.0.attn_q.weight", 4).is_err());
        assert_eq!(back.norms("blk.1.attn_q.weight", 3).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
