//! Skinny f32 GEMM: `y (m×n) = x (m×k) · wᵀ` with `w` stored `n×k` row-major.
//!
//! Tuned for few activation rows (m = 1..64) against a large weight matrix that
//! is streamed from memory once per call. Work is split over blocks of weight
//! rows (= output columns) on the current compute pool; every task writes its own column range
//! of `y` directly. Each block runs a register-tiled microkernel: `R` weight
//! rows × `C` activation rows, one vector accumulator per (row, col) pair, FMA
//! over k, then a horizontal reduction (a shuffle tree for the AVX-512 4×4
//! tile). For 5..≈35 activation rows each weight block is revisited by several
//! tiles, which makes the DRAM stream bursty; the kernels then software-prefetch
//! the next block, spread evenly over the tiles of the current one.
//!
//! SIMD paths (AVX-512F, AVX2+FMA) are chosen at run time with
//! `is_x86_feature_detected!` (through [`crate::cpu::features`], which
//! `PARALLM_CPU_FEATURES` can narrow); a portable scalar path is used otherwise.
//! (The AVX-512 intrinsics need Rust >= 1.89.)

// Index loops over the const tile dimensions read best as written.
#![allow(clippy::needless_range_loop)]

use crate::cpu::out::{OutCols, SharedOut};

/// Below this many weight elements (n·k) everything runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;
/// The same for m = 1 (a gemv): one core streams ~8 MB faster than waking up
/// rayon's sleeping workers paid back (measured on a 2-core EPYC, weights in
/// DRAM, before the spinning compute pool).
const PAR_MIN_WORK_GEMV: usize = 1 << 21;

/// y (m×n) = x (m×k) · wᵀ, w is n×k row-major.
pub fn matmul_xwt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    matmul_xwt_with(detect_isa(), x, m, w, n, k, y)
}

/// The instruction set a dense kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The widest instruction set the kernels may use here.
pub(crate) fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::features::{enabled, Feature};
        if enabled(Feature::Avx512) {
            return Isa::Avx512;
        }
        if enabled(Feature::Avx2) {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Name of the f32 matmul path this CPU runs ("avx512", "avx2" or "scalar").
pub fn kernel_path() -> &'static str {
    match detect_isa() {
        Isa::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512",
    }
}

fn matmul_xwt_with(isa: Isa, x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x must be m×k");
    assert_eq!(w.len(), n * k, "w must be n×k");
    assert_eq!(y.len(), m * n, "y must be m×n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let min_work = if m == 1 {
        PAR_MIN_WORK_GEMV
    } else {
        PAR_MIN_WORK
    };
    par_cols(w, k, y, m, min_work, |wc, out| block(isa, x, m, wc, k, out));
}

