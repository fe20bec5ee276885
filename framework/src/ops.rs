//! The non-matmul operations of a Llama block, on plain row-major `f32` slices.
//!
//! These are the CPU reference versions: straightforward loops written so the
//! compiler can vectorize the inner products. The `kernels` crate will replace
//! the hot ones; these stay as the definition they are tested against.

use rayon::prelude::*;

/// RMSNorm of each `width`-wide row of `x` into `out`: `x / rms(x) · weight`
/// (Zhang & Sennrich 2019), with the mean taken in f32 as llama.cpp does.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((d, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * scale * w;
        }
    }
}

/// Precomputed rotary-embedding angles (Su et al. 2021, RoFormer) for every
/// position up to the context window.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles `pos · base^(-2i/head_dim)` for `pos < context`.
    pub fn new(head_dim: usize, base: f32, context: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        for pos in 0..context {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every `head_dim`-wide head in `heads` (one token's heads) by the
    /// angles of `pos`. Pairs are adjacent elements `(2i, 2i+1)`: GGUF's Llama
    /// q/k weights are stored permuted for this layout (llama.cpp's "normal" rope).
    pub fn apply(&self, heads: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in heads.chunks_exact_mut(2 * self.half) {
            for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

/// `silu(gate) · up` for rows laid out as `[gate (width) | up (width)]`.
pub fn silu_mul(gate_up: &[f32], width: usize, out: &mut [f32]) {
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

/// A sequence's cached keys (or values), `kv_width` floats per position: either
/// one contiguous run, or blocks of a paged pool ([`crate::kv`]) named by a
/// block table.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    /// Positions `0..` in order, `len × kv_width`.
    Flat(&'a [f32]),
    /// Position `p` is in block `table[p / block_size]` of `data`.
    Paged {
        /// The pool's storage for one layer.
        data: &'a [f32],
        /// The sequence's block table.
        table: &'a [u32],
        /// Positions per block.
        block_size: usize,
    },
}

impl<'a> KvRows<'a> {
    /// Calls `f(first, rows)` for contiguous runs that together cover positions
    /// `0..n` in order; `rows` holds `width` floats per position.
    #[inline]
    pub fn for_runs(&self, n: usize, width: usize, mut f: impl FnMut(usize, &'a [f32])) {
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
}

/// Where one query row attends: the sequence's cached keys/values and the
/// row's absolute position (it sees keys `0..=pos`).
#[derive(Debug, Clone, Copy)]
pub struct AttnRow<'a> {
    /// Keys.
    pub k: KvRows<'a>,
    /// Values, same layout.
    pub v: KvRows<'a>,
    /// Absolute position of the query token.
    pub pos: usize,
}

/// Causal grouped-query attention for a batch of query rows.
///
/// Row `r`'s queries are `q[r·q_stride..][..n_heads·head_dim]` (a stride wider
/// than the queries reads them in place from fused q|k|v rows); query head `h`
/// reads KV head `h / group`. Writes `rows × (n_heads·head_dim)` into `out`.
/// Softmax in f32 with the running maximum subtracted. Positions are visited in
/// the same order whatever the KV layout, so flat and paged caches give
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
    let q_width = n_heads * head_dim;
    let kv_width = n_kv_heads * head_dim;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let work = |(r, dst): (usize, &mut [f32])| {
        let row = rows[r];
        let n = row.pos + 1;
        let mut scores = vec![0f32; n];
        for h in 0..n_heads {
            let kvh = h / group;
            let qh = &q[r * q_stride + h * head_dim..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            row.k.for_runs(n, kv_width, |first, keys| {
                for (s, k) in scores[first..].iter_mut().zip(keys.chunks_exact(kv_width)) {
                    *s = dot(qh, &k[kvh * head_dim..][..head_dim]) * scale;
                    max = max.max(*s);
                }
            });
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut dst[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            row.v.for_runs(n, kv_width, |first, values| {
                for (&s, v) in scores[first..].iter().zip(values.chunks_exact(kv_width)) {
                    let w = s * inv;
                    for (o, &v) in oh.iter_mut().zip(&v[kvh * head_dim..][..head_dim]) {
                        *o += w * v;
                    }
                }
            });
        }
    };
    let total: usize = rows.iter().map(|r| r.pos + 1).sum();
    // Small batches are cheaper than a fork-join.
    if rows.len() > 1 && total * n_heads * head_dim > 1 << 16 {
        out.par_chunks_mut(q_width).enumerate().for_each(work);
    } else {
        out.chunks_mut(q_width).enumerate().for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = RopeTable::new(8, 10_000.0, 16);
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
