//! Activation quantization: f32 rows to the 8-bit blocks the dot products eat.
//!
//! [`QuantizedActs`] owns `m` rows of `k` activations quantized for one
//! [`ActFormat`], stored as separate arrays (not GGML's interleaved structs) so
//! that the SIMD kernels can load the scales of 8 consecutive blocks at once:
//!
//! * `qs`: m rows of i8; every value is in −127..=127 (never −128, so a
//!   kernel may negate it). Q8_K rows are the k values in order. Q8_1 rows
//!   are padded to a multiple of 4 blocks (zeros) and each group of 4 blocks
//!   (A, B, C, D; 128 bytes) is stored as `A[0..16] B[0..16] C[0..16]
//!   D[0..16] A[16..32] B[16..32] C[16..32] D[16..32]`: the order in which
//!   the low and the high nibbles of 2 or 4 consecutive Q4 blocks land in
//!   one vector (see [`q8_1_pos`]).
//! * `d`: m×(k/B) f32 block scales; activation ≈ `d · q`.
//! * Q8_1 only: `s` = `d · Σq` (f32) and `sum` = `Σq` (i32) per block.
//! * Q8_K only: `bsums`: m×(k/16) i16 sums of each group of 16 values.
//!
//! Quantization is deterministic: `d = max|x| / 127`, `q = round(x · (1/d))`
//! with ties to even, all-zero blocks get `d = 0`, `q = 0`. It has a scalar
//! and an AVX2 implementation (used whenever a SIMD kernel path is), which
//! agree bit for bit. The buffers are reused by [`QuantizedActs::quantize`],
//! so a caller that keeps one `QuantizedActs` per stage (and quantizes a
//! shared input once for all the matrices that read it) allocates only when
//! the shape grows.

use super::formats::{ActFormat, QuantFormat};
use super::Isa;

/// Quantized activation rows for the dot products of one weight format.
///
/// Build with [`super::quantize_activations`] or, reusing the buffers,
/// [`QuantizedActs::quantize`].
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    pub(super) format: ActFormat,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) sum: Vec<i32>,
    pub(super) bsums: Vec<i16>,
}

impl Default for QuantizedActs {
    fn default() -> Self {
        Self::new()
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2²²: adding and
/// subtracting 1.5·2²³ leaves no fraction bits (default rounding mode).
/// Vectorises on any x86-64 (no SSE4.1 `round` needed).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Position of value `j` (0..32) of Q8_1 block `b` within its row.
#[inline(always)]
pub(super) const fn q8_1_pos(b: usize, j: usize) -> usize {
    128 * (b / 4) + 64 * (j / 16) + 16 * (b % 4) + j % 16
}

/// Length of a Q8_1 row of `nb` blocks (padded to whole groups of 4).
#[inline(always)]
pub(super) const fn q8_1_row_len(nb: usize) -> usize {
    nb.div_ceil(4) * 128
}

/// Quantization of one block (32 or 256 values): writes `q`, returns `d`.
///
/// Every implementation must give the scalar one's results bit for bit.
pub(super) trait BlockQuantizer {
    /// Quantizes `x` (a multiple of 32 values) into `q` (same length).
    ///
    /// # Safety
    /// The CPU features of the implementation.
    unsafe fn block(x: &[f32], q: &mut [i8]) -> f32;
}

/// The portable reference quantizer.
pub(super) struct ScalarQuantizer;

impl BlockQuantizer for ScalarQuantizer {
    #[inline(always)]
    unsafe fn block(x: &[f32], q: &mut [i8]) -> f32 {
        let mut amax = 0f32;
        for &v in x {
            let a = v.abs();
            amax = if a > amax { a } else { amax };
        }
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            // NaN (only from non-finite input) becomes 0.
            *q = round_even(v * id).clamp(-127.0, 127.0) as i8;
        }
        d
    }
}

/// Fills the buffers of `acts` (already sized by `quantize_with`) from `x`.
///
/// # Safety
/// As [`BlockQuantizer::block`] for `Q` (inlined into an entry point that
/// enables its features).
#[inline(always)]
pub(super) unsafe fn fill<Q: BlockQuantizer>(acts: &mut QuantizedActs, x: &[f32]) {
    let k = acts.k;
    let nb = acts.blocks();
    match acts.format {
        ActFormat::Q8_1 => {
            let stride = q8_1_row_len(nb);
            let mut q = [0i8; 32];
            for (i, xr) in x.chunks_exact(k).enumerate() {
                let row = &mut acts.qs[i * stride..(i + 1) * stride];
                for (b, xb) in xr.chunks_exact(32).enumerate() {
                    let d = Q::block(xb, &mut q);
                    let (lo, hi) = (q8_1_pos(b, 0), q8_1_pos(b, 16));
                    row[lo..lo + 16].copy_from_slice(&q[..16]);
                    row[hi..hi + 16].copy_from_slice(&q[16..]);
                    let sum: i32 = q.iter().map(|&v| v as i32).sum();
                    let idx = i * nb + b;
                    acts.d[idx] = d;
                    acts.sum[idx] = sum;
                    acts.s[idx] = d * sum as f32;
                }
            }
        }
        ActFormat::Q8K => {
            let blocks = x.chunks_exact(256).zip(acts.qs.chunks_exact_mut(256));
            for (b, (xb, qb)) in blocks.enumerate() {
                acts.d[b] = Q::block(xb, qb);
                for (g, qg) in qb.chunks_exact(16).enumerate() {
                    // |Σ| <= 16·127, fits in i16.
                    acts.bsums[b * 16 + g] = qg.iter().map(|&q| q as i16).sum();
                }
            }
        }
    }
}

impl QuantizedActs {
    /// An empty buffer (0 rows); fill it with [`QuantizedActs::quantize`].
    pub fn new() -> Self {
        QuantizedActs {
            format: ActFormat::Q8_1,
            m: 0,
            k: 0,
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            sum: Vec::new(),
            bsums: Vec::new(),
        }
    }

