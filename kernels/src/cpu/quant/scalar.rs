//! Portable reference dot products; they define every path's float result.
//!
//! Within a block all arithmetic is integer and exact. The float part is
//! fixed so that the SIMD paths can reproduce it bit for bit:
//!
//! * 32-wide formats: block `b` contributes `t_b = (dw·da)·(isum as f32)`
//!   (Q4_1, Q5_1: `+ m·s`, the two products rounded separately, no FMA), and the
//!   terms are accumulated in 8 lanes, `acc[b % 8] += t_b`, which are summed as
//!   `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` — the order a vector of 8 f32
//!   accumulators and the usual 256-bit horizontal sum give.
//! * K formats: super-block `b` contributes `(d·da)·(isum as f32)` (Q2_K,
//!   Q4_K, Q5_K: `− (dmin·da)·(msum as f32)`, `msum` the mins times the
//!   activations' group sums), accumulated in block order into one sum.

use super::acts::ActRow;
use super::formats::{
    f16_at, q2_bits, q3k_scales, q3k_value, q4k_scales_mins, q5_value, q5k_value, q6k_value,
    QuantFormat, QK_K,
};

/// Final sum of the 8 lane accumulators, in the fixed reference order.
#[inline(always)]
pub(super) fn sum_lanes(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Exact integer dot of the 32 weights of a Q4_0/Q4_1/Q8_0 block (as signed
/// values, Q4_1 without its minimum) with 32 activations given as their first
/// (`lo`) and second (`hi`) 16 values.
#[inline(always)]
pub(super) fn block_isum(format: QuantFormat, blk: &[u8], lo: &[i8], hi: &[i8]) -> i32 {
    let (lo, hi) = (&lo[..16], &hi[..16]);
    let mut isum = 0i32;
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
            let (qs, off) = if format == QuantFormat::Q4_0 {
                (&blk[2..18], 8)
            } else {
                (&blk[4..20], 0)
            };
            for j in 0..16 {
                isum += ((qs[j] & 0x0F) as i32 - off) * lo[j] as i32;
                isum += ((qs[j] >> 4) as i32 - off) * hi[j] as i32;
            }
        }
        QuantFormat::Q8_0 => {
            for j in 0..16 {
                isum += (blk[2 + j] as i8 as i32) * lo[j] as i32;
                isum += (blk[18 + j] as i8 as i32) * hi[j] as i32;
            }
        }
        QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
            let (qh_at, off) = if format == QuantFormat::Q5_0 {
                (2, 16)
            } else {
                (4, 0)
            };
            for j in 0..16 {
                isum += (q5_value(blk, qh_at, j) - off) * lo[j] as i32;
                isum += (q5_value(blk, qh_at, j + 16) - off) * hi[j] as i32;
            }
        }
        QuantFormat::Q4K
        | QuantFormat::Q6K
        | QuantFormat::Q2K
        | QuantFormat::Q3K
        | QuantFormat::Q5K => unreachable!("not a 32-wide format"),
    }
    isum
}

/// Dot product of one weight row (`w`, whole blocks) with one activation row.
///
/// The caller has checked that `w` holds exactly the blocks for `a`'s length
/// and that `a` was quantized for `format`.
pub(super) fn dot(format: QuantFormat, w: &[u8], a: ActRow<'_>) -> f32 {
    let bb = format.block_bytes();
    match format {
        QuantFormat::Q4_0
        | QuantFormat::Q4_1
        | QuantFormat::Q8_0
        | QuantFormat::Q5_0
        | QuantFormat::Q5_1 => {
            let mut acc = [0f32; 8];
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let (lo, hi) = a.halves(b);
                let isum = block_isum(format, blk, lo, hi);
                let mut t = (f16_at(blk, 0) * a.d[b]) * isum as f32;
                if matches!(format, QuantFormat::Q4_1 | QuantFormat::Q5_1) {
                    t += f16_at(blk, 2) * a.s[b];
                }
                acc[b % 8] += t;
            }
            sum_lanes(acc)
        }
        QuantFormat::Q4K | QuantFormat::Q5K => {
            let mut sum = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                let aq = &a.qs[b * QK_K..(b + 1) * QK_K];
                let mut isum = 0i32;
                let mut msum = 0i32;
                for j in 0..8 {
                    let mut s = 0i32;
                    for l in 0..32 {
                        let q = if format == QuantFormat::Q5K {
                            q5k_value(blk, j, l)
                        } else {
                            ((blk[16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F) as i32
                        };
                        s += q * aq[32 * j + l] as i32;
                    }
                    isum += sc[j] as i32 * s;
                    let bs = &a.bsums[b * 16 + 2 * j..b * 16 + 2 * j + 2];
                    msum += mn[j] as i32 * (bs[0] as i32 + bs[1] as i32);
                }
                let da = a.d[b];
                sum += (f16_at(blk, 0) * da) * isum as f32 - (f16_at(blk, 2) * da) * msum as f32;
            }
            sum
        }
        QuantFormat::Q6K => {
            let mut sum = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let aq = &a.qs[b * QK_K..(b + 1) * QK_K];
                let mut isum = 0i32;
                for g in 0..16 {
                    let mut s = 0i32;
                    for e in 16 * g..16 * g + 16 {
                        s += q6k_value(blk, e) * aq[e] as i32;
                    }
                    isum += (blk[192 + g] as i8 as i32) * s;
                }
                sum += (f16_at(blk, 208) * a.d[b]) * isum as f32;
            }
            sum
        }
        QuantFormat::Q2K => {
            let mut sum = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let aq = &a.qs[b * QK_K..(b + 1) * QK_K];
                let (mut isum, mut msum) = (0i32, 0i32);
                for g in 0..16 {
                    let mut s = 0i32;
                    for e in 16 * g..16 * g + 16 {
                        s += q2_bits(&blk[16..80], e) as i32 * aq[e] as i32;
                    }
                    isum += (blk[g] & 0x0F) as i32 * s;
                    msum += (blk[g] >> 4) as i32 * a.bsums[b * 16 + g] as i32;
                }
                let da = a.d[b];
                sum += (f16_at(blk, 80) * da) * isum as f32 - (f16_at(blk, 82) * da) * msum as f32;
            }
            sum
        }
        QuantFormat::Q3K => {
            let mut sum = 0f32;
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let aq = &a.qs[b * QK_K..(b + 1) * QK_K];
                let sc = q3k_scales(&blk[96..108]);
                let mut isum = 0i32;
                for g in 0..16 {
                    let mut s = 0i32;
                    for e in 16 * g..16 * g + 16 {
                        s += q3k_value(blk, e) * aq[e] as i32;
                    }
                    isum += sc[g] as i32 * s;
                }
                sum += (f16_at(blk, 108) * a.d[b]) * isum as f32;
            }
            sum
        }
    }
}
