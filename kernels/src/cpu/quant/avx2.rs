//! 256-bit kernels: the AVX2 and AVX2+VNNI paths, and the K-format kernels
//! every SIMD path uses.
//!
//! 32-wide formats work in groups of 8 blocks. Two consecutive Q4 blocks'
//! 16+16 nibble bytes are one 32-byte vector; its low nibbles are the first
//! halves of both blocks, its high nibbles the second halves, which is how
//! the activations are stored (see `acts`), so each pair needs one vector of
//! unsigned weights per half and two dot-product instructions whose 8 i32
//! lanes are 4 partial sums of each block. A group's 4 pair vectors are then
//! reduced to one vector of the 8 exact block sums, scaled in f32 and added to
//! a vector of 8 lane accumulators — the scalar reference's `acc[b % 8]`.
//! Signed weights are handled without saturation: Q4_0 as
//! `dot(q, a) − 8·Σa`; Q8_0 with the sign trick `dot(|q|, sign(a, q))` under
//! `vpmaddubsw` (|q| ≤ 128, |a| ≤ 127, so pair sums stay below 2¹⁵) and as
//! `dot(q + 128, a) − 128·Σa` under VNNI.
//!
//! K formats work per super-block: each pair of 32-weight sub-blocks is one
//! 32-byte load, `vpmaddubsw` gives i16 pair sums, which are multiplied by the
//! sub-block scales and accumulated in i32 (`vpmaddwd` + add, or `vpdpwssd`);
//! the exact super-block sum is then scaled with the scalar reference's float
//! expression.
//!
//! Everything here is `#[inline(always)]` generic code without target features
//! of its own; it is compiled into the `#[target_feature]` entry points (here
//! and in the AVX-512 module), which is what makes it AVX2 or AVX-512 code.

use std::arch::x86_64::*;

use super::acts::{fill, q8_1_pos, ActRow, BlockQuantizer, RowsMut};
use super::formats::{q3k_scales, q4k_scales_mins, QuantFormat, QK_K};
use super::{drive_kernel, Job, OutCols, RowKernel};

/// Integer dot-product primitives on 256-bit vectors.
pub(super) trait Dot256 {
    /// Shift of the bias added to Q8_0 weights by [`Dot256::prep_s8`]
    /// (`Σ(q + 2^S)·a` is computed, then `2^S·Σa` subtracted); 0: no bias.
    const S8_BIAS_SHIFT: i32;

    /// 8 lanes: lane `l` = Σ over bytes `4l..4l+4` of `u0·a0 + u1·a1`, for
    /// unsigned weights `u ≤ 31`.
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn dot2_nib(u0: __m256i, a0: __m256i, u1: __m256i, a1: __m256i) -> __m256i;

    /// Weight-side preparation of signed 8-bit weights for [`Dot256::dot2_s8`].
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn prep_s8(q: __m256i) -> __m256i;

    /// As [`Dot256::dot2_nib`] for signed weights `q0`, `q1` prepared as
    /// `p0`, `p1`, plus `2^S8_BIAS_SHIFT · Σa` per lane.
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn dot2_s8(
        p0: __m256i,
        q0: __m256i,
        a0: __m256i,
        p1: __m256i,
        q1: __m256i,
        a1: __m256i,
    ) -> __m256i;

    /// `acc + madd(p, s)`: i16 pairs multiplied and summed into i32 lanes.
    ///
    /// # Safety
    /// CPU features of the implementor.
    unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i;
}

/// AVX2 `vpmaddubsw` + `vpmaddwd`.
pub(super) struct Maddubs;

impl Dot256 for Maddubs {
    const S8_BIAS_SHIFT: i32 = 0;

