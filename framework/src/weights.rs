//! Weight matrices: cutting them into shards and choosing their numeric format.
//!
//! A [`Mat`] is a row-major `rows × cols` matrix (rows are output features) held
//! either as raw GGUF blocks of one quantized type or as f32. Shards are cut from
//! it before any conversion: selecting rows (column-parallel layers, vocab
//! shards) copies whole quantized rows byte for byte; selecting columns
//! (row-parallel layers) copies whole blocks when the range is block-aligned and
//! dequantizes otherwise. A shard of a quantized matrix is therefore bit-identical
//! to the same rows of the unsharded matrix, which is what makes sharded and
//! unsharded forwards agree.
//!
//! [`WeightFormat`] then decides what a [`Linear`] computes with: the file's own
//! blocks, blocks re-quantized to Q8_0, or dequantized f32. Blocks of the types
//! `kernels::cpu::quant` implements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) run through
//! those kernels on the current node's thread pool ([`crate::threads`]);
//! other block types run through candle's quantized matmul.

use std::borrow::Cow;
use std::ops::Range;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use kernels::cpu::half_mm::{self, Half};
use kernels::cpu::quant::{self, QuantFormat, QuantizedActs};

use crate::error::{Error, Result};
use crate::threads;

/// The numeric format the layer matmuls compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// What measured fastest on CPU at every batch size: the file's blocks
    /// through parallm's quantized kernels, re-quantized to Q8_0 when the
    /// kernels lack the file's type (f32 where neither fits). Beat an f32
    /// GEMM from batch 1 to prefill; see `docs/benchmarks.md`.
    #[default]
    Auto,
    /// The blocks as stored in the file.
    Native,
    /// Re-quantized on load to Q8_0 (activations quantized to Q8_0 per block).
    Q8_0,
    /// Dequantized to f32 on load; the exact reference numerics.
    F32,
    /// Converted to f16 on load (half the bytes of f32), widened to f32 in
    /// registers by the matmul.
    F16,
    /// Converted to bf16 on load.
    Bf16,
}

impl WeightFormat {
    /// The names accepted by [`FromStr`].
    pub const NAMES: &'static str = "auto, native, q8_0, f32, f16, bf16";
}

impl FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::Config(format!(
                "unknown weight format '{other}' (choose {})",
                Self::NAMES
            ))),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Auto => "auto",
            WeightFormat::Native => "native",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
        })
    }
}

/// A `rows × cols` row-major weight matrix, quantized or f32.
#[derive(Clone)]
pub enum Mat {
    /// GGUF blocks of one type; each row is `cols / block_size` blocks
    /// (F16 and BF16 are kept as stored too, as blocks of one value).
    Quant {
        /// The block type.
        dtype: GgmlDType,
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Raw blocks, row after row.
        bytes: Vec<u8>,
    },
    /// Plain f32.
    F32 {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Values, row after row.
        data: Vec<f32>,
    },
}

impl std::fmt::Debug for Mat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mat({:?}, {}×{})",
            self.dtype_name(),
            self.rows(),
            self.cols()
        )
    }
}

/// The kernels' name for a block type they implement.
fn own_format(dtype: GgmlDType) -> Option<QuantFormat> {
    match dtype {
        GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
        GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
        GgmlDType::Q5_0 => Some(QuantFormat::Q5_0),
        GgmlDType::Q5_1 => Some(QuantFormat::Q5_1),
        GgmlDType::Q4K => Some(QuantFormat::Q4K),
        GgmlDType::Q6K => Some(QuantFormat::Q6K),
        GgmlDType::Q2K => Some(QuantFormat::Q2K),
        GgmlDType::Q3K => Some(QuantFormat::Q3K),
        GgmlDType::Q5K => Some(QuantFormat::Q5K),
        _ => None,
    }
}

/// The 16-bit float type of a stored matrix, which the half kernels run.
fn half_format(dtype: GgmlDType) -> Option<Half> {
    match dtype {
        GgmlDType::F16 => Some(Half::F16),
        GgmlDType::BF16 => Some(Half::Bf16),
        _ => None,
    }
}

