//! Half-precision weights: `y (m×n) = x (m×k) · wᵀ` with `w` stored `n×k`
//! row-major in f16 or bf16 ([`Half`]) and `x`, `y` and every sum in f32.
//!
//! A weight stays in its 16 bits in memory, so a decode step streams half
//! the bytes of f32 weights; each vector of weights is widened to f32 in
//! registers (F16C's `vcvtph2ps` for f16, a 16-bit shift for bf16) right
//! before its FMA. Activations are not rounded to 16 bits (llama.cpp rounds
//! them to f16 for its f16 matmul), so the only rounding is the weights'.
//!
//! Work is split like [`crate::cpu::skinny`]'s: blocks of weight rows over
//! the current compute pool. A single activation row (decode) reads one
//! weight row after another, one sequential stream, which measured faster
//! than interleaving four rows, and asks for the lines
//! [`crate::cpu::prefetch::distance`] bytes ahead of each row; two or three
//! rows run register tiles of 4 weight rows × 2 activation rows (scalar 4×1),
//! with 1-wide tiles for the ragged edges; four or more widen blocks of
//! weight rows to f32 for `skinny`'s tiles. The SIMD path is AVX2 with FMA and F16C, chosen at run
//! time through [`crate::cpu::features`] (an AVX-512 CPU runs it too: the
//! loads are bound by memory, and the many-row products run `skinny`'s
//! AVX-512 tiles); every path is tested against an f64 reference; the scalar path
//! ([`matmul_xwt_scalar`]) is the portable one. The SIMD paths sum in a
//! different order from the scalar one, so they agree with it to rounding,
//! not bit for bit (as the f32 kernel's paths do).

// Index loops over the const tile dimensions read best as written.
#![allow(clippy::needless_range_loop)]

use crate::cpu::out::OutCols;
use crate::cpu::skinny::{detect_isa, par_cols, Isa};

/// A 16-bit floating-point weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Half {
    /// IEEE 754 binary16 (5-bit exponent, 10-bit mantissa).
    F16,
    /// bfloat16: the top half of an f32 (8-bit exponent, 7-bit mantissa).
    Bf16,
}

impl Half {
    /// The value of `bits`, exactly.
    #[inline]
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }

    /// `v` rounded to the nearest representable value (ties to even).
    #[inline]
    pub fn from_f32(self, v: f32) -> u16 {
        match self {
            Half::F16 => half::f16::from_f32(v).to_bits(),
            Half::Bf16 => half::bf16::from_f32(v).to_bits(),
        }
    }

    /// Its name ("f16", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }
}

/// Below this many weight elements (n·k) everything runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;
/// The same for m = 1 (a gemv of 512 KB): measured on two EPYC cores, the
/// reference model's matrices decode faster split from this size on.
const PAR_MIN_WORK_GEMV: usize = 1 << 18;
/// From this many activation rows on, the SIMD paths widen weight rows to
/// f32 once, a block at a time, and run [`crate::cpu::skinny`]'s tiles
/// over them, rather than widening every weight again for each tile.
const WIDEN_MIN_M: usize = 4;
/// f32 values of widened weight rows at a time (128 KB: in L2 with an
/// activation block).
const WIDEN_FLOATS: usize = 32 * 1024;
/// Activation rows multiplied with one widened block at a time, so that
/// they too stay in L2 while every weight row of the block meets them.
const X_ROWS: usize = 32;

/// `y (m×n) = x (m×k) · wᵀ` for `w` (`n×k`) in `kind`, on the current compute
/// pool, through the widest path this CPU has.
pub fn matmul_xwt(kind: Half, x: &[f32], m: usize, w: &[u16], n: usize, k: usize, y: &mut [f32]) {
    matmul_with(detect_isa(), kind, x, m, w, n, k, y)
}

/// [`matmul_xwt`] through the portable scalar path (the reference).
pub fn matmul_xwt_scalar(
    kind: Half,
    x: &[f32],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    matmul_with(Isa::Scalar, kind, x, m, w, n, k, y)
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    isa: Isa,
    kind: Half,
    x: &[f32],
    m: usize,
    w: &[u16],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
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
    par_cols(w, k, y, m, min_work, |wc, out| {
        block(isa, kind, x, m, wc, k, out)
    });
}