    #[inline(always)]
    unsafe fn dot2_nib(u0: __m256i, a0: __m256i, u1: __m256i, a1: __m256i) -> __m256i {
        // Each i16 pair sum is at most 2·31·127, so two of them add in i16.
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, a0), _mm256_maddubs_epi16(u1, a1));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn prep_s8(q: __m256i) -> __m256i {
        _mm256_abs_epi8(q)
    }

    #[inline(always)]
    unsafe fn dot2_s8(
        p0: __m256i,
        q0: __m256i,
        a0: __m256i,
        p1: __m256i,
        q1: __m256i,
        a1: __m256i,
    ) -> __m256i {
        // |q|·(±a): pair sums at most 2·128·127 < 2^15; summed in i32.
        let one = _mm256_set1_epi16(1);
        let d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(p0, _mm256_sign_epi8(a0, q0)), one);
        let d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(p1, _mm256_sign_epi8(a1, q1)), one);
        _mm256_add_epi32(d0, d1)
    }

    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }
}

/// AVX-512 VNNI on 256-bit vectors: `vpdpbusd ymm`, `vpdpwssd ymm` (needs VL).
pub(super) struct Vnni256;

impl Dot256 for Vnni256 {
    const S8_BIAS_SHIFT: i32 = 7;

    #[inline(always)]
    unsafe fn dot2_nib(u0: __m256i, a0: __m256i, u1: __m256i, a1: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, a0), u1, a1)
    }

    #[inline(always)]
    unsafe fn prep_s8(q: __m256i) -> __m256i {
        _mm256_xor_si256(q, _mm256_set1_epi8(-128))
    }

    #[inline(always)]
    unsafe fn dot2_s8(
        p0: __m256i,
        _q0: __m256i,
        a0: __m256i,
        p1: __m256i,
        _q1: __m256i,
        a1: __m256i,
    ) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), p0, a0), p1, a1)
    }

    #[inline(always)]
    unsafe fn madd_acc(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, p, s)
    }
}

/// A 32-wide weight format as a type (for monomorphization).
pub(super) trait Fmt32 {
    const FORMAT: QuantFormat;
    /// Bytes per block.
    const BB: usize = Self::FORMAT.block_bytes();
}

/// Q4_0 marker.
pub(super) struct FQ4_0;
/// Q4_1 marker.
pub(super) struct FQ4_1;
/// Q8_0 marker.
pub(super) struct FQ8_0;
/// Q5_0 marker.
pub(super) struct FQ5_0;
/// Q5_1 marker.
pub(super) struct FQ5_1;

impl Fmt32 for FQ4_0 {
    const FORMAT: QuantFormat = QuantFormat::Q4_0;
}
impl Fmt32 for FQ4_1 {
    const FORMAT: QuantFormat = QuantFormat::Q4_1;
}
impl Fmt32 for FQ8_0 {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;
}
impl Fmt32 for FQ5_0 {
    const FORMAT: QuantFormat = QuantFormat::Q5_0;
}
impl Fmt32 for FQ5_1 {
    const FORMAT: QuantFormat = QuantFormat::Q5_1;
}

/// Shift of the `2^S · Σa` correction subtracted from a block's dot product
/// (`None`: no correction).
#[inline(always)]
pub(super) const fn bias_shift(format: QuantFormat, s8_bias_shift: i32) -> Option<i32> {
    match format {
        QuantFormat::Q4_0 => Some(3),
        QuantFormat::Q5_0 => Some(4),
        QuantFormat::Q8_0 if s8_bias_shift != 0 => Some(s8_bias_shift),
        _ => None,
    }
}

/// `[p[0..16] | q[0..16]]`, or `[p[0..16] | 0]` without `two` (q not read).
///
/// # Safety
/// AVX2; the bytes read readable.
#[inline(always)]
pub(super) unsafe fn load2x16(p: *const u8, q: *const u8, two: bool) -> __m256i {
    let hi = if two {
        _mm_loadu_si128(q as *const __m128i)
    } else {
        _mm_setzero_si128()
    };
    _mm256_set_m128i(hi, _mm_loadu_si128(p as *const __m128i))
}

