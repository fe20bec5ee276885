//! Causal grouped-query attention (GQA) of query rows against a KV cache, for
//! decode and prefill alike.
//!
//! Owns: the cache views [`KvRows`] (flat or paged, over `f32`,
//! [`half::f16`] or [`half::bf16`] elements, see [`KvElem`]) and [`AttnRow`]; [`attention`], the
//! kernel; [`attention_scalar`], the reference it is tested against.
//!
//! How [`attention`] works: the work unit is one query row × one KV head with
//! the `group = n_heads / n_kv_heads` query heads that share it. A unit makes
//! one pass over that KV head's keys (tiles of 4 positions; for each 8-wide
//! slice, up to 4 heads' query slices sit in registers and each key slice is
//! loaded once and FMA'd into all of them; wider groups go in sub-groups of 4,
//! the tile still in L1),
//! computes `e^(s − max)` per head with a vector `exp` (see [`super::ops`]),
//! and makes one pass over the values in which each value vector is loaded
//! once and FMA-accumulated into up to 8 heads' outputs (register blocks of
//! 8–32 dimensions; groups wider than 8 go in sub-groups of 8), then scales by
//! `1/Σe`. f16 elements are widened with F16C as they are loaded. The key
//! pass asks for the keys two tiles ahead and for its tile's values (into
//! L2), since at decode the cache comes from memory (off with
//! `PARALLM_PREFETCH=0`, see [`super::prefetch`]). Units are
//! split over the threads of the current compute pool
//! ([`crate::cpu::pool::with_current`]) when the call is large enough to pay
//! for the hand-out.
//!
//! What is true:
//!
//! * Every score, weight and output element is a function of the position
//!   index alone: positions are looked up through a per-position offset table
//!   built from the block table and tiled by absolute position, so flat and
//!   paged caches (any block size or block order) give bit-identical results,
//!   as does any thread split. Each head's result does not depend on which
//!   other heads are in the call (a tensor-parallel shard computes the same
//!   bits for its heads).
//! * An f16 or bf16 cache gives bit-identical results to an f32 cache holding
//!   the same (widened) values.
//! * Against [`attention_scalar`]: the dot products and sums are reassociated
//!   (8 lanes instead of one chain), `exp` is the vector one (≤ 2⁻²² relative)
//!   and the normalization is applied after the value sum. The outputs are a
//!   convex combination of the value rows, so the error is measured against
//!   the values' scale: `|Δ| ≤ 1e-5 · max|v|` per element is tested (observed
//!   ≲ 1e-6 on unit-scale data with up to 300 positions). It grows with the
//!   score magnitude (an absolute score error δ is a relative weight error δ).
//! * The SIMD path needs AVX2, FMA, F16C and `head_dim % 8 == 0`; otherwise the
//!   reference itself runs. No AVX-512 path: on the 2-core EPYC test host it
//!   did not pay for the extra code (the loops are load-bound, not FMA-bound).

// Index loops over const head/vector counts read best as written.
#![allow(clippy::needless_range_loop)]

use half::f16;

/// Below this many multiply-adds (`Σ positions · n_heads · head_dim`) a call
/// runs on the calling thread. The node pool's helpers spin inside a step, so
/// a hand-out costs about a microsecond, and a batch-1 decode step's
/// attention (its cache read from memory) pays for it from a few dozen
/// positions on: at 16–144 positions on the Xeon, 545 → 434 µs per step.
const PAR_MIN_WORK: usize = 1 << 14;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type of a KV cache: `f32`, [`half::f16`] or [`half::bf16`].
pub trait KvElem: Copy + Send + Sync + std::fmt::Debug + sealed::Sealed + 'static {
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;

    /// Eight consecutive elements from `ptr`, widened to f32.
    ///
    /// # Safety
    /// `ptr` must be valid for reading 8 elements, and the CPU must support
    /// AVX and F16C (call only from code compiled with those features).
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load8(ptr: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(ptr) }
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable halves (16 bytes) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(ptr.cast::<__m128i>())) }
    }
}

impl KvElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(ptr: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) and AVX2
        // (the attention's SIMD path needs it); bf16 is the top half of an f32.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(ptr.cast::<__m128i>()),
            )))
        }
    }
}

