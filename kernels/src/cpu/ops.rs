//! Element-wise and per-row operations of a Llama block: RMSNorm, `silu(gate)·up`
//! and rotary embeddings, on plain row-major `f32` slices.
//!
//! Owns: [`rms_norm`], [`silu_mul`], [`rope`] (each with an AVX2 path chosen at
//! run time and a `*_scalar` reference that every other path is tested
//! against), [`rope_neox`] (GPT-NeoX's pairing, scalar), and the AVX2 `exp`
//! the attention kernel shares.
//!
//! What is true of every path:
//!
//! * [`rope`] is bit-identical to [`rope_scalar`]: the same two rounded
//!   products and one rounded sum or difference per element.
//! * [`rms_norm`] sums the squares in 8-lane vector order instead of one
//!   sequential sum; the scale is then computed by the same scalar expression
//!   and applied as `(x·scale)·w`, so outputs differ from [`rms_norm_scalar`]
//!   only through the sum: `|Δ| ≤ 1e-6·|ref| + 1e-30` on the tested data (the
//!   two summation orders' rounding errors are each below `width·2⁻²⁴` of the
//!   sum, a relative change of half that in `scale`).
//! * [`silu_mul`] evaluates `g / (1 + e^(−g)) · u` in the scalar order with a
//!   vector `e^x` (range reduction to `|r| ≤ ln2/2`, degree-7 Taylor
//!   polynomial, whose truncation error is below 6e-9): within 2⁻²² relative
//!   of the correctly rounded `e^x` for normal results, subnormal results
//!   kept, `+∞` above `ln(f32::MAX)`, NaN propagated. The product is then
//!   within 1e-6 relative of [`silu_mul_scalar`] (`+ 1e-30` absolute).
//! * The AVX2 paths need AVX2 and FMA; there is no AVX-512 path (these are
//!   memory-bound one-pass loops over a few KB, already far below the matmuls).

// Index loops over const lane counts read best as written.
#![allow(clippy::needless_range_loop)]

/// RMSNorm of each `width`-wide row of `x` into `out`, `width = weight.len()`:
/// `x / sqrt(mean(x²) + eps) · weight` (Zhang & Sennrich 2019), the mean taken
/// in f32 as llama.cpp does.
///
/// # Panics
/// If `x` and `out` differ in length or are not whole rows.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    check_rows(x.len(), out.len(), weight.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected just above.
        unsafe { avx2::rms_norm(x, weight, eps, out) };
        return;
    }
    rms_norm_scalar(x, weight, eps, out)
}

/// The reference [`rms_norm`]: one sequential sum of squares per row.
pub fn rms_norm_scalar(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((d, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * scale * w;
        }
    }
}

/// `silu(gate) · up = gate / (1 + e^(−gate)) · up` for rows laid out as
/// `[gate (width) | up (width)]`, into `width`-wide rows of `out`.
///
/// # Panics
/// If `gate_up` is not whole `2·width` rows or `out` does not hold one
/// `width` row per row of `gate_up`.
pub fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
    assert!(
        width > 0 && gate_up.len().is_multiple_of(2 * width),
        "gate_up must be whole [gate | up] rows"
    );
    assert_eq!(
        out.len() * 2,
        gate_up.len(),
        "out must be one width row per row"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected just above.
        unsafe { avx2::silu_mul(gate_up, width, out) };
        return;
    }
    silu_mul_scalar(gate_up, width, out)
}

/// The reference [`silu_mul`], with the C library's `exp`.
pub fn silu_mul_scalar(gate_up: &[f32], width: usize, out: &mut [f32]) {
    for (row, dst) in gate_up
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (gate, up) = row.split_at(width);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Rotary embedding (Su et al. 2021) of every `2·cos.len()`-wide head in
/// `heads`, in llama.cpp's "normal" convention: pairs are adjacent elements
/// `(2i, 2i+1)`, rotated by the angle whose cosine and sine are `cos[i]`,
/// `sin[i]`: `(a, b) ↦ (a·c − b·s, a·s + b·c)`.
///
/// # Panics
/// If `cos` and `sin` differ in length or `heads` is not whole heads.
pub fn rope(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    assert_eq!(cos.len(), sin.len(), "one sine per cosine");
    assert!(
        !cos.is_empty() && heads.len().is_multiple_of(2 * cos.len()),
        "heads must be whole 2·cos.len() heads"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected just above.
        unsafe { avx2::rope(heads, cos, sin) };
        return;
    }
    rope_scalar(heads, cos, sin)
}

/// [`rope`] with GPT-NeoX's pairing: element `i` of each head with element
/// `i + cos.len()` (the halves), rotated by the same angles. Scalar: the
/// halves are contiguous, so the compiler vectorizes it, and it is a few
/// hundred values per token.
pub fn rope_neox(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    assert_eq!(cos.len(), sin.len(), "one sine per cosine");
    assert!(
        !cos.is_empty() && heads.len().is_multiple_of(2 * cos.len()),
        "heads must be whole 2·cos.len() heads"
    );
    for head in heads.chunks_exact_mut(2 * cos.len()) {
        let (lo, hi) = head.split_at_mut(cos.len());
        for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = x * s + y * c;
        }
    }
}