/// Byte `i` = 0x10 where bit `i` of `x` is set, else 0: the fifth bits of
/// 32 Q5 weights, in place to be OR'd into their nibbles.
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(super) unsafe fn fifth_bits(x: u32) -> __m256i {
    // Byte i of the broadcast holds byte i / 8 of x; OR-ing all bits but
    // bit i % 8 makes it all ones exactly where that bit is set.
    let bytes = _mm256_shuffle_epi8(
        _mm256_set1_epi32(x as i32),
        _mm256_setr_epi64x(
            0x0000_0000_0000_0000,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let set = _mm256_cmpeq_epi8(
        _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
        _mm256_set1_epi64x(-1),
    );
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// 8 lanes: lane `j` = the sum of block `j`, where `v[p]` holds 4 partial
/// sums of block `2p` in lanes 0..4 and of block `2p + 1` in lanes 4..8.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn reduce4x2(v: &[__m256i; 4]) -> __m256i {
    // Single-uop unpacks and adds (vphaddd is 3 uops): per 128-bit half,
    // x0 = [b0 b2 b0 b2 | b1 b3 b1 b3] partial sums, x1 likewise for b4..b7.
    let x0 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(v[0], v[1]),
        _mm256_unpackhi_epi32(v[0], v[1]),
    );
    let x1 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(v[2], v[3]),
        _mm256_unpackhi_epi32(v[2], v[3]),
    );
    // [b0 b2 b4 b6 | b1 b3 b5 b7] -> [b0 .. b7]
    let g = _mm256_add_epi32(_mm256_unpacklo_epi64(x0, x1), _mm256_unpackhi_epi64(x0, x1));
    _mm256_permutevar8x32_epi32(g, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Sum of the 8 lanes in the reference order
/// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
///
/// # Safety
/// AVX.
#[inline(always)]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Sum of 8 i32 lanes (exact; wrapping never happens for our ranges).
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    _mm_cvtsi128_si32(s)
}

/// Lane mask with lanes `0..cnt` set (cnt <= 8).
///
/// # Safety
/// AVX2.
#[inline(always)]
pub(super) unsafe fn lane_mask(cnt: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(cnt as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The f16 pairs at offsets 0 and 2 of 8 blocks (`bb` bytes apart) starting
/// at `w`, as f32: (d of each block, the next f16 — Q4_1's m). Blocks
/// `cnt..8` (if not `FULL`) are not read and give 0.
///
/// # Safety
/// AVX2 + F16C; the first 4 bytes of blocks `0..cnt` readable.
#[inline(always)]
pub(super) unsafe fn scales8<const FULL: bool>(
    w: *const u8,
    bb: usize,
    cnt: usize,
) -> (__m256, __m256) {
    // Eight scalar loads beat vpgatherdd here (measured on Zen 4).
    let rd = |j: usize| {
        if FULL || j < cnt {
            (w.add(j * bb) as *const i32).read_unaligned()
        } else {
            0
        }
    };
    let v = _mm256_setr_epi32(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7));
    let lo = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
    let hi = _mm256_srli_epi32(v, 16);
    // [lo0..3, hi0..3 | lo4..7, hi4..7] as u16 -> [lo0..7 | hi0..7].
    let p = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0b11_01_10_00);
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(p)),
        _mm256_cvtph_ps(_mm256_extracti128_si256(p, 1)),
    )
}

/// 8 f32 at `p` (lanes `0..cnt` only, the rest 0, if not `FULL`).
///
/// # Safety
/// AVX; `p..p + 8` (or `p..p + cnt`) readable.
#[inline(always)]
pub(super) unsafe fn load_ps8<const FULL: bool>(p: *const f32, mask: __m256i) -> __m256 {
    if FULL {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, mask)
    }
}

/// 8 i32 at `p` (lanes `0..cnt` only, the rest 0, if not `FULL`).
///
/// # Safety
/// AVX2; `p..p + 8` (or `p..p + cnt`) readable.
#[inline(always)]
pub(super) unsafe fn load_epi32x8<const FULL: bool>(p: *const i32, mask: __m256i) -> __m256i {
    if FULL {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_maskload_epi32(p, mask)
    }
}