/// A sequence's cached keys (or values), `kv_width` elements per position:
/// either one contiguous run, or blocks of a paged pool named by a block table.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a, T = f32> {
    /// Positions `0..` in order, `len × kv_width`.
    Flat(&'a [T]),
    /// Position `p` is in block `table[p / block_size]` of `data`.
    Paged {
        /// The pool's storage for one layer.
        data: &'a [T],
        /// The sequence's block table.
        table: &'a [u32],
        /// Positions per block.
        block_size: usize,
    },
}

impl<'a, T> KvRows<'a, T> {
    /// Calls `f(first, rows)` for contiguous runs that together cover positions
    /// `0..n` in order; `rows` holds `width` elements per position.
    #[inline]
    pub fn for_runs(&self, n: usize, width: usize, mut f: impl FnMut(usize, &'a [T])) {
        match *self {
            KvRows::Flat(d) => f(0, &d[..n * width]),
            KvRows::Paged {
                data,
                table,
                block_size,
            } => {
                let mut first = 0;
                for &b in table {
                    if first >= n {
                        break;
                    }
                    let len = block_size.min(n - first);
                    let start = b as usize * block_size * width;
                    f(first, &data[start..start + len * width]);
                    first += len;
                }
            }
        }
    }

    /// Whether `other` views the same storage through the same block table
    /// (the same sequence's cache).
    fn same_store(&self, other: &Self) -> bool {
        match (self, other) {
            (KvRows::Flat(a), KvRows::Flat(b)) => std::ptr::eq(a.as_ptr(), b.as_ptr()),
            (
                KvRows::Paged { data, table, .. },
                KvRows::Paged {
                    data: d2,
                    table: t2,
                    ..
                },
            ) => {
                std::ptr::eq(data.as_ptr(), d2.as_ptr())
                    && std::ptr::eq(table.as_ptr(), t2.as_ptr())
            }
            _ => false,
        }
    }

    /// The storage and, in `offs`, the element offset in it of each position
    /// `0..n`. Every `offs[p] + width ≤ storage.len()`.
    ///
    /// # Panics
    /// If a run is out of bounds or the runs do not cover `n` positions.
    fn offsets(&self, n: usize, width: usize, offs: &mut Vec<usize>) -> &'a [T] {
        offs.clear();
        let data = match *self {
            KvRows::Flat(d) => d,
            KvRows::Paged { data, .. } => data,
        };
        let base = data.as_ptr() as usize;
        let size = std::mem::size_of::<T>().max(1);
        // for_runs hands out in-bounds subslices of `data`; offsets are taken
        // from their addresses so that the bounds checks are for_runs' own.
        self.for_runs(n, width, |_, rows| {
            let start = (rows.as_ptr() as usize - base) / size;
            offs.extend((0..rows.len() / width.max(1)).map(|i| start + i * width));
        });
        assert_eq!(offs.len(), n, "the KV rows must cover positions 0..=pos");
        data
    }
}

/// Where one query row attends: the sequence's cached keys/values and the
/// row's absolute position (it sees keys `0..=pos`).
#[derive(Debug, Clone, Copy)]
pub struct AttnRow<'a, T = f32> {
    /// Keys.
    pub k: KvRows<'a, T>,
    /// Values, same layout.
    pub v: KvRows<'a, T>,
    /// Absolute position of the query token.
    pub pos: usize,
}

/// How a layer's attention scores its keys, beyond the causal mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// The factor on `q·k` (`1/√head_dim` unless the model says otherwise).
    pub scale: f32,
    /// Soft-capping of the scaled scores, `cap · tanh(s / cap)` (Gemma 2);
    /// 0 for none.
    pub softcap: f32,
    /// A row at position `p` sees only keys after `p − window` (sliding-window
    /// attention); 0 for all keys `0..=p`.
    pub window: usize,
}

impl AttnParams {
    /// Plain causal attention: `1/√head_dim`, no cap, no window.
    pub fn standard(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: 0.0,
            window: 0,
        }
    }

    /// The first key position a row at `pos` sees.
    fn first(&self, pos: usize) -> usize {
        if self.window == 0 {
            0
        } else {
            (pos + 1).saturating_sub(self.window)
        }
    }

    /// Caps a scaled score.
    #[inline]
    fn cap(&self, s: f32) -> f32 {
        if self.softcap > 0.0 {
            self.softcap * (s / self.softcap).tanh()
        } else {
            s
        }
    }
}

