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
    /// Q8_1 only, when the AMX kernels will read these rows: the values as
    /// A tiles, `[row / 16][block][row % 16][32]` in natural block order,
    /// rows padded to a multiple of 16 with zeros; empty otherwise.
    pub(super) tiles: Vec<i8>,
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

    /// Quantizes the 32 values `x` into Q8_1 block `b` of `row` (the
    /// grouped layout) and, if given, into `tile` (32 bytes, natural
    /// order); returns `d` and `Σq`.
    ///
    /// # Safety
    /// As [`BlockQuantizer::block`].
    #[inline(always)]
    unsafe fn q8_1(x: &[f32], row: &mut [i8], b: usize, tile: Option<&mut [i8]>) -> (f32, i32) {
        let mut q = [0i8; 32];
        let d = Self::block(x, &mut q);
        let (lo, hi) = (q8_1_pos(b, 0), q8_1_pos(b, 16));
        row[lo..lo + 16].copy_from_slice(&q[..16]);
        row[hi..hi + 16].copy_from_slice(&q[16..]);
        if let Some(t) = tile {
            t[..32].copy_from_slice(&q);
        }
        (d, q.iter().map(|&v| v as i32).sum())
    }
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

/// Rows of a [`QuantizedActs`]'s buffers being filled: a whole number of
/// A tiles' rows (16) unless it ends at the last row.
pub(super) struct RowsMut<'a> {
    format: ActFormat,
    k: usize,
    qs: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sum: &'a mut [i32],
    bsums: &'a mut [i16],
    tiles: &'a mut [i8],
}

impl<'a> RowsMut<'a> {
    /// Splits off the first `rows` rows (a multiple of 16, so that the A
    /// tiles split too).
    fn split(self, rows: usize) -> (RowsMut<'a>, RowsMut<'a>) {
        let nb = self.k / self.format.block_size();
        let qs_row = match self.format {
            ActFormat::Q8_1 => q8_1_row_len(nb),
            ActFormat::Q8K => self.k,
        };
        let per = |v: usize, row: usize| if v == 0 { 0 } else { row * rows };
        let (qs0, qs1) = self.qs.split_at_mut(rows * qs_row);
        let (d0, d1) = self.d.split_at_mut(rows * nb);
        let (s0, s1) = self.s.split_at_mut(per(self.s.len(), nb));
        let (u0, u1) = self.sum.split_at_mut(per(self.sum.len(), nb));
        let (b0, b1) = self.bsums.split_at_mut(per(self.bsums.len(), self.k / 16));
        let (t0, t1) = self.tiles.split_at_mut(per(self.tiles.len(), self.k));
        let (format, k) = (self.format, self.k);
        (
            RowsMut {
                format,
                k,
                qs: qs0,
                d: d0,
                s: s0,
                sum: u0,
                bsums: b0,
                tiles: t0,
            },
            RowsMut {
                format,
                k,
                qs: qs1,
                d: d1,
                s: s1,
                sum: u1,
                bsums: b1,
                tiles: t1,
            },
        )
    }
}

/// Fills `rows` (sized by `quantize_with`) from `x`, its rows' activations.
///
/// # Safety
/// As [`BlockQuantizer::block`] for `Q` (inlined into an entry point that
/// enables its features).
#[inline(always)]
pub(super) unsafe fn fill<Q: BlockQuantizer>(rows: RowsMut<'_>, x: &[f32]) {
    let k = rows.k;
    let nb = k / rows.format.block_size();
    match rows.format {
        ActFormat::Q8_1 => {
            let stride = q8_1_row_len(nb);
            for (i, xr) in x.chunks_exact(k).enumerate() {
                let row = &mut rows.qs[i * stride..(i + 1) * stride];
                for (b, xb) in xr.chunks_exact(32).enumerate() {
                    let tile = if rows.tiles.is_empty() {
                        None
                    } else {
                        let at = ((i / 16) * nb + b) * 512 + (i % 16) * 32;
                        Some(&mut rows.tiles[at..at + 32])
                    };
                    let (d, sum) = Q::q8_1(xb, row, b, tile);
                    let idx = i * nb + b;
                    rows.d[idx] = d;
                    rows.sum[idx] = sum;
                    rows.s[idx] = d * sum as f32;
                }
            }
        }
        ActFormat::Q8K => {
            let blocks = x.chunks_exact(256).zip(rows.qs.chunks_exact_mut(256));
            for (b, (xb, qb)) in blocks.enumerate() {
                rows.d[b] = Q::block(xb, qb);
                for (g, qg) in qb.chunks_exact(16).enumerate() {
                    // |Σ| <= 16·127, fits in i16.
                    rows.bsums[b * 16 + g] = qg.iter().map(|&q| q as i16).sum();
                }
            }
        }
    }
}