/// The float part shared by the 256- and 512-bit 32-wide kernels: turns the
/// 8 exact block sums of one activation row into the reference terms and adds
/// them to the lane accumulators.
///
/// # Safety
/// AVX2 + FMA; `row` has blocks `b0..b0 + cnt` (`cnt = 8` if `FULL`), `mask`
/// = `lane_mask(cnt)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn finish_group<const FULL: bool>(
    format: QuantFormat,
    shift: Option<i32>,
    isum: __m256i,
    dw: __m256,
    mw: __m256,
    row: &ActRow<'_>,
    b0: usize,
    mask: __m256i,
    acc: &mut __m256,
) {
    let mut isum = isum;
    if let Some(s) = shift {
        let asum = load_epi32x8::<FULL>(row.sum.as_ptr().add(b0), mask);
        isum = _mm256_sub_epi32(isum, _mm256_sllv_epi32(asum, _mm256_set1_epi32(s)));
    }
    let da = load_ps8::<FULL>(row.d.as_ptr().add(b0), mask);
    let mut t = _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum));
    if matches!(format, QuantFormat::Q4_1 | QuantFormat::Q5_1) {
        let s = load_ps8::<FULL>(row.s.as_ptr().add(b0), mask);
        t = _mm256_add_ps(t, _mm256_mul_ps(mw, s));
    }
    *acc = _mm256_add_ps(*acc, t);
}

/// One group of 8 blocks (`cnt` < 8 in the tail) of a 32-wide format against
/// the `C` activation rows.
///
/// # Safety
/// AVX2 + FMA + F16C (+ the features of `D`); `w` points at block `b0` (a
/// multiple of 8) of a row holding at least `b0 + cnt` blocks; every row has
/// those blocks.
#[inline(always)]
unsafe fn group32<F: Fmt32, D: Dot256, const C: usize, const FULL: bool>(
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
    let m4 = _mm256_set1_epi8(0x0F);
    // Pair p = blocks 2p, 2p+1: first halves (lo) and second halves (hi) as
    // unsigned bytes, and for Q8_0 the raw signed bytes (qlo, qhi).
    let mut lo = [_mm256_setzero_si256(); 4];
    let mut hi = [_mm256_setzero_si256(); 4];
    let mut qlo = [_mm256_setzero_si256(); 4];
    let mut qhi = [_mm256_setzero_si256(); 4];
    for p in 0..4 {
        if FULL || 2 * p < cnt {
            let two = FULL || 2 * p + 1 < cnt;
            let (a, b) = (w.add(2 * p * F::BB), w.add((2 * p + 1) * F::BB));
            match F::FORMAT {
                QuantFormat::Q8_0 => {
                    qlo[p] = load2x16(a.add(2), b.add(2), two);
                    qhi[p] = load2x16(a.add(18), b.add(18), two);
                    lo[p] = D::prep_s8(qlo[p]);
                    hi[p] = D::prep_s8(qhi[p]);
                }
                QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
                    let qh_at = if F::FORMAT == QuantFormat::Q5_0 { 2 } else { 4 };
                    let x = load2x16(a.add(qh_at + 4), b.add(qh_at + 4), two);
                    let qh = |blk: *const u8| (blk.add(qh_at) as *const u32).read_unaligned();
                    let (ha, hb) = (qh(a), if two { qh(b) } else { 0 });
                    // First halves: bits 0..16 of each block; second: 16..32.
                    let bits_lo = fifth_bits((ha & 0xFFFF) | (hb << 16));
                    let bits_hi = fifth_bits((ha >> 16) | (hb & 0xFFFF_0000));
                    lo[p] = _mm256_or_si256(_mm256_and_si256(x, m4), bits_lo);
                    hi[p] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), m4), bits_hi);
                }
                _ => {
                    let off = if F::FORMAT == QuantFormat::Q4_0 { 2 } else { 4 };
                    let x = load2x16(a.add(off), b.add(off), two);
                    lo[p] = _mm256_and_si256(x, m4);
                    hi[p] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                }
            }
        }
    }
    let shift = bias_shift(F::FORMAT, D::S8_BIAS_SHIFT);
    for c in 0..C {
        // Blocks b0.. start a group of 4 in the activation layout.
        let base = rows[c].qs.as_ptr().add(128 * (b0 / 4));
        let mut v = [_mm256_setzero_si256(); 4];
        for p in 0..4 {
            if FULL || 2 * p < cnt {
                let a = base.add(128 * (p / 2) + 32 * (p % 2));
                let a_lo = _mm256_loadu_si256(a as *const __m256i);
                let a_hi = _mm256_loadu_si256(a.add(64) as *const __m256i);
                v[p] = match F::FORMAT {
                    QuantFormat::Q8_0 => D::dot2_s8(lo[p], qlo[p], a_lo, hi[p], qhi[p], a_hi),
                    _ => D::dot2_nib(lo[p], a_lo, hi[p], a_hi),
                };
            }
        }
        let isum = reduce4x2(&v);
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

/// Runs `group` over a row's blocks in groups of 8 and sums the lane
/// accumulators (shared by the 256- and 512-bit 32-wide kernels).
macro_rules! row32 {
    ($group:ident, $F:ty, $D:ty, $C:expr, $w_row:expr, $rows:expr) => {{
        let nb = $rows[0].d.len();
        assert_eq!($w_row.len(), nb * <$F>::BB);
        let w = $w_row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); $C];
        let full = nb / 8 * 8;
        let mut b0 = 0;
        // SAFETY (both calls): blocks b0..b0 + cnt exist in w_row (length
        // asserted) and in every activation row (all hold nb blocks).
        while b0 < full {
            $group::<$F, $D, $C, true>(w.add(b0 * <$F>::BB), $rows, b0, 8, &mut acc);
            b0 += 8;
        }
        if b0 < nb {
            $group::<$F, $D, $C, false>(w.add(b0 * <$F>::BB), $rows, b0, nb - b0, &mut acc);
        }
        let mut out = [0f32; $C];
        for c in 0..$C {
            out[c] = hsum_ps(acc[c]);
        }
        out
    }};
}
pub(super) use row32;