impl Mat {
    /// Takes a 2-D tensor read from a file.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        if t.dtype() != GgmlDType::F32 {
            Ok(Mat::Quant {
                dtype: t.dtype(),
                rows,
                cols,
                bytes: t.data()?.into_owned(),
            })
        } else {
            let data = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(Mat::F32 { rows, cols, data })
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Mat::Quant { rows, .. } | Mat::F32 { rows, .. } => *rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Mat::Quant { cols, .. } | Mat::F32 { cols, .. } => *cols,
        }
    }

    fn dtype_name(&self) -> String {
        match self {
            Mat::Quant { dtype, .. } => format!("{dtype:?}"),
            Mat::F32 { .. } => "F32".into(),
        }
    }

    fn qtensor(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Result<QTensor> {
        let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?;
        Ok(QTensor::new(storage, (rows, cols))?)
    }

    /// The same matrix in f32.
    pub fn to_f32(&self) -> Result<Mat> {
        match self {
            Mat::F32 { .. } => Ok(self.clone()),
            Mat::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } => {
                let data = Self::qtensor(*dtype, *rows, *cols, bytes)?
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok(Mat::F32 {
                    rows: *rows,
                    cols: *cols,
                    data,
                })
            }
        }
    }

    /// The rows in `ranges`, concatenated in order.
    pub fn select_rows(&self, ranges: &[Range<usize>]) -> Mat {
        let rows: usize = ranges.iter().map(|r| r.len()).sum();
        match self {
            Mat::Quant {
                dtype, cols, bytes, ..
            } => {
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let mut out = Vec::with_capacity(rows * row_bytes);
                for r in ranges {
                    out.extend_from_slice(&bytes[r.start * row_bytes..r.end * row_bytes]);
                }
                Mat::Quant {
                    dtype: *dtype,
                    rows,
                    cols: *cols,
                    bytes: out,
                }
            }
            Mat::F32 { cols, data, .. } => {
                let mut out = Vec::with_capacity(rows * cols);
                for r in ranges {
                    out.extend_from_slice(&data[r.start * cols..r.end * cols]);
                }
                Mat::F32 {
                    rows,
                    cols: *cols,
                    data: out,
                }
            }
        }
    }

    /// The columns in `range` of every row. Whole blocks are copied when the
    /// range is block-aligned; otherwise the result is f32.
    pub fn select_cols(&self, range: Range<usize>) -> Result<Mat> {
        if range == (0..self.cols()) {
            return Ok(self.clone());
        }
        match self {
            Mat::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } if range.start.is_multiple_of(dtype.block_size())
                && range.end.is_multiple_of(dtype.block_size()) =>
            {
                let (bs, ts) = (dtype.block_size(), dtype.type_size());
                let row_bytes = cols / bs * ts;
                let (a, b) = (range.start / bs * ts, range.end / bs * ts);
                let mut out = Vec::with_capacity(rows * (b - a));
                for r in 0..*rows {
                    out.extend_from_slice(&bytes[r * row_bytes + a..r * row_bytes + b]);
                }
                Ok(Mat::Quant {
                    dtype: *dtype,
                    rows: *rows,
                    cols: range.len(),
                    bytes: out,
                })
            }
            Mat::Quant { .. } => self.to_f32()?.select_cols(range),
            Mat::F32 { rows, cols, data } => {
                let mut out = Vec::with_capacity(rows * range.len());
                for r in 0..*rows {
                    out.extend_from_slice(&data[r * cols + range.start..r * cols + range.end]);
                }
                Ok(Mat::F32 {
                    rows: *rows,
                    cols: range.len(),
                    data: out,
                })
            }
        }
    }

    fn quantize_q8_0(&self) -> Result<Mat> {
        if let Mat::Quant {
            dtype: GgmlDType::Q8_0,
            ..
        } = self
        {
            return Ok(self.clone());
        }
        let (rows, cols) = (self.rows(), self.cols());
        if cols % GgmlDType::Q8_0.block_size() != 0 {
            return self.to_f32();
        }
        let Mat::F32 { data, .. } = self.to_f32()? else {
            unreachable!("to_f32 returns F32")
        };
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        Mat::from_qtensor(&QTensor::quantize(&t, GgmlDType::Q8_0)?)
    }

    /// The same matrix in `kind` (each value rounded to nearest, ties to even).
    pub fn to_half(&self, kind: Half) -> Result<Mat> {
        let dtype = match kind {
            Half::F16 => GgmlDType::F16,
            Half::Bf16 => GgmlDType::BF16,
        };
        if matches!(self, Mat::Quant { dtype: d, .. } if *d == dtype) {
            return Ok(self.clone());
        }
        let Mat::F32 { rows, cols, data } = self.to_f32()? else {
            unreachable!("to_f32 returns F32")
        };
        let bytes = data
            .iter()
            .flat_map(|&v| kind.from_f32(v).to_le_bytes())
            .collect();
        Ok(Mat::Quant {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    /// The matrix in the format `format` computes with (`Auto`: its quantized
    /// part — the file's blocks where the kernels run them, f16 and bf16 as
    /// stored, else Q8_0).
    pub fn into_format(self, format: WeightFormat) -> Result<Mat> {
        match format {
            WeightFormat::Native => Ok(self),
            WeightFormat::Auto => match &self {
                Mat::Quant { dtype, cols, .. }
                    if own_format(*dtype).is_some_and(|f| cols % f.block_size() == 0)
                        || half_format(*dtype).is_some() =>
                {
                    Ok(self)
                }
                _ => self.quantize_q8_0(),
            },
            WeightFormat::Q8_0 => self.quantize_q8_0(),
            WeightFormat::F32 => self.to_f32(),
            WeightFormat::F16 => self.to_half(Half::F16),
            WeightFormat::Bf16 => self.to_half(Half::Bf16),
        }
    }

    /// Stacks matrices with equal column counts. Parts of different types are
    /// brought to a common one first (Q8_0 when possible, else f32).
    pub fn concat_rows(parts: Vec<Mat>) -> Result<Mat> {
        let cols = parts.first().map(Mat::cols).unwrap_or(0);
        if parts.iter().any(|p| p.cols() != cols) {
            return Err(Error::Shard(
                "fused matrices disagree on input width".into(),
            ));
        }
        let same_quant = match parts.first() {
            Some(Mat::Quant { dtype, .. }) => parts
                .iter()
                .all(|p| matches!(p, Mat::Quant { dtype: d, .. } if d == dtype)),
            _ => false,
        };
        let all_f32 = parts.iter().all(|p| matches!(p, Mat::F32 { .. }));
        let parts = if same_quant || all_f32 {
            parts
        } else {
            parts
                .into_iter()
                .map(|p| p.quantize_q8_0())
                .collect::<Result<Vec<_>>>()?
        };
        let rows = parts.iter().map(Mat::rows).sum();
        if parts.iter().all(|p| matches!(p, Mat::F32 { .. })) {
            let mut data = Vec::with_capacity(rows * cols);
            for p in &parts {
                if let Mat::F32 { data: d, .. } = p {
                    data.extend_from_slice(d);
                }
            }
            return Ok(Mat::F32 { rows, cols, data });
        }
        let mut dtype = GgmlDType::Q8_0;
        let mut bytes = Vec::new();
        for p in &parts {
            match p {
                Mat::Quant {
                    dtype: d, bytes: b, ..
                } => {
                    dtype = *d;
                    bytes.extend_from_slice(b);
                }
                // Mixed with f32 because some part could not be Q8_0: fall back to f32.
                Mat::F32 { .. } => {
                    let all = parts.iter().map(Mat::to_f32).collect::<Result<Vec<_>>>()?;
                    return Mat::concat_rows(all);
                }
            }
        }
        Ok(Mat::Quant {
            dtype,
            rows,
            cols,
            bytes,
        })
    }
}

/// Blocks that parallm's own kernels multiply.
struct OwnQuant {
    format: QuantFormat,
    bytes: Vec<u8>,
}

/// 16-bit float weights, row-major.
struct HalfWeights {
    kind: Half,
    bits: Vec<u16>,
}

thread_local! {
    /// Each compute thread's quantized-activation buffer, reused across calls.
    static ACTS: std::cell::RefCell<QuantizedActs> = std::cell::RefCell::new(QuantizedActs::new());
}

/// `y = x·Wᵀ` for a `rows × in` activation block `x` and an `out × in` weight.
///
/// Quantized weights of the types `kernels::cpu::quant` implements run
/// through it (activations quantized to 8-bit blocks, like llama.cpp's Q8_1 /
/// Q8_K) on the current node's pool; other block types through candle's
/// quantized matmul. f32 weights run through [`kernels::cpu::skinny`], a
/// register-tiled GEMM for few rows. `Auto` keeps both: the quantized blocks
/// Every row of the result depends only on its own activation row (the kernels
/// fix their summation order), so a sequence's numbers do not depend on the batch.
pub struct Linear {
    out_features: usize,
    in_features: usize,
    own: Option<OwnQuant>,
    half: Option<HalfWeights>,
    quant: Option<QMatMul>,
    dense: Option<Vec<f32>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Linear({}→{})", self.in_features, self.out_features)
    }
}

impl Linear {
    /// Builds the layer from a matrix already in its compute format.
    pub fn new(mat: Mat) -> Result<Self> {
        let (out_features, in_features) = (mat.rows(), mat.cols());
        let (mut own, mut half, mut quant, mut dense) = (None, None, None, None);
        match mat {
            Mat::Quant { dtype, bytes, .. } if half_format(dtype).is_some() => {
                let kind = half_format(dtype).ok_or_else(|| Error::Shard("unreachable".into()))?;
                let bits = bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                half = Some(HalfWeights { kind, bits });
            }
            Mat::Quant {
                dtype, cols, bytes, ..
            } if own_format(dtype).is_some_and(|f| cols % f.block_size() == 0) => {
                let format = own_format(dtype).ok_or_else(|| Error::Shard("unreachable".into()))?;
                own = Some(OwnQuant { format, bytes });
            }
            Mat::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } => {
                quant = Some(QMatMul::from_qtensor(Mat::qtensor(
                    dtype, rows, cols, &bytes,
                )?)?);
            }
            Mat::F32 { data, .. } => dense = Some(data),
        }
        Ok(Self {
            out_features,
            in_features,
            own,
            half,
            quant,
            dense,
        })
    }

    /// Converts `mat` to `format` and builds the layer.
    pub fn with_format(mat: Mat, format: WeightFormat) -> Result<Self> {
        Self::new(mat.into_format(format)?)
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Computes `x·Wᵀ` for `x` of `rows × in_features`; returns `rows × out_features`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * self.out_features];
        self.forward_into(x, rows, &mut y)?;
        Ok(y)
    }

    /// [`Linear::forward`] into `y` (at least `rows × out_features`; its
    /// first `rows × out_features` values are overwritten), without an
    /// output allocation.
    pub fn forward_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        debug_assert_eq!(x.len(), rows * self.in_features);
        if rows == 0 {
            return Ok(());
        }
        let y = y
            .get_mut(..rows * self.out_features)
            .ok_or_else(|| Error::Shard("linear output buffer too small".into()))?;
        // Every kernel below overwrites all of `y`.
        if let Some(h) = &self.half {
            // On the current compute pool, as the f32 path.
            half_mm::matmul_xwt(
                h.kind,
                x,
                rows,
                &h.bits,
                self.out_features,
                self.in_features,
                y,
            );
            return Ok(());
        }
        match (&self.dense, &self.own, &self.quant) {
            (Some(w), _, _) => {
                kernels::cpu::skinny::matmul_xwt(
                    x,
                    rows,
                    w,
                    self.out_features,
                    self.in_features,
                    y,
                );
                Ok(())
            }
            (_, Some(own), _) => {
                ACTS.with(|acts| {
                    let mut acts = acts.borrow_mut();
                    threads::with_current(|pool| {
                        acts.quantize_on(own.format, x, self.in_features, pool);
                        quant::gemm(own.format, &own.bytes, self.out_features, &acts, y, pool)
                    });
                });
                Ok(())
            }
            (_, _, Some(q)) => {
                let xs = Tensor::from_slice(x, (rows, self.in_features), &Device::Cpu)?;
                y.copy_from_slice(&q.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
            (_, None, None) => Err(Error::Shard("a linear layer without weights".into())),
        }
    }
}

