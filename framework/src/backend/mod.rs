//! The backend abstraction: what a device must offer for the transformer's
//! layer loop to run on it, and the one loop written over it.
//!
//! A [`Backend`] owns a device's buffers and the operations the Llama layer
//! loop needs (candle's `BackendDevice`/`BackendStorage` pair cut down to
//! those ops): workspace buffers ([`Elem::F32`] for the residual stream and
//! the row-parallel outputs that are all-reduced, [`Elem::Act`] for the
//! activations the matmuls read), RMSNorm or LayerNorm with a fused residual
//! add, matmul with a shard's weight, a bias add, a per-head RMSNorm of q and
//! k, RoPE in either pairing, the FFN's gated or plain activation, residual
//! add, the embedding lookup and learned position embeddings,
//! the gather of picked rows, upload/download of hidden rows, and the
//! all-reduce of the stage's tensor-parallel ranks over its buffers. Its KV
//! storage implements [`KvCache`] (write a layer's new keys and values, then
//! paged attention) and [`PagedKv`] (block copies, block count, element size).
//!
//! Implementations:
//! * [`cpu::CpuBackend`] — host `Vec<f32>` buffers and the `kernels::cpu`
//!   kernels (the numerics of [`crate::LlamaShard`]; its contiguous
//!   per-sequence caches are a second [`KvCache`] of the same backend);
//! * [`crate::cuda::CudaBackend`] — device buffers and the `kernels::cuda`
//!   kernels, on a GPU or its host emulation.
//!
//! [`transformer::Transformer`] is the layer loop, written once and generic
//! over the backend, built from the tensor-parallel layers of [`layers`].
//! [`Shard`] ([`shard`]) is what a compute node holds: a stage's shard on any
//! backend with its paged KV cache and workspace, chosen by a [`BackendKind`].
//!
//! **Invariant:** the layer loop exists once ([`transformer::Transformer`]);
//! backends differ only in the operations below. Outside `framework`, nothing
//! names a backend: the actors hold a [`Shard`] and a [`BackendKind`] value.

pub mod cpu;
pub mod layers;
pub mod shard;
pub mod transformer;

use std::ops::Range;

use crate::collective::Collective;
use crate::error::Result;
use crate::family::Activation;
use crate::model::{LogitsWanted, Rows};
use crate::weights::Mat;
use kernels::cpu::attn::AttnParams;

pub use shard::{BackendKind, Shard, ShardSource, StageGroup, StageShard};

/// The element type of a workspace buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// f32: the residual stream, norms' weights, all-reduced partial sums, logits.
    F32,
    /// The backend's activation type (the matmuls' input): f32 on the CPU,
    /// f16 or bf16 on CUDA.
    Act,
}

/// One shard's attention heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Local query heads.
    pub n_heads: usize,
    /// Local KV heads.
    pub n_kv: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl Heads {
    /// Width of the local queries.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the local keys (or values).
    pub fn kv_width(&self) -> usize {
        self.n_kv * self.head_dim
    }

    /// Width of a fused `q|k|v` row.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

/// One step's rows as the backend needs them before the layers run.
#[derive(Debug)]
pub struct StepRows<'a> {
    /// Every new token's row: token id, item, position.
    pub(crate) rows: &'a Rows,
    /// Every item: its new tokens, first position, logits wanted.
    pub(crate) items: &'a [(&'a [u32], usize, LogitsWanted)],
    /// Every item's block table (empty for contiguous caches).
    pub(crate) tables: &'a [&'a [u32]],
    /// Positions per KV block (0 for contiguous caches).
    pub(crate) block_size: usize,
    /// The rows whose logits were asked for, in order.
    pub(crate) picked: &'a [usize],
}

/// A device's buffers and the operations of the layer loop.
///
/// Buffers are sized by the [`Workspace`] for a number of rows; each
/// operation is told how many rows (`rows`) of its buffers this step uses.
pub trait Backend: Send + Sized {
    /// A buffer of rows on the device.
    type Buf: Send;
    /// A weight matrix of one shard, ready for [`Backend::linear`].
    type Weight: Send + Sync;
    /// An f32 vector (norm weights).
    type Vector: Send + Sync;
    /// This shard's rows of the embedding table.
    type Table: Send + Sync;
    /// One step's row bookkeeping in the device's memory (kept between steps).
    type Meta: Send;
    /// The shard's paged KV storage.
    type Kv: PagedKv<Self>;

    /// The shard's heads.
    fn heads(&self) -> Heads;

    /// Takes a weight matrix of the `ShardMats` cut (`crate::model`).
    fn weight(&mut self, m: Mat) -> Result<Self::Weight>;
    /// Output features of a weight.
    fn out_features(w: &Self::Weight) -> usize;
    /// Takes an f32 vector.
    fn vector(&mut self, v: &[f32]) -> Result<Self::Vector>;
    /// Takes this shard's rows `vocab` of the embedding table.
    fn table(&mut self, m: Mat, vocab: Range<usize>) -> Result<Self::Table>;
    /// A zeroed paged KV store: `layers` layers of `n_blocks · block_size`
    /// positions.
    fn new_kv(&self, layers: usize, block_size: usize, n_blocks: usize) -> Result<Self::Kv>;