/// 256-bit kernel for a 32-wide format `F`.
pub(super) struct K32<F, D>(std::marker::PhantomData<(F, D)>);

impl<F: Fmt32, D: Dot256> RowKernel for K32<F, D> {
    #[inline(always)]
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C] {
        row32!(group32, F, D, C, w_row, rows)
    }
}

/// The f16 at `p` as f32 (F16C).
///
/// # Safety
/// F16C; `p..p + 2` readable.
#[inline(always)]
pub(super) unsafe fn f16_ptr(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Q4_K and Q5_K kernel (256-bit on every path): per pair of 32-weight
/// sub-blocks one 32-byte load of nibbles (Q5_K: each with its fifth bit
/// from `qh`), the sub-block scales applied to the i16 pair sums, the mins
/// through the activations' group sums.
pub(super) struct KQ45K<const Q5: bool, D>(std::marker::PhantomData<D>);

impl<const Q5: bool, D: Dot256> RowKernel for KQ45K<Q5, D> {
    #[inline(always)]
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C] {
        let (bb, qs_at) = if Q5 { (176, 48) } else { (144, 16) };
        assert_eq!(w_row.len(), rows[0].d.len() * bb);
        let m4 = _mm256_set1_epi8(0x0F);
        let b4 = _mm256_set1_epi8(0x10);
        let mut sum = [0f32; C];
        for (b, blk) in w_row.chunks_exact(bb).enumerate() {
            let d = f16_ptr(blk.as_ptr());
            let dmin = f16_ptr(blk.as_ptr().add(2));
            let (sc, mn) = q4k_scales_mins(&blk[4..16]);
            // SAFETY: Q5_K's qh is bytes 16..48 of its block.
            let qh = if Q5 {
                _mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut acc = [_mm256_setzero_si256(); C];
            for i in 0..4 {
                // SAFETY: bytes qs_at + 32i .. qs_at + 32i + 32 ≤ bb.
                let q = _mm256_loadu_si256(blk.as_ptr().add(qs_at + 32 * i) as *const __m256i);
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if Q5 {
                    // Bit 2i of qh[l] is bit 4 of sub-block 2i's weight l,
                    // bit 2i + 1 of sub-block 2i + 1's.
                    lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to(qh, 2 * i, 4), b4));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to(qh, 2 * i + 1, 4), b4));
                }
                let s_lo = _mm256_set1_epi16(sc[2 * i] as i16);
                let s_hi = _mm256_set1_epi16(sc[2 * i + 1] as i16);
                for c in 0..C {
                    // SAFETY: row c has nb·256 values; this reads 64 of block b.
                    let a = rows[c].qs.as_ptr().add(b * QK_K + 64 * i);
                    let a_lo = _mm256_loadu_si256(a as *const __m256i);
                    let a_hi = _mm256_loadu_si256(a.add(32) as *const __m256i);
                    acc[c] = D::madd_acc(acc[c], _mm256_maddubs_epi16(lo, a_lo), s_lo);
                    acc[c] = D::madd_acc(acc[c], _mm256_maddubs_epi16(hi, a_hi), s_hi);
                }
            }
            finish_kmins::<C>(&mut sum, acc, &mn, rows, b, d, dmin);
        }
        sum
    }
}

