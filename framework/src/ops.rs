//! The non-matmul operations of a Llama block, on plain row-major `f32` slices.
//!
//! Thin calls into `kernels::cpu`: [`rms_norm`], [`silu_mul`],
//! [`RopeTable::apply`] and [`attention`] run the SIMD kernels
//! (`kernels::cpu::ops::{rms_norm, silu_mul, rope}`,
//! `kernels::cpu::attn::attention`: GQA-aware, each KV head read once for its
//! query group), which the kernels crate tests against its scalar references
//! (RoPE bit-identical, attention within 1e-5 of the value scale, RMSNorm and
//! SiLU within 1e-6 relative). [`attention_reference`] is the scalar one.

use kernels::cpu::{attn, ops as kops};

use crate::config::RopeConfig;
use crate::family::RopeStyle;

pub use kernels::cpu::attn::{AttnRow, KvRows};

/// RMSNorm of each `width`-wide row of `x` into `out`: `x / rms(x) · weight`
/// (Zhang & Sennrich 2019), with the mean taken in f32 as llama.cpp does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    kops::rms_norm(x, weight, eps, out)
}

/// LayerNorm of each `width`-wide row of `x` into `out`: `(x − mean) /
/// √(var + eps) · weight + bias` (Ba et al. 2016), the mean and variance
/// summed in f64 and the scale in f32, as ggml's `ggml_norm` computes them.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean = (row.iter().map(|&v| v as f64).sum::<f64>() / width as f64) as f32;
        let mut sum2 = 0f64;
        for (o, &v) in o.iter_mut().zip(row) {
            *o = v - mean;
            sum2 += (*o as f64) * (*o as f64);
        }
        let scale = 1.0 / ((sum2 / width as f64) as f32 + eps).sqrt();
        for ((o, &w), &b) in o.iter_mut().zip(weight).zip(bias) {
            *o = *o * scale * w + b;
        }
    }
}

/// Precomputed rotary-embedding angles (Su et al. 2021, RoFormer) for every
/// position up to the context window, and the pairing they are applied in.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// Rotated pairs per head.
    half: usize,
    head_dim: usize,
    style: RopeStyle,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles `pos · freq_scale · base^(-2i/dims) / freq_factors[i]` for
    /// `pos < context`, over the `dims` rotated dimensions of a head
    /// (computed in f64, rounded once). With YaRN, pair `i`'s angle blends
    /// that with the unscaled one by the ramp between the correction
    /// dimensions, and every cosine and sine is scaled by its `mscale`
    /// (llama.cpp's `rope_yarn`); all are scaled by `attn_factor`.
    pub fn new(head_dim: usize, rope: &RopeConfig, context: usize) -> Self {
        let dims = rope.dims(head_dim);
        let half = dims / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        // Per pair: the unscaled frequency, and the share of it kept.
        let corr = rope.yarn.map(|y| y.corr_dims(dims, rope.base));
        let freqs: Vec<(f64, f64)> = (0..half)
            .map(|i| {
                let factor = rope.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                let extrap = 1.0 / factor / (rope.base as f64).powf(2.0 * i as f64 / dims as f64);
                let keep = corr.map_or(0.0, |(low, high)| {
                    crate::config::Yarn::ramp(low, high, i) as f64
                });
                (extrap, keep)
            })
            .collect();
        let scale = rope.freq_scale as f64;
        let mscale = rope.yarn.map_or(1.0, |y| y.mscale as f64) * rope.attn_factor as f64;
        for pos in 0..context {
            for &(f, keep) in &freqs {
                let extrap = pos as f64 * f;
                let angle = extrap * scale * (1.0 - keep) + extrap * keep;
                cos.push((angle.cos() * mscale) as f32);
                sin.push((angle.sin() * mscale) as f32);
            }
        }
        Self {
            half,
            head_dim,
            style: rope.style,
            cos,
            sin,
        }
    }

    /// The cosine and sine tables, `context × dims/2` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates every `head_dim`-wide head in `heads` (one token's heads) by the
    /// angles of `pos`. [`RopeStyle::Normal`] pairs adjacent elements
    /// `(2i, 2i+1)`: GGUF's Llama q/k weights are stored permuted for this
    /// layout (llama.cpp's "normal" rope). [`RopeStyle::Neox`] pairs the
    /// halves `(i, i + dims/2)` of the rotated dimensions. With a partial
    /// rotary embedding, each head's dimensions from `dims` on are left as
    /// they are.
    pub fn apply(&self, heads: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        let rotate = |x: &mut [f32]| match self.style {
            RopeStyle::Normal => kops::rope(x, cos, sin),
            RopeStyle::Neox => kops::rope_neox(x, cos, sin),
        };
        if 2 * self.half == self.head_dim {
            rotate(heads);
        } else {
            for head in heads.chunks_exact_mut(self.head_dim) {
                rotate(&mut head[..2 * self.half]);
            }
        }
    }
}

