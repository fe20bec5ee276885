//! Causal grouped-query attention (GQA) of query rows against a KV cache, for
//! decode and prefill alike.
//!
//! Owns: the cache views [`KvRows`] (flat or paged, over `f32`,
//! [`half::f16`] or [`half::bf16`] elements, see [`KvElem`]) and [`AttnRow`]; [`attention`], the
//! kernel (a single-row AVX2 unit and a multi-row AVX-512 tile);
//! [`attention_scalar`], the reference it is tested against.
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
//! Where the CPU has AVX-512, rows at consecutive positions of one sequence
//! (a prefill chunk, the positions a speculative step verifies) go in tiles
//! of up to `12 / group` rows (at least 2) × one KV head instead: every key
//! and value is loaded once for the whole tile. A 512-bit register holds two
//! query vectors' 8-lane accumulators side by side in the key pass and 16
//! output dimensions in the value pass, and `exp` runs on 16 lanes, so each
//! lane performs the single-row kernel's operations in its order: the tiles
//! give every row the bits it gets alone (tested), and a row's result never
//! depends on the other rows of its step. On the Xeon at hand this made a
//! 32-row chunk after 384 positions 2.5× faster (`prefill_attention_timing`
//! in the tests). Decode rows of different sequences whose paged caches
//! start with the same block (a shared prompt prefix, sampled siblings,
//! beams) go in tiles of up to `12 / group` rows as well: the positions
//! every row's block table maps to the same cache rows are scored and
//! summed for all of them at once, each row's own positions after that
//! for its heads alone (continuing the same sums in the same order, so the
//! bits are again the row's alone), with the single-row kernel's prefetch.
//! 16 decode rows after a shared 384-token prompt: 1.6× faster
//! (`shared_prefix_decode_timing`). Other decode rows keep the AVX2 unit:
//! there the cache comes from memory, not the arithmetic.
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
//!   reference itself runs. The tiles also need AVX-512 F, `head_dim % 16 ==
//!   0` and no sliding window; `PARALLM_CPU_FEATURES=-avx512` turns them off.

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

    /// For a paged cache, its pool's address and the block holding position
    /// 0: two rows with the same are likely to share leading cache rows.
    fn first_block(&self) -> Option<(usize, u32)> {
        match self {
            KvRows::Paged { data, table, .. } => {
                table.first().map(|&b| (data.as_ptr() as usize, b))
            }
            KvRows::Flat(_) => None,
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

/// Name of the attention path this CPU runs: "avx2" (a row at a time),
/// "avx512-tiles+avx2" (rows of one sequence in tiles, decode rows alone)
/// or "scalar".
pub fn kernel_path() -> &'static str {
    use crate::cpu::features::{enabled, Feature};
    match (enabled(Feature::Avx2), enabled(Feature::Avx512)) {
        (false, _) => "scalar",
        (true, false) => "avx2",
        (true, true) => "avx512-tiles+avx2",
    }
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
        let shape = (n_kv_heads, group, head_dim);
        // One row × one KV head on the single-row kernel.
        let single = |r: usize, kvh: usize, dst: &mut [f32]| {
            let qg = &q[r * q_stride + kvh * unit..][..unit];
            // A row whose sequence another row of the call also reads (a
            // prefill chunk) finds the cache warm; prefetching it would only
            // cost instructions.
            let cold = prefetch
                && (r == 0 || !rows[r].k.same_store(&rows[r - 1].k))
                && rows
                    .get(r + 1)
                    .is_none_or(|next| !next.k.same_store(&rows[r].k));
            group_attention(rows[r], qg, kvh, shape, params, cold, dst);
        };
        let total: usize = rows.iter().map(|r| r.pos + 1).sum();
        let tiles = row_tiles(rows, group, head_dim, params);
        crate::cpu::pool::with_current(|pool| {
            let parallel = allow_parallel
                && rows.len() * n_kv_heads > 1
                && total * q_width >= PAR_MIN_WORK
                && pool.threads() > 1;
            let Some(tiles) = tiles else {
                // Every row alone (decode): one unit per row × KV head.
                let work = |i: usize, dst: &mut [f32]| single(i / n_kv_heads, i % n_kv_heads, dst);
                if parallel {
                    pool.chunks_mut(out, unit, work);
                } else {
                    out.chunks_mut(unit)
                        .enumerate()
                        .for_each(|(i, dst)| work(i, dst));
                }
                return;
            };
            // Tiles × KV heads. Item i writes its tile's rows' columns of its
            // KV head: disjoint parts of `out`.
            let base = OutPtr(out.as_mut_ptr());
            let work = |i: usize| {
                let ((start, len, cross), kvh) = (tiles.spans[i / n_kv_heads], i % n_kv_heads);
                let members = &tiles.order[start..start + len];
                // SAFETY: row r's columns kvh·unit.. of `out` (r < rows.len(),
                // so in bounds); no other item has this row and KV head (a
                // row is in one tile), and `out` is borrowed mutably until
                // every item has finished.
                let part = |r: usize| unsafe {
                    std::slice::from_raw_parts_mut(base.get().add(r * q_width + kvh * unit), unit)
                };
                if len == 1 {
                    single(members[0], kvh, part(members[0]));
                } else {
                    let mut spare = Spare::take();
                    let mut buf = std::mem::take(&mut spare.out);
                    // Every output of the tile is written (the value pass
                    // covers all of `out`), so stale values are harmless.
                    let tile_out = grown(&mut buf, len * unit);
                    tile_attention(
                        rows,
                        members,
                        cross,
                        (q, q_stride),
                        kvh,
                        shape,
                        params,
                        &mut spare,
                        tile_out,
                    );
                    for (&r, src) in members.iter().zip(tile_out.chunks_exact(unit)) {
                        part(r).copy_from_slice(src);
                    }
                    spare.out = buf;
                    spare.restore();
                }
            };
            let items = tiles.spans.len() * n_kv_heads;
            if parallel {
                pool.run(items, &work);
            } else {
                (0..items).for_each(work);
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

/// `out`'s storage, shared by the tiles' items, which write disjoint parts.
struct OutPtr(*mut f32);

// SAFETY: the pointer is only written through at the disjoint places the
// items own (see `attention_with`), while `out` is mutably borrowed.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// The most rows of one sequence that [`tile_attention`] takes at once.
const MAX_TILE_ROWS: usize = 12;

/// The rows of a call that go to the multi-row kernel, and how.
#[cfg(target_arch = "x86_64")]
struct Tiles {
    /// Row indices, each tile's rows together (every row once).
    order: Vec<usize>,
    /// `(start in order, rows, cross)` per tile; `cross`: rows of different
    /// sequences whose caches share leading blocks. A tile of one row runs
    /// on the single-row kernel.
    spans: Vec<(usize, usize, bool)>,
}

/// Cuts `rows` into tiles for the multi-row kernel, or `None` when that
/// kernel does not run here or no tile would hold more than one row:
///
/// * runs of consecutive positions of one sequence (a prefill chunk, the
///   positions a speculative step verifies), up to about 12 query vectors
///   (6 register pairs in the score pass);
/// * the other rows of sequences whose paged caches start with the same
///   block of the same pool (a shared prompt prefix, sampled siblings,
///   beams), in near-equal tiles of at most as many rows, so that the cache
///   rows they share are read once per tile instead of once per row.
///
/// Rows left over are tiles of one.
#[cfg(target_arch = "x86_64")]
fn row_tiles<T: KvElem>(
    rows: &[AttnRow<'_, T>],
    group: usize,
    head_dim: usize,
    params: &AttnParams,
) -> Option<Tiles> {
    let eligible = params.window == 0
        && head_dim.is_multiple_of(16)
        && crate::cpu::features::enabled(crate::cpu::features::Feature::Avx512);
    #[cfg(test)]
    let eligible = eligible && !tests::ROWS_ALONE.with(std::cell::Cell::get);
    if !eligible || rows.len() < 2 {
        return None;
    }
    let most = (12 / group).clamp(2, MAX_TILE_ROWS);
    let mut tiles = Tiles {
        order: Vec::with_capacity(rows.len()),
        spans: Vec::new(),
    };
    // Rows not in a run, by the first cache block they read.
    let mut loose: Vec<((usize, usize, u32), usize)> = Vec::new();
    let mut r0 = 0;
    for r in 1..=rows.len() {
        let joins = r < rows.len()
            && r - r0 < most
            && rows[r].pos == rows[r - 1].pos + 1
            && rows[r].k.same_store(&rows[r - 1].k)
            && rows[r].v.same_store(&rows[r - 1].v);
        if joins {
            continue;
        }
        if r - r0 > 1 {
            tiles.spans.push((tiles.order.len(), r - r0, false));
            tiles.order.extend(r0..r);
        } else {
            match rows[r0].k.first_block().zip(rows[r0].v.first_block()) {
                Some(((k, b), (v, _))) => loose.push(((k, v, b), r0)),
                None => {
                    tiles.spans.push((tiles.order.len(), 1, false));
                    tiles.order.push(r0);
                }
            }
        }
        r0 = r;
    }
    loose.sort_unstable();
    for same in loose.chunk_by(|a, b| a.0 == b.0) {
        // Near-equal tiles of at most `most` rows.
        let count = same.len().div_ceil(most);
        let mut at = 0;
        for t in 0..count {
            let len = (same.len() - at) / (count - t);
            tiles.spans.push((tiles.order.len(), len, len > 1));
            tiles
                .order
                .extend(same[at..at + len].iter().map(|&(_, r)| r));
            at += len;
        }
    }
    tiles
        .spans
        .iter()
        .any(|&(_, len, _)| len > 1)
        .then_some(tiles)
}

/// The rows `members` of `rows` × KV head `kvh` and its `group` query heads
/// on the AVX-512 multi-row kernel, on the buffers of `spare`: consecutive
/// positions of one sequence, or (`cross`) rows of different sequences
/// whose caches may share leading rows. Writes `members.len() × group ×
/// head_dim` to the front of `out`, row by row in `members`' order.
/// Bit-identical to [`group_attention`] row by row.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tile_attention<T: KvElem>(
    rows: &[AttnRow<'_, T>],
    members: &[usize],
    cross: bool,
    (q, q_stride): (&[f32], usize),
    kvh: usize,
    (n_kv_heads, group, head_dim): (usize, usize, usize),
    params: &AttnParams,
    spare: &mut Spare,
    out: &mut [f32],
) {
    let unit = group * head_dim;
    let shape = (n_kv_heads, head_dim);
    let heads: Vec<Head<'_, T>> = if cross {
        members
            .iter()
            .map(|&r| Head::new(rows[r], kvh, shape, params, spare.offsets()))
            .collect()
    } else {
        // The last row sees every position the others do.
        let last = rows[members[members.len() - 1]];
        vec![Head::new(last, kvh, shape, params, spare.offsets())]
    };
    let common = shared_positions(&heads);
    let queries: Vec<&[f32]> = members
        .iter()
        .flat_map(|&r| q[r * q_stride + kvh * unit..][..unit].chunks_exact(head_dim))
        .collect();
    let sees: Vec<usize> = members
        .iter()
        .flat_map(|&r| std::iter::repeat_n(rows[r].pos + 1 - params.first(rows[r].pos), group))
        .collect();
    let job = avx512::Tile {
        queries: &queries,
        sees: &sees,
        heads: &heads,
        per_head: queries.len() / heads.len(),
        common,
    };
    let scores = spare.scores(queries.len() * avx512::stride(job.positions()));
    // SAFETY: row_tiles returned tiles only where AVX-512 F is on, and the
    // AVX2 path this runs under has AVX2, FMA and F16C.
    unsafe { avx512::run(&job, scores, &mut out[..members.len() * unit]) }
    heads.into_iter().for_each(|h| spare.keep(h));
}

/// How many leading positions are the same cache rows in every head (all
/// of a lone head's).
#[cfg(target_arch = "x86_64")]
fn shared_positions<T: KvElem>(heads: &[Head<'_, T>]) -> usize {
    let first = &heads[0];
    heads[1..]
        .iter()
        .map(|h| {
            let same = std::ptr::eq(h.kdata.as_ptr(), first.kdata.as_ptr())
                && std::ptr::eq(h.vdata.as_ptr(), first.vdata.as_ptr());
            if !same {
                return 0;
            }
            (h.koffs.iter().zip(&first.koffs))
                .zip(h.voffs.iter().zip(&first.voffs))
                .take_while(|((a, b), (c, d))| a == b && c == d)
                .count()
        })
        .min()
        .unwrap_or(first.koffs.len())
}

/// One KV head of one sequence's cache as the SIMD kernels read it: the
/// positions a row sees (its window's), and how to score them.
#[cfg(target_arch = "x86_64")]
struct Head<'a, T> {
    kdata: &'a [T],
    /// Offset of each seen position's key row in `kdata`, oldest first.
    koffs: Vec<usize>,
    vdata: &'a [T],
    voffs: Vec<usize>,
    /// Offset of this KV head within a row.
    base: usize,
    /// Elements per cache row.
    width: usize,
    head_dim: usize,
    /// The factor on `q·k`.
    scale: f32,
    /// Soft-cap of the scaled scores (0: none).
    softcap: f32,
}

#[cfg(target_arch = "x86_64")]
impl<'a, T: KvElem> Head<'a, T> {
    /// KV head `kvh` of `row`'s cache, the positions `row` sees.
    ///
    /// # Panics
    /// If the cache does not hold `row.pos + 1` positions.
    /// `(koffs, voffs)` are buffers to fill (their contents are dropped),
    /// handed back by [`Head::into_buffers`].
    fn new(
        row: AttnRow<'a, T>,
        kvh: usize,
        (n_kv_heads, head_dim): (usize, usize),
        params: &AttnParams,
        (mut koffs, mut voffs): (Vec<usize>, Vec<usize>),
    ) -> Self {
        let n = row.pos + 1;
        let width = n_kv_heads * head_dim;
        koffs.clear();
        voffs.clear();
        let kdata = row.k.offsets(n, width, &mut koffs);
        let vdata = row.v.offsets(n, width, &mut voffs);
        // A window drops the oldest keys.
        let first = params.first(row.pos);
        koffs.drain(..first);
        voffs.drain(..first);
        Self {
            kdata,
            koffs,
            vdata,
            voffs,
            base: kvh * head_dim,
            width,
            head_dim,
            scale: params.scale,
            softcap: params.softcap,
        }
    }

    /// The offset buffers, for the next head to fill.
    fn into_buffers(self) -> (Vec<usize>, Vec<usize>) {
        (self.koffs, self.voffs)
    }

    /// The bounds every unchecked access of the kernels relies on: at least
    /// one position, `lanes` dividing `head_dim`, and every key and value
    /// row's head in bounds.
    fn check(&self, lanes: usize) {
        let hd = self.head_dim;
        assert!(!self.koffs.is_empty() && self.voffs.len() == self.koffs.len());
        assert!(hd > 0 && hd.is_multiple_of(lanes) && self.base + hd <= self.width);
        assert!(self
            .koffs
            .iter()
            .all(|&o| o + self.width <= self.kdata.len()));
        assert!(self
            .voffs
            .iter()
            .all(|&o| o + self.width <= self.vdata.len()));
    }
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
    let mut spare = Spare::take();
    let head = Head::new(row, kvh, (n_kv_heads, head_dim), params, spare.offsets());
    let job = avx2::Job {
        q,
        head: &head,
        group,
        prefetch,
    };
    let scores = spare.scores(group * head.koffs.len());
    // SAFETY: detect_isa returned Avx2, so AVX2, FMA and F16C are present.
    unsafe { avx2::run(&job, scores, out) }
    spare.keep(head);
    spare.restore();
}

/// A thread's buffers for the SIMD kernels' units, reused from one unit to
/// the next: allocating and freeing them per unit (a prefill runs about
/// 10 000 units) showed in profiles as `malloc` and `free`.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Spare {
    /// Key and value offset buffers, one pair per head a unit builds.
    offsets: Vec<(Vec<usize>, Vec<usize>)>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// The first `len` values of `v`, grown with zeros if it is shorter; the
/// values already there are kept (for buffers whose users write before they
/// read).
#[cfg(target_arch = "x86_64")]
fn grown(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SPARE: std::cell::Cell<Spare> = std::cell::Cell::new(Spare::default());
}

#[cfg(target_arch = "x86_64")]
impl Spare {
    /// This thread's buffers (empty ones if a unit still holds them).
    fn take() -> Spare {
        SPARE.with(std::cell::Cell::take)
    }

    /// A pair of offset buffers, for [`Head::new`].
    fn offsets(&mut self) -> (Vec<usize>, Vec<usize>) {
        self.offsets.pop().unwrap_or_default()
    }

    /// Room for `len` scores. What an earlier unit left there stays: the
    /// score passes write every score before anything reads it.
    fn scores(&mut self, len: usize) -> &mut [f32] {
        grown(&mut self.scores, len)
    }

    /// Keeps `head`'s offset buffers for the next unit.
    fn keep<T: KvElem>(&mut self, head: Head<'_, T>) {
        self.offsets.push(head.into_buffers());
    }

    /// Returns the buffers to this thread.
    fn restore(self) {
        SPARE.with(|s| s.set(self));
    }
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

    use super::{Head, KvElem};
    use crate::cpu::ops::avx2::{exp, hsum};
    use crate::cpu::prefetch;

    /// One unit: a row's `group` query heads against one KV head.
    pub(super) struct Job<'a, T> {
        /// `group × head_dim` queries.
        pub q: &'a [f32],
        pub head: &'a Head<'a, T>,
        pub group: usize,
        /// Whether to prefetch the keys and values (the cache is likely
        /// cold: no other row of the call reads the same sequence).
        pub prefetch: bool,
    }

    /// Positions per key tile.
    pub(super) const TILE: usize = 4;

    /// Attention of one unit into `out` (`group × head_dim`); `scores` is
    /// `group × n` scratch.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Shapes are checked here.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run<T: KvElem>(job: &Job<'_, T>, scores: &mut [f32], out: &mut [f32]) {
        let (hd, group) = (job.head.head_dim, job.group);
        let n = job.head.koffs.len();
        // The bounds every unchecked access below relies on.
        job.head.check(8);
        assert!(job.q.len() == group * hd && out.len() == group * hd && scores.len() == group * n);

        // SAFETY: the asserts above: every key row p is kdata[koffs[p]..][..width]
        // and base + hd ≤ width; q and scores have the asserted lengths.
        unsafe { score_pass(job, scores) };
        if job.head.softcap > 0.0 {
            let cap = job.head.softcap;
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
        let (hd, n) = (job.head.head_dim, job.head.koffs.len());
        let scale = _mm_set1_ps(job.head.scale);
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
                let row =
                    |data: *const T, off: usize| data.wrapping_add(off + job.head.base).cast();
                for i in 0..TILE {
                    if let Some(&off) = job.head.koffs.get(t + 2 * TILE + i) {
                        prefetch::lines::<{ prefetch::L1 }>(
                            row(job.head.kdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                    if let Some(&off) = job.head.voffs.get(t + i) {
                        prefetch::lines::<{ prefetch::L2 }>(
                            row(job.head.vdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                }
            }
            // SAFETY: run checked the head.
            let kp = unsafe { key_rows(job.head, t, &mut wide) };
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

    /// Pointers to the f32 keys of positions `t..t + 4` of `head` (the last
    /// position repeated past its end), `head_dim` floats each: into the
    /// cache itself for f32, else widened into `wide` (`4·head_dim` floats;
    /// empty for f32).
    ///
    /// # Safety
    /// AVX2/F16C code only; `head` passed [`Head::check`].
    #[inline(always)]
    pub(super) unsafe fn key_rows<T: KvElem>(
        head: &Head<'_, T>,
        t: usize,
        wide: &mut [f32],
    ) -> [*const f32; TILE] {
        let (kdata, koffs, base, hd) = (head.kdata, &head.koffs, head.base, head.head_dim);
        let is_f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        let mut kp = [std::ptr::null::<f32>(); TILE];
        for (i, p) in kp.iter_mut().enumerate() {
            let off = koffs[(t + i).min(koffs.len() - 1)] + base;
            // SAFETY: off + hd ≤ kdata.len() (the caller's contract).
            let src = unsafe { kdata.as_ptr().add(off) };
            if is_f32 {
                *p = src.cast::<f32>();
            } else {
                let dst = wide[i * hd..][..hd].as_mut_ptr();
                for d in (0..hd).step_by(8) {
                    // SAFETY: src has hd readable elements, dst hd floats.
                    unsafe { _mm256_storeu_ps(dst.add(d), T::load8(src.add(d))) };
                }
                *p = dst;
            }
        }
        kp
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

    /// The largest score (8 lane maxima, then the remainder).
    #[inline(always)]
    pub(super) unsafe fn max_score(s: &[f32]) -> f32 {
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = s.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 floats.
            mv = _mm256_max_ps(mv, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
        lanes
            .iter()
            .chain(chunks.remainder())
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
    }

    /// Replaces each score by `e^(s − max)` and returns their sum (8 lane
    /// sums in position-mod-8 order, then [`hsum`]).
    #[inline(always)]
    unsafe fn softmax_numerators(s: &mut [f32]) -> f32 {
        // SAFETY: the caller's features.
        let m = _mm256_set1_ps(unsafe { max_score(s) });
        let mut sum = _mm256_setzero_ps();
        let mut chunks = s.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 floats.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                sum = _mm256_add_ps(sum, e);
                _mm256_storeu_ps(c.as_mut_ptr(), e);
            }
        }
        let c = chunks.into_remainder();
        if !c.is_empty() {
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
        let (hd, n) = (job.head.head_dim, job.head.voffs.len());
        debug_assert!(w.len() == G * n && out.len() == G * hd && inv.len() == G);
        let (vp, wp, op) = (job.head.vdata.as_ptr(), w.as_ptr(), out.as_mut_ptr());
        let mut d0 = 0;
        while d0 < hd {
            let mut acc = [[_mm256_setzero_ps(); W]; G];
            for (p, &off) in job.head.voffs.iter().enumerate() {
                // SAFETY: off + base + hd ≤ vdata.len() and d0 + 8W ≤ hd.
                let src = unsafe { vp.add(off + job.head.base + d0) };
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 multi-row kernel: several query rows of one sequence
    //! against one KV head, each key and value loaded once for all of them.
    //!
    //! Every result is bit-identical to the AVX2 single-row kernel's: a
    //! 512-bit register holds two query vectors' 8-lane accumulators side
    //! by side (the score pass) or 16 independent output dimensions (the
    //! value pass), so each lane runs the AVX2 kernel's chain of operations
    //! in its order, and the 8-lane reduction is the AVX2 `hadd` tree done
    //! on both 256-bit halves at once.

    use std::arch::x86_64::*;

    use super::avx2::{key_rows, max_score};
    use super::{Head, KvElem};
    use crate::cpu::ops::avx2::hsum;
    use crate::cpu::prefetch;

    /// One tile: query vectors (rows × the group's heads) against one KV
    /// head, of one sequence's cache or of several sharing leading rows.
    pub(super) struct Tile<'a, T> {
        /// `head_dim` floats each, row-major (row, head).
        pub queries: &'a [&'a [f32]],
        /// Positions each query vector sees (`0..sees[i]` of its head's).
        pub sees: &'a [usize],
        /// The caches read: query vector `i` reads `heads[i / per_head]`.
        /// One head for rows of one sequence (the largest `sees` is all of
        /// its positions); one per row for rows of different sequences.
        pub heads: &'a [Head<'a, T>],
        /// Query vectors per head (all of them for a lone head).
        pub per_head: usize,
        /// Positions `0..common` are the same cache rows in every head.
        pub common: usize,
    }

    /// Positions per key tile.
    const KEYS: usize = super::avx2::TILE;

    /// `$go!(n)` for a runtime `n` in 1..=6 (more counts as 6): the register
    /// blocks' sizes are constants.
    macro_rules! one_to_six {
        ($n:expr, $go:ident) => {
            match $n {
                1 => $go!(1),
                2 => $go!(2),
                3 => $go!(3),
                4 => $go!(4),
                5 => $go!(5),
                _ => $go!(6),
            }
        };
    }
    /// Query pairs per score register block (4 keys × 6 pairs = 24
    /// accumulators, 6 query pairs and a key: 31 of 32 registers).
    const PAIRS: usize = 6;
    /// Query vectors per value register block.
    const VALUE_QUERIES: usize = 6;

    /// The row stride of a tile's scores for `n` positions: whole key tiles.
    pub(super) fn stride(n: usize) -> usize {
        n.next_multiple_of(KEYS)
    }

    /// Attention of the tile into `out` (`queries × head_dim`); `scores`
    /// is `queries × stride(n)` scratch, `n = koffs.len()`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, AVX2, FMA and F16C. (Shapes are
    /// checked here.)
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn run<T: KvElem>(job: &Tile<'_, T>, scores: &mut [f32], out: &mut [f32]) {
        let nq = job.queries.len();
        let first = &job.heads[0];
        let hd = first.head_dim;
        // The bounds every unchecked access below relies on.
        assert!(job.per_head > 0 && job.heads.len() * job.per_head == nq);
        for h in job.heads {
            h.check(16);
            assert!(h.head_dim == hd && h.base == first.base);
            assert!(h.scale.to_bits() == first.scale.to_bits() && h.softcap == first.softcap);
            assert!(job.common <= h.koffs.len());
            assert!(
                job.common == 0
                    || (std::ptr::eq(h.kdata.as_ptr(), first.kdata.as_ptr())
                        && std::ptr::eq(h.vdata.as_ptr(), first.vdata.as_ptr()))
            );
            debug_assert!(
                h.koffs[..job.common] == first.koffs[..job.common]
                    && h.voffs[..job.common] == first.voffs[..job.common]
            );
        }
        assert!(job.queries.iter().all(|q| q.len() == hd));
        assert!(job.sees.len() == nq);
        assert!(job
            .sees
            .iter()
            .enumerate()
            .all(|(i, &s)| s > 0 && s <= job.heads[i / job.per_head].koffs.len()));
        let stride = stride(job.positions());
        assert!(out.len() == nq * hd && scores.len() == nq * stride);

        // SAFETY: the asserts above.
        unsafe { score_pass(job, stride, scores) };
        let mut inv = vec![0f32; nq];
        for (i, s) in scores.chunks_exact_mut(stride).enumerate() {
            let s = &mut s[..job.sees[i]];
            if first.softcap > 0.0 {
                let cap = first.softcap;
                s.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
            }
            // SAFETY: register arithmetic and in-bounds slice accesses
            // only, under this function's features.
            inv[i] = 1.0 / unsafe { softmax_numerators(s) };
        }
        let wide = |lanes: usize| hd.is_multiple_of(16 * lanes);
        if job.heads.len() > 1 {
            // SAFETY: as for score_pass.
            unsafe { cross_values(job, stride, scores, &inv, out) };
            return;
        }
        for (i0, g) in value_blocks(0..nq) {
            macro_rules! go {
                ($g:literal) => {
                    // SAFETY: as for score_pass, for the value rows; 16·W
                    // divides hd for the W chosen.
                    unsafe {
                        if wide(4) {
                            value_pass::<T, $g, 4>(job, stride, scores, &inv, i0, out)
                        } else if wide(2) {
                            value_pass::<T, $g, 2>(job, stride, scores, &inv, i0, out)
                        } else {
                            value_pass::<T, $g, 1>(job, stride, scores, &inv, i0, out)
                        }
                    }
                };
            }
            one_to_six!(g, go);
        }
    }

    /// `(first, count)` of the value pass's register blocks over the query
    /// vectors `vectors`: [`VALUE_QUERIES`] at a time, the last one short.
    fn value_blocks(vectors: std::ops::Range<usize>) -> impl Iterator<Item = (usize, usize)> {
        vectors
            .clone()
            .step_by(VALUE_QUERIES)
            .map(move |i0| (i0, (vectors.end - i0).min(VALUE_QUERIES)))
    }

    /// The value pass of a tile of rows of different sequences: every query
    /// vector over the common positions, in blocks across the rows, its sum
    /// so far left in `out`; then each head's vectors together over that
    /// head's other positions, from there (an f32 stored and loaded back is
    /// the same f32, so the bits are those of one unbroken sum).
    ///
    /// # Safety
    /// As for [`value_pass`], for every vector; each head's vectors see the
    /// same positions (one row per head).
    #[inline(always)]
    unsafe fn cross_values<T: KvElem>(
        job: &Tile<'_, T>,
        stride: usize,
        w: &[f32],
        inv: &[f32],
        out: &mut [f32],
    ) {
        let (hd, nq) = (job.heads[0].head_dim, job.queries.len());
        assert!((0..nq).all(|i| job.sees[i] == job.sees[i - i % job.per_head]));
        let wide = |lanes: usize| hd.is_multiple_of(16 * lanes);
        // The common positions for every vector, then each head's own for
        // its vectors.
        let joint = (0, 0..nq, 0..job.common, None);
        let own = |h: usize| {
            let vectors = h * job.per_head..(h + 1) * job.per_head;
            (
                h,
                vectors,
                job.common..job.sees[h * job.per_head],
                Some(inv),
            )
        };
        for (h, vectors, positions, finish) in
            std::iter::once(joint).chain((0..job.heads.len()).map(own))
        {
            for (i0, g) in value_blocks(vectors) {
                let part = Part {
                    head: &job.heads[h],
                    positions: positions.clone(),
                    weights: (w, stride),
                    i0,
                    finish,
                };
                macro_rules! go {
                    ($g:literal) => {
                        // SAFETY: the caller's contract; 16·W divides hd.
                        unsafe {
                            if wide(4) {
                                values_over::<T, $g, 4>(&part, out)
                            } else if wide(2) {
                                values_over::<T, $g, 2>(&part, out)
                            } else {
                                values_over::<T, $g, 1>(&part, out)
                            }
                        }
                    };
                }
                one_to_six!(g, go);
            }
        }
    }

    /// A piece of [`cross_values`]: query vectors from `i0` over `positions`
    /// of `head`, with the tile's weights (`queries × stride`).
    struct Part<'a, 'h, T> {
        head: &'a Head<'h, T>,
        positions: std::ops::Range<usize>,
        weights: (&'a [f32], usize),
        i0: usize,
        /// `None`: the sums start from zero and are left unscaled (the
        /// common positions); `Some(inv)`: they continue what `out` holds
        /// and end scaled by `inv[i]`.
        finish: Option<&'a [f32]>,
    }

    /// The `G` query vectors of `part`: their value sums over its
    /// positions, into `out` (see [`Part::finish`]). Each value vector is
    /// loaded once for all `G`.
    ///
    /// # Safety
    /// AVX-512 F/AVX2/FMA/F16C code only; the weights hold every position
    /// of `part.positions` for these vectors, `out` is `queries ×
    /// head_dim`, `16·W` divides `head_dim`, `i0 + G ≤ queries`, and the
    /// head passed [`Head::check`].
    #[inline(always)]
    unsafe fn values_over<T: KvElem, const G: usize, const W: usize>(
        part: &Part<'_, '_, T>,
        out: &mut [f32],
    ) {
        let (head, i0, (w, stride)) = (part.head, part.i0, part.weights);
        let hd = head.head_dim;
        let op = out.as_mut_ptr();
        let voffs = &head.voffs[part.positions.clone()];
        let mut d0 = 0;
        while d0 < hd {
            let mut acc = [[_mm512_setzero_ps(); W]; G];
            if part.finish.is_some() {
                for g in 0..G {
                    for j in 0..W {
                        // SAFETY: (i0 + g)·hd + d0 + 16j + 16 ≤ out.len().
                        acc[g][j] = unsafe { _mm512_loadu_ps(op.add((i0 + g) * hd + d0 + 16 * j)) };
                    }
                }
            }
            // SAFETY: the caller's contract.
            unsafe {
                accumulate(
                    head,
                    part.positions.start,
                    voffs,
                    (w, stride),
                    (i0, d0),
                    &mut acc,
                )
            };
            for g in 0..G {
                let scale = part.finish.map(|inv| _mm512_set1_ps(inv[i0 + g]));
                for j in 0..W {
                    let a = match scale {
                        Some(s) => _mm512_mul_ps(acc[g][j], s),
                        None => acc[g][j],
                    };
                    // SAFETY: as for the loads.
                    unsafe { _mm512_storeu_ps(op.add((i0 + g) * hd + d0 + 16 * j), a) };
                }
            }
            d0 += 16 * W;
        }
    }

    impl<T> Tile<'_, T> {
        /// The most positions a head holds.
        pub(super) fn positions(&self) -> usize {
            self.heads.iter().map(|h| h.koffs.len()).max().unwrap_or(0)
        }

        /// Where the key tiles scored for every query vector at once end:
        /// a lone head's every position (its last tile may be partial);
        /// otherwise the whole key tiles of the common positions.
        fn joint_end(&self) -> usize {
            if self.heads.len() == 1 {
                self.heads[0].koffs.len()
            } else {
                self.common - self.common % KEYS
            }
        }
    }

    /// `scores[i·stride + p] = (q_i · k_p) · scale` for every query vector and
    /// every position of its head up to the largest `sees`. Query vectors go
    /// in pairs (the second of an odd last pair is zeros, its scores
    /// dropped): all of them together over the key tiles of the common
    /// positions, then each head's vectors over that head's other
    /// positions. A score is a function of its query vector and key alone,
    /// so how vectors are paired does not change it.
    #[inline(always)]
    unsafe fn score_pass<T: KvElem>(job: &Tile<'_, T>, stride: usize, scores: &mut [f32]) {
        let (hd, nq) = (job.heads[0].head_dim, job.queries.len());
        let is_f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        let mut wide = if is_f32 {
            Vec::new()
        } else {
            vec![0f32; KEYS * hd]
        };
        let scale = _mm512_set1_ps(job.heads[0].scale);
        let joint = job.joint_end();
        // Rows of different sequences come to a decode step from memory;
        // one sequence's rows (a prefill chunk) find its cache warm.
        let cold = job.heads.len() > 1 && prefetch::distance() != 0;
        // SAFETY: the caller's contract (run's asserts), for the vectors
        // 0..nq and the head each reads.
        unsafe {
            pairs_over(
                &pack(job.queries, nq),
                &job.heads[0],
                0..joint,
                (0, nq),
                (scale, stride, scores.as_mut_ptr()),
                &mut wide,
                cold,
            );
        }
        if job.heads.len() == 1 {
            return;
        }
        // Each head's vectors in pairs of their own, one packing for all.
        let floats = job.per_head.div_ceil(2) * 2 * hd;
        let packed = pack(job.queries, job.per_head);
        for (h, head) in job.heads.iter().enumerate() {
            let (v0, v1) = (h * job.per_head, (h + 1) * job.per_head);
            let n = job.sees[v0..v1].iter().copied().max().unwrap_or(0);
            // SAFETY: as above, for this head's vectors.
            unsafe {
                pairs_over(
                    &packed[h * floats..][..floats],
                    head,
                    joint..n,
                    (v0, v1),
                    (scale, stride, scores.as_mut_ptr()),
                    &mut wide,
                    cold,
                );
            }
        }
    }

    /// Query vectors in pairs, each group of `per` vectors pairing only
    /// among itself: pair `j` of a group, slice `d`: `[q_2j[d..d+8] |
    /// q_2j+1[d..d+8]]` (zeros for a group's missing last second). A group
    /// takes `per.div_ceil(2) · 2 · head_dim` floats.
    fn pack(queries: &[&[f32]], per: usize) -> Vec<f32> {
        let hd = queries.first().map_or(0, |q| q.len());
        let group = per.div_ceil(2) * 2 * hd;
        let mut packed = vec![0f32; queries.len().div_ceil(per) * group];
        for (i, q) in queries.iter().enumerate() {
            let (g, k) = (i / per, i % per);
            for (s, chunk) in q.chunks_exact(8).enumerate() {
                let at = g * group + (k / 2) * 2 * hd + s * 16 + (k % 2) * 8;
                packed[at..at + 8].copy_from_slice(chunk);
            }
        }
        packed
    }

    /// Scores of the query vectors in `packed` (vectors `v0..v1` of the
    /// tile) against `head`'s key tiles starting in `range` (a partial last
    /// tile repeats its last key; lanes are independent, and its extra
    /// scores are never read).
    ///
    /// # Safety
    /// AVX-512 F/AVX2/F16C code only; `head` passed [`Head::check`],
    /// `range.end ≤ head.koffs.len()`, and `scores` (row stride `stride`)
    /// has rows `v0..v1` with room for every key tile of `range`.
    #[inline(always)]
    unsafe fn pairs_over<T: KvElem>(
        packed: &[f32],
        head: &Head<'_, T>,
        range: std::ops::Range<usize>,
        (v0, v1): (usize, usize),
        (scale, stride, scores): (__m512, usize, *mut f32),
        wide: &mut [f32],
        prefetch: bool,
    ) {
        let hd = head.head_dim;
        let pairs = (v1 - v0).div_ceil(2);
        let row_bytes = hd * std::mem::size_of::<T>();
        let row = |data: *const T, off: usize| data.wrapping_add(off + head.base).cast();
        let mut t = range.start;
        while t < range.end {
            if prefetch {
                // As the single-row kernel does for a cold cache: keys two
                // tiles ahead into L1, this tile's values into L2.
                for i in 0..KEYS {
                    if let Some(&off) = head.koffs.get(t + 2 * KEYS + i) {
                        prefetch::lines::<{ prefetch::L1 }>(
                            row(head.kdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                    if let Some(&off) = head.voffs.get(t + i) {
                        prefetch::lines::<{ prefetch::L2 }>(
                            row(head.vdata.as_ptr(), off),
                            row_bytes,
                        );
                    }
                }
            }
            // SAFETY: the caller's contract.
            let kp = unsafe { key_rows(head, t, wide) };
            let mut j0 = 0;
            while j0 < pairs {
                let ps = (pairs - j0).min(PAIRS);
                let qp = packed[j0 * 2 * hd..].as_ptr();
                let dst = Dst {
                    scores,
                    stride,
                    first: v0 + 2 * j0,
                    queries: v1,
                    at: t,
                };
                macro_rules! go {
                    ($p:literal) => {
                        // SAFETY: qp has ps·2·hd floats, every kp[i] hd;
                        // scores rows v0 + 2·j0 .. v1 have room for 4 scores
                        // at t (stride is a multiple of 4 and t < stride).
                        unsafe { key_tile::<$p>(qp, hd, &kp, scale, &dst) }
                    };
                }
                one_to_six!(ps, go);
                j0 += ps;
            }
            t += KEYS;
        }
    }

    /// The AVX2 kernel's `softmax_numerators`, bit for bit: each score
    /// becomes `e^(s − max)` (16 lanes at a time, [`exp`] being the AVX2
    /// `exp` lane for lane), and the sum is taken as there, 8 lane sums in
    /// position-mod-8 order (a partial last chunk adding zeros, as its
    /// padding's `e^−∞` are), then `hsum`.
    #[inline(always)]
    unsafe fn softmax_numerators(s: &mut [f32]) -> f32 {
        // SAFETY: the caller's features.
        let m = _mm512_set1_ps(unsafe { max_score(s) });
        let mut chunks = s.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: c holds 16 floats.
            unsafe {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), m));
                _mm512_storeu_ps(c.as_mut_ptr(), e);
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut t = [0f32; 16];
            t[..rest.len()].copy_from_slice(rest);
            // SAFETY: t holds 16 floats.
            unsafe {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(t.as_ptr()), m));
                _mm512_storeu_ps(t.as_mut_ptr(), e);
            }
            rest.copy_from_slice(&t[..rest.len()]);
        }
        let mut sum = _mm256_setzero_ps();
        let mut chunks = s.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: c holds 8 floats.
            sum = _mm256_add_ps(sum, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut t = [0f32; 8];
            t[..rest.len()].copy_from_slice(rest);
            // SAFETY: t holds 8 floats.
            sum = _mm256_add_ps(sum, unsafe { _mm256_loadu_ps(t.as_ptr()) });
        }
        // SAFETY: register arithmetic.
        unsafe { hsum(sum) }
    }

    /// `crate::cpu::ops::avx2::exp` on 16 lanes: the same operations in
    /// the same order per lane, so the same bits.
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        use crate::cpu::ops::avx2::{EXP_HI as HI, EXP_LO as LO, EXP_POLY, LN2_HI, LN2_LO};
        let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(LO)), _mm512_set1_ps(HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), xc);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in EXP_POLY {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let ni = _mm512_cvtps_epi32(n);
        let n1 = _mm512_srai_epi32::<1>(ni);
        let n2 = _mm512_sub_epi32(ni, n1);
        let bias = _mm512_set1_epi32(127);
        let p1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
        let p2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
        let y = _mm512_mul_ps(_mm512_mul_ps(p, p1), p2);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(HI));
        let y = _mm512_mask_blend_ps(over, y, _mm512_set1_ps(f32::INFINITY));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_blend_ps(nan, y, x)
    }

    /// `AVX2 hadd` on both 256-bit halves: per 128-bit lane,
    /// `[x0+x1, x2+x3, y0+y1, y2+y3]`.
    #[inline(always)]
    unsafe fn hadd2(x: __m512, y: __m512) -> __m512 {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(x, y),
            _mm512_shuffle_ps::<0b11_01_11_01>(x, y),
        )
    }

    /// Where a key tile's scores go: query vector `i`'s four at
    /// `scores[i·stride + at..]`, for `first ≤ i < queries`.
    struct Dst {
        scores: *mut f32,
        stride: usize,
        first: usize,
        queries: usize,
        at: usize,
    }

    /// For `P` query pairs and the tile's 4 keys, writes `(q_i · k_t) ·
    /// scale` for the pairs' query vectors `i` (see [`Dst`]), each lane of
    /// the dot products and its reduction as the AVX2 kernel's `tile` and
    /// `reduce4` do them.
    ///
    /// # Safety
    /// AVX-512 F code only; `q` has `P·2·hd` floats and every `kp[i]` `hd`;
    /// `dst` has room for 4 floats at each of its rows.
    #[inline(always)]
    unsafe fn key_tile<const P: usize>(
        q: *const f32,
        hd: usize,
        kp: &[*const f32; KEYS],
        scale: __m512,
        dst: &Dst,
    ) {
        let mut acc = [[_mm512_setzero_ps(); KEYS]; P];
        for d in (0..hd).step_by(8) {
            let mut qv = [_mm512_setzero_ps(); P];
            for j in 0..P {
                // SAFETY: j·2·hd + 2d + 16 ≤ P·2·hd.
                qv[j] = unsafe { _mm512_loadu_ps(q.add(j * 2 * hd + 2 * d)) };
            }
            for i in 0..KEYS {
                // SAFETY: d + 8 ≤ hd. (The 64-bit broadcast moves the same
                // bits as AVX-512 DQ's f32x8 one, and needs only F.)
                let k = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(unsafe {
                    _mm256_loadu_ps(kp[i].add(d))
                })));
                for j in 0..P {
                    acc[j][i] = _mm512_fmadd_ps(qv[j], k, acc[j][i]);
                }
            }
        }
        for j in 0..P {
            // SAFETY: register arithmetic under the caller's features.
            unsafe {
                let h = hadd2(hadd2(acc[j][0], acc[j][1]), hadd2(acc[j][2], acc[j][3]));
                // Low 128 bits + high 128 bits of each 256-bit half.
                let r = _mm512_add_ps(h, _mm512_shuffle_f32x4::<0b10_11_00_01>(h, h));
                let r = _mm512_mul_ps(r, scale);
                let i = dst.first + 2 * j;
                // Lanes 0..4: the pair's first vector; 8..12: its second.
                _mm_storeu_ps(
                    dst.scores.add(i * dst.stride + dst.at),
                    _mm512_castps512_ps128(r),
                );
                if i + 1 < dst.queries {
                    _mm_storeu_ps(
                        dst.scores.add((i + 1) * dst.stride + dst.at),
                        _mm512_extractf32x4_ps::<2>(r),
                    );
                }
            }
        }
    }

    /// `acc[g] += Σ w[(i0 + g)·stride + p] · v_p[d0..d0 + 16·W]` over the
    /// positions `p = from, from + 1, …` whose value rows are at `voffs`
    /// (in `head`), in that order; each value vector is loaded once for all
    /// `G`.
    ///
    /// # Safety
    /// AVX-512 F/AVX2/FMA/F16C code only; every offset passed
    /// [`Head::check`], `d0 + 16·W ≤ head_dim`, and `w` holds rows `i0 ..
    /// i0 + G` of `stride` weights covering these positions.
    #[inline(always)]
    unsafe fn accumulate<T: KvElem, const G: usize, const W: usize>(
        head: &Head<'_, T>,
        from: usize,
        voffs: &[usize],
        (w, stride): (&[f32], usize),
        (i0, d0): (usize, usize),
        acc: &mut [[__m512; W]; G],
    ) {
        let (vp, wp) = (head.vdata.as_ptr(), w.as_ptr());
        for (p, &off) in (from..).zip(voffs) {
            // SAFETY: off + base + hd ≤ vdata.len() and d0 + 16W ≤ hd.
            let src = unsafe { vp.add(off + head.base + d0) };
            let mut v = [_mm512_setzero_ps(); W];
            for j in 0..W {
                // SAFETY: as above.
                v[j] = unsafe { load16(src.add(16 * j)) };
            }
            for g in 0..G {
                // SAFETY: (i0 + g)·stride + p < w.len().
                let wg = _mm512_set1_ps(unsafe { *wp.add((i0 + g) * stride + p) });
                for j in 0..W {
                    acc[g][j] = _mm512_fmadd_ps(wg, v[j], acc[g][j]);
                }
            }
        }
    }

    /// 16 value elements from `ptr`, widened to f32.
    ///
    /// # Safety
    /// `ptr` has 16 readable elements; AVX-512 F, AVX and F16C code only.
    #[inline(always)]
    unsafe fn load16<T: KvElem>(ptr: *const T) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
                _mm512_loadu_ps(ptr.cast())
            } else {
                let lo = _mm512_castpd256_pd512(_mm256_castps_pd(T::load8(ptr)));
                let hi = _mm256_castps_pd(T::load8(ptr.add(8)));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, hi))
            }
        }
    }

    /// `out[i] = inv[i] · Σ_{p < sees[i]} w[i·stride + p] · v_p` for the `G`
    /// query vectors from `i0` of a tile with one head, `W` registers (16·W
    /// dimensions) at a time; each value vector is loaded once for all `G`.
    /// The positions all of them see are summed together; the rest (the
    /// later rows' last few) continue each vector's sum in place, in the
    /// same order.
    ///
    /// # Safety
    /// AVX-512 F/AVX2/FMA/F16C code only; `w` is `queries × stride`, `out` is
    /// `queries × head_dim`, `16·W` divides `head_dim`, `i0 + G ≤ queries`,
    /// and the value offsets are in bounds (checked in [`run`]).
    #[inline(always)]
    unsafe fn value_pass<T: KvElem, const G: usize, const W: usize>(
        job: &Tile<'_, T>,
        stride: usize,
        w: &[f32],
        inv: &[f32],
        i0: usize,
        out: &mut [f32],
    ) {
        let first = &job.heads[0];
        let hd = first.head_dim;
        let sees = &job.sees[i0..i0 + G];
        let common = sees.iter().copied().min().unwrap_or(0);
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        let mut d0 = 0;
        while d0 < hd {
            let mut acc = [[_mm512_setzero_ps(); W]; G];
            // SAFETY: the caller's contract.
            unsafe {
                accumulate(
                    first,
                    0,
                    &first.voffs[..common],
                    (w, stride),
                    (i0, d0),
                    &mut acc,
                )
            };
            for g in 0..G {
                let i = i0 + g;
                let head = &job.heads[i / job.per_head];
                let vp = head.vdata.as_ptr();
                for j in 0..W {
                    // SAFETY: i·hd + d0 + 16j + 16 ≤ queries·hd = out.len().
                    let o = unsafe { op.add(i * hd + d0 + 16 * j) };
                    let mut a = acc[g][j];
                    for (p, &off) in head.voffs[..sees[g]].iter().enumerate().skip(common) {
                        // SAFETY: as in the joint loop, for this head.
                        let v = unsafe { load16(vp.add(off + head.base + d0 + 16 * j)) };
                        // SAFETY: i·stride + p < w.len().
                        let wg = _mm512_set1_ps(unsafe { *wp.add(i * stride + p) });
                        a = _mm512_fmadd_ps(wg, v, a);
                    }
                    // SAFETY: o has 16 writable floats.
                    unsafe { _mm512_storeu_ps(o, _mm512_mul_ps(a, _mm512_set1_ps(inv[i]))) };
                }
            }
            d0 += 16 * W;
        }
    }
}

#[cfg(test)]
mod tests;