/// `v` with bit `from` of every byte moved to bit `to` (the other bits
/// moved alike; the caller masks). A 16-bit shift keeps each byte's bits in
/// their byte for the bits a mask then keeps.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn bit_to(v: __m256i, from: usize, to: usize) -> __m256i {
    if from < to {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
    } else {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
    }
}

/// Adds super-block `b`'s `(d·da)·isum − (dmin·da)·msum` to each row's sum,
/// `isum` the lanes of `acc`, `msum` the 8 sub-block mins times the row's
/// group sums (each min covering two groups of 16).
///
/// # Safety
/// AVX2; `rows` have block `b`.
#[inline(always)]
unsafe fn finish_kmins<const C: usize>(
    sum: &mut [f32; C],
    acc: [__m256i; C],
    mn: &[u8; 8],
    rows: &[ActRow<'_>; C],
    b: usize,
    d: f32,
    dmin: f32,
) {
    let mn8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr() as *const __m128i));
    let mins16 = _mm256_set_m128i(_mm_unpackhi_epi16(mn8, mn8), _mm_unpacklo_epi16(mn8, mn8));
    for c in 0..C {
        let isum = hsum_epi32(acc[c]);
        // SAFETY: row c has 16 bsums per block.
        let bs = _mm256_loadu_si256(rows[c].bsums.as_ptr().add(16 * b) as *const __m256i);
        let msum = hsum_epi32(_mm256_madd_epi16(mins16, bs));
        let da = rows[c].d[b];
        sum[c] += (d * da) * isum as f32 - (dmin * da) * msum as f32;
    }
}

/// Q2_K and Q3_K kernel (256-bit on every path): per half of 128 weights,
/// the four 2-bit fields of its 32 `qs` bytes (Q3_K: with the `hmask` bit
/// as bit 2) against the activations, each group of 16 times its scale.
pub(super) struct KQ23K<const Q3: bool, D>(std::marker::PhantomData<D>);