    /// Quantizes the rows of `x` (m×k row-major, `m = x.len() / k`) for the
    /// dot products of `format`, replacing the contents and reusing the
    /// buffers' capacity. Non-finite inputs give unspecified values (never
    /// undefined behaviour).
    ///
    /// # Panics
    /// If `k` is 0, not a multiple of `format`'s block size, or does not
    /// divide `x.len()`.
    pub fn quantize(&mut self, format: QuantFormat, x: &[f32], k: usize) {
        self.quantize_with(super::detect_isa(), format, x, k)
    }

    /// [`QuantizedActs::quantize`] on the given path (all give the same bits).
    pub(super) fn quantize_with(&mut self, isa: Isa, format: QuantFormat, x: &[f32], k: usize) {
        let act = format.act_format();
        let bs = act.block_size();
        assert!(
            k > 0 && k.is_multiple_of(bs),
            "{format}: activation row length {k} must be a positive multiple of {bs}"
        );
        assert!(
            x.len().is_multiple_of(k),
            "activation length {} is not a multiple of the row length {k}",
            x.len()
        );
        let m = x.len() / k;
        let nb = k / bs;
        self.format = act;
        self.m = m;
        self.k = k;
        self.d.resize(m * nb, 0.0);
        match act {
            ActFormat::Q8_1 => {
                // Zero the padding blocks of every row.
                self.qs.clear();
                self.qs.resize(m * q8_1_row_len(nb), 0);
                self.s.resize(m * nb, 0.0);
                self.sum.resize(m * nb, 0);
                self.bsums.clear();
            }
            ActFormat::Q8K => {
                self.qs.resize(m * k, 0);
                self.s.clear();
                self.sum.clear();
                self.bsums.resize(m * k / 16, 0);
            }
        }
        match isa {
            // SAFETY: the scalar quantizer needs no CPU features.
            Isa::Scalar => unsafe { fill::<ScalarQuantizer>(self, x) },
            // SAFETY: every SIMD Isa value implies AVX2 (checked by
            // `Isa::supported` before the value is used).
            #[cfg(target_arch = "x86_64")]
            _ => unsafe { super::avx2::quantize_avx2(self, x) },
        }
    }

    /// Number of activation rows `m`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Row length `k`.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The activation block format held.
    pub fn act_format(&self) -> ActFormat {
        self.format
    }

    /// Blocks per row.
    #[inline(always)]
    pub(super) fn blocks(&self) -> usize {
        self.k / self.format.block_size()
    }

    /// Row `i`'s part of every buffer.
    #[inline(always)]
    pub(super) fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.blocks();
        let k = self.k;
        let stride = match self.format {
            ActFormat::Q8_1 => q8_1_row_len(nb),
            ActFormat::Q8K => k,
        };
        ActRow {
            qs: &self.qs[i * stride..(i + 1) * stride],
            d: &self.d[i * nb..(i + 1) * nb],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[i * nb..(i + 1) * nb]
            },
            sum: if self.sum.is_empty() {
                &[]
            } else {
                &self.sum[i * nb..(i + 1) * nb]
            },
            bsums: if self.bsums.is_empty() {
                &[]
            } else {
                &self.bsums[i * k / 16..(i + 1) * k / 16]
            },
        }
    }
}

/// One quantized activation row (see the module docs for the fields).
#[derive(Clone, Copy)]
pub(super) struct ActRow<'a> {
    /// The values (Q8_1: in the grouped layout, padded).
    pub qs: &'a [i8],
    /// Block scales.
    pub d: &'a [f32],
    /// Q8_1: `d · Σq` per block (empty for Q8_K).
    pub s: &'a [f32],
    /// Q8_1: `Σq` per block (empty for Q8_K).
    pub sum: &'a [i32],
    /// Q8_K: sums of each group of 16 values (empty for Q8_1).
    pub bsums: &'a [i16],
}

impl ActRow<'_> {
    /// The first and the second 16 values of Q8_1 block `b`.
    #[inline(always)]
    pub fn halves(&self, b: usize) -> (&[i8], &[i8]) {
        let lo = q8_1_pos(b, 0);
        let hi = q8_1_pos(b, 16);
        (&self.qs[lo..lo + 16], &self.qs[hi..hi + 16])
    }

    /// The 32 values of Q8_1 block `b`, in natural order.
    #[cfg(test)]
    pub fn block32(&self, b: usize) -> [i8; 32] {
        std::array::from_fn(|j| self.qs[q8_1_pos(b, j)])
    }
}