    /// A zeroed buffer of `len` elements.
    fn alloc(&self, elem: Elem, len: usize) -> Result<Self::Buf>;
    /// Waits until the work queued so far has finished: what a profiled
    /// step calls around each op, so that host timers measure the op on a
    /// device that runs asynchronously. Synchronous backends have nothing
    /// to wait for.
    fn fence(&self) -> Result<()> {
        Ok(())
    }
    /// Empty step bookkeeping.
    fn new_meta(&self) -> Result<Self::Meta>;
    /// Fills `meta` for a step (positions, tokens, KV slots, picked rows).
    fn load_meta(&self, meta: &mut Self::Meta, step: &StepRows<'_>) -> Result<()>;
    /// Called once before every step's forward (a backend whose collective
    /// cannot be interrupted checks its peers here).
    fn before_step(&self, _host: &dyn Collective) -> Result<()> {
        Ok(())
    }

    /// Copies host rows into the start of an f32 buffer.
    fn upload(&self, buf: &mut Self::Buf, data: &[f32]) -> Result<()>;
    /// Reads the first `len` values of an f32 buffer.
    fn download(&self, buf: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// The indices of the first `rows` rows (of `width` activations) of
    /// the normed hidden state `x` that hold a NaN or an infinity, where the
    /// head's matmul would hide it: the CPU's Q8 activation blocks turn NaN
    /// into 0, so such a row gets finite, all-zero logits. By default none:
    /// a head computing in floating point carries a non-finite input into
    /// its logits, where the draw refuses it.
    fn non_finite_rows(&self, _x: &Self::Buf, _rows: usize, _width: usize) -> Result<Vec<usize>> {
        Ok(Vec::new())
    }

    /// `out[r] = table[token[r]]` (f32) for this shard's tokens, zero rows for
    /// the others.
    fn embed(
        &self,
        table: &Self::Table,
        meta: &Self::Meta,
        out: &mut Self::Buf,
        rows: usize,
    ) -> Result<()>;
    /// `x[r] += table[pos[r]]` (f32) for every row: the learned position
    /// embeddings (GPT-2), the whole table on every rank.
    fn add_positions(
        &self,
        table: &Self::Table,
        meta: &Self::Meta,
        x: &mut Self::Buf,
        rows: usize,
    ) -> Result<()>;
    /// `x += residual` (if given), then `out = rms_norm(x) · w` (`out` Act).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        x: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Buf,
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// `x += residual` (if given), then `out = layer_norm(x) · w + b`
    /// (`out` Act).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        x: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        w: &Self::Vector,
        b: &Self::Vector,
        eps: f32,
        out: &mut Self::Buf,
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// `out = x · Wᵀ` for `rows` rows of `x` (Act); `out` of type `out_elem`.
    fn linear(
        &self,
        w: &Self::Weight,
        x: &Self::Buf,
        out: &mut Self::Buf,
        out_elem: Elem,
        rows: usize,
    ) -> Result<()>;
    /// `x[r] += bias` for each of the `rows` rows of `width` values of `x`
    /// (of type `elem`).
    fn add_bias(
        &self,
        x: &mut Self::Buf,
        bias: &Self::Vector,
        rows: usize,
        width: usize,
        elem: Elem,
    ) -> Result<()>;
    /// RMSNorm of every q head (weight `q_w`) and k head (weight `k_w`) of
    /// fused `q|k|v` rows, in place, each over its `head_dim` values.
    fn head_norm(
        &self,
        qkv: &mut Self::Buf,
        q_w: &Self::Vector,
        k_w: &Self::Vector,
        eps: f32,
        rows: usize,
    ) -> Result<()>;
    /// Rotates the q and k heads of fused `q|k|v` rows by their positions,
    /// pairing each head's dimensions as the model's [`crate::family::RopeStyle`] says;
    /// `windowed` picks the rotary embedding of the windowed layers.
    fn rope(
        &self,
        qkv: &mut Self::Buf,
        meta: &Self::Meta,
        rows: usize,
        windowed: bool,
    ) -> Result<()>;
    /// `out = act(gate) · up` for rows `[gate (width) | up (width)]`.
    fn gated_act(
        &self,
        gate_up: &Self::Buf,
        out: &mut Self::Buf,
        rows: usize,
        width: usize,
        act: Activation,
    ) -> Result<()>;
    /// `out = act(x)` for rows of `width` (Act): an ungated FFN (GPT-2).
    fn act(
        &self,
        x: &Self::Buf,
        out: &mut Self::Buf,
        rows: usize,
        width: usize,
        act: Activation,
    ) -> Result<()>;
    /// `x *= s` over `len` f32 (Gemma's embedding scale).
    fn scale(&self, x: &mut Self::Buf, s: f32, len: usize) -> Result<()>;
    /// RMSNorm in place of `rows` f32 rows of `width` (Gemma's post-norms).
    fn rms_norm_f32(
        &self,
        x: &mut Self::Buf,
        w: &Self::Vector,
        eps: f32,
        rows: usize,
        width: usize,
    ) -> Result<()>;
    /// `x = cap · tanh(x / cap)` over `len` f32 (soft-capped logits).
    fn softcap(&self, x: &mut Self::Buf, cap: f32, len: usize) -> Result<()>;
    /// `x += delta` over `len` f32.
    fn add(&self, x: &mut Self::Buf, delta: &Self::Buf, len: usize) -> Result<()>;
    /// Copies the picked rows (of `width` f32) of `x` into `out`.
    fn gather_rows(
        &self,
        x: &Self::Buf,
        meta: &Self::Meta,
        out: &mut Self::Buf,
        width: usize,
    ) -> Result<()>;
    /// Sums the first `len` f32 of `buf` over the stage's tensor-parallel
    /// ranks; `host` is the step's host collective (rank, world, abort).
    fn all_reduce(&self, buf: &mut Self::Buf, len: usize, host: &dyn Collective) -> Result<()>;
}

/// Where a forward writes and reads one layer's keys and values.
pub trait KvCache<B: Backend> {
    /// Writes the step's new keys and values of `layer` (the k and v parts
    /// of the rotated `q|k|v` rows), then computes causal attention of every
    /// row's queries over its sequence into `out` (Act, `rows × q_width`),
    /// scaled, capped and windowed as `params` says.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        be: &B,
        layer: usize,
        qkv: &B::Buf,
        meta: &B::Meta,
        out: &mut B::Buf,
        rows: usize,
        params: &AttnParams,
    ) -> Result<()>;
}

/// A shard's paged KV storage (block ids as [`crate::kv::KvManager`] hands them out).
pub trait PagedKv<B: Backend>: KvCache<B> + Send {
    /// Positions per block.
    fn block_size(&self) -> usize;
    /// Blocks held.
    fn n_blocks(&self) -> usize;
    /// Layers held.
    fn n_layers(&self) -> usize;
    /// Bytes per stored key (or value) element.
    fn elem_bytes(&self) -> usize;
    /// Copies block `src` into block `dst` in every layer.
    fn copy_block(&mut self, be: &B, src: u32, dst: u32) -> Result<()>;
}

/// A shard's activation buffers, sized for a number of rows and kept between
/// steps: a step of at most that many rows allocates nothing.
pub struct Workspace<B: Backend> {
    rows: usize,
    picked: usize,
    pub(crate) x: B::Buf,
    pub(crate) normed: B::Buf,
    pub(crate) qkv: B::Buf,
    pub(crate) attn: B::Buf,
    pub(crate) gate_up: B::Buf,
    pub(crate) act: B::Buf,
    pub(crate) delta: B::Buf,
    pub(crate) last: B::Buf,
    pub(crate) last_normed: B::Buf,
    pub(crate) logits: B::Buf,
    pub(crate) meta: B::Meta,
}

/// The widths a workspace's buffers need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Widths {
    pub(crate) hidden: usize,
    pub(crate) heads: Heads,
    pub(crate) ffn: usize,
    pub(crate) local_vocab: usize,
}