/// Causal grouped-query attention for a batch of query rows.
///
/// Row `r`'s queries are `q[r·q_stride..][..n_heads·head_dim]` (a stride wider
/// than the queries reads them in place from fused q|k|v rows); query head `h`
/// reads KV head `h / group`, `group = n_heads / n_kv_heads`. Writes
/// `rows × (n_heads·head_dim)` into `out`: `softmax(q·Kᵀ/√head_dim)·V` per head,
/// in f32. Accuracy and guarantees are in the module docs.
///
/// # Panics
/// If `n_kv_heads` does not divide `n_heads`, `out` is not `rows.len()` query
/// rows, `q` is too short, or a row's cache does not hold `pos + 1` positions.
pub fn attention<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    attention_params(
        q,
        q_stride,
        rows,
        (n_heads, n_kv_heads, head_dim),
        &AttnParams::standard(head_dim),
        out,
    )
}

/// [`attention`] with a layer's [`AttnParams`] (scale, soft-cap, window);
/// `heads` is `(n_heads, n_kv_heads, head_dim)`.
pub fn attention_params<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    heads: (usize, usize, usize),
    params: &AttnParams,
    out: &mut [f32],
) {
    attention_with(
        detect_isa(heads.2),
        true,
        q,
        q_stride,
        rows,
        heads,
        params,
        out,
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn detect_isa(head_dim: usize) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if head_dim.is_multiple_of(8)
        && head_dim > 0
        && crate::cpu::features::enabled(crate::cpu::features::Feature::Avx2)
    {
        return Isa::Avx2;
    }
    let _ = head_dim;
    Isa::Scalar
}

#[allow(clippy::too_many_arguments)]
fn attention_with<T: KvElem>(
    isa: Isa,
    allow_parallel: bool,
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    params: &AttnParams,
    out: &mut [f32],
) {
    let q_width = n_heads * head_dim;
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "n_kv_heads must divide n_heads"
    );
    assert_eq!(
        out.len(),
        rows.len() * q_width,
        "out must be rows × n_heads·head_dim"
    );
    if rows.is_empty() || q_width == 0 {
        return;
    }
    assert!(
        q_stride >= q_width && q.len() >= (rows.len() - 1) * q_stride + q_width,
        "q must hold rows.len() query rows of stride q_stride"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        let group = n_heads / n_kv_heads;
        let unit = group * head_dim;
        let prefetch = crate::cpu::prefetch::distance() != 0;
        let work = |(i, dst): (usize, &mut [f32])| {
            let (r, kvh) = (i / n_kv_heads, i % n_kv_heads);
            let qg = &q[r * q_stride + kvh * unit..][..unit];
            // A row whose sequence another row of the call also reads (a
            // prefill chunk) finds the cache warm; prefetching it would only
            // cost instructions.
            let cold = prefetch
                && (r == 0 || !rows[r].k.same_store(&rows[r - 1].k))
                && rows
                    .get(r + 1)
                    .is_none_or(|next| !next.k.same_store(&rows[r].k));
            let shape = (n_kv_heads, group, head_dim);
            group_attention(rows[r], qg, kvh, shape, params, cold, dst);
        };
        let total: usize = rows.iter().map(|r| r.pos + 1).sum();
        crate::cpu::pool::with_current(|pool| {
            if allow_parallel
                && rows.len() * n_kv_heads > 1
                && total * q_width >= PAR_MIN_WORK
                && pool.threads() > 1
            {
                pool.chunks_mut(out, unit, |i, dst| work((i, dst)));
            } else {
                out.chunks_mut(unit).enumerate().for_each(work);
            }
        });
        return;
    }
    let _ = (isa, allow_parallel);
    attention_scalar_params(
        q,
        q_stride,
        rows,
        (n_heads, n_kv_heads, head_dim),
        params,
        out,
    )
}

