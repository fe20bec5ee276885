//! 512-bit kernels for the 32-wide formats Q4_0, Q4_1 and Q8_0 (AVX-512 F+BW,
//! with or without VNNI); the K formats and Q5_0/Q5_1 run the 256-bit
//! kernels of the AVX2 module compiled with these paths' features.
//!
//! A zmm holds one group of 4 activation blocks in their stored order (first
//! halves of A..D, then second halves) and, for Q4, the 4 blocks' 64 nibble
//! bytes as `[A | B | C | D]` whose low and high nibbles match the two
//! halves. A group of 8 blocks is 2 such dot products (each lane quarter = 4
//! partial sums of one block), reduced with lane shuffles to the same vector
//! of 8 exact block sums the 256-bit kernels produce, after which the float
//! part ([`super::avx2::finish_group`]) is shared — so the results equal the
//! scalar reference bit for bit. AVX-512 has no `vpsignb`, so without VNNI
//! Q8_0 negates the activations under a mask where the weight is negative.

use std::arch::x86_64::*;

use super::acts::ActRow;
use super::avx2::{
    bias_shift, finish_group, hsum_ps, lane_mask, row32, scales8, Dot256, Fmt32, Maddubs, Vnni256,
    FQ4_0, FQ4_1, FQ5_0, FQ5_1, FQ8_0, K32, KQ23K, KQ45K, KQ6K,
};
use super::formats::QuantFormat;
use super::{drive_kernel, Job, OutCols, RowKernel};

/// Integer dot-product primitives on 512-bit vectors.
trait Dot512 {
    /// The 256-bit primitives of the same path (K formats).
    type D256: Dot256;
    /// As [`Dot256::S8_BIAS_SHIFT`].
    const S8_BIAS_SHIFT: i32;

    /// As [`Dot256::dot2_nib`], 16 lanes.
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn dot2_nib(u0: __m512i, a0: __m512i, u1: __m512i, a1: __m512i) -> __m512i;

    /// As [`Dot256::prep_s8`].
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn prep_s8(q: __m512i) -> __m512i;

    /// As [`Dot256::dot2_s8`], 16 lanes.
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn dot2_s8(
        p0: __m512i,
        q0: __m512i,
        a0: __m512i,
        p1: __m512i,
        q1: __m512i,
        a1: __m512i,
    ) -> __m512i;
}

/// AVX-512BW `vpmaddubsw zmm` + `vpmaddwd zmm`.
struct Maddubs512;

impl Maddubs512 {
    /// `dot(|q|, ±a)`: `a` negated where `q < 0` (|a| <= 127, so −a fits;
    /// where q == 0 the weight |q| is 0 anyway).
    ///
    /// # Safety
    /// AVX-512BW.
    #[inline(always)]
    unsafe fn dot_s8(p: __m512i, q: __m512i, a: __m512i) -> __m512i {
        let neg = _mm512_movepi8_mask(q);
        let sa = _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a);
        _mm512_madd_epi16(_mm512_maddubs_epi16(p, sa), _mm512_set1_epi16(1))
    }
}

impl Dot512 for Maddubs512 {
    type D256 = Maddubs;
    const S8_BIAS_SHIFT: i32 = 0;

    #[inline(always)]
    unsafe fn dot2_nib(u0: __m512i, a0: __m512i, u1: __m512i, a1: __m512i) -> __m512i {
        // Each i16 pair sum is at most 2·15·127, so two of them add in i16.
        let p = _mm512_add_epi16(_mm512_maddubs_epi16(u0, a0), _mm512_maddubs_epi16(u1, a1));
        _mm512_madd_epi16(p, _mm512_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn prep_s8(q: __m512i) -> __m512i {
        _mm512_abs_epi8(q)
    }

    #[inline(always)]
    unsafe fn dot2_s8(
        p0: __m512i,
        q0: __m512i,
        a0: __m512i,
        p1: __m512i,
        q1: __m512i,
        a1: __m512i,
    ) -> __m512i {
        _mm512_add_epi32(Self::dot_s8(p0, q0, a0), Self::dot_s8(p1, q1, a1))
    }
}

/// AVX-512 VNNI `vpdpbusd zmm`.
struct Vnni512;

impl Dot512 for Vnni512 {
    type D256 = Vnni256;
    const S8_BIAS_SHIFT: i32 = 7;

    #[inline(always)]
    unsafe fn dot2_nib(u0: __m512i, a0: __m512i, u1: __m512i, a1: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, a0), u1, a1)
    }