/// `y[:, col0..col0+cols] = x · wᵀ` (w holds `cols` rows) on this thread.
fn block(isa: Isa, kind: Half, x: &[f32], m: usize, w: &[u16], k: usize, out: OutCols<'_>) {
    debug_assert!(x.len() == m * k && w.len() == out.cols * k && out.m == m);
    let bf16 = kind == Half::Bf16;
    // Every SIMD path is the AVX2 one: features::enabled turns AVX-512 on
    // only with AVX2 (FMA, F16C), and these loads are bound by memory.
    let simd = isa != Isa::Scalar;
    #[cfg(target_arch = "x86_64")]
    if m == 1 && simd {
        // SAFETY: AVX2, FMA and F16C were detected (above); gemv checks its
        // bounds.
        unsafe {
            if bf16 {
                avx2::gemv::<true>(x, w, k, out)
            } else {
                avx2::gemv::<false>(x, w, k, out)
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if m >= WIDEN_MIN_M && simd {
        widened(kind, x, m, w, k, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2, FMA and F16C were detected (above); the tiles check
        // their bounds.
        unsafe {
            if bf16 {
                avx2::block::<true>(x, m, w, k, out)
            } else {
                avx2::block::<false>(x, m, w, k, out)
            }
        }
        return;
    }
    scalar::block(kind, x, m, w, k, out)
}

/// Many activation rows: widens a block of weight rows at a time to f32
/// (16 rows for up to 16 activation rows, else `WIDEN_FLOATS` values, 8 to
/// 64 rows) and multiplies it with the f32
/// kernel's tiles, `X_ROWS` activation rows at a time.
#[cfg(target_arch = "x86_64")]
fn widened(kind: Half, x: &[f32], m: usize, w: &[u16], k: usize, mut out: OutCols<'_>) {
    // Few activation rows reuse a block little: keep it small (in L1).
    let floats = if m <= 16 { 16 * k } else { WIDEN_FLOATS };
    let block_rows = (floats / k).clamp(8, 64) / 8 * 8;
    let mut buf = vec![0f32; block_rows * k];
    for (c, rows) in w.chunks(block_rows * k).enumerate() {
        let wide = &mut buf[..rows.len()];
        // SAFETY: the SIMD paths imply AVX2, FMA and F16C (see `block`).
        unsafe {
            match kind {
                Half::F16 => avx2::widen::<false>(rows, wide),
                Half::Bf16 => avx2::widen::<true>(rows, wide),
            }
        }
        let n = rows.len() / k;
        let mut cols = out.sub(c * block_rows, n);
        for i0 in (0..m).step_by(X_ROWS) {
            let mb = X_ROWS.min(m - i0);
            let xb = &x[i0 * k..(i0 + mb) * k];
            crate::cpu::skinny::block_detected(xb, mb, wide, k, cols.rows(i0, mb));
        }
    }
}

/// Runs `tile(r, c, i0, j0)` over an `m × n` output: `R × C` tiles, then
/// `R × 1` for the ragged rows of x, then `1 × C` and `1 × 1` for the ragged
/// rows of w. `R` and `C` are passed back so the caller can pick its
/// monomorphized kernel.
#[inline(always)]
fn for_tiles(
    m: usize,
    n: usize,
    (rr, cc): (usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    let (n_main, m_main) = (n / rr * rr, m / cc * cc);
    let mut j0 = 0;
    while j0 < n {
        let r = if j0 < n_main { rr } else { 1 };
        let mut i0 = 0;
        while i0 < m {
            let c = if i0 < m_main { cc } else { 1 };
            tile(r, c, i0, j0);
            i0 += c;
        }
        j0 += r;
    }
}

/// The bounds every tile asserts: rows `i0..i0+c` of x and `j0..j0+r` of w,
/// and their outputs, exist.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn check_tile(
    x: &[f32],
    i0: usize,
    w: &[u16],
    j0: usize,
    k: usize,
    out: &OutCols<'_>,
    r: usize,
    c: usize,
) {
    assert!(r >= 1 && c >= 1 && i0 + c <= out.m);
    assert!((i0 + c) * k <= x.len());
    assert!((j0 + r) * k <= w.len());
    assert!(j0 + r <= out.cols);
}

mod scalar {
    use super::{check_tile, for_tiles, Half, OutCols};

    pub(super) fn block(
        kind: Half,
        x: &[f32],
        m: usize,
        w: &[u16],
        k: usize,
        mut out: OutCols<'_>,
    ) {
        let n = out.cols;
        for_tiles(m, n, (4, 1), |r, c, i0, j0| match r {
            4 => tile::<4>(kind, x, i0, w, j0, k, &mut out, c),
            _ => tile::<1>(kind, x, i0, w, j0, k, &mut out, c),
        });
    }

    /// Eight partial sums per dot product, folded pairwise, then the tail.
    #[allow(clippy::too_many_arguments)]
    fn tile<const R: usize>(
        kind: Half,
        x: &[f32],
        i0: usize,
        w: &[u16],
        j0: usize,
        k: usize,
        out: &mut OutCols<'_>,
        c: usize,
    ) {
        check_tile(x, i0, w, j0, k, out, R, c);
        for r in 0..R {
            let wr = &w[(j0 + r) * k..(j0 + r + 1) * k];
            for ci in 0..c {
                let xr = &x[(i0 + ci) * k..(i0 + ci + 1) * k];
                let mut acc = [0f32; 8];
                let (wc, xc) = (wr.chunks_exact(8), xr.chunks_exact(8));
                let (wt, xt) = (wc.remainder(), xc.remainder());
                for (a, b) in wc.zip(xc) {
                    for l in 0..8 {
                        acc[l] += kind.to_f32(a[l]) * b[l];
                    }
                }
                let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                for (a, b) in wt.iter().zip(xt) {
                    s += kind.to_f32(*a) * b;
                }
                out.write(i0 + ci, j0 + r, &[s]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{check_tile, for_tiles, Half, OutCols};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block<const BF16: bool>(
        x: &[f32],
        m: usize,
        w: &[u16],
        k: usize,
        mut out: OutCols<'_>,
    ) {
        let n = out.cols;
        // 4×2: 8 accumulators + 4 weight vectors + 1 x vector of 16 ymm.
        for_tiles(m, n, (4, 2), |r, c, i0, j0| match (r, c) {
            (4, 2) => tile::<4, 2, BF16>(x, i0, w, j0, k, &mut out),
            (4, _) => tile::<4, 1, BF16>(x, i0, w, j0, k, &mut out),
            (_, 2) => tile::<1, 2, BF16>(x, i0, w, j0, k, &mut out),
            _ => tile::<1, 1, BF16>(x, i0, w, j0, k, &mut out),
        });
    }

    /// `y = w · x` for one activation row: each weight row in turn, one
    /// sequential stream (measured 15.5 GB/s against 11.2 for 4-row tiles
    /// on two EPYC cores).
    ///
    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv<const BF16: bool>(
        x: &[f32],
        w: &[u16],
        k: usize,
        mut out: OutCols<'_>,
    ) {
        assert!(out.m == 1 && x.len() == k && w.len() == out.cols * k);
        let dist = crate::cpu::prefetch::distance();
        for j in 0..out.cols {
            let row = &w[j * k..(j + 1) * k];
            crate::cpu::prefetch::ahead(row.as_ptr().cast::<u8>(), 2 * k, dist);
            let s = row_dot::<BF16>(x, row);
            out.write(0, j, &[s]);
        }
    }

    /// `dst = src` widened to f32.
    ///
    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen<const BF16: bool>(src: &[u16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let n8 = src.len() / 8 * 8;
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= len of both slices.
            _mm256_storeu_ps(dp.add(i), load8::<BF16>(sp.add(i)));
            i += 8;
        }
        let kind = if BF16 { Half::Bf16 } else { Half::F16 };
        for t in n8..src.len() {
            dst[t] = kind.to_f32(src[t]);
        }
    }

    /// One row's dot product with x, four accumulators over 32 values.
    ///
    /// # Safety
    /// AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn row_dot<const BF16: bool>(x: &[f32], w: &[u16]) -> f32 {
        let k = w.len().min(x.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let k32 = k / 32 * 32;
        let mut a = [_mm256_setzero_ps(); 4];
        let mut kk = 0;
        while kk < k32 {
            for u in 0..4 {
                let wv = load8::<BF16>(wp.add(kk + 8 * u));
                a[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(kk + 8 * u)), a[u]);
            }
            kk += 32;
        }
        while kk + 8 <= k {
            let wv = load8::<BF16>(wp.add(kk));
            a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(kk)), a[0]);
            kk += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ));
        let kind = if BF16 { Half::Bf16 } else { Half::F16 };
        for t in kk..k {
            s += kind.to_f32(w[t]) * x[t];
        }
        s
    }

    /// Eight weights at `p`, widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p..p+8` readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const BF16: bool>(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_cvtph_ps(h)
        }
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2, FMA and F16C. Bounds are asserted on entry.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize, const BF16: bool>(
        x: &[f32],
        i0: usize,
        w: &[u16],
        j0: usize,
        k: usize,
        out: &mut OutCols<'_>,
    ) {
        check_tile(x, i0, w, j0, k, out, R, C);
        let xp = x.as_ptr().add(i0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let kv = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < kv {
            // SAFETY: kk + 8 <= kv <= k, r < R, c < C: every load is inside
            // row j0+r of w or row i0+c of x (check_tile).
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                wv[r] = load8::<BF16>(wp.add(r * k + kk));
            }
            for c in 0..C {
                let xv = _mm256_loadu_ps(xp.add(c * k + kk));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
            kk += 8;
        }
        let kind = if BF16 { Half::Bf16 } else { Half::F16 };
        for r in 0..R {
            for c in 0..C {
                let mut s = hsum(acc[r][c]);
                for t in kv..k {
                    s += kind.to_f32(w[(j0 + r) * k + t]) * x[(i0 + c) * k + t];
                }
                out.write(i0 + c, j0 + r, &[s]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::Rng;

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::features::{enabled, Feature};
            if enabled(Feature::Avx2) {
                v.push(Isa::Avx2);
            }
            if enabled(Feature::Avx512) {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Every path against an f64 product of the rounded weights: within
    /// f32 rounding of the sum of |x·w|.
    fn check(kind: Half, m: usize, n: usize, k: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
        let w: Vec<u16> = (0..n * k).map(|_| kind.from_f32(rng.f32() * 2.0)).collect();
        for isa in isas() {
            let mut y = vec![f32::NAN; m * n];
            matmul_with(isa, kind, &x, m, &w, n, k, &mut y);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for t in 0..k {
                        let p = x[i * k + t] as f64 * kind.to_f32(w[j * k + t]) as f64;
                        want += p;
                        mag += p.abs();
                    }
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "{isa:?} {kind:?} m={m} n={n} k={k} ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_path_matches_an_f64_reference_on_random_and_edge_shapes() {
        for kind in [Half::F16, Half::Bf16] {
            for (m, n, k) in [
                (1, 1, 1),
                (1, 5, 7),
                (1, 8, 16),
                (2, 9, 33),
                (3, 13, 100),
                (4, 4, 64),
                (5, 17, 255),
                (7, 31, 513),
                (16, 64, 576),
            ] {
                check(kind, m, n, k, (m * 1000 + n * 10 + k) as u64);
            }
        }
    }

    #[test]
    fn large_products_split_over_the_pool_equal_one_thread() {
        let (m, n, k) = (1, 4096, 1024);
        let mut rng = Rng::new(99);
        let x: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
        for kind in [Half::F16, Half::Bf16] {
            let w: Vec<u16> = (0..n * k).map(|_| kind.from_f32(rng.f32())).collect();
            let mut par = vec![0f32; m * n];
            let pool = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 3).expect("pool"));
            crate::cpu::pool::enter(&pool, || matmul_xwt(kind, &x, m, &w, n, k, &mut par));
            let mut one = vec![0f32; m * n];
            block(
                detect_isa(),
                kind,
                &x,
                m,
                &w,
                k,
                OutCols::new(&mut one, m, n, 0, n),
            );
            assert_eq!(par, one, "{kind:?}: the split changes no sum");
        }
    }

    #[test]
    fn conversions_round_to_nearest_and_widen_exactly() {
        for kind in [Half::F16, Half::Bf16] {
            for v in [0.0f32, -0.0, 1.0, -2.5, 65504.0, 1e-3, 3.140625] {
                let bits = kind.from_f32(v);
                let back = kind.to_f32(bits);
                assert_eq!(kind.from_f32(back), bits, "{kind:?} {v}");
                assert!(
                    (back - v).abs() <= v.abs() * 2f32.powi(-7),
                    "{kind:?} {v} → {back}"
                );
            }
        }
        assert_eq!(Half::Bf16.to_f32(0x3f80), 1.0);
        assert_eq!(Half::F16.to_f32(0x3c00), 1.0);
    }
}
