//! The CPU backend: host `Vec<f32>` buffers (activations are f32 too) and the
//! `kernels::cpu` kernels through [`crate::ops`] and [`crate::weights`].
//!
//! Every operation is the one the CPU forward always ran, in the same order,
//! so the numbers are those of [`crate::LlamaShard`] before the loop was
//! shared. Two KV stores implement [`KvCache`] for it: the paged [`KvPool`]
//! (block tables of the step, kept in [`CpuMeta`]) and the contiguous
//! per-sequence caches of [`crate::LlamaShard::forward`].

use std::ops::Range;

use crate::collective::Collective;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::Activation;
use crate::kv::{KvDtype, KvLayer, KvPool};
use crate::ops::{self, AttnRow, KvRows, RopeTable};
use crate::shard::ShardLayout;
use crate::weights::{Embedding, Linear, Mat, WeightFormat};
use half::{bf16, f16};
use kernels::cpu::attn::{AttnParams, KvElem};

use super::{Backend, Elem, Heads, KvCache, PagedKv, StepRows};

/// The CPU backend of one shard: its matmul format, RoPE tables, heads and
/// KV element type.
pub struct CpuBackend {
    format: WeightFormat,
    kv_dtype: KvDtype,
    rope: RopeTable,
    /// The windowed layers' table, where it differs (Gemma 3).
    rope_windowed: Option<RopeTable>,
    heads: Heads,
}

impl CpuBackend {
    /// The backend of a shard with `layout`, computing in `format`.
    pub fn new(config: &ModelConfig, layout: &ShardLayout, format: WeightFormat) -> Self {
        let hd = config.head_dim;
        Self {
            format,
            kv_dtype: KvDtype::F32,
            rope: RopeTable::new(hd, &config.rope, config.context),
            rope_windowed: config
                .sliding
                .as_ref()
                .filter(|s| s.rope != config.rope)
                .map(|s| RopeTable::new(hd, &s.rope, config.context)),
            heads: Heads {
                n_heads: layout.heads.len(),
                n_kv: layout.kv_heads.len(),
                head_dim: hd,
            },
        }
    }

    /// The same backend storing its paged KV cache in `dtype`.
    pub fn with_kv_dtype(self, dtype: KvDtype) -> Self {
        Self {
            kv_dtype: dtype,
            ..self
        }
    }

    /// The format the matmuls run in.
    pub fn format(&self) -> WeightFormat {
        self.format
    }
}

/// One step's rows on the host.
#[derive(Debug, Default)]
pub struct CpuMeta {
    tokens: Vec<u32>,
    /// Each row's item.
    pub(crate) item: Vec<usize>,
    /// Each row's position.
    pub(crate) pos: Vec<usize>,
    /// Every item's block table, concatenated, and where each starts.
    tables: Vec<u32>,
    table_range: Vec<Range<usize>>,
    picked: Vec<usize>,
}