    #[inline(always)]
    unsafe fn prep_s8(q: __m512i) -> __m512i {
        _mm512_xor_si512(q, _mm512_set1_epi8(-128))
    }

    #[inline(always)]
    unsafe fn dot2_s8(
        p0: __m512i,
        _q0: __m512i,
        a0: __m512i,
        p1: __m512i,
        _q1: __m512i,
        a1: __m512i,
    ) -> __m512i {
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), p0, a0), p1, a1)
    }
}

/// 8 lanes: lane `j` = the sum of block `j`, where lane quarter `r` of `z[0]`
/// holds 4 partial sums of block `r` and of `z[1]` of block `4 + r`.
///
/// # Safety
/// AVX-512F.
#[inline(always)]
unsafe fn reduce2x4(z: &[__m512i; 2]) -> __m256i {
    // Quarter r: [x0+x2, y0+y2, x1+x3, y1+y3] with x = block r, y = block 4+r.
    let t = _mm512_add_epi32(
        _mm512_unpacklo_epi32(z[0], z[1]),
        _mm512_unpackhi_epi32(z[0], z[1]),
    );
    // Quarter r, lanes 0 and 1: the sums of block r and block 4 + r.
    let u = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, u))
}

/// `[b(0)[0..16] | b(1)[0..16] | b(2)[0..16] | b(3)[0..16]]` with
/// `b(r) = p + r·stride`; blocks `n..4` are not read and give zeros.
///
/// # Safety
/// AVX-512F; the bytes read readable.
#[inline(always)]
unsafe fn load4x16<const FULL: bool>(p: *const u8, stride: usize, n: usize) -> __m512i {
    let ld = |r: usize| {
        if FULL || r < n {
            _mm_loadu_si128(p.add(r * stride) as *const __m128i)
        } else {
            _mm_setzero_si128()
        }
    };
    let lo = _mm256_set_m128i(ld(1), ld(0));
    let hi = _mm256_set_m128i(ld(3), ld(2));
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// One group of 8 blocks (`cnt` < 8 in the tail) against the `C` rows.
///
/// # Safety
/// AVX2 + FMA + F16C + AVX-512F/BW/VL (+ `D`'s features); `w` points at
/// block `b0` (a multiple of 8) of a row holding at least `b0 + cnt` blocks;
/// so does every activation row.
#[inline(always)]
unsafe fn group32x4<F: Fmt32, D: Dot512, const C: usize, const FULL: bool>(
    w: *const u8,
    rows: &[ActRow<'_>; C],
    b0: usize,
    cnt: usize,
    acc: &mut [__m256; C],
) {
    let mask = if FULL {
        _mm256_set1_epi32(-1)
    } else {
        lane_mask(cnt)
    };
    let (dw, mw) = scales8::<FULL>(w, F::BB, cnt);
    let m4 = _mm512_set1_epi8(0x0F);
    let mut lo = [_mm512_setzero_si512(); 2];
    let mut hi = [_mm512_setzero_si512(); 2];
    let mut qlo = [_mm512_setzero_si512(); 2];
    let mut qhi = [_mm512_setzero_si512(); 2];
    for g in 0..2 {
        if FULL || 4 * g < cnt {
            let n = if FULL { 4 } else { (cnt - 4 * g).min(4) };
            let blk = w.add(4 * g * F::BB);
            match F::FORMAT {
                QuantFormat::Q8_0 => {
                    qlo[g] = load4x16::<FULL>(blk.add(2), F::BB, n);
                    qhi[g] = load4x16::<FULL>(blk.add(18), F::BB, n);
                    lo[g] = D::prep_s8(qlo[g]);
                    hi[g] = D::prep_s8(qhi[g]);
                }
                _ => {
                    let off = if F::FORMAT == QuantFormat::Q4_0 { 2 } else { 4 };
                    let x = load4x16::<FULL>(blk.add(off), F::BB, n);
                    lo[g] = _mm512_and_si512(x, m4);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
                }
            }
        }
    }
    let shift = bias_shift(F::FORMAT, D::S8_BIAS_SHIFT);
    for c in 0..C {
        // Blocks b0.. start a group of 4 in the activation layout; rows are
        // padded to whole groups, so both 64-byte loads stay inside the row.
        let base = rows[c].qs.as_ptr().add(128 * (b0 / 4));
        let mut v = [_mm512_setzero_si512(); 2];
        for g in 0..2 {
            if FULL || 4 * g < cnt {
                let a_lo = _mm512_loadu_si512(base.add(128 * g) as *const _);
                let a_hi = _mm512_loadu_si512(base.add(128 * g + 64) as *const _);
                v[g] = match F::FORMAT {
                    QuantFormat::Q8_0 => D::dot2_s8(lo[g], qlo[g], a_lo, hi[g], qhi[g], a_hi),
                    _ => D::dot2_nib(lo[g], a_lo, hi[g], a_hi),
                };
            }
        }
        let isum = reduce2x4(&v);
        finish_group::<FULL>(
            F::FORMAT,
            shift,
            isum,
            dw,
            mw,
            &rows[c],
            b0,
            mask,
            &mut acc[c],
        );
    }
}

/// 512-bit kernel for a 32-wide format `F`.
struct K32x4<F, D>(std::marker::PhantomData<(F, D)>);

impl<F: Fmt32, D: Dot512> RowKernel for K32x4<F, D> {
    #[inline(always)]
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C] {
        row32!(group32x4, F, D, C, w_row, rows)
    }
}

/// Runs the chunk with the 512-bit kernels over `D`.
///
/// # Safety
/// AVX2 + FMA + F16C + AVX-512F/BW/VL and `D`'s features, enabled by the caller.
#[inline(always)]
unsafe fn run_512<D: Dot512>(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    match format {
        QuantFormat::Q4_0 => drive_kernel::<K32x4<FQ4_0, D>>(job, out),
        QuantFormat::Q4_1 => drive_kernel::<K32x4<FQ4_1, D>>(job, out),
        QuantFormat::Q8_0 => drive_kernel::<K32x4<FQ8_0, D>>(job, out),
        // The Q5 formats run the 256-bit kernel compiled with this path's
        // features (its fifth-bit unpacking is 256-bit code).
        QuantFormat::Q5_0 => drive_kernel::<K32<FQ5_0, D::D256>>(job, out),
        QuantFormat::Q5_1 => drive_kernel::<K32<FQ5_1, D::D256>>(job, out),
        QuantFormat::Q4K => drive_kernel::<KQ45K<false, D::D256>>(job, out),
        QuantFormat::Q6K => drive_kernel::<KQ6K<D::D256>>(job, out),
        QuantFormat::Q2K => drive_kernel::<KQ23K<false, D::D256>>(job, out),
        QuantFormat::Q3K => drive_kernel::<KQ23K<true, D::D256>>(job, out),
        QuantFormat::Q5K => drive_kernel::<KQ45K<true, D::D256>>(job, out),
    }
}

/// The AVX-512 F+BW path.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX-512F, AVX-512BW and AVX-512VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn run_avx512(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    run_512::<Maddubs512>(format, job, out)
}

/// The AVX-512 VNNI path.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX-512F/BW/VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn run_avx512_vnni(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    run_512::<Vnni512>(format, job, out)
}

/// The AMX path: AMX tiles for the formats that have an AMX kernel when the
/// chunk has enough activation rows, the AVX-512 VNNI kernels otherwise.
///
/// # Safety
/// As [`run_avx512_vnni`], and `super::amx::usable()` must be true.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn run_amx(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    if super::amx::takes(format, job.i_end - job.i_begin) {
        super::amx::run(format, job, out)
    } else {
        run_512::<Vnni512>(format, job, out)
    }
}