/// Runs `f(rows of w, their columns of y)` over blocks of `w`'s rows on the
/// current compute pool, or once on this thread when the pool has one thread,
/// `w` holds fewer than `min_work` elements, or too few rows to split.
pub(crate) fn par_cols<T: Sync>(
    w: &[T],
    k: usize,
    y: &mut [f32],
    m: usize,
    min_work: usize,
    f: impl Fn(&[T], OutCols<'_>) + Sync,
) {
    let n = w.len() / k;
    crate::cpu::pool::with_current(|pool| {
        let threads = pool.threads();
        if threads <= 1 || w.len() < min_work || n < 2 * ROW_ALIGN {
            f(w, OutCols::new(y, m, n, 0, n));
            return;
        }
        // A few tasks per thread for load balance; block height a multiple of
        // the row tile so that only the last block has a ragged end.
        let tasks = threads * 4;
        let nb = n.div_ceil(tasks).div_ceil(ROW_ALIGN) * ROW_ALIGN;
        let yp = SharedOut::new(y, m, n);
        pool.run(n.div_ceil(nb), &|b| {
            let wc = &w[b * nb * k..((b + 1) * nb).min(n) * k];
            let cols = wc.len() / k;
            // SAFETY: task b gets columns b*nb .. b*nb + cols, where cols <= nb
            // is the number of rows in its chunk of w; chunks are disjoint, so
            // views are.
            let out = unsafe { yp.cols(b * nb, cols) };
            f(wc, out)
        });
    })
}

/// Row-block granularity for the parallel split (multiple of every R used).
const ROW_ALIGN: usize = 8;

/// `y[:, col0..col0+cols] = x · wᵀ` (w holds `cols` rows) on the calling
/// thread, through the widest path this CPU has.
pub(crate) fn block_detected(x: &[f32], m: usize, w: &[f32], k: usize, out: OutCols<'_>) {
    block(detect_isa(), x, m, w, k, out)
}

/// `y[:, col0..col0+cols] = x · wᵀ` (w holds `cols` rows) on the calling thread.
fn block(isa: Isa, x: &[f32], m: usize, w: &[f32], k: usize, out: OutCols<'_>) {
    debug_assert!(x.len() == m * k && w.len() == out.cols * k && out.m == m);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx512 is only produced when features::enabled(Avx512),
        // which implies that avx512f was detected (or in tests, under the same
        // check); all accesses are bounds-checked inside.
        Isa::Avx512 => unsafe { avx512::block(x, m, w, out.cols, k, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2 is only produced after detecting both avx2 and fma.
        Isa::Avx2 => unsafe { avx2::block(x, m, w, out.cols, k, out) },
        Isa::Scalar => scalar::block(x, m, w, out.cols, k, out),
    }
}

/// Generic tiling driver: R weight rows × C activation rows per microkernel
/// call, with R×1, 1×C and 1×1 kernels for the ragged edges.
///
/// While the tiles of one R-row block of `w` run, they also issue software
/// prefetches for the block `PF_BLOCKS` blocks ahead, spread evenly over the
/// tiles, so that the weight stream is requested at a steady rate instead of in
/// bursts when a new block starts (the activations are cache resident).
macro_rules! tiled_block {
    ($tile:ident, $R:literal, $C:literal, $x:ident, $m:ident, $w:ident, $n:ident, $k:ident, $out:ident) => {{
        let n_main = $n / $R * $R;
        let m_main = $m / $C * $C;
        let tiles = m_main / $C + ($m - m_main);
        let lines = $R * $k.div_ceil(16);
        let mut j0 = 0;
        while j0 < n_main {
            let pj = j0 + super::PF_BLOCKS * $R;
            let (pf, pf_lines) = if (2..=8).contains(&tiles) && pj + $R <= n_main {
                ($w[pj * $k..].as_ptr(), lines)
            } else {
                ($w.as_ptr(), 0)
            };
            let mut t = 0;
            let mut i0 = 0;
            while i0 < m_main {
                let (lo, hi) = (t * pf_lines / tiles, (t + 1) * pf_lines / tiles);
                if pf_lines > 0 {
                    $tile::<$R, $C, true>($x, i0, $w, j0, $k, $m, &mut $out, pf, lo, hi);
                } else {
                    $tile::<$R, $C, false>($x, i0, $w, j0, $k, $m, &mut $out, pf, 0, 0);
                }
                i0 += $C;
                t += 1;
            }
            while i0 < $m {
                let (lo, hi) = (t * pf_lines / tiles, (t + 1) * pf_lines / tiles);
                if pf_lines > 0 {
                    $tile::<$R, 1, true>($x, i0, $w, j0, $k, $m, &mut $out, pf, lo, hi);
                } else {
                    $tile::<$R, 1, false>($x, i0, $w, j0, $k, $m, &mut $out, pf, 0, 0);
                }
                i0 += 1;
                t += 1;
            }
            j0 += $R;
        }
        let nop = $w.as_ptr();
        while j0 < $n {
            let mut i0 = 0;
            while i0 < m_main {
                $tile::<1, $C, false>($x, i0, $w, j0, $k, $m, &mut $out, nop, 0, 0);
                i0 += $C;
            }
            while i0 < $m {
                $tile::<1, 1, false>($x, i0, $w, j0, $k, $m, &mut $out, nop, 0, 0);
                i0 += 1;
            }
            j0 += 1;
        }
    }};
}

/// How many R-row blocks ahead of the current one the kernels prefetch.
const PF_BLOCKS: usize = 1;

/// Software prefetch of lines `lo..hi` of the `R`-row block at `pf` (row
/// stride `k`), numbered in the order the kernel consumes them (line s = row
/// s % R, floats 16·(s / R)..), issued `per` at a time by [`Prefetcher::step`]
/// so they spread evenly over the k-loop of a tile.
#[cfg(target_arch = "x86_64")]
struct Prefetcher<const R: usize> {
    pf: *const f32,
    k: usize,
    next: usize,
    hi: usize,
    per: usize,
}

#[cfg(target_arch = "x86_64")]
impl<const R: usize> Prefetcher<R> {
    #[inline(always)]
    fn new(pf: *const f32, k: usize, lo: usize, hi: usize, steps: usize) -> Self {
        let per = if lo < hi {
            (hi - lo).div_ceil(steps.max(1))
        } else {
            0
        };
        Prefetcher {
            pf,
            k,
            next: lo,
            hi,
            per,
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for _ in 0..self.per {
            if self.next >= self.hi {
                return;
            }
            let s = self.next;
            self.next += 1;
            // wrapping_add: only an address is formed (the driver passes blocks
            // inside `w` anyway).
            let p = self.pf.wrapping_add((s % R) * self.k + (s / R) * 16);
            // SAFETY: _mm_prefetch needs only SSE (x86_64 baseline) and is a
            // hint: it does not dereference in the Rust sense and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
        }
    }
}

/// Bounds check shared by all microkernels: rows i0..i0+c of x and rows
/// j0..j0+r of w must exist, and so must the outputs (i0.., j0..).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn check_tile(
    x: &[f32],
    i0: usize,
    w: &[f32],
    j0: usize,
    k: usize,
    m: usize,
    out: &OutCols<'_>,
    r: usize,
    c: usize,
) {
    assert!(r >= 1 && c >= 1 && i0 + c <= m && out.m == m);
    assert!((i0 + c) * k <= x.len());
    assert!((j0 + r) * k <= w.len());
    assert!(j0 + r <= out.cols);
}

mod scalar {
    use super::{check_tile, OutCols};

    pub(super) fn block(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, mut out: OutCols<'_>) {
        tiled_block!(tile, 4, 1, x, m, w, n, k, out);
    }

    /// Portable kernel: 8 independent partial sums per dot product so that the
    /// compiler can vectorise with whatever the baseline target offers.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn tile<const R: usize, const C: usize, const PF: bool>(
        x: &[f32],
        i0: usize,
        w: &[f32],
        j0: usize,
        k: usize,
        m: usize,
        out: &mut OutCols<'_>,
        _pf: *const f32,
        _pf_lo: usize,
        _pf_hi: usize,
    ) {
        check_tile(x, i0, w, j0, k, m, out, R, C);
        for r in 0..R {
            let wr = &w[(j0 + r) * k..(j0 + r + 1) * k];
            for c in 0..C {
                let xr = &x[(i0 + c) * k..(i0 + c + 1) * k];
                let mut acc = [0f32; 8];
                let wc = wr.chunks_exact(8);
                let xc = xr.chunks_exact(8);
                let (wt, xt) = (wc.remainder(), xc.remainder());
                for (a, b) in wc.zip(xc) {
                    for l in 0..8 {
                        acc[l] += a[l] * b[l];
                    }
                }
                let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                for (a, b) in wt.iter().zip(xt) {
                    s += a * b;
                }
                out.write(i0 + c, j0 + r, &[s]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{check_tile, OutCols, Prefetcher};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        mut out: OutCols<'_>,
    ) {
        // 4×2 tile: 8 accumulators + 4 weight vectors + 1 x vector = 13 of 16 ymm.
        tiled_block!(tile, 4, 2, x, m, w, n, k, out);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA. Bounds are asserted on entry.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const C: usize, const PF: bool>(
        x: &[f32],
        i0: usize,
        w: &[f32],
        j0: usize,
        k: usize,
        m: usize,
        out: &mut OutCols<'_>,
        pf: *const f32,
        pf_lo: usize,
        pf_hi: usize,
    ) {
        check_tile(x, i0, w, j0, k, m, out, R, C);
        let xp = x.as_ptr().add(i0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let kv = k / 8 * 8;
        let mut pref = Prefetcher::<R>::new(pf, k, pf_lo, pf_hi, kv / 8);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < kv {
            if PF {
                pref.step();
            }
            // SAFETY: kk + 8 <= kv <= k and r < R, c < C, so every load reads
            // inside row j0+r of w / row i0+c of x (checked by check_tile).
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                wv[r] = _mm256_loadu_ps(wp.add(r * k + kk));
            }
            for c in 0..C {
                let xv = _mm256_loadu_ps(xp.add(c * k + kk));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
            kk += 8;
        }
        let mut sums = [[0f32; C]; R];
        if R * C == 8 {
            // Reduce 8 accumulators to one vector of 8 sums (flat index r*C+c).
            let a: [__m256; 8] = core::array::from_fn(|i| acc[i / C][i % C]);
            let h0 = _mm256_hadd_ps(a[0], a[1]);
            let h1 = _mm256_hadd_ps(a[2], a[3]);
            let h2 = _mm256_hadd_ps(a[4], a[5]);
            let h3 = _mm256_hadd_ps(a[6], a[7]);
            let g0 = _mm256_hadd_ps(h0, h1); // 128-bit halves: partial sums of a0..a3
            let g1 = _mm256_hadd_ps(h2, h3); // partial sums of a4..a7
            let s = _mm256_add_ps(
                _mm256_permute2f128_ps(g0, g1, 0x20),
                _mm256_permute2f128_ps(g0, g1, 0x31),
            );
            let mut flat = [0f32; 8];
            _mm256_storeu_ps(flat.as_mut_ptr(), s);
            for r in 0..R {
                for c in 0..C {
                    sums[r][c] = flat[r * C + c];
                }
            }
        } else {
            for r in 0..R {
                for c in 0..C {
                    sums[r][c] = hsum(acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let mut s = sums[r][c];
                for t in kv..k {
                    s += w[(j0 + r) * k + t] * x[(i0 + c) * k + t];
                }
                out.write(i0 + c, j0 + r, &[s]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{check_tile, OutCols, Prefetcher};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        x: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        mut out: OutCols<'_>,
    ) {
        // 4×4 tile: 16 accumulators + 4 weight vectors + 1 x vector = 21 of 32 zmm.
        tiled_block!(tile, 4, 4, x, m, w, n, k, out);
    }

    /// Sums four 16-lane vectors; 128-bit lane L of the result holds 4 partial
    /// sums of input L.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m512 {
        let ab = _mm512_add_ps(
            _mm512_shuffle_f32x4(a, b, 0x44),
            _mm512_shuffle_f32x4(a, b, 0xEE),
        );
        let cd = _mm512_add_ps(
            _mm512_shuffle_f32x4(c, d, 0x44),
            _mm512_shuffle_f32x4(c, d, 0xEE),
        );
        _mm512_add_ps(
            _mm512_shuffle_f32x4(ab, cd, 0x88),
            _mm512_shuffle_f32x4(ab, cd, 0xDD),
        )
    }

    /// # Safety
    /// The CPU must support AVX-512F. Bounds are asserted on entry.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const C: usize, const PF: bool>(
        x: &[f32],
        i0: usize,
        w: &[f32],
        j0: usize,
        k: usize,
        m: usize,
        out: &mut OutCols<'_>,
        pf: *const f32,
        pf_lo: usize,
        pf_hi: usize,
    ) {
        check_tile(x, i0, w, j0, k, m, out, R, C);
        let xp = x.as_ptr().add(i0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let kv = k / 16 * 16;
        let mut pref = Prefetcher::<R>::new(pf, k, pf_lo, pf_hi, kv / 16);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < kv {
            if PF {
                pref.step();
            }
            // SAFETY: kk + 16 <= kv <= k and r < R, c < C, so every load reads
            // inside row j0+r of w / row i0+c of x (checked by check_tile).
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = _mm512_loadu_ps(wp.add(r * k + kk));
            }
            for c in 0..C {
                let xv = _mm512_loadu_ps(xp.add(c * k + kk));
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
            kk += 16;
        }
        if kv < k {
            // SAFETY: the mask enables lanes 0..k-kv only, i.e. offsets kv..k of
            // each row; masked-off lanes are not accessed (no fault).
            let mask: __mmask16 = ((1u32 << (k - kv)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = _mm512_maskz_loadu_ps(mask, wp.add(r * k + kv));
            }
            for c in 0..C {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(c * k + kv));
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
        }
        if R == 4 && C == 4 {
            // s[r]: 128-bit lane c holds partial sums of acc[r][c].
            let s: [__m512; 4] =
                core::array::from_fn(|r| reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
            // Within each 128-bit lane c, fold to [Σ s0, Σ s1, Σ s2, Σ s3].
            let t01 = _mm512_add_ps(
                _mm512_unpacklo_ps(s[0], s[1]),
                _mm512_unpackhi_ps(s[0], s[1]),
            );
            let t23 = _mm512_add_ps(
                _mm512_unpacklo_ps(s[2], s[3]),
                _mm512_unpackhi_ps(s[2], s[3]),
            );
            let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(
                _mm512_castps_pd(t01),
                _mm512_castps_pd(t23),
            ));
            let hi = _mm512_castpd_ps(_mm512_unpackhi_pd(
                _mm512_castps_pd(t01),
                _mm512_castps_pd(t23),
            ));
            let v = _mm512_add_ps(lo, hi); // element c*4 + r = Σ acc[r][c]
            let mut flat = [0f32; 16];
            _mm512_storeu_ps(flat.as_mut_ptr(), v);
            for c in 0..C {
                out.write(i0 + c, j0, &flat[c * 4..c * 4 + 4]);
            }
        } else {
            for r in 0..R {
                for c in 0..C {
                    out.write(i0 + c, j0 + r, &[_mm512_reduce_add_ps(acc[r][c])]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic xorshift generator, values in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        // Returns the f64 result and Σ|x·w| per entry (scale for the tolerance).
        let mut y = vec![0f64; m * n];
        let mut s = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut a, mut b) = (0f64, 0f64);
                for t in 0..k {
                    let p = x[i * k + t] as f64 * w[j * k + t] as f64;
                    a += p;
                    b += p.abs();
                }
                y[i * n + j] = a;
                s[i * n + j] = b;
            }
        }
        (y, s)
    }

    fn isas() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    fn check(m: usize, n: usize, k: usize, seed: u64) {
        let mut rng = Rng(seed | 1);
        let x = rng.vec(m * k);
        let w = rng.vec(n * k);
        let (want, scale) = naive(&x, m, &w, n, k);
        for isa in isas() {
            let mut y = vec![f32::NAN; m * n];
            matmul_xwt_with(isa, &x, m, &w, n, k, &mut y);
            for idx in 0..m * n {
                let err = (y[idx] as f64 - want[idx]).abs();
                // 1e-4 relative to the magnitude of the terms summed (plain
                // relative error is meaningless when the sum cancels to ~0).
                let tol = 1e-4 * scale[idx].max(want[idx].abs()).max(1e-30);
                assert!(
                    err <= tol,
                    "{isa:?} m={m} n={n} k={k} idx={idx}: got {} want {} (err {err:e}, tol {tol:e})",
                    y[idx],
                    want[idx]
                );
            }
        }
    }

    #[test]
    fn all_paths_match_naive() {
        let ms = [1, 2, 3, 5, 8, 16, 17, 64];
        let ks = [1, 7, 64, 576, 1000];
        let ns = [1, 3, 5, 13, 37];
        let mut seed = 12345u64;
        for &m in &ms {
            for &k in &ks {
                for &n in &ns {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    check(m, n, k, seed);
                }
            }
        }
    }

    #[test]
    fn parallel_sizes_match_naive() {
        // Large enough (n·k ≥ PAR_MIN_WORK) to take the parallel path with a ragged last block.
        for &(m, n, k) in &[
            (1, 203, 576),
            (1, 3643, 577),
            (3, 130, 1000),
            (16, 301, 576),
            (17, 77, 1536),
            (64, 45, 1536),
            (5, 999, 64),
        ] {
            check(m, n, k, (m * 1000 + n) as u64);
        }
    }

    #[test]
    fn edge_cases() {
        let mut y = vec![1.0f32; 6];
        matmul_xwt(&[], 2, &[], 3, 0, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
        matmul_xwt(&[], 0, &[1.0; 6], 3, 2, &mut []);
        matmul_xwt(&[1.0; 4], 2, &[], 0, 2, &mut []);
    }

    #[test]
    #[should_panic]
    fn mismatched_lengths_panic() {
        let mut y = vec![0f32; 4];
        matmul_xwt(&[0.0; 6], 2, &[0.0; 6], 2, 4, &mut y);
    }
}