impl<const Q3: bool, D: Dot256> RowKernel for KQ23K<Q3, D> {
    #[inline(always)]
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C] {
        let bb = if Q3 { 110 } else { 84 };
        let (qs_at, d_at) = if Q3 { (32, 108) } else { (16, 80) };
        assert_eq!(w_row.len(), rows[0].d.len() * bb);
        let m2 = _mm256_set1_epi8(0x03);
        let mut sum = [0f32; C];
        for (b, blk) in w_row.chunks_exact(bb).enumerate() {
            let p = blk.as_ptr();
            let d = f16_ptr(p.add(d_at));
            // Scales: Q3_K's 6-bit, less 32; Q2_K's low nibbles (its mins
            // are the high nibbles).
            let sc: [i8; 16] = if Q3 {
                q3k_scales(&blk[96..108])
            } else {
                std::array::from_fn(|g| (blk[g] & 0x0F) as i8)
            };
            // SAFETY (loads in this block): Q3_K's hmask is bytes 0..32 and
            // qs 32..96; Q2_K's qs is bytes 16..80; both inside the block.
            let hm = if Q3 {
                _mm256_loadu_si256(p as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut acc = [_mm256_setzero_si256(); C];
            for n in 0..2 {
                let qs = _mm256_loadu_si256(p.add(qs_at + 32 * n) as *const __m256i);
                for j in 0..4 {
                    let mut u =
                        _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * j as i32)), m2);
                    if Q3 {
                        // hmask bit 4n + j as bit 2.
                        let h = bit_to(hm, 4 * n + j, 2);
                        u = _mm256_or_si256(u, _mm256_and_si256(h, _mm256_set1_epi8(0x04)));
                    }
                    let g = 8 * n + 2 * j;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(sc[g + 1] as i16),
                        _mm_set1_epi16(sc[g] as i16),
                    );
                    for c in 0..C {
                        // SAFETY: 32 values of block b of row c.
                        let a = rows[c].qs.as_ptr().add(b * QK_K + 128 * n + 32 * j);
                        let av = _mm256_loadu_si256(a as *const __m256i);
                        acc[c] = D::madd_acc(acc[c], _mm256_maddubs_epi16(u, av), s);
                    }
                }
            }
            if Q3 {
                // Σ sc_g·(u − 4)·a = Σ sc_g·u·a − 4·Σ sc_g·bsum_g.
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
                for c in 0..C {
                    // SAFETY: row c has 16 bsums per block.
                    let bs =
                        _mm256_loadu_si256(rows[c].bsums.as_ptr().add(16 * b) as *const __m256i);
                    let corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 2);
                    let isum = hsum_epi32(_mm256_sub_epi32(acc[c], corr));
                    sum[c] += (d * rows[c].d[b]) * isum as f32;
                }
            } else {
                let dmin = f16_ptr(p.add(82));
                // SAFETY: the 16 scale bytes of the block.
                let mins = _mm256_cvtepu8_epi16(_mm_srli_epi16(
                    _mm_and_si128(_mm_loadu_si128(p as *const __m128i), _mm_set1_epi8(-16)),
                    4,
                ));
                for c in 0..C {
                    let isum = hsum_epi32(acc[c]);
                    // SAFETY: row c has 16 bsums per block.
                    let bs =
                        _mm256_loadu_si256(rows[c].bsums.as_ptr().add(16 * b) as *const __m256i);
                    let msum = hsum_epi32(_mm256_madd_epi16(mins, bs));
                    let da = rows[c].d[b];
                    sum[c] += (d * da) * isum as f32 - (dmin * da) * msum as f32;
                }
            }
        }
        sum
    }
}

/// Q6_K kernel (256-bit on every path).
pub(super) struct KQ6K<D>(std::marker::PhantomData<D>);

impl<D: Dot256> RowKernel for KQ6K<D> {
    #[inline(always)]
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C] {
        assert_eq!(w_row.len(), rows[0].d.len() * 210);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut sum = [0f32; C];
        for (b, blk) in w_row.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            let d = f16_ptr(p.add(208));
            let sc = &blk[192..208];
            // SAFETY (loads in this block): ql is bytes 0..128, qh 128..192,
            // scales 192..208, all inside the 210-byte block.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            let mut acc = [_mm256_setzero_si256(); C];
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)), 2),
                    ),
                ];
                for t in 0..4 {
                    let g = 8 * h + 2 * t;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(sc[g + 1] as i8 as i16),
                        _mm_set1_epi16(sc[g] as i8 as i16),
                    );
                    for c in 0..C {
                        // SAFETY: 32 values of block b of row c.
                        let a = rows[c].qs.as_ptr().add(b * QK_K + 128 * h + 32 * t);
                        let av = _mm256_loadu_si256(a as *const __m256i);
                        acc[c] = D::madd_acc(acc[c], _mm256_maddubs_epi16(q[t], av), s);
                    }
                }
            }
            for c in 0..C {
                // Σ sc_g·(q − 32)·a = Σ sc_g·q·a − 32·Σ sc_g·bsum_g.
                // SAFETY: row c has 16 bsums per block.
                let bs = _mm256_loadu_si256(rows[c].bsums.as_ptr().add(16 * b) as *const __m256i);
                let corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
                let isum = hsum_epi32(_mm256_sub_epi32(acc[c], corr));
                sum[c] += (d * rows[c].d[b]) * isum as f32;
            }
        }
        sum
    }
}

