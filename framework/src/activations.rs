//! Activation statistics: per input column of every block's weight
//! matrices, the sum of the squared activations that multiplied it, and the
//! number of rows summed.
//!
//! They are what calibration needs: llama.cpp's importance matrix is the
//! mean `Σx²/rows` per column (`parallm imatrix`, `quantize --imatrix`),
//! and Wanda (Sun et al. 2023) scores a weight `|W_ij| · ‖X_j‖₂` with
//! `‖X_j‖₂ = sqrt(Σx²)` (`prune --method wanda`).
//!
//! One [`ActivationStats`] is shared by every shard of an engine that
//! collects them. The layer loop records four inputs per block
//! ([`MatInput`]): q/k/v share the attention norm's output, gate/up the FFN
//! norm's. A matrix's input is whole on every tensor-parallel rank for the
//! column-parallel q/k/v and gate/up, so rank 0 records it alone; the
//! row-parallel `o` and `down` read a block of columns per rank, and each
//! rank adds its own columns. Rank 0 counts the rows. The sums are f64, so
//! the order in which ranks and steps add them changes nothing measurable.
//!
//! **What is true of it:** every row a stage computes is recorded once per
//! input, so a collecting engine must recompute every prompt token (prefix
//! caching off). A step that fails after recording part of its layers is
//! computed again, and those rows then count twice; calibration runs are
//! expected not to fail.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

/// Which input of a block's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatInput {
    /// The attention norm's output: the input of q, k and v (or fused qkv).
    Attn,
    /// The attention's output: the input of `attn_output`.
    AttnOut,
    /// The FFN norm's output: the input of gate and up (or fused gate|up).
    Ffn,
    /// The gated activation: the input of `ffn_down`.
    FfnOut,
}

impl MatInput {
    /// The input of the GGUF tensor `name` (`blk.N.…weight`) and its layer,
    /// or `None` for a tensor outside the blocks' matrices.
    pub fn of_tensor(name: &str) -> Option<(usize, MatInput)> {
        let rest = name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let input = match rest.strip_suffix(".weight")? {
            "attn_q" | "attn_k" | "attn_v" | "attn_qkv" => MatInput::Attn,
            "attn_output" => MatInput::AttnOut,
            "ffn_gate" | "ffn_up" => MatInput::Ffn,
            "ffn_down" => MatInput::FfnOut,
            _ => return None,
        };
        Some((layer, input))
    }
}

/// The sums of one input of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSums {
    /// `Σ x²` per column, over every row recorded.
    pub sum_sq: Vec<f64>,
    /// Rows recorded.
    pub rows: u64,
}

impl InputSums {
    /// The importance matrix's values: the mean of x² per column (zeros
    /// before any row).
    pub fn mean_sq(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum_sq.iter().map(|&s| (s / n) as f32).collect()
    }

    /// Wanda's input norms: `‖X_j‖₂` per column.
    pub fn norms(&self) -> Vec<f32> {
        self.sum_sq.iter().map(|&s| s.sqrt() as f32).collect()
    }
}

/// The statistics of an engine's steps, filled by its shards.
#[derive(Debug, Default)]
pub struct ActivationStats {
    sums: Mutex<BTreeMap<(usize, MatInput), InputSums>>,
}

/// Where one shard's part of an input goes.
#[derive(Debug, Clone)]
pub struct Record {
    /// The layer, in the whole model.
    pub layer: usize,
    /// Which input.
    pub input: MatInput,
    /// The input's whole width.
    pub width: usize,
    /// The columns `data`'s rows hold.
    pub cols: Range<usize>,
    /// Whether this shard counts the rows (one rank per stage).
    pub count_rows: bool,
}

impl ActivationStats {
    /// Empty statistics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the squares of `data` (rows of `rec.cols.len()` values) into
    /// `rec`'s columns.
    pub fn record(&self, rec: &Record, data: &[f32]) {
        let cols = rec.cols.len();
        if cols == 0 || rec.cols.end > rec.width {
            return;
        }
        let Ok(mut sums) = self.sums.lock() else {
            return;
        };
        let entry = sums
            .entry((rec.layer, rec.input))
            .or_insert_with(|| InputSums {
                sum_sq: vec![0.0; rec.width],
                rows: 0,
            });
        let dst = &mut entry.sum_sq[rec.cols.clone()];
        let mut rows = 0u64;
        for row in data.chunks_exact(cols) {
            for (s, &x) in dst.iter_mut().zip(row) {
                *s += x as f64 * x as f64;
            }
            rows += 1;
        }
        if rec.count_rows {
            entry.rows += rows;
        }
    }

    /// Every input's sums so far, by layer and input.
    pub fn snapshot(&self) -> BTreeMap<(usize, MatInput), InputSums> {
        self.sums.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_map_to_their_inputs() {
        assert_eq!(
            MatInput::of_tensor("blk.3.attn_k.weight"),
            Some((3, MatInput::Attn))
        );
        assert_eq!(
            MatInput::of_tensor("blk.12.ffn_down.weight"),
            Some((12, MatInput::FfnOut))
        );
        assert_eq!(
            MatInput::of_tensor("blk.0.attn_output.weight"),
            Some((0, MatInput::AttnOut))
        );
        assert_eq!(MatInput::of_tensor("blk.0.attn_norm.weight"), None);
        assert_eq!(MatInput::of_tensor("output.weight"), None);
        assert_eq!(MatInput::of_tensor("blk.x.ffn_up.weight"), None);
    }

    #[test]
    fn ranks_fill_their_columns_and_rank_zero_counts() {
        let stats = ActivationStats::new();
        let rec = |cols: Range<usize>, count_rows| Record {
            layer: 1,
            input: MatInput::FfnOut,
            width: 4,
            cols,
            count_rows,
        };
        // Two rows on two ranks, each holding two of the four columns.
        stats.record(&rec(0..2, true), &[1.0, 2.0, 3.0, 4.0]);
        stats.record(&rec(2..4, false), &[-1.0, 0.5, 2.0, 0.0]);
        let s = &stats.snapshot()[&(1, MatInput::FfnOut)];
        assert_eq!(s.rows, 2);
        assert_eq!(s.sum_sq, vec![10.0, 20.0, 5.0, 0.25]);
        assert_eq!(s.mean_sq(), vec![5.0, 10.0, 2.5, 0.125]);
        assert_eq!(s.norms()[0], 10f32.sqrt());
    }
}