impl CpuMeta {
    fn table(&self, item: usize) -> &[u32] {
        &self.tables[self.table_range[item].clone()]
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = Linear;
    type Vector = Vec<f32>;
    type Table = Embedding;
    type Meta = CpuMeta;
    type Kv = KvPool;

    fn heads(&self) -> Heads {
        self.heads
    }

    fn weight(&mut self, m: Mat) -> Result<Linear> {
        Linear::with_format(m, self.format)
    }

    fn out_features(w: &Linear) -> usize {
        w.out_features()
    }

    fn vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn table(&mut self, m: Mat, vocab: Range<usize>) -> Result<Embedding> {
        Embedding::new(m, vocab)
    }

    fn new_kv(&self, layers: usize, block_size: usize, n_blocks: usize) -> Result<KvPool> {
        Ok(KvPool::with_dtype(
            layers,
            self.heads.kv_width(),
            block_size,
            n_blocks,
            self.kv_dtype,
        ))
    }

    fn alloc(&self, _elem: Elem, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }

    fn new_meta(&self) -> Result<CpuMeta> {
        Ok(CpuMeta::default())
    }

    fn load_meta(&self, meta: &mut CpuMeta, step: &StepRows<'_>) -> Result<()> {
        let r = step.rows;
        meta.tokens.clone_from(&r.tokens);
        meta.item.clone_from(&r.item);
        meta.pos.clone_from(&r.pos);
        meta.tables.clear();
        meta.table_range.clear();
        for t in step.tables {
            let start = meta.tables.len();
            meta.tables.extend_from_slice(t);
            meta.table_range.push(start..meta.tables.len());
        }
        meta.picked.clear();
        meta.picked.extend_from_slice(step.picked);
        Ok(())
    }

    fn upload(&self, buf: &mut Vec<f32>, data: &[f32]) -> Result<()> {
        buf[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn download(&self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        Ok(buf[..len].to_vec())
    }

    fn non_finite_rows(&self, x: &Vec<f32>, rows: usize, width: usize) -> Result<Vec<usize>> {
        Ok(x[..rows * width]
            .chunks_exact(width)
            .enumerate()
            .filter(|(_, r)| !crate::sampling::all_finite(r))
            .map(|(i, _)| i)
            .collect())
    }

    fn embed(
        &self,
        table: &Embedding,
        meta: &CpuMeta,
        out: &mut Vec<f32>,
        rows: usize,
    ) -> Result<()> {
        let out = &mut out[..rows * table.hidden()];
        out.fill(0.0);
        table.lookup_into(&meta.tokens, out)
    }

    fn add_positions(
        &self,
        table: &Embedding,
        meta: &CpuMeta,
        x: &mut Vec<f32>,
        rows: usize,
    ) -> Result<()> {
        let pos: Vec<u32> = meta.pos[..rows].iter().map(|&p| p as u32).collect();
        let mut rows_of = vec![0f32; rows * table.hidden()];
        table.lookup_into(&pos, &mut rows_of)?;
        self.add(x, &rows_of, rows_of.len())
    }

    fn layer_norm(
        &self,
        x: &mut Vec<f32>,
        residual: Option<&Vec<f32>>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let len = rows * width;
        if let Some(d) = residual {
            self.add(x, d, len)?;
        }
        par_rows(&x[..len], width, &mut out[..len], width, |x, o| {
            ops::layer_norm(x, w, b, eps, o)
        });
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &mut Vec<f32>,
        residual: Option<&Vec<f32>>,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let len = rows * width;
        if let Some(d) = residual {
            self.add(x, d, len)?;
        }
        par_rows(&x[..len], width, &mut out[..len], width, |x, o| {
            ops::rms_norm(x, w, eps, o)
        });
        Ok(())
    }

    fn linear(
        &self,
        w: &Linear,
        x: &Vec<f32>,
        out: &mut Vec<f32>,
        _out_elem: Elem,
        rows: usize,
    ) -> Result<()> {
        let k = w.in_features();
        w.forward_into(&x[..rows * k], rows, out)
    }

    fn add_bias(
        &self,
        x: &mut Vec<f32>,
        bias: &Vec<f32>,
        rows: usize,
        width: usize,
        _elem: Elem,
    ) -> Result<()> {
        for row in x[..rows * width].chunks_exact_mut(width) {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
        Ok(())
    }

    fn head_norm(
        &self,
        qkv: &mut Vec<f32>,
        q_w: &Vec<f32>,
        k_w: &Vec<f32>,
        eps: f32,
        rows: usize,
    ) -> Result<()> {
        let hd = self.heads;
        let (q_w_len, k_len) = (hd.q_width(), hd.kv_width());
        let qkv_w = hd.qkv_width();
        let mut head = vec![0f32; hd.head_dim];
        for row in qkv[..rows * qkv_w].chunks_exact_mut(qkv_w) {
            let (q, kv) = row.split_at_mut(q_w_len);
            for (part, w) in [(q, q_w), (&mut kv[..k_len], k_w)] {
                for h in part.chunks_exact_mut(hd.head_dim) {
                    head.copy_from_slice(h);
                    ops::rms_norm(&head, w, eps, h);
                }
            }
        }
        Ok(())
    }

    fn rope(&self, qkv: &mut Vec<f32>, meta: &CpuMeta, rows: usize, windowed: bool) -> Result<()> {
        let table = match &self.rope_windowed {
            Some(t) if windowed => t,
            _ => &self.rope,
        };
        let (q_w, kv_w) = (self.heads.q_width(), self.heads.kv_width());
        let qkv_w = self.heads.qkv_width();
        let pos = &meta.pos[..rows];
        par_rows_mut(&mut qkv[..rows * qkv_w], qkv_w, |first, part| {
            for (r, row) in part.chunks_exact_mut(qkv_w).enumerate() {
                let (q, kv_part) = row.split_at_mut(q_w);
                table.apply(q, pos[first + r]);
                table.apply(&mut kv_part[..kv_w], pos[first + r]);
            }
        });
        Ok(())
    }

    fn gated_act(
        &self,
        gate_up: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        width: usize,
        act: Activation,
    ) -> Result<()> {
        let (gate_up, out) = (&gate_up[..rows * 2 * width], &mut out[..rows * width]);
        par_rows(gate_up, 2 * width, out, width, |g, o| match act {
            Activation::Silu => ops::silu_mul(g, width, o),
            Activation::GeluTanh => ops::gelu_tanh_mul(g, width, o),
        });
        Ok(())
    }

    fn act(
        &self,
        x: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        width: usize,
        act: Activation,
    ) -> Result<()> {
        let (x, out) = (&x[..rows * width], &mut out[..rows * width]);
        match act {
            Activation::Silu => ops::silu(x, out),
            Activation::GeluTanh => ops::gelu_tanh(x, out),
        }
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32, len: usize) -> Result<()> {
        x[..len].iter_mut().for_each(|x| *x *= s);
        Ok(())
    }

    fn rms_norm_f32(
        &self,
        x: &mut Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let mut row_in = vec![0f32; width];
        for row in x[..rows * width].chunks_exact_mut(width) {
            row_in.copy_from_slice(row);
            ops::rms_norm(&row_in, w, eps, row);
        }
        Ok(())
    }

    fn softcap(&self, x: &mut Vec<f32>, cap: f32, len: usize) -> Result<()> {
        x[..len]
            .iter_mut()
            .for_each(|x| *x = cap * (*x / cap).tanh());
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, delta: &Vec<f32>, len: usize) -> Result<()> {
        let delta = &delta[..len];
        // Elementwise, so any cut gives the same sums: cut in 1024s.
        par_rows_mut(&mut x[..len], ADD_SPAN, |first, part| {
            let d = &delta[first * ADD_SPAN..][..part.len()];
            part.iter_mut().zip(d).for_each(|(x, d)| *x += d);
        });
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        meta: &CpuMeta,
        out: &mut Vec<f32>,
        width: usize,
    ) -> Result<()> {
        for (k, &r) in meta.picked.iter().enumerate() {
            out[k * width..(k + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn all_reduce(&self, buf: &mut Vec<f32>, len: usize, host: &dyn Collective) -> Result<()> {
        host.all_reduce_sum(&mut buf[..len])
    }
}

/// A sequence's keys and values in a store's element type.
pub enum KvView<'s> {
    /// f32 elements.
    F32(KvRows<'s, f32>, KvRows<'s, f32>),
    /// f16 elements.
    F16(KvRows<'s, f16>, KvRows<'s, f16>),
    /// bf16 elements.
    Bf16(KvRows<'s, bf16>, KvRows<'s, bf16>),
}

/// The element types a [`KvView`] holds, for the attention over them.
trait ViewElem: KvElem {
    fn pick(v: KvView<'_>) -> Option<(KvRows<'_, Self>, KvRows<'_, Self>)>;
}

impl ViewElem for f32 {
    fn pick(v: KvView<'_>) -> Option<(KvRows<'_, f32>, KvRows<'_, f32>)> {
        match v {
            KvView::F32(k, v) => Some((k, v)),
            _ => None,
        }
    }
}

impl ViewElem for f16 {
    fn pick(v: KvView<'_>) -> Option<(KvRows<'_, f16>, KvRows<'_, f16>)> {
        match v {
            KvView::F16(k, v) => Some((k, v)),
            _ => None,
        }
    }
}

impl ViewElem for bf16 {
    fn pick(v: KvView<'_>) -> Option<(KvRows<'_, bf16>, KvRows<'_, bf16>)> {
        match v {
            KvView::Bf16(k, v) => Some((k, v)),
            _ => None,
        }
    }
}

/// Attention of the step's `rows` rows over their sequences in `kv` (whose
/// elements are of type `T`).
fn attend_rows<T: ViewElem, S: CpuKv + ?Sized>(
    (be, kv, meta, layer): (&CpuBackend, &S, &CpuMeta, usize),
    qkv: &[f32],
    rows: usize,
    params: &AttnParams,
    out: &mut [f32],
) -> Result<()> {
    let hd = be.heads;
    let rows = (0..rows)
        .map(|r| {
            T::pick(kv.view(meta, layer, r))
                .map(|(k, v)| AttnRow {
                    k,
                    v,
                    pos: meta.pos[r],
                })
                .ok_or_else(|| Error::Shard("a KV store mixes element types".into()))
        })
        .collect::<Result<Vec<AttnRow<'_, T>>>>()?;
    ops::attention_params(
        qkv,
        hd.qkv_width(),
        &rows,
        (hd.n_heads, hd.n_kv, hd.head_dim),
        params,
        out,
    );
    Ok(())
}

/// Where the CPU backend writes and reads a row's keys and values (every
/// such store is a [`KvCache`] of the CPU backend).
pub trait CpuKv {
    /// Writes one position's key and value of `layer` (rounded to the
    /// store's element type).
    fn write(&mut self, meta: &CpuMeta, layer: usize, row: usize, k: &[f32], v: &[f32]);
    /// The keys and values of the sequence of `row`.
    fn view<'s>(&'s self, meta: &'s CpuMeta, layer: usize, row: usize) -> KvView<'s>;
}

impl<S: CpuKv> KvCache<CpuBackend> for S {
    fn attend(
        &mut self,
        be: &CpuBackend,
        layer: usize,
        qkv: &Vec<f32>,
        meta: &CpuMeta,
        out: &mut Vec<f32>,
        rows: usize,
        params: &AttnParams,
    ) -> Result<()> {
        let hd = be.heads;
        let (q_w, kv_w, qkv_w) = (hd.q_width(), hd.kv_width(), hd.qkv_width());
        let qkv = &qkv[..rows * qkv_w];
        for (r, row) in qkv.chunks_exact(qkv_w).enumerate() {
            let (k, v) = row[q_w..].split_at(kv_w);
            self.write(meta, layer, r, k, v);
        }
        if rows == 0 {
            return Ok(());
        }
        let out = &mut out[..rows * q_w];
        let at = (be, &*self, meta, layer);
        // The store's element type, from its first row's view.
        match self.view(meta, layer, 0) {
            KvView::F32(..) => attend_rows::<f32, S>(at, qkv, rows, params, out),
            KvView::F16(..) => attend_rows::<f16, S>(at, qkv, rows, params, out),
            KvView::Bf16(..) => attend_rows::<bf16, S>(at, qkv, rows, params, out),
        }
    }
}

impl CpuKv for KvPool {
    fn write(&mut self, meta: &CpuMeta, layer: usize, row: usize, k: &[f32], v: &[f32]) {
        let table = meta.table(meta.item[row]);
        KvPool::write(self, layer, table, meta.pos[row], k, v);
    }

    fn view<'s>(&'s self, meta: &'s CpuMeta, layer: usize, row: usize) -> KvView<'s> {
        fn paged<'s, T>(data: &'s [T], table: &'s [u32], block_size: usize) -> KvRows<'s, T> {
            KvRows::Paged {
                data,
                table,
                block_size,
            }
        }
        let (table, bs) = (meta.table(meta.item[row]), self.block_size());
        match self.layer(layer) {
            KvLayer::F32(k, v) => KvView::F32(paged(k, table, bs), paged(v, table, bs)),
            KvLayer::F16(k, v) => KvView::F16(paged(k, table, bs), paged(v, table, bs)),
            KvLayer::Bf16(k, v) => KvView::Bf16(paged(k, table, bs), paged(v, table, bs)),
        }
    }
}

impl PagedKv<CpuBackend> for KvPool {
    fn block_size(&self) -> usize {
        KvPool::block_size(self)
    }

    fn n_blocks(&self) -> usize {
        KvPool::n_blocks(self)
    }

    fn n_layers(&self) -> usize {
        KvPool::n_layers(self)
    }

    fn elem_bytes(&self) -> usize {
        self.dtype().bytes()
    }

    fn copy_block(&mut self, _be: &CpuBackend, src: u32, dst: u32) -> Result<()> {
        if src as usize >= KvPool::n_blocks(self) || dst as usize >= KvPool::n_blocks(self) {
            return Err(Error::Shard(format!(
                "block copy {src} → {dst} outside a {}-block pool",
                KvPool::n_blocks(self)
            )));
        }
        KvPool::copy_block(self, src, dst);
        Ok(())
    }
}

/// Row-wise work of at least this many values is split over the current
/// pool.
const PAR_MIN_VALUES: usize = 1 << 16;

/// Values per "row" of [`CpuBackend`]'s parallel elementwise add.
const ADD_SPAN: usize = 1024;

/// `f(first row, rows)` over `x` (rows of `w` values) in place, in blocks
/// of whole rows on the current pool when there are many values (a
/// prefill), else on the calling thread. `f` works row by row, so every
/// row's result is the same either way. A last row shorter than `w` is
/// passed as it is.
fn par_rows_mut(x: &mut [f32], w: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let values = x.len();
    par_blocks(x, w, values, f)
}

/// The common part of [`par_rows_mut`] and [`par_rows`]: `f(first row,
/// rows)` over `x` (rows of `w`), split over the pool's threads when the
/// call touches at least [`PAR_MIN_VALUES`] `values` and has 2 rows or more.
fn par_blocks(x: &mut [f32], w: usize, values: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = x.len().div_ceil(w.max(1));
    crate::threads::with_current(|pool| {
        let threads = pool.threads();
        if threads < 2 || rows < 2 || values < PAR_MIN_VALUES {
            return f(0, x);
        }
        let per = rows.div_ceil(threads);
        pool.chunks_mut(x, per * w, |c, part| f(c * per, part))
    })
}

/// `f(input rows, output rows)` over `input` (rows of `w_in` values) and
/// `out` (rows of `w_out`), in blocks of whole rows on the current pool
/// when there are many values (a prefill), else on the calling thread.
/// Every row's result is the same either way (`f` works row by row).
fn par_rows(
    input: &[f32],
    w_in: usize,
    out: &mut [f32],
    w_out: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    let rows = input.len().checked_div(w_in).unwrap_or(0);
    if w_out == 0 || out.len() != rows * w_out {
        return f(input, out);
    }
    let values = input.len().max(out.len());
    par_blocks(out, w_out, values, |first, o| {
        f(&input[first * w_in..(first + o.len() / w_out) * w_in], o)
    })
}