/// One row × one KV head and its `group` query heads (`q`, `out`: `group ×
/// head_dim`) on the AVX2 path.
#[cfg(target_arch = "x86_64")]
fn group_attention<T: KvElem>(
    row: AttnRow<'_, T>,
    q: &[f32],
    kvh: usize,
    (n_kv_heads, group, head_dim): (usize, usize, usize),
    params: &AttnParams,
    prefetch: bool,
    out: &mut [f32],
) {
    let n = row.pos + 1;
    let width = n_kv_heads * head_dim;
    let mut koffs = Vec::with_capacity(n);
    let mut voffs = Vec::with_capacity(n);
    let kdata = row.k.offsets(n, width, &mut koffs);
    let vdata = row.v.offsets(n, width, &mut voffs);
    // A window drops the oldest keys.
    let first = params.first(row.pos);
    let job = avx2::Job {
        q,
        kdata,
        koffs: &koffs[first..],
        vdata,
        voffs: &voffs[first..],
        base: kvh * head_dim,
        width,
        group,
        head_dim,
        scale: params.scale,
        softcap: params.softcap,
        prefetch,
    };
    let mut scores = vec![0f32; group * (n - first)];
    // SAFETY: detect_isa returned Avx2, so AVX2, FMA and F16C are present.
    unsafe { avx2::run(&job, &mut scores, out) }
}

/// The reference attention: per query head, scores by 8-accumulator
/// products, softmax in f32 with the maximum subtracted, then the weighted sum of
/// the values in position order. Positions are visited in the same order whatever
/// the KV layout, so flat and paged caches give bit-identical results.
pub fn attention_scalar<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    attention_scalar_params(
        q,
        q_stride,
        rows,
        (n_heads, n_kv_heads, head_dim),
        &AttnParams::standard(head_dim),
        out,
    )
}

