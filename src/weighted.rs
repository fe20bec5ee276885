//! Importance-weighted ("imatrix") quantization of f32 weights to GGUF block
//! types: the method llama.cpp's `quantize_q4_0` … `quantize_q6_K`
//! (ggml/src/ggml-quants.c, llama.cpp 0.3.36) follow when they are given
//! `quant_weights`, written anew in Rust.
//!
//! This module owns [`quantize_weighted`] (values plus one importance weight
//! per input column in, a GGUF tensor's raw block bytes out) and
//! [`uses_weights`] (which types have such a variant), and the scale searches
//! behind them. What is true of it:
//!
//! - For the same values and weights its bytes equal llama.cpp's, block for
//!   block, for Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K;
//!   checked by the tests below against `tests/golden/weighted.json`, which
//!   `tests/support/weighted_golden.sh` makes by running llama.cpp's own
//!   quantizers on inputs from a generator both sides share.
//! - That equality holds because every step is the C code's step: f32
//!   arithmetic in the C expression's order and never fused (Rust does not
//!   contract `a * b + c`), ggml's `nearest_int` bit trick (ties to even),
//!   C's `MAX` on floats (`a > b ? a : b`, which differs from [`f32::max`]
//!   on signed zeros and NaN), C's integer-to-`uint8_t`/`int8_t`
//!   truncations where the C stores an `int` into a byte, and f16 rounding to
//!   nearest even like `GGML_FP32_TO_FP16` (NaN becomes 0x7E00 with its
//!   sign, as ggml's conversion makes it). llama.cpp built with fused
//!   multiply-add contraction (GCC's default where the target has FMA, e.g.
//!   aarch64) rounds differently; the reference is the x86-64 build.
//! - It never panics on its input: wrong shapes, types without a weighted
//!   variant and negative or non-finite weights are errors. Non-finite values
//!   are not rejected (llama.cpp does not reject them either) and go through
//!   the same steps as in C. It allocates only the output.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per block of the legacy types (Q4_0, Q4_1, Q5_0, Q5_1).
const QK: usize = 32;
/// Values per super-block of the k-quants (Q2_K … Q6_K).
const QK_K: usize = 256;
/// ggml's `GROUP_MAX_EPS`: below this largest magnitude a group is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;
/// The scale search of [`make_qkx3_quants`] as every weighted caller runs
/// it: `nmax + RMIN + RDELTA·k` steps for k = 0 ..= NSTEP.
const QKX3_RMIN: f32 = -0.9;
/// See [`QKX3_RMIN`].
const QKX3_RDELTA: f32 = 0.05;
/// See [`QKX3_RMIN`].
const QKX3_NSTEP: i32 = 36;

/// Whether llama.cpp weights `dtype`'s quantization by an importance matrix:
/// Q4_0, Q4_1, Q5_0, Q5_1, Q2K, Q3K, Q4K, Q5K and Q6K; not F32, F16, BF16,
/// Q8_0, Q8_1 or Q8K (those round each value on its own).
pub(crate) fn uses_weights(dtype: GgmlDType) -> bool {
    block_layout(dtype).is_some()
}

/// Values per block and bytes per block of the types with a weighted
/// variant (ggml-common.h's `block_*` structs), `None` for the others.
fn block_layout(dtype: GgmlDType) -> Option<(usize, usize)> {
    match dtype {
        GgmlDType::Q4_0 => Some((QK, 18)),
        GgmlDType::Q4_1 => Some((QK, 20)),
        GgmlDType::Q5_0 => Some((QK, 22)),
        GgmlDType::Q5_1 => Some((QK, 24)),
        GgmlDType::Q2K => Some((QK_K, 84)),
        GgmlDType::Q3K => Some((QK_K, 110)),
        GgmlDType::Q4K => Some((QK_K, 144)),
        GgmlDType::Q5K => Some((QK_K, 176)),
        GgmlDType::Q6K => Some((QK_K, 210)),
        GgmlDType::F32
        | GgmlDType::F16
        | GgmlDType::BF16
        | GgmlDType::Q8_0
        | GgmlDType::Q8_1
        | GgmlDType::Q8K => None,
    }
}