/// `silu(gate) · up` for rows laid out as `[gate (width) | up (width)]`.
pub fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
    kops::silu_mul(gate_up, width, out)
}

/// GELU's tanh approximation (Hendrycks & Gimpel 2016), in f32 as ggml
/// writes it.
#[inline]
fn gelu_tanh_one(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// `gelu(gate) · up` (GELU's tanh approximation) for rows laid out as
/// `[gate (width) | up (width)]`.
pub fn gelu_tanh_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
    for (row, o) in gate_up
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (gate, up) = row.split_at(width);
        for ((o, &x), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = gelu_tanh_one(x) * u;
        }
    }
}

/// `out = gelu(x)` (tanh approximation), elementwise.
pub fn gelu_tanh(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu_tanh_one(v);
    }
}

/// `out = silu(x)`, elementwise.
pub fn silu(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v / (1.0 + (-v).exp());
    }
}

/// Inner product written as eight independent accumulators so it vectorizes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// [`attention`] with a layer's scale, soft-cap and window, over keys and
/// values of any cache element type.
pub fn attention_params<T: attn::KvElem>(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_, T>],
    heads: (usize, usize, usize),
    params: &attn::AttnParams,
    out: &mut [f32],
) {
    attn::attention_params(q, q_stride, rows, heads, params, out)
}

/// Causal grouped-query attention for a batch of query rows.
///
/// Row `r`'s queries are `q[r·q_stride..][..n_heads·head_dim]` (a stride wider
/// than the queries reads them in place from fused q|k|v rows); query head `h`
/// reads KV head `h / group`. Writes `rows × (n_heads·head_dim)` into `out`.
/// Softmax in f32 with the running maximum subtracted. Positions are looked up
/// by index whatever the KV layout, so flat and paged caches give
/// bit-identical results.
pub fn attention(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_>],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    attn::attention(q, q_stride, rows, n_heads, n_kv_heads, head_dim, out)
}