/// Runs the chunk with kernels over `D` (shared by the 256-bit entry points).
///
/// # Safety
/// AVX2 + FMA + F16C and `D`'s features, enabled by the caller.
#[inline(always)]
unsafe fn run_256<D: Dot256>(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    match format {
        QuantFormat::Q4_0 => drive_kernel::<K32<FQ4_0, D>>(job, out),
        QuantFormat::Q4_1 => drive_kernel::<K32<FQ4_1, D>>(job, out),
        QuantFormat::Q8_0 => drive_kernel::<K32<FQ8_0, D>>(job, out),
        QuantFormat::Q5_0 => drive_kernel::<K32<FQ5_0, D>>(job, out),
        QuantFormat::Q5_1 => drive_kernel::<K32<FQ5_1, D>>(job, out),
        QuantFormat::Q4K => drive_kernel::<KQ45K<false, D>>(job, out),
        QuantFormat::Q6K => drive_kernel::<KQ6K<D>>(job, out),
        QuantFormat::Q2K => drive_kernel::<KQ23K<false, D>>(job, out),
        QuantFormat::Q3K => drive_kernel::<KQ23K<true, D>>(job, out),
        QuantFormat::Q5K => drive_kernel::<KQ45K<true, D>>(job, out),
    }
}

/// The AVX2 path.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_avx2(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    run_256::<Maddubs>(format, job, out)
}

/// The AVX2 path with 256-bit VNNI.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX-512F, AVX-512VL and AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn run_avx2_vnni(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    run_256::<Vnni256>(format, job, out)
}

/// AVX2 activation quantizer (bit-identical to the scalar one: the same
/// `amax`, `d` and `1/d`, one rounded product per value, ties to even, NaN to 0).
struct Avx2Quantizer;

impl BlockQuantizer for Avx2Quantizer {
    #[inline(always)]
    unsafe fn block(x: &[f32], q: &mut [i8]) -> f32 {
        assert!(x.len().is_multiple_of(32) && q.len() == x.len());
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_setzero_ps();
        for c in x.chunks_exact(8) {
            // max(|v|, m) keeps m when |v| is NaN, like the scalar `if`.
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for (xc, qc) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
            let mut v = [_mm256_setzero_si256(); 4];
            for t in 0..4 {
                let f = _mm256_mul_ps(_mm256_loadu_ps(xc.as_ptr().add(8 * t)), id);
                let f = _mm256_and_ps(f, _mm256_cmp_ps(f, f, _CMP_ORD_Q));
                let r = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v[t] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
            }
            // Packing works per 128-bit half: dwords come out as
            // [v0.lo v1.lo v2.lo v3.lo | v0.hi v1.hi v2.hi v3.hi].
            let p = _mm256_packs_epi16(
                _mm256_packs_epi32(v[0], v[1]),
                _mm256_packs_epi32(v[2], v[3]),
            );
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qc.as_mut_ptr() as *mut __m256i, p);
        }
        d
    }

    #[inline(always)]
    unsafe fn q8_1(x: &[f32], row: &mut [i8], b: usize, tile: Option<&mut [i8]>) -> (f32, i32) {
        let mut q = [0i8; 32];
        let d = Self::block(&x[..32], &mut q);
        let p = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
        let (lo, hi) = (q8_1_pos(b, 0), q8_1_pos(b, 16));
        assert!(hi + 16 <= row.len());
        // SAFETY: lo + 16 <= hi and hi + 16 <= row.len() (asserted).
        _mm_storeu_si128(
            row.as_mut_ptr().add(lo) as *mut __m128i,
            _mm256_castsi256_si128(p),
        );
        _mm_storeu_si128(
            row.as_mut_ptr().add(hi) as *mut __m128i,
            _mm256_extracti128_si256(p, 1),
        );
        if let Some(t) = tile {
            assert!(t.len() >= 32);
            _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, p);
        }
        // Σq: bytes times 1 into i16 pairs, pairs into i32 lanes.
        let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p);
        (
            d,
            hsum_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))),
        )
    }
}

/// Activation quantization with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_avx2(rows: RowsMut<'_>, x: &[f32]) {
    fill::<Avx2Quantizer>(rows, x)
}