impl<B: Backend> Workspace<B> {
    /// Buffers for `rows` rows, `picked` of them returning logits.
    pub(crate) fn new(be: &B, w: Widths, rows: usize, picked: usize) -> Result<Self> {
        let (h, hd) = (w.hidden, w.heads);
        Ok(Self {
            rows,
            picked,
            x: be.alloc(Elem::F32, rows * h)?,
            normed: be.alloc(Elem::Act, rows * h)?,
            qkv: be.alloc(Elem::Act, rows * hd.qkv_width())?,
            attn: be.alloc(Elem::Act, rows * hd.q_width())?,
            gate_up: be.alloc(Elem::Act, rows * 2 * w.ffn)?,
            act: be.alloc(Elem::Act, rows * w.ffn)?,
            delta: be.alloc(Elem::F32, rows * h)?,
            last: be.alloc(Elem::F32, picked * h)?,
            last_normed: be.alloc(Elem::Act, picked * h)?,
            logits: be.alloc(Elem::F32, picked * w.local_vocab)?,
            meta: be.new_meta()?,
        })
    }

    /// Grows the buffers (and keeps them) if a step needs more than they hold.
    pub(crate) fn ensure(&mut self, be: &B, w: Widths, rows: usize, picked: usize) -> Result<()> {
        if rows > self.rows || picked > self.picked {
            let meta = std::mem::replace(&mut self.meta, be.new_meta()?);
            *self = Self::new(be, w, rows.max(self.rows), picked.max(self.picked))?;
            self.meta = meta;
        }
        Ok(())
    }
}