/// The reference [`rope`].
pub fn rope_scalar(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in heads.chunks_exact_mut(2 * cos.len()) {
        rope_pairs(head, cos, sin);
    }
}

#[inline(always)]
fn rope_pairs(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

fn check_rows(x: usize, out: usize, width: usize) {
    assert!(width > 0, "rows must be at least one element wide");
    assert_eq!(x, out, "x and out must have the same length");
    assert!(x.is_multiple_of(width), "x must be whole rows");
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    crate::cpu::features::enabled(crate::cpu::features::Feature::Avx2)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The AVX2+FMA paths. Helpers are `#[inline(always)]` without target
    //! features of their own; they become AVX2 code inside the
    //! `#[target_feature]` entry points.

    use std::arch::x86_64::*;

    /// Horizontal sum `((x0+x4)+(x2+x6)) + ((x1+x5)+(x3+x7))`.
    #[inline(always)]
    pub(crate) unsafe fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Below this, e^x rounds to 0 in f32; the clamp keeps 2^n finite.
    pub(crate) const EXP_LO: f32 = -104.0;
    /// The largest f32 whose e^x is finite (the next one is above ln f32::MAX).
    pub(crate) const EXP_HI: f32 = f32::from_bits(0x42B1_7217);
    /// ln 2 split so that n·LN2_HI is exact for |n| < 2^11.
    pub(crate) const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
    /// The rest of ln 2.
    pub(crate) const LN2_LO: f32 = (std::f64::consts::LN_2 - 0.693_145_751_953_125) as f32;
    /// e^r for |r| ≤ ln2/2: its Taylor polynomial to r^7, Horner's
    /// coefficients after the leading 1/7!.
    pub(crate) const EXP_POLY: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];

    /// `e^x` per lane; accuracy in the module docs.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        const LO: f32 = EXP_LO;
        const HI: f32 = EXP_HI;
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), xc);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        // e^r, |r| ≤ ln2/2, by its Taylor polynomial to r^7 (Horner).
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in EXP_POLY {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // 2^n as 2^(n/2)·2^(n−n/2): both factors normal for n in [-150, 128].
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32(ni, 1);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
        let p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
        let y = _mm256_mul_ps(_mm256_mul_ps(p, p1), p2);
        let over = _mm256_cmp_ps(x, _mm256_set1_ps(HI), _CMP_GT_OQ);
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
        let nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
        _mm256_blendv_ps(y, x, nan)
    }

    /// Vector `e^x` over a slice in place (tests and benchmarks).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp_slice(x: &mut [f32]) {
        for c in x.chunks_mut(8) {
            let mut t = [0f32; 8];
            t[..c.len()].copy_from_slice(c);
            // SAFETY: t is 8 floats.
            let e = unsafe { exp(_mm256_loadu_ps(t.as_ptr())) };
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(t.as_mut_ptr(), e) };
            c.copy_from_slice(&t[..c.len()]);
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; rows are checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let width = weight.len();
        let main = width / 8 * 8;
        for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let (xp, dp, wp) = (row.as_ptr(), dst.as_mut_ptr(), weight.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= main {
                for j in 0..4 {
                    // SAFETY: i + 8j + 8 ≤ i + 32 ≤ main ≤ width = row.len().
                    let v = unsafe { _mm256_loadu_ps(xp.add(i + 8 * j)) };
                    acc[j] = _mm256_fmadd_ps(v, v, acc[j]);
                }
                i += 32;
            }
            while i < main {
                // SAFETY: i + 8 ≤ main ≤ width = row.len().
                let v = unsafe { _mm256_loadu_ps(xp.add(i)) };
                acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
                i += 8;
            }
            let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            // SAFETY: plain register arithmetic under the enabled features.
            let mut sum = unsafe { hsum(a) };
            for &v in &row[main..] {
                sum += v * v;
            }
            let scale = 1.0 / (sum / width as f32 + eps).sqrt();
            let sv = _mm256_set1_ps(scale);
            let mut i = 0;
            while i < main {
                // SAFETY: i + 8 ≤ main ≤ width, the length of row, dst and weight.
                unsafe {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i)), sv);
                    _mm256_storeu_ps(dp.add(i), _mm256_mul_ps(v, _mm256_loadu_ps(wp.add(i))));
                }
                i += 8;
            }
            for k in main..width {
                dst[k] = row[k] * scale * weight[k];
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; shapes are checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
        let main = width / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        for (row, dst) in gate_up
            .chunks_exact(2 * width)
            .zip(out.chunks_exact_mut(width))
        {
            let (gp, up, dp) = (row.as_ptr(), row[width..].as_ptr(), dst.as_mut_ptr());
            let mut i = 0;
            while i < main {
                // SAFETY: i + 8 ≤ main ≤ width; gate, up and dst each hold width floats.
                unsafe {
                    let g = _mm256_loadu_ps(gp.add(i));
                    let e = exp(_mm256_sub_ps(zero, g));
                    let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                    _mm256_storeu_ps(dp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up.add(i))));
                }
                i += 8;
            }
            let (gate, upr) = row.split_at(width);
            for k in main..width {
                let g = gate[k];
                dst[k] = g / (1.0 + (-g).exp()) * upr[k];
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; shapes are checked by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rope(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        let main = half / 4 * 4;
        for head in heads.chunks_exact_mut(2 * half) {
            let hp = head.as_mut_ptr();
            let mut i = 0;
            while i < main {
                // SAFETY: i + 4 ≤ main ≤ half = cos.len() = sin.len(), and
                // 2i + 8 ≤ 2·half = head.len().
                unsafe {
                    let c = _mm_loadu_ps(cos.as_ptr().add(i));
                    let s = _mm_loadu_ps(sin.as_ptr().add(i));
                    // [c0 c0 c1 c1 | c2 c2 c3 c3], the same for s.
                    let cd = _mm256_set_m128(_mm_unpackhi_ps(c, c), _mm_unpacklo_ps(c, c));
                    let sd = _mm256_set_m128(_mm_unpackhi_ps(s, s), _mm_unpacklo_ps(s, s));
                    let x = _mm256_loadu_ps(hp.add(2 * i));
                    // [b0 a0 b1 a1 ...]
                    let xs = _mm256_permute_ps(x, 0b10_11_00_01);
                    // even lanes a·c − b·s, odd lanes b·c + a·s.
                    let y = _mm256_addsub_ps(_mm256_mul_ps(x, cd), _mm256_mul_ps(xs, sd));
                    _mm256_storeu_ps(hp.add(2 * i), y);
                }
                i += 4;
            }
            super::rope_pairs(&mut head[2 * main..], &cos[main..], &sin[main..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::Rng;

    fn close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + 1e-30 || (g.is_nan() && w.is_nan()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_scalar() {
        let mut rng = Rng::new(1);
        for width in [1, 7, 8, 31, 64, 100, 576, 1536] {
            let rows = rng.range(1, 4);
            let scale = [1e-3, 1.0, 300.0][rng.range(0, 2)];
            let x = rng.f32s(rows * width, scale);
            let w = rng.f32s(width, 2.0);
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            rms_norm(&x, &w, 1e-5, &mut a);
            rms_norm_scalar(&x, &w, 1e-5, &mut b);
            close(&a, &b, 1e-6, &format!("rms_norm width {width}"));
        }
    }

    #[test]
    fn silu_mul_matches_scalar() {
        let mut rng = Rng::new(2);
        for width in [1, 5, 8, 13, 64, 576, 1536] {
            let rows = rng.range(1, 3);
            let mut gu = rng.f32s(rows * 2 * width, 12.0);
            // The edges: overflow of e^(−g), subnormal and zero results, NaN.
            let edges = [
                -120.0, -100.0, -89.0, -88.7, -87.5, -20.0, 0.0, 20.0, 95.0, 120.0,
            ];
            for (k, &e) in edges.iter().enumerate().take(width) {
                gu[k] = e;
            }
            let mut a = vec![0f32; rows * width];
            let mut b = vec![0f32; rows * width];
            silu_mul(&gu, width, &mut a);
            silu_mul_scalar(&gu, width, &mut b);
            close(&a, &b, 1e-6, &format!("silu_mul width {width}"));
        }
        let gu = [f32::NAN, 1.0];
        let mut a = [0f32];
        silu_mul(&gu, 1, &mut a);
        assert!(a[0].is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp_of_exact() {
        if !has_avx2() {
            return;
        }
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| -110.0 + 200.0 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 88.72283, 88.722_84, 89.0, -87.33, -103.9, -104.0]);
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]);
        let mut got = xs.clone();
        // SAFETY: AVX2 and FMA detected above.
        unsafe { avx2::exp_slice(&mut got) };
        for (&x, &g) in xs.iter().zip(&got) {
            let exact = (x as f64).exp();
            let want = exact as f32;
            let ok = if want.is_infinite() || want == 0.0 {
                g == want || (want == 0.0 && g.abs() <= f32::from_bits(1))
            } else {
                ((g as f64) - exact).abs() <= exact * (1.0 / (1 << 22) as f64) + 1.5e-45
            };
            assert!(ok, "exp({x}) = {g}, want {want}");
        }
        let mut nan = [f32::NAN; 8];
        // SAFETY: as above.
        unsafe { avx2::exp_slice(&mut nan) };
        assert!(nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn rope_is_bit_identical_to_scalar() {
        let mut rng = Rng::new(3);
        for half in [1, 3, 4, 5, 16, 32, 64] {
            let heads = rng.range(1, 12);
            let x = rng.f32s(heads * 2 * half, 4.0);
            let angles: Vec<f32> = (0..half).map(|_| rng.f32() * 100.0).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let (mut a, mut b) = (x.clone(), x);
            rope(&mut a, &cos, &sin);
            rope_scalar(&mut b, &cos, &sin);
            assert_eq!(a, b, "half {half}");
        }
    }

    #[test]
    fn neox_rope_is_the_normal_rope_of_the_halves_interleaved() {
        let mut rng = Rng::new(5);
        for half in [1, 3, 8, 64] {
            let heads = rng.range(1, 5);
            let x = rng.f32s(heads * 2 * half, 4.0);
            let angles: Vec<f32> = (0..half).map(|_| rng.f32() * 100.0).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            // (i, i + half) → (2i, 2i + 1): the same rotation of the same pairs.
            let interleave = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(2 * half)
                    .flat_map(|h| (0..half).flat_map(move |i| [h[i], h[i + half]]))
                    .collect()
            };
            let mut neox = x.clone();
            rope_neox(&mut neox, &cos, &sin);
            let mut normal = interleave(&x);
            rope_scalar(&mut normal, &cos, &sin);
            assert_eq!(interleave(&neox), normal, "half {half}");
        }
    }

    /// Quick timings against the scalar references:
    /// `cargo test --release -p parallm-kernels -- --ignored --nocapture ops_timing`.
    #[test]
    #[ignore = "a timing, not a check: cargo test --release -p parallm-kernels ops_timing -- --ignored --nocapture"]
    fn ops_timing() {
        use std::time::Instant;
        fn time(mut f: impl FnMut()) -> f64 {
            for _ in 0..100 {
                f();
            }
            let iters = 20_000;
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / iters as f64
        }
        let mut rng = Rng::new(4);
        for width in [576, 1536] {
            let x = rng.f32s(width, 1.0);
            let w = rng.f32s(width, 1.0);
            let gu = rng.f32s(2 * width, 4.0);
            let mut o = vec![0f32; width];
            let a = time(|| rms_norm_scalar(std::hint::black_box(&x), &w, 1e-5, &mut o));
            let b = time(|| rms_norm(std::hint::black_box(&x), &w, 1e-5, &mut o));
            println!("rms_norm width {width}: scalar {a:.3} µs, dispatched {b:.3} µs");
            let a = time(|| silu_mul_scalar(std::hint::black_box(&gu), width, &mut o));
            let b = time(|| silu_mul(std::hint::black_box(&gu), width, &mut o));
            println!("silu_mul width {width}: scalar {a:.3} µs, dispatched {b:.3} µs");
        }
        // One token's q|k heads of the reference model: 12 heads of 64.
        let mut h = rng.f32s(12 * 64, 1.0);
        let cos = rng.f32s(32, 1.0);
        let sin = rng.f32s(32, 1.0);
        let a = time(|| rope_scalar(std::hint::black_box(&mut h), &cos, &sin));
        let b = time(|| rope(std::hint::black_box(&mut h), &cos, &sin));
        println!("rope 12×64: scalar {a:.3} µs, dispatched {b:.3} µs");
    }
}