/// [`attention_scalar`] with a layer's [`AttnParams`]: keys before the
/// window are skipped, and each scaled score is capped before the softmax.
pub fn attention_scalar_params<T: KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    params: &AttnParams,
    out: &mut [f32],
) {
    let q_width = n_heads * head_dim;
    let kv_width = n_kv_heads * head_dim;
    let group = n_heads / n_kv_heads;
    let scale = params.scale;
    let work = |(r, dst): (usize, &mut [f32])| {
        let row = rows[r];
        let n = row.pos + 1;
        let start = params.first(row.pos);
        let mut scores = vec![0f32; n];
        for h in 0..n_heads {
            let kvh = h / group;
            let qh = &q[r * q_stride + h * head_dim..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            row.k.for_runs(n, kv_width, |first, keys| {
                for (i, (s, k)) in scores[first..]
                    .iter_mut()
                    .zip(keys.chunks_exact(kv_width))
                    .enumerate()
                {
                    if first + i < start {
                        continue;
                    }
                    *s = params.cap(dot(qh, &k[kvh * head_dim..][..head_dim]) * scale);
                    max = max.max(*s);
                }
            });
            let mut sum = 0f32;
            for s in scores[start..].iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut dst[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            row.v.for_runs(n, kv_width, |first, values| {
                for (i, (&s, v)) in scores[first..]
                    .iter()
                    .zip(values.chunks_exact(kv_width))
                    .enumerate()
                {
                    if first + i < start {
                        continue;
                    }
                    let w = s * inv;
                    for (o, &v) in oh.iter_mut().zip(&v[kvh * head_dim..][..head_dim]) {
                        *o += w * v.to_f32();
                    }
                }
            });
        }
    };
    let total: usize = rows.iter().map(|r| r.pos + 1).sum();
    // Small batches are cheaper than a fork-join.
    if rows.len() > 1 && total * n_heads * head_dim > 1 << 16 {
        crate::cpu::pool::with_current(|pool| {
            pool.chunks_mut(out, q_width, |i, dst| work((i, dst)))
        });
    } else {
        out.chunks_mut(q_width).enumerate().for_each(work);
    }
}

/// Inner product written as eight independent accumulators (the reference's).
#[inline]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y.to_f32();
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2+FMA+F16C unit kernel. Helpers are `#[inline(always)]` without
    //! target features of their own; they become AVX2 code inside [`run`].

    use std::arch::x86_64::*;

    use super::KvElem;
    use crate::cpu::ops::avx2::{exp, hsum};
    use crate::cpu::prefetch;

    /// One unit: a row's `group` query heads against KV head `base / head_dim`.
    pub(super) struct Job<'a, T> {
        /// `group × head_dim` queries.
        pub q: &'a [f32],
        pub kdata: &'a [T],
        /// Offset of position `p`'s key row in `kdata`.
        pub koffs: &'a [usize],
        pub vdata: &'a [T],
        pub voffs: &'a [usize],
        /// Offset of this KV head within a row.
        pub base: usize,
        /// Elements per cache row.
        pub width: usize,
        pub group: usize,
        pub head_dim: usize,
        /// The factor on `q·k`.
        pub scale: f32,
        /// Soft-cap of the scaled scores (0: none).
        pub softcap: f32,
        /// Whether to prefetch the keys and values (the cache is likely
        /// cold: no other row of the call reads the same sequence).
        pub prefetch: bool,
    }

    /// Positions per key tile.
    const TILE: usize = 4;

    /// Attention of one unit into `out` (`group × head_dim`); `scores` is
    /// `group × n` scratch.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Shapes are checked here.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run<T: KvElem>(job: &Job<'_, T>, scores: &mut [f32], out: &mut [f32]) {
        let (hd, group) = (job.head_dim, job.group);
        let n = job.koffs.len();
        // The bounds every unchecked access below relies on.
        assert!(n > 0 && job.voffs.len() == n && hd % 8 == 0 && hd > 0);
        assert!(job.base + hd <= job.width);
        assert!(job.koffs.iter().all(|&o| o + job.width <= job.kdata.len()));
        assert!(job.voffs.iter().all(|&o| o + job.width <= job.vdata.len()));
        assert!(job.q.len() == group * hd && out.len() == group * hd && scores.len() == group * n);

        // SAFETY: the asserts above: every key row p is kdata[koffs[p]..][..width]
        // and base + hd ≤ width; q and scores have the asserted lengths.
        unsafe { score_pass(job, scores) };
        if job.softcap > 0.0 {
            let cap = job.softcap;
            scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }

        let mut inv = vec![0f32; group];
        for (g, s) in scores.chunks_exact_mut(n).enumerate() {
            // SAFETY: register arithmetic and in-bounds slice accesses only.
            inv[g] = 1.0 / unsafe { softmax_numerators(s) };
        }

        let mut g0 = 0;
        while g0 < group {
            let gs = (group - g0).min(8);
            let w = &scores[g0 * n..(g0 + gs) * n];
            let o = &mut out[g0 * hd..(g0 + gs) * hd];
            let iv = &inv[g0..g0 + gs];
            // Register block: 32, 16 or 8 dimensions × gs heads ≤ 8 vectors.
            let wide = |lanes: usize| hd.is_multiple_of(8 * lanes);
            macro_rules! go {
                ($g:literal, $w:literal) => {
                    // SAFETY: as for score_pass, for the value rows; w is gs × n,
                    // o is gs × hd, and 8·$w divides hd when $w > 1.
                    unsafe {
                        if $w > 1 && wide($w) {
                            value_pass::<T, $g, $w>(job, w, iv, o)
                        } else {
                            value_pass::<T, $g, 1>(job, w, iv, o)
                        }
                    }
                };
            }
            match gs {
                1 => go!(1, 4),
                2 => go!(2, 4),
                3 => go!(3, 2),
                4 => go!(4, 2),
                5 => go!(5, 1),
                6 => go!(6, 1),
                7 => go!(7, 1),
                _ => go!(8, 1),
            }
            g0 += gs;
        }
    }

    /// `scores[g·n + p] = (q_g · k_p) · scale` for every head `g` of the group.
    /// Tiles of 4 positions by absolute index; a partial last tile repeats its
    /// last key (same arithmetic per lane) and stores only the real lanes.
    #[inline(always)]
    unsafe fn score_pass<T: KvElem>(job: &Job<'_, T>, scores: &mut [f32]) {
        let (hd, n) = (job.head_dim, job.koffs.len());
        let scale = _mm_set1_ps(job.scale);
        let is_f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        // f16 keys are widened once per tile into this buffer.
        let mut wide = if is_f32 {
            Vec::new()
        } else {
            vec![0f32; TILE * hd]
        };
        let row_bytes = hd * std::mem::size_of::<T>();
        let mut t = 0;
        while t < n {
            let valid = (n - t).min(TILE);
            if job.prefetch {
                // Keys two tiles ahead into L1, this tile's values into L2
                // for the value pass (at decode the cache comes from memory:
                // the step's weights have evicted it since this layer's last
                // turn).
                let row = |data: *const T, off: usize| data.wrapping_add(off + job.base).cast();
                for i in 0..TILE {
                    if let Some(&off) = job.koffs.get(t + 2 * TILE + i) {
                        prefetch::lines::<{ prefetch::L1 }>(
                            row(job.kdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                    if let Some(&off) = job.voffs.get(t + i) {
                        prefetch::lines::<{ prefetch::L2 }>(
                            row(job.vdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                }
            }
            let mut kp = [std::ptr::null::<f32>(); TILE];
            for (i, p) in kp.iter_mut().enumerate() {
                let off = job.koffs[(t + i).min(n - 1)] + job.base;
                // SAFETY: off + hd ≤ kdata.len() (checked in run).
                let src = unsafe { job.kdata.as_ptr().add(off) };
                if is_f32 {
                    *p = src.cast::<f32>();
                } else {
                    let dst = wide[i * hd..].as_mut_ptr();
                    for d in (0..hd).step_by(8) {
                        // SAFETY: src has hd readable elements, dst hd floats.
                        unsafe { _mm256_storeu_ps(dst.add(d), T::load8(src.add(d))) };
                    }
                    *p = wide[i * hd..].as_ptr();
                }
            }
            let mut g0 = 0;
            while g0 < job.group {
                let gs = (job.group - g0).min(4);
                let qg = job.q[g0 * hd..].as_ptr();
                let mut s = [[0f32; TILE]; 4];
                // Sub-groups of ≤ 4 heads, keys in register blocks of 4 or 2
                // (G·KT accumulators + G queries + 1 key ≤ 16 vectors).
                // SAFETY: qg has gs·hd floats (q is group × hd), every kp[i]
                // has hd floats.
                unsafe {
                    match gs {
                        1 => tile::<1, 4>(qg, hd, &kp, scale, &mut s),
                        2 => tile::<2, 4>(qg, hd, &kp, scale, &mut s),
                        3 => tile::<3, 4>(qg, hd, &kp, scale, &mut s),
                        _ => tile::<4, 2>(qg, hd, &kp, scale, &mut s),
                    }
                }
                for (g, sg) in s.iter().enumerate().take(gs) {
                    let row = (g0 + g) * n + t;
                    scores[row..row + valid].copy_from_slice(&sg[..valid]);
                }
                g0 += gs;
            }
            t += TILE;
        }
    }

    /// `s[g][i] = (q_g · k_i) · scale` for `G` heads (`q`: `G × hd`) and the
    /// tile's keys, `KT` keys per register block.
    ///
    /// # Safety
    /// AVX2/FMA code only; `q` has `G·hd` floats and every `kp[i]` `hd`.
    #[inline(always)]
    unsafe fn tile<const G: usize, const KT: usize>(
        q: *const f32,
        hd: usize,
        kp: &[*const f32; TILE],
        scale: __m128,
        s: &mut [[f32; TILE]; 4],
    ) {
        let mut k0 = 0;
        while k0 < TILE {
            let mut acc = [[_mm256_setzero_ps(); KT]; G];
            for d in (0..hd).step_by(8) {
                let mut qv = [_mm256_setzero_ps(); G];
                for g in 0..G {
                    // SAFETY: g·hd + d + 8 ≤ G·hd.
                    qv[g] = unsafe { _mm256_loadu_ps(q.add(g * hd + d)) };
                }
                for i in 0..KT {
                    // SAFETY: d + 8 ≤ hd.
                    let kv = unsafe { _mm256_loadu_ps(kp[k0 + i].add(d)) };
                    for g in 0..G {
                        acc[g][i] = _mm256_fmadd_ps(qv[g], kv, acc[g][i]);
                    }
                }
            }
            for g in 0..G {
                // Missing keys of a 2-block are zero vectors: the reduction of
                // each lane is the same expression either way.
                let mut a = [_mm256_setzero_ps(); 4];
                a[..KT].copy_from_slice(&acc[g]);
                // SAFETY: AVX code (the caller's contract).
                let r = _mm_mul_ps(unsafe { reduce4(a) }, scale);
                let mut tmp = [0f32; 4];
                // SAFETY: tmp holds 4 floats.
                unsafe { _mm_storeu_ps(tmp.as_mut_ptr(), r) };
                s[g][k0..k0 + KT].copy_from_slice(&tmp[..KT]);
            }
            k0 += KT;
        }
    }

    /// Lane i: `((a0+a1)+(a2+a3)) + ((a4+a5)+(a6+a7))` of `a[i]`.
    ///
    /// # Safety
    /// AVX code only.
    #[inline(always)]
    unsafe fn reduce4(a: [__m256; 4]) -> __m128 {
        // SAFETY: register arithmetic under the caller's features.
        unsafe {
            let h01 = _mm256_hadd_ps(a[0], a[1]);
            let h23 = _mm256_hadd_ps(a[2], a[3]);
            let h = _mm256_hadd_ps(h01, h23);
            _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
        }
    }

    /// Replaces each score by `e^(s − max)` and returns their sum (8 lane
    /// sums in position-mod-8 order, then [`hsum`]).
    #[inline(always)]
    unsafe fn softmax_numerators(s: &mut [f32]) -> f32 {
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = s.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 floats.
            mv = _mm256_max_ps(mv, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
        let max = lanes
            .iter()
            .chain(chunks.remainder())
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for c in s.chunks_mut(8) {
            // A partial chunk is padded with −∞, whose e^x is 0: adding it
            // leaves the lane sums unchanged.
            let mut t = [f32::NEG_INFINITY; 8];
            t[..c.len()].copy_from_slice(c);
            // SAFETY: t holds 8 floats.
            let e = unsafe { exp(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), m)) };
            sum = _mm256_add_ps(sum, e);
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(t.as_mut_ptr(), e) };
            c.copy_from_slice(&t[..c.len()]);
        }
        // SAFETY: register arithmetic.
        unsafe { hsum(sum) }
    }

    /// `out[g] = inv[g] · Σ_p w[g·n + p] · v_p` for `G` heads, `W` vectors
    /// (8·W dimensions) at a time; each value vector is loaded once for all
    /// `G` heads.
    ///
    /// # Safety
    /// AVX2/FMA/F16C code only; `w` is `G × n`, `out` is `G × head_dim`, `inv`
    /// has `G` entries, `8·W` divides `head_dim`, and the job's value offsets
    /// are in bounds (checked in [`run`]).
    #[inline(always)]
    unsafe fn value_pass<T: KvElem, const G: usize, const W: usize>(
        job: &Job<'_, T>,
        w: &[f32],
        inv: &[f32],
        out: &mut [f32],
    ) {
        let (hd, n) = (job.head_dim, job.voffs.len());
        debug_assert!(w.len() == G * n && out.len() == G * hd && inv.len() == G);
        let (vp, wp, op) = (job.vdata.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let mut d0 = 0;
        while d0 < hd {
            let mut acc = [[_mm256_setzero_ps(); W]; G];
            for (p, &off) in job.voffs.iter().enumerate() {
                // SAFETY: off + base + hd ≤ vdata.len() and d0 + 8W ≤ hd.
                let src = unsafe { vp.add(off + job.base + d0) };
                let mut v = [_mm256_setzero_ps(); W];
                for j in 0..W {
                    // SAFETY: as above.
                    v[j] = unsafe { T::load8(src.add(8 * j)) };
                }
                for g in 0..G {
                    // SAFETY: g·n + p < G·n = w.len().
                    let wg = unsafe { _mm256_broadcast_ss(&*wp.add(g * n + p)) };
                    for j in 0..W {
                        acc[g][j] = _mm256_fmadd_ps(wg, v[j], acc[g][j]);
                    }
                }
            }
            for g in 0..G {
                let iv = _mm256_set1_ps(inv[g]);
                for j in 0..W {
                    // SAFETY: g·hd + d0 + 8j + 8 ≤ G·hd = out.len().
                    unsafe {
                        _mm256_storeu_ps(op.add(g * hd + d0 + 8 * j), _mm256_mul_ps(acc[g][j], iv))
                    };
                }
            }
            d0 += 8 * W;
        }
    }
}

#[cfg(test)]
mod tests;