/// The scalar reference attention (same arguments).
pub fn attention_reference(
    q: &[f32],
    q_stride: usize,
    rows: &[AttnRow<'_>],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    attn::attention_scalar(q, q_stride, rows, n_heads, n_kv_heads, head_dim, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_centres_and_scales_each_row_then_applies_weight_and_bias() {
        let x = [1.0f32, 2.0, 3.0, 4.0, -2.0, 0.0, 2.0, 8.0];
        let (w, b) = ([1.0f32, 2.0, 0.5, 1.0], [0.0f32, 1.0, -1.0, 0.25]);
        let mut out = [0f32; 8];
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        for (row, o) in x.chunks_exact(4).zip(out.chunks_exact(4)) {
            let mean = row.iter().sum::<f32>() / 4.0;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
            for i in 0..4 {
                let want = (row[i] - mean) / (var + 1e-5).sqrt() * w[i] + b[i];
                assert!((o[i] - want).abs() < 1e-5, "{} vs {want}", o[i]);
            }
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_at_zero_is_identity_and_preserves_norm() {
        let t = RopeTable::new(8, &RopeConfig::plain(10_000.0, RopeStyle::Normal), 16);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let mut v = orig.clone();
        t.apply(&mut v, 0);
        assert_eq!(v, orig);
        t.apply(&mut v, 7);
        let n0: f32 = orig.iter().map(|x| x * x).sum();
        let n1: f32 = v.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn partial_rope_rotates_the_first_dims_of_each_head_with_their_own_frequencies() {
        // Two heads of 8, the first 4 of each rotated (NeoX: pairs (0, 2)
        // and (1, 3)), with frequencies over 4 dimensions, LongRoPE-style
        // divisors and an attention factor; the last 4 pass through.
        let rope = RopeConfig {
            rot_dims: Some(4),
            freq_factors: Some(vec![1.0, 4.0]),
            attn_factor: 1.5,
            ..RopeConfig::plain(100.0, RopeStyle::Neox)
        };
        let t = RopeTable::new(8, &rope, 8);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 + 0.05).collect();
        let mut v = orig.clone();
        let pos = 3;
        t.apply(&mut v, pos);
        for h in 0..2 {
            let (o, x) = (&v[h * 8..h * 8 + 8], &orig[h * 8..h * 8 + 8]);
            assert_eq!(&o[4..], &x[4..], "head {h}: unrotated tail");
            for i in 0..2 {
                let theta = pos as f64 / [1.0, 4.0][i] / 100f64.powf(2.0 * i as f64 / 4.0);
                let (c, s) = (theta.cos() * 1.5, theta.sin() * 1.5);
                let (a, b) = (x[i] as f64, x[i + 2] as f64);
                assert!(
                    (o[i] as f64 - (a * c - b * s)).abs() < 1e-5,
                    "head {h} pair {i}"
                );
                assert!(
                    (o[i + 2] as f64 - (a * s + b * c)).abs() < 1e-5,
                    "head {h} pair {i}"
                );
            }
        }
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let k = [1.0, 0.0, 0.0, 1.0];
        let v = [5.0, 6.0, 7.0, 8.0];
        let q = [1.0, 1.0, 2.0, 2.0];
        let mut out = [0.0; 4];
        let row = AttnRow {
            k: KvRows::Flat(&k),
            v: KvRows::Flat(&v),
            pos: 0,
        };
        // Two query heads sharing one... here two KV heads of width 2.
        attention(&q, 4, &[row], 2, 2, 2, &mut out);
        assert_eq!(out, [5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn paged_attention_equals_flat() {
        let (kv_w, n) = (4, 7);
        let k: Vec<f32> = (0..n * kv_w).map(|i| (i as f32 * 0.37).sin()).collect();
        let v: Vec<f32> = (0..n * kv_w).map(|i| (i as f32 * 0.11).cos()).collect();
        // Block size 3, blocks [2, 0, 1] of a 3-block pool.
        let table = [2u32, 0, 1];
        let mut pk = vec![0f32; 9 * kv_w];
        let mut pv = vec![0f32; 9 * kv_w];
        for p in 0..n {
            let o = (table[p / 3] as usize * 3 + p % 3) * kv_w;
            pk[o..o + kv_w].copy_from_slice(&k[p * kv_w..][..kv_w]);
            pv[o..o + kv_w].copy_from_slice(&v[p * kv_w..][..kv_w]);
        }
        let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.3).collect();
        let flat = AttnRow {
            k: KvRows::Flat(&k),
            v: KvRows::Flat(&v),
            pos: n - 1,
        };
        let paged = AttnRow {
            k: KvRows::Paged {
                data: &pk,
                table: &table,
                block_size: 3,
            },
            v: KvRows::Paged {
                data: &pv,
                table: &table,
                block_size: 3,
            },
            pos: n - 1,
        };
        let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
        attention(&q, 8, &[flat], 4, 2, 2, &mut a);
        attention(&q, 8, &[paged], 4, 2, 2, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.5).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