/// A vocab-sharded embedding table: rows `vocab.start..vocab.end` of the full table.
pub struct Embedding {
    vocab: Range<usize>,
    hidden: usize,
    table: EmbeddingTable,
}

enum EmbeddingTable {
    Quant(QTensor),
    F32(Vec<f32>),
}

impl Embedding {
    /// Wraps the local rows of the table.
    pub fn new(mat: Mat, vocab: Range<usize>) -> Result<Self> {
        let hidden = mat.cols();
        let table = match mat {
            Mat::Quant {
                dtype,
                rows,
                cols,
                bytes,
            } => EmbeddingTable::Quant(Mat::qtensor(dtype, rows, cols, &bytes)?),
            Mat::F32 { data, .. } => EmbeddingTable::F32(data),
        };
        Ok(Self {
            vocab,
            hidden,
            table,
        })
    }

    /// Width of a row.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Writes the embedding of every token this shard owns into `out`
    /// (`tokens.len() × hidden`, pre-zeroed); other tokens' rows stay zero.
    pub fn lookup_into(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let local: Vec<(usize, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| self.vocab.contains(&(t as usize)))
            .map(|(i, &t)| (i, (t as usize - self.vocab.start) as u32))
            .collect();
        if local.is_empty() {
            return Ok(());
        }
        let h = self.hidden;
        match &self.table {
            EmbeddingTable::F32(data) => {
                for &(i, t) in &local {
                    let t = t as usize;
                    out[i * h..(i + 1) * h].copy_from_slice(&data[t * h..(t + 1) * h]);
                }
            }
            EmbeddingTable::Quant(q) => {
                let ids: Vec<u32> = local.iter().map(|&(_, t)| t).collect();
                let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
                let rows = q.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?;
                for (k, &(i, _)) in local.iter().enumerate() {
                    out[i * h..(i + 1) * h].copy_from_slice(&rows[k * h..(k + 1) * h]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_mat(rows: usize, cols: usize) -> Mat {
        let mut rng = crate::sampling::Rng::new(7);
        let data = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        Mat::F32 { rows, cols, data }
    }

    #[test]
    fn quantized_row_and_block_selection_is_bit_exact() {
        let q = random_mat(6, 128).into_format(WeightFormat::Q8_0).unwrap();
        let whole = q.to_f32().unwrap();
        let rows = q.select_rows(&[1..3, 4..5]).to_f32().unwrap();
        let expect = whole.select_rows(&[1..3, 4..5]);
        let (Mat::F32 { data: a, .. }, Mat::F32 { data: b, .. }) = (rows, expect) else {
            panic!()
        };
        assert_eq!(a, b);
        let cols = q.select_cols(32..96).unwrap();
        assert!(matches!(cols, Mat::Quant { cols: 64, .. }));
        let (Mat::F32 { data: a, .. }, Mat::F32 { data: b, .. }) =
            (cols.to_f32().unwrap(), whole.select_cols(32..96).unwrap())
        else {
            panic!()
        };
        assert_eq!(a, b);
        // Misaligned column ranges fall back to f32 of the same values.
        assert!(matches!(q.select_cols(10..40).unwrap(), Mat::F32 { .. }));
    }

    #[test]
    fn linear_matches_naive_matmul() {
        let w = random_mat(5, 64);
        let Mat::F32 { data: wd, .. } = w.clone() else {
            panic!()
        };
        let lin = Linear::new(w).unwrap();
        let x: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.01).sin()).collect();
        let y = lin.forward(&x, 2).unwrap();
        for r in 0..2 {
            for o in 0..5 {
                let e: f32 = (0..64).map(|k| x[r * 64 + k] * wd[o * 64 + k]).sum();
                assert!((y[r * 5 + o] - e).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn weight_format_parses() {
        assert_eq!("Q8_0".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        assert!("q3".parse::<WeightFormat>().is_err());
    }
}
#[cfg(test)]
mod split_tests {
    use super::*;

    /// Pins why sharded quantized layers can match the whole: a row slice gives
    /// the same outputs bit for bit, and block-aligned column slices sum to them.
    #[test]
    fn quantized_linear_row_and_column_splits_match_the_whole() {
        let mut rng = crate::sampling::Rng::new(1);
        let (o, i, m) = (96usize, 192usize, 3usize);
        let data = (0..o * i).map(|_| rng.next_f32() - 0.5).collect();
        let w = Mat::F32 {
            rows: o,
            cols: i,
            data,
        }
        .into_format(WeightFormat::Q8_0)
        .unwrap();
        let x: Vec<f32> = (0..m * i).map(|_| rng.next_f32() - 0.5).collect();
        let full = Linear::new(w.clone()).unwrap().forward(&x, m).unwrap();
        let rows = Linear::new(w.select_rows(std::slice::from_ref(&(32..64))))
            .unwrap()
            .forward(&x, m)
            .unwrap();
        for r in 0..m {
            assert_eq!(rows[r * 32..(r + 1) * 32], full[r * o + 32..r * o + 64]);
        }
        let mut sum = vec![0f32; m * o];
        for cols in [0..64, 64..192] {
            let xs: Vec<f32> = (0..m)
                .flat_map(|r| x[r * i + cols.start..r * i + cols.end].to_vec())
                .collect();
            let part = Linear::new(w.select_cols(cols).unwrap())
                .unwrap()
                .forward(&xs, m)
                .unwrap();
            sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
        }
        for (a, b) in sum.iter().zip(&full) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