/// Activation rows below which quantization runs on the calling thread.
const PAR_MIN_ROWS: usize = 32;

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
            tiles: Vec::new(),
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
        self.quantize_with(super::detect_isa(), format, x, k, None)
    }

    /// [`QuantizedActs::quantize`] with the rows split over `pool` when
    /// there are many (same results). A caller outside the pool blocks
    /// until it is done; one on its threads takes part.
    ///
    /// # Panics
    /// As [`QuantizedActs::quantize`].
    pub fn quantize_on(
        &mut self,
        format: QuantFormat,
        x: &[f32],
        k: usize,
        pool: &crate::cpu::pool::Pool,
    ) {
        self.quantize_with(super::detect_isa(), format, x, k, Some(pool))
    }

    /// [`QuantizedActs::quantize`] on the given path (all give the same
    /// bits), on `pool` if given.
    pub(super) fn quantize_with(
        &mut self,
        isa: Isa,
        format: QuantFormat,
        x: &[f32],
        k: usize,
        pool: Option<&crate::cpu::pool::Pool>,
    ) {
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
                // The fill writes every real block; only the padding
                // blocks of each row's last group of 4 must read as zeros.
                // (Zeroing the whole buffer cost a serial memset per call.)
                let len = q8_1_row_len(nb);
                self.qs.resize(m * len, 0);
                if !nb.is_multiple_of(4) {
                    for row in self.qs.chunks_exact_mut(len) {
                        for pb in nb..nb.next_multiple_of(4) {
                            row[q8_1_pos(pb, 0)..][..16].fill(0);
                            row[q8_1_pos(pb, 16)..][..16].fill(0);
                        }
                    }
                }
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
        // The AMX kernels read 16-row A tiles: written here, once for
        // every matrix and chunk that reads these activations.
        if super::amx_reads(isa, format, m) {
            // Every real row's blocks are written by the fill; only the
            // padding rows of the last tile need zeros (not the whole
            // buffer, which a prefill's 512 rows make hundreds of KiB).
            self.tiles.resize(m.div_ceil(16) * 16 * k, 0);
            let (tile0, nb) = ((m / 16) * 16 * k, k / 32);
            for pad in m % 16..if m.is_multiple_of(16) { 0 } else { 16 } {
                for b in 0..nb {
                    self.tiles[tile0 + b * 512 + pad * 32..][..32].fill(0);
                }
            }
        } else {
            self.tiles.clear();
        }
        let rows = RowsMut {
            format: act,
            k,
            qs: &mut self.qs,
            d: &mut self.d,
            s: &mut self.s,
            sum: &mut self.sum,
            bsums: &mut self.bsums,
            tiles: &mut self.tiles,
        };
        let fill_on = |rows: RowsMut<'_>, x: &[f32]| match isa {
            // SAFETY: the scalar quantizer needs no CPU features.
            Isa::Scalar => unsafe { fill::<ScalarQuantizer>(rows, x) },
            // SAFETY: every SIMD Isa value implies AVX2 (checked by
            // `Isa::supported` before the value is used).
            #[cfg(target_arch = "x86_64")]
            _ => unsafe { super::avx2::quantize_avx2(rows, x) },
        };
        let threads = pool.map_or(1, crate::cpu::pool::Pool::threads);
        match pool {
            Some(pool) if threads > 1 && m >= PAR_MIN_ROWS => {
                // Whole tiles of 16 rows per part.
                let per = m.div_ceil(threads).div_ceil(16) * 16;
                let mut parts = Vec::with_capacity(threads);
                let mut rest = rows;
                let mut i0 = 0;
                while i0 + per < m {
                    let (head, tail) = rest.split(per);
                    parts.push(Some((head, &x[i0 * k..(i0 + per) * k])));
                    rest = tail;
                    i0 += per;
                }
                // The last part keeps the padding of its last tile.
                parts.push(Some((rest, &x[i0 * k..])));
                pool.for_each_mut(&mut parts, |_, part| {
                    if let Some((rows, x)) = part.take() {
                        fill_on(rows, x)
                    }
                });
            }
            _ => fill_on(rows, x),
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