/// Quantizes `x` (rows of `weights.len()` values, row-major) to `dtype`'s
/// GGUF blocks, each column's squared error weighted by `weights[column]`
/// (an importance matrix's mean of x² per input column). Returns the raw
/// block bytes, rows one after another, exactly as a GGUF file stores them:
/// the bytes llama.cpp's `quantize_<type>(x, dst, rows, weights.len(),
/// weights)` writes.
///
/// Errors name the problem: a type without a weighted variant (see
/// [`uses_weights`]), an empty row or one whose length is not a multiple of
/// the type's block size, an `x` that is not whole rows, a negative or
/// non-finite weight.
pub(crate) fn quantize_weighted(
    dtype: GgmlDType,
    x: &[f32],
    weights: &[f32],
) -> Result<Vec<u8>, String> {
    let (block_values, block_bytes) = block_layout(dtype)
        .ok_or_else(|| format!("{dtype:?} has no importance-weighted quantization"))?;
    let row_len = weights.len();
    if row_len == 0 {
        return Err(format!(
            "{dtype:?}: the importance weights are empty (one per column is needed)"
        ));
    }
    if !row_len.is_multiple_of(block_values) {
        return Err(format!(
            "{dtype:?}: a row of {row_len} values is not a multiple of the block size {block_values}"
        ));
    }
    if !x.len().is_multiple_of(row_len) {
        return Err(format!(
            "{dtype:?}: {} values are not whole rows of {row_len}",
            x.len()
        ));
    }
    if let Some((column, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        return Err(format!(
            "{dtype:?}: importance weight {w} of column {column} is not a finite, non-negative number"
        ));
    }

    let row_bytes = row_len / block_values * block_bytes;
    let mut out = vec![0u8; x.len() / row_len * row_bytes];
    for (row, dst) in x.chunks_exact(row_len).zip(out.chunks_exact_mut(row_bytes)) {
        match dtype {
            GgmlDType::Q4_0 => symmetric_blocks(row, weights, dst, (18, 8), pack_4bit_32),
            GgmlDType::Q4_1 => affine_blocks(row, weights, dst, (20, 15), pack_4bit_32),
            GgmlDType::Q5_0 => symmetric_blocks(row, weights, dst, (22, 16), pack_5bit_block),
            GgmlDType::Q5_1 => affine_blocks(row, weights, dst, (24, 31), pack_5bit_block),
            _ => {
                let blocks = row
                    .chunks_exact(QK_K)
                    .zip(weights.chunks_exact(QK_K))
                    .zip(dst.chunks_exact_mut(block_bytes));
                for ((xb, wb), block) in blocks {
                    match dtype {
                        GgmlDType::Q2K => quantize_block_q2_k(xb, wb, block),
                        GgmlDType::Q3K => quantize_block_q3_k(xb, wb, block),
                        GgmlDType::Q4K => quantize_block_q4_k(xb, wb, block),
                        GgmlDType::Q5K => quantize_block_q5_k(xb, wb, block),
                        _ => quantize_block_q6_k(xb, wb, block),
                    }
                }
            }
        }
    }
    Ok(out)
}

// ───────────────────────────── shared helpers ─────────────────────────────

/// The integer nearest to `v`, ties to even, computed like ggml's
/// `nearest_int`: adding 1.5·2²³ leaves the rounded integer in the low
/// mantissa bits. Exact for |v| ≤ 4194303; beyond that (and for NaN or ∞)
/// it returns what the same bit trick returns in C, which keeps the bytes of
/// degenerate blocks equal too.
#[inline]
fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// C's `MAX(a, b)` on floats, `a > b ? a : b`: keeps `b` on ties (so
/// `MAX(0, -0.0)` is `-0.0`) and when either is NaN, unlike [`f32::max`].
#[inline]
fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The f16 bits `GGML_FP32_TO_FP16` gives `v`: round to nearest even,
/// overflow to ±∞, NaN to 0x7E00 with `v`'s sign.
#[inline]
fn fp16_bits(v: f32) -> u16 {
    if v.is_nan() {
        ((v.to_bits() >> 16) & 0x8000) as u16 | 0x7E00
    } else {
        f16::from_f32(v).to_bits()
    }
}

/// The value of the f16 `bits` (exact, like `GGML_FP16_TO_FP32`).
#[inline]
fn fp16_value(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Σ x², summed in order from 0 (the C loops' order).
#[inline]
fn sum_of_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |acc, &v| acc + v * v)
}

/// Σ w, summed in order from 0.
#[inline]
fn sum(w: &[f32]) -> f32 {
    w.iter().fold(0.0f32, |acc, &v| acc + v)
}

/// The per-value weights llama.cpp searches scales with: the column's
/// importance times √(σ² + x²), written into `out` (as long as `x`).
#[inline]
fn mix_importance(x: &[f32], importance: &[f32], sigma2: f32, out: &mut [f32]) {
    for ((o, &v), &q) in out.iter_mut().zip(x).zip(importance) {
        *o = q * (sigma2 + v * v).sqrt();
    }
}

/// Writes the f16 `bits` little-endian into `dst[0..2]`.
#[inline]
fn put_f16(dst: &mut [u8], bits: u16) {
    dst[..2].copy_from_slice(&bits.to_le_bytes());
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and weights: a symmetric
/// scale `d` and levels `L ∈ [0, 2·nmax)` (stored in `levels`) with
/// x ≈ d·(L − nmax), minimizing Σ w·(x − d·(L − nmax))² over the starting
/// scale −nmax/max and 18 nudged ones (max: the value of largest magnitude,
/// so d is usually negative). Returns `d`; an all-zero group gives 0 and
/// all-zero levels.
fn make_qx_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [i8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let level_at = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);

    let iscale = -nmax_f / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for ((slot, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        let l = level_at(iscale, v);
        *slot = (l + nmax) as i8;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    // C: `suml2 ? sumlx/suml2 : 0.0f` (NaN counts as true).
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        let iscale = -(nmax_f + 0.1 * step as f32) / max;
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for (&v, &w) in x.iter().zip(weights) {
            let lf = level_at(iscale, v) as f32;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (slot, &v) in levels.iter_mut().zip(x) {
                *slot = (level_at(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_qkx3_quants` with weights and squared error (not MAD): an
/// affine fit x ≈ scale·L − the_min with levels `L ∈ [0, nmax]` (stored in
/// `levels`; `aux` is scratch of the same length), trying the plain
/// min/max grid, then for each of 37 grids the weighted least-squares
/// scale and min, keeping the fit of least Σ w·(scale·L + min − x)².
/// Returns `(scale, the_min)`, the_min being minus the (non-positive) offset.
fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    aux: &mut [u8],
) -> (f32, f32) {
    let (Some(&x0), Some(&w0)) = (x.first(), weights.first()) else {
        return (0.0, 0.0);
    };
    let mut min = x0;
    let mut max = x0;
    let mut sum_w = w0;
    let mut sum_x = sum_w * x0;
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        levels.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let level_at = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax);

    let iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((slot, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        *slot = level_at(iscale, v, min) as u8;
        let diff = scale * f32::from(*slot) + min - v;
        best_error += w * (diff * diff);
    }
    for step in 0..=QKX3_NSTEP {
        let iscale = (QKX3_RMIN + QKX3_RDELTA * step as f32 + nmax_f) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for ((slot, &v), &w) in aux.iter_mut().zip(x).zip(weights) {
            let l = level_at(iscale, v, min);
            *slot = l as u8;
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for ((&l, &v), &w) in aux.iter().zip(x).zip(weights) {
                let diff = this_scale * f32::from(l) + this_min - v;
                error += w * (diff * diff);
            }
            if error < best_error {
                levels.copy_from_slice(aux);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: a scale `d` and levels `L ∈ [0, nmax]` (stored
/// in `levels`, truncated to a byte as the C's `uint8_t` buffer does) with
/// x ≈ d·L for non-negative `x` (sub-block scales or mins), minimizing
/// Σ w·(x − d·L)² over 9 starting scales and then up to 5 rounds of
/// coordinate descent on single levels. Returns `d` (0 for an all-zero `x`).
fn make_qp_quants(nmax: i32, x: &[f32], levels: &mut [u8], weights: &[f32]) -> f32 {
    let max = x.iter().fold(0.0f32, |m, &v| c_max(m, v));
    if max < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / max;
    for (slot, &v) in levels.iter_mut().zip(x) {
        *slot = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for ((&l, &v), &w) in levels.iter().zip(x).zip(weights) {
        let diff = v - scale * f32::from(l);
        best_mse += w * diff * diff;
    }
    for step in (-4..=4).filter(|&s| s != 0) {
        let iscale_step = (0.1 * step as f32 + nmax_f) / max;
        let scale_step = 1.0 / iscale_step;
        let mut mse = 0.0f32;
        for (&v, &w) in x.iter().zip(weights) {
            let l = nearest_int(iscale_step * v).min(nmax);
            let diff = v - scale_step * l as f32;
            mse += w * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_step;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for ((slot, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        let l = nearest_int(iscale * v).min(nmax);
        *slot = l as u8;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for ((slot, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
            let old = f32::from(*slot);
            let mut slx = sumlx - w * v * old;
            let mut sl2 = suml2 - w * old * old;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(v * sl2 / slx).min(nmax);
                if new_l != i32::from(*slot) {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *slot = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min out of the
/// 12 packed scale bytes of a Q4_K/Q5_K block.
#[inline]
fn scale_min_k4(j: usize, packed: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Packs 256 2-bit levels the Q2_K/Q3_K way: byte `j/4 + l` of each
/// 128-value half holds levels `j+l`, `j+l+32`, `j+l+64`, `j+l+96` from the
/// low bits up.
fn pack_2bit(level: impl Fn(usize) -> i32, qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] = (level(j + l)
                | (level(j + l + 32) << 2)
                | (level(j + l + 64) << 4)
                | (level(j + l + 96) << 6)) as u8;
        }
    }
}

/// Packs 32 5-bit levels (Q5_0, Q5_1): the low nibbles of levels `j` and
/// `j+16` into `qs[j]`, the fifth bits into the little-endian u32 `qh`.
fn pack_5bit_32(levels: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut high = 0u32;
    for j in 0..QK / 2 {
        let (lo, hi) = (levels[j], levels[j + QK / 2]);
        qs[j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        high |= ((u32::from(lo) & 0x10) >> 4) << j;
        high |= ((u32::from(hi) & 0x10) >> 4) << (j + QK / 2);
    }
    qh[..4].copy_from_slice(&high.to_le_bytes());
}

// ───────────────────────────── legacy types ─────────────────────────────

/// σ² of a legacy-type row: Σx²/n over the whole row (`quantize_row_q4_0_impl`
/// and its siblings mix it into every block's weights).
fn row_sigma2(row: &[f32]) -> f32 {
    sum_of_squares(row) / row.len() as f32
}

/// A legacy row of symmetric blocks (Q4_0, Q5_0), as llama.cpp's
/// `quantize_row_q4_0_impl` and `quantize_row_q5_0_impl`: per block of 32
/// the importance mixed with σ², the [`make_qx_quants`] fit with levels in
/// `[-nmax, nmax)` (stored offset by `nmax`), the f16 scale first, then
/// `pack`'s bytes.
fn symmetric_blocks(
    row: &[f32],
    importance: &[f32],
    dst: &mut [u8],
    (block_bytes, nmax): (usize, i32),
    pack: impl Fn(&[u8; QK], &mut [u8]),
) {
    let sigma2 = row_sigma2(row);
    let mut weight = [0.0f32; QK];
    let mut levels = [0i8; QK];
    for ((xb, qw), block) in row
        .chunks_exact(QK)
        .zip(importance.chunks_exact(QK))
        .zip(dst.chunks_exact_mut(block_bytes))
    {
        mix_importance(xb, qw, sigma2, &mut weight);
        let d = make_qx_quants(nmax, xb, &weight, &mut levels);
        put_f16(block, fp16_bits(d));
        // Levels are in [0, 2·nmax): the C's `(uint8_t)L[j]` is this cast.
        pack(&levels.map(|l| l as u8), &mut block[2..]);
    }
}

/// A legacy row of affine blocks (Q4_1, Q5_1), as llama.cpp's
/// `quantize_row_q4_1_impl` and `quantize_row_q5_1_impl`: per block of 32
/// the importance mixed with σ², the [`make_qkx3_quants`] fit with levels in
/// `[0, nmax]`, the f16 scale and negated minimum first, then `pack`'s
/// bytes.
fn affine_blocks(
    row: &[f32],
    importance: &[f32],
    dst: &mut [u8],
    (block_bytes, nmax): (usize, i32),
    pack: impl Fn(&[u8; QK], &mut [u8]),
) {
    let sigma2 = row_sigma2(row);
    let mut weight = [0.0f32; QK];
    let mut levels = [0u8; QK];
    let mut aux = [0u8; QK];
    for ((xb, qw), block) in row
        .chunks_exact(QK)
        .zip(importance.chunks_exact(QK))
        .zip(dst.chunks_exact_mut(block_bytes))
    {
        mix_importance(xb, qw, sigma2, &mut weight);
        let (d, the_min) = make_qkx3_quants(nmax, xb, &weight, &mut levels, &mut aux);
        put_f16(&mut block[0..], fp16_bits(d));
        put_f16(&mut block[2..], fp16_bits(-the_min));
        pack(&levels, &mut block[4..]);
    }
}

/// Packs 32 4-bit levels (Q4_0, Q4_1): levels `j` and `j+16` into byte `j`.
fn pack_4bit_32(levels: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = (levels[j] & 0x0F) | (levels[j + QK / 2] << 4);
    }
}

/// Packs 32 5-bit levels after their 4-byte `qh` (Q5_0, Q5_1).
fn pack_5bit_block(levels: &[u8; QK], bytes: &mut [u8]) {
    let (qh, qs) = bytes.split_at_mut(4);
    pack_5bit_32(levels, qh, qs);
}

// ───────────────────────────── k-quants ─────────────────────────────

/// One super-block to Q2_K (`scales: [u8; 16], qs: [u8; 64], d, dmin: f16`),
/// llama.cpp's `quantize_row_q2_K_impl`: 16 sub-blocks of 16 fitted with
/// [`make_qkx3_quants`] (4 levels), their scales and mins quantized to 4 bits
/// with [`make_qp_quants`], then every value requantized with the f16-rounded
/// scales.
fn quantize_block_q2_k(x: &[f32], importance: &[f32], block: &mut [u8]) {
    let sigma2 = sum_of_squares(x) / QK_K as f32;
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut weight = [0.0f32; 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut sub_weight = [0.0f32; QK_K / 16];
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        mix_importance(xs, &importance[16 * j..16 * j + 16], sigma2, &mut weight);
        sub_weight[j] = sum(&weight);
        let (scale, the_min) =
            make_qkx3_quants(3, xs, &weight, &mut levels[16 * j..16 * j + 16], &mut aux);
        scales[j] = scale;
        mins[j] = the_min;
    }
    let mut scale_levels = [0u8; QK_K / 16];
    let mut min_levels = [0u8; QK_K / 16];
    let d = make_qp_quants(15, &scales, &mut scale_levels, &sub_weight);
    let dmin = make_qp_quants(15, &mins, &mut min_levels, &sub_weight);
    let (d_bits, dmin_bits) = (fp16_bits(d), fp16_bits(dmin));
    let (d, dmin) = (fp16_value(d_bits), fp16_value(dmin_bits));

    let (packed_scales, rest) = block.split_at_mut(QK_K / 16);
    let (qs, tail) = rest.split_at_mut(QK_K / 4);
    for (j, packed) in packed_scales.iter_mut().enumerate() {
        *packed = (i32::from(scale_levels[j]) | (i32::from(min_levels[j]) << 4)) as u8;
    }
    for (j, &packed) in packed_scales.iter().enumerate() {
        let sub_d = d * f32::from(packed & 0xF);
        if sub_d == 0.0 {
            continue;
        }
        let sub_m = dmin * f32::from(packed >> 4);
        for (slot, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..]) {
            *slot = nearest_int((v + sub_m) / sub_d).clamp(0, 3) as u8;
        }
    }
    pack_2bit(|i| i32::from(levels[i]), qs);
    put_f16(&mut tail[0..], d_bits);
    put_f16(&mut tail[2..], dmin_bits);
}

/// One super-block to Q3_K (`hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12],
/// d: f16`), llama.cpp's `quantize_row_q3_K_impl`: 16 symmetric sub-block
/// fits with 8 levels ([`make_qx_quants`]), their scales quantized to 6 bits
/// by another, then every value requantized with the rounded scales; the
/// third bit of each level goes to `hmask`.
fn quantize_block_q3_k(x: &[f32], importance: &[f32], block: &mut [u8]) {
    let sigma2 = 2.0 * sum_of_squares(x) / QK_K as f32;
    let mut levels = [0i8; QK_K];
    let mut weight = [0.0f32; 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut sub_weight = [0.0f32; QK_K / 16];
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        mix_importance(xs, &importance[16 * j..16 * j + 16], sigma2, &mut weight);
        sub_weight[j] = sum(&weight);
        scales[j] = make_qx_quants(4, xs, &weight, &mut levels[16 * j..16 * j + 16]);
    }
    let mut scale_levels = [0i8; QK_K / 16];
    let d_block = make_qx_quants(32, &scales, &sub_weight, &mut scale_levels);

    let (hmask, rest) = block.split_at_mut(QK_K / 8);
    let (qs, rest) = rest.split_at_mut(QK_K / 4);
    let (packed, d_field) = rest.split_at_mut(12);
    packed.fill(0);
    for (j, &level) in scale_levels.iter().enumerate() {
        let mut l = i32::from(level);
        if j < 8 {
            packed[j] = (l & 0xF) as u8;
        } else {
            packed[j - 8] |= ((l & 0xF) << 4) as u8;
        }
        l >>= 4;
        packed[j % 4 + 8] |= (l << (2 * (j / 4))) as u8;
    }
    let d_bits = fp16_bits(d_block);
    put_f16(d_field, d_bits);
    let d = fp16_value(d_bits);

    for j in 0..QK_K / 16 {
        let low = if j < 8 {
            packed[j] & 0xF
        } else {
            packed[j - 8] >> 4
        };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        let sub_scale = (i32::from(low | (high << 4)) - 32) as i8;
        let sub_d = d * f32::from(sub_scale);
        if sub_d == 0.0 {
            continue;
        }
        for (slot, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..]) {
            *slot = (nearest_int(v / sub_d).clamp(-4, 3) + 4) as i8;
        }
    }

    hmask.fill(0);
    for (j, level) in levels.iter_mut().enumerate() {
        if *level > 3 {
            hmask[j % (QK_K / 8)] |= 1 << (j / (QK_K / 8));
            *level -= 4;
        }
    }
    pack_2bit(|i| i32::from(levels[i]), qs);
}

/// What Q4_K and Q5_K share (`quantize_row_q4_K_impl`,
/// `quantize_row_q5_K_impl`): 8 sub-blocks of 32 fitted with
/// [`make_qkx3_quants`] (`nmax + 1` levels), scales and mins quantized to 6
/// bits with [`make_qp_quants`] and packed into 12 bytes (Q5_K first clamps
/// them to 63, `clamp_to_6_bits`), then every value requantized into
/// `levels`. Returns the packed scales and the f16 bits of d and dmin.
fn quantize_levels_k4(
    x: &[f32],
    importance: &[f32],
    nmax: i32,
    clamp_to_6_bits: bool,
    levels: &mut [u8; QK_K],
) -> ([u8; 12], u16, u16) {
    let sigma2 = 2.0 * sum_of_squares(x) / QK_K as f32;
    let mut aux = [0u8; 32];
    let mut weight = [0.0f32; 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut sub_weight = [0.0f32; QK_K / 32];
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        mix_importance(xs, &importance[32 * j..32 * j + 32], sigma2, &mut weight);
        sub_weight[j] = sum(&weight);
        let (scale, the_min) = make_qkx3_quants(
            nmax,
            xs,
            &weight,
            &mut levels[32 * j..32 * j + 32],
            &mut aux,
        );
        scales[j] = scale;
        mins[j] = the_min;
    }
    let mut scale_levels = [0u8; QK_K / 32];
    let mut min_levels = [0u8; QK_K / 32];
    let d_block = make_qp_quants(63, &scales, &mut scale_levels, &sub_weight);
    let m_block = make_qp_quants(63, &mins, &mut min_levels, &sub_weight);

    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        let (mut ls, mut lm) = (scale_levels[j], min_levels[j]);
        if clamp_to_6_bits {
            ls = ls.min(63);
            lm = lm.min(63);
        }
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d_bits, dmin_bits) = (fp16_bits(d_block), fp16_bits(m_block));
    let (d, dmin) = (fp16_value(d_bits), fp16_value(dmin_bits));
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &packed);
        let sub_d = d * f32::from(sc);
        if sub_d == 0.0 {
            continue;
        }
        let sub_m = dmin * f32::from(m);
        for (slot, &v) in levels[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..]) {
            *slot = nearest_int((v + sub_m) / sub_d).clamp(0, nmax) as u8;
        }
    }
    (packed, d_bits, dmin_bits)
}

/// One super-block to Q4_K (`d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`),
/// llama.cpp's `quantize_row_q4_K_impl` (see [`quantize_levels_k4`]); each
/// 64 values' levels `l` and `l+32` share byte `l` of their 32.
fn quantize_block_q4_k(x: &[f32], importance: &[f32], block: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let (packed, d_bits, dmin_bits) = quantize_levels_k4(x, importance, 15, false, &mut levels);
    put_f16(&mut block[0..], d_bits);
    put_f16(&mut block[2..], dmin_bits);
    block[4..16].copy_from_slice(&packed);
    let qs = &mut block[16..16 + QK_K / 2];
    for (chunk, q) in levels.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for l in 0..32 {
            q[l] = chunk[l] | (chunk[l + 32] << 4);
        }
    }
}

/// One super-block to Q5_K (`d, dmin: f16, scales: [u8; 12], qh: [u8; 32],
/// qs: [u8; 128]`), llama.cpp's `quantize_row_q5_K_impl` (see
/// [`quantize_levels_k4`]); low nibbles as in Q4_K, the fifth bits of the
/// k-th 64 values in bits 2k and 2k+1 of `qh`.
fn quantize_block_q5_k(x: &[f32], importance: &[f32], block: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let (packed, d_bits, dmin_bits) = quantize_levels_k4(x, importance, 31, true, &mut levels);
    put_f16(&mut block[0..], d_bits);
    put_f16(&mut block[2..], dmin_bits);
    block[4..16].copy_from_slice(&packed);
    let (qh, qs) = block[16..].split_at_mut(QK_K / 8);
    qh.fill(0);
    for (k, (chunk, q)) in levels
        .chunks_exact(64)
        .zip(qs.chunks_exact_mut(32))
        .enumerate()
    {
        let (m1, m2) = (1u8 << (2 * k), 2u8 << (2 * k));
        for j in 0..32 {
            let mut l1 = chunk[j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = chunk[j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
    }
}

/// One super-block to Q6_K (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16],
/// d: f16`), llama.cpp's `quantize_row_q6_K_impl`: 16 symmetric sub-block
/// fits with 64 levels ([`make_qx_quants`], weighted by the importance alone,
/// no σ² term), scales quantized to 8 bits against the largest, then every
/// value requantized. An all-zero block is all zero bytes.
fn quantize_block_q6_k(x: &[f32], importance: &[f32], block: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for (ib, scale) in scales.iter_mut().enumerate() {
        let range = 16 * ib..16 * ib + 16;
        *scale = make_qx_quants(
            32,
            &x[range.clone()],
            &importance[range.clone()],
            &mut levels[range],
        );
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = *scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        block.fill(0);
        return;
    }

    let (ql, rest) = block.split_at_mut(QK_K / 2);
    let (qh, rest) = rest.split_at_mut(QK_K / 4);
    let (packed_scales, d_field) = rest.split_at_mut(QK_K / 16);
    let iscale = -128.0 / max_scale;
    let d_bits = fp16_bits(1.0 / iscale);
    put_f16(d_field, d_bits);
    let d = fp16_value(d_bits);
    for (packed, &scale) in packed_scales.iter_mut().zip(&scales) {
        *packed = (nearest_int(iscale * scale).min(127) as i8) as u8;
    }
    for (j, &packed) in packed_scales.iter().enumerate() {
        let sub_d = d * f32::from(packed as i8);
        if sub_d == 0.0 {
            continue;
        }
        for (slot, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..]) {
            *slot = (nearest_int(v / sub_d).clamp(-32, 31) + 32) as i8;
        }
    }

    for (half_index, chunk) in levels.chunks_exact(128).enumerate() {
        let ql = &mut ql[64 * half_index..64 * half_index + 64];
        let qh = &mut qh[32 * half_index..32 * half_index + 32];
        for l in 0..32 {
            let level = |k: usize| chunk[l + 32 * k] as u8;
            ql[l] = (level(0) & 0xF) | ((level(2) & 0xF) << 4);
            ql[l + 32] = (level(1) & 0xF) | ((level(3) & 0xF) << 4);
            qh[l] = (level(0) >> 4)
                | ((level(1) >> 4) << 2)
                | ((level(2) >> 4) << 4)
                | ((level(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
    use candle_core::{Device, Tensor};

    /// The golden file's generator (tests/support/weighted_golden.c):
    /// SplitMix64.
    struct SplitMix64(u64);

    impl SplitMix64 {
        /// The next 64 random bits.
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1) from the top 24 bits, exact in f32.
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 * (1.0 / 16_777_216.0)
        }
    }

    /// One input of the golden file, as its JSON describes it.
    struct Case {
        name: String,
        seed: u64,
        rows: usize,
        cols: usize,
        x_scale: f32,
        outlier_every: u64,
        ones: bool,
        zero_rows: Vec<usize>,
        zero_tail: Option<(usize, usize)>,
        zero_weights: std::ops::Range<usize>,
        pattern_2_4: bool,
    }

    impl Case {
        /// Reads a case's generator parameters from its JSON object.
        fn from_json(case: &serde_json::Value) -> Case {
            let int = |key: &str| {
                case[key]
                    .as_i64()
                    .unwrap_or_else(|| panic!("golden case lacks integer {key}"))
            };
            let tail_row = int("zero_tail_row");
            Case {
                name: case["name"].as_str().expect("case name").to_string(),
                seed: int("seed") as u64,
                rows: int("rows") as usize,
                cols: int("cols") as usize,
                x_scale: case["x_scale"].as_f64().expect("x_scale") as f32,
                outlier_every: int("outlier_every") as u64,
                ones: case["weights"].as_str() == Some("ones"),
                zero_rows: case["zero_rows"]
                    .as_array()
                    .expect("zero_rows")
                    .iter()
                    .map(|v| v.as_u64().expect("zero row") as usize)
                    .collect(),
                zero_tail: (tail_row >= 0)
                    .then(|| (tail_row as usize, int("zero_tail_from") as usize)),
                zero_weights: int("zero_weight_from") as usize..int("zero_weight_to") as usize,
                pattern_2_4: case["pattern_2_4"].as_bool().expect("pattern_2_4"),
            }
        }

        /// The case's values (row-major) and per-column weights, drawn as
        /// weighted_golden.c draws them.
        fn generate(&self) -> (Vec<f32>, Vec<f32>) {
            let mut rng = SplitMix64(self.seed);
            let mut x: Vec<f32> = (0..self.rows * self.cols)
                .map(|_| {
                    let mut s = rng.uniform();
                    s += rng.uniform();
                    s += rng.uniform();
                    s += rng.uniform();
                    let g = (s - 2.0) * 1.732_050_8;
                    let v = self.x_scale * g;
                    if rng.next().is_multiple_of(self.outlier_every) {
                        v * 10.0
                    } else {
                        v
                    }
                })
                .collect();
            let mut w: Vec<f32> = (0..self.cols)
                .map(|_| {
                    if self.ones {
                        return 1.0;
                    }
                    let bits = rng.next();
                    if bits.is_multiple_of(64) {
                        return 0.0;
                    }
                    let exponent = ((bits >> 8) % 26) as i32 - 20;
                    let mantissa = ((bits >> 32) & 0x7F_FFFF) as u32;
                    f32::from_bits((((127 + exponent) as u32) << 23) | mantissa)
                })
                .collect();
            w[self.zero_weights.clone()].fill(0.0);
            for &row in &self.zero_rows {
                x[row * self.cols..(row + 1) * self.cols].fill(0.0);
            }
            if let Some((row, from)) = self.zero_tail {
                x[row * self.cols + from..(row + 1) * self.cols].fill(0.0);
            }
            if self.pattern_2_4 {
                for (i, v) in x.iter_mut().enumerate() {
                    if i % 4 >= 2 {
                        *v = 0.0;
                    }
                }
            }
            (x, w)
        }
    }

    /// The candle type named as the golden file names it.
    fn dtype_named(name: &str) -> GgmlDType {
        match name {
            "Q4_0" => GgmlDType::Q4_0,
            "Q4_1" => GgmlDType::Q4_1,
            "Q5_0" => GgmlDType::Q5_0,
            "Q5_1" => GgmlDType::Q5_1,
            "Q2K" => GgmlDType::Q2K,
            "Q3K" => GgmlDType::Q3K,
            "Q4K" => GgmlDType::Q4K,
            "Q5K" => GgmlDType::Q5K,
            "Q6K" => GgmlDType::Q6K,
            other => panic!("golden file names unknown type {other}"),
        }
    }

    /// Bytes from lowercase hex.
    fn from_hex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("golden hex"))
            .collect()
    }

    /// FNV-1a 64 of `bytes`, as weighted_golden.c computes it.
    fn fnv1a64(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    #[test]
    fn weighted_matches_llama_cpp_golden_bytes() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/weighted.json"))
                .expect("tests/golden/weighted.json parses");
        let cases = golden["cases"].as_array().expect("golden cases");
        assert!(!cases.is_empty());
        let mut failures = Vec::new();
        let mut checked = 0;
        for case_json in cases {
            let case = Case::from_json(case_json);
            let (x, w) = case.generate();
            let outputs = case_json["outputs"].as_object().expect("golden outputs");
            for (type_name, expected) in outputs {
                let dtype = dtype_named(type_name);
                let got = quantize_weighted(dtype, &x, &w)
                    .unwrap_or_else(|e| panic!("{} {type_name}: {e}", case.name));
                checked += 1;
                let len = expected["len"].as_u64().expect("len") as usize;
                if got.len() != len {
                    failures.push(format!(
                        "{} {type_name}: {} bytes, llama.cpp wrote {len}",
                        case.name,
                        got.len()
                    ));
                    continue;
                }
                if let Some(hex) = expected["hex"].as_str() {
                    let want = from_hex(hex);
                    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                        let block_bytes = block_layout(dtype).map_or(1, |(_, b)| b);
                        failures.push(format!(
                            "{} {type_name}: first difference at byte {i} (block {}, byte {} of {block_bytes}): got {:#04x}, llama.cpp {:#04x}; {} of {} bytes differ",
                            case.name,
                            i / block_bytes,
                            i % block_bytes,
                            got[i],
                            want[i],
                            got.iter().zip(&want).filter(|(a, b)| a != b).count(),
                            len
                        ));
                    }
                } else {
                    let want = expected["fnv1a64"].as_str().expect("fnv1a64");
                    let have = format!("{:016x}", fnv1a64(&got));
                    if have != want {
                        failures.push(format!(
                            "{} {type_name}: FNV-1a {have}, llama.cpp's {want}",
                            case.name
                        ));
                    }
                }
            }
        }
        assert!(checked >= 9, "golden file holds only {checked} outputs");
        assert!(
            failures.is_empty(),
            "{} of {checked} outputs differ from llama.cpp's:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn weighted_type_table_matches_candle() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            assert!(uses_weights(dtype), "{dtype:?}");
            assert_eq!(
                block_layout(dtype),
                Some((dtype.block_size(), dtype.type_size())),
                "{dtype:?}"
            );
        }
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q8_0,
            GgmlDType::Q8_1,
            GgmlDType::Q8K,
        ] {
            assert!(!uses_weights(dtype), "{dtype:?}");
        }
    }

    #[test]
    fn weighted_rejects_bad_input() {
        let x = vec![0.5f32; 512];
        let w = vec![1.0f32; 256];
        let err = quantize_weighted(GgmlDType::Q8_0, &x, &w).unwrap_err();
        assert!(err.contains("Q8_0"), "{err}");
        assert!(quantize_weighted(GgmlDType::F16, &x, &w).is_err());

        let err = quantize_weighted(GgmlDType::Q4_0, &x[..200], &w[..100]).unwrap_err();
        assert!(err.contains("100") && err.contains("32"), "{err}");
        let err = quantize_weighted(GgmlDType::Q4K, &x, &w[..128]).unwrap_err();
        assert!(err.contains("128") && err.contains("256"), "{err}");

        let err = quantize_weighted(GgmlDType::Q4K, &x[..300], &w).unwrap_err();
        assert!(err.contains("300"), "{err}");
        assert!(quantize_weighted(GgmlDType::Q4_0, &x, &[]).is_err());

        let mut negative = w.clone();
        negative[7] = -0.25;
        let err = quantize_weighted(GgmlDType::Q4_0, &x, &negative).unwrap_err();
        assert!(err.contains("column 7"), "{err}");
        let mut nan = w.clone();
        nan[3] = f32::NAN;
        assert!(quantize_weighted(GgmlDType::Q6K, &x, &nan).is_err());
        let mut inf = w.clone();
        inf[0] = f32::INFINITY;
        assert!(quantize_weighted(GgmlDType::Q2K, &x, &inf).is_err());

        assert_eq!(quantize_weighted(GgmlDType::Q4_0, &[], &w), Ok(Vec::new()));
        assert_eq!(
            quantize_weighted(GgmlDType::Q4K, &x, &w).map(|b| b.len()),
            Ok(2 * 144)
        );
    }

    /// Σ w[column]·(x − y)² over rows of `w.len()` columns.
    fn weighted_error(x: &[f32], y: &[f32], w: &[f32]) -> f64 {
        x.iter()
            .zip(y)
            .enumerate()
            .map(|(i, (a, b))| f64::from(w[i % w.len()]) * f64::from(a - b).powi(2))
            .sum()
    }

    #[test]
    fn weighted_error_not_above_candles_unweighted() {
        let case = Case {
            name: "sanity".into(),
            seed: 42,
            rows: 16,
            cols: 1024,
            x_scale: 0.02,
            outlier_every: 32,
            ones: false,
            zero_rows: Vec::new(),
            zero_tail: None,
            zero_weights: 0..0,
            pattern_2_4: false,
        };
        let (x, w) = case.generate();
        let dims = vec![case.rows, case.cols];
        for dtype in [GgmlDType::Q4K, GgmlDType::Q4_0] {
            let bytes = quantize_weighted(dtype, &x, &w).expect("quantizes");
            let ours = qtensor_from_ggml(dtype, &bytes, dims.clone(), &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("our bytes load in candle");
            let tensor =
                Tensor::from_vec(x.clone(), (case.rows, case.cols), &Device::Cpu).expect("tensor");
            let theirs = QTensor::quantize(&tensor, dtype)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("candle quantizes");
            let (e_ours, e_theirs) = (
                weighted_error(&x, &ours, &w),
                weighted_error(&x, &theirs, &w),
            );
            assert!(
                e_ours <= e_theirs,
                "{dtype:?}: weighted error {e_ours} above candle's unweighted {e_theirs}"
            );
            // Our bytes decode to the values: the plain error stays in the
            // range of candle's own.
            let plain = vec![1.0f32; case.cols];
            assert!(
                weighted_error(&x, &ours, &plain) < 4.0 * weighted_error(&x, &theirs, &plain),
                "{dtype:?}: unweighted error far above candle's"
            );
        }
    }

    #[test]
    fn weighted_nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-7.49), -7);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(fp16_bits(f32::NAN), 0x7E00);
        assert_eq!(fp16_bits(-f32::NAN), 0xFE00);
        assert_eq!(fp16_bits(1e6), 0x7C00);
    }
}
